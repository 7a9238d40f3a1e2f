"""Resuming a stopped run: the batch in flight, staged results, and what a resume may change.

The helpers here build small runs: a ResNet with widths 4/8/16 on a 64 x 256 emulated chip,
with a few synthetic CIFAR-10 images in the official binary layout. They run the real `hwctl`
command, and the other test files of this area import them.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hwctl.checkpoint import model_payload, save_checkpoint
from hwctl.config import load_config
from hwctl.model import ResNetCifar
from hwctl.orchestrator import resume_job, run_job
from hwctl.runfile import RunFile, RunFileError
from protocols.program_verify import DeviceStatus, ProgramVerifySettings
from sim_backend.chip import EmulatedChip

NORMALIZATION = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
RECORD_BYTES = 1 + 3 * 32 * 32
SUBPROCESS_TIMEOUT_S = 300
SEED = 3


# ---------------------------------------------------------------------- helpers


def write_cifar(folder: Path, images: int = 128) -> Path:
    """Write random images in the CIFAR-10 binary layout: a test batch and one training batch."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in ("test_batch.bin", "data_batch_1.bin"):
        records = rng.integers(0, 256, (images, RECORD_BYTES), dtype=np.uint8)
        records[:, 0] = rng.integers(0, 10, images)
        (folder / name).write_bytes(records.tobytes())
    return folder


def write_checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    save_checkpoint(path, model_payload(ResNetCifar((4, 8, 16), 1), NORMALIZATION))
    return path


def write_run_config(folder: Path, *, schedule=("25s", "1h", "1d"), batch_size=512,
                     compensations=("none", "gdc", "bn"), backend="", program="", model="",
                     name="run.toml", out="run.h5") -> Path:
    """Write a small run's configuration, its checkpoint and its data into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "small.pt"
    if not checkpoint.exists():
        write_checkpoint(checkpoint)
    data = folder / "cifar"
    if not data.exists():
        write_cifar(data)
    times = ", ".join(f'"{time}"' for time in schedule)
    kinds = ", ".join(f'"{kind}"' for kind in compensations)
    text = f"""
[run]
out = "{out}"
seed = {SEED}
[model]
checkpoint = "small.pt"
{model}
[data]
cifar10_dir = "cifar"
test_images = 64
bn_calibration_images = 32
[backend]
geometry = [1, 64, 256]
{backend}
[program]
batch_size = {batch_size}
{program}
[schedule]
times = [{times}]
[evaluate]
compensations = [{kinds}]
batch_size = 64
"""
    path = folder / name
    path.write_text(text)
    return path


def hwctl_command(*args) -> list[str]:
    return [sys.executable, "-m", "hwctl", *map(str, args)]


def hwctl(*args, check=True, cwd=None) -> subprocess.CompletedProcess:
    """Run the real `hwctl` command and return its result."""
    result = subprocess.run(hwctl_command(*args), capture_output=True, text=True, cwd=cwd,
                            timeout=SUBPROCESS_TIMEOUT_S)
    if check and result.returncode != 0:
        raise AssertionError(f"hwctl {args} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def start_hwctl(*args, cwd=None) -> subprocess.Popen:
    """Start the real `hwctl` command in the background, its output going to files."""
    folder = Path(cwd or ".")
    return subprocess.Popen(hwctl_command(*args), cwd=cwd, stdout=open(folder / "stdout.txt", "a"),
                            stderr=open(folder / "stderr.txt", "a"))


def progress_of(path: Path):
    """Return the run file's progress as read from this process, or None if it is busy."""
    try:
        with RunFile.open(path) as run:
            return run.progress()
    except (RunFileError, OSError):
        return None


def wait_for(process: subprocess.Popen, path: Path, condition, timeout_s=SUBPROCESS_TIMEOUT_S):
    """Poll the run file until ``condition(progress)`` holds; return it, or None if the process ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return None
        progress = progress_of(path)
        if progress is not None and condition(progress):
            return progress
        time.sleep(0.01)
    process.kill()
    raise AssertionError(f"the run did not get there within {timeout_s} s")


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=SUBPROCESS_TIMEOUT_S)
    assert process.returncode == -signal.SIGKILL


def serve(*options, cwd=None) -> tuple[subprocess.Popen, str]:
    """Start `hwctl emulator serve` and return the process and the address it prints."""
    process = subprocess.Popen(
        hwctl_command("emulator", "serve", *options, "--geometry", "1x64x256", "--deadline-s", "600"),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=cwd,
    )
    address = process.stdout.readline().strip()
    assert address, "the emulator server printed no address"
    return process, address


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(timeout=30)


def events_of(path: Path) -> list:
    with RunFile.open(path) as run:
        return run.events()


def stored_results(path: Path) -> dict:
    """Return everything a run stores per device, per read and per evaluation."""
    with RunFile.open(path) as run:
        progress = run.progress()
        return {
            "program": run.program_results(),
            "mapping": run.mapping(),
            "remaps": run.remaps(),
            "reads": [run.read_g_us(index) for index in range(progress.reads_done)],
            "read_times": run.read_times(),
            "evaluations": run.evaluations(),
        }


def accepted(g_us: np.ndarray, targets_us: np.ndarray) -> np.ndarray:
    """Program-and-verify's acceptance test, restated from its default settings."""
    settings = ProgramVerifySettings()
    tolerance = np.maximum(settings.tolerance_us, settings.tolerance_relative * targets_us)
    return np.where(targets_us < settings.reset_level_us, g_us <= settings.reset_accept_us,
                    np.abs(g_us - targets_us) <= tolerance)


