"""``ssl-fast compare``: several methods on the same data and budget, one table and one bar chart.

Each method trains with its own preset for the data (``--epochs``/``--batch-size`` override every
method alike), into ``<out>/<method>/``, one after the other in this process; a method whose
folder already holds a finished run of the same settings is resumed (so nothing is trained
twice). A second-stage method whose preset names a ``stage1`` (CVSA after BYOL) first trains
that run into ``<out>/<method>-stage1-<its method>/`` and starts from it (``--init``); its row
counts both stages' epochs and time, and ``--epochs`` is then the two stages' total. The table
gives held-out k-NN and linear-probe accuracy beside the baselines every method shares: random
init of that method's backbone, and raw pixels.
"""
import argparse
import csv
import json
import os
import sys
from typing import Any, Dict, List

from ssl_fast._argtypes import number
from ssl_fast.methods import get_method, list_methods
from ssl_fast.train.config import EVAL_SPLITS, TrainConfig, data_name, resolve_config

COLUMNS = ["method", "arch", "epochs", "train_time_s", "knn_top1", "linear_top1", "knn_random_init",
           "linear_random_init", "knn_raw_pixels", "linear_raw_pixels"]
#: localisation against known foreground masks (:meth:`~ssl_fast.train.trainer.Trainer.localisation_eval`):
#: the method's own maps and its backbone's activation, IoU and pointing accuracy; None where absent
LOCALISATION_COLUMNS = ["iou", "pointing", "activation_iou", "activation_pointing"]


def add_compare_parser(sub) -> argparse.ArgumentParser:
    """Add the ``compare`` subcommand to an argparse sub-parser collection."""
    p = sub.add_parser("compare", help="train several methods on the same data; print one table and a bar chart",
                       description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", default="dino,byol,simsiam,care",
                   help=f"comma-separated methods, of: {', '.join(list_methods())}")
    p.add_argument("--data", default="digits", help="as for pretrain")
    p.add_argument("--epochs", type=number(int, 1), default=None, help="epochs for every method (default: each preset's)")
    p.add_argument("--batch-size", type=number(int, 1), default=None, help="global batch for every method")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--eval-split", default="test", choices=EVAL_SPLITS, help="as for pretrain")
    p.add_argument("--out", default=None, help="output folder (default runs/compare-<data>)")
    return p


def _methods(text: str) -> List[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in list_methods()]
    if not names or unknown:
        raise ValueError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(list_methods())}")
    return names


def write_table(out: str, rows: List[Dict[str, Any]], title: str) -> str:
    """Write ``compare.csv``, ``compare.json`` and ``compare.png``; return the table as text."""
    with open(os.path.join(out, "compare.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS + LOCALISATION_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(rows, f, indent=1)

    def pct(v):
        return "-" if v is None else f"{v:.2f}"

    def loc(r, prefix):
        if r.get(prefix + "iou") is None:
            return "-"
        return f"{r[prefix + 'iou']:.3f} / {100 * r[prefix + 'pointing']:.1f}"

    with_loc = any(r.get("iou") is not None or r.get("activation_iou") is not None for r in rows)
    head = "| method | backbone | epochs | training time (s) | k-NN % | linear % | k-NN random init % | k-NN raw pixels % |"
    if with_loc:
        head += " own maps IoU / pointing % | activation IoU / pointing % |"
    lines = [head, "|---" * head.count(" | ") + "|---|"]
    for r in rows:
        line = (f"| {r['method']} | {r['arch']} | {r['epochs']} | {r['train_time_s']:.0f} | {pct(r['knn_top1'])} | "
                f"{pct(r['linear_top1'])} | {pct(r['knn_random_init'])} | {pct(r['knn_raw_pixels'])} |")
        if with_loc:
            line += f" {loc(r, '')} | {loc(r, 'activation_')} |"
        lines.append(line)
    from ssl_fast.train.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 3.6))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["knn_top1"] or 0 for r in rows], 0.4, label="k-NN")
    ax.bar([x + 0.2 for x in xs], [r["linear_top1"] or 0 for r in rows], 0.4, label="linear probe")
    if rows:
        ax.axhline(rows[0]["knn_raw_pixels"], color="k", ls="--", lw=1, label="raw pixels (k-NN)")
    for x, r in zip(xs, rows):
        ax.plot([x - 0.4, x + 0.4], [r["knn_random_init"]] * 2, color="r", lw=1.5,
                label="random init (k-NN)" if x == 0 else None)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([f"{r['method']}\n{r['arch']}" for r in rows])
    lo = min([r["knn_random_init"] for r in rows] + [r["knn_top1"] or 100 for r in rows] + [100]) - 5
    ax.set_ylim(max(0, lo), 100)
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare.png"), dpi=110)
    plt.close(fig)
    return "\n".join(lines)


