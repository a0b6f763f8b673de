"""``ssl_fast.nn.CvtSelfAttention`` (ssl_fast/nn/conv_attention.py) against Hugging Face
transformers' real ``CvtSelfAttention``: same constructor, state_dict, forward; outputs, input and
parameter gradients and BatchNorm running statistics in train and eval mode, with and without a
class token, for q/k/v strides 1 and 2, through every conv-projection backend available here.
(The patch rule that swaps it into real CvT models is tested in tests/patch/test_hf_rules.py; the
official microsoft/CvT ``Attention`` and ``ssl_fast.nn.ConvAttention`` in tests/test_conv_projection.py.)
"""
import copy
import functools

import pytest
import torch

pytest.importorskip("transformers")
from transformers.models.cvt.modeling_cvt import CvtSelfAttention  # noqa: E402

from helpers import available_backends, rel_error  # noqa: E402
from ssl_fast import ops  # noqa: E402
from ssl_fast.nn import CvtSelfAttention as FastCvtSelfAttention  # noqa: E402


def _randomise(module, seed=0):
    """Random BatchNorm statistics and affine terms (HF initialises them to 0/1) and biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * (0.3 if t.dim() > 1 else 1.0))
    return module


def _grads(model, out, cot, extra=()):
    named = list(model.named_parameters())
    gs = torch.autograd.grad(out, [p for _, p in named] + list(extra), cot, allow_unused=True)
    return {n: g for (n, _), g in zip(named, gs)}, gs[len(named):]


def _close_grads(ga, gb, tol):
    assert ga.keys() == gb.keys()
    for n in ga:
        a, b = ga[n], gb[n]
        assert (a is None) == (b is None), n
        if a is not None:  # absolute floor: the key projection's bias gets a zero gradient up to rounding
            assert (a - b).norm() <= tol * (1 + b.norm()), (n, rel_error(a, b))


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the fused ops (so a silent fall-back to the plain path cannot pass)."""
    calls = {"conv": 0, "attention": 0}
    conv, attn = ops.conv_qkv_projection, ops.attention

    def conv_spy(*a, **k):
        calls["conv"] += 1
        return conv(*a, **k)

    def attn_spy(*a, **k):
        calls["attention"] += 1
        return attn(*a, **k)

    monkeypatch.setattr(ops, "conv_qkv_projection", conv_spy)
    monkeypatch.setattr(ops, "attention", attn_spy)
    return calls


