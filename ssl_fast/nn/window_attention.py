"""Drop-in for timm's Swin ``WindowAttention`` with the relative-position bias computed in-kernel."""
from typing import Optional, Tuple, Union

import torch
from torch import nn

from ssl_fast.ops.attention import RelPosTable, attention, attention_probs
from ssl_fast.reference.attention import window_relative_index


def _to_pair(value, name: str) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in value)):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return int(value[0]), int(value[1])


class WindowAttention(nn.Module):
    """Window self-attention with Swin's relative-position bias (timm ``WindowAttention`` drop-in).

    For each window of ``N = Wh * Ww`` tokens (row-major), head ``h``:
    ``out = softmax(scale * q k^T + B_h (+ mask[b % nW])) v`` with
    ``B_h[i, j] = relative_position_bias_table[relative_position_index[i, j], h]``. The bias is
    gathered inside the attention kernel (:class:`ssl_fast.ops.RelPosTable`): no ``[H, N, N]``
    tensor is built. Names match timm (``relative_position_bias_table`` parameter, non-persistent
    ``relative_position_index`` buffer, ``qkv``, ``attn_drop``, ``proj``, ``proj_drop``,
    ``softmax``), so state dicts load both ways. The kernel derives the index from
    ``window_size``; the buffer is kept for compatibility and must hold Swin's standard index.

    Args:
        dim: input channels ``C``.
        num_heads: number of heads ``H``.
        head_dim: per-head width (default ``dim // num_heads``).
        window_size: ``Wh`` or ``(Wh, Ww)``.
        qkv_bias: bias in the qkv projection.
        attn_drop: dropout on the attention probabilities (training only).
        proj_drop: dropout after the output projection.
        device: parameter device.
        dtype: parameter dtype.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None,
                 window_size: Union[int, Tuple[int, int]] = 7, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, device=None, dtype=None):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if head_dim is None and dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) when head_dim is not given")
        dd = {"device": device, "dtype": dtype}
        self.dim = dim
        self.window_size = _to_pair(window_size, "window_size")
        win_h, win_w = self.window_size
        self.window_area = win_h * win_w
        self.num_heads = num_heads
        self.head_dim = head_dim or dim // num_heads
        attn_dim = self.head_dim * num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = True
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * win_h - 1) * (2 * win_w - 1), num_heads, **dd))
        self.register_buffer("relative_position_index",
                             window_relative_index(self.window_size, device=device), persistent=False)
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        if not self.relative_position_bias_table.is_meta:
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.softmax = nn.Softmax(dim=-1)

    def _qkv(self, x: torch.Tensor):
        b, n, _ = x.shape
        if n != self.window_area:
            raise ValueError(f"x has {n} tokens per window but the window {self.window_size} has "
                             f"{self.window_area}")
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention inside each window.

        Args:
            x: ``[B * nW, N, C]`` windows of ``N = Wh * Ww`` tokens.
            mask: optional additive ``[nW, N, N]`` shifted-window mask (0 / large negative);
                window row ``b`` uses ``mask[b % nW]``.

        Returns:
            ``[B * nW, N, C]``.
        """
        b, n, _ = x.shape
        q, k, v = self._qkv(x)
        out = attention(q, k, v, scale=self.scale,
                        rel_pos=RelPosTable(self.relative_position_bias_table, self.window_size, mask),
                        dropout_p=self.attn_drop.p if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(out))

    def attention_map(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                      query_index=None) -> torch.Tensor:
        """Attention probabilities ``[B * nW, H, len(query_index), N]`` (float32, no gradient) for
        ``x [B * nW, N, C]``; computed on request only, the forward path is untouched."""
        with torch.no_grad():
            q, k, _ = self._qkv(x)
            return attention_probs(q, k, scale=self.scale,
                                   rel_pos=RelPosTable(self.relative_position_bias_table, self.window_size, mask),
                                   query_index=query_index)
