"""Saliency Swap (Wu et al., BMVC 2021) as a batched tensor augmentation.

For each sample ``i`` of a batch and each view: draw a box size; find, in ``i``'s saliency map,
the box of that size with the highest mean saliency (every box is O(1) from a summed-area
table, for the whole batch at once); find the same-size box with the highest mean saliency in
another image ``p(i)`` of the batch (the partner); paste ``i``'s salient patch over ``p(i)``'s
salient region. The view holds ``i``'s object on ``p(i)``'s background, with ``p(i)``'s own object
covered. The swap's saliency mask is ``i``'s saliency inside the pasted box (zero elsewhere),
area-averaged to the feature map's resolution. The photometric part of
:mod:`ssl_fast.data.augment` (flip, colour jitter, grayscale, blur, solarisation) follows; the
swap replaces its random resized crop.

Every random choice is drawn up front from a CPU ``torch.Generator`` for the whole global batch
(``total`` samples) in a fixed order, and each rank applies its own ``rows``, as
:class:`~ssl_fast.data.augment.MultiCrop` does. Partners are drawn inside consecutive groups of
``group_size`` samples, so N processes produce exactly the views one process would, provided
every rank's rows are whole groups.
"""
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ssl_fast.data.augment import ViewSpec, apply_view, draw_view_params


def summed_area_table(saliency: torch.Tensor) -> torch.Tensor:
    """``S[b, y, x] = sum_{y' < y, x' < x} saliency[b, y', x']``, float64, ``[B, H + 1, W + 1]``.

    Args:
        saliency: ``[B, 1, H, W]`` or ``[B, H, W]``.
    """
    s = saliency[:, 0] if saliency.dim() == 4 else saliency
    sat = torch.zeros(s.shape[0], s.shape[1] + 1, s.shape[2] + 1, dtype=torch.float64, device=s.device)
    sat[:, 1:, 1:] = s.double().cumsum(1).cumsum(2)
    return sat


