"""Batched augmentation on tensors (no torchvision): DINO's multi-crop recipe.

Every random choice is drawn up front, per sample, from a ``torch.Generator`` on the CPU
(:meth:`MultiCrop.draw`), so the crops are a pure function of the generator's seed whatever the
device. For data parallelism each rank draws the parameters of the whole *global* batch from the
same seed and applies only its own rows (``rows=``), so N processes see exactly the crops one
process would see for the same global batch.

Images are ``[B, 3, H, W]`` float in [0, 1]; crops come out normalised by ``(x - mean) / std``.
"""
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

_GREY = (0.299, 0.587, 0.114)
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


@dataclass(frozen=True)
class ViewSpec:
    """One kind of view: output size, crop scale and the probabilities of each photometric change.

    Attributes:
        size: output side in pixels.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height).
        flip_p: horizontal-flip probability.
        jitter_p: colour-jitter probability (brightness, contrast, saturation, hue).
        jitter: maximum strengths ``(brightness, contrast, saturation, hue)``.
        grey_p: grayscale probability.
        blur_p: Gaussian-blur probability.
        blur_sigma: blur sigma range in pixels of a ``blur_reference``-pixel crop; scaled by
            ``size / blur_reference`` so a blur looks alike at every resolution.
        blur_reference: see ``blur_sigma`` (DINO's 224).
        solarize_p: solarisation probability (threshold 0.5).
        noise_p: probability of additive Gaussian noise (after the other changes; clamped to [0, 1]).
        noise_std: range of the noise's standard deviation.
    """
    size: int
    scale: Tuple[float, float]
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    grey_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    blur_reference: float = 224.0
    solarize_p: float = 0.0
    noise_p: float = 0.0
    noise_std: Tuple[float, float] = (0.0, 0.1)

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"view size must be >= 1, got {self.size}")
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        for name in ("flip_p", "jitter_p", "grey_p", "blur_p", "solarize_p", "noise_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def draw_view_params(spec: ViewSpec, n: int, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """Per-sample random parameters of ``n`` views of kind ``spec`` (CPU float64/bool tensors).

    The draws happen in a fixed order and always all of them, so the generator advances by
    the same amount whatever the probabilities; views with noise (``noise_p > 0``) draw its
    parameters last (a noise seed per sample), so views without noise draw exactly as before.
    """
    area = _uniform(n, spec.scale[0], spec.scale[1], gen)
    log_r = _uniform(n, math.log(spec.ratio[0]), math.log(spec.ratio[1]), gen)
    ratio = torch.exp(log_r)
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)
    cy = (1 - h) * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)
    b, c, s, hue = spec.jitter
    p = dict(w=w, h=h, cx=cx, cy=cy,
             flip=torch.rand(n, generator=gen) < spec.flip_p,
             jitter=torch.rand(n, generator=gen) < spec.jitter_p,
             brightness=_uniform(n, max(0.0, 1 - b), 1 + b, gen),
             contrast=_uniform(n, max(0.0, 1 - c), 1 + c, gen),
             saturation=_uniform(n, max(0.0, 1 - s), 1 + s, gen),
             hue=_uniform(n, -hue, hue, gen),
             grey=torch.rand(n, generator=gen) < spec.grey_p,
             blur=torch.rand(n, generator=gen) < spec.blur_p,
             sigma=_uniform(n, *spec.blur_sigma, gen) * spec.size / spec.blur_reference,
             solarize=torch.rand(n, generator=gen) < spec.solarize_p)
    if spec.noise_p > 0:
        p["noise"] = torch.rand(n, generator=gen) < spec.noise_p
        p["noise_std"] = _uniform(n, *spec.noise_std, gen)
        p["noise_seed"] = torch.randint(0, 2**62, (n,), generator=gen)
    return p


def add_noise(x: torch.Tensor, p: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Gaussian noise of per-sample std ``p['noise_std']`` where ``p['noise']``, each sample's from
    its own seed (so a sample's noise does not depend on which rank or batch row it is in)."""
    idx = torch.nonzero(p["noise"], as_tuple=False).flatten()
    if idx.numel() == 0:
        return x
    noise = torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(int(p["noise_seed"][i])))
                         for i in idx.tolist()]).to(device=x.device, dtype=x.dtype)
    std = p["noise_std"][idx].to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)
    dev_idx = idx.to(x.device)
    return x.index_copy(0, dev_idx, (x.index_select(0, dev_idx) + std * noise).clamp(0, 1))


