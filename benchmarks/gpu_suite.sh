#!/usr/bin/env bash
# One run on a GPU machine with no network: build, GPU tests, benchmark; everything it writes goes to one folder.
#
#   benchmarks/gpu_suite.sh OUT_DIR        (or set $OUT)   run from anywhere; total wall time under 8 minutes
#
# Installs nothing from the network: torch, triton, transformers, peft, ninja, pybind11 must already be there.
# Every step has its own time limit, and a step that fails or times out is logged and the next one still runs.
# Files written (flat, at most 8): suite.log (environment, build, info, step status), tests.log, and the benchmark's
# bench.json, bench.csv, bench_model.csv, bench.md, bench.png, bench_model.png.
set -u -o pipefail

OUT_DIR="${1:-${OUT:-}}"
if [ -z "$OUT_DIR" ]; then
    echo "usage: $0 OUT_DIR (or set OUT)" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.."
LOG="$OUT_DIR/suite.log"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
TOTAL_S="${SUITE_TOTAL_S:-470}"  # whole suite; each step below gets at most its cap and what is left
START=$SECONDS
FAILED=()

log() { echo "[suite $((SECONDS - START))s] $*" | tee -a "$LOG"; }

remaining() { echo $((TOTAL_S - (SECONDS - START))); }

# step NAME CAP_SECONDS LOGFILE COMMAND...: run with a limit of min(cap, time left - reserve), record the outcome.
step() {
    local name=$1 cap=$2 logfile=$3
    shift 3
    local left
    left=$(($(remaining) - ${RESERVE_S:-0}))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then
        log "SKIPPED $name: only ${left}s left"
        FAILED+=("$name(skipped)")
        return
    fi
    log "START $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >>"$logfile" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then
        log "OK $name"
    else
        [ $rc -eq 124 ] && log "TIMEOUT $name after ${limit}s" || log "FAILED $name (exit $rc)"
        FAILED+=("$name")
    fi
}

{
    echo "== mora_kernels GPU suite, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi unavailable"
    "$PY" --version 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| triton', triton.__version__)" 2>&1
} >>"$LOG"

# CUDA_HOME: the toolkit root above nvcc's bin, holding include/cuda_runtime.h. The nvcc on PATH may be a wrapper
# script (then the folder above it is not the toolkit), so candidates are checked, not guessed.
is_toolkit() { [ -x "$1/bin/nvcc" ] && [ -f "$1/include/cuda_runtime.h" ]; }
if [ -z "${CUDA_HOME:-}" ] || ! is_toolkit "$CUDA_HOME"; then
    NVCC="$(command -v nvcc || true)"
    for candidate in ${NVCC:+"$(dirname "$(dirname "$(readlink -f "$NVCC")")")"} \
        ${NVCC:+"$(sed -n 's|^exec \(.*\)/bin/nvcc.*|\1|p' "$NVCC" 2>/dev/null | head -1)"} /usr/local/cuda /usr/local/cuda-*; do
        if [ -n "$candidate" ] && is_toolkit "$candidate"; then
            export CUDA_HOME="$candidate"
            break
        fi
    done
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export MORA_KERNELS_BUILD_CUDA="${MORA_KERNELS_BUILD_CUDA:-1}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 PYTHONUNBUFFERED=1
# Kernels compiled for the GPU, not interpreted: tests/conftest.py only sets TRITON_INTERPRET when it is unset.
export TRITON_INTERPRET=0
log "CUDA_HOME=${CUDA_HOME:-unset} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS TRITON_INTERPRET=$TRITON_INTERPRET"

# Limits add up to the 470 s total: build 150 s, tests 120 s, benchmark the rest (at least its 170 s budget + files).
RESERVE_S=290 step build 150 "$LOG" "$PY" -m pip install -e . --no-build-isolation --no-deps -v
step info 30 "$LOG" "$PY" -m mora_kernels info
RESERVE_S=200 step tests 120 "$OUT_DIR/tests.log" "$PY" -m pytest tests/ -q -rs -p no:cacheprovider
step bench 220 "$LOG" "$PY" -m mora_kernels bench --output-dir "$OUT_DIR" --no-progress \
    --warmup-ms 10 --rep-ms 40 --time-budget 170

log "done in $((SECONDS - START))s; files: $(ls "$OUT_DIR" | tr '\n' ' ')"
if [ ${#FAILED[@]} -gt 0 ]; then
    log "steps not OK: ${FAILED[*]}"
    exit 1
fi
exit 0
