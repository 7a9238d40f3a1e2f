"""PCM device physics of the emulator, one effect per function, vectorised over devices.

Conductances are in µS, times in seconds, amplitudes in volts and widths in nanoseconds. Every
function takes the random draws it needs as standard-normal arrays, so that `sim_backend.chip`
decides where each number comes from and the physics stays a pure function of its inputs.

The drift and read-noise expressions are the published ones (see `calibration.published`). The
pulse response and the post-programming relaxation are this emulator's own model, with
coefficients in ``calibration/data/pcm_default.toml``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DeviceParams:
    """Every coefficient of the emulated chip; `calibration.params` loads it from TOML.

    Field names start with the TOML section they come from (``reset_``, ``set_``, ...).
    """

    # [chip]
    chip_g_max_us: float

    # [reset]: melt and quench
    reset_melt_v: float
    reset_g_median_us: float
    reset_g_sigma_ln: float

    # [set]: partial SET
    set_threshold_v: float
    set_full_v: float
    set_max_fraction: float
    set_width_ref_ns: float
    set_width_exponent: float
    set_g_sat_us: float
    set_g_sat_sigma_ln: float
    set_efficiency_sigma_ln: float
    set_cycle_sigma_ln: float

    # [relaxation]: hidden post-programming offset
    relaxation_time_s: float
    relaxation_avrami_exponent: float
    relaxation_levels_us: tuple[float, ...]
    relaxation_sigma_us: tuple[float, ...]

    # [drift]
    drift_t0_s: float
    drift_nu_mean_slope: float
    drift_nu_mean_offset: float
    drift_nu_mean_min: float
    drift_nu_mean_max: float
    drift_nu_std_slope: float
    drift_nu_std_offset: float
    drift_nu_std_min: float
    drift_nu_std_max: float

    # [read]
    read_qs_coefficient: float
    read_qs_exponent: float
    read_qs_max: float
    read_t_read_s: float
    read_adc_bits: int
    read_adc_full_scale_us: float
    read_voltage_v: float

    # [stuck]
    stuck_fraction: float
    stuck_high_share: float
    stuck_low_median_us: float
    stuck_high_median_us: float
    stuck_sigma_ln: float

    # [timing]
    timing_address_ns: float
    timing_read_ns: float

    # [limits]
    limits_set_amplitude_min_v: float
    limits_set_amplitude_max_v: float
    limits_reset_amplitude_max_v: float
    limits_width_max_ns: float
    limits_pulses_per_device_max: int
    limits_total_time_max_s: float

    # [temperature]
    temperature_ambient_c: float
    temperature_wander_c: float
    temperature_wander_period_s: float

    def __post_init__(self) -> None:
        check_params(self)

    def digest(self) -> str:
        """Return a SHA-256 hex digest of every value, to tie a chip state file to its parameters."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def check_params(params: DeviceParams) -> None:
    """Raise ValueError naming the first parameter that is outside its physical range."""
    for field in dataclasses.fields(params):
        value = np.asarray(getattr(params, field.name), dtype=np.float64)
        if not np.all(np.isfinite(value)):
            raise ValueError(f"parameter {field.name} must be finite, got {getattr(params, field.name)!r}")

    positive = [
        "chip_g_max_us", "reset_melt_v", "reset_g_median_us", "set_full_v", "set_max_fraction",
        "set_width_ref_ns", "set_g_sat_us", "relaxation_time_s", "relaxation_avrami_exponent",
        "drift_t0_s", "read_qs_coefficient", "read_qs_max", "read_t_read_s",
        "read_adc_full_scale_us", "read_voltage_v", "stuck_low_median_us", "stuck_high_median_us",
        "timing_read_ns", "limits_set_amplitude_max_v", "limits_reset_amplitude_max_v",
        "limits_width_max_ns", "limits_pulses_per_device_max", "limits_total_time_max_s",
        "temperature_wander_period_s",
    ]
    for name in positive:
        value = getattr(params, name)
        if not np.isfinite(value) or value <= 0:
            raise ValueError(f"parameter {name} must be a finite number > 0, got {value!r}")

    non_negative = [
        "reset_g_sigma_ln", "set_threshold_v", "set_width_exponent", "set_g_sat_sigma_ln",
        "set_efficiency_sigma_ln", "set_cycle_sigma_ln", "stuck_sigma_ln", "timing_address_ns",
        "limits_set_amplitude_min_v", "temperature_wander_c", "read_qs_exponent",
    ]
    for name in non_negative:
        value = getattr(params, name)
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"parameter {name} must be a finite number >= 0, got {value!r}")

    for name in ("set_max_fraction", "stuck_fraction", "stuck_high_share"):
        value = getattr(params, name)
        if not 0 <= value <= 1:
            raise ValueError(f"parameter {name} must lie in [0, 1], got {value!r}")

    if params.set_full_v <= params.set_threshold_v:
        raise ValueError(
            f"set_full_v ({params.set_full_v} V) must exceed set_threshold_v ({params.set_threshold_v} V)"
        )
    if not 1 <= params.read_adc_bits <= 16:
        raise ValueError(f"read_adc_bits must lie in [1, 16], got {params.read_adc_bits!r}")

    levels = np.asarray(params.relaxation_levels_us, dtype=np.float64)
    sigmas = np.asarray(params.relaxation_sigma_us, dtype=np.float64)
    if levels.ndim != 1 or levels.size < 2 or levels.shape != sigmas.shape:
        raise ValueError(
            "relaxation_levels_us and relaxation_sigma_us must be lists of the same length >= 2, "
            f"got {levels.size} and {sigmas.size} values"
        )
    if np.any(np.diff(levels) <= 0) or np.any(sigmas < 0) or not np.all(np.isfinite(sigmas)):
        raise ValueError("relaxation_levels_us must increase strictly and relaxation_sigma_us be >= 0")


