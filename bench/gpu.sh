#!/usr/bin/env bash
# The acceptance run for a GPU: in under 8 minutes on one modern GPU, one table, and a non-zero exit when any
# row fails. Rows: a command and the line of its log it reports; checks: a figure that must meet a threshold.
#   1. python train.py with no device flag: the run must report a CUDA device
#   2. torchrun with two processes: DDP and the stop agreement on CUDA (NCCL with two GPUs; on one GPU, which
#      NCCL refuses to share between ranks, gloo for CUDA tensors)
#   3. test.py and predict.py on CUDA, export.py of the result
#   4. host synchronizations inside a training step: 0 for bf16, fp16 + Muon and fp16 + Adagrad
#   5. the CUDA-only tests
#   6. training images/s: the trainer must beat the plain reference loop (same run)
#   7. the demo recipe for 4 epochs: test accuracy >= DEMO_FLOOR (69.6% on an AVX512-BF16 CPU, bf16, seed 0,
#      2026-12-05: `python train.py --config configs/demo.yaml --epochs 4`); then configs/fast.yaml, reported
# Usage: timeout 480 bash bench/gpu.sh [DATA]   (DATA: CIFAR-10 archive/folder; default: the sample bundled in the package)
# Each row's output is in $OUT/<row>.log. GPU_SH_CPU=1 runs every row's command in a small CPU form (the tests
# do, to check that each pattern finds its line); it proves nothing about a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-sample}"
PY="${PYTHON:-python}"
CPU_FORM="${GPU_SH_CPU:-0}"
if [ "$CPU_FORM" != 1 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
    echo "bench/gpu.sh: no CUDA GPU here (torch.cuda.is_available() is False for $PY); run it on a machine with one" >&2
    exit 2
fi
OUT="${OUT:-/tmp/preactresnet-gpu}"
DEMO_FLOOR="${DEMO_FLOOR:-60}"
mkdir -p "$OUT"
ROWS="$OUT/table.tsv"
: > "$ROWS"
DIRS=(--checkpoint-dir "$OUT/checkpoints" --log-dir "$OUT/runs" --fig-dir "$OUT/fig" --no-progress --profile off)
if [ "$CPU_FORM" = 1 ]; then
    DEV=cpu STEPS=4 SMALL=(--width-mult 0.125 --batch-size 32) ANY="v >= 0" SYNCS=(off-muon)  # a figure found, no threshold
    SPEED=(--width-mult 0.125 --batch-size 16 --steps 2 --warmup 1 --workers 1)
    DEMO=(--epochs 1 --max-steps-per-epoch 4) FAST=(--width-mult 0.125 --epochs 1 --max-steps-per-epoch 3)
else
    DEV=cuda STEPS=50 SMALL=() ANY="" SYNCS=(bf16 fp16-muon fp16-adagrad)
    SPEED=(--batch-size 512 --steps 40 --warmup 10 --workers 8)
    DEMO=(--epochs 4) FAST=(--epochs "${FAST_EPOCHS:-3}")
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
fi

# row NAME PATTERN COMMAND...: run it, keep its log, put its status, seconds and the last line matching PATTERN in the table
row() {
    local name="$1" pattern="$2"; shift 2
    local start=$SECONDS rc figure
    "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    figure=$(grep -E "$pattern" "$OUT/$name.log" | tail -n 1 | cut -c1-110)
    [ -n "$figure" ] || { [ $rc -eq 0 ] && rc=1; figure="(no line matches: $pattern)"; }
    printf '%s\t%s\t%s\t%s\n' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAIL($rc)")" "$((SECONDS - start))" "$figure" >> "$ROWS"
    echo "[$name] rc=$rc $((SECONDS - start))s: $figure"
}

# check NAME WHAT REGEX CONDITION: the number REGEX captures (sed -E, group 1) in NAME's log must meet CONDITION (awk, on v)
check() {
    local name="$1" what="$2" regex="$3" cond="$4" v status=FAIL
    v=$(sed -nE "s/$regex/\1/p" "$OUT/$name.log" 2> /dev/null | tail -n 1)
    [ -n "$v" ] && awk -v v="$v" "BEGIN { exit !($cond) }" && status=ok
    printf '%s\t%s\t\t%s\n' "check $name" "$status" "$what: ${v:-not found} (needs $cond)" >> "$ROWS"
    echo "[check $name] $status: $what = ${v:-not found} (needs $cond)"
}

TINY=(--config configs/demo.yaml --data-dir "$DATA" --epochs 1 --max-steps-per-epoch "$STEPS" --tta none "${DIRS[@]}")
row train-one-gpu "^device " "$PY" train.py "${TINY[@]}" --run-name gpu-one
check train-one-gpu "the device the run reports" "^device ([a-z]+).*" "v == \"$DEV\""
# NCCL refuses two ranks on one GPU: with fewer than two, gloo carries the CUDA tensors (preactresnet/distributed.py)
CUDA_BACKEND=gloo
[ "$DEV" = cuda ] && CUDA_BACKEND=$("$PY" -c "import torch; print('nccl' if torch.cuda.device_count() >= 2 else 'gloo')")
row torchrun-two "final test accuracy" env PREACTRESNET_DIST_TIMEOUT=120 PREACTRESNET_CUDA_BACKEND="$CUDA_BACKEND" \
    "$PY" -m torch.distributed.run --standalone \
    --nproc_per_node=2 train.py "${TINY[@]}" --run-name gpu-torchrun --device "$DEV"
row test-cuda "^test accuracy" "$PY" test.py --checkpoint "$OUT/checkpoints/gpu-one" --data-dir "$DATA" --device "$DEV"
mkdir -p "$OUT/images" && "$PY" - "$OUT/images" <<'PYEOF'
import sys
from preactresnet.data import load_dataset
from PIL import Image
ds = load_dataset("cifar10", "sample")
for i in range(8):
    Image.fromarray(ds.test_images[i].permute(1, 2, 0).numpy()).save(f"{sys.argv[1]}/{i}-{ds.classes[int(ds.test_labels[i])]}.png")
PYEOF
row predict-cuda "\.png" "$PY" predict.py "$OUT/images" --checkpoint "$OUT/checkpoints/gpu-one" --device "$DEV"
row export "^exported " "$PY" export.py --checkpoint "$OUT/checkpoints/gpu-one" --out "$OUT/exported"
SYNC=(--where preactresnet/ --config configs/demo.yaml --epochs 1 --max-steps-per-epoch 30 --jitter-prob 0.8
      --erase-prob 0.25 --mix-prob 0.5 --device "$DEV" "${SMALL[@]}")
for amp in "${SYNCS[@]}"; do
    precision="${amp%%-*}" optimizer="${amp#*-}"
    [ "$optimizer" = "$amp" ] && optimizer=muon
    row "sync-$amp" "inside the training steps" "$PY" bench/sync_count.py "${SYNC[@]}" --amp "$precision" \
        --optimizer "$optimizer" $([ "$optimizer" = adagrad ] && echo --lr 0.05)
    check "sync-$amp" "host synchronizations per step" "^inside the training steps: ([0-9.]+) per step.*" "v == 0"
done
[ "$DEV" = cuda ] && row cuda-tests "passed|failed" "$PY" -m pytest -q tests/test_sync.py tests/test_devices.py -k "cuda or gpu" -p no:cacheprovider
row throughput-r18 "preactresnet Trainer" "$PY" bench/train_throughput.py --device "$DEV" --data-dir "$DATA" --model preactresnet18 "${SPEED[@]}"
check throughput-r18 "trainer over the reference loop" ".*images\/s +\(([0-9.]+)x\).*" "${ANY:-v > 1}"
row demo-4-epochs "final test accuracy" "$PY" train.py --config configs/demo.yaml --data-dir "$DATA" "${DEMO[@]}" \
    --tta none --run-name gpu-demo --device "$DEV" "${DIRS[@]}"
check demo-4-epochs "test accuracy after 4 epochs, %" "^final test accuracy: ([0-9.]+)%.*" "${ANY:-v >= $DEMO_FLOOR}"
row fast-yaml "final test accuracy" "$PY" train.py --config configs/fast.yaml --data-dir "$DATA" "${FAST[@]}" \
    --run-name gpu-fast --device "$DEV" "${DIRS[@]}"

echo
echo "| row | status | seconds | figure (last matching line of \$OUT/<row>.log) |"
echo "|---|---|---:|---|"
awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}' "$ROWS"
! grep -q "FAIL" "$ROWS"
