"""Per-pixel saliency ``[B, 1, H, W]`` in [0, 1] for Saliency Swap, from three sources, cached per run.

Sources (:data:`SOURCES`):

* ``"dino"``: a DINO teacher's last-block class-token attention, from a checkpoint written by
  ``ssl-fast pretrain`` (the method is rebuilt from the checkpoint's config and its
  :meth:`attention_maps` is used as the trainer uses it), averaged over heads, upsampled
  bilinearly to the image and min-max normalised per image.
* ``"spectral-residual"``: the spectral residual detector of Hou & Zhang, "Saliency Detection: A
  Spectral Residual Approach", CVPR 2007. It needs no weights. See :func:`spectral_residual`.
* ``"masks"`` / ``"boxes"``: what the data set supplies (CUB's segmentations; object boxes, as
  each pixel's covered area fraction).

:func:`compute_saliency` computes a source once for a whole image set and caches it beside the
run in a file keyed by data set, source and image size; the file also records a SHA-256 of the
images (and of the checkpoint for ``"dino"``) and is recomputed, with a warning, when any of
that no longer matches. Saliency is stored and returned quantised to 8 bits, so a cached and a
fresh computation give identical tensors.
"""
import hashlib
import os
import re
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

SOURCES = ("dino", "spectral-residual", "masks", "boxes")
#: the paper's ``rgb2gray`` weights
_GREY = (0.2989, 0.5870, 0.1140)


def _check_images(images) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, 3, H, W] (or [B, 1, H, W]) in [0, 1], got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1], got {images.dtype}")


