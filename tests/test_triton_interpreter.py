"""ssl_fast/_triton.py's fixes to the Triton interpreter, which the tests run every kernel through
on a machine without a GPU: they must make it compute what compiled kernels compute."""
import pytest
import torch

from ssl_fast import _triton

pytestmark = pytest.mark.skipif(not _triton.INTERPRET or _triton.TRITON_VERSION is None,
                                reason="the fixes apply to the Triton interpreter only")


def test_float32_to_bfloat16_rounds_to_nearest_even_as_on_a_gpu():
    import triton
    import triton.language as tl

    @triton.jit
    def cast(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        v = tl.load(x_ptr + offs, mask=offs < n)
        tl.store(y_ptr + offs, v.to(tl.bfloat16), mask=offs < n)

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(500, generator=g) * 10.0 ** torch.randint(-30, 30, (500,), generator=g),
                   torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38, 1e-40, -0.0,
                                 0.5703125 - 0.001])])  # the last one rounds up, not toward zero
    y = torch.empty(x.shape, dtype=torch.bfloat16).fill_(7)
    cast[(1,)](x, y, x.numel(), BLOCK=1024)
    want = x.to(torch.bfloat16)
    assert torch.equal(y.view(torch.int16), want.view(torch.int16))
