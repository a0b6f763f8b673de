"""CUB-200-2011, Stanford Cars and FGVC-Aircraft loaders on small fixtures in the published layouts.

Cars and Aircraft are checked against torchvision's own readers of the same layouts (labels,
classes, file order); CUB (not in torchvision) against values written into the fixture.
"""
import warnings

import numpy as np
import pytest
import torch

PIL = pytest.importorskip("PIL")
scipy_io = pytest.importorskip("scipy.io")
from PIL import Image  # noqa: E402

from ssl_fast.data import BadImageWarning, ImageLoadError, load_dataset  # noqa: E402
from ssl_fast.data.finegrained import load_aircraft, load_cars, load_cub  # noqa: E402

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _img(path, w, h, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).save(path)


def _write_cub(root, with_seg=True):
    base = root / "CUB_200_2011"
    rows = [  # id, class, file, train, (x, y, w, h), image size
        (1, 1, "001.Albatross/a_1.jpg", 1, (2.0, 3.0, 10.0, 8.0), (40, 30)),
        (2, 1, "001.Albatross/a_2.jpg", 0, (0.0, 0.0, 20.0, 20.0), (20, 20)),
        (3, 2, "002.Auklet/b_1.jpg", 1, (5.0, 5.0, 5.0, 15.0), (30, 40)),
        (4, 2, "002.Auklet/b_2.jpg", 0, (1.0, 2.0, 3.0, 4.0), (16, 16)),
    ]
    base.mkdir(parents=True)
    (base / "classes.txt").write_text("1 001.Albatross\n2 002.Auklet\n")
    (base / "images.txt").write_text("".join(f"{i} {f}\n" for i, _, f, *_ in rows))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c, *_ in rows))
    (base / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, _, t, *_ in rows))
    (base / "bounding_boxes.txt").write_text("".join(f"{i} {b[0]} {b[1]} {b[2]} {b[3]}\n" for i, _, _, _, b, _ in rows))
    for i, c, f, t, b, (w, h) in rows:
        _img(base / "images" / f, w, h, COLOURS[i])
        if with_seg:
            seg = np.zeros((h, w), np.uint8)
            x, y, bw, bh = (int(v) for v in b)
            seg[y:y + bh, x:x + bw] = 255
            p = root / "segmentations" / f.replace(".jpg", ".png")
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(seg).save(p)
    return rows


def test_cub_split_labels_boxes_masks(tmp_path):
    rows = _write_cub(tmp_path)
    tr, te = load_cub(str(tmp_path), image_size=16)
    assert tr.classes == ["001.Albatross", "002.Auklet"] and len(tr) == 2 and len(te) == 2
    assert tr.labels.tolist() == [0, 1] and te.labels.tolist() == [0, 1]
    for s, ids in ((tr, [1, 3]), (te, [2, 4])):
        for k, i in enumerate(ids):
            _, _, _, _, (x, y, bw, bh), (w, h) = rows[i - 1]
            want = torch.tensor([x * 16 / w, y * 16 / h, (x + bw) * 16 / w, (y + bh) * 16 / h])
            torch.testing.assert_close(s.boxes[k], want)
            colour = torch.tensor(COLOURS[i], dtype=torch.float32) / 255
            torch.testing.assert_close(s.images[k].mean((1, 2)), colour, atol=0.02, rtol=0)
            # the mask covers the box: inside ~1, well outside 0
            m = s.masks[k, 0]
            x0, y0, x1, y1 = (int(round(float(v))) for v in want)
            if x1 - x0 > 2 and y1 - y0 > 2:
                assert float(m[y0 + 1:y1 - 1, x0 + 1:x1 - 1].min()) > 0.5
            outside = torch.ones(16, 16, dtype=torch.bool)
            outside[max(y0 - 3, 0):y1 + 3, max(x0 - 3, 0):x1 + 3] = False  # antialiasing's reach
            assert not outside.any() or float(m[outside].max()) < 1e-6
    # the same data through --data, and without segmentations: masks are None
    tr2, _ = load_dataset(f"cub:{tmp_path / 'CUB_200_2011'}", 16)
    assert torch.equal(tr2.images, tr.images)
    other = tmp_path / "noseg"
    _write_cub(other, with_seg=False)
    assert load_cub(str(other), 16)[0].masks is None


def _write_cars(root):
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "BMW M3 Coupe 2012"], dtype=object)
    scipy_io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names.reshape(1, -1)})
    dt = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    sets = {"cars_train": [(1, 1, 20, 10, 3, "00001.jpg"), (5, 2, 30, 20, 1, "00002.jpg"), (2, 2, 9, 9, 2, "00003.jpg")],
            "cars_test": [(3, 4, 12, 12, 2, "00001.jpg"), (1, 1, 40, 20, 3, "00002.jpg")]}
    for folder, anns in sets.items():
        for k, a in enumerate(anns):
            _img(base / folder / a[5], 40, 20, COLOURS[k + (3 if folder == "cars_test" else 0)])
        arr = np.array([tuple(np.array([[v]]) if isinstance(v, int) else np.array([v]) for v in a) for a in anns],
                       dtype=dt).reshape(1, -1)
        target = base / "devkit" / "cars_train_annos.mat" if folder == "cars_train" else base / "cars_test_annos_withlabels.mat"
        scipy_io.savemat(target, {"annotations": arr})
    return sets


