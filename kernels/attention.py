"""Triton flash attention with relative-position terms computed inside the kernel.

Math (per batch row ``b`` and head ``h``; ``i`` indexes queries, ``j`` keys)::

    s[i, j]  = scale * q_i . k_j + bias[i, j]            (fp32)
    lse[i]   = log sum_j exp(s[i, j])
    out[i]   = sum_j exp(s[i, j] - lse[i]) v_j

The forward walks key tiles for one query tile with an online softmax (running max ``m`` and
running sum ``l``, rescaled whenever the max grows; base-2 exponentials) and saves the natural
log-sum-exp. The backward recomputes ``p = exp(s - lse)`` tile by tile:

    dv_j = sum_i p[i, j] do_i               dp[i, j] = do_i . v_j
    ds[i, j] = p[i, j] (dp[i, j] - delta_i)  with delta_i = do_i . out_i
    dq_i = scale * sum_j ds[i, j] k_j        dk_j = scale * sum_i ds[i, j] q_i

in two kernels without atomics: one program per key tile accumulates ``dk, dv`` over query
tiles, one program per query tile accumulates ``dq`` (and the position gradients) over key
tiles. Everything is deterministic.

Bias kinds (never an ``Nq x Nk`` tensor in memory):

* ``BIAS_TABLE``: Swin, ``bias[i, j] = table[(yi - yj + Wh - 1)(2 Ww - 1) + xi - xj + Ww - 1, h]``
  with ``(y, x)`` the row-major coordinates in a ``Wh x Ww`` window, gathered from the table
  inside the tile. Its gradient ``dtable[r, h] = sum_{b, i, j : index(i, j) = r} ds[i, j]`` is
  built per query tile in registers: for every row offset ``dy`` present in a tile, the
  entries of ``ds`` with ``yi - yj = dy`` are binned by ``xi`` and ``xj`` with two one-hot
  matrix products into a small ``[Ww, Ww]`` matrix whose anti-diagonal sums are the bins
  ``dx = xi - xj``. The per-tile partial sums go to a ``[B * H * n_qtiles, table_len]`` buffer
  that is summed afterwards in a fixed order.
* ``BIAS_DECOMPOSED``: SAM/ViTDet, ``bias[i, j] = q_i . Rh[yi, yj] + q_i . Rw[xi, xj]``. The
  launcher first projects ``term_h[i, y'] = q_i . Rh[yi, y']`` and ``term_w[i, x'] =
  q_i . Rw[xi, x']`` (``[B*H, Nq, kh]`` and ``[B*H, Nq, kw]``, a batched matmul), and the
  kernel adds ``term_h[i, yj] + term_w[i, xj]`` per key tile. In the backward the dq kernel
  reduces ``dterm_h[i, y'] = sum_{j : yj = y'} ds[i, j]`` (and ``dterm_w``) with a one-hot
  matrix product; ``d rel_h``, ``d rel_w`` and the extra ``dq`` term are small reductions of
  those in the launcher (one-hot matrix products, so they are deterministic too).
* an additive window mask ``[nW, N, N]`` applied to batch row ``b`` as ``mask[b % nW]``;
* an additive or boolean ``attn_mask`` broadcastable to ``[B, H, Nq, Nk]``, read through
  broadcast strides (0 on broadcast dimensions). A boolean ``False`` gives ``-inf``.

A query whose every logit is ``-inf`` gets a zero output, a zero gradient and ``lse = +inf``.
"""
import os

import torch
import triton
import triton.language as tl

from ssl_fast.reference.attention import decomposed_index

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

BIAS_NONE, BIAS_TABLE, BIAS_DECOMPOSED = 0, 1, 2
MASK_NONE, MASK_ADD, MASK_BOOL = 0, 1, 2
MAX_HEAD_DIM = 128

# (BLOCK_M, BLOCK_N) forced for every kernel, for tests that want several tiles on small inputs.
BLOCK_OVERRIDE = None

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # ssl_fast._triton patches the interpreter




def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(int(n)))


