"""BoTNet multi-head self-attention over a feature map (relative or factorised absolute position).

Math, for a ``[B, C, H, W]`` map flattened row-major to ``N = H * W`` positions ``(y, x)``, head
``h`` with query/key width ``d`` and ``s = d ** -0.5``:

- ``pos_embed="rel"`` (BoTNet, timm ``BottleneckAttn``):
  ``logits[i, j] = s q_i . k_j + q_i . height_rel[yj - yi + H - 1] + q_i . width_rel[xj - xi + W - 1]``;
  this is :class:`ssl_fast.ops.DecomposedRelPos` with the tables reversed along their length
  (the op indexes by ``yi - yj``), so the position terms are computed inside the kernel.
- ``pos_embed="abs"`` (BoTNet's ``AbsPosEmb`` as CARE uses it):
  ``logits[i, j] = s q_i . k_j + q_i . (height[yj] + width[xj])``
  ``= s q_i . (k_j + (height[yj] + width[xj]) / s)``: the embedding is folded into the keys.

With ``scale_pos_embed=True`` the position terms are scaled by ``s`` as well
(``s (q_i . k_j + q_i . r_ij)``), the convention of implementations that scale q before both terms.
"""
from typing import Optional, Sequence

import torch
from torch import nn

from ssl_fast.ops.attention import DecomposedRelPos, attention, attention_probs


class RelPosEmbed2d(nn.Module):
    """BoTNet relative-position tables ``height_rel [2H - 1, d]``, ``width_rel [2W - 1, d]``
    (row ``r`` holds the embedding of key-minus-query offset ``r - (H - 1)``)."""

    def __init__(self, feat_size: Sequence[int], dim_head: int, device=None, dtype=None):
        super().__init__()
        self.height, self.width = int(feat_size[0]), int(feat_size[1])
        self.dim_head = dim_head
        std = dim_head ** -0.5
        self.height_rel = nn.Parameter(torch.randn(2 * self.height - 1, dim_head, device=device, dtype=dtype) * std)
        self.width_rel = nn.Parameter(torch.randn(2 * self.width - 1, dim_head, device=device, dtype=dtype) * std)

    def forward(self, scale: float = 1.0) -> DecomposedRelPos:
        """The op's :class:`DecomposedRelPos` (tables reversed to query-minus-key order, times ``scale``)."""
        rel_h, rel_w = self.height_rel.flip(0), self.width_rel.flip(0)
        if scale != 1.0:
            rel_h, rel_w = rel_h * scale, rel_w * scale
        size = (self.height, self.width)
        return DecomposedRelPos(rel_h, rel_w, size, size)


class AbsPosEmbed2d(nn.Module):
    """Factorised absolute embedding ``height [H, d]``, ``width [W, d]``: position ``(y, x)`` has
    ``height[y] + width[x]``."""

    def __init__(self, feat_size: Sequence[int], dim_head: int, device=None, dtype=None):
        super().__init__()
        self.height_size, self.width_size = int(feat_size[0]), int(feat_size[1])
        self.dim_head = dim_head
        std = dim_head ** -0.5
        self.height = nn.Parameter(torch.randn(self.height_size, dim_head, device=device, dtype=dtype) * std)
        self.width = nn.Parameter(torch.randn(self.width_size, dim_head, device=device, dtype=dtype) * std)

    def forward(self) -> torch.Tensor:
        """``[H * W, d]`` embedding of every position, row-major."""
        return (self.height[:, None, :] + self.width[None, :, :]).reshape(-1, self.dim_head)


