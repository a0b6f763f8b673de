#!/usr/bin/env bash
# One call per step on a machine with an NVIDIA GPU and its own python3 (torch, triton, pytest,
# hypothesis installed; no network needed):
#
#   bash scripts/gpu_session.sh check            # build, GPU smoke test, sm_90 compile report, tests
#   bash scripts/gpu_session.sh bench [OP ...]   # build, benchmarks on cuda (default: every op)
#
# Each step builds ssl_fast._C against that python's torch first (a fresh machine keeps nothing).
# Logs, the compile report and the benchmark CSV go to $OUT (default ./gpu_out); copy the CSV rows
# into benchmarks/results/ afterwards. The last lines printed are the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
STEP=${1:-check}
shift || true
OUT=${OUT:-$PWD/gpu_out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
unset TRITON_INTERPRET

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true
"$PY" - <<'EOF' | tee "$OUT/versions.txt"
import sys, torch, triton
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"{torch.cuda.get_device_name()} | python {sys.version.split()[0]} | torch {torch.__version__} | "
      f"triton {triton.__version__} | CUDA {torch.version.cuda}")
EOF

t0=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install -q --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
"$PY" -m ssl_fast.info --build | tee "$OUT/build_info.txt"

case "$STEP" in
  check)
    # the conv projection and attention once on the GPU, against float64 PyTorch
    SMOKE_DEVICE=cuda SMOKE_BACKEND=triton "$PY" scripts/gpu_smoke.py 2>&1 | tee "$OUT/smoke.txt"
    "$PY" scripts/check_triton_compile.py > "$OUT/compile.txt" 2>&1 || true
    tail -1 "$OUT/compile.txt"
    t0=$(date +%s)
    CI=true "$PY" -m pytest -q -x -p no:cacheprovider tests > "$OUT/tests.log" 2>&1 || true
    echo "tests ($(( $(date +%s) - t0 )) s): $(tail -1 "$OUT/tests.log")"
    ;;
  bench)
    OPS=("$@")
    [ ${#OPS[@]} -eq 0 ] && OPS=(conv_projection cvt_step attention dino_loss dino_step ema)
    "$PY" benchmarks/run.py --device cuda --op "${OPS[@]}" --out "$OUT/results" > "$OUT/bench.log" 2>&1 || true
    grep -E "x( |$)|rror" "$OUT/bench.log" | tail -60
    ;;
  *)
    echo "unknown step '$STEP': check or bench" >&2
    exit 2
    ;;
esac