# --------------------------------------------------------------------------------------------
# shared tile helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _tile_bias(mi, nj, b, h, bh, NQ, NK,
               TAB, stab_r, stab_h, WH, WW,
               TH, TW, KH, KW,
               WM, swm_w, swm_m, swm_n, NW,
               AM, sam_b, sam_h, sam_m, sam_n,
               BIAS: tl.constexpr, HAS_WMASK: tl.constexpr, AMASK: tl.constexpr):
    """fp32 bias for the query indices ``mi`` and key indices ``nj``.

    ``mi`` and ``nj`` are broadcastable index tensors (``[BM, 1]`` and ``[1, BN]``, or the
    transposed pair), so the same code serves tiles in either orientation. Keys ``>= NK`` get
    ``-inf``; queries ``>= NQ`` get finite garbage that callers never use.
    """
    ok = (mi < NQ) & (nj < NK)
    bias = tl.zeros(ok.shape, dtype=tl.float32)
    if BIAS == 1:
        yi = mi // WW
        xi = mi % WW
        yj = nj // WW
        xj = nj % WW
        idx = (yi - yj + WH - 1) * (2 * WW - 1) + (xi - xj + WW - 1)
        bias += tl.load(TAB + idx * stab_r + h * stab_h, mask=ok, other=0.0).to(tl.float32)
    if BIAS == 2:
        row = bh.to(tl.int64) * NQ + mi
        bias += tl.load(TH + row * KH + nj // KW, mask=ok, other=0.0)
        bias += tl.load(TW + row * KW + nj % KW, mask=ok, other=0.0)
    if HAS_WMASK:
        w = (b % NW).to(tl.int64)
        bias += tl.load(WM + w * swm_w + mi * swm_m + nj * swm_n, mask=ok, other=0.0).to(tl.float32)
    if AMASK == 1:
        bias += tl.load(AM + b.to(tl.int64) * sam_b + h * sam_h + mi * sam_m + nj * sam_n,
                        mask=ok, other=0.0).to(tl.float32)
    if AMASK == 2:
        keep = tl.load(AM + b.to(tl.int64) * sam_b + h * sam_h + mi * sam_m + nj * sam_n,
                       mask=ok, other=0)
        bias = tl.where(keep != 0, bias, float("-inf"))
    bias = tl.where(nj < NK, bias, float("-inf"))
    return bias


@triton.jit
def _mm_operand(x, UPCAST: tl.constexpr):
    """A dot operand as loaded, or widened to fp32 (exact) where the interpreter cannot
    multiply bf16 (it holds bf16 as raw uint16 bits). Roundings to the input dtype stay explicit
    at every call site, so the interpreter sees the GPU's numerics."""
    if UPCAST:
        return x.to(tl.float32)
    else:
        return x


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
                H, NQ, NK, D, DV, scale,
                TAB, stab_r, stab_h, WH, WW,
                TH, TW, KH, KW,
                WM, swm_w, swm_m, swm_n, NW,
                AM, sam_b, sam_h, sam_m, sam_n,
                BIAS: tl.constexpr, HAS_WMASK: tl.constexpr, AMASK: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < NQ
    q = tl.load(Q + b64 * sqb + h64 * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    q = _mm_operand(q, UPCAST)
    k_base = K + b64 * skb + h64 * skh
    v_base = V + b64 * svb + h64 * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0)  # [BLOCK_D, BLOCK_N]
        kt = _mm_operand(kt, UPCAST)
        s = tl.dot(q, kt, input_precision=PREC) * scale
        s += _tile_bias(offs_m[:, None], offs_n[None, :], b, h, bh, NQ, NK,
                        TAB, stab_r, stab_h, WH, WW, TH, TW, KH, KW,
                        WM, swm_w, swm_m, swm_n, NW, AM, sam_b, sam_h, sam_m, sam_n,
                        BIAS, HAS_WMASK, AMASK)
        s = s * 1.4426950408889634  # base 2 from here on
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no live key so far
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                     mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)  # [BLOCK_N, BLOCK_DV]
        vt = _mm_operand(vt, UPCAST)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(V.dtype.element_ty).to(vt.dtype), vt, acc, input_precision=PREC)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    tl.store(O + b64 * sob + h64 * soh + offs_m[:, None] * som + offs_dv[None, :] * sod,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + bh.to(tl.int64) * NQ + offs_m, lse, mask=m_ok)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _delta_kernel(O, DO, DELTA, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, NQ, DV,
                  BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """``delta[b, h, i] = sum_d out[b, h, i, d] * dout[b, h, i, d]`` in fp32."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    msk = (offs_m[:, None] < NQ) & (offs_dv[None, :] < DV)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_dv[None, :] * sod, mask=msk, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_dv[None, :] * sdd, mask=msk, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * NQ + offs_m, delta, mask=offs_m < NQ)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_OUT,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     sdb, sdh, sdm, sdd,
                     H, NQ, NK, D, DV, scale,
                     TAB, stab_r, stab_h, WH, WW,
                     TH, TW, KH, KW,
                     WM, swm_w, swm_m, swm_n, NW,
                     AM, sam_b, sam_h, sam_m, sam_n,
                     BIAS: tl.constexpr, HAS_WMASK: tl.constexpr, AMASK: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One key tile: ``dv = p^T do`` and ``dk = scale * ds^T q`` over every query tile.

    Works on transposed tiles (keys along rows) so that no tile needs a transpose.
    """
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < NK
    k = tl.load(K + b64 * skb + h64 * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=n_ok[:, None] & (offs_d[None, :] < D), other=0.0)      # [BN, BD]
    v = tl.load(V + b64 * svb + h64 * svh + offs_n[:, None] * svn + offs_dv[None, :] * svd,
                mask=n_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)    # [BN, BDV]
    k = _mm_operand(k, UPCAST)
    v = _mm_operand(v, UPCAST)
    q_base = Q + b64 * sqb + h64 * sqh
    do_base = DO + b64 * sdb + h64 * sdh
    row_base = bh.to(tl.int64) * NQ
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < NQ
        qt = tl.load(q_base + offs_m[None, :] * sqm + offs_d[:, None] * sqd,
                     mask=m_ok[None, :] & (offs_d[:, None] < D), other=0.0)     # [BD, BM]
        do = tl.load(do_base + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                     mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)   # [BM, BDV]
        qt = _mm_operand(qt, UPCAST)
        do = _mm_operand(do, UPCAST)
        lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        st = tl.dot(k, qt, input_precision=PREC) * scale                       # [BN, BM]
        st += _tile_bias(offs_m[None, :], offs_n[:, None], b, h, bh, NQ, NK,
                         TAB, stab_r, stab_h, WH, WW, TH, TW, KH, KW,
                         WM, swm_w, swm_m, swm_n, NW, AM, sam_b, sam_h, sam_m, sam_n,
                         BIAS, HAS_WMASK, AMASK)
        pt = tl.exp2(st * 1.4426950408889634 - lse[None, :] * 1.4426950408889634)
        pt = tl.where(m_ok[None, :], pt, 0.0)
        dv = tl.dot(pt.to(DO.dtype.element_ty).to(do.dtype), do, dv, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)                    # [BN, BM]
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(Q.dtype.element_ty).to(qt.dtype), tl.trans(qt), dk, input_precision=PREC)
    dk = dk * scale
    tl.store(DK + bh.to(tl.int64) * NK * D + offs_n[:, None] * D + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV_OUT + bh.to(tl.int64) * NK * DV + offs_n[:, None] * DV + offs_dv[None, :],
             dv.to(DV_OUT.dtype.element_ty), mask=n_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, PART, DTH, DTW,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   sdb, sdh, sdm, sdd,
                   H, NQ, NK, D, DV, scale,
                   TAB, stab_r, stab_h, WH, WW,
                   TH, TW, KH, KW,
                   WM, swm_w, swm_m, swm_n, NW,
                   AM, sam_b, sam_h, sam_m, sam_n,
                   BIAS: tl.constexpr, HAS_WMASK: tl.constexpr, AMASK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, AUX_PREC: tl.constexpr,
                   WW_PAD: tl.constexpr, DY_PAD: tl.constexpr, DX_PAD: tl.constexpr,
                   KH_PAD: tl.constexpr, KW_PAD: tl.constexpr):
    """One query tile: ``dq = scale * ds k`` (fp32) plus the position-gradient partial sums.

    * table bias: ``PART[(bh * n_qtiles + tile), dy * (2 WW - 1) + dx]`` = sum of ``ds`` over
      this tile's pairs with ``yi - yj = dy - WH + 1`` and ``xi - xj = dx - WW + 1``;
    * decomposed: ``DTH[bh, i, y'] = sum_{j : yj = y'} ds[i, j]`` and ``DTW`` likewise.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < NQ
    row_base = bh.to(tl.int64) * NQ
    q = tl.load(Q + b64 * sqb + h64 * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b64 * sdb + h64 * sdh + offs_m[:, None] * sdm + offs_dv[None, :] * sdd,
                 mask=m_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    q = _mm_operand(q, UPCAST)
    do = _mm_operand(do, UPCAST)
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + b64 * skb + h64 * skh
    v_base = V + b64 * svb + h64 * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if BIAS == 1:
        xi = offs_m % WW
        yi = offs_m // WW
        wcols = tl.arange(0, WW_PAD)
        xq_hot = (xi[:, None] == wcols[None, :]).to(tl.float32)                 # [BM, WW_PAD]
        bins = tl.arange(0, DX_PAD)
        # sel[c, d, r] = 1 where xi = c, xj = d fall in bin r = c - d + WW - 1
        sel = ((wcols[:, None, None] - wcols[None, :, None] + WW - 1) == bins[None, None, :]).to(tl.float32)
        dy_rows = tl.arange(0, DY_PAD)
        acc_tab = tl.zeros([DY_PAD, DX_PAD], dtype=tl.float32)
        yi_lo = (pid_m * BLOCK_M) // WW
        yi_hi = (tl.minimum(pid_m * BLOCK_M + BLOCK_M, NQ) - 1) // WW
    if BIAS == 2:
        dth = tl.zeros([BLOCK_M, KH_PAD], dtype=tl.float32)
        dtw = tl.zeros([BLOCK_M, KW_PAD], dtype=tl.float32)

    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NK
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=n_ok[None, :] & (offs_d[:, None] < D), other=0.0)    # [BD, BN]
        vt = tl.load(v_base + offs_n[None, :] * svn + offs_dv[:, None] * svd,
                     mask=n_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)  # [BDV, BN]
        kt = _mm_operand(kt, UPCAST)
        vt = _mm_operand(vt, UPCAST)
        s = tl.dot(q, kt, input_precision=PREC) * scale
        s += _tile_bias(offs_m[:, None], offs_n[None, :], b, h, bh, NQ, NK,
                        TAB, stab_r, stab_h, WH, WW, TH, TW, KH, KW,
                        WM, swm_w, swm_m, swm_n, NW, AM, sam_b, sam_h, sam_m, sam_n,
                        BIAS, HAS_WMASK, AMASK)
        p = tl.exp2(s * 1.4426950408889634 - lse[:, None] * 1.4426950408889634)
        p = tl.where(m_ok[:, None], p, 0.0)
        dp = tl.dot(do, vt, input_precision=PREC)
        ds = p * (dp - delta[:, None])                                          # [BM, BN] fp32
        dq = tl.dot(ds.to(K.dtype.element_ty).to(kt.dtype), tl.trans(kt), dq, input_precision=PREC)
        if BIAS == 1:
            yj = offs_n // WW
            xj = offs_n % WW
            xk_hot = (xj[:, None] == wcols[None, :]).to(tl.float32)             # [BN, WW_PAD]
            dyy = yi[:, None] - yj[None, :]
            yj_lo = start_n // WW
            yj_hi = (tl.minimum(start_n + BLOCK_N, NK) - 1) // WW
            for dy in range(yi_lo - yj_hi, yi_hi - yj_lo + 1):
                e = tl.where(dyy == dy, ds, 0.0)
                by_xj = tl.dot(e, xk_hot, input_precision=AUX_PREC)             # [BM, WW_PAD]
                cc = tl.dot(tl.trans(xq_hot), by_xj, input_precision=AUX_PREC)  # [xi, xj]
                row = tl.sum(tl.sum(cc[:, :, None] * sel, 0), 0)                # [DX_PAD]
                acc_tab += tl.where((dy_rows == dy + WH - 1)[:, None], row[None, :], 0.0)
        if BIAS == 2:
            yk_hot = ((offs_n // KW)[:, None] == tl.arange(0, KH_PAD)[None, :]).to(tl.float32)
            xk_hot2 = ((offs_n % KW)[:, None] == tl.arange(0, KW_PAD)[None, :]).to(tl.float32)
            yk_hot = tl.where(n_ok[:, None], yk_hot, 0.0)
            xk_hot2 = tl.where(n_ok[:, None], xk_hot2, 0.0)
            dth = tl.dot(ds, yk_hot, dth, input_precision=AUX_PREC)
            dtw = tl.dot(ds, xk_hot2, dtw, input_precision=AUX_PREC)

    dq = dq * scale
    tl.store(DQ + bh.to(tl.int64) * NQ * D + offs_m[:, None] * D + offs_d[None, :], dq,
             mask=m_ok[:, None] & (offs_d[None, :] < D))
    if BIAS == 1:
        tlen = (2 * WH - 1) * (2 * WW - 1)
        part = PART + (bh.to(tl.int64) * tl.num_programs(0) + pid_m) * tlen
        tl.store(part + dy_rows[:, None] * (2 * WW - 1) + bins[None, :], acc_tab,
                 mask=(dy_rows[:, None] < 2 * WH - 1) & (bins[None, :] < 2 * WW - 1))
    if BIAS == 2:
        ch = tl.arange(0, KH_PAD)
        cw = tl.arange(0, KW_PAD)
        tl.store(DTH + (row_base + offs_m[:, None]) * KH + ch[None, :], dth,
                 mask=m_ok[:, None] & (ch[None, :] < KH))
        tl.store(DTW + (row_base + offs_m[:, None]) * KW + cw[None, :], dtw,
                 mask=m_ok[:, None] & (cw[None, :] < KW))


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _blocks(pass_name: str, d_pad: int, dv_pad: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per pass; heuristics, not autotuned."""
    if BLOCK_OVERRIDE is not None:
        bm, bn = BLOCK_OVERRIDE
        return bm, bn, 4, 1
    if dtype == torch.float32:
        # ieee fp32 products run on the FMA units, not tensor cores: on 4 warps they spilled
        # (ptxas, sm_90: up to 0.6 KB per thread, scripts/check_triton_compile.py); 8 warps do not
        if pass_name == "fwd":
            return (64, 32, 8, 2)
        return (32, 32, 8, 1) if max(d_pad, dv_pad) <= 64 else (16, 32, 8, 1)
    wide = max(d_pad, dv_pad) > 64
    if pass_name == "fwd":
        return (64, 64 if not wide else 32, 4 if max(d_pad, dv_pad) <= 64 else 8, 2)
    return (32, 64, 4, 1) if not wide else (32, 32, 4 if max(d_pad, dv_pad) <= 64 else 8, 1)


