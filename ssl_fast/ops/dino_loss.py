"""DINO loss (centering + sharpening cross-entropy over all multi-crop pairs) and its center update.

Layout and math are in ``ssl_fast/reference/dino_loss.py`` and DESIGN.md ("DINO loss").
Two custom ops carry the work: ``ssl_fast::dino_loss_fwd`` returns the loss and the row
log-sum-exps the backward needs; ``ssl_fast::dino_loss_bwd`` returns the student gradient.
The public :func:`dino_loss` checks its arguments, picks a backend and calls the forward op;
autograd reaches the backward op through ``register_autograd``.
"""
from typing import List, Optional, Tuple

import torch

from ssl_fast import _backend
from ssl_fast._checks import check_int, check_real, check_same_device, check_tensor
from ssl_fast._ext import cpp_reasons
from ssl_fast._triton import triton_reasons
from ssl_fast.ops import _registry
from ssl_fast.reference import dino_loss as reference

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _reasons(backend: str, device: torch.device, student_dtype: Optional[torch.dtype] = None,
             teacher_dtype: Optional[torch.dtype] = None) -> List[str]:
    """Why ``backend`` cannot compute the DINO loss for tensors on ``device`` of these dtypes."""
    if backend == "triton":
        why = list(triton_reasons(device))
        for name, dt in (("student_output", student_dtype), ("teacher_output", teacher_dtype)):
            if dt is not None and dt not in _TRITON_DTYPES:
                why.append(f"the Triton kernel takes float32/float16/bfloat16 {name}, got {dt}")
        return why
    if backend == "cpp":
        return cpp_reasons("dino_loss_fwd", device) or cpp_reasons("dino_loss_bwd", device)
    return []


def reasons(backend: str, student_output: torch.Tensor, teacher_output: torch.Tensor,
            center: Optional[torch.Tensor] = None, **options) -> List[str]:
    """Why ``backend`` cannot serve :func:`dino_loss` for these arguments (empty when it can);
    ``options`` are :func:`dino_loss`'s keywords, which no backend restricts."""
    return _reasons(backend, student_output.device, student_output.dtype, teacher_output.dtype)


def _acc_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32


