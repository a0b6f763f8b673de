"""Helpers shared by the patch rules, in the order a rule uses them: what a module holds (state,
layers), what its forward takes (parameters) and returns for an input of a given layout (found by
running it on fake tensors, :func:`probe`), and finally whether it computes the same function as
its replacement (a float64 run of both on random weights, :func:`require_same_function`). A check
that fails raises :class:`Unsupported` with the reason."""
import contextlib
import inspect
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call

from ssl_fast._backend import use_backend
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


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _other_layout(m: nn.Module, channels: int) -> Optional[str]:
    """For a forward that refused the drop-in's layout: the 4-D layout it takes, if any."""
    for shape, what in (((2, 3, 4, channels), "a 4-D channels-last input ([B, H, W, C] or [B, T, N, C])"),
                        ((2, channels, 3, 4), "a 4-D channels-first input ([B, C, H, W])")):
        try:
            probe(m, shape)
        except Unsupported:
            continue
        return what
    return None


def require_returns(m: nn.Module, shape: Sequence[int], out_shape: Sequence[int], layout: str,
                     channels: int) -> None:
    """Raise :class:`Unsupported` unless the forward takes ``shape`` (``layout`` names it) and
    returns one tensor of ``out_shape``, checked on fake tensors."""
    try:
        out = probe(m, shape)
    except Unsupported as exc:
        other = _other_layout(m, channels)
        taken = f"; it takes {other}" if other else ""
        raise Unsupported(f"not the {layout} layout the drop-in takes: {exc}{taken}") from None
    if isinstance(out, (tuple, list)):
        raise Unsupported(f"its forward returns a {type(out).__name__} of {len(out)} for {layout} "
                          f"{_shape(shape)} (e.g. (x, attn)); the drop-in returns one tensor")
    if not isinstance(out, torch.Tensor):
        raise Unsupported(f"its forward returns {type(out).__name__} for {layout}, not a tensor")
    if tuple(out.shape) != tuple(out_shape):
        raise Unsupported(f"its forward maps {layout} {_shape(shape)} to {_shape(out.shape)}; the "
                          f"drop-in returns {_shape(out_shape)}")


# ----------------------------------------------------------------------------------------------
# the function itself: a float64 run of the original against the replacement
# ----------------------------------------------------------------------------------------------
def _flat(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    raise Unsupported(f"its forward returns {type(out).__name__}")


def _modes(*modules: nn.Module) -> Dict[nn.Module, bool]:
    return {sub: sub.training for m in modules for sub in m.modules()}


def _restore(modes: Dict[nn.Module, bool]) -> None:
    for sub, training in modes.items():
        sub.training = training


def require_same_function(old: nn.Module, new: nn.Module, calls: Sequence[Tuple[tuple, dict]], what: str,
                          tol: float = 1e-9) -> None:
    """Raise :class:`Unsupported` unless ``old`` and ``new`` return the same on every call.

    Both run in eval mode (restored afterwards) on the CPU in float64 on one intra-op thread,
    through :func:`torch.func.functional_call` with the same random values for every parameter and
    floating buffer (``running_var`` kept positive; integer buffers copied), the reference
    backend, no gradient, a forked random state and no user hook firing: the modules' own tensors,
    devices, hooks and random streams are untouched. Skipped when the module's tensors are on the
    meta device (nothing to compute with).

    Args:
        old: the module found in the model.
        new: its replacement (sharing ``old``'s submodules, so the same state names).
        calls: ``(args, kwargs)`` pairs of float64 CPU inputs for both forwards.
        what: names the module in the reason.
        tol: largest relative difference ``norm(new - old) / norm(old)`` allowed per output tensor.
    """
    tensors = list(old.named_parameters(remove_duplicate=False)) + list(old.named_buffers(remove_duplicate=False))
    if any(t.is_meta for _, t in tensors):
        return
    g = torch.Generator().manual_seed(0)
    values = {}
    for name, t in tensors:
        if t.is_floating_point():
            r = torch.randn(t.shape, generator=g, dtype=torch.float64)
            values[name] = r.abs() + 0.5 if name.endswith("running_var") else r
        else:
            values[name] = t.detach().cpu().clone()
    modes = _modes(old, new)
    threads = torch.get_num_threads()
    try:
        # the inputs are tiny: one thread (several stall for long on a loaded machine)
        torch.set_num_threads(1)
        old.eval(), new.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]), use_backend("reference"), \
                hooks_silenced(old, new):
            for args, kwargs in calls:
                want = _flat(functional_call(old, values, args, kwargs))
                got = _flat(functional_call(new, values, args, kwargs))
                if len(want) != len(got) or any(a.shape != b.shape for a, b in zip(want, got)):
                    raise Unsupported(f"{what}: the drop-in returns {[tuple(t.shape) for t in got]}, the original "
                                      f"{[tuple(t.shape) for t in want]}")
                for a, b in zip(got, want):
                    err = ((a - b).norm() / b.norm().clamp_min(1e-300)).item()
                    if not err <= tol:
                        raise Unsupported(f"{what}: its forward computes something else than the drop-in "
                                          f"(relative difference {err:.2g} on a test input)")
    except Unsupported:
        raise
    except Exception as exc:
        raise Unsupported(f"{what}: the check run failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''})")
    finally:
        torch.set_num_threads(threads)
        _restore(modes)


def finish_keeping_modes(new: nn.Module, old: nn.Module) -> nn.Module:
    """:func:`finish`, but every adopted submodule keeps its own train/eval mode (a frozen
    BatchNorm stays in eval mode inside a training model), and the children are in the
    original's order (so are the state_dict keys)."""
    for registry in ("_parameters", "_buffers", "_modules"):
        mine, theirs = getattr(new, registry), getattr(old, registry)
        for name in [n for n in theirs if n in mine] + [n for n in list(mine) if n not in theirs]:
            mine[name] = mine.pop(name)
    modes = {sub: sub.training for sub in old.modules()}
    finish(new, old)
    for sub in new.modules():
        if sub in modes:
            sub.training = modes[sub]
    return new