def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs stay fp32 in the products (no tf32), as the numerics contract asks
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    return _INTERPRET and dtype == torch.bfloat16


def _aux_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 or _INTERPRET else "tf32"


def _mask_args(attn_mask, shape):
    """(tensor, strides b/h/m/n, kind) for an attn_mask broadcast to ``shape`` (no copy)."""
    if attn_mask is None:
        return None, (0, 0, 0, 0), MASK_NONE
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    m = m.expand(shape)
    strides = tuple(st if sz != 1 else 0 for st, sz in zip(m.stride(), m.shape))
    if m.dtype == torch.bool:
        return m.view(torch.uint8), strides, MASK_BOOL  # same bytes, same (broadcast) strides
    return m, strides, MASK_ADD


def decomposed_terms(q, rel_h, rel_w, q_size, k_size):
    """``term_h [B*H, Nq, kh]`` and ``term_w [B*H, Nq, kw]`` in fp32 (see module docstring)."""
    b, h, nq, d = q.shape
    qh, qw = q_size
    kh, kw = k_size
    r_h = rel_h.float()[decomposed_index(qh, kh, q.device)]  # [qh, kh, D]
    r_w = rel_w.float()[decomposed_index(qw, kw, q.device)]  # [qw, kw, D]
    grid = q.float().reshape(b, h, qh, qw, d)
    term_h = torch.einsum("bhyxd,ykd->bhyxk", grid, r_h).reshape(b * h, nq, kh).contiguous()
    term_w = torch.einsum("bhyxd,xkd->bhyxk", grid, r_w).reshape(b * h, nq, kw).contiguous()
    return term_h, term_w


