"""The README's CVSA table from finished runs: held-out k-NN and linear probe (from each run's
``log.json``) and localisation against the true digit masks, on the held-out cluttered digits
and on the same held-out digits re-rendered anywhere in the frame (``digit_shift=1``), where a
fixed centre prior no longer does well. Localisation of each run: its own maps
(``localisation_maps``: CVSA's cross-view attention of an image with itself; none for BYOL) and its
backbone's activation (``activation_maps``: channel norm of the last stage, the same for both);
the centre prior is a Gaussian (sigma = a quarter of the side) centred in the frame.

Usage:
    python scripts/cvsa_table.py --runs runs/byol-s0 runs/cvsa-s0 ... [--json out.json]
"""
import argparse
import json
import math
import os
import sys
from typing import Dict, List


def centre_prior(n: int, size: int):
    import torch

    u = (torch.arange(size) + 0.5) / size - 0.5
    g = torch.exp(-(u[:, None] ** 2 + u[None] ** 2) / (2 * 0.25 ** 2))
    return g.expand(n, size, size)


def mean_sd(values: List[float], digits: int = 2) -> str:
    """``mean ± sample standard deviation`` of the values that are not None ("-" if none)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="folders of finished ssl-fast pretrain runs")
    p.add_argument("--json", default=None, help="also write the per-run figures here")
    args = p.parse_args(argv)

    import torch

    from ssl_fast.data.cluttered_digits import Clutter, load_cluttered_digits
    from ssl_fast.train.config import TrainConfig
    from ssl_fast.train.localisation import localisation_scores
    from ssl_fast.train.trainer import Trainer

    _, anywhere = load_cluttered_digits(clutter=Clutter(digit_shift=1.0))
    rows: Dict[str, Dict] = {}
    sets = {"held-out": None, "anywhere": anywhere}
    for run in args.runs:
        with open(os.path.join(run, "log.json")) as f:
            log = json.load(f)
        if not log.get("summary"):
            p.error(f"{run} has not finished (no summary in log.json)")
        cfg = dict(log["config"], resume=os.path.join(run, "checkpoint.pth"), init=None, overwrite=False, out=run)
        t = Trainer(TrainConfig(**cfg))
        sets["held-out"] = t.test_set
        t.method.eval()
        row = {"method": cfg["method"], "seed": cfg["seed"], "epochs": log["summary"]["epochs_done"],
               "knn_top1": log["summary"]["knn_top1"], "linear_top1": log["summary"]["linear_top1"]}
        for set_name, data in sets.items():
            for kind, maps_of in (("own", t.method.localisation_maps), ("activation", t.method.activation_maps)):
                with torch.no_grad():
                    maps = maps_of(data.images.to(t.device))
                if maps is None:
                    continue
                s = localisation_scores(maps.float().cpu(), data.masks)
                row[f"{set_name} {kind} iou"] = float(s["mean_iou"])
                row[f"{set_name} {kind} pointing"] = 100 * float(s["pointing_accuracy"])
        rows[run] = row
    for set_name, data in sets.items():
        s = localisation_scores(centre_prior(len(data.images), data.masks.shape[-1]), data.masks)
        rows[f"centre prior ({set_name})"] = {"method": "centre prior", f"{set_name} own iou": float(s["mean_iou"]),
                                              f"{set_name} own pointing": 100 * float(s["pointing_accuracy"])}

    def cell(ms: List[Dict], key: str) -> str:
        return mean_sd([r.get(key) for r in ms], 3 if key.endswith("iou") else 1)

    print("| runs | seeds | k-NN % | linear % | own maps IoU / pointing % (held-out; anywhere) | "
          "activation IoU / pointing % (held-out; anywhere) |")
    print("|---|---|---|---|---|---|")
    by_method: Dict[str, List[Dict]] = {}
    for r in rows.values():
        by_method.setdefault(r["method"], []).append(r)
    for method, ms in by_method.items():
        loc = {kind: "; ".join(f"{cell(ms, f'{s} {kind} iou')} / {cell(ms, f'{s} {kind} pointing')}" for s in sets)
               for kind in ("own", "activation")}
        seeds = ",".join(str(r["seed"]) for r in ms if "seed" in r) or "-"
        print(f"| {method} | {seeds} | {cell(ms, 'knn_top1')} | {cell(ms, 'linear_top1')} | {loc['own']} | "
              f"{loc['activation']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
