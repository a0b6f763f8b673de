"""Image-folder loading: every pixel format Pillow reads, unreadable files, split layouts."""
import warnings

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from ssl_fast.data import BadImageWarning, ImageLoadError, load_dataset, load_image_folder  # noqa: E402
from ssl_fast.data.datasets import _read_image  # noqa: E402


def _rgb(path):
    x = _read_image(str(path))
    assert x.dtype == np.float32 and x.ndim == 3 and x.shape[-1] == 3
    return x


def test_16_bit_grey_png_keeps_its_values(tmp_path):
    # before: Pillow's RGB conversion clipped I;16 at 255, so every pixel loaded as 1.0 (all white)
    a = np.array([[0, 1000, 20000], [32768, 50000, 65535]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    x = _rgb(tmp_path / "g16.png")
    np.testing.assert_allclose(x[..., 0], a / 65535.0, atol=1e-6)
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all()


def test_32_bit_integer_and_float_grey(tmp_path):
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32)).save(tmp_path / "i.tif")
    np.testing.assert_allclose(_rgb(tmp_path / "i.tif")[0, :, 0], [0.0, 1.0])
    Image.fromarray(np.array([[0.25, 0.75]], dtype=np.float32)).save(tmp_path / "f.tif")
    np.testing.assert_allclose(_rgb(tmp_path / "f.tif")[0, :, 1], [0.25, 0.75])
    Image.fromarray(np.array([[-5, 70000]], dtype=np.int32)).save(tmp_path / "i_bad.tif")
    with pytest.raises(ImageLoadError, match=r"i_bad\.tif: 32-bit integer pixels range over -5\.\.70000"):
        _read_image(str(tmp_path / "i_bad.tif"))
    Image.fromarray(np.array([[0.0, 3.0]], dtype=np.float32)).save(tmp_path / "f_bad.tif")
    with pytest.raises(ImageLoadError, match=r"f_bad\.tif: floating-point pixels must be finite and in \[0, 1\]"):
        _read_image(str(tmp_path / "f_bad.tif"))