class _Common:
    """Arguments shared by the three attention kernels."""

    def __init__(self, q, k, v, scale, table, window_size, window_mask, rel_h, rel_w, q_size,
                 k_size, attn_mask):
        b, h, nq, d = q.shape
        nk, dv = k.shape[2], v.shape[3]
        self.b, self.h, self.nq, self.nk, self.d, self.dv = b, h, nq, nk, d, dv
        self.d_pad, self.dv_pad = _pow2(d), _pow2(dv)
        dummy = q  # any tensor serves as a never-read pointer
        self.bias = BIAS_NONE
        tab = (dummy, 0, 0, 1, 1)
        terms = (dummy, dummy, 1, 1)
        self.grid_w = (1, 1)
        self.kh_kw = (1, 1)
        if table is not None:
            self.bias = BIAS_TABLE
            wh, ww = window_size
            tab = (table, table.stride(0), table.stride(1), wh, ww)
            self.grid_w = (wh, ww)
        elif rel_h is not None:
            self.bias = BIAS_DECOMPOSED
            term_h, term_w = decomposed_terms(q, rel_h, rel_w, q_size, k_size)
            self.term_h, self.term_w = term_h, term_w
            terms = (term_h, term_w, k_size[0], k_size[1])
            self.kh_kw = tuple(k_size)
        if window_mask is not None:
            wm = (window_mask, window_mask.stride(0), window_mask.stride(1), window_mask.stride(2),
                  window_mask.shape[0])
        else:
            wm = (dummy, 0, 0, 0, 1)
        am, am_strides, self.amask = _mask_args(attn_mask, (b, h, nq, nk))
        self.has_wmask = window_mask is not None
        self.tail = (scale, *tab, *terms, *wm, am if am is not None else dummy, *am_strides)

    def consts(self):
        return dict(BIAS=self.bias, HAS_WMASK=self.has_wmask, AMASK=self.amask,
                    BLOCK_D=self.d_pad, BLOCK_DV=self.dv_pad)


