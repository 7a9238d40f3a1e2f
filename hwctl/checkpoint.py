"""Load and save network checkpoints safely.

Accepts hwctl's own checkpoints and the common third-party forms: a bare state dict, or a dict
with a ``state_dict`` (optionally with the ``module.`` prefix that DataParallel adds). A CIFAR
ResNet's architecture is inferred from the tensor shapes when the file does not state it.
Everything loads with ``torch.load(weights_only=True)``, so a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hwctl.model import ResNetCifar

log = logging.getLogger(__name__)

FORMAT = "hwctl-checkpoint"
FORMAT_VERSION = 1
# Checkpoints that do not state their input normalisation get the one used by the widely shared
# CIFAR ResNet checkpoints of Idelbayev's pytorch_resnet_cifar10; hwctl's own files state theirs.
DEFAULT_NORMALIZATION = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
OPTIONAL_BUFFER_SUFFIX = "num_batches_tracked"


class CheckpointError(ValueError):
    """A checkpoint file cannot be used: unreadable, incomplete, or with non-finite tensors."""


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        raise CheckpointError(
            f"cannot load checkpoint {path} ({type(error).__name__}: {error}); it must be a "
            "file written by torch.save holding only tensors and plain containers, such as a "
            "state_dict, because hwctl loads with weights_only=True"
        ) from error


def _extract_state_dict(content: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not content:
        raise CheckpointError(f"{path} contains no state dict (a mapping of names to tensors); save model.state_dict()")
    state = {}
    for key, value in content.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state[key.removeprefix("module.")] = value
    return state


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    for key, tensor in state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(
                f"{path}: tensor {key!r} has {bad} NaN or infinite values; the checkpoint is "
                "damaged or came from a diverged training run, so use an earlier one"
            )


def infer_resnet_architecture(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Infer widths, blocks per stage, class count and shortcut kind of a CIFAR ResNet."""
    required = ("conv1.weight", "linear.weight")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"not a CIFAR ResNet state dict: missing {missing}")
    widths = []
    blocks = []
    for stage in (1, 2, 3):
        indices = {
            int(match.group(1))
            for key in state
            if (match := re.match(rf"layer{stage}\.(\d+)\.conv1\.weight$", key))
        }
        if not indices:
            raise CheckpointError(f"not a CIFAR ResNet state dict: no layer{stage} blocks")
        blocks.append(max(indices) + 1)
        widths.append(int(state[f"layer{stage}.0.conv2.weight"].shape[0]))
    if len(set(blocks)) != 1:
        raise CheckpointError(f"stages have different block counts {blocks}; not supported")
    shortcut = "conv" if "layer2.0.shortcut.0.weight" in state else "pad"
    return {
        "widths": widths,
        "blocks_per_stage": blocks[0],
        "num_classes": int(state["linear.weight"].shape[0]),
        "shortcut": shortcut,
    }


def load_checkpoint(path: str | os.PathLike) -> tuple[ResNetCifar, dict[str, Any]]:
    """Load a CIFAR ResNet checkpoint and return the model (eval mode) and its metadata.

    The metadata holds ``architecture``, ``normalization`` (mean and std), ``sha256`` and,
    where the file states them, ``float_accuracy`` and ``training``.
    """
    path = Path(path)
    content = _read_file(path)
    state = _extract_state_dict(content, path)
    _check_finite(state, path)

    meta = content if isinstance(content, dict) and "state_dict" in content else {}
    architecture = meta.get("architecture") or infer_resnet_architecture(state)
    try:
        model = ResNetCifar(**architecture)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: unusable architecture {architecture}: {error}") from error

    expected = model.state_dict()
    missing = sorted(
        key for key in set(expected) - set(state) if not key.endswith(OPTIONAL_BUFFER_SUFFIX)
    )
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match a {architecture} ResNet: missing tensors {missing[:8]}, "
            f"unexpected tensors {unexpected[:8]}; the file is incomplete or another network"
        )
    for key, tensor in expected.items():
        if key in state and state[key].shape != tensor.shape:
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(state[key].shape)}, the architecture "
                f"needs {tuple(tensor.shape)}"
            )
    model.load_state_dict(state, strict=False)
    model.eval()

    normalization = meta.get("normalization") or DEFAULT_NORMALIZATION
    info = {
        "architecture": architecture,
        "normalization": {k: tuple(normalization[k]) for k in ("mean", "std")},
        "sha256": file_sha256(path),
        "path": str(path),
        "float_accuracy": meta.get("float_accuracy"),
        "training": meta.get("training"),
    }
    log.info("loaded %s: %s", path, architecture)
    return model, info


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write ``payload`` with torch.save, atomically: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        torch.save(payload, temp_name)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def model_payload(
    model: nn.Module, normalization: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """Build the dict hwctl stores for a finished network."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": model.architecture(),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "normalization": {k: list(v) for k, v in normalization.items()},
        **extra,
    }
