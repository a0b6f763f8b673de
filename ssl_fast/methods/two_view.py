"""What the two-view methods (BYOL, SimSiam, CARE) share: their view options, the views, and the
evaluation of a CNN backbone. Each method keeps its own defaults in its own config class."""
import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ssl_fast.data.augment import ViewSet, ViewSpec
from ssl_fast.methods.base import MethodContext, OptimConfig, SSLMethod
from ssl_fast.methods.config import JITTER, NON_NEGATIVE, POSITIVE_INT, PROBABILITY, PROBABILITY_PAIR, option
from ssl_fast.methods.dino import crop_scale


@dataclass
class TwoViewConfig:
    """Heads and views of a two-view method. Defaults: BYOL's ImageNet recipe (Grill et al. 2020,
    Table 6): view 1 always blurred, view 2 rarely blurred and sometimes solarised."""
    proj_hidden_dim: int = option(4096, "projector hidden width", POSITIVE_INT)
    proj_dim: int = option(256, "projection width", POSITIVE_INT)
    pred_hidden_dim: int = option(4096, "predictor hidden width", POSITIVE_INT)
    crop_size: Optional[int] = option(None, "view side in pixels (default the image size)", POSITIVE_INT)
    crops_scale: tuple = option((0.08, 1.0), "area range of the random resized crops, lo,hi", crop_scale)
    flip_p: float = option(0.5, "horizontal-flip probability", PROBABILITY)
    jitter: tuple = option((0.4, 0.4, 0.2, 0.1), "colour-jitter strengths brightness,contrast,saturation,hue", JITTER)
    jitter_p: float = option(0.8, "colour-jitter probability", PROBABILITY)
    grey_p: float = option(0.2, "grayscale probability", PROBABILITY)
    blur_p: tuple = option((1.0, 0.1), "Gaussian-blur probability of view 1,view 2", PROBABILITY_PAIR)
    solarize_p: tuple = option((0.0, 0.2), "solarisation probability of view 1,view 2", PROBABILITY_PAIR)
    noise_p: float = option(0.0, "probability of additive Gaussian noise", PROBABILITY)
    noise_std: float = option(0.1, "largest std of the Gaussian noise (drawn in [0, this])", NON_NEGATIVE)


def two_views(c: TwoViewConfig, ctx: MethodContext) -> ViewSet:
    """The two augmented views of ``c`` at ``c.crop_size`` (default the stored image size)."""
    size = c.crop_size or ctx.image_size
    specs = [ViewSpec(size, tuple(c.crops_scale), flip_p=c.flip_p, jitter=tuple(c.jitter), jitter_p=c.jitter_p,
                      grey_p=c.grey_p, blur_p=c.blur_p[v], solarize_p=c.solarize_p[v], noise_p=c.noise_p,
                      noise_std=(0.0, c.noise_std)) for v in range(2)]
    return ViewSet(specs, ctx.mean, ctx.std)


def batchnorm_in_train_mode(module: nn.Module) -> None:
    """Eval mode (no dropout, no drop-path) except BatchNorm, which normalises with the batch's
    statistics: the target network of BYOL and CARE, run as the official code runs it."""
    module.eval()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()


class Encoder(nn.Module):
    """Backbone + projector: ``[B, 3, H, W] -> [B, proj_dim]`` (the target network's shape too)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


class OnlineNetwork(nn.Module):
    """Encoder + predictor: ``x -> (z, p)``, the projection and the prediction."""

    def __init__(self, encoder: Encoder, predictor: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return z, self.predictor(z)


@torch.no_grad()
@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Every submodule of ``module`` in eval mode (BatchNorm with running statistics) inside the
    block, each one's own mode restored after. Set per submodule, not by ``module.eval()``: a
    method's ``train()`` keeps its momentum target's BatchNorm in train mode."""
    was = [(m, m.training) for m in module.modules()]
    for m, _ in was:
        m.training = False
    try:
        yield module
    finally:
        for m, mode in was:
            m.training = mode


def eval_features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``backbone(x)`` in eval mode (BatchNorm with running statistics), its mode restored after."""
    with eval_mode(backbone):
        return backbone(x)


def activation_norm(backbone: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """Channel L2 norm ``[B, h, w]`` of the backbone's last feature map in eval mode (where a
    CNN's features are strongest), or None for a backbone without stages (``feature_maps``)."""
    if not hasattr(backbone, "feature_maps"):
        return None
    with eval_mode(backbone):
        return backbone.feature_maps(x)[-1].float().norm(dim=1)


def feature_width(backbone: nn.Module) -> int:
    """``num_features`` of a registered backbone."""
    if not hasattr(backbone, "num_features"):
        raise ValueError(f"backbone {type(backbone).__name__} has no num_features: it is not a feature extractor")
    return int(backbone.num_features)


def sync_batchnorm_on_gpu(*modules: nn.Module) -> List[nn.Module]:
    """The modules with BatchNorm converted to SyncBatchNorm when they live on a GPU (as the
    official BYOL/CARE code under data parallelism); on the CPU unchanged (SyncBatchNorm needs GPUs)."""
    out = []
    for m in modules:
        on_gpu = any(p.is_cuda for p in m.parameters())
        out.append(nn.SyncBatchNorm.convert_sync_batchnorm(m) if on_gpu else m)
    return out


class MomentumTargetMethod(SSLMethod):
    """What BYOL and CARE share: an online network ``self.student`` with an ``encoder`` that a
    momentum target ``self.teacher`` (:class:`~ssl_fast.nn.MomentumTeacher`) copies, run with
    batch statistics; DDP wraps the online network. Subclasses build ``student``, ``teacher``
    and ``_optim``, then call :meth:`_finish_init`."""

    def _finish_init(self) -> None:
        # the module the forward pass calls (the student or its DDP wrapper), kept unregistered
        object.__setattr__(self, "_forward_student", self.student)
        batchnorm_in_train_mode(self.teacher.module)

    def trainable(self) -> nn.Module:
        return self.student

    def optim_config(self) -> OptimConfig:
        return self._optim

    def train(self, mode: bool = True) -> "MomentumTargetMethod":
        super().train(mode)
        batchnorm_in_train_mode(self.teacher.module)
        return self

    def wrap_distributed(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """DDP-wrap the online network; on GPUs its BatchNorm (and the target's) become SyncBatchNorm."""
        self.student, self.teacher.module = sync_batchnorm_on_gpu(self.student, self.teacher.module)
        object.__setattr__(self.teacher, "_student", self.student.encoder)
        batchnorm_in_train_mode(self.teacher.module)
        object.__setattr__(self, "_forward_student", wrap(self.student))

    def unwrap_distributed(self) -> None:
        object.__setattr__(self, "_forward_student", self.student)

    def after_optimizer_step(self, epoch: int, step: int) -> Dict[str, float]:
        """EMA update of the target; returns the momentum used."""
        return {"momentum": self.teacher.update(self.student.encoder)}
