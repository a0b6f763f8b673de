"""ResNet-18/34/50 backbones with torchvision's module and parameter names.

The networks are torchvision's ``resnet18/34/50`` (ResNet v1.5: the stride of a bottleneck block
sits on its 3x3 conv): ``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc``, blocks with
``conv1, bn1, conv2, bn2, (conv3, bn3), downsample.0/.1``, so a torchvision state dict loads
unchanged and, in eval mode, gives torchvision's outputs. Additions, all off by default or
name-neutral:

- ``num_classes=0`` (the default, for SSL): ``fc`` is ``nn.Identity()`` and ``forward`` returns
  the pooled feature ``[B, num_features]`` (timm's convention).
- ``small_stem=True``: ``conv1`` is 3x3 stride 1 padding 1 and ``maxpool`` is ``nn.Identity()``
  (the CIFAR recipe of SimCLR and solo-learn).
- ``drop_path_rate``: stochastic depth on each block's residual branch (after its last BN, before
  the addition), the rate growing linearly from 0 at the first block to ``drop_path_rate`` at the
  last, as timm's ResNet does it. At 0 the forward is exactly torchvision's.

Models registered here: ``resnet18/34/50`` (ImageNet stem), ``resnet18/34/50_cifar`` (small stem)
and ``resnet_mini`` (small stem, BasicBlock, one block per stage, 16/32/64/128 channels: the size
for the embedded 8x8..32x32 digits on a CPU).
"""
import math
from typing import List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from ssl_fast.models.layers import DropPath
from ssl_fast.models.registry import register_model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, device=None, dtype=None) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (torchvision's ``conv3x3``)."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False, device=device, dtype=dtype)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1, device=None, dtype=None) -> nn.Conv2d:
    """1x1 convolution, no bias (torchvision's ``conv1x1``)."""
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False, device=device, dtype=dtype)


def drop_path_module(rate: float) -> Optional[nn.Module]:
    return DropPath(rate) if rate > 0.0 else None


def residual_out(block: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The end of every residual block here: ``relu(drop_path(out) + shortcut(x))``, with
    ``block``'s ``drop_path`` and ``downsample`` (each None for identity) and its ``relu``."""
    if block.drop_path is not None:
        out = block.drop_path(out)
    out += x if block.downsample is None else block.downsample(x)
    return block.relu(out)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; ``relu(drop_path(bn2(conv2(relu(bn1(conv1(x)))))) + shortcut(x))``.

    Args:
        inplanes: input channels.
        planes: output channels (``expansion = 1``).
        stride: stride of ``conv1`` (and of ``downsample``).
        downsample: shortcut module (``conv1x1 + BN``) when the shape changes, else None (identity).
        drop_path_rate: stochastic-depth probability of the residual branch.
        device: parameter device.
        dtype: parameter dtype.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 drop_path_rate: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = conv3x3(inplanes, planes, stride, **dd)
        self.bn1 = nn.BatchNorm2d(planes, **dd)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, **dd)
        self.bn2 = nn.BatchNorm2d(planes, **dd)
        self.downsample = downsample
        self.stride = stride
        self.drop_path = drop_path_module(drop_path_rate)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return residual_out(self, self.bn2(self.conv2(out)), x)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 (x4 channels) with BN, torchvision's ResNet v1.5 bottleneck.

    ``relu(drop_path(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))))) + shortcut(x))``.

    Args:
        inplanes: input channels.
        planes: bottleneck width; output channels are ``planes * 4``.
        stride: stride of ``conv2`` (and of ``downsample``).
        downsample: shortcut module when the shape changes, else None (identity).
        drop_path_rate: stochastic-depth probability of the residual branch.
        device: parameter device.
        dtype: parameter dtype.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 drop_path_rate: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = conv1x1(inplanes, planes, **dd)
        self.bn1 = nn.BatchNorm2d(planes, **dd)
        self.conv2 = conv3x3(planes, planes, stride, **dd)
        self.bn2 = nn.BatchNorm2d(planes, **dd)
        self.conv3 = conv1x1(planes, planes * self.expansion, **dd)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, **dd)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.drop_path = drop_path_module(drop_path_rate)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return residual_out(self, self.bn3(self.conv3(out)), x)


