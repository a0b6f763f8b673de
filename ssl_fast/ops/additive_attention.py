"""Additive (Bahdanau) attention, the attention step of Show, Attend and Tell, forward and backward.

Math and shapes are in ``ssl_fast/reference/additive_attention.py`` and DESIGN.md ("Additive
attention"). Two custom ops carry the work: ``ssl_fast::additive_attention_fwd`` returns the
context and alpha (in the accumulation dtype, which the backward reads);
``ssl_fast::additive_attention_bwd`` returns the gradients of ``a``, ``Ua``, ``Wh`` and ``w``,
recomputing ``tanh(Ua + Wh)``: nothing of size ``[B, L, A]`` is kept between the forward and
the backward. The public :func:`additive_attention` checks its arguments, picks a backend and
calls the forward op; autograd reaches the backward op through ``register_autograd``.
"""
from typing import List, Optional, Tuple

import torch

from ssl_fast import _backend
from ssl_fast._checks import check_same_device, check_tensor
from ssl_fast._ext import cpp_reasons
from ssl_fast._triton import triton_reasons
from ssl_fast.ops import _registry
from ssl_fast.reference.additive_attention import acc_dtype, additive_attention_backward, additive_attention_forward

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _reasons(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> List[str]:
    """Why ``backend`` cannot serve tensors on ``device`` (of ``dtype``, when given)."""
    if backend == "triton":
        why = list(triton_reasons(device))
        if dtype is not None and dtype not in _TRITON_DTYPES:
            why.append(f"the Triton kernels take float32/float16/bfloat16 inputs, got {dtype}")
        return why
    if backend == "cpp":
        return cpp_reasons("additive_attention_fwd", device) or cpp_reasons("additive_attention_bwd", device)
    return []


def reasons(backend: str, a: torch.Tensor, Ua: torch.Tensor, Wh: torch.Tensor, w: torch.Tensor,
            mask: Optional[torch.Tensor] = None) -> List[str]:
    """Why ``backend`` cannot serve :func:`additive_attention` for these (valid) inputs."""
    return _reasons(backend, a.device, a.dtype)


@torch.library.custom_op("ssl_fast::additive_attention_fwd", mutates_args=())
def _fwd(a: torch.Tensor, Ua: torch.Tensor, Wh: torch.Tensor, w: torch.Tensor, mask: Optional[torch.Tensor],
         backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from ssl_fast.kernels import additive_attention as kernel

        return kernel.forward(a, Ua, Wh, w, mask)
    if backend == "cpp":
        return tuple(torch.ops.ssl_fast_C.additive_attention_fwd(a, Ua, Wh, w, mask))
    return additive_attention_forward(a, Ua, Wh, w, mask)


@_fwd.register_fake
def _fwd_fake(a, Ua, Wh, w, mask, backend):
    B, L, D = a.shape
    return a.new_empty((B, D)), a.new_empty((B, L), dtype=acc_dtype(a.dtype))


@torch.library.custom_op("ssl_fast::additive_attention_bwd", mutates_args=())
def _bwd(grad_context: torch.Tensor, grad_alpha: torch.Tensor, a: torch.Tensor, Ua: torch.Tensor,
         Wh: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, need_grad_a: bool,
         backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of a, Ua, Wh, w; with ``need_grad_a=False`` the first is an empty ``[0]`` tensor
    (a frozen encoder's features: ``[B, L, D]`` neither written nor allocated)."""
    if backend == "triton":
        from ssl_fast.kernels import additive_attention as kernel

        return kernel.backward(grad_context, grad_alpha, a, Ua, Wh, w, alpha, need_grad_a)
    if backend == "cpp":
        return tuple(torch.ops.ssl_fast_C.additive_attention_bwd(grad_context, grad_alpha, a, Ua, Wh, w, alpha,
                                                                 need_grad_a))
    return additive_attention_backward(grad_context, grad_alpha, a, Ua, Wh, w, alpha, need_grad_a)


@_bwd.register_fake
def _bwd_fake(grad_context, grad_alpha, a, Ua, Wh, w, alpha, need_grad_a, backend):
    return (torch.empty_like(a, memory_format=torch.contiguous_format) if need_grad_a else a.new_empty((0,)),
            torch.empty_like(Ua, memory_format=torch.contiguous_format),
            torch.empty_like(Wh, memory_format=torch.contiguous_format),
            torch.empty_like(w, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    a, Ua, Wh, w, mask, backend = inputs
    _, alpha = output
    # the inputs and alpha [B, L]; the tanh [B, L, A] is recomputed in the backward
    ctx.save_for_backward(a, Ua, Wh, w, alpha)
    ctx.backend = backend


def _backward(ctx, grad_context, grad_alpha):
    a, Ua, Wh, w, alpha = ctx.saved_tensors
    if not any(ctx.needs_input_grad[:4]):
        return None, None, None, None, None, None
    if grad_context is None:
        grad_context = a.new_zeros((a.shape[0], a.shape[2]))
    if grad_alpha is None:
        grad_alpha = torch.zeros_like(alpha)
    grads = torch.ops.ssl_fast.additive_attention_bwd(grad_context.contiguous(), grad_alpha.contiguous(),
                                                      a, Ua, Wh, w, alpha, ctx.needs_input_grad[0], ctx.backend)
    grads = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4])]
    return (*grads, None, None)


_fwd.register_autograd(_backward, setup_context=_setup_context)


def additive_attention(a: torch.Tensor, Ua: torch.Tensor, Wh: torch.Tensor, w: torch.Tensor,
                       mask: Optional[torch.Tensor] = None, *,
                       backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Additive (Bahdanau) attention of Show, Attend and Tell: scores, softmax and context, fused.

    ::

        e[b, l]     = sum_k w[k] * tanh(Ua[b, l, k] + Wh[b, k])
        alpha[b]    = softmax(e[b]) over the positions kept by ``mask`` (0 at masked positions)
        context[b]  = sum_l alpha[b, l] * a[b, l]

    A score bias (``full_att.bias`` in the common tutorial) shifts every score of a row by the
    same amount, which the softmax ignores, so there is none. The fused backends read ``Ua`` once
    per call and never store ``tanh(Ua + Wh)``: the backward recomputes it, so the graph keeps
    only the inputs and ``alpha`` (``[B, L]``) per decoding step, where eager code keeps a
    ``[B, L, A]`` tanh. Arithmetic is in float32 (float64 for float64 inputs).

    A row whose positions are **all** masked gets ``alpha = 0`` and ``context = 0``, and zero
    gradients (no error: checking would read the mask on the host, which synchronises a GPU and
    breaks a compiled graph). NaN and inf in the inputs propagate.

    Args:
        a: ``[B, L, D]`` encoder features (the values averaged into the context).
        Ua: ``[B, L, A]`` projected encoder features ``a W_a + b``, same dtype as ``a``.
        Wh: ``[B, A]`` projected decoder state ``W_h h + b``, same dtype.
        w: ``[A]`` score vector (``full_att.weight`` squeezed), same dtype.
        mask: optional boolean ``[B, L]``, True = keep the position.
        backend: ``"triton"``, ``"cpp"``, ``"reference"`` or ``"auto"``; default: the global choice.
            Inputs are float32/float16/bfloat16, or float64 on the cpp and reference backends.

    Returns:
        ``(context [B, D], alpha [B, L])`` in the inputs' dtype. Gradients reach ``a``, ``Ua``,
        ``Wh`` and ``w``.

    Raises:
        TypeError: a non-tensor, a dtype not supported, inputs of different dtypes, a mask that
            is not boolean.
        ValueError: shapes that do not fit together, an empty dimension, mixed devices.
        ssl_fast.BackendUnavailableError: a forced backend that cannot serve the input.

    Example:
        >>> a = torch.randn(2, 49, 64)
        >>> Ua, Wh, w = torch.randn(2, 49, 32), torch.randn(2, 32), torch.randn(32)
        >>> context, alpha = additive_attention(a, Ua, Wh, w)
        >>> context.shape, alpha.shape
        (torch.Size([2, 64]), torch.Size([2, 49]))
    """
    check_tensor("a", a, ndim=3, dtypes=_INPUT_DTYPES)
    check_tensor("Ua", Ua, ndim=3, dtypes=_INPUT_DTYPES)
    check_tensor("Wh", Wh, ndim=2, dtypes=_INPUT_DTYPES)
    check_tensor("w", w, ndim=1, dtypes=_INPUT_DTYPES)
    for name, t in (("Ua", Ua), ("Wh", Wh), ("w", w)):
        if t.dtype != a.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but a has dtype {a.dtype}; a, Ua, Wh and w "
                            "must have one dtype (cast them, as autocast casts a Linear's weight)")
    if mask is not None:
        check_tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
    device = check_same_device(a=a, Ua=Ua, Wh=Wh, w=w, mask=mask)
    B, L, D = a.shape
    A = Ua.shape[2]
    if min(B, L, D) == 0:
        raise ValueError(f"a must have shape [B, L, D] with B, L, D >= 1, got {tuple(a.shape)}")
    if tuple(Ua.shape[:2]) != (B, L) or A == 0:
        raise ValueError(f"Ua must have shape [B, L, A] = [{B}, {L}, A] with A >= 1 (B and L from a), "
                         f"got {tuple(Ua.shape)}")
    if tuple(Wh.shape) != (B, A):
        raise ValueError(f"Wh must have shape [B, A] = [{B}, {A}] (B from a, A from Ua), got {tuple(Wh.shape)}")
    if tuple(w.shape) != (A,):
        raise ValueError(f"w must have shape [A] = [{A}] (A from Ua), got {tuple(w.shape)}")
    if mask is not None and tuple(mask.shape) != (B, L):
        raise ValueError(f"mask must have shape [B, L] = [{B}, {L}] (from a), got {tuple(mask.shape)}")
    name = _backend.resolve("additive_attention", device, lambda bk: reasons(bk, a, Ua, Wh, w, mask), backend)
    a, Ua, Wh, w = (t.contiguous() for t in (a, Ua, Wh, w))
    if mask is not None:
        mask = mask.contiguous()
    context, alpha = torch.ops.ssl_fast.additive_attention_fwd(a, Ua, Wh, w, mask, name)
    return context, alpha.to(a.dtype)


def _sample(device: torch.device):
    g = torch.Generator().manual_seed(0)
    B, L, D, A = 2, 7, 9, 6
    a = torch.randn(B, L, D, generator=g).to(device).requires_grad_()
    Ua = torch.randn(B, L, A, generator=g).to(device).requires_grad_()
    Wh = torch.randn(B, A, generator=g).to(device).requires_grad_()
    w = torch.randn(A, generator=g).to(device).requires_grad_()
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 4:] = False
    return (a, Ua, Wh, w), {"mask": mask.to(device)}


def _bad_inputs(device: torch.device):
    a = torch.randn(2, 7, 5, device=device)
    Ua, Wh, w = torch.randn(2, 7, 6, device=device), torch.randn(2, 6, device=device), torch.randn(6, device=device)
    return [
        _registry.BadInput((a[0], Ua, Wh, w), {}, ValueError, "a must have 3 dimensions"),
        _registry.BadInput((a, Ua[:, :3], Wh, w), {}, ValueError, "Ua must have shape"),
        _registry.BadInput((a, Ua, Wh[:1], w), {}, ValueError, "Wh must have shape"),
        _registry.BadInput((a, Ua, Wh, w[:5]), {}, ValueError, "w must have shape"),
        _registry.BadInput((a, Ua, Wh, w), {"mask": torch.ones(2, 7, device=device)}, TypeError, "mask must have dtype"),
        _registry.BadInput((a, Ua.double(), Wh, w), {}, TypeError, "Ua has dtype"),
    ]


def _opcheck(device: torch.device, backend: str):
    (a, Ua, Wh, w), kw = _sample(device)
    fwd = (a, Ua, Wh, w, kw["mask"], backend)
    xs = [t.detach() for t in (a, Ua, Wh, w)]
    context, alpha = torch.ops.ssl_fast.additive_attention_fwd(*xs, kw["mask"], backend)
    g = torch.Generator().manual_seed(1)
    gc = torch.randn(context.shape, generator=g).to(device)
    ga = torch.randn(alpha.shape, generator=g).to(device)
    return [(torch.ops.ssl_fast.additive_attention_fwd.default, fwd),
            (torch.ops.ssl_fast.additive_attention_bwd.default, (gc, ga, *xs, alpha, True, backend)),
            (torch.ops.ssl_fast.additive_attention_bwd.default, (gc, ga, *xs, alpha, False, backend))]


_registry.register(_registry.OpSpec(
    name="additive_attention", fn=additive_attention, reasons=reasons, sample=_sample, bad_inputs=_bad_inputs,
    opcheck=_opcheck, cpp_kernels=("additive_attention_fwd", "additive_attention_bwd"), tol=1e-5))
