"""The emulated chip: limits, clock, determinism, state files, drift and read noise."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from calibration import published
from calibration.params import load_params
from hwctl.backend import Geometry, LimitError, PulseKind
from protocols.program_verify import DeviceStatus, program_verify
from protocols.readback import read_at_age
from sim_backend import physics
from sim_backend.chip import STUCK_HIGH, STUCK_LOW, STUCK_NONE, ChipStateError, EmulatedChip

SMALL = Geometry(arrays=1, rows=64, cols=256)
PARAMS = load_params()


def set_pulses(ids: np.ndarray, amplitude_v: float = 1.0, width_ns: float = 250.0):
    count = ids.size
    return (
        ids,
        np.full(count, PulseKind.SET, dtype=np.uint8),
        np.full(count, amplitude_v),
        np.full(count, width_ns),
    )


def snapshot(chip: EmulatedChip, ids: np.ndarray) -> tuple:
    g_pulse, relax = chip.programmed_state(ids)
    return chip.clock_s(), g_pulse, relax, chip.event_counts(ids), chip.last_pulse_s(ids)


def assert_same_snapshot(first: tuple, second: tuple) -> None:
    assert first[0] == second[0]
    for a, b in zip(first[1:], second[1:]):
        assert np.array_equal(a, b)


# Identity, geometry, limits ------------------------------------------------------------------


def test_default_geometry_and_identity() -> None:
    chip = EmulatedChip(seed=3)
    assert chip.geometry() == Geometry(1, 512, 2048)
    assert chip.geometry().devices == 1_048_576
    identity = chip.identity()
    assert identity == EmulatedChip(seed=3).identity()
    assert identity != EmulatedChip(seed=4).identity()
    assert identity.as_idn().count(",") == 3
    assert chip.temperature_c() == pytest.approx(25.0)
    assert chip.limits().g_max_us == published.G_MAX_US


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"amplitudes_v": 5.0}, "SET amplitude 5.0 V .*set_amplitude"),
        ({"amplitudes_v": 0.05}, "SET amplitude 0.05 V"),
        ({"amplitudes_v": float("nan")}, "SET amplitude nan"),
        ({"widths_ns": 1e6}, "pulse width 1000000.0 ns .*width_max_ns"),
        ({"widths_ns": 0.0}, "pulse width 0.0 ns"),
        ({"kinds": 7}, "pulse kind 7 is unknown"),
        ({"ids": 10**9}, "device id 1000000000 is outside"),
        ({"ids": -1}, "device id -1 is outside"),
        ({"duplicate": True}, "appears more than once"),
    ],
)
def test_invalid_pulses_rejected_without_change(change: dict, message: str) -> None:
    chip = EmulatedChip(seed=1, geometry=SMALL)
    ids = np.arange(100, 200)
    ids_, kinds, amplitudes, widths = set_pulses(ids)
    kinds, amplitudes, widths, ids_ = kinds.copy(), amplitudes.copy(), widths.copy(), ids_.copy()
    if "amplitudes_v" in change:
        amplitudes[50] = change["amplitudes_v"]
    if "widths_ns" in change:
        widths[50] = change["widths_ns"]
    if "kinds" in change:
        kinds[50] = change["kinds"]
    if "ids" in change:
        ids_[50] = change["ids"]
    if "duplicate" in change:
        ids_[50] = ids_[10]
    before = snapshot(chip, ids)

    with pytest.raises(LimitError, match=message):
        chip.apply_pulses(ids_, kinds, amplitudes, widths)

    assert_same_snapshot(before, snapshot(chip, ids))


def test_reset_amplitude_above_limit_rejected() -> None:
    chip = EmulatedChip(seed=1, geometry=SMALL)
    high = chip.limits().reset_amplitude_max_v + 0.5
    with pytest.raises(LimitError, match="RESET amplitude"):
        chip.reset_devices(np.arange(4), high, 50.0)


def test_mismatched_lengths_rejected() -> None:
    chip = EmulatedChip(seed=1, geometry=SMALL)
    ids, kinds, amplitudes, widths = set_pulses(np.arange(10))
    with pytest.raises(LimitError, match="one value per device"):
        chip.apply_pulses(ids, kinds[:5], amplitudes, widths)


def test_duplicate_read_ids_rejected() -> None:
    chip = EmulatedChip(seed=1, geometry=SMALL)
    with pytest.raises(LimitError, match="more than once"):
        chip.read(np.array([3, 4, 3]))


# Clock ---------------------------------------------------------------------------------------


def test_clock_advances_by_modelled_durations() -> None:
    chip = EmulatedChip(seed=1, geometry=SMALL)
    ids = np.arange(1000)
    chip.apply_pulses(*set_pulses(ids, width_ns=300.0))
    pulse_ns = 1000 * (300.0 + PARAMS.timing_address_ns)
    assert chip.clock_s() == pytest.approx(pulse_ns * 1e-9)

    chip.read(ids)
    assert chip.clock_s() == pytest.approx((pulse_ns + 1000 * PARAMS.timing_read_ns) * 1e-9)

    before = chip.clock_s()
    chip.wait_s(3600.0)
    assert chip.clock_s() == pytest.approx(before + 3600.0)


def test_each_device_records_its_own_pulse_time() -> None:
    chip = EmulatedChip(seed=1, geometry=SMALL)
    ids = np.array([5, 9, 2])
    chip.apply_pulses(*set_pulses(ids, width_ns=800.0))
    step_s = (800.0 + PARAMS.timing_address_ns) * 1e-9
    assert np.allclose(chip.last_pulse_s(ids), step_s * np.array([1, 2, 3]))


def test_negative_wait_rejected() -> None:
    chip = EmulatedChip(seed=1, geometry=SMALL)
    with pytest.raises(ValueError, match="wait duration"):
        chip.wait_s(-1.0)


# Determinism ---------------------------------------------------------------------------------


def pulse_rounds(chip: EmulatedChip, ids: np.ndarray, split: int, order: np.ndarray | None = None) -> None:
    """RESET, then three SET rounds at rising amplitude, each round in ``split`` calls.

    The rounds are a minute apart so that each device's relaxation has fully developed before
    its next pulse. The order of devices then changes nothing but microseconds of timing.
    """
    sequence = ids if order is None else ids[order]
    parts = np.array_split(sequence, split)
    for part in parts:
        chip.reset_devices(part, 2.5, 50.0)
    for amplitude in (0.8, 1.0, 1.2):
        chip.wait_s(60.0)
        for part in parts:
            chip.apply_pulses(*set_pulses(part, amplitude))


def test_pulse_results_ignore_batching_and_order() -> None:
    ids = np.arange(0, 16_000, 3)
    whole = EmulatedChip(seed=9, geometry=SMALL)
    pulse_rounds(whole, ids, split=1)
    split = EmulatedChip(seed=9, geometry=SMALL)
    pulse_rounds(split, ids, split=7)
    shuffled = EmulatedChip(seed=9, geometry=SMALL)
    pulse_rounds(shuffled, ids, split=3, order=np.random.default_rng(2).permutation(ids.size))

    reference = whole.programmed_state(ids)
    for other in (split, shuffled):
        state = other.programmed_state(ids)
        assert np.array_equal(reference[0], state[0])
        assert np.array_equal(reference[1], state[1])
        assert np.array_equal(whole.event_counts(ids), other.event_counts(ids))


def test_split_calls_give_identical_reads() -> None:
    ids = np.arange(0, 16_000, 3)
    whole = EmulatedChip(seed=9, geometry=SMALL)
    pulse_rounds(whole, ids, split=1)
    split = EmulatedChip(seed=9, geometry=SMALL)
    pulse_rounds(split, ids, split=5)
    whole.wait_s(25.0)
    split.wait_s(25.0)

    single = whole.read(ids)
    pieces = np.concatenate([split.read(part) for part in np.array_split(ids, 4)])
    assert whole.clock_s() == split.clock_s()
    assert np.array_equal(single, pieces)


def test_save_and_reload_between_batches_changes_nothing(tmp_path: Path) -> None:
    ids = np.arange(0, 16_000, 5)
    first, second = np.array_split(ids, 2)
    state = tmp_path / "chip.npz"

    straight = EmulatedChip(seed=4, geometry=SMALL)
    pulse_rounds(straight, first, split=1)
    pulse_rounds(straight, second, split=1)
    straight.wait_s(100.0)
    expected = straight.read(ids)

    with EmulatedChip(seed=4, geometry=SMALL, state_path=state) as chip:
        pulse_rounds(chip, first, split=1)
    assert state.exists()
    assert not state.with_name(state.name + ".tmp").exists()
    with EmulatedChip(seed=4, geometry=SMALL, state_path=state) as chip:
        pulse_rounds(chip, second, split=1)
        chip.wait_s(100.0)
        reloaded = chip.read(ids)
        assert chip.clock_s() == straight.clock_s()

    assert np.array_equal(expected, reloaded)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"seed": 5}, "seed 4"),
        ({"geometry": Geometry(1, 64, 128)}, "geometry"),
        ({"stuck_fraction": 0.02}, "digest"),
        ({"params": dataclasses.replace(PARAMS, set_cycle_sigma_ln=0.31)}, "digest"),
    ],
)
def test_state_file_of_another_chip_rejected(tmp_path: Path, options: dict, message: str) -> None:
    state = tmp_path / "chip.npz"
    EmulatedChip(seed=4, geometry=SMALL, state_path=state).close()
    arguments = {"seed": 4, "geometry": SMALL, "state_path": state, **options}
    with pytest.raises(ChipStateError, match=message):
        EmulatedChip(**arguments)


def test_closed_chip_rejects_calls() -> None:
    chip = EmulatedChip(seed=1, geometry=SMALL)
    chip.close()
    with pytest.raises(RuntimeError, match="closed"):
        chip.read(np.arange(3))


# Pulse physics through the chip ----------------------------------------------------------------


def test_reset_quenches_near_zero() -> None:
    chip = EmulatedChip(seed=2, geometry=SMALL, stuck_fraction=0.0)
    ids = np.arange(10_000)
    chip.apply_pulses(*set_pulses(ids, 1.5))
    chip.reset_devices(ids, 2.5, 50.0)
    g_after_reset, _ = chip.programmed_state(ids)
    assert np.median(g_after_reset) == pytest.approx(PARAMS.reset_g_median_us, rel=0.05)
    assert np.log(g_after_reset).std() == pytest.approx(PARAMS.reset_g_sigma_ln, rel=0.05)


def test_weak_reset_changes_nothing() -> None:
    chip = EmulatedChip(seed=2, geometry=SMALL, stuck_fraction=0.0)
    ids = np.arange(1000)
    chip.apply_pulses(*set_pulses(ids, 1.5))
    before, _ = chip.programmed_state(ids)
    chip.reset_devices(ids, 0.5 * PARAMS.reset_melt_v, 50.0)
    after, _ = chip.programmed_state(ids)
    assert np.array_equal(before, after)


def test_set_pulses_climb_towards_saturation() -> None:
    chip = EmulatedChip(seed=2, geometry=SMALL, stuck_fraction=0.0)
    ids = np.arange(5000)
    chip.reset_devices(ids, 2.5, 50.0)
    levels = []
    for _ in range(30):
        chip.apply_pulses(*set_pulses(ids, PARAMS.set_full_v))
        levels.append(chip.programmed_state(ids)[0].mean())
    assert np.all(np.diff(levels) > 0)
    assert levels[-1] == pytest.approx(PARAMS.set_g_sat_us, rel=0.05)
    assert levels[-1] - levels[-2] < 0.02 * (levels[1] - levels[0])


def test_devices_differ_in_efficiency() -> None:
    chip = EmulatedChip(seed=2, geometry=SMALL, stuck_fraction=0.0)
    ids = np.arange(5000)
    chip.reset_devices(ids, 2.5, 50.0)
    log_fractions = []
    for _ in range(2):
        before = chip.programmed_state(ids)[0]
        chip.apply_pulses(*set_pulses(ids, 0.8))
        step = chip.programmed_state(ids)[0] - before
        log_fractions.append(np.log(step / (PARAMS.set_g_sat_us - before)))
    # The share of the headroom each pulse closes carries the device's fixed efficiency and a
    # fresh cycle-to-cycle factor, so two pulses of the same device correlate by this much.
    efficiency_variance = PARAMS.set_efficiency_sigma_ln**2
    expected = efficiency_variance / (efficiency_variance + PARAMS.set_cycle_sigma_ln**2)
    assert np.corrcoef(log_fractions[0], log_fractions[1])[0, 1] == pytest.approx(expected, abs=0.08)


def test_stuck_fraction_and_behaviour() -> None:
    chip = EmulatedChip(seed=2, stuck_fraction=0.01)
    ids = np.arange(chip.geometry().devices)
    kinds = chip.stuck_kind(ids)
    assert np.mean(kinds != STUCK_NONE) == pytest.approx(0.01, rel=0.05)
    assert np.mean(kinds == STUCK_HIGH) == pytest.approx(0.01 * PARAMS.stuck_high_share, rel=0.1)

    low = ids[kinds == STUCK_LOW][:200]
    high = ids[kinds == STUCK_HIGH][:200]
    chip.apply_pulses(*set_pulses(low, PARAMS.set_full_v))
    chip.reset_devices(high, 2.5, 50.0)
    assert np.all(chip.programmed_state(low)[0] < 1.0)
    assert np.all(chip.programmed_state(high)[0] > 15.0)


def test_default_stuck_fraction_from_params() -> None:
    chip = EmulatedChip(seed=6)
    kinds = chip.stuck_kind(np.arange(chip.geometry().devices))
    assert np.mean(kinds != STUCK_NONE) == pytest.approx(PARAMS.stuck_fraction, rel=0.05)


# Drift and read noise --------------------------------------------------------------------------


def expected_drift_ratio(g0_us: np.ndarray, t_s: float) -> float:
    """Return sum G(t) / sum G(t0) for devices at levels ``g0_us``, nu ~ |N(mean(g), std(g))|.

    The expectation over each device's draw is a quadrature over the standard normal.
    """
    z = np.linspace(-8, 8, 4001)
    weight = np.exp(-0.5 * z**2)
    weight /= weight.sum()
    nu = np.abs(published.drift_nu_mean(g0_us)[:, None] + published.drift_nu_std(g0_us)[:, None] * z[None, :])
    ratio = ((t_s / published.T0_S) ** -nu) @ weight
    return float(np.sum(g0_us * ratio) / np.sum(g0_us))


@pytest.fixture(scope="module")
def programmed_chip() -> tuple[EmulatedChip, np.ndarray, np.ndarray, np.ndarray]:
    chip = EmulatedChip(seed=21)
    ids = np.arange(0, 40_000, 2)
    targets = np.repeat([2.5, 10.0, 20.0], [7000, 7000, 6000])
    result = program_verify(chip, ids, targets)
    keep = result.status == DeviceStatus.CONVERGED
    return chip, ids[keep], targets[keep], result.t_programmed_s[keep]


def test_drift_matches_published_exponents(programmed_chip) -> None:
    chip, ids, targets, t_programmed = programmed_chip
    # The programmed level that sets each device's exponent, without read noise.
    g0 = chip.conductance_us(ids, at_s=chip.last_pulse_s(ids) + published.T0_S)
    at_t0 = read_at_age(chip, ids, t_programmed, published.T0_S, group_s=0.05)
    for t_s in (3600.0, 86400.0):
        later = read_at_age(chip, ids, t_programmed, t_s, group_s=0.05)
        for level in (2.5, 10.0, 20.0):
            chosen = targets == level
            measured = later[chosen].mean() / at_t0[chosen].mean()
            expected = expected_drift_ratio(g0[chosen], t_s)
            assert measured == pytest.approx(expected, rel=0.005), (level, t_s)
            nu_bar = float(published.drift_nu_mean(level))
            assert measured == pytest.approx((t_s / published.T0_S) ** -nu_bar, rel=0.02), (level, t_s)


def test_read_noise_matches_formula() -> None:
    chip = EmulatedChip(seed=22, stuck_fraction=0.0)
    ids = np.arange(3000)
    targets = np.repeat([2.5, 12.5], 1500)
    result = program_verify(chip, ids, targets)
    chip.wait_s(1000.0)

    g_prog = chip.conductance_us(ids, at_s=float(chip.last_pulse_s(ids).max()) + published.T0_S)
    reads = np.stack([chip.read(ids) for _ in range(60)])
    age_s = chip.clock_s() - chip.last_pulse_s(ids)
    g_now = chip.conductance_us(ids)
    sigma = published.read_noise_sigma_us(g_prog, g_now, age_s)
    expected_variance = sigma**2 + physics.adc_lsb_us(PARAMS) ** 2 / 12

    converged = result.status == DeviceStatus.CONVERGED
    assert converged.mean() > 0.99
    for level in (2.5, 12.5):
        chosen = (targets == level) & converged
        measured = reads[:, chosen].var(axis=0, ddof=1).mean()
        assert measured == pytest.approx(expected_variance[chosen].mean(), rel=0.04), level
        assert reads[:, chosen].mean() == pytest.approx(g_now[chosen].mean(), abs=0.01)
