"""In-memory image datasets: embedded digits, an image folder, CIFAR-10 python batches.

Every loader returns :class:`ImageSet` objects holding ``images [N, 3, H, W]`` float32 in [0, 1]
and ``labels [N]`` int64. The sets are small enough to live in memory, which lets the trainer
augment whole batches on the training device and makes the data order a pure function of the seed.
"""
import os
import pickle
import struct
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class ImageSet:
    """A labelled set of images held in memory.

    Attributes:
        images: ``[N, 3, H, W]`` float32 in [0, 1].
        labels: ``[N]`` int64 class indices.
        classes: class names, ``classes[labels[i]]`` is image i's class.
        name: short description for logs.
        masks: optional ``[N, 1, H, W]`` float32 foreground masks in [0, 1] (segmentations, or the
            exact masks of a synthetic set); None where the data set has none.
        boxes: optional ``[N, 4]`` float32 object boxes ``(x0, y0, x1, y1)`` in pixels of the stored
            ``H x W`` image (pixel ``(x, y)`` covers ``[x, x+1) x [y, y+1)``); None where there are none.
    """
    images: torch.Tensor
    labels: torch.Tensor
    classes: List[str] = field(default_factory=list)
    name: str = ""
    masks: Optional[torch.Tensor] = None
    boxes: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be [{self.images.shape[0]}], got {tuple(self.labels.shape)}")
        n, _, h, w = self.images.shape
        if self.masks is not None and tuple(self.masks.shape) != (n, 1, h, w):
            raise ValueError(f"masks must be [{n}, 1, {h}, {w}] like the images, got {tuple(self.masks.shape)}")
        if self.boxes is not None and tuple(self.boxes.shape) != (n, 4):
            raise ValueError(f"boxes must be [{n}, 4] (x0, y0, x1, y1), got {tuple(self.boxes.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def channel_stats(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        """Per-channel mean and standard deviation (for normalisation)."""
        x = self.images.double()
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return tuple(mean.tolist()), tuple(std.tolist())


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: indices ``(train, test)``, each sorted.

    Every class contributes ``round(test_fraction * n_class)`` images (at least one when it has
    two or more) to the test set, chosen by a NumPy generator seeded with ``seed``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(test_fraction * len(idx)))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _to_rgb_tensor(images: np.ndarray, size: Optional[int]) -> torch.Tensor:
    """``[N, H, W]`` or ``[N, H, W, C]`` array in [0, 1] -> ``[N, 3, size, size]`` float32."""
    x = torch.as_tensor(np.ascontiguousarray(images), dtype=torch.float32)
    if x.dim() == 3:
        x = x[:, None]
    else:
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:
        x = x[:, :3]
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)
    return x.clamp(0.0, 1.0).contiguous()


def load_digits(image_size: int = 32, test_fraction: float = 0.2, split_seed: int = 0) -> Tuple[ImageSet, ImageSet]:
    """scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels; shipped with scikit-learn).

    Upsampled bicubically to ``image_size`` and repeated to 3 channels; split stratified into
    train and held-out sets (80/20 by default) with a fixed seed, so the split never changes.

    Returns:
        ``(train, test)`` image sets.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    images = d.images.astype(np.float32) / 16.0
    labels = d.target.astype(np.int64)
    tr, te = stratified_split(labels, test_fraction, split_seed)
    x = _to_rgb_tensor(images, image_size)
    y = torch.as_tensor(labels)
    classes = [str(i) for i in range(10)]
    return (ImageSet(x[tr], y[tr], classes, f"digits-train ({len(tr)} images, {image_size}px)"),
            ImageSet(x[te], y[te], classes, f"digits-test ({len(te)} images, {image_size}px)"))


class ImageLoadError(ValueError):
    """An image file that cannot be decoded, or whose pixel format cannot be turned into RGB.

    The message starts with the file's path.
    """


