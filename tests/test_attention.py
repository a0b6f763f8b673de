"""Attention op against the float64 reference: every bias kind, masks, gradients, determinism,
no N x N allocation, torch.library registration, torch.compile, and bad input.

The Triton kernels run through the interpreter here (tests/conftest.py), so shapes stay small;
``BLOCK_OVERRIDE`` forces 16/32-wide tiles on some draws so that small inputs still span several
query and key tiles (online-softmax rescaling, partial tiles, several position-gradient partials).
"""
import contextlib
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssl_fast import _backend, ops
from ssl_fast.kernels import attention as kernel
from ssl_fast.ops.attention import DecomposedRelPos, RelPosTable, _unpack
from ssl_fast.reference import attention as reference
from helpers import assert_matches_reference, backend_params, poison, rel_error

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HEAD_DIMS = [16, 24, 32, 64, 80, 96, 128]
BLOCKS = [None, (16, 16), (32, 16), (16, 32)]


class _PoisonedTorch:
    """Stands in for ``torch`` inside the kernel module: every ``torch.empty`` comes back NaN."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return poison(torch.empty(*args, **kwargs))


@contextlib.contextmanager
def _kernel_setup(blocks):
    """Poison every buffer the launchers allocate and force the tile sizes (None = defaults)."""
    with mock.patch.object(kernel, "torch", _PoisonedTorch()), \
            mock.patch.object(kernel, "BLOCK_OVERRIDE", blocks):
        yield


def _rand(g, shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _draw_mask(data, g, b, h, nq, nk):
    """None, or a bool / additive mask of a shape that broadcasts to [B, H, Nq, Nk].

    Additive masks hold -inf only off column 0 (a fully -inf row has NaN reference gradients);
    boolean masks may blank whole rows (zero output and zero gradient in both implementations).
    """
    kind = data.draw(st.sampled_from([None, "bool", "add"]), label="mask kind")
    if kind is None:
        return None
    ndim = data.draw(st.integers(2, 4), label="mask ndim")
    full = (b, h, nq, nk)[4 - ndim:]
    shape = tuple(s if data.draw(st.booleans(), label=f"mask dim {i} full") else 1
                  for i, s in enumerate(full))
    if kind == "bool":
        return torch.rand(shape, generator=g) < 0.8
    m = _rand(g, shape, scale=2.0)
    if shape[-1] > 1:
        holes = torch.rand(shape, generator=g) < 0.15
        holes[..., 0] = False
        m = m.masked_fill(holes, float("-inf"))
    return m


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout)


def _assert_close(got, truth, baseline, rule_dtype, scale, what):
    """DESIGN.md's rule, judged by the dtype of the computation (q's), not of the output: a fp32
    position table trained with bf16 activations gets the bf16 rule.

    * fp32: relative error within max(1e-5, 2x the error of eager PyTorch in fp32), the second
      term for ill-conditioned sums (gradients whose terms cancel);
    * fp16/bf16: at most 2x the error of eager PyTorch in that dtype plus a few ulps;
    * a truth that is zero up to float64 round-off (softmax is invariant to a bias constant
      over keys: one key, or a one-row position table) is judged in absolute terms against
      ``scale`` (the size of the other gradients), since a relative error means nothing there.
    """
    truth = truth.double()
    floor = 1e-5 if rule_dtype == torch.float32 else 4 * torch.finfo(rule_dtype).eps
    if truth.norm().item() <= 1e-9 * scale:
        err = (got.double() - truth).norm().item() / scale
        base = (baseline.double() - truth).norm().item() / scale
    else:
        err, base = rel_error(got, truth), rel_error(baseline, truth)
    assert err <= max(floor, 2 * base + (0 if rule_dtype == torch.float32 else floor)), (
        f"{what}: error {err:.3g} vs eager {str(rule_dtype)[6:]} {base:.3g} (floor {floor:.3g})")


def _check(backend, dtype, q, k, v, scale, rel_pos, attn_mask, blocks, rel_pos64, rel_pos_lp):
    """Forward and every gradient of ``backend`` against float64 and the same-dtype eager op."""
    g_out = torch.Generator().manual_seed(1)
    leaves = [q, k, v] + _tables(rel_pos)
    with _kernel_setup(blocks):
        out = ops.attention(q, k, v, scale=scale, rel_pos=rel_pos, attn_mask=attn_mask, backend=backend)
        dout = _rand(g_out, out.shape, dtype)
        grads = _grads(out, leaves, dout)

    def run_ref(cast, rp):
        # the truth: autograd through the plain reference (not the reference backend's closed-form
        # backward, which is itself under test)
        ins = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(cast)
        o = reference.attention(*ins, scale=scale, attn_mask=mask, **_unpack(rp))
        return o, _grads(o, ins + _tables(rp), dout.to(cast))

    out64, grads64 = run_ref(torch.float64, rel_pos64)
    out_lp, grads_lp = run_ref(dtype, rel_pos_lp)
    names = ["dq", "dk", "dv"] + [f"d{n}" for n in _table_names(rel_pos)]
    assert out.dtype == dtype and out.shape == out64.shape
    scale_g = sum(g.double().norm().item() for g in grads64[:3]) + 1e-30
    _assert_close(out, out64, out_lp, dtype, out64.norm().item() + 1e-30, "out")
    for i, (got, want) in enumerate(zip(grads, grads64)):
        assert got.dtype == leaves[i].dtype and got.shape == leaves[i].shape, names[i]
        _assert_close(got, want, grads_lp[i], dtype, scale_g, names[i])


def _tables(rel_pos):
    if isinstance(rel_pos, RelPosTable):
        return [rel_pos.table]
    if isinstance(rel_pos, DecomposedRelPos):
        return [rel_pos.rel_h, rel_pos.rel_w]
    return []


def _table_names(rel_pos):
    if isinstance(rel_pos, RelPosTable):
        return ["table"]
    if isinstance(rel_pos, DecomposedRelPos):
        return ["rel_h", "rel_w"]
    return []


def _copy_rel_pos(rel_pos, dtype=None):
    """The same position terms as fresh leaves (in ``dtype`` when given)."""
    def leaf(t):
        return t.detach().to(dtype or t.dtype).requires_grad_()
    if isinstance(rel_pos, RelPosTable):
        wm = rel_pos.window_mask
        return RelPosTable(leaf(rel_pos.table), rel_pos.window_size,
                           None if wm is None else wm.to(dtype or wm.dtype))
    if isinstance(rel_pos, DecomposedRelPos):
        return DecomposedRelPos(leaf(rel_pos.rel_h), leaf(rel_pos.rel_w), rel_pos.q_size, rel_pos.k_size)
    return None


def _qkv(g, dtype, b, h, nq, nk, d, dv):
    return [_rand(g, s, dtype).requires_grad_() for s in ((b, h, nq, d), (b, h, nk, d), (b, h, nk, dv))]


ATTN_BACKENDS = backend_params("attention")
# the in-kernel bias backends (the reference materialises [B, H, Nq, Nk])
FUSED = [p for p in ATTN_BACKENDS if getattr(p, "values", (p,))[0] != "reference"]
# three times the profile's examples: the draws span many independent options
MORE = settings(max_examples=3 * settings.default.max_examples)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@MORE
@given(data=st.data())
def test_no_bias_matches_reference(backend, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    b, h = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 2), label="H")
    nq = data.draw(st.sampled_from([1, 7, 49, 64, 197]), label="Nq")
    nk = data.draw(st.sampled_from([1, 7, 37, 49, 197]), label="Nk")
    d = data.draw(st.sampled_from(HEAD_DIMS), label="D")
    dv = data.draw(st.sampled_from([d, 16, 40, 96]), label="Dv")
    scale = data.draw(st.sampled_from([None, 0.05, 1.3]), label="scale")
    blocks = data.draw(st.sampled_from(BLOCKS), label="blocks")
    if nq * nk > 49 * 64:  # keep the interpreter quick: long sequences with default tiles only
        b, h, blocks = 1, 1, None
    q, k, v = _qkv(g, dtype, b, h, nq, nk, d, dv)
    mask = _draw_mask(data, g, b, h, nq, nk)
    _check(backend, dtype, q, k, v, scale, None, mask, blocks, None, None)


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@MORE
@given(data=st.data())
def test_table_bias_matches_reference(backend, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    b = data.draw(st.sampled_from([1, 2, 4]), label="B")
    h = data.draw(st.integers(1, 3), label="H")
    wh, ww = data.draw(st.integers(1, 7), label="Wh"), data.draw(st.integers(1, 7), label="Ww")
    n = wh * ww
    d = data.draw(st.sampled_from(HEAD_DIMS), label="D")
    dv = data.draw(st.sampled_from([d, 32]), label="Dv")
    blocks = data.draw(st.sampled_from(BLOCKS), label="blocks")
    table_dtype = data.draw(st.sampled_from([torch.float32, dtype]), label="table dtype")
    n_windows = data.draw(st.sampled_from([0] + [w for w in (1, 2, 4) if b % w == 0]), label="nW")
    q, k, v = _qkv(g, dtype, b, h, n, n, d, dv)
    table = _rand(g, ((2 * wh - 1) * (2 * ww - 1), h), table_dtype).requires_grad_()
    window_mask = None
    if n_windows:  # Swin's shifted-window mask: 0 or -100 per pair, as float32
        window_mask = torch.where(torch.rand(n_windows, n, n, generator=g) < 0.7, 0.0, -100.0)
    rel_pos = RelPosTable(table, (wh, ww), window_mask)
    mask = _draw_mask(data, g, b, h, n, n)
    _check(backend, dtype, q, k, v, None, rel_pos, mask, blocks,
           _copy_rel_pos(rel_pos, torch.float64), _copy_rel_pos(rel_pos))


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@MORE
@given(data=st.data())
def test_decomposed_bias_matches_reference(backend, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    b, h = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 2), label="H")
    grid = st.tuples(st.integers(1, 8), st.integers(1, 8))
    q_size = data.draw(grid, label="q grid")
    k_size = data.draw(st.one_of(st.just(q_size), grid), label="k grid")
    nq, nk = q_size[0] * q_size[1], k_size[0] * k_size[1]
    d = data.draw(st.sampled_from(HEAD_DIMS), label="D")
    dv = data.draw(st.sampled_from([d, 48]), label="Dv")
    blocks = data.draw(st.sampled_from(BLOCKS), label="blocks")
    table_dtype = data.draw(st.sampled_from([torch.float32, dtype]), label="rel dtype")
    q, k, v = _qkv(g, dtype, b, h, nq, nk, d, dv)
    lh, lw = 2 * max(q_size[0], k_size[0]) - 1, 2 * max(q_size[1], k_size[1]) - 1
    rel_pos = DecomposedRelPos(_rand(g, (lh, d), table_dtype, 0.2).requires_grad_(),
                               _rand(g, (lw, d), table_dtype, 0.2).requires_grad_(), q_size, k_size)
    mask = _draw_mask(data, g, b, h, nq, nk)
    _check(backend, dtype, q, k, v, None, rel_pos, mask, blocks,
           _copy_rel_pos(rel_pos, torch.float64), _copy_rel_pos(rel_pos))


@pytest.mark.parametrize("backend", FUSED)
def test_sam_style_query_grid_differs_from_key_grid(backend):
    """MViTv2-like pooled keys: 8x6 queries attend to 4x3 keys, and the reverse (kh > qh)."""
    g = torch.Generator().manual_seed(3)
    for q_size, k_size in (((8, 6), (4, 3)), ((3, 2), (6, 5))):
        nq, nk = q_size[0] * q_size[1], k_size[0] * k_size[1]
        q, k, v = _qkv(g, torch.float32, 2, 2, nq, nk, 32, 32)
        lh, lw = 2 * max(q_size[0], k_size[0]) - 1, 2 * max(q_size[1], k_size[1]) - 1
        rp = DecomposedRelPos(_rand(g, (lh, 32)).requires_grad_(), _rand(g, (lw, 32)).requires_grad_(),
                              q_size, k_size)
        _check(backend, torch.float32, q, k, v, None, rp, None, (16, 16),
               _copy_rel_pos(rp, torch.float64), _copy_rel_pos(rp))


@pytest.mark.parametrize("shape", [(2, 1, 9, 11), (1, 3, 9, 11), (3, 1, 11), (9, 1), (11,), (2, 3, 1, 11)])
@pytest.mark.parametrize("kind", ["bool", "add"])
@pytest.mark.parametrize("backend", FUSED)
def test_mask_broadcast_shapes(shape, kind, backend):
    """Every broadcast pattern of attn_mask reads the right element (stride 0 on size-1 dims)."""
    g = torch.Generator().manual_seed(11)
    q, k, v = _qkv(g, torch.float32, 2, 3, 9, 11, 16, 16)
    if kind == "bool":
        mask = torch.rand(shape, generator=g) < 0.6
        mask[..., 0] = True
    else:
        mask = _rand(g, shape, scale=3.0)
    _check(backend, torch.float32, q, k, v, None, None, mask, (16, 16), None, None)


@pytest.mark.parametrize("backend", FUSED)
def test_fully_masked_rows_give_zero_output_and_gradient(backend):
    g = torch.Generator().manual_seed(4)
    q, k, v = _qkv(g, torch.float32, 1, 2, 20, 24, 32, 32)
    mask = torch.rand(20, 24, generator=g) < 0.7
    mask[[0, 5, 19]] = False
    with _kernel_setup((16, 16)):
        out = ops.attention(q, k, v, attn_mask=mask, backend=backend)
        out.sum().backward()
    assert torch.equal(out[:, :, [0, 5, 19]], torch.zeros_like(out[:, :, [0, 5, 19]]))
    assert torch.isfinite(out).all()
    assert torch.equal(q.grad[:, :, [0, 5, 19]], torch.zeros_like(q.grad[:, :, [0, 5, 19]]))
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert out[:, :, 1].abs().sum() > 0


@pytest.mark.parametrize("backend", FUSED)
def test_nan_input_propagates(backend):
    g = torch.Generator().manual_seed(5)
    q, k, v = (t.detach() for t in _qkv(g, torch.float32, 1, 1, 9, 9, 16, 16))
    q[0, 0, 3, 2] = float("nan")
    out = ops.attention(q, k, v, backend=backend)
    assert torch.isnan(out[0, 0, 3]).all()
    assert torch.isfinite(out[0, 0, [0, 1, 2, 4]]).all()


@pytest.mark.parametrize("backend", FUSED)
def test_strided_inputs_from_packed_qkv(backend):
    """q, k, v as timm slices them from one packed [B, N, 3, H, D] projection (not contiguous)."""
    g = torch.Generator().manual_seed(6)
    qkv = _rand(g, (2, 49, 3, 3, 32)).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    table = _rand(g, (169, 3)).requires_grad_()
    with _kernel_setup(None):
        out = ops.attention(q, k, v, rel_pos=RelPosTable(table, (7, 7)), backend=backend)
        dq, dt = torch.autograd.grad(out.square().sum(), (qkv, table))
    q64 = qkv.detach().double().requires_grad_()
    t64 = table.detach().double().requires_grad_()
    a, b_, c = q64.permute(2, 0, 3, 1, 4).unbind(0)
    ref = reference.attention(a, b_, c, table=t64, window_size=(7, 7))
    rq, rt = torch.autograd.grad(ref.square().sum(), (q64, t64))
    assert_matches_reference(out, ref)
    assert_matches_reference(dq, rq, what="d qkv")
    assert_matches_reference(dt, rt, what="d table")


@pytest.mark.parametrize("kind", ["table", "decomposed"])
@pytest.mark.parametrize("backend", FUSED)
def test_position_gradients_are_deterministic(kind, backend):
    g = torch.Generator().manual_seed(7)
    if kind == "table":
        q, k, v = _qkv(g, torch.float32, 4, 2, 35, 35, 16, 16)
        rp = RelPosTable(_rand(g, (13 * 9, 2)).requires_grad_(), (7, 5),
                         torch.where(torch.rand(2, 35, 35, generator=g) < 0.8, 0.0, -100.0))
    else:
        q, k, v = _qkv(g, torch.float32, 2, 2, 42, 20, 16, 16)
        rp = DecomposedRelPos(_rand(g, (11, 16)).requires_grad_(), _rand(g, (13, 16)).requires_grad_(),
                              (6, 7), (4, 5))
    leaves = [q, k, v] + _tables(rp)
    runs = []
    with _kernel_setup((16, 16)):
        dout = _rand(g, (q.shape[0], q.shape[1], q.shape[2], v.shape[3]))
        for _ in range(2):
            out = ops.attention(q, k, v, rel_pos=rp, backend=backend)
            runs.append(torch.autograd.grad(out, leaves, dout))
    for a, b_ in zip(*runs):
        assert torch.equal(a, b_)


def _largest_allocation(fn) -> int:
    """Bytes of the largest single-op allocation while ``fn`` runs (CPU profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.self_cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("kind", ["table", "decomposed"])
@pytest.mark.parametrize("backend", FUSED)
def test_no_n_by_n_allocation(kind, backend):
    """Forward + backward allocate nothing near B*H*Nq*Nk elements for the in-kernel bias kinds;
    the materialising reference path trips the same detector (so the check can fail)."""
    g = torch.Generator().manual_seed(8)
    b, h, d = 2, 2, 16
    if kind == "table":
        n = nq = nk = 64
        q, k, v = _qkv(g, torch.float32, b, h, n, n, d, d)
        rp = RelPosTable(_rand(g, (15 * 15, h)).requires_grad_(), (8, 8),
                         torch.zeros(2, n, n))
    else:
        nq, nk = 64, 80
        q, k, v = _qkv(g, torch.float32, b, h, nq, nk, d, d)
        rp = DecomposedRelPos(_rand(g, (19, d)).requires_grad_(), _rand(g, (15, d)).requires_grad_(),
                              (8, 8), (10, 8))
    nxn_bytes = b * h * nq * nk * 4

    def step(backend):
        def fn():
            out = ops.attention(q, k, v, rel_pos=rp, backend=backend)
            torch.autograd.grad(out.sum(), [q, k, v] + _tables(rp))
        return fn

    fused = _largest_allocation(step(backend))
    assert fused < nxn_bytes / 2, f"largest allocation {fused} B vs N x N {nxn_bytes} B"
    assert _largest_allocation(step("reference")) >= nxn_bytes


# ----------------------------------------------------------------------------------------------
# the cpp backend: several key tiles, gradcheck, thread-count independence, dropout
# ----------------------------------------------------------------------------------------------
CPP = [p for p in ATTN_BACKENDS if getattr(p, "values", (p,))[0] == "cpp"]


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_cvt_stage1_spans_many_key_tiles(backend, dtype):
    """CvT-13 stage 1 (3136 queries on a 56x56 grid, 784 keys on 28x28, one 64-dim head) with
    decomposed position across the two grids and a boolean mask: several query and key tiles,
    online-softmax rescaling across key tiles, against float64."""
    g = torch.Generator().manual_seed(21)
    q, k, v = _qkv(g, dtype, 1, 1, 3136, 784, 64, 64)
    rp = DecomposedRelPos(_rand(g, (111, 64), scale=0.1).requires_grad_(),
                          _rand(g, (111, 64), scale=0.1).requires_grad_(), (56, 56), (28, 28))
    mask = torch.rand(3136, 784, generator=g) < 0.9
    _check(backend, dtype, q, k, v, None, rp, mask, None, _copy_rel_pos(rp, torch.float64), _copy_rel_pos(rp))


@pytest.mark.parametrize("backend", CPP)
@pytest.mark.parametrize("kind", ["table", "decomposed", "bool", "add", "dropout"])
def test_cpp_gradcheck_float64(backend, kind):
    g = torch.Generator().manual_seed(22)
    q, k, v = _qkv(g, torch.float64, 2, 2, 12, 12, 8, 6)
    extra, kw = [], {}
    if kind == "table":
        extra = [_rand(g, (5 * 7, 2), torch.float64).requires_grad_()]
        wm = torch.where(torch.rand(2, 12, 12, generator=g) < 0.8, 0.0, -100.0).double()
        make = lambda t: dict(rel_pos=RelPosTable(t, (3, 4), wm))  # noqa: E731
    elif kind == "decomposed":
        k = _rand(g, (2, 2, 6, 8), torch.float64).requires_grad_()
        v = _rand(g, (2, 2, 6, 6), torch.float64).requires_grad_()
        extra = [_rand(g, (5, 8), torch.float64).requires_grad_(), _rand(g, (7, 8), torch.float64).requires_grad_()]
        make = lambda a, b_: dict(rel_pos=DecomposedRelPos(a, b_, (3, 4), (2, 3)))  # noqa: E731
    elif kind == "bool":
        m = torch.rand(2, 1, 12, 12, generator=g) < 0.7
        m[0, 0, 2] = False
        make = lambda: dict(attn_mask=m)  # noqa: E731
    elif kind == "add":
        m = _rand(g, (12, 12), torch.float64)
        make = lambda: dict(attn_mask=m)  # noqa: E731
    else:
        make = lambda: dict(dropout_p=0.3)  # noqa: E731

    def fn(q, k, v, *tables):
        torch.manual_seed(0)  # the same dropout seed on every evaluation
        return ops.attention(q, k, v, backend=backend, **make(*tables), **kw)

    assert torch.autograd.gradcheck(fn, (q, k, v, *extra))


@pytest.mark.parametrize("backend", CPP)
def test_cpp_dropout_draws_the_reference_mask(backend):
    """The kernel's hashed dropout equals the reference's ``dropout_keep`` for the same seed
    (forward and gradients), keeps about 1 - p of the probabilities, and differs between calls."""
    g = torch.Generator().manual_seed(23)
    q, k, v = _qkv(g, torch.float32, 2, 3, 70, 600, 32, 32)
    torch.manual_seed(3)
    out = ops.attention(q, k, v, dropout_p=0.25, backend=backend)
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.attention(q64, k64, v64, dropout_p=0.25, dropout_seed=seed)
    assert rel_error(out, ref) < 1e-5
    dout = torch.randn(out.shape, generator=g)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), dout),
                         torch.autograd.grad(ref, (q64, k64, v64), dout.double())):
        assert rel_error(got, want) < 1e-5
    keep = reference.dropout_keep(seed, (2, 3, 70, 600), 0.25)
    assert abs(keep.double().mean().item() - 0.75) < 0.01
    assert not torch.equal(out, ops.attention(q, k, v, dropout_p=0.25, backend=backend))


