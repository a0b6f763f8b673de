"""Drop-in for the SAM / ViTDet image-encoder attention (timm ``vision_transformer_sam.Attention``)."""
from typing import Optional, Sequence, Type

import torch
from torch import nn
from torch.nn import functional as F

from ssl_fast.ops.attention import DecomposedRelPos, attention, attention_probs


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """Resize a ``[L, D]`` relative-position table to ``[length, D]`` by linear interpolation
    along ``L`` (``align_corners=False``), the resizing SAM applies when a table was trained for
    another grid. Returns ``table`` itself when the length already matches. Differentiable."""
    if table.shape[0] == length:
        return table
    return F.interpolate(table.t().unsqueeze(0), size=length, mode="linear").squeeze(0).t()


class RelPosAttention(nn.Module):
    """Multi-head self-attention over a ``[B, H, W, C]`` grid with SAM's decomposed relative position.

    ``logits[i, j] = scale * q_i . k_j + q_i . Rh[yi, yj] + q_i . Rw[xi, xj]`` (``q`` after
    ``q_norm``, unscaled in the position terms), with ``Rh[y, y'] = rel_pos_h[y - y' + H - 1]``
    and ``Rw`` likewise; the position terms are computed inside the attention kernel
    (:class:`ssl_fast.ops.DecomposedRelPos`), so no ``[N, N]`` bias is built. When the input
    grid ``(H, W)`` differs from the grid the tables were made for, the tables are resized by
    linear interpolation to ``2 * H - 1`` / ``2 * W - 1`` rows on the fly (as SAM does). Loading a
    state dict whose tables have another length resizes them the same way.

    Names, creation order and attributes match timm's ``vision_transformer_sam.Attention``
    (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``proj``, ``proj_drop``, ``rel_pos_h``,
    ``rel_pos_w``, ``use_rel_pos``, ``rope``, ``fused_attn``), so state dicts load both ways and the
    same seed gives the same weights. Rotary position embedding (timm's ``rope=``) is not served.

    Args:
        dim: channels ``C`` (divisible by ``num_heads``).
        num_heads: number of heads.
        qkv_bias: bias in the qkv projection.
        qk_norm: normalise q and k per head with ``norm_layer``.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
        norm_layer: normalisation class for ``qk_norm`` (called with the width and ``device``/``dtype``).
        use_rel_pos: add the decomposed relative-position terms.
        input_size: ``(H, W)`` grid the tables are sized for (required with ``use_rel_pos``).
        rope: not supported; anything but ``None`` raises ``ValueError``.
        device: parameter device.
        dtype: parameter dtype.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Type[nn.Module] = nn.LayerNorm, use_rel_pos: bool = False,
                 input_size: Optional[Sequence[int]] = None, rope: Optional[nn.Module] = None,
                 device=None, dtype=None):
        super().__init__()
        if rope is not None:
            raise ValueError("rope (rotary position embedding) is not supported by RelPosAttention; "
                             "pass rope=None")
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if use_rel_pos and (input_size is None or len(input_size) != 2):
            raise ValueError(f"use_rel_pos=True needs input_size=(H, W), got {input_size!r}")
        dd = {"device": device, "dtype": dtype}
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim, **dd))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim, **dd))
        self.rope = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if self.use_rel_pos:
            for name in ("rel_pos_h", "rel_pos_w"):
                key = prefix + name
                own = getattr(self, name)
                t = state_dict.get(key)
                if (isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == own.shape[1]
                        and t.shape[0] != own.shape[0]):
                    state_dict[key] = resize_rel_pos(t.to(own.dtype), own.shape[0])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _qkv(self, x: torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"x must be [B, H, W, C], got shape {tuple(x.shape)}")
        b, h, w, _ = x.shape
        qkv = self.qkv(x.reshape(b, h * w, -1)).reshape(b, h * w, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        rel_pos = None
        if self.use_rel_pos:
            rel_pos = DecomposedRelPos(resize_rel_pos(self.rel_pos_h, 2 * h - 1),
                                       resize_rel_pos(self.rel_pos_w, 2 * w - 1), (h, w), (h, w))
        return self.q_norm(q), self.k_norm(k), v, rel_pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over the grid.

        Args:
            x: ``[B, H, W, C]``.

        Returns:
            ``[B, H, W, C]``.
        """
        q, k, v, rel_pos = self._qkv(x)
        b, h, w, _ = x.shape
        out = attention(q, k, v, scale=self.scale, rel_pos=rel_pos,
                        dropout_p=self.attn_drop.p if self.training else 0.0)
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, -1))
        return self.proj_drop(out).reshape(b, h, w, -1)

    def attention_map(self, x: torch.Tensor, query_index=None) -> torch.Tensor:
        """Attention probabilities ``[B, heads, len(query_index), H * W]`` (float32, no gradient)
        for ``x [B, H, W, C]``; queries are numbered row-major. Computed on request only."""
        with torch.no_grad():
            q, k, _, rel_pos = self._qkv(x)
            return attention_probs(q, k, scale=self.scale, rel_pos=rel_pos, query_index=query_index)
