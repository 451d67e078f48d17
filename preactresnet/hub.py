"""Pretrained weights as Hugging Face Hub folders: export, push, and load (locally or by repo id), safely.

The package ships one such folder (BUNDLED_DIR: PreActResNet18 at the paper's width, trained for 60 epochs in three stages on a
2-core CPU), used wherever `pretrained=True`, a bare `--pretrained`, or no checkpoint of one's own is given.

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
from .data.sources import SAMPLE_NAME
from .fileio import atomic_write, first_line
from .inference import accuracy_on, load_model
from .pretrained import (
    BUNDLED, BUNDLED_DIR, CARD_NAME, CONFIG_NAME, HUB_FILES, WEIGHTS_NAME, bundled_folder, is_bundled, load_strict, resolve_pretrained,
)

__all__ = ["BUNDLED", "BUNDLED_DIR", "CONFIG_NAME", "HUB_FILES", "WEIGHTS_NAME", "bundled_folder", "export", "from_pretrained",
           "is_bundled", "load_pretrained_into", "measure_exported", "push_to_hub", "record_accuracy", "resolve_pretrained"]

def _recipe(checkpoint: Path) -> dict:
    """The training config saved beside a checkpoint (checkpoints/<run>/config.yaml, or a pretrained folder's)."""
    exported = checkpoint.parent / CONFIG_NAME
    if exported.is_file():
        return json.loads(exported.read_text()).get("recipe") or {}
    f = checkpoint.parent / "config.yaml"
    if f.is_file():
        try:
            return yaml.safe_load(f.read_text()) or {}
        except yaml.YAMLError:
            return {}
    return {}


def _selection(config: dict) -> str:
    if config.get("averaged"):  # bench/average_weights.py: a mean of weight files, not one run's weights
        names = [f"`{p}`" for p in config["averaged"]]
        return "the mean of " + ", ".join(names[:-1]) + " and " + names[-1]
    chosen = {
        "validation": "best epoch, chosen on a held-out validation split",
        "test": "best epoch, chosen on the TEST set: its test accuracy is optimistic",
    }.get(config.get("selected_on"), "weights after the epoch named")
    return chosen + ("; EMA weights" if config.get("ema") else "")


def model_card(config: dict) -> str:
    acc = config.get("test_accuracy")
    acc_text = f"{acc:.2f}%" if isinstance(acc, (int, float)) else "not measured"
    recipe = config.get("recipe") or {}
    tuned = f", fine-tuning `{recipe['pretrained']}`" if recipe.get("pretrained") else ""  # a later stage: training began elsewhere
    epochs = f"{recipe.get('epochs', '?')} (checkpoint from epoch {config.get('epoch', '?')}){tuned}"
    data = config.get("data_description") or f"{config.get('dataset', 'cifar10')} test split"
    command = config.get("command") or "python train.py (command not recorded)"
    name, chosen = config["model"], _selection(config)
    return f"""---
library_name: preactresnet
tags: [image-classification, cifar10, {name}]
---
# {name} on {config.get('dataset', 'cifar10').upper()}

| | |
|---|---|
| model | `{name}` ({json.dumps(config['model_args'])}) |
| test accuracy | **{acc_text}** on the {data} |
| epochs | {epochs} |
| selection | {chosen} |
{_optional_rows(config)}| classes | {', '.join(config['classes'])} |
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


def _optional_rows(config: dict) -> str:
    """The model card's rows for what only some folders record (the bundled one records them all)."""
    rows = []
    if isinstance(config.get("sample_accuracy"), (int, float)):
        rows.append(f"| bundled 2,000-image sample | {config['sample_accuracy']:.2f}% (its test split) |")
    if config.get("measured_by"):
        rows.append(f"| accuracies measured by | {config['measured_by']} |")
    run = config.get("training")  # what the run had done (steps, epochs, minutes, date; the bundled one's budget, CPU kind)
    if isinstance(run, dict) and run:
        steps = f"{run['steps']:,}" if isinstance(run.get("steps"), int) else str(run.get("steps") or "?")
        said = "; ".join(str(run[k]) for k in ("budget", "cpu_kind", "date") if run.get(k))
        rows.append(f"| training | {steps} steps ({run.get('epochs', '?')} epochs), {run.get('minutes', '?')} min{': ' * bool(said)}{said} |")
    for key, label in (("seed", "seed"), ("machine", "trained on"), ("weights_dtype", "weights stored as")):
        if config.get(key) not in (None, ""):
            rows.append(f"| {label} | {config[key]} |")
    return "".join(row + "\n" for row in rows)


def export(checkpoint: str | Path, out_dir: str | Path, half: bool = False) -> Path:
    """Turn a training checkpoint (.safetensors from train.py) into a pretrained folder;
    half: store the floating-point tensors in fp16 (half the size; they load into an fp32 model)."""
    checkpoint = Path(checkpoint)
    state, meta = load_weights(checkpoint)
    check_metadata(meta, checkpoint)
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    meta = {**meta, "weights_dtype": str(dtype).replace("torch.", "")}
    out = writable_out(Path(out_dir))
    out.mkdir(parents=True, exist_ok=True)
    config = {key: meta.get(key) for key in CARRIED}
    config.update(dataset=meta.get("dataset", "cifar10"), ema=bool(meta.get("ema", False)),
                  recipe={**_recipe(checkpoint), **meta.get("plan", {})}, source_checkpoint=checkpoint.name)
    save_weights(out / WEIGHTS_NAME, state, meta)
    _write_config(out, config)
    return out


def writable_out(out: Path) -> Path:
    """An export writes into a new or empty folder, or over an earlier export; never over a user's other files."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; pass a folder for model.safetensors, config.json and README.md")
    present = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    if present and (WEIGHTS_NAME not in present or set(present) - set(HUB_FILES)):
        listed = ", ".join(present[:3]) + (", ..." if len(present) > 3 else "")
        raise CheckpointError(f"--out {out} holds other files ({listed}); export into a new folder or one export.py wrote")
    return out


# what config.json repeats from the weights' metadata
CARRIED = ("model", "model_args", "classes", "mean", "std", "epoch", "test_accuracy", "selected_on", "data_description",
           "command", "seed", "machine", "weights_dtype", "sample_accuracy", "measured_by", "training",
           "averaged")


def record_accuracy(folder: str | Path, **measured) -> None:
    """Write accuracies measured on the exported weights themselves (test_accuracy=..., sample_accuracy=...,
    data_description=..., measured_by=...) into their metadata, config.json and model card."""
    folder = Path(folder)
    state, meta = load_weights(folder / WEIGHTS_NAME)
    meta.update(measured)
    config = json.loads((folder / CONFIG_NAME).read_text())
    config.update(measured)
    save_weights(folder / WEIGHTS_NAME, state, meta)
    _write_config(folder, config)


def measure_exported(folder: str | Path, data_dir: str) -> dict:
    """export.py --data-dir: the exported weights' own accuracy, in fp32 on the CPU, on the data's test split
    and, for CIFAR-10, on the bundled sample (the figure CI recomputes)."""
    lm = load_model(Path(folder) / WEIGHTS_NAME, "cpu")
    test_accuracy, described = accuracy_on(lm, data_dir)
    measured = {"test_accuracy": round(test_accuracy, 4), "data_description": described, "measured_by": "export.py --data-dir (fp32, CPU)"}
    if lm.meta.get("dataset", "cifar10") == "cifar10":  # the bundled sample is CIFAR-10's: other datasets have no such figure
        sample_accuracy = test_accuracy if data_dir == SAMPLE_NAME else accuracy_on(lm, SAMPLE_NAME)[0]  # one pass suffices
        measured["sample_accuracy"] = round(sample_accuracy, 4)
    return measured


def _write_config(out: Path, config: dict) -> None:
    _atomic_text(out / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    _atomic_text(out / CARD_NAME, model_card(config))


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


def from_pretrained(spec: str | bool = True, device: torch.device | str = "cpu") -> nn.Module:
    """Build and strictly load a pretrained model from a local folder, a Hub repo id, or the bundled weights.

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
    given = Path(spec)
    own_run = given.suffix == ".safetensors" and given.name != WEIGHTS_NAME and given.is_file()  # a training checkpoint
    path = given if own_run else resolve_pretrained(spec) / WEIGHTS_NAME
    state, meta = load_weights(path)
    if meta.get("model") != model_name:
        raise CheckpointError(f"--pretrained {spec} holds {meta.get('model')}, not {model_name}; pass --model {meta.get('model')}")
    own = model.state_dict()
    head = [k for k in state if k.startswith("head.fc.") and k in own and state[k].shape != own[k].shape]
    for k in head:
        state.pop(k)
        state[k] = own[k]  # keep the freshly initialized head for the new classes
    load_strict(model, state, f"--pretrained {spec}", fix="check --width-mult")
    new_head = " (new classifier head for the new classes)" if head else ""
    return f"loaded pretrained weights from {path if own_run else path.parent}{new_head}"
