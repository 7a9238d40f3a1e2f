"""Load and write the emulator's parameter file (TOML) as `sim_backend.physics.DeviceParams`.

The file has one table per group of parameters (``[reset]``, ``[set]``, ...). A key ``k`` in
table ``[s]`` fills the field ``s_k`` of `DeviceParams`. Every field must be present, and an
unknown or missing key raises `ParamsError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from sim_backend.physics import DeviceParams

DEFAULT_PATH = Path(__file__).resolve().parent / "data" / "pcm_default.toml"

SECTIONS = ("chip", "reset", "set", "relaxation", "drift", "read", "stuck", "timing", "limits", "temperature")

PUBLISHED = "published: Joshi et al., Nature Communications 11, 2473 (2020)"
FITTED_RELAXATION = "fitted by calibration/fit.py to sigma_prog(g) at the 11 published levels"
FITTED_RESET = "fitted by calibration/fit.py to sigma_prog(0) = 0.2635 uS"

SOURCES: dict[str, str] = {
    "chip_g_max_us": f"{PUBLISHED}; G_max = 25 uS",
    "reset_melt_v": "model choice: RESET amplitudes below this do not melt the cell and change nothing",
    "reset_g_median_us": FITTED_RESET,
    "reset_g_sigma_ln": "model choice: log-normal spread of the quenched amorphous state",
    "set_threshold_v": "model choice: no crystal growth below this SET amplitude",
    "set_full_v": "model choice: SET drive saturates at this amplitude",
    "set_max_fraction": "model choice: share of the headroom to saturation closed by one full-drive pulse",
    "set_width_ref_ns": "model choice: pulse width at which set_max_fraction holds",
    "set_width_exponent": "model choice: step grows as (width / reference) ** exponent",
    "set_g_sat_us": "model choice: fully crystallised conductance, above G_max",
    "set_g_sat_sigma_ln": "model choice: device-to-device spread of the saturation conductance",
    "set_efficiency_sigma_ln": "model choice: device-to-device spread of the SET efficiency",
    "set_cycle_sigma_ln": "model choice: cycle-to-cycle spread of one SET step",
    "relaxation_time_s": "model choice: hidden from verify reads (under 1 % at 0.4 s), complete by t0 = 20 s",
    "relaxation_avrami_exponent": "model choice: Avrami exponent of the sigmoidal relaxation",
    "relaxation_levels_us": "fit knots: the 11 published target levels",
    "relaxation_sigma_us": FITTED_RELAXATION,
    "drift_t0_s": f"{PUBLISHED}; drift reference time",
    "drift_nu_mean_slope": f"{PUBLISHED}; mean nu = clip(slope ln g + offset, min, max)",
    "drift_nu_mean_offset": PUBLISHED,
    "drift_nu_mean_min": PUBLISHED,
    "drift_nu_mean_max": PUBLISHED,
    "drift_nu_std_slope": f"{PUBLISHED}; std nu = clip(slope ln g + offset, min, max)",
    "drift_nu_std_offset": PUBLISHED,
    "drift_nu_std_min": PUBLISHED,
    "drift_nu_std_max": PUBLISHED,
    "read_qs_coefficient": f"{PUBLISHED}; Q_s = min(coefficient / g ** exponent, max)",
    "read_qs_exponent": PUBLISHED,
    "read_qs_max": PUBLISHED,
    "read_t_read_s": f"{PUBLISHED}; read integration time",
    "read_adc_bits": f"{PUBLISHED}; 8-bit ADC",
    "read_adc_full_scale_us": "model choice: ADC range 0 .. full scale, above G_max with margin",
    "read_voltage_v": f"{PUBLISHED}; reads at 0.2 V",
    "stuck_fraction": "model choice: stuck devices make most of the 0.9 % that did not converge on the published chip",
    "stuck_high_share": "model choice: share of stuck devices stuck high (the rest stuck near zero)",
    "stuck_low_median_us": "model choice: conductance of devices stuck near zero",
    "stuck_high_median_us": "model choice: conductance of devices stuck high",
    "stuck_sigma_ln": "model choice: log-normal spread of stuck conductances",
    "timing_address_ns": "model choice: addressing overhead added to every pulse",
    "timing_read_ns": f"{PUBLISHED}; about 1 us per read",
    "limits_set_amplitude_min_v": "emulated controller limit",
    "limits_set_amplitude_max_v": "emulated controller limit",
    "limits_reset_amplitude_max_v": "emulated controller limit",
    "limits_width_max_ns": "emulated controller limit",
    "limits_pulses_per_device_max": "emulated controller limit",
    "limits_total_time_max_s": "emulated controller limit: one week of chip time per session",
    "temperature_ambient_c": "model choice: chip temperature",
    "temperature_wander_c": "model choice: amplitude of a slow sinusoidal wander (0 = constant)",
    "temperature_wander_period_s": "model choice: period of the wander",
}


class ParamsError(ValueError):
    """The parameter file is missing, malformed, or has an unknown, missing or invalid key."""


def _section_of(field_name: str) -> str:
    for section in SECTIONS:
        if field_name.startswith(section + "_"):
            return section
    raise AssertionError(f"DeviceParams field {field_name} has no section prefix")


def _layout() -> dict[str, dict[str, dataclasses.Field]]:
    layout: dict[str, dict[str, dataclasses.Field]] = {section: {} for section in SECTIONS}
    for field in dataclasses.fields(DeviceParams):
        section = _section_of(field.name)
        layout[section][field.name[len(section) + 1 :]] = field
    return layout


def _convert(value: Any, field: dataclasses.Field, where: str) -> Any:
    kind = field.type
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where} must be an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where} must be a number, got {value!r}")
        return float(value)
    if kind == "tuple[float, ...]":
        if not isinstance(value, list) or not all(
            isinstance(item, (int, float)) and not isinstance(item, bool) for item in value
        ):
            raise ParamsError(f"{where} must be a list of numbers, got {value!r}")
        return tuple(float(item) for item in value)
    raise AssertionError(f"unsupported parameter type {kind} for {field.name}")


def params_from_dict(data: dict[str, Any], source: str = "<dict>") -> DeviceParams:
    """Build `DeviceParams` from the nested tables of a parameter file.

    Raises `ParamsError` naming ``source`` and the key for unknown, missing or mistyped keys and
    for values outside their physical range.
    """
    layout = _layout()
    values: dict[str, Any] = {}
    for section, table in data.items():
        if section not in layout:
            raise ParamsError(f"{source}: unknown table [{section}]; valid tables: {', '.join(SECTIONS)}")
        if not isinstance(table, dict):
            raise ParamsError(f"{source}: [{section}] must be a table, got {table!r}")
        for key, value in table.items():
            where = f"{source}: {section}.{key}"
            if key not in layout[section]:
                raise ParamsError(f"{where} is not a known key; valid keys: {', '.join(layout[section])}")
            field = layout[section][key]
            values[field.name] = _convert(value, field, where)
    missing = [f"{section}.{key}" for section, keys in layout.items() for key, field in keys.items() if field.name not in values]
    if missing:
        raise ParamsError(f"{source}: missing keys {', '.join(missing)}")
    try:
        return DeviceParams(**values)
    except ValueError as error:
        raise ParamsError(f"{source}: {error}") from error


def load_params(path: str | Path | None = None) -> DeviceParams:
    """Load a parameter file; ``None`` loads the packaged default ``pcm_default.toml``."""
    path = DEFAULT_PATH if path is None else Path(path)
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError as error:
        raise ParamsError(f"parameter file {path} not found") from error
    except tomllib.TOMLDecodeError as error:
        raise ParamsError(f"{path}: invalid TOML: {error}") from error
    return params_from_dict(data, str(path))


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_format_value(item) for item in value) + "]"
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def format_params_toml(params: DeviceParams, header: str, sources: dict[str, str] | None = None) -> str:
    """Return the TOML text of ``params``, each key with a comment naming its source."""
    sources = SOURCES if sources is None else sources
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for section, keys in _layout().items():
        lines.append("")
        lines.append(f"[{section}]")
        for key, field in keys.items():
            lines.append(f"# {sources.get(field.name, 'no source given')}")
            lines.append(f"{key} = {_format_value(getattr(params, field.name))}")
    return "\n".join(lines) + "\n"


def write_params(params: DeviceParams, path: str | Path, header: str, sources: dict[str, str] | None = None) -> Path:
    """Write ``params`` as a parameter file at ``path`` (atomically) and return the path."""
    path = Path(path)
    text = format_params_toml(params, header, sources)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
    return path
