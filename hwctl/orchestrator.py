"""The main job: program a network onto a chip, read it back on a schedule and evaluate it.

Each step works on the run file and picks up where the file says the run stopped, so the steps
can run together (`run_job`) or one at a time (`hwctl program`, `hwctl read`, `hwctl evaluate`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from calibration.conductance import weights_to_conductances
from drivers.limits import check_limits
from hwctl.allocation import Allocation, LayerSlot, allocate, spare_word_lines
from hwctl.backend import Backend, Geometry
from hwctl.checkpoint import load_checkpoint
from hwctl.cifar import Normalizer, load_split, locate_cifar10
from hwctl.config import RunConfig, parse_config_text
from hwctl.evaluate import count_correct
from hwctl.inference import EvaluationData, evaluate_read, layer_conductance_sums
from hwctl.model import ResNetCifar
from hwctl.runfile import LayerRecord, ModelInfo, PairMapping, RunFile, RunFileError, iter_device_batches
from hwctl.schedule import format_duration, parse_schedule
from protocols.program_verify import (
    DeviceStatus,
    ProgramVerifySettings,
    check_settings_against_limits,
    program_verify,
)
from protocols.readback import read_devices

log = logging.getLogger(__name__)

RESULT_FIELDS = ("final_g_us", "pulses", "iterations", "status", "t_programmed_s")


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
    starts from a new chip; a state file named in the configuration is always kept.
    """
    if config.backend.kind == "emulator":
        from calibration.params import load_params
        from sim_backend.chip import EmulatedChip

        state_path = emulator_state_path(config)
        if fresh_chip and config.backend.state_file is None and state_path.exists():
            log.info("starting a fresh emulated chip: removing %s", state_path)
            state_path.unlink()
        chip = EmulatedChip(
            seed=config.run.seed,
            params=load_params(config.backend.calibration_file),
            state_path=state_path,
            stuck_fraction=config.backend.stuck_fraction,
        )
        check_limits(config.limits.expected(), chip.limits())
        return chip
    from hwctl.instrument import open_instrument

    return open_instrument(config.backend, expected_limits=config.limits.expected())


def load_network(config: RunConfig, backend: Backend) -> Network:
    model, info = load_checkpoint(config.model.checkpoint_path)
    allocation = allocate(model, backend.geometry(), config.model.layers)
    return Network(model, info, allocation)


def load_evaluation_data(config: RunConfig, normalization: dict) -> EvaluationData:
    source = locate_cifar10(config.data.resolve_cifar10_dir())
    test_images, test_labels = load_split(source, "test", config.data.test_images)
    calibration_images, _ = load_split(source, "train", config.data.bn_calibration_images)
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
        overwrite=overwrite,
    )


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


def _interleave(plus: np.ndarray, minus: np.ndarray) -> np.ndarray:
    return np.column_stack([plus, minus]).reshape(-1)


def _failed_pairs(status: np.ndarray) -> np.ndarray:
    """Return the indices of pairs (slots 2p, 2p + 1) with a device that did not converge."""
    converged = (status == DeviceStatus.CONVERGED).reshape(-1, 2)
    return np.flatnonzero(~converged.all(axis=1))


