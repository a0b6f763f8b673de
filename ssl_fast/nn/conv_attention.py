"""CvT's attention with convolutional projection, on the fused conv-projection and attention ops.

Two drop-ins share one code path (:func:`_project_qkv`, :func:`_attend`):

* :class:`ConvAttention` follows the official CvT ``Attention``: ``conv_proj_q/k/v``
  (``nn.Sequential`` of ``conv``, a depthwise ``Conv2d`` without bias, ``bn``, a ``BatchNorm2d``,
  and a parameter-free map-to-tokens step), ``proj_q/k/v``, ``attn_drop``, ``proj``,
  ``proj_drop``; ``forward(x, h, w)``.
* :class:`CvtSelfAttention` follows Hugging Face transformers' ``CvtSelfAttention``:
  ``convolution_projection_query/key/value`` (each holding ``convolution_projection.convolution``
  and ``.normalization``, then a parameter-free ``linear_projection`` to tokens),
  ``projection_query/key/value``, ``dropout``, no output projection;
  ``forward(hidden_state, height, width)``.

Attribute names match, so state_dicts load unchanged both ways.
"""
from collections import OrderedDict
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ssl_fast import ops


class MapToTokens(nn.Module):
    """``[B, C, H, W] -> [B, H*W, C]`` (the rearrange step of CvT's projections; no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


def _dw_bn_fusable(convs: Sequence[nn.Module], bns: Sequence[nn.Module]) -> Optional[Tuple[int, int, bool]]:
    """``(stride_q, stride_kv, training)`` when the three (q, k, v) conv + BatchNorm pairs compute
    exactly what :func:`ssl_fast.ops.conv_qkv_projection` does, else ``None``.

    That is: plain ``nn.Conv2d`` modules that are depthwise 3x3, padding 1, no bias, no dilation,
    zero padding, equal strides along both axes (the same for k and v); plain ``nn.BatchNorm2d``
    modules (not subclasses such as ``SyncBatchNorm``, whose statistics the op would not sync), all
    three in the same train/eval mode and all or none tracking running statistics. ``training``
    is the norms' own mode, as ``nn.Sequential`` would use it.
    """
    for conv in convs:
        if (type(conv) is not nn.Conv2d or conv.kernel_size != (3, 3) or conv.padding != (1, 1)
                or conv.dilation != (1, 1) or conv.bias is not None or conv.padding_mode != "zeros"
                or not conv.in_channels == conv.out_channels == conv.groups
                or conv.stride[0] != conv.stride[1]):
            return None
    if any(type(bn) is not nn.BatchNorm2d for bn in bns):
        return None
    if len({bn.training for bn in bns}) != 1 or len({bn.running_mean is None for bn in bns}) != 1:
        return None
    if convs[1].stride != convs[2].stride:
        return None
    return convs[0].stride[0], convs[1].stride[0], bns[0].training


def _project_qkv(x: torch.Tensor, h: int, w: int, with_cls_token: bool,
                 dw_bn: Optional[Tuple[Sequence[nn.Module], Sequence[nn.Module]]],
                 plain: Sequence[Optional[nn.Module]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CvT's convolutional q/k/v projection of a token sequence, before the linear layers.

    Args:
        x: tokens ``[B, T, C]``, ``T = h*w`` plus one leading class token when ``with_cls_token``.
        h, w: the patch-token grid.
        with_cls_token: split the first token off and prepend it unchanged to q, k and v.
        dw_bn: ``(convs, bns)``, the q/k/v depthwise convolutions and BatchNorms when the method
            is ``dw_bn`` (fused through :func:`ssl_fast.ops.conv_qkv_projection` when
            :func:`_dw_bn_fusable` accepts them), else ``None``.
        plain: q/k/v modules mapping the map ``[B, C, h, w]`` to tokens ``[B, T', C]``, run when
            the fused op cannot serve them; ``None`` entries pass the tokens through.

    Returns:
        q ``[B, Tq, C]``, k and v ``[B, Tk, C]`` (class token first when ``with_cls_token``).
    """
    cls_token = None
    if with_cls_token:
        cls_token, x = torch.split(x, [1, h * w], dim=1)
    fused = _dw_bn_fusable(*dw_bn) if dw_bn is not None else None
    if fused is not None:
        stride_q, stride_kv, training = fused
        convs, bns = dw_bn
        q, k, v = ops.conv_qkv_projection(x, [c.weight for c in convs], list(bns), size=(h, w),
                                          stride_q=stride_q, stride_kv=stride_kv, training=training)
    else:
        fmap = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        q, k, v = (m(fmap) if m is not None else x for m in plain)
    if cls_token is not None:
        q, k, v = (torch.cat([cls_token, t], dim=1) for t in (q, k, v))
    return q, k, v


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, T, heads * d] -> [B, heads, T, d]``."""
    B, T, _ = t.shape
    return t.reshape(B, T, num_heads, -1).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, scale: float,
            dropout_p: float) -> torch.Tensor:
    """Projected q ``[B, Tq, D]``, k and v ``[B, Tk, D]`` -> ``softmax(scale q k^T) v`` per head,
    heads merged: ``[B, Tq, D]``, through :func:`ssl_fast.ops.attention`."""
    out = ops.attention(_heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads), scale=scale,
                        dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


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
    through :func:`ssl_fast.ops.attention`. Other kernel sizes, paddings and methods, norms that
    are not plain ``nn.BatchNorm2d`` (``SyncBatchNorm``) or norms in mixed train/eval modes run the
    projection modules as written. The norms' own ``training`` flags decide batch or running
    statistics, as in the official module.

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

    def _dw_bn(self):
        if self.method != "dw_bn":
            return None
        mods = (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v)
        return [m.conv for m in mods], [m.bn for m in mods]

    def forward_conv(self, x: torch.Tensor, h: int, w: int):
        """Tokens ``[B, T, C_in]`` -> pre-linear q ``[B, Tq, C_in]``, k and v ``[B, Tk, C_in]``."""
        return _project_qkv(x, h, w, self.with_cls_token, self._dw_bn(),
                            (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Args: x ``[B, T, C_in]`` tokens (class token first when ``with_cls_token``), h, w: the
        patch-token grid (``T = h*w (+1)``). Returns ``[B, T, dim_out]``."""
        q, k, v = self.forward_conv(x, h, w)
        p = self.attn_drop.p if self.training else 0.0
        out = _attend(self.proj_q(q), self.proj_k(k), self.proj_v(v), self.num_heads, self.scale, p)
        return self.proj_drop(self.proj(out))

    @torch.no_grad()
    def attention_map(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Attention probabilities ``[B, heads, Tq, Tk]`` (for visualisation)."""
        q, k, _ = self.forward_conv(x, h, w)
        return ops.attention_probs(_heads(self.proj_q(q), self.num_heads), _heads(self.proj_k(k), self.num_heads),
                                   scale=self.scale)


class CvtConvBatchNorm(nn.Module):
    """Depthwise ``convolution`` (no bias) then ``normalization`` (``BatchNorm2d``):
    map ``[B, C, H, W] -> [B, C, H', W']``, ``H' = (H + 2 padding - kernel_size) // stride + 1``."""

    def __init__(self, embed_dim: int, kernel_size: int, padding: int, stride: int, device=None, dtype=None):
        super().__init__()
        self.convolution = nn.Conv2d(embed_dim, embed_dim, kernel_size, stride=stride, padding=padding, bias=False,
                                     groups=embed_dim, device=device, dtype=dtype)
        self.normalization = nn.BatchNorm2d(embed_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalization(self.convolution(x))


class CvtDwBnProjection(nn.Module):
    """``convolution_projection`` (:class:`CvtConvBatchNorm`) then ``linear_projection`` (the map
    flattened to tokens): ``[B, C, H, W] -> [B, H'*W', C]``."""

    def __init__(self, embed_dim: int, kernel_size: int, padding: int, stride: int, device=None, dtype=None):
        super().__init__()
        self.convolution_projection = CvtConvBatchNorm(embed_dim, kernel_size, padding, stride, device, dtype)
        self.linear_projection = MapToTokens()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_projection(self.convolution_projection(x))


class CvtSelfAttention(nn.Module):
    """Drop-in for Hugging Face transformers' ``CvtSelfAttention`` (``dw_bn`` projection).

    Same constructor arguments (in the same order; defaults added: CvT's kernel 3, padding 1,
    stride 1 for q and 2 for k/v), same submodule names, so ``state_dict`` keys are identical, and
    the same ``forward(hidden_state, height, width)``. For tokens ``[B, T, embed_dim]`` (``T =
    height*width``, plus one leading class token when ``with_cls_token``), each of q, k, v is
    ``projection_p(flatten(BN_p(dwconv_p(map))))`` with the class token prepended unchanged,
    then ``softmax(scale q k^T)`` (``scale = embed_dim ** -0.5``, the full width), ``dropout`` on
    the probabilities, times v, heads merged. There is no output projection (Hugging Face keeps
    it in ``CvtSelfOutput.dense``).

    The ``dw_bn`` projection runs through :func:`ssl_fast.ops.conv_qkv_projection` when its
    modules are the 3x3, padding 1 depthwise convolutions and plain ``nn.BatchNorm2d`` it computes
    (BatchNorm with ``nn.BatchNorm2d``'s train/eval semantics and running-statistics update);
    otherwise (other kernel sizes or paddings, ``SyncBatchNorm``, norms in mixed modes) the
    projection modules run as written. Attention runs through :func:`ssl_fast.ops.attention`.

    Hugging Face builds no convolution for ``qkv_projection_method`` ``"avg"`` or ``"linear"``
    (its forward then fails), so those are rejected here.

    Args:
        num_heads: attention heads (``embed_dim`` divisible by it).
        embed_dim: token width ``C`` (input, q/k/v and output).
        kernel_size: depthwise convolution kernel.
        padding_q, padding_kv: convolution padding for q and for k/v.
        stride_q, stride_kv: convolution stride for q and for k/v.
        qkv_projection_method: ``"dw_bn"`` only.
        qkv_bias: bias of ``projection_query/key/value``.
        attention_drop_rate: dropout on the attention probabilities (train mode).
        with_cls_token: the first token is a class token that bypasses the convolution.
        device, dtype: for the parameters and buffers.
        **kwargs: accepted and ignored, as Hugging Face does.
    """

    def __init__(self, num_heads: int, embed_dim: int, kernel_size: int = 3, padding_q: int = 1,
                 padding_kv: int = 1, stride_q: int = 1, stride_kv: int = 2, qkv_projection_method: str = "dw_bn",
                 qkv_bias: bool = True, attention_drop_rate: float = 0.0, with_cls_token: bool = True, *,
                 device=None, dtype=None, **kwargs):
        super().__init__()
        if qkv_projection_method != "dw_bn":
            raise ValueError(f"qkv_projection_method must be 'dw_bn', got {qkv_projection_method!r}: Hugging Face's "
                             f"CvtSelfAttention builds no convolution_projection for 'avg' or 'linear' (its "
                             f"forward fails), so there is nothing to reproduce")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.scale = embed_dim ** -0.5
        self.with_cls_token = with_cls_token
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        f = dict(device=device, dtype=dtype)
        self.convolution_projection_query = CvtDwBnProjection(embed_dim, kernel_size, padding_q, stride_q, **f)
        self.convolution_projection_key = CvtDwBnProjection(embed_dim, kernel_size, padding_kv, stride_kv, **f)
        self.convolution_projection_value = CvtDwBnProjection(embed_dim, kernel_size, padding_kv, stride_kv, **f)
        self.projection_query = nn.Linear(embed_dim, embed_dim, bias=qkv_bias, **f)
        self.projection_key = nn.Linear(embed_dim, embed_dim, bias=qkv_bias, **f)
        self.projection_value = nn.Linear(embed_dim, embed_dim, bias=qkv_bias, **f)
        self.dropout = nn.Dropout(attention_drop_rate)

    def _projections(self):
        return self.convolution_projection_query, self.convolution_projection_key, self.convolution_projection_value

    def _dw_bn(self):
        parts = [p.convolution_projection for p in self._projections()]
        return [c.convolution for c in parts], [c.normalization for c in parts]

    def forward_conv(self, hidden_state: torch.Tensor, height: int, width: int):
        """Tokens ``[B, T, C]`` -> pre-linear q ``[B, Tq, C]``, k and v ``[B, Tk, C]``."""
        return _project_qkv(hidden_state, height, width, self.with_cls_token, self._dw_bn(), self._projections())

    def forward(self, hidden_state: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Self-attention over CvT tokens.

        Args:
            hidden_state: ``[B, T, embed_dim]``, ``T = height*width`` plus the leading class token
                when ``with_cls_token``.
            height, width: the patch-token grid.

        Returns:
            ``[B, Tq, embed_dim]``, the merged heads (no output projection); ``Tq = T`` for
            ``stride_q = 1``.
        """
        q, k, v = self.forward_conv(hidden_state, height, width)
        p = self.dropout.p if self.dropout.training else 0.0
        return _attend(self.projection_query(q), self.projection_key(k), self.projection_value(v), self.num_heads,
                       self.scale, p)

    @torch.no_grad()
    def attention_map(self, hidden_state: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Attention probabilities ``[B, heads, Tq, Tk]`` (for visualisation)."""
        q, k, _ = self.forward_conv(hidden_state, height, width)
        return ops.attention_probs(_heads(self.projection_query(q), self.num_heads),
                                   _heads(self.projection_key(k), self.num_heads), scale=self.scale)