class BoTAttention(nn.Module):
    """BoTNet MHSA over a ``[B, C, H, W]`` map (see the module docstring for the math).

    ``x -> qkv`` (1x1 conv; channels ``[q heads | k heads | v heads]``, head-major inside each)
    ``-> attention per head -> [B, dim_out, H, W]`` (heads concatenated, no output projection,
    as in BoTNet). With ``pos_embed="rel"`` the parameter names match timm's ``BottleneckAttn``
    (``qkv.weight``, ``pos_embed.height_rel``, ``pos_embed.width_rel``) for ``stride=1``.

    Args:
        dim: input channels ``C``.
        dim_out: output channels (default ``dim``; divisible by ``num_heads``); the value head
            width is ``dim_out // num_heads``.
        feat_size: ``(H, W)`` of the map (or one int for a square map); inputs must have it.
        num_heads: number of heads.
        dim_head: query/key head width (default ``dim_out // num_heads``).
        pos_embed: ``"rel"`` (relative logits) or ``"abs"`` (factorised absolute logits).
        qkv_bias: bias in the qkv 1x1 convolution.
        scale_pos_embed: scale the position logits by ``dim_head ** -0.5`` too.
        device: parameter device.
        dtype: parameter dtype.
    """

    def __init__(self, dim: int, dim_out: Optional[int] = None, feat_size=None, num_heads: int = 4,
                 dim_head: Optional[int] = None, pos_embed: str = "rel", qkv_bias: bool = False,
                 scale_pos_embed: bool = False, device=None, dtype=None):
        super().__init__()
        dim_out = dim if dim_out is None else dim_out
        if feat_size is None:
            raise ValueError("feat_size=(H, W) is required (the position tables are sized for it)")
        if isinstance(feat_size, int):
            feat_size = (feat_size, feat_size)
        if len(feat_size) != 2 or min(feat_size) < 1:
            raise ValueError(f"feat_size must be (H, W) with H, W >= 1, got {feat_size!r}")
        if num_heads < 1 or dim_out % num_heads != 0:
            raise ValueError(f"dim_out ({dim_out}) must be divisible by num_heads ({num_heads})")
        if pos_embed not in ("rel", "abs"):
            raise ValueError(f"pos_embed must be 'rel' or 'abs', got {pos_embed!r}")
        dd = {"device": device, "dtype": dtype}
        self.feat_size = (int(feat_size[0]), int(feat_size[1]))
        self.num_heads = num_heads
        self.dim_out = dim_out
        self.dim_head_qk = dim_head if dim_head is not None else dim_out // num_heads
        self.dim_head_v = dim_out // num_heads
        self.dim_out_qk = num_heads * self.dim_head_qk
        self.scale = self.dim_head_qk ** -0.5
        self.pos_embed_kind = pos_embed
        self.scale_pos_embed = scale_pos_embed
        self.qkv = nn.Conv2d(dim, 2 * self.dim_out_qk + dim_out, 1, bias=qkv_bias, **dd)
        embed = RelPosEmbed2d if pos_embed == "rel" else AbsPosEmbed2d
        self.pos_embed = embed(self.feat_size, self.dim_head_qk, **dd)

    def _qkv(self, x: torch.Tensor):
        if x.dim() != 4 or tuple(x.shape[2:]) != self.feat_size:
            raise ValueError(f"x must be [B, C, {self.feat_size[0]}, {self.feat_size[1]}] (feat_size), "
                             f"got shape {tuple(x.shape)}")
        b = x.shape[0]
        n = self.feat_size[0] * self.feat_size[1]
        q, k, v = torch.split(self.qkv(x), [self.dim_out_qk, self.dim_out_qk, self.dim_out], dim=1)
        q = q.reshape(b, self.num_heads, self.dim_head_qk, n).transpose(-1, -2)
        k = k.reshape(b, self.num_heads, self.dim_head_qk, n).transpose(-1, -2)
        v = v.reshape(b, self.num_heads, self.dim_head_v, n).transpose(-1, -2)
        rel_pos = None
        if self.pos_embed_kind == "rel":
            rel_pos = self.pos_embed(self.scale if self.scale_pos_embed else 1.0)
        else:
            emb = self.pos_embed()  # [N, d]
            k = k + (emb if self.scale_pos_embed else emb / self.scale).to(k.dtype)
        return q, k, v, rel_pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over the map.

        Args:
            x: ``[B, dim, H, W]`` with ``(H, W) == feat_size``.

        Returns:
            ``[B, dim_out, H, W]``.
        """
        b = x.shape[0]
        q, k, v, rel_pos = self._qkv(x)
        out = attention(q, k, v, scale=self.scale, rel_pos=rel_pos)  # [B, heads, N, dv]
        return out.transpose(-1, -2).reshape(b, self.dim_out, *self.feat_size)

    def attention_map(self, x: torch.Tensor, query_index=None) -> torch.Tensor:
        """Attention probabilities ``[B, heads, len(query_index), H * W]`` (float32, no gradient);
        queries numbered row-major. Computed on request only."""
        with torch.no_grad():
            q, k, _, rel_pos = self._qkv(x)
            return attention_probs(q, k, scale=self.scale, rel_pos=rel_pos, query_index=query_index)
