"""Build script for ssl_fast.

Installs the Python package ``ssl_fast`` (with the top-level ``kernels/`` folder as
``ssl_fast.kernels``) and builds the extension ``ssl_fast._C`` from ``csrc/`` against the torch
already installed (so install with ``pip install --no-build-isolation -e .``):

* the C++ CPU kernels (OpenMP), always;
* the CUDA kernels of ``csrc/cuda/*.cu`` as well, when the installed torch is a CUDA build and a
  CUDA toolkit whose nvcc matches it is found. No GPU is needed to compile them: with none
  visible, the arch list defaults to ``SSL_FAST_DEFAULT_CUDA_ARCHS`` (sm_80 and sm_90).

Nothing fails silently. When the CUDA part cannot be built, the CPU extension is built and the
reason printed; when nothing can be built, the install fails with the reason. The build is
skipped only when asked for with ``SSL_FAST_BUILD_EXT=0`` (the package then runs its Triton and
reference backends). ``SSL_FAST_BUILD_CUDA=0`` builds the CPU kernels only; ``SSL_FAST_CPU_ARCH``
sets ``-march`` (default ``native``: the extension is built on the machine that runs it);
``TORCH_CUDA_ARCH_LIST`` and ``CUDA_HOME`` are honoured as torch honours them.

What was built, with which torch, compilers and flags, is written to ``ssl_fast/_build_info.json``
and printed by ``python -m ssl_fast.info``.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(ROOT, "ssl_fast", "_build_info.json")
SSL_FAST_DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _say(msg: str) -> None:
    print(f"ssl_fast: {msg}", file=sys.stderr, flush=True)


def _cuda_toolkit_ok(home):
    """Why the CUDA toolkit at ``home`` cannot build an extension, or None when it can."""
    if not home:
        return "no CUDA toolkit found (no CUDA_HOME, no nvcc on PATH, no /usr/local/cuda)"
    if not os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return f"{home}/bin/nvcc does not exist"
    if not glob.glob(os.path.join(home, "include", "cuda_runtime.h")):
        return f"{home}/include has no cuda_runtime.h"
    if not (glob.glob(os.path.join(home, "lib64", "libcudart.so*"))
            or glob.glob(os.path.join(home, "lib", "libcudart.so*"))):
        return f"{home}/lib64 has no libcudart.so"
    return None


def _nvcc_top(nvcc):
    """The toolkit directory an ``nvcc`` on PATH really runs from (it may be a wrapper script in
    /usr/local/bin whose parent is not the toolkit): nvcc's own dry run prints it as ``TOP``."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True, timeout=60)
    except Exception:
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(m.group(1).strip()) if m else None


def _find_cuda_home():
    """Find the toolkit as torch does (``CUDA_HOME``/``CUDA_PATH``, then nvcc on PATH, then
    /usr/local/cuda), but accept a candidate only when it holds nvcc, the headers and libcudart.
    Returns ``(home or None, why-not or None)``."""
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        return explicit, _cuda_toolkit_ok(explicit)
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
        top = _nvcc_top(nvcc)
        if top:
            candidates.append(top)
    candidates.append("/usr/local/cuda")
    reasons = []
    for home in dict.fromkeys(candidates):
        why = _cuda_toolkit_ok(home)
        if why is None:
            return home, None
        reasons.append(why)
    return None, "; ".join(reasons)


def _nvcc_version(home):
    out = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True)
    m = re.search(r"release (\d+)\.(\d+)", out.stdout)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _cuda_plan(torch):
    """``(cuda_home, None)`` when the CUDA kernels can be compiled here, else ``(None, reason)``."""
    if os.environ.get("SSL_FAST_BUILD_CUDA", "1") == "0":
        return None, "SSL_FAST_BUILD_CUDA=0"
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        return None, "no CUDA sources"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is not a CUDA build"
    home, why = _find_cuda_home()
    if home is None or why is not None:
        return None, why
    nvcc_version = _nvcc_version(home)
    if nvcc_version is None or nvcc_version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return None, (f"nvcc at {home} is CUDA {nvcc_version}, torch {torch.__version__} was built with "
                      f"CUDA {torch.version.cuda} (the major versions must match; set CUDA_HOME)")
    return home, None


def _compiler_version(cmd):
    try:
        out = subprocess.run(cmd + ["--version"], capture_output=True, text=True, timeout=60)
        return out.stdout.splitlines()[0].strip() if out.stdout else None
    except Exception:
        return None


