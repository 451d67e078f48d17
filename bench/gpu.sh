#!/usr/bin/env bash
# The acceptance run for a first run on a GPU, in under 8 minutes on one modern GPU, as one table:
#   1. python train.py with no device flag (the single-GPU path: cuda:0 chosen and made current)
#   2. torchrun with one process (the same through the process group: NCCL + gloo)
#   3. test.py and predict.py on CUDA, export.py of the result
#   4. host synchronizations per training step, and the CUDA-only tests
#   5. training images/s of the trainer against the plain reference loop (same run)
#   6. a short run of configs/fast.yaml (PreActResNet18, the GPU recipe)
# Usage: timeout 480 bash bench/gpu.sh [DATA]   (DATA: CIFAR-10 archive/folder; default: the sample bundled in the package)
# Each step's output is in $OUT/<step>.log; a failing step is marked FAIL and the run goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-sample}"
PY="${PYTHON:-python}"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
    echo "bench/gpu.sh: no CUDA GPU here (torch.cuda.is_available() is False for $PY); run it on a machine with one" >&2
    exit 2
fi
OUT="${OUT:-/tmp/preactresnet-gpu}"
FAST_EPOCHS="${FAST_EPOCHS:-3}"
mkdir -p "$OUT"
ROWS="$OUT/table.tsv"
: > "$ROWS"
DIRS=(--checkpoint-dir "$OUT/checkpoints" --log-dir "$OUT/runs" --fig-dir "$OUT/fig" --no-progress --profile off)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

# step NAME PATTERN COMMAND...: run it, keep its log, put its status, seconds and the last line matching PATTERN in the table
step() {
    local name="$1" pattern="$2"; shift 2
    local start=$SECONDS rc
    "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local figure
    figure=$(grep -E "$pattern" "$OUT/$name.log" | tail -n 1 | cut -c1-110)
    printf '%s\t%s\t%s\t%s\n' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAIL($rc)")" "$((SECONDS - start))" "$figure" >> "$ROWS"
    echo "[$name] rc=$rc $((SECONDS - start))s: $figure"
}

TINY=(--config configs/demo.yaml --data-dir "$DATA" --epochs 1 --max-steps-per-epoch 50 --tta none "${DIRS[@]}")
step train-one-gpu "final test accuracy|device" "$PY" train.py "${TINY[@]}" --run-name gpu-one
grep -q "^device cuda" "$OUT/train-one-gpu.log" || printf 'train-on-cuda\tFAIL(the run did not report a CUDA device)\t0\t\n' >> "$ROWS"
step torchrun-one "final test accuracy" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 train.py "${TINY[@]}" --run-name gpu-torchrun
step test-cuda "test accuracy" "$PY" test.py --checkpoint "$OUT/checkpoints/gpu-one" --data-dir "$DATA" --device cuda
mkdir -p "$OUT/images" && "$PY" - "$OUT/images" <<'PYEOF'
import sys
from preactresnet.data import load_dataset
from PIL import Image
ds = load_dataset("cifar10", "sample")
for i in range(8):
    Image.fromarray(ds.test_images[i].permute(1, 2, 0).numpy()).save(f"{sys.argv[1]}/{i}-{ds.classes[int(ds.test_labels[i])]}.png")
PYEOF
step predict-cuda "\.png" "$PY" predict.py "$OUT/images" --checkpoint "$OUT/checkpoints/gpu-one" --device cuda
step export "wrote|pretrained" "$PY" export.py --checkpoint "$OUT/checkpoints/gpu-one" --out "$OUT/exported"
step sync-count "per step|synchron" "$PY" bench/sync_count.py --where preactresnet/ --config configs/demo.yaml --epochs 1 \
    --max-steps-per-epoch 30 --jitter-prob 0.8 --erase-prob 0.25 --mix-prob 0.5 --device cuda
step cuda-tests "passed|failed" "$PY" -m pytest -q tests/test_sync.py tests/test_devices.py -k "cuda or gpu" -p no:cacheprovider
step throughput-r18 "trainer|speed-up|x " "$PY" bench/train_throughput.py --device cuda --data-dir "$DATA" \
    --model preactresnet18 --batch-size 512 --steps 40 --warmup 10 --workers 8
step fast-yaml "^epoch|final" "$PY" train.py --config configs/fast.yaml --data-dir "$DATA" --epochs "$FAST_EPOCHS" \
    --run-name gpu-fast "${DIRS[@]}"

echo
echo "| step | status | seconds | figure (last matching line of \$OUT/<step>.log) |"
echo "|---|---|---:|---|"
awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$ROWS"
! grep -q "FAIL" "$ROWS"
