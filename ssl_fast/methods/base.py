"""The interface every self-supervised method implements, and the method registry.

The trainer knows only this interface: it hands a method a batch of raw images, backpropagates
the returned loss, steps the optimizer, and calls the hooks around that step. A new method
(BYOL, SimSiam, CARE, CVSA) subclasses :class:`SSLMethod`, registers itself with
``@register_method("name")`` and works with the trainer and the CLI unchanged.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn


@dataclass
class Batch:
    """What the trainer gives :meth:`SSLMethod.training_step`.

    Attributes:
        images: ``[b, 3, H, W]`` float in [0, 1] on the training device (this rank's rows).
        generator: CPU ``torch.Generator`` seeded for this (epoch, step); augmentation draws
            every random parameter from it.
        rows: which rows of the global batch these images are (``slice(rank*b, (rank+1)*b)``).
        global_size: the global batch size (the number of samples to draw parameters for).
    """
    images: torch.Tensor
    generator: torch.Generator
    rows: slice
    global_size: int


@dataclass
class OptimConfig:
    """Optimizer and schedule settings a method recommends (the CLI can override each).

    Attributes:
        base_lr: learning rate for a global batch of 256 (scaled linearly by batch / 256).
        min_lr: final learning rate of the cosine schedule.
        warmup_epochs: linear warm-up length in epochs.
        weight_decay: weight decay at the start of the cosine weight-decay schedule.
        weight_decay_end: weight decay at the end.
        betas: AdamW betas.
        optimizer: ``adamw``, ``sgd`` or ``lars`` (:func:`ssl_fast.train.optim.build_optimizer`).
        momentum: SGD/LARS momentum.
        lars_eta: LARS trust coefficient.
    """
    base_lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    betas: tuple = (0.9, 0.999)
    optimizer: str = "adamw"
    momentum: float = 0.9
    lars_eta: float = 0.001


@dataclass
class MethodContext:
    """Facts about the run a method needs to build itself.

    Attributes:
        arch: backbone name in :mod:`ssl_fast.models`.
        epochs: total epochs.
        steps_per_epoch: optimizer steps per epoch.
        global_batch_size: images per optimizer step over all ranks.
        image_size: side of the stored images.
        mean: per-channel normalisation mean of the training images.
        std: per-channel normalisation std.
        options: method-specific options (from the CLI or a config), by name.
    """
    arch: str
    epochs: int
    steps_per_epoch: int
    global_batch_size: int
    image_size: int
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    options: Dict[str, Any] = field(default_factory=dict)


class SSLMethod(nn.Module):
    """Base class of self-supervised methods.

    Subclasses implement :meth:`training_step`, :meth:`features` and :meth:`trainable`, and may
    override the hooks. ``state_dict()`` must hold everything the method needs to resume exactly
    (networks, teacher, loss buffers); the trainer saves the optimizer and RNG states itself.

    Everything specific to a method lives on its class: its options and their defaults
    (:attr:`config_class`, read by the constructor, ``from_context`` and the command line), its
    presets per data set (:attr:`presets`) and the metrics it shows (:attr:`display_metrics`).
    The trainer logs every scalar a method returns and knows nothing else about it.
    """

    #: registry name, set by :func:`register_method`
    name: str = "base"
    #: the dataclass of the method's options (fields made with :func:`ssl_fast.methods.config.option`)
    config_class: Optional[type] = None
    #: defaults per data set, ``{"digits": {...}, "default": {...}}``: run settings (``arch``,
    #: ``epochs``, ``batch_size``, ``lr``...), ``options`` (fields of :attr:`config_class`) and,
    #: for a second-stage method, ``stage1``: the run its ``--init`` comes from (``method`` and
    #: run settings, e.g. ``dict(method="byol", epochs=5)``), which ``ssl-fast compare`` trains first
    presets: Dict[str, Dict[str, Any]] = {}
    #: metrics printed on the progress and epoch lines, as ``{name: format}``, e.g. ``{"momentum": "m {:.5f}"}``
    display_metrics: Dict[str, str] = {}
    #: whether the method needs a backbone with stages (``feature_maps``), as CARE and CVSA do
    requires_feature_maps: bool = False

    @classmethod
    def add_arguments(cls, parser) -> None:
        """Add the method's command-line options (one per field of :attr:`config_class`)."""
        if cls.config_class is not None:
            from ssl_fast.methods.config import add_config_arguments

            add_config_arguments(parser, cls.name, cls.config_class)

    @classmethod
    def preset_for(cls, data: str, arch: Optional[str] = None) -> Dict[str, Any]:
        """The preset for data set ``data`` (``digits``, ``cifar10:...``, a folder) and, when the user
        chose one, backbone ``arch``: the ``"<data name>/<arch>"`` preset if the method has one, else
        the data name's own preset, else ``default``, else an empty one."""
        name = data.split(":", 1)[0]
        if arch is not None and f"{name}/{arch}" in cls.presets:
            return cls.presets[f"{name}/{arch}"]
        return cls.presets.get(name, cls.presets.get("default", {}))

    def describe(self, metrics: Dict[str, float]) -> str:
        """The :attr:`display_metrics` present in ``metrics``, formatted, joined by spaces."""
        return " ".join(fmt.format(metrics[k]) for k, fmt in self.display_metrics.items() if k in metrics)

    def trainable(self) -> nn.Module:
        """The module the optimizer trains (and DDP wraps)."""
        raise NotImplementedError

    def training_step(self, batch: Batch, epoch: int, step: int) -> Dict[str, Any]:
        """Forward pass of one batch.

        Returns:
            A dict with ``loss`` (0-d tensor to backpropagate) and any number of scalar
            metrics (tensors or floats) to log.
        """
        raise NotImplementedError

    def before_optimizer_step(self, epoch: int, step: int) -> Dict[str, float]:
        """Called after ``backward``, before ``optimizer.step()`` (gradient clipping, freezing)."""
        return {}

    def after_optimizer_step(self, epoch: int, step: int) -> Dict[str, float]:
        """Called after ``optimizer.step()`` (momentum-teacher update). Returns metrics to log."""
        return {}

    def param_groups(self) -> List[Dict[str, Any]]:
        """Optimizer parameter groups; a group with ``apply_weight_decay=False`` gets none.

        Default: biases and other 1-D parameters (norms) without weight decay, the rest with.
        """
        decay, no_decay = [], []
        for name, p in self.trainable().named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
        return [{"params": decay, "apply_weight_decay": True},
                {"params": no_decay, "apply_weight_decay": False}]

    def optim_config(self) -> OptimConfig:
        """Recommended optimizer settings."""
        return OptimConfig()

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation features ``[B, D]`` of un-augmented images ``[B, 3, H, W]`` in [0, 1]."""
        raise NotImplementedError

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """Class-token attention of the last block, ``[B, heads, gh, gw]``, or None if not a ViT."""
        return None

    @torch.no_grad()
    def localisation_maps(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """Where the method looks in each image, ``[B, h, w]`` (any real values; higher = more
        object), scored against known foreground masks at the end of a run, or None.

        Default: :meth:`attention_maps` averaged over heads (a ViT's class-token attention).
        """
        att = self.attention_maps(images)
        return None if att is None else att.float().mean(1)

    @torch.no_grad()
    def activation_maps(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """Where the evaluated backbone's last feature map is strongest, ``[B, h, w]`` (channel L2
        norm, eval mode), or None (a ViT, or a method without such a backbone). The same measure
        for every CNN method, scored beside :meth:`localisation_maps` at the end of a run."""
        return None

    def attach_data(self, train_set, images: torch.Tensor, out: str) -> None:
        """Called once by the trainer before training (fresh or resumed) with the training set.

        A method that needs per-image side information (CVSA's cached saliency) prepares it here.

        Args:
            train_set: the :class:`~ssl_fast.data.datasets.ImageSet` trained on (masks, boxes if known).
            images: its images on the training device (the tensor batches are taken from).
            out: the run's folder (for caches beside the run).
        """

    def load_init(self, state: Dict[str, torch.Tensor], path: str, config: Optional[Dict[str, Any]] = None) -> str:
        """Initialise from another run's method state (``--init``) at the start of a fresh run.

        Args:
            state: the checkpoint's method ``state_dict``.
            path: the checkpoint's path (for messages).
            config: the checkpoint's run configuration, if it has one.

        Returns:
            A one-line description of what was loaded.

        Raises:
            ValueError: the method cannot start from a checkpoint, or this one does not fit
                (the message names the tensors).
        """
        raise ValueError(f"--init {path}: method {self.name!r} cannot start from another run's checkpoint "
                         "(use --resume to continue a run of the same method)")

    def wrap_distributed(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Replace the trainable module used in the forward pass by ``wrap(module)`` (DDP)."""
        raise NotImplementedError

    def unwrap_distributed(self) -> None:
        """Undo :meth:`wrap_distributed` (the trainer calls it before destroying the process group).

        The default does nothing; a method whose ``wrap_distributed`` keeps the wrapper overrides it.
        """

    def collapse_warnings(self, metrics: Dict[str, float]) -> List[str]:
        """Warnings about the epoch's averaged metrics (for example representation collapse)."""
        return []


_METHODS: Dict[str, Callable[..., SSLMethod]] = {}


def register_method(name: str):
    """Class decorator registering an :class:`SSLMethod` subclass under ``name``.

    The class must provide ``from_context(ctx: MethodContext)`` and may provide
    ``add_arguments(parser)`` for its own CLI options.
    """
    def decorator(cls):
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"method {name!r} is already registered")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def list_methods() -> List[str]:
    """Sorted names of the registered methods."""
    return sorted(_METHODS)


def get_method(name: str):
    """The registered method class ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(list_methods())}")
    return _METHODS[name]


def create_method(name: str, ctx: MethodContext) -> SSLMethod:
    """Build method ``name`` for the run described by ``ctx``."""
    return get_method(name).from_context(ctx)
