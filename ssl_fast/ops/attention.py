"""Multi-head attention with relative-position terms computed inside the kernel.

``out = softmax(scale * q k^T + bias) v`` where the bias is one of: none; a Swin relative-position
table (:class:`RelPosTable`); SAM/ViTDet/MViTv2/BoTNet decomposed relative position
(:class:`DecomposedRelPos`); and/or an additive or boolean ``attn_mask``.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ssl_fast import _backend
from ssl_fast._checks import check_real
from ssl_fast._ext import cpp_reasons
from ssl_fast._triton import triton_reasons
from ssl_fast.ops import _registry
from ssl_fast.reference import attention as reference

MAX_TRITON_HEAD_DIM = 128


@dataclass(frozen=True)
class RelPosTable:
    """Swin relative-position bias: ``bias[h, i, j] = table[index(i, j), h]``.

    Args:
        table: ``[(2 Wh - 1) * (2 Ww - 1), H]`` learnable table (gets a gradient).
        window_size: ``(Wh, Ww)``; tokens are the window's positions in row-major order, so
            ``Nq = Nk = Wh * Ww``.
        window_mask: optional additive ``[nW, N, N]`` mask (shifted windows); batch row ``b``
            uses ``window_mask[b % nW]``, so ``B`` must be a multiple of ``nW``.
    """
    table: torch.Tensor
    window_size: Tuple[int, int]
    window_mask: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class DecomposedRelPos:
    """Decomposed relative position: ``bias[b, h, i, j] = q_i . Rh[yi, yj] + q_i . Rw[xi, xj]``.

    ``q_i`` is the unscaled query; ``Rh[y, y'] = rel_h[floor(y * max(kh/qh, 1) - y' * max(qh/kh, 1)
    + (kh - 1) * max(qh/kh, 1))]`` and likewise ``Rw`` (SAM's ``get_rel_pos`` indexing).

    Args:
        rel_h: ``[2 * max(qh, kh) - 1, D]`` table along the height axis (gets a gradient).
        rel_w: ``[2 * max(qw, kw) - 1, D]`` table along the width axis (gets a gradient).
        q_size: query grid ``(qh, qw)`` with ``qh * qw = Nq``.
        k_size: key grid ``(kh, kw)`` with ``kh * kw = Nk``.
    """
    rel_h: torch.Tensor
    rel_w: torch.Tensor
    q_size: Tuple[int, int]
    k_size: Tuple[int, int]


def _pair(name, value) -> Tuple[int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in value)):
        raise ValueError(f"{name} must be a pair of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def _check_inputs(q, k, v, scale, rel_pos, attn_mask, dropout_p):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, N, D] (4 dimensions), got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, h, nq, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h):
        raise ValueError(f"q, k and v must share [B, H]: got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"k's head dim {k.shape[3]} differs from q's {d}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v has {v.shape[2]} keys but k has {k.shape[2]}")
    if nq < 1 or k.shape[2] < 1 or d < 1 or v.shape[3] < 1:
        raise ValueError(f"empty attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    nk = k.shape[2]
    if scale is not None:
        scale = check_real("scale", scale, low=0.0, low_open=True)
    check_real("dropout_p", dropout_p, low=0.0, high=1.0)
    if rel_pos is not None and not isinstance(rel_pos, (RelPosTable, DecomposedRelPos)):
        raise TypeError(f"rel_pos must be RelPosTable, DecomposedRelPos or None, got {type(rel_pos).__name__}")
    if isinstance(rel_pos, RelPosTable):
        wh, ww = _pair("rel_pos.window_size", rel_pos.window_size)
        t = rel_pos.table
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"rel_pos.table must be a 2-D tensor [(2Wh-1)(2Ww-1), H], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.shape != ((2 * wh - 1) * (2 * ww - 1), h):
            raise ValueError(f"rel_pos.table must have shape [{(2 * wh - 1) * (2 * ww - 1)}, {h}] for window "
                             f"{(wh, ww)} and {h} heads, got {tuple(t.shape)}")
        if nq != wh * ww or nk != wh * ww:
            raise ValueError(f"window {wh}x{ww} has {wh * ww} tokens but q has {nq} and k has {nk}")
        if t.device != q.device:
            raise ValueError(f"rel_pos.table is on {t.device} but q is on {q.device}")
        m = rel_pos.window_mask
        if m is not None:
            if not isinstance(m, torch.Tensor) or m.dim() != 3 or m.shape[1:] != (nq, nk):
                raise ValueError(f"rel_pos.window_mask must be [nW, {nq}, {nk}], got "
                                 f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
            if m.shape[0] < 1 or b % m.shape[0] != 0:
                raise ValueError(f"batch {b} must be a multiple of the number of windows {m.shape[0]} "
                                 "in rel_pos.window_mask")
            if m.device != q.device:
                raise ValueError(f"rel_pos.window_mask is on {m.device} but q is on {q.device}")
            if not m.is_floating_point():
                raise TypeError(f"rel_pos.window_mask must be an additive float mask, got {m.dtype}")
    if isinstance(rel_pos, DecomposedRelPos):
        qh, qw = _pair("rel_pos.q_size", rel_pos.q_size)
        kh, kw = _pair("rel_pos.k_size", rel_pos.k_size)
        if qh * qw != nq:
            raise ValueError(f"rel_pos.q_size {qh}x{qw} = {qh * qw} does not match q's {nq} tokens")
        if kh * kw != nk:
            raise ValueError(f"rel_pos.k_size {kh}x{kw} = {kh * kw} does not match k's {nk} tokens")
        for name, t, length in (("rel_h", rel_pos.rel_h, 2 * max(qh, kh) - 1),
                                ("rel_w", rel_pos.rel_w, 2 * max(qw, kw) - 1)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape != (length, d):
                raise ValueError(f"rel_pos.{name} must have shape [{length}, {d}], got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if t.device != q.device:
                raise ValueError(f"rel_pos.{name} is on {t.device} but q is on {q.device}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool or floating, got {attn_mask.dtype}")
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {q.device}")
        try:
            torch.broadcast_shapes(attn_mask.shape, (b, h, nq, nk))
            ok = attn_mask.dim() <= 4
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"[B, H, Nq, Nk] = {[b, h, nq, nk]}")
    return scale


def _reasons(backend: str, device: torch.device, q=None, v=None, rel_pos=None, attn_mask=None,
             dropout_p: float = 0.0) -> List[str]:
    """The body of :func:`reasons` (``device`` alone answers whether the backend runs there)."""
    if backend == "reference":
        return []
    why = []
    if backend == "cpp":
        why += cpp_reasons("attention_fwd", device) + cpp_reasons("attention_bwd", device)
    else:
        why += list(triton_reasons(device))
        if q is not None:
            if q.dtype == torch.float64:
                why.append("float64 is not supported by the Triton kernel")
            if q.shape[-1] > MAX_TRITON_HEAD_DIM or v.shape[-1] > MAX_TRITON_HEAD_DIM:
                why.append(f"head dims {q.shape[-1]}/{v.shape[-1]} exceed {MAX_TRITON_HEAD_DIM}")
        if dropout_p > 0.0:
            why.append("attention dropout (dropout_p > 0) is not fused in the Triton kernel")
    if attn_mask is not None and attn_mask.requires_grad:
        why.append("attn_mask requires grad: the fused kernels give no gradient to a dense mask "
                   "(pass a relative-position table as rel_pos=RelPosTable(...) instead)")
    if (isinstance(rel_pos, RelPosTable) and rel_pos.window_mask is not None
            and rel_pos.window_mask.requires_grad):
        why.append("rel_pos.window_mask requires grad: the fused kernels give no gradient to the window mask")
    return why


def reasons(backend: str, q: torch.Tensor, k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None,
            *, scale: Optional[float] = None, rel_pos=None, attn_mask: Optional[torch.Tensor] = None,
            dropout_p: float = 0.0) -> List[str]:
    """Why ``backend`` cannot serve :func:`attention` for these arguments (empty when it can)."""
    return _reasons(backend, q.device, q, q if v is None else v, rel_pos, attn_mask, dropout_p)


_NO_SIZES = [0, 0, 0, 0, 0, 0]


def _sizes(rel_pos) -> List[int]:
    """``[Wh, Ww, qh, qw, kh, kw]`` for the custom op (zeros where a kind does not use them)."""
    if isinstance(rel_pos, RelPosTable):
        return [int(rel_pos.window_size[0]), int(rel_pos.window_size[1]), 0, 0, 0, 0]
    if isinstance(rel_pos, DecomposedRelPos):
        return [0, 0, int(rel_pos.q_size[0]), int(rel_pos.q_size[1]),
                int(rel_pos.k_size[0]), int(rel_pos.k_size[1])]
    return list(_NO_SIZES)


def _kernel_kwargs(table, window_mask, rel_h, rel_w, attn_mask, sizes) -> dict:
    kw = dict(attn_mask=attn_mask)
    if table is not None:
        kw.update(table=table, window_size=(sizes[0], sizes[1]), window_mask=window_mask)
    if rel_h is not None:
        kw.update(rel_h=rel_h, rel_w=rel_w, q_size=(sizes[2], sizes[3]), k_size=(sizes[4], sizes[5]))
    return kw


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _seed_of(seed: Optional[torch.Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


@torch.library.custom_op("ssl_fast::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: Optional[torch.Tensor],
                   window_mask: Optional[torch.Tensor], rel_h: Optional[torch.Tensor],
                   rel_w: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor], scale: float,
                   sizes: List[int], dropout_p: float, seed: Optional[torch.Tensor],
                   backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out [B, H, Nq, Dv], lse [B, H, Nq])`` (lse float32, float64 for float64 input);
    ``sizes = [Wh, Ww, qh, qw, kh, kw]``; ``seed`` a 0-d int64 tensor when ``dropout_p > 0``."""
    if backend == "triton":
        from ssl_fast.kernels import attention as kernel

        return kernel.attention_forward(q, k, v, scale,
                                        **_kernel_kwargs(table, window_mask, rel_h, rel_w, attn_mask, sizes))
    if backend == "cpp":
        out, lse = torch.ops.ssl_fast_C.attention_fwd(q, k, v, table, window_mask, rel_h, rel_w, attn_mask,
                                                      scale, sizes, dropout_p, _seed_of(seed))
        return out, lse
    with torch.no_grad():
        out, lse = reference.attention_forward_stats(
            q, k, v, scale=scale, dropout_p=dropout_p, dropout_seed=_seed_of(seed),
            **_kernel_kwargs(table, window_mask, rel_h, rel_w, attn_mask, sizes))
    return out.contiguous(), lse.to(_lse_dtype(q)).contiguous()


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, table, window_mask, rel_h, rel_w, attn_mask, scale, sizes, dropout_p, seed,
                        backend):
    b, h, nq, _ = q.shape
    return q.new_empty((b, h, nq, v.shape[-1])), q.new_empty((b, h, nq), dtype=_lse_dtype(q))


