"""argparse ``type=`` callables that refuse out-of-range values with one line naming the value.

argparse prefixes the message with the flag (``argument --knn-k: must be an integer >= 1, got '0'``)
and the value quoted is the text the user typed, never a derived one.
"""
import argparse
import math
from typing import Callable, Optional

import torch


def number(kind: type = float, lo: Optional[float] = None, hi: Optional[float] = None,
           lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """A parser of ``int`` or finite ``float`` text within ``[lo, hi]`` (ends open when asked).

    Args:
        kind: ``int`` or ``float``.
        lo, hi: bounds (None: unbounded).
        lo_open, hi_open: exclude the bound itself.

    Returns:
        A function ``text -> value`` raising :class:`argparse.ArgumentTypeError`.
    """
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    need = f"{'an integer' if kind is int else 'a finite number'}{' ' if parts else ''}{' and '.join(parts)}"

    def parse(text: str):
        try:
            v = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}") from None
        if (kind is float and not math.isfinite(v)) or (lo is not None and (v <= lo if lo_open else v < lo)) or \
                (hi is not None and (v >= hi if hi_open else v > hi)):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}")
        return v

    parse.__name__ = kind.__name__
    return parse


def device(text: str) -> str:
    """``--device`` value: ``auto``, ``cpu``, or a CUDA device this machine has."""
    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return text
    if dev.type != "cuda":
        raise argparse.ArgumentTypeError(f"device type {dev.type!r} ({text!r}) is not supported; "
                                         "use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asks for a GPU but CUDA is not available here; use cpu or auto")
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {n} GPU(s), cuda:0 to cuda:{n - 1}")
    return text
