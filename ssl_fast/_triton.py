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


def _interpreter_runtime_bounds_fix():
    """Let the Triton interpreter take runtime loop bounds under numpy >= 2.4.

    The interpreter holds a scalar kernel argument as a 1-element 1-D numpy array and turns it
    into a Python int (for ``range(0, N, BLOCK)``) with ``int(array)``, which numpy 2.4 refuses
    for arrays that are not 0-d. After the interpreter patches ``tl.tensor``, this re-patches
    ``__index__`` to go through ``.item()``. Compiled (GPU) kernels are untouched.
    """
    from triton.runtime import interpreter as interp

    original = getattr(interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_ssl_fast_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._ssl_fast_fixed = True
    interp._patch_lang_tensor = patched


def _interpreter_bf16_rounding_fix():
    """Round float32 -> bfloat16 casts to nearest-even in the Triton interpreter, as compiled code
    does.

    The interpreter (3.6 to 3.8) casts with ``.to(tl.bfloat16)`` by cutting the mantissa bits
    (round toward zero), so an interpreted kernel's bf16 outputs were up to one ulp off what the
    same kernel gives on a GPU (an EMA with momentum 0 did not copy the student exactly). This
    re-patches the cast to go through torch's own rounding. Compiled (GPU) kernels are untouched.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = getattr(interp, "InterpreterBuilder", None)
    original = getattr(builder, "cast_impl", None)
    if original is None or getattr(original, "_ssl_fast_fixed", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interp.TensorHandle(data.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl._ssl_fast_fixed = True
    builder.cast_impl = cast_impl


if INTERPRET and _IMPORT_ERROR is None:
    _interpreter_runtime_bounds_fix()
    _interpreter_bf16_rounding_fix()


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
