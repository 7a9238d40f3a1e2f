"""`hwctl status` from a second process while `hwctl run` writes the file, on wall-clock time.

One run on the wall-clock emulator is watched while it programs and while it waits for a
read, then stopped with Ctrl-C during that wait and watched again. It is resumed after its
next read time has passed, so that read is taken late.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np

from hwctl.integrity import EXIT_INCOMPLETE, check_run_file, format_report
from hwctl.orchestrator import LATE_EVENT_S
from hwctl.runfile import RunFile
from hwctl.status import format_status, run_status
from test_resume import (
    SUBPROCESS_TIMEOUT_S,
    events_of,
    hwctl,
    hwctl_command,
    start_hwctl,
    wait_for,
    write_run_config,
)

SCHEDULE_S = (1.0, 5.0)
EXIT_INTERRUPTED = 130


def status_json(folder) -> dict:
    return json.loads(hwctl("status", folder / "run.h5", "--json").stdout)


def test_status_watches_run_stop_and_late_resume(tmp_path):
    config = write_run_config(
        tmp_path, schedule=("1s", "5s"), compensations=("none",), batch_size=128,
        backend='clock = "wall"', model='layers = ["linear"]',
        program="max_iterations = 5\nfailure_budget = 1.0",
    )
    run_path = tmp_path / "run.h5"
    process = start_hwctl("run", config, cwd=tmp_path)
    assert wait_for(process, run_path, lambda progress: progress.stage >= 1) is not None
    follower = subprocess.Popen(
        hwctl_command("status", run_path, "--follow", "--interval-s", "0.5", "--json", "--events", "1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    # While it programs.
    programming = status_json(tmp_path)
    assert programming["state"] == "running"
    assert programming["stage"] in ("created", "programming")
    assert programming["devices"] == 340
    assert programming["clock_mode"] == "real"

    # While it waits for the second read: when that read comes, in wall-clock time.
    reached = wait_for(process, run_path, lambda progress: progress.reads_done == 1)
    assert reached is not None, (tmp_path / "stderr.txt").read_text()[-2000:]
    waiting = run_status(run_path)
    with RunFile.open(run_path) as run:
        first_read = {name: values[0] for name, values in run.read_times().items()}
        end_wall = first_read["wall_time"] - first_read["actual_time_s"]
    assert waiting["state"] == "running"
    assert waiting["stage"] == "measuring"
    assert waiting["next_read"]["time_s"] == SCHEDULE_S[1]
    assert abs(waiting["next_read"]["expected_wall_time"] - (end_wall + SCHEDULE_S[1])) < 0.5
    assert waiting["temperature_c"] == first_read["temperature_c"]
    # The first read came at its time on the wall clock.
    assert SCHEDULE_S[0] <= first_read["actual_time_s"] < SCHEDULE_S[0] + 0.5
    # A check reads a file being written too, and does not suggest resuming it.
    checked = check_run_file(run_path)
    assert checked.exit_code == EXIT_INCOMPLETE
    assert checked.being_written
    assert "--resume" not in format_report(checked)

    process.send_signal(signal.SIGINT)
    process.wait(timeout=SUBPROCESS_TIMEOUT_S)
    assert process.returncode == EXIT_INTERRUPTED
    last = events_of(run_path)[-1]
    assert last.kind == "stop"
    assert "while waiting for the read at 5s" in last.message

    # The follower saw the run go and stops by itself once the run stops.
    output, _ = follower.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    looks = [json.loads(line) for line in output.splitlines()]
    assert len(looks) >= 2
    assert looks[0]["state"] == "running"
    assert looks[-1]["state"] == "stopped"
    programmed = [look["devices_programmed"] for look in looks]
    assert programmed == sorted(programmed)

    stopped = run_status(run_path)
    assert stopped["state"] == "stopped"
    assert f"hwctl run --resume {run_path}" in format_status(stopped)

    # Resume once the second read is overdue by more than LATE_EVENT_S.
    time.sleep(max(0.0, end_wall + SCHEDULE_S[1] + LATE_EVENT_S + 0.5 - time.time()))
    hwctl("run", "--resume", run_path)
    with RunFile.open(run_path) as run:
        reads = run.read_times()
        assert run.is_complete
    late = [event for event in events_of(run_path) if event.kind == "late"]
    assert len(late) == 1
    assert "read at 5s" in late[0].message
    np.testing.assert_array_equal(reads["time_s"], SCHEDULE_S)
    # The chip clock kept wall time while no process held it, so the late read's time after
    # programming matches the wall clock.
    assert reads["actual_time_s"][1] > SCHEDULE_S[1] + LATE_EVENT_S
    assert abs(reads["actual_time_s"][1] - (reads["wall_time"][1] - end_wall)) < 1.0
    assert run_status(run_path)["state"] == "complete"
