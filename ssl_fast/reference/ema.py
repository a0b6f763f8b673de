"""Reference EMA (momentum-teacher) update, with ``torch._foreach_*`` over groups of tensors.

This is the fallback every user without the compiled extension runs, so it must not be slower
than the per-parameter loop it replaces (``pt.mul_(m).add_((1 - m) * ps)``: three kernels and a
temporary per parameter). Pairs are grouped by (device, teacher dtype, student dtype) and each
group is updated by two ``_foreach`` calls, ``e *= m`` then ``e += (1 - m) * t`` (each fused across
tensors on CUDA). On the CPU a group runs in pieces of at most ``_CPU_BATCH``
elements, so the second pass finds the teacher still in cache. A half-precision teacher is
updated in a float32 workspace and rounded back once.

``torch._foreach_lerp_`` would be one pass instead of two, but its ``e + w (t - e)`` form turns
an infinite teacher or student into NaN where ``m e + (1 - m) t`` stays infinite.
"""
from collections import defaultdict
from typing import List, Sequence, Union

import torch

# elements per CPU piece: 4 MiB of float32 stays in L3 between the two passes, and is large enough
# that the per-call cost of an op split over the threads stays small next to its work
_CPU_BATCH = 1 << 20


def _acc_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in (a, b) else torch.float32


def _cpu_pieces(es: List[torch.Tensor], ts: List[torch.Tensor], limit: int):
    """Pairs split into pieces of at most ``limit`` elements (flat views of contiguous pairs)."""
    pe, pt = [], []
    for e, t in zip(es, ts):
        if e.numel() > limit and e.is_contiguous() and t.is_contiguous():
            pe += e.view(-1).split(limit)
            pt += t.view(-1).split(limit)
        else:
            pe.append(e)
            pt.append(t)
    return pe, pt


def _batches(es: List[torch.Tensor], limit: int):
    """Consecutive index ranges ``(start, stop)`` of at most ``limit`` elements, or one larger tensor."""
    start, size = 0, 0
    for j, e in enumerate(es):
        if size and size + e.numel() > limit:
            yield start, j
            start, size = j, 0
        size += e.numel()
    if start < len(es):
        yield start, len(es)


def _mul_add_(es: List[torch.Tensor], ts: List[torch.Tensor], momentum: Union[float, torch.Tensor]) -> None:
    """``e <- m * e + (1 - m) * t`` for tensors of one device and dtype (``ts`` may be of another dtype).

    A tensor momentum is only read on the device: ``_foreach_mul_``'s 0-d tensor overload, and
    ``addcmul`` with the 0-d weight ``1 - m`` broadcast against every student tensor.
    """
    if isinstance(momentum, torch.Tensor):
        m = momentum.to(device=es[0].device, dtype=es[0].dtype)
        torch._foreach_mul_(es, m)
        torch._foreach_addcmul_(es, ts, [1 - m] * len(es))
    else:
        torch._foreach_mul_(es, momentum)
        torch._foreach_add_(es, ts, alpha=1.0 - momentum)


def _views(work: torch.Tensor, like: List[torch.Tensor]) -> List[torch.Tensor]:
    """Consecutive slices of the flat ``work`` with the shapes of ``like``."""
    out, offset = [], 0
    for x in like:
        out.append(work[offset:offset + x.numel()].view(x.shape))
        offset += x.numel()
    return out


def _ema_group_(es: List[torch.Tensor], ts: List[torch.Tensor], momentum: Union[float, torch.Tensor],
                acc: torch.dtype) -> None:
    """:func:`_mul_add_` in ``acc`` for one (device, teacher dtype, student dtype) group.

    A teacher not in ``acc`` is updated in an ``acc`` workspace and copied back. On the CPU the
    group runs in pieces of at most ``_CPU_BATCH`` elements: the teacher stays in cache between
    the two passes, the workspace is reused across pieces, and so is the buffer into which the
    CPU kernels cast a student of another dtype (a fresh one per whole ViT-B matrix, 9 MiB,
    faulted its pages in anew every step).
    """
    cpu = es[0].device.type == "cpu"
    if cpu:
        es, ts = _cpu_pieces(es, ts, _CPU_BATCH)
    batches = list(_batches(es, _CPU_BATCH if cpu else sum(e.numel() for e in es)))
    work = None
    if es[0].dtype != acc:
        work = torch.empty(max(sum(e.numel() for e in es[a:b]) for a, b in batches), dtype=acc,
                           device=es[0].device)
    for a, b in batches:
        batch_e, batch_t = es[a:b], ts[a:b]
        if work is None:
            _mul_add_(batch_e, batch_t, momentum)
            continue
        views = _views(work, batch_e)
        torch._foreach_copy_(views, batch_e)
        _mul_add_(views, batch_t, momentum)
        torch._foreach_copy_(batch_e, views)  # the one rounding to the teacher's dtype


def ema_(ema_tensors: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor],
         momentum: Union[float, torch.Tensor]) -> None:
    """In place, for every pair: ``e <- m * e + (1 - m) * t``; integer tensors are copied.

    The arithmetic runs in float32, or float64 when ``e`` or ``t`` is float64, as two steps:
    ``e' = m * e`` (rounded to the arithmetic dtype), then ``e' + (1 - m) * t`` (one rounding,
    or two without a fused multiply-add), whose result is rounded once to ``e``'s dtype. ``m``
    and ``1 - m`` are rounded to the arithmetic dtype (a tensor ``m`` is cast to it first, on
    its device). ``m = 1`` leaves ``e`` unchanged and ``m = 0`` copies ``t`` exactly (for
    finite values); NaN and inf propagate as in ``m * e + (1 - m) * t``.

    Args:
        ema_tensors: tensors updated in place (any layout): float32, float16, bfloat16, float64,
            or integer (copied).
        tensors: tensors of the same shapes, on the same devices.
        momentum: ``m`` in [0, 1], a float or a 0-d floating tensor (read on the tensors'
            device only, so no host synchronisation).
    """
    groups = defaultdict(lambda: ([], []))
    copies_e, copies_t = [], []
    for e, t in zip(ema_tensors, tensors):
        if not e.is_floating_point():
            copies_e.append(e)
            copies_t.append(t)
            continue
        g = groups[(e.device, e.dtype, t.dtype)]
        g[0].append(e)
        g[1].append(t)
    if copies_e:
        torch._foreach_copy_(copies_e, copies_t)
    for (_, e_dtype, t_dtype), (es, ts) in groups.items():
        _ema_group_(es, ts, momentum, _acc_dtype(e_dtype, t_dtype))