# RESET ---------------------------------------------------------------------------------------


def reset_conductance_us(params: DeviceParams, z: np.ndarray) -> np.ndarray:
    """Return the conductance right after a melt-quench RESET: log-normal around a small median."""
    return params.reset_g_median_us * np.exp(params.reset_g_sigma_ln * z)


def reset_melts(params: DeviceParams, amplitude_v: np.ndarray) -> np.ndarray:
    """Return which RESET pulses are strong enough to melt the cell; weaker ones change nothing."""
    return amplitude_v >= params.reset_melt_v


# Partial SET ---------------------------------------------------------------------------------


def set_drive(params: DeviceParams, amplitude_v: np.ndarray, width_ns: np.ndarray) -> np.ndarray:
    """Return the fraction of the remaining headroom that a nominal device's SET pulse closes.

    Zero below ``set_threshold_v``, rising linearly to ``set_max_fraction`` at ``set_full_v``,
    scaled by ``(width / set_width_ref_ns) ** set_width_exponent``.
    """
    span = params.set_full_v - params.set_threshold_v
    drive = np.clip((amplitude_v - params.set_threshold_v) / span, 0.0, 1.0)
    return params.set_max_fraction * drive * (width_ns / params.set_width_ref_ns) ** params.set_width_exponent


def set_step_us(
    params: DeviceParams,
    g_us: np.ndarray,
    drive: np.ndarray,
    efficiency: np.ndarray,
    g_sat_us: np.ndarray,
    z_cycle: np.ndarray,
) -> np.ndarray:
    """Return the conductance increase of one partial-SET pulse, >= 0 and at most up to ``g_sat_us``.

    The step is the headroom ``g_sat_us - g_us`` times the drive, the device's efficiency and a
    log-normal cycle-to-cycle factor of median 1, so it shrinks as the device nears saturation.
    """
    headroom = np.maximum(g_sat_us - g_us, 0.0)
    fraction = drive * efficiency * np.exp(params.set_cycle_sigma_ln * z_cycle)
    return headroom * np.minimum(fraction, 1.0)


# Relaxation ----------------------------------------------------------------------------------


def relaxation_sigma_us(params: DeviceParams, g_us: np.ndarray) -> np.ndarray:
    """Return the standard deviation of the relaxation offset drawn at a SET pulse to ``g_us``.

    Piecewise linear through the fitted knots, held constant beyond the first and last knot.
    """
    return np.interp(g_us, params.relaxation_levels_us, params.relaxation_sigma_us)


