"""Training and evaluation of the Show-Attend-Tell captioner, with exact resume, logs and figures.

A run trains on the training split, scores the validation split each epoch (greedy decoding:
BLEU-1..4 and, on the embedded scenes, attention localisation), and at the end scores the test
split with beam search and writes the attention figures. Everything that decides the result is
a function of the seed: the data order and the captions drawn per image come from generators
seeded by ``(seed, epoch)``, and the checkpoint (written atomically after every epoch with
:func:`ssl_fast.train.checkpoint.save_atomic`) holds the model, the optimizer, the RNG states and
the history, so a run stopped and resumed equals an uninterrupted one.

Outputs in ``out``: ``checkpoint.pth`` (and ``checkpoint.prev.pth``), ``log.json``,
``metrics.csv`` (per epoch), ``steps.csv`` (per step), ``curves.png``, ``attention.png`` (the
first test examples, one row each) and ``examples/example_NNN.png`` (one per test example).
"""
import csv
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ssl_fast.tasks.captioning.data import CaptionSet, Vocabulary
from ssl_fast.tasks.captioning.encoder import Encoder, build_backbone, load_pretrained_backbone
from ssl_fast.tasks.captioning.figures import save_captions_png, save_curves_png
from ssl_fast.tasks.captioning.metrics import score_captions
from ssl_fast.tasks.captioning.model import Captioner
from ssl_fast.tasks.captioning.search import beam_search
from ssl_fast.train.checkpoint import (CHECKPOINT_NAME, PREVIOUS_NAME, CheckpointError, load_checkpoint,
                                       resolve_resume, save_atomic)

CHECKPOINT_VERSION = 1
SCENES = "scenes"


@dataclass
class CaptionConfig:
    """A captioning run; the defaults are tuned on the embedded scenes' validation split.

    ``None`` fields take the data's default (:func:`resolve`): for the scenes 32-px images with
    10-px digits, ``resnet_mini``'s ``layer3`` (an 8x8 grid) and two captions per image; for
    Karpathy data 224-px images, ``resnet18``'s ``layer4`` and five captions per image (the
    tutorial's ``captions_per_image``).
    """
    data: str = SCENES
    backbone: Optional[str] = None
    checkpoint: Optional[str] = None
    feature_stage: Optional[int] = None
    pos_embed: bool = True
    word_weight: Optional[float] = None
    fine_tune_from: Optional[int] = 0
    image_size: Optional[int] = None
    digit_size: Optional[int] = None
    epochs: int = 8
    batch_size: int = 32
    lr: float = 3e-3
    min_lr: float = 1e-5
    warmup_epochs: float = 0.1
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    alpha_c: float = 0.002
    embed_dim: int = 64
    decoder_dim: int = 256
    attention_dim: int = 128
    dropout: float = 0.3
    captions_per_image: Optional[int] = None
    max_len: int = 20
    min_word_count: int = 1
    beam_width: int = 3
    n_train: int = 4000
    n_val: int = 500
    n_test: int = 500
    data_seed: int = 0
    examples: int = 6
    out: str = "runs/caption-scenes"
    resume: Optional[str] = None
    overwrite: bool = False
    seed: int = 0
    device: str = "auto"
    stop_after_epochs: Optional[int] = None
    log_every: int = 20
    options: Dict[str, Any] = field(default_factory=dict)


# fields whose change alters the model's shape or the data: a checkpoint must agree on them
SHAPE_FIELDS = ("data", "backbone", "feature_stage", "pos_embed", "word_weight", "digit_size", "fine_tune_from", "image_size", "embed_dim", "decoder_dim",
                "attention_dim", "max_len", "min_word_count", "n_train", "data_seed", "batch_size", "captions_per_image")


