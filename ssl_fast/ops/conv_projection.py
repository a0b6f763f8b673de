"""CvT's convolutional q/k/v projection: depthwise 3x3 conv + BatchNorm2d per projection, fused.

``conv_qkv_projection`` reads the token map once for all three projections (Triton; the C++
CPU kernel does the same per pixel) and returns q, k, v as tokens. BatchNorm follows
``nn.BatchNorm2d`` exactly: batch statistics in train mode with the running statistics updated in
place (momentum, or the cumulative average when ``momentum is None``; unbiased variance;
``num_batches_tracked`` incremented), running statistics in eval mode.
"""
import numbers
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ssl_fast import _backend
from ssl_fast._checks import check_int, check_tensor
from ssl_fast._ext import cpp_reasons
from ssl_fast._triton import triton_reasons
from ssl_fast.ops import _registry
from ssl_fast.reference import conv_projection as reference

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class BatchNormState(NamedTuple):
    """Parameters, buffers and options of one ``nn.BatchNorm2d`` (``weight``/``bias`` None when
    ``affine=False``; ``running_mean``/``running_var`` None when ``track_running_stats=False``)."""
    weight: Optional[Tensor]
    bias: Optional[Tensor]
    running_mean: Optional[Tensor]
    running_var: Optional[Tensor]
    num_batches_tracked: Optional[Tensor] = None
    momentum: Optional[float] = 0.1
    eps: float = 1e-5

    @classmethod
    def from_module(cls, bn: torch.nn.modules.batchnorm._BatchNorm) -> "BatchNormState":
        return cls(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                   bn.momentum, bn.eps)


