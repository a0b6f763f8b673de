"""Localisation scores where foreground masks are known: IoU of a thresholded saliency or attention
map with the true foreground, and pointing accuracy (is the map's peak on the object?).

Both take a map at any resolution (a ViT's patch grid, a feature map), upsample it bilinearly
(``align_corners=False``) to the mask's size and score it per image. Images whose mask is
unknown (NaN anywhere, as :func:`ssl_fast.data.finegrained.load_cub` gives for a missing
segmentation file) get NaN scores and are left out of the means.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F

THRESHOLD_MODES = ("value", "mass")


def _as_maps(name: str, t, dims=(3, 4)) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() not in dims or (t.dim() == 4 and t.shape[1] != 1):
        raise ValueError(f"{name} must be [B, 1, H, W] or [B, H, W], got "
                         f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    return t[:, 0] if t.dim() == 4 else t


def upsample_to(saliency: torch.Tensor, size) -> torch.Tensor:
    """``[B, h, w]`` -> ``[B, H, W]`` float32 (bilinear, ``align_corners=False``)."""
    s = saliency.float()
    if tuple(s.shape[-2:]) == tuple(size):
        return s
    return F.interpolate(s[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def foreground_of(saliency: torch.Tensor, threshold: float = 0.5, mode: str = "value") -> torch.Tensor:
    """Boolean foreground of each map ``[B, H, W]``.

    * ``mode="value"``: pixels at or above ``threshold`` of the way from the map's minimum to its
      maximum (``(s - min) / (max - min) >= threshold``; a flat map has no foreground).
    * ``mode="mass"``: the fewest highest pixels holding at least ``threshold`` of the map's total
      (non-negative) mass, as DINO's attention figures keep 60% of the mass.
    """
    if mode not in THRESHOLD_MODES:
        raise ValueError(f"mode must be one of {', '.join(THRESHOLD_MODES)}, got {mode!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    b = saliency.shape[0]
    s = saliency.double().reshape(b, -1)
    if mode == "value":
        lo, hi = s.min(1, keepdim=True).values, s.max(1, keepdim=True).values
        rng = hi - lo
        fg = (rng > 0) & ((s - lo) >= threshold * rng)
    else:
        s = s.clamp_min(0)
        vals, order = s.sort(1, descending=True)
        total = vals.sum(1, keepdim=True)
        before = vals.cumsum(1) - vals  # mass of the strictly higher-ranked pixels
        keep_sorted = (before < threshold * total) & (total > 0)
        fg = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    return fg.reshape(saliency.shape)


def localisation_scores(saliency: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5, mode: str = "value",
                        mask_threshold: float = 0.5, tolerance: int = 0) -> Dict[str, torch.Tensor]:
    """Per-image IoU and pointing hits of saliency maps against true foreground masks.

    Args:
        saliency: ``[B, 1, h, w]`` or ``[B, h, w]`` maps (any real values; e.g. attention averaged over heads).
        masks: ``[B, 1, H, W]`` or ``[B, H, W]`` foreground masks; foreground is ``mask > mask_threshold``.
        threshold, mode: how a map becomes a foreground (:func:`foreground_of`).
        mask_threshold: binarisation of soft masks.
        tolerance: pointing counts a hit when the peak lies within this many pixels (Chebyshev
            distance, at mask resolution) of the foreground; 0 = on it.

    Returns:
        ``iou [B]``, ``pointing [B]`` (1.0 hit, 0.0 miss) float64, NaN for unknown masks or
        (IoU) when both foregrounds are empty; ``mean_iou`` and ``pointing_accuracy`` (0-d, NaNs left out).
    """
    s = _as_maps("saliency", saliency)
    m = _as_maps("masks", masks)
    if s.shape[0] != m.shape[0]:
        raise ValueError(f"saliency has {s.shape[0]} maps but masks has {m.shape[0]}")
    if not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"tolerance must be an int >= 0, got {tolerance!r}")
    b, h, w = m.shape
    s = upsample_to(s.to(m.device), (h, w))
    unknown = torch.isnan(m).reshape(b, -1).any(1)
    truth = torch.nan_to_num(m, nan=0.0) > mask_threshold
    pred = foreground_of(s, threshold, mode)
    inter = (pred & truth).reshape(b, -1).sum(1).double()
    union = (pred | truth).reshape(b, -1).sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))
    region = truth
    if tolerance:
        region = F.max_pool2d(truth[:, None].float(), 2 * tolerance + 1, stride=1, padding=tolerance)[:, 0] > 0
    peak = s.reshape(b, -1).argmax(1)
    pointing = region.reshape(b, -1).gather(1, peak[:, None])[:, 0].double()
    nan = torch.full_like(iou, float("nan"))
    iou, pointing = torch.where(unknown, nan, iou), torch.where(unknown, nan, pointing)
    return {"iou": iou, "pointing": pointing, "mean_iou": iou.nanmean(), "pointing_accuracy": pointing.nanmean()}


@torch.no_grad()
def attention_localisation(method, images: torch.Tensor, masks: torch.Tensor, batch_size: int = 256,
                           **kwargs) -> Optional[Dict[str, torch.Tensor]]:
    """:func:`localisation_scores` of a method's class-token attention (averaged over heads).

    Args:
        method: an :class:`~ssl_fast.methods.base.SSLMethod` with :meth:`attention_maps`.
        images: ``[N, 3, H, W]`` in [0, 1] on the method's device.
        masks: ``[N, 1, H, W]`` true foreground.
        batch_size: images per forward pass.
        kwargs: passed to :func:`localisation_scores`.

    Returns:
        The scores, or None when the method has no attention maps (not a ViT).
    """
    maps = []
    for i in range(0, images.shape[0], batch_size):
        att = method.attention_maps(images[i:i + batch_size])
        if att is None:
            return None
        maps.append(att.float().mean(1))
    return localisation_scores(torch.cat(maps), masks, **kwargs)
