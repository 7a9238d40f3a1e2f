"""Pairs whose devices fail program-and-verify move to spare word lines before they are stored."""

import numpy as np
import pytest
import torch

from hwctl.allocation import allocate, spare_word_lines
from hwctl.config import parse_config_text
from hwctl.orchestrator import Network, SparePool, create_run_file, program_step
from hwctl.model import ResNetCifar
from hwctl.runfile import RunFile, RunFileError
from protocols.program_verify import DeviceStatus
from sim_backend.chip import STUCK_HIGH, EmulatedChip


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    model = ResNetCifar((4, 8, 16), 1)
    chip = EmulatedChip(seed=2, stuck_fraction=0.05)
    allocation = allocate(model, chip.geometry())
    network = Network(model, {"path": "small.pt", "sha256": "0" * 64,
                              "architecture": model.architecture()}, allocation)
    config = parse_config_text(f'[run]\nout = "{tmp_path / "run.h5"}"\n[program]\nbatch_size = 4096\n')
    run = create_run_file(config, chip, network, overwrite=False)
    yield config, chip, network, run
    run.close()


def test_failed_pairs_move_to_spares(setup):
    config, chip, network, run = setup
    program_step(config, chip, run, network)

    remaps = run.remaps()
    assert len(remaps) > 0
    mapping = run.mapping()
    devices = np.concatenate([mapping.device_plus, mapping.device_minus])
    assert len(np.unique(devices)) == len(devices)
    # Every moved pair now sits on a spare word line, in the order the pool hands them out.
    spare_rows = spare_word_lines(network.allocation, chip.geometry())
    assert np.isin(mapping.device_plus[remaps["pair"]] // chip.geometry().cols, spare_rows).all()
    pool = SparePool(network.allocation, chip.geometry())
    np.testing.assert_array_equal(remaps["new_plus"], pool.plus[: len(remaps)])
    # The devices a pair left are stuck or failed ones.
    left = np.concatenate([remaps["old_plus"], remaps["old_minus"]])
    assert np.count_nonzero(chip.stuck_kind(left)) > 0


def test_spares_lift_convergence(setup):
    config, chip, network, run = setup
    program_step(config, chip, run, network)
    status = run.program_results()["status"]
    nonzero = run.target_us() > 0
    # With 5 % stuck devices about 10 % of pairs hold one; two moves leave about 0.1 %.
    assert np.mean(status[nonzero] == DeviceStatus.CONVERGED) > 0.99
    # A device stuck near zero can still hold a zero target, but one stuck high cannot
    # converge, so after two moves none is left in this small run.
    kinds = chip.stuck_kind(run.mapping().device_ids())
    assert np.count_nonzero(kinds == STUCK_HIGH) == 0


def test_stored_pair_cannot_move(setup):
    config, chip, network, run = setup
    program_step(config, chip, run, network)
    pool = SparePool(network.allocation, chip.geometry())
    plus = pool.plus[-1:]
    with pytest.raises(RunFileError, match="already stored"):
        run.remap_pairs(np.array([0]), plus, plus + 1)


def test_spare_in_use_rejected(setup):
    config, chip, network, run = setup
    mapping = run.mapping()
    with pytest.raises(RunFileError, match="already holds a pair"):
        run.remap_pairs(np.array([5]), mapping.device_plus[7:8], np.array([10**6]))
