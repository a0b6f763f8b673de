"""Rules for Hugging Face transformers (5.x): CvT's ``CvtSelfAttention`` (``hf_cvt``); the ViT
family's self-attention, ``ViTAttention``, ``DeiTAttention``, ``Dinov2Attention`` and
``Dinov2WithRegistersAttention`` (``hf_vit``); ``SwinAttention`` (``hf_swin``); and Swin V2's
``Swinv2SelfAttention``, recognised only to be skipped with the reason (``hf_swinv2``).

``hf_vit``/``hf_swin`` check, in order, and raise :class:`Unsupported` with the reason otherwise:

1. the code: the class's forward is its own, defined in a ``transformers.models`` module (a
   subclass that overrides it computes something else);
2. state: exactly ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (``nn.Linear`` of consistent
   widths) and, for Swin, ``relative_position_bias`` holding only its table and index, the index
   Swin's standard one;
3. attributes: ``config``, ``num_attention_heads``, ``head_dim``, a constant float ``scaling``,
   ``attention_dropout`` in [0, 1), ``is_causal`` false;
4. the forward's parameters: ``(hidden_states, attention_mask=None, **kwargs)``, the ``**kwargs``
   being what Hugging Face passes on to its attention function (the drop-in passes them on too
   when it runs Hugging Face's computation);
5. behaviour, when ``config._attn_implementation`` is ``"eager"`` or ``"sdpa"``: the forward, run on
   fake tensors, maps ``[B, N, C]`` tokens to ``(tensor [B, N, C], weights or None)``; and the
   original and the drop-in, run on small float64 inputs (with and without a mask) with the same
   random weights (:func:`ssl_fast.patch.checks.require_same_function`), agree.

``hf_cvt`` checks the ``dw_bn`` projection modules and ends with the same numerical check.

The replacement is an instance of :func:`ssl_fast.nn.hf_attention.hf_drop_in_class` (the drop-in,
then the Hugging Face class, so ``isinstance`` checks in transformers still hold) sharing the
original's submodules (the same objects), its instance attributes (``config``, ``scaling``,
``_is_hf_initialized``, ...), its train/eval mode and the ``output_attentions`` recording hooks
transformers may already have put on it. Which attention implementations run fused, and when the
drop-in runs Hugging Face's own computation instead, is in :mod:`ssl_fast.nn.hf_attention`.
"""
from typing import Optional

import torch
from torch import nn

from ssl_fast.nn.conv_attention import CvtSelfAttention
from ssl_fast.nn.hf_attention import (
    HFSwinAttention,
    HFViTAttention,
    _is_hf_capture_hook,
    _served_implementation,
    _standard_index,
    hf_drop_in_class,
)
from ssl_fast.patch.checks import (
    Unsupported,
    _cls,
    _is_ours,
    adopt,
    finish,
    forward_parameters,
    probe,
    require_dropout,
    require_linear,
    require_same_function,
    unexpected_state,
)

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
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3 * 4 + int(bool(m.with_cls_token)), embed_dim, generator=g, dtype=torch.float64)
    require_same_function(m, new, [((x, 3, 4), {})], "Hugging Face CvtSelfAttention")
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


# ----------------------------------------------------------------------------------------------
# ViT, DeiT, DINOv2 (with registers) and Swin self-attention
# ----------------------------------------------------------------------------------------------
_HF_VIT_FAMILY = ("ViTAttention", "DeiTAttention", "Dinov2Attention", "Dinov2WithRegistersAttention")
_HF_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
_MODULE_INTERNALS = frozenset(vars(nn.Module()))  # what every nn.Module holds in its __dict__


def _match_hf_vit(m: nn.Module) -> bool:
    return (_cls(m) in _HF_VIT_FAMILY and not _is_ours(m) and hasattr(m, "config")
            and all(hasattr(m, n) for n in _HF_PROJ))


def _match_hf_swin(m: nn.Module) -> bool:
    return (_cls(m) == "SwinAttention" and not _is_ours(m) and hasattr(m, "config")
            and hasattr(m, "relative_position_bias") and all(hasattr(m, n) for n in _HF_PROJ))


