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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", nargs="*", default=None, help=f"ops to run (default: all of {all_ops()})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mode", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--quick", action="store_true", help="smaller shapes and shorter timing (the CPU demo)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="folder for the CSV")
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to the CSV")
    args = parser.parse_args(argv)
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
                results.extend(run_case(case, device, args.quick))
                print(f"  done: {case.op} {case.shape} {case.mode}", file=sys.stderr, flush=True)
    print(format_table(results))
    if not args.no_save:
        print(f"appended to {write_csv(results, device, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
