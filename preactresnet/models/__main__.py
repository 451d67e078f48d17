"""Print the model table (parameters, multiply-accumulates per 32x32 image): `python -m preactresnet.models`."""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import count_params, create_model, list_models


def model_table(num_classes: int = 10) -> list[tuple[str, int, float]]:
    rows = []
    for name in list_models():
        model = create_model(name, num_classes=num_classes).eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, 3, 32, 32))
        rows.append((name, count_params(model), counter.get_total_flops() / 2))  # FLOPs / 2 = MACs
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-classes", type=int, default=10)
    args = ap.parse_args()
    print("| model | parameters | GMACs (one 32x32 image) |")
    print("|---|---:|---:|")
    for name, params, macs in model_table(args.num_classes):
        print(f"| `{name}` | {params / 1e6:.2f}M | {macs / 1e9:.2f} |")


if __name__ == "__main__":
    main()
