"""Build script for ssl_fast.

Installs the Python package ``ssl_fast`` (with the top-level ``kernels/`` folder as
``ssl_fast.kernels``) and builds the optional extension ``ssl_fast._C`` from ``csrc/``:

* C++ CPU kernels (OpenMP) always;
* CUDA kernels from ``csrc/cuda/*.cu`` when the installed torch has CUDA and nvcc is found.

The extension is compiled against the torch already installed, so install with
``pip install --no-build-isolation -e .``. ``SSL_FAST_BUILD_EXT=0`` skips the build; the
package then works with its Triton and reference backends only.
Other switches: ``SSL_FAST_BUILD_CUDA=0`` builds the CPU kernels only; ``SSL_FAST_CPU_ARCH``
sets ``-march`` (default ``native``: the extension is built on the machine that runs it).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("SSL_FAST_BUILD_EXT", "1") == "0":
        print("ssl_fast: SSL_FAST_BUILD_EXT=0, not building ssl_fast._C", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("ssl_fast: torch is not installed in the build environment; not building ssl_fast._C "
              "(install torch first and use --no-build-isolation)", file=sys.stderr)
        return [], {}

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    arch = os.environ.get("SSL_FAST_CPU_ARCH", "native")
    cxx = ["-O3", "-fopenmp", "-std=c++17"] + ([f"-march={arch}"] if arch else [])
    with_cuda = (
        os.environ.get("SSL_FAST_BUILD_CUDA", "1") != "0"
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and bool(cuda_sources)
    )
    common = dict(
        name="ssl_fast._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        ext = CUDAExtension(
            sources=sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DSSL_FAST_WITH_CUDA"],
                                "nvcc": ["-O3", "--use_fast_math", "-std=c++17", "-DSSL_FAST_WITH_CUDA"]},
            **common,
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **common)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="ssl_fast",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for vision attention and self-supervised learning",
    python_requires=">=3.9",
    packages=find_packages(include=["ssl_fast", "ssl_fast.*"]) + ["ssl_fast.kernels"],
    package_dir={"ssl_fast": "ssl_fast", "ssl_fast.kernels": "kernels"},
    # torch is deliberately unpinned here: the extension binds to whatever torch is installed
    # (scripts/bootstrap.sh pins the CPU build; GPU images bring their own).
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["ssl-fast=ssl_fast.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
