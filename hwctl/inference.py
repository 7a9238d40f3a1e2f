"""Run a network with weights built from read conductances, with or without drift compensation.

Compensations:
- ``none``: weights (G+ − G−)·w_max/G_max straight from the read.
- ``gdc``: global drift compensation; each layer's weights scaled by its summed conductance at
  the reference read divided by the same sum at this read (on a chip, the summed crossbar
  current for a fixed calibration input), which undoes the layer's average drift.
- ``bn``: batch-norm statistics recalibration (AdaBS); every batch-norm layer's running mean and
  variance recomputed from training images with the drifted weights; learned scale and shift
  stay.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from calibration.conductance import conductances_to_weights
from hwctl.allocation import Allocation
from hwctl.cifar import Normalizer
from hwctl.evaluate import count_correct, recalibrate_batchnorm
from hwctl.model import analog_layers

COMPENSATIONS = ("none", "gdc", "bn")


@dataclass(frozen=True)
class EvaluationData:
    """Images for one evaluation: the test set slice and the batch-norm calibration images."""

    test_images: np.ndarray
    test_labels: np.ndarray
    calibration_images: np.ndarray
    normalizer: Normalizer


def layer_conductance_sums(allocation: Allocation, g_plus_us: np.ndarray,
                           g_minus_us: np.ndarray) -> np.ndarray:
    """Return each layer's summed conductance G+ + G− in µS, in layer-table order."""
    totals = np.add.reduceat(g_plus_us.astype(np.float64) + g_minus_us,
                             [slot.first_pair for slot in allocation.layers])
    return totals


def gdc_factors(reference_sums_us: np.ndarray, sums_us: np.ndarray) -> np.ndarray:
    """Return per-layer global drift compensation factors, reference sum over present sum."""
    if np.any(sums_us <= 0):
        raise ValueError(f"a layer reads a non-positive summed conductance {sums_us.min()} µS; "
                         "the devices are not programmed or the read failed")
    return reference_sums_us / sums_us


def network_from_conductances(
    float_model: nn.Module,
    allocation: Allocation,
    g_plus_us: np.ndarray,
    g_minus_us: np.ndarray,
    g_max_us: float,
    layer_scales: np.ndarray | None = None,
) -> nn.Module:
    """Return a copy of ``float_model`` whose analog weights come from the read conductances."""
    model = copy.deepcopy(float_model)
    modules = dict(analog_layers(model))
    with torch.no_grad():
        for index, slot in enumerate(allocation.layers):
            pairs = slice(slot.first_pair, slot.first_pair + slot.pair_count)
            order = allocation.weight_index[pairs]
            values = np.empty(slot.pair_count, dtype=np.float64)
            values[order] = conductances_to_weights(
                g_plus_us[pairs], g_minus_us[pairs], slot.w_max, g_max_us
            )
            if layer_scales is not None:
                values *= layer_scales[index]
            module = modules[slot.name]
            weight_count = module.weight.numel()
            module.weight.copy_(torch.from_numpy(values[:weight_count]).view_as(module.weight))
            if slot.has_bias:
                module.bias.copy_(torch.from_numpy(values[weight_count:]).view_as(module.bias))
    model.eval()
    return model


def evaluate_read(
    float_model: nn.Module,
    allocation: Allocation,
    g_plus_us: np.ndarray,
    g_minus_us: np.ndarray,
    g_max_us: float,
    compensation: str,
    data: EvaluationData,
    reference_sums_us: np.ndarray | None = None,
    batch_size: int = 500,
) -> int:
    """Return the number of test images classified correctly with ``compensation`` applied."""
    if compensation not in COMPENSATIONS:
        raise ValueError(f"unknown compensation {compensation!r}; choose from {COMPENSATIONS}")
    scales = None
    if compensation == "gdc":
        if reference_sums_us is None:
            raise ValueError("global drift compensation needs the reference read's layer sums")
        scales = gdc_factors(reference_sums_us,
                             layer_conductance_sums(allocation, g_plus_us, g_minus_us))
    model = network_from_conductances(float_model, allocation, g_plus_us, g_minus_us,
                                      g_max_us, scales)
    model = model.to(memory_format=torch.channels_last)
    if compensation == "bn":
        recalibrate_batchnorm(model, data.calibration_images, data.normalizer)
    return count_correct(model, data.test_images, data.test_labels, data.normalizer, batch_size)
