"""Program a run's devices batch by batch, with spare devices, failure codes and a budget.

Each batch goes through five steps, in an order that keeps the chip and the run file
consistent wherever the process dies:

1. `RunFile.begin_program_batch` records the batch and the chip clock before its first pulse.
2. Program-and-verify runs; pairs with a failed device move to spare devices and are
   programmed there, up to ``program.spare_attempts`` times.
3. `RunFile.stage_program_batch` writes results, failure codes and moves past the cursor,
   with the chip clock at the end of the batch.
4. An emulated chip saves its state file (atomically).
5. `RunFile.commit_program_batch` makes the batch valid in one write.

A run that stops between steps 1 and 5 leaves the batch in flight, and the next session checks
it against the chip first (`verify_in_flight`). A virtual clock moves with every pulse, read and
wait, so its value identifies the chip's state. If it reads the clock staged in step 3, the chip
holds exactly the staged batch, which is committed. If it reads the clock of step 1, no pulse of
the batch reached the chip, which is then programmed as if for the first time. An emulated chip
that reloads its state file after a kill is always in one of these two cases, so a resumed run
stores the same values as a run that was never stopped. Otherwise, and always on a real clock,
every device of the batch is read once. Pairs whose two devices read within tolerance of their
targets are kept, and the other pairs are programmed again.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from hwctl.allocation import Allocation, spare_word_lines
from hwctl.backend import Backend, Geometry
from hwctl.clock import clock_is_virtual
from hwctl.config import RunConfig
from hwctl.failures import (
    FailureCode,
    budget_exceeded,
    classify_failures,
    failed_pairs,
    failure_counts,
)
from hwctl.interrupts import StopRequest
from hwctl.runfile import InFlightBatch, RemapRows, RunFile, iter_device_batches
from protocols.program_verify import (
    DeviceStatus,
    ProgramVerifySettings,
    check_settings_against_limits,
    program_verify,
)
from protocols.readback import read_devices

if TYPE_CHECKING:
    from hwctl.orchestrator import Network

log = logging.getLogger(__name__)

RESULT_FIELDS = ("final_g_us", "pulses", "iterations", "status", "t_programmed_s")


class RunPaused(Exception):
    """The failure budget is used up; the run stopped with a file that can be resumed."""


def program_settings(config: RunConfig) -> ProgramVerifySettings:
    overrides = {
        "tolerance_us": config.program.tolerance_us,
        "max_iterations": config.program.max_iterations,
        "max_pulses_per_device": config.program.max_pulses_per_device,
    }
    defaults = ProgramVerifySettings()
    return dataclasses.replace(defaults, **{k: v for k, v in overrides.items() if v is not None})


class SparePool:
    """Spare device pairs on the word lines the allocation left free, handed out in order.

    The run file counts the pairs already moved, so a resumed run continues with the next
    spare and never hands one out twice.
    """

    def __init__(self, allocation: Allocation, geometry: Geometry) -> None:
        rows = spare_word_lines(allocation, geometry)
        columns = np.arange(0, geometry.cols - 1, 2, dtype=np.int64)
        self.plus = (rows[:, None] * geometry.cols + columns[None, :]).reshape(-1)

    def take(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Return up to ``count`` spare pairs from position ``start`` on, as (G+, G−) devices."""
        plus = self.plus[start : start + count]
        return plus, plus + 1


def save_chip_state(backend: Backend) -> None:
    """Make an emulated chip with a state file save it; other backends keep their own state."""
    if getattr(backend, "state_path", None) is not None:
        backend.save_state()


def _interleave(plus: np.ndarray, minus: np.ndarray) -> np.ndarray:
    return np.column_stack([plus, minus]).reshape(-1)


def _pair_slots(pair_positions: np.ndarray) -> np.ndarray:
    """Return the slots (2p, 2p + 1) of pairs at the given positions of a batch."""
    return _interleave(2 * pair_positions, 2 * pair_positions + 1)


def _results(result, settings: ProgramVerifySettings) -> dict[str, np.ndarray]:
    arrays = {name: np.array(getattr(result, name)) for name in RESULT_FIELDS}
    arrays["failure"] = classify_failures(
        arrays["status"], arrays["pulses"], arrays["iterations"], arrays["final_g_us"], settings
    )
    return arrays


