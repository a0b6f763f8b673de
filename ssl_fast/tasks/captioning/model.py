"""Show, Attend and Tell (Xu et al., 2015): an attention LSTM decoder over an ssl_fast encoder.

The decoder follows the common PyTorch tutorial's ``DecoderWithAttention``
(sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning, ``models.py``): word embedding, an
``LSTMCell`` fed ``[embedding, beta * context]``, ``init_h``/``init_c`` from the mean annotation
vector, the gate ``beta = sigmoid(f_beta(h))`` on the context, dropout before the word classifier
``fc``. Its attention is :class:`ssl_fast.nn.AdditiveAttention` (the fused op; tanh as in the
paper, where the tutorial has a ReLU), with ``Ua`` computed once per image.

Training is teacher-forced: at step ``t`` the decoder reads word ``t`` of the reference and
predicts word ``t + 1``. The loss is the mean word cross-entropy plus the doubly stochastic
regulariser ``lambda * sum_i (1 - sum_t alpha_ti)^2`` (summed over the L positions, averaged over
the images; ``t`` runs over the caption's real words only). Greedy and beam search are in
:mod:`ssl_fast.tasks.captioning.search`.
"""
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ssl_fast.nn import AdditiveAttention
from ssl_fast.tasks.captioning.encoder import Encoder


