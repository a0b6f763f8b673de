"""CARE's loss: BYOL on the C-stream and on the T-stream, plus the attention supervision."""
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn


class CARELoss(nn.Module):
    """``L = L_c + L_t + sup_weight * L_sup`` (Ge et al., NeurIPS 2021; official ``models/care_module.py``).

    With L2-normalised vectors, ``q`` the online predictions and ``k`` the target projections,
    where ``k1`` is the target's projection of view 2 and ``k2`` of view 1 (the OTHER view):

    - ``L_c = mean_b [4 - 2 (<q_c1, k_c1> + <q_c2, k_c2>)]`` (the C-stream, BYOL);
    - ``L_t`` the same on the T-stream;
    - ``L_sup = MSE(q_c1, sg q_t1) + MSE(q_c2, sg q_t2) + MSE(k_c1, k_t1) + MSE(k_c2, k_t2)``, each
      the mean over all elements. The last two terms are target-only and carry no gradient; the
      official code adds them to the reported loss, and so does this module, so the value matches.

    Shapes:
        every input ``[B, D]``, already L2-normalised (the official heads end in ``Normalize``).

    Args:
        sup_weight: lambda of the supervision term (official: 100).

    Example:
        >>> loss_fn = CARELoss()
        >>> q = [torch.nn.functional.normalize(torch.randn(4, 8), dim=1) for _ in range(8)]
        >>> parts = loss_fn(*q)
        >>> parts["loss"].shape
        torch.Size([])
    """

    def __init__(self, sup_weight: float = 100.0):
        super().__init__()
        if not sup_weight >= 0:
            raise ValueError(f"sup_weight must be >= 0, got {sup_weight}")
        self.sup_weight = float(sup_weight)

    @staticmethod
    def byol_term(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor) -> torch.Tensor:
        """``mean_b [4 - 2 (<q1, k1> + <q2, k2>)]``."""
        return (4 - 2 * ((q1 * k1.detach()).sum(-1) + (q2 * k2.detach()).sum(-1))).mean()

    def forward(self, q_c1, q_c2, k_c1, k_c2, q_t1, q_t2, k_t1, k_t2) -> Dict[str, torch.Tensor]:
        """Returns ``loss`` and its parts ``loss_c``, ``loss_t``, ``loss_sup`` (the weighted term)."""
        ref = q_c1.shape
        for name, t in (("q_c1", q_c1), ("q_c2", q_c2), ("k_c1", k_c1), ("k_c2", k_c2), ("q_t1", q_t1),
                        ("q_t2", q_t2), ("k_t1", k_t1), ("k_t2", k_t2)):
            if t.dim() != 2 or t.shape != ref:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; every input must be [B, D] = {tuple(ref)}")
        loss_c = self.byol_term(q_c1, q_c2, k_c1, k_c2)
        loss_t = self.byol_term(q_t1, q_t2, k_t1, k_t2)
        sup = (F.mse_loss(q_c1, q_t1.detach()) + F.mse_loss(q_c2, q_t2.detach())
               + F.mse_loss(k_c1.detach(), k_t1.detach()) + F.mse_loss(k_c2.detach(), k_t2.detach()))
        sup = self.sup_weight * sup
        return {"loss": loss_c + loss_t + sup, "loss_c": loss_c, "loss_t": loss_t, "loss_sup": sup}
