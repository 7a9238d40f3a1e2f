"""Soak run: the whole main job over a serial pseudo-terminal or VISA TCP, with injected faults.

The reference ResNet-32 is programmed onto `hwctl emulator serve` through the real driver
stack, read on the whole default schedule (25 s, 1 h, 1 d) and evaluated. The server injects:

- a reply delayed past the driver's timeout every ``--timeout-every`` batch requests;
- one dropped connection (``drop@N``: the link closes without the batch applied);
- stuck devices, ``--stuck-fraction`` of the chip (0.5 % by default).

Afterwards the script checks that the run is complete and intact (`hwctl check`), and that
every scheduled read, evaluation and device is stored once. It also checks that the programming
results and reads equal, bit for bit, those of the same chip emulated in this process with no
faults. It prints readable lines and, last, one JSON line. Run from the repository root:
``.venv/bin/python benchmarks/soak.py`` (about eleven minutes on 2 shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hwctl.config import DEFAULT_CHECKPOINT, load_config  # noqa: E402
from hwctl.integrity import check_run_file  # noqa: E402
from hwctl.orchestrator import create_run_file, load_network, open_backend, program_step, read_step  # noqa: E402
from hwctl.runfile import RunFile  # noqa: E402

HWCTL = [sys.executable, "-m", "hwctl"]
# Batch requests the whole job sends at most, with room to spare (about 3,000 were measured).
MAX_REQUESTS = 20_000


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores ({cpu})"


def fault_options(timeout_every: int, delay_s: float, drop_at: int) -> list[str]:
    options = []
    for number in range(timeout_every, MAX_REQUESTS, timeout_every):
        options += ["--fault", f"delay@{number}:{delay_s}"]
    return options + ["--fault", f"drop@{drop_at}"]


def write_config(folder: Path, args: argparse.Namespace, transport: str, address: str) -> Path:
    address_key = "port" if transport == "serial" else "resource"
    text = f"""
[run]
out = "soak.h5"
seed = {args.seed}
description = "soak run with injected faults"
[model]
checkpoint = "{args.checkpoint}"
[data]
test_images = {args.images}
[backend]
kind = "{transport}"
{address_key} = "{address}"
timeout_s = {args.driver_timeout_s}
[schedule]
times = ["25s", "1h", "1d"]
"""
    path = folder / "soak.toml"
    path.write_text(text)
    return path


def reference_results(config_path: Path, folder: Path, stuck_fraction: float) -> dict:
    """Program and read the same chip in this process, without faults, and return the results."""
    config = load_config(config_path)
    backend = config.backend.model_copy(update={"kind": "emulator", "stuck_fraction": stuck_fraction})
    run = config.run.model_copy(update={"out": folder / "reference.h5"})
    config = config.model_copy(update={"backend": backend, "run": run})
    with open_backend(config, fresh_chip=True) as chip:
        network = load_network(config, chip)
        with create_run_file(config, chip, network, overwrite=True) as file:
            program_step(config, chip, file, network)
            read_step(config, chip, file, config.schedule.times_s)
            return {
                "program": file.program_results(),
                "reads": [file.read_g_us(index) for index in range(file.progress().reads_done)],
                "remaps": file.remaps(),
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transport", choices=("serial", "visa"), default="serial")
    parser.add_argument("--images", type=int, default=10_000, help="test images per evaluation")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stuck-fraction", type=float, default=0.005)
    parser.add_argument("--timeout-every", type=int, default=1000, help="batch requests between timeouts")
    parser.add_argument("--driver-timeout-s", type=float, default=2.0, help="the driver's exchange timeout")
    parser.add_argument("--drop-at", type=int, default=1500, help="batch request whose link is dropped")
    parser.add_argument("--keep", type=Path, help="folder to keep the run file and logs in")
    args = parser.parse_args()
    delay_s = args.driver_timeout_s + 1.0

    with tempfile.TemporaryDirectory(prefix="hwctl-soak-") as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        mode = ["--pty"] if args.transport == "serial" else ["--tcp", "127.0.0.1:0"]
        server_log = open(folder / "server.log", "w")
        server = subprocess.Popen(
            [*HWCTL, "-v", "emulator", "serve", *mode, "--seed", str(args.seed),
             "--stuck-fraction", str(args.stuck_fraction), "--deadline-s", "7200",
             *fault_options(args.timeout_every, delay_s, args.drop_at)],
            stdout=subprocess.PIPE, stderr=server_log, text=True,
        )
        address = server.stdout.readline().strip()
        config = write_config(folder, args, args.transport, address)
        started = time.perf_counter()
        try:
            result = subprocess.run([*HWCTL, "-v", "run", str(config)], cwd=folder,
                                    capture_output=True, text=True)
        finally:
            server.terminate()
            server.wait(timeout=60)
            server_log.close()
        elapsed_s = time.perf_counter() - started
        (folder / "run.log").write_text(result.stderr)
        if result.returncode != 0:
            raise SystemExit(f"the soak run failed ({result.returncode}):\n{result.stderr[-3000:]}")

        figures = summarise(folder, config, args, elapsed_s, result.stderr)
    for key, value in figures.items():
        print(f"{key}: {value}")
    print(json.dumps(figures))


def summarise(folder: Path, config: Path, args: argparse.Namespace, elapsed_s: float, log: str) -> dict:
    run_path = folder / "soak.h5"
    report = check_run_file(run_path)
    with RunFile.open(run_path) as run:
        progress = run.progress()
        reads = run.read_times()
        evaluations = run.evaluations()
        results = {
            "program": run.program_results(),
            "reads": [run.read_g_us(index) for index in range(progress.reads_done)],
            "remaps": run.remaps(),
        }
        mapping = run.mapping().device_ids()
        n_devices = run.n_devices
        kinds = [event.kind for event in run.events()]
        status = results["program"]["status"]
        converged = float(np.mean(status[run.target_us() > 0] == run.status_codes()["converged"]))

    entries = {(int(row["read_index"]), row["compensation"].decode()) for row in evaluations}
    reference = reference_results(config, folder, args.stuck_fraction)
    identical = all(
        np.array_equal(results["program"][name], values, equal_nan=True)
        for name, values in reference["program"].items()
    ) and all(np.array_equal(a, b) for a, b in zip(results["reads"], reference["reads"], strict=True))
    server_log = (folder / "server.log").read_text()
    return {
        "transport": args.transport,
        "machine": machine(),
        "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:]),
        "devices": n_devices,
        "wall_time_s": round(elapsed_s, 1),
        "intact_and_complete": report.intact and report.complete,
        "reads_stored": progress.reads_done,
        "read_times_s": reads["time_s"].tolist(),
        "evaluations_stored": len(evaluations),
        "evaluations_distinct": len(entries),
        "devices_stored_once": progress.devices_programmed == n_devices and len(np.unique(mapping)) == n_devices,
        "pairs_moved_to_spares": progress.remaps,
        "converged_nonzero": round(converged, 4),
        "identical_to_in_process_run": bool(identical and np.array_equal(results["remaps"], reference["remaps"])),
        "delayed_replies_injected": len(re.findall(r"fault: delaying the reply", server_log)),
        "connections_dropped": len(re.findall(r"fault: dropping batch request", server_log)),
        "driver_session_reopenings": len(re.findall(r"reopening the session", log)),
        "batch_replays_served": len(re.findall(r"sending its stored reply", server_log)),
        "events": {kind: kinds.count(kind) for kind in sorted(set(kinds))},
    }


if __name__ == "__main__":
    main()
