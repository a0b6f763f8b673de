"""The self-supervised trainer: data order, augmentation seeds, schedules, evaluation, checkpoints.

One loop serves every registered :class:`~ssl_fast.methods.SSLMethod`. Reproducibility rules:

* Data order: epoch ``e``'s permutation comes from a generator seeded by ``(seed, e)``; step ``s``
  takes the global batch ``perm[s*G:(s+1)*G]`` (incomplete last batch dropped) and rank ``r`` of
  ``W`` takes rows ``r*G/W:(r+1)*G/W`` of it.
* Augmentation: step ``(e, s)`` gets a CPU generator seeded by ``(seed, e, s)``; every rank draws
  the parameters of the whole global batch from it and applies its own rows, so W processes
  see exactly the crops one process sees for the same global batch.
* Model randomness (drop-path, dropout) uses the global torch RNG, whose state, with numpy's and
  Python's, is saved for every rank in every checkpoint. Checkpoints are written at the end of each
  epoch, so a resumed run (one process, or torchrun with the same number of processes) repeats an
  uninterrupted one bit for bit on the CPU.

Checkpoints hold the unwrapped method's state (no DDP ``module.`` prefixes). Nothing non-finite is
saved: each step folds the loss and the largest gradient magnitude into a flag on the device (no
host synchronisation), and at the end of an epoch that flag and every tensor of the state to save
are checked once. The save is verified after writing and keeps the previous checkpoint
(``checkpoint.prev.pth``), so the checkpoint the stop message names is intact.
"""
import math
import os
import random
import time
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch

from ssl_fast.data.datasets import ImageSet, load_dataset, stratified_split
from ssl_fast.methods import Batch, MethodContext, create_method
from ssl_fast.train import distributed as D
from ssl_fast.train.checkpoint import (CHECKPOINT_NAME, PREVIOUS_NAME, resolve_resume)
from ssl_fast.train.config import TrainConfig, data_name, resolve_config
from ssl_fast.train.evaluation import (extract_features, knn_top1, linear_top1, one_per_class, raw_pixels)
from ssl_fast.train.localisation import localisation_scores
from ssl_fast.train.optim import build_optimizer
from ssl_fast.train.plots import save_attention_png
from ssl_fast.train.run_log import LEGACY_STEP_COLUMNS, STEP_COLUMNS, Progress, best_earlier_run, new_history, write_logs
from ssl_fast.train.schedules import cosine_schedule
from ssl_fast.train.trainer_state import CHECKPOINT_VERSION, CheckpointState, NonFiniteLossError


__all__ = ["CHECKPOINT_VERSION", "NonFiniteLossError", "TrainConfig", "Trainer", "pick_device", "resolve_config",
           "split_validation"]


def _seed_of(*ints: int) -> int:
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1, dtype=np.uint64)[0] >> 1)


def split_validation(train: ImageSet, fraction: float, seed: int) -> Tuple[ImageSet, ImageSet]:
    """``(train minus validation, validation)``: ``fraction`` of each class of ``train``, chosen by ``seed``."""
    keep, val = stratified_split(train.labels.numpy(), fraction, seed)
    keep, val = torch.as_tensor(np.sort(keep)), torch.as_tensor(np.sort(val))
    def part(rows: torch.Tensor, name: str) -> ImageSet:
        pick = (lambda t: None if t is None else t[rows])
        return ImageSet(train.images[rows], train.labels[rows], train.classes, name, masks=pick(train.masks),
                        boxes=pick(train.boxes))

    return part(keep, f"{train.name} minus validation"), part(val, f"validation share of {train.name}")