def test_palette_cmyk_grey_bilevel_and_alpha(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    np.testing.assert_allclose(_rgb(tmp_path / "p.png")[0], [[0, 0, 0], [1, 0, 0]])
    p.save(tmp_path / "p_transparent.png", transparency=1)  # the red entry is transparent
    np.testing.assert_allclose(_rgb(tmp_path / "p_transparent.png")[0], [[0, 0, 0], [0, 0, 0]])
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "c.tif")  # pure red in CMYK
    np.testing.assert_allclose(_rgb(tmp_path / "c.tif")[0, 0], [1, 0, 0])
    Image.new("L", (2, 2), 51).save(tmp_path / "l.png")
    np.testing.assert_allclose(_rgb(tmp_path / "l.png")[0, 0], [0.2, 0.2, 0.2], atol=1e-6)
    Image.new("1", (2, 2), 1).save(tmp_path / "b.png")
    np.testing.assert_allclose(_rgb(tmp_path / "b.png")[0, 0], [1, 1, 1])
    # alpha: composited over black, whatever colour a transparent pixel stores
    rgba = np.array([[[255, 255, 255, 0], [255, 0, 0, 255], [0, 0, 255, 51]]], dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_allclose(_rgb(tmp_path / "a.png")[0], [[0, 0, 0], [1, 0, 0], [0, 0, 0.2]], atol=1e-6)
    Image.new("LA", (1, 1), (255, 102)).save(tmp_path / "la.png")
    np.testing.assert_allclose(_rgb(tmp_path / "la.png")[0, 0], [0.4] * 3, atol=1e-6)


def _folder(root, counts, size=(6, 6)):
    """``root/<class>/<i>.png``, class c grey level (c + 1) * 40."""
    for ci, (c, n) in enumerate(counts.items()):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("L", size, (ci + 1) * 40).save(root / c / f"{i}.png")


def test_every_format_loads_into_one_folder(tmp_path):
    _folder(tmp_path, {"a": 3, "b": 3})
    Image.fromarray(np.full((5, 7), 65535, np.uint16)).save(tmp_path / "a" / "g16.png")
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(tmp_path / "b" / "c.jpg")
    Image.new("RGBA", (4, 4), (10, 20, 30, 255)).save(tmp_path / "b" / "a.png")
    tr, te = load_image_folder(str(tmp_path), image_size=4)
    assert len(tr) + len(te) == 9 and tr.images.shape[1:] == (3, 4, 4)


def _corrupt(root):
    (root / "a" / "broken.png").write_bytes(b"this is not a png")
    good = root / "a" / "0.png"
    data = good.read_bytes()
    (root / "b" / "truncated.png").write_bytes(data[: len(data) // 2])


def test_a_corrupt_image_is_skipped_with_a_warning_naming_it(tmp_path):
    # before: one unreadable file aborted the whole load with a PIL traceback
    _folder(tmp_path, {"a": 3, "b": 3})
    _corrupt(tmp_path)
    with pytest.warns(BadImageWarning) as rec:
        tr, te = load_image_folder(str(tmp_path), image_size=4)
    msgs = sorted(str(w.message) for w in rec if issubclass(w.category, BadImageWarning))
    assert len(msgs) == 2
    assert "broken.png: cannot be read as an image" in msgs[0] and str(tmp_path / "a" / "broken.png") in msgs[0]
    assert "truncated.png: cannot be read as an image" in msgs[1]
    assert len(tr) + len(te) == 6


def test_a_corrupt_image_stops_the_load_by_name_when_asked(tmp_path):
    _folder(tmp_path, {"a": 3, "b": 3})
    _corrupt(tmp_path)
    with pytest.raises(ImageLoadError, match=r"a/broken\.png: cannot be read as an image"):
        load_dataset(str(tmp_path), 4, bad_images="error")
    with pytest.raises(ValueError, match="bad_images must be one of skip, error, got 'ignore'"):
        load_image_folder(str(tmp_path), 4, bad_images="ignore")


def test_only_unreadable_files_is_reported_with_the_count(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"junk")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        with pytest.raises(FileNotFoundError, match=r"no images .*\(1 unreadable files skipped\)"):
            load_image_folder(str(tmp_path), 4)


def test_every_class_with_one_image_is_a_clear_error(tmp_path):
    # before: the stratified split left an empty held-out set, and the k-NN evaluation failed later
    _folder(tmp_path, {"a": 1, "b": 1, "c": 1})
    with pytest.raises(ValueError, match=r"no class has two or more images \(3 images in 3 classes\).*"
                                         r"train/ and val/ folders"):
        load_image_folder(str(tmp_path), 4)
    _folder(tmp_path, {"a": 2})  # one class with two images is enough for a held-out image
    tr, te = load_image_folder(str(tmp_path), 4)
    assert len(te) == 1 and len(tr) == 3


def test_a_val_class_missing_from_train_is_an_error(tmp_path):
    # before: val/<class> folders that train/ lacks were silently ignored
    _folder(tmp_path / "train", {"cat": 2, "dog": 2})
    _folder(tmp_path / "val", {"cat": 1, "dog": 1, "emu": 1})
    with pytest.raises(ValueError, match=r"val/ has 1 class folder\(s\) that train/ lacks: emu.*"
                                         r"train/ has: cat, dog"):
        load_image_folder(str(tmp_path), 4)


def test_train_val_layout_ignores_hidden_folders(tmp_path):
    _folder(tmp_path / "train", {"cat": 2, "dog": 2})
    _folder(tmp_path / "val", {"cat": 1, "dog": 1})
    (tmp_path / "val" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "train" / ".cache").mkdir()
    tr, te = load_image_folder(str(tmp_path), 4)
    assert tr.classes == ["cat", "dog"] and len(tr) == 4 and len(te) == 2
    assert te.labels.tolist() == [0, 1]
    assert torch.all(te.images[1] > te.images[0])
