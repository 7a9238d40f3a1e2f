"""`hwctl run` over VISA TCP and over a serial pseudo-terminal gives the in-process results.

The emulator is served by a real `hwctl emulator serve` process on loopback or on a pty, and
the run drives it through pyvisa-py or pyserial, byte for byte as it would drive a controller.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch

from hwctl.checkpoint import model_payload, save_checkpoint
from hwctl.model import ResNetCifar
from hwctl.runfile import RunFile
from test_main_job import NORMALIZATION, hwctl, write_config

SEED = 11


@pytest.fixture
def small_config(tmp_path, cifar10_dir):
    torch.manual_seed(1)
    checkpoint = tmp_path / "small.pt"
    save_checkpoint(checkpoint, model_payload(ResNetCifar((4, 8, 16), 1), NORMALIZATION))
    return write_config(tmp_path, checkpoint, cifar10_dir, "[evaluate]\nbatch_size = 200\n")


def serve(*mode):
    """Start `hwctl emulator serve` and return the process and the first line it prints."""
    process = subprocess.Popen(
        [sys.executable, "-m", "hwctl", "emulator", "serve", *mode, "--seed", str(SEED),
         "--deadline-s", "300"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    line = process.stdout.readline().strip()
    if not line:
        process.kill()
        raise AssertionError(f"emulator server printed nothing: {process.stderr.read()[-2000:]}")
    return process, line


def run_results(path):
    with RunFile.open(path) as run:
        return (
            run.program_results(),
            [run.read_g_us(index) for index in range(run.progress().reads_done)],
            run.evaluations()["correct"],
            run.remaps(),
        )


def assert_identical(got, expected):
    program, reads, correct, remaps = got
    for name, values in expected[0].items():
        np.testing.assert_array_equal(program[name], values, err_msg=name)
    assert len(reads) == len(expected[1])
    for read, expected_read in zip(reads, expected[1]):
        np.testing.assert_array_equal(read, expected_read)
    np.testing.assert_array_equal(correct, expected[2])
    np.testing.assert_array_equal(remaps, expected[3])


@pytest.mark.parametrize("transport", ["visa", "serial"])
def test_wire_run_matches_in_process(tmp_path, small_config, transport):
    hwctl("run", small_config, "--seed", SEED, "--schedule", "25s,1d", "--out", tmp_path / "local.h5")

    mode = ("--tcp", "127.0.0.1:0") if transport == "visa" else ("--pty",)
    server, address = serve(*mode)
    try:
        option = "--resource" if transport == "visa" else "--port"
        hwctl("run", small_config, "--seed", SEED, "--schedule", "25s,1d",
              "--out", tmp_path / "wire.h5", "--backend", transport, option, address)
    finally:
        server.terminate()
        server.wait(timeout=30)

    assert_identical(run_results(tmp_path / "wire.h5"), run_results(tmp_path / "local.h5"))
