"""Helpers shared by the patch rules: what a module holds (state, layers) and what it does
(its forward's parameters, and what it returns for an input of a given layout, found by running
it on fake tensors). A check that fails raises :class:`Unsupported` with the reason."""
import contextlib
import inspect
import logging
from typing import List, Optional, Sequence

import torch
from torch import nn

from ssl_fast.patch.core import Unsupported, _cls, _is_ours  # noqa: F401  (re-exported for the rules)


def unexpected_state(m: nn.Module, children=(), params=(), buffers=()) -> List[str]:
    """Names of registered children/parameters/buffers outside the allowed sets (``None``
    entries do not count): a module carrying extra state is not the plain variant."""
    out = [n for n, c in m._modules.items() if c is not None and n not in children]
    out += [n for n, p in m._parameters.items() if p is not None and n not in params]
    out += [n for n, b in m._buffers.items() if b is not None and n not in buffers]
    return out


def require_linear(m: nn.Module, name: str) -> nn.Module:
    layer = getattr(m, name, None)
    if not isinstance(layer, nn.Linear):
        raise Unsupported(f"{name} is {type(layer).__name__}, not an nn.Linear")
    return layer


def require_dropout(m: nn.Module, name: str) -> None:
    d = getattr(m, name, None)
    if not isinstance(d, nn.Dropout):
        raise Unsupported(f"{name} is {type(d).__name__}, not an nn.Dropout")


def adopt(new: nn.Module, old: nn.Module, names) -> None:
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


def finish(new: nn.Module, old: nn.Module) -> nn.Module:
    """Check nothing of the meta-built shell survived and copy the train/eval mode."""
    left = [n for n, t in list(new.named_parameters()) + list(new.named_buffers()) if t.is_meta]
    old_meta = any(t.is_meta for t in list(old.parameters()) + list(old.buffers()))
    if left and not old_meta:
        raise RuntimeError(f"internal error: {type(new).__name__} kept placeholder tensors {left}")
    new.train(old.training)
    return new


def constant_scale(m: nn.Module, head_dim: int) -> float:
    scale = getattr(m, "scale", None)
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, torch.Tensor):
        raise Unsupported("scale is a tensor (learned temperature), not a constant")
    return float(scale)


# ----------------------------------------------------------------------------------------------
# behaviour: the forward's signature and what it returns
# ----------------------------------------------------------------------------------------------
def forward_parameters(m: nn.Module) -> list:
    """The parameters of ``type(m).forward`` after ``self``, as :class:`inspect.Parameter`."""
    try:
        params = list(inspect.signature(type(m).forward).parameters.values())
    except (TypeError, ValueError) as exc:
        raise Unsupported(f"forward has no inspectable signature ({exc})")
    return params[1:]


def require_forward(m: nn.Module, served: Sequence[str]) -> None:
    """Raise :class:`Unsupported` unless every parameter of the forward is one the drop-in serves
    (named in ``served``, in any order) and it takes no ``*args``/``**kwargs`` it could be handed
    something else through."""
    for p in forward_parameters(m):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise Unsupported(f"forward takes {'*' if p.kind == p.VAR_POSITIONAL else '**'}{p.name}, "
                              f"which the drop-in cannot pass on")
        if p.name not in served:
            raise Unsupported(f"forward takes {p.name!r}, which the drop-in does not serve "
                              f"(it serves {', '.join(served)})")


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
               "_backward_hooks")


@contextlib.contextmanager
def hooks_silenced(*modules: nn.Module):
    """Run a check without firing the hooks users registered on ``modules`` and their submodules
    (a probe must not feed fake tensors to a user's hook): each non-empty hook dict is swapped for
    an empty one and the very same dict put back afterwards, so the hooks' handles stay valid."""
    saved = []
    for m in modules:
        for sub in m.modules():
            for name in _HOOK_DICTS:
                hooks = sub.__dict__.get(name)
                if hooks:
                    saved.append((sub, name, hooks))
                    sub.__dict__[name] = type(hooks)()
    try:
        yield
    finally:
        for sub, name, hooks in saved:
            sub.__dict__[name] = hooks


def _first_tensor(m: nn.Module) -> Optional[torch.Tensor]:
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            return t
    return None


def probe(m: nn.Module, shape: Sequence[int], **kwargs):
    """Run ``m``'s forward on a fake input of ``shape`` (the dtype and device of its parameters)
    and return what it returns, as fake tensors: nothing is computed, no state changes, no hook
    registered on ``m`` or its submodules fires, and the random number generators are left as
    they were. Raise :class:`Unsupported` when the forward fails on that input."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    like = _first_tensor(m)
    dtype = like.dtype if like is not None else torch.float32
    device = like.device if like is not None else torch.device("cpu")
    devices = [device.index or 0] if device.type == "cuda" else []
    layout = "[" + ", ".join(str(s) for s in shape) + "]"
    # a forward that refuses the layout is an expected answer here: keep FakeTensorMode from
    # logging the failing meta kernel's traceback at ERROR level
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    was_disabled, fake_log.disabled = fake_log.disabled, True
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), hooks_silenced(m), \
                FakeTensorMode(allow_non_fake_inputs=True) as mode:
            x = torch.empty(tuple(shape), dtype=dtype, device=device)
            # fake copies of the state: an in-place update in the forward (BatchNorm's
            # num_batches_tracked in train mode) must not reach the module's real buffers
            state = {n: mode.from_tensor(t) for n, t in list(m.named_parameters(remove_duplicate=False))
                     + list(m.named_buffers(remove_duplicate=False))}
            return torch.func.functional_call(m, state, (x,), kwargs)
    except Exception as exc:
        raise Unsupported(f"its forward fails on a {layout} input ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})")
    finally:
        fake_log.disabled = was_disabled


def require_maps_to_same_shape(m: nn.Module, shape: Sequence[int], layout: str, **kwargs) -> None:
    """Raise :class:`Unsupported` unless the forward takes an input of ``shape`` (``layout``
    names it in messages, e.g. ``"[B, N, C] tokens"``) and returns one tensor of the same shape,
    as the drop-in does: a tuple (``(x, attn)``, say) or another shape is another contract."""
    out = probe(m, shape, **kwargs)
    if isinstance(out, (tuple, list)):
        raise Unsupported(f"its forward returns a {type(out).__name__} of {len(out)} for {layout}, "
                          f"the drop-in returns one tensor")
    if not isinstance(out, torch.Tensor):
        raise Unsupported(f"its forward returns {type(out).__name__} for {layout}, not a tensor")
    if tuple(out.shape) != tuple(shape):
        raise Unsupported(f"its forward maps {layout} {list(shape)} to {list(out.shape)}, "
                          f"the drop-in keeps the shape")