def best_boxes(saliency: torch.Tensor, box_h: torch.Tensor, box_w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-left corner of the ``box_h[b] x box_w[b]`` box with the highest mean saliency, per image.

    Every candidate box's sum is ``S[y+h, x+w] - S[y, x+w] - S[y+h, x] + S[y, x]`` from the
    summed-area table ``S`` (O(1) per box), for all boxes of all images in one gather; ties go to
    the first box in row-major order of its corner.

    Args:
        saliency: ``[B, 1, H, W]`` (or ``[B, H, W]``) real tensor.
        box_h, box_w: ``[B]`` integer box sides, ``1 <= box_h <= H``, ``1 <= box_w <= W``.

    Returns:
        ``(y0 [B], x0 [B], mean [B])``: corners (int64) and the boxes' mean saliency (float64).
    """
    if not isinstance(saliency, torch.Tensor) or saliency.dim() not in (3, 4) or (
            saliency.dim() == 4 and saliency.shape[1] != 1):
        raise ValueError(f"saliency must be [B, 1, H, W] or [B, H, W], got "
                         f"{tuple(saliency.shape) if isinstance(saliency, torch.Tensor) else type(saliency).__name__}")
    b, h, w = saliency.shape[0], saliency.shape[-2], saliency.shape[-1]
    dev = saliency.device
    box_h, box_w = box_h.to(dev, torch.int64), box_w.to(dev, torch.int64)
    if box_h.shape != (b,) or box_w.shape != (b,):
        raise ValueError(f"box_h and box_w must be [{b}], got {tuple(box_h.shape)} and {tuple(box_w.shape)}")
    if bool(((box_h < 1) | (box_h > h) | (box_w < 1) | (box_w > w)).any()):
        raise ValueError(f"box sides must lie in 1..{h} (height) and 1..{w} (width), got heights "
                         f"{box_h.tolist()} and widths {box_w.tolist()}")
    sat = summed_area_table(saliency).reshape(b, -1)
    ys = torch.arange(h, device=dev).view(1, h, 1)
    xs = torch.arange(w, device=dev).view(1, 1, w)
    y1, x1 = ys + box_h.view(b, 1, 1), xs + box_w.view(b, 1, 1)
    valid = (y1 <= h) & (x1 <= w)
    y1, x1 = y1.clamp(max=h), x1.clamp(max=w)

    def at(yy, xx):
        idx = (yy * (w + 1) + xx).expand(b, h, w).reshape(b, -1)
        return sat.gather(1, idx).view(b, h, w)

    sums = at(y1, x1) - at(ys, x1) - at(y1, xs) + at(ys, xs)
    sums = sums.masked_fill(~valid, float("-inf"))
    best = sums.reshape(b, -1).argmax(1)
    mean = sums.reshape(b, -1).gather(1, best[:, None])[:, 0] / (box_h * box_w).double()
    return best // w, best % w, mean


def paste(images: torch.Tensor, saliency: torch.Tensor, partner: torch.Tensor, box_h: torch.Tensor,
          box_w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The swap itself: sample ``i``'s salient patch over the salient region of ``partner[i]``.

    Args:
        images: ``[B, C, H, W]``.
        saliency: ``[B, 1, H, W]`` in [0, 1].
        partner: ``[B]`` int64 row of the image whose background sample ``i`` gets.
        box_h, box_w: ``[B]`` box sides in pixels.

    Returns:
        ``(view [B, C, H, W], mask [B, 1, H, W], src [B, 2], dst [B, 2])``: ``view[i]`` is
        ``images[partner[i]]`` with the box at ``dst[i] = (y0, x0)`` replaced by ``images[i]``'s
        box at ``src[i]``; ``mask[i]`` is ``saliency[i]``'s values of that box at ``dst[i]``, 0 elsewhere.
    """
    b, c, h, w = images.shape
    if saliency.shape != (b, 1, h, w):
        raise ValueError(f"saliency must be [{b}, 1, {h}, {w}] like the images, got {tuple(saliency.shape)}")
    dev = images.device
    partner = partner.to(dev, torch.int64)
    if partner.shape != (b,) or bool(((partner < 0) | (partner >= b)).any()):
        raise ValueError(f"partner must be [{b}] rows in 0..{b - 1}, got {partner.tolist()}")
    box_h, box_w = box_h.to(dev, torch.int64), box_w.to(dev, torch.int64)
    ys, xs, _ = best_boxes(saliency, box_h, box_w)
    yd, xd, _ = best_boxes(saliency[partner], box_h, box_w)
    gy = torch.arange(h, device=dev).view(1, h, 1)
    gx = torch.arange(w, device=dev).view(1, 1, w)
    dy, dx = gy - yd.view(b, 1, 1), gx - xd.view(b, 1, 1)
    inside = (dy >= 0) & (dy < box_h.view(b, 1, 1)) & (dx >= 0) & (dx < box_w.view(b, 1, 1))  # [B, H, W]
    sy = (dy + ys.view(b, 1, 1)).clamp(0, h - 1).expand(b, h, w)
    sx = (dx + xs.view(b, 1, 1)).clamp(0, w - 1).expand(b, h, w)
    rows = torch.arange(b, device=dev).view(b, 1, 1).expand(b, h, w)
    patch = images.permute(0, 2, 3, 1)[rows, sy, sx].permute(0, 3, 1, 2)  # [B, C, H, W]
    view = torch.where(inside[:, None], patch, images[partner])
    mask = torch.where(inside[:, None], saliency[rows, 0, sy, sx][:, None], saliency.new_zeros(()))
    return view, mask, torch.stack([ys, xs], 1), torch.stack([yd, xd], 1)


@dataclass
class SwapView:
    """One Saliency Swap view of a batch.

    Attributes:
        view: ``[b, 3, size, size]`` augmented view (normalised if the transform normalises).
        mask: ``[b, 1, f, f]`` the swap's saliency mask at feature resolution ``f`` (flipped with the view).
        partner: ``[b]`` global batch row whose background each sample got.
        src: ``[b, 4]`` ``(y0, x0, h, w)`` of the salient box taken from the sample (stored-image pixels).
        dst: ``[b, 4]`` ``(y0, x0, h, w)`` where it was pasted in the partner's image.
    """
    view: torch.Tensor
    mask: torch.Tensor
    partner: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor


def byol_photometric(size: int) -> Tuple[ViewSpec, ViewSpec]:
    """BYOL's two photometric recipes (flip 0.5, jitter 0.8 of (0.4, 0.4, 0.2, 0.1), grey 0.2;
    blur 1.0 / 0.1, solarise 0 / 0.2) at ``size`` pixels, without the crop."""
    common = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))
    return ViewSpec(size, blur_p=1.0, **common), ViewSpec(size, blur_p=0.1, solarize_p=0.2, **common)


