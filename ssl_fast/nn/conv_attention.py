"""CvT's attention with convolutional projection, on the fused conv-projection and attention ops.

Constructor, attribute names (so state_dicts load unchanged) and ``forward(x, h, w)`` follow the
official CvT ``Attention``: ``conv_proj_q/k/v`` (``nn.Sequential`` of ``conv``, a depthwise
``Conv2d`` without bias, ``bn``, a ``BatchNorm2d``, and a parameter-free map-to-tokens step),
``proj_q/k/v``, ``attn_drop``, ``proj``, ``proj_drop``.
"""
from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from ssl_fast import ops


class MapToTokens(nn.Module):
    """``[B, C, H, W] -> [B, H*W, C]`` (the rearrange step of CvT's projections; no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class ConvAttention(nn.Module):
    """Multi-head attention whose q, k, v come from depthwise-conv projections of the token map.

    For tokens ``x [B, T, C_in]`` (``T = H*W``, plus one leading class token when
    ``with_cls_token``): the patch tokens are laid out as a ``H x W`` map; each of q, k, v is
    ``proj_p(flatten(BN_p(dwconv3x3_p(map, stride_p))))`` (``dw_bn``; ``avg``: average pooling;
    ``linear``: the tokens themselves), with the class token prepended unchanged (it bypasses the
    convolution); then ``softmax(scale * q k^T) v`` per head with ``scale = dim_out ** -0.5`` (the
    full width, as in CvT), heads merged, and ``proj``.

    The ``dw_bn`` projection with ``kernel_size=3`` and padding 1 runs through
    :func:`ssl_fast.ops.conv_qkv_projection` (one read of the map, BatchNorm with
    ``nn.BatchNorm2d``'s train/eval semantics and running-statistics update); attention runs
    through :func:`ssl_fast.ops.attention`. Other kernel sizes, paddings and methods run the
    projection modules as written.

    Args:
        dim_in: input width ``C_in``.
        dim_out: q/k/v and output width.
        num_heads: attention heads (``dim_out`` divisible by it).
        qkv_bias: bias of ``proj_q/k/v``.
        attn_drop: dropout on the attention probabilities.
        proj_drop: dropout after ``proj``.
        method: ``"dw_bn"``, ``"avg"`` or ``"linear"``.
        kernel_size, stride_kv, stride_q, padding_kv, padding_q: projection convolution/pooling.
        with_cls_token: the first token is a class token.
    """

    def __init__(self, dim_in: int, dim_out: int, num_heads: int, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, method: str = "dw_bn",
                 kernel_size: int = 3, stride_kv: int = 1, stride_q: int = 1, padding_kv: int = 1,
                 padding_q: int = 1, with_cls_token: bool = True, **kwargs):
        super().__init__()
        if method not in ("dw_bn", "avg", "linear"):
            raise ValueError(f"method must be 'dw_bn', 'avg' or 'linear', got {method!r}")
        if dim_out % num_heads:
            raise ValueError(f"dim_out {dim_out} is not divisible by num_heads {num_heads}")
        self.stride_kv = stride_kv
        self.stride_q = stride_q
        self.dim = dim_out
        self.num_heads = num_heads
        self.scale = dim_out ** -0.5
        self.with_cls_token = with_cls_token
        self.method = method
        self.kernel_size = kernel_size
        self.padding_q = padding_q
        self.padding_kv = padding_kv
        self.conv_proj_q = self._build_projection(dim_in, kernel_size, padding_q, stride_q,
                                                  "linear" if method == "avg" else method)
        self.conv_proj_k = self._build_projection(dim_in, kernel_size, padding_kv, stride_kv, method)
        self.conv_proj_v = self._build_projection(dim_in, kernel_size, padding_kv, stride_kv, method)
        self.proj_q = nn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.proj_k = nn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.proj_v = nn.Linear(dim_in, dim_out, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim_out, dim_out)
        self.proj_drop = nn.Dropout(proj_drop)

    @staticmethod
    def _build_projection(dim: int, kernel_size: int, padding: int, stride: int, method: str) -> Optional[nn.Module]:
        if method == "dw_bn":
            return nn.Sequential(OrderedDict([
                ("conv", nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=padding, bias=False, groups=dim)),
                ("bn", nn.BatchNorm2d(dim)),
                ("rearrage", MapToTokens()),
            ]))
        if method == "avg":
            return nn.Sequential(OrderedDict([
                ("avg", nn.AvgPool2d(kernel_size, stride=stride, padding=padding, ceil_mode=True)),
                ("rearrage", MapToTokens()),
            ]))
        return None

    def _fused(self) -> bool:
        return (self.method == "dw_bn" and self.kernel_size == 3 and self.padding_q == 1 and self.padding_kv == 1
                and all(m.bn.track_running_stats == self.conv_proj_q.bn.track_running_stats
                        for m in (self.conv_proj_k, self.conv_proj_v)))

    def forward_conv(self, x: torch.Tensor, h: int, w: int):
        """Tokens ``[B, T, C_in]`` -> pre-linear q ``[B, Tq, C_in]``, k and v ``[B, Tk, C_in]``."""
        cls_token = None
        if self.with_cls_token:
            cls_token, x = torch.split(x, [1, h * w], dim=1)
        if self._fused():
            q, k, v = ops.conv_qkv_projection(
                x, [self.conv_proj_q.conv.weight, self.conv_proj_k.conv.weight, self.conv_proj_v.conv.weight],
                [self.conv_proj_q.bn, self.conv_proj_k.bn, self.conv_proj_v.bn], size=(h, w),
                stride_q=self.stride_q, stride_kv=self.stride_kv, training=self.training)
        else:
            fmap = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
            q, k, v = (m(fmap) if m is not None else x
                       for m in (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v))
        if cls_token is not None:
            q, k, v = (torch.cat([cls_token, t], dim=1) for t in (q, k, v))
        return q, k, v

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.reshape(B, T, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Args: x ``[B, T, C_in]`` tokens (class token first when ``with_cls_token``), h, w: the
        patch-token grid (``T = h*w (+1)``). Returns ``[B, T, dim_out]``."""
        q, k, v = self.forward_conv(x, h, w)
        q = self._heads(self.proj_q(q))
        k = self._heads(self.proj_k(k))
        v = self._heads(self.proj_v(v))
        p = self.attn_drop.p if self.training else 0.0
        out = ops.attention(q, k, v, scale=self.scale, dropout_p=p)
        out = out.transpose(1, 2).reshape(out.shape[0], out.shape[2], self.dim)
        return self.proj_drop(self.proj(out))

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Attention probabilities ``[B, heads, Tq, Tk]`` (for visualisation)."""
        q, k, _ = self.forward_conv(x, h, w)
        return ops.attention_probs(self._heads(self.proj_q(q)), self._heads(self.proj_k(k)), scale=self.scale)