def _program_pairs(
    config: RunConfig,
    backend: Backend,
    run: RunFile,
    spares: SparePool,
    pairs: np.ndarray,
    devices: np.ndarray,
    targets_us: np.ndarray,
    settings: ProgramVerifySettings,
) -> tuple[dict[str, np.ndarray], RemapRows | None]:
    """Program ``pairs`` on ``devices`` (slot order), moving failed pairs to spares.

    Returns the per-slot results and the moves, which the caller stores with the batch.
    """
    arrays = _results(program_verify(backend, devices, targets_us, settings), settings)
    moves: list[RemapRows] = []
    handed_out = 0
    for _ in range(config.program.spare_attempts):
        failed = failed_pairs(arrays["status"])
        if not failed.size:
            break
        new_plus, new_minus = spares.take(run.progress().remaps + handed_out, failed.size)
        if len(new_plus) < failed.size:
            run.log_event("fault", f"spare devices exhausted: {failed.size - len(new_plus)} "
                          "failed pairs stay where they are", backend.clock_s())
            failed = failed[: len(new_plus)]
            if not failed.size:
                break

        slots = _pair_slots(failed)
        left_failure = arrays["failure"][slots]
        retry = program_verify(backend, _interleave(new_plus, new_minus), targets_us[slots], settings)
        moves.append(RemapRows(
            pairs=pairs[failed],
            new_plus=new_plus,
            new_minus=new_minus,
            chip_clock_s=np.full(failed.size, backend.clock_s()),
            failure_plus=left_failure[0::2],
            failure_minus=left_failure[1::2],
        ))
        handed_out += failed.size
        for name, values in _results(retry, settings).items():
            arrays[name][slots] = values

    if not moves:
        return arrays, None
    joined = RemapRows(*(
        np.concatenate([getattr(move, field.name) for move in moves])
        for field in dataclasses.fields(RemapRows)
    ))
    return arrays, joined


