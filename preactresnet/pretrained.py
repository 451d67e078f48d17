"""Where pretrained weights come from: a local folder, a Hugging Face Hub repo id, or the folder shipped
in the package; and the strict load of such weights into a freshly built network.

Below `models` in the import graph (it imports no model code), so that `create_model(name, pretrained=True)`
can use it; hub.py builds export, push and from_pretrained on top.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from .checkpoint import CheckpointError, check_metadata, load_weights
from .fileio import first_line

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
HUB_FILES = [WEIGHTS_NAME, CONFIG_NAME, CARD_NAME]
BUNDLED = "bundled"  # the --pretrained spec (and pretrained=True) that names the weights shipped in the package
BUNDLED_DIR = Path(__file__).with_name("weights") / "preactresnet18_cifar10_cpu"


def bundled_folder() -> Path:
    """The pretrained folder inside the package (configs/cpu_15min.yaml at x1.0, 60 epochs in three stages; see its README.md)."""
    if not (BUNDLED_DIR / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"the bundled weights are missing ({BUNDLED_DIR / WEIGHTS_NAME}); reinstall the package, or pass a folder or Hub repo id")
    return BUNDLED_DIR


def is_bundled(path: str | Path) -> bool:
    """Whether a weights file is the one shipped in the package."""
    return Path(path).resolve().parent == BUNDLED_DIR.resolve()


def resolve_pretrained(spec: str | bool, cache_dir: str | None = None) -> Path:
    """A local pretrained folder (or its model.safetensors), the bundled weights (True or "bundled"),
    else a Hub repo id downloaded to the HF cache."""
    if spec is True or (spec == BUNDLED and not Path(spec).exists()):
        return bundled_folder()
    path = Path(spec)
    taken = "(a bare --pretrained takes the argument after it: put it last, or write --pretrained bundled)"
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"--pretrained {path} has no {WEIGHTS_NAME}, so is no pretrained folder {taken}")
        return path
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"--pretrained {spec} is no weights file or pretrained folder {taken}")
        if path.name != WEIGHTS_NAME:  # checkpoints/<run>/last.safetensors: a training checkpoint, read by --checkpoint
            raise CheckpointError(f"--pretrained {spec} is a training checkpoint, not a pretrained folder: pass --checkpoint {spec} "
                                  "(train.py --pretrained takes it as it is; export.py makes a folder of it)")
        return path.parent
    if spec.count("/") != 1 or spec.startswith((".", "/")):
        raise CheckpointError(f"--pretrained {spec}: no such folder, and not a Hub repo id of the form owner/name")
    if path.parent.is_dir():  # pretrained/RUNX beside a local pretrained/: a mistyped folder, not a Hub repo id
        raise CheckpointError(f"--pretrained {spec}: no such folder in {path.parent}/; check the name (a Hub repo id is "
                              f"looked up only where no local folder {path.parent}/ exists)")
    from huggingface_hub import snapshot_download  # lazy: only needed for a Hub repo id

    try:
        return Path(snapshot_download(repo_id=spec, allow_patterns=HUB_FILES, cache_dir=cache_dir))
    except Exception as err:  # offline, unknown repo, gated: say which, in one line
        reason = first_line(err)
        raise CheckpointError(
            f"could not fetch '{spec}' from the Hugging Face Hub ({type(err).__name__}: {reason}); "
            "with no network, pass a local pretrained folder instead"
        ) from None


def pretrained_state(name: str, spec: str | bool, overrides: dict) -> tuple[dict, dict]:
    """The weights and metadata create_model(name, pretrained=spec, **overrides) loads, once checked:
    the folder holds `name`, and no option given contradicts the arguments it was trained with."""
    path = resolve_pretrained(spec) / WEIGHTS_NAME
    state, meta = load_weights(path)
    check_metadata(meta, path)
    if meta["model"] != name:
        where = "the bundled weights are" if spec is True or spec == BUNDLED else f"{spec} is"
        raise ValueError(f"{where} {meta['model']}, not {name}; build {name} without pretrained, or pass pretrained=PATH_OR_REPO_ID")
    clash = {k: v for k, v in overrides.items() if meta["model_args"].get(k, v) != v}
    if clash:
        raise ValueError(f"pretrained {name} was trained with {({k: meta['model_args'][k] for k in clash})}, not {clash}; drop those options")
    return state, meta


def load_strict(model: nn.Module, state: dict, where: str, fix: str = "") -> nn.Module:
    """Load every tensor (fp16 weights land in the fp32 model); a missing, extra or misshapen one is a
    one-line error naming `where` the weights came from and, if given, the `fix`."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip() and "Error" not in ln), first_line(err))
        raise CheckpointError(f"{where} does not fit this {type(model).__name__} ({first})" + (f"; {fix}" if fix else "")) from None
    return model
