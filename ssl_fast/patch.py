"""``ssl_fast.patch(model)``: swap recognised attention modules for ssl_fast's drop-ins, in place.

Recognition is a table of :class:`PatchRule` objects (:data:`RULES`), tried in order on every
submodule: ``matches`` looks at the class name and attributes only (timm and transformers are
never imported);
``convert`` builds the replacement or raises :class:`Unsupported` with the reason. A new rule
joins with :func:`register_rule` without touching the walker::

    ssl_fast.patch.register_rule(PatchRule("hf_cvt", matches=..., convert=...), before="timm_vit")

Replacements share the original's parameters, buffers and submodules (``qkv``, ``proj``,
norms, dropouts: the very objects), so optimisers, weight tying and device/dtype are untouched;
the train/eval mode is copied. Hooks registered on the replaced module itself are not carried
over; hooks on its ``attn_drop``/``softmax`` children no longer see the attention
probabilities (use the drop-ins' ``attention_map``).
"""
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ssl_fast.nn.attention import Attention
from ssl_fast.nn.conv_attention import CvtSelfAttention
from ssl_fast.nn.multihead_attention import MultiheadAttention
from ssl_fast.nn.rel_pos_attention import RelPosAttention
from ssl_fast.nn.window_attention import WindowAttention
from ssl_fast.reference.attention import window_relative_index


class Unsupported(Exception):
    """Raised by a rule's ``convert`` when a recognised module uses an option ssl_fast lacks;
    the message is the reason reported in :attr:`PatchReport.skipped`."""


@dataclass(frozen=True)
class PatchRule:
    """One kind of module that :func:`patch` can replace.

    Attributes:
        name: short identifier (shown in the report; used by ``register_rule(before=...)``).
        matches: ``module -> bool``; cheap test on class name and attributes.
        convert: ``module -> new module`` sharing the old one's parameters; raises
            :class:`Unsupported` (reason) when the module uses an unsupported option.
        note: optional ``(module, parent) -> str or None``: a remark for the report about this
            replacement in its context.
    """
    name: str
    matches: Callable[[nn.Module], bool]
    convert: Callable[[nn.Module], nn.Module]
    note: Optional[Callable[[nn.Module, Optional[nn.Module]], Optional[str]]] = None


@dataclass
class Skipped:
    """An attention-like module left as it was."""
    name: str
    class_name: str
    reason: str


@dataclass
class PatchReport:
    """What :func:`patch` did.

    Attributes:
        model: the patched model (a new object only when the root module itself was replaced).
        replaced: qualified names of the replaced modules, in walk order.
        rules: ``name -> (original class name, rule name)`` for each replaced module.
        skipped: attention-like modules left alone, with the reason.
        notes: remarks (for example where torch may bypass a replaced module).
    """
    model: nn.Module
    replaced: List[str] = field(default_factory=list)
    rules: Dict[str, Tuple[str, str]] = field(default_factory=dict)
    skipped: List[Skipped] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"ssl_fast.patch: replaced {len(self.replaced)}, skipped {len(self.skipped)}"]
        lines += [f"  replaced {n or '<root>'} ({self.rules[n][0]}, rule {self.rules[n][1]})" for n in self.replaced]
        lines += [f"  skipped  {s.name or '<root>'} ({s.class_name}): {s.reason}" for s in self.skipped]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# helpers for rules
# ----------------------------------------------------------------------------------------------
def _cls(m: nn.Module) -> str:
    return type(m).__name__


def _is_ours(m: nn.Module) -> bool:
    return type(m).__module__.startswith("ssl_fast.")


def _unexpected(m: nn.Module, children=(), params=(), buffers=()) -> List[str]:
    """Names of registered children/parameters/buffers outside the allowed sets (``None``
    entries do not count): a module carrying extra state is not the plain variant."""
    out = [n for n, c in m._modules.items() if c is not None and n not in children]
    out += [n for n, p in m._parameters.items() if p is not None and n not in params]
    out += [n for n, b in m._buffers.items() if b is not None and n not in buffers]
    return out


def _require_linear(m: nn.Module, name: str) -> nn.Module:
    layer = getattr(m, name, None)
    if not isinstance(layer, nn.Linear):
        raise Unsupported(f"{name} is {type(layer).__name__}, not an nn.Linear")
    return layer


def _require_dropout(m: nn.Module, name: str) -> None:
    d = getattr(m, name, None)
    if not isinstance(d, nn.Dropout):
        raise Unsupported(f"{name} is {type(d).__name__}, not an nn.Dropout")


