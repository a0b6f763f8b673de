"""DINO method: multi-crop wrapper, determinism, frozen last layer, teacher EMA, augmentation."""
import pytest
import torch

from ssl_fast.data import MultiCrop
from ssl_fast.methods import DINO, Batch, MethodContext, create_method, list_methods
from ssl_fast.methods.dino import MultiCropWrapper
from ssl_fast.models import register_model
from ssl_fast.models.vit import VisionTransformer


@register_model("_test_vit_micro")
def _test_vit_micro(**kw):
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    cfg.update(kw)
    return VisionTransformer(**cfg)


OPTS = dict(out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, local_crops=2, global_crop_size=16,
            local_crop_size=8)


def _method(seed=0, epochs=2, steps=3, **opts):
    torch.manual_seed(seed)
    ctx = MethodContext(arch="_test_vit_micro", epochs=epochs, steps_per_epoch=steps, global_batch_size=6,
                        image_size=16, options={**OPTS, **opts})
    return create_method("dino", ctx)


def _run(method, images, epoch_steps=((0, 0), (0, 1), (1, 0)), seed=0):
    opt = torch.optim.AdamW(method.param_groups(), lr=1e-3)
    losses = []
    for epoch, step in epoch_steps:
        gen = torch.Generator().manual_seed(1000 * seed + 10 * epoch + step)
        out = method.training_step(Batch(images, gen, slice(0, images.shape[0]), images.shape[0]), epoch, step)
        opt.zero_grad()
        out["loss"].backward()
        method.before_optimizer_step(epoch, step)
        opt.step()
        method.after_optimizer_step(epoch, step)
        losses.append(out["loss"].item())
    return losses


def test_dino_is_registered():
    assert "dino" in list_methods()
    assert isinstance(_method(), DINO)


def test_training_steps_are_deterministic_with_a_seed():
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    a, b = _method(seed=0), _method(seed=0)
    la, lb = _run(a, images), _run(b, images)
    assert la == lb
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    c = _method(seed=1)
    assert _run(c, images) != la


def test_multicrop_wrapper_runs_the_backbone_once_per_resolution():
    calls = []
    bb = _test_vit_micro()
    bb.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    w = MultiCropWrapper(bb, torch.nn.Linear(32, 5))
    crops = [torch.randn(2, 3, 16, 16)] * 2 + [torch.randn(2, 3, 8, 8)] * 3
    out = w(crops)
    assert out.shape == (10, 5)
    assert calls == [(4, 3, 16, 16), (6, 3, 8, 8)]
    # same numbers as running every crop on its own (crop-major order)
    bb.eval()
    ref = torch.cat([w.head(bb(c)) for c in crops])
    torch.testing.assert_close(w(crops), ref, rtol=1e-5, atol=1e-5)


def test_last_layer_frozen_in_the_first_epoch_then_trained_and_teacher_follows_by_ema():
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    m = _method(norm_last_layer=0)
    last = [p.detach().clone() for p in m.student.head.last_layer.parameters()]
    first_mlp = m.student.head.mlp[0].weight.detach().clone()
    _run(m, images, epoch_steps=((0, 0), (0, 1)))
    for p, q in zip(m.student.head.last_layer.parameters(), last):
        assert torch.equal(p, q)  # frozen during epoch 0
    assert not torch.equal(m.student.head.mlp[0].weight, first_mlp)
    t_before = m.teacher.module.head.mlp[0].weight.detach().clone()
    _run(m, images, epoch_steps=((1, 0),))
    assert any(not torch.equal(p, q) for p, q in zip(m.student.head.last_layer.parameters(), last))
    # teacher = m * teacher + (1 - m) * student (new student), never a gradient
    mom = m.teacher.momentum  # momentum of the next update; recompute the last one
    assert all(p.grad is None for p in m.teacher.parameters())
    s_after = m.student.head.mlp[0].weight
    t_after = m.teacher.module.head.mlp[0].weight
    m_used = (t_after - s_after).norm() / (t_before - s_after).norm()
    assert 0.99 < m_used.item() <= 1.0 and mom >= 0.996
    assert m.teacher.module.training is False and m.student.training is True


def test_gradient_clipping_is_per_parameter():
    m = _method(clip_grad=0.5)
    for p in m.student.parameters():
        p.grad = torch.full_like(p, 10.0)
    m.before_optimizer_step(1, 0)
    for p in m.student.parameters():
        if p.requires_grad:
            assert abs(p.grad.norm().item() - 0.5) < 1e-3


def test_param_groups_exclude_biases_and_norms_from_weight_decay():
    m = _method()
    groups = m.param_groups()
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["apply_weight_decay"] and not groups[1]["apply_weight_decay"]
    for name, p in m.student.named_parameters():
        if not p.requires_grad:
            assert id(p) not in decay | no_decay
        elif name.endswith(".bias") or "norm" in name.split(".")[-2]:
            assert id(p) in no_decay, name
        elif p.dim() > 1:
            assert id(p) in decay, name