def _grey(x: torch.Tensor) -> torch.Tensor:
    w = x.new_tensor(_GREY).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _mask(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return m.to(x.device).view(-1, 1, 1, 1)


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def resized_crop(images: torch.Tensor, p: Dict[str, torch.Tensor], size: int) -> torch.Tensor:
    """Crop the boxes in ``p`` (fractions of the image, flipped where ``p['flip']``) and resize to ``size``.

    Args:
        images: ``[B, C, H, W]``.
        p: parameters from :func:`draw_view_params` for these B samples.
        size: output side.

    Returns:
        ``[B, C, size, size]`` (bilinear sampling, border padding).
    """
    n = images.shape[0]
    sx = torch.where(p["flip"], -p["w"], p["w"])
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = sx, p["cx"]
    theta[:, 1, 1], theta[:, 1, 2] = p["h"], p["cy"]
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def colour_jitter(x: torch.Tensor, p: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Brightness, contrast, saturation then hue (fixed order) on samples where ``p['jitter']``.

    Hue is a rotation of the chroma plane in YIQ space by ``2 pi * hue``; values are clamped to
    [0, 1] after each step.
    """
    y = (x * _col(p["brightness"], x)).clamp(0, 1)
    m = _grey(y).mean(dim=(2, 3), keepdim=True)
    y = ((y - m) * _col(p["contrast"], x) + m).clamp(0, 1)
    g = _grey(y)
    y = ((y - g) * _col(p["saturation"], x) + g).clamp(0, 1)
    # hue: rotate the (I, Q) chroma plane of YIQ; the whole change is one 3x3 matrix per sample
    to_yiq = torch.tensor(_YIQ, dtype=torch.float64)
    ang = p["hue"].to(torch.float64) * 2 * math.pi
    rot = torch.zeros(ang.shape[0], 3, 3, dtype=torch.float64)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2] = torch.cos(ang), -torch.sin(ang)
    rot[:, 2, 1], rot[:, 2, 2] = torch.sin(ang), torch.cos(ang)
    mat = (torch.linalg.inv(to_yiq) @ rot @ to_yiq).to(device=x.device, dtype=x.dtype)  # [B, 3, 3]
    y = torch.stack([sum(mat[:, c, j].view(-1, 1, 1) * y[:, j] for j in range(3)) for c in range(3)], 1).clamp(0, 1)
    return torch.where(_mask(p["jitter"], x), y, x)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Per-sample separable Gaussian blur (reflect padding) where ``apply``; sigma ``[B]`` in pixels.

    Only the selected samples are computed; the kernel radius is ``ceil(3 * max sigma)`` (at
    least 1, at most what reflect padding allows), each 1-D pass a weighted sum of shifted slices.
    """
    n, c, h, w = x.shape
    idx = torch.nonzero(apply, as_tuple=False).flatten()
    if idx.numel() == 0:
        return x
    sig = sigma[idx].clamp_min(1e-3)
    radius = max(1, min(int(math.ceil(3 * float(sig.max()))), min(h, w) - 1))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-t[None] ** 2 / (2 * sig[:, None] ** 2))
    k = (k / k.sum(1, keepdim=True)).to(device=x.device, dtype=x.dtype)  # [m, 2r+1]
    dev_idx = idx.to(x.device)
    y = x.index_select(0, dev_idx)
    yp = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = sum(k[:, i].view(-1, 1, 1, 1) * yp[..., i:i + w] for i in range(2 * radius + 1))
    yp = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = sum(k[:, i].view(-1, 1, 1, 1) * yp[..., i:i + h, :] for i in range(2 * radius + 1))
    return x.index_copy(0, dev_idx, y)


def apply_view(images: torch.Tensor, spec: ViewSpec, p: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Crop, flip, jitter, grayscale, blur and solarise ``images [B, 3, H, W]`` with parameters ``p``.

    Returns:
        ``[B, 3, spec.size, spec.size]`` in [0, 1].
    """
    x = resized_crop(images, p, spec.size)
    if spec.jitter_p > 0:
        x = colour_jitter(x, p)
    if spec.grey_p > 0:
        x = torch.where(_mask(p["grey"], x), _grey(x).expand_as(x), x)
    if spec.blur_p > 0:
        x = gaussian_blur(x, p["sigma"], p["blur"])
    if spec.solarize_p > 0:
        x = torch.where(_mask(p["solarize"], x) & (x >= 0.5), 1.0 - x, x)
    if spec.noise_p > 0:
        x = add_noise(x, p)
    return x


class ViewSet:
    """Views of a batch from a list of :class:`ViewSpec`, drawn view by view from one generator.

    Args:
        specs: one spec per view, in output order.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        n_global: how many leading views are "global" (methods that feed only some views to a
            teacher read it); default all.

    Example:
        >>> views = ViewSet([ViewSpec(32, (0.2, 1.0), blur_p=1.0), ViewSpec(32, (0.2, 1.0), solarize_p=0.2)])
        >>> v1, v2 = views(torch.rand(8, 3, 32, 32), torch.Generator().manual_seed(0))
    """

    def __init__(self, specs: Sequence[ViewSpec], mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), n_global: Optional[int] = None):
        if not specs:
            raise ValueError("specs must hold at least one ViewSpec")
        self.specs: List[ViewSpec] = list(specs)
        self.n_global = len(self.specs) if n_global is None else n_global
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    @property
    def n_views(self) -> int:
        return len(self.specs)

    def draw(self, n: int, gen: torch.Generator) -> List[Dict[str, torch.Tensor]]:
        """Parameters of every view for ``n`` samples, drawn view by view from ``gen``."""
        return [draw_view_params(s, n, gen) for s in self.specs]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.new_tensor(self.mean).view(1, -1, 1, 1)
        std = x.new_tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std

    def __call__(self, images: torch.Tensor, gen: torch.Generator, rows: Optional[slice] = None,
                 total: Optional[int] = None) -> List[torch.Tensor]:
        """Views of a batch.

        Args:
            images: ``[b, 3, H, W]`` in [0, 1], on the training device.
            gen: CPU generator all random parameters are drawn from.
            rows: which rows of the drawn ``total`` samples these images are (data parallelism);
                default all.
            total: number of samples to draw parameters for (the global batch); default ``b``.

        Returns:
            ``n_views`` normalised tensors ``[b, 3, S_v, S_v]`` in the order of the specs
            (for :class:`MultiCrop`: 2 global ``[b, 3, G, G]`` then local ``[b, 3, L, L]``).
        """
        total = images.shape[0] if total is None else total
        rows = slice(0, total) if rows is None else rows
        params = self.draw(total, gen)
        out = []
        for spec, p in zip(self.specs, params):
            p = {k: v[rows] for k, v in p.items()}
            if p["w"].shape[0] != images.shape[0]:
                raise ValueError(f"rows select {p['w'].shape[0]} samples but {images.shape[0]} images were given")
            out.append(self.normalize(apply_view(images, spec, p)))
        return out

    def eval_view(self, images: torch.Tensor) -> torch.Tensor:
        """The un-augmented image resized to the first view's size and normalised (for evaluation)."""
        size = self.specs[0].size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return self.normalize(images)


class MultiCrop(ViewSet):
    """DINO's multi-crop: two global views (blur 1.0; blur 0.1 + solarise 0.2) and ``n_local`` local views.

    Args:
        global_size: side of the global crops.
        local_size: side of the local crops.
        n_local: number of local crops (0 for two views only).
        global_scale: area range of the global crops (DINO: 0.4-1).
        local_scale: area range of the local crops (DINO: 0.05-0.4).
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        flip_p: horizontal-flip probability (0 for data whose meaning changes under a flip).
        jitter: colour-jitter strengths ``(brightness, contrast, saturation, hue)``.
        jitter_p, grey_p: probabilities of colour jitter and grayscale.
        noise_p, noise_std: probability and std range of additive Gaussian noise on every view.
    """

    def __init__(self, global_size: int, local_size: int, n_local: int,
                 global_scale: Tuple[float, float] = (0.4, 1.0), local_scale: Tuple[float, float] = (0.05, 0.4),
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 flip_p: float = 0.5, jitter: Tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
                 jitter_p: float = 0.8, grey_p: float = 0.2, noise_p: float = 0.0,
                 noise_std: Tuple[float, float] = (0.0, 0.1)):
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        common = dict(flip_p=flip_p, jitter=tuple(jitter), jitter_p=jitter_p, grey_p=grey_p, noise_p=noise_p,
                      noise_std=tuple(noise_std))
        self.specs: List[ViewSpec] = [
            ViewSpec(global_size, tuple(global_scale), blur_p=1.0, **common),
            ViewSpec(global_size, tuple(global_scale), blur_p=0.1, solarize_p=0.2, **common),
        ] + [ViewSpec(local_size, tuple(local_scale), blur_p=0.5, **common)] * n_local
        super().__init__(self.specs, mean, std, n_global=2)
