"""BYOL: bootstrap your own latent (Grill et al., NeurIPS 2020) on ssl_fast's fused EMA.

Online network = backbone + projector + predictor; target = a momentum copy of backbone +
projector (:class:`~ssl_fast.nn.MomentumTeacher`, momentum cosine from ``momentum_target`` to 1
per step, one fused EMA over every parameter). Each view goes through the networks on its own
(BatchNorm statistics per view, as in the paper and lightly's example). Loss:
:class:`~ssl_fast.nn.byol_loss.BYOLLoss`.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ssl_fast.data.augment import ViewSet
from ssl_fast.methods.base import Batch, MethodContext, OptimConfig, register_method
from ssl_fast.methods.config import MOMENTUM, config_from_options, option
from ssl_fast.methods.digits import CLUTTERED_DIGIT_RUN, CLUTTERED_DIGIT_VIEWS, DIGIT_RUN, DIGIT_VIEWS
from ssl_fast.methods.two_view import (Encoder, MomentumTargetMethod, OnlineNetwork, TwoViewConfig, activation_norm,
                                       eval_features, feature_width, two_views)
from ssl_fast.models import create_backbone
from ssl_fast.models.heads import byol_mlp
from ssl_fast.nn import MomentumTeacher
from ssl_fast.nn.byol_loss import BYOLLoss


@dataclass
class BYOLConfig(TwoViewConfig):
    """BYOL's options: the two-view heads and views, and the target's momentum."""
    momentum_target: float = option(0.99, "base momentum of the target network (cosine to 1)", MOMENTUM)


@register_method("byol")
class BYOL(MomentumTargetMethod):
    """BYOL with any registered backbone returning ``[B, D]`` features (ResNets, ViTs, BoTNet).

    Args:
        backbone: online backbone (copied for the target).
        epochs, steps_per_epoch: length of the momentum schedule.
        views: the two-view transform.
        config: :class:`BYOLConfig`.
        optim: recommended optimizer settings.

    Example:
        >>> from ssl_fast.methods import MethodContext, create_method
        >>> ctx = MethodContext(arch="resnet_mini", epochs=1, steps_per_epoch=1, global_batch_size=8, image_size=16)
        >>> byol = create_method("byol", ctx)
    """

    config_class = BYOLConfig
    display_metrics = {"momentum": "m {:.5f}"}
    presets = {
        "digits": dict(**DIGIT_RUN, options=dict(proj_hidden_dim=512, proj_dim=128, pred_hidden_dim=512,
                                                 momentum_target=0.99, **DIGIT_VIEWS)),
        # 32-px digits on clutter (ssl_fast.data.cluttered_digits): the digits recipe at 32 px, 40 epochs
        "cluttered-digits": dict(**CLUTTERED_DIGIT_RUN, options=dict(proj_hidden_dim=512, proj_dim=128,
                                                                     pred_hidden_dim=512, momentum_target=0.99,
                                                                     **CLUTTERED_DIGIT_VIEWS)),
        "default": dict(arch="resnet18_cifar", epochs=200, batch_size=256, image_size=32, optimizer="lars",
                        options=dict(crops_scale=(0.2, 1.0))),
    }

    def __init__(self, backbone: nn.Module, epochs: int, steps_per_epoch: int, views: ViewSet,
                 config: Optional[BYOLConfig] = None, optim: Optional[OptimConfig] = None):
        super().__init__()
        c = self.config = config or BYOLConfig()
        self.views = views
        width = feature_width(backbone)
        self.student = OnlineNetwork(Encoder(backbone, byol_mlp(width, c.proj_hidden_dim, c.proj_dim)),
                                     byol_mlp(c.proj_dim, c.pred_hidden_dim, c.proj_dim))
        self.teacher = MomentumTeacher(self.student.encoder, c.momentum_target, 1.0,
                                       total_steps=max(1, epochs * steps_per_epoch))
        self.loss_fn = BYOLLoss()
        self._optim = optim or OptimConfig()
        self._finish_init()

    @classmethod
    def from_context(cls, ctx: MethodContext) -> "BYOL":
        """Build BYOL for a run; ``ctx.options`` are :class:`BYOLConfig` fields (None = default)."""
        c = config_from_options(BYOLConfig, ctx.options)
        backbone = create_backbone(ctx.arch, c.crop_size or ctx.image_size)
        # BYOL's ImageNet settings: LARS, lr 0.2 x batch/256, wd 1.5e-6, 10 warm-up epochs, cosine
        optim = OptimConfig(base_lr=0.2, min_lr=0.0, warmup_epochs=min(10, max(ctx.epochs // 10, 0)),
                            weight_decay=1.5e-6, weight_decay_end=1.5e-6, optimizer="lars", momentum=0.9)
        return cls(backbone, ctx.epochs, ctx.steps_per_epoch, two_views(c, ctx), config=c, optim=optim)

    def training_step(self, batch: Batch, epoch: int, step: int) -> Dict[str, Any]:
        """Two views; online prediction of each against the target projection of the other."""
        v1, v2 = self.views(batch.images, batch.generator, rows=batch.rows, total=batch.global_size)
        _, p1 = self._forward_student(v1)
        _, p2 = self._forward_student(v2)
        z1, z2 = self.teacher(v1), self.teacher(v2)
        return {"loss": self.loss_fn(p1, p2, z1, z2)}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The online backbone's features ``[B, D]`` (eval mode) of un-augmented images ``[B, 3, H, W]``."""
        return eval_features(self.student.encoder.backbone, self.views.eval_view(images))

    @torch.no_grad()
    def activation_maps(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """Channel L2 norm of the online backbone's last feature map, ``[B, h, w]`` (None for a ViT)."""
        return activation_norm(self.student.encoder.backbone, self.views.eval_view(images))

    def collapse_warnings(self, metrics: Dict[str, float]) -> List[str]:
        """Warn when the loss sits near 0 from the first epochs: the online and target outputs agree
        trivially (a constant representation)."""
        loss = metrics.get("loss")
        if loss is not None and loss < 1e-3:
            return [f"loss {loss:.2e} is near 0: the representation may have collapsed to a constant; "
                    "check the predictor, the learning rate and --momentum-target"]
        return []
