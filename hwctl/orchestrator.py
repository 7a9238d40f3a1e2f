"""The main job: program a network onto a chip, read it back on a schedule and evaluate it.

Each step works on the run file and picks up where the file shows the run stopped, so the steps
can run together (`run_job`), continue after a stop (`resume_job`), or run one at a time
(`hwctl program`, `hwctl read`, `hwctl evaluate`). An emulated chip saves its state file after
every program batch and every read, before the run file stores them, so the chip is never
behind the file (see `hwctl.programming`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from calibration.conductance import weights_to_conductances
from drivers.limits import check_limits
from hwctl.allocation import Allocation, LayerSlot, allocate
from hwctl.backend import Backend, Geometry
from hwctl.checkpoint import load_checkpoint
from hwctl.cifar import Normalizer, augment, load_split, locate_cifar10
from hwctl.clock import clock_is_virtual, wait_until
from hwctl.config import RunConfig, parse_config_text
from hwctl.evaluate import count_correct
from hwctl.failures import FAILURE_CODES
from hwctl.inference import EvaluationData, evaluate_read, layer_conductance_sums
from hwctl.interrupts import RunInterrupted, StopRequest
from hwctl.model import ResNetCifar
from hwctl.programming import (  # noqa: F401 -- SparePool stays importable from here
    RunPaused,
    SparePool,
    effective_failure_budget,
    program_step,
    save_chip_state,
)
from hwctl.runfile import Event, LayerRecord, ModelInfo, PairMapping, RunFile, RunFileError
from hwctl.schedule import format_duration, parse_schedule
from protocols.program_verify import DeviceStatus
from protocols.readback import read_devices

log = logging.getLogger(__name__)

# A read that starts more than this after its time gets a "late" event, s.
LATE_EVENT_S = 5.0
# Seconds between heartbeats of /progress while a real-clock run waits for a read.
HEARTBEAT_S = 30.0


@dataclass
class Network:
    """The float network to program and where it came from."""

    model: ResNetCifar
    info: dict
    allocation: Allocation


def emulator_state_path(config: RunConfig) -> Path:
    """Return the emulated chip's state file: the configured one, else one beside the run file.

    The emulated chip is non-volatile like a real one, so the steps of a run that happen in
    separate processes (program, read, evaluate, resume) all find the same devices.
    """
    if config.backend.state_file is not None:
        return Path(config.backend.state_file)
    out = Path(config.run.out)
    return out.with_name(out.name + ".chip.npz")


def open_backend(config: RunConfig, fresh_chip: bool = False) -> Backend:
    """Open the chip backend named in the configuration.

    With ``fresh_chip`` an emulator whose state file is the default one beside the run file
    starts from a new chip. A state file named in the configuration is always kept.
    """
    if config.backend.kind == "emulator":
        from calibration.params import load_params
        from sim_backend.chip import EmulatedChip

        state_path = emulator_state_path(config)
        if fresh_chip and config.backend.state_file is None and state_path.exists():
            log.info("starting a fresh emulated chip: removing %s", state_path)
            state_path.unlink()
        geometry = config.backend.geometry
        chip = EmulatedChip(
            seed=config.run.seed,
            params=load_params(config.backend.calibration_file),
            geometry=Geometry(*geometry) if geometry is not None else None,
            state_path=state_path,
            stuck_fraction=config.backend.stuck_fraction,
            clock=config.backend.clock,
        )
        check_limits(config.limits.expected(), chip.limits())
        return chip
    from hwctl.instrument import open_instrument

    return open_instrument(config.backend, expected_limits=config.limits.expected())


def load_network(config: RunConfig, backend: Backend) -> Network:
    model, info = load_checkpoint(config.model.checkpoint_path)
    allocation = allocate(model, backend.geometry(), config.model.layers)
    return Network(model, info, allocation)


def load_run_network(config: RunConfig, run: RunFile) -> Network:
    """Load the network a run file was programmed with, and check that it is the same one.

    Raises `RunFileError` if the checkpoint's digest differs from the one in the file, or if
    the network no longer allocates to the devices the file records (a run of another model).
    """
    model, info = load_checkpoint(config.model.checkpoint_path)
    stored = run.model_info().checkpoint_sha256
    if info["sha256"] != stored:
        raise RunFileError(
            f"{config.model.checkpoint_path} has changed since {run.path} was programmed "
            f"(sha256 {info['sha256'][:12]}…, the run used {stored[:12]}…); restore the "
            "original checkpoint"
        )
    allocation = allocate(model, run.geometry(), config.model.layers)
    plus, minus = run.allocated_mapping()
    if not (np.array_equal(allocation.device_plus, plus) and np.array_equal(allocation.device_minus, minus)):
        raise RunFileError(
            f"{run.path} records another allocation of weights to devices than "
            f"{config.model.checkpoint_path} gives now ({allocation.pairs} pairs against "
            f"{len(plus)}); this run file belongs to another model or allocation rule"
        )
    return Network(model, info, allocation)


def load_evaluation_data(config: RunConfig, normalization: dict) -> EvaluationData:
    source = locate_cifar10(config.data.resolve_cifar10_dir())
    test_images, test_labels = load_split(source, "test", config.data.test_images)
    training_images, _ = load_split(source, "train", config.data.bn_calibration_images)
    # The batch-norm statistics of the trained network describe augmented images (zero-padded
    # random crops and flips), so recalibration uses the same augmentation. With plain images
    # the recomputed statistics cost the shipped network about 1.8 points (measured on 5,000
    # test images). A fixed seed keeps the result reproducible.
    generator = torch.Generator().manual_seed(config.run.seed)
    calibration_images = augment(torch.from_numpy(training_images), generator).numpy()
    return EvaluationData(test_images, test_labels, calibration_images, Normalizer(**normalization))


def device_targets_us(allocation: Allocation, g_max_us: float) -> np.ndarray:
    """Return every device's target in file order: pair p is slots 2p (G+) and 2p + 1 (G−)."""
    w_max = np.array([slot.w_max for slot in allocation.layers])[allocation.layer]
    g_plus, g_minus = weights_to_conductances(allocation.target_weight, w_max, g_max_us)
    return np.column_stack([g_plus, g_minus]).reshape(-1)


