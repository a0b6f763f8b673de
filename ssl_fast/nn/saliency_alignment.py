"""CVSA's cross-view saliency alignment loss, on :func:`ssl_fast.ops.attention`.

Two Saliency Swap views hold the same object on different backgrounds. The online network's
convolutional predictor gives a spatial map ``P`` of view Q, the target network's convolutional
projector a map ``Z`` of view K, both ``[B, C, h, w]``, flattened row-major to ``n = h * w``
positions. The cross-view attention of Q's position ``i`` over K's positions is

    ``A[b, i, j] = softmax_j( <p_i / |p_i|, z_j / |z_j|> / tau )``

(cosine similarity over the C channels, temperature ``tau``). With the swap's saliency masks
``m^Q`` (Q's positions) and ``m^K`` (K's positions), values in [0, 1] at feature resolution, the
attention mass that query ``i`` puts on K's salient region is

    ``o[b, i] = sum_j A[b, i, j] m^K[b, j]``,

which is exactly the attention op's output for a one-channel value ``v = m^K``. One direction's
loss is the saliency-weighted negative log of that mass,

    ``L(Q -> K) = sum_{b,i} m^Q[b, i] * -log(o[b, i] + eps) / sum_{b,i} m^Q[b, i]``,

and the loss is symmetric: ``(L(1 -> 2) + L(2 -> 1)) / 2``, each view in turn the query (its
predictor output) and the key (the other view's target projection).

Why this form:

* Cosine/temperature rather than ``Q.K^T / sqrt(C)``: BYOL's loss already works on
  L2-normalised vectors; raw dot products of unnormalised conv maps grow with training and
  saturate the softmax, while cosine logits lie in ``[-1/tau, 1/tau]`` so ``tau`` alone sets
  how peaked the map can get.
* "Mass inside the mask" rather than a per-key target distribution: the object appears at a
  different position and scale in the two views, so a query position has no single matching
  key; what is known is that the object's positions in Q should attend to the object's
  positions in K. ``-log o`` is the cross-entropy of the binary event "attends to the salient
  region" (target 1), minimal when all mass lies in K's mask. Background queries get no term:
  the two backgrounds come from different images, so nothing there should correspond.
* It needs only ``A @ m^K``: the attention op computes it in one fused pass and its backward
  recomputes the probabilities from ``q, k, v, out`` and the per-row log-sum-exp, so no
  ``[B, n, n]`` tensor is kept for the backward on any backend (the reference backend
  materialises the logits transiently inside its forward and backward, the fused ones never).

The target maps are constants (detached), as BYOL's target branch.
"""
from typing import Optional

import torch
from torch import nn

from ssl_fast.ops.attention import attention, attention_probs


def _check_map(name: str, t, ref: Optional[torch.Tensor] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be [B, C, h, w], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if ref is not None and (t.shape[:2] != ref.shape[:2] or t.device != ref.device):
        raise ValueError(f"{name} ({tuple(t.shape)} on {t.device}) must share B and C with the prediction "
                         f"({tuple(ref.shape)} on {ref.device})")


def _check_mask(name: str, m, fmap: torch.Tensor) -> None:
    b, _, h, w = fmap.shape
    if not isinstance(m, torch.Tensor) or tuple(m.shape) != (b, 1, h, w):
        raise ValueError(f"{name} must be [{b}, 1, {h}, {w}] (the swap mask at this map's resolution), got "
                         f"{tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
    if m.device != fmap.device:
        raise ValueError(f"{name} is on {m.device} but its feature map is on {fmap.device}")


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> L2-normalised ``[B, 1, h*w, C]`` (one head)."""
    t = x.flatten(2).transpose(1, 2)
    return torch.nn.functional.normalize(t, dim=-1, eps=1e-12).unsqueeze(1)


def cross_view_attention(pred: torch.Tensor, target: torch.Tensor, temperature: float = 0.1,
                         query_index=None) -> torch.Tensor:
    """The cross-view attention map ``A`` itself (no gradient), for figures.

    Args:
        pred: ``[B, C, h, w]`` predictor output of view Q.
        target: ``[B, C, h', w']`` target projection of view K.
        temperature: ``tau``.
        query_index: Q positions to return (row-major), default all.

    Returns:
        ``[B, nq, h', w']`` float32, each row a distribution over K's positions.
    """
    _check_map("pred", pred)
    _check_map("target", target, pred)
    p = attention_probs(_tokens(pred), _tokens(target.detach()), scale=1.0 / temperature, query_index=query_index)
    return p[:, 0].reshape(p.shape[0], p.shape[2], target.shape[2], target.shape[3])


class SaliencyAlignmentLoss(nn.Module):
    """Cross-view saliency alignment, both directions (see the module docstring for the math).

    Args:
        temperature: ``tau`` of the cosine logits (default 0.1).
        eps: added to the attention mass inside the log (default 1e-6).
        backend: force an attention backend (``"triton"``, ``"cpp"``, ``"reference"``); default
            the global choice.

    Example:
        >>> loss_fn = SaliencyAlignmentLoss(temperature=0.1)
        >>> p1, p2, z1, z2 = (torch.randn(2, 16, 4, 4) for _ in range(4))
        >>> m1, m2 = torch.rand(2, 1, 4, 4), torch.rand(2, 1, 4, 4)
        >>> loss = loss_fn(p1, p2, z1, z2, m1, m2)
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, temperature: float = 0.1, eps: float = 1e-6, backend: Optional[str] = None):
        super().__init__()
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        self.temperature, self.eps, self.backend = float(temperature), float(eps), backend

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, eps={self.eps}"

    def one_direction(self, pred: torch.Tensor, target: torch.Tensor, mask_pred: torch.Tensor,
                      mask_target: torch.Tensor) -> torch.Tensor:
        """``L(Q -> K)``: Q's predictor map ``pred``, K's target map ``target``, their swap masks.

        Returns a 0-d float32 tensor (0 when ``mask_pred`` is all zero).
        """
        _check_map("pred", pred)
        _check_map("target", target, pred)
        _check_mask("mask_pred", mask_pred, pred)
        _check_mask("mask_target", mask_target, target)
        q = _tokens(pred)
        k = _tokens(target.detach()).to(q.dtype)
        v = mask_target.detach().flatten(2).transpose(1, 2).unsqueeze(1).to(q.dtype)  # [B, 1, nk, 1]
        mass = attention(q, k, v, scale=1.0 / self.temperature, backend=self.backend)[:, 0, :, 0]  # [B, nq]
        acc = torch.float64 if mass.dtype == torch.float64 else torch.float32
        w = mask_pred.detach().flatten(1).to(acc)
        nll = -torch.log(mass.to(acc) + self.eps)
        return (w * nll).sum() / w.sum().clamp_min(1e-12)

    def forward(self, pred_1: torch.Tensor, pred_2: torch.Tensor, target_1: torch.Tensor, target_2: torch.Tensor,
                mask_1: torch.Tensor, mask_2: torch.Tensor) -> torch.Tensor:
        """Symmetric loss ``(L(1 -> 2) + L(2 -> 1)) / 2``.

        Args:
            pred_1, pred_2: ``[B, C, h, w]`` online conv-predictor outputs of views 1 and 2.
            target_1, target_2: ``[B, C, h, w]`` target conv-projector outputs of views 1 and 2.
            mask_1, mask_2: ``[B, 1, h, w]`` the swap masks of views 1 and 2 in [0, 1].
        """
        return 0.5 * (self.one_direction(pred_1, target_2, mask_1, mask_2)
                      + self.one_direction(pred_2, target_1, mask_2, mask_1))
