"""Ctrl-C on the real `hwctl run`: the first finishes the batch, the second stops at once.

The emulated chip runs on wall time here, as a real chip does, so each program batch takes
seconds and a signal reliably arrives while one is in flight.
"""

from __future__ import annotations

import signal
import time

from hwctl.integrity import EXIT_INCOMPLETE, check_run_file
from hwctl.runfile import RunFile
from test_resume import events_of, hwctl, start_hwctl, wait_for, write_run_config

EXIT_INTERRUPTED = 130
DEVICES = 340  # the linear layer: 16 x 10 weights and 10 biases, two devices each
BATCH = 128


def slow_config(folder):
    return write_run_config(
        folder, schedule=("1s",), compensations=("none",), batch_size=BATCH,
        backend='clock = "wall"', model='layers = ["linear"]',
        program="max_iterations = 5\nfailure_budget = 1.0",
    )


def started_second_batch(progress):
    return progress.devices_programmed >= BATCH and progress.inflight_start == progress.devices_programmed


def start_and_reach_second_batch(folder):
    """Start a slow run; return it and its progress once its second batch has begun."""
    process = start_hwctl("run", slow_config(folder), cwd=folder)
    at_signal = wait_for(process, folder / "run.h5", started_second_batch)
    assert at_signal is not None, (folder / "stderr.txt").read_text()[-2000:]
    return process, at_signal


def test_first_interrupt_finishes_batch(tmp_path):
    process, at_signal = start_and_reach_second_batch(tmp_path)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)

    assert process.returncode == EXIT_INTERRUPTED
    stderr = (tmp_path / "stderr.txt").read_text()
    assert f"hwctl run --resume {tmp_path / 'run.h5'}" in stderr
    # The batch in flight at the signal was finished and stored, and nothing after it began.
    with RunFile.open(tmp_path / "run.h5") as run:
        progress = run.progress()
        assert run.in_flight() is None
    assert progress.devices_programmed == min(at_signal.devices_programmed + BATCH, DEVICES)
    assert not progress.complete
    last = events_of(tmp_path / "run.h5")[-1]
    assert last.kind == "stop"
    assert "SIGINT" in last.message
    # The file was closed cleanly: no recovery needed, and it resumes to the end.
    report = check_run_file(tmp_path / "run.h5")
    assert report.exit_code == EXIT_INCOMPLETE
    assert not report.notes

    hwctl("run", "--resume", tmp_path / "run.h5")
    kinds = [event.kind for event in events_of(tmp_path / "run.h5")]
    assert kinds.count("stop") == 1
    assert kinds[kinds.index("stop") + 1] == "resume"
    assert kinds[-1] == "complete"


def test_second_interrupt_stops_at_once(tmp_path):
    process, at_signal = start_and_reach_second_batch(tmp_path)
    process.send_signal(signal.SIGINT)
    # Signals sent back to back may arrive as one, so the second waits for the first's log line.
    for _ in range(1000):
        if "send it again to stop at once" in (tmp_path / "stderr.txt").read_text():
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=120)

    assert process.returncode == EXIT_INTERRUPTED
    assert "stopped at once" in (tmp_path / "stderr.txt").read_text()
    # The batch in flight was left unfinished, and the file is intact up to its last flush.
    with RunFile.open(tmp_path / "run.h5") as run:
        in_flight = run.in_flight()
        assert run.progress().devices_programmed == at_signal.devices_programmed
    assert in_flight is not None
    assert in_flight.start == at_signal.devices_programmed
    report = check_run_file(tmp_path / "run.h5")
    assert report.intact, report.problems
    assert events_of(tmp_path / "run.h5")[-1].kind == "stop"

    # On wall time the chip's clock moved on, so the resume reads the unfinished batch back.
    hwctl("run", "--resume", tmp_path / "run.h5")
    verify = [event.message for event in events_of(tmp_path / "run.h5") if event.kind == "verify"]
    assert len(verify) == 1
    assert "a verify read kept" in verify[0]
    with RunFile.open(tmp_path / "run.h5") as run:
        assert run.is_complete
