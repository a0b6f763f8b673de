"""Show-Attend-Tell attention module on the fused additive-attention op.

Drop-in for the ``Attention`` module of the common PyTorch captioning tutorial
(sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning, ``models.py``): the same constructor
``(encoder_dim, decoder_dim, attention_dim)``, the same parameters ``encoder_att``,
``decoder_att``, ``full_att`` and the same ``forward(encoder_out, decoder_hidden) ->
(attention_weighted_encoding, alpha)``, so a tutorial checkpoint loads into it unchanged. Two
differences:

- the non-linearity is ``tanh``, as in Xu et al. (2015) and Bahdanau et al.; the tutorial uses a
  ReLU there;
- :meth:`AdditiveAttention.precompute` computes ``encoder_att(encoder_out)`` once per image and
  ``forward(..., Ua=...)`` reuses it at every decoding step (the tutorial recomputes it per step).

``full_att.bias`` shifts every score of a row equally, which the softmax ignores, so the op does
not read it and it gets no gradient (``grad`` stays None; in the tutorial's module its gradient is
0 up to rounding). It is kept so that tutorial checkpoints load; under
``DistributedDataParallel`` pass ``find_unused_parameters=True`` or freeze it
(``full_att.bias.requires_grad_(False)``).
"""
from typing import Optional, Tuple

import torch
from torch import nn

from ssl_fast.ops.additive_attention import additive_attention


class AdditiveAttention(nn.Module):
    """Additive attention of Show, Attend and Tell over encoder features.

    ::

        Ua    = encoder_att(encoder_out)                       [B, L, A]   (once per image)
        e     = full_att(tanh(Ua + decoder_att(h)[:, None]))   [B, L]
        alpha = softmax(e)                                     [B, L]      (masked positions 0)
        attention_weighted_encoding = sum_l alpha_l encoder_out_l   [B, encoder_dim]

    Args:
        encoder_dim: feature size ``D`` of the encoded image.
        decoder_dim: size of the decoder's hidden state.
        attention_dim: size ``A`` of the attention network.
        device, dtype: of the parameters.

    Example:
        >>> att = AdditiveAttention(encoder_dim=64, decoder_dim=32, attention_dim=16)
        >>> encoder_out, h = torch.randn(2, 49, 64), torch.randn(2, 32)
        >>> Ua = att.precompute(encoder_out)           # once per image
        >>> context, alpha = att(encoder_out, h, Ua=Ua)  # every decoding step
        >>> context.shape, alpha.shape
        (torch.Size([2, 64]), torch.Size([2, 49]))
    """

    def __init__(self, encoder_dim: int, decoder_dim: int, attention_dim: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.encoder_att = nn.Linear(encoder_dim, attention_dim, **factory)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim, **factory)
        self.full_att = nn.Linear(attention_dim, 1, **factory)

    def precompute(self, encoder_out: torch.Tensor) -> torch.Tensor:
        """``Ua = encoder_att(encoder_out)`` ``[B, L, A]``, to pass as ``forward(..., Ua=Ua)``.

        Args:
            encoder_out: ``[B, L, encoder_dim]`` encoded image.
        """
        return self.encoder_att(encoder_out)

    def forward(self, encoder_out: torch.Tensor, decoder_hidden: torch.Tensor, *,
                Ua: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """One attention step.

        Args:
            encoder_out: ``[B, L, encoder_dim]`` encoded image.
            decoder_hidden: ``[B, decoder_dim]`` the decoder's previous hidden state.
            Ua: ``[B, L, attention_dim]`` from :meth:`precompute` (computed here when None).
            mask: optional boolean ``[B, L]``, True = attend to the position.
            backend: forwarded to :func:`ssl_fast.ops.additive_attention`.

        Returns:
            ``(attention_weighted_encoding [B, encoder_dim], alpha [B, L])``.
        """
        if Ua is None:
            Ua = self.encoder_att(encoder_out)
        Wh = self.decoder_att(decoder_hidden)
        w = self.full_att.weight.view(-1)
        # under autocast the Linear outputs are half precision while encoder_out and the weight
        # are not; the op takes one dtype, as a Linear under autocast casts its weight
        dtype = Ua.dtype
        a = encoder_out.to(dtype)
        return additive_attention(a, Ua, Wh.to(dtype), w.to(dtype), mask, backend=backend)