@torch.library.custom_op("ssl_fast::attention_bwd", mutates_args=())
def _attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   out: torch.Tensor, lse: torch.Tensor, table: Optional[torch.Tensor],
                   window_mask: Optional[torch.Tensor], rel_h: Optional[torch.Tensor],
                   rel_w: Optional[torch.Tensor], attn_mask: Optional[torch.Tensor], scale: float,
                   sizes: List[int], dropout_p: float, seed: Optional[torch.Tensor], mask_grads: bool,
                   backend: str) -> List[torch.Tensor]:
    """Backward: ``[dq, dk, dv, dtable, drel_h, drel_w, dwindow_mask, dattn_mask]``; a gradient of
    an absent input (and a mask's unless ``mask_grads``, reference backend only) is empty."""
    def given(t):  # a fresh empty tensor per absent gradient (outputs must not alias)
        return q.new_empty((0,)) if t is None else t
    if backend == "reference":
        grads = reference.attention_backward(
            dout, q, k, v, scale=scale, dropout_p=dropout_p, dropout_seed=_seed_of(seed), mask_grads=mask_grads,
            **_kernel_kwargs(table, window_mask, rel_h, rel_w, attn_mask, sizes))
        return [given(t) for t in grads]
    if backend == "cpp":
        grads = torch.ops.ssl_fast_C.attention_bwd(dout, q, k, v, out, lse, table, window_mask, rel_h, rel_w,
                                                   attn_mask, scale, sizes, dropout_p, _seed_of(seed))
    else:
        from ssl_fast.kernels import attention as kernel

        grads = kernel.attention_backward(dout, q, k, v, out, lse, scale,
                                          **_kernel_kwargs(table, window_mask, rel_h, rel_w, attn_mask, sizes))
    dq, dk, dv, dtable, drel_h, drel_w = grads
    return [dq, dk, dv, given(dtable if table is not None else None),
            given(drel_h if rel_h is not None else None), given(drel_w if rel_w is not None else None),
            q.new_empty((0,)), q.new_empty((0,))]


