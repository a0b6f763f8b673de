"""Saliency sources: spectral residual against a NumPy float64 re-computation of the paper's
formula, boxes and masks, the DINO teacher's attention from a checkpoint, and the verified cache."""
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ssl_fast.data.saliency import box_saliency, cache_path, compute_saliency, dino_saliency, spectral_residual


def _numpy_spectral_residual(img_rgb, sigma=2.5, eps=1e-12):
    """Hou & Zhang (CVPR 2007), the paper's MATLAB listing in NumPy float64, for an image already
    64 pixels wide: rgb2gray; log|FFT|; minus its 3x3 average (replicate border); |IFFT(exp(R + iP))|^2;
    imfilter with fspecial('gaussian', [10, 10], sigma) (zero border, centre tap 5 of 10); mat2gray."""
    r, g, b = img_rgb
    grey = 0.2989 * r + 0.5870 * g + 0.1140 * b
    f = np.fft.fft2(grey)
    log_amp = np.log(np.abs(f) + eps)
    phase = np.angle(f)
    p = np.pad(log_amp, 1, mode="edge")
    h, w = log_amp.shape
    avg = np.zeros_like(log_amp)
    for dy in range(3):
        for dx in range(3):
            avg += p[dy:dy + h, dx:dx + w] / 9.0
    sal = np.abs(np.fft.ifft2(np.exp((log_amp - avg) + 1j * phase))) ** 2
    t = np.arange(1, 11) - 5.5  # fspecial: offsets -4.5..4.5
    kern = np.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sigma ** 2))
    kern /= kern.sum()
    out = np.zeros_like(sal)
    for i in range(h):
        for j in range(w):
            acc = 0.0
            for ki in range(10):
                for kj in range(10):
                    y, x = i + ki - 4, j + kj - 4  # MATLAB: in(i + k - 5) with 1-based k
                    if 0 <= y < h and 0 <= x < w:
                        acc += kern[ki, kj] * sal[y, x]
            out[i, j] = acc
    return (out - out.min()) / (out.max() - out.min())


def test_spectral_residual_matches_the_paper_formula():
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(2, 3, 24, 64, generator=g, dtype=torch.float64)
    imgs[:, :, 8:14, 20:30] += 0.8  # a blob to find
    imgs = imgs.clamp(0, 1)
    ours = spectral_residual(imgs)
    assert ours.shape == (2, 1, 24, 64) and ours.dtype == torch.float32
    for i in range(2):
        ref = _numpy_spectral_residual(imgs[i].numpy())
        np.testing.assert_allclose(ours[i, 0].numpy(), ref, atol=1e-6, rtol=0)


def test_spectral_residual_finds_a_small_odd_object_and_resizes():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        bg = F.interpolate(torch.rand(1, 1, 8, 8, generator=g), size=(64, 64), mode="bicubic").clamp(0, 1) * 0.5
        bg = bg + 0.2 * torch.rand(1, 1, 64, 64, generator=g)
        y0, x0 = (int(v) for v in torch.randint(8, 50, (2,), generator=g))
        bg[..., y0:y0 + 6, x0:x0 + 6] = 1.0
        s = spectral_residual(bg.expand(-1, 3, -1, -1))
        assert s.shape == (1, 1, 64, 64) and float(s.min()) == 0.0 and float(s.max()) == 1.0
        y, x = divmod(int(s.flatten().argmax()), 64)
        assert y0 - 3 <= y <= y0 + 8 and x0 - 3 <= x <= x0 + 8
    assert spectral_residual(torch.zeros(1, 3, 8, 8)).abs().max() == 0  # flat image: finite, zero
    assert spectral_residual(bg, out_size=(8, 4)).shape == (1, 1, 8, 4)


def test_box_saliency_is_the_covered_area():
    boxes = torch.tensor([[1.0, 2.0, 4.0, 3.0], [0.5, 0.25, 2.5, 1.75]])
    s = box_saliency(boxes, 4, 5)
    want = torch.zeros(2, 1, 4, 5)
    want[0, 0, 2, 1:4] = 1
    for y in range(4):
        for x in range(5):
            cy = max(0.0, min(y + 1, 1.75) - max(y, 0.25))
            cx = max(0.0, min(x + 1, 2.5) - max(x, 0.5))
            want[1, 0, y, x] = cy * cx
    torch.testing.assert_close(s, want)


def test_cache_is_reused_verified_and_recomputed(tmp_path):
    g = torch.Generator().manual_seed(1)
    imgs = torch.rand(3, 3, 16, 16, generator=g)
    a = compute_saliency(imgs, "spectral-residual", data_name="cluttered-digits", cache_dir=str(tmp_path))
    path = cache_path(str(tmp_path), "cluttered-digits", "spectral-residual", 16, 16)
    assert os.path.isfile(path) and os.path.basename(path) == "saliency-cluttered-digits-spectral-residual-16x16.pt"
    torch.testing.assert_close(a, (spectral_residual(imgs) * 255).round() / 255)
    stamp = os.stat(path).st_mtime_ns
    b = compute_saliency(imgs, "spectral-residual", data_name="cluttered-digits", cache_dir=str(tmp_path))
    assert torch.equal(a, b) and os.stat(path).st_mtime_ns == stamp  # loaded, not rewritten
    other = imgs.clone()
    other[0, 0, 0, 0] += 0.5
    with pytest.warns(RuntimeWarning, match="made for other images"):
        c = compute_saliency(other, "spectral-residual", data_name="cluttered-digits", cache_dir=str(tmp_path))
    assert torch.equal(c, compute_saliency(other, "spectral-residual"))
    with open(path, "wb") as f:
        f.write(b"garbage")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        compute_saliency(other, "spectral-residual", data_name="cluttered-digits", cache_dir=str(tmp_path))
    m = (torch.rand(3, 1, 16, 16, generator=g) > 0.5).float()
    torch.testing.assert_close(compute_saliency(imgs, "masks", masks=m), m)
    torch.testing.assert_close(compute_saliency(imgs, "boxes", boxes=torch.tensor([[0.0, 0, 4, 4]] * 3)),
                               box_saliency(torch.tensor([[0.0, 0, 4, 4]] * 3), 16, 16))


