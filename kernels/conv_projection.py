"""Triton kernels of CvT's convolutional q/k/v projection (depthwise 3x3 conv + BatchNorm2d).

Layout: the token map is read as ``[B, H, W, C]`` through its strides (CvT's tokens
``[B, H*W, C]`` are this layout already); outputs are tokens ``[B, Ho*Wo, C]``, contiguous.

One program owns a tile of ``BLOCK_P`` *centre* pixels (flattened over ``B*H*W``) by
``BLOCK_C`` channels. For each of the nine taps it loads the shifted input tile once and feeds
it to all three projections: q where the centre lies on the q grid (``h % s_q == 0`` and
``w % s_q == 0``), k and v where it lies on the k/v grid. The input therefore leaves DRAM once
for the three convolutions (the nine shifted loads of a tile hit the cache).

Forward, train mode (batch statistics), three launches:
  1. conv: writes the raw conv outputs ``y`` (kept for the backward) and, per tile, the count,
     sum and M2 (sum of squared deviations from the tile mean) of every projection and channel;
  2. stats: merges the tile partials (Chan's parallel variance; a few small deterministic torch
     reductions over ``[tiles, 3, C]``), giving mean, 1/sqrt(var + eps), the unbiased variance
     (for the running statistics) and ``scale = gamma * invstd``;
  3. normalise: ``out = (y - mean) * scale + beta``.
Forward, eval mode: one launch, conv then ``(acc - mean) * scale + beta`` with the running
statistics. (Not folded into ``y * scale + shift``: that cancels badly when ``|mean| >> std``.)

Backward (``g`` = output gradient, ``xhat = (y - mean) * invstd``, ``M`` values per channel):
``dy = a * (g - dbeta/M - xhat * dgamma/M)`` with ``a = gamma*invstd`` in train mode (``xhat`` from
the saved ``y``, not expanded into ``b*y + c``, which cancels badly when ``|mean| >> std``);
``dy = a * g`` in eval mode.
  1. train only: per-tile partials of ``dbeta = sum g`` and ``dgamma = sum g*xhat``, reduced;
  2. ``dy`` of every output pixel of the three projections, written in the accumulation dtype
     (an elementwise pass: the conv launch below then gathers one value per tap instead of
     recomputing ``dy`` from ``g`` and ``y`` 27 times, which also kept it out of registers);
  3. one launch over centre tiles: ``dw_p[t] += dy_p(centre) * x(centre + tap t)`` as per-tile
     partials, and ``dx(centre) = sum_p sum_t w_p[t] * dy_p(output whose tap t is this pixel)``
     gathered (no atomics); in eval mode it also recomputes ``y`` for the dgamma partials;
  4. the partials are summed over tiles (a torch reduction over dim 0: no atomics, deterministic).
The conv launches loop over the nine taps without unrolling: unrolled, the compiler hoists all
the tap loads at once and spills registers on sm_90.
"""
import torch
import triton
import triton.language as tl


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# (BLOCK_P centre pixels, num_warps) of the conv kernels; BLOCK_C = min(64, next_pow2(C)). Chosen
# without a GPU from ptxas's register report for sm_90 (scripts/check_triton_compile.py): no
# spills and at most ~210 registers in every dtype and mode, where 64 x 64 tiles on 4 warps
# spilled (kilobytes per thread in the backward).
CONV_TILES = {"fwd": (32, 8), "bwd": (32, 8)}


def _blocks(C: int, kernel: str = "fwd"):
    """(BLOCK_P, BLOCK_C, num_warps) for one conv kernel ("fwd" or "bwd")."""
    block_p, warps = CONV_TILES[kernel]
    return block_p, min(64, max(2, _next_pow2(C))), warps


def _elementwise_blocks(C: int):
    """(BLOCK_P rows, BLOCK_C) of the per-output-pixel kernels (normalise, BN partials, dy)."""
    return 64, min(64, max(2, _next_pow2(C)))


