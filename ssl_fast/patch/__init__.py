"""``ssl_fast.patch(model)``: swap recognised attention modules for ssl_fast's drop-ins, in place.

Recognition is a table of :class:`PatchRule` objects (:data:`RULES`), tried in order on every
submodule. A rule's ``matches`` is a cheap test of the class name and attributes (timm and
transformers are never imported); its ``convert`` then checks what the module *does* (its
state, its forward's parameters, and what the forward returns for an input of the layout the
drop-in takes, found by running it on fake tensors: ``checks.py``) and builds the replacement,
or raises :class:`Unsupported` with the reason, which the report lists. A module a rule cannot
serve exactly is skipped, never replaced by something that computes another thing.
A new rule joins with :func:`register_rule` without touching the walker::

    ssl_fast.patch.register_rule(PatchRule("my_attn", matches=..., convert=...), before="timm_vit")

Replacements share the original's parameters, buffers and submodules (``qkv``, ``proj``,
norms, dropouts: the very objects), so optimisers, weight tying and device/dtype are untouched;
the train/eval mode is copied, and the methods the library calls on the module are kept. Hooks
registered on the replaced module itself are not carried over; hooks on its
``attn_drop``/``softmax`` children no longer see the attention probabilities (use the drop-ins'
``attention_map``).

Layout: ``core.py`` (report, walker, table), ``checks.py`` (helpers for rules), one
``<library>_rules.py`` per library whose modules are recognised.
"""
from ssl_fast.patch import hf_rules, official_rules, timm_rules, torch_rules
from ssl_fast.patch.core import (
    RULES,
    PatchReport,
    PatchRule,
    Skipped,
    Unsupported,
    patch,
    register_rule,
)

RULES[:] = [
    PatchRule("torch_mha", torch_rules._match_torch_mha, torch_rules._convert_torch_mha, torch_rules._note_torch_mha),
    # official research code (DINO, segment-anything, microsoft/CvT): before timm's rules, same class names
    PatchRule("dino_block", official_rules._match_dino_block, official_rules._convert_dino_block),
    PatchRule("dino_attention", official_rules._match_dino_attention, official_rules._convert_dino_attention_alone),
    PatchRule("sam_attention", official_rules._match_sam_attention, official_rules._convert_sam_attention),
    PatchRule("cvt_attention", official_rules._match_cvt_attention, official_rules._convert_cvt_attention),
    PatchRule("timm_swin", timm_rules._match_timm_swin, timm_rules._convert_timm_swin),
    PatchRule("timm_sam", timm_rules._match_timm_sam, timm_rules._convert_timm_sam),  # before timm_vit: same class name
    PatchRule("timm_vit", timm_rules._match_timm_vit, timm_rules._convert_timm_vit),
    PatchRule("hf_cvt", hf_rules._match_hf_cvt, hf_rules._convert_hf_cvt, hf_rules._note_hf_cvt),
    PatchRule("hf_vit", hf_rules._match_hf_vit, hf_rules._convert_hf_vit, hf_rules._note_hf_attention),
    PatchRule("hf_swin", hf_rules._match_hf_swin, hf_rules._convert_hf_swin, hf_rules._note_hf_attention),
    PatchRule("hf_swinv2", hf_rules._match_hf_swinv2, hf_rules._convert_hf_swinv2),
]

# ``ssl_fast.patch`` names the function once the package is imported (``ssl_fast/__init__``
# re-exports it), so the rule API is reachable from it as well: ``ssl_fast.patch.register_rule``.
patch.PatchRule = PatchRule
patch.PatchReport = PatchReport
patch.Skipped = Skipped
patch.Unsupported = Unsupported
patch.RULES = RULES
patch.register_rule = register_rule

__all__ = ["patch", "PatchRule", "PatchReport", "Skipped", "Unsupported", "RULES", "register_rule"]
