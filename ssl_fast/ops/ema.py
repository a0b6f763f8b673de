"""EMA (momentum-teacher) update: ``e <- m * e + (1 - m) * t`` for every pair, in place."""
from collections import defaultdict
from typing import List, Optional, Sequence, Union

import torch

from ssl_fast import _backend
from ssl_fast._ext import cpp_reasons
from ssl_fast._triton import triton_reasons
from ssl_fast.ops import _registry
from ssl_fast.reference import ema as reference

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _reasons(backend: str, device: torch.device) -> List[str]:
    """Why ``backend`` cannot update tensors on ``device`` (the device-level part of :func:`reasons`)."""
    if backend == "triton":
        return triton_reasons(device)
    if backend == "cpp":
        return cpp_reasons("ema_", device)
    return []


def reasons(backend: str, ema_tensors: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor],
            momentum: Union[float, torch.Tensor] = 0.0) -> List[str]:
    """Why ``backend`` cannot serve :func:`ema_` for these arguments (empty when it can)."""
    device = ema_tensors[0].device if len(ema_tensors) else torch.device("cpu")
    return _reasons(backend, device)


@torch.library.custom_op("ssl_fast::ema_", mutates_args=("ema_tensors",))
def _ema_op(ema_tensors: List[torch.Tensor], tensors: List[torch.Tensor], momentum: float,
            momentum_tensor: Optional[torch.Tensor], backend: str) -> None:
    if backend == "triton":
        from ssl_fast.kernels import ema as kernel

        groups = defaultdict(lambda: ([], []))
        for e, t in zip(ema_tensors, tensors):
            g = groups[(e.dtype, t.dtype)]
            g[0].append(e)
            g[1].append(t)
        for es, ts in groups.values():
            kernel.ema_group(es, ts, momentum, momentum_tensor)
    elif backend == "cpp":
        torch.ops.ssl_fast_C.ema_(ema_tensors, tensors, momentum, momentum_tensor)
    else:
        reference.ema_(ema_tensors, tensors, momentum if momentum_tensor is None else momentum_tensor)


@_ema_op.register_fake
def _ema_fake(ema_tensors, tensors, momentum, momentum_tensor, backend) -> None:
    return None


