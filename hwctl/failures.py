"""Per-device failure codes of program-and-verify, and the failure budget that pauses a run.

`protocols.program_verify` reports three outcomes per device (converged, gave up, stuck). The
run file stores, beside them, why a device failed, classified from the counts and the last
verify read that program-and-verify returns. The budget counts pairs that still hold a failed
device once their batch is stored, so pairs rescued by spare devices do not count.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from protocols.program_verify import DeviceStatus, ProgramVerifySettings


class FailureCode(IntEnum):
    """Cause of a device's failure to converge, as stored in ``/program/failure``."""

    NONE = 0  # converged, or kept after a verify read on resume
    STUCK_LOW = 1  # no response to SET pulses at the maximum amplitude
    STUCK_HIGH = 2  # still above the RESET ceiling after RESET pulses
    PULSE_BUDGET = 3  # used up max_pulses_per_device
    ITERATION_BUDGET = 4  # still pending after max_iterations verify rounds
    RESET_BUDGET = 5  # overshot its target more than max_resets times
    TIME_BUDGET = 6  # never pulsed: the chip time limit ran out before its batch


FAILURE_CODES = {code.name.lower(): int(code) for code in FailureCode}


def classify_failures(
    status: np.ndarray,
    pulses: np.ndarray,
    iterations: np.ndarray,
    final_g_us: np.ndarray,
    settings: ProgramVerifySettings,
) -> np.ndarray:
    """Return a `FailureCode` per device (int8) from program-and-verify's per-device results.

    A stuck device is stuck high when its last verify read lies above ``reset_ceiling_us``,
    the level a RESET must reach. A device that gave up is put down to the first budget it
    used up, in the order time, pulses, verify rounds, and otherwise RESETs.
    """
    status = np.asarray(status)
    pulses = np.asarray(pulses)
    iterations = np.asarray(iterations)
    final_g_us = np.asarray(final_g_us, dtype=np.float64)

    codes = np.full(status.shape, FailureCode.NONE, dtype=np.int8)
    stuck = status == DeviceStatus.STUCK
    high = np.nan_to_num(final_g_us, nan=0.0) > settings.reset_ceiling_us
    codes[stuck & high] = FailureCode.STUCK_HIGH
    codes[stuck & ~high] = FailureCode.STUCK_LOW

    gave_up = status == DeviceStatus.GAVE_UP
    never_pulsed = gave_up & (pulses == 0)
    out_of_pulses = gave_up & ~never_pulsed & (pulses >= settings.max_pulses_per_device)
    out_of_rounds = gave_up & ~never_pulsed & ~out_of_pulses & (iterations >= settings.max_iterations)
    codes[gave_up] = FailureCode.RESET_BUDGET
    codes[out_of_rounds] = FailureCode.ITERATION_BUDGET
    codes[out_of_pulses] = FailureCode.PULSE_BUDGET
    codes[never_pulsed] = FailureCode.TIME_BUDGET
    return codes


def failed_pairs(status: np.ndarray) -> np.ndarray:
    """Return the indices of pairs (slots 2p, 2p + 1) with a device that did not converge."""
    converged = (np.asarray(status) == DeviceStatus.CONVERGED).reshape(-1, 2)
    return np.flatnonzero(~converged.all(axis=1))


def failure_counts(failure: np.ndarray) -> dict[str, int]:
    """Return how many devices carry each failure code other than NONE, by name."""
    values, counts = np.unique(np.asarray(failure), return_counts=True)
    names = {int(code): code.name.lower() for code in FailureCode}
    return {
        names.get(int(value), f"code {int(value)}"): int(count)
        for value, count in zip(values, counts)
        if value != FailureCode.NONE
    }


def budget_exceeded(failed: int, n_pairs: int, budget: float) -> bool:
    """Return True once more than ``budget`` (a fraction of all ``n_pairs``) pairs have failed.

    The count is against all pairs of the run, not the pairs stored so far. So the run pauses
    as soon as it can no longer end within its budget, and a few failures in the first
    batches do not pause it.
    """
    return failed > budget * n_pairs
