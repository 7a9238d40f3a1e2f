import pickle

import numpy as np
import pytest
import torch

from hwctl.cifar import (
    ENV_VAR,
    DatasetError,
    Normalizer,
    augment,
    load_split,
    locate_cifar10,
)


def _records(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, count)


def _write_binary(folder, name, images, labels):
    records = np.concatenate([labels[:, None].astype(np.uint8), images.reshape(len(images), -1)], 1)
    records.tofile(folder / name)


def _write_layout(folder, layout: str):
    folder.mkdir(parents=True)
    written = {}
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        images, labels = _records(7, index)
        written[name] = (images, labels)
        if layout == "binary":
            _write_binary(folder, name + ".bin", images, labels)
        else:
            batch = {b"data": images.reshape(7, -1), b"labels": labels.tolist()}
            (folder / name).write_bytes(pickle.dumps(batch))
    return written


@pytest.mark.parametrize("layout", ["binary", "python"])
def test_both_layouts_read_same_records(tmp_path, layout):
    folder = {"binary": "cifar-10-batches-bin", "python": "cifar-10-batches-py"}[layout]
    written = _write_layout(tmp_path / folder, layout)
    source = locate_cifar10(tmp_path)
    assert source.layout == layout
    images, labels = load_split(source, "test")
    np.testing.assert_array_equal(images, written["test_batch"][0])
    np.testing.assert_array_equal(labels, written["test_batch"][1])
    train_images, _ = load_split(source, "train", limit=10)
    np.testing.assert_array_equal(train_images[7:], written["data_batch_2"][0][:3])


def test_folder_from_environment(tmp_path, monkeypatch):
    _write_layout(tmp_path / "bin", "binary")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "bin"))
    assert locate_cifar10().folder == tmp_path / "bin"


def test_missing_folder_names_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(DatasetError, match=ENV_VAR):
        locate_cifar10()
    with pytest.raises(DatasetError, match="no CIFAR-10 files"):
        locate_cifar10(tmp_path)


def test_truncated_binary_file_rejected(tmp_path):
    _write_layout(tmp_path / "bin", "binary")
    path = tmp_path / "bin" / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match="truncated"):
        load_split(locate_cifar10(tmp_path / "bin"), "test")


def test_augment_is_crop_of_padded_image():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).view(2, 3, 32, 32).to(torch.uint8)
    out = augment(images, torch.Generator().manual_seed(3))
    assert out.shape == images.shape
    # Every output row must be a (possibly flipped) window of an input row or zero padding.
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for index in range(2):
        found = any(
            torch.equal(out[index], padded[index, :, y : y + 32, x : x + 32])
            or torch.equal(out[index], padded[index, :, y : y + 32, x : x + 32].flip(-1))
            for y in range(9)
            for x in range(9)
        )
        assert found


def test_normalizer_maps_mean_to_zero():
    norm = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    pixels = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    torch.testing.assert_close(norm(pixels), torch.full((1, 3, 2, 2), 2.0))


def test_real_cifar10_class_counts(cifar10_dir):
    _, labels = load_split(locate_cifar10(cifar10_dir), "test")
    assert len(labels) == 10_000
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 1000))


def test_real_cifar10_channel_means(cifar10_dir):
    images, _ = load_split(locate_cifar10(cifar10_dir), "train", limit=10_000)
    means = images.reshape(len(images), 3, -1).mean(axis=(0, 2)) / 255.0
    # Published training-set channel means of CIFAR-10; a 10,000-image sample is within 0.01.
    np.testing.assert_allclose(means, [0.4914, 0.4822, 0.4465], atol=0.01)
