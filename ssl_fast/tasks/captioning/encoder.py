"""The captioner's encoder: any ssl_fast backbone's feature map, frozen or fine-tuned from a stage.

Two kinds of backbone are served:

* a CNN with ``feature_maps(x) -> [layer1, .., layer4]`` (the ResNets of :mod:`ssl_fast.models`):
  the map of one stage ``[B, C, h, w]`` becomes ``L = h*w`` annotation vectors of width ``C``;
* a ViT with ``forward_tokens(x) -> [B, 1 + N, D]``: the N patch tokens (class token dropped).

The backbone is cut into stages (CNN: stem, layer1..layer4; ViT: embedding, block 1..depth, the
final norm joining the last block). ``fine_tune_from = k`` trains stages ``k`` and later and
freezes the earlier ones (kept in eval mode, so BatchNorm statistics do not move); ``None``
freezes all of it. Weights may come from an ``ssl-fast pretrain`` checkpoint
(:func:`load_pretrained_backbone`).
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ssl_fast.models import create_model


def _stages(backbone: nn.Module) -> List[List[nn.Module]]:
    """The backbone's modules in forward order, grouped by stage (see the module docstring)."""
    if hasattr(backbone, "feature_maps"):
        layers = [getattr(backbone, f"layer{i}") for i in range(1, 5)]
        ids = {id(m) for m in layers}
        stem = [m for n, m in backbone.named_children() if id(m) not in ids and not n.startswith(("fc", "head"))]
        return [stem] + [[m] for m in layers]
    if hasattr(backbone, "forward_tokens"):
        blocks = list(backbone.blocks)
        embed = [backbone.patch_embed, backbone.pos_drop]
        return [embed] + [[b] for b in blocks[:-1]] + [[blocks[-1], backbone.norm]]
    raise TypeError(f"a captioning encoder needs a backbone with feature_maps() (ResNet) or forward_tokens() (ViT), "
                    f"got {type(backbone).__name__}")


class Encoder(nn.Module):
    """A backbone's feature map as annotation vectors ``[B, L, D]`` on a ``gh x gw`` grid.

    Args:
        backbone: a module with ``feature_maps`` (CNN) or ``forward_tokens`` (ViT).
        stage: CNN only: which ``layer`` (1..4) gives the map; later layers are not run.
        fine_tune_from: first trained stage (0 = everything), or None for a frozen backbone.
        mean, std: per-channel image normalisation applied first.

    Example:
        >>> enc = Encoder(create_model("vit_nano_p4", img_size=32), fine_tune_from=None)
        >>> feats, grid = enc(torch.rand(2, 3, 32, 32))
        >>> feats.shape, grid
        (torch.Size([2, 64, 96]), (8, 8))
    """

    def __init__(self, backbone: nn.Module, stage: int = 4, fine_tune_from: Optional[int] = 0,
                 mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)):
        super().__init__()
        self.backbone = backbone
        self.kind = "cnn" if hasattr(backbone, "feature_maps") else "vit"
        stages = _stages(backbone)
        if self.kind == "cnn" and stage not in (1, 2, 3, 4):
            raise ValueError(f"stage must be 1..4 (layer1..layer4), got {stage!r}")
        self.stage = stage if self.kind == "cnn" else len(stages) - 1
        n_used = self.stage + 1 if self.kind == "cnn" else len(stages)
        if fine_tune_from is not None and not (0 <= fine_tune_from < n_used):
            raise ValueError(f"fine_tune_from must be 0..{n_used - 1} (the stages this encoder runs: "
                             f"{self.stage_names()[:n_used]}) or None (frozen), got {fine_tune_from!r}")
        self.fine_tune_from = fine_tune_from
        self._frozen: List[nn.Module] = []
        backbone.requires_grad_(False)  # then the trained stages back on (heads and unused stages stay off)
        for i, mods in enumerate(stages):
            train = fine_tune_from is not None and fine_tune_from <= i < n_used
            for m in mods:
                m.requires_grad_(train)
                if not train:
                    self._frozen.append(m)
            if i == 0 and self.kind == "vit" and train:
                backbone.cls_token.requires_grad_(True)
                backbone.pos_embed.requires_grad_(True)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.train()

    def stage_names(self) -> List[str]:
        """Names of the stages ``fine_tune_from`` counts."""
        if self.kind == "cnn":
            return ["stem", "layer1", "layer2", "layer3", "layer4"]
        return ["embedding"] + [f"block{i + 1}" for i in range(len(self.backbone.blocks))]

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    def train(self, mode: bool = True) -> "Encoder":
        super().train(mode)
        for m in self._frozen:  # frozen stages keep their BatchNorm statistics
            m.train(False)
        return self

    def _cnn_map(self, x: torch.Tensor) -> torch.Tensor:
        bb = self.backbone
        if hasattr(bb, "_stem"):  # ssl_fast's ResNets: run only the stages used
            x = bb._stem(x)
            for i in range(1, self.stage + 1):
                x = getattr(bb, f"layer{i}")(x)
            return x
        return bb.feature_maps(x)[self.stage - 1]

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """``[B, 3, H, W]`` in [0, 1] -> ``(features [B, L, D], (gh, gw))`` with ``L = gh * gw``."""
        if images.dim() != 4:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            if self.kind == "cnn":
                m = self._cnn_map(x)
                grid = (int(m.shape[-2]), int(m.shape[-1]))
                feats = m.flatten(2).transpose(1, 2)
            else:
                grid = self.backbone.grid_size(*x.shape[-2:])
                feats = self.backbone.forward_tokens(x)[:, 1:]
        return feats.contiguous(), grid

    @torch.no_grad()
    def out_dim(self, image_size: int) -> Tuple[int, Tuple[int, int]]:
        """``(D, (gh, gw))`` for square images of ``image_size`` (one dummy forward)."""
        was = self.training
        self.eval()
        p = next(self.parameters())
        feats, grid = self(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype))
        self.train(was)
        return int(feats.shape[-1]), grid