def attention_forward(q, k, v, scale, table=None, window_size=None, window_mask=None, rel_h=None,
                      rel_w=None, q_size=None, k_size=None, attn_mask=None):
    """Fused forward. Shapes: ``q [B, H, Nq, D]``, ``k [B, H, Nk, D]``, ``v [B, H, Nk, Dv]``.

    Returns:
        ``out [B, H, Nq, Dv]`` (input dtype) and ``lse [B, H, Nq]`` (fp32, natural log;
        ``+inf`` for rows with no live key).
    """
    c = _Common(q, k, v, scale, table, window_size, window_mask, rel_h, rel_w, q_size, k_size, attn_mask)
    out = torch.empty((c.b, c.h, c.nq, c.dv), device=q.device, dtype=q.dtype)
    lse = torch.empty((c.b, c.h, c.nq), device=q.device, dtype=torch.float32)
    bm, bn, warps, stages = _blocks("fwd", c.d_pad, c.dv_pad, q.dtype)
    grid = (triton.cdiv(c.nq, bm), c.b * c.h)
    _fwd_kernel[grid](q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                      c.h, c.nq, c.nk, c.d, c.dv, *c.tail, **c.consts(),
                      BLOCK_M=bm, BLOCK_N=bn, PREC=_prec(q.dtype), UPCAST=_upcast(q.dtype), num_warps=warps, num_stages=stages)
    return out, lse


