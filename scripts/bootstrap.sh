#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with torch, triton, the test tools, and
# ssl_fast installed in editable mode with its C++ extension built against that torch.
# Re-running is cheap: the install is skipped while requirements, setup.py and csrc/ are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp_now=$(cat requirements.txt requirements-dev.txt setup.py $(find csrc -type f | sort) | sha256sum | cut -d' ' -f1)
if [ -f .bootstrap-stamp ] && [ "$(cat .bootstrap-stamp)" = "$stamp_now" ] \
        && .venv/bin/python -c "import ssl_fast" 2>/dev/null; then
    exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# torch first and on its own: its pin must resolve to the local CPU build before anything asks for torch.
.venv/bin/python -m pip install -q "$(grep '^torch==' requirements.txt)"
.venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
# The extension compiles against the installed torch, so no build isolation; --no-deps keeps pip
# from ever replacing that torch.
MAX_JOBS=${MAX_JOBS:-2} .venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
echo "$stamp_now" > .bootstrap-stamp
