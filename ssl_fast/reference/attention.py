"""Reference multi-head attention with relative-position terms (plain PyTorch, materialises logits).

Shapes: ``q [B, H, Nq, D]``, ``k [B, H, Nk, D]``, ``v [B, H, Nk, Dv]``; output ``[B, H, Nq, Dv]``.
``logits = scale * q k^T + bias``; ``out = softmax(logits) v``. A query row whose every key is
masked out gets a zero output (not NaN).
"""
from typing import Optional, Sequence, Tuple

import torch


def window_relative_index(window_size: Sequence[int], device=None) -> torch.Tensor:
    """Swin's relative-position index for a ``Wh x Ww`` window, ``[N, N]`` with ``N = Wh * Ww``.

    ``index[i, j] = (yi - yj + Wh - 1) * (2 Ww - 1) + (xi - xj + Ww - 1)`` for tokens in row-major order.
    """
    wh, ww = window_size
    ys = torch.arange(wh, device=device).repeat_interleave(ww)
    xs = torch.arange(ww, device=device).repeat(wh)
    return (ys[:, None] - ys[None, :] + wh - 1) * (2 * ww - 1) + (xs[:, None] - xs[None, :] + ww - 1)


def table_bias(table: torch.Tensor, window_size: Sequence[int]) -> torch.Tensor:
    """``[H, N, N]`` bias gathered from a ``[(2Wh-1)(2Ww-1), H]`` table."""
    idx = window_relative_index(window_size, table.device)
    n = idx.shape[0]
    return table[idx.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)


