"""CVSA: cross-view saliency alignment (Wu et al., "Exploring Localization for Self-supervised
Fine-grained Contrastive Learning", BMVC 2021), stage 2 on top of BYOL.

The paper has no public code; this follows its description (``METHODS.md``):

- Views: :class:`~ssl_fast.data.saliency_swap.SaliencySwap` in place of the random resized crop:
  each view holds the sample's most salient box pasted over the most salient box of another
  image of the batch, then BYOL's photometric recipe. Saliency (``--saliency``) comes from a DINO
  teacher (``dino``, with ``--saliency-checkpoint``), the spectral residual detector
  (``spectral-residual``, Hou & Zhang 2007), or the data set's ``masks`` / ``boxes``; it is
  computed once per training image and cached beside the run
  (:func:`~ssl_fast.data.saliency.compute_saliency`), and each batch's rows are found by content
  (:class:`~ssl_fast.data.saliency.SaliencyLookup`).
- Networks: BYOL's online backbone + MLP projector + MLP predictor on the pooled last stage, plus
  a convolutional projector and predictor on the last stage's map (1x1 conv -> BatchNorm -> ReLU
  -> 1x1 conv: BYOL's MLP applied at every position, so the map keeps its ``h x w``). The target
  is one momentum copy of backbone, MLP projector and conv projector.
- Loss: BYOL's loss on the pooled path plus ``align_weight`` x
  :class:`~ssl_fast.nn.saliency_alignment.SaliencyAlignmentLoss` between the online conv
  prediction of each view and the target conv projection of the other, with the swap masks at
  the map's resolution (cosine/temperature attention, saliency-weighted ``-log`` of the
  attention mass on the other view's mask; symmetric; see that module for the exact form).
- Stage 2: ``--init runs/byol-.../checkpoint.pth`` loads BYOL's backbone, projector, predictor
  and target (:meth:`CVSA.load_init`); the conv heads start at random. Without ``--init`` the
  whole model starts at random (which the paper does not do).

Localisation (:meth:`CVSA.localisation_maps`): the cross-view attention of an image with itself
(online conv prediction as queries, target conv projection as keys), read out as the attention
mass each key position receives from all queries.
"""
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ssl_fast.data.augment import ViewSpec
from ssl_fast.data.saliency import SOURCES, SaliencyLookup, compute_saliency
from ssl_fast.data.saliency_swap import SaliencySwap
from ssl_fast._argtypes import number
from ssl_fast.methods.base import Batch, MethodContext, OptimConfig, register_method
from ssl_fast.methods.byol import BYOL, BYOLConfig
from ssl_fast.methods.digits import CLUTTERED_DIGIT_RUN, CLUTTERED_DIGIT_VIEWS
from ssl_fast.methods.care import stage_sizes
from ssl_fast.methods.config import POSITIVE_INT, PROBABILITY_PAIR, config_from_options, option
from ssl_fast.methods.two_view import Encoder, OnlineNetwork, activation_norm, eval_features, eval_mode
from ssl_fast.models import create_backbone
from ssl_fast.models.heads import byol_mlp
from ssl_fast.nn import MomentumTeacher, SaliencyAlignmentLoss
from ssl_fast.ops.attention import attention_probs


@dataclass
class CVSAConfig(BYOLConfig):
    """CVSA's options: BYOL's (``crops_scale`` unused: the swap replaces the crop), the saliency
    source, the swap's boxes, the conv heads and the alignment loss."""
    saliency: str = option("spectral-residual", "saliency source of the Saliency Swap", str, choices=SOURCES)
    saliency_checkpoint: Optional[str] = option(None, "ssl-fast pretrain checkpoint of a DINO ViT for "
                                                "--saliency dino", str)
    box_scale: tuple = option((0.2, 0.6), "area range of the swapped box as a fraction of the image, lo,hi",
                              PROBABILITY_PAIR)
    swap_group: Optional[int] = option(None, "partners are drawn within consecutive groups of this many samples "
                                       "of the global batch (must divide the per-process batch; default the "
                                       "per-process batch)", POSITIVE_INT)
    conv_hidden_dim: int = option(256, "hidden channels of the conv projector and predictor", POSITIVE_INT)
    conv_dim: int = option(128, "output channels of the conv projector and predictor", POSITIVE_INT)
    align_weight: float = option(1.0, "weight of the cross-view saliency alignment loss", number(float, 0))
    align_temperature: float = option(0.1, "temperature of the cross-view attention's cosine logits",
                                      number(float, 0, lo_open=True))