def _extensions():
    if os.environ.get("SSL_FAST_BUILD_EXT", "1") == "0":
        _say("SSL_FAST_BUILD_EXT=0: not building ssl_fast._C (only the triton and reference backends will run)")
        _write_build_info({"built": False, "why": "SSL_FAST_BUILD_EXT=0"})
        return [], {}
    try:
        import torch
    except ImportError as exc:
        raise SystemExit(
            f"ssl_fast: cannot build ssl_fast._C: torch is not importable in the build environment ({exc}).\n"
            "  Install torch first, then `pip install --no-build-isolation -e .` (the extension is compiled\n"
            "  against the installed torch), or set SSL_FAST_BUILD_EXT=0 to install without it.")

    cuda_home, cuda_why = _cuda_plan(torch)
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = SSL_FAST_DEFAULT_CUDA_ARCHS
            _say(f"no GPU visible: compiling the CUDA kernels for TORCH_CUDA_ARCH_LIST={SSL_FAST_DEFAULT_CUDA_ARCHS}")
    from torch.utils import cpp_extension

    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    arch = os.environ.get("SSL_FAST_CPU_ARCH", "native")
    # No -std here: torch's build helpers add the standard its headers need (C++17 up to torch
    # 2.12, C++20 from 2.13).
    cxx = ["-O3", "-fopenmp"] + ([f"-march={arch}"] if arch else [])
    common = dict(name="ssl_fast._C", include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])

    def cpu_extension():
        return cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)

    info = {"built": True, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cxx": _compiler_version([os.environ.get("CXX", "c++")]), "cxx_flags": cxx,
            "cuda": False, "cuda_why_not": cuda_why}
    if cuda_home is None:
        _say(f"building the CPU kernels only: {cuda_why}")
        ext = cpu_extension()
    else:
        ext = cpp_extension.CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DSSL_FAST_WITH_CUDA"],
                                "nvcc": ["-O3", "--use_fast_math", "-DSSL_FAST_WITH_CUDA"]},
            **common)
        info.update(cuda=True, cuda_why_not=None, cuda_home=cuda_home, nvcc=_nvcc_version(cuda_home),
                    cuda_archs=os.environ.get("TORCH_CUDA_ARCH_LIST", "visible GPUs"))

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension, falling back to the CPU kernels when the CUDA part fails and
        failing the install, with the reason, when nothing builds."""

        def build_extensions(self):
            saved = {k: getattr(self.compiler, k) for k in ("compile", "_compile", "src_extensions")
                     if hasattr(self.compiler, k)}
            saved["src_extensions"] = list(saved.get("src_extensions", []))
            try:
                super().build_extensions()
            except Exception as exc:
                if not info["cuda"]:
                    raise SystemExit(f"ssl_fast: building ssl_fast._C failed: {type(exc).__name__}: {exc}\n"
                                     "  (set SSL_FAST_BUILD_EXT=0 to install without the compiled kernels)")
                why = f"compiling the CUDA kernels failed ({type(exc).__name__}: {exc})"
                _say(f"{why}; building the CPU kernels only")
                info.update(cuda=False, cuda_why_not=why)
                for k, v in saved.items():
                    setattr(self.compiler, k, v)
                self.extensions = [cpu_extension()]
                try:
                    super().build_extensions()
                except Exception as exc2:
                    raise SystemExit(f"ssl_fast: building ssl_fast._C failed: {type(exc2).__name__}: {exc2}\n"
                                     "  (set SSL_FAST_BUILD_EXT=0 to install without the compiled kernels)")
            _write_build_info(info)
            _say("built ssl_fast._C with " + ("CPU and CUDA kernels" if info["cuda"] else
                                             f"CPU kernels only ({info['cuda_why_not']})"))

    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _write_build_info(info):
    with open(BUILD_INFO, "w") as f:
        json.dump(info, f, indent=1)


ext_modules, cmdclass = _extensions()

setup(
    name="ssl_fast",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for vision attention and self-supervised learning",
    python_requires=">=3.9",
    packages=find_packages(include=["ssl_fast", "ssl_fast.*"]) + ["ssl_fast.kernels"],
    package_dir={"ssl_fast": "ssl_fast", "ssl_fast.kernels": "kernels"},
    package_data={"ssl_fast": ["_build_info.json"]},
    # torch is deliberately unpinned here: the extension binds to whatever torch is installed
    # (scripts/bootstrap.sh pins one; GPU images bring their own).
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["ssl-fast=ssl_fast.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