@_attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, table, window_mask, rel_h, rel_w, attn_mask, scale,
                        sizes, dropout_p, seed, mask_grads, backend):
    def like(t, want=True):
        return q.new_empty((0,)) if t is None or not want else torch.empty_like(t)
    ref = backend == "reference" and mask_grads
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), like(table), like(rel_h),
            like(rel_w), like(window_mask, ref),
            like(attn_mask, ref and attn_mask is not None and attn_mask.is_floating_point())]


def _attention_setup_context(ctx, inputs, output):
    q, k, v, table, window_mask, rel_h, rel_w, attn_mask, scale, sizes, dropout_p, seed, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, table, window_mask, rel_h, rel_w, attn_mask, seed)
    ctx.scale, ctx.sizes, ctx.dropout_p, ctx.backend = scale, list(sizes), dropout_p, backend
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, dlse):
    q, k, v, out, lse, table, window_mask, rel_h, rel_w, attn_mask, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask_grads = bool(need[4] or need[7])
    dq, dk, dv, dtable, drel_h, drel_w, dwm, dam = torch.ops.ssl_fast.attention_bwd(
        dout, q, k, v, out, lse, table, window_mask, rel_h, rel_w, attn_mask, ctx.scale, ctx.sizes,
        ctx.dropout_p, seed, mask_grads, ctx.backend)
    return (dq, dk, dv, dtable if table is not None else None, dwm if need[4] else None,
            drel_h if rel_h is not None else None, drel_w if rel_w is not None else None,
            dam if need[7] else None, None, None, None, None, None)


