"""Safety limits: configuration against read-back, and pulse validation (drivers.limits)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from drivers.limits import check_limits, validate_device_ids, validate_pulses
from hwctl.backend import LimitError, Limits

REPORTED = Limits(
    set_amplitude_min_v=0.2,
    set_amplitude_max_v=2.0,
    reset_amplitude_max_v=3.5,
    width_max_ns=10000.0,
    pulses_per_device_max=1000,
    total_time_max_s=604800.0,
    g_max_us=25.0,
    read_voltage_v=0.2,
)


def test_check_limits_accepts_equal_values():
    check_limits({"set_amplitude_max_v": 2.0, "pulses_per_device_max": 1000}, REPORTED)


def test_check_limits_accepts_single_precision_readback():
    float32_readback = dataclasses.replace(REPORTED, set_amplitude_max_v=float(np.float32(2.0 / 3)))
    check_limits({"set_amplitude_max_v": 2.0 / 3}, float32_readback)


def test_check_limits_names_both_values():
    with pytest.raises(LimitError) as raised:
        check_limits({"set_amplitude_max_v": 1.5, "width_max_ns": 10000.0}, REPORTED)
    message = str(raised.value)
    assert "set_amplitude_max_v" in message
    assert "1.5" in message
    assert "2.0" in message
    assert "width_max_ns" not in message


def test_check_limits_reports_every_mismatch():
    with pytest.raises(LimitError) as raised:
        check_limits({"pulses_per_device_max": 999, "total_time_max_s": 3600.0}, REPORTED)
    assert "pulses_per_device_max: configuration expects 999, controller reports 1000" in str(raised.value)
    assert "total_time_max_s: configuration expects 3600.0, controller reports 604800.0" in str(raised.value)


def test_check_limits_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown limit name.*max_voltage"):
        check_limits({"max_voltage": 2.0}, REPORTED)


def _pulses(count: int = 4):
    return (
        np.arange(count, dtype=np.int64),
        np.ones(count, dtype=np.uint8),
        np.full(count, 1.0),
        np.full(count, 100.0),
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p[2].__setitem__(2, 2.5), "SET amplitude 2.5 for device 2 .* outside \\[0.2, 2.0\\]"),
        (lambda p: p[2].__setitem__(0, 0.1), "SET amplitude 0.1 for device 0"),
        (lambda p: (p[1].__setitem__(1, 0), p[2].__setitem__(1, 4.0)), "RESET amplitude 4.0 for device 1"),
        (lambda p: p[3].__setitem__(3, 0.0), "pulse width 0.0 for device 3"),
        (lambda p: p[3].__setitem__(3, float("nan")), "pulse width nan"),
        (lambda p: p[1].__setitem__(0, 7), "pulse kind 7"),
        (lambda p: p[0].__setitem__(1, 0), "device id 0 appears more than once"),
        (lambda p: p[0].__setitem__(1, 64), "device id 64 .* outside \\[0, 64\\)"),
    ],
)
def test_validate_pulses_rejects(change, message):
    pulses = _pulses()
    change(pulses)
    with pytest.raises(LimitError, match=message):
        validate_pulses(REPORTED, 64, *pulses)


def test_validate_pulses_accepts_edges():
    ids, kinds, amplitudes, widths = _pulses(3)
    amplitudes[:] = [0.2, 2.0, 3.5]
    kinds[2] = 0
    widths[:] = 10000.0
    validate_pulses(REPORTED, 64, ids, kinds, amplitudes, widths)


def test_duplicate_ids_found_in_large_batch():
    ids = np.random.default_rng(3).permutation(4096)
    ids[4000] = ids[17]
    with pytest.raises(LimitError, match=f"device id {ids[17]} appears more than once"):
        validate_device_ids(4096, ids, require_unique=True)
    validate_device_ids(4096, ids, require_unique=False)


def test_repeat_in_ascending_batch_found():
    ids = np.arange(1000)
    validate_device_ids(1000, ids, require_unique=True)
    ids[501] = ids[500]  # still sorted, but no longer strictly ascending
    with pytest.raises(LimitError, match="device id 500 appears more than once"):
        validate_device_ids(1000, ids, require_unique=True)
