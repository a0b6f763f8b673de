"""Rules for Hugging Face transformers: ``CvtSelfAttention`` (CvT)."""
from typing import Optional

import torch
from torch import nn

from ssl_fast.patch.checks import (Unsupported, _cls, _is_ours, adopt, constant_scale, finish, require_dropout,
                                   require_forward, require_linear, require_maps_to_same_shape, unexpected_state)
from ssl_fast.nn.conv_attention import CvtSelfAttention


_HF_CVT_PROJ = ("convolution_projection_query", "convolution_projection_key", "convolution_projection_value")
_HF_CVT_LINEAR = ("projection_query", "projection_key", "projection_value")


def _match_hf_cvt(m: nn.Module) -> bool:
    return (_cls(m) == "CvtSelfAttention" and not _is_ours(m) and hasattr(m, "convolution_projection_query")
            and hasattr(m, "projection_query") and hasattr(m, "embed_dim") and hasattr(m, "num_heads"))


def _check_hf_cvt_projection(m: nn.Module, name: str, embed_dim: int) -> None:
    """The q/k/v projection must be the ``dw_bn`` one: depthwise conv + BatchNorm, then flatten."""
    p = getattr(m, name, None)
    if _cls(p) != "CvtSelfAttentionProjection":
        raise Unsupported(f"{name} is {type(p).__name__}, not a CvtSelfAttentionProjection")
    conv_proj = p._modules.get("convolution_projection")
    if conv_proj is None:
        raise Unsupported(f"{name} has no convolution_projection: qkv_projection_method is not 'dw_bn' "
                          f"(Hugging Face builds nothing for 'avg'/'linear' and its forward fails)")
    flatten = p._modules.get("linear_projection")
    if _cls(conv_proj) != "CvtSelfAttentionConvProjection" or _cls(flatten) != "CvtSelfAttentionLinearProjection":
        raise Unsupported(f"{name}'s children are {_cls(conv_proj)}/{_cls(flatten)}, not Hugging Face's")
    extra = (unexpected_state(p, children=("convolution_projection", "linear_projection"))
             + unexpected_state(conv_proj, children=("convolution", "normalization")) + unexpected_state(flatten))
    if extra:
        raise Unsupported(f"{name} is not the plain dw_bn projection: extra state {extra}")
    conv, norm = conv_proj.convolution, conv_proj.normalization
    if not isinstance(conv, nn.Conv2d) or not conv.in_channels == conv.out_channels == conv.groups == embed_dim:
        raise Unsupported(f"{name}.convolution_projection.convolution is not a depthwise Conv2d over "
                          f"embed_dim={embed_dim} channels")
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise Unsupported(f"{name}.convolution_projection.normalization is {type(norm).__name__}, not a BatchNorm")


def _convert_hf_cvt(m: nn.Module) -> nn.Module:
    extra = unexpected_state(m, children=_HF_CVT_PROJ + _HF_CVT_LINEAR + ("dropout",))
    if extra:
        raise Unsupported(f"not the plain Hugging Face CvtSelfAttention: extra state {extra}")
    embed_dim, heads = int(m.embed_dim), int(m.num_heads)
    if heads < 1 or embed_dim % heads:
        raise Unsupported(f"embed_dim={embed_dim} is not divisible by num_heads={heads}")
    for name in _HF_CVT_PROJ:
        _check_hf_cvt_projection(m, name, embed_dim)
    for name in _HF_CVT_LINEAR:
        layer = require_linear(m, name)
        if layer.in_features != embed_dim or layer.out_features != embed_dim:
            raise Unsupported(f"{name} maps {layer.in_features} -> {layer.out_features}, not embed_dim={embed_dim}")
    require_dropout(m, "dropout")
    scale = getattr(m, "scale", embed_dim ** -0.5)
    if isinstance(scale, torch.Tensor):
        raise Unsupported("scale is a tensor, not a constant")
    # the shell's projections are replaced by the original objects, so its conv options do not matter
    new = CvtSelfAttention(heads, embed_dim, qkv_bias=m.projection_query.bias is not None,
                           attention_drop_rate=m.dropout.p, with_cls_token=bool(m.with_cls_token), device="meta")
    new.scale = float(scale)
    modes = {id(sub): sub.training for sub in m.modules()}
    adopt(new, m, _HF_CVT_PROJ + _HF_CVT_LINEAR + ("dropout",))
    finish(new, m)
    for sub in new.modules():  # _finish set every child to the parent's mode; keep e.g. frozen BatchNorms
        if sub is not new:
            sub.training = modes[id(sub)]
    return new


def _note_hf_cvt(m: nn.Module, parent: Optional[nn.Module]) -> Optional[str]:
    if parent is not None and _cls(parent) == "CvtAttention":
        return ("Hugging Face CvtAttention: its CvtSelfAttention child is replaced; the wrapper and "
                "CvtSelfOutput's dense projection run as before")
    return None
