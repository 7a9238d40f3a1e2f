"""ResNet-32 for CIFAR-10 in the form used for analog in-memory inference.

Widths 16/28/56, five basic blocks per stage, 1×1 convolution shortcuts with batch norm at the
two stage transitions, no convolution biases and a 56→10 linear layer with bias: 361,722 weights
(Joshi et al., "Accurate deep neural network inference using computational phase-change memory",
Nature Communications 11, 2473, 2020).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

REFERENCE_WIDTHS = (16, 28, 56)
REFERENCE_BLOCKS_PER_STAGE = 5
CIFAR10_CLASSES = 10


SHORTCUTS = ("conv", "pad")


class PadShortcut(nn.Module):
    """Parameter-free shortcut: subsample by ``stride`` and zero-pad the channels on both sides.

    This is the "option A" shortcut of He et al. (2016) used by many CIFAR ResNet checkpoints.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        extra = out_channels - in_channels
        if extra < 0 or extra % 2:
            raise ValueError(
                f"a padding shortcut needs an even channel increase, got {in_channels}->{out_channels}"
            )
        self.stride = stride
        self.pad = extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with batch norm and a shortcut around them."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, shortcut: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            if shortcut == "conv":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(out_channels),
                )
            else:
                self.shortcut = PadShortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR-style ResNet: a 3×3 stem, three stages of basic blocks, global pooling, linear."""

    def __init__(
        self,
        widths: Sequence[int] = REFERENCE_WIDTHS,
        blocks_per_stage: int = REFERENCE_BLOCKS_PER_STAGE,
        num_classes: int = CIFAR10_CLASSES,
        shortcut: str = "conv",
    ) -> None:
        super().__init__()
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be three positive channel counts, got {tuple(widths)}")
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be at least 1, got {blocks_per_stage}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        self.widths = tuple(int(w) for w in widths)
        self.blocks_per_stage = int(blocks_per_stage)
        self.num_classes = int(num_classes)
        self.shortcut = shortcut

        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_channels = widths[0]
        stages = []
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            blocks = []
            for block_index in range(blocks_per_stage):
                block_stride = stride if block_index == 0 else 1
                blocks.append(BasicBlock(in_channels, width, block_stride, shortcut))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(widths[2], num_classes)
        self._initialise()

    def architecture(self) -> dict[str, object]:
        """Return the constructor arguments, as stored in checkpoints."""
        return {
            "widths": list(self.widths),
            "blocks_per_stage": self.blocks_per_stage,
            "num_classes": self.num_classes,
            "shortcut": self.shortcut,
        }

    def _initialise(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet32(num_classes: int = CIFAR10_CLASSES) -> ResNetCifar:
    """Build the reference ResNet-32 (widths 16/28/56) with fresh weights."""
    return ResNetCifar(REFERENCE_WIDTHS, REFERENCE_BLOCKS_PER_STAGE, num_classes)


def analog_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """List the convolution and linear layers, in module order, whose weights go onto devices."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    ]


def analog_weight_count(model: nn.Module) -> int:
    """Count the weights stored on devices: every conv and linear weight, and linear biases."""
    total = 0
    for _, module in analog_layers(model):
        total += module.weight.numel()
        if module.bias is not None:
            total += module.bias.numel()
    return total
