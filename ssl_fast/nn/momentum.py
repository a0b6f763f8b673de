"""Momentum (EMA) teachers: lightly's ``update_momentum`` and a scheduled teacher wrapper."""
import copy
import math

import torch
from torch import nn

from ssl_fast import _backend
from ssl_fast._checks import check_int, check_real
from ssl_fast.ops import ema as _ema_op
from ssl_fast.ops.ema import ema_


def update_momentum(model: nn.Module, model_ema: nn.Module, m: float) -> None:
    """Update ``model_ema``'s parameters towards ``model``'s: ``ema <- m * ema + (1 - m) * model``.

    Same signature and meaning as ``lightly.models.utils.update_momentum`` (parameters only,
    buffers untouched), done as one fused multi-tensor update.

    Args:
        model: the online (student) network.
        model_ema: the momentum (teacher) network, updated in place.
        m: momentum in [0, 1]; a 0-d tensor is accepted too.
    """
    src = list(model.parameters())
    dst = list(model_ema.parameters())
    if len(src) != len(dst):
        raise ValueError(f"model has {len(src)} parameters but model_ema has {len(dst)}")
    ema_(dst, src, m)


def _params_and_buffers(module: nn.Module):
    """``(list(module.parameters()), list(module.buffers()))`` in one walk of the module tree
    (the same order and the same de-duplication; two walks cost more than the update itself on
    small models)."""
    params, bufs, seen_modules, seen = [], [], set(), set()

    def visit(m):
        seen_modules.add(id(m))
        for p in m._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        for b in m._buffers.values():
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                bufs.append(b)
        for c in m._modules.values():
            if c is not None and id(c) not in seen_modules:
                visit(c)

    visit(module)
    return params, bufs


def cosine_momentum(step: int, total_steps: int, base: float, final: float) -> float:
    """``m_k = final - (final - base) * (cos(pi k / K) + 1) / 2``, held at ``final`` after K steps."""
    if step >= total_steps:
        return final
    return final - (final - base) * (math.cos(math.pi * step / total_steps) + 1) / 2


