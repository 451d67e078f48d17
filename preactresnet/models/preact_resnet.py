"""Pre-activation ResNet (He et al. 2016, "Identity Mappings in Deep Residual Networks"), CIFAR layout.

3x3 stem conv, four stages (64/128/256/512 channels, strides 1/2/2/2) of pre-activation blocks
(BN-ReLU before every conv), and a final BN-ReLU before global pooling: with pre-activation, the last
block's output is a raw sum, so the paper normalizes it once more before the classifier.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ClassifierHead, StridedPointwise, ZooNet, init_weights, scaled
from .registry import register_model

__all__ = ["PreActBasicBlock", "PreActBottleneck", "PreActResNet"]


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus identity (or a 1x1 projection where the shape changes)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, out_planes, 3, 1, 1, bias=False)
        self.shortcut = _projection(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection sees the pre-activated input, as in the paper's full pre-activation unit.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut

    def last_layer(self) -> nn.Module:
        return self.conv2


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3 (strided), BN-ReLU-conv1x1 to 4x the width, plus shortcut."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.shortcut = _projection(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut

    def last_layer(self) -> nn.Module:
        return self.conv3


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    # Pre-activation projections are a bare 1x1 conv: the BN-ReLU before it is the block's own.
    if stride == 1 and in_planes == out_planes:
        return None
    return StridedPointwise(in_planes, out_planes, stride)


BLOCKS = {"basic": PreActBasicBlock, "bottleneck": PreActBottleneck}


class PreActResNet(ZooNet):
    """One configurable pre-activation ResNet; the registered factories only pick block and depth."""

    def __init__(
        self,
        block: str = "basic",
        layers: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        width_mult: float = 1.0,
        drop_rate: float = 0.0,
        zero_init_residual: bool = False,
        in_chans: int = 3,
    ):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got '{block}'")
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be four positive block counts, got {tuple(layers)}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        block_cls = BLOCKS[block]
        self.num_classes = num_classes
        widths = [scaled(c, width_mult) for c in (64, 128, 256, 512)]
        self.stem = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        in_planes = widths[0]
        stages = []
        for planes, depth, stride in zip(widths, layers, (1, 2, 2, 2)):
            blocks = []
            for i in range(depth):
                blocks.append(block_cls(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_norm = nn.BatchNorm2d(in_planes)
        self.num_features = in_planes
        self.head = ClassifierHead(in_planes, num_classes, drop_rate)
        init_weights(self)
        if zero_init_residual:
            # No BN follows a pre-activation branch's last conv, so that conv is what starts at zero.
            for m in self.modules():
                if isinstance(m, (PreActBasicBlock, PreActBottleneck)):
                    nn.init.zeros_(m.last_layer().weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stages(x)
        return F.relu(self.final_norm(x))


@register_model
def preactresnet18(**kwargs) -> PreActResNet:
    """PreActResNet-18: basic blocks [2, 2, 2, 2]."""
    return PreActResNet(block="basic", layers=(2, 2, 2, 2), **kwargs)


@register_model
def preactresnet34(**kwargs) -> PreActResNet:
    """PreActResNet-34: basic blocks [3, 4, 6, 3]."""
    return PreActResNet(block="basic", layers=(3, 4, 6, 3), **kwargs)


@register_model
def preactresnet50(**kwargs) -> PreActResNet:
    """PreActResNet-50: bottleneck blocks [3, 4, 6, 3]."""
    return PreActResNet(block="bottleneck", layers=(3, 4, 6, 3), **kwargs)


@register_model
def preactresnet101(**kwargs) -> PreActResNet:
    """PreActResNet-101: bottleneck blocks [3, 4, 23, 3]."""
    return PreActResNet(block="bottleneck", layers=(3, 4, 23, 3), **kwargs)


@register_model
def preactresnet152(**kwargs) -> PreActResNet:
    """PreActResNet-152: bottleneck blocks [3, 8, 36, 3]."""
    return PreActResNet(block="bottleneck", layers=(3, 8, 36, 3), **kwargs)