@pytest.mark.parametrize("backend", CPP)
def test_cpp_results_do_not_depend_on_the_thread_count(backend):
    g = torch.Generator().manual_seed(24)
    q, k, v = _qkv(g, torch.float32, 3, 2, 49, 49, 32, 32)
    rp = RelPosTable(_rand(g, (169, 2)).requires_grad_(), (7, 7))
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = ops.attention(q, k, v, rel_pos=rp, backend=backend)
            runs.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, rp.table))))
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        for a, b_ in zip(runs[0], other):
            assert torch.equal(a, b_)


def _op_args(kind):
    g = torch.Generator().manual_seed(9)
    q, k, v = _qkv(g, torch.float32, 2, 2, 12, 12, 16, 24)
    table = window_mask = rel_h = rel_w = mask = None
    sizes = [0, 0, 0, 0, 0, 0]
    if kind == "table":
        table = _rand(g, (5 * 7, 2)).requires_grad_()
        window_mask = torch.where(torch.rand(2, 12, 12, generator=g) < 0.8, 0.0, -100.0)
        sizes = [3, 4, 0, 0, 0, 0]
        mask = torch.rand(12, 12, generator=g) < 0.9
    else:
        rel_h = _rand(g, (5, 16)).requires_grad_()
        rel_w = _rand(g, (7, 16)).requires_grad_()
        sizes = [0, 0, 3, 4, 3, 4]
        mask = _rand(g, (2, 1, 12, 12))
    return (q, k, v, table, window_mask, rel_h, rel_w, mask, 0.3, sizes, 0.0, None, "triton")