def _adopt(new: nn.Module, old: nn.Module, names) -> None:
    """Make ``new.<name>`` the very object ``old.<name>`` for each name (parameters, buffers,
    submodules or ``None``)."""
    for name in names:
        value = getattr(old, name, None)
        if name in old._buffers or name in new._buffers:
            persistent = name not in old._non_persistent_buffers_set
            if name in new._buffers:
                del new._buffers[name]
            new.register_buffer(name, value, persistent=persistent)
        else:
            setattr(new, name, value)


def _finish(new: nn.Module, old: nn.Module) -> nn.Module:
    """Check nothing of the meta-built shell survived and copy the train/eval mode."""
    left = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    old_meta = any(t.is_meta for t in list(old.parameters()) + list(old.buffers()))
    if left and not old_meta:
        raise RuntimeError(f"internal error: {type(new).__name__} kept placeholder tensors {left}")
    new.train(old.training)
    return new


def _timm_scale(m: nn.Module, head_dim: int) -> float:
    scale = getattr(m, "scale", None)
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, torch.Tensor):
        raise Unsupported("scale is a tensor (learned temperature), not a constant")
    return float(scale)


# ----------------------------------------------------------------------------------------------
# torch.nn.MultiheadAttention
# ----------------------------------------------------------------------------------------------
def _match_torch_mha(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention)


