"""Drop-in for timm's Swin ``WindowAttention`` with the relative-position bias computed in-kernel."""
import math
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



def _trunc_normal_(tensor: torch.Tensor, std: float, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """Fill ``tensor`` in place from ``N(0, std^2)`` truncated to ``[a, b]`` by the inverse-CDF
    method timm's ``trunc_normal_`` uses (one uniform draw per element), so the same seed gives
    timm's values (torch >= 2.14's ``nn.init.trunc_normal_`` samples by rejection instead)."""
    if tensor.is_meta:
        return tensor
    def cdf(v):
        return (1.0 + math.erf(v / math.sqrt(2.0))) / 2.0
    lo, hi = cdf(a / std), cdf(b / std)
    with torch.no_grad():
        tensor.uniform_(2 * lo - 1, 2 * hi - 1)
        tensor.erfinv_()
        tensor.mul_(std * math.sqrt(2.0))
        return tensor.clamp_(min=a, max=b)


def _resize_positions(src: int, dst: int):
    """Source sample positions for one axis of :func:`resize_window_table`: BEiT's geometric
    progression ``0, +-1, +-(1 + r), +-(1 + r + r^2), ...`` with ``r`` found by bisection so that the
    ``src // 2`` outermost source rows reach about ``dst // 2``."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        r = (left + right) / 2.0
        reach = (1.0 - r ** (src // 2)) / (1.0 - r)  # 1 + r + ... + r^(src//2 - 1)
        if reach > dst // 2:
            right = r
        else:
            left = r
    dis, cur = [], 1
    for i in range(src // 2):
        dis.append(cur)
        cur += r ** (i + 1)
    return [-d for d in reversed(dis)] + [0] + dis


def _interp_2d(points, values: torch.Tensor, targets) -> torch.Tensor:
    """Bilinear interpolation of ``values [C, len(py), len(px)]`` given on the (uneven) grid
    ``points = (py, px)`` at the same-shape coordinate tensors ``targets = (ty, tx)``; targets
    outside the grid take the edge value. Returns ``[C, *ty.shape]``. The arithmetic is
    timm's ``RegularGridInterpolator`` (``timm.layers.interpolate``), done for all C at once."""
    idxs, dists, overall = [], [], []
    for p, x in zip(points, targets):
        right = torch.bucketize(x, p)
        right[right >= p.shape[0]] = p.shape[0] - 1
        left = (right - 1).clamp(0, p.shape[0] - 1)
        d_left = x - p[left]
        d_right = p[right] - x
        d_left[d_left < 0] = 0.0
        d_right[d_right < 0] = 0.0
        both_zero = (d_left == 0) & (d_right == 0)
        d_left[both_zero] = d_right[both_zero] = 1.0
        idxs.append((left, right))
        dists.append((d_left, d_right))
        overall.append(d_left + d_right)
    numerator = 0.0
    for cy in (0, 1):
        for cx in (0, 1):
            weight = torch.prod(torch.stack([dists[0][1 - cy], dists[1][1 - cx]]), dim=0)
            numerator = numerator + values[:, idxs[0][cy], idxs[1][cx]] * weight
    return numerator / torch.prod(torch.stack(overall), dim=0)


def resize_window_table(table: torch.Tensor, new_window_size: Tuple[int, int],
                        old_window_size: Tuple[int, int]) -> torch.Tensor:
    """Resize a Swin relative-position table ``[(2Wh-1)(2Ww-1), H]`` made for ``old_window_size``
    to ``new_window_size``, as timm's ``set_window_size`` does (``resize_rel_pos_bias_table``, the
    BEiT fine-tuning resize): each head's ``(2Wh-1) x (2Ww-1)`` grid of offsets is sampled at
    geometrically spaced source positions (:func:`_resize_positions`) and bilinearly interpolated
    to the integer offsets of the new window, in float32 on the CPU, then cast back to the table's
    dtype and device. (timm's optional SciPy bicubic path, ``TIMM_USE_SCIPY_INTERP=1``, is not
    followed.) Returns ``table`` itself when the size is unchanged; no gradient.
    """
    src = (2 * old_window_size[0] - 1, 2 * old_window_size[1] - 1)
    dst = (2 * new_window_size[0] - 1, 2 * new_window_size[1] - 1)
    if table.dim() != 2 or table.shape[0] != src[0] * src[1]:
        raise ValueError(f"table must be [(2Wh-1)(2Ww-1), num_heads] = [{src[0] * src[1]}, H] for "
                         f"old_window_size {tuple(old_window_size)}, got shape {tuple(table.shape)}")
    if src == dst:
        return table
    heads = table.shape[1]
    if table.is_meta:
        return table.new_empty(dst[0] * dst[1], heads)
    with torch.no_grad():
        points = (torch.tensor(_resize_positions(src[0], dst[0])), torch.tensor(_resize_positions(src[1], dst[1])))
        ty, tx = dst[0] // 2.0, dst[1] // 2.0
        targets = [t.contiguous() for t in torch.meshgrid(torch.arange(-ty, ty + 0.1, 1.0),
                                                          torch.arange(-tx, tx + 0.1, 1.0), indexing="ij")]
        values = table.detach().t().reshape(heads, src[0], src[1]).float().cpu()
        out = _interp_2d(points, values, targets)  # [H, dst_h, dst_w]
        return out.reshape(heads, -1).t().contiguous().to(device=table.device, dtype=table.dtype)


class WindowAttention(nn.Module):
    """Window self-attention with Swin's relative-position bias (timm ``WindowAttention`` drop-in).

    For each window of ``N = Wh * Ww`` tokens (row-major), head ``h``:
    ``out = softmax(scale * q k^T + B_h (+ mask[b % nW])) v`` with
    ``B_h[i, j] = relative_position_bias_table[relative_position_index[i, j], h]`` and
    ``scale = head_dim ** -0.5``. The bias is gathered inside the attention kernel
    (:class:`ssl_fast.ops.RelPosTable`): no ``[H, N, N]`` tensor is built. Names, creation order
    and methods match timm (``relative_position_bias_table`` parameter, non-persistent
    ``relative_position_index`` buffer, ``qkv``, ``attn_drop``, ``proj``, ``proj_drop``,
    ``softmax``; ``reset_parameters``, ``set_window_size``, ``init_non_persistent_buffers``,
    ``fused_attn``), so state dicts load both ways, the same seed gives the same weights, and
    timm's ``SwinTransformer.set_input_size(window_size=...)`` works on a patched model. The
    kernel derives the index from ``window_size``; the buffer is kept for compatibility and must
    hold Swin's standard index.

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
                             torch.empty(self.window_area, self.window_area, device=device, dtype=torch.long),
                             persistent=False)
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.softmax = nn.Softmax(dim=-1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw ``relative_position_bias_table`` from a truncated normal (std 0.02, as timm) and
        fill ``relative_position_index``."""
        _trunc_normal_(self.relative_position_bias_table, std=0.02)
        self._init_buffers()

    def _init_buffers(self) -> None:
        index = self.relative_position_index
        if not index.is_meta:
            index.copy_(window_relative_index(self.window_size, device=index.device))

    def init_non_persistent_buffers(self) -> None:
        """Recompute ``relative_position_index`` (timm calls this after loading or moving a model)."""
        self._init_buffers()

    def set_window_size(self, window_size: Union[int, Tuple[int, int]]) -> None:
        """Change the window to ``window_size`` (``Wh`` or ``(Wh, Ww)``), as timm's
        ``WindowAttention.set_window_size``: the bias table becomes a new parameter resized by
        :func:`resize_window_table` (``requires_grad`` kept) and the index is rebuilt. Nothing
        happens when the size is unchanged."""
        window_size = _to_pair(window_size, "window_size")
        if window_size == self.window_size:
            return
        old = self.window_size
        table = self.relative_position_bias_table
        self.window_size = window_size
        self.window_area = window_size[0] * window_size[1]
        with torch.no_grad():
            self.relative_position_bias_table = nn.Parameter(resize_window_table(table, window_size, old),
                                                             requires_grad=table.requires_grad)
            self.register_buffer("relative_position_index",
                                 window_relative_index(window_size, device=table.device), persistent=False)

    def _get_rel_pos_bias(self) -> torch.Tensor:
        """The dense bias ``[1, H, N, N]`` (timm's helper; the forward never builds it)."""
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.reshape(-1)].reshape(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def _qkv(self, x: torch.Tensor):
        if x.dim() != 3:
            raise ValueError(f"x must be [B * nW, N, C] windows, got shape {tuple(x.shape)}")
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