@triton.jit
def _of(P: tl.constexpr, q, k, v):
    """The q, k or v member of a per-projection triple, for projection ``P`` (0, 1, 2)."""
    if P == 0:
        r = q
    elif P == 1:
        r = k
    else:
        r = v
    return r


@triton.jit
def _conv_fwd_kernel(x_ptr, sxb, sxh, sxw, sxc, w_ptr, yq_ptr, yk_ptr, yv_ptr,
                     mean_ptr, scale_ptr, beta_ptr, psum_ptr, pm2_ptr, pcnt_ptr,
                     B, H, W, C, SQ, SKV, HQ, WQ, HK, WK,
                     TRAIN: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    HW = H * W
    mp = offs_p < B * HW
    mc = offs_c < C
    b = (offs_p // HW).to(tl.int64)
    r = offs_p % HW
    h = r // W
    w = r % W
    cq = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    ck = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    cv = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    c_off = offs_c.to(tl.int64) * sxc
    for t in range(9):
        hh = h + (t // 3 - 1)
        ww = w + (t % 3 - 1)
        m = mp & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        row = b * sxb + hh.to(tl.int64) * sxh + ww.to(tl.int64) * sxw
        xv = tl.load(x_ptr + row[:, None] + c_off[None, :], mask=m[:, None] & mc[None, :],
                     other=0.0).to(ACC)
        wq = tl.load(w_ptr + offs_c * 9 + t, mask=mc, other=0.0).to(ACC)
        wk = tl.load(w_ptr + (C + offs_c) * 9 + t, mask=mc, other=0.0).to(ACC)
        wv = tl.load(w_ptr + (2 * C + offs_c) * 9 + t, mask=mc, other=0.0).to(ACC)
        cq += xv * wq[None, :]
        ck += xv * wk[None, :]
        cv += xv * wv[None, :]
    on_q = mp & (h % SQ == 0) & (w % SQ == 0)
    on_kv = mp & (h % SKV == 0) & (w % SKV == 0)
    oq = b * (HQ * WQ) + (h // SQ) * WQ + (w // SQ)
    ok = b * (HK * WK) + (h // SKV) * WK + (w // SKV)
    mq = on_q[:, None] & mc[None, :]
    mkv = on_kv[:, None] & mc[None, :]
    if TRAIN:
        tl.store(yq_ptr + oq[:, None] * C + offs_c[None, :], cq.to(yq_ptr.dtype.element_ty), mask=mq)
        tl.store(yk_ptr + ok[:, None] * C + offs_c[None, :], ck.to(yk_ptr.dtype.element_ty), mask=mkv)
        tl.store(yv_ptr + ok[:, None] * C + offs_c[None, :], cv.to(yv_ptr.dtype.element_ty), mask=mkv)
        nq = tl.sum(on_q.to(ACC), axis=0)
        nkv = tl.sum(on_kv.to(ACC), axis=0)
        sq = tl.sum(tl.where(mq, cq, 0.0), axis=0)
        sk = tl.sum(tl.where(mkv, ck, 0.0), axis=0)
        sv = tl.sum(tl.where(mkv, cv, 0.0), axis=0)
        dq = tl.where(mq, cq - (sq / tl.maximum(nq, 1.0))[None, :], 0.0)
        dk = tl.where(mkv, ck - (sk / tl.maximum(nkv, 1.0))[None, :], 0.0)
        dv = tl.where(mkv, cv - (sv / tl.maximum(nkv, 1.0))[None, :], 0.0)
        base = pid_p.to(tl.int64) * 3 * C
        tl.store(psum_ptr + base + offs_c, sq, mask=mc)
        tl.store(psum_ptr + base + C + offs_c, sk, mask=mc)
        tl.store(psum_ptr + base + 2 * C + offs_c, sv, mask=mc)
        tl.store(pm2_ptr + base + offs_c, tl.sum(dq * dq, axis=0), mask=mc)
        tl.store(pm2_ptr + base + C + offs_c, tl.sum(dk * dk, axis=0), mask=mc)
        tl.store(pm2_ptr + base + 2 * C + offs_c, tl.sum(dv * dv, axis=0), mask=mc)
        if pid_c == 0:
            tl.store(pcnt_ptr + pid_p * 3, nq)
            tl.store(pcnt_ptr + pid_p * 3 + 1, nkv)
            tl.store(pcnt_ptr + pid_p * 3 + 2, nkv)
    else:
        for p in tl.static_range(3):
            acc = _of(p, cq, ck, cv)
            y_ptr = _of(p, yq_ptr, yk_ptr, yv_ptr)
            idx = _of(p, oq, ok, ok)
            mm = _of(p, mq, mkv, mkv)
            mu = tl.load(mean_ptr + p * C + offs_c, mask=mc, other=0.0).to(ACC)
            a = tl.load(scale_ptr + p * C + offs_c, mask=mc, other=0.0).to(ACC)
            be = tl.load(beta_ptr + p * C + offs_c, mask=mc, other=0.0).to(ACC)
            tl.store(y_ptr + idx[:, None] * C + offs_c[None, :],
                     ((acc - mu[None, :]) * a[None, :] + be[None, :]).to(y_ptr.dtype.element_ty), mask=mm)


@triton.jit
def _normalise_kernel(yq_ptr, yk_ptr, yv_ptr, oq_ptr, ok_ptr, ov_ptr, mean_ptr, scale_ptr, beta_ptr,
                      NQ, NK, C, ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    off = rows[:, None].to(tl.int64) * C + offs_c[None, :]
    for p in tl.static_range(3):
        y_ptr = _of(p, yq_ptr, yk_ptr, yv_ptr)
        o_ptr = _of(p, oq_ptr, ok_ptr, ov_ptr)
        n = _of(p, NQ, NK, NK)
        m = (rows < n)[:, None] & mc[None, :]
        mu = tl.load(mean_ptr + p * C + offs_c, mask=mc, other=0.0)
        a = tl.load(scale_ptr + p * C + offs_c, mask=mc, other=0.0)
        be = tl.load(beta_ptr + p * C + offs_c, mask=mc, other=0.0)
        y = tl.load(y_ptr + off, mask=m, other=0.0).to(ACC)
        tl.store(o_ptr + off, ((y - mu[None, :]) * a[None, :] + be[None, :]).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bn_grad_partials_kernel(gq_ptr, gk_ptr, gv_ptr, yq_ptr, yk_ptr, yv_ptr, mean_ptr, invstd_ptr,
                             part_ptr, NQ, NK, C, ACC: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[tile, p, 0, c] = sum g; part[tile, p, 1, c] = sum g * (y - mean) * invstd."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    off = rows[:, None].to(tl.int64) * C + offs_c[None, :]
    for p in tl.static_range(3):
        g_ptr = _of(p, gq_ptr, gk_ptr, gv_ptr)
        y_ptr = _of(p, yq_ptr, yk_ptr, yv_ptr)
        n = _of(p, NQ, NK, NK)
        m = (rows < n)[:, None] & mc[None, :]
        mu = tl.load(mean_ptr + p * C + offs_c, mask=mc, other=0.0)
        istd = tl.load(invstd_ptr + p * C + offs_c, mask=mc, other=0.0)
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(ACC)
        y = tl.load(y_ptr + off, mask=m, other=0.0).to(ACC)
        xhat = (y - mu[None, :]) * istd[None, :]
        base = (pid.to(tl.int64) * 3 + p) * 2 * C
        tl.store(part_ptr + base + offs_c, tl.sum(g, axis=0), mask=mc)
        tl.store(part_ptr + base + C + offs_c, tl.sum(tl.where(m, g * xhat, 0.0), axis=0), mask=mc)


@triton.jit
def _dy_kernel(gq_ptr, gk_ptr, gv_ptr, yq_ptr, yk_ptr, yv_ptr, coef_ptr, mean_ptr, invstd_ptr,
               dyq_ptr, dyk_ptr, dyv_ptr, NQ, NK, C, TRAIN: tl.constexpr, ACC: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """dy = a * (g - k1 - xhat * k2) per projection (train; eval: dy = a * g), in ACC; coefficients
    ``[3, 3, C]`` (projection, {a, k1, k2}, channel) from the launcher."""
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mc = offs_c < C
    off = rows[:, None].to(tl.int64) * C + offs_c[None, :]
    for p in tl.static_range(3):
        g_ptr = _of(p, gq_ptr, gk_ptr, gv_ptr)
        y_ptr = _of(p, yq_ptr, yk_ptr, yv_ptr)
        dy_ptr = _of(p, dyq_ptr, dyk_ptr, dyv_ptr)
        n = _of(p, NQ, NK, NK)
        m = (rows < n)[:, None] & mc[None, :]
        a = tl.load(coef_ptr + 3 * p * C + offs_c, mask=mc, other=0.0)
        g = tl.load(g_ptr + off, mask=m, other=0.0).to(ACC)
        if TRAIN:
            k1 = tl.load(coef_ptr + (3 * p + 1) * C + offs_c, mask=mc, other=0.0)
            k2 = tl.load(coef_ptr + (3 * p + 2) * C + offs_c, mask=mc, other=0.0)
            mu = tl.load(mean_ptr + p * C + offs_c, mask=mc, other=0.0)
            istd = tl.load(invstd_ptr + p * C + offs_c, mask=mc, other=0.0)
            y = tl.load(y_ptr + off, mask=m, other=0.0).to(ACC)
            g = g - k1[None, :] - (y - mu[None, :]) * istd[None, :] * k2[None, :]
        tl.store(dy_ptr + off, g * a[None, :], mask=m)


@triton.jit
def _conv_bwd_kernel(x_ptr, sxb, sxh, sxw, sxc, w_ptr, dyq_ptr, dyk_ptr, dyv_ptr, gq_ptr, gk_ptr, gv_ptr,
                     mean_ptr, invstd_ptr, gx_ptr, wpart_ptr, bnpart_ptr,
                     B, H, W, C, SQ, SKV, HQ, WQ, HK, WK,
                     TRAIN: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    HW = H * W
    mp = offs_p < B * HW
    mc = offs_c < C
    b = (offs_p // HW).to(tl.int64)
    r = offs_p % HW
    h = r // W
    w = r % W
    # dy of the outputs centred on this tile (for the weight gradient)
    on_q = mp & (h % SQ == 0) & (w % SQ == 0)
    on_kv = mp & (h % SKV == 0) & (w % SKV == 0)
    oq = b * (HQ * WQ) + (h // SQ) * WQ + (w // SQ)
    ok = b * (HK * WK) + (h // SKV) * WK + (w // SKV)
    mq = on_q[:, None] & mc[None, :]
    mkv = on_kv[:, None] & mc[None, :]
    dyq = tl.load(dyq_ptr + oq[:, None] * C + offs_c[None, :], mask=mq, other=0.0)
    dyk = tl.load(dyk_ptr + ok[:, None] * C + offs_c[None, :], mask=mkv, other=0.0)
    dyv = tl.load(dyv_ptr + ok[:, None] * C + offs_c[None, :], mask=mkv, other=0.0)
    rq = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)  # eval mode: recomputed conv outputs
    rk = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    rv = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    gx = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    c_off = offs_c.to(tl.int64) * sxc
    wbase = pid_p.to(tl.int64) * 27 * C
    # a loop, not unrolled: unrolled, the compiler hoists the 27 tile gathers and spills
    for t in range(9):
        i = t // 3
        j = t % 3
        hh = h + (i - 1)
        ww = w + (j - 1)
        m = mp & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        row = b * sxb + hh.to(tl.int64) * sxh + ww.to(tl.int64) * sxw
        xv = tl.load(x_ptr + row[:, None] + c_off[None, :], mask=m[:, None] & mc[None, :],
                     other=0.0).to(ACC)
        wq = tl.load(w_ptr + offs_c * 9 + t, mask=mc, other=0.0).to(ACC)
        wk = tl.load(w_ptr + (C + offs_c) * 9 + t, mask=mc, other=0.0).to(ACC)
        wv = tl.load(w_ptr + (2 * C + offs_c) * 9 + t, mask=mc, other=0.0).to(ACC)
        tl.store(wpart_ptr + wbase + t * C + offs_c, tl.sum(dyq * xv, axis=0), mask=mc)
        tl.store(wpart_ptr + wbase + (9 + t) * C + offs_c, tl.sum(dyk * xv, axis=0), mask=mc)
        tl.store(wpart_ptr + wbase + (18 + t) * C + offs_c, tl.sum(dyv * xv, axis=0), mask=mc)
        if not TRAIN:
            rq += xv * wq[None, :]
            rk += xv * wk[None, :]
            rv += xv * wv[None, :]
        # dx: this pixel is tap t of the output centred at (h + 1 - i, w + 1 - j)
        nh = h + (1 - i)
        nw = w + (1 - j)
        nhc = tl.maximum(nh, 0)
        nwc = tl.maximum(nw, 0)
        ok_h = mp & (nh >= 0) & (nh < H) & (nw >= 0) & (nw < W)
        gq_m = (ok_h & (nhc % SQ == 0) & (nwc % SQ == 0))[:, None] & mc[None, :]
        gk_m = (ok_h & (nhc % SKV == 0) & (nwc % SKV == 0))[:, None] & mc[None, :]
        iq = (b * (HQ * WQ) + (nhc // SQ) * WQ + (nwc // SQ))[:, None] * C + offs_c[None, :]
        ik = (b * (HK * WK) + (nhc // SKV) * WK + (nwc // SKV))[:, None] * C + offs_c[None, :]
        gx += wq[None, :] * tl.load(dyq_ptr + iq, mask=gq_m, other=0.0)
        gx += wk[None, :] * tl.load(dyk_ptr + ik, mask=gk_m, other=0.0)
        gx += wv[None, :] * tl.load(dyv_ptr + ik, mask=gk_m, other=0.0)
    gx_off = offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
    tl.store(gx_ptr + gx_off, gx.to(gx_ptr.dtype.element_ty), mask=mp[:, None] & mc[None, :])
    if not TRAIN:
        # eval mode: dbeta / dgamma partials from the recomputed conv outputs
        base = pid_p.to(tl.int64) * 6 * C
        for p in tl.static_range(3):
            g_ptr = _of(p, gq_ptr, gk_ptr, gv_ptr)
            idx = _of(p, oq, ok, ok)
            mm = _of(p, mq, mkv, mkv)
            yr = _of(p, rq, rk, rv)
            mu = tl.load(mean_ptr + p * C + offs_c, mask=mc, other=0.0)
            istd = tl.load(invstd_ptr + p * C + offs_c, mask=mc, other=0.0)
            g = tl.load(g_ptr + idx[:, None] * C + offs_c[None, :], mask=mm, other=0.0).to(ACC)
            xhat = (yr - mu[None, :]) * istd[None, :]
            tl.store(bnpart_ptr + base + 2 * p * C + offs_c, tl.sum(g, axis=0), mask=mc)
            tl.store(bnpart_ptr + base + (2 * p + 1) * C + offs_c,
                     tl.sum(tl.where(mm, g * xhat, 0.0), axis=0), mask=mc)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

def _acc(dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _sum_rows(src: torch.Tensor) -> torch.Tensor:
    """Sum of per-tile partials over tiles (dim 0): a plain reduction, no atomics, so the result is
    the same on every run."""
    return src.sum(dim=0)


def _merge_stats(psum, pm2, pcnt, gamma, eps):
    """Chan's parallel merge of per-tile (count, sum, M2) into mean, invstd, unbiased variance and the
    BatchNorm scale ``gamma * invstd``, all ``[3, C]``."""
    cnt = pcnt[:, :, None]
    n = pcnt.sum(dim=0)[:, None]
    tile_mean = psum / cnt.clamp_min(1)
    # the mean as offsets from tile 0's mean (tile 0 holds pixel (0, 0), on every grid): small
    # numbers to sum, so little rounding even when |mean| >> std
    ref = tile_mean[0]
    mean = ref + (cnt * (tile_mean - ref)).sum(dim=0) / n
    d = torch.where(cnt > 0, tile_mean - mean, torch.zeros_like(psum))
    m2 = (pm2 + cnt * d * d).sum(dim=0)
    eps_t = torch.tensor([float(e) for e in eps], dtype=psum.dtype).to(psum.device, non_blocking=True)[:, None]
    invstd = torch.rsqrt(m2 / n + eps_t)
    var = m2 / (n - 1).clamp_min(1)
    return mean, invstd, var, gamma * invstd


def _out_len(n, s):
    return (n - 1) // s + 1


def forward(x, weight, gamma, beta, running_mean, running_var, eps, stride_q, stride_kv, use_batch_stats):
    """Same contract as ``ssl_fast.reference.conv_projection.forward`` (x ``[B, H, W, C]``, any strides)."""
    B, H, W, C = x.shape
    tl_acc, acc = _acc(x.dtype)
    HQ, WQ, HK, WK = _out_len(H, stride_q), _out_len(W, stride_q), _out_len(H, stride_kv), _out_len(W, stride_kv)
    dev = x.device
    w = weight.to(acc).contiguous()
    g = gamma.to(acc).contiguous()
    be = beta.to(acc).contiguous()
    BLOCK_P, BLOCK_C, warps = _blocks(C, "fwd")
    NP = triton.cdiv(B * H * W, BLOCK_P)
    grid = (NP, triton.cdiv(C, BLOCK_C))
    outs = [torch.empty((B, n, C), device=dev, dtype=x.dtype) for n in (HQ * WQ, HK * WK, HK * WK)]
    sx = x.stride()
    if use_batch_stats:
        ys = [torch.empty_like(o) for o in outs]
        psum = torch.empty((NP, 3, C), device=dev, dtype=acc)
        pm2 = torch.empty((NP, 3, C), device=dev, dtype=acc)
        pcnt = torch.empty((NP, 3), device=dev, dtype=acc)
        _conv_fwd_kernel[grid](x, sx[0], sx[1], sx[2], sx[3], w, ys[0], ys[1], ys[2], g, g, be, psum, pm2, pcnt,
                               B, H, W, C, stride_q, stride_kv, HQ, WQ, HK, WK,
                               TRAIN=True, ACC=tl_acc, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=warps)
        mean, invstd, var, scale = _merge_stats(psum, pm2, pcnt, g, eps)
        NQ, NK = B * HQ * WQ, B * HK * WK
        EP, EC = _elementwise_blocks(C)
        _normalise_kernel[(triton.cdiv(max(NQ, NK), EP), triton.cdiv(C, EC))](
            ys[0], ys[1], ys[2], outs[0], outs[1], outs[2], mean, scale, be, NQ, NK, C,
            ACC=tl_acc, BLOCK_P=EP, BLOCK_C=EC)
    else:
        ys = [x.new_empty(0) for _ in range(3)]
        mean = running_mean.to(acc).clone()
        var = running_var.to(acc).clone()
        eps_t = torch.tensor(list(eps), dtype=acc).to(dev, non_blocking=True)[:, None]
        invstd = torch.rsqrt(var + eps_t)
        scale = g * invstd
        _conv_fwd_kernel[grid](x, sx[0], sx[1], sx[2], sx[3], w, outs[0], outs[1], outs[2], mean, scale, be,
                               scale, scale, scale, B, H, W, C, stride_q, stride_kv, HQ, WQ, HK, WK,
                               TRAIN=False, ACC=tl_acc, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=warps)
    return (*outs, *ys, mean, invstd, var)


def backward(grad_q, grad_k, grad_v, x, weight, gamma, mean, invstd, y_q, y_k, y_v, stride_q, stride_kv,
             use_batch_stats):
    """Same contract as ``ssl_fast.reference.conv_projection.backward``."""
    B, H, W, C = x.shape
    tl_acc, acc = _acc(x.dtype)
    HQ, WQ, HK, WK = _out_len(H, stride_q), _out_len(W, stride_q), _out_len(H, stride_kv), _out_len(W, stride_kv)
    NQ, NK = B * HQ * WQ, B * HK * WK
    dev = x.device
    w = weight.to(acc).contiguous()
    ga = gamma.to(acc).contiguous()
    mu = mean.to(acc).contiguous()
    istd = invstd.to(acc).contiguous()
    gs = [g.contiguous() for g in (grad_q, grad_k, grad_v)]
    BLOCK_P, BLOCK_C, warps = _blocks(C, "bwd")
    NP = triton.cdiv(B * H * W, BLOCK_P)
    grid = (NP, triton.cdiv(C, BLOCK_C))
    a = ga * istd
    EP, EC = _elementwise_blocks(C)
    if use_batch_stats:
        ys = [y.contiguous() for y in (y_q, y_k, y_v)]
        NB = triton.cdiv(max(NQ, NK), EP)
        part = torch.empty((NB, 3, 2, C), device=dev, dtype=acc)
        _bn_grad_partials_kernel[(NB, triton.cdiv(C, EC))](
            gs[0], gs[1], gs[2], ys[0], ys[1], ys[2], mu, istd, part, NQ, NK, C,
            ACC=tl_acc, BLOCK_P=EP, BLOCK_C=EC)
        bn = _sum_rows(part)  # [3, 2, C]
        dbeta, dgamma = bn[:, 0], bn[:, 1]
        n = torch.tensor([NQ, NK, NK], dtype=acc).to(dev, non_blocking=True)[:, None]
        cb = dbeta / n
        cc = dgamma / n
        bnpart = part  # unused by the kernel in train mode
    else:
        ys = gs  # not read in eval mode
        cb = torch.zeros_like(a)
        cc = torch.zeros_like(a)
        bnpart = torch.empty((NP, 3, 2, C), device=dev, dtype=acc)
    coef = torch.stack([a, cb, cc], dim=1).contiguous()  # [3, 3, C]
    dys = [torch.empty(g.shape, device=dev, dtype=acc) for g in gs]
    _dy_kernel[(triton.cdiv(max(NQ, NK), EP), triton.cdiv(C, EC))](
        gs[0], gs[1], gs[2], ys[0], ys[1], ys[2], coef, mu, istd, dys[0], dys[1], dys[2], NQ, NK, C,
        TRAIN=use_batch_stats, ACC=tl_acc, BLOCK_P=EP, BLOCK_C=EC)
    gx = torch.empty((B, H, W, C), device=dev, dtype=x.dtype)
    wpart = torch.empty((NP, 3, 9, C), device=dev, dtype=acc)
    sx = x.stride()
    _conv_bwd_kernel[grid](x, sx[0], sx[1], sx[2], sx[3], w, dys[0], dys[1], dys[2], gs[0], gs[1], gs[2],
                           mu, istd, gx, wpart, bnpart, B, H, W, C, stride_q, stride_kv, HQ, WQ, HK, WK,
                           TRAIN=use_batch_stats, ACC=tl_acc, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
                           num_warps=warps)
    gw = _sum_rows(wpart).transpose(1, 2).contiguous()  # [3, C, 9]
    if not use_batch_stats:
        bn = _sum_rows(bnpart)
        dbeta, dgamma = bn[:, 0], bn[:, 1]
    return gx, gw, dgamma.contiguous(), dbeta.contiguous()
