"""Caption generation: greedy decoding and beam search, with the attention of every word.

Both run a batch of images at once. Beam search keeps ``k`` hypotheses per image, scored by the
sum of their words' log-probabilities (no length normalisation, as in the tutorial's
``caption.py``); a hypothesis that emits ``<end>`` is finished and keeps its score. At
``max_len`` words the best finished hypothesis wins, or the best unfinished one when none has
finished. The search stops early once every image's best hypothesis has finished (scores only
fall as words are added). With ``k = 1`` it is greedy decoding.
"""
from dataclasses import dataclass
from typing import List

import torch

from ssl_fast.tasks.captioning.model import Captioner


@dataclass
class Generated:
    """Generated captions of a batch.

    Attributes:
        words: per image, the word ids (without ``<start>``, up to and without ``<end>``).
        alphas: per image, ``[len(words), L]`` the attention that produced each word.
        scores: per image, the caption's log-probability (``<end>`` included when emitted).
    """
    words: List[List[int]]
    alphas: List[torch.Tensor]
    scores: List[float]


@torch.no_grad()
def greedy(model: Captioner, images: torch.Tensor, max_len: int, start_id: int = 1, end_id: int = 2) -> Generated:
    """The most probable word at every step, until ``<end>`` or ``max_len`` words.

    Args:
        model: the captioner (put it in eval mode first).
        images: ``[B, 3, H, W]``.
        max_len: most words per caption.
    """
    return beam_search(model, images, 1, max_len, start_id, end_id)


@torch.no_grad()
def beam_search(model: Captioner, images: torch.Tensor, beam_width: int, max_len: int, start_id: int = 1,
                end_id: int = 2) -> Generated:
    """Beam search of width ``beam_width`` (see the module docstring).

    Args:
        model: the captioner (put it in eval mode first).
        images: ``[B, 3, H, W]``.
        beam_width: hypotheses kept per image (1: greedy).
        max_len: most words per caption.
    """
    if not isinstance(beam_width, int) or beam_width < 1:
        raise ValueError(f"beam_width must be an integer >= 1, got {beam_width!r}")
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be an integer >= 1, got {max_len!r}")
    dec = model.decoder
    if beam_width > dec.vocab_size:
        raise ValueError(f"beam_width must be at most the vocabulary size {dec.vocab_size}, got {beam_width}")
    feats = model.encode(images)
    B, L, D = feats.shape
    k = beam_width
    dev = feats.device
    feats = feats.repeat_interleave(k, dim=0)  # [B*k, L, D], image-major
    Ua = dec.attention.precompute(feats)
    h, c = dec.init_state(feats)
    words = torch.full((B * k,), start_id, dtype=torch.long, device=dev)
    # only beam 0 is live at the start (the k copies are identical)
    scores = torch.full((B, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0
    finished = torch.zeros(B, k, dtype=torch.bool, device=dev)
    seqs = torch.zeros(B, k, 0, dtype=torch.long, device=dev)
    alphas = torch.zeros(B, k, 0, L, dtype=feats.dtype, device=dev)
    V = dec.vocab_size
    for _ in range(max_len):
        logits, alpha, h_new, c_new = dec.step(feats, Ua, words, h, c)
        logp = torch.log_softmax(logits.float(), dim=-1).view(B, k, V)
        # a finished hypothesis continues only with <end>, at no cost (it is then copied as is)
        done_row = torch.full((V,), float("-inf"), device=dev)
        done_row[end_id] = 0.0
        logp = torch.where(finished[..., None], done_row, logp)
        total = (scores[..., None] + logp).view(B, k * V)
        top, idx = total.topk(k, dim=1)  # sorted, best first
        src = torch.div(idx, V, rounding_mode="floor")  # [B, k] beam each one extends
        tok = idx % V
        flat = (src + torch.arange(B, device=dev)[:, None] * k).view(-1)
        was_done = finished.gather(1, src)
        alpha = alpha.view(B, k, L).gather(1, src[..., None].expand(B, k, L))
        seqs = torch.cat([seqs.gather(1, src[..., None].expand(-1, -1, seqs.shape[2])), tok[..., None]], 2)
        alphas = torch.cat([alphas.gather(1, src[..., None, None].expand(-1, -1, alphas.shape[2], L)),
                            alpha[:, :, None]], 2)
        scores = top
        finished = was_done | (tok == end_id)
        h, c = h_new[flat], c_new[flat]
        words = tok.view(-1)
        # scores only fall as words are added: once every image's best hypothesis has finished,
        # nothing can overtake it
        if bool(finished[:, 0].all()):
            break
    out_words, out_alphas, out_scores = [], [], []
    for b in range(B):
        fin = finished[b]
        # best finished hypothesis, else the best of all (scores are sorted, best first)
        j = int(torch.nonzero(fin)[0]) if bool(fin.any()) else 0
        seq = seqs[b, j].tolist()
        n = seq.index(end_id) if end_id in seq else len(seq)
        out_words.append(seq[:n])
        out_alphas.append(alphas[b, j, :n].cpu())
        out_scores.append(float(scores[b, j]))
    return Generated(out_words, out_alphas, out_scores)