def run_compare(args: argparse.Namespace, parser=None) -> int:
    """Run the ``compare`` command; returns the exit status (2 for bad arguments)."""
    from ssl_fast.train.cli import check_out_folder
    from ssl_fast.train.trainer import NonFiniteLossError, Trainer

    def fail(msg: str) -> int:
        if parser is not None:
            parser.error(msg)
        print(f"ssl-fast compare: error: {msg}", file=sys.stderr)
        return 2

    try:
        methods = _methods(args.methods)
    except ValueError as e:
        return fail(str(e))
    out = args.out or os.path.join("runs", f"compare-{data_name(args.data)}")
    problem = check_out_folder(out)
    if problem:
        return fail(problem)
    os.makedirs(out, exist_ok=True)
    rows = []
    for m in methods:
        common = dict(data=args.data, batch_size=args.batch_size, seed=args.seed, device=args.device,
                      eval_split=args.eval_split)
        stage1 = dict(get_method(m).preset_for(args.data).get("stage1") or {})
        first = None
        epochs = args.epochs
        if stage1:
            first_method = stage1.pop("method")
            try:
                first = resolve_config(TrainConfig(method=first_method, **{**common, **stage1},
                                                   out=os.path.join(out, f"{m}-stage1-{first_method}")))
            except ValueError as e:
                return fail(f"{m} stage 1: {e}")
            if epochs is not None:
                if epochs <= first.epochs:
                    return fail(f"{m}: --epochs {epochs} leaves no epoch after its {first.epochs}-epoch "
                                f"{first_method} stage 1 (--epochs is the two stages' total)")
                epochs -= first.epochs
        init = os.path.join(first.out, "checkpoint.pth") if first else None
        runs = ([first] if first else []) + [TrainConfig(method=m, epochs=epochs, out=os.path.join(out, m), init=init,
                                                         **common)]
        train_s, summary, first_summary = 0.0, None, None
        for i, cfg in enumerate(runs):
            try:
                cfg = resolve_config(cfg)
            except ValueError as e:
                return fail(f"{m}: {e}")
            if os.path.isfile(os.path.join(cfg.out, "checkpoint.pth")):
                cfg.resume = "auto"
            try:
                trainer = Trainer(cfg)
                summary = trainer.fit()
            except (ValueError, FileNotFoundError) as e:
                return fail(f"{m}: {e}")
            except NonFiniteLossError as e:
                print(f"ssl-fast compare: {m} stopped: {e}", file=sys.stderr)
                summary = None
                break
            train_s += sum(r["epoch_time_s"] for r in trainer.history["epochs"])
            if i == 0 and first is not None:
                first_summary = summary
        if summary is None:
            continue
        row = {"method": m, "arch": cfg.arch, "epochs": summary["epochs_done"], "train_time_s": train_s,
               **{k: summary.get(k) for k in COLUMNS[4:]},
               **{k: (summary.get("localisation") or {}).get(k) for k in LOCALISATION_COLUMNS}}
        if first is not None:
            # the second stage's first evaluation measured the stage-1 weights: random init is stage 1's
            row.update(method=f"{m} (after {first.method})", epochs=f"{first_summary['epochs_done']}+{row['epochs']}",
                       knn_random_init=first_summary.get("knn_random_init"),
                       linear_random_init=first_summary.get("linear_random_init"))
        rows.append(row)
    table = write_table(out, rows, f"{data_name(args.data)} ({args.eval_split} split), seed {args.seed}")
    print(table)
    print(f"written: {out}/compare.csv, compare.json, compare.png")
    return 0
