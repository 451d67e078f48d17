#!/usr/bin/env bash
# --time-budget under load: the rows of BENCHMARKS.md's time-budget table, one run each, on this machine.
#   bash bench/budget_load.sh demo          # 70 s on configs/demo.yaml: quiet (seeds 0, 1), loaded start-up, loaded middle
#   bash bench/budget_load.sh 15m DATA      # 15 min on configs/cpu_15min.yaml: quiet (seeds 0, 1), first 60 s, 3 min from 400 s
# "Load" is two busy Python processes (as many as this project's 2-core machines have cores). The demo's start-up
# load runs from launch until the run prints its first plan, so it covers start-up and calibration whatever they
# take. Each run's last row of runs/<name>/metrics.csv gives elapsed_seconds, budget_spent_pct and test_acc.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
WHICH="${1:-demo}"
DATA="${2:-../shared/data/cifar10-jpeg.tar.gz}"
LOGS="${LOGS:-runs/budget-load}"
mkdir -p "$LOGS"

busy() {  # busy DELAY SECONDS: two busy processes for SECONDS, starting after DELAY
    ( sleep "$1"; timeout "$2" "$PY" -c "while True: pass" & timeout "$2" "$PY" -c "while True: pass" & wait ) &
}

busy_until_planned() {  # busy_until_planned LOG: two busy processes until LOG shows the first plan
    ( timeout 300 "$PY" -c "while True: pass" & p1=$!; timeout 300 "$PY" -c "while True: pass" & p2=$!
      for _ in $(seq 1 1500); do sleep 0.2; grep -q "to start with" "$1" 2> /dev/null && break; done
      kill $p1 $p2 2> /dev/null ) &
}

run() {  # run NAME SEED FLAGS...: one budget run, its log in $LOGS/NAME.log
    local name="$1" seed="$2"; shift 2
    "$PY" train.py "$@" --no-progress --seed "$seed" --run-name "$name" > "$LOGS/$name.log" 2>&1
    wait
    "$PY" - "$name" <<'EOF'
import csv, sys
last = list(csv.DictReader(open(f"runs/{sys.argv[1]}/metrics.csv")))[-1]
print(f"{sys.argv[1]}: {last['elapsed_seconds']} s of {last['time_budget_s']} ({last['budget_spent_pct']}%), "
      f"{last['step']} steps, test accuracy {last['test_acc']}%, calibration {last['calibrated_images_per_sec']} images/s")
EOF
}

if [ "$WHICH" = demo ]; then
    DEMO=(--config configs/demo.yaml --time-budget 70s)
    run budget-demo-quiet-s0 0 "${DEMO[@]}"
    run budget-demo-quiet-s1 1 "${DEMO[@]}"
    rm -f "$LOGS/budget-demo-startload.log"; busy_until_planned "$LOGS/budget-demo-startload.log"
    run budget-demo-startload 0 "${DEMO[@]}"
    busy 35 20; run budget-demo-midload 0 "${DEMO[@]}"
else
    M15=(--config configs/cpu_15min.yaml --data-dir "$DATA")
    run budget-15m-quiet-s0 0 "${M15[@]}"
    busy 0 60; run budget-15m-startload 0 "${M15[@]}"
    busy 400 180; run budget-15m-midload 0 "${M15[@]}"
    run budget-15m-quiet-s1 1 "${M15[@]}"
fi
