"""BYOL's loss: ``2 - 2 cos(p, sg(z'))`` for each view, summed over the two directions."""
import torch
import torch.nn.functional as F
from torch import nn


def _check_pair(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must both be [B, D] of one shape")


def normalized_mse(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``||p/|p| - z/|z| ||^2 = 2 - 2 cos(p, z)`` per row, ``[B, D], [B, D] -> [B]``."""
    return 2.0 - 2.0 * F.cosine_similarity(p, z, dim=-1, eps=1e-8)


class BYOLLoss(nn.Module):
    """Symmetrised BYOL loss (Grill et al. 2020, eq. 2 and the symmetrisation below it).

    ``L = mean_b [ (2 - 2 cos(p1_b, z2_b)) + (2 - 2 cos(p2_b, z1_b)) ]`` where ``p_v`` is the online
    prediction of view v and ``z_v`` the target projection of view v (no gradient flows into ``z``).

    Shapes:
        p1, p2, z1, z2: ``[B, D]``. Output: 0-d.

    Example:
        >>> loss_fn = BYOLLoss()
        >>> p1, p2, z1, z2 = (torch.randn(8, 256) for _ in range(4))
        >>> loss = loss_fn(p1, p2, z1, z2)
    """

    def forward(self, p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Loss of online predictions ``p1, p2`` against target projections of the other view."""
        _check_pair("p1", p1, "z2", z2)
        _check_pair("p2", p2, "z1", z1)
        return (normalized_mse(p1, z2.detach()) + normalized_mse(p2, z1.detach())).mean()
