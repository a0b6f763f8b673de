"""Timing, memory and reporting shared by every op benchmark.

A :class:`Case` is one (op, shape, mode) with several providers, timed side by side in one
process; ratios are speed-ups against the case's baseline provider (``baseline_ms / ms``).
CUDA timings use ``triton.testing.do_bench`` (L2 flushed between runs); CPU timings use warm-up
then repeated ``perf_counter`` timing. Peak memory is CUDA's ``max_memory_allocated`` above the
memory held before the provider ran; on the CPU :func:`cpu_peak_mb` over one call, unless the
function that ``make()`` returns carries its own figure as a ``peak_mb`` attribute. A ``note``
attribute on that function (e.g. an equality check's outcome) is recorded with the row.
"""
import csv
import datetime
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

MODES = ("fwd", "bwd", "fwd_bwd")


@dataclass
class Provider:
    """``make()`` does the set-up (untimed) and returns the zero-argument function to time."""
    name: str
    make: Callable[[], Callable[[], object]]
    unavailable: Optional[str] = None  # why it cannot run here; reported, not timed


@dataclass
class Case:
    op: str
    shape: str
    mode: str
    baseline: str
    providers: List[Provider] = field(default_factory=list)


@dataclass
class Result:
    case: Case
    provider: str
    p20: float = float("nan")
    p50: float = float("nan")
    p80: float = float("nan")
    peak_mb: float = float("nan")
    note: str = ""


def _quantiles(times_ms):
    q = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else times_ms * 9
    return q[1], statistics.median(times_ms), q[7]


def time_cpu(fn, *, warmup_s=0.2, min_reps=5, budget_s=2.0):
    t_end = time.perf_counter() + warmup_s
    fn()
    while time.perf_counter() < t_end:
        fn()
    times = []
    t_stop = time.perf_counter() + budget_s
    while len(times) < min_reps or (time.perf_counter() < t_stop and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def cpu_peak_mb(fn) -> float:
    """Peak of torch's CPU allocations (MiB) during one call of ``fn``, above what was held
    before: the allocation and free events of the profiler (``profile_memory=True``) in time
    order, summed. The RSS high-water mark cannot serve: freed heap memory is reused without
    showing in it. Allocations outside torch's allocator (a kernel's std::vector tiles) are not
    counted."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                    if e.self_cpu_memory_usage)
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak / 2**20


def time_cuda(fn):
    import triton.testing

    times = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="all")
    return _quantiles(list(times))


def run_case(case: Case, device: torch.device, quick: bool) -> List[Result]:
    results = []
    for p in case.providers:
        r = Result(case, p.name)
        if p.unavailable:
            r.note = p.unavailable
            results.append(r)
            continue
        try:
            fn = p.make()
            r.note = getattr(fn, "note", "")
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                r.peak_mb = (torch.cuda.max_memory_allocated() - before) / 2**20
                r.p20, r.p50, r.p80 = time_cuda(fn)
            else:
                r.peak_mb = fn.peak_mb if hasattr(fn, "peak_mb") else cpu_peak_mb(fn)
                r.p20, r.p50, r.p80 = time_cpu(fn, budget_s=0.5 if quick else 2.0,
                                               min_reps=3 if quick else 5)
        except Exception as exc:  # a provider failing must not hide the others' figures
            r.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        results.append(r)
    return results


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


def _commit() -> str:
    """HEAD's short hash, with ``+dirty`` when code the benchmarks run (anything outside
    benchmarks/results and the docs) differs from it: the figures then belong to no commit."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)benchmarks/results", ":(exclude)docs", ":(exclude)*.md"], cwd=root,
                                 capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if changed else "")
    except Exception:
        return "unknown"


def versions():
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "none"
    return torch.__version__, tv


COLUMNS = ["op", "provider", "shape", "mode", "p20_ms", "p50_ms", "p80_ms", "peak_mb", "ratio_vs_baseline",
           "baseline", "device", "torch", "triton", "commit", "date", "note"]


def write_csv(results: List[Result], device: torch.device, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    name = device_name(device)
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()
    path = os.path.join(out_dir, f"{slug}.csv")
    new = not os.path.exists(path)
    tv, trv = versions()
    commit, date = _commit(), datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(COLUMNS)
        for r in results:
            w.writerow([r.case.op, r.provider, r.case.shape, r.case.mode, f"{r.p20:.4f}", f"{r.p50:.4f}",
                        f"{r.p80:.4f}", f"{r.peak_mb:.2f}", f"{ratio(results, r):.3f}", r.case.baseline,
                        name, tv, trv, commit, date, r.note])
    return path


def ratio(results: List[Result], r: Result) -> float:
    for b in results:
        if b.case is r.case and b.provider == r.case.baseline:
            return b.p50 / r.p50 if r.p50 == r.p50 and r.p50 > 0 else float("nan")
    return float("nan")


def format_table(results: List[Result]) -> str:
    rows = [("op", "shape", "mode", "provider", "p50 ms", "p20-p80 ms", "peak MB", "speed-up")]
    for r in results:
        rg = f"{r.p20:.3f}-{r.p80:.3f}" if r.p50 == r.p50 else ""
        rt = ratio(results, r)
        base = " (baseline)" if r.provider == r.case.baseline else ""
        rows.append((r.case.op, r.case.shape, r.case.mode, r.provider,
                     f"{r.p50:.3f}" if r.p50 == r.p50 else r.note or "n/a",
                     rg, f"{r.peak_mb:.1f}" if r.peak_mb == r.peak_mb else "-",
                     (f"{rt:.2f}x" if rt == rt else "-") + base))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    out = []
    for j, row in enumerate(rows):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
