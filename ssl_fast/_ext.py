"""Loading of the compiled extension ``ssl_fast._C`` and the reasons it cannot serve an op."""
import torch

try:
    from ssl_fast import _C  # noqa: F401  (registers the torch.ops.ssl_fast_C operators)

    _LOAD_ERROR = None
except Exception as exc:  # not built, or built against another torch
    _C = None
    _LOAD_ERROR = (
        f"the compiled extension ssl_fast._C is not importable ({type(exc).__name__}: {exc}); "
        "build it with `pip install --no-build-isolation -e .` against the installed torch"
    )


def extension_error():
    """Why the extension did not load, or None when it did."""
    return _LOAD_ERROR


def _scan_kernels() -> dict:
    """Map of every extension operator to the device types it has kernels for."""
    if _LOAD_ERROR is not None:
        return {}
    out = {}
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith("ssl_fast_C::"):
            out[schema.name.split("::", 1)[1]] = [
                d for d, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                if torch._C._dispatch_has_kernel_for_dispatch_key(schema.name, key)]
    return out


# Scanned once at import, so that backend choice is plain Python that torch.compile can trace.
_KERNELS = _scan_kernels()


def cpp_kernels() -> dict:
    """Map of every extension operator to the device types it has kernels for."""
    return dict(_KERNELS)


def cpp_reasons(kernel: str, device: torch.device) -> list:
    """Reasons ``torch.ops.ssl_fast_C.<kernel>`` cannot run on ``device`` (empty when it can)."""
    if _LOAD_ERROR is not None:
        return [_LOAD_ERROR]
    if kernel not in _KERNELS:
        return [f"ssl_fast._C defines no {kernel} kernel (not implemented in C++)"]
    if device.type not in _KERNELS[kernel]:
        return [f"ssl_fast._C has no {device.type} kernel for {kernel}"]
    return []