def test_cars_against_torchvision(tmp_path):
    from torchvision.datasets import StanfordCars

    sets = _write_cars(tmp_path)
    tr, te = load_cars(str(tmp_path), image_size=20)
    for split, ours in (("train", tr), ("test", te)):
        tv = StanfordCars(str(tmp_path), split=split)
        assert ours.classes == list(tv.classes)
        assert ours.labels.tolist() == [t for _, t in tv._samples]
        anns = sets["cars_" + split]
        want = torch.tensor([[(a[0] - 1) * 20 / 40, (a[1] - 1) * 20 / 20, a[2] * 20 / 40, a[3] * 20 / 20] for a in anns])
        torch.testing.assert_close(ours.boxes, want)
        for k in range(len(anns)):
            colour = torch.tensor(COLOURS[k + (3 if split == "test" else 0)], dtype=torch.float32) / 255
            torch.testing.assert_close(ours.images[k].mean((1, 2)), colour, atol=0.02, rtol=0)
    tr2, te2 = load_dataset(f"cars:{tmp_path}", 20)
    assert torch.equal(te2.labels, te.labels)


def _write_aircraft(root):
    data = root / "fgvc-aircraft-2013b" / "data"
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("707-320\nA300B4\nCessna 172\n")
    (data / "families.txt").write_text("Boeing 707\nA300\nCessna 172\n")
    (data / "manufacturers.txt").write_text("Boeing\nAirbus\nCessna\n")
    split = {"trainval": [("0001", "A300B4", "A300", "Airbus"), ("0002", "Cessna 172", "Cessna 172", "Cessna")],
             "test": [("0003", "707-320", "Boeing 707", "Boeing"), ("0004", "A300B4", "A300", "Airbus")]}
    for s, rows in split.items():
        for lvl, col in (("variant", 1), ("family", 2), ("manufacturer", 3)):
            (data / f"images_{lvl}_{s}.txt").write_text("".join(f"{r[0]} {r[col]}\n" for r in rows))
    boxes = []
    for k, (img_id, *_) in enumerate(split["trainval"] + split["test"]):
        a = np.zeros((60, 30, 3), np.uint8)
        a[:] = COLOURS[k]
        a[-20:] = 255  # the copyright banner
        (data / "images").mkdir(exist_ok=True)
        Image.fromarray(a).save(data / "images" / f"{img_id}.jpg", quality=100)
        boxes.append(f"{img_id} 3 5 20 30\n")
    (data / "images_box.txt").write_text("".join(boxes))


@pytest.mark.parametrize("level", ["variant", "family", "manufacturer"])
def test_aircraft_against_torchvision(tmp_path, level):
    from torchvision.datasets import FGVCAircraft

    _write_aircraft(tmp_path)
    tr, te = load_aircraft(str(tmp_path), image_size=20, annotation_level=level)
    for split, ours in (("trainval", tr), ("test", te)):
        tv = FGVCAircraft(str(tmp_path), split=split, annotation_level=level)
        assert ours.classes == tv.classes and ours.labels.tolist() == tv._labels
    # banner cut: 40 rows remain; box (3, 5, 20, 30) 1-based inclusive -> [2, 20) x [4, 30) of 30 x 40
    torch.testing.assert_close(tr.boxes[0], torch.tensor([2 * 20 / 30, 4 * 20 / 40, 20 * 20 / 30, 30 * 20 / 40]))
    red = torch.tensor([1.0, 0.0, 0.0])
    torch.testing.assert_close(tr.images[0].mean((1, 2)), red, atol=0.03, rtol=0)
    kept, _ = load_aircraft(str(tmp_path), image_size=20, crop_banner=False)
    assert float(kept.images[0, 1:, -3:].mean()) > 0.9  # the white banner is still there


def test_bad_input_and_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="give the cub folder"):
        load_dataset("cub:", 16)
    with pytest.raises(FileNotFoundError, match="no CUB_200_2011 layout"):
        load_cub(str(tmp_path), 16)
    with pytest.raises(ValueError, match="annotation_level must be"):
        load_aircraft(str(tmp_path), annotation_level="model")
    _write_cub(tmp_path)
    (tmp_path / "CUB_200_2011" / "images" / "002.Auklet" / "b_1.jpg").write_bytes(b"not a jpeg")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        tr, _ = load_cub(str(tmp_path), 16)
    assert len(tr) == 1 and any(issubclass(x.category, BadImageWarning) and "b_1.jpg" in str(x.message) for x in w)
    with pytest.raises(ImageLoadError, match="b_1.jpg"):
        load_cub(str(tmp_path), 16, bad_images="error")
    (tmp_path / "CUB_200_2011" / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n")
    with pytest.raises(ValueError, match="image 4 is missing from train_test_split.txt"):
        load_cub(str(tmp_path), 16)