def relaxation_fraction(params: DeviceParams, age_s: np.ndarray) -> np.ndarray:
    """Return how much of the relaxation offset has developed at ``age_s`` after the pulse.

    Avrami-type kinetics ``1 - exp(-(age / tau) ** n)``: slow to start, so verify reads taken
    well under a second after the pulse barely see the offset, and complete long before t0.
    """
    scaled = np.maximum(age_s, 0.0) / params.relaxation_time_s
    return -np.expm1(-(scaled**params.relaxation_avrami_exponent))


# Drift ---------------------------------------------------------------------------------------


def _normalised_level(params: DeviceParams, g_us: np.ndarray) -> np.ndarray:
    return np.maximum(g_us / params.chip_g_max_us, 1e-6)


def drift_nu(params: DeviceParams, g_us: np.ndarray, z_nu: np.ndarray) -> np.ndarray:
    """Return each device's drift exponent at programmed level ``g_us`` from its fixed draw ``z_nu``.

    Normal with the published level-dependent mean and standard deviation; negative values are
    folded to positive ones.
    """
    log_g = np.log(_normalised_level(params, g_us))
    mean = np.clip(
        params.drift_nu_mean_slope * log_g + params.drift_nu_mean_offset,
        params.drift_nu_mean_min,
        params.drift_nu_mean_max,
    )
    std = np.clip(
        params.drift_nu_std_slope * log_g + params.drift_nu_std_offset,
        params.drift_nu_std_min,
        params.drift_nu_std_max,
    )
    return np.abs(mean + std * z_nu)


def drift_factor(params: DeviceParams, age_s: np.ndarray, nu: np.ndarray) -> np.ndarray:
    """Return G(t)/G(t0) = (age / t0) ** -nu after t0, and 1 before it."""
    ratio = np.maximum(age_s / params.drift_t0_s, 1.0)
    return ratio ** (-nu)


# Read ----------------------------------------------------------------------------------------


def read_noise_qs(params: DeviceParams, g_us: np.ndarray) -> np.ndarray:
    """Return the 1/f noise coefficient Q_s at programmed level ``g_us``."""
    g = _normalised_level(params, g_us)
    return np.minimum(params.read_qs_coefficient / g**params.read_qs_exponent, params.read_qs_max)


def read_noise_sigma_us(
    params: DeviceParams, g_prog_us: np.ndarray, g_now_us: np.ndarray, age_s: np.ndarray
) -> np.ndarray:
    """Return the 1/f read-noise standard deviation ``G(t) Q_s sqrt(ln((t + t_r) / (2 t_r)))``.

    The logarithm is floored at 0 for ages below one read time, where the expression has no
    meaning.
    """
    t_read = params.read_t_read_s
    spread = np.sqrt(np.maximum(np.log((age_s + t_read) / (2.0 * t_read)), 0.0))
    return g_now_us * read_noise_qs(params, g_prog_us) * spread


def adc_lsb_us(params: DeviceParams) -> float:
    """Return the conductance step of one ADC code, in µS."""
    return params.read_adc_full_scale_us / (1 << params.read_adc_bits)


def adc_quantise_us(params: DeviceParams, g_us: np.ndarray) -> np.ndarray:
    """Round a conductance to the ADC's codes: 0 .. 2**bits - 1 steps of `adc_lsb_us`.

    Values below 0 read as code 0 and values above the full scale as the top code, as a
    saturating converter does.
    """
    lsb = adc_lsb_us(params)
    top = (1 << params.read_adc_bits) - 1
    codes = np.clip(np.rint(g_us / lsb), 0, top)
    codes += 0.0  # turns -0.0 into 0.0
    return codes * lsb


# Chip environment ----------------------------------------------------------------------------


def temperature_c(params: DeviceParams, clock_s: float) -> float:
    """Return the chip temperature: the set value plus an optional slow sinusoidal wander."""
    phase = 2.0 * np.pi * clock_s / params.temperature_wander_period_s
    return float(params.temperature_ambient_c + params.temperature_wander_c * np.sin(phase))
