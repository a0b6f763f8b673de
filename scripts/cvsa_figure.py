"""One PNG of what CVSA does, from a CVSA run's checkpoint: per training image its source, its
saliency, the two Saliency Swap views, the swap mask of view 2 (where the object went) and the
learned cross-view attention of view 1's object positions over view 2.

The attention shown is ``sum_i m1_i A[i, :] / sum_i m1_i`` with
``A = softmax_j(cos(p1_i, z2_j) / tau)`` (online conv prediction of view 1 against the target
conv projection of view 2, BatchNorm with running statistics), upsampled to the view.

Usage:
    python scripts/cvsa_figure.py runs/cvsa-cluttered-digits/checkpoint.pth --out cvsa.png --images 4
"""
import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="checkpoint.pth of an ssl-fast pretrain --method cvsa run")
    p.add_argument("--out", default="cvsa.png", help="output PNG")
    p.add_argument("--images", type=int, default=4, help="training images shown (at least 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the swap's random choices")
    args = p.parse_args(argv)
    if args.images < 2:
        p.error(f"--images must be >= 2 (a swap needs a partner), got {args.images}")

    from ssl_fast.nn.saliency_alignment import cross_view_attention
    from ssl_fast.train.checkpoint import load_checkpoint
    from ssl_fast.train.plots import _plt
    from ssl_fast.train.trainer import TrainConfig, Trainer

    ck = load_checkpoint(args.checkpoint, required=("config", "method"))
    cfg = dict(ck["config"])
    if cfg.get("method") != "cvsa":
        p.error(f"{args.checkpoint} is a {cfg.get('method')!r} run, not a cvsa run")
    cfg.update(resume=args.checkpoint, init=None, out=os.path.dirname(os.path.abspath(args.checkpoint)),
               device="cpu", amp="off")
    t = Trainer(TrainConfig(**cfg))
    m = t.method
    m.eval()
    x = t.train_set.images[:args.images]
    sal = m.saliency_of(x)
    swap = copy.copy(m.views)
    swap.group_size = None  # the shown images form one group
    v1, v2 = swap(x, sal, torch.Generator().manual_seed(args.seed))
    mean = torch.tensor(swap.mean or (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
    std = torch.tensor(swap.std or (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
    with torch.no_grad():
        modes = [(mod, mod.training) for mod in m.modules()]
        for mod in m.modules():
            mod.training = False
        _, q1 = m.student(v1.view)
        _, k2 = m.teacher.module(v2.view)
        for mod, mode in modes:
            mod.training = mode
        att = cross_view_attention(q1, k2, m.config.align_temperature)  # [B, n1, h, w]
        w1 = v1.mask.flatten(1)  # [B, n1]
        obj = (w1[:, :, None, None] * att).sum(1) / w1.sum(1).clamp_min(1e-12)[:, None, None]
    size = x.shape[-2:]

    def up(t):
        return F.interpolate(t[:, None].float(), size=size, mode="nearest")[:, 0]

    def show(t):
        return (t * std + mean).clamp(0, 1)

    cols = [("source", x), ("saliency", sal[:, 0]), ("view 1 (swap)", show(v1.view)), ("view 2 (swap)", show(v2.view)),
            ("view 2 swap mask", up(v2.mask[:, 0])), ("attention of view-1\nobject on view 2", up(obj))]
    plt = _plt()
    b = x.shape[0]
    fig, axes = plt.subplots(b, len(cols), figsize=(1.8 * len(cols), 1.8 * b + 0.6), squeeze=False)
    for j, (name, data) in enumerate(cols):
        for i in range(b):
            ax = axes[i, j]
            d = data[i]
            if d.dim() == 3:
                ax.imshow(d.permute(1, 2, 0).numpy())
            else:
                ax.imshow(d.numpy(), cmap="inferno")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
    fig.suptitle(f"CVSA {cfg['arch']} on {cfg['data']}, saliency {m.config.saliency}, epoch {ck.get('epoch', 0) + 1}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
