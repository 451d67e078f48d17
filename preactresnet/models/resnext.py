"""ResNeXt-29 for CIFAR (Xie et al. 2017, "Aggregated Residual Transformations", Table 7 networks).

3x3 stem conv to 64 with BN-ReLU, three stages of bottleneck blocks (1x1 -> grouped 3x3 -> 1x1) whose
outputs are 256/512/1024 channels, inner width = cardinality x d with d doubling per stage, strides
1/2/2, 1x1 conv + BN projection where the shape changes, global pooling and a linear head.
ResNeXt-29 8x64d has 34.4M parameters and 16x64d 68.1M, as in the paper.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import ClassifierHead, StridedPointwise, ZooNet, init_weights, scaled
from .registry import register_model

__all__ = ["ResNeXtBottleneck", "ResNeXt"]


class ResNeXtBottleneck(nn.Module):
    """conv1x1-BN-ReLU, grouped conv3x3-BN-ReLU, conv1x1-BN, add shortcut, ReLU (post-activation)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, cardinality: int, group_width: int):
        super().__init__()
        width = cardinality * group_width
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                StridedPointwise(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + shortcut)


def _check_args(depth: int, cardinality: int, base_width: int, width_mult: float) -> None:
    if (depth - 2) % 9 != 0 or depth < 11:
        raise ValueError(f"depth must be 9n+2 (11, 20, 29, ...), got {depth}")
    if cardinality < 1 or base_width < 1:
        raise ValueError(f"cardinality and base_width must be >= 1, got {cardinality}, {base_width}")
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")


class ResNeXt(ZooNet):
    """CIFAR ResNeXt of depth 9n+2 (29 -> three blocks a stage), any cardinality and base width d."""

    def __init__(
        self,
        cardinality: int = 8,
        base_width: int = 64,
        depth: int = 29,
        num_classes: int = 10,
        width_mult: float = 1.0,
        drop_rate: float = 0.0,
        zero_init_residual: bool = False,
        in_chans: int = 3,
    ):
        super().__init__()
        _check_args(depth, cardinality, base_width, width_mult)
        self.num_classes = num_classes
        blocks_per_stage = (depth - 2) // 9
        stem = scaled(64, width_mult)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)
        )
        in_ch = stem
        stages = []
        for i, (out_ch, stride) in enumerate(zip((256, 512, 1024), (1, 2, 2))):
            out_ch = scaled(out_ch, width_mult)
            group_width = scaled(base_width * 2**i, width_mult)  # d doubles with every stage
            blocks = []
            for j in range(blocks_per_stage):
                blocks.append(
                    ResNeXtBottleneck(in_ch, out_ch, stride if j == 0 else 1, cardinality, group_width)
                )
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = in_ch
        self.head = ClassifierHead(in_ch, num_classes, drop_rate)
        init_weights(self)
        if zero_init_residual:
            # Post-activation branch: zeroing the last BN's scale makes every block start as identity.
            for m in self.modules():
                if isinstance(m, ResNeXtBottleneck):
                    nn.init.zeros_(m.bn3.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


@register_model
def resnext29_2x64d(**kwargs) -> ResNeXt:
    """ResNeXt-29, cardinality 2, d = 64."""
    return ResNeXt(cardinality=2, base_width=64, **kwargs)


@register_model
def resnext29_4x64d(**kwargs) -> ResNeXt:
    """ResNeXt-29, cardinality 4, d = 64."""
    return ResNeXt(cardinality=4, base_width=64, **kwargs)


@register_model
def resnext29_8x64d(**kwargs) -> ResNeXt:
    """ResNeXt-29, cardinality 8, d = 64 (34.4M parameters)."""
    return ResNeXt(cardinality=8, base_width=64, **kwargs)


@register_model
def resnext29_16x64d(**kwargs) -> ResNeXt:
    """ResNeXt-29, cardinality 16, d = 64 (68.1M parameters)."""
    return ResNeXt(cardinality=16, base_width=64, **kwargs)


@register_model
def resnext29_32x4d(**kwargs) -> ResNeXt:
    """ResNeXt-29, cardinality 32, d = 4."""
    return ResNeXt(cardinality=32, base_width=4, **kwargs)
