"""Cluttered digits: deterministic, exact masks, the load_digits split, a background that misleads."""
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from ssl_fast.data import ImageSet, load_dataset, load_digits
from ssl_fast.data.cluttered_digits import NO_CLUTTER, STRONG_CLUTTER, Clutter, load_cluttered_digits, render_cluttered


def _digits(n=24, seed=0):
    return torch.rand(n, 8, 8, generator=torch.Generator().manual_seed(seed)) * (torch.rand(n, 8, 8) > 0.5)


def test_deterministic_from_the_generator_and_seed_dependent():
    d = _digits()
    a = render_cluttered(d, 24, torch.Generator().manual_seed(5))
    b = render_cluttered(d, 24, torch.Generator().manual_seed(5))
    c = render_cluttered(d, 24, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_mask_is_the_exact_compositing_weight():
    d = _digits()
    x, m = render_cluttered(d, 32, torch.Generator().manual_seed(1))
    x0, m0 = render_cluttered(d, 32, torch.Generator().manual_seed(1), NO_CLUTTER)
    # the foreground is drawn before any background layer: same mask with and without clutter
    assert torch.equal(m, m0)
    assert x.shape == (24, 3, 32, 32) and m.shape == (24, 1, 32, 32)
    assert float(m.min()) >= 0 and float(m.max()) <= 1 and float(m.max()) > 0.9
    # without a background the image is mask * colour, one colour per image
    colour = (x0 * m0).sum((2, 3)) / (m0 * m0).sum((2, 3))
    torch.testing.assert_close(x0, m0 * colour[:, :, None, None], atol=1e-5, rtol=0)
    # with clutter: where the mask is 1 the pixel is the foreground colour; elsewhere x - m*colour
    # is (1 - m) * background with a background in [0, 1]
    full = (m == 1).expand_as(x)
    assert full.any()
    torch.testing.assert_close(x[full], (m * colour[:, :, None, None]).expand_as(x)[full], atol=1e-5, rtol=0)
    bg = (x - m * colour[:, :, None, None]) / (1 - m).clamp_min(1e-6)
    part = (m < 0.99).expand_as(x)
    assert float(bg[part].min()) >= -1e-4 and float(bg[part].max()) <= 1 + 1e-4
    # the background has energy where the digit is not
    assert float(x[(m == 0).expand_as(x)].std()) > 0.1


def test_split_labels_match_load_digits_and_load_dataset():
    tr, te = load_cluttered_digits(image_size=16, seed=3)
    ptr, pte = load_digits(image_size=16)
    assert torch.equal(tr.labels, ptr.labels) and torch.equal(te.labels, pte.labels)
    assert tr.masks.shape == (len(tr), 1, 16, 16) and te.masks.shape == (len(te), 1, 16, 16)
    tr2, te2 = load_dataset("cluttered-digits", 16)
    tr0, _ = load_cluttered_digits(image_size=16, seed=0)
    assert torch.equal(tr2.images, tr0.images) and torch.equal(tr2.masks, tr0.masks)
    trk, _ = load_cluttered_digits(image_size=16, copies=2)
    assert len(trk) == 2 * len(tr) and torch.equal(trk.labels[:len(tr)], trk.labels[len(tr):])
    assert not torch.equal(trk.images[:len(tr)], trk.images[len(tr):])


def test_background_misleads_raw_pixel_knn():
    tr, te = load_cluttered_digits()

    def acc(a, b):
        knn = KNeighborsClassifier(n_neighbors=20, metric="cosine").fit(a.images.flatten(1).numpy(), a.labels.numpy())
        return 100.0 * knn.score(b.images.flatten(1).numpy(), b.labels.numpy())

    cluttered = acc(tr, te)
    fg = acc(ImageSet(tr.images * tr.masks, tr.labels), ImageSet(te.images * te.masks, te.labels))
    strong = acc(*load_cluttered_digits(clutter=STRONG_CLUTTER))
    # measured: 77.4% cluttered, 86.1% with the background masked out, 51.3% with STRONG_CLUTTER
    assert strong < 60.0 < cluttered < 82.0 < fg, (strong, cluttered, fg)


def test_digit_colour_and_shift():
    d = _digits()
    gen = lambda: torch.Generator().manual_seed(2)
    white, m = render_cluttered(d, 32, gen(), NO_CLUTTER)
    torch.testing.assert_close(white, m.expand_as(white), atol=1e-6, rtol=0)
    coloured, m2 = render_cluttered(d, 32, gen(), Clutter(texture=0.0, grating=0.0, fragments=0, noise=0.0,
                                                          digit_colour=True))
    assert torch.equal(m, m2) and not torch.allclose(coloured, m.expand_as(coloured))
    # the colour is drawn either way: the background layers do not change with digit_colour
    a, ma = render_cluttered(d, 32, gen())
    b, mb = render_cluttered(d, 32, gen(), Clutter(digit_colour=True))
    outside = (ma == 0).expand_as(a)
    assert torch.equal(ma, mb) and torch.equal(a[outside], b[outside]) and not torch.equal(a, b)

    def centre_spread(shift):
        _, mask = render_cluttered(torch.ones(64, 8, 8), 32, gen(), Clutter(digit_shift=shift))
        u = torch.arange(32.0) + 0.5
        w = mask[:, 0]
        cy = (w.sum(2) * u).sum(1) / w.sum((1, 2))
        cx = (w.sum(1) * u).sum(1) / w.sum((1, 2))
        return float(torch.maximum((cy - 16).abs(), (cx - 16).abs()).max())

    assert centre_spread(0.0) < 0.01 < centre_spread(0.3) < centre_spread(1.0)
    assert centre_spread(1.0) > 4.0


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="digits must be a"):
        render_cluttered(torch.rand(3, 8), 32, torch.Generator())
    with pytest.raises(ValueError, match="image_size must be"):
        render_cluttered(torch.rand(3, 8, 8), 4, torch.Generator())
    with pytest.raises(TypeError, match="clutter must be a Clutter"):
        render_cluttered(torch.rand(3, 8, 8), 32, torch.Generator(), clutter={})
    with pytest.raises(ValueError, match="Clutter.digit_scale"):
        Clutter(digit_scale=(0.8, 0.2))
    with pytest.raises(ValueError, match="copies must be"):
        load_cluttered_digits(copies=0)
    with pytest.raises(ValueError, match="masks must be"):
        ImageSet(torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), masks=torch.rand(2, 1, 3, 4))
