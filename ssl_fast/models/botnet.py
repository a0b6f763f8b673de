"""BoTNet (Srinivas et al., 2021): a ResNet whose last stage attends instead of convolving.

Every bottleneck block of the last stage has its 3x3 ``conv2`` replaced by multi-head
self-attention over the whole map with 2-D relative position logits
(:class:`ssl_fast.nn.BoTAttention`, ``pos_embed="rel"``; the position terms are computed inside
the attention kernel, never as an N x N bias):

``logits[i, j] = q_i . k_j / sqrt(d) + q_i . height_rel[yj - yi + H - 1] + q_i . width_rel[xj - xi + W - 1]``.

As in the paper and timm's ``botnet`` models (``SelfAttnBlock`` with ``BottleneckAttn``), the
first block of the stage attends at its input resolution and then average-pools 2x2 for the
stage's stride 2; its shortcut is torchvision's strided ``conv1x1 + BN``. The attention needs the
map size, so the network is built for one image size (``img_size``) and refuses others.
Names follow torchvision's ResNet (``layer4.0.conv2`` is the attention, with timm's
``BottleneckAttn`` parameter names ``qkv.weight``, ``pos_embed.height_rel``, ``pos_embed.width_rel``;
``layer4.0.pool`` the 2x2 average pool). Attention parameters are initialised as timm does
(``qkv`` truncated normal with std ``fan_in ** -0.5``, position tables truncated normal with std
``d ** -0.5``); everything else as torchvision.

Registered: ``botnet50`` (ResNet-50 layout, BoT last stage, 4 heads of 128, ``img_size`` 224:
attention at 14x14 then 7x7) and ``botnet_mini`` (small stem, one block per stage, BasicBlock
16/32/64 channels, then one BoT block with 128 channels and 4 heads of 32; ``img_size`` 32:
attention at 8x8).
"""
from typing import Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from ssl_fast.models.registry import register_model
from ssl_fast.models.resnet import (BasicBlock, Bottleneck, ResNetBase, check_backbone_args, conv1x1, conv_out,
                                    drop_path_module, drop_path_rates, residual_out)
from ssl_fast.nn import BoTAttention


class BoTBlock(nn.Module):
    """Bottleneck block with self-attention in place of the 3x3 conv.

    ``out = relu(drop_path(bn3(conv3(relu(bn2(pool(conv2(relu(bn1(conv1(x)))))))))) + shortcut(x))``
    where ``conv2`` is :class:`~ssl_fast.nn.BoTAttention` at the input map size and ``pool`` a 2x2
    average pool when ``stride == 2`` (identity otherwise).

    Args:
        inplanes: input channels.
        mid_planes: attention width (input and output of ``conv2``).
        out_planes: output channels.
        feat_size: ``(H, W)`` of the input map.
        stride: 1 or 2.
        downsample: shortcut module when the shape changes, else None (identity).
        num_heads: attention heads (``mid_planes`` must be divisible by it).
        drop_path_rate: stochastic-depth probability of the residual branch.
        device: parameter device.
        dtype: parameter dtype.
    """

    def __init__(self, inplanes: int, mid_planes: int, out_planes: int, feat_size: Tuple[int, int], stride: int = 1,
                 downsample: Optional[nn.Module] = None, num_heads: int = 4, drop_path_rate: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        dd = {"device": device, "dtype": dtype}
        self.conv1 = conv1x1(inplanes, mid_planes, **dd)
        self.bn1 = nn.BatchNorm2d(mid_planes, **dd)
        self.conv2 = BoTAttention(mid_planes, mid_planes, feat_size=feat_size, num_heads=num_heads,
                                  pos_embed="rel", **dd)
        self.pool = nn.AvgPool2d(2, 2) if stride == 2 else nn.Identity()
        self.bn2 = nn.BatchNorm2d(mid_planes, **dd)
        self.conv3 = conv1x1(mid_planes, out_planes, **dd)
        self.bn3 = nn.BatchNorm2d(out_planes, **dd)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.drop_path = drop_path_module(drop_path_rate)

    def reset_attention(self) -> None:
        """timm's ``BottleneckAttn.reset_parameters``: ``qkv`` weight truncated normal with std
        ``fan_in ** -0.5``, position tables truncated normal with std ``dim_head ** -0.5``."""
        attn = self.conv2
        nn.init.trunc_normal_(attn.qkv.weight, std=attn.qkv.weight.shape[1] ** -0.5)
        nn.init.trunc_normal_(attn.pos_embed.height_rel, std=attn.scale)
        nn.init.trunc_normal_(attn.pos_embed.width_rel, std=attn.scale)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.pool(self.conv2(out))))
        return residual_out(self, self.bn3(self.conv3(out)), x)


def _pair(size, name: str) -> Tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size)):
        raise ValueError(f"{name} must be a positive int or an (H, W) pair of them, got {size!r}")
    return int(size[0]), int(size[1])


