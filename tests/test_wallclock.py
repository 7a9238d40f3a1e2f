"""Reads on wall-clock time: the emulator's wall clock, waiting for a read, and temperatures."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest

from calibration.params import load_params
from hwctl.backend import Backend, Geometry
from hwctl.clock import ClockError, clock_is_virtual, wait_until
from hwctl.config import load_config
from hwctl.orchestrator import run_job
from hwctl.runfile import RunFile
from sim_backend import physics
from sim_backend.chip import EmulatedChip
from test_resume import hwctl, serve, stop_server, write_run_config

SMALL = Geometry(1, 8, 64)
DEFAULT_PARAMS = Path(__file__).resolve().parents[1] / "calibration" / "data" / "pcm_default.toml"


def test_wall_clock_chip_follows_host(tmp_path):
    state = tmp_path / "chip.npz"
    chip = EmulatedChip(seed=1, geometry=SMALL, state_path=state, clock="wall")
    assert not clock_is_virtual(chip)
    start_s = chip.clock_s()
    time.sleep(0.2)
    assert chip.clock_s() - start_s >= 0.2

    host_s = time.monotonic()
    before_s = chip.clock_s()
    chip.wait_s(0.3)
    assert time.monotonic() - host_s >= 0.3
    assert chip.clock_s() - before_s >= 0.3
    chip.close()
    saved_s = chip.clock_s()

    # A chip reloaded later counts the time no process held it, as a real chip would.
    time.sleep(0.3)
    with EmulatedChip(seed=1, geometry=SMALL, state_path=state, clock="wall") as again:
        assert again.clock_s() - saved_s >= 0.3
    # On virtual time the same state file continues from its saved clock and stays there.
    virtual = EmulatedChip(seed=1, geometry=SMALL, state_path=state)
    loaded_s = virtual.clock_s()
    assert loaded_s - saved_s >= 0.3
    time.sleep(0.1)
    assert virtual.clock_s() == loaded_s


def test_wait_on_virtual_clock_is_one_jump():
    chip = EmulatedChip(seed=1, geometry=SMALL)
    assert clock_is_virtual(chip)
    target_s = chip.clock_s() + 86400.0
    assert wait_until(chip, target_s)
    assert chip.clock_s() == pytest.approx(target_s, abs=1e-9)


def test_wait_on_wall_clock_reaches_target_or_stops():
    chip = EmulatedChip(seed=1, geometry=SMALL, clock="wall")
    target_s = chip.clock_s() + 0.5
    polls = []
    assert wait_until(chip, target_s, on_poll=lambda: polls.append(chip.clock_s()), poll_s=0.1)
    assert chip.clock_s() >= target_s
    assert len(polls) >= 4

    far_s = chip.clock_s() + 60.0
    asked = time.monotonic()
    assert not wait_until(chip, far_s, should_stop=lambda: time.monotonic() - asked > 0.3, poll_s=0.1)
    assert chip.clock_s() < far_s


class StalledClock(Backend):
    """A real-clock backend whose clock never moves.

    No real part here has a broken clock, so this stand-in is the one mock of this file.
    """

    def identity(self): ...
    def geometry(self): ...
    def limits(self): ...
    def clock_s(self) -> float:
        return 10.0
    def apply_pulses(self, *args): ...
    def read(self, device_ids): ...
    def wait_s(self, duration_s): ...
    def temperature_c(self): ...


def test_stalled_real_clock_raises():
    with pytest.raises(ClockError, match="still 1.0 s short"):
        wait_until(StalledClock(), 11.0, poll_s=0.001)


def test_reads_record_chip_temperature(tmp_path):
    params_text = DEFAULT_PARAMS.read_text()
    params_text = re.sub(r"(?m)^wander_c = .*$", "wander_c = 2.0", params_text)
    params_text = re.sub(r"(?m)^wander_period_s = .*$", "wander_period_s = 7200.0", params_text)
    (tmp_path / "warm.toml").write_text(params_text)
    config = write_run_config(tmp_path, schedule=("25s", "20min", "40min"), compensations=("none",),
                              backend='calibration_file = "warm.toml"')
    run_job(load_config(config))

    params = load_params(tmp_path / "warm.toml")
    with RunFile.open(tmp_path / "run.h5") as run:
        reads = run.read_times()
    expected = [physics.temperature_c(params, clock_s) for clock_s in reads["chip_clock_s"]]
    # The temperature is taken right after each read, some milliseconds of chip time later.
    np.testing.assert_allclose(reads["temperature_c"], expected, atol=1e-3)
    assert np.ptp(reads["temperature_c"]) > 1.0


def test_wall_clock_controller_reads_on_time(tmp_path):
    config = write_run_config(tmp_path, schedule=("1s", "2s"), compensations=("none",),
                              model='layers = ["linear"]', batch_size=340,
                              program="max_iterations = 5\nfailure_budget = 1.0")
    server, address = serve("--tcp", "127.0.0.1:0", "--seed", "3", "--wall-clock", cwd=tmp_path)
    try:
        hwctl("run", config, "--backend", "visa", "--resource", address)
    finally:
        stop_server(server)
    with RunFile.open(tmp_path / "run.h5") as run:
        assert run.clock_mode == "real"
        reads = run.read_times()
    np.testing.assert_array_equal(reads["time_s"], [1.0, 2.0])
    # Each read began at its time after programming, on the controller's clock and the host's.
    assert np.all(reads["actual_time_s"] >= reads["time_s"])
    assert np.all(reads["actual_time_s"] < reads["time_s"] + 0.5)
    assert abs(np.diff(reads["wall_time"])[0] - 1.0) < 0.5
