"""Noise-aware training of a CIFAR-10 network for PCM inference.

Each forward pass sees the weights plus Gaussian noise whose standard deviation is a fraction of
the layer's maximum absolute weight (3.8 % by default: the 0.94 µS median programming error at
G_max = 25 µS), and after each optimiser step the weights are clipped to a multiple of their
layer's standard deviation, so that w_max, and with it the conductance scale, is not set by a few
outliers (Joshi et al., Nature Communications 11, 2473, 2020).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from hwctl.checkpoint import CheckpointError, load_checkpoint, model_payload, save_checkpoint
from hwctl.cifar import Normalizer, augment, load_split, locate_cifar10
from hwctl.evaluate import accuracy, recalibrate_batchnorm
from hwctl.model import analog_layers, resnet32
from hwctl.transplant import transplant

log = logging.getLogger(__name__)

REFERENCE_NORMALIZATION = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


@dataclass
class TrainSettings:
    """Recipe of one training run; stored in every checkpoint it writes."""

    data_dir: str | None
    out: str
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    weight_noise: float = 0.038
    clip_sigma: float = 2.5
    seed: int = 0
    init_from: str | None = None
    train_images: int | None = None
    test_images: int | None = None
    threads: int | None = None
    normalization: dict[str, tuple[float, float, float]] = field(
        default_factory=lambda: dict(REFERENCE_NORMALIZATION)
    )

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch size must be at least 2, got {self.batch_size}")
        if not 0 <= self.weight_noise < 1:
            raise ValueError(f"weight noise is a fraction of max |W| in [0, 1), got {self.weight_noise}")
        if self.clip_sigma <= 0:
            raise ValueError(f"clip sigma must be positive (2 to 2.5 is usual), got {self.clip_sigma}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning rate must be positive, got {self.learning_rate}")


def _analog_tensors(model: nn.Module) -> list[list[torch.Tensor]]:
    """Group, per analog layer, the parameters that go onto devices (weight, linear bias)."""
    groups = []
    for _, module in analog_layers(model):
        tensors = [module.weight]
        if module.bias is not None:
            tensors.append(module.bias)
        groups.append(tensors)
    return groups


@contextlib.contextmanager
def weight_noise(model: nn.Module, relative_std: float, generator: torch.Generator) -> Iterator[None]:
    """Add Gaussian noise of ``relative_std`` × the layer's max |W| to every analog weight.

    The clean weights come back on exit, so the optimiser steps the clean weights with the
    gradient taken at the noisy ones.
    """
    saved = []
    with torch.no_grad():
        for tensors in _analog_tensors(model):
            w_max = max(float(t.abs().max()) for t in tensors)
            for tensor in tensors:
                saved.append((tensor, tensor.detach().clone()))
                noise = torch.randn(tensor.shape, generator=generator) * (relative_std * w_max)
                tensor.add_(noise.to(memory_format=torch.preserve_format))
    try:
        yield
    finally:
        with torch.no_grad():
            for tensor, clean in saved:
                tensor.copy_(clean)


@torch.no_grad()
def clip_weights(model: nn.Module, sigmas: float) -> None:
    """Clip each analog layer's weights to ±``sigmas`` standard deviations of that layer."""
    for _, module in analog_layers(model):
        bound = sigmas * float(module.weight.std())
        module.weight.clamp_(-bound, bound)


def learning_rate_at(settings: TrainSettings, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up, then cosine decay to zero at the last step."""
    total = settings.epochs * steps_per_epoch
    warmup = max(1, int(settings.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return settings.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * settings.learning_rate * (1.0 + math.cos(math.pi * progress))


def _initial_model(settings: TrainSettings, train_images: np.ndarray, normalizer: Normalizer):
    model = resnet32()
    if settings.init_from:
        source, info = load_checkpoint(settings.init_from)
        if tuple(info["normalization"]["mean"]) != tuple(settings.normalization["mean"]):
            log.warning("source checkpoint normalisation %s differs from the training one %s",
                        info["normalization"], settings.normalization)
        transplant(source, model)
    model = model.to(memory_format=torch.channels_last)
    clip_weights(model, settings.clip_sigma)
    if settings.init_from:
        # Pruning channels and clipping shift every layer's activation statistics.
        recalibrate_batchnorm(model, train_images[:2600], normalizer)
    return model


def _run_epoch(model, optimizer, settings, images, labels, normalizer, generator, epoch, step):
    model.train()
    order = torch.randperm(len(labels), generator=generator).numpy()
    steps_per_epoch = len(labels) // settings.batch_size
    losses = []
    bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{settings.epochs}", leave=False)
    for batch_index in bar:
        index = order[batch_index * settings.batch_size : (batch_index + 1) * settings.batch_size]
        inputs = augment(torch.from_numpy(images[index]), generator)
        inputs = normalizer(inputs).contiguous(memory_format=torch.channels_last)
        targets = torch.from_numpy(labels[index])

        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(settings, step, steps_per_epoch)
        with weight_noise(model, settings.weight_noise, generator):
            loss = F.cross_entropy(model(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        clip_weights(model, settings.clip_sigma)

        step += 1
        losses.append(float(loss))
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    return step, float(np.mean(losses))


def _state_path(settings: TrainSettings) -> Path:
    return Path(settings.out).with_suffix(".train-state.pt")


def _load_resume(path: Path, model: nn.Module, optimizer, generator) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        return state["progress"]
    except (KeyError, RuntimeError) as error:
        raise CheckpointError(
            f"training state {path} does not fit this run ({error}); delete it to start over"
        ) from error


def train(settings: TrainSettings, resume: bool = False) -> dict[str, Any]:
    """Train, checkpointing every epoch; with ``resume`` continue from the last checkpoint."""
    settings.validate()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    source = locate_cifar10(settings.data_dir)
    images, labels = load_split(source, "train", settings.train_images)
    test_images, test_labels = load_split(source, "test", settings.test_images)
    normalizer = Normalizer(**settings.normalization)
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)

    model = _initial_model(settings, images, normalizer)
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate,
                                momentum=settings.momentum, nesterov=True,
                                weight_decay=settings.weight_decay)
    progress: dict[str, Any] = {"epoch": 0, "step": 0, "wall_s": 0.0, "history": []}
    state_path = _state_path(settings)
    if resume:
        if not state_path.is_file():
            raise CheckpointError(f"nothing to resume: {state_path} not found")
        progress = _load_resume(state_path, model, optimizer, generator)
        log.info("resuming at epoch %d from %s", progress["epoch"] + 1, state_path)

    for epoch in range(progress["epoch"], settings.epochs):
        started = time.monotonic()
        step, loss = _run_epoch(model, optimizer, settings, images, labels, normalizer,
                                generator, epoch, progress["step"])
        test_accuracy = accuracy(model, test_images, test_labels, normalizer)
        progress["epoch"] = epoch + 1
        progress["step"] = step
        progress["wall_s"] += time.monotonic() - started
        progress["history"].append({"epoch": epoch + 1, "loss": loss, "test_accuracy": test_accuracy})
        log.info("epoch %d/%d: loss %.4f, float test accuracy %.4f, %.0f s",
                 epoch + 1, settings.epochs, loss, test_accuracy, time.monotonic() - started)

        save_checkpoint(state_path, {"model": model.state_dict(),
                                     "optimizer": optimizer.state_dict(),
                                     "generator": generator.get_state(), "progress": progress})
        save_checkpoint(settings.out, model_payload(
            model, settings.normalization, float_accuracy=test_accuracy,
            training={"settings": asdict(settings), "progress": progress}))
    return progress
