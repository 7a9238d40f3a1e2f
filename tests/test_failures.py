"""Per-device failure codes, moves to spare devices, and the failure budget that pauses a run.

The emulated chip records which of its devices are stuck, and how, so the codes that
program-and-verify's results are classified into can be checked against it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hwctl.allocation import allocate
from hwctl.backend import Geometry
from hwctl.config import parse_config_text
from hwctl.failures import FailureCode, budget_exceeded, classify_failures, failed_pairs
from hwctl.model import ResNetCifar
from hwctl.orchestrator import Network, create_run_file, program_step
from hwctl.runfile import RunFile
from hwctl.status import run_status
from protocols.program_verify import DeviceStatus, ProgramVerifySettings, program_verify
from sim_backend.chip import STUCK_HIGH, STUCK_LOW, STUCK_NONE, EmulatedChip
from test_resume import events_of, hwctl, write_run_config

EXIT_PAUSED = 3


def test_failure_codes_match_stuck_devices():
    chip = EmulatedChip(seed=5, geometry=Geometry(1, 32, 128), stuck_fraction=0.2)
    ids = np.arange(4096)
    rng = np.random.default_rng(1)
    targets = np.where(rng.random(ids.size) < 0.5, 0.0, rng.uniform(1.5, 20.0, ids.size))
    settings = ProgramVerifySettings()
    result = program_verify(chip, ids, targets, settings)
    codes = classify_failures(result.status, result.pulses, result.iterations, result.final_g_us, settings)
    kind = chip.stuck_kind(ids)

    # Every device called stuck is stuck on the chip, the same way.
    assert np.all(kind[codes == FailureCode.STUCK_HIGH] == STUCK_HIGH)
    assert np.all(kind[codes == FailureCode.STUCK_LOW] == STUCK_LOW)
    assert not np.isin(codes[kind == STUCK_NONE], [FailureCode.STUCK_LOW, FailureCode.STUCK_HIGH]).any()
    # A device stuck high (near 27 µS) can reach no target here; one stuck near zero can
    # reach only the zero targets.
    assert np.all(codes[kind == STUCK_HIGH] == FailureCode.STUCK_HIGH)
    assert np.all(codes[(kind == STUCK_LOW) & (targets > 0)] == FailureCode.STUCK_LOW)
    assert np.all(codes[(kind == STUCK_LOW) & (targets == 0)] == FailureCode.NONE)
    assert np.count_nonzero(codes == FailureCode.STUCK_HIGH) > 100


@pytest.mark.parametrize("settings, code", [
    (ProgramVerifySettings(max_pulses_per_device=3), FailureCode.PULSE_BUDGET),
    (ProgramVerifySettings(max_iterations=2), FailureCode.ITERATION_BUDGET),
])
def test_budget_codes_follow_counts(settings, code):
    chip = EmulatedChip(seed=6, geometry=Geometry(1, 8, 128), stuck_fraction=0.0)
    ids = np.arange(1024)
    targets = np.random.default_rng(2).uniform(5.0, 20.0, ids.size)
    result = program_verify(chip, ids, targets, settings)
    codes = classify_failures(result.status, result.pulses, result.iterations, result.final_g_us, settings)

    gave_up = result.status == DeviceStatus.GAVE_UP
    assert np.count_nonzero(codes == code) > 10
    assert np.all(gave_up[codes == code])
    assert np.all(codes[result.status == DeviceStatus.CONVERGED] == FailureCode.NONE)
    if code == FailureCode.PULSE_BUDGET:
        assert np.all(result.pulses[codes == code] == settings.max_pulses_per_device)
    else:
        assert np.all(result.iterations[codes == code] == settings.max_iterations)


def test_unattempted_devices_get_time_code():
    settings = ProgramVerifySettings()
    status = np.array([DeviceStatus.GAVE_UP, DeviceStatus.GAVE_UP, DeviceStatus.CONVERGED])
    codes = classify_failures(status, np.array([0, 7, 9]), np.array([0, 3, 4]),
                              np.array([np.nan, 4.0, 5.0]), settings)
    assert codes.tolist() == [FailureCode.TIME_BUDGET, FailureCode.RESET_BUDGET, FailureCode.NONE]


def test_budget_counts_against_all_pairs():
    assert not budget_exceeded(5, 100, 0.05)
    assert budget_exceeded(6, 100, 0.05)
    status = np.array([0, 0, 0, 2, 1, 0], dtype=np.uint8)
    assert failed_pairs(status).tolist() == [1, 2]


def test_moves_record_codes_of_devices_left(tmp_path):
    torch.manual_seed(0)
    model = ResNetCifar((4, 8, 16), 1)
    chip = EmulatedChip(seed=2, geometry=Geometry(1, 64, 256), stuck_fraction=0.05)
    network = Network(model, {"path": "small.pt", "sha256": "0" * 64,
                              "architecture": model.architecture()}, allocate(model, chip.geometry()))
    config = parse_config_text(f'[run]\nout = "{tmp_path / "run.h5"}"\n[program]\nbatch_size = 2048\n')
    with create_run_file(config, chip, network, overwrite=False) as run:
        program_step(config, chip, run, network)
        rows = run.remaps()
        mapping = run.mapping()
        failure = run.program_results()["failure"]
        stored_status = run.program_results()["status"]

    assert len(rows) > 20
    left = np.stack([rows["failure_plus"], rows["failure_minus"]], axis=1)
    assert np.all((left != FailureCode.NONE).any(axis=1))
    old = np.stack([rows["old_plus"], rows["old_minus"]], axis=1)
    assert np.all(chip.stuck_kind(old[left == FailureCode.STUCK_HIGH]) == STUCK_HIGH)
    assert np.all(chip.stuck_kind(old[left == FailureCode.STUCK_LOW]) == STUCK_LOW)
    # The mapping names the last spare of each moved pair, and its stored codes are its own.
    last = {int(pair): index for index, pair in enumerate(rows["pair"])}
    pairs = np.array(sorted(last))
    final = np.array([last[pair] for pair in pairs])
    np.testing.assert_array_equal(mapping.device_plus[pairs], rows["new_plus"][final])
    np.testing.assert_array_equal(mapping.device_minus[pairs], rows["new_minus"][final])
    converged = stored_status == DeviceStatus.CONVERGED
    assert np.all(failure[converged] == FailureCode.NONE)
    assert np.all(failure[~converged] != FailureCode.NONE)


def test_failure_budget_pauses_run(tmp_path):
    config = write_run_config(tmp_path, schedule=("25s",), compensations=("none",),
                              backend="stuck_fraction = 0.3",
                              program="spare_attempts = 0\nfailure_budget = 0.05")
    result = hwctl("run", config, check=False)
    assert result.returncode == EXIT_PAUSED, result.stderr
    run_path = tmp_path / "run.h5"
    for fragment in ("run paused", "failure budget of 5 %", "--failure-budget",
                     f"hwctl run --resume {run_path}", "stuck_high"):
        assert fragment in result.stderr

    # It paused at the first batch that took the failed pairs past 5 % of all pairs.
    with RunFile.open(run_path) as run:
        progress = run.progress()
        status = run.program_results()["status"]
        n_pairs = run.n_pairs
        batch = run.progress().devices_programmed - 512
    assert progress.paused
    assert failed_pairs(status).size > 0.05 * n_pairs
    assert failed_pairs(status[:batch]).size <= 0.05 * n_pairs
    assert events_of(run_path)[-1].kind == "pause"
    assert run_status(run_path)["state"] == "paused"

    # Resumed with the same budget it pauses again at once; with a larger one it finishes.
    again = hwctl("run", "--resume", run_path, check=False)
    assert again.returncode == EXIT_PAUSED
    with RunFile.open(run_path) as run:
        assert run.progress().devices_programmed == progress.devices_programmed
    hwctl("run", "--resume", run_path, "--failure-budget", "0.9")
    with RunFile.open(run_path) as run:
        assert run.is_complete
        assert not run.progress().paused
        assert run.progress().failure_budget == 0.9
        failure = run.program_results()["failure"]
    kinds = [event.kind for event in events_of(run_path)]
    assert kinds.count("pause") == 2
    assert kinds.count("resume") == 2
    assert np.count_nonzero(failure == FailureCode.STUCK_HIGH) > 0
