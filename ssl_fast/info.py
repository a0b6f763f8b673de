"""``python -m ssl_fast.info``: what this installation can run, and why not."""
import json
import os
import platform
import sys

import torch

from ssl_fast import _backend, _ext, _triton


def ops() -> dict:
    """Every registered op (``ssl_fast.ops._registry``), by name."""
    from ssl_fast.ops import _registry

    return _registry.registered()


def build_summary() -> str:
    """One line on what ``setup.py`` built, with which torch and compilers (from the
    ``_build_info.json`` it writes), and whether the built extension loads here."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError):
        info = None
    loaded = "loads" if _ext.extension_error() is None else f"does not load: {_ext.extension_error()}"
    if info is None:
        return f"ssl_fast._C: no build record ({path} missing: not installed with setup.py); {loaded}"
    if not info.get("built"):
        return f"ssl_fast._C: not built ({info.get('why')}); {loaded}"
    kinds = ("CPU + CUDA kernels (nvcc {nvcc} at {cuda_home}, archs {cuda_archs})".format(**info)
             if info.get("cuda") else f"CPU kernels only (no CUDA: {info.get('cuda_why_not')})")
    built_with = f"torch {info.get('torch')}, {info.get('cxx')}, {' '.join(info.get('cxx_flags') or [])}"
    stale = ("" if info.get("torch") == torch.__version__ else
             f"; WARNING: built against torch {info.get('torch')} but torch {torch.__version__} is installed, rebuild")
    return f"ssl_fast._C: {kinds}; built with {built_with}; {loaded}{stale}"


def _devices():
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs.append(torch.device("cuda"))
    return devs


def report() -> str:
    lines = [
        f"ssl_fast {__import__('ssl_fast').__version__}",
        f"python {platform.python_version()} on {platform.machine()}, torch {torch.__version__}",
        f"triton: {_triton.TRITON_VERSION or 'not available'}"
        f"{' (interpreter: TRITON_INTERPRET=1)' if _triton.INTERPRET else ''}",
        f"CUDA: {torch.cuda.get_device_name(0) + ', CUDA ' + str(torch.version.cuda) if torch.cuda.is_available() else 'not available (torch.cuda.is_available() is False)'}",
        build_summary(),
        f"backend in force: {_backend.get_backend()} (SSL_FAST_BACKEND={os.environ.get('SSL_FAST_BACKEND', '')!r})",
        "",
        "op / device / backend: status",
    ]
    for op, spec in ops().items():
        for dev in _devices():
            for b in _backend.BACKENDS:
                why = spec.sample_reasons(b, dev)
                lines.append(f"  {op:<22} {dev.type:<5} {b:<10} " + ("available" if not why else "no: " + "; ".join(why)))
            auto = _backend.resolve(op, dev, lambda b: spec.sample_reasons(b, dev), "auto")
            lines.append(f"  {op:<22} {dev.type:<5} {'auto':<10} -> {auto}")
    lines.append("")
    lines.append("summary (auto): " + ", ".join(
        f"{op} " + " ".join(f"{dev.type} -> {_backend.resolve(op, dev, lambda b: spec.sample_reasons(b, dev), 'auto')}"
                            for dev in _devices()) for op, spec in ops().items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(build_summary() if "--build" in argv else report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