# ---------------------------------------------------------------------- in-process resumes


class SimulatedCrash(Exception):
    """Raised by a patched method to stop a run where a kill would."""


def crash_before_commit(monkeypatch, batch_number: int) -> None:
    """Make the ``batch_number``-th program commit raise, after staging and the chip's save."""
    original = RunFile.commit_program_batch
    calls = {"count": 0}

    def commit(self):
        calls["count"] += 1
        if calls["count"] == batch_number:
            raise SimulatedCrash()
        return original(self)

    monkeypatch.setattr(RunFile, "commit_program_batch", commit)


@pytest.fixture
def small_config(tmp_path):
    return load_config(write_run_config(tmp_path, schedule=("25s", "1h"), compensations=("none",)))


def test_staged_batch_committed_on_resume(tmp_path, monkeypatch, small_config):
    reference = small_config.model_copy(update={"run": small_config.run.model_copy(update={"out": tmp_path / "ref.h5"})})
    run_job(reference)

    with monkeypatch.context() as patch:
        crash_before_commit(patch, 4)
        with pytest.raises(SimulatedCrash):
            run_job(small_config)
    with RunFile.open(tmp_path / "run.h5") as run:
        in_flight = run.in_flight()
        assert in_flight is not None and in_flight.staged
        assert run.progress().devices_programmed == 3 * 512

    resume_job(tmp_path / "run.h5")
    kinds = [event.kind for event in events_of(tmp_path / "run.h5")]
    assert kinds.count("verify") == 1
    verify = next(event for event in events_of(tmp_path / "run.h5") if event.kind == "verify")
    assert "storing the staged results" in verify.message
    got, expected = stored_results(tmp_path / "run.h5"), stored_results(tmp_path / "ref.h5")
    for name, values in expected["program"].items():
        np.testing.assert_array_equal(got["program"][name], values, err_msg=name)
    for read, expected_read in zip(got["reads"], expected["reads"], strict=True):
        np.testing.assert_array_equal(read, expected_read)
    np.testing.assert_array_equal(got["remaps"], expected["remaps"])


def test_moved_chip_gets_verify_read(tmp_path, monkeypatch, small_config):
    with monkeypatch.context() as patch:
        crash_before_commit(patch, 3)
        with pytest.raises(SimulatedCrash):
            run_job(small_config)
    # The chip moved on after the batch (as a controller's real clock does), so its clock
    # proves nothing and every device of the batch is read once.
    state = tmp_path / "run.h5.chip.npz"
    with EmulatedChip(seed=SEED, geometry=small_chip_geometry(), state_path=state) as chip:
        chip.wait_s(10.0)
    with RunFile.open(tmp_path / "run.h5") as run:
        batch = run.in_flight()
        devices = run.mapping().device_ids()[batch.start : batch.stop]
        targets = run.target_us()[batch.start : batch.stop]
    # An independent copy of the chip predicts the verify read bit for bit.
    twin = EmulatedChip(seed=SEED, geometry=small_chip_geometry(), state_path=state)
    predicted = twin.read(devices)

    resume_job(tmp_path / "run.h5")
    verify = next(event for event in events_of(tmp_path / "run.h5") if event.kind == "verify")
    assert "a verify read kept" in verify.message
    with RunFile.open(tmp_path / "run.h5") as run:
        results = run.program_results(batch.start, batch.stop)
        assert run.is_complete
    kept_pairs = accepted(predicted, targets).reshape(-1, 2).all(axis=1)
    kept = np.repeat(kept_pairs, 2)
    assert 0 < kept_pairs.sum() < kept_pairs.size
    np.testing.assert_array_equal(results["final_g_us"][kept], predicted[kept])
    assert np.all(results["pulses"][kept] == 0)
    assert np.all(results["status"][kept] == DeviceStatus.CONVERGED)
    # Pairs that failed the verify read were programmed again, from a RESET.
    assert np.all(results["pulses"][~kept] >= 1)
    assert f"kept {kept_pairs.sum()} pairs" in verify.message


