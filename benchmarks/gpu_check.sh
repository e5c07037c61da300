#!/usr/bin/env bash
# fastft GPU check: one prepared run on a machine with one NVIDIA GPU (sized for an H200) and PyTorch preinstalled,
# no network. Finishes in under 8 minutes.
#
#   WHEELS=/path/to/wheels benchmarks/gpu_check.sh /path/to/out        # or: OUT=/path/to/out benchmarks/gpu_check.sh
#
# 1. Installs what is missing, only from the wheels folder (`pip install --no-index --find-links $WHEELS`):
#    torchvision, torchmetrics, safetensors, tensorboard, matplotlib, tqdm, pillow, numpy, nvidia-dali-cuda130 (when
#    a wheel is there; without DALI the DALI modes are reported as skipped), and fastft itself from this checkout
#    (--no-deps). Nothing is downloaded.
# 2. Runs the `gpu` suite of fastft/benchmark (`fastft bench`): resnet50 @224, bf16, channels_last, batch 256 on photo-like
#    JPEGs it generates (4096 train + 512 val): the forward-only limit, linear probe (in-memory synthetic input, DALI
#    and torchvision JPEG input, compile on/off), linear probe from the feature cache, partial and full fine-tune
#    (compile on/off), the naive seed loop, and the 10-epoch cached-probe vs seed-loop comparison; then the
#    `probe_wall` row (10-epoch cached resnet50 probe vs one forward pass over the same 4096 + 512 JPEGs, 2 pairs,
#    target <= 1.2) and the `save_gap` row (resnet50 full fine-tune at batch 256, step time at a checkpoint save vs a
#    normal step, sync vs background write, target <= 1.1), each started only if its estimate (60 s, 45 s) fits the
#    budget, else recorded as skipped with the reason; then the fastft vs timm-style loop comparison (full, partial).
# 3. Runs the CUDA tests (tests/test_gpu.py) when pytest is available (or installs from the wheels).
# 4. Writes <hardware>-<date>.json/.md, LATEST.md, gpu_check.log, gpu_tests.log and env.txt into the output folder.
#
# Environment: WHEELS (wheels folder), OUT (output folder, default benchmarks/results/gpu), PYTHON (default python),
# GPU_CHECK_BUDGET_S (modes that would start after this many seconds are recorded as skipped; default 270),
# GPU_CHECK_TIMEOUT_S (hard stop of the harness, which still writes what it measured; default 320),
# GPU_CHECK_TESTS (1: also run tests/test_gpu.py after the suite; 0: skip), GPU_CHECK_TESTS_TIMEOUT_S (default 70).
# With installs (~1 min at most from local wheels) the whole check stays under 8 minutes.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-${OUT:-$REPO/benchmarks/results/gpu}}"
PY="${PYTHON:-python}"
WHEELS="${WHEELS:-}"
BUDGET="${GPU_CHECK_BUDGET_S:-270}"
HARD_STOP="${GPU_CHECK_TIMEOUT_S:-320}"
RUN_TESTS="${GPU_CHECK_TESTS:-1}"
TESTS_TIMEOUT="${GPU_CHECK_TESTS_TIMEOUT_S:-70}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
START=$SECONDS
log() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # fastft and benchmarks/ importable even if the install fails
# The generated JPEGs go under the output folder (.cache), not under $HOME.
export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$OUT/.cache}"

"$PY" - <<'EOF' | tee -a "$LOG"
import torch
assert torch.cuda.is_available(), "gpu_check: no CUDA device visible"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
EOF

has() { "$PY" -c "import $1" >/dev/null 2>&1; }
pip_wheels() {
    if [ -z "$WHEELS" ]; then
        log "cannot install $*: no WHEELS folder given"
        return 1
    fi
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "$@" 2>&1 | tee -a "$LOG"
    return "${PIPESTATUS[0]}"
}

for pair in torchvision:torchvision torchmetrics:torchmetrics safetensors:safetensors tensorboard:tensorboard \
            matplotlib:matplotlib tqdm:tqdm PIL:pillow numpy:numpy; do
    mod="${pair%%:*}"; pkg="${pair##*:}"
    if ! has "$mod"; then
        log "installing $pkg from $WHEELS"
        pip_wheels "$pkg" || { log "ERROR: $pkg is required and could not be installed"; exit 1; }
    fi
done
if ! has nvidia.dali; then
    if [ -n "$WHEELS" ] && compgen -G "$WHEELS/nvidia_dali_cuda130-*.whl" >/dev/null; then
        log "installing nvidia-dali-cuda130 from $WHEELS"
        pip_wheels nvidia-dali-cuda130 || log "DALI did not install: the DALI modes will be reported as skipped"
    else
        log "no nvidia-dali-cuda130 wheel: the DALI modes will be reported as skipped"
    fi
fi
if ! (cd / && has fastft); then
    log "installing fastft from $REPO (--no-deps)"
    "$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation "$REPO" 2>&1 | tee -a "$LOG" \
        || log "fastft did not install; running it from the checkout (PYTHONPATH)"
fi

{
    echo "date: $(date -Is)"; echo "host: $(hostname)"; echo "repo: $REPO"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || true
    "$PY" -m pip freeze 2>/dev/null | grep -iE '^(torch|torchvision|nvidia-dali|torchmetrics|numpy|pillow|fastft)' || true
} > "$OUT/env.txt"

log "running the gpu suite (budget ${BUDGET}s, hard stop ${HARD_STOP}s)"
status=0
timeout --signal=INT --kill-after=20 "$HARD_STOP" \
    "$PY" -m fastft.benchmark --suite gpu --device cuda --out "$OUT" --time-budget "$BUDGET" 2>&1 | tee -a "$LOG" \
    || status=$?
if [ "$status" -ne 0 ]; then
    log "the harness exited with status $status (124: the hard stop was reached; what it had measured is written); see $LOG"
fi

# The CUDA tests (tests/test_gpu.py: auto precision, device-resident batches, DALI GPU decode vs CPU, a whole run
# with DALI + compiled head), when pytest is there or installs from the wheels; their result goes to gpu_tests.log.
if [ "$RUN_TESTS" = 1 ] && { has pytest || pip_wheels pytest; }; then
    log "running the GPU tests (hard stop ${TESTS_TIMEOUT}s)"
    tests=0
    timeout --kill-after=10 "$TESTS_TIMEOUT" "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py \
        > "$OUT/gpu_tests.log" 2>&1 || tests=$?
    log "GPU tests: $(tail -n 1 "$OUT/gpu_tests.log") (status $tests)"
fi
[ "$status" -eq 0 ] || exit "$status"
log "done in $((SECONDS - START))s: $(ls "$OUT"/*.json)"
