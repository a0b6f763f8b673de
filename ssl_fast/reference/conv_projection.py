"""Reference CvT convolutional q/k/v projection (depthwise 3x3 conv + BatchNorm2d + flatten).

Two levels live here:

* :func:`conv_qkv_projection` is the semantic definition, written with ``F.conv2d`` and
  ``F.batch_norm`` exactly as CvT's ``dw_bn`` projection runs them (autograd by PyTorch,
  running statistics updated in place by ``F.batch_norm``). Tests take it, in float64, as truth.
* :func:`forward` and :func:`backward` are the ``reference`` backend of
  ``ssl_fast.ops.conv_qkv_projection``: the same contract as the Triton and C++ kernels (token
  map in ``[B, H, W, C]`` form, packed parameters, explicit backward formulas), in plain PyTorch.

Math, for projection ``p`` in (q, k, v) with stride ``s_p`` and output grid
``Ho = (H - 1) // s_p + 1``, ``Wo = (W - 1) // s_p + 1``::

    y_p[b, o, c] = sum_{i,j in 0..2} w_p[c, 3i + j] * x[b, c, s_p*oh + i - 1, s_p*ow + j - 1]   (zero padding)
    train: mean_p[c] = mean_{b,o} y_p,  var_p[c] = mean_{b,o} (y_p - mean_p)^2   (biased)
    eval:  mean_p = running_mean_p,     var_p = running_var_p
    out_p = gamma_p * (y_p - mean_p) / sqrt(var_p + eps_p) + beta_p

Backward, with ``M = B*Ho*Wo``, ``xhat = (y - mean) * invstd`` and ``g = d out``::

    dbeta = sum g,   dgamma = sum g * xhat
    dy = gamma * invstd * (g - dbeta / M - xhat * dgamma / M)   (train; eval: gamma * invstd * g)
    dx = sum_p conv_transpose(dy_p, w_p, stride s_p),   dw_p[c, t] = sum_{b,o} dy_p * x(tap t)
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def out_size(n: int, stride: int) -> int:
    """Output length of a 3-tap convolution with padding 1 and ``stride`` over ``n`` positions."""
    return (n - 1) // stride + 1


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient.

    Works around a PyTorch CPU bug (seen in torch 2.13): ``F.batch_norm``'s backward returns a
    wrong input gradient when the batch is 1 and the incoming gradient is not contiguous (as it
    is after the flatten/transpose to tokens); ``gradcheck`` shows the Jacobian mismatch.
    """

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def conv_qkv_projection(x: torch.Tensor, weights: Sequence[torch.Tensor], norms: Sequence[dict], *,
                        stride_q: int = 1, stride_kv: int = 2,
                        training: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CvT's ``dw_bn`` projection for q, k and v, as eager PyTorch runs it.

    Args:
        x: token map ``[B, C, H, W]``.
        weights: three depthwise conv weights ``[C, 1, 3, 3]`` (q, k, v).
        norms: three dicts with keys ``weight``, ``bias`` (``[C]`` or None), ``running_mean``,
            ``running_var`` (``[C]`` or None; updated in place in train mode), ``num_batches_tracked``
            (0-d long or None; incremented in train mode), ``momentum`` (float or None for the
            cumulative average) and ``eps``, with ``nn.BatchNorm2d``'s meaning.
        stride_q: stride of the q convolution.
        stride_kv: stride of the k and v convolutions.
        training: batch statistics (and running-statistics update) as in ``module.train()``.

    Returns:
        q ``[B, Hq*Wq, C]``, k and v ``[B, Hk*Wk, C]``.
    """
    outs = []
    C = x.shape[1]
    for w, n, s in zip(weights, norms, (stride_q, stride_kv, stride_kv)):
        y = F.conv2d(x, w, None, stride=s, padding=1, groups=C)
        rm, rv, nbt, momentum = n["running_mean"], n["running_var"], n.get("num_batches_tracked"), n["momentum"]
        factor = 0.0 if momentum is None else momentum
        if training and rm is not None and nbt is not None:
            nbt.add_(1)
            if momentum is None:
                factor = 1.0 / float(nbt)
        use_batch = training or (rm is None and rv is None)
        y = F.batch_norm(y, rm, rv, n["weight"], n["bias"], use_batch, factor, n["eps"])
        outs.append(_ContiguousGrad.apply(y).flatten(2).transpose(1, 2))
    return tuple(outs)


# ---------------------------------------------------------------------------------------------
# The reference backend: same contract as kernels/conv_projection.py and the C++ kernels.
# ---------------------------------------------------------------------------------------------

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _maps(x_nhwc: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    return x_nhwc.permute(0, 3, 1, 2).to(acc)


def _conv(xm: torch.Tensor, w: torch.Tensor, stride: int) -> torch.Tensor:
    C = xm.shape[1]
    return F.conv2d(xm, w.reshape(C, 1, 3, 3).to(xm.dtype), None, stride=stride, padding=1, groups=C)


def forward(x: torch.Tensor, weight: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
            running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], eps: List[float],
            stride_q: int, stride_kv: int, use_batch_stats: bool):
    """Backend forward.

    Args:
        x: token map ``[B, H, W, C]`` (any strides).
        weight: ``[3, C, 9]`` depthwise taps of q, k, v (row-major 3x3), accumulation dtype.
        gamma, beta: ``[3, C]`` BatchNorm affine parameters.
        running_mean, running_var: ``[3, C]``, read when ``use_batch_stats`` is False.
        eps: three floats.
        stride_q, stride_kv: convolution strides.
        use_batch_stats: normalise with the batch statistics (train mode).

    Returns:
        ``(q, k, v, y_q, y_k, y_v, mean, invstd, var)``: outputs ``[B, Ho*Wo, C]`` in x's dtype;
        the pre-normalisation conv outputs (same shapes and dtype; empty ``[0]`` tensors unless
        ``use_batch_stats``); ``mean``/``invstd`` ``[3, C]`` used to normalise and ``var`` ``[3, C]``
        the unbiased batch variance (the running variance in eval mode), in the accumulation dtype.
    """
    acc = _acc_dtype(x.dtype)
    xm = _maps(x, acc)
    outs, ys, means, invstds, vars_ = [], [], [], [], []
    for p, s in enumerate((stride_q, stride_kv, stride_kv)):
        y = _conv(xm, weight[p], s)
        if use_batch_stats:
            var_b, mean = torch.var_mean(y, dim=(0, 2, 3), unbiased=False)
            m = y.numel() // y.shape[1]
            var_u = var_b * (m / max(m - 1, 1))
        else:
            mean, var_b = running_mean[p].to(acc), running_var[p].to(acc)
            var_u = var_b
        invstd = torch.rsqrt(var_b + eps[p])
        out = (y - mean[:, None, None]) * (invstd * gamma[p].to(acc))[:, None, None] + beta[p].to(acc)[:, None, None]
        outs.append(out.flatten(2).transpose(1, 2).contiguous().to(x.dtype))
        ys.append(y.flatten(2).transpose(1, 2).contiguous().to(x.dtype) if use_batch_stats
                  else x.new_empty(0))
        means.append(mean.clone())
        invstds.append(invstd)
        vars_.append(var_u.clone())
    return (*outs, *ys, torch.stack(means), torch.stack(invstds), torch.stack(vars_))


def backward(grad_q: torch.Tensor, grad_k: torch.Tensor, grad_v: torch.Tensor, x: torch.Tensor,
             weight: torch.Tensor, gamma: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
             y_q: torch.Tensor, y_k: torch.Tensor, y_v: torch.Tensor, stride_q: int, stride_kv: int,
             use_batch_stats: bool):
    """Backend backward (formulas in the module docstring).

    Args:
        grad_q, grad_k, grad_v: gradients of the outputs ``[B, Ho*Wo, C]``.
        x: token map ``[B, H, W, C]``.
        weight: ``[3, C, 9]``; gamma, mean, invstd: ``[3, C]`` (as saved by :func:`forward`).
        y_q, y_k, y_v: saved pre-normalisation outputs (train mode; recomputed from ``x`` when empty).
        stride_q, stride_kv, use_batch_stats: as in :func:`forward`.

    Returns:
        ``(grad_x [B, H, W, C] in x's dtype, grad_weight [3, C, 9], grad_gamma [3, C], grad_beta [3, C])``,
        the last three in the accumulation dtype.
    """
    acc = _acc_dtype(x.dtype)
    B, H, W, C = x.shape
    xm = _maps(x, acc)
    gx = torch.zeros_like(xm)
    gw, gg, gb = [], [], []
    for p, (g, y, s) in enumerate(zip((grad_q, grad_k, grad_v), (y_q, y_k, y_v), (stride_q, stride_kv, stride_kv))):
        Ho, Wo = out_size(H, s), out_size(W, s)
        g = g.to(acc).transpose(1, 2).reshape(B, C, Ho, Wo)
        if y.numel() == 0:
            y = _conv(xm, weight[p], s)
        else:
            y = y.to(acc).transpose(1, 2).reshape(B, C, Ho, Wo)
        mu, istd, ga = (t[p].to(acc)[:, None, None] for t in (mean, invstd, gamma))
        xhat = (y - mu) * istd
        dbeta = g.sum(dim=(0, 2, 3))
        dgamma = (g * xhat).sum(dim=(0, 2, 3))
        if use_batch_stats:
            m = B * Ho * Wo
            dy = ga * istd * (g - dbeta[:, None, None] / m - xhat * dgamma[:, None, None] / m)
        else:
            dy = ga * istd * g
        w4 = weight[p].to(acc).reshape(C, 1, 3, 3)
        gx += torch.nn.grad.conv2d_input(xm.shape, w4, dy, stride=s, padding=1, groups=C)
        gw.append(torch.nn.grad.conv2d_weight(xm, w4.shape, dy, stride=s, padding=1, groups=C).reshape(C, 9))
        gg.append(dgamma)
        gb.append(dbeta)
    return (gx.permute(0, 2, 3, 1).contiguous().to(x.dtype), torch.stack(gw), torch.stack(gg),
            torch.stack(gb))
