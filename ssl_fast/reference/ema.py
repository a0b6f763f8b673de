"""Reference EMA (momentum-teacher) update."""
from typing import Sequence, Union

import torch


def ema_(ema_tensors: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor],
         momentum: Union[float, torch.Tensor]) -> None:
    """In place, for every pair: ``e <- m * e + (1 - m) * t``; integer tensors are copied.

    The arithmetic runs in float32, or float64 for float64 tensors; the result is rounded once
    to the dtype of ``e``.
    """
    for e, t in zip(ema_tensors, tensors):
        if not e.is_floating_point():
            e.copy_(t)
            continue
        acc = torch.promote_types(e.dtype, torch.float32)
        m = momentum.to(acc) if isinstance(momentum, torch.Tensor) else momentum
        e.copy_(m * e.to(acc) + (1 - m) * t.to(acc))
