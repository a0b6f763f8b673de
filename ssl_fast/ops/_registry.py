"""One registration per op: how it is called, why a backend cannot serve an input, and the
sample and bad inputs that ``ssl_fast.info``, ``tests/test_ops_conformance.py`` and the
benchmarks read.

Every op answers one question the same way, as xformers' ``not_supported_reasons`` does (without
its class hierarchy): ``reasons(backend, *inputs, **options)`` takes the op's own arguments (the
public function's, without ``backend=``) and returns the list of reasons ``backend`` cannot
serve them (empty when it can). The public function resolves its backend with it::

    name = _backend.resolve("my_op", x.device, lambda b: reasons(b, x, w, alpha=alpha), backend)

and the op file registers itself once, at import, next to its public function::

    from ssl_fast.ops import _registry

    def reasons(backend, x, w, *, alpha=1.0):
        if backend == "triton":
            return triton_reasons(x.device)
        if backend == "cpp":
            return cpp_reasons("my_op_fwd", x.device) + cpp_reasons("my_op_bwd", x.device)
        return []

    def _sample(device):   # small, deterministic, gradients wanted where the op has them
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 7, 16, generator=g).to(device).requires_grad_()
        return (x, torch.randn(16, generator=g).to(device)), {"alpha": 0.5}

    def _bad_inputs(device):
        x = torch.randn(2, 7, 16, device=device)
        return [BadInput((x[0], x[0, 0]), {}, ValueError, "x must"),
                BadInput((x, x[0, 0]), {"alpha": "1"}, TypeError, "alpha")]

    def _opcheck(device, backend):   # the torch.library custom ops and the arguments to check them with
        x = torch.randn(2, 7, 16, device=device)
        return [(torch.ops.ssl_fast.my_op_fwd.default, (x, 0.5, backend))]

    _registry.register(_registry.OpSpec(
        name="my_op", fn=my_op, reasons=reasons, sample=_sample, bad_inputs=_bad_inputs,
        opcheck=_opcheck, cpp_kernels=("my_op_fwd", "my_op_bwd")))

Every module under ``ssl_fast/ops/`` whose name does not start with ``_`` is imported by
:func:`registered`, so a new op file is picked up without editing any list.
"""
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch


class BadInput(NamedTuple):
    """An input the op must refuse: ``fn(*args, **kwargs)`` raises ``error`` whose message
    matches the regular expression ``match`` (which names the offending argument)."""
    args: tuple
    kwargs: dict
    error: type
    match: str


Sample = Tuple[tuple, Dict[str, Any]]


@dataclass(frozen=True)
class OpSpec:
    """One op's registration.

    Attributes:
        name: public name (``ssl_fast.ops.<name>``), used in messages and by ``ssl_fast.info``.
        fn: the public function, called as ``fn(*args, backend=name, **kwargs)``.
        reasons: ``reasons(backend, *args, **kwargs) -> list of str``: why ``backend`` cannot
            serve these inputs (empty when it can). It never raises for a valid input.
        sample: ``sample(device) -> (args, kwargs)``: a small deterministic input on ``device``;
            tensors that should get gradients have ``requires_grad`` set. Called afresh for
            every run (an in-place op mutates its sample).
        bad_inputs: ``bad_inputs(device) -> [BadInput, ...]``.
        opcheck: ``opcheck(device, backend) -> [(OpOverload, args), ...]``: the op's
            ``torch.library`` operators with arguments for ``torch.library.opcheck``.
        cpp_kernels: names of the ``torch.ops.ssl_fast_C`` operators behind the ``cpp`` backend.
        tol: relative error allowed between backends on the float32 sample.
        inplace: the op returns nothing and updates (some of) its tensor arguments.
    """
    name: str
    fn: Callable
    reasons: Callable[..., List[str]]
    sample: Callable[[torch.device], Sample]
    bad_inputs: Callable[[torch.device], Sequence[BadInput]]
    opcheck: Callable[[torch.device, str], Sequence[Tuple[Any, tuple]]]
    cpp_kernels: Tuple[str, ...] = ()
    tol: float = 1e-5
    inplace: bool = False

    def sample_reasons(self, backend: str, device: torch.device) -> List[str]:
        """``reasons`` for this op's sample input on ``device``: whether ``backend`` serves the
        op there at all (what ``ssl_fast.info`` prints)."""
        args, kwargs = self.sample(device)
        return list(self.reasons(backend, *args, **kwargs))


_OPS: Dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    """Add (or, on re-import, replace) an op's registration; returns ``spec``."""
    if not isinstance(spec, OpSpec):
        raise TypeError(f"spec must be an OpSpec, got {type(spec).__name__}")
    if not isinstance(spec.name, str) or not spec.name.isidentifier():
        raise ValueError(f"spec.name must be an identifier, got {spec.name!r}")
    _OPS[spec.name] = spec
    return spec


def _import_all() -> None:
    import ssl_fast.ops as package

    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{info.name}")


def registered() -> Dict[str, OpSpec]:
    """Every op's registration, by name (imports every op module first)."""
    _import_all()
    return dict(sorted(_OPS.items()))


def get(name: str) -> OpSpec:
    """The registration of op ``name``."""
    ops = registered()
    if name not in ops:
        raise ValueError(f"no op named {name!r} is registered; registered: {sorted(ops)}")
    return ops[name]


def reasons(name: str, backend: str, *args, **kwargs) -> List[str]:
    """Why ``backend`` cannot serve op ``name`` for these inputs (empty when it can)."""
    return list(get(name).reasons(backend, *args, **kwargs))


def device_reasons(name: str, backend: str, device: Optional[torch.device] = None) -> List[str]:
    """Why ``backend`` cannot serve op ``name`` on ``device`` (judged on the op's sample input)."""
    return get(name).sample_reasons(backend, torch.device("cpu") if device is None else torch.device(device))