class BoTNet(ResNetBase):
    """ResNet with a bottleneck-transformer last stage (see the module docstring).

    Args:
        block: block of the first three stages (:class:`BasicBlock` or :class:`Bottleneck`).
        layers: blocks per stage (the fourth count is the number of BoT blocks).
        img_size: input size the network is built for (int or ``(H, W)``); inputs must have it.
        num_heads: attention heads of every BoT block.
        last_stage_expansion: output channels of the BoT stage over its attention width
            (4 as in the ResNet-50 bottleneck; 1 gives a BasicBlock-like width).
        num_classes: 0 (default) for a backbone; otherwise a linear classifier ``fc``.
        small_stem: 3x3 stride-1 ``conv1`` and no max-pool.
        width: base width; stage ``i`` has ``width * 2**i`` bottleneck (or BasicBlock) channels.
        zero_init_residual: zero the last BN weight of every residual branch.
        drop_path_rate: stochastic depth of the last block, linear from 0 over all blocks.
        in_chans: input channels.
        device: parameter device.
        dtype: parameter dtype.

    Attributes:
        num_features: width of the pooled feature.
        stage_channels: output channels of ``layer1..layer4``.
        attn_size: ``(H, W)`` the first BoT block attends at (the ``layer3`` output size).
        fixed_input_size: True (only ``img_size`` inputs are accepted; a multi-crop method must
            build one network per crop size or use a single size).

    Example:
        >>> m = BoTNet(Bottleneck, (3, 4, 6, 3), img_size=224)
        >>> m.attn_size, m(torch.randn(2, 3, 224, 224)).shape
        ((14, 14), torch.Size([2, 2048]))
    """

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: Sequence[int], img_size=224,
                 num_heads: int = 4, last_stage_expansion: int = 4, num_classes: int = 0, small_stem: bool = False,
                 width: int = 64, zero_init_residual: bool = False, drop_path_rate: float = 0.0, in_chans: int = 3,
                 device=None, dtype=None):
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise TypeError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        check_backbone_args(num_classes, width, drop_path_rate, in_chans, layers)
        self.fixed_input_size = True
        self.img_size = _pair(img_size, "img_size")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
        if last_stage_expansion not in (1, 2, 4):
            raise ValueError(f"last_stage_expansion must be 1, 2 or 4, got {last_stage_expansion!r}")
        mid = width * 8
        if mid % num_heads:
            raise ValueError(f"the BoT stage width {mid} (width * 8) must be divisible by num_heads ({num_heads})")
        size = self.img_size
        if not small_stem:  # 7x7/2 conv, 3x3/2 max-pool
            size = tuple(conv_out(conv_out(s, 7, 2, 3), 3, 2, 1) for s in size)
        for _ in range(2):  # layer2, layer3 stride 2 through 3x3 padding-1 convs
            size = tuple(conv_out(s, 3, 2, 1) for s in size)
        if size[0] % 2 or size[1] % 2:
            raise ValueError(f"img_size {img_size!r} gives a {size[0]}x{size[1]} map before the BoT stage; it must be "
                             "even (the first BoT block pools it 2x2 while its shortcut strides by 2)")
        self.attn_size = size
        self.num_heads = num_heads
        self.in_chans = in_chans
        self.small_stem = bool(small_stem)
        self.drop_path_rate = float(drop_path_rate)
        dd = {"device": device, "dtype": dtype}
        self._build_stem(in_chans, width, small_stem, dd)
        rates = drop_path_rates(layers, drop_path_rate)
        inplanes, channels = width, []
        for i, (n, stride) in enumerate(zip(layers[:3], (1, 2, 2))):
            stage, inplanes = self._make_layer(block, inplanes, width * 2 ** i, n, stride, rates[i], dd)
            setattr(self, f"layer{i + 1}", stage)
            channels.append(inplanes)
        out = mid * last_stage_expansion
        downsample = nn.Sequential(conv1x1(inplanes, out, 2, **dd), nn.BatchNorm2d(out, **dd))
        blocks = [BoTBlock(inplanes, mid, out, size, 2, downsample, num_heads, rates[3][0], **dd)]
        half = (size[0] // 2, size[1] // 2)
        blocks += [BoTBlock(out, mid, out, half, 1, None, num_heads, r, **dd) for r in rates[3][1:]]
        self.layer4 = nn.Sequential(*blocks)
        channels.append(out)
        self.stage_channels = tuple(channels)
        self._finish(num_classes, zero_init_residual, dd)
        for b in self.layer4:
            b.reset_attention()

    def _check_input(self, x: torch.Tensor) -> None:
        super()._check_input(x)
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"x must be {self.img_size[0]}x{self.img_size[1]} images (img_size={self.img_size}: the "
                             f"attention is built for a {self.attn_size[0]}x{self.attn_size[1]} map), got shape "
                             f"{tuple(x.shape)}; build the model with img_size={tuple(x.shape[-2:])} for that size")


@register_model("botnet50")
def botnet50(**kwargs) -> BoTNet:
    """BoT50: ResNet-50 layout (Bottleneck, 3/4/6/3) with a BoT last stage, 4 heads (of 128),
    ``img_size`` 224 by default (attention at 14x14, then 7x7). kwargs as :class:`BoTNet`."""
    cfg = dict(img_size=224, num_heads=4)
    cfg.update(kwargs)
    return BoTNet(Bottleneck, (3, 4, 6, 3), **cfg)


@register_model("botnet_mini")
def botnet_mini(**kwargs) -> BoTNet:
    """Like ``resnet_mini`` (small stem, one block per stage, BasicBlock 16/32/64 channels) with a
    BoT last stage of 128 channels (attention width 128, 4 heads of 32); ``img_size`` 32 by
    default (attention at 8x8, then pooled to 4x4). kwargs as :class:`BoTNet`."""
    cfg = dict(img_size=32, num_heads=4, small_stem=True, width=16, last_stage_expansion=1)
    cfg.update(kwargs)
    return BoTNet(BasicBlock, (1, 1, 1, 1), **cfg)