@torch.library.custom_op("ssl_fast::dino_loss_fwd", mutates_args=())
def _dino_loss_fwd(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, ncrops: int,
                   n_global: int, student_temp: float, teacher_temp: float,
                   backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from ssl_fast.kernels import dino_loss as kernel

        return kernel.forward(student, teacher, center, ncrops, n_global, student_temp, teacher_temp)
    if backend == "cpp":
        return tuple(torch.ops.ssl_fast_C.dino_loss_fwd(student, teacher, center, ncrops, n_global,
                                                        student_temp, teacher_temp))
    return reference.dino_loss_forward_stats(student, teacher, center, ncrops, n_global,
                                             student_temp, teacher_temp)


@_dino_loss_fwd.register_fake
def _dino_loss_fwd_fake(student, teacher, center, ncrops, n_global, student_temp, teacher_temp, backend):
    acc = _acc_dtype(student, teacher)
    return (student.new_empty((), dtype=acc), student.new_empty((student.shape[0],), dtype=acc),
            student.new_empty((teacher.shape[0],), dtype=acc))


@torch.library.custom_op("ssl_fast::dino_loss_bwd", mutates_args=())
def _dino_loss_bwd(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                   center: torch.Tensor, student_lse: torch.Tensor, teacher_lse: torch.Tensor,
                   ncrops: int, n_global: int, student_temp: float, teacher_temp: float,
                   backend: str) -> torch.Tensor:
    if backend == "triton":
        from ssl_fast.kernels import dino_loss as kernel

        return kernel.backward(grad_loss, student, teacher, center, student_lse, teacher_lse,
                               ncrops, n_global, student_temp, teacher_temp)
    if backend == "cpp":
        return torch.ops.ssl_fast_C.dino_loss_bwd(grad_loss, student, teacher, center, student_lse,
                                                  teacher_lse, ncrops, n_global, student_temp,
                                                  teacher_temp)
    return reference.dino_loss_backward(grad_loss, student, teacher, center, student_lse, teacher_lse,
                                        ncrops, n_global, student_temp, teacher_temp)


@_dino_loss_bwd.register_fake
def _dino_loss_bwd_fake(grad_loss, student, teacher, center, student_lse, teacher_lse, ncrops,
                        n_global, student_temp, teacher_temp, backend):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    student, teacher, center, ncrops, n_global, student_temp, teacher_temp, backend = inputs
    _, student_lse, teacher_lse = output
    ctx.save_for_backward(student, teacher, center, student_lse, teacher_lse)
    ctx.options = (ncrops, n_global, student_temp, teacher_temp, backend)
    ctx.mark_non_differentiable(student_lse, teacher_lse)


def _backward(ctx, grad_loss, _grad_student_lse, _grad_teacher_lse):
    student, teacher, center, student_lse, teacher_lse = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        grad_student = torch.ops.ssl_fast.dino_loss_bwd(grad_loss, student, teacher, center,
                                                        student_lse, teacher_lse, *ctx.options)
    # the teacher and the center are targets, not inputs of the graph: no gradient reaches them
    return grad_student, None, None, None, None, None, None, None


_dino_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


def _unit_stride_rows(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any row stride but need consecutive elements along K."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def dino_loss(student_output: torch.Tensor, teacher_output: torch.Tensor, center: torch.Tensor, *,
              ncrops: int, n_global: int = 2, student_temp: float = 0.1, teacher_temp: float = 0.04,
              backend: Optional[str] = None) -> torch.Tensor:
    """DINO's multi-crop cross-entropy between centred, sharpened teacher and student distributions.

    With ``B = student_output.shape[0] / ncrops``, student crop ``v`` the rows ``v*B:(v+1)*B``,
    teacher view ``i`` the rows ``i*B:(i+1)*B``::

        t_i = softmax((teacher_i - center) / teacher_temp)
        L = 1 / n_terms * sum_i sum_{v != i} mean_b( -sum_k t_i[b, k] log_softmax(student_v / student_temp)[b, k] )
        n_terms = n_global * ncrops - n_global

    The gradient flows to ``student_output`` only. The fused backends never build a
    ``[rows, K]`` softmax: the forward keeps online max / exp-sum statistics and dot products
    with the max-shifted logits (each loss term is ``log S_v - <t_i, x_v - m_v>``, a sum of two
    non-negative numbers, so nothing cancels at any logit scale); the backward recomputes each
    row's max and exp-sum and takes ``softmax`` as ``exp(z - m) / S`` (tied maxima at huge
    logits keep their shares). Every backend stays within float32 (float64) rounding of the
    float64 reference wherever the reference is finite, from logits of 1e-3 to 1e9.

    Args:
        student_output: ``[ncrops * B, K]`` logits, float32/float16/bfloat16 (float64 on the
            cpp and reference backends, computed in float64; ``auto`` never sends float64 to
            Triton); any row stride.
        teacher_output: ``[n_global * B, K]`` logits of the global views, any float dtype.
        center: ``[1, K]`` float32 center (see :func:`update_center_`).
        ncrops: number of crops in ``student_output`` (>= 2).
        n_global: number of global views, the teacher's (1 or 2, at most ``ncrops``).
        student_temp: ``tau_s > 0``.
        teacher_temp: ``tau_t > 0``.
        backend: ``"triton"``, ``"cpp"``, ``"reference"`` or ``"auto"``; default: the global choice.

    Returns:
        0-d loss in float32 (float64 for float64 inputs): like the official code under autocast,
        whose softmaxes run in float32, a half-precision input still gives a float32 loss.
        The student's gradient has the student's dtype.

    Raises:
        TypeError: a non-tensor, a wrong dtype, a non-integer ``ncrops``/``n_global``.
        ValueError: shapes that do not fit together, mixed devices, options out of range.
        ssl_fast.BackendUnavailableError: a forced backend that cannot serve the input.
    """
    check_tensor("student_output", student_output, ndim=2, dtypes=_INPUT_DTYPES)
    check_tensor("teacher_output", teacher_output, ndim=2, dtypes=_INPUT_DTYPES)
    check_tensor("center", center, ndim=2, dtypes=(torch.float32,))
    ncrops = check_int("ncrops", ncrops, low=2)
    n_global = check_int("n_global", n_global, low=1)
    if n_global > min(2, ncrops):
        raise ValueError(f"n_global must be 1 or 2 and at most ncrops ({ncrops}), got {n_global}")
    student_temp = check_real("student_temp", student_temp, low=0.0, low_open=True)
    teacher_temp = check_real("teacher_temp", teacher_temp, low=0.0, low_open=True)
    device = check_same_device(student_output=student_output, teacher_output=teacher_output, center=center)
    rows, k = student_output.shape
    if rows == 0 or rows % ncrops:
        raise ValueError(f"student_output has {rows} rows, which is not a positive multiple of "
                         f"ncrops={ncrops}")
    b = rows // ncrops
    if k == 0:
        raise ValueError("student_output must have at least one column (K >= 1)")
    if teacher_output.shape[0] != n_global * b:
        raise ValueError(f"teacher_output has {teacher_output.shape[0]} rows but needs n_global * B = "
                         f"{n_global} * {b} = {n_global * b} (B = student_output rows / ncrops)")
    if teacher_output.shape[1] != k:
        raise ValueError(f"teacher_output has K={teacher_output.shape[1]} columns but student_output "
                         f"has K={k}")
    if tuple(center.shape) != (1, k):
        raise ValueError(f"center must have shape (1, {k}), got {tuple(center.shape)}")
    name = _backend.resolve("dino_loss", device,
                            lambda bk: reasons(bk, student_output, teacher_output, center), backend)
    student = _unit_stride_rows(student_output)
    teacher = _unit_stride_rows(teacher_output.detach())
    center = center.detach()
    if not center.is_contiguous():
        center = center.contiguous()
    elif torch.is_grad_enabled() and student.requires_grad:
        # The backward reads the center; DINO updates it in place right after the loss, so the
        # graph keeps its own copy ([1, K], small next to the student).
        center = center.clone()
    loss, _, _ = torch.ops.ssl_fast.dino_loss_fwd(student, teacher, center, ncrops, n_global,
                                                  student_temp, teacher_temp, name)
    return loss


def update_center_(center: torch.Tensor, teacher_output: torch.Tensor, momentum: float) -> None:
    """In place: ``center <- momentum * center + (1 - momentum) * mean of teacher_output's rows``.

    The mean runs over the rows of every process: when ``torch.distributed`` is initialised
    (and only then) the batch sum is all-reduced and divided by ``rows * world_size``, as in the
    official DINO code. Sums are accumulated in float32. This is a memory-bound column sum of the
    teacher batch, done with ``torch.sum`` (not fused into the loss kernels); no autograd.

    Args:
        center: ``[1, K]`` float32, updated in place.
        teacher_output: ``[rows, K]`` teacher logits (float32/float16/bfloat16/float64), rows >= 1.
        momentum: in [0, 1]; 1 keeps the center, 0 replaces it by the batch mean.

    Raises:
        TypeError: a non-tensor or a wrong dtype.
        ValueError: shapes that do not fit, mixed devices, ``momentum`` outside [0, 1].
    """
    check_tensor("center", center, ndim=2, dtypes=(torch.float32,))
    check_tensor("teacher_output", teacher_output, ndim=2, dtypes=_INPUT_DTYPES)
    momentum = check_real("momentum", momentum, low=0.0, high=1.0)
    check_same_device(center=center, teacher_output=teacher_output)
    k = teacher_output.shape[1]
    if tuple(center.shape) != (1, k):
        raise ValueError(f"center must have shape (1, {k}) to match teacher_output's K={k}, "
                         f"got {tuple(center.shape)}")
    if teacher_output.shape[0] == 0:
        raise ValueError("teacher_output must have at least one row")
    with torch.no_grad():
        batch_sum = teacher_output.detach().sum(dim=0, keepdim=True, dtype=torch.float32)
        count = teacher_output.shape[0]
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_sum)
            count *= dist.get_world_size()
        center.mul_(momentum).add_(batch_sum / count, alpha=1.0 - momentum)


