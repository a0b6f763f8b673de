"""Drop-in for timm's ``timm.layers.Attention`` (ViT self-attention) on ssl_fast.ops.attention."""
from typing import Optional, Type

import torch
from torch import nn

from ssl_fast.ops.attention import attention, attention_probs


class Attention(nn.Module):
    """Multi-head self-attention with timm's constructor, attribute names and forward.

    For ``x [B, N, C]`` with ``H`` heads of width ``d`` (``A = H * d``)::

        q, k, v = split(qkv(x))                       # each [B, H, N, d]
        q, k    = q_norm(q), k_norm(k)
        o       = softmax(scale * q k^T + M) v        # [B, H, N, d], heads merged to [B, N, A]
        o       = norm(o) * sigmoid(gate(x))          # gate only when gated=True
        out     = proj_drop(proj(o))                  # [B, N, dim_out]

    ``M`` is ``attn_mask`` (boolean: ``True`` = attend, or additive float; broadcastable to
    ``[B, H, N, N]``), or the causal mask (``M[i, j] = -inf`` for ``j > i``) when ``is_causal=True``.
    ``scale = d ** -0.5``. Parameter and submodule names, their creation order and the
    ``fused_attn`` attribute are timm's, so state dicts load both ways, the same seed gives the same
    initial weights, and the class can be passed as ``attn_layer=`` to timm models
    (``timm.create_model("vit_small_patch16_224", attn_layer=ssl_fast.nn.Attention)``).
    ``fused_attn`` is kept for code that reads it; ssl_fast's fused op runs either way.

    Args:
        dim: input channels ``C``.
        num_heads: number of heads ``H``.
        attn_head_dim: per-head width ``d`` (default ``dim // num_heads``).
        dim_out: output channels (default ``dim``).
        qkv_bias: bias in the qkv projection (and in the gate).
        qk_norm: normalise q and k per head with ``norm_layer``.
        scale_norm: normalise the attention output with ``norm_layer`` before ``proj``.
        proj_bias: bias in the output projection.
        gated: multiply the attention output by ``sigmoid(gate(x))``, ``gate`` an
            ``nn.Linear(dim, A)`` (timm's ``gated=True``).
        attn_drop: dropout on the attention probabilities (training only; not fused).
        proj_drop: dropout after the output projection.
        norm_layer: normalisation class for ``qk_norm``/``scale_norm`` (called with the width and
            ``device``/``dtype``).
        device: parameter device.
        dtype: parameter dtype.
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, gated: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Optional[Type[nn.Module]] = None, device=None, dtype=None):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if attn_head_dim is None and dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is True")
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        self.num_heads = num_heads
        self.head_dim = attn_head_dim if attn_head_dim is not None else dim // num_heads
        self.attn_dim = self.head_dim * num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = True
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor):
        if x.dim() != 3:
            raise ValueError(f"x must be [B, N, C] tokens, got shape {tuple(x.shape)}")
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    @staticmethod
    def _mask(x: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool) -> Optional[torch.Tensor]:
        """``attn_mask``, or the boolean causal mask ``[N, N]`` (``True`` on and below the diagonal)."""
        if not is_causal:
            return attn_mask
        if attn_mask is not None:
            raise ValueError("attn_mask and is_causal=True were both given; pass one of them "
                             "(torch's scaled_dot_product_attention, timm's default path, refuses both)")
        n = x.shape[1]
        return torch.ones(n, n, dtype=torch.bool, device=x.device).tril()

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """Self-attention over the tokens.

        Args:
            x: ``[B, N, C]`` tokens.
            attn_mask: optional boolean (``True`` = attend) or additive float mask broadcastable to
                ``[B, H, N, N]``.
            is_causal: attend to keys ``j <= i`` only (not together with ``attn_mask``).

        Returns:
            ``[B, N, dim_out]``.
        """
        q, k, v = self._qkv(x)
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        out = attention(q, k, v, scale=self.scale, attn_mask=self._mask(x, attn_mask, is_causal),
                        dropout_p=self.attn_drop.p if self.training else 0.0)
        out = self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))

    def attention_map(self, x: torch.Tensor, query_index=None, attn_mask: Optional[torch.Tensor] = None,
                      is_causal: bool = False) -> torch.Tensor:
        """Attention probabilities ``[B, H, len(query_index), N]`` (float32, no gradient) for the
        input ``x [B, N, C]`` (for example ``query_index=0``: the class token's attention, as DINO
        shows it). Computed on request only; the forward path is untouched."""
        with torch.no_grad():
            q, k, _ = self._qkv(x)
            return attention_probs(q, k, scale=self.scale, attn_mask=self._mask(x, attn_mask, is_causal),
                                   query_index=query_index)
