"""Reference DINO loss (centering + sharpening cross-entropy over multi-crop pairs) and center update.

Layout (crop-major, as in the official DINO code): ``student [ncrops * B, K]`` where rows
``v*B:(v+1)*B`` are crop ``v``; ``teacher [n_global * B, K]`` in the order of the first
``n_global`` student crops; ``center [1, K]``.

Math, with ``t_i = softmax((teacher_i - center) / tau_t)`` and
``log s_v = log_softmax(student_v / tau_s)`` (both along K)::

    L = 1 / (B * n_terms) * sum_b sum_i sum_{v != i} ( -sum_k t_i[b, k] * log s_v[b, k] ),
    n_terms = n_global * ncrops - n_global.

Everything here is plain PyTorch: :func:`dino_loss` (autograd) is the truth for the tests (run
in float64); :func:`dino_loss_forward_stats` and :func:`dino_loss_backward` are the ``reference``
backend of the custom ops, with the same arithmetic. Both compute each crop's log-softmax once
and the pair sums with one product per view and not one per pair (:func:`_pair_loss`), so the
fallback is no slower than the official loop it replaces.
"""
from typing import Tuple

import torch


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16 inputs are computed in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def teacher_probs(teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """``softmax((teacher - center) / tau_t)`` along K, in the accumulation dtype, detached.

    Args:
        teacher: ``[n_global * B, K]`` teacher logits.
        center: ``[1, K]`` running center.
        teacher_temp: ``tau_t > 0``.

    Returns:
        ``[n_global * B, K]`` probabilities (float32, or float64 for float64 inputs).
    """
    acc = _acc_dtype(teacher, center)
    z = (teacher.detach().to(acc) - center.detach().to(acc)) / teacher_temp
    return torch.softmax(z, dim=-1)


def _pair_loss(t: torch.Tensor, log_s: torch.Tensor, ncrops: int, n_global: int) -> torch.Tensor:
    """The loss from teacher probabilities and student log-probabilities, each pair counted once.

    ``sum_i sum_{v != i} t_i . log s_v`` is grouped by the student crop: every view pairs with
    every local crop, and with every global crop but its own, so::

        sum_i sum_{v != i} t_i . log s_v = (sum_i t_i) . (sum_{v >= n_global} log s_v)
                                           + sum_i sum_{j < n_global, j != i} t_i . log s_j.

    Every product is of a probability (>= 0) and a log-probability (<= 0), so the sums add terms
    of one sign and nothing cancels (unlike ``sum_v - log s_i``); there are ``1 + n_global *
    (n_global - 1)`` products of ``[B, K]``, not one per pair.

    Args:
        t: ``[n_global * B, K]`` teacher probabilities.
        log_s: ``[ncrops * B, K]`` student log-probabilities, same dtype.
        ncrops: number of student crops.
        n_global: number of teacher views (the first ``n_global`` crops).

    Returns:
        0-d loss ``-(1 / (B * n_terms)) * sum_i sum_{v != i} sum_b t_i[b] . log s_v[b]``.
    """
    rows, k = log_s.shape
    b = rows // ncrops
    log_s = log_s.reshape(ncrops, b, k)
    t = t.reshape(n_global, b, k)
    pair_sum = (t.sum(0) * log_s[n_global:].sum(0)).sum()
    for i in range(n_global):
        for j in range(n_global):
            if j != i:
                pair_sum = pair_sum + (t[i] * log_s[j]).sum()
    n_terms = n_global * ncrops - n_global
    return -pair_sum / (b * n_terms)


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, ncrops: int,
              n_global: int = 2, student_temp: float = 0.1, teacher_temp: float = 0.04) -> torch.Tensor:
    """The DINO loss (see the module docstring), differentiable by autograd.

    One ``log_softmax`` over all student rows and one ``softmax`` over all teacher rows; the
    pair sums are taken by :func:`_pair_loss`.

    Args:
        student: ``[ncrops * B, K]`` student logits (any float dtype; math in float32/float64).
        teacher: ``[n_global * B, K]`` teacher logits; no gradient flows to it.
        center: ``[1, K]`` center; no gradient flows to it.
        ncrops: number of student crops.
        n_global: number of global crops (the teacher's views), the first crops of the student.
        student_temp: ``tau_s``.
        teacher_temp: ``tau_t``.

    Returns:
        0-d loss, float32 (float64 when an input is float64).
    """
    acc = _acc_dtype(student, teacher)
    log_s = torch.log_softmax(student.to(acc) / student_temp, dim=-1)
    t = teacher_probs(teacher.to(acc), center, teacher_temp)
    return _pair_loss(t, log_s, ncrops, n_global)