def _layer_record(slot: LayerSlot) -> LayerRecord:
    weights = int(np.prod(slot.shape))
    return LayerRecord(
        name=slot.name,
        kind="linear" if slot.kind == "Linear" else "conv",
        shape=slot.shape,
        weight_count=weights,
        bias_count=slot.weight_count - weights,
        w_max=slot.w_max,
        first_pair=slot.first_pair,
        pair_count=slot.pair_count,
    )


def create_run_file(config: RunConfig, backend: Backend, network: Network, overwrite: bool) -> RunFile:
    allocation = network.allocation
    mapping = PairMapping(
        layer=allocation.layer,
        weight_index=allocation.weight_index,
        device_plus=allocation.device_plus,
        device_minus=allocation.device_minus,
        target_weight=allocation.target_weight,
        allocation="each layer starts on a new word line; pair on bit lines 2k (G+) and 2k+1 (G-)",
    )
    return RunFile.create(
        config.run.out,
        config_toml=config.model_dump_toml(),
        identity=backend.identity(),
        geometry=backend.geometry(),
        limits=backend.limits(),
        model_info=ModelInfo(
            checkpoint_path=network.info["path"],
            checkpoint_sha256=network.info["sha256"],
            architecture=f"ResNetCifar {network.info['architecture']}",
        ),
        layers=[_layer_record(slot) for slot in allocation.layers],
        mapping=mapping,
        target_us=device_targets_us(allocation, config.program.g_max_us),
        status_codes={status.name.lower(): int(status) for status in DeviceStatus},
        planned_read_times_s=config.schedule.times_s,
        description=config.run.description or "",
        backend_kind=config.backend.kind,
        failure_codes=FAILURE_CODES,
        clock_mode="virtual" if clock_is_virtual(backend) else "real",
        failure_budget=config.program.failure_budget,
        overwrite=overwrite,
    )


