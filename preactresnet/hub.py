"""Pretrained weights as Hugging Face Hub folders: export, push, and load (locally or by repo id), safely.

A pretrained folder holds exactly three files:
  model.safetensors  the weights (no pickle anywhere), with the same metadata as a training checkpoint
  config.json        model name and arguments, class names, normalization, recipe, measured accuracy
  README.md          the model card: accuracy, the data it was measured on, the command, how to load
Loading is strict: a missing or unexpected tensor is an error, never silently ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from .checkpoint import CheckpointError, check_metadata, load_weights, save_weights
from .fileio import atomic_write, first_line
from .inference import load_model

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
HUB_FILES = [WEIGHTS_NAME, CONFIG_NAME, CARD_NAME]


def _recipe(checkpoint: Path) -> dict:
    """The training config saved beside a checkpoint (checkpoints/<run>/config.yaml), if there is one."""
    f = checkpoint.parent / "config.yaml"
    if f.is_file():
        try:
            return yaml.safe_load(f.read_text()) or {}
        except yaml.YAMLError:
            return {}
    return {}


def model_card(config: dict) -> str:
    acc = config.get("test_accuracy")
    acc_text = f"{acc:.2f}%" if isinstance(acc, (int, float)) else "not measured"
    recipe = config.get("recipe") or {}
    epochs = recipe.get("epochs", "?")
    data = config.get("data_description") or f"{config.get('dataset', 'cifar10')} test split"
    command = config.get("command") or "python train.py (command not recorded)"
    name = config["model"]
    chosen = {
        "validation": "best epoch, chosen on a held-out validation split",
        "test": "best epoch, chosen on the TEST set: its test accuracy is optimistic",
    }.get(config.get("selected_on"), "weights after the epoch named")
    if config.get("ema"):
        chosen += "; EMA weights"
    return f"""---
library_name: preactresnet
tags: [image-classification, cifar10, {name}]
---
# {name} on {config.get('dataset', 'cifar10').upper()}

| | |
|---|---|
| model | `{name}` ({json.dumps(config['model_args'])}) |
| test accuracy | **{acc_text}** on the {data} |
| epochs | {epochs} (checkpoint from epoch {config.get('epoch', '?')}) |
| selection | {chosen} |
| classes | {', '.join(config['classes'])} |
| normalization | mean {config['mean']}, std {config['std']} |

Trained with:

```bash
{command}
```

## Load

```python
import preactresnet
model = preactresnet.from_pretrained("PATH_OR_REPO_ID")   # a local folder or a Hub repo id
```

or `python test.py --pretrained PATH_OR_REPO_ID`, `python predict.py IMAGE --pretrained PATH_OR_REPO_ID`.
The weights are safetensors: loading them runs no code.
"""


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Turn a training checkpoint (.safetensors from train.py) into a pretrained folder."""
    checkpoint = Path(checkpoint)
    state, meta = load_weights(checkpoint)
    check_metadata(meta, checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model": meta["model"],
        "model_args": meta["model_args"],
        "classes": meta["classes"],
        "mean": meta["mean"],
        "std": meta["std"],
        "dataset": meta.get("dataset", "cifar10"),
        "epoch": meta.get("epoch"),
        "test_accuracy": meta.get("test_accuracy"),
        "selected_on": meta.get("selected_on"),
        "ema": bool(meta.get("ema", False)),
        "data_description": meta.get("data_description"),
        "command": meta.get("command"),
        "recipe": _recipe(checkpoint),
        "source_checkpoint": checkpoint.name,
    }
    save_weights(out / WEIGHTS_NAME, state, {k: v for k, v in meta.items()})
    _atomic_text(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    _atomic_text(out / CARD_NAME, model_card(config))
    return out


def _atomic_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload a pretrained folder; needs `huggingface-cli login` (or HF_TOKEN) first."""
    from huggingface_hub import HfApi, get_token  # lazy: the Hub client is only needed to push

    if not get_token():
        raise CheckpointError("not logged in to the Hugging Face Hub; run `huggingface-cli login` or set HF_TOKEN, then push again")
    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, allow_patterns=HUB_FILES)
    except Exception as err:  # network, permissions, bad repo id: one line, the local folder stays as it is
        raise CheckpointError(f"could not push {folder} to {repo_id} ({first_line(err)}); the local folder is intact") from None
    return str(getattr(info, "commit_url", repo_id))


def resolve_pretrained(spec: str, cache_dir: str | None = None) -> Path:
    """A local pretrained folder (or its model.safetensors), else a Hub repo id downloaded to the HF cache."""
    path = Path(spec)
    if path.is_dir():
        if not (path / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{path} has no {WEIGHTS_NAME}; export one with python export.py --out {path}")
        return path
    if path.is_file():
        return path.parent
    if spec.count("/") != 1 or spec.startswith((".", "/")):
        raise CheckpointError(f"--pretrained {spec}: no such folder, and not a Hub repo id of the form owner/name")
    from huggingface_hub import snapshot_download  # lazy: only needed for a Hub repo id

    try:
        return Path(snapshot_download(repo_id=spec, allow_patterns=HUB_FILES, cache_dir=cache_dir))
    except Exception as err:  # offline, unknown repo, gated: say which, in one line
        reason = first_line(err)
        raise CheckpointError(
            f"could not fetch '{spec}' from the Hugging Face Hub ({type(err).__name__}: {reason}); "
            "with no network, pass a local pretrained folder instead"
        ) from None


def from_pretrained(spec: str, device: torch.device | str = "cpu") -> nn.Module:
    """Build and strictly load a pretrained model from a local folder or a Hub repo id.

    The returned model carries `pretrained_config` (classes, normalization, accuracy).
    """
    folder = resolve_pretrained(spec)
    loaded = load_model(folder / WEIGHTS_NAME, device, channels_last=False)  # for users' own (NCHW) tensors
    config_file = folder / CONFIG_NAME
    config = json.loads(config_file.read_text()) if config_file.is_file() else dict(loaded.meta)
    loaded.model.pretrained_config = config
    return loaded.model


def load_pretrained_into(model: nn.Module, model_name: str, spec: str) -> str:
    """Fine-tuning start: copy pretrained weights into `model`; a different class count re-initializes the head."""
    folder = resolve_pretrained(spec)
    state, meta = load_weights(folder / WEIGHTS_NAME)
    if meta.get("model") != model_name:
        raise CheckpointError(f"--pretrained {spec} holds {meta.get('model')}, not {model_name}; pass --model {meta.get('model')}")
    own = model.state_dict()
    head = [k for k in state if k.startswith("head.fc.") and k in own and state[k].shape != own[k].shape]
    for k in head:
        state.pop(k)
        state[k] = own[k]  # keep the freshly initialized head for the new classes
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip() and "Error" not in ln), str(err))
        raise CheckpointError(f"--pretrained {spec} does not fit this {model_name} ({first}); check --width-mult") from None
    return f"loaded pretrained weights from {folder}" + (" (new classifier head for the new classes)" if head else "")
