"""One conformance test for every registered op (``ssl_fast/ops/_registry.py``).

For each op the registration supplies the inputs; nothing here names an op. Checked per op:
``torch.library.opcheck`` of its custom ops on every backend that runs here;
``torch.compile(fullgraph=True)`` equal to eager (outputs and gradients); bad input raising the
listed ``ValueError``/``TypeError`` that names the argument; and every forced backend either
serving the sample (equal to the reference backend, outputs and gradients) or raising
``BackendUnavailableError`` with each of the reasons ``reasons(backend, *inputs)`` lists.
"""
import dataclasses
import importlib
import pkgutil

import pytest
import torch

import ssl_fast
import ssl_fast.ops
from ssl_fast import _backend
from ssl_fast.ops import _registry
from helpers import rel_error

CPU = torch.device("cpu")
SPECS = _registry.registered()
OPS = list(SPECS)


def _tensors(obj):
    """Every tensor inside ``obj`` (tensors, lists, tuples, dicts, dataclasses, NamedTuples), in order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _tensors([getattr(obj, f.name) for f in dataclasses.fields(obj)])
    if isinstance(obj, dict):
        return _tensors(list(obj.values()))
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x)]
    return []


def _run(spec, backend, fn=None):
    """Run the op on a fresh sample: ``(outputs, gradients of every input that wants one)``."""
    args, kwargs = spec.sample(CPU)
    fn = fn or (lambda *a, **kw: spec.fn(*a, backend=backend, **kw))
    result = fn(*args, **kwargs)
    outs = _tensors(args[0]) if spec.inplace else _tensors(result)
    leaves = [t for t in _tensors((args, kwargs)) if t.requires_grad]
    grads = []
    diff = [o for o in outs if o.requires_grad]
    if leaves and diff:
        g = torch.Generator().manual_seed(123)
        weights = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in diff]
        loss = sum((o * w).sum() for o, w in zip(diff, weights))
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]
    return [o.detach() for o in outs], grads


def _backend_params():
    out = []
    for op, spec in SPECS.items():
        for b in _backend.BACKENDS:
            why = spec.sample_reasons(b, CPU)
            marks = [pytest.mark.skip(reason="; ".join(why))] if why else []
            out.append(pytest.param(op, b, marks=marks, id=f"{op}-{b}"))
    return out


def test_every_op_module_registers_an_op():
    """A new file under ssl_fast/ops/ is covered by this test only through its registration."""
    modules = {f"ssl_fast.ops.{m.name}" for m in pkgutil.iter_modules(ssl_fast.ops.__path__)
               if not m.name.startswith("_")}
    registered = {spec.fn.__module__ for spec in SPECS.values()}
    for m in sorted(modules):
        importlib.import_module(m)
        assert m in registered, f"{m} registers no op with ssl_fast.ops._registry.register"


@pytest.mark.parametrize("op,backend", _backend_params())
def test_opcheck(op, backend):
    for overload, args in SPECS[op].opcheck(CPU, backend):
        torch.library.opcheck(overload, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("op", OPS)
def test_compiles_fullgraph(op):
    spec = SPECS[op]
    backend = _backend.resolve(op, CPU, lambda b: spec.sample_reasons(b, CPU), "auto")
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a, **kw: spec.fn(*a, backend=backend, **kw), fullgraph=True,
                             backend="aot_eager")
    outs, grads = _run(spec, backend, compiled)
    outs_e, grads_e = _run(spec, backend)
    assert len(outs) == len(outs_e) and len(grads) == len(grads_e)
    for a, b_ in zip(outs + grads, outs_e + grads_e):
        torch.testing.assert_close(a, b_)


@pytest.mark.parametrize("op", OPS)
def test_bad_input_names_the_argument(op):
    spec = SPECS[op]
    bad = list(spec.bad_inputs(CPU))
    assert bad, f"{op} lists no bad inputs"
    for case in bad:
        assert case.error in (ValueError, TypeError), case
        with pytest.raises(case.error, match=case.match):
            spec.fn(*case.args, **case.kwargs)


@pytest.mark.parametrize("op,backend", [pytest.param(op, b, id=f"{op}-{b}")
                                        for op in OPS for b in _backend.BACKENDS])
def test_forced_backend_serves_or_lists_its_reasons(op, backend):
    spec = SPECS[op]
    args, kwargs = spec.sample(CPU)
    why = list(spec.reasons(backend, *args, **kwargs))
    if why:
        with pytest.raises(ssl_fast.BackendUnavailableError) as info:
            spec.fn(*args, backend=backend, **kwargs)
        for reason in why:
            assert reason in str(info.value)
        with ssl_fast.use_backend(backend):  # the global setting is refused the same way
            with pytest.raises(ssl_fast.BackendUnavailableError):
                spec.fn(*spec.sample(CPU)[0], **spec.sample(CPU)[1])
        return
    outs, grads = _run(spec, backend)
    outs_r, grads_r = _run(spec, "reference")
    assert len(outs) == len(outs_r) and len(grads) == len(grads_r)
    for i, (a, b_) in enumerate(zip(outs + grads, outs_r + grads_r)):
        assert a.shape == b_.shape and a.dtype == b_.dtype, i
        if a.is_floating_point():
            assert rel_error(a, b_) <= spec.tol, f"{op} on {backend}: tensor {i} off by {rel_error(a, b_):.3g}"
        else:
            assert torch.equal(a, b_)
