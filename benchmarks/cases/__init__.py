"""One module per op; each defines ``cases(device, quick) -> list[benchmarks.harness.Case]``."""