def _convert_torch_mha(m: nn.Module) -> nn.Module:
    if type(m).forward is not nn.MultiheadAttention.forward:
        raise Unsupported(f"subclass {_cls(m)} overrides forward")
    if (m.bias_k is None) != (m.bias_v is None):
        raise Unsupported("only one of bias_k/bias_v is set")
    extra = _unexpected(m, children=("out_proj",),
                        params=("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                                "in_proj_bias", "bias_k", "bias_v"))
    if extra:
        raise Unsupported(f"extra state {extra}")
    new = MultiheadAttention(m.embed_dim, m.num_heads, dropout=m.dropout, bias=m.in_proj_bias is not None,
                             add_bias_kv=m.bias_k is not None, add_zero_attn=m.add_zero_attn,
                             kdim=m.kdim, vdim=m.vdim, batch_first=m.batch_first, device="meta")
    if new._qkv_same_embed_dim != m._qkv_same_embed_dim:
        raise Unsupported("projection layout (_qkv_same_embed_dim) differs from kdim/vdim")
    _adopt(new, m, ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                    "bias_k", "bias_v", "out_proj"])
    return _finish(new, m)


def _note_torch_mha(m: nn.Module, parent: Optional[nn.Module]) -> Optional[str]:
    if parent is not None and _cls(parent) == "TransformerEncoderLayer":
        return ("TransformerEncoderLayer may run torch's fused encoder kernel (eval mode, no grad, "
                "batch_first, even heads) with the shared weights instead of calling its self_attn; "
                "results are the same. torch.backends.mha.set_fastpath_enabled(False) routes every "
                "call through ssl_fast")
    return None


# ----------------------------------------------------------------------------------------------
# timm Attention (ViT)
# ----------------------------------------------------------------------------------------------
_VIT_CHILDREN = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop")


def _match_timm_vit(m: nn.Module) -> bool:
    return (_cls(m) == "Attention" and not _is_ours(m) and hasattr(m, "qkv") and hasattr(m, "proj")
            and hasattr(m, "num_heads"))


def _convert_timm_vit(m: nn.Module) -> nn.Module:
    extra = _unexpected(m, children=_VIT_CHILDREN)
    if extra:
        raise Unsupported(f"not the plain timm Attention: extra state {extra}")
    qkv, proj = _require_linear(m, "qkv"), _require_linear(m, "proj")
    _require_dropout(m, "attn_drop")
    heads = int(m.num_heads)
    if qkv.out_features % (3 * heads) != 0:
        raise Unsupported(f"qkv.out_features={qkv.out_features} is not 3 * num_heads * head_dim")
    head_dim = qkv.out_features // (3 * heads)
    if getattr(m, "head_dim", head_dim) != head_dim or proj.in_features != heads * head_dim:
        raise Unsupported("head_dim / proj width disagree with qkv")
    new = Attention(qkv.in_features, heads, attn_head_dim=head_dim, dim_out=proj.out_features,
                    qkv_bias=qkv.bias is not None, proj_bias=proj.bias is not None, device="meta")
    new.scale = _timm_scale(m, head_dim)
    _adopt(new, m, [n for n in _VIT_CHILDREN if getattr(m, n, None) is not None])
    return _finish(new, m)


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
    extra = _unexpected(m, children=_SWIN_CHILDREN, params=("relative_position_bias_table",),
                        buffers=("relative_position_index",))
    if extra:
        raise Unsupported(f"not the plain Swin WindowAttention: extra state {extra}")
    qkv, proj = _require_linear(m, "qkv"), _require_linear(m, "proj")
    _require_dropout(m, "attn_drop")
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
    new.scale = _timm_scale(m, head_dim)
    _adopt(new, m, [n for n in _SWIN_CHILDREN if getattr(m, n, None) is not None]
           + ["relative_position_bias_table", "relative_position_index"])
    return _finish(new, m)


# ----------------------------------------------------------------------------------------------
# timm SAM-ViT Attention (vision_transformer_sam)
# ----------------------------------------------------------------------------------------------
_SAM_CHILDREN = ("qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")


def _match_timm_sam(m: nn.Module) -> bool:
    return _cls(m) == "Attention" and not _is_ours(m) and hasattr(m, "use_rel_pos") and hasattr(m, "qkv")


def _convert_timm_sam(m: nn.Module) -> nn.Module:
    if getattr(m, "rope", None) is not None:
        raise Unsupported("rope (rotary position embedding) is not supported")
    extra = _unexpected(m, children=_SAM_CHILDREN, params=("rel_pos_h", "rel_pos_w"))
    if extra:
        raise Unsupported(f"not the plain SAM Attention: extra state {extra}")
    qkv, proj = _require_linear(m, "qkv"), _require_linear(m, "proj")
    _require_dropout(m, "attn_drop")
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
    new.scale = _timm_scale(m, dim // heads)
    names = [n for n in _SAM_CHILDREN if getattr(m, n, None) is not None]
    _adopt(new, m, names + (["rel_pos_h", "rel_pos_w"] if use_rel_pos else []))
    return _finish(new, m)


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers CvtSelfAttention (CvT)
# ----------------------------------------------------------------------------------------------
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
    extra = (_unexpected(p, children=("convolution_projection", "linear_projection"))
             + _unexpected(conv_proj, children=("convolution", "normalization")) + _unexpected(flatten))
    if extra:
        raise Unsupported(f"{name} is not the plain dw_bn projection: extra state {extra}")
    conv, norm = conv_proj.convolution, conv_proj.normalization
    if not isinstance(conv, nn.Conv2d) or not conv.in_channels == conv.out_channels == conv.groups == embed_dim:
        raise Unsupported(f"{name}.convolution_projection.convolution is not a depthwise Conv2d over "
                          f"embed_dim={embed_dim} channels")
    if not isinstance(norm, nn.modules.batchnorm._BatchNorm):
        raise Unsupported(f"{name}.convolution_projection.normalization is {type(norm).__name__}, not a BatchNorm")


def _convert_hf_cvt(m: nn.Module) -> nn.Module:
    extra = _unexpected(m, children=_HF_CVT_PROJ + _HF_CVT_LINEAR + ("dropout",))
    if extra:
        raise Unsupported(f"not the plain Hugging Face CvtSelfAttention: extra state {extra}")
    embed_dim, heads = int(m.embed_dim), int(m.num_heads)
    if heads < 1 or embed_dim % heads:
        raise Unsupported(f"embed_dim={embed_dim} is not divisible by num_heads={heads}")
    for name in _HF_CVT_PROJ:
        _check_hf_cvt_projection(m, name, embed_dim)
    for name in _HF_CVT_LINEAR:
        layer = _require_linear(m, name)
        if layer.in_features != embed_dim or layer.out_features != embed_dim:
            raise Unsupported(f"{name} maps {layer.in_features} -> {layer.out_features}, not embed_dim={embed_dim}")
    _require_dropout(m, "dropout")
    scale = getattr(m, "scale", embed_dim ** -0.5)
    if isinstance(scale, torch.Tensor):
        raise Unsupported("scale is a tensor, not a constant")
    # the shell's projections are replaced by the original objects, so its conv options do not matter
    new = CvtSelfAttention(heads, embed_dim, qkv_bias=m.projection_query.bias is not None,
                           attention_drop_rate=m.dropout.p, with_cls_token=bool(m.with_cls_token), device="meta")
    new.scale = float(scale)
    modes = {id(sub): sub.training for sub in m.modules()}
    _adopt(new, m, _HF_CVT_PROJ + _HF_CVT_LINEAR + ("dropout",))
    _finish(new, m)
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
# the table and the walker
# ----------------------------------------------------------------------------------------------
RULES: List[PatchRule] = [
    PatchRule("torch_mha", _match_torch_mha, _convert_torch_mha, _note_torch_mha),
    PatchRule("timm_swin", _match_timm_swin, _convert_timm_swin),
    PatchRule("timm_sam", _match_timm_sam, _convert_timm_sam),  # before timm_vit: same class name
    PatchRule("timm_vit", _match_timm_vit, _convert_timm_vit),
    PatchRule("hf_cvt", _match_hf_cvt, _convert_hf_cvt, _note_hf_cvt),
]

_ATTENTION_LIKE = re.compile(r"attention|attn|mhsa", re.IGNORECASE)


def register_rule(rule: PatchRule, before: Optional[str] = None) -> None:
    """Add ``rule`` to :data:`RULES` (replacing a rule of the same name), at the end or just
    before the rule named ``before``."""
    if not isinstance(rule, PatchRule):
        raise TypeError(f"rule must be a PatchRule, got {type(rule).__name__}")
    RULES[:] = [r for r in RULES if r.name != rule.name]
    if before is None:
        RULES.append(rule)
        return
    names = [r.name for r in RULES]
    if before not in names:
        raise ValueError(f"before={before!r} names no rule; rules are {names}")
    RULES.insert(names.index(before), rule)


def _looks_like_attention(m: nn.Module) -> bool:
    return bool(_ATTENTION_LIKE.search(_cls(m))) or (hasattr(m, "qkv") and hasattr(m, "num_heads"))


def patch(model: nn.Module, rules: Optional[List[PatchRule]] = None) -> PatchReport:
    """Replace, in place, every submodule of ``model`` that a rule recognises with its ssl_fast
    drop-in (torch ``MultiheadAttention``, timm ViT ``Attention``, Swin ``WindowAttention``,
    SAM-ViT ``Attention``, Hugging Face ``CvtSelfAttention`` by default).

    Args:
        model: any module; itself included (then use ``report.model``).
        rules: rules to use instead of :data:`RULES`.

    Returns:
        :class:`PatchReport`: replaced names, skipped attention-like modules with reasons, notes.
        A module shared at several places is converted once and the same replacement put at
        each place. Replaced modules are not descended into.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    rules = RULES if rules is None else rules
    report = PatchReport(model=model)
    done: Dict[int, nn.Module] = {}
    seen_skip = set()

    def visit(module: nn.Module, name: str, parent: Optional[nn.Module]) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        if _is_ours(module):
            return module
        for rule in rules:
            if not rule.matches(module):
                continue
            try:
                new = rule.convert(module)
            except Unsupported as why:
                if id(module) not in seen_skip:
                    seen_skip.add(id(module))
                    report.skipped.append(Skipped(name, _cls(module), f"rule {rule.name}: {why}"))
                break
            done[id(module)] = new
            report.replaced.append(name)
            report.rules[name] = (_cls(module), rule.name)
            if rule.note is not None:
                note = rule.note(module, parent)
                if note and note not in report.notes:
                    report.notes.append(note)
            return new
        else:
            unknown = _looks_like_attention(module) and id(module) not in seen_skip
            replaced_before = len(report.replaced)
            visit_children(module, name)
            # a wrapper whose attention inside was replaced (HF's CvtAttention, say) is no skip
            if unknown and len(report.replaced) == replaced_before:
                seen_skip.add(id(module))
                report.skipped.append(Skipped(name, _cls(module), "unknown class: no rule recognises it"))
            return module
        visit_children(module, name)
        return module

    def visit_children(module: nn.Module, name: str) -> None:
        for child_name, child in list(module._modules.items()):
            if child is None:
                continue
            new_child = visit(child, f"{name}.{child_name}" if name else child_name, module)
            if new_child is not child:
                module._modules[child_name] = new_child

    report.model = visit(model, "", None)
    return report


# ``ssl_fast.patch`` names this function once the package is imported (``ssl_fast/__init__``
# re-exports it), so the rule API is reachable from it as well: ``ssl_fast.patch.register_rule``.
patch.PatchRule = PatchRule
patch.PatchReport = PatchReport
patch.Skipped = Skipped
patch.Unsupported = Unsupported
patch.RULES = RULES
patch.register_rule = register_rule