class BadImageWarning(UserWarning):
    """Warned once per image file skipped by ``bad_images="skip"``; the message names the file."""


#: What :func:`load_image_folder` does with a file it cannot read: skip it with a
#: :class:`BadImageWarning` naming it (the default), or stop with an :class:`ImageLoadError`.
BAD_IMAGE_POLICIES = ("skip", "error")

# what Pillow's decoders raise for unreadable, truncated or hostile files
_DECODE_ERRORS = (OSError, ValueError, TypeError, SyntaxError, EOFError, IndexError, struct.error)


def _alpha_over_black(rgba: np.ndarray) -> np.ndarray:
    """``[H, W, 4]`` (or ``[H, W, 2]`` grey + alpha) in [0, 1] -> colour times alpha (composited over black)."""
    return rgba[..., :-1] * rgba[..., -1:]


def _pil_to_array(im, path: str) -> np.ndarray:
    """A decoded PIL image as ``[H, W, 3]`` float32 in [0, 1], whatever its pixel format.

    * 8-bit ``L``, ``RGB``, ``1``, ``CMYK``, ``YCbCr``, ``HSV``, ``RGBX``: Pillow's RGB conversion;
    * 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``): divided by 65535;
    * 32-bit integer grey (``I``, how some decoders give 16-bit files): values must lie in
      0..65535 and are divided by 65535;
    * 32-bit float grey (``F``): values must lie in [0, 1];
    * alpha (``RGBA``, ``LA``, ``PA``, palette images with a transparent colour...): the colour
      is composited over black, so a fully transparent pixel is black whatever colour it stores.

    Raises:
        ImageLoadError: a format with no defined mapping to [0, 1] RGB (values out of range,
            non-finite floats, a conversion Pillow does not have), naming ``path``.
    """
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        a = np.asarray(im).astype(np.float32) / 65535.0
        return np.repeat(a[..., None], 3, axis=-1)
    if mode in ("I", "F"):
        a = np.asarray(im)
        if mode == "I":
            lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
            if lo < 0 or hi > 65535:
                raise ImageLoadError(f"{path}: 32-bit integer pixels range over {lo}..{hi}; only 0..65535 "
                                     "(16-bit images) has a defined mapping to [0, 1]")
            a = a.astype(np.float32) / 65535.0
        else:
            a = a.astype(np.float32)
            if a.size and not (np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0):
                raise ImageLoadError(f"{path}: floating-point pixels must be finite and in [0, 1], got the range "
                                     f"{float(np.nanmin(a))}..{float(np.nanmax(a))}")
        return np.repeat(a[..., None], 3, axis=-1)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    try:
        conv = im.convert("RGBA" if has_alpha else "RGB")
    except ValueError as e:  # e.g. LAB: Pillow has no conversion to RGB
        raise ImageLoadError(f"{path}: pixel format {mode!r} cannot be converted to RGB ({e})") from None
    a = np.asarray(conv, dtype=np.float32) / 255.0
    return _alpha_over_black(a) if has_alpha else a


def _read_image(path: str) -> np.ndarray:
    """An image file as ``[H, W, 3]`` float32 in [0, 1] (Pillow; EXIF orientation applied).

    See :func:`_pil_to_array` for how each pixel format maps to RGB. Multi-frame files
    (animated GIF, multi-page TIFF) give their first frame.

    Raises:
        ImageLoadError: the file cannot be decoded (corrupt, truncated, not an image) or its
            pixel format cannot be used; the message starts with ``path``.
        ModuleNotFoundError: Pillow is not installed.
    """
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ModuleNotFoundError("reading an image folder needs Pillow: pip install pillow") from None
    try:
        with Image.open(path) as im:
            im.load()
            try:
                im = ImageOps.exif_transpose(im)
            except _DECODE_ERRORS:  # a broken orientation tag: keep the stored orientation
                pass
            return _pil_to_array(im, path)
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError,) + _DECODE_ERRORS as e:
        raise ImageLoadError(f"{path}: cannot be read as an image ({type(e).__name__}: {e})") from None


