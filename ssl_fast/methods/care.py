"""CARE: CNN attention revitalisation with a transformer stream (Ge et al., NeurIPS 2021).

Follows the official code (https://github.com/ChongjianGE/CARE at 3187afb, ``models/care_module.py``
and ``models/resnet_care.py``):

- C-stream: BYOL on the CNN's last stage: layer4 -> avgpool -> projector -> predictor -> L2 norm.
- T-stream: :class:`~ssl_fast.models.bot_stack.BoTStack` on layer3 (in parallel to layer4; the
  first block pools to layer4's size) -> avgpool -> its own projector -> predictor -> L2 norm.
- Target: one momentum copy of the backbone, the transformer stack and both projectors, whose
  outputs (L2-normalised) are the targets of the other view.
- Loss: :class:`~ssl_fast.nn.care_loss.CARELoss` (``L_c + L_t + 100 L_sup``).
- SGD, lr 0.05 x batch/256, weight decay 1e-4 on every parameter, 10 warm-up epochs, cosine.

Only the CNN is kept for downstream use (:meth:`CARE.features`).

Two details differ from the official code, neither changing the gradients: the target's
BatchNorm running statistics follow the online network's (the official target keeps its own;
both normalise with the batch in training and the target is never evaluated), and the EMA
after optimizer step k uses the momentum of step k (the official code applies it at the start
of step k + 1 with the momentum of step k + 1).
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ssl_fast.data.augment import ViewSet
from ssl_fast.methods.base import Batch, MethodContext, OptimConfig, register_method
from ssl_fast.methods.byol import BYOLConfig
from ssl_fast.methods.config import POSITIVE_INT, config_from_options, option
from ssl_fast.methods.digits import DIGIT_RUN, DIGIT_VIEWS
from ssl_fast.methods.two_view import MomentumTargetMethod, eval_features, two_views
from ssl_fast.models import create_backbone
from ssl_fast.models.bot_stack import BoTStack
from ssl_fast.models.heads import care_mlp
from ssl_fast.nn import MomentumTeacher
from ssl_fast.nn.care_loss import CARELoss


@dataclass
class CAREConfig(BYOLConfig):
    """CARE's options: BYOL's, the transformer stream's shape and the supervision weight."""
    t_layers: int = option(5, "attention blocks in the transformer stream", POSITIVE_INT)
    t_heads: int = option(4, "attention heads per block", POSITIVE_INT)
    t_dim_head: int = option(128, "width per head", POSITIVE_INT)
    t_proj_factor: int = option(4, "bottleneck factor of the transformer blocks", POSITIVE_INT)
    sup_weight: float = option(100.0, "weight lambda of the attention supervision MSE", float)


