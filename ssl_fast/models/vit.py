"""Vision Transformer backbone (DINO-style) on ``ssl_fast.nn.Attention``.

Pre-norm blocks (LayerNorm -> attention -> drop-path -> residual, LayerNorm -> MLP(4x) ->
drop-path -> residual), a class token and learned position embeddings that are resized
bicubically to the crop in hand, so one network serves DINO's global and local crops.
The output is the (normed) class token. Parameter names follow timm/DINO (``patch_embed.proj``,
``cls_token``, ``pos_embed``, ``blocks.i.attn.qkv``, ``norm``).
"""
import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ssl_fast.models.layers import DropPath, Mlp, init_weights
from ssl_fast.models.registry import register_model
from ssl_fast.nn import Attention


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution.

    ``[B, C, H, W] -> [B, (H/p)(W/p), D]``; H and W must be multiples of the patch size.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"images must be [B, C, H, W], got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm transformer block on ``[B, N, D]`` tokens."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def attention_map(self, x: torch.Tensor, query_index=0) -> torch.Tensor:
        """``[B, H, len(query_index), N]`` attention probabilities of this block for input ``x [B, N, D]``."""
        return self.attn.attention_map(self.norm1(x), query_index=query_index)


class VisionTransformer(nn.Module):
    """ViT returning the class-token feature (DINO's backbone).

    Args:
        img_size: size the position embeddings are created for (other sizes are interpolated).
        patch_size: patch side in pixels.
        in_chans: input channels.
        embed_dim: token width D.
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / D.
        qkv_bias: bias in the qkv projection.
        drop_rate: dropout after the position embedding, in MLPs and projections.
        attn_drop_rate: attention-probability dropout.
        drop_path_rate: stochastic-depth rate, growing linearly from 0 to this over the blocks.
        num_classes: 0 (default) for a pure backbone; otherwise a linear classifier on the feature.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 num_classes: int = 0):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.depth = depth
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        n = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, r)
                                    for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_weights)


    def grid_size(self, h: int, w: int) -> Tuple[int, int]:
        """Patch grid ``(H/p, W/p)`` for an image of ``h x w`` pixels."""
        return h // self.patch_size, w // self.patch_size

    def interpolate_pos_encoding(self, gh: int, gw: int) -> torch.Tensor:
        """Position embeddings ``[1, 1 + gh*gw, D]`` for a ``gh x gw`` patch grid.

        The class-token embedding is kept; the patch embeddings are viewed as their square grid
        and resized bicubically (as DINO does) when the grid differs.
        """
        n = self.pos_embed.shape[1] - 1
        side = int(math.isqrt(n))
        if gh == side and gw == side:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        patch_pos = grid.to(self.pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> [B, 1 + (H/p)(W/p), D]``: patches, class token, position embeddings."""
        gh, gw = self.grid_size(*x.shape[-2:])
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.interpolate_pos_encoding(gh, gw)
        return self.pos_drop(tokens)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens after the final norm, ``[B, 1 + N, D]``."""
        t = self.prepare_tokens(x)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Class-token feature ``[B, D]`` of images ``[B, C, H, W]``."""
        return self.forward_tokens(x)[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``head(forward_features(x))``: ``[B, D]`` (``[B, num_classes]`` with a classifier)."""
        return self.head(self.forward_features(x))

    @torch.no_grad()
    def last_attention(self, x: torch.Tensor, query_index=0) -> torch.Tensor:
        """Attention of the last block for the chosen queries (default: the class token).

        Args:
            x: ``[B, C, H, W]`` images.
            query_index: token index/indices; 0 is the class token.

        Returns:
            ``[B, H, len(query_index), 1 + N]`` probabilities (keys include the class token).
        """
        t = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            t = blk(t)
        return self.blocks[-1].attention_map(t, query_index=query_index)


# (width, depth, heads). "nano" is not a published size: a 4-block, 96-wide ViT small enough to
# pre-train on a laptop CPU in minutes (the default for the embedded digits).
_SIZES = {"nano": (96, 4, 3), "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}


def _make(size: str, patch: int, default_img: int, **kwargs) -> VisionTransformer:
    dim, depth, heads = _SIZES[size]
    cfg = dict(img_size=default_img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads)
    cfg.update(kwargs)
    return VisionTransformer(**cfg)


def _register_family(size: str) -> None:
    # patch 16 at 224 px (ImageNet), and small-image variants: patch 8 at 64 px, patch 4 at 32 px
    for suffix, patch, img in (("", 16, 224), ("_p16", 16, 224), ("_p8", 8, 64), ("_p4", 4, 32)):
        name = f"vit_{size}{suffix}"

        def ctor(_size=size, _patch=patch, _img=img, **kwargs) -> VisionTransformer:
            return _make(_size, _patch, _img, **kwargs)

        ctor.__name__ = ctor.__qualname__ = name
        ctor.__doc__ = (f"ViT-{size} (D={_SIZES[size][0]}, depth {_SIZES[size][1]}, {_SIZES[size][2]} heads), "
                        f"{patch}-px patches, position embeddings made for {img} px; kwargs override.")
        register_model(name)(ctor)


for _s in _SIZES:
    _register_family(_s)