def resolve(cfg: CaptionConfig) -> CaptionConfig:
    """Fill the data-dependent defaults (see :class:`CaptionConfig`)."""
    scenes = cfg.data == SCENES
    d = asdict(cfg)
    if d["image_size"] is None:
        d["image_size"] = 32 if scenes else 224
    if d["digit_size"] is None and scenes:
        d["digit_size"] = max(4, d["image_size"] * 5 // 16)
    if d["word_weight"] is None:
        d["word_weight"] = 1.0 if scenes and cfg.fine_tune_from is not None else 0.0
    if d["feature_stage"] is None:
        d["feature_stage"] = 3 if scenes else 4
    if d["backbone"] is None and cfg.checkpoint is None:
        d["backbone"] = "resnet_mini" if scenes else "resnet18"
    if d["captions_per_image"] is None:
        d["captions_per_image"] = 1 if scenes else 5
    return CaptionConfig(**d)


def seed_of(*ints: int) -> int:
    """One 63-bit seed from several integers (independent streams per epoch and purpose)."""
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(2, dtype=np.uint32).astype(
        np.uint64).dot(np.array([1, 2 ** 31], dtype=np.uint64)) % (2 ** 63))


def pick_device(spec: str) -> torch.device:
    """``auto``: the first GPU when CUDA is available, else the CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec} asks for CUDA but no GPU is available")
    return dev


def load_caption_data(cfg: CaptionConfig) -> Tuple[CaptionSet, CaptionSet, CaptionSet]:
    """``(train, val, test)`` for ``cfg.data``: ``scenes`` or ``karpathy:<json>:<image folder>``."""
    if cfg.data == SCENES:
        from ssl_fast.tasks.captioning.scenes import load_scenes

        return load_scenes(cfg.n_train, cfg.n_val, cfg.n_test, seed=cfg.data_seed, image_size=cfg.image_size,
                           digit_size=cfg.digit_size)
    from ssl_fast.tasks.captioning.karpathy import load_karpathy, parse_spec

    path, folder = parse_spec(cfg.data)
    sets = load_karpathy(path, folder, image_size=cfg.image_size, max_len=cfg.max_len)
    for split in ("train", "val"):
        if len(sets[split]) == 0:
            raise ValueError(f"{path} has no {split} images")
    return sets["train"], sets["val"], sets["test"] if len(sets["test"]) else sets["val"]


class CaptionTask:
    """Builds the captioner for a configuration, trains it and evaluates it.

    Args:
        cfg: the run (``None`` fields resolved by :func:`resolve`).
        data: ``(train, val, test)`` caption sets to use instead of loading ``cfg.data``.
        stream: where progress goes (default: stdout).

    Example:
        >>> task = CaptionTask(CaptionConfig(epochs=1, n_train=64, n_val=16, n_test=16, out="/tmp/cap"))
        >>> summary = task.fit()  # doctest: +SKIP
    """

    def __init__(self, cfg: CaptionConfig, data: Optional[Tuple[CaptionSet, CaptionSet, CaptionSet]] = None,
                 stream=None):
        self.cfg = cfg = resolve(cfg)
        self.stream = stream or sys.stdout
        self.device = pick_device(cfg.device)
        self.train_set, self.val_set, self.test_set = data if data is not None else load_caption_data(cfg)
        self.vocab = Vocabulary.build((s for refs in self.train_set.references for s in refs), cfg.min_word_count)
        n_img = len(self.train_set)
        self.images_per_step = min(cfg.batch_size, n_img)
        self.steps_per_epoch = n_img // self.images_per_step
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training split has no images ({self.train_set.name})")
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2 ** 32)
        random.seed(cfg.seed)
        self.arch = cfg.backbone
        if cfg.checkpoint is not None:
            backbone, self.arch = load_pretrained_backbone(cfg.checkpoint, cfg.image_size, cfg.backbone)
        else:
            backbone = build_backbone(cfg.backbone, cfg.image_size)
        mean, std = self.train_set.channel_stats()
        encoder = Encoder(backbone, stage=cfg.feature_stage, fine_tune_from=cfg.fine_tune_from, mean=mean, std=std)
        self.model = Captioner(encoder, len(self.vocab), cfg.image_size, embed_dim=cfg.embed_dim,
                               decoder_dim=cfg.decoder_dim, attention_dim=cfg.attention_dim,
                               dropout=cfg.dropout, pos_embed=cfg.pos_embed,
                               word_head=cfg.word_weight > 0).to(self.device)
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() > 1]
        no_decay = [p for p in params if p.dim() <= 1]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
        from ssl_fast.train.schedules import cosine_schedule

        self.lr_schedule = cosine_schedule(cfg.lr, cfg.min_lr, cfg.epochs, self.steps_per_epoch, cfg.warmup_epochs)
        self.history: Dict[str, Any] = {"epochs": [], "steps": []}
        self.start_epoch = 0
        self.resumed_from: Optional[str] = None
        ckpt = resolve_resume(cfg.resume, cfg.out)
        earlier = os.path.join(cfg.out, CHECKPOINT_NAME)
        if ckpt is None and not cfg.overwrite and os.path.isfile(earlier):
            raise ValueError(f"--out {cfg.out!r} already holds an earlier run's checkpoint ({earlier}); "
                             "continue it with --resume auto, choose another --out, or pass --overwrite")
        if ckpt is not None:
            self._load(ckpt)
        os.makedirs(cfg.out, exist_ok=True)

    def print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    # ---- checkpoints ----------------------------------------------------------------------
    def _save(self, epoch: int) -> None:
        path = os.path.join(self.cfg.out, CHECKPOINT_NAME)

        def verify(back: Dict[str, Any]) -> None:
            if back.get("epoch") != epoch:
                raise CheckpointError(f"the checkpoint written for {path} does not verify; {path} was left as it was")

        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_atomic({"version": CHECKPOINT_VERSION, "task": "caption", "epoch": epoch, "config": asdict(self.cfg),
                     "arch": self.arch, "vocab": self.vocab.state_dict(), "model": self.model.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "rng": rng, "history": self.history},
                    path, verify=verify, keep_previous=os.path.join(self.cfg.out, PREVIOUS_NAME))

    def _load(self, path: str) -> None:
        ck = load_checkpoint(path, map_location=self.device,
                             required=("epoch", "config", "model", "optimizer", "rng", "vocab"))
        old = ck["config"]
        for key in SHAPE_FIELDS:
            if old.get(key) != getattr(self.cfg, key):
                flag = "--" + key.replace("_", "-")
                raise CheckpointError(f"cannot resume from {path}: it was trained with {flag} {old.get(key)!r}, "
                                      f"this run has {flag} {getattr(self.cfg, key)!r}")
        if Vocabulary.from_state_dict(ck["vocab"]) != self.vocab:
            raise CheckpointError(f"cannot resume from {path}: its vocabulary differs from this data's")
        if old.get("epochs") != self.cfg.epochs or old.get("seed") != self.cfg.seed:
            self.print(f"warning: resuming a run made with epochs={old.get('epochs')}, seed={old.get('seed')} "
                       f"under epochs={self.cfg.epochs}, seed={self.cfg.seed}: schedules differ")
        try:
            self.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot resume from {path}: its model does not fit this run's ({e})") from None
        rng = ck["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)
        self.history = ck["history"]
        self.start_epoch = ck["epoch"] + 1
        self.resumed_from = path
        self.print(f"resumed from {path} (epoch {ck['epoch'] + 1} done)")

    # ---- training --------------------------------------------------------------------------
    def _pick_captions(self, idx: List[int], gen: np.random.Generator) -> List[List[str]]:
        """``captions_per_image`` references per image (all when it has exactly that many; drawn
        without replacement when it has more, with replacement when fewer), image-major."""
        c = self.cfg.captions_per_image
        out = []
        for i in idx:
            refs = self.train_set.references[i]
            if len(refs) == c:
                pick = range(c)
            else:
                pick = gen.choice(len(refs), size=c, replace=len(refs) < c)
            out += [refs[j] for j in pick]
        return out

    def train_epoch(self, epoch: int) -> Dict[str, float]:
        cfg, steps, n = self.cfg, self.steps_per_epoch, self.images_per_step
        self.model.train()
        perm = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(seed_of(cfg.seed, epoch, 1)))
        gen = np.random.default_rng(seed_of(cfg.seed, epoch, 2))
        sums = {"loss": 0.0, "xent": 0.0, "reg": 0.0, "words": 0.0}
        t0 = time.perf_counter()
        for step in range(steps):
            it = epoch * steps + step
            lr = float(self.lr_schedule[it])
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            idx = perm[step * n:(step + 1) * n].tolist()
            images = self.train_set.get_images(idx).to(self.device)
            caps, lengths = self.vocab.batch(self._pick_captions(idx, gen), cfg.max_len)
            out = self.model.loss(images, caps.to(self.device), lengths.to(self.device), cfg.alpha_c,
                                  repeats=cfg.captions_per_image, word_weight=cfg.word_weight)
            loss = out["loss"]
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                               cfg.grad_clip)
            self.optimizer.step()
            vals = {k: float(v.detach()) for k, v in out.items()}
            if not math.isfinite(vals["loss"]):
                raise FloatingPointError(f"non-finite loss ({vals['loss']}) at epoch {epoch + 1}, step {step + 1}; "
                                         "lower --lr; the last checkpoint is intact")
            self.history["steps"].append([epoch + 1, step + 1, vals["loss"], vals["xent"], vals["reg"],
                                          vals["words"], lr])
            for k in sums:
                sums[k] += vals[k]
            if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
                dt = time.perf_counter() - t0
                eta = (steps - step - 1) * dt / (step + 1)
                self.print(f"epoch {epoch + 1}/{cfg.epochs} [{step + 1:>4}/{steps}] loss {vals['loss']:.4f} "
                           f"(xent {vals['xent']:.4f}, reg {vals['reg']:.4f}, words {vals['words']:.4f}) lr {lr:.2e} "
                           f"{(step + 1) * n / max(dt, 1e-9):6.1f} img/s eta {eta:4.0f}s")
        res = {k: v / steps for k, v in sums.items()}
        res["epoch_time_s"] = time.perf_counter() - t0
        return res

    # ---- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, data: CaptionSet, beam_width: int, limit: Optional[int] = None, chunk: int = 250):
        """``(words, alphas)`` for the first ``limit`` images of ``data`` (all by default)."""
        was = self.model.training
        self.model.eval()
        n = len(data) if limit is None else min(limit, len(data))
        words, alphas = [], []
        for s in range(0, n, chunk):
            images = data.get_images(range(s, min(s + chunk, n))).to(self.device)
            g = beam_search(self.model, images, beam_width, self.cfg.max_len, self.vocab.start_id, self.vocab.end_id)
            words += [self.vocab.decode(w) for w in g.words]
            alphas += g.alphas
        self.model.train(was)
        return words, alphas

    def evaluate(self, data: CaptionSet, beam_width: int = 1) -> Dict[str, float]:
        """BLEU-1..4 (and localisation on the scenes) of the captions generated for ``data``."""
        words, alphas = self.generate(data, beam_width)
        side = data.side
        return score_captions(data.references, words, alphas, data.boxes, self.model.grid, (side, side))

    def save_figures(self, data: CaptionSet, beam_width: int) -> List[str]:
        """``attention.png`` (the first examples) and ``examples/example_NNN.png`` (one each)."""
        n = min(self.cfg.examples, len(data))
        if n == 0:
            return []
        words, alphas = self.generate(data, beam_width, limit=n)
        images = data.get_images(range(n))
        boxes = data.boxes[:n] if data.boxes is not None else None
        folder = os.path.join(self.cfg.out, "examples")
        os.makedirs(folder, exist_ok=True)
        paths = []
        for i in range(n):
            p = os.path.join(folder, f"example_{i:03d}.png")
            save_captions_png(p, images[i:i + 1], [words[i]], [alphas[i]], self.model.grid,
                              [boxes[i]] if boxes else None, [f"test {i}"],
                              title=f"generated: {' '.join(words[i])}\nreference: {' '.join(data.references[i][0])}")
            paths.append(p)
        overview = os.path.join(self.cfg.out, "attention.png")
        save_captions_png(overview, images, words, alphas, self.model.grid, boxes,
                          [f"test {i}" for i in range(n)],
                          title=f"Show, Attend and Tell on {self.arch} features: each word's attention "
                                f"(beam {beam_width})")
        return [overview] + paths

    # ---- logs ------------------------------------------------------------------------------
    def _write_logs(self, figures: bool = False) -> None:
        out, rows = self.cfg.out, self.history["epochs"]
        if rows:
            with open(os.path.join(out, "metrics.csv"), "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
                w.writeheader()
                w.writerows(rows)
        with open(os.path.join(out, "steps.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "step", "loss", "xent", "reg", "words", "lr"])
            w.writerows(self.history["steps"])
        log = {"config": asdict(self.cfg), "arch": self.arch, "device": str(self.device),
               "vocab_size": len(self.vocab), "grid": list(self.model.grid), "steps_per_epoch": self.steps_per_epoch,
               "data": {"train": self.train_set.name, "val": self.val_set.name, "test": self.test_set.name},
               "epochs": rows, "test": self.history.get("test"), "summary": self.history.get("summary")}
        tmp = os.path.join(out, ".log.json.tmp")
        with open(tmp, "w") as f:
            json.dump(log, f, indent=1)
        os.replace(tmp, os.path.join(out, "log.json"))
        if figures and rows:
            save_curves_png(os.path.join(out, "curves.png"), [s[2] for s in self.history["steps"]],
                            self.steps_per_epoch, [r["epoch"] for r in rows], [r["val_bleu4"] for r in rows],
                            f"captioner ({self.arch}) on {self.cfg.data}")

    def fit(self) -> Dict[str, Any]:
        """Train from ``start_epoch`` to ``epochs`` (or ``stop_after_epochs``), then test; returns the summary."""
        cfg = self.cfg
        t_start = time.perf_counter()
        n_par = sum(p.numel() for p in self.model.parameters())
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.print(f"caption | encoder {self.arch} stage {self.model.encoder.stage} grid {self.model.grid} "
                   f"fine-tune from {cfg.fine_tune_from} | {n_train / 1e6:.2f}M of {n_par / 1e6:.2f}M parameters "
                   f"trained | vocab {len(self.vocab)} | data {self.train_set.name}, val {self.val_set.name} | "
                   f"device {self.device} | {self.images_per_step} images x {cfg.captions_per_image} captions per "
                   f"step, {self.steps_per_epoch} steps/epoch, {cfg.epochs} epochs")
        end = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, cfg.stop_after_epochs)
        for epoch in range(self.start_epoch, end):
            res = self.train_epoch(epoch)
            val = self.evaluate(self.val_set, beam_width=1)
            row = {"epoch": epoch + 1, **{k: round(v, 6) for k, v in res.items()},
                   **{f"val_{k}": v for k, v in val.items()}}
            self.history["epochs"].append(row)
            loc = f", localisation {100 * val['localisation']:.1f}%" if "localisation" in val else ""
            self.print(f"epoch {epoch + 1}/{cfg.epochs}: loss {res['loss']:.4f} | val (greedy) BLEU-4 "
                       f"{val['bleu4']:.4f}, BLEU-1 {val['bleu1']:.4f}{loc} | {res['epoch_time_s']:.0f}s")
            self._write_logs()
            self._save(epoch)
        done = len(self.history["epochs"])
        summary: Dict[str, Any] = {"epochs_done": done, "out": cfg.out}
        if done == cfg.epochs:
            test = self.evaluate(self.test_set, beam_width=cfg.beam_width)
            self.history["test"] = {"beam_width": cfg.beam_width, **test}
            summary["test"] = self.history["test"]
            summary["figures"] = self.save_figures(self.test_set, cfg.beam_width)
            loc = (f", attention localisation {100 * test['localisation']:.1f}% "
                   f"({test['hits']}/{test['object_words']} digit words)" if "localisation" in test else "")
            self.print(f"test (beam {cfg.beam_width}): BLEU-1 {test['bleu1']:.4f} BLEU-2 {test['bleu2']:.4f} "
                       f"BLEU-3 {test['bleu3']:.4f} BLEU-4 {test['bleu4']:.4f}{loc}")
        summary["wall_time_s"] = time.perf_counter() - t_start
        self.history["summary"] = summary
        self._write_logs(figures=True)
        self.print(f"done: {done}/{cfg.epochs} epochs in {summary['wall_time_s']:.0f}s | outputs in {cfg.out}/ "
                   f"(log.json, metrics.csv, steps.csv, curves.png"
                   + (", attention.png, examples/" if "figures" in summary else "") + f", {CHECKPOINT_NAME})")
        return summary