def _reasons(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> List[str]:
    if backend == "triton":
        return triton_reasons(device)
    if backend == "cpp":
        return cpp_reasons("conv_qkv_projection_fwd", device) + cpp_reasons("conv_qkv_projection_bwd", device)
    return []


def reasons(backend: str, x: Tensor, weights: Sequence[Tensor] = (), norms: Sequence = (),
            **options) -> List[str]:
    """Why ``backend`` cannot serve :func:`conv_qkv_projection` for these arguments (empty when
    it can); ``options`` are its keywords, which no backend restricts."""
    return _reasons(backend, x.device, x.dtype)


def _out_len(n: int, s: int) -> int:
    return (n - 1) // s + 1


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_FwdOut = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("ssl_fast::conv_qkv_projection_fwd", mutates_args=())
def _fwd_op(x: Tensor, weight: Tensor, gamma: Tensor, beta: Tensor, running_mean: Optional[Tensor],
            running_var: Optional[Tensor], eps: List[float], stride_q: int, stride_kv: int,
            use_batch_stats: bool, backend: str) -> _FwdOut:
    if backend == "triton":
        from ssl_fast.kernels import conv_projection as kernel

        return tuple(kernel.forward(x, weight, gamma, beta, running_mean, running_var, eps, stride_q,
                                    stride_kv, use_batch_stats))
    if backend == "cpp":
        return tuple(torch.ops.ssl_fast_C.conv_qkv_projection_fwd(x, weight, gamma, beta, running_mean,
                                                                  running_var, eps, stride_q, stride_kv,
                                                                  use_batch_stats))
    return tuple(reference.forward(x, weight, gamma, beta, running_mean, running_var, eps, stride_q,
                                   stride_kv, use_batch_stats))


@_fwd_op.register_fake
def _fwd_fake(x, weight, gamma, beta, running_mean, running_var, eps, stride_q, stride_kv, use_batch_stats,
              backend):
    B, H, W, C = x.shape
    outs, ys = [], []
    for s in (stride_q, stride_kv, stride_kv):
        n = _out_len(H, s) * _out_len(W, s)
        outs.append(x.new_empty((B, n, C)))
        ys.append(x.new_empty((B, n, C)) if use_batch_stats else x.new_empty((0,)))
    acc = _acc(x.dtype)
    stats = [x.new_empty((3, C), dtype=acc) for _ in range(3)]
    return (*outs, *ys, *stats)


@torch.library.custom_op("ssl_fast::conv_qkv_projection_bwd", mutates_args=())
def _bwd_op(grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, x: Tensor, weight: Tensor, gamma: Tensor,
            mean: Tensor, invstd: Tensor, y_q: Tensor, y_k: Tensor, y_v: Tensor, stride_q: int,
            stride_kv: int, use_batch_stats: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    args = (grad_q, grad_k, grad_v, x, weight, gamma, mean, invstd, y_q, y_k, y_v, stride_q, stride_kv,
            use_batch_stats)
    if backend == "triton":
        from ssl_fast.kernels import conv_projection as kernel

        return tuple(kernel.backward(*args))
    if backend == "cpp":
        return tuple(torch.ops.ssl_fast_C.conv_qkv_projection_bwd(*args))
    return tuple(reference.backward(*args))


@_bwd_op.register_fake
def _bwd_fake(grad_q, grad_k, grad_v, x, weight, gamma, mean, invstd, y_q, y_k, y_v, stride_q, stride_kv,
              use_batch_stats, backend):
    C = x.shape[3]
    acc = _acc(x.dtype)
    return (x.new_empty(x.shape), x.new_empty((3, C, 9), dtype=acc), x.new_empty((3, C), dtype=acc),
            x.new_empty((3, C), dtype=acc))


def _setup_context(ctx, inputs, output):
    x, weight, gamma, beta, running_mean, running_var, eps, stride_q, stride_kv, use_batch_stats, backend = inputs
    ctx.save_for_backward(x, weight, gamma, output[6], output[7], output[3], output[4], output[5])
    ctx.cfg = (stride_q, stride_kv, use_batch_stats, backend)
    # y_q/k/v and the statistics are internal outputs: without this, autograd hands _backward a
    # zero-filled gradient for each of them (as large as q, k, v) on every call
    ctx.mark_non_differentiable(*output[3:])
    ctx.set_materialize_grads(False)


def _backward(ctx, gq, gk, gv, *unused):
    x, weight, gamma, mean, invstd, y_q, y_k, y_v = ctx.saved_tensors
    stride_q, stride_kv, use_batch_stats, backend = ctx.cfg
    B, H, W, C = x.shape
    grads = []
    for g, s in zip((gq, gk, gv), (stride_q, stride_kv, stride_kv)):
        if g is None:
            g = x.new_zeros((B, _out_len(H, s) * _out_len(W, s), C))
        grads.append(g)
    gx, gw, gg, gb = torch.ops.ssl_fast.conv_qkv_projection_bwd(
        *grads, x, weight, gamma, mean, invstd, y_q, y_k, y_v, stride_q, stride_kv, use_batch_stats, backend)
    return gx, gw, gg, gb, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _as_state(i: int, n) -> BatchNormState:
    if isinstance(n, torch.nn.modules.batchnorm._BatchNorm):
        return BatchNormState.from_module(n)
    if isinstance(n, BatchNormState):
        return n
    if isinstance(n, dict):
        try:
            return BatchNormState(**n)
        except TypeError as exc:
            raise TypeError(f"norms[{i}] as a dict must have the fields of BatchNormState: {exc}") from None
    raise TypeError(f"norms[{i}] must be an nn.BatchNorm2d, a BatchNormState or a dict, got {type(n).__name__}")


def _check_norm(i: int, n: BatchNormState, C: int, device: torch.device) -> None:
    for field in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(n, field)
        if t is None:
            continue
        check_tensor(f"norms[{i}].{field}", t, ndim=1, dtypes=_DTYPES)
        if t.shape[0] != C:
            raise ValueError(f"norms[{i}].{field} has {t.shape[0]} channels but x has C={C}")
        if t.device != device:
            raise ValueError(f"norms[{i}].{field} is on {t.device} but x is on {device}")
    if (n.running_mean is None) != (n.running_var is None):
        raise ValueError(f"norms[{i}]: running_mean and running_var must both be tensors or both be None")
    if n.num_batches_tracked is not None:
        check_tensor(f"norms[{i}].num_batches_tracked", n.num_batches_tracked, ndim=0)
    if n.momentum is not None and (isinstance(n.momentum, bool) or not isinstance(n.momentum, numbers.Real)):
        raise TypeError(f"norms[{i}].momentum must be a float or None, got {type(n.momentum).__name__}")
    if isinstance(n.eps, bool) or not isinstance(n.eps, numbers.Real):
        raise TypeError(f"norms[{i}].eps must be a float, got {type(n.eps).__name__}")
    if not float(n.eps) >= 0:
        raise ValueError(f"norms[{i}].eps must be >= 0, got {n.eps}")


def _update_running(n: BatchNormState, mean: Tensor, var: Tensor) -> None:
    """``nn.BatchNorm2d``'s train-mode update of the running statistics, in place."""
    factor: Union[float, Tensor] = 0.0 if n.momentum is None else float(n.momentum)
    if n.num_batches_tracked is not None:
        n.num_batches_tracked.add_(1)
        if n.momentum is None:
            factor = 1.0 / n.num_batches_tracked.to(torch.float64)
    rm, rv = n.running_mean, n.running_var
    if isinstance(factor, Tensor):
        f = factor.to(mean.dtype)
        rm.copy_(rm * (1 - f).to(rm.dtype) + (mean * f).to(rm.dtype))
        rv.copy_(rv * (1 - f).to(rv.dtype) + (var * f).to(rv.dtype))
    else:
        rm.mul_(1.0 - factor).add_(mean.to(rm.dtype), alpha=factor)
        rv.mul_(1.0 - factor).add_(var.to(rv.dtype), alpha=factor)


def conv_qkv_projection(x: Tensor, weights: Sequence[Tensor], norms: Sequence, *,
                        size: Optional[Tuple[int, int]] = None, stride_q: int = 1, stride_kv: int = 2,
                        training: bool, backend: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """CvT's ``dw_bn`` convolutional projection of q, k and v from one read of the token map.

    For each projection ``p`` in (q, k, v) with stride ``s_p`` (``stride_q``, ``stride_kv``,
    ``stride_kv``), output grid ``Ho = (H - 1) // s_p + 1``, ``Wo = (W - 1) // s_p + 1``::

        y_p[b, c, oh, ow] = sum_{i,j} w_p[c, 0, i, j] * x[b, c, s_p*oh + i - 1, s_p*ow + j - 1]   (zero padding)
        out_p = gamma_p * (y_p - mean_p) / sqrt(var_p + eps_p) + beta_p,   flattened to [B, Ho*Wo, C]

    with ``mean_p, var_p`` the batch statistics over (B, Ho, Wo) (biased variance) in train mode
    and the running statistics in eval mode, exactly as ``nn.BatchNorm2d``. In train mode the
    running statistics are updated in place: ``r <- (1 - m) r + m * stat`` with the *unbiased*
    batch variance, ``m = momentum`` or ``1 / num_batches_tracked`` (after incrementing it) when
    ``momentum is None``. A norm without running statistics uses batch statistics in both modes.
    Computed in float32 (float64 for float64 inputs); outputs in x's dtype. Differentiable with
    respect to x, the three conv weights and the BatchNorm weights and biases.

    Args:
        x: token map ``[B, C, H, W]``, or tokens ``[B, H*W, C]`` (row-major pixels, no class token)
            with ``size=(H, W)``.
        weights: the three depthwise conv weights ``[C, 1, 3, 3]`` (q, k, v), no bias.
        norms: the three BatchNorms (q, k, v): ``nn.BatchNorm2d`` modules, :class:`BatchNormState`
            tuples or dicts with its fields.
        size: ``(H, W)`` when ``x`` holds tokens.
        stride_q: stride of the q convolution (>= 1).
        stride_kv: stride of the k and v convolutions (>= 1).
        training: batch statistics and running-statistics update, as ``module.train()``.
        backend: ``"triton"``, ``"cpp"`` or ``"reference"``; default: the global choice.

    Returns:
        ``(q, k, v)``: q ``[B, Hq*Wq, C]``, k and v ``[B, Hk*Wk, C]``, contiguous, in x's dtype.

    Raises:
        TypeError: a non-tensor, a wrong dtype, a norm of the wrong kind.
        ValueError: wrong shapes (weights not ``[C, 1, 3, 3]``, a token count that is not
            ``H*W``), a stride < 1, mixed devices, one value per channel in train mode.
    """
    check_tensor("x", x, dtypes=_DTYPES)
    if size is None:
        if x.dim() != 4:
            raise ValueError(f"x must be a token map [B, C, H, W] (or tokens [B, H*W, C] with size=(H, W)), "
                             f"got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        x_nhwc = x.permute(0, 2, 3, 1)
    else:
        if not isinstance(size, (tuple, list)) or len(size) != 2:
            raise TypeError(f"size must be a pair (H, W), got {size!r}")
        H = check_int("size[0]", size[0], low=1)
        W = check_int("size[1]", size[1], low=1)
        if x.dim() != 3:
            raise ValueError(f"x with size=(H, W) must be tokens [B, H*W, C], got shape {tuple(x.shape)}")
        B, N, C = x.shape
        if N != H * W:
            raise ValueError(f"x has {N} tokens but size={tuple(size)} needs H*W = {H * W}")
        x_nhwc = x.reshape(B, H, W, C)
    if B < 1 or C < 1 or H < 1 or W < 1:
        raise ValueError(f"x must have B, C, H, W >= 1, got B={B}, C={C}, H={H}, W={W}")
    stride_q = check_int("stride_q", stride_q, low=1)
    stride_kv = check_int("stride_kv", stride_kv, low=1)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    for name, seq in (("weights", weights), ("norms", norms)):
        if isinstance(seq, (Tensor, torch.nn.Module)) or not isinstance(seq, (list, tuple)) or len(seq) != 3:
            raise TypeError(f"{name} must be a list or tuple of three (q, k, v), got "
                            f"{type(seq).__name__}{'' if not isinstance(seq, (list, tuple)) else ' of length ' + str(len(seq))}")
    device = x.device
    for i, w in enumerate(weights):
        check_tensor(f"weights[{i}]", w, dtypes=_DTYPES)
        if tuple(w.shape) != (C, 1, 3, 3):
            raise ValueError(f"weights[{i}] must be a depthwise 3x3 weight [C, 1, 3, 3] = [{C}, 1, 3, 3] "
                             f"(C from x), got {tuple(w.shape)}")
        if w.device != device:
            raise ValueError(f"weights[{i}] is on {w.device} but x is on {device}")
    states = [_as_state(i, n) for i, n in enumerate(norms)]
    for i, n in enumerate(states):
        _check_norm(i, n, C, device)
    use_batch = training or states[0].running_mean is None
    if any((n.running_mean is None) != (states[0].running_mean is None) for n in states):
        raise ValueError("norms: either all three or none of them must track running statistics")
    if use_batch:
        for s, what in ((stride_q, "q"), (stride_kv, "k/v")):
            if B * _out_len(H, s) * _out_len(W, s) <= 1:
                raise ValueError(f"batch statistics need more than 1 value per channel, but the {what} "
                                 f"projection has B*Ho*Wo = 1 (x {tuple(x.shape)}, stride {s})")
    name = _backend.resolve("conv_qkv_projection", device, lambda b: reasons(b, x, weights, norms), backend)

    acc = _acc(x.dtype)
    weight = torch.stack([w.reshape(C, 9).to(acc) for w in weights])
    gamma = torch.stack([n.weight.to(acc) if n.weight is not None else x.new_ones(C, dtype=acc) for n in states])
    beta = torch.stack([n.bias.to(acc) if n.bias is not None else x.new_zeros(C, dtype=acc) for n in states])
    rm = rv = None
    if not use_batch:
        with torch.no_grad():
            rm = torch.stack([n.running_mean.to(acc) for n in states])
            rv = torch.stack([n.running_var.to(acc) for n in states])
    eps = [float(n.eps) for n in states]
    out = torch.ops.ssl_fast.conv_qkv_projection_fwd(x_nhwc, weight, gamma, beta, rm, rv, eps, stride_q,
                                                     stride_kv, use_batch, name)
    q, k, v, mean, var = out[0], out[1], out[2], out[6], out[8]
    if training and states[0].running_mean is not None:
        with torch.no_grad():
            for p, n in enumerate(states):
                _update_running(n, mean[p].detach(), var[p].detach())
    return q, k, v


def _sample(device: torch.device):
    g = torch.Generator().manual_seed(0)
    B, C, H, W = 2, 12, 5, 7
    x = torch.randn(B, C, H, W, generator=g).to(device).requires_grad_()
    weights = [(torch.randn(C, 1, 3, 3, generator=g) * 0.3).to(device).requires_grad_() for _ in range(3)]
    norms = []
    for _ in range(3):
        norms.append(BatchNormState(
            (1 + 0.1 * torch.randn(C, generator=g)).to(device).requires_grad_(),
            (0.1 * torch.randn(C, generator=g)).to(device).requires_grad_(),
            torch.zeros(C, device=device), torch.ones(C, device=device),
            torch.tensor(0, device=device), 0.1, 1e-5))
    return (x, weights, norms), dict(training=True)


def _bad_inputs(device: torch.device):
    (x, weights, norms), _ = _sample(device)
    x = x.detach()
    return [
        _registry.BadInput((x[0], weights, norms), dict(training=True), ValueError, "x must be a token map"),
        _registry.BadInput((x, weights[:2], norms), dict(training=True), TypeError, "weights must be a list"),
        _registry.BadInput((x, [w[:5] for w in weights], norms), dict(training=True), ValueError,
                           r"weights\[0\] must be a depthwise"),
        _registry.BadInput((x, weights, norms), dict(training=True, stride_q=0), ValueError, "stride_q must be >="),
        _registry.BadInput((x, weights, norms), dict(training=1), TypeError, "training must be a bool"),
    ]


def _opcheck(device: torch.device, backend: str):
    g = torch.Generator().manual_seed(1)
    B, C, H, W = 2, 8, 5, 6
    acc = torch.float32
    x = torch.randn(B, H, W, C, generator=g).to(device).requires_grad_()
    weight = (torch.randn(3, C, 9, generator=g) * 0.3).to(device).requires_grad_()
    gamma = (1 + 0.1 * torch.randn(3, C, generator=g)).to(device).requires_grad_()
    beta = (0.1 * torch.randn(3, C, generator=g)).to(device).requires_grad_()
    eps = [1e-5, 1e-5, 1e-5]
    fwd = (x, weight, gamma, beta, None, None, eps, 1, 2, True, backend)
    out = torch.ops.ssl_fast.conv_qkv_projection_fwd(x.detach(), weight.detach(), gamma.detach(), beta.detach(),
                                                     None, None, eps, 1, 2, True, backend)
    grads = [torch.randn(o.shape, generator=g, dtype=acc).to(device) for o in out[:3]]
    bwd = (*grads, x.detach(), weight.detach(), gamma.detach(), out[6], out[7], out[3], out[4], out[5], 1, 2,
           True, backend)
    return [(torch.ops.ssl_fast.conv_qkv_projection_fwd.default, fwd),
            (torch.ops.ssl_fast.conv_qkv_projection_bwd.default, bwd)]


_registry.register(_registry.OpSpec(
    name="conv_qkv_projection", fn=conv_qkv_projection, reasons=reasons, sample=_sample,
    bad_inputs=_bad_inputs, opcheck=_opcheck,
    cpp_kernels=("conv_qkv_projection_fwd", "conv_qkv_projection_bwd"), tol=1e-5))