def read_step(config: RunConfig, backend: Backend, run: RunFile, times_s: list[float],
              stop: StopRequest | None = None) -> None:
    """Take each scheduled read not yet in the file, and record its chip temperature.

    Read times count from the end of programming (the latest ``t_programmed_s``). On a real
    clock the host sleeps until each time. A read whose time has passed, as in a run resumed
    late, is taken at once, and the file records the actual time and a ``late`` event.
    """
    _settle_staged_read(backend, run)
    devices = run.mapping().device_ids()
    end_s = float(np.nanmax(run.program_results()["t_programmed_s"]))
    done = run.read_times()["time_s"]
    heartbeat = _Heartbeat(run)
    for time_s in times_s:
        if np.any(np.isclose(done, time_s)):
            continue
        due_s = end_s + time_s
        reached = wait_until(
            backend,
            due_s,
            should_stop=lambda: stop is not None and stop.requested,
            on_poll=heartbeat,
        )
        if not reached and stop is not None:
            stop.check(f"while waiting for the read at {format_duration(time_s)}")

        started_s = backend.clock_s()
        late_s = started_s - due_s
        if late_s > LATE_EVENT_S:
            run.log_event("late", f"read at {format_duration(time_s)} taken {format_duration(late_s)} "
                          "after its time", started_s)
        g_us = read_devices(backend, devices, config.program.batch_size)
        temperature_c = backend.temperature_c()
        # As for a program batch: stage, save an emulated chip's state, commit.
        run.stage_read(
            time_s=time_s,
            actual_time_s=started_s - end_s,
            chip_clock_s=started_s,
            temperature_c=temperature_c,
            g_us=g_us,
            end_clock_s=backend.clock_s(),
        )
        save_chip_state(backend)
        index = run.commit_read()
        log.info("read %d at %.1f s after programming, %.2f °C", index, started_s - end_s, temperature_c)
        if stop is not None:
            stop.check(f"after read {index}")


def _settle_staged_read(backend: Backend, run: RunFile) -> None:
    """Commit a read that a stopped run staged, if the chip provably took exactly that read.

    A virtual clock that reads the value staged with the read shows that the chip has done
    nothing since. Otherwise the staged read is dropped and taken again.
    """
    staged_s = run.staged_read_clock_s()
    if staged_s is None:
        return
    clock_s = backend.clock_s()
    if clock_is_virtual(backend) and clock_s == staged_s:
        index = run.commit_read()
        run.log_event("verify", f"read {index} was staged when the run stopped, and the virtual "
                      f"chip clock still reads {clock_s!r} s, its value after that read: storing it",
                      clock_s)
        return
    log.info("dropping the read staged before the stop; it is taken again")


class _Heartbeat:
    """Rewrite the run file's progress every `HEARTBEAT_S` while a run waits."""

    def __init__(self, run: RunFile) -> None:
        self._run = run
        self._last = time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self._last >= HEARTBEAT_S:
            self._run.heartbeat()
            self._last = time.monotonic()


def gdc_reference_sums(run: RunFile, allocation: Allocation) -> np.ndarray:
    """Return each layer's summed conductance read right after programming, in µS.

    These are the final verify reads of program-and-verify, taken before any drift.
    """
    final = run.program_results()["final_g_us"]
    return layer_conductance_sums(allocation, final[0::2], final[1::2])


def evaluate_step(config: RunConfig, run: RunFile, network: Network, data: EvaluationData,
                  stop: StopRequest | None = None) -> None:
    """Evaluate every read and compensation that has no result in the file yet."""
    reads = run.read_times()
    table = run.evaluations()
    done = {(int(row["read_index"]), row["compensation"].decode()) for row in table}
    pending = [
        (index, compensation)
        for index in range(len(reads["time_s"]))
        for compensation in config.evaluate.compensations
        if (index, compensation) not in done
    ]
    if not pending:
        return
    reference = gdc_reference_sums(run, network.allocation)
    images = len(data.test_labels)
    for index, compensation in tqdm(pending, desc="evaluate", unit="eval"):
        g_us = run.read_g_us(index)
        g_plus, g_minus = g_us[0::2], g_us[1::2]
        correct = evaluate_read(
            network.model, network.allocation, g_plus, g_minus, config.program.g_max_us,
            compensation, data, reference, config.evaluate.batch_size,
        )
        run.append_evaluation(read_index=index, time_s=float(reads["time_s"][index]),
                              compensation=compensation, correct=correct, images=images)
        log.info("read %d, %s: accuracy %.4f", index, compensation, correct / images)
        if stop is not None:
            stop.check(f"after evaluating read {index} with {compensation}")


