"""Attention figures as in Xu et al. (2015): the image, then for each generated word its attention.

Each word's attention ``[gh*gw]`` is upsampled bilinearly to the image and drawn over it (the
tutorial's ``caption.py`` smooths with ``skimage.transform.pyramid_expand``; bilinear keeps the
peak where :mod:`metrics` measures it). matplotlib with the Agg backend: no display needed.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ssl_fast.tasks.captioning.data import Box


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _upsample(alpha: torch.Tensor, grid: Tuple[int, int], size: Tuple[int, int]):
    a = F.interpolate(alpha.detach().float().cpu().view(1, 1, *grid), size=size, mode="bilinear",
                      align_corners=False)[0, 0]
    return (a / a.max().clamp_min(1e-12)).numpy()


def _draw_row(axes, image: torch.Tensor, words: Sequence[str], alphas: torch.Tensor, grid: Tuple[int, int],
              boxes: Optional[Sequence[Box]], label: str) -> None:
    import matplotlib.patches as patches

    img = image.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
    h, w = img.shape[:2]
    axes[0].imshow(img)
    axes[0].set_title(label, fontsize=8)
    for ax, word, alpha in zip(axes[1:], words, alphas):
        # the image, dimmed, under the word's attention in colour (scaled to its peak)
        ax.imshow(img * 0.6)
        ax.imshow(_upsample(alpha, grid, (h, w)), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
        ax.set_title(word, fontsize=10)
        for name, (x0, y0, x1, y1) in boxes or []:
            if name == word:
                ax.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                               edgecolor="tab:orange", linewidth=1))
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")


def save_caption_png(path: str, image: torch.Tensor, words: Sequence[str], alphas: torch.Tensor,
                     grid: Tuple[int, int], boxes: Optional[Sequence[Box]] = None, title: str = "") -> None:
    """One example: the image, then each generated word's attention over it.

    Args:
        path: output PNG.
        image: ``[3, H, W]`` in [0, 1].
        words: the generated words.
        alphas: ``[len(words), gh*gw]`` the attention that produced each word.
        grid: ``(gh, gw)``.
        boxes: true boxes of the named objects; drawn on the panel of the word naming them.
        title: figure title (e.g. the caption and a reference).
    """
    save_captions_png(path, image[None], [words], [alphas], grid, [boxes] if boxes else None, [title])


def save_captions_png(path: str, images: torch.Tensor, words: List[Sequence[str]], alphas: List[torch.Tensor],
                      grid: Tuple[int, int], boxes: Optional[List[Sequence[Box]]] = None,
                      labels: Optional[Sequence[str]] = None, title: str = "") -> None:
    """Several examples, one row each (the image, then a panel per generated word).

    Args:
        path: output PNG.
        images: ``[B, 3, H, W]`` in [0, 1].
        words, alphas: per image, as :func:`save_caption_png` takes them.
        grid: ``(gh, gw)``.
        boxes: per image, its true boxes, or None.
        labels: per image, a short label drawn over the image.
        title: figure title.
    """
    if not (len(images) == len(words) == len(alphas)):
        raise ValueError(f"images ({len(images)}), words ({len(words)}) and alphas ({len(alphas)}) must pair up")
    plt = _plt()
    b = len(images)
    cols = 1 + max((len(ws) for ws in words), default=0)
    fig, axes = plt.subplots(b, cols, figsize=(1.25 * cols, 1.35 * b + (0.4 if title else 0.1)), squeeze=False)
    for i in range(b):
        _draw_row(axes[i], images[i], words[i], alphas[i], grid, boxes[i] if boxes else None,
                  labels[i] if labels else "")
        for ax in axes[i, 1 + len(words[i]):]:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_curves_png(path: str, losses: Sequence[float], steps_per_epoch: int, epochs: Sequence[int],
                    bleu4: Sequence[float], title: str = "") -> None:
    """Training loss per step and validation BLEU-4 per epoch."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot([i / max(steps_per_epoch, 1) for i in range(1, len(losses) + 1)], losses, lw=0.8)
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    b.plot(list(epochs), list(bleu4), marker="o")
    b.set_xlabel("epoch")
    b.set_ylabel("validation BLEU-4")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
