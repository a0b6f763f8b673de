"""Backend selection, forced-backend errors and `python -m ssl_fast.info`."""
import subprocess
import sys

import pytest
import torch

import ssl_fast
from ssl_fast import _backend
from ssl_fast.ops import ema_


def _reasons(table):
    return lambda b: table.get(b, [])


def test_auto_takes_the_first_backend_that_can_serve():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _backend.resolve("x", cpu, _reasons({})) == "cpp"
    assert _backend.resolve("x", cpu, _reasons({"cpp": ["no kernel"]})) == "reference"
    assert _backend.resolve("x", cuda, _reasons({})) == "triton"
    assert _backend.resolve("x", cuda, _reasons({"triton": ["head dim"]})) == "cpp"
    # the interpreter is a test device: auto never picks Triton for CPU tensors
    assert _backend.resolve("x", cpu, _reasons({"cpp": ["none"]})) == "reference"


def test_forced_backend_lists_every_reason_and_never_falls_back():
    with pytest.raises(ssl_fast.BackendUnavailableError) as info:
        _backend.resolve("my_op", torch.device("cpu"), _reasons({"triton": ["reason one", "reason two"]}), "triton")
    msg = str(info.value)
    assert "ssl_fast.ops.my_op" in msg and "'triton'" in msg and "reason one" in msg and "reason two" in msg


def test_set_backend_env_and_context(monkeypatch):
    monkeypatch.setenv("SSL_FAST_BACKEND", "reference")
    assert ssl_fast.get_backend() == "reference"
    with ssl_fast.use_backend("cpp"):
        assert ssl_fast.get_backend() == "cpp"
    assert ssl_fast.get_backend() == "reference"
    ssl_fast.set_backend("triton")
    try:
        assert ssl_fast.get_backend() == "triton"
    finally:
        ssl_fast.set_backend(None)
    monkeypatch.setenv("SSL_FAST_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="SSL_FAST_BACKEND must be one of"):
        ssl_fast.get_backend()
    with pytest.raises(ValueError, match="backend must be one of"):
        ssl_fast.set_backend("fastest")


def test_forced_backend_reaches_the_op(monkeypatch):
    from ssl_fast.ops import ema as ema_module

    monkeypatch.setattr(ema_module, "_reasons", lambda b, d: ["forced failure for the test"] if b == "cpp" else [])
    with ssl_fast.use_backend("cpp"):
        with pytest.raises(ssl_fast.BackendUnavailableError, match="forced failure for the test"):
            ema_([torch.zeros(2)], [torch.ones(2)], 0.5)
    t = [torch.zeros(2)]
    ema_(t, [torch.ones(2)], 0.5)  # auto skips the failing backend
    assert torch.equal(t[0], torch.full((2,), 0.5))


def test_info_reports_backends():
    out = subprocess.run([sys.executable, "-m", "ssl_fast.info"], capture_output=True, text=True, check=True).stdout
    assert "torch" in out and "ssl_fast._C: " in out
    assert "ema_" in out and "reference  available" in out
    from ssl_fast.ops import _registry

    for op in _registry.registered():  # every registered op, read from the one registry
        assert f"  {op} " in out and f"{op} cpu -> " in out
