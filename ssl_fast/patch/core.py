"""The patch walker, its report and the rule table (:data:`RULES`); rules live in the
``*_rules`` modules beside this one and are put in the table by ``ssl_fast/patch/__init__``."""
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from torch import nn


def _cls(m: nn.Module) -> str:
    return type(m).__name__


def _is_ours(m: nn.Module) -> bool:
    return type(m).__module__.startswith("ssl_fast.")


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
# the table and the walker
# ----------------------------------------------------------------------------------------------
# filled in order by ssl_fast/patch/__init__.py; register_rule edits it in place
RULES: List[PatchRule] = []

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
    SAM-ViT ``Attention``, Hugging Face ``CvtSelfAttention`` and ViT/DeiT/DINOv2/Swin attention,
    and from the official research code
    DINO's ViT ``Block``, segment-anything's and microsoft/CvT's ``Attention``, by default).

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
