"""PNG figures of a run (matplotlib with the Agg backend: no display needed)."""
from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_attention_png(path: str, images: torch.Tensor, attention: torch.Tensor,
                       titles: Optional[Sequence[str]] = None, title: str = "") -> None:
    """Each image beside its class-token attention per head (last block) and the heads' mean.

    Args:
        path: output PNG.
        images: ``[B, 3, H, W]`` in [0, 1].
        attention: ``[B, heads, gh, gw]`` attention of the class token over the patches.
        titles: optional label per image.
        title: figure title.
    """
    plt = _plt()
    b, heads = attention.shape[:2]
    h, w = images.shape[-2:]
    att = F.interpolate(attention.float().cpu(), size=(h, w), mode="nearest")
    cols = heads + 2
    fig, axes = plt.subplots(b, cols, figsize=(1.6 * cols, 1.6 * b + 0.4), squeeze=False)
    for i in range(b):
        axes[i, 0].imshow(images[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
        axes[i, 0].set_ylabel(titles[i] if titles else "", rotation=0, labelpad=12)
        maps = list(att[i]) + [att[i].mean(0)]
        for j, m in enumerate(maps):
            a = m.numpy()
            a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
            axes[i, j + 1].imshow(a, cmap="inferno", vmin=0, vmax=1)
        for j in range(cols):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    for j in range(heads):
        axes[0, j + 1].set_title(f"head {j}", fontsize=9)
    axes[0, 0].set_title("image", fontsize=9)
    axes[0, cols - 1].set_title("mean", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_curves_png(path: str, step_losses: List[float], steps_per_epoch: int, epochs: List[int],
                    knn: List[float], knn_baseline: Optional[float], title: str = "") -> None:
    """Training loss per step (and its running mean) beside k-NN accuracy per epoch vs the random-init baseline."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    if step_losses:
        x = np.arange(1, len(step_losses) + 1) / max(steps_per_epoch, 1)
        y = np.asarray(step_losses, dtype=np.float64)
        a1.plot(x, y, lw=0.6, alpha=0.5, label="loss per step")
        win = max(1, min(len(y), steps_per_epoch))
        smooth = np.convolve(y, np.ones(win) / win, mode="valid")
        a1.plot(x[win - 1:], smooth, lw=1.5, label=f"running mean ({win} steps)")
        a1.legend(fontsize=8)
    a1.set_xlabel("epoch")
    a1.set_ylabel("DINO loss")
    a1.grid(alpha=0.3)
    if knn:
        a2.plot(epochs, knn, "o-", label="k-NN top-1 (teacher)")
    if knn_baseline is not None:
        a2.axhline(knn_baseline, color="gray", ls="--", label=f"random init ({knn_baseline:.1f}%)")
    a2.set_xlabel("epoch")
    a2.set_ylabel("held-out k-NN top-1 (%)")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
