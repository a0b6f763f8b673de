"""Localisation scores against NumPy brute force: IoU of thresholded maps, pointing accuracy."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_fast.train.localisation import foreground_of, localisation_scores


def _np_scores(sal, mask, thr, mode, tol):
    """Per image: threshold by value or by mass, IoU with mask > 0.5, peak within tol pixels."""
    b = sal.shape[0]
    ious, hits = [], []
    for i in range(b):
        s, m = sal[i].astype(np.float64), mask[i] > 0.5
        if mode == "value":
            lo, hi = s.min(), s.max()
            fg = (s - lo) >= thr * (hi - lo) if hi > lo else np.zeros_like(m)
        else:
            flat = np.clip(s, 0, None).ravel()
            order = np.argsort(-flat, kind="stable")
            fg = np.zeros(flat.size, bool)
            acc, total = 0.0, flat.sum()
            for j in order:
                if total <= 0 or acc >= thr * total:
                    break
                fg[j] = True
                acc += flat[j]
            fg = fg.reshape(s.shape)
        union = (fg | m).sum()
        ious.append((fg & m).sum() / union if union else np.nan)
        py, px = np.unravel_index(np.argmax(s), s.shape)
        ys, xs = np.nonzero(m)
        hits.append(float(any(max(abs(py - y), abs(px - x)) <= tol for y, x in zip(ys, xs))))
    return np.array(ious), np.array(hits)


@pytest.mark.parametrize("mode,thr", [("value", 0.5), ("value", 0.2), ("mass", 0.6)])
@pytest.mark.parametrize("tol", [0, 2])
def test_against_brute_force(mode, thr, tol):
    g = torch.Generator().manual_seed(0)
    sal = torch.rand(6, 1, 12, 10, generator=g, dtype=torch.float64)
    masks = torch.zeros(6, 1, 12, 10)
    for i in range(6):
        y, x = torch.randint(0, 8, (2,), generator=g).tolist()
        masks[i, 0, y:y + 4, x:x + 3] = 1.0
    out = localisation_scores(sal, masks, threshold=thr, mode=mode, tolerance=tol)
    ious, hits = _np_scores(sal[:, 0].numpy(), masks[:, 0].numpy(), thr, mode, tol)
    np.testing.assert_allclose(out["iou"].numpy(), ious, rtol=1e-12)
    np.testing.assert_array_equal(out["pointing"].numpy(), hits)
    assert abs(out["mean_iou"].item() - ious.mean()) < 1e-12
    assert abs(out["pointing_accuracy"].item() - hits.mean()) < 1e-12


def test_low_resolution_maps_are_upsampled_and_perfect_maps_score_one():
    masks = torch.zeros(2, 1, 16, 16)
    masks[0, 0, 4:12, 4:12] = 1
    masks[1, 0, 0:8, 8:16] = 1
    coarse = F.avg_pool2d(masks, 4)[:, 0]  # [2, 4, 4] patch grid
    out = localisation_scores(coarse, masks)
    assert out["pointing_accuracy"].item() == 1.0 and out["mean_iou"].item() > 0.7
    exact = localisation_scores(masks, masks)
    assert exact["mean_iou"].item() == 1.0
    inverted = localisation_scores(1 - masks, masks)
    assert inverted["mean_iou"].item() == 0.0 and inverted["pointing_accuracy"].item() == 0.0


def test_unknown_masks_are_left_out():
    masks = torch.zeros(3, 1, 8, 8)
    masks[:, :, 2:5, 2:5] = 1
    masks[1, 0, 0, 0] = float("nan")
    sal = masks.nan_to_num(0.0).clone()
    out = localisation_scores(sal, masks)
    assert torch.isnan(out["iou"][1]) and torch.isnan(out["pointing"][1])
    assert out["mean_iou"].item() == 1.0 and out["pointing_accuracy"].item() == 1.0


def test_mass_threshold_keeps_the_fewest_pixels():
    s = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    assert foreground_of(s, 0.4, "mass").tolist() == [[[True, False], [False, False]]]
    assert foreground_of(s, 0.5, "mass").tolist() == [[[True, True], [False, False]]]
    assert not foreground_of(torch.ones(1, 3, 3), 0.5, "value").any()


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="saliency must be"):
        localisation_scores(torch.rand(2, 3, 4, 4), torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="saliency has 2 maps but masks has 3"):
        localisation_scores(torch.rand(2, 4, 4), torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="mode must be"):
        localisation_scores(torch.rand(2, 4, 4), torch.rand(2, 4, 4), mode="otsu")
    with pytest.raises(ValueError, match="threshold must be"):
        localisation_scores(torch.rand(2, 4, 4), torch.rand(2, 4, 4), threshold=2.0)
    with pytest.raises(ValueError, match="tolerance must be"):
        localisation_scores(torch.rand(2, 4, 4), torch.rand(2, 4, 4), tolerance=-1)
    with pytest.raises(TypeError, match="masks must be floating"):
        localisation_scores(torch.rand(2, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool))
