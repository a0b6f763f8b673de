"""Reference DINO loss (centering + sharpening cross-entropy over multi-crop pairs) and center update.

Layout (crop-major, as in the official DINO code): ``student [ncrops * B, K]`` where rows
``v*B:(v+1)*B`` are crop ``v``; ``teacher [n_global * B, K]`` in the order of the first
``n_global`` student crops; ``center [1, K]``.

Math, with ``t_i = softmax((teacher_i - center) / tau_t)`` and
``log s_v = log_softmax(student_v / tau_s)`` (both along K)::

    L = 1 / (B * n_terms) * sum_b sum_i sum_{v != i} ( -sum_k t_i[b, k] * log s_v[b, k] ),
    n_terms = n_global * ncrops - n_global.

Everything here is plain PyTorch that autograd differentiates; it is the truth for the tests
(run in float64) and the ``reference`` backend.
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


def dino_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, ncrops: int,
              n_global: int = 2, student_temp: float = 0.1, teacher_temp: float = 0.04) -> torch.Tensor:
    """The DINO loss, term by term like the official loop (see the module docstring).

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
    log_s = torch.log_softmax(student.to(acc) / student_temp, dim=-1).chunk(ncrops)
    t = teacher_probs(teacher, center, teacher_temp).to(acc).chunk(n_global)
    total = student.new_zeros((), dtype=acc)
    n_terms = 0
    for i in range(n_global):
        for v in range(ncrops):
            if v == i:
                continue
            total = total + (-(t[i] * log_s[v]).sum(dim=-1)).mean()
            n_terms += 1
    return total / n_terms


def dino_loss_forward_stats(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                            ncrops: int, n_global: int, student_temp: float,
                            teacher_temp: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss plus the statistics the backward needs, as the fused kernels return them.

    Returns:
        ``(loss, student_lse, teacher_lse)``: the 0-d loss; ``student_lse [ncrops * B]`` =
        ``logsumexp(student / tau_s)`` per row; ``teacher_lse [n_global * B]`` =
        ``logsumexp((teacher - center) / tau_t)`` per row. All in the accumulation dtype.
    """
    acc = _acc_dtype(student, teacher)
    with torch.no_grad():
        loss = dino_loss(student.detach(), teacher, center, ncrops, n_global, student_temp, teacher_temp)
        student_lse = torch.logsumexp(student.to(acc) / student_temp, dim=-1)
        teacher_lse = torch.logsumexp((teacher.to(acc) - center.to(acc)) / teacher_temp, dim=-1)
    return loss, student_lse, teacher_lse


def dino_loss_backward(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                       center: torch.Tensor, student_lse: torch.Tensor, teacher_lse: torch.Tensor,
                       ncrops: int, n_global: int, student_temp: float,
                       teacher_temp: float) -> torch.Tensor:
    """Closed-form gradient of the loss with respect to the student logits.

    For crop ``v`` of batch row ``b``::

        dL/dx_v[k] = g / (B * n_terms * tau_s) * (count_v * p_v[k] - sum_{i != v} t_i[k]),

    with ``p_v = softmax(x_v / tau_s) = exp(x_v / tau_s - student_lse_v)``,
    ``t_i = exp((teacher_i - center) / tau_t - teacher_lse_i)`` and ``count_v`` the number of
    global crops ``i != v``.

    Returns:
        ``[ncrops * B, K]`` gradient in the student's dtype.
    """
    acc = student_lse.dtype
    rows, k = student.shape
    b = rows // ncrops
    n_terms = n_global * ncrops - n_global
    p = torch.exp(student.to(acc) / student_temp - student_lse[:, None]).view(ncrops, b, k)
    t = torch.exp((teacher.to(acc) - center.to(acc)) / teacher_temp - teacher_lse[:, None]).view(n_global, b, k)
    t_total = t.sum(0)
    grads = []
    for v in range(ncrops):
        if v < n_global:
            # the other global crop (n_global is 1 or 2), taken directly rather than subtracted
            others = t[1 - v] if n_global == 2 else torch.zeros_like(t_total)
            count = n_global - 1
        else:
            others, count = t_total, n_global
        grads.append(count * p[v] - others)
    scale = grad_loss.to(acc) / (b * n_terms * student_temp)
    return (torch.stack(grads).view(rows, k) * scale).to(student.dtype)


def update_center_(center: torch.Tensor, teacher: torch.Tensor, momentum: float) -> None:
    """``center <- m * center + (1 - m) * mean over rows of teacher`` (this process only), in place.

    The batch mean is accumulated in float32 (float64 for a float64 center). The distributed
    all-reduce lives in :func:`ssl_fast.ops.update_center_`.
    """
    with torch.no_grad():
        mean = teacher.sum(dim=0, keepdim=True, dtype=center.dtype) / teacher.shape[0]
        center.mul_(momentum).add_(mean, alpha=1.0 - momentum)
