"""Rules for timm: ViT ``Attention`` (``timm.layers``), Swin ``WindowAttention``, SAM-ViT ``Attention``.

Each ``_match_*`` is a cheap look at the class name and attributes; each ``_convert_*`` then checks,
in this order, that the module is the variant the drop-in computes exactly, and raises
:class:`Unsupported` with the reason otherwise:

1. options the drop-in lacks (rope, Swin V2's cosine attention);
2. state: no registered children, parameters or buffers beyond timm's (BEiT's ``q_bias``/``v_bias``
   and its relative-position table, say);
3. the forward's parameters: only those the drop-in serves (BEiT's ``shared_rel_pos_bias`` is not);
4. the layers: ``qkv``/``proj`` are ``nn.Linear`` of consistent widths, ``attn_drop`` an ``nn.Dropout``,
   position tables of the shapes the drop-in reads;
5. behaviour: the forward, run on fake tensors (nothing computed), takes the drop-in's input
   layout and returns one tensor of the drop-in's output shape; a module of the same name that
   takes a 4-D map (NesT, FastViT, VOLO) or returns ``(x, attn)`` (the official DINO ViT) fails here;
6. the logit scale: timm's SDPA path (``fused_attn=True``) ignores ``self.scale``, so a module
   whose ``scale`` was changed from ``head_dim ** -0.5`` computes something that depends on the
   path, and is skipped;
7. the function: the original and the replacement run on small float64 CPU inputs with the same
   random weights (``checks.require_same_function``: the module's own tensors, device and
   random streams are untouched) and must agree, with and without the masks the forward takes.
   A same-named class with the same state and layout that computes something else is skipped.

The replacement shares the original's parameters, buffers and submodules (the same objects, each
keeping its own train/eval mode), copies ``fused_attn`` and the module's mode, and has the methods
timm calls on it (``set_window_size``, ``reset_parameters``, ``init_non_persistent_buffers`` for Swin).
"""
import math

import torch
from torch import nn

from ssl_fast.nn.attention import Attention
from ssl_fast.nn.rel_pos_attention import RelPosAttention
from ssl_fast.nn.window_attention import WindowAttention
from ssl_fast.patch.checks import (
    Unsupported,
    _cls,
    _is_ours,
    adopt,
    constant_scale,
    finish_keeping_modes,
    forward_parameters,
    require_dropout,
    require_forward,
    require_linear,
    require_returns,
    require_same_function,
    unexpected_state,
)
from ssl_fast.reference.attention import window_relative_index


# ----------------------------------------------------------------------------------------------
# shared checks
# ----------------------------------------------------------------------------------------------
def _scale(m: nn.Module, head_dim: int) -> float:
    """The logit scale the module computes with (see the module docstring, point 6)."""
    scale = constant_scale(m, head_dim)
    default = head_dim ** -0.5
    if getattr(m, "fused_attn", False) and not math.isclose(scale, default, rel_tol=1e-12):
        raise Unsupported(f"scale={scale:g} is not head_dim ** -0.5 = {default:g}, and timm's fused path "
                          f"(fused_attn=True) ignores it: the result depends on the path")
    return scale


def _heads(m: nn.Module, qkv: nn.Linear) -> tuple:
    heads = getattr(m, "num_heads", None)
    if not isinstance(heads, int) or heads < 1:
        raise Unsupported(f"num_heads is {heads!r}, not a positive int")
    if qkv.out_features % (3 * heads) != 0:
        raise Unsupported(f"qkv.out_features={qkv.out_features} is not 3 * num_heads * head_dim")
    return heads, qkv.out_features // (3 * heads)


def _done(new: nn.Module, old: nn.Module, calls, what: str) -> nn.Module:
    """Check the function (point 7), copy ``fused_attn`` and the mode; adopted submodules keep theirs."""
    require_same_function(old, new, calls, what)
    if hasattr(old, "fused_attn"):
        new.fused_attn = bool(old.fused_attn)
    return finish_keeping_modes(new, old)


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# timm.layers.Attention (ViT, DeiT, DeiT-3, CLIP, FlexiViT, DINOv2, ...)
# ----------------------------------------------------------------------------------------------
_VIT_CHILDREN = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop")
_VIT_FORWARD = ("x", "attn_mask", "is_causal")


def _match_timm_vit(m: nn.Module) -> bool:
    return (_cls(m) == "Attention" and not _is_ours(m) and hasattr(m, "qkv") and hasattr(m, "proj")
            and hasattr(m, "num_heads"))