def attention_backward(dout, q, k, v, out, lse, scale, table=None, window_size=None, window_mask=None,
                       rel_h=None, rel_w=None, q_size=None, k_size=None, attn_mask=None):
    """Fused backward.

    Returns:
        ``dq``, ``dk``, ``dv`` in the input dtype, and ``dtable [(2Wh-1)(2Ww-1), H]``,
        ``drel_h [Lh, D]``, ``drel_w [Lw, D]`` in the dtype of the table they belong to
        (``None`` for an absent table). Deterministic: no atomics anywhere.
    """
    c = _Common(q, k, v, scale, table, window_size, window_mask, rel_h, rel_w, q_size, k_size, attn_mask)
    dev = q.device
    bh = c.b * c.h
    delta = torch.empty((c.b, c.h, c.nq), device=dev, dtype=torch.float32)
    _delta_kernel[(triton.cdiv(c.nq, 32), bh)](out, dout, delta, *out.stride(), *dout.stride(),
                                               c.h, c.nq, c.dv, BLOCK_M=32, BLOCK_DV=c.dv_pad)
    dk = torch.empty((c.b, c.h, c.nk, c.d), device=dev, dtype=q.dtype)
    dv = torch.empty((c.b, c.h, c.nk, c.dv), device=dev, dtype=q.dtype)
    dq = torch.empty((c.b, c.h, c.nq, c.d), device=dev, dtype=torch.float32)
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    prec = _prec(q.dtype)

    bm, bn, warps, stages = _blocks("bwd", c.d_pad, c.dv_pad, q.dtype)
    # dkdv walks queries in the inner loop: its inner tile is BLOCK_M queries
    _bwd_dkdv_kernel[(triton.cdiv(c.nk, bn), bh)](
        q, k, v, dout, lse, delta, dk, dv, *strides, c.h, c.nq, c.nk, c.d, c.dv, *c.tail,
        **c.consts(), BLOCK_M=bm, BLOCK_N=bn, PREC=prec, UPCAST=_upcast(q.dtype), num_warps=warps, num_stages=stages)

    n_qtiles = triton.cdiv(c.nq, bm)
    wh, ww = c.grid_w
    kh, kw = c.kh_kw
    part = dth = dtw = q
    if c.bias == BIAS_TABLE:
        part = torch.empty((bh * n_qtiles, (2 * wh - 1) * (2 * ww - 1)), device=dev, dtype=torch.float32)
    if c.bias == BIAS_DECOMPOSED:
        dth = torch.empty((bh, c.nq, kh), device=dev, dtype=torch.float32)
        dtw = torch.empty((bh, c.nq, kw), device=dev, dtype=torch.float32)
    _bwd_dq_kernel[(n_qtiles, bh)](
        q, k, v, dout, lse, delta, dq, part, dth, dtw, *strides, c.h, c.nq, c.nk, c.d, c.dv, *c.tail,
        **c.consts(), BLOCK_M=bm, BLOCK_N=bn, PREC=prec, UPCAST=_upcast(q.dtype), AUX_PREC=_aux_prec(q.dtype),
        WW_PAD=_pow2(ww), DY_PAD=_pow2(2 * wh - 1, 2), DX_PAD=_pow2(2 * ww - 1, 2),
        KH_PAD=_pow2(kh), KW_PAD=_pow2(kw), num_warps=warps, num_stages=stages)

    dtable = drel_h = drel_w = None
    if c.bias == BIAS_TABLE:
        # fixed-order reduction over (batch, query tile): deterministic
        dtable = part.view(c.b, c.h, n_qtiles, -1).sum(dim=(0, 2)).t().to(table.dtype).contiguous()
    if c.bias == BIAS_DECOMPOSED:
        dq_extra, drel_h, drel_w = _decomposed_grads(q, dth, dtw, rel_h, rel_w, q_size, k_size)
        dq += dq_extra
        drel_h, drel_w = drel_h.to(rel_h.dtype), drel_w.to(rel_w.dtype)
    return dq.to(q.dtype), dk, dv, dtable, drel_h, drel_w


