"""torch.hub entry points: `torch.hub.load("OWNER/PreActResNet", "preactresnet18", pretrained="OWNER/weights")`.

Every registered model is an entry point. With `pretrained=` (a local folder or a Hugging Face Hub repo
id made by export.py) its weights are loaded strictly from safetensors.
"""

dependencies = ["torch", "torchvision", "timm", "safetensors", "huggingface_hub"]


def _entry(name):
    def build(pretrained: str | None = None, **kwargs):
        import preactresnet

        if pretrained:
            model = preactresnet.from_pretrained(pretrained)
            if model.pretrained_config["model"] != name:
                raise ValueError(f"{pretrained} holds {model.pretrained_config['model']}, not {name}")
            return model
        return preactresnet.create_model(name, **kwargs)

    build.__name__ = name
    build.__doc__ = f"{name} from the PreActResNet zoo; pretrained= a folder or Hub repo id from export.py."
    return build


def _register_all():
    from preactresnet.models import list_models  # torch.hub puts this repository on sys.path first

    for name in list_models():
        globals()[name] = _entry(name)


_register_all()
