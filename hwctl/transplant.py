"""Initialise a narrower CIFAR ResNet from a wider trained one by keeping its strongest channels.

Used to start noise-aware training of the reference ResNet-32 (widths 16/28/56, 1×1 convolution
shortcuts) from a trained standard ResNet-32 (widths 16/32/64, zero-padding shortcuts) instead of
from random weights. Each kept channel is chosen by the L1 norm of the weights that read it, and
a padding shortcut becomes a 1×1 convolution holding the same channel embedding, so the narrower
network starts close to the wider one's function.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from hwctl.model import ResNetCifar

log = logging.getLogger(__name__)


def _top_channels(importance: torch.Tensor, count: int) -> torch.Tensor:
    return torch.sort(torch.topk(importance, count).indices).values


def _input_l1(conv_or_linear: nn.Module) -> torch.Tensor:
    """Return the L1 norm of the weights that read each input channel."""
    weight = conv_or_linear.weight.detach().abs()
    return weight.sum(dim=[d for d in range(weight.dim()) if d != 1])


def _copy_bn(target: nn.BatchNorm2d, source: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(target, name).data.copy_(getattr(source, name).data[keep])


def _stream_keep(source: ResNetCifar, target: ResNetCifar) -> list[torch.Tensor]:
    """Choose, for each stage, the residual-stream channels of the source to keep."""
    stages = [source.layer1, source.layer2, source.layer3]
    keeps = []
    for index, stage in enumerate(stages):
        # Block 0 of stages 2 and 3 reads the previous stage's stream, not this one.
        readers = list(stage) if index == 0 else list(stage)[1:]
        importance = sum(_input_l1(block.conv1) for block in readers)
        if index + 1 < len(stages):
            importance = importance + _input_l1(stages[index + 1][0].conv1)
        else:
            importance = importance + _input_l1(source.linear)
        keeps.append(_top_channels(importance, target.widths[index]))
    return keeps


def _shortcut_embedding(source_block: nn.Module, keep_in: torch.Tensor, keep_out: torch.Tensor):
    """Return the 1×1 kernel that maps kept input channels where the source shortcut puts them."""
    shortcut = source_block.shortcut
    if isinstance(shortcut, nn.Sequential):
        conv = shortcut[0].weight.detach()[:, :, 0, 0]
        return conv[keep_out][:, keep_in]
    destination = keep_in + shortcut.pad
    return (keep_out.view(-1, 1) == destination.view(1, -1)).float()


def transplant(source: ResNetCifar, target: ResNetCifar) -> None:
    """Overwrite ``target``'s parameters with the strongest channels of ``source``."""
    if source.blocks_per_stage != target.blocks_per_stage:
        raise ValueError(
            f"block counts differ: source {source.blocks_per_stage}, target {target.blocks_per_stage}"
        )
    if any(t > s for s, t in zip(source.widths, target.widths)):
        raise ValueError(f"target widths {target.widths} exceed source widths {source.widths}")

    keeps = _stream_keep(source, target)
    target.conv1.weight.data.copy_(source.conv1.weight.data[keeps[0]])
    _copy_bn(target.bn1, source.bn1, keeps[0])

    keep_in = keeps[0]
    source_stages = [source.layer1, source.layer2, source.layer3]
    target_stages = [target.layer1, target.layer2, target.layer3]
    for stage_index, (source_stage, target_stage) in enumerate(zip(source_stages, target_stages)):
        keep_out = keeps[stage_index]
        for source_block, target_block in zip(source_stage, target_stage):
            middle = _top_channels(_input_l1(source_block.conv2), target_block.conv1.out_channels)
            target_block.conv1.weight.data.copy_(source_block.conv1.weight.data[middle][:, keep_in])
            _copy_bn(target_block.bn1, source_block.bn1, middle)
            target_block.conv2.weight.data.copy_(source_block.conv2.weight.data[keep_out][:, middle])
            _copy_bn(target_block.bn2, source_block.bn2, keep_out)
            if isinstance(target_block.shortcut, nn.Sequential):
                kernel = _shortcut_embedding(source_block, keep_in, keep_out)
                target_block.shortcut[0].weight.data.copy_(kernel[:, :, None, None])
                norm = target_block.shortcut[1]
                norm.weight.data.fill_(1.0)
                norm.bias.data.zero_()
                norm.running_mean.zero_()
                norm.running_var.fill_(1.0 - norm.eps)
            keep_in = keep_out

    target.linear.weight.data.copy_(source.linear.weight.data[:, keeps[2]])
    target.linear.bias.data.copy_(source.linear.bias.data)
    log.info("transplanted widths %s into %s", source.widths, target.widths)
