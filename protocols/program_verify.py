"""Iterative program-and-verify on the `hwctl.backend.Backend` primitives.

Each batch of devices is RESET, then verified and pulsed in rounds until every device is within
tolerance of its target, stuck, or out of budget. All steps work on whole arrays of the batch;
every loop has a fixed upper bound.

One round ("iteration") for the devices still pending:

1. Wait until ``verify_delay_s`` has passed since the last pulse phase, then read every pending
   device once.
2. Devices that read close to or above their target are read ``verify_reads - 1`` more times,
   ``verify_delay_s`` apart, and judged on the mean. Reads that far apart carry nearly
   independent 1/f noise, so the mean is a better estimate than one read.
3. Judge each device. Within tolerance, it is CONVERGED. Below, it gets a partial-SET pulse
   whose amplitude comes from the remaining gap through a per-device gain estimate (µS per volt
   above ``set_amplitude_min_v``) learnt from its previous steps. Slightly above, it is read
   again next round (at most ``max_holds`` times in a row); further above, it is RESET to start
   over (at most ``max_resets`` times). A device that does not respond to ``stuck_pulses``
   pulses in a row is STUCK: a SET at the maximum amplitude that raises it by less than
   ``stuck_response_us``, or a RESET after which it still reads above ``reset_ceiling_us``.

Targets below ``reset_level_us`` (0 µS among them) are left in the RESET state: they are RESET
and verified only, and accepted when they read at most ``reset_accept_us``. The RESET state
cannot be tuned, and its reads carry large relative 1/f noise, so a tighter bound would only
select lucky reads at the cost of more RESET pulses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import IntEnum

import numpy as np

from hwctl.backend import Backend, LimitError, PulseKind

logger = logging.getLogger(__name__)

MAX_BATCH_SIZE = 262_144
"""Largest batch accepted. With the emulator's 1 µs reads, a first verify read then comes at most
about 0.3 s after its pulse. tests/test_program_verify.py checks that the default calibration
holds for batches of 256 and of this size."""

ProgressCallback = Callable[[int, int], None]


class DeviceStatus(IntEnum):
    """Outcome of program-and-verify for one device."""

    CONVERGED = 0  # last verify within tolerance
    GAVE_UP = 1  # iterations, pulses or overshoot RESETs used up
    STUCK = 2  # did not respond to pulses


_PENDING = -1


@dataclass(frozen=True)
class ProgramVerifySettings:
    """Parameters of program-and-verify. Voltages in V, widths in ns, conductances in µS.

    The defaults are tuned for the emulator's default device (``pcm_default.toml``); on a real
    chip, start from them and adjust the amplitude range and ``initial_gain_us_per_v``.
    """

    tolerance_us: float = 0.25
    tolerance_relative: float = 0.02
    max_iterations: int = 40
    max_pulses_per_device: int = 60
    set_amplitude_min_v: float = 0.5
    set_amplitude_max_v: float = 1.5
    set_width_ns: float = 250.0
    initial_gain_us_per_v: float = 15.0
    step_fraction: float = 0.5
    gain_adaptation: float = 0.5
    reset_amplitude_v: float = 2.5
    reset_width_ns: float = 50.0
    reset_level_us: float = 0.5
    reset_accept_us: float = 1.0
    reset_ceiling_us: float = 2.0
    verify_delay_s: float = 0.1
    verify_reads: int = 3
    confirm_margin_us: float = 1.0
    overshoot_margin_us: float = 0.5
    max_holds: int = 2
    max_resets: int = 4
    stuck_pulses: int = 4
    stuck_response_us: float = 0.5
    batch_size: int = 65_536

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not np.isfinite(value):
                raise ValueError(f"ProgramVerifySettings.{field.name} must be a finite number, got {value!r}")
        positive = (
            "tolerance_us", "max_iterations", "max_pulses_per_device", "set_amplitude_min_v", "set_width_ns",
            "initial_gain_us_per_v", "step_fraction", "reset_amplitude_v", "reset_width_ns", "verify_reads",
            "stuck_pulses", "stuck_response_us", "batch_size",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"ProgramVerifySettings.{name} must be > 0, got {getattr(self, name)!r}")
        non_negative = (
            "tolerance_relative", "gain_adaptation", "reset_level_us", "reset_accept_us", "verify_delay_s",
            "confirm_margin_us",
            "overshoot_margin_us", "max_holds", "max_resets",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"ProgramVerifySettings.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.set_amplitude_max_v <= self.set_amplitude_min_v:
            raise ValueError(
                f"set_amplitude_max_v ({self.set_amplitude_max_v} V) must exceed set_amplitude_min_v "
                f"({self.set_amplitude_min_v} V)"
            )
        if self.step_fraction > 1:
            raise ValueError(f"step_fraction must lie in (0, 1], got {self.step_fraction!r}")
        if self.reset_ceiling_us <= self.reset_accept_us:
            raise ValueError(
                f"reset_ceiling_us ({self.reset_ceiling_us}) must exceed reset_accept_us ({self.reset_accept_us})"
            )
        if self.batch_size > MAX_BATCH_SIZE:
            raise ValueError(
                f"batch_size {self.batch_size} is above {MAX_BATCH_SIZE}: verify reads would come so long "
                "after their pulses that the emulator calibration no longer holds; use a smaller batch"
            )
        for name in ("max_iterations", "max_pulses_per_device", "verify_reads", "max_holds", "max_resets", "stuck_pulses", "batch_size"):
            if int(getattr(self, name)) != getattr(self, name):
                raise ValueError(f"ProgramVerifySettings.{name} must be an integer, got {getattr(self, name)!r}")

    def tolerance_for(self, targets_us: np.ndarray) -> np.ndarray:
        """Return the accepted error per target: ``max(tolerance_us, tolerance_relative * target)``."""
        return np.maximum(self.tolerance_us, self.tolerance_relative * targets_us)


@dataclass
class ProgramResult:
    """Per-device outcome of `program_verify`, in the order of the requested devices."""

    device_ids: np.ndarray
    targets_us: np.ndarray
    final_g_us: np.ndarray  # last verify estimate (mean of the confirmation reads where taken)
    pulses: np.ndarray  # pulses applied, RESETs included
    iterations: np.ndarray  # verify rounds taken part in
    status: np.ndarray  # DeviceStatus values as uint8
    t_programmed_s: np.ndarray  # chip clock when the pulse batch holding the last pulse ended
    chip_time_s: float  # chip clock spent by the whole call

    def converged_fraction(self, nonzero_only: bool = True) -> float:
        """Return the share of CONVERGED devices, by default among non-zero targets only."""
        chosen = self.targets_us > 0 if nonzero_only else np.ones(self.status.size, dtype=bool)
        if not chosen.any():
            return float("nan")
        return float(np.mean(self.status[chosen] == DeviceStatus.CONVERGED))


def check_settings_against_limits(backend: Backend, settings: ProgramVerifySettings) -> None:
    """Raise `LimitError` if a pulse the settings can ask for lies outside the backend's limits."""
    limits = backend.limits()
    checks = [
        ("set_amplitude_min_v", settings.set_amplitude_min_v, limits.set_amplitude_min_v, limits.set_amplitude_max_v),
        ("set_amplitude_max_v", settings.set_amplitude_max_v, limits.set_amplitude_min_v, limits.set_amplitude_max_v),
        ("reset_amplitude_v", settings.reset_amplitude_v, 0.0, limits.reset_amplitude_max_v),
        ("set_width_ns", settings.set_width_ns, 0.0, limits.width_max_ns),
        ("reset_width_ns", settings.reset_width_ns, 0.0, limits.width_max_ns),
        ("max_pulses_per_device", settings.max_pulses_per_device, 1, limits.pulses_per_device_max),
    ]
    for name, value, low, high in checks:
        if not low <= value <= high:
            raise LimitError(f"setting {name} = {value} is outside the backend limit [{low}, {high}]; lower it")


