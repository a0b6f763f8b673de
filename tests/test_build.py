"""What setup.py built (ssl_fast/_build_info.json, ``python -m ssl_fast.info --build``).

On a machine with a CUDA build of torch and ``nvcc`` (CI's, this one) the CUDA kernels must have
been compiled: setup.py falls back to the CPU kernels when they fail, so without this test a
``.cu`` that stops compiling would pass unnoticed."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import ssl_fast
from ssl_fast import _ext

BUILD_INFO = os.path.join(os.path.dirname(ssl_fast.__file__), "_build_info.json")
pytestmark = pytest.mark.skipif(not os.path.exists(BUILD_INFO),
                                reason="ssl_fast was not installed through setup.py (no build record)")


def _info():
    with open(BUILD_INFO) as f:
        return json.load(f)


def test_extension_built_against_this_torch_and_loads():
    info = _info()
    if not info["built"]:
        pytest.skip(f"the extension was not built: {info.get('why')}")
    assert _ext.extension_error() is None, _ext.extension_error()
    assert info["torch"] == torch.__version__
    assert not any(f.startswith("-std=") for f in info["cxx_flags"]), "torch's helpers choose the C++ standard"


@pytest.mark.skipif(shutil.which("nvcc") is None or torch.version.cuda is None,
                    reason="no nvcc, or torch is not a CUDA build: the CUDA kernels are not expected")
def test_cuda_kernels_compiled_where_nvcc_is():
    info = _info()
    if os.environ.get("SSL_FAST_BUILD_CUDA") == "0" or not info["built"]:
        pytest.skip("the CUDA kernels were switched off")
    assert info["cuda"], f"the CUDA kernels were not compiled: {info['cuda_why_not']}"
    assert ssl_fast._C.with_cuda
    kernels = _ext.cpp_kernels()
    assert "cuda" in kernels["ema_"], kernels


def test_info_build_line():
    out = subprocess.run([sys.executable, "-m", "ssl_fast.info", "--build"], capture_output=True, text=True,
                         check=True).stdout
    info = _info()
    if info["built"]:
        assert f"torch {info['torch']}" in out and "loads" in out
        assert ("CPU + CUDA kernels" in out) == info["cuda"]
    else:
        assert "not built" in out
