"""The model zoo: PreActResNet 18/34/50/101/152 and ResNeXt-29 (2x64d, 4x64d, 8x64d, 16x64d, 32x4d)."""

from . import preact_resnet, resnext  # noqa: F401  (importing registers the factories)
from .layers import ClassifierHead, count_params
from .preact_resnet import PreActBasicBlock, PreActBottleneck, PreActResNet
from .registry import canonical_name, check_model_name, create_model, list_models, register_model
from .resnext import ResNeXt, ResNeXtBottleneck

__all__ = [
    "ClassifierHead",
    "PreActBasicBlock",
    "PreActBottleneck",
    "PreActResNet",
    "ResNeXt",
    "ResNeXtBottleneck",
    "canonical_name",
    "check_model_name",
    "count_params",
    "create_model",
    "list_models",
    "register_model",
]
