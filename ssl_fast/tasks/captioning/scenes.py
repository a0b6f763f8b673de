"""Embedded captioning scenes: two or three handwritten digits on a canvas, with captions and boxes.

The digits are scikit-learn's 8x8 handwritten digits (shipped with scikit-learn, as
:func:`ssl_fast.data.datasets.load_digits` uses). A scene places 2 or 3 digits of distinct
classes in a row (left to right) or a column (top to bottom), their boxes separated along that
axis and overlapping across it, so the relation between neighbours is unambiguous. The grammar:

* row: ``a 3 left of a 7``; three digits: ``a 3 left of a 7 left of a 5``;
* column: ``a 3 above a 7``; three digits: ``a 3 above a 7 above a 5``.

The caption reads the digits in order (left to right, top to bottom); ``readings="both"`` adds
the backward reading (``a 7 right of a 3``) as a second reference. The true box of each named
digit is kept. Scenes are
a pure function of ``(seed, split)``: train scenes use the digits' training images, val and test
scenes two disjoint halves of the held-out images (handwriting never seen in training).
Nothing is stored: the generator ships, not the images.
"""
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ssl_fast.data.datasets import stratified_split
from ssl_fast.tasks.captioning.data import Box, CaptionSet

SPLITS = ("train", "val", "test")
_SPLIT_ID = {"train": 0, "val": 1, "test": 2}
RELATIONS = {0: ("left of", "right of"), 1: ("above", "below")}  # axis 0: x (row), axis 1: y (column)


