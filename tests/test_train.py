import json
import math

import pytest
import torch

from hwctl.checkpoint import load_checkpoint
from hwctl.model import analog_layers, resnet32
from hwctl.train import clip_weights, learning_rate_at, TrainSettings, weight_noise
from test_main_job import hwctl


def test_weight_noise_scales_with_layer_max_and_restores():
    model = resnet32()
    clean = {name: module.weight.detach().clone() for name, module in analog_layers(model)}
    generator = torch.Generator().manual_seed(0)
    with weight_noise(model, 0.038, generator):
        for name, module in analog_layers(model):
            if name == "linear":
                continue  # its max |W| also covers the bias
            noise = module.weight.detach() - clean[name]
            expected = 0.038 * float(clean[name].abs().max())
            assert float(noise.std()) == pytest.approx(expected, rel=0.15)
    for name, module in analog_layers(model):
        assert torch.equal(module.weight.detach(), clean[name])


def test_clip_bounds_each_layer_by_its_std():
    model = resnet32()
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = 10.0
    bounds = {name: 2.5 * float(module.weight.detach().std()) for name, module in analog_layers(model)}
    clip_weights(model, 2.5)
    for name, module in analog_layers(model):
        assert float(module.weight.detach().abs().max()) == pytest.approx(bounds[name], rel=1e-6)


def test_learning_rate_warms_up_then_decays_to_zero():
    settings = TrainSettings(data_dir=None, out="x.pt", epochs=4, learning_rate=0.1, warmup_epochs=1)
    steps = 10
    rates = [learning_rate_at(settings, step, steps) for step in range(40)]
    assert rates[0] == pytest.approx(0.01)
    assert rates[9] == pytest.approx(0.1)
    assert max(rates) == pytest.approx(0.1)
    assert rates[-1] == pytest.approx(0.5 * 0.1 * (1 + math.cos(math.pi * 30 / 30)), abs=1e-3)


def test_train_resume_matches_uninterrupted(tmp_path, cifar10_dir):
    common = ["train", "--data", cifar10_dir, "--train-images", "256", "--test-images", "100",
              "--batch-size", "64", "--epochs", "2", "--seed", "5"]
    hwctl(*common, "--out", tmp_path / "straight.pt")
    hwctl(*common[:-4], "--epochs", "1", "--seed", "5", "--out", tmp_path / "split.pt")
    # The second call trains epoch 2 of a 2-epoch schedule from the epoch-1 checkpoint.
    hwctl(*common, "--out", tmp_path / "split.pt", "--resume")

    straight, straight_info = load_checkpoint(tmp_path / "straight.pt")
    split, split_info = load_checkpoint(tmp_path / "split.pt")
    assert split_info["training"]["progress"]["epoch"] == 2
    for key, tensor in straight.state_dict().items():
        torch.testing.assert_close(split.state_dict()[key], tensor, msg=key)
    assert json.loads(json.dumps(split_info["training"]["progress"]["history"]))[-1]["epoch"] == 2
