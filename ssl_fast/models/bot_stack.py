"""CARE's T-stream: a stack of bottleneck-transformer blocks on a CNN feature map.

CARE (Ge et al., NeurIPS 2021) runs this stack on the ResNet's ``layer3`` map (1024 x 14 x 14 for
ResNet-50 at 224 px), in parallel to ``layer4``. It restates the official code:
ChongjianGE/CARE, ``models/trans.py`` (``TransStack``, ``BottleBlock``, ``Attention``,
``AbsPosEmb``) at commit 3187afb0a2e56d40684bd5a83bf4eda145431e7b, which follows lucidrains'
bottleneck-transformer-pytorch ``BottleStack``. Block ``l`` (of ``num_layers``), input ``x``:

``net(x) = BN_3(conv1x1(act(BN_2(pool(MHSA(act(BN_1(conv1x1(x)))))))))``, ``out = act(net(x) + shortcut(x))``

- ``conv1x1`` contracts to ``dim_out // proj_factor`` channels; MHSA has ``heads`` heads of
  ``dim_head`` (output ``heads * dim_head`` channels, no output projection);
- MHSA logits with the factorised absolute position embedding (``height [H, d]``, ``width [W, d]``),
  with the official convention that q is scaled before both terms:
  ``logits[i, j] = s q_i . k_j + s q_i . (height[yj] + width[xj])``, ``s = dim_head ** -0.5``
  (:class:`ssl_fast.nn.BoTAttention` with ``pos_embed="abs", scale_pos_embed=True``: the embedding
  is added to the keys and the attention kernel does the rest);
- ``pool`` is a 2x2 average pool in the first block when ``downsample`` (identity otherwise), so
  the first block attends at ``feat_size`` and the others at ``feat_size // 2``;
- ``BN_3``'s gamma starts at zero (each block starts as ``act(shortcut(x))``);
- ``shortcut``: in the first block ``conv + BN + act`` (a 3x3 stride-2 conv when downsampling, a
  1x1 conv when only the width changes); identity in the others.

Module names follow the official file (``net.{l}.shortcut.{0,1}``, ``net.{l}.net.{0..8}``) except
inside the attention (``net.{l}.net.3.qkv`` and ``.pos_embed.height/width`` for the official
``to_qkv`` and ``pos_emb.height/width``); :func:`convert_official_state_dict` renames a checkpoint.

Note on CARE's full model: ``models/resnet_care.py`` builds the stack inside its ResNet before the
ResNet's init loop, which then re-initialises every ``Conv2d`` of the stack (kaiming-normal,
fan-out) and sets every BatchNorm's weight to 1, so in the official CARE model the last BN's gamma
does not start at zero. :meth:`BoTStack.reset_parameters_as_care_resnet` reproduces that state; the
constructor gives the stack's own initialisation.
"""
from typing import Dict, Optional, Tuple, Type, Union

import torch
from torch import nn

from ssl_fast.nn import BoTAttention

Activation = Union[nn.Module, Type[nn.Module]]


def _act(activation: Activation) -> nn.Module:
    # a class gives a fresh module at each use; a module instance is shared, as the official code does
    return activation() if isinstance(activation, type) else activation


class BoTStackBlock(nn.Module):
    """One bottleneck-transformer block of :class:`BoTStack` (see the module docstring).

    Args:
        dim: input channels.
        feat_size: ``(H, W)`` of the input map.
        dim_out: output channels.
        proj_factor: ``dim_out // proj_factor`` is the attention's input width.
        downsample: attend, then 2x2 average-pool; 3x3 stride-2 conv shortcut.
        heads: attention heads.
        dim_head: query/key/value width per head.
        activation: activation class (instantiated per use) or module (shared).
        device: parameter device.
        dtype: parameter dtype.
    """

    def __init__(self, dim: int, feat_size: Tuple[int, int], dim_out: int, proj_factor: int, downsample: bool,
                 heads: int = 4, dim_head: int = 128, activation: Activation = nn.ReLU, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim != dim_out or downsample:
            kernel_size, stride, padding = (3, 2, 1) if downsample else (1, 1, 0)
            self.shortcut = nn.Sequential(
                nn.Conv2d(dim, dim_out, kernel_size, stride=stride, padding=padding, bias=False, **dd),
                nn.BatchNorm2d(dim_out, **dd), _act(activation))
        else:
            self.shortcut = nn.Identity()
        attn_in, attn_out = dim_out // proj_factor, heads * dim_head
        self.net = nn.Sequential(
            nn.Conv2d(dim, attn_in, 1, bias=False, **dd),
            nn.BatchNorm2d(attn_in, **dd),
            _act(activation),
            BoTAttention(attn_in, attn_out, feat_size=feat_size, num_heads=heads, dim_head=dim_head,
                         pos_embed="abs", scale_pos_embed=True, **dd),
            nn.AvgPool2d((2, 2)) if downsample else nn.Identity(),
            nn.BatchNorm2d(attn_out, **dd),
            _act(activation),
            nn.Conv2d(attn_out, dim_out, 1, bias=False, **dd),
            nn.BatchNorm2d(dim_out, **dd),
        )
        nn.init.zeros_(self.net[-1].weight)
        self.activation = _act(activation)

    @property
    def attn(self) -> BoTAttention:
        """The block's attention module (``net[3]``)."""
        return self.net[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.net(x) + self.shortcut(x))


def _size(feat_size) -> Tuple[int, int]:
    if isinstance(feat_size, int) and not isinstance(feat_size, bool):
        feat_size = (feat_size, feat_size)
    if (not isinstance(feat_size, (tuple, list)) or len(feat_size) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in feat_size)):
        raise ValueError(f"feat_size must be a positive int or an (H, W) pair of them, got {feat_size!r}")
    return int(feat_size[0]), int(feat_size[1])


