"""Rules for timm: ViT ``Attention`` (timm.layers), Swin ``WindowAttention``, SAM-ViT ``Attention``."""
from typing import Optional

import torch
from torch import nn

from ssl_fast.patch.checks import (Unsupported, _cls, _is_ours, adopt, constant_scale, finish, require_dropout,
                                   require_forward, require_linear, require_maps_to_same_shape, unexpected_state)
from ssl_fast.nn.attention import Attention
from ssl_fast.nn.rel_pos_attention import RelPosAttention
from ssl_fast.nn.window_attention import WindowAttention
from ssl_fast.reference.attention import window_relative_index


_VIT_CHILDREN = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop")


def _match_timm_vit(m: nn.Module) -> bool:
    return (_cls(m) == "Attention" and not _is_ours(m) and hasattr(m, "qkv") and hasattr(m, "proj")
            and hasattr(m, "num_heads"))


def _convert_timm_vit(m: nn.Module) -> nn.Module:
    extra = unexpected_state(m, children=_VIT_CHILDREN)
    if extra:
        raise Unsupported(f"not the plain timm Attention: extra state {extra}")
    qkv, proj = require_linear(m, "qkv"), require_linear(m, "proj")
    require_dropout(m, "attn_drop")
    heads = int(m.num_heads)
    if qkv.out_features % (3 * heads) != 0:
        raise Unsupported(f"qkv.out_features={qkv.out_features} is not 3 * num_heads * head_dim")
    head_dim = qkv.out_features // (3 * heads)
    if getattr(m, "head_dim", head_dim) != head_dim or proj.in_features != heads * head_dim:
        raise Unsupported("head_dim / proj width disagree with qkv")
    new = Attention(qkv.in_features, heads, attn_head_dim=head_dim, dim_out=proj.out_features,
                    qkv_bias=qkv.bias is not None, proj_bias=proj.bias is not None, device="meta")
    new.scale = constant_scale(m, head_dim)
    adopt(new, m, [n for n in _VIT_CHILDREN if getattr(m, n, None) is not None])
    return finish(new, m)


# ----------------------------------------------------------------------------------------------
# timm Swin WindowAttention
# ----------------------------------------------------------------------------------------------
_SWIN_CHILDREN = ("qkv", "attn_drop", "proj", "proj_drop", "softmax")


def _match_timm_swin(m: nn.Module) -> bool:
    return (_cls(m) == "WindowAttention" and not _is_ours(m)
            and (hasattr(m, "relative_position_bias_table") or hasattr(m, "cpb_mlp")))


def _convert_timm_swin(m: nn.Module) -> nn.Module:
    if hasattr(m, "cpb_mlp") or hasattr(m, "logit_scale"):
        raise Unsupported("Swin V2 cosine attention with a continuous position-bias MLP "
                          "(logit_scale, cpb_mlp) is not supported")
    extra = unexpected_state(m, children=_SWIN_CHILDREN, params=("relative_position_bias_table",),
                        buffers=("relative_position_index",))
    if extra:
        raise Unsupported(f"not the plain Swin WindowAttention: extra state {extra}")
    qkv, proj = require_linear(m, "qkv"), require_linear(m, "proj")
    require_dropout(m, "attn_drop")
    heads = int(m.num_heads)
    window = m.window_size
    window = (window, window) if isinstance(window, int) else tuple(int(w) for w in window)
    table = m.relative_position_bias_table
    if table.shape != ((2 * window[0] - 1) * (2 * window[1] - 1), heads):
        raise Unsupported(f"relative_position_bias_table has shape {tuple(table.shape)}, not "
                          f"[(2Wh-1)(2Ww-1), num_heads] for window {window}")
    index = getattr(m, "relative_position_index", None)
    if index is None or not index.is_meta and not torch.equal(
            index.reshape(-1).long().cpu(), window_relative_index(window).reshape(-1)):
        raise Unsupported("relative_position_index is not Swin's standard index for the window")
    if qkv.out_features % (3 * heads) != 0:
        raise Unsupported(f"qkv.out_features={qkv.out_features} is not 3 * num_heads * head_dim")
    head_dim = qkv.out_features // (3 * heads)
    if proj.in_features != heads * head_dim or proj.out_features != qkv.in_features:
        raise Unsupported("proj width disagrees with qkv")
    new = WindowAttention(qkv.in_features, heads, head_dim=head_dim, window_size=window,
                          qkv_bias=qkv.bias is not None, device="meta")
    new.scale = constant_scale(m, head_dim)
    adopt(new, m, [n for n in _SWIN_CHILDREN if getattr(m, n, None) is not None]
           + ["relative_position_bias_table", "relative_position_index"])
    return finish(new, m)


# ----------------------------------------------------------------------------------------------
# timm SAM-ViT Attention (vision_transformer_sam)
# ----------------------------------------------------------------------------------------------
_SAM_CHILDREN = ("qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")


def _match_timm_sam(m: nn.Module) -> bool:
    return _cls(m) == "Attention" and not _is_ours(m) and hasattr(m, "use_rel_pos") and hasattr(m, "qkv")


def _convert_timm_sam(m: nn.Module) -> nn.Module:
    if getattr(m, "rope", None) is not None:
        raise Unsupported("rope (rotary position embedding) is not supported")
    extra = unexpected_state(m, children=_SAM_CHILDREN, params=("rel_pos_h", "rel_pos_w"))
    if extra:
        raise Unsupported(f"not the plain SAM Attention: extra state {extra}")
    qkv, proj = require_linear(m, "qkv"), require_linear(m, "proj")
    require_dropout(m, "attn_drop")
    heads = int(m.num_heads)
    dim = qkv.in_features
    if qkv.out_features != 3 * dim or dim % heads != 0 or proj.in_features != dim:
        raise Unsupported(f"qkv {qkv.in_features}->{qkv.out_features} is not dim -> 3 * dim with "
                          f"dim divisible by num_heads")
    use_rel_pos = bool(m.use_rel_pos)
    input_size = None
    if use_rel_pos:
        h_t, w_t = getattr(m, "rel_pos_h", None), getattr(m, "rel_pos_w", None)
        if h_t is None or w_t is None:
            raise Unsupported("use_rel_pos is True but rel_pos_h/rel_pos_w are missing")
        if h_t.shape[1] != dim // heads or w_t.shape[1] != dim // heads or h_t.shape[0] % 2 == 0 \
                or w_t.shape[0] % 2 == 0:
            raise Unsupported(f"rel_pos tables {tuple(h_t.shape)}, {tuple(w_t.shape)} are not "
                              f"[2 * size - 1, head_dim]")
        input_size = ((h_t.shape[0] + 1) // 2, (w_t.shape[0] + 1) // 2)
    new = RelPosAttention(dim, heads, qkv_bias=qkv.bias is not None, use_rel_pos=use_rel_pos,
                          input_size=input_size, device="meta")
    new.scale = constant_scale(m, dim // heads)
    names = [n for n in _SAM_CHILDREN if getattr(m, n, None) is not None]
    adopt(new, m, names + (["rel_pos_h", "rel_pos_w"] if use_rel_pos else []))
    return finish(new, m)
