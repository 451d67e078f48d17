"""Pieces every network in the zoo shares: the classifier head, weight init, parameter counting."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

ONEDNN_IC_BLOCK = 16  # oneDNN's input-channel block on AVX512 (8 on AVX2): fewer channels meet the fault below


def scaled(channels: int, width_mult: float, multiple_of: int = 1) -> int:
    """Channel count `channels * width_mult`, rounded to a multiple of `multiple_of` (at least one)."""
    value = max(multiple_of, int(round(channels * width_mult / multiple_of)) * multiple_of)
    return value


class ClassifierHead(nn.Module):
    """Global average pooling, optional dropout, linear layer (features are split from the head)."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        self.in_features = in_features
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


class StridedPointwise(nn.Conv2d):
    """A strided 1x1 convolution (a projection shortcut), computed on a CPU with fewer than ONEDNN_IC_BLOCK input
    channels as "subsample, then stride 1": the same weights, names and result. Written by hand because
    oneDNN's strided 1x1 backward-weights writes past its reduce-to-unit-stride workspace there (nhwc): SIGSEGV
    on AVX512 at odd batches, a hang on AVX2, or wrong gradients (uxlfoundation/oneDNN#6035; tests/test_models.py)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == (1, 1) or self.in_channels >= ONEDNN_IC_BLOCK or x.device.type != "cpu":
            return super().forward(x)
        sub = x[:, :, :: self.stride[0], :: self.stride[1]]
        # dense: torch.compile handed the strided view to oneDNN as it was (NaN from step 1 under AVX2 kernels, 1 thread)
        return F.conv2d(sub.clone(memory_format=torch.preserve_format), self.weight)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, as in the ResNet papers), unit BN, small normal linear."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ZooNet(nn.Module):
    """Interface shared by every network: features, head, classifier reset (timm's names)."""

    num_features: int
    head: ClassifierHead

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.head.fc = nn.Linear(self.num_features, num_classes)
        self.num_classes = num_classes