def _scaled_logits(x: torch.Tensor, temp: float, acc: torch.dtype, center=None) -> torch.Tensor:
    """``(x - center) / temp`` in ``acc`` as a new tensor (half-precision inputs are widened first)."""
    z = x.to(acc)
    if center is not None:
        return (z - center.to(acc)).div_(temp)
    return z / temp if z is x else z.div_(temp)


def dino_loss_forward_stats(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                            ncrops: int, n_global: int, student_temp: float,
                            teacher_temp: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss plus the statistics the backward needs, as the fused kernels return them.

    The loss is :func:`dino_loss`'s arithmetic (without autograd). Each row's log-sum-exp comes
    from the softmax already computed, without another pass of ``exp``: ``lse = max_k z -
    max_k log p``, as ``max_k log p = -log sum_k exp(z - max_k z)`` (the largest probability is
    the one at the largest logit).

    Returns:
        ``(loss, student_lse, teacher_lse)``: the 0-d loss; ``student_lse [ncrops * B]`` =
        ``logsumexp(student / tau_s)`` per row; ``teacher_lse [n_global * B]`` =
        ``logsumexp((teacher - center) / tau_t)`` per row. All in the accumulation dtype.
    """
    acc = _acc_dtype(student, teacher)
    with torch.no_grad():
        z = _scaled_logits(student, student_temp, acc)
        log_s = torch.log_softmax(z, dim=-1)
        student_lse = z.amax(dim=-1) - log_s.amax(dim=-1)
        zt = _scaled_logits(teacher, teacher_temp, acc, center)
        t = torch.softmax(zt, dim=-1)
        teacher_lse = zt.amax(dim=-1) - t.amax(dim=-1).log()
        loss = _pair_loss(t, log_s, ncrops, n_global)
    return loss, student_lse, teacher_lse


def dino_loss_backward(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                       center: torch.Tensor, student_lse: torch.Tensor, teacher_lse: torch.Tensor,
                       ncrops: int, n_global: int, student_temp: float,
                       teacher_temp: float) -> torch.Tensor:
    """Closed-form gradient of the loss with respect to the student logits.

    For crop ``v`` of batch row ``b``::

        dL/dx_v[k] = g / (B * n_terms * tau_s) * (count_v * p_v[k] - sum_{i != v} t_i[k]),

    with ``p_v = softmax(x_v / tau_s)``, ``t_i = softmax((teacher_i - center) / tau_t)`` and
    ``count_v`` the number of global crops ``i != v``. Both softmaxes are recomputed rather than
    taken as ``exp(z - lse)`` from the saved log-sum-exps: at ``|z|`` beyond about ``1e7`` a
    float32 ``lse`` can no longer hold ``log sum exp(z - max z)``, and ``exp(z - lse)`` would
    give 1 to every entry tied at the maximum. ``student_lse`` and ``teacher_lse`` only fix the
    accumulation dtype here.

    Returns:
        ``[ncrops * B, K]`` gradient in the student's dtype.
    """
    acc = student_lse.dtype
    rows, k = student.shape
    b = rows // ncrops
    n_terms = n_global * ncrops - n_global
    scale = grad_loss.to(acc) / (b * n_terms * student_temp)
    grad = torch.softmax(_scaled_logits(student, student_temp, acc), dim=-1).view(ncrops, b, k)
    t = torch.softmax(_scaled_logits(teacher, teacher_temp, acc, center), dim=-1).view(n_global, b, k)
    grad[n_global:].mul_(n_global * scale).sub_(t.sum(0) * scale)
    for v in range(n_global):
        others = sum(t[i] for i in range(n_global) if i != v)  # 0 when n_global == 1
        grad[v].mul_((n_global - 1) * scale).sub_(others * scale)
    return grad.view(rows, k).to(student.dtype)


def update_center_(center: torch.Tensor, teacher: torch.Tensor, momentum: float) -> None:
    """``center <- m * center + (1 - m) * mean over rows of teacher`` (this process only), in place.

    The batch mean is accumulated in float32 (float64 for a float64 center). The distributed
    all-reduce lives in :func:`ssl_fast.ops.update_center_`.
    """
    with torch.no_grad():
        mean = teacher.sum(dim=0, keepdim=True, dtype=center.dtype) / teacher.shape[0]
        center.mul_(momentum).add_(mean, alpha=1.0 - momentum)