def pick_device(spec: str, dist_info: Optional[D.DistInfo] = None) -> torch.device:
    """``auto``: the local rank's GPU when CUDA is available, else the CPU."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist_info.local_rank if dist_info else 0)
        return torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec} asked for CUDA but no GPU is available")
    return dev


class Trainer(CheckpointState):
    """Pre-trains a method on a data set; see the module docstring for the reproducibility rules.

    Args:
        cfg: the run's configuration (``None`` fields are resolved from the data preset).
        data: ``(train, test)`` image sets to use instead of loading ``cfg.data``.
        batch_hook: debugging/test hook ``(epoch, step, images) -> images`` applied to each
            rank's batch before augmentation (for example to inject a NaN).
    """

    def __init__(self, cfg: TrainConfig, data: Optional[Tuple[ImageSet, ImageSet]] = None,
                 batch_hook: Optional[Callable[[int, int, torch.Tensor], torch.Tensor]] = None):
        self.cfg = cfg = resolve_config(cfg)
        self.batch_hook = batch_hook
        want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        self.dist = D.init_from_env("cuda" if want_cuda else "cpu")
        self.device = pick_device(cfg.device, self.dist)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.progress = Progress(self.dist.is_main)
        self.amp = self.device.type == "cuda" and cfg.amp in ("auto", "bf16") or cfg.amp == "bf16"
        if cfg.batch_size % self.dist.world_size:
            raise ValueError(f"--batch-size {cfg.batch_size} (global) is not divisible by the "
                             f"{self.dist.world_size} processes")
        self.train_set, self.test_set = data if data is not None else load_dataset(cfg.data, cfg.image_size)
        if cfg.eval_split == "val":
            # the held-out split stays unseen: settings are chosen on a share of the training images
            self.train_set, self.test_set = split_validation(self.train_set, cfg.val_fraction, cfg.seed)
        n = len(self.train_set)
        self.steps_per_epoch = n // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"--batch-size {cfg.batch_size} is larger than the {n} training images")
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        self.local_batch = cfg.batch_size // self.dist.world_size
        mean, std = self.train_set.channel_stats()
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
        ctx = MethodContext(arch=cfg.arch, epochs=cfg.epochs, steps_per_epoch=self.steps_per_epoch,
                            global_batch_size=cfg.batch_size, image_size=self.train_set.image_size,
                            mean=mean, std=std, options=dict(cfg.options))
        self.method = create_method(cfg.method, ctx).to(self.device)
        oc = self.method.optim_config()
        self.base_lr = (cfg.lr if cfg.lr is not None else oc.base_lr) * cfg.batch_size / 256.0
        self.min_lr = cfg.min_lr if cfg.min_lr is not None else oc.min_lr
        warm = cfg.warmup_epochs if cfg.warmup_epochs is not None else oc.warmup_epochs
        wd0 = cfg.weight_decay if cfg.weight_decay is not None else oc.weight_decay
        wd1 = cfg.weight_decay_end if cfg.weight_decay_end is not None else oc.weight_decay_end
        self.lr_schedule = cosine_schedule(self.base_lr, self.min_lr, cfg.epochs, self.steps_per_epoch, warm)
        self.wd_schedule = cosine_schedule(wd0, wd1, cfg.epochs, self.steps_per_epoch)
        self.optimizer_name = cfg.optimizer or oc.optimizer
        self.optimizer = build_optimizer(self.optimizer_name, self.method.param_groups(), self.base_lr, oc)
        self.start_epoch = 0
        self.history: Dict[str, Any] = new_history()
        self.resumed_from = None
        #: (path, epochs done) of the newest checkpoint of this run known to be intact
        self.good_checkpoint: Optional[Tuple[str, int]] = None
        #: (path, epochs done) of the checkpoint kept before it, once this run has saved twice
        self.previous_good: Optional[Tuple[str, int]] = None
        ckpt = resolve_resume(cfg.resume, cfg.out)
        earlier = os.path.join(cfg.out, CHECKPOINT_NAME)
        if ckpt is None and not cfg.overwrite and os.path.isfile(earlier):
            raise ValueError(f"--out {cfg.out!r} already holds an earlier run's checkpoint ({earlier}); "
                             "continue it with --resume auto, choose another --out, or pass --overwrite "
                             "to start afresh and replace it")
        if ckpt is not None:
            self._load(ckpt)
        elif cfg.init is not None:
            self._init_from(cfg.init)
        # device-side record of the first step whose loss or gradients were non-finite (-1: none)
        self._first_bad_step = torch.full((), -1, dtype=torch.int64, device=self.device)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.method.wrap_distributed(lambda m: DDP(m, device_ids=ids))
        self.train_images = self.train_set.images.to(self.device)
        if self.dist.is_main:
            os.makedirs(cfg.out, exist_ok=True)
        self.method.attach_data(self.train_set, self.train_images, cfg.out)

    def close(self, wait: bool = True) -> None:
        """Release the process group; the trainer's method and optimizer stay usable in this process.

        With ``wait`` (every rank finished, or stopped together on a non-finite value) it waits for
        every rank, drops the DDP wrapper (which holds the process group) and destroys the group
        while the interpreter is fully alive. Without this, gloo's threads and the DDP reducer
        could be torn down during interpreter shutdown, which can abort a finished torchrun
        launch with ``terminate called without an active exception``. Without ``wait`` (this rank
        failed alone) it only drops the wrapper: a barrier or a destroy could then wait forever
        for ranks stuck in a collective, while exiting lets torchrun stop them.

        Args:
            wait: every rank calls ``close`` at this point.
        """
        if not self.dist.enabled:
            return
        import gc

        if wait:
            D.barrier()
        self.method.unwrap_distributed()
        gc.collect()
        if wait:
            D.cleanup()

    # ---- evaluation ------------------------------------------------------------------------
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    @torch.no_grad()
    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return extract_features(self.method.features, images, self.device, self._autocast)

    def _both_features(self, raw: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        if raw:
            return raw_pixels(self.train_set.images), raw_pixels(self.test_set.images)
        return self._features(self.train_set.images), self._features(self.test_set.images)

    @torch.no_grad()
    def knn_eval(self, raw_pixels: bool = False) -> float:
        """k-NN top-1 (%) of the method's features (or, with ``raw_pixels``, of the flattened
        images themselves, the baseline no learned feature may fall below): held-out set against
        the training set, same k, temperature and cosine votes either way."""
        ftr, fte = self._both_features(raw_pixels)
        return knn_top1(ftr, self.train_set, fte, self.test_set, self.cfg.knn_k, self.cfg.knn_temperature)

    def linear_eval(self, raw_pixels: bool = False) -> float:
        """Linear-probe top-1 (%) of the frozen features (or of the raw pixels) on the held-out set."""
        ftr, fte = self._both_features(raw_pixels)
        return linear_top1(ftr, self.train_set, fte, self.test_set)

    @torch.no_grad()
    def localisation_eval(self) -> Optional[Dict[str, float]]:
        """IoU and pointing accuracy on the held-out set against its foreground masks: ``iou``,
        ``pointing`` of the method's own :meth:`localisation_maps` and ``activation_iou``,
        ``activation_pointing`` of its backbone's :meth:`activation_maps` (the same measure for
        every CNN method), each pair where the method gives such maps; None when the set has no
        masks or the method gives neither."""
        masks = self.test_set.masks
        if masks is None:
            return None
        self.method.eval()
        out = {}
        for prefix, maps_of in (("", self.method.localisation_maps), ("activation_", self.method.activation_maps)):
            maps = []
            for i in range(0, len(self.test_set), 256):
                with self._autocast():
                    m = maps_of(self.test_set.images[i:i + 256].to(self.device))
                if m is None:
                    break
                maps.append(m.float().cpu())
            else:
                s = localisation_scores(torch.cat(maps), masks)
                out.update({prefix + "iou": float(s["mean_iou"]), prefix + "pointing": float(s["pointing_accuracy"])})
        return out or None

    def save_attention(self, path: str) -> bool:
        """Write the last block's class-token attention per head for a few held-out images."""
        images, names = one_per_class(self.test_set, self.cfg.attention_images)
        with self._autocast():
            att = self.method.attention_maps(images.to(self.device))
        if att is None:
            return False
        done = len(self.history["epochs"])
        save_attention_png(path, images, att.float().cpu(), names,
                           f"{self.cfg.method.upper()} {self.cfg.arch}, teacher, last block, class-token attention "
                           f"(epoch {done})")
        return True

    # ---- logs ------------------------------------------------------------------------------
    def _write_logs(self, figures: bool = False) -> None:
        write_logs(self.cfg.out, self.cfg, self.history,
                   {"world_size": self.dist.world_size, "device": str(self.device),
                    "steps_per_epoch": self.steps_per_epoch, "optimizer": self.optimizer_name}, figures=figures)

    # ---- training --------------------------------------------------------------------------
    def _set_schedules(self, it: int) -> Tuple[float, float]:
        lr, wd = float(self.lr_schedule[it]), float(self.wd_schedule[it])
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            g["weight_decay"] = wd if g.get("apply_weight_decay", True) else 0.0
        return lr, wd

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        cfg, steps = self.cfg, self.steps_per_epoch
        gb = cfg.batch_size
        self.method.train()
        perm = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(_seed_of(cfg.seed, epoch, 1)))
        rows = slice(self.dist.rank * self.local_batch, (self.dist.rank + 1) * self.local_batch)
        sums: Dict[str, float] = {}
        t0 = time.perf_counter()
        for step in range(steps):
            it = epoch * steps + step
            lr, wd = self._set_schedules(it)
            idx = perm[step * gb:(step + 1) * gb][rows]
            images = self.train_images[idx.to(self.device)]
            if self.batch_hook is not None:
                images = self.batch_hook(epoch, step, images)
            gen = torch.Generator().manual_seed(_seed_of(cfg.seed, epoch, step, 2))
            with self._autocast():
                out = self.method.training_step(Batch(images, gen, rows, gb), epoch, step)
            loss = out["loss"]
            loss_val = float(D.all_reduce_mean(loss.detach().float()))
            if not math.isfinite(loss_val):
                first = int(self._first_bad_step.item())
                grads = (f" (gradients first non-finite at epoch {first // steps + 1}, step {first % steps + 1})"
                         if first >= 0 else "")
                raise NonFiniteLossError(
                    f"non-finite loss ({loss_val}) at epoch {epoch + 1}, step {step + 1}/{steps}{grads}; training "
                    f"stopped; {self._good_text(first if first >= 0 else it)}. {self._advice()}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            out.update(self.method.before_optimizer_step(epoch, step))
            self._flag_non_finite_grads(it)
            self.optimizer.step()
            out.update(self.method.after_optimizer_step(epoch, step))
            metrics = {k: float(D.all_reduce_mean(torch.as_tensor(float(v)))) for k, v in out.items() if k != "loss"}
            self._log_step(epoch, step, loss_val, lr, wd, metrics)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            sums["loss"] = sums.get("loss", 0.0) + loss_val
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                dt = time.perf_counter() - t0
                ips = (step + 1) * gb / max(dt, 1e-9)
                eta = (steps - step - 1) * dt / (step + 1)
                shown = self.method.describe(metrics)
                self.progress.update(f"epoch {epoch + 1}/{cfg.epochs} [{step + 1:>4}/{steps}] loss {loss_val:.4f} "
                                     f"lr {lr:.2e}{' ' + shown if shown else ''} {ips:6.1f} img/s eta {eta:4.0f}s",
                                     final=step + 1 == steps)
        dt = time.perf_counter() - t0
        res = {k: v / steps for k, v in sums.items()}
        res["images_per_s"] = steps * gb / max(dt, 1e-9)
        res["epoch_time_s"] = dt
        return res

    def _log_step(self, epoch: int, step: int, loss: float, lr: float, wd: float, metrics: Dict[str, float]) -> None:
        """One ``steps.csv`` row: the fixed columns, then every metric the method returned."""
        columns = self.history.setdefault("step_columns", list(LEGACY_STEP_COLUMNS))
        columns.extend(k for k in metrics if k not in columns)
        row = [epoch + 1, step + 1, loss, lr, wd]
        row += [metrics.get(k, float("nan")) for k in columns[len(STEP_COLUMNS):]]
        self.history["steps"].append(row)

    def _flag_non_finite_grads(self, it: int) -> None:
        # Largest |gradient| per tensor (inf-norm: no overflow for large finite values); NaN or inf
        # marks iteration ``it`` in a device tensor, read only at the epoch's end (no sync here).
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        norms = torch._foreach_norm([g.detach() for g in grads], math.inf)
        finite = torch.isfinite(torch.stack([n.float() for n in norms])).all()
        self._first_bad_step = torch.where(finite | (self._first_bad_step >= 0), self._first_bad_step,
                                           torch.full_like(self._first_bad_step, it))

    def _start_name(self) -> str:
        """What the first evaluation measured: the random initialisation, or the ``--init`` checkpoint's weights."""
        return "--init weights" if self.cfg.init else "random init"

    def _baselines(self) -> None:
        """The evaluations every learned feature is judged against, once per run (kept on resume):
        k-NN (and, with ``linear_probe``, the linear probe) at random initialisation and on raw pixels."""
        h, p, cfg = self.history, self.progress, self.cfg
        evals = [("knn_random_init", lambda: self.knn_eval()), ("knn_raw_pixels", lambda: self.knn_eval(raw_pixels=True))]
        if cfg.linear_probe:
            # a run resumed from a checkpoint made before linear probes has no random-init model left
            evals += [("linear_random_init", lambda: self.linear_eval())] if self.start_epoch == 0 else []
            evals += [("linear_raw_pixels", lambda: self.linear_eval(raw_pixels=True))]
        for key, run in evals:
            if h.get(key) is None:
                h[key] = D.broadcast_float(run() if self.dist.is_main else None)
        def pair(knn: str, linear: str) -> str:
            lin = h.get(linear)
            return f"{h[knn]:.2f}%" + (f" / linear {lin:.2f}%" if cfg.linear_probe and lin is not None else "")

        p.print(f"baselines on {self.test_set.name} (k-NN k={cfg.knn_k}, T={cfg.knn_temperature}"
                + (" / linear probe" if cfg.linear_probe else "") + f"): {self._start_name()} k-NN "
                + pair("knn_random_init", "linear_random_init") + ", raw pixels k-NN "
                + pair("knn_raw_pixels", "linear_raw_pixels"))
        if self.dist.is_main:
            h["best_earlier_run"] = best_earlier_run(cfg.out, cfg.data, cfg.eval_split)
            best = h["best_earlier_run"]
            if best:
                p.print(f"best earlier run on {cfg.data}: {best['out']} ({best['method']} {best['arch']}, "
                        f"{best['epochs']} epochs) k-NN {best['knn_top1']:.2f}%"
                        + (f", linear {best['linear_top1']:.2f}%" if best.get("linear_top1") is not None else ""))

    def fit(self) -> Dict[str, Any]:
        """Train from ``start_epoch`` to ``epochs`` (or ``stop_after_epochs``); returns the summary."""
        cfg = self.cfg
        t_start = time.perf_counter()
        p = self.progress
        p.print(f"{cfg.method.upper()} | {cfg.arch} | data {self.train_set.name}, evaluated on {self.test_set.name} | "
                f"device {self.device}{' bf16' if self.amp else ''} x{self.dist.world_size} | global batch "
                f"{cfg.batch_size}, {self.steps_per_epoch} steps/epoch, {cfg.epochs} epochs, {self.optimizer_name} "
                f"lr {self.base_lr:.2e}")
        stage1 = self.method.preset_for(cfg.data, cfg.arch).get("stage1")
        if stage1 and cfg.init is None and self.start_epoch == 0:
            p.print(f"note: {cfg.method}'s preset for {data_name(cfg.data)} is a second stage after "
                    f"{stage1.get('epochs', '')} epochs of {stage1['method']}: pass that run's checkpoint with --init "
                    f"(ssl-fast compare --methods {cfg.method} runs both stages); starting from random init")
        self._baselines()
        base, pixels = self.history["knn_random_init"], self.history["knn_raw_pixels"]
        end = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, cfg.stop_after_epochs)
        for epoch in range(self.start_epoch, end):
            res = self.train_epoch(epoch)
            self._check_finite(epoch)
            knn = D.broadcast_float(self.knn_eval() if self.dist.is_main else None)
            row = {"epoch": epoch + 1, **{k: round(v, 6) for k, v in res.items()}, "knn_top1": knn,
                   "knn_random_init": base}
            self.history["epochs"].append(row)
            warnings = self.method.collapse_warnings(res)
            shown = self.method.describe(res)
            p.print(f"epoch {epoch + 1}/{cfg.epochs}: loss {res['loss']:.4f}" + (f", {shown}" if shown else "")
                    + f" | k-NN top-1 {knn:.2f}% ({self._start_name()} {base:.2f}%) | {res['images_per_s']:.0f} img/s")
            for w in warnings:
                p.print(f"WARNING: {w}")
            if self.dist.is_main:
                self._write_logs()
            self._save(epoch)
            D.barrier()
        done = len(self.history["epochs"])
        finished = done == cfg.epochs
        linear = None
        if cfg.linear_probe and finished:
            linear = D.broadcast_float(self.linear_eval() if self.dist.is_main else None)
        loc = self.localisation_eval() if self.dist.is_main and done else None
        summary = {"epochs_done": done, "knn_top1": self.history["epochs"][-1]["knn_top1"] if done else None,
                   "linear_top1": linear, "knn_random_init": base, "knn_raw_pixels": pixels,
                   "linear_random_init": self.history.get("linear_random_init"),
                   "linear_raw_pixels": self.history.get("linear_raw_pixels"),
                   "best_earlier_run": self.history.get("best_earlier_run"), "eval_split": cfg.eval_split,
                   "localisation": loc,
                   "wall_time_s": time.perf_counter() - t_start, "out": cfg.out}
        self.history["summary"] = summary
        if self.dist.is_main:
            self._write_logs(figures=True)
            att = os.path.join(cfg.out, "attention.png")
            outputs = ["log.json", "metrics.csv", "steps.csv", "curves.png"]
            if self.save_attention(att):
                summary["attention_png"] = att
                outputs.append("attention.png")
            summary["curves_png"] = os.path.join(cfg.out, "curves.png")
            outputs += [CHECKPOINT_NAME] + ([PREVIOUS_NAME] if os.path.exists(os.path.join(cfg.out, PREVIOUS_NAME)) else [])
            if done:
                gain = summary["knn_top1"] - base
                lin = f", linear probe {linear:.2f}%" if linear is not None else ""
                where = ""
                for prefix, name in (("", "localisation"), ("activation_", "activation localisation")):
                    if loc is not None and prefix + "iou" in loc:
                        where += (f" | {name} IoU {loc[prefix + 'iou']:.3f}, "
                                  f"pointing {100 * loc[prefix + 'pointing']:.1f}%")
                p.print(f"done: {cfg.method.upper()} {cfg.arch}, {done}/{cfg.epochs} epochs in "
                        f"{summary['wall_time_s']:.0f}s | {'held-out' if cfg.eval_split == 'test' else 'validation'} "
                        f"k-NN top-1 {summary['knn_top1']:.2f}%{lin} vs {self._start_name()} {base:.2f}% "
                        f"({gain:+.2f} points), "
                        f"raw pixels {pixels:.2f}%{where} | outputs in {cfg.out}/ ({', '.join(outputs)})")
        return summary
