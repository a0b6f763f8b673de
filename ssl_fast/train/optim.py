"""Optimizers by name: AdamW, SGD with momentum, and LARS as BYOL uses it.

Parameter groups come from :meth:`SSLMethod.param_groups`; a group with
``apply_weight_decay=False`` (biases and normalisation parameters) gets no weight decay, and under
LARS no trust-ratio adaptation either (BYOL's exclusion rule). The trainer sets each group's
``lr`` and ``weight_decay`` every step from its schedules.
"""
from typing import Any, Dict, Iterable, List

import torch

from ssl_fast.methods.base import OptimConfig


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) with SGD momentum, as in BYOL.

    For each parameter ``w`` with gradient ``g`` in a group with ``lars_adapt=True``:
    ``u = g + wd * w``; ``trust = eta * ||w|| / ||u||`` where both norms are positive, else 1;
    ``buf = momentum * buf + trust * u``; ``w -= lr * buf``. Groups with ``lars_adapt=False`` take
    plain SGD with momentum (``u = g + wd * w``, no trust ratio), which is how BYOL treats biases
    and batch-norm parameters (together with ``weight_decay=0`` for them).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: momentum coefficient.
        weight_decay: L2 coefficient added to the update.
        eta: trust coefficient.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = LARS([w], lr=0.1)
        >>> w.sum().backward(); opt.step()
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("eta", eta)):
            if not v >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {v}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_adapt=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                u = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad.clone()
                if group["lars_adapt"]:
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(u)
                    trust = torch.where((w_norm > 0) & (u_norm > 0), group["eta"] * w_norm / u_norm,
                                        torch.ones_like(w_norm))
                    u.mul_(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = u
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(u)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(name: str, param_groups: List[Dict[str, Any]], lr: float, oc: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``param_groups`` (weight decay is set per step by the trainer).

    Args:
        name: ``adamw``, ``sgd`` or ``lars``.
        param_groups: groups from :meth:`SSLMethod.param_groups`.
        lr: initial learning rate (the schedule overrides it every step).
        oc: the method's :class:`OptimConfig` (betas, momentum, LARS eta).

    Raises:
        ValueError: unknown ``name``.
    """
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=oc.betas)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=oc.momentum)
    if name == "lars":
        groups = [dict(g, lars_adapt=g.get("apply_weight_decay", True)) for g in param_groups]
        return LARS(groups, lr=lr, momentum=oc.momentum, eta=oc.lars_eta)
    raise ValueError(f"optimizer must be adamw, sgd or lars, got {name!r}")