def load_image_folder(root: str, image_size: int = 32, test_fraction: float = 0.2,
                      split_seed: int = 0, bad_images: str = "skip") -> Tuple[ImageSet, ImageSet]:
    """An image folder with one subfolder per class (``root/<class>/<image>``), resized to ``image_size``.

    If ``root`` holds ``train/`` and ``val/`` (or ``test/``) folders, those are the split, and
    every class folder of the held-out split must also be a class of ``train/``; otherwise the
    images are split stratified like the digits. Hidden folders (``.name``) are not classes.
    Every pixel format Pillow reads is used (see :func:`_pil_to_array`: 16-bit, palette, CMYK,
    grey and alpha images included) or refused by name.

    Args:
        root: the folder.
        image_size: side every image is resized to (bicubic).
        test_fraction: held-out share of each class when there is no train/val layout.
        split_seed: seed of that split.
        bad_images: ``"skip"`` (default): a file that cannot be read is left out with a
            :class:`BadImageWarning` naming it; ``"error"``: it stops the load with an
            :class:`ImageLoadError` naming it.

    Raises:
        FileNotFoundError: ``root`` missing, or no class subfolder with images.
        ImageLoadError: an unreadable image under ``bad_images="error"``.
        ValueError: a held-out class missing from ``train/``, no held-out image left by the
            stratified split (every class has a single image), or an unknown ``bad_images``.
    """
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {bad_images!r}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"data folder {root!r} does not exist (expected one subfolder per class)")
    held = next((s for s in ("val", "test") if os.path.isdir(os.path.join(root, s))), None)
    if os.path.isdir(os.path.join(root, "train")) and held:
        train_dir, held_dir = os.path.join(root, "train"), os.path.join(root, held)
        train, classes = _read_folder(train_dir, image_size, None, bad_images)
        unknown = [c for c in _class_folders(held_dir) if c not in classes]
        if unknown:
            raise ValueError(f"data folder {root!r}: {held}/ has {len(unknown)} class folder(s) that train/ lacks: "
                             f"{', '.join(unknown)}; every {held}/ class must also be a train/ class "
                             f"(train/ has: {', '.join(classes)})")
        test, _ = _read_folder(held_dir, image_size, classes, bad_images)
        return (ImageSet(train[0], train[1], classes, f"{root}/train ({len(train[1])} images)"),
                ImageSet(test[0], test[1], classes, f"{root}/{held} ({len(test[1])} images)"))
    (x, y), classes = _read_folder(root, image_size, None, bad_images)
    tr, te = stratified_split(y.numpy(), test_fraction, split_seed)
    if len(te) == 0:
        raise ValueError(f"data folder {root!r}: no class has two or more images ({len(y)} images in "
                         f"{len(classes)} classes), so the stratified split leaves no held-out image for the "
                         f"k-NN evaluation; give at least two images in some class, or train/ and val/ folders")
    return (ImageSet(x[tr], y[tr], classes, f"{root} train split ({len(tr)} images)"),
            ImageSet(x[te], y[te], classes, f"{root} held-out split ({len(te)} images)"))


