"""DINO: self-distillation with no labels (Caron et al., 2021) on ssl_fast's fused ops.

Student = backbone + :class:`~ssl_fast.models.heads.DINOHead`; teacher = its momentum copy
(:class:`~ssl_fast.nn.MomentumTeacher`, cosine momentum schedule per iteration). The loss is
:class:`ssl_fast.nn.DINOLoss` (centering + sharpening over every teacher-view / other-student-view
pair, center all-reduced over ranks). The student sees two global and ``n_local`` local crops,
the teacher the two global crops only.
"""
import argparse
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ssl_fast._argtypes import number
from ssl_fast.data.augment import MultiCrop
from ssl_fast.methods.base import Batch, MethodContext, OptimConfig, SSLMethod, register_method
from ssl_fast.methods.config import JITTER, NON_NEGATIVE, PROBABILITY, config_from_options, option
from ssl_fast.methods.digits import DIGIT_CROPS_SCALE, DIGIT_PHOTOMETRIC, DIGIT_RUN
from ssl_fast.models import create_model
from ssl_fast.models.heads import DINOHead
from ssl_fast.nn import DINOLoss, MomentumTeacher
from ssl_fast.train.distributed import all_reduce_mean


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops, running the backbone once per resolution.

    Consecutive crops of equal size are concatenated along the batch and go through the
    backbone together; the features of all crops then go through the head in one pass.

    Args:
        backbone: maps ``[n, 3, S, S]`` to ``[n, D]``.
        head: maps ``[n, D]`` to ``[n, K]``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        """``crops``: list of ``[B, 3, S_v, S_v]`` -> ``[len(crops) * B, K]`` logits, crop-major."""
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        feats, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            feats.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(feats))


def crop_scale(text) -> tuple:
    """``--*-crops-scale`` value: two shares of the image area ``lo,hi`` with ``0 < lo <= hi <= 1``."""
    if isinstance(text, (tuple, list)):
        return tuple(float(v) for v in text)
    parts = str(text).replace(",", " ").split()
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers 'lo,hi', got {text!r}")
    try:
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers 'lo,hi', got {text!r}") from None
    if not 0.0 < lo <= hi <= 1.0:
        raise argparse.ArgumentTypeError(f"need 0 < lo <= hi <= 1 (shares of the image area), got {text!r}")
    return lo, hi


@dataclass
class DINOConfig:
    """DINO's options and their defaults (the official ViT-S/16 recipe); one flag each on the CLI."""
    out_dim: int = option(65536, "prototypes K in the head", number(int, 1))
    head_hidden_dim: int = option(2048, "head MLP width", number(int, 1))
    head_bottleneck_dim: int = option(256, "head bottleneck width", number(int, 1))
    head_layers: int = option(3, "layers of the head's MLP", number(int, 1), cli=False)
    norm_last_layer: int = option(1, "unit-norm prototypes (1) or learnt norms (0)", int, choices=(0, 1))
    head_bn: int = option(0, "BatchNorm in the head's MLP (DINO's use_bn_in_head)", int, choices=(0, 1))
    local_crops: int = option(8, "number of local crops", number(int, 0))
    global_crop_size: Optional[int] = option(None, "global crop side in pixels (multiple of the patch size; "
                                             "default the image size)", number(int, 1))
    local_crop_size: Optional[int] = option(None, "local crop side in pixels (multiple of the patch size; "
                                            "default 3/7 of the global size)", number(int, 1))
    global_crops_scale: tuple = option((0.4, 1.0), "area range of global crops, lo,hi", crop_scale)
    local_crops_scale: tuple = option((0.05, 0.4), "area range of local crops, lo,hi", crop_scale)
    flip_p: float = option(0.5, "horizontal-flip probability", PROBABILITY)
    jitter: tuple = option((0.4, 0.4, 0.2, 0.1), "colour-jitter strengths brightness,contrast,saturation,hue", JITTER)
    jitter_p: float = option(0.8, "colour-jitter probability", PROBABILITY)
    grey_p: float = option(0.2, "grayscale probability", PROBABILITY)
    noise_p: float = option(0.0, "probability of additive Gaussian noise", PROBABILITY)
    noise_std: float = option(0.1, "largest std of the Gaussian noise (drawn in [0, this])", NON_NEGATIVE)
    momentum_teacher: float = option(0.996, "base teacher momentum (cosine to 1)", number(float, 0, 1))
    teacher_temp: float = option(0.04, "teacher temperature after warm-up", number(float, 0, lo_open=True))
    warmup_teacher_temp: float = option(0.04, "initial teacher temperature", number(float, 0, lo_open=True))
    warmup_teacher_temp_epochs: int = option(30, "teacher-temperature warm-up epochs", number(int, 0))
    student_temp: float = option(0.1, "student temperature", number(float, 0, lo_open=True), cli=False)
    center_momentum: float = option(0.9, "center EMA momentum", number(float, 0, 1), cli=False)
    freeze_last_layer: int = option(1, "epochs with the head's last layer frozen", number(int, 0))
    clip_grad: float = option(3.0, "per-parameter gradient-norm clip, 0 = off", number(float, 0))
    drop_path: float = option(0.0, "stochastic-depth rate of the backbone", number(float, 0, 1, hi_open=True))