def _batch_devices(run: RunFile, first: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the pairs, devices (slot order) and targets of slots ``first`` to ``stop``."""
    mapping = run.mapping()
    pairs = np.arange(first // 2, stop // 2)
    devices = _interleave(mapping.device_plus[pairs], mapping.device_minus[pairs])
    return pairs, devices, run.target_us()[first:stop]


def program_batch(config: RunConfig, backend: Backend, run: RunFile, spares: SparePool,
                  first: int, stop: int, settings: ProgramVerifySettings) -> None:
    """Program slots ``first`` to ``stop``, move failed pairs to spares, then store the batch."""
    run.begin_program_batch(first, stop, backend.clock_s())
    pairs, devices, targets = _batch_devices(run, first, stop)
    arrays, moves = _program_pairs(config, backend, run, spares, pairs, devices, targets, settings)
    _store_batch(backend, run, first, arrays, moves)


def _store_batch(backend: Backend, run: RunFile, first: int, arrays: dict[str, np.ndarray],
                 moves: RemapRows | None) -> None:
    """Stage a batch with the chip clock, save an emulated chip's state, then commit."""
    run.stage_program_batch(first, **arrays, remaps=moves, chip_clock_s=backend.clock_s())
    save_chip_state(backend)
    run.commit_program_batch()


def within_tolerance(g_us: np.ndarray, targets_us: np.ndarray, settings: ProgramVerifySettings) -> np.ndarray:
    """Return, per device, whether a read ``g_us`` passes program-and-verify's acceptance test.

    Targets below ``reset_level_us`` are accepted up to ``reset_accept_us``; the others within
    ``settings.tolerance_for(target)`` on either side.
    """
    reset_only = targets_us < settings.reset_level_us
    close = np.abs(g_us - targets_us) <= settings.tolerance_for(targets_us)
    return np.where(reset_only, g_us <= settings.reset_accept_us, close)


def verify_in_flight(config: RunConfig, backend: Backend, run: RunFile, spares: SparePool,
                     batch: InFlightBatch, settings: ProgramVerifySettings) -> None:
    """Finish a batch that a stopped run left in flight, without trusting what it did.

    See the module docstring. A kept device is stored with 0 pulses and 0 iterations, because
    the pulses it received before the stop are unknown. Its ``t_programmed_s`` is the chip
    clock of the verify read, an upper bound of its last pulse.
    """
    first, stop = batch.start, batch.stop
    clock_s = backend.clock_s()
    where = f"slots {first} to {stop} were in flight when the run stopped"
    virtual = clock_is_virtual(backend)
    if virtual and batch.staged and clock_s == batch.staged_clock_s:
        run.log_event("verify", f"{where}; the virtual chip clock reads {clock_s!r} s, the value "
                      "staged with the batch's results, so the chip holds exactly that batch: "
                      "storing the staged results", clock_s)
        run.commit_program_batch()
        return
    if virtual and clock_s == batch.chip_clock_s:
        run.log_event("verify", f"{where}; the virtual chip clock still reads {clock_s!r} s, "
                      "as when the batch began, so none of its pulses reached the chip: "
                      "programming it as new", clock_s)
        program_batch(config, backend, run, spares, first, stop, settings)
        return

    pairs, devices, targets = _batch_devices(run, first, stop)
    g_us = read_devices(backend, devices, config.program.batch_size)
    kept = within_tolerance(g_us, targets, settings).reshape(-1, 2).all(axis=1)
    arrays = {
        "final_g_us": g_us,
        "pulses": np.zeros(devices.size, dtype=np.int64),
        "iterations": np.zeros(devices.size, dtype=np.int64),
        "status": np.full(devices.size, DeviceStatus.CONVERGED, dtype=np.uint8),
        "t_programmed_s": np.full(devices.size, clock_s),
        "failure": np.full(devices.size, FailureCode.NONE, dtype=np.int8),
    }
    redo = np.flatnonzero(~kept)
    moves = None
    if redo.size:
        slots = _pair_slots(redo)
        again, moves = _program_pairs(
            config, backend, run, spares, pairs[redo], devices[slots], targets[slots], settings
        )
        for name, values in again.items():
            arrays[name][slots] = values
    run.log_event("verify", f"{where}; a verify read kept {np.count_nonzero(kept)} pairs within "
                  f"tolerance and programmed {redo.size} pairs again", clock_s)
    _store_batch(backend, run, first, arrays, moves)


def effective_failure_budget(run: RunFile, config: RunConfig) -> float:
    """Return the run's failure budget: the one stored in the file, else the configured one."""
    stored = run.progress().failure_budget
    return stored if math.isfinite(stored) else config.program.failure_budget


def check_failure_budget(run: RunFile, budget: float, clock_s: float) -> None:
    """Pause the run (flag, event, `RunPaused`) if more pairs failed than the budget allows."""
    stored = run.program_results()
    failed = failed_pairs(stored["status"]).size
    if not budget_exceeded(failed, run.n_pairs, budget):
        return
    causes = ", ".join(f"{name} {count}" for name, count in failure_counts(stored["failure"]).items())
    message = (
        f"{failed} of {run.n_pairs} pairs ({100 * failed / run.n_pairs:.2f} %) hold a device that "
        f"failed program-and-verify, more than the failure budget of {100 * budget:g} % of pairs "
        f"(program.failure_budget); failed devices by cause: {causes or 'none classified'}"
    )
    run.set_paused(True)
    run.log_event("pause", message, clock_s)
    raise RunPaused(message)


def program_step(config: RunConfig, backend: Backend, run: RunFile, network: Network,
                 stop: StopRequest | None = None) -> None:
    """Program every device not yet stored in the run file, one flushed batch at a time.

    A batch left in flight by a stopped run is finished first (`verify_in_flight`). After each
    batch the failure budget is checked, and a requested stop takes effect.
    """
    n_devices = run.n_devices
    settings = program_settings(config)
    check_settings_against_limits(backend, settings)
    spares = SparePool(network.allocation, backend.geometry())
    budget = effective_failure_budget(run, config)
    start = run.progress().devices_programmed
    if start >= n_devices:
        return
    check_failure_budget(run, budget, backend.clock_s())

    batch_size = config.program.batch_size + config.program.batch_size % 2
    run.log_event("program", f"programming devices {start} to {n_devices}", backend.clock_s())
    with tqdm(total=n_devices - start, desc="program-and-verify", unit="dev") as bar:
        in_flight = run.in_flight()
        if in_flight is not None:
            verify_in_flight(config, backend, run, spares, in_flight, settings)
            bar.update(in_flight.stop - in_flight.start)
            _after_batch(run, backend, budget, stop, in_flight.start, in_flight.stop)
        for first, last in iter_device_batches(n_devices, batch_size, run.progress().devices_programmed):
            program_batch(config, backend, run, spares, first, last, settings)
            bar.update(last - first)
            _after_batch(run, backend, budget, stop, first, last)

    status = run.program_results()["status"]
    converged = np.count_nonzero(status == DeviceStatus.CONVERGED)
    run.log_event("programmed", f"{converged} of {len(status)} devices converged, "
                  f"{run.progress().remaps} pairs moved to spares", backend.clock_s())


def _after_batch(run: RunFile, backend: Backend, budget: float, stop: StopRequest | None,
                 first: int, last: int) -> None:
    check_failure_budget(run, budget, backend.clock_s())
    if stop is not None:
        stop.check(f"after storing devices {first} to {last}")