class BoTStack(nn.Module):
    """CARE's transformer stack (the official ``TransStack``) on ``[B, in_channels, H, W]`` maps.

    Args:
        in_channels: channels of the input map (1024 for ResNet-50's ``layer3``).
        feat_size: ``(H, W)`` (or one int) of the input map; inputs must have it.
        dim_out: output channels of every block.
        proj_factor: attention input width is ``dim_out // proj_factor``.
        num_layers: number of blocks.
        heads: attention heads per block.
        dim_head: query/key/value width per head (attention output ``heads * dim_head``).
        downsample: the first block pools 2x2 (output ``(H // 2, W // 2)``); ``H`` and ``W`` must then be even.
        activation: activation class (a fresh module at each use; default ``nn.ReLU``) or a module
            instance (shared by every use, as in the official code).
        device: parameter device.
        dtype: parameter dtype.

    Attributes:
        out_size: ``(H, W)`` of the output map.

    Example:
        >>> stack = BoTStack(1024, 14)  # CARE on ResNet-50's layer3 at 224 px
        >>> stack(torch.randn(2, 1024, 14, 14)).shape
        torch.Size([2, 2048, 7, 7])
    """

    def __init__(self, in_channels: int, feat_size, dim_out: int = 2048, proj_factor: int = 4, num_layers: int = 5,
                 heads: int = 4, dim_head: int = 128, downsample: bool = True, activation: Activation = nn.ReLU,
                 device=None, dtype=None):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("dim_out", dim_out), ("proj_factor", proj_factor),
                            ("num_layers", num_layers), ("heads", heads), ("dim_head", dim_head)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if dim_out < proj_factor:
            raise ValueError(f"dim_out ({dim_out}) must be >= proj_factor ({proj_factor}): the attention input "
                             "width is dim_out // proj_factor")
        if not (isinstance(activation, nn.Module) or (isinstance(activation, type) and issubclass(activation, nn.Module))):
            raise TypeError(f"activation must be an nn.Module class or instance, got {activation!r}")
        size = _size(feat_size)
        if downsample and (size[0] % 2 or size[1] % 2):
            raise ValueError(f"feat_size {size} must be even with downsample=True (the first block pools it 2x2 "
                             "while its shortcut strides by 2)")
        self.in_channels, self.dim_out, self.feat_size = in_channels, dim_out, size
        self.downsample = bool(downsample)
        self.out_size = (size[0] // 2, size[1] // 2) if downsample else size
        dd = {"device": device, "dtype": dtype}
        self.net = nn.Sequential(*[
            BoTStackBlock(in_channels if i == 0 else dim_out, size if i == 0 else self.out_size, dim_out,
                          proj_factor, downsample and i == 0, heads, dim_head, activation, **dd)
            for i in range(num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the blocks.

        Args:
            x: ``[B, in_channels, H, W]`` with ``(H, W) == feat_size``.

        Returns:
            ``[B, dim_out, H', W']``, ``(H', W') = out_size`` (halved when ``downsample``).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels \
                or tuple(x.shape[2:]) != self.feat_size:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, {self.in_channels}, {self.feat_size[0]}, {self.feat_size[1]}] "
                             f"(in_channels, feat_size), got {got}")
        return self.net(x)

    @torch.no_grad()
    def reset_parameters_as_care_resnet(self) -> None:
        """The state the official CARE model leaves the stack in: its ResNet's init loop sets every
        ``Conv2d`` weight kaiming-normal (fan-out, ReLU gain) and every BatchNorm to weight 1, bias 0
        (the last BN's zero gamma included); the position embeddings keep their ``randn * d**-0.5``."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def convert_official_state_dict(state_dict: Dict[str, torch.Tensor],
                                prefix: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """Rename an official CARE ``TransStack`` state dict to :class:`BoTStack`'s names.

    ``...net.3.to_qkv.weight -> ...net.3.qkv.weight``, ``...pos_emb.height/width ->
    ...pos_embed.height/width``; everything else is unchanged.

    Args:
        state_dict: the official keys (e.g. ``model.trans.state_dict()``).
        prefix: if given, only keys starting with it are kept, with it removed (for a whole CARE
            checkpoint, e.g. ``"module.student_encoder.trans."``).

    Returns:
        A new dict for ``BoTStack.load_state_dict``.
    """
    out = {}
    for key, value in state_dict.items():
        if prefix is not None:
            if not key.startswith(prefix):
                continue
            key = key[len(prefix):]
        key = key.replace(".to_qkv.", ".qkv.").replace(".pos_emb.", ".pos_embed.")
        out[key] = value
    return out