def float_accuracy(network: Network, data: EvaluationData, batch_size: int) -> tuple[int, int]:
    model = network.model.to(memory_format=torch.channels_last)
    correct = count_correct(model, data.test_images, data.test_labels, data.normalizer, batch_size)
    return correct, len(data.test_labels)


def _check_new_run(config: RunConfig, overwrite: bool) -> None:
    """Reject a run that would fail on its inputs before anything on disk or chip changes."""
    out = Path(config.run.out)
    if out.exists() and not overwrite:
        raise RunFileError(
            f"{out} already exists; continue that run with hwctl run --resume {out}, choose "
            "another --out, or pass --force to replace it"
        )
    locate_cifar10(config.data.resolve_cifar10_dir())
    model, _ = load_checkpoint(config.model.checkpoint_path)
    if config.backend.kind == "emulator":
        # Allocate before the emulator replaces its state file, so a network that does not
        # fit leaves the previous chip state alone.
        from sim_backend.chip import DEFAULT_GEOMETRY

        geometry = config.backend.geometry
        allocate(model, Geometry(*geometry) if geometry is not None else DEFAULT_GEOMETRY,
                 config.model.layers)


def _start_run(config: RunConfig, backend: Backend, overwrite: bool) -> tuple[Network, EvaluationData, RunFile]:
    network = load_network(config, backend)
    data = load_evaluation_data(config, network.info["normalization"])
    run = create_run_file(config, backend, network, overwrite)
    run.log_event("start", f"backend {config.backend.kind}, {backend.identity().as_idn()}",
                  backend.clock_s())
    return network, data, run


def _clock_or_nan(backend: Backend) -> float:
    """Return the chip clock, or NaN when the backend fails to return it (a lost link)."""
    try:
        return backend.clock_s()
    except Exception as error:  # noqa: BLE001 -- only for an event's time stamp
        log.warning("could not read the chip clock for the event log: %s", error)
        return math.nan


def _log_stop(run: RunFile, message: str, clock_s: float) -> None:
    """Log a ``stop`` event without letting a failure here hide the error being raised."""
    try:
        run.log_event("stop", message, clock_s)
    except Exception as error:  # noqa: BLE001 -- the original error is re-raised by the caller
        log.error("could not log the stop in %s: %s", run.path, error)


def _run_steps(config: RunConfig, backend: Backend, run: RunFile, network: Network,
               data: EvaluationData, stop: StopRequest | None) -> None:
    """Do whatever the run file still lacks, and log a ``stop`` event if it ends early.

    A stop request, a second interrupt and an error all end with the file flushed and a
    ``stop`` event that records how the run ended. A pause logs its own ``pause`` event.
    """
    resume_hint = f"continue with: hwctl run --resume {run.path}"
    try:
        if run.float_accuracy() is None:
            correct, images = float_accuracy(network, data, config.evaluate.batch_size)
            run.set_float_accuracy(correct=correct, images=images)
        if stop is not None:
            stop.check("after the floating-point evaluation")
        program_step(config, backend, run, network, stop)
        read_step(config, backend, run, config.schedule.times_s, stop)
        evaluate_step(config, run, network, data, stop)
        run.mark_complete(backend.clock_s())
    except RunInterrupted as error:
        _log_stop(run, f"{error}; {resume_hint}", _clock_or_nan(backend))
        raise
    except KeyboardInterrupt:
        _log_stop(run, "stopped at once by a second interrupt; the file is consistent up to its "
                  f"last flush; {resume_hint}", math.nan)
        raise
    except RunPaused:
        raise
    except Exception as error:
        _log_stop(run, f"stopped by an error: {type(error).__name__}: {error}; fix it, then "
                  f"{resume_hint}", math.nan)
        raise


