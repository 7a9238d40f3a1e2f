"""SIGKILL the real `hwctl run` again and again; every resume must end in the uninterrupted run.

One small run is killed at 21 points spread over programming, reading and evaluation, and
resumed after each kill. The finished run file and the emulated chip's state file must then
equal those of a run that was never stopped. Every device is pulsed exactly as often (the
chip's per-device event counters), and every stored value matches bit for bit. Every scheduled
read and evaluation is present once, and the event log has one stop and one resume per kill.
"""

from __future__ import annotations

import random
import time

import numpy as np

from hwctl.config import load_config
from hwctl.integrity import check_run_file
from hwctl.orchestrator import run_job
from hwctl.runfile import RunFile
from test_resume import (
    events_of,
    hwctl,
    kill,
    progress_of,
    start_hwctl,
    stored_results,
    wait_for,
    write_run_config,
)

SCHEDULE = ("25s", "1min", "5min", "20min", "1h", "3h", "6h", "1d")
COMPENSATIONS = ("none", "gdc")
BATCH = 512


def kill_points(devices: int) -> list[tuple[str, int]]:
    """Return (progress field, value) pairs: the run is killed soon after reaching each."""
    programming = [("devices_programmed", BATCH * k) for k in range(1, devices // BATCH + 1, 2)]
    reading = [("reads_done", k) for k in range(1, len(SCHEDULE))]
    evaluating = [("evaluations_done", k) for k in range(1, len(SCHEDULE) * len(COMPENSATIONS) - 1, 2)]
    return programming + reading + evaluating


def phase_of(progress, devices: int) -> str:
    if progress.devices_programmed < devices:
        return "programming"
    if progress.reads_done < len(SCHEDULE):
        return "reading"
    return "evaluating"


def test_killed_run_ends_as_uninterrupted(tmp_path):
    config_path = write_run_config(tmp_path, schedule=SCHEDULE, compensations=COMPENSATIONS,
                                   batch_size=BATCH)
    config = load_config(config_path)
    reference = config.model_copy(update={"run": config.run.model_copy(update={"out": tmp_path / "ref.h5"})})
    run_job(reference)
    with RunFile.open(tmp_path / "ref.h5") as run:
        devices = run.n_devices

    run_path = tmp_path / "run.h5"
    rng = random.Random(20)
    phases = []
    points = kill_points(devices)
    assert len(points) >= 20
    for number, (field, value) in enumerate(points):
        arguments = ("run", config_path) if number == 0 else ("run", "--resume", run_path)
        process = start_hwctl(*arguments, cwd=tmp_path)
        # Session n + 1 is the process started after kill n; only its progress counts.
        reached = wait_for(process, run_path, lambda progress: progress.sessions == number + 1
                           and getattr(progress, field) >= value)
        assert reached is not None, (
            f"the run ended before {field} reached {value}: "
            + (tmp_path / "stderr.txt").read_text()[-2000:]
        )
        # Land anywhere in the next batch, read or evaluation, or between them.
        time.sleep(rng.uniform(0.0, 0.03))
        kill(process)
        phases.append(phase_of(progress_of(run_path), devices))
    hwctl("run", "--resume", run_path, cwd=tmp_path)

    kills = len(points)
    assert phases.count("programming") >= 8, phases
    assert phases.count("reading") >= 2, phases
    assert phases.count("evaluating") >= 3, phases

    # The file is intact and complete, with one stop and one resume per kill, in pairs.
    report = check_run_file(run_path)
    assert report.intact, report.problems
    assert report.complete
    # A kill that lands while the writer has the file open leaves a file to recover, a kept
    # copy and a stop event. A kill while the file is closed leaves none of them.
    kinds = [event.kind for event in events_of(run_path)]
    recovered = len(list(tmp_path.glob("run.crashed-*.h5")))
    assert recovered >= 20
    assert kinds.count("stop") == recovered
    assert kinds.count("resume") == kills
    pairs = [kinds[index + 1] for index, kind in enumerate(kinds) if kind == "stop"]
    assert pairs == ["resume"] * recovered

    # A batch or read in flight at a kill was either never on the chip or exactly the staged
    # one, so the emulated chip never needed a verify read.
    verify = [event.message for event in events_of(run_path) if event.kind == "verify"]
    assert verify
    assert not [text for text in verify if "programming it as new" not in text and "storing" not in text]

    # Every scheduled read and evaluation is there once.
    got, expected = stored_results(run_path), stored_results(tmp_path / "ref.h5")
    np.testing.assert_array_equal(got["read_times"]["time_s"], config.schedule.times_s)
    entries = [(int(row["read_index"]), row["compensation"].decode()) for row in got["evaluations"]]
    assert sorted(entries) == sorted((index, kind) for index in range(len(SCHEDULE)) for kind in COMPENSATIONS)

    # Bit for bit the uninterrupted run: results, moves to spares, reads and accuracies.
    for name, values in expected["program"].items():
        np.testing.assert_array_equal(got["program"][name], values, err_msg=name)
    np.testing.assert_array_equal(got["mapping"].device_plus, expected["mapping"].device_plus)
    np.testing.assert_array_equal(got["remaps"], expected["remaps"])
    for name in ("time_s", "actual_time_s", "chip_clock_s", "temperature_c"):
        np.testing.assert_array_equal(got["read_times"][name], expected["read_times"][name], err_msg=name)
    for read, expected_read in zip(got["reads"], expected["reads"], strict=True):
        np.testing.assert_array_equal(read, expected_read)
    order = np.lexsort((got["evaluations"]["compensation"], got["evaluations"]["read_index"]))
    expected_order = np.lexsort((expected["evaluations"]["compensation"], expected["evaluations"]["read_index"]))
    np.testing.assert_array_equal(got["evaluations"]["correct"][order],
                                  expected["evaluations"]["correct"][expected_order])

    # The chip saw exactly the pulses and reads of the uninterrupted run, device by device.
    with np.load(tmp_path / "run.h5.chip.npz") as chip, np.load(tmp_path / "ref.h5.chip.npz") as reference_chip:
        for name in ("events", "g_pulse_us", "relax_us", "t_pulse_ns", "clock_ns"):
            np.testing.assert_array_equal(chip[name], reference_chip[name], err_msg=name)
