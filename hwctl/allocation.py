"""Deterministic allocation of a network's analog weights onto differential device pairs.

Every conv and linear layer (weights flattened in PyTorch order, then the linear bias) becomes a
run of pairs. Each layer starts on a fresh word line, and a pair sits on two neighbouring bit lines
of one word line, G+ on the even column and G− on the odd one. Layers fill arrays in module
order, and the word lines left over after the last layer are spares. The same model and geometry
always give the same allocation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from hwctl.backend import Geometry
from hwctl.model import analog_layers

ALLOCATION_RULE = "layer-per-word-line-v1"


class AllocationError(ValueError):
    """The network does not fit onto the chip."""


@dataclass(frozen=True)
class LayerSlot:
    """One analog layer and where its pairs sit in the pair list."""

    name: str
    kind: str
    shape: tuple[int, ...]
    weight_count: int
    has_bias: bool
    w_max: float
    first_pair: int
    pair_count: int


@dataclass(frozen=True)
class Allocation:
    """Per-pair arrays in pair order, plus the layer table."""

    layers: list[LayerSlot]
    layer: np.ndarray  # int16, index into ``layers``
    weight_index: np.ndarray  # int64, position in the layer's flattened weights (bias last)
    device_plus: np.ndarray  # int64 flat device index holding G+
    device_minus: np.ndarray  # int64 flat device index holding G−
    target_weight: np.ndarray  # float32

    @property
    def pairs(self) -> int:
        return len(self.layer)


def layer_values(module: nn.Module) -> np.ndarray:
    """Flatten a layer's analog values: the weight in PyTorch order, then the bias if any."""
    parts = [module.weight.detach().cpu().numpy().ravel()]
    if getattr(module, "bias", None) is not None:
        parts.append(module.bias.detach().cpu().numpy().ravel())
    return np.concatenate(parts).astype(np.float32)


def _select_layers(model: nn.Module, names: list[str] | None) -> list[tuple[str, nn.Module]]:
    layers = analog_layers(model)
    if names is None:
        return layers
    available = {name for name, _ in layers}
    unknown = [name for name in names if name not in available]
    if unknown:
        raise AllocationError(
            f"layers {unknown} are not conv or linear layers of the model; choose from "
            f"{sorted(available)}"
        )
    return [(name, module) for name, module in layers if name in set(names)]


def allocate(model: nn.Module, geometry: Geometry, layer_names: list[str] | None = None) -> Allocation:
    """Place every analog weight of ``model`` on a device pair of a chip with ``geometry``."""
    if geometry.cols < 2:
        raise AllocationError(f"a pair needs two bit lines, the chip has {geometry.cols}")
    pairs_per_row = geometry.cols // 2
    total_rows = geometry.arrays * geometry.rows

    slots, layer_ids, weight_ids, plus, values = [], [], [], [], []
    row = 0
    first_pair = 0
    for layer_index, (name, module) in enumerate(_select_layers(model, layer_names)):
        flat = layer_values(module)
        count = len(flat)
        w_max = float(np.abs(flat).max())
        if not np.isfinite(w_max) or w_max == 0.0:
            raise AllocationError(f"layer {name!r} has max |W| = {w_max}; cannot scale it to conductances")
        rows_needed = -(-count // pairs_per_row)
        positions = np.arange(count, dtype=np.int64)
        global_rows = row + positions // pairs_per_row
        columns = 2 * (positions % pairs_per_row)
        plus.append(global_rows * geometry.cols + columns)

        slots.append(LayerSlot(name, type(module).__name__, tuple(module.weight.shape),
                               count, getattr(module, "bias", None) is not None, w_max,
                               first_pair, count))
        layer_ids.append(np.full(count, layer_index, dtype=np.int16))
        weight_ids.append(positions)
        values.append(flat)
        row += rows_needed
        first_pair += count

    if row > total_rows:
        needed = 2 * first_pair
        raise AllocationError(
            f"the network needs {first_pair} pairs ({needed} devices, {row} word lines of "
            f"{geometry.cols} bit lines) but the chip has {total_rows} word lines "
            f"({geometry.devices} devices); use a larger chip or program fewer layers"
        )
    device_plus = np.concatenate(plus)
    return Allocation(
        layers=slots,
        layer=np.concatenate(layer_ids),
        weight_index=np.concatenate(weight_ids),
        device_plus=device_plus,
        device_minus=device_plus + 1,
        target_weight=np.concatenate(values),
    )


def spare_word_lines(allocation: Allocation, geometry: Geometry) -> np.ndarray:
    """Return the flat indices of the word lines (global row numbers) that hold no pair."""
    used = np.unique(allocation.device_plus // geometry.cols)
    return np.setdiff1d(np.arange(geometry.arrays * geometry.rows), used)
