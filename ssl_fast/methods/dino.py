"""DINO: self-distillation with no labels (Caron et al., 2021) on ssl_fast's fused ops.

Student = backbone + :class:`~ssl_fast.models.heads.DINOHead`; teacher = its momentum copy
(:class:`~ssl_fast.nn.MomentumTeacher`, cosine momentum schedule per iteration). The loss is
:class:`ssl_fast.nn.DINOLoss` (centering + sharpening over every teacher-view / other-student-view
pair, center all-reduced over ranks). The student sees two global and ``n_local`` local crops,
the teacher the two global crops only.
"""
import argparse
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from ssl_fast._argtypes import number
from ssl_fast.data.augment import MultiCrop
from ssl_fast.methods.base import Batch, MethodContext, OptimConfig, SSLMethod, register_method
from ssl_fast.models import create_model
from ssl_fast.models.heads import DINOHead
from ssl_fast.nn import DINOLoss, MomentumTeacher


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


def _add(parser: argparse.ArgumentParser, flag: str, **kw) -> None:
    # options shared by several methods are defined once
    if flag not in parser._option_string_actions:
        parser.add_argument(flag, **kw)


def _pair(text) -> tuple:
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


@register_method("dino")
class DINO(SSLMethod):
    """DINO with a ViT (or any registered backbone returning ``[B, D]`` features).

    Args:
        backbone: student backbone (copied for the teacher).
        embed_dim: backbone feature width D.
        epochs: total epochs (teacher-temperature and momentum schedules).
        steps_per_epoch: optimizer steps per epoch.
        augment: the multi-crop transform (2 global views first).
        out_dim: K, prototypes in the head.
        head_hidden_dim, head_bottleneck_dim, head_layers: DINO head sizes (2048, 256, 3).
        norm_last_layer: weight-normalised last layer with frozen unit magnitude.
        momentum_teacher: base EMA momentum (cosine to 1).
        warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs: teacher temperature
            warm-up (clamped to ``epochs``).
        student_temp: student temperature.
        center_momentum: center EMA momentum.
        freeze_last_layer: epochs during which the last layer gets no update.
        clip_grad: per-parameter gradient-norm clip (0 disables), as the official code does.
        optim: recommended optimizer settings.
    """

    def __init__(self, backbone: nn.Module, embed_dim: int, epochs: int, steps_per_epoch: int,
                 augment: MultiCrop, out_dim: int = 65536, head_hidden_dim: int = 2048,
                 head_bottleneck_dim: int = 256, head_layers: int = 3, norm_last_layer: bool = True,
                 head_bn: bool = False,
                 momentum_teacher: float = 0.996, warmup_teacher_temp: float = 0.04,
                 teacher_temp: float = 0.04, warmup_teacher_temp_epochs: int = 30,
                 student_temp: float = 0.1, center_momentum: float = 0.9, freeze_last_layer: int = 1,
                 clip_grad: float = 3.0, optim: Optional[OptimConfig] = None):
        super().__init__()
        self.augment = augment
        self.student = MultiCropWrapper(backbone, DINOHead(embed_dim, out_dim, norm_last_layer=norm_last_layer,
                                                           nlayers=head_layers, hidden_dim=head_hidden_dim,
                                                           bottleneck_dim=head_bottleneck_dim, use_bn=head_bn))
        self.teacher = MomentumTeacher(self.student, momentum_teacher, 1.0, total_steps=max(1, epochs * steps_per_epoch))
        self.loss_fn = DINOLoss(out_dim, augment.n_views, warmup_teacher_temp, teacher_temp,
                                min(warmup_teacher_temp_epochs, epochs), epochs, student_temp, center_momentum)
        self.out_dim = out_dim
        self.freeze_last_layer = freeze_last_layer
        self.clip_grad = clip_grad
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

    # ---- construction from the CLI -------------------------------------------------------
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        """DINO's command-line options (defaults None: the data preset or DINO's value applies)."""
        g = parser.add_argument_group("DINO")
        _add(g, "--out-dim", type=number(int, 1), help="prototypes K in the head (DINO: 65536)")
        _add(g, "--head-hidden-dim", type=number(int, 1), help="head MLP width (DINO: 2048)")
        _add(g, "--head-bottleneck-dim", type=number(int, 1), help="head bottleneck width (DINO: 256)")
        _add(g, "--local-crops", type=number(int, 0), help="number of local crops (DINO: 8)")
        _add(g, "--global-crop-size", type=number(int, 1), help="global crop side in pixels (multiple of the patch size)")
        _add(g, "--local-crop-size", type=number(int, 1), help="local crop side in pixels (multiple of the patch size)")
        _add(g, "--global-crops-scale", type=_pair, help="area range of global crops, e.g. 0.4,1")
        _add(g, "--local-crops-scale", type=_pair, help="area range of local crops, e.g. 0.05,0.4")
        _add(g, "--flip-p", type=number(float, 0, 1), help="horizontal-flip probability")
        _add(g, "--momentum-teacher", type=number(float, 0, 1), help="base teacher momentum (DINO: 0.996)")
        _add(g, "--teacher-temp", type=number(float, 0, lo_open=True), help="teacher temperature after warm-up (DINO: 0.04)")
        _add(g, "--warmup-teacher-temp", type=number(float, 0, lo_open=True), help="initial teacher temperature (DINO: 0.04)")
        _add(g, "--warmup-teacher-temp-epochs", type=number(int, 0), help="teacher-temperature warm-up epochs")
        _add(g, "--freeze-last-layer", type=number(int, 0), help="epochs with the head's last layer frozen (DINO: 1)")
        _add(g, "--clip-grad", type=number(float, 0), help="per-parameter gradient-norm clip, 0 = off (DINO: 3.0)")
        _add(g, "--drop-path", type=number(float, 0, 1, hi_open=True), help="stochastic-depth rate of the backbone (DINO ViT-S: 0.1)")
        _add(g, "--norm-last-layer", type=int, choices=(0, 1), help="unit-norm prototypes (1) or learnt norms (0)")
        _add(g, "--head-bn", type=int, choices=(0, 1), help="BatchNorm in the head's MLP (DINO's use_bn_in_head)")

    @classmethod
    def from_context(cls, ctx: MethodContext) -> "DINO":
        """Build DINO for a run; ``ctx.options`` keys are the CLI dests above (None = default)."""
        o = {k: v for k, v in ctx.options.items() if v is not None}
        backbone = create_model(ctx.arch, drop_path_rate=o.get("drop_path", 0.0))
        patch = getattr(backbone, "patch_size", 1)
        g = o.get("global_crop_size", ctx.image_size)
        loc = o.get("local_crop_size", max(patch, (g * 3 // 7) // patch * patch))
        for name, size in (("global crop size", g), ("local crop size", loc)):
            if size < patch or size % patch:
                raise ValueError(f"{name} {size} px does not fit the patch size {patch} of {ctx.arch}: "
                                 f"crop sizes must be positive multiples of {patch}")
        if loc > g:
            raise ValueError(f"local crop size {loc} px is larger than the global crop size {g} px")
        n_local = o.get("local_crops", 8)
        if n_local < 0:
            raise ValueError(f"--local-crops must be >= 0, got {n_local}")
        augment = MultiCrop(g, loc, n_local, global_scale=o.get("global_crops_scale", (0.4, 1.0)),
                            local_scale=o.get("local_crops_scale", (0.05, 0.4)), mean=ctx.mean, std=ctx.std,
                            flip_p=o.get("flip_p", 0.5))
        optim = OptimConfig(base_lr=5e-4, min_lr=1e-6, warmup_epochs=min(10, max(ctx.epochs // 10, 0)),
                            weight_decay=0.04, weight_decay_end=0.4)
        return cls(backbone, backbone.num_features, ctx.epochs, ctx.steps_per_epoch, augment,
                   out_dim=o.get("out_dim", 65536), head_hidden_dim=o.get("head_hidden_dim", 2048),
                   head_bottleneck_dim=o.get("head_bottleneck_dim", 256),
                   norm_last_layer=bool(o.get("norm_last_layer", 1)), head_bn=bool(o.get("head_bn", 0)),
                   momentum_teacher=o.get("momentum_teacher", 0.996),
                   warmup_teacher_temp=o.get("warmup_teacher_temp", 0.04),
                   teacher_temp=o.get("teacher_temp", 0.04),
                   warmup_teacher_temp_epochs=o.get("warmup_teacher_temp_epochs", 30),
                   freeze_last_layer=o.get("freeze_last_layer", 1), clip_grad=o.get("clip_grad", 3.0),
                   optim=optim)

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
            marg = probs.mean(0)
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