@pytest.mark.parametrize("kind", ["table", "decomposed"])
def test_opcheck(kind):
    args = _op_args(kind)
    torch.library.opcheck(torch.ops.ssl_fast.attention_fwd.default, args)
    fwd_args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out, lse = torch.ops.ssl_fast.attention_fwd(*fwd_args)
    bwd_args = (torch.randn_like(out), *fwd_args[:3], out, lse, *fwd_args[3:12], False, fwd_args[12])
    torch.library.opcheck(torch.ops.ssl_fast.attention_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_compiles_fullgraph():
    g = torch.Generator().manual_seed(10)
    q, k, v = _qkv(g, torch.float32, 2, 2, 12, 12, 16, 16)
    table = _rand(g, (5 * 7, 2)).requires_grad_()

    def fn(q, k, v, table):
        return ops.attention(q, k, v, rel_pos=RelPosTable(table, (3, 4)), backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, table)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, table))
    eager = fn(q, k, v, table)
    eager_grads = torch.autograd.grad(eager.square().sum(), (q, k, v, table))
    torch.testing.assert_close(out, eager)
    for a, b_ in zip(grads, eager_grads):
        torch.testing.assert_close(a, b_)


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _x(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def test_bad_grid_sizes():
    q = _x(1, 2, 12, 16)
    with pytest.raises(ValueError, match="q_size 3x5 = 15 does not match q's 12 tokens"):
        ops.attention(q, q, q, rel_pos=DecomposedRelPos(_x(5, 16), _x(9, 16), (3, 5), (3, 4)))
    with pytest.raises(ValueError, match="k_size"):
        ops.attention(q, q, q, rel_pos=DecomposedRelPos(_x(5, 16), _x(7, 16), (3, 4), (2, 5)))
    with pytest.raises(ValueError, match="window 3x5 has 15 tokens"):
        ops.attention(q, q, q, rel_pos=RelPosTable(_x(5 * 9, 2), (3, 5)))
    with pytest.raises(ValueError, match="q_size must be a pair of positive ints"):
        ops.attention(q, q, q, rel_pos=DecomposedRelPos(_x(5, 16), _x(7, 16), (0, 4), (3, 4)))


def test_bad_table_lengths():
    q = _x(1, 2, 12, 16)
    with pytest.raises(ValueError, match=r"rel_pos.table must have shape \[35, 2\]"):
        ops.attention(q, q, q, rel_pos=RelPosTable(_x(36, 2), (3, 4)))
    with pytest.raises(ValueError, match=r"rel_pos.table must have shape \[35, 2\]"):
        ops.attention(q, q, q, rel_pos=RelPosTable(_x(35, 3), (3, 4)))
    with pytest.raises(ValueError, match=r"rel_pos.rel_h must have shape \[5, 16\]"):
        ops.attention(q, q, q, rel_pos=DecomposedRelPos(_x(6, 16), _x(7, 16), (3, 4), (3, 4)))
    with pytest.raises(ValueError, match=r"rel_pos.rel_w must have shape \[7, 16\]"):
        ops.attention(q, q, q, rel_pos=DecomposedRelPos(_x(5, 16), _x(7, 8), (3, 4), (3, 4)))


def test_bad_masks():
    q = _x(2, 2, 12, 16)
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.attention(q, q, q, attn_mask=torch.ones(12, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.attention(q, q, q, attn_mask=torch.zeros(3, 2, 12, 12))
    with pytest.raises(TypeError, match="attn_mask must be bool or floating"):
        ops.attention(q, q, q, attn_mask=torch.ones(12, 12, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"window_mask must be \[nW, 12, 12\]"):
        ops.attention(q, q, q, rel_pos=RelPosTable(_x(35, 2), (3, 4), _x(2, 12, 11)))
    with pytest.raises(ValueError, match="multiple of the number of windows"):
        ops.attention(q, q, q, rel_pos=RelPosTable(_x(35, 2), (3, 4), _x(3, 12, 12)))


def test_forced_triton_refuses_what_it_cannot_serve():
    q = _x(1, 2, 12, 160)
    with pytest.raises(_backend.BackendUnavailableError, match="head dims 160/160 exceed 128"):
        ops.attention(q, q, q, backend="triton")
    q64 = _x(1, 2, 12, 16, dtype=torch.float64)
    with pytest.raises(_backend.BackendUnavailableError, match="float64"):
        ops.attention(q64, q64, q64, backend="triton")
    q = _x(1, 2, 12, 16)
    with pytest.raises(_backend.BackendUnavailableError, match="dropout"):
        ops.attention(q, q, q, dropout_p=0.1, backend="triton")
    with pytest.raises(_backend.BackendUnavailableError, match="attn_mask requires grad"):
        ops.attention(q, q, q, attn_mask=_x(12, 12).requires_grad_(), backend="triton")
    # the reference serves all of these
    assert ops.attention(_x(1, 2, 12, 160), _x(1, 2, 12, 160), _x(1, 2, 12, 160),
                         backend="reference").shape == (1, 2, 12, 160)


def test_mixed_devices_and_dtypes():
    q = _x(1, 2, 12, 16)
    with pytest.raises(ValueError, match="one device"):
        ops.attention(q, _x(1, 2, 12, 16, device="meta"), q)
    with pytest.raises(TypeError, match="share a dtype"):
        ops.attention(q, q.half(), q)
    with pytest.raises(ValueError, match="rel_pos.table is on meta"):
        ops.attention(q, q, q, rel_pos=RelPosTable(_x(35, 2, device="meta"), (3, 4)))
    with pytest.raises(ValueError, match="rel_pos.rel_h is on meta"):
        ops.attention(q, q, q, rel_pos=DecomposedRelPos(_x(5, 16, device="meta"), _x(7, 16), (3, 4), (3, 4)))
    with pytest.raises(ValueError, match="attn_mask is on meta"):
        ops.attention(q, q, q, attn_mask=_x(12, 12, device="meta"))
    with pytest.raises(ValueError, match="k's head dim 8 differs"):
        ops.attention(q, _x(1, 2, 12, 8), q)
