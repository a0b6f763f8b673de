"""Fine-grained data sets in their published layouts: CUB-200-2011, Stanford Cars, FGVC-Aircraft.

Each loader reads the user's copy (nothing is downloaded), resizes every image to a square
``image_size`` like :func:`ssl_fast.data.datasets.load_image_folder`, and returns the official
train and test splits as :class:`~ssl_fast.data.datasets.ImageSet` s with the object boxes (all
three sets have them) scaled to the stored image, and CUB's segmentation masks when the
``segmentations/`` folder is there. Boxes are ``(x0, y0, x1, y1)`` in stored-image pixels, pixel
``(x, y)`` covering ``[x, x+1) x [y, y+1)``.

Layouts (the folder given, or its parent holding it, as torchvision expects):

* CUB-200-2011 (``CUB_200_2011/``): ``images.txt`` (``<id> <class>/<file>.jpg``),
  ``image_class_labels.txt`` (``<id> <class 1..200>``), ``train_test_split.txt``
  (``<id> <1 train | 0 test>``), ``bounding_boxes.txt`` (``<id> <x> <y> <width> <height>``, 0-based
  pixels), ``classes.txt``, ``images/``; optionally ``segmentations/<class>/<file>.png`` (grey
  0..255, beside ``CUB_200_2011/`` as the separate archive unpacks, or inside it).
* Stanford Cars (``stanford_cars/``): ``devkit/cars_meta.mat`` (``class_names``),
  ``devkit/cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat`` (``annotations`` with
  ``bbox_x1, bbox_y1, bbox_x2, bbox_y2`` (1-based, inclusive), ``class`` (1-based), ``fname``),
  ``cars_train/``, ``cars_test/``.
* FGVC-Aircraft (``fgvc-aircraft-2013b/``): ``data/images/<id>.jpg``,
  ``data/images_<level>_<split>.txt`` (``<id> <name with spaces>``), ``data/variants.txt``,
  ``families.txt``, ``manufacturers.txt``, ``data/images_box.txt`` (``<id> <xmin> <ymin> <xmax>
  <ymax>``, 1-based, inclusive). The bottom 20 rows of every image are the copyright banner,
  which is cut off by default (as the data set's README advises).
"""
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ssl_fast.data.datasets import (BAD_IMAGE_POLICIES, BadImageWarning, ImageLoadError, ImageSet, _read_image,
                                    _to_rgb_tensor)

#: the ``--data`` prefixes this module serves
FINEGRAINED = ("cub", "cars", "aircraft")
AIRCRAFT_BANNER = 20


def _find_base(root: str, name: str, marker: str) -> str:
    """``root`` itself if it holds ``marker``, else ``root/name`` if that does."""
    if not root:
        raise ValueError(f"give the data set's folder, e.g. --data {name.split('_')[0].lower()}:/path/to/{name}")
    for cand in (root, os.path.join(root, name)):
        if os.path.exists(os.path.join(cand, marker)):
            return cand
    raise FileNotFoundError(f"no {name} layout under {root!r}: looked for {marker} in {root!r} and in "
                            f"{os.path.join(root, name)!r}")


