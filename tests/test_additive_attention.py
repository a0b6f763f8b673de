"""Additive (Show-Attend-Tell) attention: every backend against the float64 reference, gradients,
gradcheck, opcheck, torch.compile, what the graph keeps, bad input, and the nn module against the
tutorial's module."""
import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import ssl_fast
from ssl_fast import ops
from ssl_fast.nn import AdditiveAttention
from ssl_fast.ops.additive_attention import _reasons
from ssl_fast.reference.additive_attention import additive_attention as reference
from helpers import assert_matches_reference, backend_params, poison, rel_error

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
POSITIONS = [1, 7, 49, 196]  # 1x1, 7 (odd), 7x7, 14x14 feature maps
WIDTHS = [1, 2, 7, 16, 33, 64, 80, 129]  # D and A, odd and even, none a multiple of every block


def _make(seed, B, L, D, A, dtype, scale=1.0, mask_kind=None):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, L, D, generator=g).to(dtype)
    Ua = (torch.randn(B, L, A, generator=g) * scale).to(dtype)
    Wh = (torch.randn(B, A, generator=g) * scale).to(dtype)
    w = (torch.randn(A, generator=g) * scale).to(dtype)
    mask = None
    if mask_kind is not None:
        mask = torch.rand(B, L, generator=g) > 0.4
        mask[:, 0] = True  # at least one kept position per row
        if mask_kind == "one_row_empty":
            mask[-1] = False
    return a, Ua, Wh, w, mask


def _grads_of(out, inputs, gc, ga):
    context, alpha = out
    loss = (context.float() * gc).sum() + (alpha.float() * ga).sum()
    return torch.autograd.grad(loss, inputs)


def _truth(a, Ua, Wh, w, mask, gc, ga):
    """float64 outputs and gradients of the reference definition (autograd)."""
    xs = [t.detach().double().requires_grad_() for t in (a, Ua, Wh, w)]
    out = reference(*xs, mask)
    loss = (out[0] * gc.double()).sum() + (out[1] * ga.double()).sum()
    return [o.detach() for o in out], torch.autograd.grad(loss, xs)


def _eager_same_dtype(a, Ua, Wh, w, mask, gc, ga):
    """The reference by eager PyTorch in the inputs' own dtype: the low-precision baseline."""
    xs = [t.detach().clone().requires_grad_() for t in (a, Ua, Wh, w)]
    out = reference(*xs, mask)
    return [o.detach() for o in out], _grads_of(out, xs, gc, ga)


@contextlib.contextmanager
def poisoned_empty():
    """Every torch.empty/empty_like made inside starts as NaN (an unwritten output shows)."""
    empty, empty_like = torch.empty, torch.empty_like
    with mock.patch.object(torch, "empty", lambda *a, **k: poison(empty(*a, **k))), \
            mock.patch.object(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k))):
        yield


@pytest.mark.parametrize("backend", backend_params("additive_attention"))
@given(B=st.integers(1, 3), L=st.sampled_from(POSITIONS), D=st.sampled_from(WIDTHS), A=st.sampled_from(WIDTHS),
       dtype=st.sampled_from(FLOATS), mask_kind=st.sampled_from([None, "random", "one_row_empty"]),
       scale=st.sampled_from([0.1, 1.0, 3.0]), seed=st.integers(0, 2**16))
def test_outputs_and_gradients_match_reference(backend, B, L, D, A, dtype, mask_kind, scale, seed):
    a, Ua, Wh, w, mask = _make(seed, B, L, D, A, dtype, scale, mask_kind)
    g = torch.Generator().manual_seed(seed + 1)
    gc, ga = torch.randn(B, D, generator=g), torch.randn(B, L, generator=g)
    (c64, al64), grads64 = _truth(a, Ua, Wh, w, mask, gc, ga)
    (c_base, al_base), grads_base = _eager_same_dtype(a, Ua, Wh, w, mask, gc, ga)
    xs = [t.clone().requires_grad_() for t in (a, Ua, Wh, w)]
    with poisoned_empty():
        context, alpha = ops.additive_attention(*xs, mask, backend=backend)
        grads = _grads_of((context, alpha), xs, gc, ga)
    assert context.shape == (B, D) and alpha.shape == (B, L)
    assert context.dtype == dtype and alpha.dtype == dtype
    outs = [("context", context, c64, c_base), ("alpha", alpha, al64, al_base)]
    outs += [(f"grad {n}", *v) for n, *v in zip(("a", "Ua", "Wh", "w"), grads, grads64, grads_base)]
    for name, got, want, base in outs:
        assert got.dtype == dtype, name
        # float32: 1e-5, or twice what eager float32 loses where the result is ill-conditioned
        # (a gradient that is a small sum of cancelling terms)
        tol = max(1e-5, 2 * rel_error(base, want)) if dtype == torch.float32 else None
        assert_matches_reference(got, want, base, fp32_tol=tol, what=name)
    assert [g.shape for g in grads] == [x.shape for x in xs]
    if mask is not None:
        assert (alpha[~mask] == 0).all()