def _program_batch(config: RunConfig, backend: Backend, run: RunFile, spares: SparePool,
                   first: int, stop: int, settings: ProgramVerifySettings) -> None:
    """Program slots ``first`` to ``stop``, move failed pairs to spares, then store the batch."""
    mapping = run.mapping()
    pairs = np.arange(first // 2, stop // 2)
    devices = _interleave(mapping.device_plus[pairs], mapping.device_minus[pairs])
    targets = run.target_us()[first:stop]
    result = program_verify(backend, devices, targets, settings)
    arrays = {name: np.array(getattr(result, name)) for name in RESULT_FIELDS}

    for _ in range(config.program.spare_attempts):
        failed = _failed_pairs(arrays["status"])
        if not failed.size:
            break
        new_plus, new_minus = spares.take(run.progress().remaps, failed.size)
        if len(new_plus) < failed.size:
            run.log_event("fault", f"spare devices exhausted: {failed.size - len(new_plus)} "
                          "failed pairs stay where they are", backend.clock_s())
            failed = failed[: len(new_plus)]
            if not failed.size:
                break
        slots = _interleave(2 * failed, 2 * failed + 1)
        retry = program_verify(backend, _interleave(new_plus, new_minus), targets[slots], settings)
        run.remap_pairs(pairs[failed], new_plus, new_minus, backend.clock_s())
        for name in RESULT_FIELDS:
            arrays[name][slots] = getattr(retry, name)

    run.write_program_batch(first, **arrays)


def program_step(config: RunConfig, backend: Backend, run: RunFile, network: Network) -> None:
    """Program every device not yet stored in the run file, one flushed batch at a time.

    A pair with a device that does not converge moves to spare devices and is programmed
    again, up to ``program.spare_attempts`` times, before its batch is stored.
    """
    n_devices = run.n_devices
    settings = program_settings(config)
    check_settings_against_limits(backend, settings)
    spares = SparePool(network.allocation, backend.geometry())
    start = run.progress().devices_programmed
    batch_size = config.program.batch_size + config.program.batch_size % 2
    batches = list(iter_device_batches(n_devices, batch_size, start))
    if not batches:
        return
    run.log_event("program", f"programming devices {start} to {n_devices}", backend.clock_s())
    with tqdm(total=n_devices - start, desc="program-and-verify", unit="dev") as bar:
        for first, stop in batches:
            _program_batch(config, backend, run, spares, first, stop, settings)
            bar.update(stop - first)

    status = run.program_results()["status"]
    converged = np.count_nonzero(status == DeviceStatus.CONVERGED)
    run.log_event("programmed", f"{converged} of {len(status)} devices converged, "
                  f"{run.progress().remaps} pairs moved to spares", backend.clock_s())


def read_step(config: RunConfig, backend: Backend, run: RunFile, times_s: list[float]) -> None:
    """Take each scheduled read not yet in the file.

    Read times count from the end of programming (the chip clock at the last programming
    pulse). The step waits on the chip clock for each time; a read whose time has passed (a
    run resumed late) is taken at once, and the file records the actual time.
    """
    devices = run.mapping().device_ids()
    end_s = float(np.max(run.program_results()["t_programmed_s"]))
    done = run.read_times()["time_s"]
    for time_s in times_s:
        if np.any(np.isclose(done, time_s)):
            continue
        waiting_s = end_s + time_s - backend.clock_s()
        if waiting_s > 0:
            backend.wait_s(waiting_s)
        else:
            log.warning("read at %s is %.0f s late; reading now", format_duration(time_s), -waiting_s)
        started_s = backend.clock_s()
        g_us = read_devices(backend, devices, config.program.batch_size)
        index = run.append_read(
            time_s=time_s,
            actual_time_s=started_s - end_s,
            chip_clock_s=started_s,
            temperature_c=backend.temperature_c(),
            g_us=g_us,
        )
        log.info("read %d at %.1f s after programming", index, started_s - end_s)


def gdc_reference_sums(run: RunFile, allocation: Allocation) -> np.ndarray:
    """Return each layer's summed conductance read right after programming, in µS.

    These are the final verify reads of program-and-verify, taken before any drift.
    """
    final = run.program_results()["final_g_us"]
    return layer_conductance_sums(allocation, final[0::2], final[1::2])


def evaluate_step(config: RunConfig, run: RunFile, network: Network, data: EvaluationData) -> None:
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


def float_accuracy(network: Network, data: EvaluationData, batch_size: int) -> tuple[int, int]:
    model = network.model.to(memory_format=torch.channels_last)
    correct = count_correct(model, data.test_images, data.test_labels, data.normalizer, batch_size)
    return correct, len(data.test_labels)


def _check_new_run(config: RunConfig, overwrite: bool) -> None:
    """Reject a run that would fail on its inputs before anything on disk or chip changes."""
    out = Path(config.run.out)
    if out.exists() and not overwrite:
        raise RunFileError(
            f"{out} already exists; choose another --out, or pass --force to replace it"
        )
    locate_cifar10(config.data.resolve_cifar10_dir())
    load_checkpoint(config.model.checkpoint_path)


def _start_run(config: RunConfig, backend: Backend, overwrite: bool) -> tuple[Network, EvaluationData, RunFile]:
    network = load_network(config, backend)
    data = load_evaluation_data(config, network.info["normalization"])
    run = create_run_file(config, backend, network, overwrite)
    run.log_event("start", f"backend {config.backend.kind}, {backend.identity().as_idn()}",
                  backend.clock_s())
    correct, images = float_accuracy(network, data, config.evaluate.batch_size)
    run.set_float_accuracy(correct=correct, images=images)
    return network, data, run


def run_job(config: RunConfig, overwrite: bool = False) -> Path:
    """Program, read on the schedule and evaluate: the whole job in one call."""
    started = time.monotonic()
    _check_new_run(config, overwrite)
    with open_backend(config, fresh_chip=True) as backend:
        network, data, run = _start_run(config, backend, overwrite)
        with run:
            program_step(config, backend, run, network)
            read_step(config, backend, run, config.schedule.times_s)
            evaluate_step(config, run, network, data)
            run.mark_complete(backend.clock_s())
    log.info("run finished in %.0f s: %s", time.monotonic() - started, config.run.out)
    return Path(config.run.out)


def program_job(config: RunConfig, overwrite: bool = False) -> Path:
    """Create the run file and program every device; reads and evaluations come later."""
    _check_new_run(config, overwrite)
    with open_backend(config, fresh_chip=True) as backend:
        network, _, run = _start_run(config, backend, overwrite)
        with run:
            program_step(config, backend, run, network)
    return Path(config.run.out)


def config_of_run(run: RunFile) -> RunConfig:
    """Return the configuration stored in a run file."""
    return parse_config_text(run.config_toml(), source=f"{run.path} (stored configuration)")


def read_job(path: Path, schedule: str | None = None) -> None:
    """Take the reads of ``schedule`` (default: the run's own) that the run file lacks."""
    with RunFile.open(path, "a") as run:
        config = config_of_run(run)
        times_s = parse_schedule(schedule) if schedule else config.schedule.times_s
        with open_backend(config) as backend:
            read_step(config, backend, run, times_s)


def evaluate_job(path: Path, data_dir: str | None = None) -> None:
    """Evaluate the reads of a run file that have no evaluation yet."""
    with RunFile.open(path, "a") as run:
        config = config_of_run(run)
        if data_dir is not None:
            config = config.model_copy(update={"data": config.data.model_copy(update={"cifar10_dir": Path(data_dir)})})
        model, info = load_checkpoint(config.model.checkpoint_path)
        if info["sha256"] != run.model_info().checkpoint_sha256:
            raise RunFileError(
                f"{config.model.checkpoint_path} has changed since {path} was programmed "
                f"(sha256 {info['sha256'][:12]}…, the run used "
                f"{run.model_info().checkpoint_sha256[:12]}…); restore the original checkpoint"
            )
        network = Network(model, info, allocate(model, run.geometry(), config.model.layers))
        data = load_evaluation_data(config, info["normalization"])
        evaluate_step(config, run, network, data)
