"""CIFAR-10 reader for the official binary and python layouts, and the batch transforms.

Binary layout (`cifar-10-batches-bin`): records of one label byte and 3,072 pixel bytes, the red,
green and blue 32×32 planes row by row. Python layout (`cifar-10-batches-py`): pickled dicts with
`data` (N×3072 uint8, the same plane order) and `labels`.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

ENV_VAR = "HWCTL_CIFAR10_DIR"
IMAGE_SHAPE = (3, 32, 32)
RECORD_BYTES = 1 + 3 * 32 * 32
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
NUM_CLASSES = 10


class DatasetError(ValueError):
    """The CIFAR-10 folder is missing, incomplete or damaged."""


@dataclass(frozen=True)
class Cifar10Source:
    """A CIFAR-10 folder and its layout, ``"binary"`` or ``"python"``."""

    folder: Path
    layout: str

    def split_files(self, split: str) -> list[Path]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        names = TRAIN_FILES if split == "train" else TEST_FILES
        suffix = ".bin" if self.layout == "binary" else ""
        return [self.folder / (name + suffix) for name in names]


def locate_cifar10(folder: str | os.PathLike | None = None) -> Cifar10Source:
    """Find the CIFAR-10 files in ``folder``, or in ``$HWCTL_CIFAR10_DIR`` when it is None.

    Accepts the batches folder itself or a folder that contains ``cifar-10-batches-bin`` or
    ``cifar-10-batches-py``.
    """
    if folder is None:
        folder = os.environ.get(ENV_VAR)
        if not folder:
            raise DatasetError(
                f"no CIFAR-10 folder given: pass --data DIR or set {ENV_VAR} to the folder "
                "that holds cifar-10-batches-bin (or cifar-10-batches-py)"
            )
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DatasetError(f"CIFAR-10 folder not found: {root}; point --data or {ENV_VAR} at it")

    for candidate in (root, root / "cifar-10-batches-bin", root / "cifar-10-batches-py"):
        if (candidate / "test_batch.bin").is_file():
            return Cifar10Source(candidate, "binary")
        if (candidate / "test_batch").is_file():
            return Cifar10Source(candidate, "python")
    raise DatasetError(
        f"no CIFAR-10 files in {root}: expected test_batch.bin and data_batch_1.bin … _5.bin "
        "(binary layout) or test_batch and data_batch_1 … _5 (python layout); download "
        "CIFAR-10 and point --data or HWCTL_CIFAR10_DIR at the extracted folder"
    )


def _read_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % RECORD_BYTES:
        raise DatasetError(
            f"{path} has {raw.size} bytes, not a whole number of {RECORD_BYTES}-byte CIFAR-10 "
            "records; the file is truncated or not CIFAR-10, download it again"
        )
    records = raw.reshape(-1, RECORD_BYTES)
    return records[:, 1:].reshape(-1, *IMAGE_SHAPE), records[:, 0].astype(np.int64)


def _read_python(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # NOTE: pickle can run code from a hostile file. The python layout is read only because it
    # is the official distribution format, so point this at CIFAR-10 files you trust.
    try:
        with path.open("rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as error:
        raise DatasetError(f"{path} is not a CIFAR-10 python batch ({error}); download it again")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DatasetError(f"{path} has data of shape {data.shape}, expected (N, 3072)")
    return data.reshape(-1, *IMAGE_SHAPE), labels


def load_split(
    source: Cifar10Source, split: str, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load ``split`` as uint8 images (N, 3, 32, 32) and int64 labels, the first ``limit`` only."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive image count, got {limit}")
    images, labels = [], []
    count = 0
    for path in source.split_files(split):
        if not path.is_file():
            raise DatasetError(f"CIFAR-10 file missing: {path}; the folder is incomplete")
        reader = _read_binary if source.layout == "binary" else _read_python
        batch_images, batch_labels = reader(path)
        images.append(batch_images)
        labels.append(batch_labels)
        count += len(batch_labels)
        if limit is not None and count >= limit:
            break

    all_images = np.concatenate(images)[:limit]
    all_labels = np.concatenate(labels)[:limit]
    if limit is not None and len(all_labels) < limit:
        raise DatasetError(f"{split} split has {len(all_labels)} images, fewer than {limit} asked")
    if all_labels.min() < 0 or all_labels.max() >= NUM_CLASSES:
        raise DatasetError(f"{source.folder}: labels outside 0..9, not CIFAR-10")
    log.debug("loaded %d %s images from %s", len(all_labels), split, source.folder)
    return all_images, all_labels


class Normalizer:
    """Scale uint8 pixels to [0, 1] and normalise each channel with a mean and std."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"need three means and three positive stds, got {mean}, {std}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std).view(1, 3, 1, 1)

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.float() / 255.0 - self._mean) / self._std


def augment(images_uint8: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply the standard CIFAR-10 augmentation: 4-pixel zero-pad random crop and random flip."""
    count = images_uint8.shape[0]
    padded = torch.nn.functional.pad(images_uint8, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (count,), generator=generator)
    dy = torch.randint(0, 9, (count,), generator=generator)
    rows = (dy.view(-1, 1) + torch.arange(32).view(1, -1)).view(count, 1, 32, 1)
    cols = (dx.view(-1, 1) + torch.arange(32).view(1, -1)).view(count, 1, 1, 32)
    batch_index = torch.arange(count).view(-1, 1, 1, 1)
    channel_index = torch.arange(3).view(1, 3, 1, 1)
    cropped = padded[batch_index, channel_index, rows, cols]
    flip = torch.rand(count, generator=generator) < 0.5
    cropped[flip] = cropped[flip].flip(-1)
    return cropped