def _tiny_dino_checkpoint(path):
    from ssl_fast.methods import MethodContext, create_method
    from ssl_fast.models import register_model
    from ssl_fast.models.registry import list_models
    from ssl_fast.models.vit import VisionTransformer

    name = "_test_vit_saliency"
    if name not in list_models():
        @register_model(name)
        def _tiny(**kw):
            cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
            cfg.update(kw)
            return VisionTransformer(**cfg)
    opts = dict(out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, local_crops=2, global_crop_size=16,
                local_crop_size=8)
    mean, std = (0.2, 0.3, 0.4), (0.25, 0.3, 0.35)
    ctx = MethodContext(arch=name, epochs=2, steps_per_epoch=3, global_batch_size=8, image_size=16, mean=mean,
                        std=std, options=opts)
    torch.manual_seed(0)
    method = create_method("dino", ctx)
    with torch.no_grad():  # a teacher that differs from the student's initialisation
        for p in method.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"config": {"method": "dino", "arch": name, "epochs": 2, "batch_size": 8, "image_size": 16,
                           "options": opts}, "method": method.state_dict()}, path)
    return method, mean, std


def test_dino_teacher_attention_from_a_checkpoint(tmp_path):
    method, mean, std = _tiny_dino_checkpoint(tmp_path / "checkpoint.pth")
    imgs = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    s = dino_saliency(str(tmp_path / "checkpoint.pth"), imgs, mean, std, batch_size=2)
    att = method.eval().attention_maps(imgs)  # [B, heads, 4, 4], the method's own code
    ref = F.interpolate(att.mean(1, keepdim=True), size=(16, 16), mode="bilinear", align_corners=False)
    lo, hi = ref.amin((2, 3), keepdim=True), ref.amax((2, 3), keepdim=True)
    torch.testing.assert_close(s, (ref - lo) / (hi - lo), atol=1e-5, rtol=0)
    cached = compute_saliency(imgs, "dino", checkpoint=str(tmp_path / "checkpoint.pth"), mean=mean, std=std,
                              cache_dir=str(tmp_path), data_name="x")
    torch.testing.assert_close(cached, (s * 255).round() / 255)
    # another checkpoint (same images, size and name) invalidates the cache
    with torch.no_grad():
        for p in method.teacher.parameters():
            p.mul_(1.5)
    ck = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    ck["method"] = method.state_dict()
    torch.save(ck, tmp_path / "checkpoint.pth")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        compute_saliency(imgs, "dino", checkpoint=str(tmp_path / "checkpoint.pth"), mean=mean, std=std,
                         cache_dir=str(tmp_path), data_name="x")
    assert any("recomputing" in str(x.message) for x in w)


def test_bad_input_names_the_argument(tmp_path):
    imgs = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="source must be one of"):
        compute_saliency(imgs, "itti")
    with pytest.raises(ValueError, match="checkpoint must be"):
        compute_saliency(imgs, "dino", checkpoint=str(tmp_path / "none.pth"))
    with pytest.raises(ValueError, match="masks must be"):
        compute_saliency(imgs, "masks", masks=torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="masks hold NaN"):
        compute_saliency(imgs, "masks", masks=torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="boxes must be"):
        compute_saliency(imgs, "boxes")
    with pytest.raises(ValueError, match="images must be"):
        spectral_residual(torch.rand(2, 8, 8))
    with pytest.raises(TypeError, match="images must be floating"):
        spectral_residual(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_lookup_finds_rows_by_content():
    from ssl_fast.data.saliency import SaliencyLookup

    g = torch.Generator().manual_seed(3)
    imgs = torch.rand(50, 3, 8, 8, generator=g)
    imgs[7] = imgs[8]  # duplicates: either row is right, both have this saliency here
    sal = torch.rand(50, 1, 8, 8, generator=g)
    sal[7] = sal[8]
    lookup = SaliencyLookup(imgs, sal)
    idx = torch.randperm(50, generator=g)[:20]
    rows = lookup.rows_of(imgs[idx])
    assert torch.equal(imgs[rows], imgs[idx])
    torch.testing.assert_close(lookup(imgs[idx]), (sal[idx] * 255).round() / 255)
    changed = imgs[idx].clone()
    changed[2, 0, 0, 0] += 1e-3
    with pytest.raises(ValueError, match=r"batch images \[2\] equal no image"):
        lookup(changed)
    with pytest.raises(ValueError, match="saliency must be"):
        SaliencyLookup(imgs, sal[:3])
