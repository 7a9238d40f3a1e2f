"""Benchmark: program-and-verify over the wire against the in-process emulator.

The same ResNet-32-like targets as ``benchmarks/program_verify.py`` (the first ``--devices`` of
them) are programmed three times on fresh emulated chips of the same seed:

1. in this process (``inprocess_program_verify_s``);
2. through pyvisa (pyvisa-py) to ``hwctl emulator serve --tcp 127.0.0.1:0`` running in another
   process (``wire_program_verify_s_visa``);
3. through pyserial to ``hwctl emulator serve --pty`` in another process
   (``wire_program_verify_s_serial``).

Batches go one `program_verify` call each, as the orchestrator sends them. Times are wall
time of the `program_verify` calls only. The run checks that all three give bit-identical
results, and reports round trips and bytes on the wire per device. Prints readable lines and,
last, one JSON line. Run from the repository root: ``python benchmarks/wire.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from drivers.controller import ChipController
from drivers.transports import SerialTransport, VisaTransport
from hwctl.backend import Backend
from protocols.program_verify import ProgramResult, ProgramVerifySettings, program_verify
from sim_backend.chip import EmulatedChip

REPO = Path(__file__).resolve().parents[1]
SERVER_DEADLINE_S = 3600


def resnet_targets_us(seed: int) -> np.ndarray:
    """Return the targets of ``benchmarks/program_verify.py`` (loaded from that file)."""
    spec = importlib.util.spec_from_file_location("benchmark_program_verify", REPO / "benchmarks" / "program_verify.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.resnet_targets_us(seed)


def program_in_batches(
    backend: Backend, targets: np.ndarray, settings: ProgramVerifySettings
) -> tuple[float, list[ProgramResult]]:
    """Program ``targets`` on devices 0..n-1, one call per batch; return seconds and results."""
    ids = np.arange(targets.size, dtype=np.int64)
    results = []
    elapsed_s = 0.0
    for first in range(0, ids.size, settings.batch_size):
        chosen = slice(first, first + settings.batch_size)
        started = time.perf_counter()
        results.append(program_verify(backend, ids[chosen], targets[chosen], settings))
        elapsed_s += time.perf_counter() - started
    return elapsed_s, results


@contextlib.contextmanager
def served_emulator(seed: int, endpoint: list[str]) -> Iterator[str]:
    """Run ``hwctl emulator serve`` in a child process; yield the address it prints first."""
    command = [sys.executable, "-m", "hwctl.cli_emulator", "serve", *endpoint,
               "--seed", str(seed), "--deadline-s", str(SERVER_DEADLINE_S)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        address = process.stdout.readline().strip()
        if not address:
            raise RuntimeError(f"{' '.join(command)} printed no address")
        yield address
    finally:
        process.terminate()
        process.wait(60)


def results_identical(got: list[ProgramResult], expected: list[ProgramResult]) -> bool:
    names = ("final_g_us", "pulses", "iterations", "status", "t_programmed_s")
    return all(
        getattr(a, name).tobytes() == getattr(b, name).tobytes()
        for a, b in zip(got, expected, strict=True)
        for name in names
    ) and all(a.chip_time_s == b.chip_time_s for a, b in zip(got, expected))


def run_wire(name: str, seed: int, endpoint: list[str], targets: np.ndarray, settings: ProgramVerifySettings,
             reference: list[ProgramResult]) -> dict[str, float | int | bool]:
    with served_emulator(seed, endpoint) as address:
        transport = VisaTransport(address, timeout_s=60) if name == "visa" else SerialTransport(address, timeout_s=60)
        driver = ChipController(transport)
        connect_trips = driver.stats.round_trips
        elapsed_s, results = program_in_batches(driver, targets, settings)
        stats = driver.stats
        driver.close()

    devices = targets.size
    batch_trips = stats.round_trips - connect_trips
    return {
        f"wire_program_verify_s_{name}": elapsed_s,
        f"round_trips_{name}": batch_trips,
        f"round_trips_per_batch_{name}": batch_trips / len(results),
        f"bytes_sent_per_device_{name}": stats.bytes_sent / devices,
        f"bytes_received_per_device_{name}": stats.bytes_received / devices,
        f"retries_{name}": stats.retries,
        f"identical_{name}": results_identical(results, reference),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=723_444, help="devices to program (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=ProgramVerifySettings().batch_size)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    targets = resnet_targets_us(args.seed)[: args.devices]
    settings = ProgramVerifySettings(batch_size=args.batch_size)

    chip = EmulatedChip(seed=args.seed)
    inprocess_s, reference = program_in_batches(chip, targets, settings)
    chip.close()
    report: dict[str, float | int | bool] = {
        "devices": int(targets.size),
        "batch_size": settings.batch_size,
        "inprocess_program_verify_s": inprocess_s,
    }
    print(f"in-process: {inprocess_s:.2f} s for {targets.size} devices")

    for name, endpoint in (("visa", ["--tcp", "127.0.0.1:0"]), ("serial", ["--pty"])):
        numbers = run_wire(name, args.seed, endpoint, targets, settings, reference)
        report.update(numbers)
        report[f"ratio_{name}"] = numbers[f"wire_program_verify_s_{name}"] / inprocess_s
        print(
            f"{name}: {numbers[f'wire_program_verify_s_{name}']:.2f} s "
            f"({report[f'ratio_{name}']:.2f}x in-process), {numbers[f'round_trips_{name}']} round trips, "
            f"{numbers[f'bytes_sent_per_device_{name}']:.1f} B/device sent, "
            f"{numbers[f'bytes_received_per_device_{name}']:.1f} B/device received, "
            f"identical results: {numbers[f'identical_{name}']}"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
