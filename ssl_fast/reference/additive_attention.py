"""Reference additive (Bahdanau) attention, the attention step of Show, Attend and Tell.

Shapes: encoder features ``a [B, L, D]``, their projection ``Ua [B, L, A]`` (computed once per
image), the decoder's projected state ``Wh [B, A]``, the score vector ``w [A]``, an optional
boolean ``mask [B, L]`` (True = keep). Math::

    e[b, l]      = sum_k w[k] * tanh(Ua[b, l, k] + Wh[b, k])
    alpha[b, :]  = softmax(e[b, :]) over the kept positions, 0 at masked ones
    context[b]   = sum_l alpha[b, l] * a[b, l, :]

A row whose positions are all masked gets ``alpha = 0`` and ``context = 0`` (and zero
gradients): the softmax of an empty set is taken as nothing, not NaN.

Backward, with ``t = tanh(Ua + Wh[:, None])`` recomputed and the incoming gradients ``gc [B, D]``
(of the context) and ``galpha [B, L]``::

    grad_a[b, l]   = alpha[b, l] * gc[b]
    dalpha[b, l]   = galpha[b, l] + a[b, l] . gc[b]
    de[b, l]       = alpha[b, l] * (dalpha[b, l] - sum_l' alpha[b, l'] * dalpha[b, l'])
                     (at the row's largest alpha: minus the sum of the others, which is equal
                     and does not cancel as alpha -> 1)
    grad_Ua[b, l]  = de[b, l] * w * (1 - t[b, l]^2)
    grad_Wh[b]     = sum_l grad_Ua[b, l] = w * sum_l de[b, l] * (t[b, 0]^2 - t[b, l]^2)
    grad_w         = sum_{b, l} de[b, l] * t[b, l]

:func:`additive_attention` (plain autograd) is the truth for the tests, run in float64.
:func:`additive_attention_forward` and :func:`additive_attention_backward` are the ``reference``
backend of the custom ops, with the formulas above in float32 (float64 for float64 inputs);
``grad_Wh`` is taken in its second form (equal since ``sum_l de[b, l] = 0``), whose terms stay
small where the ``t[b, l]^2`` are alike, where the direct sum cancels (1e-4 in float32).
"""
from typing import Optional, Tuple

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (fp16/bf16 are computed in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_softmax(e: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``softmax(e)`` along dim 1 over the kept positions; masked and fully masked rows give 0.

    NaN in ``e`` propagates (a NaN score makes its row NaN, as ``torch.softmax`` does).
    """
    if mask is not None:
        e = e.masked_fill(~mask, float("-inf"))
    m = e.amax(dim=1, keepdim=True)
    # a fully masked row has max -inf; shifting by 0 keeps exp(-inf) = 0 instead of NaN
    m = m.masked_fill(m == float("-inf"), 0.0)
    p = torch.exp(e - m)
    s = p.sum(dim=1, keepdim=True)
    # s >= 1 for a row with a kept position (its max gives exp(0)); s == 0 only when all are masked
    return p / torch.where(s == 0, torch.ones_like(s), s)


def additive_attention(a: torch.Tensor, Ua: torch.Tensor, Wh: torch.Tensor, w: torch.Tensor,
                       mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Additive attention by plain autograd, in the inputs' dtype (the truth for the tests).

    Args:
        a: ``[B, L, D]`` encoder features.
        Ua: ``[B, L, A]`` projected features.
        Wh: ``[B, A]`` projected decoder state.
        w: ``[A]`` score vector.
        mask: optional boolean ``[B, L]``, True = keep.

    Returns:
        ``(context [B, D], alpha [B, L])``.
    """
    t = torch.tanh(Ua + Wh[:, None, :])
    e = t @ w
    alpha = _masked_softmax(e, mask)
    context = (alpha[:, :, None] * a).sum(dim=1)
    return context, alpha


def _largest_from_the_rest(de: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``de`` with the entry at each row's largest alpha replaced by minus the sum of the others.

    Equal in exact arithmetic (``sum_l de_l = 0``), but ``alpha_m (dalpha_m - delta)`` cancels when
    ``alpha_m`` is near 1 (1e-3 relative error in float32 at ``alpha_m = 0.9999``), while the
    others' sum does not; autograd through ``exp(e - max e)`` gets it the same way.
    """
    idx = alpha.argmax(dim=1, keepdim=True)
    de = de.scatter(1, idx, 0.0)
    return de.scatter(1, idx, -de.sum(dim=1, keepdim=True))


def additive_attention_forward(a: torch.Tensor, Ua: torch.Tensor, Wh: torch.Tensor, w: torch.Tensor,
                               mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``reference`` backend's forward, no autograd.

    Returns:
        ``context [B, D]`` in the inputs' dtype and ``alpha [B, L]`` in the accumulation dtype
        (float32, float64 for float64 inputs); the backward reads this ``alpha``.
    """
    acc = acc_dtype(a.dtype)
    with torch.no_grad():
        t = torch.tanh(Ua.to(acc) + Wh.to(acc)[:, None, :])
        e = t @ w.to(acc)
        del t
        alpha = _masked_softmax(e, mask)
        context = torch.bmm(alpha[:, None, :], a.to(acc)).squeeze(1)
    return context.to(a.dtype), alpha


def additive_attention_backward(grad_context: torch.Tensor, grad_alpha: torch.Tensor, a: torch.Tensor,
                                Ua: torch.Tensor, Wh: torch.Tensor, w: torch.Tensor,
                                alpha: torch.Tensor, need_grad_a: bool = True
                                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``reference`` backend's backward: recomputes the tanh, no autograd.

    Args:
        grad_context: ``[B, D]`` gradient of the context.
        grad_alpha: ``[B, L]`` gradient of alpha.
        a, Ua, Wh, w: the forward's inputs.
        alpha: ``[B, L]`` the forward's alpha in the accumulation dtype (0 at masked positions,
            so the mask needs no second look here).
        need_grad_a: when False, ``grad_a`` is an empty ``[0]`` tensor (not computed).

    Returns:
        ``(grad_a, grad_Ua, grad_Wh, grad_w)`` in the dtypes of ``a``, ``Ua``, ``Wh``, ``w``.
    """
    acc = alpha.dtype
    with torch.no_grad():
        gc = grad_context.to(acc)
        grad_a = alpha[:, :, None] * gc[:, None, :] if need_grad_a else a.new_empty((0,), dtype=acc)
        dalpha = grad_alpha.to(acc) + torch.bmm(a.to(acc), gc[:, :, None]).squeeze(2)
        de = alpha * (dalpha - (alpha * dalpha).sum(dim=1, keepdim=True))
        de = _largest_from_the_rest(de, alpha)
        t = torch.tanh(Ua.to(acc) + Wh.to(acc)[:, None, :])
        grad_w = torch.einsum("bl,bla->a", de, t)
        t2 = t.square_()
        grad_Wh = w.to(acc) * torch.einsum("bl,bla->ba", de, t2[:, :1] - t2)
        grad_Ua = t2.neg_().add_(1.0).mul_(de[:, :, None] * w.to(acc))
    return grad_a.to(a.dtype), grad_Ua.to(Ua.dtype), grad_Wh.to(Wh.dtype), grad_w.to(w.dtype)
