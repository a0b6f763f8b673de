"""Test set-up: Triton's interpreter on machines without a GPU, hypothesis profiles, devices.

``TRITON_INTERPRET=1`` is set here, before anything imports triton, unless a GPU is present
(then Triton compiles for real and CPU-tensor Triton tests skip). ``SSL_FAST_TEST_INTERPRET=1``
forces the interpreter even on a GPU machine.
"""
import os
import shutil
import sys

_has_gpu = shutil.which("nvidia-smi") is not None and os.environ.get("SSL_FAST_TEST_INTERPRET") != "1"
if not _has_gpu:
    assert "triton" not in sys.modules, "triton was imported before tests/conftest.py could set TRITON_INTERPRET"
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=8, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or
                      ("ci" if os.environ.get("CI", "").lower() == "true" else "dev"))

# Test tensors are tiny: one intra-op thread avoids OpenMP oversubscription stalls (seen at
# 1000x on a busy 2-core machine, and in multi-process tests). SSL_FAST_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("SSL_FAST_TEST_THREADS", "1")))
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
