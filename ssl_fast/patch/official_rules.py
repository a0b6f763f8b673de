"""Rules for research code that is not a package: the official DINO ViT
(facebookresearch/dino ``vision_transformer.py``), segment-anything's image-encoder attention
(facebookresearch/segment-anything ``modeling/image_encoder.py``, the same class as detectron2's
ViTDet) and the official CvT attention (microsoft/CvT ``lib/models/cls_cvt.py``).

Such code is copied and edited freely, so beyond the class name, state and forward signature
every conversion ends with a numerical check (:func:`require_same_function`): the original and
the replacement run on a small float64 CPU input with the same random weights (the module's own
tensors are not touched, and nothing runs on its device) and must agree. A copy whose forward
computes something else is skipped with that reason instead of being replaced.
"""
from typing import Optional, Tuple

import torch
from torch import nn

from ssl_fast.nn.attention import Attention
from ssl_fast.nn.conv_attention import ConvAttention
from ssl_fast.nn.dino_block import DINOBlock
from ssl_fast.nn.rel_pos_attention import RelPosAttention
from ssl_fast.patch.checks import (
    Unsupported,
    _is_ours,
    adopt,
    constant_scale,
    finish_keeping_modes,
    forward_parameters,
    probe,
    require_dropout,
    require_forward,
    require_linear,
    require_returns,
    require_same_function,
    unexpected_state,
)


def _is_a(m: nn.Module, class_name: str) -> bool:
    """``m``'s class or one of its bases is called ``class_name`` (a subclass that changes the
    forward is caught by the numerical check, not here)."""
    return any(c.__name__ == class_name for c in type(m).__mro__[:-1] if c is not nn.Module)


def _param_names(m: nn.Module) -> list:
    try:
        return [p.name for p in forward_parameters(m)]
    except Unsupported:
        return []


# ----------------------------------------------------------------------------------------------
# DINO (facebookresearch/dino vision_transformer.py): Block with return_attention; Attention
# returning (x, attn)
# ----------------------------------------------------------------------------------------------
_DINO_ATTN_CHILDREN = ("qkv", "attn_drop", "proj", "proj_drop")
_DINO_BLOCK_CHILDREN = ("norm1", "attn", "drop_path", "norm2", "mlp")


def _dino_like_attention(m: nn.Module) -> bool:
    """Cheap test: DINO's attention shape (a Linear ``qkv``, ``proj``, ``num_heads``, no other children)."""
    return (not _is_ours(m) and isinstance(getattr(m, "qkv", None), nn.Linear) and hasattr(m, "proj")
            and hasattr(m, "num_heads") and not unexpected_state(m, children=_DINO_ATTN_CHILDREN))


def _require_pair_output(m: nn.Module, width: int, heads: int) -> None:
    """The forward maps ``[B, N, C]`` to ``(x [B, N, C], attn [B, H, N, N])``, as DINO's does."""
    out = probe(m, (1, 3, width))
    shapes = [tuple(t.shape) for t in out] if isinstance(out, (tuple, list)) and all(
        isinstance(t, torch.Tensor) for t in out) else None
    if shapes != [(1, 3, width), (1, heads, 3, 3)]:
        got = shapes if shapes is not None else type(out).__name__
        raise Unsupported(f"attn does not return (x [B, N, C], attn [B, H, N, N]) for [B, N, C] tokens "
                          f"(got {got})")


