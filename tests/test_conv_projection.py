"""CvT conv projection: every backend against the float64 reference (conv + BatchNorm2d + flatten),
gradients, running statistics, gradcheck, opcheck, torch.compile, ConvAttention against the
official CvT attention (tests/official/microsoft_cvt.py), and bad input."""
import contextlib
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ssl_fast
from ssl_fast import ops
from ssl_fast.reference import conv_projection as ref
from tests.helpers import assert_matches_reference, available_backends, backend_params, poison, rel_error

BACKENDS = backend_params("conv_projection")
SIZES = [1, 2, 5, 7, 14]  # odd, even, 1; 28/56 only on the GPU and in the benchmarks


def _make_params(C, dtype=torch.float32, seed=0, affine=True, track=True):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(C, 1, 3, 3, generator=g).to(dtype) for _ in range(3)]
    norms = []
    for _ in range(3):
        n = dict(weight=(torch.rand(C, generator=g) + 0.5).to(dtype) if affine else None,
                 bias=torch.randn(C, generator=g).to(dtype) if affine else None,
                 running_mean=torch.randn(C, generator=g).to(dtype) if track else None,
                 running_var=(torch.rand(C, generator=g) + 0.5).to(dtype) if track else None,
                 num_batches_tracked=torch.tensor(3, dtype=torch.long) if track else None,
                 momentum=0.1, eps=1e-5)
        norms.append(n)
    return weights, norms


def _clone_norms(norms, dtype=None, requires_grad=False):
    out = []
    for n in norms:
        c = dict(n)
        for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            t = n[k]
            if t is None:
                continue
            t = t.detach().clone()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            if requires_grad and k in ("weight", "bias"):
                t.requires_grad_(True)
            c[k] = t
        out.append(c)
    return out


def _leaf(t, dtype=None):
    t = t.detach().clone()
    if dtype is not None:
        t = t.to(dtype)
    return t.requires_grad_(True)


