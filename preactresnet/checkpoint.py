"""Checkpoints that survive a kill at any moment and never unpickle arbitrary objects.

A run folder `checkpoints/<run>/` holds:
  last.safetensors, best.safetensors  weights (no `module.` / `_orig_mod.` prefixes) and, as metadata,
                                      everything needed to use them: model name and arguments, class
                                      names, normalization, epoch and accuracy
  last.state.pt                       the full training state for --resume: weights, optimizer,
                                      scheduler, scaler, EMA, loader position, RNG states, config
Every file is written to a temporary name and moved into place with os.replace (atomic on POSIX and
Windows), so the previous version stays intact until the new one is complete.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .fileio import atomic_write, first_line

WEIGHTS_FORMAT = "preactresnet/1"


class CheckpointError(Exception):
    """A checkpoint that cannot be used, worded as one line naming the file and the fix."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


REQUIRED_METADATA = ("model", "model_args", "classes", "mean", "std")  # what rebuilding and using a model needs


@dataclass(frozen=True)
class WeightsMeta:
    """What a weights file says about itself: how to rebuild, normalize and label, and where it came from."""

    model: str
    model_args: dict
    classes: list
    mean: list
    std: list
    dataset: str = "cifar10"
    data_dir: str = ""
    run: str = ""
    data_description: str = ""
    command: str = ""
    seed: int | None = None
    machine: str = ""

    def at(self, epoch: int, ema: bool = False, selected_on: str | None = None, plan: dict | None = None,
           training: dict | None = None, **accuracies: float | None) -> dict:
        """The metadata of the weights saved after `epoch`, with accuracies such as test_accuracy=83.2;
        `selected_on` ("validation" or "test") for a best checkpoint: which split chose it; `plan`: the epochs
        and total_steps a time budget chose (its config keeps the recipe's); `training`: what the run had done."""
        meta = {**dataclasses.asdict(self), "epoch": epoch, "ema": ema, **({"plan": plan} if plan else {}),
                **({"training": training} if training else {})}
        if selected_on is not None:
            meta["selected_on"] = selected_on
        meta.update({k: round(v, 4) for k, v in accuracies.items() if v is not None})
        return meta


def portable_path(path: str, name_only: bool = True) -> str:
    """A data path as other machines may read it: relative to the working folder, else its name alone
    (or "" with name_only=False, where a bare name would be misread as a folder here)."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        return str(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return p.name if name_only else ""


def check_metadata(meta: dict, path: str | Path) -> dict:
    for key in REQUIRED_METADATA:
        if key not in meta:
            raise CheckpointError(f"{path} lacks '{key}' in its metadata; it was not saved by train.py or export")
    return meta


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write weights as safetensors with JSON-encoded metadata, atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {"format": WEIGHTS_FORMAT, **{k: json.dumps(v) for k, v in metadata.items()}}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; check the path of the .safetensors file or run folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        if _is_torch_save(path):
            raise CheckpointError(f"{path} is a training state (torch.save), not weights; pass the run's last.safetensors "
                                  "or best.safetensors, or its folder") from None
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupt") from None
    if raw.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(f"{path} was not written by preactresnet (no '{WEIGHTS_FORMAT}' format tag)")
    return {k: json.loads(v) for k, v in raw.items() if k != "format"}


def _is_torch_save(path: Path) -> bool:
    """torch.save's zip archive (a last.state.pt) begins as every zip file does."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    meta = read_metadata(path)
    try:
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupt") from None


def save_state(path: str | Path, state: dict) -> None:
    """torch.save the training state atomically (tensors and plain Python values only)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path, mmap: bool = False) -> dict:
    """Load a training state with weights_only=True: a file that asks to run code is refused. mmap: its tensors
    are read only when touched (a check that reads a few numbers of a 134 MB state)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state {path} not found; is this a run folder made by train.py?")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} holds objects a checkpoint never holds; refusing to load it ({first_line(err, 'unsafe content')})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path} is truncated or corrupt ({first_line(err)}); resume from another run or start afresh") from None


def rank_state(state: dict, rank: int) -> dict:
    """One rank's loader position and random streams from a training state (format 1 kept rank 0's only)."""
    if "ranks" in state:
        return state["ranks"][rank]
    return {"loader": state["loader"], "rng": state["rng"]}


def find_run(spec: str, checkpoint_dir: str | Path) -> Path:
    """Resolve --resume: a run folder, a run name under checkpoint_dir, or 'auto' (the newest run)."""
    root = Path(checkpoint_dir)
    if spec == "auto":
        runs = [p for p in root.glob("*/last.state.pt")] if root.is_dir() else []
        if not runs:
            raise CheckpointError(f"--resume auto found no run with a last.state.pt under {root}/; train one first")
        return max(runs, key=lambda p: p.stat().st_mtime).parent
    for candidate in (Path(spec), root / spec):
        if (candidate / "last.state.pt").is_file():
            return candidate
        if candidate.is_file() and candidate.name == "last.state.pt":
            return candidate.parent
    raise CheckpointError(f"--resume {spec}: no last.state.pt there or under {root / spec}; pass a run folder or 'auto'")