def _is_swinv2_self(m) -> bool:
    return (_cls(m) == "Swinv2SelfAttention" and not _is_ours(m) and hasattr(m, "logit_scale")
            and hasattr(m, "continuous_position_bias_mlp"))


def _match_hf_swinv2(m: nn.Module) -> bool:
    """Swin V2's self-attention, and its ``Swinv2Attention`` wrapper (so the report gives the reason
    for both rather than calling the wrapper unknown)."""
    return _is_swinv2_self(m) or (_cls(m) == "Swinv2Attention" and _is_swinv2_self(getattr(m, "self", None)))


_SWINV2_WHY = ("Swin V2 cosine attention, softmax(exp(logit_scale) cos(q, k) + 16 sigmoid(mlp(coords))): a learned "
               "per-head logit scale on cosine similarities and a bias from a continuous position-bias MLP, where "
               "the drop-in computes scaled dot products with a bias table")


def _convert_hf_swinv2(m: nn.Module) -> nn.Module:
    if _cls(m) == "Swinv2Attention":
        raise Unsupported(f"its self-attention is Swinv2SelfAttention ({_SWINV2_WHY})")
    raise Unsupported(_SWINV2_WHY)


def _require_hf_code(m: nn.Module) -> None:
    """The forward is the class's own and Hugging Face's (not a subclass override, not user code)."""
    cls = type(m)
    if "forward" not in vars(cls):
        raise Unsupported(f"{cls.__name__} inherits its forward from {cls.__mro__[1].__name__}: not the "
                          f"Hugging Face class the rule was written against")
    where = getattr(vars(cls)["forward"], "__module__", "") or ""
    if not (cls.__module__.startswith("transformers.models.") and where == cls.__module__):
        raise Unsupported(f"its forward is defined in {where or 'an unknown module'}, not in Hugging Face "
                          f"transformers' transformers.models package")


def _require_hf_forward(m: nn.Module) -> None:
    """``forward(hidden_states, attention_mask=None, **kwargs)``, nothing else."""
    params = forward_parameters(m)
    got = [("**" if p.kind == p.VAR_KEYWORD else "*" if p.kind == p.VAR_POSITIONAL else "") + p.name
           for p in params]
    shape_ok = (len(params) == 3 and [p.name for p in params[:2]] == ["hidden_states", "attention_mask"]
                and params[0].kind in (params[0].POSITIONAL_OR_KEYWORD, params[0].POSITIONAL_ONLY)
                and params[1].kind == params[1].POSITIONAL_OR_KEYWORD and params[1].default is None
                and params[2].kind == params[2].VAR_KEYWORD)
    if not shape_ok:
        raise Unsupported(f"forward takes ({', '.join(got)}), not (hidden_states, attention_mask=None, **kwargs)")


