"""What a run writes and prints besides checkpoints: progress lines, ``metrics.csv`` (per epoch),
``steps.csv`` (per step), ``log.json``, the figures, and the best earlier run to compare with.

Method-neutral: the columns are whatever scalars the method returned.
"""
import csv
import glob
import json
import os
import sys
from dataclasses import asdict
from typing import Any, Dict, Optional

from ssl_fast.train.plots import save_curves_png

#: the first columns of ``steps.csv``; the method's own metrics follow
STEP_COLUMNS = ["epoch", "step", "loss", "lr", "weight_decay"]
#: the columns of checkpoints written before the step columns followed the method
LEGACY_STEP_COLUMNS = STEP_COLUMNS + ["momentum"]


class Progress:
    """Plain-text progress: a line rewritten in place on a terminal, periodic lines otherwise."""

    def __init__(self, enabled: bool, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        if self.tty:
            self.stream.write("\r" + text.ljust(110) + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def print(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text + "\n")
            self.stream.flush()


def new_history() -> Dict[str, Any]:
    """The empty run history the trainer fills and checkpoints."""
    return {"epochs": [], "steps": [], "step_columns": list(STEP_COLUMNS), "knn_random_init": None,
            "knn_raw_pixels": None, "linear_random_init": None, "linear_raw_pixels": None}


def write_logs(out: str, cfg, history: Dict[str, Any], run_facts: Dict[str, Any], figures: bool = False) -> None:
    """Write ``metrics.csv``, ``steps.csv`` and ``log.json`` (atomically) into ``out``; with
    ``figures`` also ``curves.png``.

    Args:
        out: the run's folder.
        cfg: its :class:`~ssl_fast.train.config.TrainConfig`.
        history: the trainer's history (:func:`new_history`).
        run_facts: extra top-level entries of ``log.json`` (world size, device, steps per epoch).
        figures: draw the loss and k-NN curves too.
    """
    rows = history["epochs"]
    if rows:
        keys = list(rows[0].keys())
        with open(os.path.join(out, "metrics.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    with open(os.path.join(out, "steps.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(history.get("step_columns", LEGACY_STEP_COLUMNS))
        w.writerows(history["steps"])
    log = {"config": asdict(cfg), **run_facts,
           **{k: history.get(k) for k in ("knn_random_init", "knn_raw_pixels", "linear_random_init",
                                          "linear_raw_pixels")},
           "epochs": rows, "summary": history.get("summary")}
    tmp = os.path.join(out, ".log.json.tmp")
    with open(tmp, "w") as f:
        json.dump(log, f, indent=1)
    os.replace(tmp, os.path.join(out, "log.json"))
    if figures:
        steps_per_epoch = run_facts["steps_per_epoch"]
        save_curves_png(os.path.join(out, "curves.png"), [s[2] for s in history["steps"]], steps_per_epoch,
                        [r["epoch"] for r in rows], [r["knn_top1"] for r in rows], history["knn_random_init"],
                        f"{cfg.method.upper()} {cfg.arch} on {cfg.data}")


def best_earlier_run(out: str, data: str, eval_split: str) -> Optional[Dict[str, Any]]:
    """The finished run beside ``out`` (in ``out``'s parent folder) with the best held-out k-NN on the
    same data and evaluation split, or None.

    Returns:
        ``{"out", "method", "arch", "knn_top1", "linear_top1", "epochs"}`` of that run.
    """
    here = os.path.abspath(out)
    best = None
    for path in glob.glob(os.path.join(os.path.dirname(here), "*", "log.json")):
        if os.path.dirname(os.path.abspath(path)) == here:
            continue
        try:
            with open(path) as f:
                log = json.load(f)
            c, s = log["config"], log.get("summary") or {}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if c.get("data") != data or c.get("eval_split", "test") != eval_split or s.get("knn_top1") is None:
            continue
        if best is None or s["knn_top1"] > best["knn_top1"]:
            best = {"out": os.path.dirname(path), "method": c.get("method"), "arch": c.get("arch"),
                    "knn_top1": s["knn_top1"], "linear_top1": s.get("linear_top1"), "epochs": s.get("epochs_done")}
    return best
