"""Triton additive (Bahdanau) attention of Show-Attend-Tell, forward and backward.

Notation as in ``ssl_fast/reference/additive_attention.py``: ``a [B, L, D]``, ``Ua [B, L, A]``,
``Wh [B, A]``, ``w [A]``, optional boolean ``mask [B, L]``; ``t = tanh(Ua + Wh[:, None])``,
``e = t w``, ``alpha = softmax(e)`` over the kept positions, ``context = alpha a``.

Forward:

- ``_scores_kernel``, grid ``(B, cdiv(L, BLOCK_L))``: a ``[BLOCK_L, BLOCK_A]`` tile of ``Ua`` at a
  time, ``tanh`` in registers, the scores ``e`` (float32, ``-inf`` at masked positions) written
  to a ``[B, L]`` buffer. ``Ua`` is read once and ``t`` never reaches memory.
- ``_context_kernel``, grid ``(B, cdiv(D, BLOCK_D))``: each program reads its row of ``e`` (``L``
  floats), takes the softmax statistics (max, exp-sum; a fully masked row gives ``alpha = 0``),
  then ``context[b, d-block] = sum_l alpha_l a[b, l, d-block]`` over tiles of ``L``; the
  programs with ``d-block = 0`` write ``alpha`` (float32).

Backward, with ``gc = dL/dcontext`` and ``galpha = dL/dalpha``:

- ``_bwd_a_kernel``, grid ``(B, cdiv(L, BLOCK_L))``: one read of ``a`` gives
  ``grad_a = alpha_l gc`` and ``dalpha_l = galpha_l + a_l . gc`` (float32 buffer ``[B, L]``).
- ``_bwd_ua_kernel``, grid ``(B, cdiv(A, BLOCK_A))``: ``delta = sum_l alpha_l dalpha_l`` from the
  row's ``[L]`` buffers, then over tiles of ``L``: ``de = alpha (dalpha - delta)`` (at the row's
  largest alpha minus the sum of the others, equal as ``sum_l de = 0`` but without the
  cancellation of ``dalpha - delta`` as alpha -> 1), ``t
  recomputed from ``Ua`` and ``Wh``, ``grad_Ua = de w (1 - t^2)`` written, and the column sums
  ``sum_l de (t_0^2 - t_l^2)`` and ``sum_l de t`` (row ``b``'s share of ``grad_w``) kept in
  registers; ``grad_Wh[b] = w sum_l de (t_0^2 - t_l^2)`` equals ``sum_l grad_Ua`` because
  ``sum_l de = 0``, without its cancellation (the direct sum loses 1e-4 in float32 where the
  ``t_l^2`` are alike). The launcher adds the ``B`` shares of ``grad_w`` in a fixed order (no
  atomics).

``tanh`` is ``x + x^3 P(x^2)`` for ``|x| < 0.625`` (the odd polynomial of Cephes' tanhf, no
cancellation near 0) and ``sign(x) (1 - 2 / (exp(2|x|) + 1))`` above (exactly +-1 for large
``|x|``); NaN propagates. Inputs float32/float16/bfloat16, contiguous; arithmetic in float32.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    ax = tl.abs(x)
    z = x * x
    p = -5.70498872745e-3 * z + 2.06390887954e-2
    p = p * z - 5.37397155531e-2
    p = p * z + 1.33314422036e-1
    p = p * z - 3.33332819422e-1
    small = p * z * x + x
    large = 1.0 - 2.0 / (tl.exp(2.0 * ax) + 1.0)
    large = tl.where(x < 0.0, -large, large)
    return tl.where(ax < 0.625, small, large)


@triton.jit
def _scores_kernel(ua_ptr, wh_ptr, w_ptr, mask_ptr, e_ptr, L, A,
                   HAS_MASK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_A: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    in_l = offs_l < L
    acc = tl.zeros([BLOCK_L], tl.float32)
    rows = ua_ptr + (b * L + offs_l)[:, None] * A
    for start in range(0, A, BLOCK_A):
        offs_a = start + tl.arange(0, BLOCK_A)
        in_a = offs_a < A
        u = tl.load(rows + offs_a[None, :], mask=in_l[:, None] & in_a[None, :], other=0.0).to(tl.float32)
        h = tl.load(wh_ptr + b * A + offs_a, mask=in_a, other=0.0).to(tl.float32)
        wv = tl.load(w_ptr + offs_a, mask=in_a, other=0.0).to(tl.float32)
        acc += tl.sum(_tanh(u + h[None, :]) * wv[None, :], axis=1)
    if HAS_MASK:
        keep = tl.load(mask_ptr + b * L + offs_l, mask=in_l, other=0).to(tl.int1)
        acc = tl.where(keep, acc, float("-inf"))
    tl.store(e_ptr + b * L + offs_l, acc, mask=in_l)


@triton.jit
def _row_softmax_stats(e_ptr, b, L, L_P2: tl.constexpr):
    """The row's max (0 for a fully masked row) and the reciprocal of its exp-sum (0 when masked)."""
    offs = tl.arange(0, L_P2)
    e = tl.load(e_ptr + b * L + offs, mask=offs < L, other=float("-inf"))
    m = tl.max(e, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.exp(e - m), axis=0)
    inv = tl.where(s == 0.0, 0.0, 1.0 / tl.where(s == 0.0, 1.0, s))
    return m, inv