def check_backbone_args(num_classes, width, drop_path_rate, in_chans, layers) -> None:
    """Argument checks shared by the ResNet-family constructors (ValueError/TypeError naming the argument)."""
    for name, value, low in (("num_classes", num_classes, 0), ("width", width, 1), ("in_chans", in_chans, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, (int, float)):
        raise TypeError(f"drop_path_rate must be a float, got {type(drop_path_rate).__name__}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    if len(layers) != 4 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers):
        raise ValueError(f"layers must be 4 block counts >= 1, got {tuple(layers)!r}")


def drop_path_rates(layers: Sequence[int], drop_path_rate: float) -> List[List[float]]:
    """Per-block stochastic-depth rates, linear in the global block index from 0 to ``drop_path_rate``
    (timm's ResNet rule ``rate * idx / (n_blocks - 1)``), grouped by stage."""
    total = sum(layers)
    rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    out, start = [], 0
    for n in layers:
        out.append(rates[start:start + n])
        start += n
    return out


class ResNetBase(nn.Module):
    """Stem, pooling, head and the forward methods shared by :class:`ResNet` and the BoTNet.

    Subclasses build ``layer1..layer4`` and set ``stage_channels``; then call :meth:`_finish`.
    ``fixed_input_size`` (timm's name for it) says whether the network takes one image size only.
    """

    fixed_input_size = False

    def _build_stem(self, in_chans: int, width: int, small_stem: bool, dd: dict) -> None:
        if small_stem:
            self.conv1 = nn.Conv2d(in_chans, width, 3, stride=1, padding=1, bias=False, **dd)
        else:
            self.conv1 = nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(width, **dd)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def _make_layer(self, block: Type[nn.Module], inplanes: int, planes: int, blocks: int, stride: int,
                    rates: Sequence[float], dd: dict) -> Tuple[nn.Sequential, int]:
        """torchvision's ``_make_layer``: the first block strides and gets a ``conv1x1 + BN``
        shortcut when the shape changes. Returns the stage and its output channels."""
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(inplanes, planes * block.expansion, stride, **dd),
                                       nn.BatchNorm2d(planes * block.expansion, **dd))
        layers = [block(inplanes, planes, stride, downsample, rates[0], **dd)]
        inplanes = planes * block.expansion
        for i in range(1, blocks):
            layers.append(block(inplanes, planes, drop_path_rate=rates[i], **dd))
        return nn.Sequential(*layers), inplanes

    def _finish(self, num_classes: int, zero_init_residual: bool, dd: dict) -> None:
        """Pool, head and torchvision's initialisation (kaiming-normal fan-out convs, BN 1/0,
        optionally the last BN of every residual branch zeroed)."""
        self.num_features = self.stage_channels[-1]
        self.num_classes = num_classes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if hasattr(m, "zero_init_last") and m is not self:
                    m.zero_init_last()

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be images [B, {self.in_chans}, H, W], got {got}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"x must have {self.in_chans} channels (in_chans), got shape {tuple(x.shape)}")

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def feature_maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Outputs of the four stages.

        Args:
            x: ``[B, in_chans, H, W]`` images.

        Returns:
            ``[layer1, layer2, layer3, layer4]`` maps, ``[B, stage_channels[i], H_i, W_i]`` (strides
            4/8/16/32 with the ImageNet stem, 1/2/4/8 with the small stem).
        """
        x = self._stem(x)
        maps = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            maps.append(x)
        return maps

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Globally average-pooled last map ``[B, num_features]``."""
        x = self._stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``fc(features(x))``: ``[B, num_features]`` with ``num_classes=0``, else ``[B, num_classes]``."""
        return self.fc(self.features(x))


class ResNet(ResNetBase):
    """torchvision's ResNet as a backbone (see the module docstring).

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        num_classes: 0 (default) for a backbone whose ``forward`` returns the pooled feature;
            otherwise ``fc`` is a ``Linear(num_features, num_classes)``.
        small_stem: 3x3 stride-1 ``conv1`` and no max-pool (CIFAR-size inputs).
        width: base width; the stages have ``width * (1, 2, 4, 8)`` bottleneck channels (times
            ``block.expansion`` at their outputs).
        zero_init_residual: zero the last BN weight of every residual branch (torchvision semantics).
        drop_path_rate: stochastic depth of the last block; linear from 0 over the blocks.
        in_chans: input channels.
        img_size: accepted and ignored (a ResNet takes any input size), so that every backbone can
            be built as ``create_model(name, img_size=S)``.
        device: parameter device.
        dtype: parameter dtype.

    Attributes:
        num_features: width of the pooled feature (``8 * width * block.expansion``).
        stage_channels: output channels of ``layer1..layer4``.

    Example:
        >>> import torchvision
        >>> m = ResNet(Bottleneck, (3, 4, 6, 3), num_classes=1000)
        >>> m.load_state_dict(torchvision.models.resnet50().state_dict())
        <All keys matched successfully>
        >>> ResNet(BasicBlock, (2, 2, 2, 2), small_stem=True)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 512])
    """

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: Sequence[int], num_classes: int = 0,
                 small_stem: bool = False, width: int = 64, zero_init_residual: bool = False,
                 drop_path_rate: float = 0.0, in_chans: int = 3, img_size=None, device=None, dtype=None):
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise TypeError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        check_backbone_args(num_classes, width, drop_path_rate, in_chans, layers)
        dd = {"device": device, "dtype": dtype}
        self.in_chans = in_chans
        self.small_stem = bool(small_stem)
        self.drop_path_rate = float(drop_path_rate)
        self._build_stem(in_chans, width, small_stem, dd)
        rates = drop_path_rates(layers, drop_path_rate)
        inplanes, channels = width, []
        for i, (n, stride) in enumerate(zip(layers, (1, 2, 2, 2))):
            stage, inplanes = self._make_layer(block, inplanes, width * 2 ** i, n, stride, rates[i], dd)
            setattr(self, f"layer{i + 1}", stage)
            channels.append(inplanes)
        self.stage_channels = tuple(channels)
        self._finish(num_classes, zero_init_residual, dd)


def _resnet(block, layers, default_small_stem: bool, **kwargs) -> ResNet:
    kwargs.setdefault("small_stem", default_small_stem)
    return ResNet(block, layers, **kwargs)


_DEPTHS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


def _register_family(depth: int) -> None:
    block, layers = _DEPTHS[depth]
    for suffix, small in (("", False), ("_cifar", True)):
        name = f"resnet{depth}{suffix}"

        def ctor(_block=block, _layers=layers, _small=small, **kwargs) -> ResNet:
            return _resnet(_block, _layers, _small, **kwargs)

        ctor.__name__ = ctor.__qualname__ = name
        stem = "small (3x3 stride-1 conv, no max-pool) stem" if small else "ImageNet (7x7 stride-2 conv + max-pool) stem"
        ctor.__doc__ = (f"ResNet-{depth} ({block.__name__}, blocks {layers}) with the {stem}; "
                        "kwargs as :class:`ResNet` (num_classes=0: pooled features).")
        register_model(name)(ctor)


for _d in _DEPTHS:
    _register_family(_d)


@register_model("resnet_mini")
def resnet_mini(**kwargs) -> ResNet:
    """Small stem, BasicBlock, one block per stage, width 16 (16/32/64/128 channels, 0.31M
    parameters): for the embedded 8x8..32x32 digits on a CPU. kwargs as :class:`ResNet`."""
    cfg = dict(small_stem=True, width=16)
    cfg.update(kwargs)
    return ResNet(BasicBlock, (1, 1, 1, 1), **cfg)


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution/pool along one axis (floor mode)."""
    return math.floor((size + 2 * padding - kernel) / stride) + 1
