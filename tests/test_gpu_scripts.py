"""The scripts a lent GPU runs first work here too: scripts/gpu_smoke.py on the CPU through the
Triton interpreter (what the GPU runs compiled), and gpu_session.sh parses."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import available_backends

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.skipif("triton" not in available_backends("attention", "cpu"), reason="no Triton interpreter here")
def test_gpu_smoke_script_on_cpu():
    env = dict(os.environ, TRITON_INTERPRET="1", SMOKE_DEVICE="cpu", SMOKE_BACKEND="triton")
    out = subprocess.run([sys.executable, str(SCRIPTS / "gpu_smoke.py")], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("rel err") == 4


def test_gpu_session_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPTS / "gpu_session.sh")], check=True)
