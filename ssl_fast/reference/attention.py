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


def attention(q, k, v, *, scale: Optional[float] = None, table=None, window_size=None,
              window_mask=None, rel_h=None, rel_w=None, q_size=None, k_size=None, attn_mask=None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """Reference attention (see module docstring); softmax in float32 (float64 for float64 input)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    logits = attention_logits(q, k, scale=scale, table=table, window_size=window_size,
                              window_mask=window_mask, rel_h=rel_h, rel_w=rel_w, q_size=q_size,
                              k_size=k_size, attn_mask=attn_mask)
    probs = torch.softmax(logits, dim=-1)
    # rows with every key masked: softmax gives NaN; define their output as zero
    probs = torch.where(torch.isneginf(logits).all(-1, keepdim=True), torch.zeros_like(probs), probs)
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return (probs.to(v.dtype) @ v)
