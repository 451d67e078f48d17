"""PreActResNet: Pre-Activation ResNet and ResNeXt-29 classifiers for CIFAR-10, trained fast."""

from .models import count_params, create_model, list_models

__version__ = "0.1.0"
__all__ = ["count_params", "create_model", "from_pretrained", "list_models", "__version__"]


def from_pretrained(spec=True, device="cpu"):
    """A pretrained model: the bundled weights (True), a local folder or a Hugging Face Hub repo id (see preactresnet.hub)."""
    from .hub import from_pretrained as _from_pretrained  # lazy: `import preactresnet` stays light for timm users

    return _from_pretrained(spec, device)
