#!/usr/bin/env bash
# One run on a GPU machine with no network: build, GPU tests, tuning, benchmark, memorization; results in one folder.
#
#   benchmarks/gpu_suite.sh OUT_DIR        (or set $OUT)   run from anywhere; 450 s at most (SUITE_TOTAL_S)
#
# Installs nothing and needs no network: torch, triton, transformers, peft, ninja, pytest and hypothesis must already
# be there (pytest-xdist is used when present), and for the CUDA build the CUTLASS headers: the nvidia-cutlass wheel,
# or a CUTLASS include folder named by MORA_KERNELS_CUTLASS_INCLUDE. The package runs from this checkout (PYTHONPATH), not pip-installed,
# so the GPU machine's setuptools (of unknown version; pyproject.toml's license field needs >= 77) cannot fail it;
# the CUDA extension is built just in time into a folder of the run.
# Order: build (the GPU tests need it), the GPU correctness tests (only those marked gpu: CPU tests belong to CI),
# the tuning sweep, the benchmark, then the memorization experiment at GPU scale in the time left. Every step has its own
# limit, sized from measurements (below); a step that fails or times out is logged and the next one still runs.
# Without a GPU (a rehearsal, as CI runs it) the GPU-only steps are logged as skipped and the benchmark runs --quick.
#
# Files written to OUT_DIR, flat: the few a reader opens first (suite.log: environment, build, info, each step's
# status and time; tests.log, tests.xml (junit), tune.json, bench.json, bench.md, memorize.json), and rest.tar.gz with
# everything else (the benchmark's CSV and plots, the tuning and memorization logs and plot), so that one listing of
# OUT_DIR shows the outcome.
set -u -o pipefail

OUT_DIR="${1:-${OUT:-}}"
if [ -z "$OUT_DIR" ]; then
    echo "usage: $0 OUT_DIR (or set OUT)" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.."
REPO="$PWD"
WORK="$(mktemp -d)"  # everything not returned flat; packed into rest.tar.gz at the end
LOG="$OUT_DIR/suite.log"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
TOTAL_S="${SUITE_TOTAL_S:-450}"  # whole suite; each step gets at most its cap and what is left
START=$SECONDS
FAILED=()

log() { echo "[suite $((SECONDS - START))s] $*" | tee -a "$LOG"; }

remaining() { echo $((TOTAL_S - (SECONDS - START))); }

# step NAME CAP_SECONDS LOGFILE COMMAND...: run with a limit of min(cap, time left - RESERVE_S), record the outcome.
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
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >>"$logfile" 2>&1
    local rc=$?
    if [ $rc -eq 0 ]; then
        log "OK $name in $((SECONDS - t0))s"
    else
        [ $rc -eq 124 ] && log "TIMEOUT $name after ${limit}s" || log "FAILED $name (exit $rc) after $((SECONDS - t0))s"
        FAILED+=("$name")
    fi
}

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 PYTHONUNBUFFERED=1
# Kernels compiled for the GPU, not interpreted: tests/conftest.py only sets TRITON_INTERPRET when it is unset.
export TRITON_INTERPRET=0
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export MORA_KERNELS_BUILD_DIR="${MORA_KERNELS_BUILD_DIR:-$WORK/cuda-build}"
GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
{
    echo "== mora_kernels GPU suite, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi unavailable"
    "$PY" --version 2>&1
    "$PY" -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| triton', triton.__version__, '| numpy', numpy.__version__)" 2>&1
    "$PY" -c "import setuptools; print('setuptools', setuptools.__version__)" 2>&1
    echo "nproc $(nproc); GPU=$GPU"
} >>"$LOG"
[ "$GPU" = 1 ] || log "no CUDA GPU: a rehearsal; GPU-only steps are skipped"
# CUDA_HOME (the toolkit root above nvcc's bin) and the arch list are found by the package itself
# (cuda_mora.configure_build_environment), the nvcc wrapper script case included.
if [ "$GPU" = 1 ]; then
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}"
fi
log "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-package default} MAX_JOBS=$MAX_JOBS TRITON_INTERPRET=$TRITON_INTERPRET"

# Limits (450 s in all): the build (its time on 2 CI cores: docs/testing.md's run times), most of it one torch-header
# .cpp that no core count shortens -> 120 s cap; the GPU tests (~200 Triton variants to compile, ~0.5 s each, spread over xdist workers) ->
# 130 s; tuning 60 s budget; the benchmark 110 s budget; memorization what is left.
step build 120 "$LOG" "$PY" -m mora_kernels build
step info 30 "$LOG" "$PY" -m mora_kernels info
# -v: one line per test as it ends, so a log cut short by the limit still says what passed.
PLUGINS=()
if "$PY" -c "import xdist" 2>/dev/null; then
    PLUGINS+=(-n 8)
fi
if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    PLUGINS+=(--timeout 90)
fi
RESERVE_S=240 step tests 130 "$OUT_DIR/tests.log" "$PY" -m pytest tests/ -m gpu -v -rs -p no:cacheprovider \
    --durations=15 "${PLUGINS[@]}" --junitxml="$OUT_DIR/tests.xml"
if [ "$GPU" = 1 ]; then
    RESERVE_S=160 step tune 75 "$WORK/tune.log" "$PY" -m mora_kernels tune --time-budget 60 \
        --output "$OUT_DIR/tune.json"
    RESERVE_S=40 step bench 150 "$LOG" "$PY" -m mora_kernels bench --output-dir "$WORK" --name bench --no-progress \
        --warmup-ms 10 --rep-ms 40 --time-budget 110
    # What is left (at least ~40 s): the memorization experiment at GPU scale, runs cut by its own time budget.
    step memorize 300 "$WORK/memorize.log" "$PY" -m mora_kernels memorize --device cuda --scale gpu \
        --output-dir "$WORK" --name memorize --no-progress --time-budget "$(( $(remaining) > 40 ? $(remaining) - 25 : 10 ))"
else
    log "SKIPPED tune, memorize: no GPU"
    step bench 120 "$LOG" "$PY" -m mora_kernels bench --quick --output-dir "$WORK" --name bench --no-progress
fi

for f in bench/bench.json bench/bench.md memorize/memorize.json; do
    [ -f "$WORK/$f" ] && cp "$WORK/$f" "$OUT_DIR/"
done
log "done in $((SECONDS - START))s"
(cd "$WORK" && tar -czf "$OUT_DIR/rest.tar.gz" --exclude=cuda-build --exclude=latest --exclude=bench.json \
    --exclude=memorize.json . 2>/dev/null)
log "files: $(ls "$OUT_DIR" | tr '\n' ' ')"
rm -rf "$WORK"
if [ ${#FAILED[@]} -gt 0 ]; then
    log "steps not OK: ${FAILED[*]}"
    exit 1
fi
exit 0
