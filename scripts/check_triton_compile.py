"""Compile every Triton kernel of ssl_fast for a CUDA GPU on a machine without one.

Usage::

    python scripts/check_triton_compile.py [--arch 90] [--sms 132] [--quick]

The launchers in ``ssl_fast.kernels`` run on CPU tensors with the shapes of the benchmarks and
models (CvT-13 stages, ViT-S/16, Swin windows, BoTNet/SAM decomposed positions, the DINO loss
at K = 65536, EMA), in every dtype the GPU path serves. Instead of launching, each kernel call
is compiled by Triton's own CUDA path (same specialisation, same ``num_warps``/``num_stages``)
down to a cubin with the ``ptxas`` that ships with Triton, for compute capability ``--arch``
(90: H100/H200). Per kernel the table gives the shared memory, the registers and the spills
(``ptxas -v``); the run fails (exit 1) when a kernel does not compile or asks for more shared
memory per block than the target has, which on a GPU would only show at launch time.

What it cannot show: that the cubins compute the right values or how fast they run. The
interpreter tests cover the values; the GPU benchmarks cover speed.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

# the kernels must be real JIT functions, not the interpreter's
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Shared memory a block may use (opt-in maximum), bytes, per compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


class CompileOnlyDriver(DriverBase):
    """Stands in for the CUDA driver: names the target and nothing else (no device, no launch)."""

    def __init__(self, target: GPUTarget):
        self.target = target

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("compile-only driver: nothing runs")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class Recorder:
    """Turns every ``kernel[grid](...)`` into a compile (``warmup=True``) and keeps the result."""

    def __init__(self):
        self.case = ""
        self.rows = []  # (case, kernel name, CompiledKernel, seconds)
        self.failures = []  # (case, kernel name, error)

    def __enter__(self):
        self._run = JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            t0 = time.perf_counter()
            try:
                kernel = recorder._run(fn, *args, grid=grid, warmup=True, **kwargs)
            except Exception as e:  # a compile error: keep going, report them all
                recorder.failures.append((recorder.case, fn.fn.__name__, f"{type(e).__name__}: {e}"))
                return None
            recorder.rows.append((recorder.case, fn.fn.__name__, kernel, time.perf_counter() - t0))
            return kernel

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._run


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes of one kernel from ``ptxas -v`` (Triton's bundled ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                              "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True)
    log = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"regs": int(regs.group(1)) if regs else -1,
            "spill_st": int(spills.group(1)) if spills else 0,
            "spill_ld": int(spills.group(2)) if spills else 0}


# --------------------------------------------------------------------------------------------
# the launches: shapes the benchmarks and models use
# --------------------------------------------------------------------------------------------
def _dtypes(quick):
    return [torch.bfloat16] if quick else [torch.float32, torch.bfloat16, torch.float16]


def conv_projection_cases(quick):
    from ssl_fast.kernels import conv_projection as k

    stages = [(64, 56, 56), (384, 14, 14)] if quick else [(64, 56, 56), (192, 28, 28), (384, 14, 14)]
    for C, H, W in stages:
        for dtype in _dtypes(quick):
            for train in (True, False):
                def run(C=C, H=H, W=W, dtype=dtype, train=train):
                    x = torch.randn(2, H, W, C, dtype=dtype)
                    w, g, b = torch.randn(3, C, 9), torch.ones(3, C), torch.zeros(3, C)
                    rm, rv = (None, None) if train else (torch.zeros(3, C), torch.ones(3, C))
                    out = k.forward(x, w, g, b, rm, rv, [1e-5] * 3, 1, 2, train)
                    grads = [torch.randn_like(o) for o in out[:3]]
                    ys = out[3:6] if train else [x.new_empty(0)] * 3
                    k.backward(*grads, x, w, g, out[6], out[7], *ys, 1, 2, train)
                yield f"conv_projection C{C} {H}x{W} {_name(dtype)} {'train' if train else 'eval'}", run


def attention_cases(quick):
    from ssl_fast.kernels import attention as k

    def run(dtype, b, h, nq, nk, d, dv=None, **extra):
        dv = d if dv is None else dv
        q, kk = torch.randn(b, h, nq, d, dtype=dtype), torch.randn(b, h, nk, d, dtype=dtype)
        v = torch.randn(b, h, nk, dv, dtype=dtype)
        out, lse = k.attention_forward(q, kk, v, d ** -0.5, **extra)
        k.attention_backward(torch.randn_like(out), q, kk, v, out, lse, d ** -0.5, **extra)

    def table(wh, ww, h):
        return torch.randn((2 * wh - 1) * (2 * ww - 1), h)

    shapes = [
        ("ViT-S/16 global", dict(b=2, h=6, nq=197, nk=197, d=64)),
        ("CvT-13 stage 1", dict(b=2, h=1, nq=3136, nk=784, d=64)),
        ("CvT-13 stage 3 (cls)", dict(b=2, h=6, nq=197, nk=50, d=64)),
        ("head dim 128", dict(b=2, h=2, nq=256, nk=256, d=128)),
        ("Swin 7x7 window table", dict(b=4, h=3, nq=49, nk=49, d=32, table=table(7, 7, 3), window_size=(7, 7))),
        ("Swin shifted window", dict(b=4, h=3, nq=49, nk=49, d=32, table=table(7, 7, 3), window_size=(7, 7),
                                     window_mask=torch.zeros(2, 49, 49))),
        ("BoTNet/SAM decomposed 14x14", dict(b=2, h=4, nq=196, nk=196, d=64, rel_h=torch.randn(27, 64),
                                             rel_w=torch.randn(27, 64), q_size=(14, 14), k_size=(14, 14))),
        ("bool mask", dict(b=2, h=6, nq=197, nk=197, d=64, attn_mask=torch.ones(197, 197, dtype=torch.bool))),
        ("additive mask", dict(b=2, h=6, nq=197, nk=197, d=64, attn_mask=torch.zeros(2, 1, 1, 197))),
    ]
    if quick:
        shapes = [s for s in shapes if s[0] in ("ViT-S/16 global", "Swin shifted window",
                                                 "BoTNet/SAM decomposed 14x14", "bool mask")]
    for label, kw in shapes:
        for dtype in _dtypes(quick):
            extra = {key: val for key, val in kw.items() if key not in ("b", "h", "nq", "nk", "d", "dv")}
            dims = {key: kw[key] for key in ("b", "h", "nq", "nk", "d") if key in kw}
            yield f"attention {label} {_name(dtype)}", lambda dtype=dtype, dims=dims, extra=extra: run(
                dtype, **dims, **extra)


def dino_loss_cases(quick, sms):
    from ssl_fast.kernels import dino_loss as k

    for dtype in _dtypes(quick):
        for ncrops, n_global, K in ((10, 2, 65536),) if quick else ((10, 2, 65536), (2, 2, 4096), (8, 2, 60000)):
            def run(dtype=dtype, ncrops=ncrops, n_global=n_global, K=K):
                b = 4
                student = torch.randn(ncrops * b, K, dtype=dtype)
                teacher = torch.randn(n_global * b, K, dtype=dtype)
                center = torch.zeros(1, K)
                # the slice count a GPU with `sms` SMs picks (4 programs per SM over b rows)
                loss, s_lse, t_lse = k.forward(student, teacher, center, ncrops, n_global, 0.1, 0.04,
                                               k_splits=triton.cdiv(4 * sms, b))
                k.backward(torch.ones(()), student, teacher, center, s_lse, t_lse, ncrops, n_global, 0.1, 0.04)
            yield f"dino_loss {ncrops} crops K={K} {_name(dtype)}", run


def ema_cases(quick):
    from ssl_fast.kernels import ema as k

    pairs = [(torch.float32, torch.float32)] if quick else [
        (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16), (torch.float64, torch.float64)]
    for e_dtype, s_dtype in pairs:
        for with_tensor in (False, True):
            def run(e_dtype=e_dtype, s_dtype=s_dtype, with_tensor=with_tensor):
                ema = [torch.zeros(1000, dtype=e_dtype), torch.zeros(37, dtype=e_dtype)]
                src = [torch.ones(1000, dtype=s_dtype), torch.ones(37, dtype=s_dtype)]
                k.ema_group(ema, src, 0.996, torch.tensor(0.996) if with_tensor else None)
            yield (f"ema {_name(e_dtype)}<-{_name(s_dtype)} momentum {'tensor' if with_tensor else 'float'}", run)


def additive_attention_cases(quick):
    from ssl_fast.kernels import additive_attention as k

    # Show-Attend-Tell: 14x14 VGG/ResNet grid (L=196), D=512 or 2048 features, A=512 attention units
    shapes = [(196, 512, 512, False), (196, 2048, 512, True)]
    if not quick:
        shapes += [(49, 2048, 256, False), (1, 64, 1, True)]
    for L, D, A, with_mask in shapes:
        for dtype in _dtypes(quick):
            def run(L=L, D=D, A=A, with_mask=with_mask, dtype=dtype):
                B = 4
                a, Ua = torch.randn(B, L, D, dtype=dtype), torch.randn(B, L, A, dtype=dtype)
                Wh, w = torch.randn(B, A, dtype=dtype), torch.randn(A, dtype=dtype)
                mask = torch.ones(B, L, dtype=torch.bool) if with_mask else None
                context, alpha = k.forward(a, Ua, Wh, w, mask)
                k.backward(torch.randn_like(context), torch.randn_like(alpha), a, Ua, Wh, w, alpha)
            yield f"additive_attention L{L} D{D} A{A}{' mask' if with_mask else ''} {_name(dtype)}", run


def all_kernels() -> set:
    """Names of the launchable kernels (module-level ``*_kernel`` JIT functions) in ssl_fast.kernels."""
    import importlib
    import pkgutil

    import ssl_fast.kernels as pkg

    names = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"ssl_fast.kernels.{info.name}")
        names |= {n for n, obj in vars(module).items() if isinstance(obj, JITFunction) and n.endswith("_kernel")}
    return names


def _name(dtype):
    return str(dtype).replace("torch.", "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100/H200)")
    parser.add_argument("--sms", type=int, default=132, help="SM count the launchers plan for (H100 SXM: 132)")
    parser.add_argument("--quick", action="store_true", help="one dtype and fewer shapes (the test suite's run)")
    args = parser.parse_args(argv)
    if args.arch not in SHARED_LIMIT:
        parser.error(f"--arch must be one of {sorted(SHARED_LIMIT)}, got {args.arch}")
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(args.arch).path
    except Exception as e:  # a Triton build without the CUDA backend
        print(f"cannot compile for CUDA here: {type(e).__name__}: {e}", file=sys.stderr)
        return 2

    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", args.arch, 32)))
    cases = [*conv_projection_cases(args.quick), *attention_cases(args.quick),
             *dino_loss_cases(args.quick, args.sms), *ema_cases(args.quick),
             *additive_attention_cases(args.quick)]
    limit = SHARED_LIMIT[args.arch]
    with Recorder() as rec:
        for label, run in cases:
            rec.case = label
            run()
    seen = set()
    print(f"Triton {triton.__version__}, torch {torch.__version__}, target sm_{args.arch}: "
          f"{len(cases)} launch sets")
    print(f"{'case':<52} {'kernel':<26} {'warps':>5} {'stages':>6} {'shared B':>9} {'regs':>5} "
          f"{'spill st/ld B':>13} {'compile s':>9}")
    problems = [f"{case}: {name} did not compile: {err}" for case, name, err in rec.failures]
    for case, name, kernel, seconds in rec.rows:
        if id(kernel) in seen:
            continue  # the same specialisation from another case
        seen.add(id(kernel))
        md = kernel.metadata
        use = ptxas_usage(kernel.asm["ptx"], args.arch)
        print(f"{case:<52} {name:<26} {md.num_warps:>5} {md.num_stages:>6} {md.shared:>9} {use['regs']:>5} "
              f"{use['spill_st']:>6}/{use['spill_ld']:<6} {seconds:>9.2f}")
        if md.shared > limit:
            problems.append(f"{case}: {name} needs {md.shared} B of shared memory; sm_{args.arch} allows {limit}")
    compiled_names = {name for _, name, _, _ in rec.rows}
    for kernel_name in sorted(all_kernels() - compiled_names):
        problems.append(f"{kernel_name} is launched by no case here: add one")
    for p in problems:
        print("FAIL", p)
    print(f"{len(seen)} kernels compiled, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