class SaliencySwap:
    """Saliency Swap views of a batch, deterministic under a CPU generator.

    Args:
        size: output side of the views.
        feat_size: side of the feature map the masks are returned at.
        box_scale: range of the box area as a fraction of the stored image's area; a box
            smaller than the object pastes only part of it (the cluttered digits' digits cover
            25-56% of the image, CUB's birds typically 20-50%).
        box_ratio: range of the box aspect ratio (width / height), drawn log-uniformly.
        photometric: one :class:`ViewSpec` per view (its crop is ignored); default BYOL's two.
        group_size: partners are drawn within consecutive groups of this many samples of the
            global batch; every rank's rows must be whole groups. ``None``: the rows passed
            to each call form one group (then views depend on how the batch is split).
        mean, std: per-channel normalisation of the views; ``None`` returns them in [0, 1].

    Example:
        >>> swap = SaliencySwap(32, feat_size=4, group_size=4)
        >>> imgs, sal = torch.rand(8, 3, 32, 32), torch.rand(8, 1, 32, 32)
        >>> v1, v2 = swap(imgs, sal, torch.Generator().manual_seed(0))
        >>> v1.view.shape, v1.mask.shape
        (torch.Size([8, 3, 32, 32]), torch.Size([8, 1, 4, 4]))
    """

    def __init__(self, size: int, feat_size: int, box_scale: Tuple[float, float] = (0.2, 0.6),
                 box_ratio: Tuple[float, float] = (3 / 4, 4 / 3), photometric: Optional[Sequence[ViewSpec]] = None,
                 group_size: Optional[int] = None, mean: Optional[Sequence[float]] = (0.5, 0.5, 0.5),
                 std: Optional[Sequence[float]] = (0.5, 0.5, 0.5)):
        for name, v in (("size", size), ("feat_size", feat_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not 0.0 < box_scale[0] <= box_scale[1] <= 1.0:
            raise ValueError(f"box_scale must satisfy 0 < lo <= hi <= 1, got {tuple(box_scale)}")
        if not 0.0 < box_ratio[0] <= box_ratio[1]:
            raise ValueError(f"box_ratio must satisfy 0 < lo <= hi, got {tuple(box_ratio)}")
        if group_size is not None and (not isinstance(group_size, int) or group_size < 2):
            raise ValueError(f"group_size must be an int >= 2 (a partner other than the sample) or None, "
                             f"got {group_size!r}")
        if (mean is None) != (std is None):
            raise ValueError("mean and std must both be given or both be None")
        specs = byol_photometric(size) if photometric is None else tuple(photometric)
        if not specs or not all(isinstance(s, ViewSpec) for s in specs):
            raise TypeError(f"photometric must be a non-empty sequence of ViewSpec, got {photometric!r}")
        self.specs = [replace(s, size=size, scale=(1.0, 1.0), ratio=(1.0, 1.0)) for s in specs]
        self.size, self.feat_size = size, feat_size
        self.box_scale, self.box_ratio = tuple(box_scale), tuple(box_ratio)
        self.group_size = group_size
        self.mean = None if mean is None else tuple(float(m) for m in mean)
        self.std = None if std is None else tuple(float(s) for s in std)

    @property
    def n_views(self) -> int:
        return len(self.specs)

    def draw(self, total: int, group: int, gen: torch.Generator) -> List[Dict[str, torch.Tensor]]:
        """Per-view parameters for ``total`` samples: partner (global row), box area and ratio,
        photometric parameters. Drawn in a fixed order; the views' partners differ from each
        other whenever ``group - 1 >= n_views``."""
        if total % group:
            raise ValueError(f"the global batch ({total}) is not a multiple of group_size {group}")
        # distinct partner shifts per sample: the first n_views entries of a random permutation of 1..g-1
        shifts = torch.rand(total, group - 1, generator=gen).argsort(1) + 1
        j = torch.arange(total)
        start = j // group * group
        out = []
        for v, spec in enumerate(self.specs):
            area = self.box_scale[0] + (self.box_scale[1] - self.box_scale[0]) * torch.rand(
                total, generator=gen, dtype=torch.float64)
            lo, hi = torch.log(torch.tensor(self.box_ratio, dtype=torch.float64))
            ratio = torch.exp(lo + (hi - lo) * torch.rand(total, generator=gen, dtype=torch.float64))
            p = draw_view_params(spec, total, gen)
            shift = shifts[:, v % (group - 1)]
            p.update(partner=start + (j - start + shift) % group, area=area, box_ratio=ratio)
            out.append(p)
        return out

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        return (x - x.new_tensor(self.mean).view(1, -1, 1, 1)) / x.new_tensor(self.std).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor, saliency: torch.Tensor, gen: torch.Generator,
                 rows: Optional[slice] = None, total: Optional[int] = None) -> List[SwapView]:
        """Saliency Swap views of a batch.

        Args:
            images: ``[b, 3, H, W]`` in [0, 1] (this rank's rows), on the training device.
            saliency: ``[b, 1, H, W]`` in [0, 1], the images' saliency.
            gen: CPU generator every random parameter is drawn from.
            rows: which rows of the ``total`` drawn samples these are; default all.
            total: the global batch size; default ``b``.

        Returns:
            ``n_views`` :class:`SwapView` s.
        """
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [b, 3, H, W], got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        b, _, h, w = images.shape
        if not isinstance(saliency, torch.Tensor) or tuple(saliency.shape) != (b, 1, h, w):
            raise ValueError(f"saliency must be [{b}, 1, {h}, {w}] like the images, got "
                             f"{tuple(saliency.shape) if isinstance(saliency, torch.Tensor) else type(saliency).__name__}")
        if saliency.device != images.device:
            raise ValueError(f"saliency is on {saliency.device} but images are on {images.device}")
        total = b if total is None else total
        rows = slice(0, total) if rows is None else rows
        start, stop = rows.indices(total)[:2]
        if stop - start != b:
            raise ValueError(f"rows select {stop - start} samples but {b} images were given")
        group = self.group_size or b
        if group > b or start % group or b % group:
            raise ValueError(f"group_size {group} must divide this call's rows {start}..{stop} (whole groups "
                             f"per rank); choose a group_size that divides the per-process batch {b}")
        if group < 2:
            raise ValueError("Saliency Swap needs at least 2 images per group (a partner other than the sample)")
        saliency = saliency.to(images.dtype)
        out = []
        for spec, p in zip(self.specs, self.draw(total, group, gen)):
            p = {k: v[start:stop] for k, v in p.items()}
            hw = float(h * w)
            bh = torch.sqrt(p["area"] * hw / p["box_ratio"]).round().clamp(1, h).long()
            bw = torch.sqrt(p["area"] * hw * p["box_ratio"]).round().clamp(1, w).long()
            local = p["partner"] - start
            comp, mask, src, dst = paste(images, saliency, local, bh, bw)
            view = self.normalize(apply_view(comp, spec, p))
            flip = p["flip"].to(images.device).view(-1, 1, 1, 1)
            mask = torch.where(flip, mask.flip(-1), mask)
            mask = F.adaptive_avg_pool2d(mask, self.feat_size)
            sizes = torch.stack([bh, bw], 1).to(src.device)
            out.append(SwapView(view, mask, p["partner"], torch.cat([src, sizes], 1), torch.cat([dst, sizes], 1)))
        return out