@pytest.mark.parametrize("cls_token", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("hw,heads,strides", [((5, 7), 2, (1, 2)), ((4, 4), 1, (2, 2)), ((6, 3), 3, (1, 1))])
def test_matches_hugging_face(cls_token, training, hw, heads, strides, spy):
    torch.manual_seed(hash((cls_token, training, hw)) % 1000)
    C, (h, w), (sq, skv) = 12, hw, strides
    hf = _randomise(CvtSelfAttention(heads, C, 3, 1, 1, sq, skv, "dw_bn", True, 0.0, cls_token)).double()
    mine = FastCvtSelfAttention(heads, C, 3, 1, 1, sq, skv, "dw_bn", True, 0.0, cls_token).double()
    assert list(mine.state_dict()) == list(hf.state_dict())
    res = mine.load_state_dict(hf.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    hf.train(training), mine.train(training)
    x = torch.randn(3, h * w + int(cls_token), C, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expect, got = hf(x1, h, w), mine(x2, h, w)
    assert spy == {"conv": 1, "attention": 1}
    tq = ((h - 1) // sq + 1) * ((w - 1) // sq + 1) + int(cls_token)
    assert got.shape == expect.shape == (3, tq, C)
    assert rel_error(got, expect) < 1e-10
    cot = torch.randn_like(expect)
    ge, (gxe,) = _grads(hf, expect, cot, [x1])
    gg, (gxg,) = _grads(mine, got, cot, [x2])
    assert rel_error(gxg, gxe) < 1e-10
    _close_grads(gg, ge, 1e-10)
    for (k1, b1), (k2, b2) in zip(mine.named_buffers(), hf.named_buffers()):
        assert k1 == k2 and rel_error(b1, b2) < 1e-12, k1
    if training:  # the running statistics moved (and by the same amount, above)
        assert int(mine.convolution_projection_key.convolution_projection.normalization.num_batches_tracked) == 1
    # and back: the drop-in's state loads into a fresh HF module and gives the same output
    back = CvtSelfAttention(heads, C, 3, 1, 1, sq, skv, "dw_bn", True, 0.0, cls_token).double().train(training)
    back.load_state_dict(mine.state_dict(), strict=True)
    mine_again = copy.deepcopy(mine)
    x3 = torch.randn_like(x)
    assert rel_error(mine_again(x3, h, w), back(x3, h, w)) < 1e-10


def test_plain_path_for_other_kernels(spy):
    """kernel 5 / padding 2 (not what the fused op computes): the projections run as written."""
    torch.manual_seed(1)
    hf = _randomise(CvtSelfAttention(2, 8, 5, 2, 2, 1, 2, "dw_bn", False, 0.0, True)).double()
    mine = FastCvtSelfAttention(2, 8, 5, 2, 2, 1, 2, "dw_bn", False, 0.0, True).double()
    mine.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2, 1 + 6 * 5, 8, dtype=torch.float64, requires_grad=True)
    for training in (True, False):
        hf.train(training), mine.train(training)
        assert rel_error(mine(x, 6, 5), hf(x, 6, 5)) < 1e-10
    assert spy == {"conv": 0, "attention": 2}


def test_mixed_batchnorm_modes_run_as_written(spy):
    """One BatchNorm frozen (eval) in a training module: the norms' own modes decide, as in HF."""
    torch.manual_seed(3)
    hf = _randomise(CvtSelfAttention(2, 8, 3, 1, 1, 1, 2, "dw_bn", True, 0.0, True)).double().train()
    mine = FastCvtSelfAttention(2, 8).double().train()
    mine.load_state_dict(hf.state_dict())
    for m in (hf, mine):
        m.convolution_projection_value.convolution_projection.normalization.eval()
    x = torch.randn(2, 1 + 4 * 4, 8, dtype=torch.float64)
    assert rel_error(mine(x, 4, 4), hf(x, 4, 4)) < 1e-10
    assert spy == {"conv": 0, "attention": 1}
    for (k1, b1), (_, b2) in zip(mine.named_buffers(), hf.named_buffers()):
        assert rel_error(b1, b2) < 1e-12, k1


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
def test_backends_float32(backend, monkeypatch):
    """float32 through each conv-projection backend available here (attention through the same
    backend where it has one, else the reference), against Hugging Face in float64."""
    if backend not in available_backends("conv_projection", "cpu"):
        pytest.skip(f"{backend} is not available here")
    attn_backend = backend if backend in available_backends("attention", "cpu") else "reference"
    monkeypatch.setattr(ops, "conv_qkv_projection", functools.partial(ops.conv_qkv_projection, backend=backend))
    monkeypatch.setattr(ops, "attention", functools.partial(ops.attention, backend=attn_backend))
    torch.manual_seed(2)
    hf = _randomise(CvtSelfAttention(2, 16, 3, 1, 1, 1, 2, "dw_bn", True, 0.0, True)).double().train()
    mine = FastCvtSelfAttention(2, 16).train()
    mine.load_state_dict(hf.state_dict())
    x = torch.randn(2, 1 + 5 * 4, 16, dtype=torch.float64)
    x32 = x.float().requires_grad_(True)
    x64 = x.clone().requires_grad_(True)
    got = mine(x32, 5, 4)
    expect = hf(x64, 5, 4)
    assert got.dtype == torch.float32 and rel_error(got, expect) < 1e-5
    cot = torch.randn_like(expect)
    (gx,) = torch.autograd.grad(got, [x32], cot.float())
    (gx64,) = torch.autograd.grad(expect, [x64], cot)
    assert rel_error(gx, gx64) < 1e-5


def test_dropout_and_constructor():
    m = FastCvtSelfAttention(2, 8, attention_drop_rate=0.5, with_cls_token=False).train()
    x = torch.randn(2, 16, 8)
    torch.manual_seed(0)
    a = m(x, 4, 4)
    torch.manual_seed(1)
    b = m(x, 4, 4)
    assert not torch.allclose(a, b)  # dropout on the probabilities acts in train mode
    m.eval()
    assert torch.equal(m(x, 4, 4), m(x, 4, 4))
    for method in ("avg", "linear"):
        with pytest.raises(ValueError, match="qkv_projection_method.*dw_bn"):
            FastCvtSelfAttention(2, 8, 3, 1, 1, 1, 2, method, True, 0.0)
        # Hugging Face builds the module but no convolution, so its forward fails: nothing to reproduce
        with pytest.raises(AttributeError, match="convolution_projection"):
            CvtSelfAttention(2, 8, 3, 1, 1, 1, 2, method, True, 0.0)(torch.randn(1, 17, 8), 4, 4)
    with pytest.raises(ValueError, match="divisible"):
        FastCvtSelfAttention(3, 8)
    # HF's positional order, and the attributes HF's module has; unknown keyword arguments are
    # accepted, as HF does
    hf = CvtSelfAttention(2, 8, 3, 1, 1, 1, 2, "dw_bn", False, 0.1, False, unused=1)
    m = FastCvtSelfAttention(2, 8, 3, 1, 1, 1, 2, "dw_bn", False, 0.1, False, unused=1)
    assert m.projection_query.bias is None and m.dropout.p == 0.1 and not m.with_cls_token
    for attr in ("scale", "with_cls_token", "embed_dim", "num_heads"):
        assert getattr(m, attr) == getattr(hf, attr), attr
    assert [n for n, _ in m.named_modules()] == [n for n, _ in hf.named_modules()]