def _convert_dino_attention(m: nn.Module) -> Attention:
    """DINO's Attention as an :class:`ssl_fast.nn.Attention` (one output) sharing its layers."""
    extra = unexpected_state(m, children=_DINO_ATTN_CHILDREN)
    if extra:
        raise Unsupported(f"attn is not DINO's Attention: extra state {extra}")
    qkv, proj = require_linear(m, "qkv"), require_linear(m, "proj")
    require_dropout(m, "attn_drop")
    require_dropout(m, "proj_drop")
    require_forward(m, ("x",))
    heads, dim = int(m.num_heads), qkv.in_features
    if heads < 1 or dim % heads or qkv.out_features != 3 * dim or proj.in_features != dim:
        raise Unsupported(f"attn's qkv {qkv.in_features}->{qkv.out_features} / proj {proj.in_features}-> is not "
                          f"C -> 3C, C -> with C divisible by num_heads={heads}")
    _require_pair_output(m, dim, heads)
    new = Attention(dim, heads, dim_out=proj.out_features, qkv_bias=qkv.bias is not None,
                    proj_bias=proj.bias is not None, device="meta")
    new.scale = constant_scale(m, dim // heads)
    adopt(new, m, _DINO_ATTN_CHILDREN)
    return finish_keeping_modes(new, m)


def _match_dino_block(m: nn.Module) -> bool:
    return (not _is_ours(m) and hasattr(m, "attn") and hasattr(m, "norm1") and hasattr(m, "mlp")
            and "return_attention" in _param_names(m))


def _convert_dino_block(m: nn.Module) -> nn.Module:
    require_forward(m, ("x", "return_attention"))
    extra = unexpected_state(m, children=_DINO_BLOCK_CHILDREN)
    if extra:
        raise Unsupported(f"not DINO's Block: extra state {extra}")
    missing = [n for n in _DINO_BLOCK_CHILDREN if m._modules.get(n) is None]
    if missing:
        raise Unsupported(f"not DINO's Block: no {missing}")
    for name, sub in (("attn", m.attn), ("attn.attn_drop", getattr(m.attn, "attn_drop", None))):
        if sub is not None and (sub._forward_hooks or sub._forward_pre_hooks):
            raise Unsupported(f"forward hooks are registered on {name}: they see the attention probabilities "
                              f"(or DINO's (x, attn) pair), which the fused path does not form")
    attn = _convert_dino_attention(m.attn)
    dim = attn.qkv.in_features
    new = DINOBlock.__new__(DINOBlock)
    nn.Module.__init__(new)
    adopt(new, m, ("norm1",))
    new.attn = attn
    adopt(new, m, ("drop_path", "norm2", "mlp"))
    x = torch.randn(2, 5, dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    require_same_function(m, new, [((x,), {}), ((x,), {"return_attention": True})], "DINO Block")
    finish_keeping_modes(new, m)
    attn.training = m.attn.training  # the new attn is not one of m's submodules
    return new


def _match_dino_attention(m: nn.Module) -> bool:
    """A DINO-style Attention outside a recognised DINO Block: same state, returns a pair."""
    if not _is_a(m, "Attention") or not _dino_like_attention(m):
        return False
    try:
        out = probe(m, (1, 3, m.qkv.in_features))
    except Unsupported:
        return False
    return isinstance(out, (tuple, list)) and len(out) == 2


def _convert_dino_attention_alone(m: nn.Module) -> nn.Module:
    raise Unsupported("returns a tuple (x, attn): the attention probabilities are part of its output, which a "
                      "fused kernel does not form; ssl_fast replaces DINO's Block (forward(x, return_attention)) "
                      "as a whole, and this one is not inside such a block")


# ----------------------------------------------------------------------------------------------
# segment-anything / ViTDet image-encoder Attention: qkv and proj only, [B, H, W, C] in and out
# ----------------------------------------------------------------------------------------------
def _match_sam_attention(m: nn.Module) -> bool:
    return (_is_a(m, "Attention") and not _is_ours(m) and hasattr(m, "use_rel_pos") and hasattr(m, "num_heads")
            and isinstance(getattr(m, "qkv", None), nn.Linear) and not unexpected_state(
                m, children=("qkv", "proj"), params=("rel_pos_h", "rel_pos_w")))


def _convert_sam_attention(m: nn.Module) -> nn.Module:
    require_forward(m, ("x",))
    qkv, proj = require_linear(m, "qkv"), require_linear(m, "proj")
    heads, dim = int(m.num_heads), qkv.in_features
    if heads < 1 or dim % heads or qkv.out_features != 3 * dim or proj.in_features != dim:
        raise Unsupported(f"qkv {qkv.in_features}->{qkv.out_features}, proj {proj.in_features}->"
                          f"{proj.out_features}: not C -> 3C and C -> C with C divisible by num_heads={heads}")
    head_dim = dim // heads
    use_rel_pos = bool(m.use_rel_pos)
    input_size = None
    if use_rel_pos:
        tables = [getattr(m, n, None) for n in ("rel_pos_h", "rel_pos_w")]
        if any(not isinstance(t, torch.Tensor) for t in tables):
            raise Unsupported("use_rel_pos is True but rel_pos_h/rel_pos_w are missing")
        if any(t.dim() != 2 or t.shape[1] != head_dim for t in tables):
            raise Unsupported(f"rel_pos tables {[tuple(t.shape) for t in tables]} are not [L, head_dim={head_dim}]")
        # the shell's tables are replaced by the originals; any length is resized per grid, as SAM does
        input_size = tuple((t.shape[0] + 1) // 2 for t in tables)
    if proj.out_features != dim:
        raise Unsupported(f"proj maps {dim} -> {proj.out_features}; the drop-in keeps the width")
    require_returns(m, (1, 2, 3, dim), (1, 2, 3, dim), "[B, H, W, C] grid", dim)
    new = RelPosAttention(dim, heads, qkv_bias=qkv.bias is not None, use_rel_pos=use_rel_pos,
                          input_size=input_size, device="meta")
    new.scale = constant_scale(m, head_dim)
    adopt(new, m, ["qkv", "proj"] + (["rel_pos_h", "rel_pos_w"] if use_rel_pos else []))
    g = torch.Generator().manual_seed(1)
    calls = [((torch.randn(2, 3, 4, dim, generator=g, dtype=torch.float64),), {})]
    if input_size is not None and input_size[0] * input_size[1] <= 64 and input_size != (3, 4):
        calls.append(((torch.randn(1, *input_size, dim, generator=g, dtype=torch.float64),), {}))
    require_same_function(m, new, calls, "SAM Attention")
    return finish_keeping_modes(new, m)


# ----------------------------------------------------------------------------------------------
# microsoft/CvT Attention: conv projection (dw_bn / avg / linear), forward(x, h, w)
# ----------------------------------------------------------------------------------------------
_CVT_PROJ = ("conv_proj_q", "conv_proj_k", "conv_proj_v")
_CVT_CHILDREN = _CVT_PROJ + ("proj_q", "proj_k", "proj_v", "attn_drop", "proj", "proj_drop")


def _match_cvt_attention(m: nn.Module) -> bool:
    return (not _is_ours(m) and all(hasattr(m, n) for n in _CVT_PROJ + ("proj_q", "proj_k", "proj_v", "proj"))
            and hasattr(m, "num_heads") and hasattr(m, "with_cls_token"))


def _cvt_projection_kind(p: Optional[nn.Module], name: str) -> Tuple[str, Optional[nn.Module]]:
    """``("linear", None)``, ``("dw_bn", conv)`` or ``("avg", pool)`` for one of conv_proj_q/k/v."""
    if p is None:
        return "linear", None
    if not isinstance(p, nn.Sequential):
        raise Unsupported(f"{name} is {type(p).__name__}, not CvT's nn.Sequential projection")
    names = list(p._modules)
    if names == ["conv", "bn", "rearrage"]:
        conv = p.conv
        if not isinstance(conv, nn.Conv2d) or not conv.in_channels == conv.out_channels == conv.groups:
            raise Unsupported(f"{name}.conv is not a depthwise Conv2d")
        if not isinstance(p.bn, nn.modules.batchnorm._BatchNorm):
            raise Unsupported(f"{name}.bn is {type(p.bn).__name__}, not a BatchNorm")
        return "dw_bn", conv
    if names == ["avg", "rearrage"]:
        if not isinstance(p.avg, nn.AvgPool2d):
            raise Unsupported(f"{name}.avg is {type(p.avg).__name__}, not an nn.AvgPool2d")
        return "avg", p.avg
    raise Unsupported(f"{name} holds {names}, not CvT's dw_bn (conv, bn, rearrage) or avg (avg, rearrage)")


def _pair_value(v) -> int:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if v[0] != v[1]:
        raise Unsupported(f"non-square kernel/stride/padding {v}")
    return int(v[0])


def _convert_cvt_attention(m: nn.Module) -> nn.Module:
    require_forward(m, ("x", "h", "w"))
    extra = unexpected_state(m, children=_CVT_CHILDREN)
    if extra:
        raise Unsupported(f"not the official CvT Attention: extra state {extra}")
    kinds = [_cvt_projection_kind(m._modules.get(n), n) for n in _CVT_PROJ]
    methods = [k for k, _ in kinds]
    if methods == ["linear"] * 3:
        raise Unsupported("method 'linear': conv_proj_q/k/v are all None, and the official forward then never "
                          "assigns q, k, v (it fails with UnboundLocalError)")
    if methods == ["dw_bn"] * 3:
        method = "dw_bn"
    elif methods == ["linear", "avg", "avg"]:
        method = "avg"
    else:
        raise Unsupported(f"q/k/v projections {methods} are none of CvT's methods (dw_bn for all three, or avg: "
                          f"q linear, k and v average-pooled)")
    proj_q, proj_k, proj_v, proj = (require_linear(m, n) for n in ("proj_q", "proj_k", "proj_v", "proj"))
    require_dropout(m, "attn_drop")
    require_dropout(m, "proj_drop")
    dim_in, dim_out, heads = proj_q.in_features, proj_q.out_features, int(m.num_heads)
    for layer, name in ((proj_k, "proj_k"), (proj_v, "proj_v")):
        if (layer.in_features, layer.out_features) != (dim_in, dim_out):
            raise Unsupported(f"{name} maps {layer.in_features} -> {layer.out_features}, proj_q {dim_in} -> {dim_out}")
    if proj.in_features != dim_out or heads < 1 or dim_out % heads:
        raise Unsupported(f"proj takes {proj.in_features}, or dim_out={dim_out} is not divisible by num_heads={heads}")
    if (proj_k.bias is None) != (proj_q.bias is None) or (proj_v.bias is None) != (proj_q.bias is None):
        raise Unsupported("proj_q/k/v disagree on having a bias")
    layer_k = kinds[1][1]
    kernel = _pair_value(layer_k.kernel_size)
    stride_kv, padding_kv = _pair_value(layer_k.stride), _pair_value(layer_k.padding)
    stride_q, padding_q = 1, 1
    if method == "dw_bn":
        conv_q = kinds[0][1]
        stride_q, padding_q = _pair_value(conv_q.stride), _pair_value(conv_q.padding)
    with_cls_token = bool(m.with_cls_token)
    hw = (3, 4)
    tokens = hw[0] * hw[1] + int(with_cls_token)
    out = probe(m, (1, tokens, dim_in), h=hw[0], w=hw[1])
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[-1] != proj.out_features:
        raise Unsupported(f"its forward does not map [B, T, C] tokens to one [B, T', C'] tensor "
                          f"(got {type(out).__name__})")
    with torch.device("meta"):
        new = ConvAttention(dim_in, dim_out, heads, qkv_bias=proj_q.bias is not None, attn_drop=m.attn_drop.p,
                            proj_drop=m.proj_drop.p, method="linear", kernel_size=kernel, stride_kv=stride_kv,
                            stride_q=stride_q, padding_kv=padding_kv, padding_q=padding_q,
                            with_cls_token=with_cls_token)
    new.method = method
    new.scale = constant_scale(m, dim_out)
    for name in ("stride_kv", "stride_q", "dim"):
        if hasattr(m, name):
            setattr(new, name, getattr(m, name))
    adopt(new, m, _CVT_CHILDREN)
    x = torch.randn(2, tokens, dim_in, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    require_same_function(m, new, [((x, hw[0], hw[1]), {})], "CvT Attention")
    return finish_keeping_modes(new, m)