def build_backbone(name: str, image_size: int) -> nn.Module:
    """``create_model(name)`` as a feature backbone for images of ``image_size`` (ViTs get ``img_size``)."""
    try:
        return create_model(name, img_size=image_size)
    except TypeError:
        return create_model(name)


def _backbone_prefixes(keys: List[str]) -> List[str]:
    """Candidate key prefixes of a backbone in a method's state, teacher first (DINO evaluates it)."""
    seen: Dict[str, None] = {}
    for k in keys:
        i = k.find("backbone.")
        if i >= 0:
            seen.setdefault(k[:i + len("backbone.")], None)
    return sorted(seen, key=lambda p: (0 if "teacher" in p else 1 if "target" in p else 2, p))


def load_pretrained_backbone(path: str, image_size: int, arch: Optional[str] = None) -> Tuple[nn.Module, str]:
    """The backbone of an ``ssl-fast pretrain`` checkpoint (the teacher's, where there is one).

    Args:
        path: the checkpoint file (``checkpoint.pth``) or a folder holding one.
        image_size: the images' side (ViT position embeddings are interpolated to it).
        arch: the architecture, when the checkpoint's config does not name it.

    Returns:
        ``(backbone with the checkpoint's weights, arch)``.

    Raises:
        CheckpointError: the file is not a pre-training checkpoint or holds no matching backbone.
    """
    from ssl_fast.train.checkpoint import CheckpointError, load_checkpoint, resolve_resume

    try:
        path = resolve_resume(path, path)
    except FileNotFoundError as e:
        raise CheckpointError(str(e).replace("--resume", "--checkpoint")) from None
    if path is None:
        raise CheckpointError("--checkpoint names nothing")
    ck = load_checkpoint(path, required=("method",))
    cfg = ck.get("config") or {}
    name = arch or (cfg.get("arch") if isinstance(cfg, dict) else getattr(cfg, "arch", None))
    if not name:
        raise CheckpointError(f"{path} does not name its architecture; pass --backbone")
    backbone = build_backbone(name, image_size)
    own = backbone.state_dict()
    state = ck["method"]
    for prefix in _backbone_prefixes(list(state)):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if set(sub) == set(own) and all(tuple(sub[k].shape) == tuple(own[k].shape) for k in own
                                        if k != "pos_embed"):
            if "pos_embed" in sub and sub["pos_embed"].shape != own["pos_embed"].shape:
                sub["pos_embed"] = _resize_pos_embed(sub["pos_embed"], own["pos_embed"].shape[1])
            backbone.load_state_dict(sub)
            return backbone, name
    raise CheckpointError(f"{path} holds no {name} backbone whose tensors fit (looked under "
                          f"{_backbone_prefixes(list(state)) or 'no backbone.* keys'})")


def _resize_pos_embed(pos: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """``[1, 1 + g*g, D]`` position embeddings resized bicubically to ``n_tokens`` (class token kept)."""
    import math

    import torch.nn.functional as F

    src, dst = math.isqrt(pos.shape[1] - 1), math.isqrt(n_tokens - 1)
    grid = pos[:, 1:].reshape(1, src, src, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, dst * dst, -1).to(pos.dtype)], dim=1)
