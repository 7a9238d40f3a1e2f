import numpy as np
import pytest

from hwctl.allocation import AllocationError, allocate, layer_values
from hwctl.backend import Geometry
from hwctl.model import ResNetCifar, analog_layers, resnet32

CHIP = Geometry(arrays=1, rows=512, cols=2048)


def test_reference_network_fits_one_array():
    model = resnet32()
    allocation = allocate(model, CHIP)
    assert allocation.pairs == 361_722
    devices = np.concatenate([allocation.device_plus, allocation.device_minus])
    assert len(np.unique(devices)) == 723_444
    assert devices.max() < CHIP.devices


def test_pairs_share_a_word_line():
    allocation = allocate(resnet32(), CHIP)
    assert np.all(allocation.device_plus // CHIP.cols == allocation.device_minus // CHIP.cols)
    assert np.all(allocation.device_plus % 2 == 0)


def test_target_weights_reproduce_layers():
    model = resnet32()
    allocation = allocate(model, CHIP)
    for slot, (name, module) in zip(allocation.layers, analog_layers(model)):
        assert slot.name == name
        pairs = slice(slot.first_pair, slot.first_pair + slot.pair_count)
        rebuilt = np.empty(slot.pair_count, dtype=np.float32)
        rebuilt[allocation.weight_index[pairs]] = allocation.target_weight[pairs]
        np.testing.assert_array_equal(rebuilt, layer_values(module))
        assert slot.w_max == pytest.approx(float(np.abs(rebuilt).max()))


def test_allocation_is_deterministic():
    model = resnet32()
    first, second = allocate(model, CHIP), allocate(model, CHIP)
    np.testing.assert_array_equal(first.device_plus, second.device_plus)


def test_too_many_weights_rejected_with_counts():
    small = Geometry(arrays=1, rows=64, cols=256)
    with pytest.raises(AllocationError, match=r"361722 pairs \(723444 devices"):
        allocate(resnet32(), small)


def test_layer_subset_and_unknown_layer():
    model = ResNetCifar((4, 8, 16), 1)
    allocation = allocate(model, CHIP, ["linear"])
    assert allocation.pairs == 16 * 10 + 10
    with pytest.raises(AllocationError, match="linaer"):
        allocate(model, CHIP, ["linaer"])