@triton.jit
def _context_kernel(a_ptr, e_ptr, alpha_ptr, ctx_ptr, L, D,
                    L_P2: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    m, inv = _row_softmax_stats(e_ptr, b, L, L_P2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, L, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        in_l = offs_l < L
        e = tl.load(e_ptr + b * L + offs_l, mask=in_l, other=float("-inf"))
        p = tl.exp(e - m) * inv
        if pid_d == 0:
            tl.store(alpha_ptr + b * L + offs_l, p, mask=in_l)
        x = tl.load(a_ptr + (b * L + offs_l)[:, None] * D + offs_d[None, :],
                    mask=in_l[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(p[:, None] * x, axis=0)
    tl.store(ctx_ptr + b * D + offs_d, acc.to(ctx_ptr.dtype.element_ty), mask=in_d)


@triton.jit
def _bwd_a_kernel(a_ptr, gc_ptr, galpha_ptr, alpha_ptr, ga_ptr, dalpha_ptr, L, D,
                  WRITE_GA: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    in_l = offs_l < L
    p = tl.load(alpha_ptr + b * L + offs_l, mask=in_l, other=0.0)
    dot = tl.zeros([BLOCK_L], tl.float32)
    rows = (b * L + offs_l)[:, None] * D
    for start in range(0, D, BLOCK_D):
        offs_d = start + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        tile = in_l[:, None] & in_d[None, :]
        gc = tl.load(gc_ptr + b * D + offs_d, mask=in_d, other=0.0).to(tl.float32)
        x = tl.load(a_ptr + rows + offs_d[None, :], mask=tile, other=0.0).to(tl.float32)
        dot += tl.sum(x * gc[None, :], axis=1)
        if WRITE_GA:
            tl.store(ga_ptr + rows + offs_d[None, :], (p[:, None] * gc[None, :]).to(ga_ptr.dtype.element_ty),
                     mask=tile)
    galpha = tl.load(galpha_ptr + b * L + offs_l, mask=in_l, other=0.0).to(tl.float32)
    tl.store(dalpha_ptr + b * L + offs_l, galpha + dot, mask=in_l)


@triton.jit
def _bwd_ua_kernel(ua_ptr, wh_ptr, w_ptr, alpha_ptr, dalpha_ptr, gua_ptr, gwh_ptr, gw_rows_ptr, L, A,
                   L_P2: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_A: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs_a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    in_a = offs_a < A
    offs = tl.arange(0, L_P2)
    p_row = tl.load(alpha_ptr + b * L + offs, mask=offs < L, other=0.0)
    dp_row = tl.load(dalpha_ptr + b * L + offs, mask=offs < L, other=0.0)
    delta = tl.sum(p_row * dp_row, axis=0)
    # de at the largest alpha is minus the sum of the others (sum_l de_l = 0): no cancellation
    top = tl.argmax(p_row, axis=0)
    de_top = -tl.sum(tl.where(offs == top, 0.0, p_row * (dp_row - delta)), axis=0)
    h = tl.load(wh_ptr + b * A + offs_a, mask=in_a, other=0.0).to(tl.float32)
    wv = tl.load(w_ptr + offs_a, mask=in_a, other=0.0).to(tl.float32)
    t0 = _tanh(tl.load(ua_ptr + b * L * A + offs_a, mask=in_a, other=0.0).to(tl.float32) + h)
    t0sq = t0 * t0
    gwh = tl.zeros([BLOCK_A], tl.float32)
    gw = tl.zeros([BLOCK_A], tl.float32)
    for start in range(0, L, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        in_l = offs_l < L
        tile = in_l[:, None] & in_a[None, :]
        p = tl.load(alpha_ptr + b * L + offs_l, mask=in_l, other=0.0)
        dp = tl.load(dalpha_ptr + b * L + offs_l, mask=in_l, other=0.0)
        de = tl.where(offs_l == top, de_top, p * (dp - delta))
        ptrs = (b * L + offs_l)[:, None] * A + offs_a[None, :]
        u = tl.load(ua_ptr + ptrs, mask=tile, other=0.0).to(tl.float32)
        t = _tanh(u + h[None, :])
        g = de[:, None] * wv[None, :] * (1.0 - t * t)
        tl.store(gua_ptr + ptrs, g.to(gua_ptr.dtype.element_ty), mask=tile)
        gwh += tl.sum(de[:, None] * (t0sq[None, :] - t * t), axis=0)
        gw += tl.sum(de[:, None] * t, axis=0)
    tl.store(gwh_ptr + b * A + offs_a, (wv * gwh).to(gwh_ptr.dtype.element_ty), mask=in_a)
    tl.store(gw_rows_ptr + b * A + offs_a, gw, mask=in_a)


def _blocks(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


def forward(a: torch.Tensor, Ua: torch.Tensor, Wh: torch.Tensor, w: torch.Tensor, mask):
    """``(context [B, D] in a's dtype, alpha [B, L] float32)``; inputs contiguous, one dtype."""
    B, L, D = a.shape
    A = Ua.shape[2]
    e = torch.empty((B, L), device=a.device, dtype=torch.float32)
    alpha = torch.empty((B, L), device=a.device, dtype=torch.float32)
    context = torch.empty((B, D), device=a.device, dtype=a.dtype)
    block_l, block_a, block_d = _blocks(L, 32), _blocks(A, 128), _blocks(D, 128)
    has_mask = mask is not None
    _scores_kernel[(B, triton.cdiv(L, block_l))](
        Ua, Wh, w, mask if has_mask else e, e, L, A, HAS_MASK=has_mask, BLOCK_L=block_l, BLOCK_A=block_a)
    _context_kernel[(B, triton.cdiv(D, block_d))](
        a, e, alpha, context, L, D, L_P2=triton.next_power_of_2(L), BLOCK_L=block_l, BLOCK_D=block_d)
    return context, alpha


def backward(grad_context: torch.Tensor, grad_alpha: torch.Tensor, a: torch.Tensor, Ua: torch.Tensor,
             Wh: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, need_grad_a: bool = True):
    """``(grad_a, grad_Ua, grad_Wh, grad_w)`` in the inputs' dtypes; ``alpha`` float32 from :func:`forward`;
    ``grad_a`` is an empty ``[0]`` tensor when ``need_grad_a`` is False."""
    B, L, D = a.shape
    A = Ua.shape[2]
    grad_context = grad_context.contiguous()
    grad_alpha = grad_alpha.to(torch.float32).contiguous()
    grad_a = torch.empty_like(a) if need_grad_a else a.new_empty((0,))
    grad_Ua = torch.empty_like(Ua)
    grad_Wh = torch.empty_like(Wh)
    dalpha = torch.empty((B, L), device=a.device, dtype=torch.float32)
    gw_rows = torch.empty((B, A), device=a.device, dtype=torch.float32)
    block_l, block_a, block_d = _blocks(L, 32), _blocks(A, 128), _blocks(D, 128)
    _bwd_a_kernel[(B, triton.cdiv(L, block_l))](
        a, grad_context, grad_alpha, alpha, grad_a if need_grad_a else dalpha, dalpha, L, D, WRITE_GA=need_grad_a,
        BLOCK_L=block_l, BLOCK_D=block_d)
    _bwd_ua_kernel[(B, triton.cdiv(A, block_a))](
        Ua, Wh, w, alpha, dalpha, grad_Ua, grad_Wh, gw_rows, L, A,
        L_P2=triton.next_power_of_2(L), BLOCK_L=block_l, BLOCK_A=block_a)
    grad_w = gw_rows.sum(dim=0).to(w.dtype)
    return grad_a, grad_Ua, grad_Wh, grad_w
