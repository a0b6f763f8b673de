"""ViT backbone, DINO head and model registry."""

import pytest
import torch
import torch.nn.functional as F

from ssl_fast.models import DINOHead, VisionTransformer, create_model, list_models, register_model
from ssl_fast.models.layers import drop_path


def _tiny(**kw):
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    cfg.update(kw)
    return VisionTransformer(**cfg)


def test_registry_lists_and_creates_the_documented_sizes():
    names = list_models()
    for n in ("vit_tiny", "vit_small", "vit_base", "vit_tiny_p4", "vit_small_p8", "vit_base_p16"):
        assert n in names
    m = create_model("vit_small_p8", depth=1)
    assert (m.embed_dim, m.num_heads, m.patch_size, len(m.blocks)) == (384, 6, 8, 1)
    m = create_model("vit_tiny", depth=1)
    assert (m.embed_dim, m.num_heads, m.patch_size) == (192, 3, 16)
    assert create_model("vit_base_p4", depth=1).embed_dim == 768


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'nope'.*vit_tiny"):
        create_model("nope")

    @register_model("_test_dup_model")
    def a():
        return torch.nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        @register_model("_test_dup_model")
        def b():
            return torch.nn.Identity()


@pytest.mark.parametrize("size", [16, 8, 12, 24])
def test_vit_shapes_for_every_crop_size(size):
    torch.manual_seed(0)
    m = _tiny()
    x = torch.randn(3, 3, size, size)
    assert m(x).shape == (3, 32)
    tokens = m.forward_tokens(x)
    assert tokens.shape == (3, 1 + (size // 4) ** 2, 32)
    assert torch.equal(m.forward_features(x), tokens[:, 0])
    att = m.last_attention(x)
    assert att.shape == (3, 2, 1, 1 + (size // 4) ** 2)
    torch.testing.assert_close(att.sum(-1), torch.ones(3, 2, 1))


def test_vit_rejects_sizes_that_do_not_fit_the_patch():
    with pytest.raises(ValueError, match="multiple of the patch size 4"):
        _tiny()(torch.randn(1, 3, 10, 10))


def test_pos_embed_interpolation_is_identity_at_the_native_grid_and_bicubic_elsewhere():
    torch.manual_seed(0)
    m = _tiny()
    assert m.interpolate_pos_encoding(4, 4) is m.pos_embed
    pe = m.interpolate_pos_encoding(2, 3)
    assert pe.shape == (1, 1 + 6, 32)
    assert torch.equal(pe[:, 0], m.pos_embed[:, 0])  # class token's embedding untouched
    grid = m.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(2, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 6, 32)
    torch.testing.assert_close(pe[:, 1:], want)
    # gradients reach the stored embeddings through the interpolation
    m.interpolate_pos_encoding(8, 8).sum().backward()
    assert m.pos_embed.grad is not None and m.pos_embed.grad.abs().sum() > 0


def test_last_attention_matches_a_manual_softmax():
    torch.manual_seed(1)
    m = _tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    t = m.prepare_tokens(x)
    for blk in m.blocks[:-1]:
        t = blk(t)
    a = m.blocks[-1].attn
    qkv = a.qkv(m.blocks[-1].norm1(t)).reshape(2, 17, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    want = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * 16 ** -0.5, dim=-1)
    torch.testing.assert_close(m.last_attention(x), want, rtol=1e-5, atol=1e-6)


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(4000, 3)
    y = drop_path(x, 0.25, training=True)
    rows = y[:, 0]
    assert set(torch.unique(rows).tolist()) <= {0.0, torch.tensor(1 / 0.75).item()}
    assert torch.all(y == y[:, :1])  # a whole sample is dropped or kept
    assert abs(rows.mean().item() - 1.0) < 0.05
    assert torch.equal(drop_path(x, 0.25, training=False), x)
    m = _tiny(drop_path_rate=0.2)
    assert [b.drop_path.p for b in m.blocks] == [0.0, 0.2]


def test_dino_head_shapes_norms_and_frozen_magnitude():
    torch.manual_seed(0)
    h = DINOHead(32, 100, hidden_dim=48, bottleneck_dim=16)
    y = h(torch.randn(5, 32))
    assert y.shape == (5, 100)
    g = h.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    # unit-norm prototypes and an L2-normalised bottleneck bound every logit by 1
    torch.testing.assert_close(h.last_layer.weight.norm(dim=1), torch.ones(100))
    assert y.abs().max() <= 1 + 1e-5
    free = DINOHead(32, 100, hidden_dim=48, bottleneck_dim=16, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad
    assert len(free.last_layer_parameters()) == 2 and len(h.last_layer_parameters()) == 1
    assert len([m for m in DINOHead(8, 4, nlayers=3, hidden_dim=8, bottleneck_dim=4).mlp
                if isinstance(m, torch.nn.Linear)]) == 3


# ---- every architecture --list-archs prints trains under every method ----------------------------
# Models registered by the tests themselves start with "_" and are left out.
_ARCHS = [a for a in list_models() if not a.startswith("_")]
# the smallest method settings that still exercise every piece (global and local crops, head)
_METHOD_OPTIONS = {"dino": dict(out_dim=32, head_hidden_dim=32, head_bottleneck_dim=16, local_crops=1,
                                global_crop_size=32, local_crop_size=16, drop_path=0.1),
                   "byol": dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32),
                   "simsiam": dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=8),
                   "care": dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, t_layers=1, t_heads=2,
                                t_dim_head=8),
                   "cvsa": dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, conv_hidden_dim=16, conv_dim=8,
                                saliency="spectral-residual")}


def _options(method: str, arch: str) -> dict:
    opts = dict(_METHOD_OPTIONS.get(method, {}))
    if method == "dino" and getattr(create_model(arch), "fixed_input_size", False):
        opts["local_crop_size"] = 32  # one input size only (BoTNet): every crop at 32 px
    return opts


def _arch_method_cases():
    from ssl_fast.methods import list_methods

    from ssl_fast.methods import get_method

    # CARE and CVSA need a CNN with stages (CARE's transformer stream runs on layer3)
    return [(m, a) for m in list_methods() for a in _ARCHS
            if not get_method(m).requires_feature_maps or hasattr(create_model(a), "feature_maps")]


@pytest.mark.parametrize("method,arch", _arch_method_cases())
def test_every_listed_arch_trains_one_step_under_every_method(method, arch, tmp_path):
    """The CLI's code path (TrainConfig -> Trainer -> the method's from_context -> create_model) at
    32 px with a batch of 8, one optimizer step. Before: cvt_13 and cvt_21 failed at start-up
    (``CvT.__init__() got an unexpected keyword argument 'drop_path_rate'``)."""
    from ssl_fast.data import ImageSet
    from ssl_fast.train import TrainConfig, Trainer

    g = torch.Generator().manual_seed(0)
    # a batch of 8: BatchNorm over 2 samples of a 1x1 map (ResNet-50 at 32 px) blows the step up
    x, y = torch.rand(10, 3, 32, 32, generator=g), torch.tensor([0, 1] * 5)
    data = (ImageSet(x[:8], y[:8], ["a", "b"]), ImageSet(x[8:], y[8:], ["a", "b"]))
    cfg = TrainConfig(method=method, data="images", arch=arch, epochs=1, batch_size=8, image_size=32,
                      max_steps_per_epoch=1, out=str(tmp_path), device="cpu",
                      options=_options(method, arch))
    trainer = Trainer(cfg, data=data)
    trainer.progress.enabled = False
    params = [p for p in trainer.method.trainable().parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    res = trainer.train_epoch(0)
    assert torch.isfinite(torch.tensor(res["loss"]))
    changed = sum(not torch.equal(b, p) for b, p in zip(before, params))
    assert changed >= len(params) // 2, f"{arch}: only {changed} of {len(params)} parameter tensors were updated"
    feats = trainer.method.features(x[:2])
    assert feats.dim() == 2 and feats.shape[0] == 2 and torch.isfinite(feats).all()


@pytest.mark.parametrize("arch", ["cvt_13", "cvt_21"])
def test_cvt_takes_the_backbone_keywords(arch):
    m = create_model(arch, drop_path_rate=0.2)
    assert isinstance(m.head, torch.nn.Identity)  # a backbone, like every registered model
    rates = [getattr(b.drop_path, "p", 0.0)
             for i in range(3) for b in getattr(m, f"stage{i}").blocks]
    assert rates[-1] == pytest.approx(0.2) and rates[0] == 0.0
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 384)
    assert create_model(arch, num_classes=10).eval()(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\), got 1.5"):
        create_model(arch, drop_path_rate=1.5)
