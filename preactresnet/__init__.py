"""PreActResNet: Pre-Activation ResNet and ResNeXt-29 classifiers for CIFAR-10, trained fast."""

from .models import count_params, create_model, list_models

__version__ = "0.1.0"
__all__ = ["count_params", "create_model", "list_models", "__version__"]