def _class_folders(root: str) -> List[str]:
    """Sorted names of the non-hidden subfolders of ``root``."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _read_folder(root: str, image_size: int, classes: Optional[List[str]], bad_images: str = "skip"):
    if classes is None:
        classes = _class_folders(root)
    if not classes:
        raise FileNotFoundError(f"data folder {root!r} has no class subfolders (expected {root}/<class>/<image>)")
    images, labels, skipped = [], [], 0
    for ci, c in enumerate(classes):
        folder = os.path.join(root, c)
        if not os.path.isdir(folder):
            continue
        for fname in sorted(os.listdir(folder)):
            if not fname.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(folder, fname)
            try:
                pixels = _read_image(path)
            except ImageLoadError as e:
                if bad_images == "error":
                    raise
                warnings.warn(f"skipped {e}", BadImageWarning, stacklevel=2)
                skipped += 1
                continue
            images.append(_to_rgb_tensor(pixels[None], image_size))
            labels.append(ci)
    if not images:
        why = f" ({skipped} unreadable files skipped)" if skipped else ""
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under the class folders of {root!r}{why}")
    return (torch.cat(images), torch.tensor(labels, dtype=torch.int64)), classes


def load_cifar10(root: str, image_size: int = 32) -> Tuple[ImageSet, ImageSet]:
    """CIFAR-10 from the python pickles (``data_batch_1..5`` and ``test_batch``) the user has.

    ``root`` is the ``cifar-10-batches-py`` folder or its parent. Nothing is downloaded.

    Raises:
        FileNotFoundError: the folder or a batch file is missing.
    """
    cand = [root, os.path.join(root, "cifar-10-batches-py")]
    folder = next((c for c in cand if os.path.isfile(os.path.join(c, "data_batch_1"))), None)
    if folder is None:
        raise FileNotFoundError(f"no CIFAR-10 python batches in {root!r} (looked for data_batch_1..5 and "
                                "test_batch there and in its cifar-10-batches-py/ subfolder)")
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 folder {folder!r} lacks {', '.join(missing)}")

    def read(n):
        with open(os.path.join(folder, n), "rb") as f:
            d = pickle.load(f, encoding="bytes")
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return x.astype(np.float32) / 255.0, np.asarray(d[b"labels"], dtype=np.int64)

    parts = [read(n) for n in names[:5]]
    xtr, ytr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    xte, yte = read("test_batch")
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    meta = os.path.join(folder, "batches.meta")
    if os.path.isfile(meta):
        with open(meta, "rb") as f:
            classes = [c.decode() for c in pickle.load(f, encoding="bytes")[b"label_names"]]
    return (ImageSet(_to_rgb_tensor(xtr, image_size), torch.as_tensor(ytr), classes, f"cifar10-train ({len(ytr)})"),
            ImageSet(_to_rgb_tensor(xte, image_size), torch.as_tensor(yte), classes, f"cifar10-test ({len(yte)})"))


def load_dataset(spec: str, image_size: Optional[int] = None, bad_images: str = "skip") -> Tuple[ImageSet, ImageSet]:
    """Resolve a ``--data`` value: ``digits``, ``cluttered-digits``, ``cifar10:<folder>``, ``cub:<folder>``,
    ``cars:<folder>``, ``aircraft:<folder>`` or an image-folder path.

    Args:
        spec: the data specification.
        image_size: side the images are resized to (default: 32).
        bad_images: what an image folder does with an unreadable file: ``"skip"`` it with a
            :class:`BadImageWarning` naming it, or stop with an :class:`ImageLoadError` (``"error"``).

    Raises:
        FileNotFoundError: a folder that does not exist or holds no usable data.
        ValueError: a bad image folder (see :func:`load_image_folder`) or a bare ``cifar10``.
    """
    size = 32 if image_size is None else image_size
    if spec == "digits":
        return load_digits(size)
    if spec == "cluttered-digits":
        from ssl_fast.data.cluttered_digits import load_cluttered_digits
        return load_cluttered_digits(size)
    for prefix in ("cub", "cars", "aircraft"):
        if spec == prefix or spec.startswith(prefix + ":"):
            from ssl_fast.data.finegrained import load_finegrained
            return load_finegrained(prefix, spec[len(prefix) + 1:], size, bad_images=bad_images)
    if spec.startswith("cifar10:"):
        return load_cifar10(spec[len("cifar10:"):], size)
    if spec == "cifar10":
        raise ValueError("give the CIFAR-10 folder as --data cifar10:/path/to/cifar-10-batches-py")
    return load_image_folder(spec, size, bad_images=bad_images)