def _read_table(path: str, columns: int, what: str) -> Dict[str, List[str]]:
    """``<id> <value...>`` lines -> {id: [values]} (the last column keeps its spaces when ``columns`` is 2)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {path} is missing")
    out: Dict[str, List[str]] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(" ", 1) if columns == 2 else line.split()
            if len(parts) != columns:
                raise ValueError(f"{path}, line {n}: expected {columns} fields, got {line!r}")
            out[parts[0]] = parts[1:]
    return out


def _resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    m = torch.as_tensor(np.ascontiguousarray(mask), dtype=torch.float32)[None, None]
    return F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)[0]


def _read_mask(path: str) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            a = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageLoadError(f"{path}: cannot be read as a mask ({type(e).__name__}: {e})") from None
    return a


def _load_items(items: Sequence[Tuple[str, int, Optional[Sequence[float]], Optional[str]]], image_size: int,
                bad_images: str, crop_bottom: int = 0):
    """Read ``(path, label, box (x0, y0, x1, y1) in original pixels or None, mask path or None)`` items.

    Returns ``(images, labels, boxes or None, masks or None)``; boxes are scaled to the stored size.
    """
    images, labels, boxes, masks, skipped = [], [], [], [], 0
    with_masks = any(it[3] is not None for it in items)
    for path, label, box, mask_path in items:
        try:
            pixels = _read_image(path)
            if crop_bottom:
                if pixels.shape[0] <= crop_bottom:
                    raise ImageLoadError(f"{path}: {pixels.shape[0]} rows leave nothing once the "
                                         f"{crop_bottom}-row banner is cut off")
                pixels = pixels[:-crop_bottom]
            m = None
            if with_masks:
                m = _read_mask(mask_path) if mask_path is not None and os.path.isfile(mask_path) else None
                if m is not None and m.shape[:2] != pixels.shape[:2]:
                    raise ImageLoadError(f"{mask_path}: mask is {m.shape[1]}x{m.shape[0]} but its image is "
                                         f"{pixels.shape[1]}x{pixels.shape[0]}")
        except ImageLoadError as e:
            if bad_images == "error":
                raise
            warnings.warn(f"skipped {e}", BadImageWarning, stacklevel=3)
            skipped += 1
            continue
        h, w = pixels.shape[:2]
        images.append(_to_rgb_tensor(pixels[None], image_size))
        labels.append(label)
        if box is not None:
            x0, y0, x1, y1 = (float(v) for v in box)
            x0, x1 = min(max(x0, 0.0), w), min(max(x1, 0.0), w)
            y0, y1 = min(max(y0, 0.0), h), min(max(y1, 0.0), h)
            boxes.append([x0 * image_size / w, y0 * image_size / h, x1 * image_size / w, y1 * image_size / h])
        if with_masks:
            # an image whose mask file is missing gets a NaN mask (unknown), never an empty one
            masks.append(_resize_mask(m, image_size) if m is not None
                         else torch.full((1, image_size, image_size), float("nan")))
    if not images:
        raise FileNotFoundError(f"no readable images ({skipped} skipped) among {len(items)} listed")
    box_t = torch.tensor(boxes, dtype=torch.float32) if len(boxes) == len(images) else None
    mask_t = torch.stack(masks) if with_masks else None
    return torch.cat(images), torch.tensor(labels, dtype=torch.int64), box_t, mask_t


def _image_set(parts, classes, name) -> ImageSet:
    x, y, boxes, masks = parts
    return ImageSet(x, y, classes, f"{name} ({len(y)} images, {x.shape[-1]}px)", masks=masks, boxes=boxes)


def load_cub(root: str, image_size: int = 224, bad_images: str = "skip") -> Tuple[ImageSet, ImageSet]:
    """CUB-200-2011's official train/test split, with boxes and (where present) segmentation masks.

    Args:
        root: the ``CUB_200_2011`` folder or its parent.
        image_size: stored side.
        bad_images: ``"skip"`` unreadable files with a warning, or ``"error"``.

    Returns:
        ``(train, test)``; ``masks`` is None without a ``segmentations/`` folder (an image whose
        mask file is missing gets a NaN mask).
    """
    base = _find_base(root, "CUB_200_2011", "images.txt")
    paths = _read_table(os.path.join(base, "images.txt"), 2, "CUB-200-2011")
    labels = _read_table(os.path.join(base, "image_class_labels.txt"), 2, "CUB-200-2011")
    split = _read_table(os.path.join(base, "train_test_split.txt"), 2, "CUB-200-2011")
    bbox = _read_table(os.path.join(base, "bounding_boxes.txt"), 5, "CUB-200-2011")
    cls_file = os.path.join(base, "classes.txt")
    names = {int(k): v[0] for k, v in _read_table(cls_file, 2, "CUB-200-2011").items()} if os.path.isfile(cls_file) else {}
    seg = next((d for d in (os.path.join(base, "segmentations"), os.path.join(os.path.dirname(os.path.abspath(base)),
                                                                                "segmentations")) if os.path.isdir(d)), None)
    n_cls = max(int(v[0]) for v in labels.values())
    classes = [names.get(c, str(c)) for c in range(1, n_cls + 1)]
    parts: Dict[str, list] = {"1": [], "0": []}
    for img_id in sorted(paths, key=int):
        for table, what in ((labels, "image_class_labels.txt"), (split, "train_test_split.txt"),
                            (bbox, "bounding_boxes.txt")):
            if img_id not in table:
                raise ValueError(f"CUB-200-2011 at {base}: image {img_id} is missing from {what}")
        rel = paths[img_id][0]
        x, y, w, h = (float(v) for v in bbox[img_id])
        mask = os.path.join(seg, os.path.splitext(rel)[0] + ".png") if seg else None
        flag = split[img_id][0]
        if flag not in parts:
            raise ValueError(f"CUB-200-2011 at {base}: train_test_split.txt gives {flag!r} for image {img_id}, need 1 or 0")
        parts[flag].append((os.path.join(base, "images", rel), int(labels[img_id][0]) - 1, (x, y, x + w, y + h), mask))
    out = [_load_items(parts[f], image_size, bad_images) for f in ("1", "0")]
    return _image_set(out[0], classes, "cub-train"), _image_set(out[1], classes, "cub-test")


def _mat_annotations(path: str) -> List[Dict[str, object]]:
    from scipy.io import loadmat

    if not os.path.isfile(path):
        raise FileNotFoundError(f"Stanford Cars: {path} is missing")
    ann = np.atleast_1d(loadmat(path, squeeze_me=True)["annotations"])
    fields = ann.dtype.names or ()
    need = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    missing = [f for f in need if f not in fields]
    if missing:
        raise ValueError(f"{path}: annotations lack {', '.join(missing)} (has {', '.join(fields)})")
    return [{f: a[f] for f in need} for a in ann]


def load_cars(root: str, image_size: int = 224, bad_images: str = "skip") -> Tuple[ImageSet, ImageSet]:
    """Stanford Cars' train and test sets with their boxes (the devkit's ``.mat`` annotations).

    Args:
        root: the ``stanford_cars`` folder (holding ``devkit/``) or its parent.
        image_size: stored side.
        bad_images: ``"skip"`` unreadable files with a warning, or ``"error"``.
    """
    from scipy.io import loadmat

    base = _find_base(root, "stanford_cars", "devkit")
    devkit = os.path.join(base, "devkit")
    classes = [str(c) for c in np.atleast_1d(loadmat(os.path.join(devkit, "cars_meta.mat"), squeeze_me=True)["class_names"])]
    test_mat = next((p for p in (os.path.join(base, "cars_test_annos_withlabels.mat"),
                                 os.path.join(devkit, "cars_test_annos_withlabels.mat")) if os.path.isfile(p)), None)
    if test_mat is None:
        raise FileNotFoundError(f"Stanford Cars at {base}: cars_test_annos_withlabels.mat (the test labels) is in "
                                "neither the folder nor devkit/")
    out = []
    for ann_path, folder in ((os.path.join(devkit, "cars_train_annos.mat"), "cars_train"), (test_mat, "cars_test")):
        items = []
        for a in _mat_annotations(ann_path):
            c = int(a["class"])
            if not 1 <= c <= len(classes):
                raise ValueError(f"{ann_path}: class {c} of {a['fname']} is outside 1..{len(classes)}")
            box = (float(a["bbox_x1"]) - 1, float(a["bbox_y1"]) - 1, float(a["bbox_x2"]), float(a["bbox_y2"]))
            items.append((os.path.join(base, folder, str(a["fname"])), c - 1, box, None))
        out.append(_image_set(_load_items(items, image_size, bad_images), classes, folder.replace("_", "-")))
    return out[0], out[1]


AIRCRAFT_LEVELS = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}


def load_aircraft(root: str, image_size: int = 224, annotation_level: str = "variant", train_split: str = "trainval",
                  bad_images: str = "skip", crop_banner: bool = True) -> Tuple[ImageSet, ImageSet]:
    """FGVC-Aircraft's ``train_split`` and test sets at one annotation level, with boxes.

    Args:
        root: the ``fgvc-aircraft-2013b`` folder (holding ``data/``) or its parent.
        image_size: stored side.
        annotation_level: ``variant`` (100 classes), ``family`` (70) or ``manufacturer`` (30).
        train_split: ``trainval`` (the usual choice), ``train`` or ``val``.
        bad_images: ``"skip"`` unreadable files with a warning, or ``"error"``.
        crop_banner: cut the 20-row copyright banner off the bottom of every image.
    """
    if annotation_level not in AIRCRAFT_LEVELS:
        raise ValueError(f"annotation_level must be one of {', '.join(AIRCRAFT_LEVELS)}, got {annotation_level!r}")
    if train_split not in ("trainval", "train", "val"):
        raise ValueError(f"train_split must be trainval, train or val, got {train_split!r}")
    base = _find_base(root, "fgvc-aircraft-2013b", "data")
    data = os.path.join(base, "data")
    cls_path = os.path.join(data, AIRCRAFT_LEVELS[annotation_level])
    if not os.path.isfile(cls_path):
        raise FileNotFoundError(f"FGVC-Aircraft: {cls_path} is missing")
    with open(cls_path, encoding="utf-8") as f:
        classes = [line.strip() for line in f if line.strip()]
    index = {c: i for i, c in enumerate(classes)}
    boxes = _read_table(os.path.join(data, "images_box.txt"), 5, "FGVC-Aircraft")
    out = []
    for split in (train_split, "test"):
        path = os.path.join(data, f"images_{annotation_level}_{split}.txt")
        items = []
        for img_id, (name,) in _read_table(path, 2, "FGVC-Aircraft").items():
            if name not in index:
                raise ValueError(f"{path}: class {name!r} of image {img_id} is not in {cls_path}")
            if img_id not in boxes:
                raise ValueError(f"FGVC-Aircraft: image {img_id} is missing from images_box.txt")
            x0, y0, x1, y1 = (float(v) for v in boxes[img_id])
            items.append((os.path.join(data, "images", img_id + ".jpg"), index[name], (x0 - 1, y0 - 1, x1, y1), None))
        out.append(_image_set(_load_items(items, image_size, bad_images, AIRCRAFT_BANNER if crop_banner else 0),
                              classes, f"aircraft-{annotation_level}-{split}"))
    return out[0], out[1]


def load_finegrained(kind: str, root: str, image_size: int = 224, bad_images: str = "skip") -> Tuple[ImageSet, ImageSet]:
    """``--data cub:<root>``, ``cars:<root>`` or ``aircraft:<root>`` (variant level, trainval/test)."""
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {bad_images!r}")
    if kind not in FINEGRAINED:
        raise ValueError(f"kind must be one of {', '.join(FINEGRAINED)}, got {kind!r}")
    if not root:
        raise ValueError(f"give the {kind} folder as --data {kind}:/path/to/it")
    if kind == "cub":
        return load_cub(root, image_size, bad_images)
    if kind == "cars":
        return load_cars(root, image_size, bad_images)
    return load_aircraft(root, image_size, bad_images=bad_images)
