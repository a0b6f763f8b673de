#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch, torchvision, triton, the test tools
# and the real peer libraries (timm, transformers, lightly), and ssl_fast installed in editable
# mode with its C++ extension (CPU kernels, and the CUDA kernels where nvcc is found) built
# against that torch. Re-running is cheap: the install is skipped while requirements, setup.py
# and csrc/ are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp_now=$(cat requirements.txt requirements-dev.txt setup.py $(find csrc -type f | sort) | sha256sum | cut -d' ' -f1)
if [ -f .bootstrap-stamp ] && [ "$(cat .bootstrap-stamp)" = "$stamp_now" ] \
        && .venv/bin/python -c "import ssl_fast._C" 2>/dev/null; then
    exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch and torchvision first and together, from their pins; every later install is constrained
# to the same pins (-c), so no package can swap that torch for another.
.venv/bin/python -m pip install -q $(grep -E '^(torch|torchvision)==' requirements.txt)
.venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt -c requirements.txt
# The extension compiles against the installed torch, so no build isolation; --no-deps keeps pip
# from ever replacing that torch. setup.py fails the install when nothing can be built.
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
if [ "${SSL_FAST_BUILD_EXT:-1}" != "0" ]; then
    .venv/bin/python -c "import ssl_fast._C" || { echo "bootstrap: ssl_fast._C was built but does not import" >&2; exit 1; }
fi
.venv/bin/python -m ssl_fast.info --build
echo "$stamp_now" > .bootstrap-stamp
