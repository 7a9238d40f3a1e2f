"""`hwctl check`: intact, incomplete, truncated and damaged run files, and files of other kinds."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch

from hwctl.checkpoint import model_payload, save_checkpoint
from hwctl.config import load_config
from hwctl.integrity import (
    EXIT_COMPLETE,
    EXIT_DAMAGED,
    EXIT_INCOMPLETE,
    check_run_file,
    lookup3,
    read_superblock,
    recover_run_file,
)
from hwctl.model import ResNetCifar
from hwctl.orchestrator import run_job
from hwctl.runfile import FORMAT_VERSION, RunFile, RunFileError
from test_resume import NORMALIZATION, hwctl, kill, start_hwctl, stored_results, wait_for, write_run_config


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("complete")
    config = write_run_config(folder, schedule=("25s", "1h", "1d"), compensations=("none", "gdc"))
    run_job(load_config(config))
    return folder / "run.h5"


def copy_of(path, folder, name="copy.h5"):
    target = folder / name
    shutil.copyfile(path, target)
    return target


def test_complete_file_passes(complete_run):
    result = hwctl("check", complete_run, check=False)
    assert result.returncode == EXIT_COMPLETE
    assert "intact" in result.stdout
    assert "run:        complete" in result.stdout
    report = json.loads(hwctl("check", complete_run, "--json", check=False).stdout)
    assert report["cursors"] == report["readable"]
    assert report["format_version"] == FORMAT_VERSION


def test_superblock_checksum_is_lookup3(complete_run):
    data = complete_run.read_bytes()[:48]
    assert read_superblock(complete_run).checksum_ok
    assert int.from_bytes(data[44:48], "little") == lookup3(data[:44])
    # Published test value of lookup3's hashlittle: "Four score and seven years ago", seed 0.
    assert lookup3(b"Four score and seven years ago") == 0x17770551


def test_killed_run_reported_incomplete(tmp_path):
    config = write_run_config(tmp_path, schedule=("25s",), compensations=("none",))
    process = start_hwctl("run", config, cwd=tmp_path)
    assert wait_for(process, tmp_path / "run.h5", lambda progress: progress.devices_programmed >= 2048)
    kill(process)

    result = hwctl("check", tmp_path / "run.h5", check=False)
    assert result.returncode == EXIT_INCOMPLETE, result.stdout
    assert "writer stopped without closing the file" in result.stdout
    assert "devices not programmed" in result.stdout
    assert f"hwctl run --resume {tmp_path / 'run.h5'}" in result.stdout
    # Checking changes nothing: the file still needs the recovery a resume does.
    assert read_superblock(tmp_path / "run.h5").flags

    # Both check and a resume detect a checkpoint of another model.
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    save_checkpoint(other, model_payload(ResNetCifar((4, 8, 16), 1), NORMALIZATION))
    result = hwctl("check", tmp_path / "run.h5", "--checkpoint", other, check=False)
    assert result.returncode == EXIT_DAMAGED
    assert "another model's run" in result.stdout
    shutil.copyfile(other, tmp_path / "small.pt")
    result = hwctl("run", "--resume", tmp_path / "run.h5", check=False)
    assert result.returncode == 2
    assert "has changed since" in result.stderr
    assert "restore the original checkpoint" in result.stderr


@pytest.mark.parametrize("fraction", [0.98, 0.9, 0.6])
def test_truncated_file_salvaged(tmp_path, complete_run, fraction):
    damaged = copy_of(complete_run, tmp_path)
    with open(damaged, "r+b") as stream:
        stream.truncate(int(damaged.stat().st_size * fraction))

    report = check_run_file(damaged)
    assert report.exit_code == EXIT_DAMAGED
    assert any("truncated" in problem for problem in report.problems)
    assert all(report.readable[name] <= report.cursors[name] for name in report.cursors)

    recovered = tmp_path / "recovered.h5"
    recover_run_file(damaged, recovered)
    assert check_run_file(recovered).intact
    # What was recovered is the original's data, from the start of every table.
    original, got = stored_results(complete_run), stored_results(recovered)
    devices = report.readable["devices"]
    for name, values in got["program"].items():
        np.testing.assert_array_equal(values, original["program"][name][:devices], err_msg=name)
    for read, expected in zip(got["reads"], original["reads"]):
        np.testing.assert_array_equal(read, expected)
    kept = original["evaluations"][original["evaluations"]["read_index"] < len(got["reads"])]
    np.testing.assert_array_equal(got["evaluations"], kept[: len(got["evaluations"])])
    with RunFile.open(recovered) as run:
        kinds = [event.kind for event in run.events()]
    assert kinds[-1] == "recovered"


def test_damaged_chunk_found(tmp_path, complete_run):
    damaged = copy_of(complete_run, tmp_path)
    with h5py.File(damaged, "r") as h5:
        chunk = h5["reads/g_us"].id.get_chunk_info_by_coord((1, 0))
    with open(damaged, "r+b") as stream:
        stream.seek(chunk.byte_offset + chunk.size // 2)
        stream.write(b"\x00\xff" * 8)

    result = hwctl("check", damaged, check=False)
    assert result.returncode == EXIT_DAMAGED
    assert "reads: only 1 of the 3 stored are readable" in result.stdout
    report = check_run_file(damaged)
    assert report.readable["devices"] == report.cursors["devices"]
    assert report.readable["evaluations"] == report.cursors["evaluations"]

    hwctl("check", damaged, "--recover", tmp_path / "recovered.h5", check=False)
    with RunFile.open(tmp_path / "recovered.h5") as run:
        assert run.progress().reads_done == 1
        assert not run.is_complete
        np.testing.assert_array_equal(run.read_g_us(0), stored_results(complete_run)["reads"][0])
        assert set(run.evaluations()["read_index"]) == {0}


def test_other_files_rejected_clearly(tmp_path, complete_run):
    text = tmp_path / "notes.txt"
    text.write_text("not a run")
    result = hwctl("check", text, check=False)
    assert result.returncode == 2
    assert "is not an HDF5 file" in result.stderr

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5:
        h5["data"] = np.arange(3)
    with pytest.raises(RunFileError, match="not a hwctl run file"):
        check_run_file(other)

    newer = copy_of(complete_run, tmp_path, "newer.h5")
    with h5py.File(newer, "r+") as h5:
        h5.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(RunFileError, match=f"format version {FORMAT_VERSION + 1}"):
        check_run_file(newer)

    broken = copy_of(complete_run, tmp_path, "broken.h5")
    with open(broken, "r+b") as stream:
        stream.seek(20)
        stream.write(b"\x01")
    with pytest.raises(RunFileError, match="damaged HDF5 superblock"):
        check_run_file(broken)


def test_recover_never_overwrites(tmp_path, complete_run):
    target = tmp_path / "taken.h5"
    target.write_bytes(b"keep me")
    with pytest.raises(RunFileError, match="already exists"):
        recover_run_file(complete_run, target)
    assert target.read_bytes() == b"keep me"