#: DINO's options on the digits (see ``presets``): two 16-px views of the shared recipe, a small head with
#: BatchNorm, a teacher temperature warming from 0.02 to 0.04
DIGIT_DINO_OPTIONS = dict(head_hidden_dim=256, head_bottleneck_dim=64, head_bn=1, local_crops=0, global_crop_size=16,
                          global_crops_scale=DIGIT_CROPS_SCALE, momentum_teacher=0.99, warmup_teacher_temp=0.02,
                          teacher_temp=0.04, warmup_teacher_temp_epochs=10, **DIGIT_PHOTOMETRIC)


@register_method("dino")
class DINO(SSLMethod):
    """DINO with a ViT (or any registered backbone returning ``[B, D]`` features).

    Args:
        backbone: student backbone (copied for the teacher).
        embed_dim: backbone feature width D.
        epochs: total epochs (teacher-temperature and momentum schedules).
        steps_per_epoch: optimizer steps per epoch.
        augment: the multi-crop transform (2 global views first).
        config: the options (:class:`DINOConfig`: head sizes, teacher momentum and temperatures,
            frozen last layer, gradient clip); its crop fields are read by :meth:`from_context`,
            which builds ``augment`` from them.
        optim: recommended optimizer settings.

    Example:
        >>> from ssl_fast.methods import MethodContext, create_method
        >>> ctx = MethodContext(arch="vit_nano_p8", epochs=1, steps_per_epoch=1, global_batch_size=8, image_size=32)
        >>> dino = create_method("dino", ctx)
    """

    config_class = DINOConfig
    display_metrics = {"momentum": "m {:.5f}", "teacher_entropy": "teacher entropy {:.3f}"}
    presets = {
        # The digits recipe of every method (ssl_fast.methods.digits: resnet_mini on 16-px digits, strong
        # brightness/contrast and noise, no flips, AdamW), two 16-px views and no local crops; BatchNorm in
        # the head (the official use_bn_in_head option) and a teacher warming from 0.02 to 0.04 keep the
        # teacher from a uniform output on this small data. Chosen on --eval-split val.
        "digits": dict(**DIGIT_RUN, options=dict(DIGIT_DINO_OPTIONS, out_dim=1024)),
        # --arch vit_nano_p4: the same recipe on a ViT-nano with 4-pixel patches (16 tokens of a 16-px digit). A ViT
        # from scratch learns far more slowly here than the CNN, so 150 epochs: 95.12% validation k-NN (60 epochs
        # ended at 79%); K = 256 (128 and 1024 were worse), lr 8e-3 (4e-3 and 2e-2 were worse).
        "digits/vit_nano_p4": dict(DIGIT_RUN, arch="vit_nano_p4", epochs=150, warmup_epochs=5,
                                   options=dict(DIGIT_DINO_OPTIONS, out_dim=256)),
        # --arch vit_nano_p8: a ViT with multi-crop (2 global 32-px, 4 local 16-px crops), larger
        # crops than DINO's ImageNet recipe (tiny local crops are mostly background) and no flips.
        "digits/vit_nano_p8": dict(arch="vit_nano_p8", epochs=30, batch_size=64, image_size=32, lr=2e-3,
                                   warmup_epochs=3,
                                   options=dict(out_dim=1024, head_hidden_dim=256, head_bottleneck_dim=64, head_bn=1,
                                                local_crops=4, global_crop_size=32, local_crop_size=16,
                                                global_crops_scale=(0.5, 1.0), local_crops_scale=(0.2, 0.5),
                                                flip_p=0.0, momentum_teacher=0.99, warmup_teacher_temp=0.04,
                                                teacher_temp=0.04)),
        "default": dict(arch="vit_tiny_p4", epochs=100, batch_size=256, image_size=32,
                        options=dict(out_dim=4096, local_crops=6, global_crop_size=32, local_crop_size=16)),
    }

    def __init__(self, backbone: nn.Module, embed_dim: int, epochs: int, steps_per_epoch: int,
                 augment: MultiCrop, config: Optional[DINOConfig] = None, optim: Optional[OptimConfig] = None):
        super().__init__()
        c = self.config = config or DINOConfig()
        self.augment = augment
        self.student = MultiCropWrapper(backbone, DINOHead(embed_dim, c.out_dim, norm_last_layer=bool(c.norm_last_layer),
                                                           nlayers=c.head_layers, hidden_dim=c.head_hidden_dim,
                                                           bottleneck_dim=c.head_bottleneck_dim, use_bn=bool(c.head_bn)))
        self.teacher = MomentumTeacher(self.student, c.momentum_teacher, 1.0, total_steps=max(1, epochs * steps_per_epoch))
        self.loss_fn = DINOLoss(c.out_dim, augment.n_views, c.warmup_teacher_temp, c.teacher_temp,
                                min(c.warmup_teacher_temp_epochs, epochs), epochs, c.student_temp, c.center_momentum)
        self.out_dim = c.out_dim
        self.freeze_last_layer = c.freeze_last_layer
        self.clip_grad = c.clip_grad
        self._optim = optim or OptimConfig()
        # The module the forward pass calls: the student, or its DDP wrapper. Kept out of the
        # registered submodules so that state_dict() holds the student once, without the
        # wrapper's "module." prefix, and loads the same before and after wrap_distributed.
        object.__setattr__(self, "_forward_student", self.student)
        self._register_load_state_dict_pre_hook(self._drop_legacy_keys)
        self._teacher_mode()

    @staticmethod
    def _drop_legacy_keys(state_dict, prefix, *args) -> None:
        # Checkpoints written before the forward module was unregistered repeat the student's
        # tensors under "_forward_student." (and "_forward_student.module." under DDP).
        for k in [k for k in state_dict if k.startswith(prefix + "_forward_student.")]:
            del state_dict[k]

    @classmethod
    def from_context(cls, ctx: MethodContext) -> "DINO":
        """Build DINO for a run; ``ctx.options`` are :class:`DINOConfig` fields (None = default)."""
        c = config_from_options(DINOConfig, ctx.options)
        backbone = create_model(ctx.arch, drop_path_rate=c.drop_path)
        patch = getattr(backbone, "patch_size", 1)
        g = c.global_crop_size if c.global_crop_size is not None else ctx.image_size
        loc = c.local_crop_size if c.local_crop_size is not None else max(patch, (g * 3 // 7) // patch * patch)
        if getattr(backbone, "fixed_input_size", False):
            # position tables sized for one input (BoTNet): every crop must have that size
            if c.local_crops and loc != g:
                raise ValueError(f"--arch {ctx.arch} takes one input size only, so --local-crop-size ({loc}) must "
                                 f"equal --global-crop-size ({g}), or pass --local-crops 0")
            backbone = create_model(ctx.arch, drop_path_rate=c.drop_path, img_size=g)
        for name, size in (("global crop size", g), ("local crop size", loc)):
            if size < patch or size % patch:
                raise ValueError(f"{name} {size} px does not fit the patch size {patch} of {ctx.arch}: "
                                 f"crop sizes must be positive multiples of {patch}")
        if loc > g:
            raise ValueError(f"local crop size {loc} px is larger than the global crop size {g} px")
        if c.local_crops < 0:
            raise ValueError(f"--local-crops must be >= 0, got {c.local_crops}")
        augment = MultiCrop(g, loc, c.local_crops, global_scale=c.global_crops_scale,
                            local_scale=c.local_crops_scale, mean=ctx.mean, std=ctx.std, flip_p=c.flip_p,
                            jitter=tuple(c.jitter), jitter_p=c.jitter_p, grey_p=c.grey_p, noise_p=c.noise_p,
                            noise_std=(0.0, c.noise_std))
        optim = OptimConfig(base_lr=5e-4, min_lr=1e-6, warmup_epochs=min(10, max(ctx.epochs // 10, 0)),
                            weight_decay=0.04, weight_decay_end=0.4)
        return cls(backbone, backbone.num_features, ctx.epochs, ctx.steps_per_epoch, augment, config=c, optim=optim)

    # ---- the SSLMethod interface --------------------------------------------------------
    def trainable(self) -> nn.Module:
        return self.student

    def train(self, mode: bool = True) -> "DINO":
        """Set the student's mode; the teacher always stays in eval mode (no drop-path, no dropout)."""
        super().train(mode)
        self._teacher_mode()
        return self

    def _teacher_mode(self) -> None:
        # No drop-path or dropout in the teacher; its BatchNorm layers (--head-bn) normalise with
        # the batch's statistics, as in the official code where the teacher stays in train mode.
        self.teacher.module.eval()
        for m in self.teacher.module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()

    def optim_config(self) -> OptimConfig:
        return self._optim

    def wrap_distributed(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """DDP-wrap the student. On GPUs, head BatchNorm layers (student and teacher) become
        SyncBatchNorm, as in the official code, so N processes normalise with the global batch's
        statistics. SyncBatchNorm needs GPUs: on the CPU each process uses its own batch's statistics
        (so with ``head_bn`` N CPU processes are close to, not equal to, one process)."""
        on_gpu = next(self.student.parameters()).is_cuda
        if on_gpu and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.student.modules()):
            self.student.head = nn.SyncBatchNorm.convert_sync_batchnorm(self.student.head)
            self.teacher.module.head = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher.module.head)
            self._teacher_mode()
        object.__setattr__(self, "_forward_student", wrap(self.student))

    def unwrap_distributed(self) -> None:
        """Drop the wrapper set by :meth:`wrap_distributed` (the student is used directly again)."""
        object.__setattr__(self, "_forward_student", self.student)

    def training_step(self, batch: Batch, epoch: int, step: int) -> Dict[str, Any]:
        """Multi-crop views, teacher on the 2 global views, student on all, DINO loss.

        Returns:
            ``loss`` and, detached, ``teacher_temp``, ``teacher_entropy`` (mean per-sample entropy
            of the centred, sharpened teacher distribution, nats) and ``teacher_marginal_entropy``
            (entropy of its batch mean).
        """
        crops = self.augment(batch.images, batch.generator, rows=batch.rows, total=batch.global_size)
        n_global = self.augment.n_global
        teacher_out = self.teacher(crops[:n_global])
        student_out = self._forward_student(crops)
        tau = float(self.loss_fn.teacher_temp_schedule[epoch])
        with torch.no_grad():
            probs = torch.softmax((teacher_out.float() - self.loss_fn.center) / tau, dim=-1)
            ent = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1).mean()
            marg = all_reduce_mean(probs.mean(0))  # the global batch's mean, whatever the world size
            marg_ent = -(marg * torch.log(marg.clamp_min(1e-30))).sum()
        loss = self.loss_fn(student_out, teacher_out, epoch)
        return {"loss": loss, "teacher_temp": tau, "teacher_entropy": ent.detach(),
                "teacher_marginal_entropy": marg_ent.detach()}

    def before_optimizer_step(self, epoch: int, step: int) -> Dict[str, float]:
        """Per-parameter gradient clipping (official DINO semantics) and the frozen last layer."""
        if self.clip_grad and self.clip_grad > 0:
            for p in self.student.parameters():
                if p.grad is not None:
                    norm = p.grad.detach().norm(2)
                    p.grad.mul_(torch.clamp(self.clip_grad / (norm + 1e-6), max=1.0))
        if epoch < self.freeze_last_layer:
            for p in self.student.head.last_layer.parameters():
                p.grad = None
        return {}

    def after_optimizer_step(self, epoch: int, step: int) -> Dict[str, float]:
        """EMA update of the teacher; returns the momentum used."""
        return {"momentum": self.teacher.update(self.student)}

    @property
    def teacher_backbone(self) -> nn.Module:
        return self.teacher.module.backbone

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Teacher backbone class-token features ``[B, D]`` of un-augmented images ``[B, 3, H, W]``."""
        return self.teacher_backbone(self.augment.eval_view(images))

    @torch.no_grad()
    def attention_maps(self, images: torch.Tensor) -> Optional[torch.Tensor]:
        """Teacher's last-block class-token attention over the patches, ``[B, heads, gh, gw]``."""
        bb = self.teacher_backbone
        if not hasattr(bb, "last_attention"):
            return None
        x = self.augment.eval_view(images)
        att = bb.last_attention(x, query_index=0)[:, :, 0, 1:]  # drop the class-token key
        gh, gw = bb.grid_size(*x.shape[-2:])
        return att.reshape(att.shape[0], att.shape[1], gh, gw)

    def collapse_warnings(self, metrics: Dict[str, float]) -> List[str]:
        """Warn when the teacher is near uniform (entropy ~ ln K) or all rows pick one prototype."""
        out, ln_k = [], math.log(self.out_dim)
        ent = metrics.get("teacher_entropy")
        marg = metrics.get("teacher_marginal_entropy")
        if ent is not None and ent > 0.97 * ln_k:
            out.append(f"teacher entropy {ent:.3f} is near ln K = {ln_k:.3f}: the teacher is almost uniform "
                       "(collapse); try a lower --teacher-temp or a higher --momentum-teacher")
        if marg is not None and marg < 0.05 * ln_k:
            out.append(f"entropy of the teacher's batch-mean distribution is {marg:.3f} (near 0): every image "
                       "maps to the same prototype (collapse); check centering and the learning rate")
        return out
