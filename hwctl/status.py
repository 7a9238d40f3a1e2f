"""The state of a run, read from its run file, also while another process writes it.

`run_status` returns a JSON-ready dict: whether the run is running, stopped, paused or complete,
how far programming, reads and evaluations are, the converged fraction, failures, the next read
and the last events. `format_status` renders it as `hwctl status` prints it, and
`follow_status` repeats that until the run ends. Each look opens the file for a moment only,
because HDF5 lets a stopped run resume writing only while no reader has the file open.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hwctl.config import parse_config_text
from hwctl.failures import failure_counts
from hwctl.runfile import RunFile, RunFileError
from hwctl.schedule import format_duration

log = logging.getLogger(__name__)

# `follow_status` stops after this long even if the run goes on, s (one week).
FOLLOW_MAX_S = 7 * 86400.0


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _writer_state(run: RunFile) -> tuple[str, str]:
    """Return the run's state (complete, paused, running, stopped, unknown) and a detail line."""
    progress = run.progress()
    resume = f"continue with: hwctl run --resume {run.path}"
    if progress.complete:
        return "complete", ""
    if progress.paused:
        return "paused", f"the failure budget is used up; {resume} --failure-budget FRACTION"
    if not run.writer_open:
        return "stopped", resume
    if progress.writer_host and progress.writer_host != socket.gethostname():
        return "unknown", (f"written by process {progress.writer_pid} on {progress.writer_host}; "
                           "its state cannot be checked from here")
    if _process_alive(progress.writer_pid):
        return "running", f"written by process {progress.writer_pid}"
    return "stopped", f"the writing process {progress.writer_pid} ended without closing the file; {resume}"


def _next_read(run: RunFile, planned_s: np.ndarray, done_s: np.ndarray) -> dict[str, Any] | None:
    """Return the next planned read: its time after programming, its chip time and wall time."""
    pending = [float(t) for t in planned_s if not np.any(np.isclose(done_s, t))]
    if not pending:
        return None
    result: dict[str, Any] = {"time_s": pending[0], "chip_clock_s": None, "expected_wall_time": None}
    progress = run.progress()
    if progress.devices_programmed < run.n_devices:
        return result
    end_s = float(np.nanmax(run.program_results()["t_programmed_s"]))
    result["chip_clock_s"] = end_s + pending[0]
    if run.clock_mode != "real":
        return result

    # Convert chip time to wall time through the latest event that has both.
    anchors = [(event.wall_time, event.chip_clock_s) for event in run.events()
               if math.isfinite(event.chip_clock_s)]
    if anchors:
        wall_s, chip_s = anchors[-1]
        result["expected_wall_time"] = wall_s + result["chip_clock_s"] - chip_s
    return result


def run_status(path: str | Path, events: int = 5) -> dict[str, Any]:
    """Return the state of the run in ``path``; see the module docstring."""
    with RunFile.open(path) as run:
        run.refresh()
        progress = run.progress()
        state, detail = _writer_state(run)
        config = parse_config_text(run.config_toml(), source=f"{path} (stored configuration)")
        targets = run.target_us()[: progress.devices_programmed]
        stored = run.program_results()
        nonzero = targets > 0
        converged = stored["status"][nonzero] == run.status_codes()["converged"]
        reads = run.read_times()
        planned = run.planned_read_times_s()
        evaluations = run.evaluations()
        latest = {row["compensation"].decode(): float(row["accuracy"]) for row in evaluations}

        return {
            "path": str(path),
            "state": state,
            "detail": detail,
            "stage": progress.stage.name.lower(),
            "sessions": progress.sessions,
            "updated_wall_time": progress.updated_wall_time,
            "devices": run.n_devices,
            "devices_programmed": progress.devices_programmed,
            "batches_done": progress.batches_done,
            "in_flight": None if run.in_flight() is None else [run.in_flight().start, run.in_flight().stop],
            "converged_fraction": float(np.mean(converged)) if converged.size else None,
            "failures": failure_counts(stored["failure"]),
            "pairs_moved_to_spares": progress.remaps,
            "failure_budget": progress.failure_budget,
            "reads_done": progress.reads_done,
            "reads_planned": len(planned),
            "next_read": _next_read(run, planned, reads["time_s"]),
            "temperature_c": float(reads["temperature_c"][-1]) if progress.reads_done else None,
            "evaluations_done": progress.evaluations_done,
            "evaluations_planned": len(planned) * len(config.evaluate.compensations),
            "latest_accuracy": latest,
            "float_accuracy": run.float_accuracy(),
            "clock_mode": run.clock_mode,
            "events": [
                {"wall_time": event.wall_time, "chip_clock_s": event.chip_clock_s,
                 "kind": event.kind, "message": event.message}
                for event in run.events()[-events:]
            ] if events > 0 else [],
        }


