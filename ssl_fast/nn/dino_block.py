"""Drop-in for the official DINO ViT ``Block`` (facebookresearch/dino, ``vision_transformer.py``).

DINO's ``Attention`` returns ``(x, attn)``: the output and the ``[B, H, N, N]`` probabilities, and
its ``Block.forward(x, return_attention=False)`` returns those probabilities instead of the block
output when asked (``VisionTransformer.get_last_selfattention`` relies on it). A fused attention
never forms the probabilities, so the drop-in is the whole block: the normal path runs
:class:`ssl_fast.nn.Attention` (fused, nothing ``N x N`` in memory), and the probabilities are
computed only when ``return_attention=True``.
"""
from typing import Type

import torch
from torch import nn

from ssl_fast.nn.attention import Attention
from ssl_fast.reference.attention import attention_logits


class DINOBlock(nn.Module):
    """Pre-norm transformer block with DINO's constructor, attribute names and forward.

    For tokens ``x [B, N, C]``::

        y = attn(norm1(x))                     # fused softmax(scale q k^T) v, then proj
        x = x + drop_path(y)
        x = x + drop_path(mlp(norm2(x)))

    and with ``return_attention=True`` it returns ``attn_drop(softmax(scale q k^T))``
    ``[B, H, N, N]`` instead (``q``, ``k`` from ``attn.qkv(norm1(x))``), in ``x``'s dtype and with
    gradient, as DINO's block does; those probabilities are materialised on request only.
    ``attn`` is an :class:`ssl_fast.nn.Attention` whose forward returns one tensor (not DINO's
    ``(x, attn)`` pair); the parameter names (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
    ``mlp.fc1``, ``mlp.fc2``) and so the state_dict are DINO's.

    Random draws: with ``attn_drop > 0`` in training, the fused kernel's attention dropout draws
    other masks than DINO's eager dropout (same distribution); the returned probabilities use
    ``attn.attn_drop`` itself, so they get the mask DINO's block would draw from the same state.

    Args:
        dim: token width ``C`` (divisible by ``num_heads``).
        num_heads: attention heads ``H``.
        mlp_ratio: MLP hidden width over ``dim``.
        qkv_bias: bias in ``attn.qkv``.
        qk_scale: logit scale (default ``(dim // num_heads) ** -0.5``).
        drop: dropout after ``attn.proj`` and in the MLP.
        attn_drop: dropout on the attention probabilities.
        drop_path: stochastic-depth probability of both residual branches, in ``[0, 1)``.
        act_layer: MLP activation class.
        norm_layer: normalisation class for ``norm1``/``norm2``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = False,
                 qk_scale=None, drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 act_layer: Type[nn.Module] = nn.GELU, norm_layer: Type[nn.Module] = nn.LayerNorm):
        super().__init__()
        # imported here: ssl_fast.models imports ssl_fast.nn
        from ssl_fast.models.layers import DropPath, Mlp

        if not isinstance(dim, int) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim!r}) must be an int divisible by num_heads ({num_heads!r})")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio!r}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path!r}")
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        if qk_scale:
            self.attn.scale = float(qk_scale)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.mlp.act = act_layer()

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``attn_drop(softmax(scale q k^T))`` ``[B, H, N, N]`` for block input ``x [B, N, C]``
        (``norm1`` applied here), in ``x``'s dtype, differentiable. Materialises ``N x N``."""
        if x.dim() != 3:
            raise ValueError(f"x must be [B, N, C] tokens, got shape {tuple(x.shape)}")
        attn = self.attn
        h = self.norm1(x)
        b, n, _ = h.shape
        qkv = attn.qkv(h).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        probs = torch.softmax(attention_logits(q, k, scale=attn.scale), dim=-1).to(x.dtype)
        return attn.attn_drop(probs)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> torch.Tensor:
        """Args:
            x: tokens ``[B, N, C]``.
            return_attention: return the attention probabilities ``[B, H, N, N]`` instead.

        Returns:
            ``[B, N, C]``, or ``[B, H, N, N]`` with ``return_attention=True``.
        """
        if return_attention:
            return self.attention_probs(x)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))
