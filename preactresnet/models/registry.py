"""Model registry: names -> factory functions, also registered with timm.

`create_model("preactresnet18")` and `create_model("PreActResNet18")` build the same network; after
`import preactresnet`, `timm.create_model("preactresnet18")` does too.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}

# Keyword arguments timm.create_model passes to every factory; our networks have no use for them.
_TIMM_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def canonical_name(name: str) -> str:
    """'PreActResNet18', 'ResNeXt29-8x64d' and 'resnext29_8x64d' all map to the snake_case key."""
    return name.strip().lower().replace("-", "_")


def check_model_name(name: str, flag: str = "--model") -> str:
    """The canonical name of a registered model, or a one-line error that lists the choices."""
    key = canonical_name(name)
    if key not in _MODELS:
        raise ValueError(f"unknown {flag} '{name}'; choose one of: {', '.join(_MODELS)}")
    return key


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory under its function name, here and in timm's registry."""
    name = fn.__name__

    def factory(**kwargs):
        pretrained = kwargs.get("pretrained")
        for key in _TIMM_KWARGS:
            kwargs.pop(key, None)
        if pretrained:  # True: the bundled weights; a str: a pretrained folder or Hub repo id
            from ..pretrained import load_strict, pretrained_state  # lazy: building a net reads no files

            state, meta = pretrained_state(name, pretrained, kwargs)
            return load_strict(fn(**meta["model_args"]), state, f"pretrained={pretrained!r}").eval()
        return fn(**kwargs)

    factory.__name__ = name
    factory.__qualname__ = name
    factory.__module__ = fn.__module__
    factory.__doc__ = fn.__doc__
    _MODELS[name] = factory
    try:
        from timm.models import register_model as timm_register  # lazy: the zoo works without timm
    except ImportError:  # timm is a requirement, but the zoo itself does not need it
        return factory
    return timm_register(factory)


def list_models() -> list[str]:
    """Names of every registered model, in registration order."""
    return list(_MODELS)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model by name; keyword arguments override the factory's defaults.
    pretrained=True loads the weights bundled with the package (preactresnet18 at the paper's width), offline;
    pretrained="PATH_OR_REPO_ID" an exported folder or Hugging Face Hub repo; either comes in eval mode."""
    key = check_model_name(name, "model")
    try:
        return _MODELS[key](**overrides)
    except TypeError as err:  # an unknown keyword: say which model refused it
        raise ValueError(f"model '{key}' does not accept these options ({err})") from None
