"""The uniform mean of several weight files of one network (a "model soup" of runs that share a start; Wortsman et al. 2022),
written as a checkpoint export.py takes. The shipped weights are the mean of two stages' EMAs (README, BENCHMARKS row D):

    python bench/average_weights.py pretrained/x1-swa checkpoints/x1-anneal/ema.safetensors --out checkpoints/x1-anneal/soup.safetensors
    python export.py --checkpoint checkpoints/x1-anneal/soup.safetensors --half --data-dir ../shared/data/cifar10-jpeg.tar.gz

Floating-point tensors (BatchNorm's running statistics included) are averaged in fp32; integer ones (BatchNorm's step
counts) and the metadata come from the last file, less its measured figures (the mean is not yet measured: export it with
--data-dir). Put --out beside the last file's config.yaml so the export keeps its recipe.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from preactresnet.checkpoint import REQUIRED_METADATA, CheckpointError, load_weights, portable_path, save_weights  # noqa: E402
from preactresnet.hub import WEIGHTS_NAME  # noqa: E402


# what the last file's metadata says of its own weights, not of their mean
MEASURED = ("test_accuracy", "sample_accuracy", "val_accuracy", "selected_on", "data_description", "measured_by", "training")


def _weights_file(path: Path) -> Path:
    if path.is_dir() and not (path / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{path} holds no {WEIGHTS_NAME}; pass a .safetensors file (a run's ema.safetensors, say) "
                              "or a folder export.py wrote")
    return path / WEIGHTS_NAME if path.is_dir() else path


def average(paths: list[Path]) -> tuple[dict[str, torch.Tensor], dict]:
    """The mean of the files' floating-point tensors; refused in one line when their networks or classes differ."""
    loaded = [load_weights(_weights_file(p)) for p in paths]
    last, meta = loaded[-1]
    for path, (state, other) in zip(paths, loaded):
        if state.keys() != last.keys() or any(state[k].shape != last[k].shape for k in last):
            raise CheckpointError(f"{path} holds another network than {paths[-1]}; average weights of one model and width only")
        differ = [key for key in REQUIRED_METADATA if other.get(key) != meta.get(key)]
        if differ:
            raise CheckpointError(f"{path} differs from {paths[-1]} in {', '.join(differ)}; "
                                  "average weights of one model trained for the same classes only")
    mean = {k: sum(s[k].float() for s, _ in loaded) / len(loaded) if v.is_floating_point() else v for k, v in last.items()}
    kept = {k: v for k, v in meta.items() if k not in MEASURED}
    return mean, {**kept, "averaged": [portable_path(str(p)) for p in paths]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("weights", nargs="+", type=Path, help="weight files (.safetensors) or pretrained folders, two or more")
    parser.add_argument("--out", type=Path, required=True, help="the averaged checkpoint to write (.safetensors)")
    args = parser.parse_args(argv)
    try:
        if len(args.weights) < 2:
            raise CheckpointError("give two or more weight files to average")
        if args.out.suffix != ".safetensors" or args.out.is_dir():
            raise CheckpointError(f"--out {args.out} is no .safetensors file name; name the file to write, "
                                  "e.g. checkpoints/RUN/soup.safetensors")
        state, meta = average(args.weights)
        save_weights(args.out, state, meta)
    except (CheckpointError, OSError) as err:
        sys.exit(f"error: {err}")
    print(f"averaged {len(args.weights)} files ({len(state)} tensors) -> {args.out}; "
          f"measure it: python export.py --checkpoint {args.out} --data-dir DIR")


if __name__ == "__main__":
    main()
