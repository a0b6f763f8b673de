"""CvT (Wu et al., ICCV 2021): convolutional token embedding + transformer blocks with
convolutional q/k/v projection, three stages, class token in the last stage only.

Each stage: a strided convolution (k7/s4/p2, then k3/s2/p1 twice) embeds the previous map into
wider, fewer tokens, followed by LayerNorm; then pre-norm blocks (``ConvAttention`` with
depthwise-conv + BatchNorm projections, stride 1 for q and 2 for k/v, and an MLP of ratio 4),
with stochastic depth. No position embedding. The last stage prepends a class token, whose final
LayerNorm'd value is the image feature (``forward_features``), so the model serves as a DINO
backbone. Parameter names follow the official checkpoints (``stage{i}.patch_embed.proj``,
``stage{i}.blocks.{j}.attn.conv_proj_q.conv``, ``norm``, ``head``).
"""
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ssl_fast.models.layers import DropPath, Mlp, init_weights
from ssl_fast.models.registry import register_model
from ssl_fast.nn import ConvAttention


class ConvEmbed(nn.Module):
    """Convolutional token embedding: ``[B, C_in, H, W] -> LayerNorm(conv(x))`` as a map ``[B, D, H', W']``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        B, D, H, W = x.shape
        t = self.norm(x.flatten(2).transpose(1, 2))
        return t.transpose(1, 2).reshape(B, D, H, W)


class Block(nn.Module):
    """Pre-norm block: ``x + drop_path(attn(norm1(x), h, w))``, then ``x + drop_path(mlp(norm2(x)))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 with_cls_token: bool = False, stride_kv: int = 2, stride_q: int = 1):
        super().__init__()
        self.with_cls_token = with_cls_token
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ConvAttention(dim, dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                                  method="dw_bn", kernel_size=3, stride_kv=stride_kv, stride_q=stride_q,
                                  padding_kv=1, padding_q=1, with_cls_token=with_cls_token)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CvTStage(nn.Module):
    """One stage: convolutional embedding, optional class token, ``depth`` blocks.

    ``forward(x [B, C_in, H, W]) -> (map [B, D, H', W'], cls [B, 1, D] or None)``.
    """

    def __init__(self, in_chans: int, embed_dim: int, depth: int, num_heads: int, patch_size: int,
                 patch_stride: int, patch_padding: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 with_cls_token: bool = False):
        super().__init__()
        self.patch_embed = ConvEmbed(patch_size, in_chans, embed_dim, patch_stride, patch_padding)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if with_cls_token else None
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist() if depth > 0 else []
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, r, with_cls_token)
            for r in rates)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        x = self.patch_embed(x)
        B, D, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(B, -1, -1), t], dim=1)
        t = self.pos_drop(t)
        for blk in self.blocks:
            t = blk(t, H, W)
        cls = None
        if self.cls_token is not None:
            cls, t = t[:, :1], t[:, 1:]
        return t.transpose(1, 2).reshape(B, D, H, W), cls


class CvT(nn.Module):
    """Convolutional vision transformer.

    Args:
        in_chans: image channels.
        num_classes: classifier outputs; 0 gives an identity head (a backbone).
        embed_dims, depths, num_heads: per stage (CvT-13: 64/192/384, 1/2/10, 1/3/6).
        patch_sizes, patch_strides, patch_paddings: convolutional embeddings (7/3/3, 4/2/2, 2/1/1).
        mlp_ratio: MLP hidden width over the token width.
        drop_rate, attn_drop_rate: dropout.
        drop_path_rates: stochastic-depth rate reached at the last block of each stage.
        drop_path_rate: one stochastic-depth rate, the keyword every registered backbone takes
            (the trainer passes ``--drop-path`` as it): when given it replaces ``drop_path_rates``
            by ``(0, ..., 0, drop_path_rate)``, the shape of the official recipe (0, 0, 0.1).
        cls_token: class token in the last stage (its feature is the output); without it the
            feature is the mean of the last stage's normed tokens.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000, embed_dims: Sequence[int] = (64, 192, 384),
                 depths: Sequence[int] = (1, 2, 10), num_heads: Sequence[int] = (1, 3, 6),
                 patch_sizes: Sequence[int] = (7, 3, 3), patch_strides: Sequence[int] = (4, 2, 2),
                 patch_paddings: Sequence[int] = (2, 1, 1), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rates: Sequence[float] = (0.0, 0.0, 0.1), cls_token: bool = True,
                 drop_path_rate: Optional[float] = None):
        super().__init__()
        n = len(embed_dims)
        if drop_path_rate is not None:
            if not 0.0 <= float(drop_path_rate) < 1.0:
                raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
            drop_path_rates = (0.0,) * (n - 1) + (float(drop_path_rate),)
        for name, seq in (("depths", depths), ("num_heads", num_heads), ("patch_sizes", patch_sizes),
                          ("patch_strides", patch_strides), ("patch_paddings", patch_paddings),
                          ("drop_path_rates", drop_path_rates)):
            if len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries but embed_dims has {n}")
        for d, h in zip(embed_dims, num_heads):
            if d % h:
                raise ValueError(f"embed dim {d} is not divisible by {h} heads")
        self.num_stages = n
        self.cls_token = cls_token
        chans = in_chans
        for i in range(n):
            stage = CvTStage(chans, embed_dims[i], depths[i], num_heads[i], patch_sizes[i], patch_strides[i],
                             patch_paddings[i], mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                             drop_path_rates[i], with_cls_token=cls_token and i == n - 1)
            setattr(self, f"stage{i}", stage)
            chans = embed_dims[i]
        self.embed_dim = self.num_features = embed_dims[-1]
        self.norm = nn.LayerNorm(self.embed_dim)
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_weights)

    def forward_maps(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Last stage's map ``[B, D, H/16, W/16]`` and class token ``[B, 1, D]`` (or None)."""
        cls = None
        for i in range(self.num_stages):
            x, cls = getattr(self, f"stage{i}")(x)
        return x, cls

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image feature ``[B, D]``: the normed class token (or the mean normed token without one)."""
        fmap, cls = self.forward_maps(x)
        if self.cls_token:
            return self.norm(cls).squeeze(1)
        return self.norm(fmap.flatten(2).transpose(1, 2)).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``head(forward_features(x))``."""
        return self.head(self.forward_features(x))


_CONFIGS = {
    "cvt_13": dict(embed_dims=(64, 192, 384), depths=(1, 2, 10), num_heads=(1, 3, 6)),
    "cvt_21": dict(embed_dims=(64, 192, 384), depths=(1, 4, 16), num_heads=(1, 3, 6)),
}


@register_model("cvt_13")
def cvt_13(**kwargs) -> CvT:
    """CvT-13: depths 1/2/10, dims 64/192/384, heads 1/3/6 (20M parameters with a 1000-class head).

    Like every registered model it is a backbone by default (``num_classes=0``: ``forward`` gives
    the ``[B, 384]`` feature); pass ``num_classes=1000`` for the ImageNet classifier.
    """
    return CvT(**{**_CONFIGS["cvt_13"], "num_classes": 0, **kwargs})


@register_model("cvt_21")
def cvt_21(**kwargs) -> CvT:
    """CvT-21: depths 1/4/16, dims 64/192/384, heads 1/3/6 (32M parameters with a 1000-class head).

    A backbone by default (``num_classes=0``), like :func:`cvt_13`.
    """
    return CvT(**{**_CONFIGS["cvt_21"], "num_classes": 0, **kwargs})
