"""One check for every patch rule: a real model before and after ``ssl_fast.patch``.

:func:`check_patched_matches` builds the model twice from the same seed, patches one copy and
compares it with the other, in float64 on the CPU:

* the report: exactly the expected modules replaced (by their drop-in classes) and skipped (with
  a reason containing the expected words); the state_dict keys unchanged;
* train mode: outputs and the gradient of every parameter and input, with the same random stream
  (the generator is re-seeded before each forward, so drop-path/dropout outside attention draws
  the same; attention dropout must be 0 in the configs compared);
* eval mode: outputs;
* state_dict loading both ways: the patched model's state into a fresh unpatched one and the
  unpatched model's into a fresh patched one (strict), with matching outputs after each.
"""
import copy
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch
from torch import nn

from helpers import rel_error
from ssl_fast.patch import patch


def _outputs(out):
    """The tensors of a model's output: a tensor, a tuple/list, a dict or a ModelOutput."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):  # transformers' ModelOutput is an OrderedDict
        return [t for v in out.values() for t in _outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _outputs(v)]
    return []


def _loss(tensors):
    return sum((t * t.cos()).sum() for t in tensors if t.is_floating_point() and t.requires_grad)


def _perturb(model: nn.Module, seed: int) -> None:
    """Nudge every floating parameter and buffer (zero-initialised tables, layer-scale, biases,
    BatchNorm statistics) so that no term of the forward is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    named = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    with torch.no_grad():
        for name, t in named:
            noise = torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
            if name.endswith("running_var"):
                t.add_(0.1 * noise.abs())  # stays positive
            else:
                t.add_(0.05 * noise)


def _assert_close(mine, ref, tol, what):
    a, b = _outputs(mine), _outputs(ref)
    assert len(a) == len(b), f"{what}: {len(a)} output tensors, the unpatched model gives {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape, f"{what}[{i}]: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        err = rel_error(x, y)
        assert err <= tol, f"{what}[{i}]: relative error {err:.3g} > {tol:g}"


def forward_with_seed(model, inputs, seed=1234, **kwargs):
    torch.manual_seed(seed)
    return model(*inputs, **kwargs)


def check_patched_matches(build: Callable[[], nn.Module], make_inputs: Callable[[], Sequence[torch.Tensor]],
                          replaced: Dict[str, type], skipped: Optional[Dict[str, Iterable[str]]] = None,
                          tol: float = 1e-7, forward_kwargs: Optional[dict] = None, grad_inputs: bool = True,
                          after_patch: Optional[Callable[[nn.Module], None]] = None):
    """Build, patch and compare (see the module docstring); returns ``(patched, report)``.

    Args:
        build: makes the unpatched model (called under a fixed seed, more than once).
        make_inputs: makes the forward's positional inputs (float inputs get gradients).
        replaced: qualified module name -> the ssl_fast class it must become.
        skipped: qualified module name -> words its skip reason must contain.
        tol: relative error allowed in float64 (outputs and gradients).
        forward_kwargs: keyword arguments for every forward.
        grad_inputs: also compare the gradients of floating inputs.
        after_patch: called on every model compared, the unpatched ones too, right after patching
            (e.g. timm's ``set_input_size``): the patched model must keep the methods it uses.
    """
    kwargs = forward_kwargs or {}

    def fresh():
        torch.manual_seed(0)
        m = build()
        _perturb(m, 0)
        return m.double()

    ref = fresh()
    mine = copy.deepcopy(ref)
    keys = list(ref.state_dict())
    report = patch(mine)
    mine = report.model
    assert sorted(report.replaced) == sorted(replaced), str(report)
    for name, cls in replaced.items():
        got = mine.get_submodule(name)
        assert type(got) is cls, f"{name} became {type(got).__name__}, not {cls.__name__}"
    want_skipped = skipped or {}
    got_skipped = {s.name: s.reason for s in report.skipped}
    assert set(got_skipped) == set(want_skipped), str(report)
    for name, words in want_skipped.items():
        for w in ([words] if isinstance(words, str) else words):
            assert w in got_skipped[name], f"skip reason of {name!r} lacks {w!r}: {got_skipped[name]!r}"
    assert list(mine.state_dict()) == keys, "patching changed the state_dict keys"
    after = after_patch or (lambda m: None)
    after(ref)
    after(mine)

    def inputs():
        torch.manual_seed(99)
        return [t.double() if t.is_floating_point() else t for t in make_inputs()]

    # train mode, same random stream, outputs and every gradient
    for model in (ref, mine):
        model.train()
    xr = [t.clone().requires_grad_(grad_inputs and t.is_floating_point()) for t in inputs()]
    xm = [t.clone().requires_grad_(grad_inputs and t.is_floating_point()) for t in inputs()]
    out_r, out_m = forward_with_seed(ref, xr, **kwargs), forward_with_seed(mine, xm, **kwargs)
    _assert_close(out_m, out_r, tol, "train output")
    _loss(_outputs(out_r)).backward()
    _loss(_outputs(out_m)).backward()
    grads_r = dict(ref.named_parameters())
    # a gradient that is zero in exact arithmetic (a key bias: softmax ignores it) is rounding noise
    # in both models: gradients under 1e-4 of the total norm are compared against that floor
    floor = 1e-4 * sum(float(p.grad.norm()) ** 2 for p in grads_r.values() if p.grad is not None) ** 0.5
    for name, p in mine.named_parameters():
        gr = grads_r[name].grad
        if gr is None or gr.norm() == 0:
            assert p.grad is None or p.grad.norm() <= 1e-12, f"grad of {name}: the unpatched model has none"
            continue
        assert p.grad is not None, f"grad of {name}: missing after patching"
        err = float((p.grad - gr).norm()) / max(float(gr.norm()), floor)
        assert err <= tol, f"grad of {name}: relative error {err:.3g} > {tol:g}"
    for i, (a, b) in enumerate(zip(xm, xr)):
        if b.grad is not None:
            assert rel_error(a.grad, b.grad) <= tol, f"grad of input {i}"

    # eval mode
    with torch.no_grad():
        ref.eval(), mine.eval()
        _assert_close(forward_with_seed(mine, inputs(), **kwargs), forward_with_seed(ref, inputs(), **kwargs),
                      tol, "eval output")

        # state_dict both ways, strict
        other_ref, other_mine = fresh(), patch(fresh()).model
        after(other_ref)
        after(other_mine)
        other_ref.eval(), other_mine.eval()
        other_ref.load_state_dict(mine.state_dict())
        other_mine.load_state_dict(ref.state_dict())
        _assert_close(forward_with_seed(other_ref, inputs(), **kwargs),
                      forward_with_seed(ref, inputs(), **kwargs), tol, "unpatched model loaded from the patched one")
        _assert_close(forward_with_seed(other_mine, inputs(), **kwargs),
                      forward_with_seed(ref, inputs(), **kwargs), tol, "patched model loaded from the unpatched one")
    return mine, report
