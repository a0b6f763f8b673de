"""SimSiam's loss: symmetrised negative cosine similarity with a stop-gradient."""
import torch
import torch.nn.functional as F
from torch import nn


class SimSiamLoss(nn.Module):
    """``L = -(mean_b cos(p1, sg z2) + mean_b cos(p2, sg z1)) / 2`` (Chen & He 2021, Algorithm 1).

    ``p_v`` is the predictor's output for view v, ``z_v`` the projector's; the stop-gradient on
    ``z`` is what keeps SimSiam from collapsing.

    Shapes:
        p1, p2, z1, z2: ``[B, D]``. Output: 0-d, in ``[-1, 1]``.

    Example:
        >>> loss_fn = SimSiamLoss()
        >>> p1, p2, z1, z2 = (torch.randn(8, 2048) for _ in range(4))
        >>> loss = loss_fn(p1, p2, z1, z2)
    """

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Loss of predictions ``p1, p2`` against the other view's detached projections."""
        for name_a, a, name_b, b in (("p1", p1, "z2", z2), ("p2", p2, "z1", z1)):
            if a.dim() != 2 or a.shape != b.shape:
                raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must both be [B, D] of one shape")
        d1 = F.cosine_similarity(p1, z2.detach(), dim=-1, eps=1e-8).mean()
        d2 = F.cosine_similarity(p2, z1.detach(), dim=-1, eps=1e-8).mean()
        return -(d1 + d2) / 2
