#!/usr/bin/env bash
# difflab's GPU measurements in one go, on a machine with PyTorch and a CUDA GPU but no
# network: run from the project root after benchmarks/gpu/prepare.sh made gpu-kit/.
# Each part has its own time limit; everything goes to $OUT (default gpu-results/).
#
#   OUT=DIR benchmarks/gpu/run.sh [PARTS]      PARTS: any of tests,sampling,train,sd,sweep
#   SMOKE=1 benchmarks/gpu/run.sh              tiny sizes, any device: checks the script itself
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-gpu-results}"
PARTS="${1:-tests,sampling,train,sd,sweep}"
for p in ${PARTS//,/ }; do
  case "$p" in tests|sampling|train|sd|sweep) ;;
    *) echo "run.sh: part '$p': choose from tests, sampling, train, sd, sweep" >&2; exit 2 ;; esac
done
KIT="${KIT:-gpu-kit}"
PY="${PY:-python3}"
mkdir -p "$OUT/runs"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_MININTERVAL=5
if compgen -G "$KIT/wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/difflab-site "$KIT"/wheels/*.whl || exit 1
  export PYTHONPATH="$PWD/src:/tmp/difflab-site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
export DIFFLAB_CACHE="$OUT/cache"
DATA="$KIT/data"
if [ -n "${SMOKE:-}" ]; then
  DEV="${DEVICE:-cpu}"; TRAIN_MIN=0.1; SD_ARGS=(--size 64x64 --steps 2 --n 2 --repeats 1)
  SAMPLE_QUICK=(--preset quick --batch 100 --steps 5 --repeats 1 --modes eager,bf16)
  SAMPLE_PAPER=(--preset paper --batch 20 --steps 2 --repeats 1 --modes eager)
  TRAIN_ARGS=(--set train.batch_size=64); EVAL_N="10 --steps 5"; SWEEP_ARGS=(--steps 5 --n 2)
  TEST_ARGS=(--collect-only)  # without a GPU the gpu tests can only be collected
else
  DEV="${DEVICE:-cuda}"; TRAIN_MIN=1; SD_ARGS=(--model sd15-shaped --steps 50 --n 4 --repeats 1 --compile)
  SAMPLE_QUICK=(--preset quick --batch 20000 --steps 50 --repeats 2)
  SAMPLE_PAPER=(--preset paper --batch 4000 --steps 50 --repeats 1 --modes bf16,bf16+cl,bf16+graphs)
  TRAIN_ARGS=(--set train.compile=true --set train.channels_last=true); EVAL_N=100
  SWEEP_ARGS=(--steps 10,25,50 --n 50); TEST_ARGS=()
fi
BUDGET="${BUDGET:-540}"  # seconds for everything; each part gets at most what is left
has() { [[ ",$PARTS," == *",$1,"* ]]; }
part() {  # part NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, note the outcome
  local name="$1" limit="$2"; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 30 ]; then echo "== $name: skipped, ${left}s of the budget left" | tee -a "$OUT/summary.txt"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log"
}
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} | tee "$OUT/machine.txt"
if has tests; then
  part tests 120 "$PY" -m pytest -q -p no:cacheprovider -m gpu "${TEST_ARGS[@]}" \
    tests/test_training.py tests/test_sampling.py
fi
if has train; then
  [ -d "$DATA/MNIST/raw" ] || echo "no MNIST in $DATA: run benchmarks/gpu/prepare.sh first" | tee -a "$OUT/summary.txt"
  part train 150 "$PY" -m difflab train --preset paper --dataset mnist --data-dir "$DATA" \
    --minutes "$TRAIN_MIN" --device "$DEV" --out "$OUT/runs/paper" "${TRAIN_ARGS[@]}"
  cp "$OUT/runs/paper/metrics.jsonl" "$OUT/paper_metrics.jsonl" 2>/dev/null
  part eval 90 "$PY" -m difflab eval "$OUT/runs/paper" --n $EVAL_N --device "$DEV"
fi
if has sampling; then  # the small (quick) model at the target's batch, then the paper model
  part sampling_quick 90 "$PY" benchmarks/bench_sampling.py --device "$DEV" "${SAMPLE_QUICK[@]}"
  part sampling_paper 120 "$PY" benchmarks/bench_sampling.py --device "$DEV" "${SAMPLE_PAPER[@]}"
fi
if has sd; then
  part sd 240 "$PY" benchmarks/bench_sd.py --device "$DEV" "${SD_ARGS[@]}"
fi
if has sweep && [ -d "$OUT/runs/paper" ]; then
  part sweep 90 "$PY" benchmarks/bench_sweep.py "$OUT/runs/paper" --device "$DEV" "${SWEEP_ARGS[@]}"
fi
rm -rf "$OUT/cache" "$OUT/runs"
echo "done: $OUT" | tee -a "$OUT/summary.txt"