def _clock_time(unix_s: float) -> str:
    if not math.isfinite(unix_s):
        return "unknown"
    return datetime.datetime.fromtimestamp(unix_s).strftime("%Y-%m-%d %H:%M:%S")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f} %"


def format_status(status: dict[str, Any], now: float | None = None) -> str:
    """Render `run_status` as the lines `hwctl status` prints."""
    now = time.time() if now is None else now
    age_s = now - status["updated_wall_time"]
    state = status["state"] + (f" ({status['detail']})" if status["detail"] else "")
    devices, done = status["devices"], status["devices_programmed"]
    failures = ", ".join(f"{name} {count}" for name, count in status["failures"].items()) or "none"

    lines = [
        f"run file:        {status['path']}",
        f"state:           {state}",
        f"last update:     {_clock_time(status['updated_wall_time'])} ({format_duration(max(age_s, 0.0))} ago), "
        f"session {status['sessions']}",
        f"programmed:      {done} of {devices} devices ({100 * done / devices:.1f} %), "
        f"{status['batches_done']} batches",
        f"converged:       {_percent(status['converged_fraction'])} of stored devices with non-zero targets",
        f"failed devices:  {failures}; {status['pairs_moved_to_spares']} pairs moved to spare devices",
        f"reads:           {status['reads_done']} of {status['reads_planned']}",
    ]
    upcoming = status["next_read"]
    if upcoming is not None:
        line = f"next read:       {format_duration(upcoming['time_s'])} after programming"
        if upcoming["chip_clock_s"] is not None:
            line += f", at chip time {upcoming['chip_clock_s']:.1f} s"
        if upcoming["expected_wall_time"] is not None:
            wait_s = upcoming["expected_wall_time"] - now
            when = f"in {format_duration(wait_s)}" if wait_s > 0 else f"{format_duration(-wait_s)} overdue"
            line += f", {_clock_time(upcoming['expected_wall_time'])} ({when})"
        elif status["clock_mode"] == "virtual":
            line += " (virtual clock: taken as soon as the run gets there)"
        lines.append(line)
    if status["temperature_c"] is not None:
        lines.append(f"temperature:     {status['temperature_c']:.2f} °C at the last read")
    accuracy = ", ".join(f"{name} {_percent(value)}" for name, value in status["latest_accuracy"].items())
    lines.append(f"evaluations:     {status['evaluations_done']} of {status['evaluations_planned']}"
                 + (f"; latest accuracy {accuracy}" if accuracy else ""))
    if status["events"]:
        lines.append("last events:")
        for event in status["events"]:
            lines.append(f"  {_clock_time(event['wall_time'])}  {event['kind']:<10} {event['message']}")
    return "\n".join(lines)


def follow_status(
    path: str | Path,
    show: Callable[[dict[str, Any]], None],
    interval_s: float = 2.0,
    events: int = 5,
    max_s: float = FOLLOW_MAX_S,
) -> dict[str, Any]:
    """Call ``show`` with the run's status every ``interval_s`` until the run is not running.

    Returns the last status. A look that fails because the writer has the file locked for a
    moment is retried at the next interval. The loop ends after ``max_s`` in any case.
    """
    started = time.monotonic()
    status: dict[str, Any] | None = None
    for _ in range(int(max_s / interval_s) + 1):
        try:
            status = run_status(path, events)
        except RunFileError as error:
            if "retry" not in str(error):
                raise
            log.info("run file busy: %s", error)
        else:
            show(status)
            if status["state"] != "running":
                return status
        if time.monotonic() - started > max_s:
            break
        time.sleep(interval_s)
    if status is None:
        raise RunFileError(f"{path} stayed busy for {max_s:.0f} s; retry later")
    return status
