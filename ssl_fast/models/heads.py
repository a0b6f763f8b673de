"""Projection heads for self-supervised methods."""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ssl_fast.models.layers import init_weights


class DINOHead(nn.Module):
    """DINO's projection head: MLP -> bottleneck -> L2 normalise -> weight-normalised linear to K.

    ``x [B, in_dim] -> Linear(in_dim, hidden) -> GELU -> (Linear(hidden, hidden) -> GELU) x (nlayers - 2)
    -> Linear(hidden, bottleneck) -> x / ||x|| -> last_layer -> [B, out_dim]``.

    ``last_layer`` is ``Linear(bottleneck, out_dim, bias=False)`` under
    ``torch.nn.utils.parametrizations.weight_norm``: ``W = g * V / ||V||`` per output row, with the
    magnitude ``g`` (``last_layer.parametrizations.weight.original0``) initialised to 1 and frozen
    when ``norm_last_layer`` is true, so every prototype has unit norm.

    Args:
        in_dim: backbone feature width.
        out_dim: K, number of prototypes (DINO: 65536).
        use_bn: BatchNorm after each hidden linear layer (DINO's ViT recipe: off).
        norm_last_layer: freeze ``g`` at 1 (unit-norm prototypes).
        nlayers: linear layers in the MLP (>= 1; 1 maps straight to the bottleneck).
        hidden_dim: MLP width (DINO: 2048).
        bottleneck_dim: width before the last layer (DINO: 256).
    """

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        for name, v in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                        ("bottleneck_dim", bottleneck_dim)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim)]
            for i in range(nlayers - 1):
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
                layers.append(nn.Linear(hidden_dim, hidden_dim if i < nlayers - 2 else bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)
        self.norm_last_layer = norm_last_layer
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)


    def last_layer_parameters(self):
        """The parameters frozen during DINO's first epoch(s)."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_dim] -> [B, out_dim]`` logits (before temperature)."""
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MLPHead(nn.Module):
    """A projection or prediction MLP: blocks of ``Linear -> (BatchNorm1d) -> (activation)``.

    Each block is ``(in_dim, out_dim, norm, activation[, bias])``; without ``bias`` its Linear has a
    bias exactly when no norm follows it. The layers sit in ``self.layers`` (an ``nn.Sequential``),
    the layout of lightly's heads, so their state dicts load unchanged.

    Args:
        blocks: ``[(in_dim, out_dim, norm or None, activation or None[, bias]), ...]``.
        device, dtype: where and in what dtype to create the parameters.

    Example:
        >>> head = MLPHead([(512, 1024, nn.BatchNorm1d(1024), nn.ReLU()), (1024, 128, None, None)])
        >>> head(torch.randn(4, 512)).shape
        torch.Size([4, 128])
    """

    def __init__(self, blocks, device=None, dtype=None):
        super().__init__()
        if not blocks:
            raise ValueError("blocks must hold at least one (in_dim, out_dim, norm, activation) block")
        layers = []
        for in_dim, out_dim, norm, act, *bias in blocks:
            if in_dim < 1 or out_dim < 1:
                raise ValueError(f"head widths must be >= 1, got {in_dim} -> {out_dim}")
            use_bias = bool(bias[0]) if bias else norm is None
            layers.append(nn.Linear(in_dim, out_dim, bias=use_bias, device=device, dtype=dtype))
            if norm is not None:
                layers.append(norm.to(device=device, dtype=dtype))
            if act is not None:
                layers.append(act)
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_dim] -> [B, out_dim]``."""
        return self.layers(x)


def byol_mlp(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, device=None, dtype=None) -> MLPHead:
    """BYOL's projector and predictor: ``Linear(in, hidden) -> BN -> ReLU -> Linear(hidden, out)``."""
    return MLPHead([(in_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU()), (hidden_dim, out_dim, None, None)],
                   device=device, dtype=dtype)


def simsiam_projector(in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048, device=None, dtype=None) -> MLPHead:
    """SimSiam's projector: three Linear + BN layers (ReLU after the first two; the last BN without
    affine parameters), as in the paper and lightly's ``SimSiamProjectionHead``."""
    return MLPHead([(in_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU()),
                    (hidden_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU()),
                    (hidden_dim, out_dim, nn.BatchNorm1d(out_dim, affine=False), None)], device=device, dtype=dtype)


def simsiam_predictor(in_dim: int = 2048, hidden_dim: int = 512, out_dim: int = 2048, device=None, dtype=None) -> MLPHead:
    """SimSiam's bottleneck predictor: ``Linear(in, hidden) -> BN -> ReLU -> Linear(hidden, out)``."""
    return MLPHead([(in_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU()), (hidden_dim, out_dim, None, None)],
                   device=device, dtype=dtype)


def care_mlp(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, device=None, dtype=None) -> MLPHead:
    """CARE's projector and predictor (official ``models/resnet_care.py``, ``MLP="care"``):
    ``Linear(in, hidden) -> BN -> ReLU -> Linear(hidden, out)``, every Linear with a bias."""
    return MLPHead([(in_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU(), True),
                    (hidden_dim, out_dim, None, None, True)], device=device, dtype=dtype)