def _check_request(backend: Backend, device_ids: np.ndarray, targets_us: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(device_ids)
    targets = np.asarray(targets_us, dtype=np.float64)
    if ids.ndim != 1 or targets.shape != ids.shape:
        raise ValueError(f"device_ids and targets_us must be 1-D and of equal length, got {ids.shape} and {targets.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"device_ids must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    count = backend.geometry().devices
    if ids.size and (ids.min() < 0 or ids.max() >= count):
        raise ValueError(f"device ids must lie in 0..{count - 1}, got {ids.min()}..{ids.max()}")
    if np.unique(ids).size != ids.size:
        raise ValueError("device_ids must be unique: a device cannot be programmed to two targets")
    g_max = backend.limits().g_max_us
    bad = np.flatnonzero(~np.isfinite(targets) | (targets < 0) | (targets > g_max))
    if bad.size:
        raise ValueError(
            f"target {targets[bad[0]]!r} µS for device {ids[bad[0]]} is outside [0, {g_max}] µS; "
            "scale the weights so that targets fit the chip's G_max"
        )
    return ids, targets


def program_verify(
    backend: Backend,
    device_ids: np.ndarray,
    targets_us: np.ndarray,
    settings: ProgramVerifySettings | None = None,
    progress: ProgressCallback | None = None,
) -> ProgramResult:
    """Program each device to its target conductance by iterative program-and-verify.

    Devices are handled ``settings.batch_size`` at a time, in the given order. ``progress`` is
    called after every batch with (devices finished, devices requested). Raises ValueError for
    bad requests and `LimitError` when the settings exceed the backend's limits, before any
    pulse is applied.
    """
    settings = ProgramVerifySettings() if settings is None else settings
    ids, targets = _check_request(backend, device_ids, targets_us)
    check_settings_against_limits(backend, settings)

    count = ids.size
    result = ProgramResult(
        device_ids=ids,
        targets_us=targets,
        final_g_us=np.full(count, np.nan),
        pulses=np.zeros(count, dtype=np.int64),
        iterations=np.zeros(count, dtype=np.int64),
        status=np.full(count, DeviceStatus.GAVE_UP, dtype=np.uint8),
        t_programmed_s=np.full(count, np.nan),
        chip_time_s=0.0,
    )
    start_s = backend.clock_s()
    time_budget_s = backend.limits().total_time_max_s
    for first in range(0, count, settings.batch_size):
        if backend.clock_s() - start_s > time_budget_s:
            logger.error(
                "program-and-verify stopped after %d of %d devices: the chip time limit of %.0f s is used up",
                first, count, time_budget_s,
            )
            break
        chosen = slice(first, min(first + settings.batch_size, count))
        _program_batch(backend, ids[chosen], targets[chosen], settings, result, chosen)
        if progress is not None:
            progress(chosen.stop, count)
    result.chip_time_s = backend.clock_s() - start_s

    converged = result.status == DeviceStatus.CONVERGED
    logger.info(
        "program-and-verify: %d devices, %d converged, %d gave up, %d stuck, %.1f s chip time",
        count, int(converged.sum()), int(np.sum(result.status == DeviceStatus.GAVE_UP)),
        int(np.sum(result.status == DeviceStatus.STUCK)), result.chip_time_s,
    )
    return result


class _Batch:
    """Per-device bookkeeping of one batch, as arrays indexed by position in the batch."""

    def __init__(self, ids: np.ndarray, targets: np.ndarray, settings: ProgramVerifySettings) -> None:
        size = ids.size
        self.ids = ids
        self.targets = targets
        self.tolerance = settings.tolerance_for(targets)
        self.reset_only = targets < settings.reset_level_us
        self.status = np.full(size, _PENDING, dtype=np.int8)
        self.read_us = np.full(size, np.nan)
        self.pulses = np.zeros(size, dtype=np.int64)
        self.iterations = np.zeros(size, dtype=np.int64)
        self.resets = np.zeros(size, dtype=np.int64)
        self.holds = np.zeros(size, dtype=np.int64)
        self.silent = np.zeros(size, dtype=np.int64)  # pulses in a row without a response
        self.gain = np.full(size, float(settings.initial_gain_us_per_v))
        self.last_kind = np.full(size, PulseKind.RESET, dtype=np.int8)  # -1: no pulse last round
        self.last_amplitude = np.zeros(size)
        self.expected_step = np.zeros(size)
        self.t_programmed_s = np.full(size, np.nan)


def _program_batch(
    backend: Backend,
    ids: np.ndarray,
    targets: np.ndarray,
    settings: ProgramVerifySettings,
    result: ProgramResult,
    where: slice,
) -> None:
    batch = _Batch(ids, targets, settings)
    backend.reset_devices(ids, settings.reset_amplitude_v, settings.reset_width_ns)
    batch.pulses += 1
    pulse_end_s = backend.clock_s()
    batch.t_programmed_s[:] = pulse_end_s

    for round_index in range(settings.max_iterations):
        active = np.flatnonzero(batch.status == _PENDING)
        if active.size == 0:
            break
        _wait_until(backend, pulse_end_s + settings.verify_delay_s)
        estimate = _verify(backend, batch, active, settings)
        _note_responses(batch, active, estimate, settings)
        batch.read_us[active] = estimate
        batch.iterations[active] += 1

        if round_index == settings.max_iterations - 1:
            break
        pulse_rows, kinds, amplitudes = _decide(batch, active, settings)
        if pulse_rows.size:
            widths = np.where(kinds == PulseKind.RESET, settings.reset_width_ns, settings.set_width_ns)
            backend.apply_pulses(ids[pulse_rows], kinds.astype(np.uint8), amplitudes, widths)
            pulse_end_s = backend.clock_s()
            batch.pulses[pulse_rows] += 1
            batch.t_programmed_s[pulse_rows] = pulse_end_s

    status = np.where(batch.status == _PENDING, DeviceStatus.GAVE_UP, batch.status).astype(np.uint8)
    result.final_g_us[where] = batch.read_us
    result.pulses[where] = batch.pulses
    result.iterations[where] = batch.iterations
    result.status[where] = status
    result.t_programmed_s[where] = batch.t_programmed_s


def _wait_until(backend: Backend, chip_time_s: float) -> None:
    remaining = chip_time_s - backend.clock_s()
    if remaining > 0:
        backend.wait_s(remaining)


def _verify(backend: Backend, batch: _Batch, active: np.ndarray, settings: ProgramVerifySettings) -> np.ndarray:
    """Return the conductance estimate of the active devices: one read, or a mean near the target."""
    estimate = backend.read(batch.ids[active])
    if settings.verify_reads == 1:
        return estimate
    targets = batch.targets[active]
    near = np.flatnonzero(
        ~batch.reset_only[active] & (estimate >= targets - batch.tolerance[active] - settings.confirm_margin_us)
    )
    if near.size == 0:
        return estimate
    total = estimate[near].copy()
    near_ids = batch.ids[active[near]]
    for _ in range(settings.verify_reads - 1):
        backend.wait_s(settings.verify_delay_s)
        total += backend.read(near_ids)
    estimate[near] = total / settings.verify_reads
    return estimate


def _note_responses(batch: _Batch, active: np.ndarray, estimate: np.ndarray, settings: ProgramVerifySettings) -> None:
    """Count pulses without a response and learn each device's SET gain from its last step."""
    kind = batch.last_kind[active]
    previous = batch.read_us[active]
    rise = estimate - previous

    was_reset = kind == PulseKind.RESET
    was_set = kind == PulseKind.SET
    at_max = was_set & (batch.last_amplitude[active] >= settings.set_amplitude_max_v)
    silent = (was_reset & (estimate > settings.reset_ceiling_us)) | (at_max & (rise < settings.stuck_response_us))
    answered = (was_reset | was_set) & ~silent
    batch.silent[active] = np.where(silent, batch.silent[active] + 1, np.where(answered, 0, batch.silent[active]))

    learn = np.flatnonzero(was_set & np.isfinite(previous))
    if learn.size and settings.gain_adaptation > 0:
        rows = active[learn]
        ratio = np.clip(rise[learn] / batch.expected_step[rows], 0.25, 4.0)
        batch.gain[rows] *= ratio**settings.gain_adaptation

    stuck = active[batch.silent[active] >= settings.stuck_pulses]
    batch.status[stuck] = DeviceStatus.STUCK


def _decide(
    batch: _Batch, active: np.ndarray, settings: ProgramVerifySettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Judge the pending devices and return the rows to pulse with their pulse kinds and amplitudes."""
    active = active[batch.status[active] == _PENDING]
    estimate = batch.read_us[active]
    targets = batch.targets[active]
    tolerance = batch.tolerance[active]
    reset_only = batch.reset_only[active]
    error = estimate - targets

    accept = np.where(reset_only, estimate <= settings.reset_accept_us, np.abs(error) <= tolerance)
    above = ~accept & (reset_only | (error > tolerance))
    hold = above & ~reset_only & (error <= tolerance + settings.overshoot_margin_us) & (batch.holds[active] < settings.max_holds)
    reset = above & ~hold
    set_pulse = ~accept & ~above

    batch.status[active[accept]] = DeviceStatus.CONVERGED
    batch.holds[active[hold]] += 1
    batch.holds[active[~hold]] = 0

    # Budgets: a device that would need one pulse too many gives up instead.
    out_of_resets = reset & (batch.resets[active] >= settings.max_resets)
    out_of_pulses = (reset | set_pulse) & (batch.pulses[active] >= settings.max_pulses_per_device)
    give_up = out_of_resets | out_of_pulses
    batch.status[active[give_up]] = DeviceStatus.GAVE_UP
    reset &= ~give_up
    set_pulse &= ~give_up

    # An overshoot makes the device's gain estimate more cautious for the next climb.
    batch.resets[active[reset]] += 1
    batch.gain[active[reset & ~reset_only]] *= 1.5

    set_rows = active[set_pulse]
    gap = -error[set_pulse]
    desired = settings.step_fraction * gap
    amplitude = np.clip(
        settings.set_amplitude_min_v + desired / batch.gain[set_rows],
        settings.set_amplitude_min_v,
        settings.set_amplitude_max_v,
    )
    batch.expected_step[set_rows] = batch.gain[set_rows] * (amplitude - settings.set_amplitude_min_v)

    reset_rows = active[reset]
    batch.last_kind[active] = -1
    batch.last_kind[reset_rows] = PulseKind.RESET
    batch.last_kind[set_rows] = PulseKind.SET
    batch.last_amplitude[reset_rows] = settings.reset_amplitude_v
    batch.last_amplitude[set_rows] = amplitude

    rows = np.concatenate([reset_rows, set_rows])
    kinds = np.concatenate([np.full(reset_rows.size, PulseKind.RESET), np.full(set_rows.size, PulseKind.SET)])
    amplitudes = np.concatenate([np.full(reset_rows.size, settings.reset_amplitude_v), amplitude])
    order = np.argsort(rows, kind="stable")
    return rows[order], kinds[order], amplitudes[order]
