"""The part of the trainer that saves and restores a run: checkpoints written atomically and
verified, every rank's RNG state, the method state without DDP wrappers, exact resume, and the
check that nothing non-finite is ever saved (see :mod:`ssl_fast.train.trainer` for the rules)."""
import os
import random
from dataclasses import asdict
from typing import Any, Dict, List

import numpy as np
import torch

from ssl_fast.train.checkpoint import (CHECKPOINT_NAME, PREVIOUS_NAME, CheckpointError, load_checkpoint,
                                       non_finite_tensors, save_atomic)

CHECKPOINT_VERSION = 1


class NonFiniteLossError(RuntimeError):
    """Raised when the loss, a gradient, or the state to checkpoint is NaN or infinite.

    The checkpoint the message names was verified finite when it was written and is left as it was.
    """


class CheckpointState:
    """Checkpoint methods of :class:`~ssl_fast.train.trainer.Trainer` (a mixin: it reads the
    trainer's ``cfg``, ``dist``, ``device``, ``method``, ``optimizer``, ``history``, ``progress``
    and ``steps_per_epoch``)."""

    def _rng_state(self) -> Dict[str, Any]:
        st = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            st["cuda"] = torch.cuda.get_rng_state(self.device)
        return st

    def _set_rng_state(self, st: Dict[str, Any]) -> None:
        torch.set_rng_state(st["torch"].cpu())  # torch.load(map_location=cuda) moved it
        np.random.set_state(st["numpy"])
        random.setstate(st["python"])
        if self.device.type == "cuda" and "cuda" in st:
            cuda = st["cuda"]
            if isinstance(cuda, (list, tuple)):  # checkpoints that saved every device's state
                cuda = cuda[min(self.device.index or 0, len(cuda) - 1)]
            torch.cuda.set_rng_state(cuda.cpu(), self.device)

    def checkpoint_path(self) -> str:
        """Where this run's newest checkpoint is written."""
        return os.path.join(self.cfg.out, CHECKPOINT_NAME)

    def _method_state(self) -> Dict[str, torch.Tensor]:
        """The method's state without DDP wrappers: ``x.module.y`` becomes ``x.y``."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = [n for n, m in self.method.named_modules(remove_duplicate=False) if isinstance(m, DDP)]
        state = self.method.state_dict()
        if not wrapped:
            return state
        out = {}
        for k, v in state.items():
            for n in wrapped:
                if k.startswith(n + ".module."):
                    k = n + "." + k[len(n) + len(".module."):]
            out.setdefault(k, v)
        return out

    def _check_finite(self, epoch: int) -> None:
        """Raise :class:`NonFiniteLossError` (on every rank) if a step of this epoch or the state is non-finite."""
        bad = non_finite_tensors({"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict()})
        flag = torch.tensor([float(self._first_bad_step.item()), float(len(bad))], dtype=torch.float64)
        if self.dist.enabled:
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        first, n_bad = int(flag[0]), int(flag[1])
        if first < 0 and n_bad == 0:
            return
        where = (f"gradients first non-finite at epoch {first // self.steps_per_epoch + 1}, step "
                 f"{first % self.steps_per_epoch + 1}/{self.steps_per_epoch}" if first >= 0 else "")
        if bad:
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            where += ("; " if where else "") + f"{len(bad)} non-finite tensors after epoch {epoch + 1} ({shown})"
        elif n_bad:
            where += ("; " if where else "") + f"non-finite tensors on another rank after epoch {epoch + 1}"
        raise NonFiniteLossError(f"non-finite training state: {where}; training stopped and epoch {epoch + 1} "
                                 f"was not saved; {self._good_text(first)}. {self._advice()}")

    def _good_text(self, first_bad: int = -1) -> str:
        """Which checkpoint to resume from, given the first iteration with a non-finite loss or gradients."""
        if self.good_checkpoint is None:
            return "no checkpoint of this run was written yet"
        path, done = self.good_checkpoint
        if first_bad >= 0 and first_bad == done * self.steps_per_epoch:
            # the very first step from that state already went non-finite: its numbers are
            # finite, but resuming from it fails the same way at once
            told = (f"{path} (epoch {done}) holds only finite numbers, but the first step from it already gave "
                    "a non-finite loss or gradients, so resuming from it stops again at once; ")
            if self.previous_good is None:
                return told + "no earlier checkpoint of this run is kept"
            prev, pdone = self.previous_good
            return told + f"the last good checkpoint, {prev} (epoch {pdone}), is intact: resume with --resume {prev}"
        return f"the last good checkpoint, {path} (epoch {done}), is intact"

    @staticmethod
    def _advice() -> str:
        return "Lower --lr, check the data for NaN/inf, or use --amp off."

    def _save(self, epoch: int) -> None:
        """Write the checkpoint of ``epoch`` (0-based) from rank 0, with every rank's RNG state."""
        rng = self._rng_state()
        if self.dist.enabled:
            import torch.distributed as dist

            ranks: List[Any] = [None] * self.dist.world_size
            dist.all_gather_object(ranks, rng)
        else:
            ranks = [rng]
        path = self.checkpoint_path()
        previous = os.path.join(self.cfg.out, PREVIOUS_NAME)
        if self.dist.is_main:
            def verify(back: Dict[str, Any]) -> None:
                bad = non_finite_tensors({"method": back["method"], "optimizer": back["optimizer"]})
                if back.get("epoch") != epoch or bad:
                    raise CheckpointError(f"the checkpoint written for {path} does not verify "
                                          f"(epoch {back.get('epoch')}, non-finite: {bad[:3]}); {path} was left as it was")

            save_atomic({"version": CHECKPOINT_VERSION, "epoch": epoch, "config": asdict(self.cfg),
                         "method": self._method_state(), "optimizer": self.optimizer.state_dict(),
                         "rng": ranks[0], "rng_per_rank": ranks, "history": self.history,
                         "world_size": self.dist.world_size}, path, verify=verify,
                        keep_previous=previous)
        if self.good_checkpoint is not None and self.good_checkpoint[0] == path:
            self.previous_good = (previous, self.good_checkpoint[1])
        self.good_checkpoint = (path, epoch + 1)

    def _load(self, path: str) -> None:
        ck = load_checkpoint(path, map_location=self.device)
        old = ck.get("config", {})
        for key in ("method", "arch", "batch_size", "image_size"):
            if old.get(key) != getattr(self.cfg, key):
                flag = "--" + key.replace("_", "-")
                raise CheckpointError(f"cannot resume from {path}: it was trained with {flag} {old.get(key)!r}, "
                                      f"this run has {flag} {getattr(self.cfg, key)!r}")
        if old.get("epochs") != self.cfg.epochs or old.get("seed") != self.cfg.seed:
            self.progress.print(f"warning: resuming a run made with epochs={old.get('epochs')}, seed={old.get('seed')}"
                                f" under epochs={self.cfg.epochs}, seed={self.cfg.seed}: schedules differ")
        self._load_method_state(path, ck["method"], old.get("options", {}))
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"cannot resume from {path}: its optimizer state does not fit this run's "
                                  f"parameters ({e})") from None
        rngs = ck.get("rng_per_rank") or [ck["rng"]]
        old_world = int(ck.get("world_size", len(rngs)))
        self._set_rng_state(rngs[self.dist.rank % len(rngs)])
        if old_world != self.dist.world_size:
            self.progress.print(
                f"note: {path} was written by {old_world} process(es), this run has {self.dist.world_size}. The data "
                f"order and the crops depend only on the global batch ({self.cfg.batch_size}), so they are the same; "
                "per-process randomness (drop-path), per-process BatchNorm statistics on the CPU and the order of "
                "floating-point sums differ, so the run continues correctly but not bit for bit as an uninterrupted "
                f"{old_world}-process run would.")
        self.history = ck["history"]
        self.start_epoch = ck["epoch"] + 1
        self.resumed_from = path
        self.good_checkpoint = (path, ck["epoch"] + 1)
        self.progress.print(f"resumed from {path} (epoch {ck['epoch'] + 1} done)")

    def _init_from(self, path: str) -> None:
        """``--init``: the method takes what it can use from another run's checkpoint (fresh run only)."""
        if not os.path.isfile(path):
            raise ValueError(f"--init {path!r} is not a checkpoint file")
        ck = load_checkpoint(path, map_location=self.device, required=("method",))
        told = self.method.load_init(ck["method"], path, ck.get("config"))
        self.progress.print(f"initialised from {path}: {told}")

    def _load_method_state(self, path: str, state: Dict[str, torch.Tensor], old_options: Dict[str, Any]) -> None:
        """Load the method's tensors, or raise one :class:`CheckpointError` naming what differs."""
        own = self.method.state_dict()
        state = {k: v for k, v in state.items() if not k.startswith("_forward_student.")}  # older checkpoints
        changed = [k for k in sorted(set(old_options) | set(self.cfg.options))
                   if old_options.get(k) != self.cfg.options.get(k)]
        shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if not (shapes or missing or unexpected):
            self.method.load_state_dict(state)
            return

        def flag(k: str) -> str:
            return "--" + k.replace("_", "-")

        opts = "; ".join(f"it was trained with {flag(k)} {old_options.get(k)!r}, this run has {flag(k)} "
                         f"{self.cfg.options.get(k)!r}" for k in changed)
        if shapes:
            k = shapes[0]
            detail = (f"{len(shapes)} tensors have other shapes, e.g. {k}: {tuple(state[k].shape)} in the "
                      f"checkpoint, {tuple(own[k].shape)} here")
        else:
            detail = (f"{len(missing)} tensors missing" + (f" (e.g. {missing[0]})" if missing else "")
                      + f", {len(unexpected)} unexpected" + (f" (e.g. {unexpected[0]})" if unexpected else ""))
        raise CheckpointError(f"cannot resume from {path}: " + (opts + " (options that change the model's shape "
                              "must stay as they were to resume; " + detail + ")" if opts else
                              "the model differs from the checkpoint's: " + detail))