_attention_fwd.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
              rel_pos=None, attn_mask: Optional[torch.Tensor] = None, dropout_p: float = 0.0,
              backend: Optional[str] = None) -> torch.Tensor:
    """Multi-head attention ``softmax(scale * q k^T + bias) v`` with in-kernel relative position.

    Args:
        q: ``[B, H, Nq, D]`` queries.
        k: ``[B, H, Nk, D]`` keys.
        v: ``[B, H, Nk, Dv]`` values.
        scale: logit scale, default ``D ** -0.5``.
        rel_pos: ``None``, :class:`RelPosTable` (Swin) or :class:`DecomposedRelPos` (SAM/ViTDet).
        attn_mask: boolean (``True`` = attend, as in SDPA) or additive float mask broadcastable
            to ``[B, H, Nq, Nk]``. A query whose every key is masked gets a zero output.
        dropout_p: attention-probability dropout (applied only when > 0): in-kernel on the cpp
            backend, from a counter-based hash of a seed drawn from torch's generator
            (``reference.dropout_keep``), so the reference draws the same mask; refused by Triton.
        backend: force ``"triton"``, ``"cpp"`` or ``"reference"``; default: the global choice.

    Returns:
        ``[B, H, Nq, Dv]`` in the input dtype. Gradients flow to q, k, v and the position
        tables (``table``, ``rel_h``, ``rel_w``) on every backend; a floating ``attn_mask`` or
        ``window_mask`` that requires grad is served by the reference backend only (the fused
        kernels report why they cannot take it). Every backend runs through the custom ops
        ``torch.ops.ssl_fast.attention_fwd``/``attention_bwd``.
    """
    scale = _check_inputs(q, k, v, scale, rel_pos, attn_mask, dropout_p)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    name = _backend.resolve(
        "attention", q.device,
        lambda b: reasons(b, q, k, v, rel_pos=rel_pos, attn_mask=attn_mask, dropout_p=dropout_p), backend)
    table = window_mask = rel_h = rel_w = None
    if isinstance(rel_pos, RelPosTable):
        table, window_mask = rel_pos.table, rel_pos.window_mask
    elif isinstance(rel_pos, DecomposedRelPos):
        rel_h, rel_w = rel_pos.rel_h, rel_pos.rel_w
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    out, _ = torch.ops.ssl_fast.attention_fwd(q, k, v, table, window_mask, rel_h, rel_w, attn_mask,
                                              float(scale), _sizes(rel_pos), float(dropout_p), seed, name)
    return out


def _unpack(rel_pos) -> dict:
    if isinstance(rel_pos, RelPosTable):
        return dict(table=rel_pos.table, window_size=tuple(rel_pos.window_size),
                    window_mask=rel_pos.window_mask)
    if isinstance(rel_pos, DecomposedRelPos):
        return dict(rel_h=rel_pos.rel_h, rel_w=rel_pos.rel_w, q_size=tuple(rel_pos.q_size),
                    k_size=tuple(rel_pos.k_size))
    return {}