def _sample(device: torch.device):
    g = torch.Generator().manual_seed(0)
    b, k, ncrops = 3, 37, 4
    student = (torch.randn(ncrops * b, k, generator=g) * 3).to(device).requires_grad_()
    teacher = (torch.randn(2 * b, k, generator=g) * 3).to(device)
    center = (torch.randn(1, k, generator=g) * 0.1).to(device)
    return (student, teacher, center), dict(ncrops=ncrops, n_global=2, student_temp=0.1, teacher_temp=0.04)


def _bad_inputs(device: torch.device):
    s = torch.randn(8, 5, device=device)
    t = torch.randn(4, 5, device=device)
    c = torch.zeros(1, 5, device=device)
    return [
        _registry.BadInput((s, t, c), dict(ncrops=3), ValueError, "student_output has 8 rows"),
        _registry.BadInput((s, t[:, :4], c), dict(ncrops=4), ValueError, "teacher_output has K=4"),
        _registry.BadInput((s, t, c.double()), dict(ncrops=4), TypeError, "center must have dtype"),
        _registry.BadInput((s, t, c), dict(ncrops=4, student_temp=0.0), ValueError, "student_temp must be >"),
        _registry.BadInput((s.long(), t, c), dict(ncrops=4), TypeError, "student_output must have dtype"),
    ]


def _opcheck(device: torch.device, backend: str):
    (student, teacher, center), kw = _sample(device)
    student = student.detach().requires_grad_()
    fwd = (student, teacher, center, kw["ncrops"], kw["n_global"], kw["student_temp"], kw["teacher_temp"],
           backend)
    _, s_lse, t_lse = torch.ops.ssl_fast.dino_loss_fwd(*[a.detach() if isinstance(a, torch.Tensor) else a
                                                         for a in fwd])
    bwd = (torch.tensor(1.5, device=device), student.detach(), teacher, center, s_lse, t_lse,
           *fwd[3:])
    return [(torch.ops.ssl_fast.dino_loss_fwd.default, fwd), (torch.ops.ssl_fast.dino_loss_bwd.default, bwd)]


_registry.register(_registry.OpSpec(
    name="dino_loss", fn=dino_loss, reasons=reasons, sample=_sample, bad_inputs=_bad_inputs,
    opcheck=_opcheck, cpp_kernels=("dino_loss_fwd", "dino_loss_bwd"), tol=1e-5))
