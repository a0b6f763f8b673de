"""Whether Triton can run here, and why not.

``TRITON_INTERPRET=1`` must be in the environment before triton is imported; it then runs
every kernel with numpy on the CPU (this is how the tests exercise the kernels without a GPU).
"""
import os

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    TRITON_VERSION = triton.__version__
    _IMPORT_ERROR = None
except Exception as exc:  # ImportError, or a broken install
    triton = None
    TRITON_VERSION = None
    _IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_reasons(device: torch.device) -> list:
    """Reasons the Triton backend cannot run on ``device`` (empty when it can)."""
    if _IMPORT_ERROR is not None:
        return [_IMPORT_ERROR]
    if device.type == "cuda":
        return []
    if device.type == "cpu":
        if INTERPRET:
            return []
        return ["CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 before triton is imported"]
    return [f"Triton does not run on {device.type!r} tensors"]