def _require_hf_attributes(m: nn.Module) -> None:
    heads, head_dim = getattr(m, "num_attention_heads", None), getattr(m, "head_dim", None)
    for name, value in (("num_attention_heads", heads), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise Unsupported(f"{name} is {value!r}, not a positive int")
    scaling = getattr(m, "scaling", None)
    if isinstance(scaling, torch.Tensor) or not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise Unsupported(f"scaling is {type(scaling).__name__}, not a constant float")
    dropout = getattr(m, "attention_dropout", None)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise Unsupported(f"attention_dropout is {dropout!r}, not a probability in [0, 1)")
    if getattr(m, "is_causal", False) is not False:
        raise Unsupported(f"is_causal is {m.is_causal!r}: causal attention is not what the drop-in computes")
    if not hasattr(m.config, "_attn_implementation"):
        raise Unsupported("config has no _attn_implementation: not a transformers 5 config")
    inner = heads * head_dim
    for name in _HF_PROJ:
        layer = require_linear(m, name)
        want_in, want_out = (inner, layer.out_features) if name == "o_proj" else (layer.in_features, inner)
        if (layer.in_features, layer.out_features) != (want_in, want_out):
            raise Unsupported(f"{name} maps {layer.in_features} -> {layer.out_features}, not to/from "
                              f"num_attention_heads * head_dim = {inner}")
    hidden = m.q_proj.in_features
    if m.k_proj.in_features != hidden or m.v_proj.in_features != hidden or m.o_proj.out_features != hidden:
        raise Unsupported(f"q/k/v_proj take {m.q_proj.in_features}/{m.k_proj.in_features}/{m.v_proj.in_features} "
                          f"channels and o_proj gives {m.o_proj.out_features}: not one hidden size")


def _require_hf_returns(m: nn.Module, shape) -> None:
    """On fake tensors, ``[B, N, C]`` tokens -> ``(tensor [B, N, C], weights or None)``; run only
    under the eager and SDPA implementations (flex attention compiles its kernel)."""
    if _served_implementation(m.config) is None:
        return
    out = probe(m, shape)
    layout = "[B, N, C] tokens"
    if not isinstance(out, tuple) or len(out) != 2:
        raise Unsupported(f"its forward returns {type(out).__name__}"
                          f"{f' of {len(out)}' if isinstance(out, (tuple, list)) else ''} for {layout}, "
                          f"not (attn_output, attn_weights)")
    if not isinstance(out[0], torch.Tensor) or tuple(out[0].shape) != tuple(shape):
        got = list(out[0].shape) if isinstance(out[0], torch.Tensor) else type(out[0]).__name__
        raise Unsupported(f"its forward maps {layout} {list(shape)} to {got}, the drop-in keeps the shape")
    if out[1] is not None and not isinstance(out[1], torch.Tensor):
        raise Unsupported(f"its attention weights are {type(out[1]).__name__}, not a tensor or None")


class _AttnOutput(nn.Module):
    """``attn_output`` alone of a Hugging Face attention's ``(attn_output, attn_weights)``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)[0]


def _build_hf(m: nn.Module, drop_in: type, make, calls) -> nn.Module:
    """The replacement: a meta-built ``hf_drop_in_class(drop_in, type(m))`` given ``m``'s children
    (each keeping its own mode), instance attributes, mode and Hugging Face's recording hooks,
    after :func:`require_same_function` on ``calls`` (under the eager and SDPA implementations: the
    others run Hugging Face's forward in the drop-in too). The tolerance allows for Hugging Face's
    eager softmax, taken in float32 whatever the input dtype."""
    cls = hf_drop_in_class(drop_in, type(m))
    new = make(cls)
    modes = {id(sub): sub.training for sub in m.modules()}
    adopt(new, m, list(m._modules))
    for name, value in vars(m).items():  # config, scaling, head_dim, is_causal, _is_hf_initialized, ...
        if name not in _MODULE_INTERNALS:
            object.__setattr__(new, name, value)
    if _served_implementation(m.config) is not None:  # the outputs; the weights' contract is by construction
        require_same_function(_AttnOutput(m), _AttnOutput(new), calls, f"Hugging Face {_cls(m)}", tol=1e-6)
    finish(new, m)
    for sub in new.modules():  # finish set every child to the parent's mode
        if sub is not new and id(sub) in modes:
            sub.training = modes[id(sub)]
    # transformers installs its output_attentions recording hooks once per model (lazily): keep them
    for hook_id, hook in m._forward_hooks.items():
        if _is_hf_capture_hook(hook):
            new._forward_hooks[hook_id] = hook
            if hook_id in m._forward_hooks_with_kwargs:
                new._forward_hooks_with_kwargs[hook_id] = True
            if hook_id in m._forward_hooks_always_called:
                new._forward_hooks_always_called[hook_id] = True
    return new


def _token_calls(batch: int, tokens: int, channels: int):
    """Inputs for :func:`require_same_function`: tokens alone, and with an additive mask as Hugging
    Face's eager path builds it (``finfo.min`` on masked keys, every query keeping some)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, tokens, channels, generator=g, dtype=torch.float64)
    mask = torch.zeros(batch, 1, tokens, tokens, dtype=torch.float64)
    mask[1, :, :, tokens // 2 + 1:] = torch.finfo(torch.float64).min
    return [((x,), {}), ((x, mask), {})]


def _window_calls(windows: int, tokens: int, channels: int):
    """Inputs for :func:`require_same_function`: windows alone, and with a shifted-window mask
    ``[nW, N, N]`` of 0/-100 (two windows per image)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * windows, tokens, channels, generator=g, dtype=torch.float64)
    region = torch.randint(0, 3, (windows, tokens), generator=g)
    mask = torch.where(region[:, :, None] == region[:, None, :], 0.0, -100.0).double()
    return [((x,), {}), ((x, mask), {})]


def _note_hf_attention(m: nn.Module, parent: Optional[nn.Module]) -> Optional[str]:
    """A remark when the model's attention implementation is one the drop-in does not fuse."""
    impl = getattr(getattr(m, "config", None), "_attn_implementation", None)
    if _served_implementation(m.config) is not None:
        return None
    return (f"Hugging Face {_cls(m)}: config._attn_implementation={impl!r} is not fused; the replaced modules "
            f"run Hugging Face's own computation until the model uses 'sdpa' or 'eager' "
            f"(model.set_attn_implementation('sdpa'))")


def _convert_hf_vit(m: nn.Module) -> nn.Module:
    _require_hf_code(m)
    extra = unexpected_state(m, children=_HF_PROJ)
    if extra:
        raise Unsupported(f"not the plain Hugging Face {_cls(m)}: extra state {extra}")
    _require_hf_attributes(m)
    _require_hf_forward(m)
    _require_hf_returns(m, (2, 3, m.q_proj.in_features))
    return _build_hf(m, HFViTAttention, lambda cls: cls(m.config, device="meta"),
                     _token_calls(2, 5, m.q_proj.in_features))


def _convert_hf_swin(m: nn.Module) -> nn.Module:
    _require_hf_code(m)
    extra = unexpected_state(m, children=_HF_PROJ + ("relative_position_bias",))
    if extra:
        raise Unsupported(f"not the plain Hugging Face SwinAttention: extra state {extra}")
    _require_hf_attributes(m)
    rpb = m.relative_position_bias
    if _cls(rpb) != "SwinRelativePositionBias":
        raise Unsupported(f"relative_position_bias is {_cls(rpb)}, not a SwinRelativePositionBias")
    extra = unexpected_state(rpb, params=("relative_position_bias_table",), buffers=("relative_position_index",))
    if extra:
        raise Unsupported(f"relative_position_bias is not the plain table: extra state {extra}")
    ws = getattr(rpb, "window_size", None)
    if (not isinstance(ws, (tuple, list)) or len(ws) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in ws)):
        raise Unsupported(f"relative_position_bias.window_size is {ws!r}, not a pair of positive ints")
    table = getattr(rpb, "relative_position_bias_table", None)
    want = ((2 * ws[0] - 1) * (2 * ws[1] - 1), m.num_attention_heads)
    if not isinstance(table, nn.Parameter) or tuple(table.shape) != want:
        raise Unsupported(f"relative_position_bias_table is {type(table).__name__} "
                          f"{list(getattr(table, 'shape', []))}, not a parameter of shape {list(want)}")
    if getattr(rpb, "window_area", None) != ws[0] * ws[1]:
        raise Unsupported(f"relative_position_bias.window_area is {getattr(rpb, 'window_area', None)!r}, "
                          f"not {ws[0]} * {ws[1]}")
    index = getattr(rpb, "relative_position_index", None)
    if isinstance(index, torch.Tensor) and not index.is_meta:
        if not _standard_index(rpb):
            raise Unsupported("relative_position_index is not Swin's standard index for its window "
                              "(the kernel derives that one from the window size)")
    _require_hf_forward(m)
    _require_hf_returns(m, (2, ws[0] * ws[1], m.q_proj.in_features))
    if ws[0] != ws[1]:
        raise Unsupported(f"window {ws[0]}x{ws[1]} is not square (Hugging Face's SwinAttention takes one size)")
    return _build_hf(m, HFSwinAttention, lambda cls: cls(m.config, m.q_proj.in_features, m.num_attention_heads,
                                                       ws[0], device="meta"),
                     _window_calls(2, ws[0] * ws[1], m.q_proj.in_features))