def _convert_timm_vit(m: nn.Module) -> nn.Module:
    extra = unexpected_state(m, children=_VIT_CHILDREN)
    if extra:
        raise Unsupported(f"not timm's plain Attention: extra state {extra}")
    require_forward(m, _VIT_FORWARD)
    qkv, proj = require_linear(m, "qkv"), require_linear(m, "proj")
    require_dropout(m, "attn_drop")
    heads, head_dim = _heads(m, qkv)
    if getattr(m, "head_dim", head_dim) != head_dim or proj.in_features != heads * head_dim:
        raise Unsupported("head_dim / proj.in_features disagree with qkv")
    gate = getattr(m, "gate", None)
    if gate is not None:
        gate = require_linear(m, "gate")
        if gate.in_features != qkv.in_features or gate.out_features != heads * head_dim:
            raise Unsupported(f"gate is Linear({gate.in_features}, {gate.out_features}), not "
                              f"Linear(dim, num_heads * head_dim)")
    dim = qkv.in_features
    require_returns(m, (2, 5, dim), (2, 5, proj.out_features), "[B, N, C] tokens", dim)
    scale = _scale(m, head_dim)
    new = Attention(dim, heads, attn_head_dim=head_dim, dim_out=proj.out_features,
                    qkv_bias=qkv.bias is not None, proj_bias=proj.bias is not None,
                    gated=gate is not None, device="meta")
    new.scale = scale
    adopt(new, m, [n for n in _VIT_CHILDREN if getattr(m, n, None) is not None])
    x = _randn(2, 5, dim)
    calls = [((x,), {})]
    takes = {p.name for p in forward_parameters(m)}
    if "attn_mask" in takes:
        keep = (_randn(2, 1, 5, 5) > 0) | torch.eye(5, dtype=torch.bool)
        calls.append(((x,), {"attn_mask": keep}))
    if "is_causal" in takes:
        calls.append(((x,), {"is_causal": True}))
    return _done(new, m, calls, "timm Attention")


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
        raise Unsupported(f"not timm's plain Swin WindowAttention: extra state {extra}")
    require_forward(m, ("x", "mask"))
    qkv, proj = require_linear(m, "qkv"), require_linear(m, "proj")
    require_dropout(m, "attn_drop")
    heads, head_dim = _heads(m, qkv)
    window = m.window_size
    window = (window, window) if isinstance(window, int) else tuple(int(w) for w in window)
    table = m.relative_position_bias_table
    if table is None or table.shape != ((2 * window[0] - 1) * (2 * window[1] - 1), heads):
        raise Unsupported(f"relative_position_bias_table has shape "
                          f"{None if table is None else tuple(table.shape)}, not "
                          f"[(2Wh-1)(2Ww-1), num_heads] for window {window}")
    index = getattr(m, "relative_position_index", None)
    if index is None or not index.is_meta and not torch.equal(
            index.reshape(-1).long().cpu(), window_relative_index(window).reshape(-1)):
        raise Unsupported("relative_position_index is not Swin's standard index for the window")
    if proj.in_features != heads * head_dim or proj.out_features != qkv.in_features:
        raise Unsupported("proj width disagrees with qkv")
    dim = qkv.in_features
    n = window[0] * window[1]
    require_returns(m, (2, n, dim), (2, n, dim), "[B * nW, N, C] windows", dim)
    scale = _scale(m, head_dim)
    new = WindowAttention(dim, heads, head_dim=head_dim, window_size=window,
                          qkv_bias=qkv.bias is not None, device="meta")
    new.scale = scale
    adopt(new, m, [n for n in _SWIN_CHILDREN if getattr(m, n, None) is not None]
          + ["relative_position_bias_table", "relative_position_index"])
    x = _randn(2, n, dim)
    shifted = torch.where(_randn(1, n, n) > 0.5, -100.0, 0.0).expand(2, n, n).to(torch.float64)
    return _done(new, m, [((x,), {}), ((x,), {"mask": shifted})], "Swin WindowAttention")


# ----------------------------------------------------------------------------------------------
# timm SAM-ViT Attention (vision_transformer_sam)
# ----------------------------------------------------------------------------------------------
_SAM_CHILDREN = ("qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")


def _match_timm_sam(m: nn.Module) -> bool:
    return _cls(m) == "Attention" and not _is_ours(m) and hasattr(m, "use_rel_pos") and hasattr(m, "qkv")


def _convert_timm_sam(m: nn.Module) -> nn.Module:
    if getattr(m, "rope", None) is not None:
        raise Unsupported("rope (rotary position embedding) is not served by RelPosAttention")
    extra = unexpected_state(m, children=_SAM_CHILDREN, params=("rel_pos_h", "rel_pos_w"))
    if extra:
        raise Unsupported(f"not timm's plain SAM Attention: extra state {extra}")
    require_forward(m, ("x",))
    qkv, proj = require_linear(m, "qkv"), require_linear(m, "proj")
    require_dropout(m, "attn_drop")
    heads, head_dim = _heads(m, qkv)
    dim = qkv.in_features
    if qkv.out_features != 3 * dim or proj.in_features != dim or proj.out_features != dim:
        raise Unsupported(f"qkv {qkv.in_features}->{qkv.out_features}, proj {proj.in_features}->"
                          f"{proj.out_features} are not dim -> 3 * dim, dim -> dim")
    use_rel_pos = bool(m.use_rel_pos)
    input_size, grid = None, (2, 3)
    if use_rel_pos:
        h_t, w_t = getattr(m, "rel_pos_h", None), getattr(m, "rel_pos_w", None)
        if h_t is None or w_t is None:
            raise Unsupported("use_rel_pos is True but rel_pos_h/rel_pos_w are missing")
        if (h_t.dim() != 2 or w_t.dim() != 2 or h_t.shape[1] != head_dim or w_t.shape[1] != head_dim
                or h_t.shape[0] % 2 == 0 or w_t.shape[0] % 2 == 0):
            raise Unsupported(f"rel_pos tables {tuple(h_t.shape)}, {tuple(w_t.shape)} are not "
                              f"[2 * size - 1, head_dim]")
        input_size = grid = ((h_t.shape[0] + 1) // 2, (w_t.shape[0] + 1) // 2)
    require_returns(m, (2, *grid, dim), (2, *grid, dim), "[B, H, W, C] map", dim)
    scale = _scale(m, head_dim)
    new = RelPosAttention(dim, heads, qkv_bias=qkv.bias is not None, use_rel_pos=use_rel_pos,
                          input_size=input_size, device="meta")
    new.scale = scale
    names = [n for n in _SAM_CHILDREN if getattr(m, n, None) is not None]
    adopt(new, m, names + (["rel_pos_h", "rel_pos_w"] if use_rel_pos else []))
    calls = [((_randn(2, 3, 4, dim),), {})]  # tables of another length are interpolated, by both
    if grid != (3, 4) and grid[0] * grid[1] <= 64:
        calls.append(((_randn(1, *grid, dim),), {}))
    return _done(new, m, calls, "SAM Attention")
