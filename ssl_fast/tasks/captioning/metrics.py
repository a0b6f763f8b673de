"""Caption metrics: corpus BLEU-1..4 (NLTK) and attention localisation on the embedded scenes.

BLEU is NLTK's ``corpus_bleu`` with the uniform weights of BLEU-n and no smoothing, as the
Show-Attend-Tell reference implementations compute it (sgrvinod/a-PyTorch-Tutorial-to-Image-
Captioning ``train.py``: ``corpus_bleu(references, hypotheses)`` on word lists without
``<start>``, ``<end>`` and ``<pad>``).

Localisation: for each generated word that names an object of the scene vocabulary (a digit),
the attention that produced it is upsampled (bilinearly) from the feature grid to the image, and
its peak pixel must fall inside the true box of that digit in the image. A digit word the image
does not hold counts as a miss.
"""
import warnings
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F

from ssl_fast.tasks.captioning.data import Box

BLEU_WEIGHTS = [(1.0,), (0.5, 0.5), (1 / 3, 1 / 3, 1 / 3), (0.25, 0.25, 0.25, 0.25)]


def corpus_bleu(references: Sequence[Sequence[Sequence[str]]], hypotheses: Sequence[Sequence[str]]
                ) -> Dict[str, float]:
    """Corpus BLEU-1..4.

    Args:
        references: per hypothesis, its reference sentences (token lists).
        hypotheses: generated sentences (token lists).

    Returns:
        ``{"bleu1": .., "bleu2": .., "bleu3": .., "bleu4": ..}`` in [0, 1].
    """
    from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu

    if len(references) != len(hypotheses):
        raise ValueError(f"references ({len(references)}) and hypotheses ({len(hypotheses)}) must pair up")
    if not hypotheses:
        raise ValueError("BLEU needs at least one hypothesis")
    refs = [[list(r) for r in rs] for rs in references]
    hyps = [list(h) for h in hypotheses]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns when an n-gram order has no match (BLEU is then 0)
        scores = nltk_corpus_bleu(refs, hyps, weights=BLEU_WEIGHTS)
    return {f"bleu{n + 1}": float(s) for n, s in enumerate(scores)}


def attention_peak(alpha: torch.Tensor, grid: Tuple[int, int], image_size: Tuple[int, int]) -> Tuple[int, int]:
    """``(x, y)`` pixel of the peak of ``alpha [gh*gw]`` upsampled bilinearly to ``image_size (H, W)``."""
    gh, gw = grid
    if alpha.numel() != gh * gw:
        raise ValueError(f"alpha has {alpha.numel()} values, the grid {grid} needs {gh * gw}")
    up = F.interpolate(alpha.detach().float().cpu().view(1, 1, gh, gw), size=tuple(image_size), mode="bilinear",
                       align_corners=False)[0, 0]
    i = int(up.flatten().argmax())
    return i % image_size[1], i // image_size[1]


def localisation(words: Sequence[Sequence[str]], alphas: Sequence[torch.Tensor], boxes: Sequence[Sequence[Box]],
                 grid: Tuple[int, int], image_size: Tuple[int, int],
                 object_words: Optional[Set[str]] = None) -> Dict[str, float]:
    """Attention localisation of the generated object words.

    Args:
        words: per image, the generated words.
        alphas: per image, ``[len(words), gh*gw]`` the attention of each word.
        boxes: per image, ``[(word, (x0, y0, x1, y1)), ...]`` the true boxes (ends exclusive).
        grid: ``(gh, gw)`` the feature grid.
        image_size: ``(H, W)`` of the images.
        object_words: words that name objects (default: every word of ``boxes``).

    Returns:
        ``{"localisation": hits / object words (nan when none was generated), "object_words": n,
        "hits": n, "absent": object words naming something the image does not hold}``.
    """
    if not (len(words) == len(alphas) == len(boxes)):
        raise ValueError(f"words ({len(words)}), alphas ({len(alphas)}) and boxes ({len(boxes)}) must pair up")
    if object_words is None:
        object_words = {w for bs in boxes for w, _ in bs}
    hits = total = absent = 0
    for ws, al, bs in zip(words, alphas, boxes):
        if al.shape[0] != len(ws):
            raise ValueError(f"alphas need one row per word: {al.shape[0]} rows for {len(ws)} words")
        for j, w in enumerate(ws):
            if w not in object_words:
                continue
            total += 1
            mine = [b for name, b in bs if name == w]
            if not mine:
                absent += 1
                continue
            x, y = attention_peak(al[j], grid, image_size)
            hits += any(x0 <= x < x1 and y0 <= y < y1 for x0, y0, x1, y1 in mine)
    return {"localisation": hits / total if total else float("nan"), "object_words": total, "hits": hits,
            "absent": absent}


def score_captions(references: Sequence[Sequence[Sequence[str]]], words: List[List[str]],
                   alphas: Sequence[torch.Tensor], boxes: Optional[Sequence[Sequence[Box]]],
                   grid: Tuple[int, int], image_size: Tuple[int, int]) -> Dict[str, float]:
    """BLEU-1..4 and (with ``boxes``) the localisation figures of generated captions."""
    out = corpus_bleu(references, words)
    if boxes is not None:
        out.update(localisation(words, alphas, boxes, grid, image_size))
    return out