@pytest.mark.parametrize("backend", backend_params("additive_attention"))
def test_fully_masked_row_gives_zeros(backend):
    a, Ua, Wh, w, _ = _make(3, 3, 7, 5, 6, torch.float32)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1] = False
    mask[2, 3:] = False
    xs = [t.clone().requires_grad_() for t in (a, Ua, Wh, w)]
    context, alpha = ops.additive_attention(*xs, mask, backend=backend)
    (context.sum() + (alpha * torch.arange(7.0)).sum()).backward()
    assert torch.equal(alpha[1], torch.zeros(7)) and torch.equal(context[1], torch.zeros(5))
    assert torch.equal(xs[0].grad[1], torch.zeros(7, 5)) and torch.equal(xs[1].grad[1], torch.zeros(7, 6))
    assert torch.equal(xs[2].grad[1], torch.zeros(6))
    assert torch.equal(alpha[2, 3:], torch.zeros(4)) and torch.equal(xs[1].grad[2, 3:], torch.zeros(4, 6))
    torch.testing.assert_close(alpha.sum(1), torch.tensor([1.0, 0.0, 1.0]))
    # the kept rows equal the softmax over their kept positions only
    _, ref_alpha = reference(a[2:, :3].double(), Ua[2:, :3].double(), Wh[2:].double(), w.double())
    torch.testing.assert_close(alpha[2, :3].double(), ref_alpha[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", backend_params("additive_attention"))
def test_nan_and_inf_propagate(backend):
    a, Ua, Wh, w, _ = _make(4, 2, 7, 5, 6, torch.float32)
    Ua[0, 2, 1] = float("nan")
    a[1, 4, 0] = float("inf")
    context, alpha = ops.additive_attention(a, Ua, Wh, w, backend=backend)
    assert alpha[0].isnan().all() and context[0].isnan().all()
    assert not alpha[1].isnan().any() and context[1, 0] == float("inf")


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_gradcheck_float64(backend, with_mask):
    if _reasons(backend, torch.device("cpu")):
        pytest.skip("; ".join(_reasons(backend, torch.device("cpu"))))
    a, Ua, Wh, w, mask = _make(5, 3, 7, 5, 6, torch.float64, mask_kind="one_row_empty" if with_mask else None)
    xs = [t.requires_grad_() for t in (a, Ua, Wh, w)]
    torch.autograd.gradcheck(lambda *x: ops.additive_attention(*x, mask, backend=backend), xs)


@pytest.mark.parametrize("backend", backend_params("additive_attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(backend, dtype):
    a, Ua, Wh, w, mask = _make(6, 2, 7, 9, 5, dtype, mask_kind="random")
    xs = [t.requires_grad_() for t in (a, Ua, Wh, w)]
    for m in (None, mask):
        torch.library.opcheck(torch.ops.ssl_fast.additive_attention_fwd.default, (*xs, m, backend))
    context, alpha = torch.ops.ssl_fast.additive_attention_fwd(*[x.detach() for x in xs], mask, backend)
    g = torch.Generator().manual_seed(0)
    gc, ga = torch.randn(context.shape, generator=g).to(dtype), torch.randn(alpha.shape, generator=g)
    for need_grad_a in (True, False):
        torch.library.opcheck(torch.ops.ssl_fast.additive_attention_bwd.default,
                              (gc, ga, *[x.detach() for x in xs], alpha, need_grad_a, backend))


@pytest.mark.parametrize("backend", backend_params("additive_attention"))
def test_frozen_encoder_features_get_no_gradient_and_the_rest_are_right(backend):
    """``a`` without requires_grad (a frozen encoder): the backward skips grad_a, the others match."""
    a, Ua, Wh, w, mask = _make(10, 2, 49, 33, 16, torch.float32, mask_kind="random")
    g = torch.Generator().manual_seed(11)
    gc, ga = torch.randn(2, 33, generator=g), torch.randn(2, 49, generator=g)
    _, grads64 = _truth(a, Ua, Wh, w, mask, gc, ga)
    xs = [t.clone().requires_grad_() for t in (Ua, Wh, w)]
    with poisoned_empty():
        grads = _grads_of(ops.additive_attention(a, *xs, mask, backend=backend), xs, gc, ga)
    for name, got, want in zip(("Ua", "Wh", "w"), grads, grads64[1:]):
        assert_matches_reference(got, want, what=f"grad {name}")


def test_backward_keeps_nothing_of_size_BLA_but_Ua():
    """The graph of one step saves the inputs and alpha: no [B, L, A] tensor besides Ua itself.
    The eager tutorial formula, under the same hook, saves its tanh (so the check can fail)."""
    B, L, D, A = 2, 7, 5, 6
    a, Ua, Wh, w, mask = _make(7, B, L, D, A, torch.float32, mask_kind="random")
    xs = [t.requires_grad_() for t in (a, Ua, Wh, w)]

    def saved_big(fn):
        big = []

        def pack(t):
            if t.numel() >= B * L * A and t.data_ptr() not in (a.data_ptr(), Ua.data_ptr()):
                big.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return big, out

    for backend in [b for b in ("reference", "cpp", "triton") if not _reasons(b, torch.device("cpu"))]:
        big, (context, alpha) = saved_big(lambda: ops.additive_attention(*xs, mask, backend=backend))
        assert big == [], f"{backend} saved {big}"
        context.sum().backward()
    big, _ = saved_big(lambda: reference(*xs, mask))
    assert (B, L, A) in big


def _decoder_step(att, lstm, f_beta, encoder_out, Ua, emb, h, c):
    """One Show-Attend-Tell decoding step as the tutorial's DecoderWithAttention.forward runs it."""
    context, alpha = att(encoder_out, h, Ua=Ua)
    context = torch.sigmoid(f_beta(h)) * context
    h, c = lstm(torch.cat([emb, context], dim=1), (h, c))
    return h, c, alpha


def test_compiles_fullgraph_decoder_step():
    torch.manual_seed(0)
    B, L, D, A, H, E = 2, 49, 16, 12, 10, 8
    att = AdditiveAttention(D, H, A)
    lstm, f_beta = nn.LSTMCell(E + D, H), nn.Linear(H, D)
    encoder_out, emb = torch.randn(B, L, D), torch.randn(B, E)
    h0, c0 = torch.randn(B, H), torch.randn(B, H)

    def run(step):
        att.zero_grad()
        Ua = att.precompute(encoder_out)
        h, c, alpha = step(att, lstm, f_beta, encoder_out, Ua, emb, h0, c0)
        (h.square().sum() + c.sum() + alpha.square().sum()).backward()
        # full_att.bias shifts every score equally: unused by the op, it gets no gradient
        return h.detach(), alpha.detach(), [p.grad.clone() for n, p in att.named_parameters() if n != "full_att.bias"]

    compiled = torch.compile(_decoder_step, fullgraph=True, backend="aot_eager")
    got, want = run(compiled), run(_decoder_step)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    for g, w_ in zip(got[2], want[2]):
        torch.testing.assert_close(g, w_)


def test_bad_input_names_the_argument():
    a, Ua, Wh, w, mask = _make(8, 2, 7, 5, 6, torch.float32, mask_kind="random")
    cases = [
        ((a[0], Ua, Wh, w), {}, ValueError, "a must have 3 dimensions"),
        ((a, Ua[:, :3], Wh, w), {}, ValueError, "Ua must have shape"),
        ((a, Ua, Wh[:1], w), {}, ValueError, "Wh must have shape"),
        ((a, Ua, Wh, w[:5]), {}, ValueError, "w must have shape"),
        ((a, Ua, Wh, w, mask[:, :3]), {}, ValueError, "mask must have shape"),
        ((a, Ua, Wh, w, mask.float()), {}, TypeError, "mask must have dtype"),
        ((a, Ua.double(), Wh, w), {}, TypeError, "Ua has dtype torch.float64"),
        ((a.int(), Ua, Wh, w), {}, TypeError, "a must have dtype"),
        ((a, Ua, Wh.numpy(), w), {}, TypeError, "Wh must be a torch.Tensor"),
        ((a[:, :0], Ua[:, :0], Wh, w), {}, ValueError, "a must have shape"),
        ((a, Ua, Wh, w), {"backend": "fastest"}, ValueError, "backend must be one of"),
        ((a, Ua.to("meta"), Wh, w), {}, ValueError, "Ua is on meta"),
    ]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            ops.additive_attention(*args, **kwargs)


def test_forced_backend_that_cannot_serve_raises():
    a, Ua, Wh, w, _ = _make(9, 2, 7, 5, 6, torch.float64)
    with pytest.raises(ssl_fast.BackendUnavailableError, match="float64"):
        ops.additive_attention(a, Ua, Wh, w, backend="triton")


# ------------------------------------------------------------------ the tutorial's module


class TutorialAttention(nn.Module):
    """``Attention`` of sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning, ``models.py`` (as stored at
    commit 01f749f503c01e2698fdf77287480892b6d07610), re-stated with its names and forward. Its
    non-linearity is a ReLU (``self.relu``); the tests swap in ``nn.Tanh()``, the paper's, which
    is what ssl_fast's module computes."""

    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.ReLU()
        self.softmax = nn.Softmax(dim=1)

    def forward(self, encoder_out, decoder_hidden):
        att1 = self.encoder_att(encoder_out)
        att2 = self.decoder_att(decoder_hidden)
        att = self.full_att(self.relu(att1 + att2.unsqueeze(1))).squeeze(2)
        alpha = self.softmax(att)
        attention_weighted_encoding = (encoder_out * alpha.unsqueeze(2)).sum(dim=1)
        return attention_weighted_encoding, alpha


@pytest.mark.parametrize("backend", backend_params("additive_attention"))
@pytest.mark.parametrize("use_precompute", [False, True])
def test_module_equals_the_tutorial_module_with_tanh(backend, use_precompute):
    torch.manual_seed(1)
    D, H, A = 33, 20, 16
    tutorial = TutorialAttention(D, H, A).double()
    tutorial.relu = nn.Tanh()
    ours = AdditiveAttention(D, H, A)
    assert ours.load_state_dict(tutorial.state_dict(), strict=True)  # same names, same shapes
    assert set(dict(ours.named_parameters())) == set(dict(tutorial.named_parameters()))
    encoder_out, h = torch.randn(3, 49, D), torch.randn(3, H)

    e64, h64 = encoder_out.double().requires_grad_(), h.double().requires_grad_()
    want = tutorial(e64, h64)
    (want[0].square().sum() + (want[1] * torch.arange(49.0).double()).sum()).backward()
    e32, h32 = encoder_out.clone().requires_grad_(), h.clone().requires_grad_()
    kwargs = {"Ua": ours.precompute(e32)} if use_precompute else {}
    got = ours(e32, h32, backend=backend, **kwargs)
    (got[0].square().sum() + (got[1] * torch.arange(49.0)).sum()).backward()
    for name, x, y in [("context", got[0], want[0]), ("alpha", got[1], want[1]), ("grad encoder_out", e32.grad, e64.grad),
                       ("grad h", h32.grad, h64.grad)]:
        assert rel_error(x, y) < 1e-5, name
    theirs = dict(tutorial.named_parameters())
    for name, p in ours.named_parameters():
        if name == "full_att.bias":  # a constant shift of every score: no gradient in either
            assert p.grad is None or p.grad.abs().max() < 1e-6
            continue
        assert rel_error(p.grad, theirs[name].grad) < 1e-5, name


def test_module_takes_half_precision_linear_outputs_under_autocast():
    torch.manual_seed(2)
    att = AdditiveAttention(16, 8, 12)
    encoder_out, h = torch.randn(2, 7, 16), torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        context, alpha = att(encoder_out, h)
    assert context.dtype == torch.bfloat16 and alpha.dtype == torch.bfloat16
    want_c, want_a = att(encoder_out, h)
    assert rel_error(alpha, want_a) < 3e-2 and rel_error(context, want_c) < 3e-2


def test_module_mask_and_device_dtype():
    att = AdditiveAttention(6, 5, 4, dtype=torch.float64)
    assert att.encoder_att.weight.dtype == torch.float64
    encoder_out, h = torch.randn(2, 7, 6, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    _, alpha = att(encoder_out, h, mask=mask)
    assert (alpha[0, 4:] == 0).all()
    _, alpha_cut = att(encoder_out[:1, :4], h[:1])
    torch.testing.assert_close(alpha[0, :4], alpha_cut[0])
