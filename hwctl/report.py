"""PNG plots of a run: programming error against target, conductance histograms, accuracy over time."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or wanted
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from calibration.published import sigma_prog_us  # noqa: E402
from hwctl.schedule import format_duration  # noqa: E402

log = logging.getLogger(__name__)

LEVEL_BIN_US = 1.0


def level_statistics(target_us: np.ndarray, read_us: np.ndarray, g_max_us: float, bin_us: float = LEVEL_BIN_US):
    """Return bin centres, error standard deviations and counts of (read − target) per target bin."""
    edges = np.arange(0.0, g_max_us + bin_us, bin_us)
    which = np.clip(np.digitize(target_us, edges) - 1, 0, len(edges) - 2)
    error = read_us - target_us
    counts = np.bincount(which, minlength=len(edges) - 1)
    sums = np.bincount(which, weights=error, minlength=len(edges) - 1)
    squares = np.bincount(which, weights=error**2, minlength=len(edges) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / counts
        std = np.sqrt(np.maximum(squares / counts - mean**2, 0.0))
    return (edges[:-1] + edges[1:]) / 2, std, counts


def plot_programming_error(target_us, read_us, g_max_us: float, path: Path) -> Path:
    centres, std, counts = level_statistics(target_us, read_us, g_max_us)
    keep = counts >= 20
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.plot(centres[keep], std[keep], "o", label="measured, first read")
    grid = np.linspace(0, g_max_us, 200)
    axes.plot(grid, sigma_prog_us(grid), "-", label="published σ_prog(g)")
    axes.set_xlabel("target conductance (µS)")
    axes.set_ylabel("programming error σ (µS)")
    axes.set_title("Programming error against target level")
    axes.legend()
    axes.grid(alpha=0.3)
    return _save(figure, path)


def plot_conductance_histograms(reads: Sequence[tuple[float, np.ndarray]], g_max_us: float, path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, g_max_us * 1.1, 111)
    for time_s, g_us in reads:
        axes.hist(g_us, bins=bins, histtype="step", label=f"t = {format_duration(time_s)}")
    axes.set_yscale("log")
    axes.set_xlabel("conductance (µS)")
    axes.set_ylabel("devices")
    axes.set_title("Read conductances")
    axes.legend()
    return _save(figure, path)


def plot_accuracy_over_time(
    evaluations: Sequence[tuple[float, str, float]], float_accuracy: float | None, path: Path
) -> Path:
    figure, axes = plt.subplots(figsize=(6, 4))
    for compensation in ("none", "gdc", "bn"):
        points = sorted((t, a) for t, c, a in evaluations if c == compensation)
        if points:
            times, values = zip(*points)
            axes.plot(times, 100 * np.array(values), "o-", label=compensation)
    if float_accuracy is not None:
        axes.axhline(100 * float_accuracy, color="grey", linestyle="--", label="float network")
    axes.set_xscale("log")
    axes.set_xlabel("time after programming (s)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("Accuracy against time per drift compensation")
    axes.legend()
    axes.grid(alpha=0.3, which="both")
    return _save(figure, path)


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    log.info("wrote %s", path)
    return path


def write_report(run_path: Path, folder: Path) -> list[Path]:
    """Write the three PNG plots of a run into ``folder`` and return their paths."""
    from hwctl.runfile import RunFile
    from hwctl.summary import run_summary

    with RunFile.open(run_path) as run:
        summary = run_summary(run)
        if run.progress().reads_done == 0:
            raise ValueError(f"{run_path} has no reads yet; run `hwctl read {run_path}` first")
        targets = run.target_us()
        g_max_us = run.limits().g_max_us
        times = run.read_times()["time_s"]
        reads = [(float(t), run.read_g_us(i)) for i, t in enumerate(times)]

    nonzero = targets > 0
    stem = Path(run_path).stem
    paths = [
        plot_programming_error(targets[nonzero], reads[0][1][nonzero], g_max_us,
                               folder / f"{stem}-programming-error.png"),
        plot_conductance_histograms(reads, g_max_us, folder / f"{stem}-conductance.png"),
        plot_accuracy_over_time(
            [(row["time_s"], row["compensation"], row["accuracy"]) for row in summary["accuracy"]],
            summary["float_accuracy"], folder / f"{stem}-accuracy.png"),
    ]
    return paths
