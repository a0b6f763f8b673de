"""SimSiam: simple Siamese representation learning (Chen & He, CVPR 2021).

One network (backbone + 3-layer BN projector + bottleneck predictor) sees both views; each
view's prediction is pulled towards the other view's projection under a stop-gradient
(:class:`~ssl_fast.nn.simsiam_loss.SimSiamLoss`). No momentum target, no negatives.
"""
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ssl_fast.data.augment import ViewSet
from ssl_fast.methods.base import Batch, MethodContext, OptimConfig, SSLMethod, register_method
from ssl_fast.methods.config import POSITIVE_INT, PROBABILITY_PAIR, config_from_options, option
from ssl_fast.methods.digits import DIGIT_RUN, DIGIT_VIEWS
from ssl_fast.methods.two_view import (Encoder, OnlineNetwork, TwoViewConfig, activation_norm, eval_features,
                                       feature_width, sync_batchnorm_on_gpu, two_views)
from ssl_fast.models import create_backbone
from ssl_fast.models.heads import simsiam_predictor, simsiam_projector
from ssl_fast.nn.simsiam_loss import SimSiamLoss


@dataclass
class SimSiamConfig(TwoViewConfig):
    """SimSiam's options (the paper's ImageNet recipe: projector 2048-2048-2048, predictor
    2048-512-2048, symmetric views with blur p=0.5 and no solarisation)."""
    proj_hidden_dim: int = option(2048, "projector hidden width", POSITIVE_INT)
    proj_dim: int = option(2048, "projection width", POSITIVE_INT)
    pred_hidden_dim: int = option(512, "predictor hidden width", POSITIVE_INT)
    blur_p: tuple = option((0.5, 0.5), "Gaussian-blur probability of view 1,view 2", PROBABILITY_PAIR)
    solarize_p: tuple = option((0.0, 0.0), "solarisation probability of view 1,view 2", PROBABILITY_PAIR)


@register_method("simsiam")
class SimSiam(SSLMethod):
    """SimSiam with any registered backbone returning ``[B, D]`` features.

    Args:
        backbone: the backbone.
        views: the two-view transform.
        config: :class:`SimSiamConfig`.
        optim: recommended optimizer settings.

    Example:
        >>> from ssl_fast.methods import MethodContext, create_method
        >>> ctx = MethodContext(arch="resnet_mini", epochs=1, steps_per_epoch=1, global_batch_size=8, image_size=16)
        >>> simsiam = create_method("simsiam", ctx)
    """

    config_class = SimSiamConfig
    presets = {
        "digits": dict(**DIGIT_RUN, options=dict(proj_hidden_dim=256, proj_dim=256, pred_hidden_dim=64,
                                                 blur_p=(0.5, 0.5), **DIGIT_VIEWS)),
        "default": dict(arch="resnet18_cifar", epochs=200, batch_size=256, image_size=32, optimizer="sgd",
                        options=dict(crops_scale=(0.2, 1.0))),
    }

    def __init__(self, backbone: nn.Module, views: ViewSet, config: Optional[SimSiamConfig] = None,
                 optim: Optional[OptimConfig] = None):
        super().__init__()
        c = self.config = config or SimSiamConfig()
        self.views = views
        width = feature_width(backbone)
        self.student = OnlineNetwork(Encoder(backbone, simsiam_projector(width, c.proj_hidden_dim, c.proj_dim)),
                                     simsiam_predictor(c.proj_dim, c.pred_hidden_dim, c.proj_dim))
        self.loss_fn = SimSiamLoss()
        self._optim = optim or OptimConfig()
        object.__setattr__(self, "_forward_student", self.student)

    @classmethod
    def from_context(cls, ctx: MethodContext) -> "SimSiam":
        """Build SimSiam for a run; ``ctx.options`` are :class:`SimSiamConfig` fields (None = default)."""
        c = config_from_options(SimSiamConfig, ctx.options)
        backbone = create_backbone(ctx.arch, c.crop_size or ctx.image_size)
        # the paper: SGD, lr 0.05 x batch/256, momentum 0.9, wd 1e-4, cosine, no warm-up
        optim = OptimConfig(base_lr=0.05, min_lr=0.0, warmup_epochs=0, weight_decay=1e-4, weight_decay_end=1e-4,
                            optimizer="sgd", momentum=0.9)
        return cls(backbone, two_views(c, ctx), config=c, optim=optim)

    def trainable(self) -> nn.Module:
        return self.student

    def optim_config(self) -> OptimConfig:
        return self._optim

    def wrap_distributed(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """DDP-wrap the network; on GPUs its BatchNorm becomes SyncBatchNorm (as the paper)."""
        (self.student,) = sync_batchnorm_on_gpu(self.student)
        object.__setattr__(self, "_forward_student", wrap(self.student))

    def unwrap_distributed(self) -> None:
        object.__setattr__(self, "_forward_student", self.student)

    def training_step(self, batch: Batch, epoch: int, step: int) -> Dict[str, Any]:
        """Two views through one network; symmetric negative cosine with stop-gradient.

        Returns:
            ``loss`` and ``z_std``: the mean per-dimension std of the L2-normalised projections
            (about ``1/sqrt(proj_dim)`` when healthy, 0 when collapsed, as the paper monitors).
        """
        v1, v2 = self.views(batch.images, batch.generator, rows=batch.rows, total=batch.global_size)
        z1, p1 = self._forward_student(v1)
        z2, p2 = self._forward_student(v2)
        with torch.no_grad():
            z_std = nn.functional.normalize(z1.float(), dim=1).std(0).mean()
        return {"loss": self.loss_fn(p1, p2, z1, z2), "z_std": z_std}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's features ``[B, D]`` (eval mode) of un-augmented images ``[B, 3, H, W]``."""
        return eval_features(self.student.encoder.backbone, self.views.eval_view(images))

    @torch.no_grad()
    def activation_maps(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """Channel L2 norm of the online backbone's last feature map, ``[B, h, w]`` (None for a ViT)."""
        return activation_norm(self.student.encoder.backbone, self.views.eval_view(images))

    def collapse_warnings(self, metrics: Dict[str, float]) -> List[str]:
        """Warn when the projections' per-dimension std is near 0 (the collapse the paper shows)."""
        std = metrics.get("z_std")
        if std is not None and std < 0.1 / self.config.proj_dim ** 0.5:
            return [f"projection std {std:.2e} is far below 1/sqrt({self.config.proj_dim}): the representation has "
                    "collapsed; check the stop-gradient, the predictor and the learning rate"]
        return []
