"""Precision on this CPU: what --amp auto and --muon-ns-dtype auto measure and choose, and what Muon costs.

    python bench/precision.py [--steps 20] [--repeats 2] [--data-dir sample] [--nets demo]
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/precision.py   # AVX2 kernels on a newer CPU

1. forward+backward images/s in fp32 and bf16 autocast for the demo/CPU-proxy network (PreActResNet18
   x0.25, batch 128) and the full-width one (x1.0, timed at batch 128), with the code and the rule that
   --amp auto uses (precision.py), and what it chooses;
2. Muon's optimizer step with bf16 and fp32 Newton-Schulz orthogonalization, ms per step, and fp32 in
   timm's own form against the Gram form that --muon-ns-dtype fp32 runs (optim.newton_schulz);
3. whole training steps of configs/demo.yaml through the trainer (augmentation included, warm-up
   excluded): Nesterov SGD lr 0.1 against Muon with each orthogonalization dtype, --amp auto;
4. the orthogonalization per matrix shape of PreActResNet18 at --matrices-width (x0.5: configs/cpu_15min.yaml's):
   ms per matrix in the Gram form and timm's, fp32 and bf16, and each one's error against fp64
   (`python bench/precision.py --only-matrices` prints this part alone).
Every ratio compares figures measured in this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from collections import Counter
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unittest import mock  # noqa: E402

import timm.optim.muon as timm_muon  # noqa: E402

from preactresnet import optim, precision  # noqa: E402
from preactresnet.models import create_model  # noqa: E402
from preactresnet.config import TrainConfig, from_dict, load_yaml  # noqa: E402
from preactresnet.system import cpu_kind, cpu_name, tune_malloc  # noqa: E402
from preactresnet.training import Trainer  # noqa: E402

NETS = {"demo / CPU proxy (x0.25, batch 128)": (0.25, 128), "full width (x1.0, timed at batch 128)": (1.0, 128)}


def precision_rows(nets: list[str], out=print) -> None:
    out("\n| network | fp32 images/s | bf16 images/s | bf16/fp32 | auto chooses | Muon step, fp32 NS "
        "(timm's form) | fp32 NS (Gram form) | bf16 NS | auto chooses |")
    out("|---|---:|---:|---:|---|---:|---:|---:|---|")
    for name in nets:
        width, batch = NETS[name]
        cfg = TrainConfig(model="preactresnet18", width_mult=width, batch_size=batch, optimizer="muon")
        candidates, timed_batch = precision.amp_candidates(cfg, 10, channels_last=True)
        ips = {k: timed_batch / s for k, s in precision.measure(candidates).items()}
        ms = {k: 1000 * s for k, s in precision.measure(precision.ns_candidates(cfg, 10)).items()}
        with mock.patch.object(optim, "newton_schulz", optim._ZEROPOWER):  # timm's iteration, in fp32
            timm_form = 1000 * precision.measure({"fp32": precision.ns_candidates(cfg, 10)["fp32"]})["fp32"]
        chosen = precision.choose({"amp": ips, "ns": ms}, ("amp", "ns"))
        amp = "bf16" if chosen["amp"] == "bf16" else "fp32"
        out(f"| {name} | {ips['off']:.0f} | {ips['bf16']:.0f} | {ips['bf16'] / ips['off']:.2f}x | {amp} | "
            f"{timm_form:.1f} ms | {ms['fp32']:.1f} ms | {ms['bf16']:.1f} ms | {chosen['muon_ns_dtype']} |")


def trainer_images_per_sec(cfg: TrainConfig, steps: int, warmup: int) -> tuple[float, str]:
    t = Trainer.from_config(cfg, out=lambda *a: None)
    t.loaders.train.set_epoch(0)
    t.train_steps(warmup)
    t.loaders.train.set_epoch(1)
    stats = t.train_steps(steps)
    return stats.images / stats.seconds, f"amp {t.cfg.amp}, Muon NS {t.cfg.muon_ns_dtype if t.cfg.optimizer == 'muon' else '-'}"


def optimizer_rows(data_dir: str, steps: int, warmup: int, repeats: int, out=print) -> None:
    """Each row timed `repeats` times, the rows taking turns, so that a slow spell of the machine falls on all."""
    base = dataclasses.replace(from_dict(load_yaml("configs/demo.yaml")), data_dir=data_dir, progress=False, profile="off")
    fp32 = dataclasses.replace(base, muon_ns_dtype="fp32")
    rows = {
        "Nesterov SGD, lr 0.1": (dataclasses.replace(base, optimizer="sgd", lr=0.1), optim.newton_schulz),
        "Muon, orthogonalization auto": (base, optim.newton_schulz),
        "Muon, fp32 orthogonalization (Gram form)": (fp32, optim.newton_schulz),
        "Muon, fp32 orthogonalization in timm's form": (fp32, optim._ZEROPOWER),
        "Muon, bf16 orthogonalization (timm's)": (dataclasses.replace(base, muon_ns_dtype="bf16"), optim.newton_schulz),
    }
    figures = {name: [] for name in rows}
    for _ in range(repeats):
        for name, (cfg, ns) in rows.items():
            with mock.patch.object(optim, "newton_schulz", ns):
                ips, how = trainer_images_per_sec(cfg, steps, warmup)
            figures[name].append((ips, how))
    out(f"\n| configs/demo.yaml, {steps} timed steps x {repeats} | images/s (mean) | each | vs SGD | chosen |\n|---|---:|---|---:|---|")
    sgd = sum(ips for ips, _ in figures["Nesterov SGD, lr 0.1"]) / repeats
    for name, runs in figures.items():
        mean = sum(ips for ips, _ in runs) / repeats
        out(f"| {name} | {mean:.0f} | {', '.join(f'{ips:.0f}' for ips, _ in runs)} | {mean / sgd:.2f}x | {runs[0][1]} |")


def matrix_rows(width: float, out=print) -> None:
    """Muon's orthogonalization (timm's 5 quintic steps) per matrix shape that Muon takes in PreActResNet18 at `width`."""
    coefficients = timm_muon.resolve_ns_coefficients("quintic", timm_muon._COEFFICIENTS)
    model = create_model("preactresnet18", width_mult=width)
    shapes = Counter((p.shape[0], p[0].numel()) for n, p in model.named_parameters() if p.ndim >= 2 and not n.startswith("head."))
    forms = {"Gram fp32": (optim.newton_schulz, torch.float32), "Gram bf16": (optim.newton_schulz, torch.bfloat16),
             "timm fp32": (optim._ZEROPOWER, torch.float32), "timm bf16": (optim._ZEROPOWER, torch.bfloat16)}
    out(f"\n| x{width} matrix | count | " + " | ".join(f"{f} ms (error)" for f in forms) + " |\n|---|---:|" + "---:|" * len(forms))
    total = dict.fromkeys(forms, 0.0)
    for shape, count in sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
        G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        exact = optim.newton_schulz(G, 5, coefficients, dtype=torch.float64)
        calls = {f: partial(ns, G, 5, coefficients, dtype=dtype) for f, (ns, dtype) in forms.items()}
        ms = {f: 1000 * precision.measure({f: call})[f] for f, call in calls.items()}  # one by one: each timed in full
        error = {f: ((call().double() - exact).norm() / exact.norm()).item() for f, call in calls.items()}
        out(f"| {shape[0]}x{shape[1]} | {count} | " + " | ".join(f"{ms[f]:.2f} ({error[f]:.4f})" for f in forms) + " |")
        total = {f: total[f] + count * ms[f] for f in forms}
    out(f"| all {sum(shapes.values())} | | " + " | ".join(f"**{total[f]:.1f}**" for f in forms) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed trainer steps per optimizer row")
    ap.add_argument("--warmup", type=int, default=3, help="untimed trainer steps before them")
    ap.add_argument("--repeats", type=int, default=2, help="times each trainer row is timed, the rows taking turns")
    ap.add_argument("--data-dir", default="sample", help="training data for the trainer rows")
    ap.add_argument("--nets", default="all", choices=["all", "demo"], help="'demo': skip the full-width network (minutes on AVX2)")
    ap.add_argument("--matrices-width", type=float, default=0.5, help="the width whose Muon matrices part 4 times one by one")
    ap.add_argument("--only-matrices", action="store_true", help="part 4 alone (under a minute at x0.5)")
    args = ap.parse_args()
    tune_malloc()
    os.environ[precision.CACHE_ENV] = str(Path(tempfile.mkdtemp()) / "precision.json")  # the trainer rows time afresh
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; kind: {cpu_kind()}; "
          f"torch {torch.__version__} capability {torch.backends.cpu.get_cpu_capability()}")
    if not args.only_matrices:
        precision_rows(list(NETS) if args.nets == "all" else list(NETS)[:1])
        optimizer_rows(args.data_dir, args.steps, args.warmup, args.repeats)
    matrix_rows(args.matrices_width)


if __name__ == "__main__":
    main()
