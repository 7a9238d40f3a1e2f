"""Parameter file loading and writing, and the fitter."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import numpy as np
import pytest

from calibration import fit, published
from calibration.params import DEFAULT_PATH, SOURCES, ParamsError, load_params, write_params
from sim_backend.physics import DeviceParams


def default_tables() -> dict:
    with open(DEFAULT_PATH, "rb") as handle:
        return tomllib.load(handle)


def write_tables(path: Path, tables: dict) -> Path:
    lines = []
    for section, table in tables.items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            lines.append(f"{key} = {value!r}".replace("(", "[").replace(")", "]"))
    path.write_text("\n".join(lines) + "\n")
    return path


# Parameter files -----------------------------------------------------------------------------


def test_default_file_has_every_field_with_a_source() -> None:
    params = load_params()
    names = {field.name for field in dataclasses.fields(DeviceParams)}
    assert set(SOURCES) == names
    text = DEFAULT_PATH.read_text()
    for section, table in default_tables().items():
        for key in table:
            assert f"\n# {SOURCES[f'{section}_{key}']}\n{key} = " in text
    assert params.chip_g_max_us == published.G_MAX_US
    assert params.drift_t0_s == published.T0_S
    assert params.read_t_read_s == published.T_READ_S


def test_unknown_key_named_with_file(tmp_path: Path) -> None:
    tables = default_tables()
    tables["set"]["cycle_sigma"] = 0.3
    path = write_tables(tmp_path / "bad.toml", tables)
    with pytest.raises(ParamsError, match=r"bad.toml: set.cycle_sigma is not a known key; valid keys: .*cycle_sigma_ln"):
        load_params(path)


def test_missing_key_named_with_file(tmp_path: Path) -> None:
    tables = default_tables()
    del tables["drift"]["nu_std_max"]
    path = write_tables(tmp_path / "short.toml", tables)
    with pytest.raises(ParamsError, match=r"short.toml: missing keys drift.nu_std_max"):
        load_params(path)


def test_unknown_table_rejected(tmp_path: Path) -> None:
    tables = default_tables()
    tables["extra"] = {"a": 1.0}
    with pytest.raises(ParamsError, match=r"unknown table \[extra\]"):
        load_params(write_tables(tmp_path / "extra.toml", tables))


def test_wrong_type_rejected(tmp_path: Path) -> None:
    tables = default_tables()
    tables["read"]["adc_bits"] = 8.5
    with pytest.raises(ParamsError, match=r"read.adc_bits must be an integer"):
        load_params(write_tables(tmp_path / "type.toml", tables))


def test_out_of_range_value_rejected(tmp_path: Path) -> None:
    tables = default_tables()
    tables["stuck"]["fraction"] = 2.0
    with pytest.raises(ParamsError, match=r"range.toml: .*stuck_fraction"):
        load_params(write_tables(tmp_path / "range.toml", tables))


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.toml")


def test_write_and_load_round_trip(tmp_path: Path) -> None:
    params = dataclasses.replace(load_params(), set_cycle_sigma_ln=0.1234567890123, read_adc_bits=10)
    path = write_params(params, tmp_path / "copy.toml", "a test file\nsecond line")
    assert load_params(path) == params
    assert path.read_text().startswith("# a test file\n# second line\n")


# Fitting -------------------------------------------------------------------------------------


def test_level_errors_match_numpy() -> None:
    generator = np.random.default_rng(3)
    targets = np.repeat([0.0, 5.0, 20.0], 500)
    measured = targets + generator.normal(0.1, [0.2] * 500 + [0.5] * 500 + [1.0] * 500)
    errors = fit.level_errors(targets, measured)
    assert np.array_equal(errors.levels_us, [0.0, 5.0, 20.0])
    for index, level in enumerate(errors.levels_us):
        chosen = targets == level
        assert errors.sigma_us[index] == pytest.approx(np.std(measured[chosen] - level, ddof=1), rel=1e-9)
    assert np.array_equal(errors.devices, [500, 500, 500])


def test_level_errors_need_enough_devices() -> None:
    with pytest.raises(ValueError, match="at least 2 target levels"):
        fit.level_errors(np.repeat([1.0, 2.0], [500, 20]), np.ones(520))


def test_fit_recovers_a_known_relaxation() -> None:
    """Refit to 'lab' data made by an emulator with a known, larger relaxation."""
    levels = np.array([0.0, 10.0, 20.0])
    base = load_params()
    lab_sigma = np.array([0.0, 1.0, 0.9])
    lab = dataclasses.replace(
        base,
        reset_g_median_us=0.2,
        relaxation_levels_us=tuple(levels),
        relaxation_sigma_us=tuple(lab_sigma),
    )
    lab_errors = fit.emulate_levels(lab, levels, devices_per_level=2500, seed=77)

    fitted = fit.fit_params(base, levels, lab_errors.sigma_us, devices_per_level=2500, seed=78)
    assert fitted.reset_g_median_us == pytest.approx(0.2, rel=0.1)
    assert np.allclose(fitted.relaxation_sigma_us[1:], lab_sigma[1:], rtol=0.12)
    assert fitted.relaxation_sigma_us[0] == 0.0


def test_fit_rejects_bad_levels() -> None:
    with pytest.raises(ValueError, match="increase strictly"):
        fit.fit_params(load_params(), np.array([5.0, 2.5]), np.array([0.5, 0.5]))


@pytest.mark.slow
def test_default_fit_reproduces_the_shipped_file(tmp_path: Path) -> None:
    written = tmp_path / "refit.toml"
    refitted = fit.fit_default(written)
    shipped = load_params()
    # Equal to the last digit on the machine that wrote the file; the margins allow for
    # another numpy's last-bit differences in exp, log and cos.
    assert refitted.reset_g_median_us == pytest.approx(shipped.reset_g_median_us, abs=0.002)
    assert np.allclose(refitted.relaxation_sigma_us, shipped.relaxation_sigma_us, atol=0.01)
    assert dataclasses.replace(
        load_params(written),
        reset_g_median_us=shipped.reset_g_median_us,
        relaxation_sigma_us=shipped.relaxation_sigma_us,
    ) == shipped
