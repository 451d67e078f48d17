"""torch.hub entry points: `torch.hub.load("OWNER/PreActResNet", "preactresnet18", pretrained=True)`.

Every registered model is an entry point. `pretrained=True` loads the weights shipped in the package
(preactresnet18 only, offline); `pretrained=` a local folder or Hugging Face Hub repo id made by
export.py loads those. Weights are loaded strictly from safetensors.
"""

dependencies = ["torch", "torchvision", "timm", "safetensors", "huggingface_hub"]


def _entry(name):
    def build(pretrained: bool | str = False, **kwargs):
        import preactresnet

        return preactresnet.create_model(name, pretrained=pretrained, **kwargs)

    build.__name__ = name
    build.__doc__ = f"{name} from the PreActResNet zoo; pretrained=True the bundled weights, or a folder or Hub repo id from export.py."
    return build


def _register_all():
    from preactresnet.models import list_models  # torch.hub puts this repository on sys.path first

    for name in list_models():
        globals()[name] = _entry(name)


_register_all()
