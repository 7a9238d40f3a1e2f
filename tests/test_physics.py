"""Device physics functions against the published formulas and their stated properties."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from calibration import published
from calibration.params import load_params
from sim_backend import physics

PARAMS = load_params()
LEVELS = np.array([0.05, 0.5, 2.5, 5.0, 10.0, 17.5, 25.0])


def test_set_step_zero_below_threshold() -> None:
    amplitudes = np.array([0.0, 0.3, PARAMS.set_threshold_v])
    drive = physics.set_drive(PARAMS, amplitudes, np.full(3, 250.0))
    assert np.all(drive == 0)


def test_set_step_grows_with_amplitude() -> None:
    amplitudes = np.linspace(PARAMS.set_threshold_v + 0.05, PARAMS.set_full_v, 10)
    drive = physics.set_drive(PARAMS, amplitudes, np.full(10, 250.0))
    steps = physics.set_step_us(PARAMS, np.full(10, 1.0), drive, np.ones(10), np.full(10, 30.0), np.zeros(10))
    assert np.all(np.diff(steps) > 0)


def test_set_step_saturates_below_g_sat() -> None:
    g_us = np.array([0.1, 10.0, 25.0, 29.9, 31.0])
    g_sat = np.full(5, 30.0)
    drive = np.full(5, 0.9)
    huge_cycle = np.full(5, 6.0)  # a 6-sigma cycle-to-cycle draw
    steps = physics.set_step_us(PARAMS, g_us, drive, np.full(5, 3.0), g_sat, huge_cycle)
    assert np.all(steps >= 0)
    assert np.all(g_us + steps <= np.maximum(g_sat, g_us) + 1e-12)
    # The same pulse raises a low device more than one near saturation.
    assert steps[0] > steps[1] > steps[3]


def test_relaxation_hidden_at_verify_and_complete_at_t0() -> None:
    assert physics.relaxation_fraction(PARAMS, np.array([0.4]))[0] < 0.01
    assert physics.relaxation_fraction(PARAMS, np.array([PARAMS.drift_t0_s]))[0] > 0.999999


def test_drift_nu_matches_published_formula() -> None:
    g_us = np.repeat(LEVELS, 3)
    z = np.tile([-1.5, 0.0, 2.0], LEVELS.size)
    expected = np.abs(published.drift_nu_mean(g_us) + published.drift_nu_std(g_us) * z)
    assert np.allclose(physics.drift_nu(PARAMS, g_us, z), expected, rtol=1e-12)


def test_drift_nu_folds_negative_draws() -> None:
    nu = physics.drift_nu(PARAMS, np.array([25.0]), np.array([-20.0]))
    assert nu[0] == pytest.approx(abs(0.049 - 20 * 0.008))


def test_drift_factor_only_after_t0() -> None:
    ages = np.array([1e-3, 10.0, 20.0, 3600.0, 86400.0])
    nu = np.full(5, 0.06)
    factor = physics.drift_factor(PARAMS, ages, nu)
    assert np.all(factor[:3] == 1.0)
    assert factor[3] == pytest.approx((3600 / 20) ** -0.06)
    assert factor[4] == pytest.approx((86400 / 20) ** -0.06)


def test_read_noise_matches_published_formula() -> None:
    g_prog = LEVELS
    g_now = 0.8 * LEVELS
    ages = np.array([1e-6, 1e-3, 0.1, 25.0, 3600.0, 86400.0, 1e6])
    for age in ages:
        expected = published.read_noise_sigma_us(g_prog, g_now, age)
        actual = physics.read_noise_sigma_us(PARAMS, g_prog, g_now, np.full(LEVELS.size, age))
        assert np.allclose(actual, expected, rtol=1e-12)


def test_read_noise_caps_qs_at_low_level() -> None:
    assert physics.read_noise_qs(PARAMS, np.array([0.0, 1e-3]))[0] == pytest.approx(0.2)


def test_adc_rounds_to_codes_and_saturates() -> None:
    lsb = physics.adc_lsb_us(PARAMS)
    assert lsb == pytest.approx(PARAMS.read_adc_full_scale_us / 256)
    values = np.array([-1.0, 0.4 * lsb, 0.6 * lsb, 10.0, 100.0])
    quantised = physics.adc_quantise_us(PARAMS, values)
    assert quantised[0] == 0.0
    assert not np.signbit(quantised[0])
    assert quantised[1] == 0.0
    assert quantised[2] == pytest.approx(lsb)
    assert abs(quantised[3] - 10.0) <= lsb / 2
    assert quantised[4] == pytest.approx(255 * lsb)


def test_relaxation_sigma_interpolates_knots() -> None:
    knots = np.asarray(PARAMS.relaxation_levels_us)
    sigma = np.asarray(PARAMS.relaxation_sigma_us)
    middle = 0.5 * (knots[3] + knots[4])
    assert physics.relaxation_sigma_us(PARAMS, np.array([middle]))[0] == pytest.approx(0.5 * (sigma[3] + sigma[4]))
    assert physics.relaxation_sigma_us(PARAMS, np.array([100.0]))[0] == sigma[-1]


def test_temperature_default_and_wander() -> None:
    assert physics.temperature_c(PARAMS, 1234.0) == pytest.approx(PARAMS.temperature_ambient_c)
    wandering = dataclasses.replace(PARAMS, temperature_wander_c=0.5, temperature_wander_period_s=400.0)
    assert physics.temperature_c(wandering, 100.0) == pytest.approx(PARAMS.temperature_ambient_c + 0.5)


def test_digest_follows_every_value() -> None:
    changed = dataclasses.replace(PARAMS, set_cycle_sigma_ln=PARAMS.set_cycle_sigma_ln + 1e-9)
    assert changed.digest() != PARAMS.digest()
    assert dataclasses.replace(PARAMS).digest() == PARAMS.digest()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("set_max_fraction", 1.5, "set_max_fraction"),
        ("stuck_fraction", -0.1, "stuck_fraction"),
        ("set_full_v", 0.1, "set_full_v"),
        ("read_adc_bits", 0, "read_adc_bits"),
        ("chip_g_max_us", float("nan"), "chip_g_max_us"),
        ("relaxation_sigma_us", (0.1,), "relaxation"),
    ],
)
def test_invalid_params_rejected(name: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PARAMS, **{name: value})