def run_job(config: RunConfig, overwrite: bool = False, stop: StopRequest | None = None) -> Path:
    """Program, read on the schedule and evaluate: the whole job in one call.

    ``stop`` lets the caller end the run early at a safe point (`hwctl.interrupts`); the run
    then raises `RunInterrupted`, and `resume_job` continues it.
    """
    started = time.monotonic()
    _check_new_run(config, overwrite)
    with open_backend(config, fresh_chip=True) as backend:
        network, data, run = _start_run(config, backend, overwrite)
        with run:
            _run_steps(config, backend, run, network, data, stop)
    log.info("run finished in %.0f s: %s", time.monotonic() - started, config.run.out)
    return Path(config.run.out)


def _resumed_config(config: RunConfig, path: Path, data_dir: str | None, resource: str | None,
                    port: str | None) -> RunConfig:
    """Return the stored configuration with the run file's present path and any new address."""
    run_section = config.run.model_copy(update={"out": path.absolute()})
    backend_updates = {"resource": resource, "port": port}
    backend = config.backend.model_copy(update={k: v for k, v in backend_updates.items() if v is not None})
    updates = {"run": run_section, "backend": backend}
    if data_dir is not None:
        updates["data"] = config.data.model_copy(update={"cifar10_dir": Path(data_dir)})
    return config.model_copy(update=updates)


def _previous_stop(run: RunFile) -> Event | None:
    """Return a ``stop`` event for a writer that died without closing the file, or None.

    Only such a file needed recovery on opening; a session that ended otherwise logged its
    own ``stop`` or ``pause``, or finished its step.
    """
    progress = run.previous_session
    # NOTE: a writer killed while it has the file closed leaves nothing to recover, so its
    # stop is not logged. The next session's resume event is.
    if run.recovered_from is None or progress is None:
        return None
    previous = f"process {progress.writer_pid} on {progress.writer_host or 'an unknown host'}"
    last_write = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(progress.updated_wall_time))
    message = (
        f"the writing {previous} ended without closing the file (killed, crashed or lost "
        f"power) after its last write at {last_write}; the file as it was left is kept as "
        f"{run.recovered_from.name}"
    )
    return Event(progress.updated_wall_time, math.nan, "stop", message)


def _check_same_chip(run: RunFile, backend: Backend) -> None:
    """Raise unless the backend is the chip the run was programmed on; firmware may differ."""
    now, then = backend.identity(), run.identity()
    same_chip = (now.manufacturer, now.model, now.serial) == (then.manufacturer, then.model, then.serial)
    if not same_chip or backend.geometry() != run.geometry():
        raise RunFileError(
            f"{run.path} was programmed on {run.identity().as_idn()} ({run.geometry()}), but the "
            f"backend is {backend.identity().as_idn()} ({backend.geometry()}); connect the chip "
            "of this run, or for the emulator use the same seed, calibration and state file"
        )
    if now.firmware != then.firmware:
        log.warning("the chip's firmware changed from %s to %s since the run began", then.firmware, now.firmware)


def resume_job(
    path: str | Path,
    *,
    failure_budget: float | None = None,
    data_dir: str | None = None,
    resource: str | None = None,
    port: str | None = None,
    stop: StopRequest | None = None,
) -> Path:
    """Continue a stopped run from its cursors: program, read and evaluate what is missing.

    The run uses the configuration stored in the file. ``failure_budget`` replaces the stored
    budget (for a run paused by it), and ``resource``, ``port`` and ``data_dir`` replace the
    stored controller address and CIFAR-10 folder. The event log gets a ``stop`` for a
    previous session that did not record one, then a ``resume``.
    """
    path = Path(path)
    started = time.monotonic()
    with RunFile.open(path, "a") as run:
        stop_event = _previous_stop(run)
        if run.is_complete:
            if stop_event is not None:
                run.log_events([stop_event])
            log.info("%s is complete; nothing to resume", path)
            return path
        config = _resumed_config(config_of_run(run), path, data_dir, resource, port)
        if failure_budget is not None:
            run.set_failure_budget(failure_budget)

        # The stop of a killed session and this resume are logged in one write, so the event
        # log pairs them even if this session is killed right here.
        progress = run.progress()
        resume_event = Event(time.time(), math.nan, "resume", (
            f"session {progress.sessions} (process {progress.writer_pid}); "
            f"{progress.devices_programmed} of {run.n_devices} devices, "
            f"{progress.reads_done} reads and {progress.evaluations_done} evaluations stored; "
            f"failure budget {100 * effective_failure_budget(run, config):g} %"
        ))
        run.log_events([event for event in (stop_event, resume_event) if event is not None])
        stored = progress.devices_programmed > 0
        try:
            if stored:
                _check_state_file(config, run)
            backend = open_backend(config)
        except BaseException as error:
            _log_stop(run, f"stopped by an error: could not open the backend: {error}", math.nan)
            raise
        with backend:
            try:
                _check_same_chip(run, backend)
                if stored:
                    _check_chip_clock(run, backend)
                network = load_run_network(config, run)
                data = load_evaluation_data(config, network.info["normalization"])
            except BaseException as error:
                _log_stop(run, f"stopped by an error: {error}", _clock_or_nan(backend))
                raise
            if progress.paused:
                run.set_paused(False)
            _run_steps(config, backend, run, network, data, stop)
    log.info("resumed run finished in %.0f s: %s", time.monotonic() - started, path)
    return path