class Decoder(nn.Module):
    """Attention LSTM decoder (the tutorial's ``DecoderWithAttention`` names).

    Args:
        vocab_size: words, including the four special tokens.
        encoder_dim: annotation vector width D.
        embed_dim: word embedding width.
        decoder_dim: LSTM hidden width.
        attention_dim: attention width A.
        dropout: dropout before ``fc``.

    Example:
        >>> dec = Decoder(vocab_size=20, encoder_dim=32)
        >>> feats = torch.randn(2, 36, 32)
        >>> caps = torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]])
        >>> logits, alphas = dec(feats, caps, torch.tensor([4, 3]))
        >>> logits.shape, alphas.shape
        (torch.Size([2, 3, 20]), torch.Size([2, 3, 36]))
    """

    def __init__(self, vocab_size: int, encoder_dim: int, embed_dim: int = 128, decoder_dim: int = 256,
                 attention_dim: int = 128, dropout: float = 0.5):
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("encoder_dim", encoder_dim), ("embed_dim", embed_dim),
                        ("decoder_dim", decoder_dim), ("attention_dim", attention_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.vocab_size, self.encoder_dim, self.decoder_dim = vocab_size, encoder_dim, decoder_dim
        self.attention = AdditiveAttention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=dropout)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)
        self.fc = nn.Linear(decoder_dim, vocab_size)
        # the tutorial's init_weights
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.fc.bias.data.fill_(0)
        self.fc.weight.data.uniform_(-0.1, 0.1)

    def init_state(self, feats: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(h, c)`` ``[B, decoder_dim]`` from the mean annotation vector of ``feats [B, L, D]``."""
        mean = feats.mean(dim=1)
        return self.init_h(mean), self.init_c(mean)

    def step(self, feats: torch.Tensor, Ua: torch.Tensor, words: torch.Tensor, h: torch.Tensor,
             c: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoding step.

        Args:
            feats: ``[B, L, D]`` annotation vectors.
            Ua: ``[B, L, A]`` their attention projection (:meth:`AdditiveAttention.precompute`).
            words: ``[B]`` the previous word ids.
            h, c: ``[B, decoder_dim]`` the LSTM state.

        Returns:
            ``(logits [B, V], alpha [B, L], h, c)``.
        """
        context, alpha = self.attention(feats, h, Ua=Ua)
        gate = torch.sigmoid(self.f_beta(h))
        h, c = self.decode_step(torch.cat([self.embedding(words), gate * context], dim=1), (h, c))
        return self.fc(self.dropout(h)), alpha.to(feats.dtype), h, c

    def forward(self, feats: torch.Tensor, captions: torch.Tensor,
                lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced decoding.

        Args:
            feats: ``[B, L, D]`` annotation vectors.
            captions: ``[B, T]`` ids ``<start> w_1 .. w_n <end> <pad>..``.
            lengths: ``[B]`` caption lengths including ``<start>`` and ``<end>``.

        Returns:
            ``logits [B, T-1, V]`` (step ``t`` predicts ``captions[:, t+1]``) and ``alphas
            [B, T-1, L]``; steps at or past ``lengths - 1`` hold zeros.
        """
        if feats.dim() != 3 or feats.shape[-1] != self.encoder_dim:
            raise ValueError(f"feats must be [B, L, {self.encoder_dim}], got {tuple(feats.shape)}")
        if captions.dim() != 2 or captions.shape[0] != feats.shape[0] or captions.shape[1] < 2:
            raise ValueError(f"captions must be [{feats.shape[0]}, T >= 2], got {tuple(captions.shape)}")
        if lengths.shape != (feats.shape[0],):
            raise ValueError(f"lengths must be [{feats.shape[0]}], got {tuple(lengths.shape)}")
        B, T = captions.shape
        steps = T - 1
        Ua = self.attention.precompute(feats)
        h, c = self.init_state(feats)
        valid = (torch.arange(steps, device=feats.device)[None] < (lengths.to(feats.device) - 1)[:, None])
        logits, alphas = [], []
        for t in range(steps):
            lg, alpha, h_new, c_new = self.step(feats, Ua, captions[:, t], h, c)
            keep = valid[:, t:t + 1]
            # finished rows keep their state (it is not used again) and give zeros
            h, c = torch.where(keep, h_new, h), torch.where(keep, c_new, c)
            logits.append(lg * keep)
            alphas.append(alpha * keep)
        return torch.stack(logits, 1), torch.stack(alphas, 1)


def doubly_stochastic(alphas: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam * mean_b sum_i (1 - sum_t alpha_bti)^2`` for ``alphas [B, T, L]`` (zeros at padded steps).

    The paper's regulariser: it asks every position to receive, over the caption, a total
    attention of about one. (The tutorial's ``alpha_c * mean_{b,i}(...)`` is this with
    ``lam = alpha_c / L``.)
    """
    if alphas.dim() != 3:
        raise ValueError(f"alphas must be [B, T, L], got {tuple(alphas.shape)}")
    return lam * ((1.0 - alphas.sum(dim=1)) ** 2).sum(dim=1).mean()


class Captioner(nn.Module):
    """Encoder + attention decoder.

    Args:
        encoder: an :class:`~ssl_fast.tasks.captioning.encoder.Encoder`.
        vocab_size: words, including the four special tokens.
        image_size: side of the (square) input images.
        word_head: a linear classifier on the max-pooled annotation vectors that predicts which
            words the image's caption holds (the ``words`` term of :meth:`loss`). Not in the
            paper: it gives a randomly initialised encoder a direct signal; without it the
            decoder first learns the language alone and the image features catch up slowly.
        pos_embed: add a learned position embedding ``[L, D]`` to the annotation vectors of a CNN
            encoder (a ViT's tokens carry their own). Not in the paper: CNN features say what is
            at a position but hardly where it is, which relations such as "left of" need.
        **decoder_kw: :class:`Decoder` options (``embed_dim``, ``decoder_dim``,
            ``attention_dim``, ``dropout``).

    Example:
        >>> from ssl_fast.models import create_model
        >>> cap = Captioner(Encoder(create_model("vit_nano_p4", img_size=32)), vocab_size=20, image_size=32)
        >>> out = cap.loss(torch.rand(2, 3, 32, 32), torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]]),
        ...                torch.tensor([4, 3]), lam=0.01)
        >>> sorted(out)
        ['loss', 'reg', 'words', 'xent']
    """

    def __init__(self, encoder: Encoder, vocab_size: int, image_size: int, pos_embed: bool = False,
                 word_head: bool = False, **decoder_kw):
        super().__init__()
        self.encoder = encoder
        dim, self.grid = encoder.out_dim(image_size)
        self.image_size = image_size
        self.decoder = Decoder(vocab_size, dim, **decoder_kw)
        self.pos_embed = None
        if pos_embed and encoder.kind == "cnn":
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.word_head = nn.Linear(dim, vocab_size) if word_head else None

    def encode(self, images: torch.Tensor, raw: bool = False):
        """``[B, 3, H, W]`` -> annotation vectors ``[B, L, D]`` (and the encoder's own, with ``raw``)."""
        feats, grid = self.encoder(images)
        if grid != self.grid:
            raise ValueError(f"images of {tuple(images.shape[-2:])} give a {grid} feature grid; this captioner "
                             f"was built for {self.image_size}-px images ({self.grid})")
        out = feats if self.pos_embed is None else feats + self.pos_embed.to(feats.dtype)
        return (out, feats) if raw else out

    def loss(self, images: torch.Tensor, captions: torch.Tensor, lengths: torch.Tensor, lam: float,
             repeats: int = 1, word_weight: float = 0.0, n_special: int = 4) -> Dict[str, torch.Tensor]:
        """Teacher-forced loss of a batch.

        Args:
            images: ``[N, 3, H, W]``.
            captions, lengths: ``[N * repeats, T]``, ``[N * repeats]``: ``repeats`` captions per
                image, image-major (the encoder runs once per image).
            lam: weight of the doubly stochastic regulariser.
            word_weight: weight of the word-presence loss (needs ``word_head``): the binary
                cross-entropy of the head's logits against which of the non-special words
                (ids ``>= n_special``) the image's captions hold.

        Returns:
            ``{"loss", "xent", "reg", "words"}`` (scalars; ``loss = xent + reg + word_weight * words``).
        """
        feats, raw = self.encode(images, raw=True)
        words = feats.new_zeros(())
        if word_weight > 0:
            if self.word_head is None:
                raise ValueError("word_weight > 0 needs a Captioner built with word_head=True")
            present = torch.zeros(images.shape[0], self.decoder.vocab_size, device=feats.device)
            present.view(-1)[(torch.arange(captions.shape[0], device=feats.device) // repeats)[:, None]
                             * self.decoder.vocab_size + captions.to(feats.device)] = 1.0
            present[:, :n_special] = 0.0
            logits = self.word_head(raw.amax(dim=1))[:, n_special:]
            words = F.binary_cross_entropy_with_logits(logits.float(), present[:, n_special:])
        if repeats > 1:
            feats = feats.repeat_interleave(repeats, dim=0)
        logits, alphas = self.decoder(feats, captions, lengths)
        targets = captions[:, 1:].to(logits.device)
        valid = torch.arange(targets.shape[1], device=logits.device)[None] < (lengths.to(logits.device) - 1)[:, None]
        xent = F.cross_entropy(logits[valid].float(), targets[valid])
        reg = doubly_stochastic(alphas.float(), lam)
        return {"loss": xent + reg + word_weight * words, "xent": xent.detach(), "reg": reg.detach(),
                "words": words.detach()}