class _PoisonedTorch:
    """Stands in for ``torch`` inside the Triton launcher: every buffer it allocates starts as NaN,
    so an output element a kernel forgets to write cannot pass."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return poison(torch.empty(*args, **kwargs))

    @staticmethod
    def empty_like(*args, **kwargs):
        return poison(torch.empty_like(*args, **kwargs))


@contextlib.contextmanager
def poisoned_triton():
    """NaN-filled buffers for the Triton launcher while the block runs."""
    if "triton" not in available_backends("conv_projection", "cpu"):
        yield
        return
    from ssl_fast.kernels import conv_projection as kernel

    kernel.torch = _PoisonedTorch()
    try:
        yield
    finally:
        kernel.torch = torch


def _run_case(backend, B, C, H, W, sq, skv, training, dtype, tokens, seed):
    weights, norms = _make_params(C, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x0 = torch.randn(B, C, H, W, generator=g) * 1.5 + 0.3

    # truth: eager conv + BatchNorm2d in float64, autograd by PyTorch
    x64 = _leaf(x0, torch.float64)
    w64 = [_leaf(w, torch.float64) for w in weights]
    n64 = _clone_norms(norms, torch.float64, requires_grad=True)
    ref_out = ref.conv_qkv_projection(x64, w64, n64, stride_q=sq, stride_kv=skv, training=training)
    cots = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in ref_out]
    ref_leaves = [x64, *w64, *[n["weight"] for n in n64], *[n["bias"] for n in n64]]
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, cots)

    # same op in the low-precision dtype by eager PyTorch (the baseline for fp16/bf16)
    base_out = base_grads = None
    if dtype in (torch.float16, torch.bfloat16):
        xl = _leaf(x0, dtype)
        wl = [_leaf(w, dtype) for w in weights]
        nl = _clone_norms(norms, dtype, requires_grad=True)
        base_out = ref.conv_qkv_projection(xl, wl, nl, stride_q=sq, stride_kv=skv, training=training)
        base_leaves = [xl, *wl, *[n["weight"] for n in nl], *[n["bias"] for n in nl]]
        base_grads = torch.autograd.grad(base_out, base_leaves, [c.to(dtype) for c in cots])

    # the op
    xd = _leaf(x0, dtype)
    wd = [_leaf(w) for w in weights]
    nd = _clone_norms(norms, requires_grad=True)
    inp = xd.flatten(2).transpose(1, 2) if tokens else xd
    out = ops.conv_qkv_projection(inp, wd, nd, size=(H, W) if tokens else None, stride_q=sq, stride_kv=skv,
                                  training=training, backend=backend)
    leaves = [xd, *wd, *[n["weight"] for n in nd], *[n["bias"] for n in nd]]
    grads = torch.autograd.grad(out, leaves, [c.to(dtype) for c in cots])

    names = ["q", "k", "v"]
    for i, (o, r) in enumerate(zip(out, ref_out)):
        assert o.dtype == dtype and o.shape == r.shape, (o.shape, r.shape)
        assert_matches_reference(o, r, None if base_out is None else base_out[i], what=f"{backend} {names[i]}")
    gnames = ["x", "w_q", "w_k", "w_v", "gamma_q", "gamma_k", "gamma_v", "beta_q", "beta_k", "beta_v"]
    for i, (gr, r) in enumerate(zip(grads, ref_grads)):
        assert gr.shape == r.shape
        if dtype in (torch.float16, torch.bfloat16) and i > 0:
            # parameter gradients are float32 (accumulated in float32) from low-precision activations:
            # held to the same rule against the eager low-precision baseline
            err, base = rel_error(gr, r), rel_error(base_grads[i], r)
            assert err <= 2 * base + 4 * torch.finfo(dtype).eps, f"{backend} d{gnames[i]}: {err:.3g} vs {base:.3g}"
        else:
            assert_matches_reference(gr, r, None if base_grads is None else base_grads[i],
                                     fp32_tol=2e-5, what=f"{backend} d{gnames[i]}")
    # running statistics (train mode) as nn.BatchNorm2d updates them
    for p in range(3):
        for key in ("running_mean", "running_var"):
            err = rel_error(nd[p][key], n64[p][key])
            if dtype in (torch.float16, torch.bfloat16):  # statistics of a low-precision input
                base = rel_error(nl[p][key], n64[p][key])
                assert err <= 2 * base + 4 * torch.finfo(dtype).eps, f"{backend} norms[{p}].{key}: {err:.3g}"
            else:
                assert err < 1e-5, f"{backend} norms[{p}].{key}: {err:.3g}"
        assert int(nd[p]["num_batches_tracked"]) == int(n64[p]["num_batches_tracked"])


@pytest.mark.parametrize("backend", BACKENDS)
@given(B=st.sampled_from([1, 2, 3]), C=st.sampled_from([1, 3, 8, 16, 24]), H=st.sampled_from(SIZES),
       W=st.sampled_from(SIZES), sq=st.sampled_from([1, 1, 2]), skv=st.sampled_from([2, 2, 1, 3]),
       training=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16]),
       tokens=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_reference(backend, B, C, H, W, sq, skv, training, dtype, tokens, seed):
    def m(B):
        return min(B * ref.out_size(H, s) * ref.out_size(W, s) for s in (sq, skv))

    # two values per channel is degenerate in train mode (xhat = +-1 and the gradient through the
    # statistics cancels to exactly zero, so relative errors measure rounding noise): add a sample
    while training and m(B) == 2:
        B += 1
    with poisoned_triton():
        if training and m(B) <= 1:
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                _run_case(backend, B, C, H, W, sq, skv, training, dtype, tokens, seed)
            return
        _run_case(backend, B, C, H, W, sq, skv, training, dtype, tokens, seed)


@pytest.mark.parametrize("backend", BACKENDS)
# the wide rows run the C++ stencils' full 8-output blocks several times per row (C = 8, 16: the
# vector path); C = 88 = 64 + 16 + 8 takes every channel-block width (4 x 16, 16, 8 lanes on
# AVX-512 hosts) in one call
@pytest.mark.parametrize("case", [(2, 5, 7, 14, 1, 2, True), (1, 3, 14, 7, 1, 2, False), (3, 16, 7, 7, 2, 2, True),
                                  (2, 16, 5, 37, 1, 2, True), (1, 8, 6, 26, 2, 2, False),
                                  (2, 88, 6, 19, 1, 2, True), (1, 91, 5, 9, 2, 2, False)])
def test_fixed_shapes(backend, case):
    B, C, H, W, sq, skv, training = case
    with poisoned_triton():
        _run_case(backend, B, C, H, W, sq, skv, training, torch.float32, True, 7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", [(0,), (1, 2), (2,)])
def test_gradients_with_unused_projections(backend, used):
    # q, k or v left out of the loss reach the backward as None gradients (no zero tensors)
    C, H, W = 8, 7, 6
    weights, norms = _make_params(C, seed=3)
    x0 = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(4))
    x64, w64 = _leaf(x0, torch.float64), [_leaf(w, torch.float64) for w in weights]
    n64 = _clone_norms(norms, torch.float64, requires_grad=True)
    out64 = ref.conv_qkv_projection(x64, w64, n64, stride_q=1, stride_kv=2, training=True)
    leaves64 = [x64, *w64, *[n["weight"] for n in n64]]
    cots = [torch.randn(o.shape, generator=torch.Generator().manual_seed(5 + i), dtype=torch.float64)
            for i, o in enumerate(out64)]
    want = torch.autograd.grad(sum((out64[i] * cots[i]).sum() for i in used), leaves64, allow_unused=True)
    x, ws = _leaf(x0), [_leaf(w) for w in weights]
    ns = _clone_norms(norms, requires_grad=True)
    with poisoned_triton():
        out = ops.conv_qkv_projection(x, ws, ns, stride_q=1, stride_kv=2, training=True, backend=backend)
        got = torch.autograd.grad(sum((out[i] * cots[i].float()).sum() for i in used),
                                  [x, *ws, *[n["weight"] for n in ns]],
                                  allow_unused=True, materialize_grads=True)
    for p, (g, e) in enumerate(zip(got, want)):
        if e is None:
            assert not g.any(), p
        else:
            assert rel_error(g, e) < 1e-4, p


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("C", [16, 24])
def test_batch_stats_with_mean_far_above_std(backend, C):
    # |mean| / std ~ 1e4 in the conv outputs too (weights close to a centre tap, so the zero
    # padding adds little spread): statistics from sum(y^2) - sum(y)^2 / n in float32 would
    # lose every digit of the variance
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4, C, 14, 14, generator=g) * 0.01 + 100.0
    ws = []
    for _ in range(3):
        w = torch.randn(C, 1, 3, 3, generator=g) * 1e-5
        w[:, 0, 1, 1] = torch.rand(C, generator=g) + 0.5
        ws.append(w)
    bns = [nn.BatchNorm2d(C) for _ in range(3)]
    with poisoned_triton():
        got = ops.conv_qkv_projection(x, ws, bns, training=True, backend=backend)
    F = torch.nn.functional
    for out, w, s, bn in zip(got, ws, (1, 2, 2), bns):
        # judged against eager PyTorch in float32, whose conv output already carries an error
        # of eps * |mean| / std ~ 1e-3 after normalising
        y = F.conv2d(x.double(), w.double(), stride=s, padding=1, groups=C)
        want = F.batch_norm(y, None, None, training=True, eps=1e-5).flatten(2).transpose(1, 2)
        y32 = F.conv2d(x, w, stride=s, padding=1, groups=C)
        eager = F.batch_norm(y32, None, None, training=True, eps=1e-5).flatten(2).transpose(1, 2)
        assert rel_error(out, want) <= 3 * rel_error(eager, want) + 1e-6
        var = y.var(dim=(0, 2, 3))
        assert rel_error(bn.running_var, 0.9 + 0.1 * var) <= 3 * rel_error(0.9 + 0.1 * y32.var(dim=(0, 2, 3)),
                                                                              0.9 + 0.1 * var) + 1e-6


def _bn_modules(C, momentum, seed):
    torch.manual_seed(seed)
    convs = [nn.Conv2d(C, C, 3, stride=s, padding=1, groups=C, bias=False) for s in (1, 2, 2)]
    bns = [nn.BatchNorm2d(C, momentum=momentum) for _ in range(3)]
    for bn in bns:
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.normal_(bn.bias)
    return convs, bns


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.1, None, 0.7])
def test_running_stats_several_steps(backend, momentum):
    C, H, W = 6, 7, 5
    convs, bns = _bn_modules(C, momentum, 0)
    mine = copy.deepcopy(bns)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(2, C, H, W, generator=g) * (1 + step) + step
        with torch.no_grad():
            expect = [bn.train()(conv(x)).flatten(2).transpose(1, 2) for conv, bn in zip(convs, bns)]
            got = ops.conv_qkv_projection(x, [c.weight for c in convs], mine, training=True, backend=backend)
        for e, o in zip(expect, got):
            assert rel_error(o, e) < 1e-5
    for a, b in zip(mine, bns):
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 4
        assert rel_error(a.running_mean, b.running_mean) < 1e-6
        assert rel_error(a.running_var, b.running_var) < 1e-6
    # eval mode uses the running statistics and leaves them alone
    x = torch.randn(3, C, H, W, generator=g)
    with torch.no_grad():
        expect = [bn.eval()(conv(x)).flatten(2).transpose(1, 2) for conv, bn in zip(convs, bns)]
        before = [bn.running_mean.clone() for bn in mine]
        got = ops.conv_qkv_projection(x, [c.weight for c in convs], mine, training=False, backend=backend)
    for e, o in zip(expect, got):
        assert rel_error(o, e) < 1e-5
    for bn, rm in zip(mine, before):
        assert torch.equal(bn.running_mean, rm) and int(bn.num_batches_tracked) == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_affine_no_running_stats(backend):
    C = 4
    x = torch.randn(2, C, 6, 5)
    convs, _ = _bn_modules(C, 0.1, 3)
    bns = [nn.BatchNorm2d(C, affine=False, track_running_stats=False) for _ in range(3)]
    for training in (True, False):
        with torch.no_grad():
            expect = [bn.train(training)(conv(x)).flatten(2).transpose(1, 2) for conv, bn in zip(convs, bns)]
            got = ops.conv_qkv_projection(x, [c.weight for c in convs], bns, training=training, backend=backend)
        for e, o in zip(expect, got):
            assert rel_error(o, e) < 1e-5


def test_nan_propagates_and_deterministic():
    C = 3
    weights, norms = _make_params(C)
    x = torch.randn(2, C, 7, 7)
    x[0, 1, 3, 3] = float("nan")
    for backend in available_backends("conv_projection", "cpu"):
        q, k, v = ops.conv_qkv_projection(x, weights, _clone_norms(norms), training=False, backend=backend)
        assert torch.isnan(q[0, :, 1]).any() and not torch.isnan(q[0, :, 0]).any(), backend
        assert torch.isnan(k[0, :, 1]).any(), backend
    x = torch.randn(3, C, 14, 7)
    for backend in available_backends("conv_projection", "cpu"):
        xs = [_leaf(x) for _ in range(2)]
        runs = []
        for xi in xs:
            out = ops.conv_qkv_projection(xi, weights, _clone_norms(norms), training=True, backend=backend)
            runs.append((out, torch.autograd.grad(sum(o.square().sum() for o in out), xi)[0]))
        for a, b in zip(runs[0][0], runs[1][0]):
            assert torch.equal(a, b), backend
        assert torch.equal(runs[0][1], runs[1][1]), backend


@pytest.mark.parametrize("backend", [b for b in ("cpp", "reference")])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(backend, training):
    if backend not in available_backends("conv_projection", "cpu"):
        pytest.skip(f"{backend} not available")
    C, H, W = 2, 5, 3
    weights, norms = _make_params(C, torch.float64, seed=4)
    x = torch.randn(2, C, H, W, dtype=torch.float64, requires_grad=True)
    ws = [w.requires_grad_(True) for w in weights]
    gammas = [n["weight"].requires_grad_(True) for n in norms]
    betas = [n["bias"].requires_grad_(True) for n in norms]

    def fn(x, wq, wk, wv, g0, g1, g2, b0, b1, b2):
        ns = [dict(n, weight=g, bias=b, running_mean=n["running_mean"].clone(), running_var=n["running_var"].clone(),
                   num_batches_tracked=n["num_batches_tracked"].clone())
              for n, g, b in zip(norms, (g0, g1, g2), (b0, b1, b2))]
        return ops.conv_qkv_projection(x, [wq, wk, wv], ns, training=training, backend=backend)

    assert torch.autograd.gradcheck(fn, (x, *ws, *gammas, *betas), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    C = 3
    x = torch.randn(2, 5, 6, C)  # [B, H, W, C]
    w = torch.randn(3, C, 9, requires_grad=True)
    gamma = torch.rand(3, C).add_(0.5).requires_grad_(True)
    beta = torch.randn(3, C, requires_grad=True)
    rm, rv = torch.randn(3, C), torch.rand(3, C) + 0.5
    for use_batch in (True, False):
        xi = x.clone().requires_grad_(True)
        args = (xi, w, gamma, beta, None if use_batch else rm, None if use_batch else rv, [1e-5, 1e-3, 1e-5],
                1, 2, use_batch, backend)
        torch.library.opcheck(torch.ops.ssl_fast.conv_qkv_projection_fwd, args)
        out = torch.ops.ssl_fast.conv_qkv_projection_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                          for a in args])
        grads = [torch.randn_like(o) for o in out[:3]]
        torch.library.opcheck(torch.ops.ssl_fast.conv_qkv_projection_bwd,
                              (*grads, x, w.detach(), gamma.detach(), out[6], out[7], out[3], out[4], out[5],
                               1, 2, use_batch, backend))


def test_torch_compile_fullgraph():
    backend = "cpp" if "cpp" in available_backends("conv_projection", "cpu") else "reference"
    torch._dynamo.reset()
    C, H, W = 4, 7, 6
    convs, bns = _bn_modules(C, 0.1, 5)
    eager_bns = copy.deepcopy(bns)
    ws = [c.weight for c in convs]

    def f(x, bns):
        q, k, v = ops.conv_qkv_projection(x, ws, bns, size=(H, W), stride_q=1, stride_kv=2, training=True,
                                          backend=backend)
        return q.sum() + 2 * k.square().mean() + v.mean()

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.randn(2, H * W, C)
    for _ in range(2):
        a = compiled(x, bns)
        b = f(x, eager_bns)
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    for m1, m2 in zip(bns, eager_bns):
        assert torch.allclose(m1.running_mean, m2.running_mean) and torch.allclose(m1.running_var, m2.running_var)
        assert int(m1.num_batches_tracked) == int(m2.num_batches_tracked) == 2
    ga = torch.autograd.grad(compiled(x.requires_grad_(True), bns), ws)
    gb = torch.autograd.grad(f(x, copy.deepcopy(bns)), ws)
    for u, v in zip(ga, gb):
        assert rel_error(u, v) < 1e-5


# --------------------------------------------------------------------------------------------
# ConvAttention against the official CvT Attention (tests/official/microsoft_cvt.py; same state_dict)
# --------------------------------------------------------------------------------------------

@settings(max_examples=4)
@given(cls=st.booleans(), hw=st.sampled_from([(7, 5), (4, 4), (3, 6)]), heads=st.sampled_from([1, 2]),
       training=st.booleans(), seed=st.integers(0, 100))
def test_conv_attention_matches_official(cls, hw, heads, training, seed):
    pytest.importorskip("timm")  # the official CvT code imports timm
    from official.microsoft_cvt import Attention as OfficialCvTAttention
    from ssl_fast.nn import ConvAttention

    torch.manual_seed(seed)
    dim_in, dim_out = 6, 8
    h, w = hw
    plain = OfficialCvTAttention(dim_in, dim_out, heads, qkv_bias=True, stride_kv=2, stride_q=1,
                                 with_cls_token=cls).double()
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.running_mean)
            nn.init.uniform_(m.running_var, 0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias)
    mine = ConvAttention(dim_in, dim_out, heads, qkv_bias=True, stride_kv=2, stride_q=1, with_cls_token=cls).double()
    missing = mine.load_state_dict(plain.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    plain.train(training)
    mine.train(training)
    x = torch.randn(2, h * w + int(cls), dim_in, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expect = plain(x1, h, w)
    got = mine(x2, h, w)
    assert rel_error(got, expect) < 1e-10
    cot = torch.randn_like(expect)
    ge = torch.autograd.grad(expect, [x1, *plain.parameters()], cot)
    gg = torch.autograd.grad(got, [x2, *mine.parameters()], cot)
    for a, b in zip(gg, ge):  # absolute floor: proj_k.bias's gradient is zero up to rounding (softmax shift)
        assert (a - b).norm() <= 1e-10 * (1 + b.norm()), rel_error(a, b)
    for (k1, b1), (k2, b2) in zip(mine.named_buffers(), plain.named_buffers()):
        assert k1 == k2 and rel_error(b1, b2) < 1e-12, k1


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

def test_bad_input():
    C = 4
    weights, norms = _make_params(C)
    x = torch.randn(2, C, 5, 5)
    f = ops.conv_qkv_projection
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        f(torch.randn(2, 3, 5, 5), weights, norms, training=False)  # C does not match the weights
    with pytest.raises(ValueError, match=r"tokens.*size"):
        f(torch.randn(2, 24, C), weights, norms, size=(5, 5), training=False)  # H*W != token count
    with pytest.raises(ValueError, match="stride_kv"):
        f(x, weights, norms, stride_kv=0, training=False)
    with pytest.raises(ValueError, match="stride_q"):
        f(x, weights, norms, stride_q=-1, training=False)
    with pytest.raises(TypeError, match="stride_q"):
        f(x, weights, norms, stride_q=1.5, training=False)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        f(x, [weights[0], torch.randn(C, 1, 5, 5), weights[2]], norms, training=False)
    with pytest.raises(TypeError, match="weights"):
        f(x, weights[:2], norms, training=False)
    with pytest.raises(ValueError, match=r"norms\[2\]\.running_var"):
        bad = _clone_norms(norms)
        bad[2]["running_var"] = torch.ones(C + 1)
        f(x, weights, bad, training=False)
    with pytest.raises(TypeError, match=r"norms\[0\]"):
        f(x, weights, [1, 2, 3], training=False)
    with pytest.raises(TypeError, match="x"):
        f(x.long(), weights, norms, training=False)
    with pytest.raises(ValueError, match="x"):
        f(torch.randn(C, 5, 5), weights, norms, training=False)
    with pytest.raises(TypeError, match="training"):
        f(x, weights, norms, training=1)
    with pytest.raises(ValueError, match="more than 1 value"):
        f(torch.randn(1, C, 1, 1), weights, norms, training=True)
    with pytest.raises(ssl_fast.BackendUnavailableError):
        f(x, weights, norms, training=False, backend="triton") if "triton" not in available_backends(
            "conv_projection", "cpu") else (_ for _ in ()).throw(ssl_fast.BackendUnavailableError("skip"))