def attention_probs(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None, rel_pos=None,
                    attn_mask: Optional[torch.Tensor] = None, query_index=None) -> torch.Tensor:
    """Attention probabilities of chosen queries, for visualisation (plain PyTorch, no gradient).

    Args:
        q, k, scale, rel_pos, attn_mask: as for :func:`attention`.
        query_index: queries to return (an int, a list, a slice or a 1-D index tensor);
            ``None`` returns all.

    Returns:
        ``[B, H, len(query_index), Nk]`` float32 probabilities (rows sum to 1, or 0 when fully masked).
    """
    v = k[..., :1]
    scale = _check_inputs(q, k, v, scale, rel_pos, attn_mask, 0.0)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        logits = reference.attention_logits(q, k, scale=scale, attn_mask=attn_mask, **_unpack(rel_pos))
        if query_index is not None:
            if isinstance(query_index, int):
                query_index = [query_index]
            logits = logits[:, :, query_index]
        probs = torch.softmax(logits.float(), dim=-1)
        return torch.nan_to_num(probs, nan=0.0)


def _sample(device: torch.device):
    """Swin-like: a 3x4 window table with a shifted-window mask and a boolean mask, two heads."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 12, d, generator=g).to(device).requires_grad_() for d in (16, 16, 24))
    table = torch.randn(5 * 7, 2, generator=g).to(device).requires_grad_()
    window_mask = torch.where(torch.rand(2, 12, 12, generator=g) < 0.8, 0.0, -100.0).to(device)
    mask = (torch.rand(12, 12, generator=g) < 0.9).to(device)
    return (q, k, v), dict(rel_pos=RelPosTable(table, (3, 4), window_mask), attn_mask=mask, scale=0.3)


def _bad_inputs(device: torch.device):
    q = torch.randn(1, 2, 12, 16, device=device)
    rel = DecomposedRelPos(torch.randn(5, 16, device=device), torch.randn(9, 16, device=device), (3, 5), (3, 4))
    return [
        _registry.BadInput((q[0], q, q), {}, ValueError, r"q must be \[B, H, N, D\]"),
        _registry.BadInput((q, q, q.half()), {}, TypeError, "share a dtype"),
        _registry.BadInput((q, q, q), dict(rel_pos=rel), ValueError, "rel_pos.q_size 3x5"),
        _registry.BadInput((q, q, q), dict(attn_mask=torch.ones(12, 11, dtype=torch.bool, device=device)),
                           ValueError, "attn_mask of shape"),
        _registry.BadInput((q, q, q), dict(scale=0.0), ValueError, "scale must be >"),
        _registry.BadInput((q, q, q), dict(dropout_p=1.5), ValueError, "dropout_p must be <="),
        _registry.BadInput((q, q, q), dict(rel_pos=(1, 2)), TypeError, "rel_pos must be"),
    ]


def _opcheck(device: torch.device, backend: str):
    (q, k, v), kw = _sample(device)
    rp = kw["rel_pos"]
    samples = []
    for kind in ("table", "decomposed"):
        if kind == "table":
            args = (q, k, v, rp.table, rp.window_mask, None, None, kw["attn_mask"], 0.3, [3, 4, 0, 0, 0, 0])
        else:
            g = torch.Generator().manual_seed(1)
            rel_h = torch.randn(5, 16, generator=g).to(device).requires_grad_()
            rel_w = torch.randn(7, 16, generator=g).to(device).requires_grad_()
            mask = torch.randn(2, 1, 12, 12, generator=g).to(device)
            args = (q, k, v, None, None, rel_h, rel_w, mask, 0.3, [0, 0, 3, 4, 3, 4])
        fwd = (*args, 0.0, None, backend)
        samples.append((torch.ops.ssl_fast.attention_fwd.default, fwd))
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in fwd]
        out, lse = torch.ops.ssl_fast.attention_fwd(*plain)
        bwd = (torch.randn_like(out), *plain[:3], out, lse, *plain[3:12], False, backend)
        samples.append((torch.ops.ssl_fast.attention_bwd.default, bwd))
    return samples


_registry.register(_registry.OpSpec(
    name="attention", fn=attention, reasons=reasons, sample=_sample, bad_inputs=_bad_inputs, opcheck=_opcheck,
    cpp_kernels=("attention_fwd", "attention_bwd"), tol=1e-5))