class CAREEncoder(nn.Module):
    """The part of CARE the target copies: backbone, transformer stack and both projectors.

    ``forward(x) -> (z_c, z_t)``: the C-stream projection of pooled layer4 and the T-stream
    projection of the pooled stack output on layer3, ``[B, proj_dim]`` each.
    """

    def __init__(self, backbone: nn.Module, transformer: nn.Module, c_projector: nn.Module, t_projector: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.transformer = transformer
        self.c_projector = c_projector
        self.t_projector = t_projector

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        maps = self.backbone.feature_maps(x)
        c = maps[3].mean(dim=(2, 3))
        t = self.transformer(maps[2]).mean(dim=(2, 3))
        return self.c_projector(c), self.t_projector(t)


class CAREOnline(nn.Module):
    """Encoder + the two predictors: ``x -> (q_c, q_t)``, L2-normalised."""

    def __init__(self, encoder: CAREEncoder, c_predictor: nn.Module, t_predictor: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.c_predictor = c_predictor
        self.t_predictor = t_predictor

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z_c, z_t = self.encoder(x)
        return F.normalize(self.c_predictor(z_c), dim=1), F.normalize(self.t_predictor(z_t), dim=1)


def stage_sizes(backbone: nn.Module, image_size: int) -> List[Tuple[int, int]]:
    """The ``(H, W)`` of each of ``backbone.feature_maps`` at ``image_size`` (one tiny forward)."""
    was = backbone.training
    backbone.eval()
    p = next(backbone.parameters())
    with torch.no_grad():
        maps = backbone.feature_maps(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype))
    backbone.train(was)
    return [tuple(m.shape[-2:]) for m in maps]


@register_method("care")
class CARE(MomentumTargetMethod):
    """CARE with a CNN backbone that has ``feature_maps`` (the ResNets and BoTNets).

    Args:
        backbone: the CNN (kept for downstream use).
        image_size: the views' side (sizes the transformer stack's position embedding).
        epochs, steps_per_epoch: length of the momentum schedule.
        views: the two-view transform (BYOL's asymmetric recipe).
        config: :class:`CAREConfig`.
        optim: recommended optimizer settings.

    Example:
        >>> from ssl_fast.methods import MethodContext, create_method
        >>> ctx = MethodContext(arch="resnet_mini", epochs=1, steps_per_epoch=1, global_batch_size=8, image_size=16,
        ...                     options=dict(t_layers=1, t_dim_head=16))
        >>> care = create_method("care", ctx)
    """

    config_class = CAREConfig
    requires_feature_maps = True
    display_metrics = {"momentum": "m {:.5f}", "loss_sup": "sup {:.4f}"}
    # digits: lambda 10 instead of the official 100 (validation k-NN 96.52% against 93.73%, 60 epochs)
    presets = {
        "digits": dict(**DIGIT_RUN, options=dict(proj_hidden_dim=512, proj_dim=128, pred_hidden_dim=512,
                                                 momentum_target=0.99, t_layers=2, t_heads=4, t_dim_head=16,
                                                 sup_weight=10.0, **DIGIT_VIEWS)),
        "default": dict(arch="resnet50", epochs=100, batch_size=256, image_size=224, optimizer="sgd"),
    }

    def __init__(self, backbone: nn.Module, image_size: int, epochs: int, steps_per_epoch: int, views: ViewSet,
                 config: Optional[CAREConfig] = None, optim: Optional[OptimConfig] = None):
        super().__init__()
        c = self.config = config or CAREConfig()
        if not hasattr(backbone, "feature_maps") or not hasattr(backbone, "stage_channels"):
            raise ValueError(f"backbone {type(backbone).__name__} has no feature_maps/stage_channels: CARE needs a "
                             "CNN with stages (resnet*, botnet*)")
        self.views = views
        ch3, ch4 = backbone.stage_channels[2], backbone.stage_channels[3]
        sizes = stage_sizes(backbone, image_size)
        if sizes[2][0] < 2 or sizes[2][1] < 2:
            raise ValueError(f"at {image_size} px the backbone's layer3 map is {sizes[2]}: the transformer stream "
                             "needs at least 2x2 (use larger images)")
        transformer = BoTStack(ch3, sizes[2], dim_out=ch4, proj_factor=c.t_proj_factor, num_layers=c.t_layers,
                               heads=c.t_heads, dim_head=c.t_dim_head, downsample=sizes[3] != sizes[2])
        # the official ResNet's init loop re-initialises the stack (the last BNs' gamma 1, not 0): with a
        # zero gamma the attention branch would get no gradient in the first step
        transformer.reset_parameters_as_care_resnet()
        self.student = CAREOnline(
            CAREEncoder(backbone, transformer, care_mlp(ch4, c.proj_hidden_dim, c.proj_dim),
                        care_mlp(ch4, c.proj_hidden_dim, c.proj_dim)),
            care_mlp(c.proj_dim, c.pred_hidden_dim, c.proj_dim), care_mlp(c.proj_dim, c.pred_hidden_dim, c.proj_dim))
        self.teacher = MomentumTeacher(self.student.encoder, c.momentum_target, 1.0,
                                       total_steps=max(1, epochs * steps_per_epoch))
        self.loss_fn = CARELoss(c.sup_weight)
        self._optim = optim or OptimConfig()
        self._finish_init()

    @classmethod
    def from_context(cls, ctx: MethodContext) -> "CARE":
        """Build CARE for a run; ``ctx.options`` are :class:`CAREConfig` fields (None = default)."""
        c = config_from_options(CAREConfig, ctx.options)
        size = c.crop_size or ctx.image_size
        backbone = create_backbone(ctx.arch, size)
        if not hasattr(backbone, "feature_maps"):
            raise ValueError(f"--arch {ctx.arch} has no feature maps; CARE needs a CNN backbone (resnet*, botnet*)")
        optim = OptimConfig(base_lr=0.05, min_lr=0.0, warmup_epochs=min(10, max(ctx.epochs // 10, 0)),
                            weight_decay=1e-4, weight_decay_end=1e-4, optimizer="sgd", momentum=0.9)
        return cls(backbone, size, ctx.epochs, ctx.steps_per_epoch, two_views(c, ctx), config=c, optim=optim)

    def param_groups(self) -> List[Dict[str, Any]]:
        """One group: the official code decays every parameter (biases and norms included)."""
        return [{"params": [p for p in self.student.parameters() if p.requires_grad], "apply_weight_decay": True}]

    def training_step(self, batch: Batch, epoch: int, step: int) -> Dict[str, Any]:
        """Both streams on both views; each view's predictions against the target of the other view.

        Returns:
            ``loss`` and its parts ``loss_c``, ``loss_t``, ``loss_sup`` (weighted), detached.
        """
        v1, v2 = self.views(batch.images, batch.generator, rows=batch.rows, total=batch.global_size)
        q_c1, q_t1 = self._forward_student(v1)
        q_c2, q_t2 = self._forward_student(v2)
        with torch.no_grad():
            k_c1, k_t1 = (F.normalize(z, dim=1) for z in self.teacher(v2))
            k_c2, k_t2 = (F.normalize(z, dim=1) for z in self.teacher(v1))
        parts = self.loss_fn(q_c1, q_c2, k_c1, k_c2, q_t1, q_t2, k_t1, k_t2)
        return {"loss": parts["loss"], **{k: v.detach() for k, v in parts.items() if k != "loss"}}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The online CNN's pooled features ``[B, D]`` (eval mode) of un-augmented images ``[B, 3, H, W]``."""
        return eval_features(self.student.encoder.backbone, self.views.eval_view(images))