def program_job(config: RunConfig, overwrite: bool = False) -> Path:
    """Create the run file and program every device; reads and evaluations come later."""
    _check_new_run(config, overwrite)
    with open_backend(config, fresh_chip=True) as backend:
        network, data, run = _start_run(config, backend, overwrite)
        with run:
            correct, images = float_accuracy(network, data, config.evaluate.batch_size)
            run.set_float_accuracy(correct=correct, images=images)
            program_step(config, backend, run, network)
    return Path(config.run.out)


def config_of_run(run: RunFile) -> RunConfig:
    """Return the configuration stored in a run file."""
    return parse_config_text(run.config_toml(), source=f"{run.path} (stored configuration)")


def _check_state_file(config: RunConfig, run: RunFile) -> None:
    """Raise if an emulated chip's state file is gone: a new chip would read as unprogrammed."""
    if config.backend.kind != "emulator":
        return
    state_path = emulator_state_path(config)
    if not state_path.exists():
        raise RunFileError(
            f"the emulated chip of {run.path} is missing: its state file {state_path} does not "
            "exist, so its devices are lost; restore the file, or program a new run"
        )


def _check_chip_clock(run: RunFile, backend: Backend) -> None:
    """Raise if the chip clock is before the run's last pulse: the chip is not the run's one."""
    end_s = float(np.nanmax(run.program_results()["t_programmed_s"]))
    if backend.clock_s() < end_s:
        raise RunFileError(
            f"the chip clock reads {backend.clock_s():.3f} s, before the last programming pulse "
            f"of {run.path} at {end_s:.3f} s, so this is not the chip state the run was "
            "programmed on; restore its state file or connect its chip"
        )


def read_job(path: Path, schedule: str | None = None) -> None:
    """Take the reads of ``schedule`` (default: the run's own) that the run file lacks."""
    with RunFile.open(path, "a") as run:
        config = config_of_run(run)
        times_s = parse_schedule(schedule) if schedule else config.schedule.times_s
        _check_state_file(config, run)
        with open_backend(config) as backend:
            _check_same_chip(run, backend)
            _check_chip_clock(run, backend)
            read_step(config, backend, run, times_s)


def evaluate_job(path: Path, data_dir: str | None = None) -> None:
    """Evaluate the reads of a run file that have no evaluation yet."""
    with RunFile.open(path, "a") as run:
        config = config_of_run(run)
        if data_dir is not None:
            config = config.model_copy(update={"data": config.data.model_copy(update={"cifar10_dir": Path(data_dir)})})
        if run.progress().reads_done == 0:
            raise RunFileError(f"{path} has no reads to evaluate yet; run hwctl read {path} first")
        network = load_run_network(config, run)
        data = load_evaluation_data(config, network.info["normalization"])
        evaluate_step(config, run, network, data)
        _complete_if_done(config, run)


def _complete_if_done(config: RunConfig, run: RunFile) -> None:
    """Mark a run complete once every scheduled read has every configured evaluation."""
    read_times = run.read_times()["time_s"]
    scheduled = all(np.any(np.isclose(read_times, t)) for t in config.schedule.times_s)
    evaluations = len(read_times) * len(config.evaluate.compensations)
    if scheduled and run.progress().evaluations_done >= evaluations and not run.is_complete:
        run.mark_complete()