def _min_max(s: torch.Tensor) -> torch.Tensor:
    """Per-image ``(s - min) / (max - min)`` over the last two dims (0 where the map is flat)."""
    lo = s.amin((-2, -1), keepdim=True)
    hi = s.amax((-2, -1), keepdim=True)
    rng = hi - lo
    return torch.where(rng > 0, (s - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(s))


def _gaussian_10x10(sigma: float, dtype, device) -> torch.Tensor:
    """MATLAB's ``fspecial('gaussian', [10, 10], sigma)``: samples at offsets -4.5..4.5, summing to 1."""
    t = torch.arange(10, dtype=dtype, device=device) - 4.5
    g = torch.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def spectral_residual(images: torch.Tensor, width: int = 64, sigma: float = 2.5, eps: float = 1e-12,
                      out_size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Spectral residual saliency (Hou & Zhang, CVPR 2007), batched, in float64.

    The paper's recipe (its MATLAB listing), per image:

    1. grey image ``I`` (``0.2989 R + 0.5870 G + 0.1140 B``), resized so its width is ``width``
       (64 in the paper; here bilinear with antialiasing, MATLAB uses bicubic). Narrower images
       are kept at their own size: upsampled ones have empty high frequencies, which the
       whitening of step 3 turns into ringing along the image border (on 32-pixel cluttered
       digits upsampled to 64 the peak was on the border in every image);
    2. ``F = FFT2(I)``, log amplitude ``L = log(|F| + eps)`` (``eps`` only keeps flat images
       finite), phase ``P = angle(F)``;
    3. spectral residual ``R = L - h_3 * L``, ``h_3`` the 3x3 average filter with replicated borders;
    4. ``S = |IFFT2(exp(R + i P))|^2``, smoothed by the 10x10 Gaussian of sigma ``sigma`` (2.5)
       with zero borders (MATLAB's ``imfilter`` of ``fspecial('gaussian', [10, 10], 2.5)``: an
       even kernel whose centre is its 5th tap, so 4 taps before and 5 after);
    5. min-max normalised to [0, 1] (``mat2gray``), then resized bilinearly to ``out_size``
       (default the input's) and clamped to [0, 1]. A flat image (one grey level) gets zeros.

    Args:
        images: ``[B, 3, H, W]`` or ``[B, 1, H, W]`` in [0, 1].
        width: working width (the paper's 64).
        sigma: Gaussian smoothing sigma at the working size (the paper's 2.5).
        eps: added to the amplitude before the log.
        out_size: ``(H, W)`` of the returned map; default the input's.

    Returns:
        ``[B, 1, H, W]`` float32 in [0, 1].
    """
    _check_images(images)
    if not isinstance(width, int) or width < 4:
        raise ValueError(f"width must be an int >= 4, got {width!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    b, c, h, w = images.shape
    x = images.double()
    grey = (x * x.new_tensor(_GREY).view(1, 3, 1, 1)).sum(1, keepdim=True) if c == 3 else x
    width = min(width, w)  # never upsample: empty high frequencies would dominate the whitened spectrum
    wh = (max(1, int(round(h * width / w))), width)
    if (h, w) != wh:
        grey = F.interpolate(grey, size=wh, mode="bilinear", align_corners=False, antialias=True)
    spec = torch.fft.fft2(grey[:, 0])
    log_amp = torch.log(spec.abs() + eps)
    phase = torch.angle(spec)
    avg = F.avg_pool2d(F.pad(log_amp[:, None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[:, 0]
    residual = log_amp - avg
    sal = torch.fft.ifft2(torch.exp(torch.complex(residual, phase))).abs() ** 2
    g = _gaussian_10x10(sigma, sal.dtype, sal.device)
    sal = F.conv2d(F.pad(sal[:, None], (4, 5, 4, 5)), g[None, None])
    sal = _min_max(sal)
    # a flat image has no salient region (its spectrum is a lone DC term, whose whitening would
    # put a spurious peak at the origin)
    flat = (grey.amax((-2, -1), keepdim=True) - grey.amin((-2, -1), keepdim=True)) == 0
    sal = sal.masked_fill(flat, 0.0)
    size = (h, w) if out_size is None else tuple(int(v) for v in out_size)
    if tuple(sal.shape[-2:]) != size:
        sal = F.interpolate(sal, size=size, mode="bilinear", align_corners=False)
    return sal.clamp(0, 1).float()


def box_saliency(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes ``[N, 4]`` ``(x0, y0, x1, y1)`` in pixels -> ``[N, 1, H, W]``: each pixel's covered area fraction."""
    if not isinstance(boxes, torch.Tensor) or boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4] (x0, y0, x1, y1), got "
                         f"{tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__}")
    b = boxes.double()
    ys = torch.arange(height, dtype=torch.float64, device=boxes.device)
    xs = torch.arange(width, dtype=torch.float64, device=boxes.device)
    cover_y = (torch.minimum(ys[None] + 1, b[:, 3:4]) - torch.maximum(ys[None], b[:, 1:2])).clamp(0, 1)
    cover_x = (torch.minimum(xs[None] + 1, b[:, 2:3]) - torch.maximum(xs[None], b[:, 0:1])).clamp(0, 1)
    return (cover_y[:, None, :, None] * cover_x[:, None, None, :]).float()


def dino_saliency(checkpoint: str, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                  batch_size: int = 256, device=None) -> torch.Tensor:
    """Class-token attention of the teacher in an ``ssl-fast pretrain`` checkpoint, as saliency.

    The method is rebuilt from the checkpoint's config (method, arch, image size, options) and
    its weights loaded strictly; :meth:`SSLMethod.attention_maps` gives ``[B, heads, gh, gw]``,
    which is averaged over heads, upsampled bilinearly to the image and min-max normalised.

    Args:
        checkpoint: path of ``checkpoint.pth``.
        images: ``[N, 3, H, W]`` in [0, 1].
        mean, std: the normalisation the run used (its training set's ``channel_stats()``).
        batch_size: images per forward pass.
        device: where to run (default the images' device).

    Raises:
        ValueError: the checkpoint's method has no class-token attention (not a ViT teacher).
    """
    from ssl_fast.methods import MethodContext, create_method
    from ssl_fast.train.checkpoint import CheckpointError, load_checkpoint

    _check_images(images)
    ck = load_checkpoint(checkpoint, required=("config", "method"))
    cfg = ck["config"]
    ctx = MethodContext(arch=cfg["arch"], epochs=int(cfg.get("epochs") or 1), steps_per_epoch=1,
                        global_batch_size=int(cfg.get("batch_size") or 1),
                        image_size=int(cfg.get("image_size") or images.shape[-1]),
                        mean=tuple(mean), std=tuple(std), options=dict(cfg.get("options") or {}))
    method = create_method(cfg["method"], ctx)
    try:
        method.load_state_dict(ck["method"])
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint}: its weights do not fit the {cfg['method']}/{cfg['arch']} model "
                              f"its config describes ({str(e).splitlines()[0]})") from None
    device = images.device if device is None else torch.device(device)
    method.to(device).eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        att = method.attention_maps(images[i:i + batch_size].to(device))
        if att is None:
            raise ValueError(f"{checkpoint}: method {cfg['method']!r} with arch {cfg['arch']!r} has no class-token "
                             "attention maps; the 'dino' saliency source needs a ViT teacher")
        s = F.interpolate(att.float().mean(1, keepdim=True), size=images.shape[-2:], mode="bilinear",
                          align_corners=False)
        out.append(_min_max(s).clamp(0, 1).to(images.device))
    return torch.cat(out)


def _quantise(s: torch.Tensor) -> torch.Tensor:
    return (s.float().clamp(0, 1) * 255).round().to(torch.uint8)


def _sha256_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().float().numpy().tobytes()).hexdigest()


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_path(cache_dir: str, data_name: str, source: str, height: int, width: int) -> str:
    """The cache file of a (data set, source, image size): ``saliency-<data>-<source>-<H>x<W>.pt``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", data_name).strip("_") or "data"
    return os.path.join(cache_dir, f"saliency-{slug}-{source}-{height}x{width}.pt")


def compute_saliency(images: torch.Tensor, source: str, *, data_name: str = "data", cache_dir: Optional[str] = None,
                     checkpoint: Optional[str] = None, masks: Optional[torch.Tensor] = None,
                     boxes: Optional[torch.Tensor] = None, mean: Optional[Sequence[float]] = None,
                     std: Optional[Sequence[float]] = None, batch_size: int = 256, device=None) -> torch.Tensor:
    """Saliency of every image from ``source``, computed once and cached in ``cache_dir``.

    Args:
        images: ``[N, 3, H, W]`` in [0, 1] (e.g. ``ImageSet.images``).
        source: one of :data:`SOURCES`.
        data_name: the data set's name (the ``--data`` value), part of the cache key.
        cache_dir: folder of the cache file (the run's folder); None computes without caching.
        checkpoint: for ``"dino"``: the ``ssl-fast pretrain`` checkpoint.
        masks: for ``"masks"``: ``[N, 1, H, W]`` in [0, 1] (``ImageSet.masks``).
        boxes: for ``"boxes"``: ``[N, 4]`` ``(x0, y0, x1, y1)`` pixels (``ImageSet.boxes``).
        mean, std: for ``"dino"``: the run's normalisation (the training set's ``channel_stats()``).
        batch_size, device: for ``"dino"``: forward-pass batch and device.

    Returns:
        ``[N, 1, H, W]`` float32 in [0, 1], quantised to multiples of 1/255, on the images' device.

    Raises:
        ValueError: an unknown source, or the input that source needs missing or mis-shaped.
    """
    _check_images(images)
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    n, _, h, w = images.shape
    compute: Callable[[], torch.Tensor]
    extra = ""
    if source == "dino":
        if checkpoint is None or not os.path.isfile(checkpoint):
            raise ValueError(f"checkpoint must be an existing ssl-fast pretrain checkpoint for source 'dino', "
                             f"got {checkpoint!r}")
        if mean is None or std is None:
            raise ValueError("mean and std (the run's normalisation) are needed for source 'dino'")
        extra = _sha256_file(checkpoint)

        def compute():
            return dino_saliency(checkpoint, images, mean, std, batch_size, device)
    elif source == "spectral-residual":
        def compute():
            return spectral_residual(images)
    elif source == "masks":
        if not isinstance(masks, torch.Tensor) or tuple(masks.shape) != (n, 1, h, w):
            raise ValueError(f"masks must be [{n}, 1, {h}, {w}] for source 'masks', got "
                             f"{tuple(masks.shape) if isinstance(masks, torch.Tensor) else masks!r}")
        if bool(torch.isnan(masks).any()):
            raise ValueError("masks hold NaN (images whose mask file is missing); use source 'boxes' or "
                             "'spectral-residual' for this data set")

        def compute():
            return masks.float().clamp(0, 1)
    else:
        if not isinstance(boxes, torch.Tensor) or tuple(boxes.shape) != (n, 4):
            raise ValueError(f"boxes must be [{n}, 4] for source 'boxes', got "
                             f"{tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else boxes!r}")

        def compute():
            return box_saliency(boxes, h, w)

    key = {"data": data_name, "source": source, "size": (h, w), "n": n, "images_sha256": _sha256_tensor(images),
           "extra_sha256": extra}
    path = cache_path(cache_dir, data_name, source, h, w) if cache_dir is not None else None
    if path is not None and os.path.isfile(path):
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            ok = isinstance(stored, dict) and stored.get("key") == {**key, "size": list(key["size"])}
            sal = stored.get("saliency") if ok else None
            ok = ok and isinstance(sal, torch.Tensor) and sal.dtype == torch.uint8 and tuple(sal.shape) == (n, 1, h, w)
        except Exception as e:  # noqa: BLE001 - any unreadable cache is recomputed
            ok, why = False, f"unreadable ({type(e).__name__})"
        else:
            why = "made for other images, source, size or checkpoint"
        if ok:
            return sal.to(images.device).float() / 255.0
        warnings.warn(f"saliency cache {path} is {why}; recomputing it", RuntimeWarning, stacklevel=2)
    sal = _quantise(compute()).cpu()
    if path is not None:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save({"key": {**key, "size": list(key["size"])}, "saliency": sal}, tmp)
        os.replace(tmp, path)
    return sal.to(images.device).float() / 255.0


class SaliencyLookup:
    """The cached saliency of a batch's images, found by content (no row indices needed).

    The trainer hands a method only ``images[idx]`` of its device copy of the training set; this
    finds each batch image's row: a float64 random projection of every image (a key) is looked
    up among the data set's sorted keys, and the row is then confirmed by exact equality of the
    pixels, so a wrong match is impossible; an image that is not in the set raises.

    Args:
        images: ``[N, 3, H, W]`` the data set's images, on the device batches come from (the
            tensor is kept by reference, not copied).
        saliency: ``[N, 1, H, W]`` in [0, 1] (e.g. from :func:`compute_saliency`); stored as uint8
            on the images' device.

    Example:
        >>> imgs = torch.rand(10, 3, 8, 8)
        >>> lookup = SaliencyLookup(imgs, torch.rand(10, 1, 8, 8))
        >>> lookup.rows_of(imgs[[3, 1]]).tolist()
        [3, 1]
    """

    def __init__(self, images: torch.Tensor, saliency: torch.Tensor):
        _check_images(images)
        n, _, h, w = images.shape
        if not isinstance(saliency, torch.Tensor) or tuple(saliency.shape) != (n, 1, h, w):
            raise ValueError(f"saliency must be [{n}, 1, {h}, {w}] like the images, got "
                             f"{tuple(saliency.shape) if isinstance(saliency, torch.Tensor) else type(saliency).__name__}")
        self.images = images
        self.saliency = _quantise(saliency).to(images.device)
        g = torch.Generator().manual_seed(0x5A11E)
        self._proj = torch.randn(images[0].numel(), dtype=torch.float64, generator=g).to(images.device)
        keys = torch.cat([self._keys(images[i:i + 1024]) for i in range(0, n, 1024)])
        self._sorted, self._order = keys.sort()

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).double() @ self._proj

    def rows_of(self, batch: torch.Tensor) -> torch.Tensor:
        """Row in the data set of each image of ``batch [b, 3, H, W]`` (int64, on the images' device).

        Raises:
            ValueError: a batch image equal to no image of the data set (augmented, or another set).
        """
        if not isinstance(batch, torch.Tensor) or batch.dim() != 4 or batch.shape[1:] != self.images.shape[1:]:
            raise ValueError(f"batch must be [b, {', '.join(str(s) for s in self.images.shape[1:])}], got "
                             f"{tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__}")
        batch = batch.to(self.images.device)
        key = self._keys(batch)
        pos = torch.searchsorted(self._sorted, key).clamp(1, len(self._sorted) - 1)
        nearer_left = (key - self._sorted[pos - 1]).abs() <= (self._sorted[pos] - key).abs()
        pos = torch.where(nearer_left, pos - 1, pos)
        rows = self._order[pos]
        same = (self.images[rows] == batch).reshape(batch.shape[0], -1).all(1)
        if not bool(same.all()):
            bad = torch.nonzero(~same).flatten()[:5].tolist()
            raise ValueError(f"batch images {bad} equal no image of the data set (the lookup needs the stored, "
                             "un-augmented images; augment after looking the saliency up)")
        return rows

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """``[b, 1, H, W]`` float32 saliency of ``batch``'s images, on their device."""
        rows = self.rows_of(batch)
        return (self.saliency[rows].float() / 255.0).to(batch.device)
