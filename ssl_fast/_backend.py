"""Backend selection shared by every op.

Backends: ``triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``cpp`` (the
compiled extension) and ``reference`` (plain PyTorch, always available). ``auto`` takes the
first that can serve the input, in the order of :data:`AUTO_ORDER` for its device.
A forced backend (argument, :func:`set_backend`, :func:`use_backend` or the ``SSL_FAST_BACKEND``
environment variable, in that priority) that cannot serve an input raises
:class:`BackendUnavailableError` listing every reason; it never falls back silently.
"""
import contextlib
import os
import threading
from typing import Callable, Iterable, Optional

import torch

BACKENDS = ("triton", "cpp", "reference")
# The interpreter is for testing, so auto never picks Triton on the CPU.
AUTO_ORDER = {"cuda": ("triton", "cpp", "reference"), "cpu": ("cpp", "reference")}

_state = threading.local()


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve an input; the message lists why."""


def _check_name(name: str, allow_auto: bool = True) -> str:
    valid = BACKENDS + (("auto",) if allow_auto else ())
    if not isinstance(name, str) or name not in valid:
        raise ValueError(f"backend must be one of {valid}, got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Force a backend for every op in this thread (``None`` or ``"auto"`` restores automatic choice)."""
    _state.forced = None if name is None else _check_name(name)


def get_backend() -> str:
    """The backend in force: set_backend/use_backend, else ``$SSL_FAST_BACKEND``, else ``"auto"``."""
    forced = getattr(_state, "forced", None)
    if forced is not None:
        return forced
    env = os.environ.get("SSL_FAST_BACKEND", "auto") or "auto"
    if env not in BACKENDS + ("auto",):
        raise ValueError(f"SSL_FAST_BACKEND must be one of {BACKENDS + ('auto',)}, got {env!r}")
    return env


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Context manager form of :func:`set_backend`."""
    previous = getattr(_state, "forced", None)
    set_backend(name)
    try:
        yield
    finally:
        _state.forced = previous


def resolve(op: str, device: torch.device, reasons: Callable[[str], Iterable[str]],
            requested: Optional[str] = None) -> str:
    """Pick the backend for one call of ``op`` on ``device``.

    Args:
        op: public name of the op, used in messages.
        device: device of the op's tensors.
        reasons: ``reasons(backend)`` returns why that backend cannot serve this input
            (an empty iterable when it can).
        requested: a backend named by the caller; ``None`` defers to :func:`get_backend`.
    """
    name = _check_name(requested) if requested is not None else get_backend()
    if name != "auto":
        why = list(reasons(name))
        if why:
            lines = "\n".join(f"  - {w}" for w in why)
            raise BackendUnavailableError(
                f"ssl_fast.ops.{op}: backend {name!r} cannot serve this input:\n{lines}")
        return name
    for candidate in AUTO_ORDER.get(device.type, ("reference",)):
        if not list(reasons(candidate)):
            return candidate
    return "reference"
