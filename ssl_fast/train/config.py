"""A run's settings (:class:`TrainConfig`) and how unset ones are filled: the method's preset for
the data set, then the method's own defaults. Nothing here knows a particular method."""
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

from ssl_fast.methods import get_method
from ssl_fast.methods.config import flag_name, unknown_options
from ssl_fast.models import is_model, list_models

#: run settings a method's preset may give (``None`` in the config = take the preset's)
PRESET_FIELDS = ("arch", "epochs", "batch_size", "image_size", "lr", "min_lr", "warmup_epochs", "weight_decay",
                 "weight_decay_end", "optimizer")
OPTIMIZERS = ("adamw", "sgd", "lars")
EVAL_SPLITS = ("test", "val")


@dataclass
class TrainConfig:
    """Everything a run depends on (``None`` = the method's preset for the data, then its default).

    Attributes:
        method: registered method name.
        data: ``digits``, ``cifar10:<folder>`` or an image folder.
        arch: backbone name.
        epochs: total epochs (the schedules span these).
        batch_size: GLOBAL batch size (all ranks together).
        lr: base learning rate for a batch of 256 (scaled by batch/256); method default if None.
        min_lr, warmup_epochs, weight_decay, weight_decay_end: schedule overrides.
        optimizer: ``adamw``, ``sgd`` or ``lars`` (method default if None).
        out: output folder (default ``runs/<method>-<data name>``).
        resume: checkpoint path, folder, or ``auto``.
        init: a checkpoint of another run whose weights start a fresh run (a stage-1 model for a
            stage-2 method, e.g. BYOL for CVSA); the method decides what it takes
            (:meth:`~ssl_fast.methods.SSLMethod.load_init`). Ignored when resuming.
        overwrite: start afresh even though ``out`` holds an earlier run's checkpoint (which the
            first epoch's checkpoint then replaces); without it such a start is refused.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        seed: seed of initialisation, data order and augmentation.
        amp: ``auto`` (bf16 autocast on GPUs), ``bf16`` or ``off``.
        image_size: side the data is stored at.
        knn_k, knn_temperature: k-NN evaluation parameters.
        eval_split: ``test`` evaluates on the held-out split; ``val`` trains on the training
            images minus a validation share (``val_fraction`` of each class, fixed by ``seed``)
            and evaluates on that share, for choosing settings without looking at the test split.
        val_fraction: share of each class's training images held out by ``eval_split="val"``.
        linear_probe: train a linear classifier on frozen features at the end (and at random init).
        max_steps_per_epoch: cap on steps per epoch (quick runs, tests).
        stop_after_epochs: stop this invocation after this many epochs in total (resume later).
        log_every: progress line every this many steps (always at an epoch's end).
        attention_images: images in the attention figure.
        options: method options (``--out-dim``...), by argparse dest.
    """
    method: str = "dino"
    data: str = "digits"
    arch: Optional[str] = None
    epochs: Optional[int] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    min_lr: Optional[float] = None
    warmup_epochs: Optional[float] = None
    weight_decay: Optional[float] = None
    weight_decay_end: Optional[float] = None
    optimizer: Optional[str] = None
    out: Optional[str] = None
    resume: Optional[str] = None
    init: Optional[str] = None
    overwrite: bool = False
    device: str = "auto"
    seed: int = 0
    amp: str = "auto"
    image_size: Optional[int] = None
    knn_k: int = 20
    knn_temperature: float = 0.07
    eval_split: str = "test"
    val_fraction: float = 0.2
    linear_probe: bool = True
    max_steps_per_epoch: Optional[int] = None
    stop_after_epochs: Optional[int] = None
    log_every: int = 10
    attention_images: int = 6
    options: Dict[str, Any] = field(default_factory=dict)


def data_name(data: str) -> str:
    """A short name of a data spec for folder names: ``digits``, ``cifar10``, an image folder's name."""
    if ":" in data:
        return data.split(":", 1)[0]
    if os.sep in data or os.path.isdir(data):
        return os.path.basename(os.path.normpath(data)) or "data"
    return data


def default_out(method: str, data: str) -> str:
    """``runs/<method>-<data name>``, e.g. ``runs/byol-digits``."""
    return os.path.join("runs", f"{method}-{data_name(data)}")


def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill ``None`` fields from the method's preset for the data set and validate the names.

    Raises:
        ValueError: unknown method or architecture (the message lists the known ones), an option
            the method does not have, bad numbers.
    """
    cls = get_method(cfg.method)  # raises with the list of methods
    preset = cls.preset_for(cfg.data, cfg.arch)
    out = TrainConfig(**{**asdict(cfg), "options": dict(cfg.options)})
    for name in PRESET_FIELDS:
        if getattr(out, name) is None and name in preset:
            setattr(out, name, preset[name])
    if cls.config_class is not None:
        extra = unknown_options(cls.config_class, out.options)
        if extra:
            raise ValueError(f"{', '.join(flag_name(k) for k in extra)}: not an option of method {cfg.method!r} "
                             f"(see ssl-fast pretrain --help, '{cfg.method} options')")
    for k, v in preset.get("options", {}).items():
        if out.options.get(k) is None:
            out.options[k] = v
    if out.out is None:
        out.out = default_out(out.method, out.data)
    if out.arch is None:
        raise ValueError(f"method {cfg.method!r} has no preset architecture for {cfg.data!r}: pass --arch")
    if not is_model(out.arch):
        raise ValueError(f"unknown architecture {out.arch!r}; known architectures: {', '.join(list_models())}")
    for name in ("epochs", "batch_size", "image_size"):
        if getattr(out, name) is None:
            raise ValueError(f"method {cfg.method!r} has no preset {flag_name(name)} for {cfg.data!r}: pass it")
        if getattr(out, name) < 1:
            raise ValueError(f"{flag_name(name)} must be >= 1, got {getattr(out, name)}")
    if out.amp not in ("auto", "bf16", "off"):
        raise ValueError(f"--amp must be auto, bf16 or off, got {out.amp!r}")
    if out.optimizer is not None and out.optimizer not in OPTIMIZERS:
        raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {out.optimizer!r}")
    if out.eval_split not in EVAL_SPLITS:
        raise ValueError(f"--eval-split must be test or val, got {out.eval_split!r}")
    if not 0.0 < out.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in (0, 1), got {out.val_fraction}")
    return out
