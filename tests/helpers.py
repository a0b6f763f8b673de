"""Helpers shared by the tests: error measures, poisoning, backend lists, hypothesis strategies."""
import importlib

import pytest
import torch
from hypothesis import strategies as st

from ssl_fast import _backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ODD_TOKENS = [1, 7, 49, 197]  # 3136 is too slow for the interpreter; the GPU benchmarks cover it


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """norm(out - ref) / norm(ref), in float64 (0 when both are zero)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def assert_matches_reference(out, ref64, same_dtype_ref=None, *, fp32_tol=1e-5, what="output"):
    """DESIGN.md's rule: float32 within ``fp32_tol`` of the float64 truth; fp16/bf16 no worse
    than 2x the error of the same op computed by eager PyTorch in that dtype (plus a floor of
    a few ulps, for results that the low-precision reference happens to get exactly)."""
    err = rel_error(out, ref64)
    if out.dtype in (torch.float32, torch.float64):
        assert err <= fp32_tol, f"{what}: relative error {err:.3g} > {fp32_tol:g} ({out.dtype})"
    else:
        assert same_dtype_ref is not None, "low-precision outputs need the same-dtype baseline"
        base = rel_error(same_dtype_ref, ref64)
        floor = 4 * torch.finfo(out.dtype).eps
        assert err <= 2 * base + floor, (
            f"{what}: relative error {err:.3g} > 2 x baseline {base:.3g} + {floor:.3g} ({out.dtype})")


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (so an output a kernel forgets to write cannot pass)."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)


def available_backends(op_module: str, device) -> list:
    """Backends of ``ssl_fast.ops.<op_module>`` that can run on ``device`` here."""
    mod = importlib.import_module(f"ssl_fast.ops.{op_module}")
    return [b for b in _backend.BACKENDS if not list(mod._reasons(b, torch.device(device)))]


def backend_params(op_module: str, device="cpu") -> list:
    """pytest params for every backend; those unavailable here are marked skip with the reason."""
    mod = importlib.import_module(f"ssl_fast.ops.{op_module}")
    out = []
    for b in _backend.BACKENDS:
        why = list(mod._reasons(b, torch.device(device)))
        out.append(pytest.param(b, marks=pytest.mark.skip(reason="; ".join(why))) if why else b)
    return out


dtypes = st.sampled_from(DTYPES)
