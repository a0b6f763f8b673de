"""Run the op microbenchmarks: ``python benchmarks/run.py [--op ema dino_loss] [--device cpu]``.

Every provider of a case runs in this one process; the table gives the median (p50), the
p20-p80 range, peak memory on CUDA, and the speed-up against the case's baseline provider.
Results are appended to ``benchmarks/results/<device>.csv`` with the device, torch and triton
versions and the commit.
"""
import argparse
import importlib
import os
import pkgutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

from benchmarks import cases as cases_pkg  # noqa: E402
from benchmarks.harness import MODES, device_name, format_table, run_case, versions, write_csv  # noqa: E402


def all_ops():
    return sorted(m.name for m in pkgutil.iter_modules(cases_pkg.__path__))


def _keep_freed_memory() -> str:
    """glibc ``mallopt``: no mmap for blocks under 1 GiB and no trimming of the heap top, so freed
    buffers are reused without new page faults. Returns the note recorded with every row."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallopt"):
        raise SystemExit("--keep-freed-memory needs glibc (mallopt)")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if not (libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        raise SystemExit("--keep-freed-memory: mallopt refused the thresholds")
    return "allocator: freed memory kept (mallopt), no first-touch page faults"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", nargs="*", default=None, help=f"ops to run (default: all of {all_ops()})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mode", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--quick", action="store_true", help="smaller shapes and shorter timing (the CPU demo)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the CSV")
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to the CSV")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="CPU diagnostic (glibc): keep freed memory in the heap, so large buffers are no "
                             "longer fresh mmaps paying a page fault per first-touched 4 KiB; shows the "
                             "kernels' own ratios apart from the allocator's")
    args = parser.parse_args(argv)
    allocator_note = ""
    if args.keep_freed_memory:
        allocator_note = _keep_freed_memory()
    device = torch.device(args.device)
    ops = args.op or all_ops()
    unknown = sorted(set(ops) - set(all_ops()))
    if unknown:
        parser.error(f"unknown --op {unknown}; choose from {all_ops()}")
    tv, trv = versions()
    print(f"# {device_name(device)} | torch {tv} | triton {trv}", flush=True)
    results = []
    for op in ops:
        mod = importlib.import_module(f"benchmarks.cases.{op}")
        for case in mod.cases(device, args.quick):
            if case.mode in args.mode:
                for r in run_case(case, device, args.quick):
                    r.note = "; ".join(n for n in (r.note, allocator_note) if n)
                    results.append(r)
                print(f"  done: {case.op} {case.shape} {case.mode}", file=sys.stderr, flush=True)
    print(format_table(results))
    if not args.no_save:
        print(f"appended to {write_csv(results, device, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
