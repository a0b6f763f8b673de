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
