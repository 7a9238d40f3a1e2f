"""The main job through the real `hwctl` command: a small network on the emulated chip.

The small network (widths 4/8/16, one block per stage) keeps each run to seconds; the
reference network's figures are measured by `make run` and the benchmark.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hwctl.checkpoint import model_payload, save_checkpoint
from hwctl.model import ResNetCifar, analog_weight_count
from hwctl.runfile import RunFile

NORMALIZATION = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def hwctl(*args, env_extra=None, check=True):
    env = dict(os.environ, **(env_extra or {}))
    result = subprocess.run([sys.executable, "-m", "hwctl", *map(str, args)],
                            capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"hwctl {args} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


@pytest.fixture
def small_checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    model = ResNetCifar((4, 8, 16), 1)
    path = tmp_path / "small.pt"
    save_checkpoint(path, model_payload(model, NORMALIZATION))
    return path


def write_config(folder: Path, checkpoint: Path, cifar10_dir: Path | None, extra: str = "") -> Path:
    data = f'cifar10_dir = "{cifar10_dir}"' if cifar10_dir else ""
    text = f"""
[run]
out = "run.h5"
seed = 3
[model]
checkpoint = "{checkpoint}"
[data]
{data}
test_images = 200
bn_calibration_images = 200
[schedule]
times = ["25s", "1h", "1d"]
{extra}
"""
    path = folder / "run.toml"
    path.write_text(text)
    return path


def test_run_writes_complete_file_and_summary(tmp_path, small_checkpoint, cifar10_dir):
    config = write_config(tmp_path, small_checkpoint, cifar10_dir)
    hwctl("run", config)
    run_path = tmp_path / "run.h5"

    summary = json.loads(hwctl("summary", run_path, "--json").stdout)
    weights = analog_weight_count(ResNetCifar((4, 8, 16), 1))
    assert summary["weights"] == weights
    assert summary["devices"] == 2 * weights
    assert summary["complete"] is True
    assert summary["converged_fraction"] >= 0.99
    assert 0.0 <= summary["float_accuracy"] <= 1.0
    entries = {(row["time_s"], row["compensation"]) for row in summary["accuracy"]}
    assert entries == {(t, c) for t in (25.0, 3600.0, 86400.0) for c in ("none", "gdc", "bn")}

    with RunFile.open(run_path) as run:
        times = run.read_times()
        np.testing.assert_array_equal(times["time_s"], [25.0, 3600.0, 86400.0])
        assert np.all(times["actual_time_s"] >= times["time_s"])
        assert np.all(np.isfinite(times["temperature_c"]))
        # Drift lowers every later read: the summed conductance only falls.
        sums = [run.read_g_us(i).sum() for i in range(3)]
        assert sums[0] > sums[1] > sums[2]


def test_report_writes_three_pngs(tmp_path, small_checkpoint, cifar10_dir):
    config = write_config(tmp_path, small_checkpoint, cifar10_dir)
    hwctl("run", config, "--schedule", "25s,1d", "--images", "50")
    listed = hwctl("report", tmp_path / "run.h5", "--out", tmp_path / "plots").stdout.split()
    assert len(listed) == 3
    for name in listed:
        assert Path(name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_steps_one_at_a_time_match_whole_run(tmp_path, small_checkpoint, cifar10_dir):
    whole = tmp_path / "whole"
    steps = tmp_path / "steps"
    whole.mkdir()
    steps.mkdir()
    hwctl("run", write_config(whole, small_checkpoint, cifar10_dir), "--schedule", "25s,1h")
    config = write_config(steps, small_checkpoint, cifar10_dir)
    hwctl("program", config)
    hwctl("read", steps / "run.h5", "--schedule", "25s,1h")
    hwctl("evaluate", steps / "run.h5")

    with RunFile.open(whole / "run.h5") as a, RunFile.open(steps / "run.h5") as b:
        np.testing.assert_array_equal(a.program_results()["final_g_us"], b.program_results()["final_g_us"])
        for index in range(2):
            np.testing.assert_array_equal(a.read_g_us(index), b.read_g_us(index))
        np.testing.assert_array_equal(a.evaluations()["correct"], b.evaluations()["correct"])


def test_same_seed_same_result_other_seed_differs(tmp_path, small_checkpoint, cifar10_dir):
    config = write_config(tmp_path, small_checkpoint, cifar10_dir)
    reads = []
    for seed, name in ((3, "a.h5"), (3, "b.h5"), (4, "c.h5")):
        hwctl("program", config, "--seed", seed, "--out", tmp_path / name)
        with RunFile.open(tmp_path / name) as run:
            reads.append(run.program_results()["final_g_us"])
    np.testing.assert_array_equal(reads[0], reads[1])
    assert not np.array_equal(reads[0], reads[2])


# Bad input: a clear message naming the value and the fix, exit status 2, and no run file.

def assert_rejected(result, *fragments):
    assert result.returncode == 2, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_misspelled_key_rejected(tmp_path, small_checkpoint, cifar10_dir):
    config = write_config(tmp_path, small_checkpoint, cifar10_dir, "[program]\ntolernce_us = 0.5\n")
    assert_rejected(hwctl("run", config, check=False), "tolernce_us", "did you mean 'tolerance_us'")
    assert not (tmp_path / "run.h5").exists()


def test_unknown_schedule_unit_rejected(tmp_path, small_checkpoint, cifar10_dir):
    config = write_config(tmp_path, small_checkpoint, cifar10_dir)
    result = hwctl("run", config, "--schedule", "25s,3fortnights", check=False)
    assert_rejected(result, "fortnights", "--schedule")
    assert not (tmp_path / "run.h5").exists()


def test_folder_without_cifar10_rejected(tmp_path, small_checkpoint):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = write_config(tmp_path, small_checkpoint, empty)
    assert_rejected(hwctl("run", config, check=False), str(empty), "HWCTL_CIFAR10_DIR")
    assert not (tmp_path / "run.h5").exists()


def test_nan_checkpoint_rejected(tmp_path, cifar10_dir):
    model = ResNetCifar((4, 8, 16), 1)
    with torch.no_grad():
        model.layer2[0].conv2.weight[0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pt"
    save_checkpoint(path, model_payload(model, NORMALIZATION))
    config = write_config(tmp_path, path, cifar10_dir)
    assert_rejected(hwctl("run", config, check=False), "layer2.0.conv2.weight", "NaN")
    assert not (tmp_path / "run.h5").exists()


def test_network_larger_than_chip_rejected(tmp_path, cifar10_dir):
    model = ResNetCifar((48, 96, 192), 5)  # about 2.7 million weights, the chip has room for 524,288 pairs
    path = tmp_path / "wide.pt"
    save_checkpoint(path, model_payload(model, NORMALIZATION))
    config = write_config(tmp_path, path, cifar10_dir)
    result = hwctl("run", config, check=False)
    assert_rejected(result, f"{analog_weight_count(model)} pairs", "1048576 devices")
    assert not (tmp_path / "run.h5").exists()


def test_existing_run_file_kept_without_force(tmp_path, small_checkpoint, cifar10_dir):
    config = write_config(tmp_path, small_checkpoint, cifar10_dir)
    (tmp_path / "run.h5").write_bytes(b"earlier data")
    assert_rejected(hwctl("run", config, check=False), "--force")
    assert (tmp_path / "run.h5").read_bytes() == b"earlier data"


def test_read_without_chip_state_rejected(tmp_path, small_checkpoint, cifar10_dir):
    config = write_config(tmp_path, small_checkpoint, cifar10_dir)
    hwctl("program", config)
    state = tmp_path / "run.h5.chip.npz"
    state.rename(tmp_path / "elsewhere.npz")
    assert_rejected(hwctl("read", tmp_path / "run.h5", check=False), str(state), "restore")
    with RunFile.open(tmp_path / "run.h5") as run:
        assert run.progress().reads_done == 0


def test_failed_force_keeps_chip_state(tmp_path, small_checkpoint, cifar10_dir):
    config = write_config(tmp_path, small_checkpoint, cifar10_dir)
    hwctl("program", config)
    state = tmp_path / "run.h5.chip.npz"
    before = state.read_bytes()
    wide = tmp_path / "wide.pt"
    save_checkpoint(wide, model_payload(ResNetCifar((48, 96, 192), 5), NORMALIZATION))
    text = (tmp_path / "run.toml").read_text().replace(str(small_checkpoint), str(wide))
    (tmp_path / "wide.toml").write_text(text)
    assert_rejected(hwctl("run", tmp_path / "wide.toml", "--force", check=False), "pairs")
    assert state.read_bytes() == before


def test_steps_mark_run_complete(tmp_path, small_checkpoint, cifar10_dir):
    config = write_config(tmp_path, small_checkpoint, cifar10_dir)
    hwctl("program", config, "--schedule", "25s")
    assert_rejected(hwctl("evaluate", tmp_path / "run.h5", check=False), "no reads")
    hwctl("read", tmp_path / "run.h5")
    hwctl("evaluate", tmp_path / "run.h5")
    with RunFile.open(tmp_path / "run.h5") as run:
        assert run.is_complete