def conv_mlp(in_ch: int, hidden: int, out_ch: int) -> nn.Sequential:
    """BYOL's MLP at every position of a map: ``1x1 conv -> BatchNorm2d -> ReLU -> 1x1 conv``."""
    return nn.Sequential(nn.Conv2d(in_ch, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
                         nn.Conv2d(hidden, out_ch, 1))


class CVSAEncoder(Encoder):
    """Backbone + MLP projector + conv projector (the part the target copies).

    ``forward(x) -> (z [B, proj_dim], z_map [B, conv_dim, h, w])`` from the last stage's map.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, conv_projector: nn.Module):
        super().__init__(backbone, projector)
        self.conv_projector = conv_projector

    def forward(self, x: torch.Tensor):
        fmap = self.backbone.feature_maps(x)[-1]
        return self.projector(fmap.mean(dim=(2, 3))), self.conv_projector(fmap)


class CVSAOnline(OnlineNetwork):
    """Encoder + MLP predictor + conv predictor: ``x -> (p [B, proj_dim], p_map [B, conv_dim, h, w])``."""

    def __init__(self, encoder: CVSAEncoder, predictor: nn.Module, conv_predictor: nn.Module):
        super().__init__(encoder, predictor)
        self.conv_predictor = conv_predictor

    def forward(self, x: torch.Tensor):
        z, z_map = self.encoder(x)
        return self.predictor(z), self.conv_predictor(z_map)


#: state-dict prefixes that are CVSA's own (absent from a BYOL checkpoint; they start at random)
CVSA_ONLY = ("student.encoder.conv_projector.", "student.conv_predictor.", "teacher.module.conv_projector.")


@torch.no_grad()
def self_attention_saliency(pred: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Attention mass each position of ``target`` receives from all positions of ``pred``.

    ``A[b, i, j] = softmax_j(cos(pred_i, target_j) / tau)`` (the alignment loss's attention);
    returns ``s[b, j] = mean_i A[b, i, j]`` as ``[B, h, w]`` (each map sums to 1).

    Args:
        pred: ``[B, C, h, w]`` online conv prediction.
        target: ``[B, C, h, w]`` target conv projection (of the same images).
        temperature: ``tau``.
    """
    def tokens(x):  # [B, C, h, w] -> unit vectors [B, 1, h*w, C]
        return F.normalize(x.float().flatten(2).transpose(1, 2), dim=-1).unsqueeze(1)

    p = attention_probs(tokens(pred), tokens(target), scale=1.0 / temperature)  # [B, 1, n, n]
    return p[:, 0].mean(1).reshape(target.shape[0], target.shape[2], target.shape[3])


@register_method("cvsa")
class CVSA(BYOL):
    """CVSA with a CNN backbone that has ``feature_maps`` (the ResNets and BoTNets).

    Args:
        backbone: the CNN (kept for downstream use).
        image_size: the views' side.
        epochs, steps_per_epoch: length of the momentum schedule.
        swap: the :class:`~ssl_fast.data.saliency_swap.SaliencySwap` view maker.
        config: :class:`CVSAConfig`.
        optim: recommended optimizer settings.

    Before training, :meth:`attach_data` must give it the training images (the trainer does),
    from which the saliency is computed (or read from the cache) once.

    Example:
        >>> from ssl_fast.methods import MethodContext, create_method
        >>> ctx = MethodContext(arch="resnet_mini", epochs=1, steps_per_epoch=1, global_batch_size=8, image_size=32)
        >>> cvsa = create_method("cvsa", ctx)
        >>> imgs = torch.rand(8, 3, 32, 32)
        >>> cvsa.attach_data(None, imgs, out=None)
        >>> out = cvsa.training_step(Batch(imgs, torch.Generator().manual_seed(0), slice(0, 8), 8), 0, 0)
        >>> sorted(out)
        ['loss', 'loss_align', 'loss_byol']
    """

    config_class = CVSAConfig
    requires_feature_maps = True
    display_metrics = {"momentum": "m {:.5f}", "loss_byol": "byol {:.4f}", "loss_align": "align {:.4f}"}
    presets = {
        # BYOL's cluttered-digits run split into 2 epochs of BYOL (stage 1) and 38 of CVSA, so the
        # two methods get the same budget. Validation k-NN after 2/5/10 BYOL epochs: 36.6/31.0/15.3%
        # (from random init: 40%); BYOL's features of this data get worse with training
        "cluttered-digits": dict(CLUTTERED_DIGIT_RUN, epochs=38,
                                 stage1=dict(method="byol", epochs=2, warmup_epochs=1),
                                 options=dict(proj_hidden_dim=512, proj_dim=128, pred_hidden_dim=512,
                                              momentum_target=0.99, conv_hidden_dim=256, conv_dim=128,
                                              saliency="masks", box_scale=(0.2, 0.5), swap_group=16,
                                              **{k: v for k, v in CLUTTERED_DIGIT_VIEWS.items() if k != "crops_scale"})),
        "default": dict(arch="resnet18_cifar", epochs=100, batch_size=256, image_size=32, optimizer="lars"),
    }

    def __init__(self, backbone: nn.Module, image_size: int, epochs: int, steps_per_epoch: int, swap: SaliencySwap,
                 config: Optional[CVSAConfig] = None, optim: Optional[OptimConfig] = None):
        nn.Module.__init__(self)
        c = self.config = config or CVSAConfig()
        if not hasattr(backbone, "feature_maps"):
            raise ValueError(f"backbone {type(backbone).__name__} has no feature_maps: CVSA needs a CNN with "
                             "stages (resnet*, botnet*)")
        fh, fw = stage_sizes(backbone, image_size)[-1]
        if (fh, fw) != (swap.feat_size, swap.feat_size):
            raise ValueError(f"swap.feat_size {swap.feat_size} must equal the last stage's map size {fh}x{fw} "
                             f"at {image_size} px")
        self.views = swap
        self.image_size = image_size
        width = int(backbone.num_features)
        self.student = CVSAOnline(
            CVSAEncoder(backbone, byol_mlp(width, c.proj_hidden_dim, c.proj_dim),
                        conv_mlp(width, c.conv_hidden_dim, c.conv_dim)),
            byol_mlp(c.proj_dim, c.pred_hidden_dim, c.proj_dim), conv_mlp(c.conv_dim, c.conv_hidden_dim, c.conv_dim))
        self.teacher = MomentumTeacher(self.student.encoder, c.momentum_target, 1.0,
                                       total_steps=max(1, epochs * steps_per_epoch))
        from ssl_fast.nn.byol_loss import BYOLLoss

        self.loss_fn = BYOLLoss()
        self.align_fn = SaliencyAlignmentLoss(temperature=c.align_temperature)
        self._optim = optim or OptimConfig()
        self._saliency: Optional[SaliencyLookup] = None
        object.__setattr__(self, "_forward_student", self.student)
        self.train(True)

    @classmethod
    def from_context(cls, ctx: MethodContext) -> "CVSA":
        """Build CVSA for a run; ``ctx.options`` are :class:`CVSAConfig` fields (None = default)."""
        c = config_from_options(CVSAConfig, ctx.options)
        if c.saliency == "dino" and not c.saliency_checkpoint:
            raise ValueError("--saliency dino needs --saliency-checkpoint (an ssl-fast pretrain checkpoint of DINO)")
        size = c.crop_size or ctx.image_size
        backbone = create_backbone(ctx.arch, size)
        if not hasattr(backbone, "feature_maps"):
            raise ValueError(f"--arch {ctx.arch} has no feature maps; CVSA needs a CNN backbone (resnet*, botnet*)")
        fh, fw = stage_sizes(backbone, size)[-1]
        if fh != fw:
            raise ValueError(f"--arch {ctx.arch} gives a {fh}x{fw} last map at {size} px; CVSA needs a square map")
        specs = [ViewSpec(size, (1.0, 1.0), flip_p=c.flip_p, jitter=tuple(c.jitter), jitter_p=c.jitter_p, grey_p=c.grey_p,
                          blur_p=c.blur_p[v], solarize_p=c.solarize_p[v], noise_p=c.noise_p,
                          noise_std=(0.0, c.noise_std)) for v in range(2)]
        local = ctx.global_batch_size
        if c.swap_group is not None and local % c.swap_group:
            raise ValueError(f"--swap-group {c.swap_group} must divide the batch size {local}")
        swap = SaliencySwap(size, fh, box_scale=tuple(c.box_scale), photometric=specs, group_size=c.swap_group,
                            mean=ctx.mean, std=ctx.std)
        # BYOL's settings (LARS, lr 0.2 x batch/256, wd 1.5e-6, warm-up, cosine)
        optim = OptimConfig(base_lr=0.2, min_lr=0.0, warmup_epochs=min(10, max(ctx.epochs // 10, 0)),
                            weight_decay=1.5e-6, weight_decay_end=1.5e-6, optimizer="lars", momentum=0.9)
        return cls(backbone, size, ctx.epochs, ctx.steps_per_epoch, swap, config=c, optim=optim)

    # ---- data and initialisation --------------------------------------------------------
    def attach_data(self, train_set, images: torch.Tensor, out: Optional[str]) -> None:
        """Compute (or read from ``out``'s cache) the saliency of every training image and keep a
        content lookup over ``images`` (the device tensor batches are taken from).

        ``train_set`` supplies masks/boxes (sources ``masks``/``boxes``) and its name keys the
        cache; it may be None for the sources that need only the images.
        """
        c = self.config
        name = getattr(train_set, "name", None) or "data"
        mean = self.views.mean or (0.0, 0.0, 0.0)
        std = self.views.std or (1.0, 1.0, 1.0)
        cpu = images.detach().cpu()
        sal = compute_saliency(cpu, c.saliency, data_name=name, cache_dir=out, checkpoint=c.saliency_checkpoint,
                               masks=getattr(train_set, "masks", None), boxes=getattr(train_set, "boxes", None),
                               mean=mean, std=std, device=images.device)
        self._saliency = SaliencyLookup(images, sal.to(images.device))

    def load_init(self, state: Dict[str, torch.Tensor], path: str, config: Optional[Dict[str, Any]] = None) -> str:
        """Load a BYOL (or CVSA) run's backbone, MLP projector, predictor and target.

        Every tensor of ``state`` must exist here with the same shape (the target's schedule step
        ``teacher.step`` is not taken: stage 2 runs its own momentum schedule); tensors missing
        from ``state`` are allowed only in the conv heads (:data:`CVSA_ONLY`), which keep their
        random initialisation (the target's conv projector equal to the online one). A target
        missing from ``state`` is copied from the loaded online encoder.

        Raises:
            ValueError: tensors that do not exist here or have other shapes, named (with the
                checkpoint's method and arch when known).
        """
        own = self.state_dict()
        src = {k: v for k, v in state.items() if k != "teacher.step"}
        whence = ""
        if config:
            whence = f" (a {config.get('method')!r} run with --arch {config.get('arch')!r})"
        unknown = sorted(k for k in src if k not in own)
        shapes = sorted(k for k in src if k in own and tuple(src[k].shape) != tuple(own[k].shape))
        student_missing = sorted(k for k in own if k not in src and k != "teacher.step"
                                 and not k.startswith(CVSA_ONLY) and not k.startswith("teacher."))
        if unknown or shapes or student_missing:
            parts = []
            if shapes:
                parts.append(f"{len(shapes)} tensors have other shapes, e.g. {shapes[0]}: "
                             f"{tuple(src[shapes[0]].shape)} in the checkpoint, {tuple(own[shapes[0]].shape)} here")
            if unknown:
                parts.append(f"{len(unknown)} tensors are not part of CVSA, e.g. {', '.join(unknown[:3])}")
            if student_missing:
                parts.append(f"{len(student_missing)} tensors CVSA needs are missing, e.g. "
                             f"{', '.join(student_missing[:3])}")
            raise ValueError(f"--init {path}{whence} does not fit this CVSA model: {'; '.join(parts)}")
        with torch.no_grad():
            for k, v in src.items():
                own[k].copy_(v.to(own[k].device, own[k].dtype))
            has_teacher = any(k.startswith("teacher.module.") and not k.startswith(CVSA_ONLY) for k in src)
            if not has_teacher:
                for (_, t), (_, s) in zip(self.teacher.module.state_dict().items(),
                                          self.student.encoder.state_dict().items()):
                    t.copy_(s)
        fresh = sum(v.numel() for k, v in own.items() if k.startswith(CVSA_ONLY) and k not in src)
        return (f"{len(src)} tensors{whence} (backbone, projector, predictor"
                f"{', target' if has_teacher else '; target copied from the online encoder'}); "
                f"conv heads at random init ({fresh} values)" if fresh else f"{len(src)} tensors{whence}")

    # ---- the SSLMethod interface --------------------------------------------------------
    def saliency_of(self, images: torch.Tensor) -> torch.Tensor:
        """The cached saliency ``[b, 1, H, W]`` of a batch of stored training images."""
        if self._saliency is None:
            raise ValueError("CVSA has no saliency yet: call attach_data(train_set, images, out) before training "
                             "(the trainer does)")
        return self._saliency(images)

    def training_step(self, batch: Batch, epoch: int, step: int) -> Dict[str, Any]:
        """Two Saliency Swap views; BYOL loss on the pooled path + weighted alignment on the maps.

        Returns:
            ``loss`` and its parts ``loss_byol`` and ``loss_align`` (unweighted), detached.
        """
        sal = self.saliency_of(batch.images)
        s1, s2 = self.views(batch.images, sal, batch.generator, rows=batch.rows, total=batch.global_size)
        p1, q1 = self._forward_student(s1.view)
        p2, q2 = self._forward_student(s2.view)
        with torch.no_grad():
            z1, k1 = self.teacher(s1.view)
            z2, k2 = self.teacher(s2.view)
        byol = self.loss_fn(p1, p2, z1, z2)
        align = self.align_fn(q1, q2, k1, k2, s1.mask.to(q1.dtype), s2.mask.to(q2.dtype))
        loss = byol + self.config.align_weight * align
        return {"loss": loss, "loss_byol": byol.detach(), "loss_align": align.detach()}

    def eval_view(self, images: torch.Tensor) -> torch.Tensor:
        """The un-augmented images resized to the views' side and normalised."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size),
                                                     mode="bilinear", align_corners=False, antialias=True)
        return self.views.normalize(images)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The online backbone's pooled features ``[B, D]`` (eval mode) of un-augmented images."""
        return eval_features(self.student.encoder.backbone, self.eval_view(images))

    @torch.no_grad()
    def activation_maps(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """Channel L2 norm of the online backbone's last feature map, ``[B, h, w]``."""
        return activation_norm(self.student.encoder.backbone, self.eval_view(images))

    @torch.no_grad()
    def conv_maps(self, images: torch.Tensor):
        """``(online conv prediction, target conv projection)`` of un-augmented images, both
        ``[B, conv_dim, h, w]``, with BatchNorm in eval mode (running statistics)."""
        x = self.eval_view(images)
        with eval_mode(self):
            _, q = self.student(x)
            _, k = self.teacher.module(x)
        return q, k

    @torch.no_grad()
    def localisation_maps(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """:func:`self_attention_saliency` of each image's conv prediction over its target conv
        projection, ``[B, h, w]``."""
        q, k = self.conv_maps(images)
        return self_attention_saliency(q, k, self.config.align_temperature)

    def collapse_warnings(self, metrics: Dict[str, float]) -> List[str]:
        loss = metrics.get("loss_byol", metrics.get("loss"))
        return super().collapse_warnings({"loss": loss} if loss is not None else {})
