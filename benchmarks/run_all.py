"""Benchmark the main job's stages and write the figures to docs/benchmarks.md.

Run with `make bench` (or `.venv/bin/python benchmarks/run_all.py`). Needs CIFAR-10 where
HWCTL_CIFAR10_DIR points. The last line printed is one JSON object with every figure.
Timings are medians of repeated runs; the inference ratio compares the two networks in
interleaved runs in one process, so machine load affects both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hwctl.allocation import allocate  # noqa: E402
from hwctl.checkpoint import load_checkpoint  # noqa: E402
from hwctl.cifar import Normalizer, load_split, locate_cifar10  # noqa: E402
from hwctl.config import DEFAULT_CHECKPOINT  # noqa: E402
from hwctl.evaluate import count_correct  # noqa: E402
from hwctl.inference import network_from_conductances  # noqa: E402
from hwctl.orchestrator import device_targets_us  # noqa: E402
from protocols.program_verify import program_verify  # noqa: E402
from protocols.readback import read_devices  # noqa: E402
from sim_backend.chip import EmulatedChip  # noqa: E402

GOALS = {
    "program_verify_s": ("≤", 5.0),
    "ratio_visa": ("≤", 2.0),
    "ratio_serial": ("≤", 2.0),
    "max_abs_deviation": ("≤", 0.25),
    "converged_nonzero": ("≥", 0.99),
    "inference_ratio": ("≤", 1.2),
    "main_job_s": ("≤", 600.0),
    "peak_rss_mb": ("≤", 3072.0),
}


def _median_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_program_and_read(model, repeats: int) -> dict:
    chip = EmulatedChip(seed=0)
    allocation = allocate(model, chip.geometry())
    devices = np.column_stack([allocation.device_plus, allocation.device_minus]).reshape(-1)
    targets = device_targets_us(allocation, 25.0)

    durations, iterations, chip_s = [], [], []
    for seed in range(repeats):
        chip = EmulatedChip(seed=seed)
        started = time.perf_counter()
        result = program_verify(chip, devices, targets)
        durations.append(time.perf_counter() - started)
        iterations.append(float(np.mean(result.iterations)))
        chip_s.append(result.chip_time_s)
    read_s = _median_time(lambda: read_devices(chip, devices, 65536), repeats)
    return {
        "devices": int(len(devices)),
        "program_verify_s": statistics.median(durations),
        "mean_iterations": statistics.median(iterations),
        "modelled_chip_s": statistics.median(chip_s),
        "converged_fraction": float(result.converged_fraction()),
        "read_all_s": read_s,
        "_state": (chip, allocation, devices),
    }


def bench_inference(model, info, allocation, g_us, images, labels, repeats: int) -> dict:
    normalizer = Normalizer(**info["normalization"])
    float_model = model.to(memory_format=torch.channels_last).eval()

    def plain():
        count_correct(float_model, images, labels, normalizer, 1000)

    def from_conductances():
        analog = network_from_conductances(model, allocation, g_us[0::2], g_us[1::2], 25.0)
        count_correct(analog.to(memory_format=torch.channels_last), images, labels, normalizer, 1000)

    plain_times, analog_times = [], []
    for _ in range(repeats):
        plain_times.append(_median_time(plain, 1))
        analog_times.append(_median_time(from_conductances, 1))
    return {
        "plain_inference_s": statistics.median(plain_times),
        "conductance_inference_s": statistics.median(analog_times),
        "inference_ratio": statistics.median(analog_times) / statistics.median(plain_times),
    }


def bench_main_job(images: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "bench.h5"
        command = [str(REPO / ".venv" / "bin" / "hwctl"), "run",
                   str(REPO / "examples" / "resnet32-emulator.toml"), "--out", str(out),
                   "--images", str(images)]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        elapsed = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"main_job_s": elapsed, "peak_rss_mb": peak_kb / 1024, "main_job_images": images}


def _last_json_line(script: str, *args: str) -> dict:
    output = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def bench_wire() -> dict:
    """Program-and-verify over VISA TCP and a serial pty (benchmarks/wire.py), one run."""
    report = _last_json_line("wire.py")
    keep = ("inprocess_program_verify_s", "wire_program_verify_s_visa", "ratio_visa",
            "round_trips_visa", "bytes_sent_per_device_visa", "bytes_received_per_device_visa",
            "wire_program_verify_s_serial", "ratio_serial", "round_trips_serial",
            "identical_visa", "identical_serial")
    return {key: report[key] for key in keep if key in report}


def bench_levels() -> dict:
    """Programming error per target level on all devices (benchmarks/program_verify.py)."""
    report = _last_json_line("program_verify.py")
    keep = ("levels_us", "sigma_us", "sigma_over_published", "max_abs_deviation",
            "median_abs_error_us_nonzero", "converged_nonzero")
    return {key: report[key] for key in keep if key in report}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {memory_gib:.0f} GiB, Python {platform.python_version()}, torch {torch.__version__}"


def write_markdown(figures: dict, command: str, path: Path) -> None:
    lines = [
        "# Benchmarks",
        "",
        "Figures of the latest benchmark run, written by `benchmarks/run_all.py`.",
        "",
        f"- command: `{command}`",
        f"- machine: {figures['machine']}",
        f"- date: {figures['date']}",
        f"- load average (1 min): {figures['load']}; the machine is shared, so absolute times vary",
        "",
        "| figure | value | goal |",
        "|---|---|---|",
    ]
    for key, value in figures.items():
        if key in ("machine", "date", "load"):
            continue
        goal = GOALS.get(key)
        if isinstance(value, float):
            shown = f"{value:.3f}"
        elif isinstance(value, list):
            shown = ", ".join(f"{item:.3g}" for item in value)
        else:
            shown = str(value)
        lines.append(f"| `{key}` | {shown} | {goal[0] + ' ' + str(goal[1]) if goal else ''} |")
    extra = REPO / "docs" / "benchmarks-notes.md"
    if extra.is_file():
        lines += ["", extra.read_text().strip()]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per timing; the median is kept")
    parser.add_argument("--job-images", type=int, default=10_000, help="test images in the main-job run")
    parser.add_argument("--skip-job", action="store_true", help="leave out the whole main-job run")
    parser.add_argument("--skip-wire", action="store_true", help="leave out the VISA and serial runs")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    args = parser.parse_args()

    model, info = load_checkpoint(DEFAULT_CHECKPOINT)
    figures: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                     "load": f"{os.getloadavg()[0]:.1f} at the start"}
    stage = bench_program_and_read(model, args.repeats)
    chip, allocation, devices = stage.pop("_state")
    figures.update(stage)

    images, labels = load_split(locate_cifar10(None), "test")
    g_us = read_devices(chip, devices, 65536)
    figures.update(bench_inference(model, info, allocation, g_us, images, labels, args.repeats))
    if not args.skip_wire:
        figures.update(bench_wire())
    figures.update(bench_levels())
    if not args.skip_job:
        figures.update(bench_main_job(args.job_images))

    command = "make bench" if len(sys.argv) == 1 else "python benchmarks/run_all.py " + " ".join(sys.argv[1:])
    if not args.no_write:
        write_markdown(figures, command, REPO / "docs" / "benchmarks.md")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