def _digit_pools(digit_size: int, split_seed: int = 0):
    """``{split: (images [n, s, s] float32 in [0, 1], labels [n])}`` of scikit-learn's digits."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    x = torch.as_tensor(d.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(digit_size, digit_size), mode="bicubic", align_corners=False)[:, 0].clamp(0, 1)
    y = d.target.astype(np.int64)
    train, held = stratified_split(y, 0.2, split_seed)
    # held-out digits: alternate halves per class for val and test
    val, test = [], []
    for c in range(10):
        idx = held[y[held] == c]
        val.append(idx[0::2])
        test.append(idx[1::2])
    val, test = np.sort(np.concatenate(val)), np.sort(np.concatenate(test))
    return {name: (x[idx].numpy(), y[idx]) for name, idx in (("train", train), ("val", val), ("test", test))}


def _positions(rng: np.random.Generator, n: int, canvas: int, size: int) -> List[int]:
    """``n`` sorted offsets along an axis: boxes of ``size`` apart by >= 1 pixel, inside ``canvas``."""
    slack = canvas - n * size - (n - 1)
    if slack < 0:
        raise ValueError(f"{n} digits of {size} px do not fit a {canvas}-px canvas")
    # split the slack at random among the n + 1 gaps
    cuts = np.sort(rng.integers(0, slack + 1, size=n))
    pos, prev_cut = [], 0
    x = 0
    for i in range(n):
        x += int(cuts[i] - prev_cut) + (1 if i else 0)
        pos.append(x)
        x += size
        prev_cut = int(cuts[i])
    return pos


def caption_for(digits: Sequence[int], axis: int) -> Tuple[List[str], List[str]]:
    """The two readings of a chain of digits along ``axis`` (0: left to right, 1: top to bottom).

    Returns:
        ``(forward, backward)`` token lists, e.g. ``a 3 left of a 7`` and ``a 7 right of a 3``.
    """
    fwd, bwd = RELATIONS[axis]

    def chain(ds, rel):
        out = ["a", str(ds[0])]
        for d in ds[1:]:
            out += rel.split() + ["a", str(d)]
        return out

    return chain(list(digits), fwd), chain(list(digits)[::-1], bwd)


def make_scenes(n: int, split: str = "train", seed: int = 0, image_size: int = 32, digit_size: int = 10,
                min_digits: int = 2, max_digits: int = 3, readings: str = "forward") -> CaptionSet:
    """Generate ``n`` scenes of one split; deterministic in ``(seed, split)`` and the sizes.

    Args:
        n: number of scenes.
        split: ``train``, ``val`` or ``test`` (which digit images are drawn).
        seed: generator seed.
        image_size: canvas side in pixels.
        digit_size: side each digit is drawn at (bicubic from 8x8).
        min_digits, max_digits: digits per scene, drawn uniformly in this range (2..3 by default).
        readings: ``forward`` (one caption in reading order: left to right, top to bottom) or
            ``both`` (also the backward reading, ``a 7 right of a 3``, as a second reference).

    Returns:
        A :class:`CaptionSet` with images ``[n, 3, image_size, image_size]`` in [0, 1], one or
        two references per scene and ``boxes[i]`` = ``[(digit word, (x0, y0, x1, y1)), ...]`` in the
        caption's forward order, ends exclusive.
    """
    if readings not in ("forward", "both"):
        raise ValueError(f"readings must be 'forward' or 'both', got {readings!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    if not 1 <= min_digits <= max_digits <= 10:
        raise ValueError(f"need 1 <= min_digits <= max_digits <= 10, got {min_digits}, {max_digits}")
    if digit_size < 4 or max_digits * digit_size + max_digits - 1 > image_size:
        raise ValueError(f"{max_digits} digits of digit_size {digit_size} px do not fit image_size {image_size}; "
                         f"need image_size >= {max_digits * digit_size + max_digits - 1} and digit_size >= 4")
    pool_x, pool_y = _digit_pools(digit_size)[split]
    by_class = [np.flatnonzero(pool_y == c) for c in range(10)]
    rng = np.random.default_rng([seed, _SPLIT_ID[split], image_size, digit_size])
    canvas = np.zeros((n, image_size, image_size), dtype=np.float32)
    refs: List[List[List[str]]] = []
    boxes: List[List[Box]] = []
    s = digit_size
    for i in range(n):
        k = int(rng.integers(min_digits, max_digits + 1))
        digits = rng.choice(10, size=k, replace=False).tolist()
        axis = int(rng.integers(0, 2))
        along = _positions(rng, k, image_size, s)
        # across the axis: a common offset plus a jitter of at most a third of a digit
        base = int(rng.integers(0, image_size - s + 1))
        j = s // 3
        across = [int(np.clip(base + rng.integers(-j, j + 1), 0, image_size - s)) for _ in range(k)]
        scene_boxes: List[Box] = []
        for d, a, c in zip(digits, along, across):
            x0, y0 = (a, c) if axis == 0 else (c, a)
            img = pool_x[by_class[d][rng.integers(0, len(by_class[d]))]]
            region = canvas[i, y0:y0 + s, x0:x0 + s]
            np.maximum(region, img, out=region)
            scene_boxes.append((str(d), (x0, y0, x0 + s, y0 + s)))
        fwd, bwd = caption_for(digits, axis)
        refs.append([fwd, bwd] if readings == "both" else [fwd])
        boxes.append(scene_boxes)
    images = torch.from_numpy(canvas)[:, None].expand(-1, 3, -1, -1).contiguous()
    return CaptionSet(references=refs, images=images, boxes=boxes,
                      name=f"digit-scenes-{split} ({n} scenes, {image_size}px, seed {seed})")


def load_scenes(n_train: int = 4000, n_val: int = 500, n_test: int = 500, seed: int = 0, image_size: int = 32,
                digit_size: int = 10, min_digits: int = 2, max_digits: int = 3, readings: str = "forward"
                ) -> Tuple[CaptionSet, CaptionSet, CaptionSet]:
    """The three splits of the embedded scenes (see :func:`make_scenes`)."""
    kw = dict(seed=seed, image_size=image_size, digit_size=digit_size, min_digits=min_digits, max_digits=max_digits,
              readings=readings)
    return (make_scenes(n_train, "train", **kw), make_scenes(n_val, "val", **kw), make_scenes(n_test, "test", **kw))