class MomentumTeacher(nn.Module):
    """A frozen copy of a student, updated as the EMA of it on a cosine momentum schedule.

    ``teacher.module`` is the copy (no gradients); ``teacher(x)`` runs it under ``no_grad``.
    ``update()`` applies one EMA step with the current momentum to every parameter, copies
    every buffer (BatchNorm running statistics), and advances the schedule. The step is a
    buffer, so ``state_dict()`` carries it and a resumed run continues the schedule exactly.

    Args:
        student: the online network; it is copied, and remembered (not registered, so its
            parameters appear neither in this module's ``parameters()`` nor its state_dict).
        base_momentum: momentum at step 0 (DINO: 0.996).
        final_momentum: momentum at ``total_steps`` and after (DINO: 1.0).
        total_steps: length K of the cosine schedule, usually epochs x iterations per epoch.
    """

    def __init__(self, student: nn.Module, base_momentum: float = 0.996,
                 final_momentum: float = 1.0, total_steps: int = 1):
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        self.base_momentum = check_real("base_momentum", base_momentum, low=0.0, high=1.0)
        self.final_momentum = check_real("final_momentum", final_momentum, low=0.0, high=1.0)
        self.total_steps = check_int("total_steps", total_steps, low=1)
        self.module = copy.deepcopy(student)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        object.__setattr__(self, "_student", student)
        self._step_host = 0  # host mirror of `step`: reading the buffer would synchronise
        # the checked pairing of the last update, keyed by every tensor's identity, shape, dtype
        # and device: later updates of the same tensors skip the checks (update's Python cost)
        self._plan_key = None
        self._plan = None

    @property
    def student(self) -> nn.Module:
        return self._student

    @property
    def momentum(self) -> float:
        """The momentum the next ``update()`` uses."""
        return cosine_momentum(self._step_host, self.total_steps, self.base_momentum,
                               self.final_momentum)

    @torch.no_grad()
    def update(self, student: nn.Module = None) -> float:
        """One EMA step towards ``student`` (default: the one given at construction).

        Parameters: ``p_teacher <- m * p_teacher + (1 - m) * p_student`` (:func:`ema_`, with its
        dtype rules). Buffers: copied, ``b_teacher <- b_student``. Every pair, taken in
        registration order, must have the same shape (nothing is broadcast); a floating buffer
        is not copied into an integer one (it would be truncated), nor a complex one anywhere.
        Everything is checked before anything is written.

        Args:
            student: the network to follow; default: the one given at construction.

        Returns:
            The momentum that was applied.

        Raises:
            TypeError: ``student`` is not an ``nn.Module``; a buffer pair of dtypes that cannot
                be copied; a parameter pair :func:`ema_` refuses.
            ValueError: different numbers of parameters or buffers, or a pair of different
                shapes (the message names the parameter or buffer).
        """
        student = self._student if student is None else student
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        m = self.momentum
        t_params, t_bufs = _params_and_buffers(self.module)
        s_params, s_bufs = _params_and_buffers(student)
        tensors = (t_params, s_params, t_bufs, s_bufs)
        key = tuple((id(t), t.shape, t.dtype, t.device) for group in tensors for t in group)
        if key != self._plan_key:
            self._plan_key, self._plan = None, None
            self._check_pairs(student)
            self._plan = self._make_plan(*tensors)
            self._plan_key = key
        if self._plan is None:  # tensors the fused call cannot take as they are: the checked path
            ema_(tensors[0], tensors[1], m)
        else:
            floats_t, floats_s, copies = self._plan
            if floats_t:
                name = _backend.resolve("ema_", floats_t[0].device,
                                        lambda b: _ema_op.reasons(b, floats_t, floats_s, m))
                torch.ops.ssl_fast.ema_(floats_t, floats_s, float(m), None, name)
            for tb, sb in copies:
                tb.copy_(sb)
        if self._plan is None:
            for tb, sb in zip(tensors[2], tensors[3]):
                tb.copy_(sb)
        self._step_host += 1
        self.step.fill_(self._step_host)
        return m

    def _check_pairs(self, student: nn.Module) -> None:
        """Every parameter and buffer pair by name: counts, shapes and buffer dtypes (see update)."""
        t_params = list(self.module.named_parameters())
        s_params = list(student.named_parameters())
        if len(t_params) != len(s_params):
            raise ValueError(f"student has {len(s_params)} parameters but the teacher has {len(t_params)}")
        t_bufs = list(self.module.named_buffers())
        s_bufs = list(student.named_buffers())
        if len(t_bufs) != len(s_bufs):
            raise ValueError(f"student has {len(s_bufs)} buffers but the teacher has {len(t_bufs)}")
        for kind, pairs in (("parameter", zip(t_params, s_params)), ("buffer", zip(t_bufs, s_bufs))):
            for (t_name, tb), (s_name, sb) in pairs:
                if tb.shape != sb.shape:
                    raise ValueError(f"student {kind} {s_name!r} has shape {tuple(sb.shape)} but the "
                                     f"teacher's {t_name!r} has shape {tuple(tb.shape)}; they must "
                                     "be equal (nothing is broadcast)")
                if kind == "parameter":
                    continue  # ema_ checks the dtypes
                if tb.is_complex() or sb.is_complex():
                    raise TypeError(f"buffer {s_name!r}: student {sb.dtype}, teacher {tb.dtype}; "
                                    "complex buffers are not supported")
                if sb.is_floating_point() and not tb.is_floating_point():
                    raise TypeError(f"student buffer {s_name!r} is {sb.dtype} but the teacher's "
                                    f"{t_name!r} is {tb.dtype}: a floating buffer cannot be copied "
                                    "into an integer one (it would be truncated)")
        # ema_'s own checks of the parameter pairs (dtypes, devices), with a momentum it accepts
        if t_params:
            ema_([p.new_empty(0) for _, p in t_params], [p.new_empty(0) for _, p in s_params], 1.0)

    @staticmethod
    def _make_plan(t_params, s_params, t_bufs, s_bufs):
        """``(teacher floats, student floats, pairs to copy)`` for one fused call, or None when a
        tensor needs ema_'s general handling (non-contiguous, empty, on several devices)."""
        floats_t, floats_s, copies = [], [], []
        devices = set()
        for tp, sp in zip(t_params, s_params):
            devices.update((tp.device, sp.device))
            if not tp.is_floating_point():
                copies.append((tp, sp))
            elif tp.numel() == 0 or not tp.is_contiguous() or not sp.is_contiguous():
                return None
            else:
                floats_t.append(tp)
                floats_s.append(sp)
        if len(devices) > 1:
            return None
        copies += list(zip(t_bufs, s_bufs))
        return floats_t, floats_s, copies

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        key = prefix + "step"
        if key in state_dict:
            self._step_host = int(state_dict[key])

    def extra_repr(self) -> str:
        return (f"base_momentum={self.base_momentum}, final_momentum={self.final_momentum}, "
                f"total_steps={self.total_steps}")
