"""Benchmark: program-and-verify over the wire against the in-process emulator.

The same ResNet-32-like targets as ``benchmarks/program_verify.py`` (the first ``--devices`` of
them) are programmed three times on fresh emulated chips of the same seed:

1. in this process (``inprocess_program_verify_s``);
2. through pyvisa (pyvisa-py) to ``hwctl emulator serve --tcp 127.0.0.1:0`` running in another
   process (``wire_program_verify_s_visa``);
3. through pyserial to ``hwctl emulator serve --pty`` in another process
   (``wire_program_verify_s_serial``).

Batches go one `program_verify` call each, as the orchestrator sends them. Times are wall
time of the `program_verify` calls only. On Linux the run also reports the CPU time of those
calls, client and server process together: on a machine shared with other jobs the wall-time
ratio moves with the load, and the CPU-time ratio much less. The run checks that all three give
bit-identical results, and reports round trips, bytes on the wire per device and whether reads
arrived as ADC codes. Prints readable lines and, last, one JSON line. Run from the repository
root: ``python benchmarks/wire.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
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
) -> tuple[float, float, list[ProgramResult]]:
    """Program ``targets`` on devices 0..n-1, one call per batch.

    Returns the wall seconds and this process's CPU seconds spent in the calls, and the results.
    """
    ids = np.arange(targets.size, dtype=np.int64)
    results = []
    elapsed_s = cpu_s = 0.0
    for first in range(0, ids.size, settings.batch_size):
        chosen = slice(first, first + settings.batch_size)
        started, cpu_started = time.perf_counter(), time.process_time()
        results.append(program_verify(backend, ids[chosen], targets[chosen], settings))
        elapsed_s += time.perf_counter() - started
        cpu_s += time.process_time() - cpu_started
    return elapsed_s, cpu_s, results


def process_cpu_s(pid: int) -> float | None:
    """Return the user plus system CPU seconds of process ``pid`` (Linux /proc), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the command name: field 14 (utime) and 15 (stime) of proc(5), in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def served_emulator(seed: int, endpoint: list[str]) -> Iterator[tuple[str, int]]:
    """Run ``hwctl emulator serve`` in a child process; yield the address it prints, and its pid."""
    command = [sys.executable, "-m", "hwctl.cli_emulator", "serve", *endpoint,
               "--seed", str(seed), "--deadline-s", str(SERVER_DEADLINE_S)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        address = process.stdout.readline().strip()
        if not address:
            raise RuntimeError(f"{' '.join(command)} printed no address")
        yield address, process.pid
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
             reference: list[ProgramResult]) -> dict[str, float | int | bool | None]:
    with served_emulator(seed, endpoint) as (address, server_pid):
        transport = VisaTransport(address, timeout_s=60) if name == "visa" else SerialTransport(address, timeout_s=60)
        driver = ChipController(transport)
        connect_trips = driver.stats.round_trips
        server_cpu_started = process_cpu_s(server_pid)
        elapsed_s, client_cpu_s, results = program_in_batches(driver, targets, settings)
        server_cpu_ended = process_cpu_s(server_pid)
        stats = driver.stats
        reads_as_codes = driver.adc_scale is not None
        driver.close()

    devices = targets.size
    batch_trips = stats.round_trips - connect_trips
    cpu_s = None
    if server_cpu_started is not None and server_cpu_ended is not None:
        cpu_s = client_cpu_s + server_cpu_ended - server_cpu_started
    return {
        f"wire_program_verify_s_{name}": elapsed_s,
        f"wire_cpu_s_{name}": cpu_s,
        f"round_trips_{name}": batch_trips,
        f"round_trips_per_batch_{name}": batch_trips / len(results),
        f"bytes_sent_per_device_{name}": stats.bytes_sent / devices,
        f"bytes_received_per_device_{name}": stats.bytes_received / devices,
        f"retries_{name}": stats.retries,
        f"reads_as_codes_{name}": reads_as_codes,
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
    inprocess_s, inprocess_cpu_s, reference = program_in_batches(chip, targets, settings)
    chip.close()
    report: dict[str, float | int | bool | None] = {
        "devices": int(targets.size),
        "batch_size": settings.batch_size,
        "inprocess_program_verify_s": inprocess_s,
        "inprocess_cpu_s": inprocess_cpu_s,
    }
    print(f"in-process: {inprocess_s:.2f} s ({inprocess_cpu_s:.2f} s CPU) for {targets.size} devices")

    for name, endpoint in (("visa", ["--tcp", "127.0.0.1:0"]), ("serial", ["--pty"])):
        numbers = run_wire(name, args.seed, endpoint, targets, settings, reference)
        report.update(numbers)
        report[f"ratio_{name}"] = numbers[f"wire_program_verify_s_{name}"] / inprocess_s
        wire_cpu_s = numbers[f"wire_cpu_s_{name}"]
        report[f"cpu_ratio_{name}"] = None if wire_cpu_s is None else wire_cpu_s / inprocess_cpu_s
        cpu_text = "" if wire_cpu_s is None else (
            f", CPU {wire_cpu_s:.2f} s ({report[f'cpu_ratio_{name}']:.2f}x)"
        )
        print(
            f"{name}: {numbers[f'wire_program_verify_s_{name}']:.2f} s "
            f"({report[f'ratio_{name}']:.2f}x in-process{cpu_text}), "
            f"{numbers[f'round_trips_{name}']} round trips, "
            f"{numbers[f'bytes_sent_per_device_{name}']:.1f} B/device sent, "
            f"{numbers[f'bytes_received_per_device_{name}']:.1f} B/device received"
            f"{' as ADC codes' if numbers[f'reads_as_codes_{name}'] else ' as float64'}, "
            f"identical results: {numbers[f'identical_{name}']}"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
