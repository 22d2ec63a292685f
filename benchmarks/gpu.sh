#!/usr/bin/env bash
# Every issue-7 benchmark on one GPU in one call of at most ~9.5 minutes, as Markdown on stdout
# and in a file (first argument; default $OUT/gpu-benchmarks.md, or ./gpu-benchmarks.md).
#
#   bash benchmarks/gpu.sh [results.md]
#
# Needs torch (with CUDA and triton) and timm, which the lent machines have. pixelrepa runs
# from this checkout (PYTHONPATH), not installed. Only the encoder figure imports safetensors:
# if it is missing it is installed from benchmarks/wheels/ (gitignored; build it beforehand
# with `pip download safetensors tqdm --no-deps -d benchmarks/wheels` and carry it along),
# else that figure is skipped. Each figure has its own time limit inside an overall budget
# (BUDGET_S, default 560 s); a figure that fails or runs out of time is reported as such
# and the script goes on.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS="${1:-${OUT:-.}/gpu-benchmarks.md}"
BUDGET_S="${BUDGET_S:-560}"
PY="${PYTHON:-python}"
: > "$RESULTS"

emit() { echo "$*" | tee -a "$RESULTS"; }

# run LIMIT_S TITLE COMMAND...: one figure, cut at LIMIT_S or what is left of the budget.
run() {
    local limit=$1 title=$2; shift 2
    local left=$((BUDGET_S - SECONDS - 5))
    (( limit > left )) && limit=$left
    emit ""
    emit "## $title"
    emit ""
    if (( limit < 20 )); then
        emit "skipped: the time budget is spent"
        return
    fi
    emit "\`$*\` (limit ${limit} s)"
    emit ""
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | grep -v -e "^W[0-9]" -e "^  warnings.warn" | tee -a "$RESULTS"
    local rc=${PIPESTATUS[0]}
    (( rc != 0 )) && emit "" && emit "**exit status $rc** (124: ran out of time)"
}

emit "# pixelrepa GPU benchmarks ($(date -u +%Y-%m-%dT%H:%MZ))"
emit ""
emit "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi unavailable')"
emit "$($PY -c 'import torch, timm; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, timm {timm.__version__}")' 2>&1)"

if ! $PY -c "import safetensors" 2>/dev/null && [ -d benchmarks/wheels ]; then
    $PY -m pip install --quiet --no-index --find-links benchmarks/wheels safetensors tqdm >/dev/null 2>&1 \
        && emit "installed safetensors and tqdm from benchmarks/wheels"
fi

run 30 "Matmul rate (the MFU denominator) and memory bandwidth" \
    $PY benchmarks/matmul_rate.py --device cuda
run 150 "Training step, PixelREPA-B/16, 128 img/GPU: fast vs reference" \
    $PY benchmarks/step_time.py --device cuda --preset PixelREPA-B/16 --batch 128 --warmup 3 --repeats 10
run 130 "Sampling, JiT-B/16, Heun-50, CFG interval (0.1, 1.0), batch 128: fast vs reference" \
    $PY benchmarks/sampling.py --device cuda --batch 128 --steps 50 --repeats 2
run 45 "Peak memory, PixelREPA-B/16 at 32 img/GPU (fast path, eager)" \
    $PY benchmarks/step_time.py --device cuda --preset PixelREPA-B/16 --batch 32 --compile none --no-reference --warmup 2 --repeats 3
run 50 "Peak memory, PixelREPA-L/16 at 64 img/GPU (fast path, eager)" \
    $PY benchmarks/step_time.py --device cuda --preset PixelREPA-L/16 --batch 64 --compile none --no-reference --warmup 2 --repeats 3
run 70 "Peak memory, PixelREPA-H/16 at 128 img/GPU with activation checkpointing (fast path, eager)" \
    $PY benchmarks/step_time.py --device cuda --preset PixelREPA-H/16 --batch 128 --checkpointing --compile none --no-reference --warmup 1 --repeats 2
if $PY -c "import safetensors" 2>/dev/null; then
    run 45 "Encoder targets, DINOv2-B at 256 px (patch 16), batch 128" \
        $PY benchmarks/encoder_targets.py --device cuda --batch 128
else
    emit "" && emit "## Encoder targets" && emit "" && emit "skipped: safetensors is not installed and benchmarks/wheels/ is absent"
fi
run 30 "EMA update, JiT-B/16, two decays" \
    $PY benchmarks/ema_update.py --device cuda
for mode in ddp fsdp2; do
    run 75 "Trainer, JiT-B/16 at 256 px, global batch 64, train.parallel=$mode, every visible GPU (one GPU: unwrapped)" \
        $PY benchmarks/train_throughput.py --device cuda --preset JiT-B/16 --image-size 256 --global-batch 64 \
        --steps 30 --procs 8 --parallel $mode
done

emit ""
emit "total ${SECONDS} s; results in $RESULTS"
