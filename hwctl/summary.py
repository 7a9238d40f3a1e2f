"""Figures of merit of a run, computed from its run file."""

from __future__ import annotations

from typing import Any

import numpy as np

from hwctl.runfile import RunFile


def programming_statistics(run: RunFile) -> dict[str, Any]:
    """Return convergence and first-read error over devices with non-zero targets."""
    targets = run.target_us()
    status = run.program_results()["status"]
    nonzero = targets > 0
    converged_code = run.status_codes()["converged"]
    stats: dict[str, Any] = {
        "converged_fraction": float(np.mean(status[nonzero] == converged_code)) if nonzero.any() else None,
        "programming_error_us": None,
        "median_abs_error_us": None,
    }
    if run.progress().reads_done and nonzero.any():
        error = run.read_g_us(0)[nonzero] - targets[nonzero]
        stats["programming_error_us"] = float(np.std(error))
        stats["median_abs_error_us"] = float(np.median(np.abs(error)))
    return stats


def run_summary(run: RunFile) -> dict[str, Any]:
    """Return the JSON summary of a run: sizes, programming statistics and accuracies."""
    table = run.evaluations()
    accuracy = [
        {"time_s": float(row["time_s"]), "compensation": row["compensation"].decode(),
         "accuracy": float(row["accuracy"]), "images": int(row["images"])}
        for row in table
    ]
    overview = run.summary()
    return {
        "path": overview["path"],
        "weights": run.n_pairs,
        "devices": run.n_devices,
        **programming_statistics(run),
        "float_accuracy": run.float_accuracy(),
        "accuracy": accuracy,
        "stage": overview["stage"],
        "complete": overview["complete"],
        "status_counts": overview["status_counts"],
    }