def small_chip_geometry():
    from hwctl.backend import Geometry

    return Geometry(1, 64, 256)


def test_complete_run_resume_changes_nothing(tmp_path, small_config):
    run_job(small_config)
    before = events_of(tmp_path / "run.h5")
    result = hwctl("run", "--resume", tmp_path / "run.h5")
    assert "run complete" in result.stdout
    assert events_of(tmp_path / "run.h5") == before


def test_resume_options_that_change_run_rejected(tmp_path):
    # The options are checked before the run file is opened, so any file will do here.
    run_path = tmp_path / "run.h5"
    run_path.write_bytes(b"run file")
    for option, value in (("--seed", "4"), ("--schedule", "1h"), ("--out", "other.h5")):
        result = hwctl("run", "--resume", run_path, option, value, check=False)
        assert result.returncode == 2, result.stderr
        assert option in result.stderr
        assert "stored configuration" in result.stderr
    config = write_run_config(tmp_path)
    result = hwctl("run", config, "--resume", run_path, check=False)
    assert result.returncode == 2
    assert "leave out the configuration file" in result.stderr


def test_existing_run_file_suggests_resume(tmp_path):
    config = write_run_config(tmp_path)
    (tmp_path / "run.h5").write_bytes(b"earlier run")
    result = hwctl("run", config, check=False)
    assert result.returncode == 2
    assert f"hwctl run --resume {tmp_path / 'run.h5'}" in result.stderr
    assert (tmp_path / "run.h5").read_bytes() == b"earlier run"


# ---------------------------------------------------------------------- over the wire


def test_killed_wire_run_verified_and_other_chip_rejected(tmp_path):
    config = write_run_config(tmp_path, schedule=("25s",), compensations=("none",))
    server, address = serve("--tcp", "127.0.0.1:0", "--seed", "11", cwd=tmp_path)
    other, other_address = serve("--tcp", "127.0.0.1:0", "--seed", "12", cwd=tmp_path)
    try:
        process = start_hwctl("run", config, "--backend", "visa", "--resource", address, cwd=tmp_path)
        # Kill in the middle of a batch: the controller has applied some of its pulses.
        reached = wait_for(process, tmp_path / "run.h5", lambda p: p.devices_programmed >= 2048)
        assert reached is not None, (tmp_path / "stderr.txt").read_text()[-2000:]
        time.sleep(0.05)
        kill(process)
        in_flight_before = RunFile.open(tmp_path / "run.h5").in_flight()

        refused = hwctl("run", "--resume", tmp_path / "run.h5", "--resource", other_address, check=False)
        assert refused.returncode == 2
        assert "seed12" in refused.stderr
        assert "seed11" in refused.stderr

        hwctl("run", "--resume", tmp_path / "run.h5", "--resource", address)
    finally:
        stop_server(server)
        stop_server(other)

    events = events_of(tmp_path / "run.h5")
    kinds = [event.kind for event in events]
    # The kill, then the refused resume: each a resume that ends in a stop.
    assert kinds.count("stop") == 2
    assert kinds.count("resume") == 2
    refusal = [event for event in events if event.kind == "stop"][1]
    assert "seed12" in refusal.message
    with RunFile.open(tmp_path / "run.h5") as run:
        assert run.is_complete
        assert run.clock_mode == "virtual"
        results = run.program_results()
        targets = run.target_us()
    assert in_flight_before is not None
    verify = [event for event in events if event.kind == "verify"]
    assert len(verify) == 1
    # A live controller moved its clock after the kill, so the batch was read back.
    assert "a verify read kept" in verify[0].message
    batch = slice(in_flight_before.start, in_flight_before.stop)
    kept = results["pulses"][batch] == 0
    assert kept.any()
    assert np.all(accepted(results["final_g_us"][batch][kept], targets[batch][kept]))
    assert np.mean(results["status"] == DeviceStatus.CONVERGED) > 0.99


def test_lost_chip_state_rejected(tmp_path, monkeypatch, small_config):
    with monkeypatch.context() as patch:
        crash_before_commit(patch, 2)
        with pytest.raises(SimulatedCrash):
            run_job(small_config)
    (tmp_path / "run.h5.chip.npz").unlink()
    # A new chip would look like the programmed one but hold none of its devices.
    with pytest.raises(RunFileError, match="state file .* does not exist"):
        resume_job(tmp_path / "run.h5")
    with RunFile.open(tmp_path / "run.h5") as run:
        assert run.progress().devices_programmed == 512
        assert run.events()[-1].kind == "stop"