def ema_(ema_tensors: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor],
         momentum: Union[float, torch.Tensor], *, backend: Optional[str] = None) -> None:
    """Momentum (EMA) update of ``ema_tensors`` towards ``tensors``, in place.

    For every pair ``(e, t)``: ``e <- m * e + (1 - m) * t``, computed in float32 (float64 for
    float64 tensors) and rounded once to ``e``'s dtype. Pairs may differ in dtype (a float32
    teacher and a bf16 student); integer and bool tensors (such as BatchNorm's
    ``num_batches_tracked``) are copied from an integer or bool student. No autograd: the
    teacher is updated outside the graph.

    Args:
        ema_tensors: tensors updated in place, for example a teacher's parameters; each of
            shape ``S_i``, float32/float16/bfloat16/float64, or integer/bool (copied).
        tensors: tensors of the same shapes ``S_i`` (no broadcasting), for example the
            student's parameters; floating where the teacher is floating, integer or bool where
            it is integer or bool.
        momentum: ``m`` in [0, 1], a Python float or a 0-d real floating tensor. A tensor on the
            CPU is checked on the host (NaN or a value outside [0, 1] raises; not inside a
            graph traced by ``torch.compile``, where the value is unknown). A tensor on an
            accelerator is **not** checked, since reading it would synchronise the host with the
            device; a scheduled momentum kept there needs no synchronisation, and the caller
            keeps it in [0, 1] (a value outside extrapolates, NaN makes the teacher NaN).
        backend: force ``"triton"``, ``"cpp"`` or ``"reference"``; default: the global choice.

    Raises:
        TypeError: an argument of the wrong type or dtype: a complex tensor, a floating student
            for an integer teacher (it would be truncated), an integer student for a floating
            teacher, a momentum tensor that is not real floating.
        ValueError: lists of different lengths, a shape mismatch, mixed devices, a momentum
            outside [0, 1] or NaN (a Python float, or a tensor on the CPU), a momentum tensor
            that is not 0-d.
    """
    for name, seq in (("ema_tensors", ema_tensors), ("tensors", tensors)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
    if len(ema_tensors) != len(tensors):
        raise ValueError(f"ema_tensors has {len(ema_tensors)} tensors but tensors has {len(tensors)}")
    if not ema_tensors:
        return
    momentum_tensor = None
    if isinstance(momentum, torch.Tensor):
        if not momentum.is_floating_point():
            raise TypeError(f"momentum tensor must be a real floating tensor (float32/float64/"
                            f"float16/bfloat16), got dtype {momentum.dtype}")
        if momentum.dim() != 0:
            raise ValueError(f"momentum tensor must be a 0-d floating tensor, got shape "
                             f"{tuple(momentum.shape)} and dtype {momentum.dtype}")
        # on the host reading it costs no synchronisation (not while torch.compile traces: the
        # value is not known then)
        if momentum.device.type == "cpu" and not torch.compiler.is_compiling():
            value = float(momentum)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"momentum must be in [0, 1], got a tensor holding {value}")
        # a device tensor is not read: that would synchronise (see the docstring)
        momentum_tensor, momentum = momentum, 0.0
    elif isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float or a 0-d tensor, got {type(momentum).__name__}")
    elif not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    device = None
    for i, (e, t) in enumerate(zip(ema_tensors, tensors)):
        if not isinstance(e, torch.Tensor) or not isinstance(t, torch.Tensor):
            raise TypeError(f"ema_tensors[{i}] and tensors[{i}] must be tensors, got "
                            f"{type(e).__name__} and {type(t).__name__}")
        if e.shape != t.shape:
            raise ValueError(f"ema_tensors[{i}] has shape {tuple(e.shape)} but tensors[{i}] has "
                             f"shape {tuple(t.shape)}")
        device = e.device if device is None else device
        if e.device != device or t.device != device:
            raise ValueError(f"ema_tensors[{i}] is on {e.device} and tensors[{i}] on {t.device}, "
                             f"but ema_tensors[0] is on {device}; all tensors must be on one device")
        if e.is_complex() or t.is_complex():
            raise TypeError(f"ema_tensors[{i}] is {e.dtype} and tensors[{i}] is {t.dtype}, but "
                            "complex tensors are not supported: both must be float32, float16, "
                            "bfloat16 or float64 (or integer/bool, which are copied)")
        if not e.is_floating_point() and t.is_floating_point():
            raise TypeError(f"ema_tensors[{i}] is {e.dtype} but tensors[{i}] is {t.dtype}: a "
                            "floating student cannot be averaged into an integer teacher (it "
                            "would be truncated); make the teacher floating or the student integer")
        if e.is_floating_point() and (e.dtype not in _FLOATS or t.dtype not in _FLOATS):
            raise TypeError(f"ema_tensors[{i}] ({e.dtype}) and tensors[{i}] ({t.dtype}) must both "
                            "be float32, float16, bfloat16 or float64")
    name = _backend.resolve("ema_", device, lambda b: reasons(b, ema_tensors, tensors, momentum), backend)
    with torch.no_grad():
        floats_e, floats_t, copy_back = [], [], []
        for e, t in zip(ema_tensors, tensors):
            if not e.is_floating_point():
                e.copy_(t)
                continue
            if e.numel() == 0:
                continue
            if not e.is_contiguous():
                work = e.contiguous()
                copy_back.append((e, work))
                e = work
            floats_e.append(e)
            floats_t.append(t.contiguous())
        if momentum_tensor is not None:
            momentum_tensor = momentum_tensor.to(device)
        if floats_e:
            torch.ops.ssl_fast.ema_(floats_e, floats_t, float(momentum), momentum_tensor, name)
        for e, work in copy_back:
            e.copy_(work)


def _sample(device: torch.device):
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (33,), (2, 3, 4)]
    teacher = [torch.randn(s, generator=g).to(device) for s in shapes] + [torch.tensor(3, device=device)]
    student = [torch.randn(s, generator=g).to(device) for s in shapes] + [torch.tensor(5, device=device)]
    student[1] = student[1].to(torch.bfloat16)
    return (teacher, student, 0.75), {}


def _bad_inputs(device: torch.device):
    e = [torch.zeros(3, device=device)]
    t = [torch.ones(3, device=device)]
    return [
        _registry.BadInput((e, t, 1.5), {}, ValueError, r"momentum must be in \[0, 1\]"),
        _registry.BadInput((e, [torch.ones(4, device=device)], 0.5), {}, ValueError, r"tensors\[0\] has shape"),
        _registry.BadInput((e[0], t, 0.5), {}, TypeError, "ema_tensors must be a list"),
        _registry.BadInput((e, t, "0.5"), {}, TypeError, "momentum must be a float"),
    ]


def _opcheck(device: torch.device, backend: str):
    g = torch.Generator().manual_seed(1)
    e = [torch.randn(5, 3, generator=g).to(device), torch.randn(9, generator=g).to(device)]
    t = [torch.randn(5, 3, generator=g).to(device), torch.randn(9, generator=g).to(device)]
    return [(torch.ops.ssl_fast.ema_.default, (e, t, 0.9, None, backend))]


_registry.register(_registry.OpSpec(
    name="ema_", fn=ema_, reasons=reasons, sample=_sample, bad_inputs=_bad_inputs, opcheck=_opcheck,
    cpp_kernels=("ema_",), inplace=True))