def decomposed_index(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """SAM's ``get_rel_pos`` indexing along one axis: ``[q_len, k_len]`` positions into the table.

    ``index[y, y'] = floor(y * max(k/q, 1) - y' * max(q/k, 1) + (k - 1) * max(q/k, 1))``.
    """
    q_coords = torch.arange(q_len, device=device, dtype=torch.float64)[:, None] * max(k_len / q_len, 1.0)
    k_coords = torch.arange(k_len, device=device, dtype=torch.float64)[None, :] * max(q_len / k_len, 1.0)
    return torch.floor(q_coords - k_coords + (k_len - 1) * max(q_len / k_len, 1.0)).long()


def decomposed_bias(q: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                    q_size: Tuple[int, int], k_size: Tuple[int, int]) -> torch.Tensor:
    """``[B, H, Nq, Nk]`` bias ``q_i . Rh[yi, yj] + q_i . Rw[xi, xj]`` with the unscaled q."""
    b, h, nq, d = q.shape
    qh, qw = q_size
    kh, kw = k_size
    r_h = rel_h[decomposed_index(qh, kh, q.device)]  # [qh, kh, D]
    r_w = rel_w[decomposed_index(qw, kw, q.device)]  # [qw, kw, D]
    grid = q.reshape(b, h, qh, qw, d)
    term_h = torch.einsum("bhyxd,ykd->bhyxk", grid, r_h.to(q.dtype))
    term_w = torch.einsum("bhyxd,xkd->bhyxk", grid, r_w.to(q.dtype))
    bias = term_h[..., :, None] + term_w[..., None, :]  # [B, H, qh, qw, kh, kw]
    return bias.reshape(b, h, nq, kh * kw)


def attention_logits(q, k, *, scale: float, table=None, window_size=None, window_mask=None,
                     rel_h=None, rel_w=None, q_size=None, k_size=None, attn_mask=None) -> torch.Tensor:
    """Masked logits ``[B, H, Nq, Nk]`` (masked entries are -inf), in float32 or float64."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = (q @ k.transpose(-2, -1)).to(acc) * scale
    if table is not None:
        logits = logits + table_bias(table, window_size).to(acc)
        if window_mask is not None:
            n_windows = window_mask.shape[0]
            b = logits.shape[0]
            mask = window_mask.to(acc).repeat(b // n_windows, 1, 1)  # row b uses mask[b % nW]
            logits = logits + mask[:, None]
    if rel_h is not None:
        logits = logits + decomposed_bias(q, rel_h, rel_w, q_size, k_size).to(acc)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask.to(acc)
    return logits


def dropout_keep(seed: int, shape: Sequence[int], p: float, device=None) -> torch.Tensor:
    """The attention-dropout keep mask ``[B, H, Nq, Nk]`` for ``seed``, the same bits the cpp
    kernel draws (a counter-based hash, so the backward regenerates the forward's mask).

    With ``n = ((b H + h) Nq + i) Nk + j``, ``lo``/``hi`` its low and high 32 bits and ``mix``
    the 32-bit ``lowbias32`` integer hash (C. Wellons, "Prospecting for hash functions"):
    ``r = mix(lo ^ mix((hi + seed) mod 2^32))``; the element is kept when ``(r >> 8) / 2^24 >= p``.
    """
    b, h, nq, nk = shape
    n = torch.arange(b * h * nq * nk, device=device, dtype=torch.int64).reshape(b, h, nq, nk)
    m32 = 0xFFFFFFFF

    def mix(x):
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D) & m32
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B) & m32
        return x ^ (x >> 16)

    r = mix((n & m32) ^ mix(((n >> 32) + int(seed)) & m32))
    return (r >> 8).to(torch.float64) * (1.0 / (1 << 24)) >= p


def attention(q, k, v, *, scale: Optional[float] = None, table=None, window_size=None,
              window_mask=None, rel_h=None, rel_w=None, q_size=None, k_size=None, attn_mask=None,
              dropout_p: float = 0.0, dropout_seed: Optional[int] = None) -> torch.Tensor:
    """Reference attention (see module docstring); softmax in float32 (float64 for float64 input).

    Dropout (``dropout_p > 0``) zeroes probabilities where :func:`dropout_keep` is False for
    ``dropout_seed`` (drawn from torch's generator when None) and scales the rest by ``1/(1-p)``.
    """
    return attention_forward_stats(q, k, v, scale=scale, table=table, window_size=window_size,
                                   window_mask=window_mask, rel_h=rel_h, rel_w=rel_w, q_size=q_size,
                                   k_size=k_size, attn_mask=attn_mask, dropout_p=dropout_p,
                                   dropout_seed=dropout_seed)[0]


def attention_forward_stats(q, k, v, *, scale: Optional[float] = None, table=None, window_size=None,
                            window_mask=None, rel_h=None, rel_w=None, q_size=None, k_size=None,
                            attn_mask=None, dropout_p: float = 0.0, dropout_seed: Optional[int] = None):
    """:func:`attention` and the row log-sum-exp of the logits ``[B, H, Nq]`` (float32, float64 for
    float64 input; ``+inf`` for a fully masked row, so that ``exp(logit - lse)`` is 0 there)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    logits = attention_logits(q, k, scale=scale, table=table, window_size=window_size,
                              window_mask=window_mask, rel_h=rel_h, rel_w=rel_w, q_size=q_size,
                              k_size=k_size, attn_mask=attn_mask)
    probs = torch.softmax(logits, dim=-1)
    lse = torch.logsumexp(logits.detach(), dim=-1)
    if attn_mask is not None or window_mask is not None:
        # rows with every key masked: softmax gives NaN; define their output as zero. Only a mask
        # can empty a row (the row max test costs one reduction, not an [B, H, Nq, Nk] bool pass)
        empty = torch.isneginf(logits.detach().amax(-1, keepdim=True))
        probs = probs.masked_fill(empty, 0.0)
        lse = lse.masked_fill(empty[..., 0], float("inf"))
    if dropout_p > 0.0:
        if dropout_seed is None:
            dropout_seed = int(torch.randint(0, 2**31 - 1, ()).item())
        keep = dropout_keep(dropout_seed, probs.shape, dropout_p, probs.device)
        probs = probs * keep.to(probs.dtype) * (1.0 / (1.0 - dropout_p)) if dropout_p < 1.0 else probs * 0.0
    return probs.to(v.dtype) @ v, lse


def attention_backward(dout, q, k, v, *, scale: float, table=None, window_size=None, window_mask=None,
                       rel_h=None, rel_w=None, q_size=None, k_size=None, attn_mask=None,
                       dropout_p: float = 0.0, dropout_seed: Optional[int] = None, mask_grads: bool = False):
    """Gradients of :func:`attention` in closed form (the reference backend's backward).

    With ``P = softmax(logits)`` (zero rows where fully masked), ``Z`` the dropout keep mask over
    ``1 - p``, ``out = (P Z) v``::

        dv = (P Z)^T dout,  dP = (dout v^T) Z,  dS = P (dP - rowsum(P dP)),
        dq = scale dS k (+ the decomposed terms' q gradient),  dk = scale dS^T q,
        dtable[idx(i, j), h] = sum_b dS[b, h, i, j],  drel_h / drel_w from dS summed over kw / kh,
        dwindow_mask[w] = sum over b = w mod nW and h of dS,  dattn_mask = dS summed to its shape.

    Returns:
        ``(dq, dk, dv, dtable, drel_h, drel_w, dwindow_mask, dattn_mask)``; ``None`` for inputs
        that are absent (and for the masks unless ``mask_grads``).
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = attention_logits(q, k, scale=scale, table=table, window_size=window_size,
                              window_mask=window_mask, rel_h=rel_h, rel_w=rel_w, q_size=q_size,
                              k_size=k_size, attn_mask=attn_mask)
    probs = torch.softmax(logits, dim=-1)
    if attn_mask is not None or window_mask is not None:
        probs = probs.masked_fill(torch.isneginf(logits.amax(-1, keepdim=True)), 0.0)
    qa, ka, va, da = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    dropped = probs
    keep = None
    if dropout_p > 0.0:
        keep = dropout_keep(dropout_seed, probs.shape, dropout_p, probs.device).to(acc)
        keep = keep * (1.0 / (1.0 - dropout_p)) if dropout_p < 1.0 else keep * 0.0
        dropped = probs * keep
    dv = dropped.transpose(-2, -1) @ da
    dp = da @ va.transpose(-2, -1)
    if keep is not None:
        dp = dp * keep
    ds = probs * (dp - (probs * dp).sum(-1, keepdim=True))
    dq = scale * (ds @ ka)
    dk = scale * (ds.transpose(-2, -1) @ qa)
    dtable = drel_h = drel_w = dwm = dam = None
    b, h, nq, nk = ds.shape
    if table is not None:
        idx = window_relative_index(window_size, q.device).reshape(-1)
        per_head = ds.sum(0).reshape(h, -1)  # [H, N*N]
        dtable = torch.zeros((table.shape[0], h), dtype=acc, device=q.device)
        dtable.index_add_(0, idx, per_head.t())
        dtable = dtable.to(table.dtype)
        if window_mask is not None and mask_grads:
            nw = window_mask.shape[0]
            dwm = ds.sum(1).reshape(b // nw, nw, nq, nk).sum(0).to(window_mask.dtype)
    if rel_h is not None:
        qh, qw = q_size
        kh, kw = k_size
        d = q.shape[-1]
        ih, iw = decomposed_index(qh, kh, q.device), decomposed_index(qw, kw, q.device)
        r_h, r_w = rel_h[ih].to(acc), rel_w[iw].to(acc)  # [qh, kh, D], [qw, kw, D]
        ds6 = ds.reshape(b, h, qh, qw, kh, kw)
        dterm_h, dterm_w = ds6.sum(-1), ds6.sum(-2)  # [B, H, qh, qw, kh], [B, H, qh, qw, kw]
        grid = qa.reshape(b, h, qh, qw, d)
        dq = dq + (torch.einsum("bhyxk,ykd->bhyxd", dterm_h, r_h)
                   + torch.einsum("bhyxk,xkd->bhyxd", dterm_w, r_w)).reshape(b, h, nq, d)
        drh = torch.einsum("bhyxk,bhyxd->ykd", dterm_h, grid)
        drw = torch.einsum("bhyxk,bhyxd->xkd", dterm_w, grid)
        drel_h = torch.zeros(rel_h.shape, dtype=acc, device=q.device).index_add_(
            0, ih.reshape(-1), drh.reshape(-1, d)).to(rel_h.dtype)
        drel_w = torch.zeros(rel_w.shape, dtype=acc, device=q.device).index_add_(
            0, iw.reshape(-1), drw.reshape(-1, d)).to(rel_w.dtype)
    if attn_mask is not None and attn_mask.is_floating_point() and mask_grads:
        shape = attn_mask.shape
        g = ds
        lead = g.dim() - len(shape)
        g = g.sum(tuple(range(lead))) if lead else g
        dims = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
        dam = (g.sum(dims, keepdim=True) if dims else g).to(attn_mask.dtype)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dtable, drel_h, drel_w, dwm, dam)