def _decomposed_grads(q, dth, dtw, rel_h, rel_w, q_size, k_size):
    """Chain rule through ``term_h[i, y'] = q_i . rel_h[idx_h(yi, y')]`` (and ``term_w``).

    ``dq_i = sum_y' dterm_h[i, y'] Rh[yi, y'] + sum_x' dterm_w[i, x'] Rw[xi, x']`` and
    ``drel_h[r] = sum_{(y, y') : idx_h(y, y') = r} sum_{b, h, x} dterm_h[.., y, x, y'] q[.., y, x]``,
    the last sum as a one-hot matrix product (deterministic, unlike index_add_ on CUDA).
    """
    b, h, nq, d = q.shape
    qh, qw = q_size
    kh, kw = k_size
    qg = q.float().reshape(b, h, qh, qw, d)
    out = []
    dq = None
    for axis, (dt, rel, n_q, n_k) in enumerate(((dth, rel_h, qh, kh), (dtw, rel_w, qw, kw))):
        idx = decomposed_index(n_q, n_k, q.device)                   # [n_q, n_k]
        r = rel.float()[idx]                                         # [n_q, n_k, D]
        if axis == 0:
            g = dt.view(b, h, qh, qw, kh)
            dq_part = torch.einsum("bhyxk,ykd->bhyxd", g, r)
            dr = torch.einsum("bhyxk,bhyxd->ykd", g, qg)                # [qh, kh, D]
        else:
            g = dt.view(b, h, qh, qw, kw)
            dq_part = torch.einsum("bhyxk,xkd->bhyxd", g, r)
            dr = torch.einsum("bhyxk,bhyxd->xkd", g, qg)                # [qw, kw, D]
        dq = dq_part if dq is None else dq + dq_part
        hot = torch.nn.functional.one_hot(idx.reshape(-1), rel.shape[0]).to(torch.float32)
        out.append(hot.t() @ dr.reshape(n_q * n_k, d))
    return dq.reshape(b, h, nq, d), out[0], out[1]