def test_loss_updates_the_center_and_reports_entropy():
    m = _method()
    images = torch.rand(6, 3, 16, 16)
    c0 = m.loss_fn.center.clone()
    out = m.training_step(Batch(images, torch.Generator().manual_seed(0), slice(0, 6), 6), 0, 0)
    assert not torch.equal(m.loss_fn.center, c0)
    assert 0 <= out["teacher_entropy"] <= torch.log(torch.tensor(64.0)) + 1e-4
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    assert m.collapse_warnings({"teacher_entropy": 4.15, "teacher_marginal_entropy": 3.0})
    assert m.collapse_warnings({"teacher_entropy": 1.0, "teacher_marginal_entropy": 0.01})
    assert not m.collapse_warnings({"teacher_entropy": 1.0, "teacher_marginal_entropy": 3.0})


@pytest.mark.parametrize("opts,match", [
    (dict(global_crop_size=18), "global crop size 18 px does not fit the patch size 4"),
    (dict(local_crop_size=6), "local crop size 6 px does not fit the patch size 4"),
    (dict(local_crop_size=24), "larger than the global crop size"),
])
def test_crop_sizes_must_fit_the_patch(opts, match):
    with pytest.raises(ValueError, match=match):
        _method(**opts)


def test_multicrop_is_reproducible_and_shards_match_the_global_batch():
    mc = MultiCrop(16, 8, 3, flip_p=0.5)
    images = torch.rand(8, 3, 16, 16)
    full = mc(images, torch.Generator().manual_seed(7))
    again = mc(images, torch.Generator().manual_seed(7))
    other = mc(images, torch.Generator().manual_seed(8))
    assert [v.shape for v in full] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 3
    assert all(torch.equal(a, b) for a, b in zip(full, again))
    assert not torch.equal(full[0], other[0])
    for r in range(2):
        rows = slice(4 * r, 4 * r + 4)
        part = mc(images[rows], torch.Generator().manual_seed(7), rows=rows, total=8)
        assert all(torch.equal(p, f[rows]) for p, f in zip(part, full))


def test_identity_crop_reproduces_the_image():
    from ssl_fast.data.augment import ViewSpec, apply_view, draw_view_params

    spec = ViewSpec(16, (1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grey_p=0.0)
    x = torch.rand(2, 3, 16, 16)
    p = draw_view_params(spec, 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(apply_view(x, spec, p), x, rtol=1e-5, atol=1e-5)
    flip = ViewSpec(16, (1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0, jitter_p=0.0, grey_p=0.0, solarize_p=1.0)
    p = draw_view_params(flip, 2, torch.Generator().manual_seed(0))
    want = x.flip(-1)
    want = torch.where(want >= 0.5, 1 - want, want)
    torch.testing.assert_close(apply_view(x, flip, p), want, rtol=1e-5, atol=1e-5)


def test_colour_jitter_identity_and_grey_invariance():
    from ssl_fast.data.augment import ViewSpec, colour_jitter, draw_view_params

    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    p = draw_view_params(ViewSpec(8, (0.5, 1.0)), 5, torch.Generator().manual_seed(1))
    p["jitter"][:] = True
    ident = dict(p, brightness=torch.ones(5, dtype=torch.float64), contrast=torch.ones(5, dtype=torch.float64),
                 saturation=torch.ones(5, dtype=torch.float64), hue=torch.zeros(5, dtype=torch.float64))
    torch.testing.assert_close(colour_jitter(x, ident), x, rtol=0, atol=1e-6)
    grey = x[:, :1].expand(-1, 3, -1, -1)
    hue_sat = dict(ident, hue=p["hue"], saturation=p["saturation"])
    torch.testing.assert_close(colour_jitter(grey, hue_sat), grey, rtol=0, atol=1e-5)  # no chroma to rotate
    assert not torch.allclose(colour_jitter(x, dict(ident, hue=torch.full((5,), 0.1, dtype=torch.float64))), x)


def test_per_sample_blur_matches_a_2d_gaussian_convolution():
    import torch.nn.functional as F
    from ssl_fast.data.augment import gaussian_blur

    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.6, 1.0, 0.3, 1.2], dtype=torch.float64)
    apply = torch.tensor([True, False, True, True])
    y = gaussian_blur(x, sigma, apply)
    assert torch.equal(y[1], x[1])
    r = 4  # ceil(3 * 1.2)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    for i in (0, 2, 3):
        k = torch.exp(-t ** 2 / (2 * sigma[i] ** 2))
        k = (k / k.sum()).float()
        xp = F.pad(x[i:i + 1], (r, r, r, r), mode="reflect")
        ref = F.conv2d(xp.transpose(0, 1), (k[:, None] * k[None, :])[None, None]).transpose(0, 1)
        torch.testing.assert_close(y[i:i + 1], ref, rtol=1e-5, atol=1e-6)
