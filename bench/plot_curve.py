"""Test accuracy against minutes of training on a 2-core CPU: the README's picture, from measured runs only.

    python bench/plot_curve.py [--results bench/results/cpu_curve.jsonl] [--out bench/results/cpu_curve.png]

Each line of the results file is one run (point, seed, minutes, test_acc, data, cpu, date, command); a point is
drawn at the mean of its seeds with their range as an error bar, one series per CPU kind. Points scored on the
bundled 2,000-image sample are drawn hollow: their test set is not CIFAR-10's 10,000 images.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_points(path: Path) -> dict[str, list[dict]]:
    """Runs grouped by CPU kind, then averaged per point: minutes, accuracy (mean, low, high), seeds, data."""
    runs = defaultdict(list)
    for line in path.read_text().splitlines():
        if line.strip():
            run = json.loads(line)
            runs[(run["cpu"], run["point"])].append(run)
    series = defaultdict(list)
    for (cpu, point), group in sorted(runs.items()):
        acc = [r["test_acc"] for r in group]
        series[cpu].append({"point": point, "minutes": mean(r["minutes"] for r in group), "acc": mean(acc),
                            "low": min(acc), "high": max(acc), "seeds": len(group), "sample": "sample" in group[0]["data"]})
    return {cpu: sorted(points, key=lambda p: p["minutes"]) for cpu, points in series.items()}


# The x axis's label bands, by the minute each starts at: the alignment of its labels (right: they sit left of their
# points) and the column whose labels move apart. 15 minutes' labels sit left of their points, as 30 minutes' lie to
# their right, and so meet 5 minutes' labels between the two: one column.
BANDS = ((0, "left", "demo"), (3, "left", "5-15"), (10, "right", "5-15"), (25, "left", "30"), (45, "left", "60"),
         (120, "right", "hours"))
DOWN = ("60",)  # columns whose labels move apart downwards: above the hour's sit the hours' labels, which reach left


def band(minutes: float) -> tuple[float, str, str]:
    return [b for b in BANDS if minutes >= b[0]][-1]


def spread(labels: list[dict], gap: float = 0.95) -> list[dict]:
    """Labels of one column of BANDS move apart, `gap` accuracy points at least: the lowest first, upwards (the
    highest first, downwards, in the DOWN columns)."""
    columns = defaultdict(list)
    for lab in labels:
        columns[band(lab["x"])[2]].append(lab)
    for name, column in columns.items():
        sign = -1 if name in DOWN else 1
        column.sort(key=lambda lab: sign * lab["y"])
        for first, then in zip(column, column[1:]):
            then["y"] = sign * max(sign * then["y"], sign * first["y"] + gap)
    return labels


def draw(series: dict[str, list[dict]], out: Path) -> Path:
    """Points of one CPU kind joined where they share a test set (the sample's and CIFAR-10's are not comparable)."""
    fig, ax = plt.subplots(figsize=(9, 5.4), dpi=110)
    labels = []
    for k, (cpu, points) in enumerate(series.items()):
        color = f"C{k}"
        full = [p for p in points if not p["sample"]]
        ax.plot([p["minutes"] for p in full], [p["acc"] for p in full], "-", color=color, alpha=0.5)
        for p in points:
            err = [[p["acc"] - p["low"]], [p["high"] - p["acc"]]]
            ax.errorbar(p["minutes"], p["acc"], yerr=err, fmt="o", color=color, mfc="white" if p["sample"] else color,
                        capsize=3, label=cpu if p is points[0] else None)
            name = "demo, sample test set" if p["sample"] else p["point"].replace("_", " ")
            name = "" if name[0].isdigit() and "(" not in name else f"{name}: "  # "15 min" is the x axis already
            labels.append({"x": p["minutes"], "y": p["acc"], "ha": band(p["minutes"])[1], "color": color,
                           "text": f"{name}{p['acc']:.1f}% ({p['seeds']} seed{'s' * (p['seeds'] > 1)})"})
    for lab in spread(labels):
        ax.annotate(lab["text"], (lab["x"], lab["y"]), textcoords="offset points", xytext=(-8 if lab["ha"] == "right" else 8, -3),
                    ha=lab["ha"], fontsize=7.5, color=lab["color"])
    ax.set_ylim(top=max(p["high"] for points in series.values() for p in points) + 3)  # room for the labels above
    longest = max(p["minutes"] for points in series.values() for p in points)
    ax.set_xscale("log")
    ax.set_xlim(0.8, max(170, longest * 1.3))  # room right of the hour for its labels (hours' labels sit left)
    ticks = [t for t in (1, 2, 5, 15, 30, 60, 120, 240, 480) if t <= longest * 1.3]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("minutes of training (the time budget, or measured)")
    ax.set_ylabel("test accuracy, %")
    ax.set_title("CIFAR-10 on a 2-core CPU: accuracy for the time you have (no TTA)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, title="CPU kind (hollow: sample test set)", title_fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "cpu_curve.jsonl"), help="one JSON line per run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_curve.png"), help="the picture to write")
    args = ap.parse_args()
    series = load_points(Path(args.results))
    print(f"wrote {draw(series, Path(args.out))} ({sum(len(p) for p in series.values())} points)")


if __name__ == "__main__":
    main()
