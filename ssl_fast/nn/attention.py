"""Drop-in for timm's ``timm.layers.Attention`` (ViT self-attention) on ssl_fast.ops.attention."""
from typing import Optional, Type

import torch
from torch import nn

from ssl_fast.ops.attention import attention, attention_probs


class Attention(nn.Module):
    """Multi-head self-attention with timm's constructor, attribute names and forward.

    ``x [B, N, C] -> qkv -> per-head q, k, v [B, H, N, head_dim] -> (q_norm, k_norm) ->
    softmax(scale q k^T (+ attn_mask)) v -> (norm) -> proj -> proj_drop``.
    State dicts load both ways with ``timm.layers.Attention`` (same parameter names), and the
    module can be passed as ``attn_layer=`` to timm models that take one.

    Args:
        dim: input channels C.
        num_heads: number of heads H.
        attn_head_dim: per-head width (default ``dim // num_heads``).
        dim_out: output channels (default ``dim``).
        qkv_bias: bias in the qkv projection.
        qk_norm: normalise q and k per head with ``norm_layer``.
        scale_norm: normalise the attention output with ``norm_layer`` before ``proj``.
        proj_bias: bias in the output projection.
        attn_drop: dropout on the attention probabilities (training only; not fused).
        proj_drop: dropout after the output projection.
        norm_layer: normalisation class for ``qk_norm``/``scale_norm``.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer: Optional[Type[nn.Module]] = None,
                 device=None, dtype=None):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if attn_head_dim is None and dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is True")
        dd = {"device": device, "dtype": dtype}
        dim_out = dim if dim_out is None else dim_out
        self.num_heads = num_heads
        self.head_dim = attn_head_dim if attn_head_dim is not None else dim // num_heads
        self.attn_dim = self.head_dim * num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self._qkv(x)
        out = attention(q, k, v, scale=self.scale, attn_mask=attn_mask,
                        dropout_p=self.attn_drop.p if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(out)))

    def attention_map(self, x: torch.Tensor, query_index=None,
                      attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention probabilities ``[B, H, len(query_index), N]`` for the input ``x [B, N, C]``
        (for example ``query_index=0``: the class token's attention, as DINO shows it).
        Computed on request only; the forward path is untouched."""
        q, k, _ = self._qkv(x)
        return attention_probs(q, k, scale=self.scale, attn_mask=attn_mask, query_index=query_index)
