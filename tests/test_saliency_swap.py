"""Saliency Swap: box search against brute force, pasted pixels and masks, determinism, row splits."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssl_fast.data.augment import ViewSpec
from ssl_fast.data.saliency_swap import SaliencySwap, best_boxes, paste, summed_area_table


def _brute_best(sal, bh, bw):
    """Every box's mean by an explicit float64 sum; the first maximum in row-major order."""
    h, w = sal.shape
    best, arg = -float("inf"), None
    for y in range(h - bh + 1):
        for x in range(w - bw + 1):
            m = sal[y:y + bh, x:x + bw].double().sum().item() / (bh * bw)
            if m > best:
                best, arg = m, (y, x)
    return arg, best


@given(b=st.integers(1, 4), h=st.sampled_from([1, 5, 7, 16]), w=st.sampled_from([1, 6, 9, 16]),
       seed=st.integers(0, 2**16))
def test_box_search_equals_brute_force(b, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    sal = torch.rand(b, 1, h, w, generator=g, dtype=torch.float64)
    bh = torch.randint(1, h + 1, (b,), generator=g)
    bw = torch.randint(1, w + 1, (b,), generator=g)
    y0, x0, mean = best_boxes(sal, bh, bw)
    for i in range(b):
        (by, bx), m = _brute_best(sal[i, 0], int(bh[i]), int(bw[i]))
        assert (int(y0[i]), int(x0[i])) == (by, bx)
        assert abs(float(mean[i]) - m) < 1e-12


def test_summed_area_table_and_ties_go_to_the_first_box():
    sal = torch.zeros(1, 1, 4, 5)
    sat = summed_area_table(sal + 1)
    assert sat.shape == (1, 5, 6) and float(sat[0, 4, 5]) == 20 and float(sat[0, 2, 3]) == 6
    y0, x0, _ = best_boxes(sal, torch.tensor([2]), torch.tensor([2]))
    assert (int(y0), int(x0)) == (0, 0)
    sal[0, 0, 2:4, 3:5] = 1.0
    y0, x0, m = best_boxes(sal, torch.tensor([2]), torch.tensor([2]))
    assert (int(y0), int(x0), float(m)) == (2, 3, 1.0)


def test_pasted_pixels_and_mask_are_correct():
    g = torch.Generator().manual_seed(0)
    b, h, w = 5, 11, 13
    imgs = torch.rand(b, 3, h, w, generator=g)
    sal = torch.rand(b, 1, h, w, generator=g)
    partner = torch.tensor([1, 2, 0, 4, 3])
    bh, bw = torch.tensor([3, 11, 1, 5, 4]), torch.tensor([4, 2, 13, 5, 6])
    view, mask, src, dst = paste(imgs, sal, partner, bh, bw)
    for i in range(b):
        (ys, xs), _ = _brute_best(sal[i, 0], int(bh[i]), int(bw[i]))
        (yd, xd), _ = _brute_best(sal[int(partner[i]), 0], int(bh[i]), int(bw[i]))
        assert src[i].tolist() == [ys, xs] and dst[i].tolist() == [yd, xd]
        want = imgs[int(partner[i])].clone()
        want[:, yd:yd + bh[i], xd:xd + bw[i]] = imgs[i, :, ys:ys + bh[i], xs:xs + bw[i]]
        want_m = torch.zeros(1, h, w)
        want_m[:, yd:yd + bh[i], xd:xd + bw[i]] = sal[i, :, ys:ys + bh[i], xs:xs + bw[i]]
        assert torch.equal(view[i], want) and torch.equal(mask[i], want_m)


def _plain(size):
    return [ViewSpec(size, (1.0, 1.0), flip_p=0.0, jitter_p=0.0, grey_p=0.0)] * 2


def test_views_are_the_paste_with_masks_at_feature_resolution():
    g = torch.Generator().manual_seed(1)
    imgs, sal = torch.rand(8, 3, 16, 16, generator=g), torch.rand(8, 1, 16, 16, generator=g)
    swap = SaliencySwap(16, feat_size=4, photometric=_plain(16), group_size=4, mean=None, std=None)
    views = swap(imgs, sal, torch.Generator().manual_seed(3))
    assert len(views) == 2
    for v in views:
        view, mask, _, _ = paste(imgs, sal, v.partner, v.src[:, 2], v.src[:, 3])
        torch.testing.assert_close(v.view, view, atol=1e-6, rtol=0)
        want = mask.reshape(8, 1, 4, 4, 4, 4).mean((3, 5))  # 4x4-pixel cells
        torch.testing.assert_close(v.mask, want, atol=1e-6, rtol=0)
        assert v.mask.shape == (8, 1, 4, 4)
        # partners lie in the sample's group of 4 and are never the sample itself
        j = torch.arange(8)
        assert ((v.partner // 4) == (j // 4)).all() and (v.partner != j).all()
    assert (views[0].partner != views[1].partner).all()  # the two views get different backgrounds


def test_flip_moves_the_mask_with_the_view_and_normalisation():
    g = torch.Generator().manual_seed(2)
    imgs, sal = torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 1, 8, 8, generator=g)
    flip = [ViewSpec(8, (1.0, 1.0), flip_p=1.0, jitter_p=0.0, grey_p=0.0)]
    swap = SaliencySwap(8, feat_size=8, photometric=flip, mean=(0.2, 0.3, 0.4), std=(0.5, 0.5, 0.25))
    v, = swap(imgs, sal, torch.Generator().manual_seed(0))
    view, mask, _, _ = paste(imgs, sal, v.partner, v.src[:, 2], v.src[:, 3])
    mean, std = torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1), torch.tensor([0.5, 0.5, 0.25]).view(1, 3, 1, 1)
    torch.testing.assert_close(v.view, (view.flip(-1) - mean) / std, atol=1e-5, rtol=0)
    torch.testing.assert_close(v.mask, mask.flip(-1), atol=0, rtol=0)


def test_deterministic_and_rows_split_equals_the_whole_batch():
    g = torch.Generator().manual_seed(4)
    imgs, sal = torch.rand(12, 3, 16, 16, generator=g), torch.rand(12, 1, 16, 16, generator=g)
    swap = SaliencySwap(16, feat_size=2, group_size=3)  # BYOL photometric recipe: jitter, blur, solarise
    whole = swap(imgs, sal, torch.Generator().manual_seed(9))
    again = swap(imgs, sal, torch.Generator().manual_seed(9))
    other = swap(imgs, sal, torch.Generator().manual_seed(10))
    for a, b in zip(whole, again):
        assert torch.equal(a.view, b.view) and torch.equal(a.mask, b.mask)
    assert not torch.equal(whole[0].view, other[0].view)
    for rows in (slice(0, 6), slice(6, 12), slice(3, 9)):
        part = swap(imgs[rows], sal[rows], torch.Generator().manual_seed(9), rows=rows, total=12)
        for a, b in zip(whole, part):
            torch.testing.assert_close(b.view, a.view[rows], atol=1e-6, rtol=0)
            assert torch.equal(b.mask, a.mask[rows]) and torch.equal(b.partner, a.partner[rows])
            assert torch.equal(b.src, a.src[rows]) and torch.equal(b.dst, a.dst[rows])


def test_bad_input_names_the_argument():
    imgs, sal = torch.rand(4, 3, 8, 8), torch.rand(4, 1, 8, 8)
    swap = SaliencySwap(8, 2, group_size=2)
    with pytest.raises(ValueError, match="saliency must be"):
        swap(imgs, sal[:, :, :4], torch.Generator())
    with pytest.raises(ValueError, match="images must be"):
        swap(imgs[:, :1], sal, torch.Generator())
    with pytest.raises(ValueError, match="group_size 2 must divide"):
        swap(imgs[:3], sal[:3], torch.Generator(), rows=slice(1, 4), total=4)
    with pytest.raises(ValueError, match="group_size must be"):
        SaliencySwap(8, 2, group_size=1)
    with pytest.raises(ValueError, match="feat_size must be"):
        SaliencySwap(8, 0)
    with pytest.raises(ValueError, match="box_scale"):
        SaliencySwap(8, 2, box_scale=(0.5, 0.1))
    with pytest.raises(TypeError, match="photometric"):
        SaliencySwap(8, 2, photometric=[None])
    with pytest.raises(ValueError, match="box sides must lie"):
        best_boxes(sal, torch.tensor([9, 1, 1, 1]), torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="partner must be"):
        paste(imgs, sal, torch.tensor([0, 1, 2, 4]), torch.ones(4, dtype=torch.long), torch.ones(4, dtype=torch.long))
