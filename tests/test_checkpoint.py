import numpy as np
import pytest
import torch

from hwctl.checkpoint import CheckpointError, load_checkpoint, model_payload, save_checkpoint
from hwctl.cifar import Normalizer, load_split, locate_cifar10
from hwctl.evaluate import accuracy
from hwctl.model import resnet32

NORMALIZATION = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    model = resnet32()
    path = tmp_path / "net.pt"
    save_checkpoint(path, model_payload(model, NORMALIZATION, float_accuracy=0.9))
    loaded, info = load_checkpoint(path)
    for key, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], tensor)
    assert info["float_accuracy"] == 0.9
    assert info["architecture"]["widths"] == [16, 28, 56]
    assert len(info["sha256"]) == 64


def test_nan_weight_rejected_with_tensor_name(tmp_path):
    state = resnet32().state_dict()
    state["layer2.1.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save({"state_dict": state}, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="layer2.1.conv1.weight"):
        load_checkpoint(tmp_path / "nan.pt")


def test_missing_tensor_rejected(tmp_path):
    state = resnet32().state_dict()
    del state["layer3.4.bn2.running_var"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="layer3.4.bn2.running_var"):
        load_checkpoint(tmp_path / "partial.pt")


def test_pickled_model_object_rejected(tmp_path):
    torch.save(resnet32(), tmp_path / "object.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(tmp_path / "object.pt")


def test_not_a_checkpoint_rejected(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot load"):
        load_checkpoint(tmp_path / "junk.pt")


def test_third_party_checkpoint_published_accuracy(third_party_checkpoint, cifar10_dir):
    model, info = load_checkpoint(third_party_checkpoint)
    assert info["architecture"] == {
        "widths": [16, 32, 64], "blocks_per_stage": 5, "num_classes": 10, "shortcut": "pad"
    }
    images, labels = load_split(locate_cifar10(cifar10_dir), "test", limit=1000)
    measured = accuracy(model, images, labels, Normalizer(**info["normalization"]))
    # Published test accuracy 92.63 % on all 10,000 images; 1,000 images give a binomial
    # standard error of about 0.8 points, so allow 3 of them.
    assert abs(measured - 0.9263) < 0.025
