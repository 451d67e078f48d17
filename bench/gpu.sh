#!/usr/bin/env bash
# GPU figures for BENCHMARKS.md, in one run of under ten minutes on one modern GPU:
#   1. training images/s of PreActResNet18 and ResNeXt-29 8x64d (trainer vs the plain reference loop)
#   2. host synchronizations per training step (the calls, and CUDA's sync debug mode), and the
#      CUDA-only tests (cuda:N, fused optimizers, a step that raises on any synchronization)
#   3. wall time for PreActResNet18 to first reach 94% test accuracy on CIFAR-10 (configs/fast.yaml)
# Usage: bash bench/gpu.sh [DATA]   (DATA: CIFAR-10 archive/folder; default ../shared/data/cifar10-jpeg.tar.gz)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/cifar10-jpeg.tar.gz}"
PY="${PYTHON:-python}"
OUT="${OUT:-/tmp/preactresnet-gpu}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

echo "== throughput"
"$PY" bench/train_throughput.py --device cuda --data-dir "$DATA" --model preactresnet18 --batch-size 512 --steps 40 --warmup 10 --workers 8
"$PY" bench/train_throughput.py --device cuda --data-dir "$DATA" --model resnext29_8x64d --batch-size 256 --steps 20 --warmup 5 --workers 8
"$PY" bench/augment.py --device cuda --data-dir "$DATA"

echo "== host synchronizations per step (issue 15's command, then the whole package)"
"$PY" bench/sync_count.py --device cuda
"$PY" bench/sync_count.py --where preactresnet/ --config configs/demo.yaml --epochs 1 --max-steps-per-epoch 30 \
    --jitter-prob 0.8 --erase-prob 0.25 --mix-prob 0.5 --device cuda
"$PY" -m pytest -q tests/test_sync.py -k cuda

echo "== time to 94% (PreActResNet18, configs/fast.yaml)"
"$PY" train.py --config configs/fast.yaml --data-dir "$DATA" --run-name gpu-fast --no-progress --profile off \
    --checkpoint-dir "$OUT/checkpoints" --log-dir "$OUT/runs" --fig-dir "$OUT/fig" | grep -E "^epoch|final|device"
"$PY" - "$OUT/runs/gpu-fast/metrics.csv" <<'PYEOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
hit = next((r for r in rows if float(r["test_acc"]) >= 94.0), None)
best = max(float(r["test_acc"]) for r in rows)
if hit:
    print(f"reached 94% test accuracy at epoch {hit['epoch']} after {float(hit['elapsed_seconds']):.1f} s wall time (evaluation included)")
else:
    print(f"did not reach 94% in {len(rows)} epochs (best {best:.2f}%, {float(rows[-1]['elapsed_seconds']):.1f} s)")
PYEOF
