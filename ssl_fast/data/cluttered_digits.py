"""Cluttered digits: the embedded digits on backgrounds that mislead, with exact foreground masks.

Each of scikit-learn's 1,797 handwritten digits is composited, in white at a random position
(near the centre by default) and scale, onto a coloured background built from other images of
its own split:

* a low-frequency colour texture (bicubically upsampled colour noise);
* an oriented sinusoidal grating of random frequency, phase and colour;
* fragments of other digits (random sub-boxes of random digits, any class, at random
  positions, scales and colours): strokes that look like the foreground but carry no label;
* Gaussian pixel noise.

Nothing about the background depends on the foreground's label, so it carries no label; it
carries most of the pixel energy, so a method that attends to the whole image (random resized
crops, raw pixels) is misled. The foreground's compositing weight is known exactly and is the
mask: ``image = mask * colour + (1 - mask) * background``.

The set is a pure function of its seeds (a CPU ``torch.Generator``), so only this generator
ships, never the images. Train and test digits come from the same stratified split as
:func:`ssl_fast.data.datasets.load_digits`; each split's fragments come from that split only.
"""
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ssl_fast.data.datasets import ImageSet, stratified_split


@dataclass(frozen=True)
class Clutter:
    """How strong each background layer is.

    The defaults keep the digit the brightest thing in the image (fragments at 25-50% intensity,
    texture and grating below 0.45 together) while the background fills ~88% of the pixels.
    Held-out raw-pixel k-NN (k=20, cosine): 86.4% with no background, 77.4% with it. What the
    background does to self-supervision is larger: BYOL with random resized crops learns it
    instead of the digit (validation k-NN 67% without the background, 9% with it; random init
    66% and 50%), which is what this set is for.

    Digits are white and near the centre by default (``digit_shift=0.3``). With random colours
    and positions anywhere (``digit_colour=True, digit_shift=1``), colour and position alone,
    with no background at all, kept BYOL and CVSA below random init (validation k-NN 25-40% vs
    32-49%): the set then measured those nuisances rather than the background.

    Attributes:
        digit_scale: range of the foreground digit's side as a fraction of the canvas side.
        digit_shift: how far the digit's centre may move from the canvas centre, as a share of
            the room the digit leaves (1: anywhere it fits; 0: centred).
        digit_colour: draw the digit in a random saturated colour; False draws it white (the
            colour is drawn either way, so the other layers stay the same).
        texture: peak amplitude of the colour texture (0 disables it).
        texture_cells: side of the noise grid the texture is upsampled from.
        grating: amplitude of the sinusoidal grating (0 disables it).
        grating_cycles: range of its number of cycles across the canvas.
        fragments: number of digit fragments in the background.
        fragment_scale: range of the side (fraction of the canvas) of the digit a fragment is cut
            from, so that its strokes are as wide as the foreground's.
        fragment_crop: range of the share of that digit's side the fragment keeps.
        fragment_intensity: range of a fragment's peak intensity.
        noise: standard deviation of the Gaussian pixel noise.

    Example:
        >>> train, test = load_cluttered_digits(clutter=Clutter(fragments=5))
        >>> train.images.shape, train.masks.shape
        (torch.Size([1438, 3, 32, 32]), torch.Size([1438, 1, 32, 32]))
    """
    digit_scale: Tuple[float, float] = (0.5, 0.75)
    digit_shift: float = 0.3
    digit_colour: bool = False
    texture: float = 0.35
    texture_cells: int = 5
    grating: float = 0.1
    grating_cycles: Tuple[float, float] = (1.5, 5.0)
    fragments: int = 3
    fragment_scale: Tuple[float, float] = (0.45, 0.8)
    fragment_crop: Tuple[float, float] = (0.45, 0.8)
    fragment_intensity: Tuple[float, float] = (0.25, 0.5)
    noise: float = 0.04

    def __post_init__(self):
        for name in ("digit_scale", "fragment_scale", "fragment_crop", "fragment_intensity", "grating_cycles"):
            lo, hi = getattr(self, name)
            top = float("inf") if name == "grating_cycles" else 1.0
            if not 0.0 < lo <= hi <= top:
                raise ValueError(f"Clutter.{name} must satisfy 0 < lo <= hi <= {top}, got {(lo, hi)}")
        for name in ("digit_shift", "texture", "grating", "noise"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"Clutter.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.fragments < 0 or self.texture_cells < 1:
            raise ValueError(f"Clutter.fragments must be >= 0 and texture_cells >= 1, got "
                             f"{self.fragments} and {self.texture_cells}")


#: No background at all: the digits alone at the same positions, scales and colours (a control).
NO_CLUTTER = Clutter(texture=0.0, grating=0.0, fragments=0, noise=0.0)
#: A much stronger background (5 bright fragments, strong texture): held-out raw-pixel k-NN 51%.
STRONG_CLUTTER = Clutter(texture=0.55, grating=0.2, fragments=5, fragment_intensity=(0.5, 0.95))


def _uniform(shape, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def _random_colour(n: int, gen: torch.Generator) -> torch.Tensor:
    """``[n, 3]`` saturated colours: uniform channels rescaled so the brightest is 1."""
    c = torch.rand(n, 3, generator=gen) + 0.05
    return c / c.amax(1, keepdim=True)


def _place(alpha: torch.Tensor, size: int, side: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor,
           crop: torch.Tensor = None, crop_cx: torch.Tensor = None, crop_cy: torch.Tensor = None) -> torch.Tensor:
    """Draw ``alpha [n, 1, s, s]`` (or its sub-box) into ``[n, 1, size, size]`` canvases.

    The drawn square has side ``side`` (fraction of the canvas) and centre ``(cx, cy)`` in
    normalised coordinates ([-1, 1], ``align_corners=False``). With ``crop``, only the sub-box of
    the source of side ``crop`` (fraction of the source) centred at ``(crop_cx, crop_cy)`` is
    drawn, stretched over the square.
    """
    n = alpha.shape[0]
    if crop is None:
        crop = torch.ones(n)
        crop_cx = crop_cy = torch.zeros(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = crop / side
    theta[:, 0, 2] = crop_cx - cx * crop / side
    theta[:, 1, 2] = crop_cy - cy * crop / side
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    out = F.grid_sample(alpha, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # keep only the square itself (a crop's neighbouring strokes stay out)
    u = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    inside_x = ((u[None] - cx[:, None]).abs() <= side[:, None])
    inside_y = ((u[None] - cy[:, None]).abs() <= side[:, None])
    return out * (inside_y[:, :, None] & inside_x[:, None, :])[:, None].to(out.dtype)


def render_cluttered(digits: torch.Tensor, image_size: int, gen: torch.Generator,
                     clutter: Clutter = Clutter()) -> Tuple[torch.Tensor, torch.Tensor]:
    """Composite each digit onto its own cluttered background.

    Args:
        digits: ``[N, h, w]`` float digit intensities in [0, 1] (the foregrounds; fragments are
            cut from random rows of this tensor too).
        image_size: canvas side S.
        gen: CPU generator every random choice is drawn from, in a fixed order.
        clutter: layer strengths (:data:`NO_CLUTTER` gives the digits alone).

    Returns:
        ``(images [N, 3, S, S], masks [N, 1, S, S])`` float32 in [0, 1], with
        ``images = masks * colour + (1 - masks) * background`` exactly (before clamping, which
        only touches background pixels).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x, m = render_cluttered(torch.rand(4, 8, 8), 32, g)
        >>> x.shape, m.shape
        (torch.Size([4, 3, 32, 32]), torch.Size([4, 1, 32, 32]))
    """
    if not isinstance(digits, torch.Tensor) or digits.dim() != 3:
        raise ValueError(f"digits must be a [N, h, w] tensor, got "
                         f"{tuple(digits.shape) if isinstance(digits, torch.Tensor) else type(digits).__name__}")
    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    if not isinstance(clutter, Clutter):
        raise TypeError(f"clutter must be a Clutter, got {type(clutter).__name__}")
    n, s = digits.shape[0], image_size
    src = digits.float().clamp(0, 1)[:, None]
    hi = max(32, s)  # smooth strokes: upsample the 8x8 digits once before placing them
    src = F.interpolate(src, size=(hi, hi), mode="bicubic", align_corners=False).clamp(0, 1)

    # foreground: position, scale, colour
    side = _uniform(n, *clutter.digit_scale, gen)
    cx = clutter.digit_shift * (1 - side) * _uniform(n, -1.0, 1.0, gen)
    cy = clutter.digit_shift * (1 - side) * _uniform(n, -1.0, 1.0, gen)
    fg_colour = _random_colour(n, gen)
    if not clutter.digit_colour:
        fg_colour = torch.ones_like(fg_colour)
    mask = _place(src, s, side, cx, cy).clamp(0, 1)

    # background layers, drawn in a fixed order whatever is enabled
    cells = clutter.texture_cells
    tex = torch.rand(n, 3, cells, cells, generator=gen)
    tex = F.interpolate(tex, size=(s, s), mode="bicubic", align_corners=False).clamp(0, 1)
    bg = clutter.texture * tex
    ang = _uniform(n, 0.0, np.pi, gen)
    cycles = _uniform(n, *clutter.grating_cycles, gen)
    phase = _uniform(n, 0.0, 2 * np.pi, gen)
    g_colour = _random_colour(n, gen)
    u = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    proj = torch.cos(ang)[:, None, None] * u[None, None, :] + torch.sin(ang)[:, None, None] * u[None, :, None]
    wave = 0.5 + 0.5 * torch.sin(2 * np.pi * cycles[:, None, None] * proj + phase[:, None, None])
    bg = bg + clutter.grating * g_colour[:, :, None, None] * wave[:, None]
    for _ in range(clutter.fragments):
        other = torch.randint(0, n, (n,), generator=gen)
        f_digit = _uniform(n, *clutter.fragment_scale, gen)
        crop = _uniform(n, *clutter.fragment_crop, gen)
        f_side = f_digit * crop
        f_cx = (1 - f_side) * _uniform(n, -1.0, 1.0, gen)
        f_cy = (1 - f_side) * _uniform(n, -1.0, 1.0, gen)
        crop_cx = (1 - crop) * _uniform(n, -1.0, 1.0, gen)
        crop_cy = (1 - crop) * _uniform(n, -1.0, 1.0, gen)
        level = _uniform(n, *clutter.fragment_intensity, gen)
        colour = _random_colour(n, gen)
        a = _place(src[other], s, f_side, f_cx, f_cy, crop, crop_cx, crop_cy).clamp(0, 1) * level[:, None, None, None]
        bg = a * colour[:, :, None, None] + (1 - a) * bg
    bg = bg + clutter.noise * torch.randn(n, 3, s, s, generator=gen)
    bg = bg.clamp(0, 1)
    images = mask * fg_colour[:, :, None, None] + (1 - mask) * bg
    return images.clamp(0, 1).contiguous(), mask.contiguous()


def load_cluttered_digits(image_size: int = 32, test_fraction: float = 0.2, split_seed: int = 0, seed: int = 0,
                          copies: int = 1, clutter: Clutter = Clutter()) -> Tuple[ImageSet, ImageSet]:
    """The embedded digits, each on a misleading background, with exact foreground masks.

    Args:
        image_size: canvas side (default 32, as the digits).
        test_fraction: held-out share of each class (the split of :func:`load_digits`).
        split_seed: seed of that split.
        seed: seed of the rendering (positions, colours, backgrounds).
        copies: renderings of each training digit (each on its own background); the test set
            always has one.
        clutter: layer strengths; :data:`NO_CLUTTER` renders the digits alone (a control).

    Returns:
        ``(train, test)`` :class:`ImageSet` s with ``masks [N, 1, S, S]``.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    if not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be an int >= 1, got {copies!r}")
    d = sk_load_digits()
    digits = torch.as_tensor(d.images.astype(np.float32) / 16.0)
    labels = torch.as_tensor(d.target.astype(np.int64))
    tr, te = stratified_split(d.target, test_fraction, split_seed)
    classes = [str(i) for i in range(10)]
    seeds = np.random.SeedSequence([int(seed), 13]).generate_state(2, dtype=np.uint64) >> np.uint64(1)
    out = []
    for part, idx, part_seed, k in (("train", tr, seeds[0], copies), ("test", te, seeds[1], 1)):
        gen = torch.Generator().manual_seed(int(part_seed))
        idx = torch.as_tensor(np.tile(idx, k))
        x, m = render_cluttered(digits[idx], image_size, gen, clutter)
        out.append(ImageSet(x, labels[idx], classes,
                            f"cluttered-digits-{part} ({len(idx)} images, {image_size}px, seed {seed})", masks=m))
    return out[0], out[1]
