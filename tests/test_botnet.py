"""BoTNet backbone: its attention block against timm's real ``SelfAttnBlock``/``BottleneckAttn`` (same
weights) and against an explicit float64 computation; shapes, position-table gradients, size checks."""
import pytest
import torch
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.models.byobnet import LayerFn, SelfAttnBlock
from torch import nn

from ssl_fast.models import create_model, list_models
from ssl_fast.models.botnet import BoTBlock, BoTNet
from ssl_fast.models.resnet import BasicBlock, Bottleneck, conv1x1


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g, dtype=m.weight.dtype)
            m.bias.data = 0.1 * torch.randn(n, generator=g, dtype=m.weight.dtype)
            m.running_mean.data = 0.1 * torch.randn(n, generator=g, dtype=m.weight.dtype)
            m.running_var.data = 0.5 + torch.rand(n, generator=g, dtype=m.weight.dtype)


# our block's names -> timm's SelfAttnBlock names
_RENAME = {"conv1.": "conv1_1x1.conv.", "bn1.": "conv1_1x1.bn.", "conv2.": "self_attn.", "bn2.": "post_attn.",
           "conv3.": "conv3_1x1.conv.", "bn3.": "conv3_1x1.bn.", "downsample.0.": "shortcut.conv.",
           "downsample.1.": "shortcut.bn."}


def _timm_name(name: str) -> str:
    prefix = next(p for p in _RENAME if name.startswith(p))
    return _RENAME[prefix] + name[len(prefix):]


@pytest.mark.parametrize("feat,stride,cin,cout", [((4, 4), 2, 24, 64), ((4, 6), 2, 16, 32), ((3, 5), 1, 32, 32)])
def test_bot_block_equals_timms_self_attn_block(feat, stride, cin, cout):
    """Same weights: forward in eval and train mode and every gradient equal timm's ``SelfAttnBlock``
    with ``BottleneckAttn`` (ReLU, BN, 1x1 conv shortcut, bottle ratio 1/4), float64."""
    torch.manual_seed(sum(feat) + stride)
    mid = cout // 4
    ds = None
    if stride != 1 or cin != cout:
        ds = nn.Sequential(conv1x1(cin, cout, stride, dtype=torch.float64), nn.BatchNorm2d(cout, dtype=torch.float64))
    mine = BoTBlock(cin, mid, cout, feat, stride, ds, num_heads=4, dtype=torch.float64)
    _randomise_bn(mine)
    ref = SelfAttnBlock(cin, cout, stride=stride, bottle_ratio=0.25, downsample="conv1x1", feat_size=feat,
                        layers=LayerFn(self_attn=BottleneckAttn), dtype=torch.float64)
    assert sorted(ref.state_dict()) == sorted({_timm_name(k): v for k, v in mine.state_dict().items()})
    ref.load_state_dict({_timm_name(k): v for k, v in mine.state_dict().items()})
    x = torch.randn(3, cin, *feat, dtype=torch.float64)
    for train in (False, True):
        mine.train(train), ref.train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = mine(xa), ref(xb)
        assert a.shape == (3, cout, feat[0] // stride, feat[1] // stride)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        w = torch.randn_like(a)
        (a * w).sum().backward()
        (b * w).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
        ref_params = dict(ref.named_parameters())
        for name, p in mine.named_parameters():
            torch.testing.assert_close(p.grad, ref_params[_timm_name(name)].grad, rtol=1e-9, atol=1e-10, msg=name)
        mine.zero_grad(), ref.zero_grad()


def _explicit_attention(attn, x):
    """float64 eager BoTNet attention written out: per head, logits ``q.k * s + q.height_rel[yj-yi+H-1]
    + q.width_rel[xj-xi+W-1]``, softmax over keys, weighted sum of v; heads concatenated."""
    b, _, h, w = x.shape
    n, heads, d = h * w, attn.num_heads, attn.dim_head_qk
    qkv = torch.einsum("oc,bchw->bohw", attn.qkv.weight[:, :, 0, 0], x).reshape(b, -1, n)
    q, k, v = qkv[:, :heads * d], qkv[:, heads * d:2 * heads * d], qkv[:, 2 * heads * d:]
    q = q.reshape(b, heads, d, n)
    k = k.reshape(b, heads, d, n)
    v = v.reshape(b, heads, -1, n)
    ys, xs = torch.arange(n) // w, torch.arange(n) % w
    rh = attn.pos_embed.height_rel[ys[None, :] - ys[:, None] + h - 1]  # [n_q, n_k, d]
    rw = attn.pos_embed.width_rel[xs[None, :] - xs[:, None] + w - 1]
    logits = torch.einsum("bhdi,bhdj->bhij", q, k) * d ** -0.5
    logits = logits + torch.einsum("bhdi,ijd->bhij", q, rh) + torch.einsum("bhdi,ijd->bhij", q, rw)
    p = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhij,bhcj->bhci", p, v)
    return out.reshape(b, -1, h, w)


def test_network_attention_equals_an_explicit_float64_computation():
    torch.manual_seed(0)
    m = create_model("botnet_mini", img_size=(32, 48), dtype=torch.float64).eval()
    _randomise_bn(m)
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    captured = {}
    m.layer4[0].conv2.register_forward_hook(lambda mod, i, o: captured.update(inp=i[0], out=o))
    m(x)
    assert captured["inp"].shape[-2:] == (8, 12) == m.attn_size
    torch.testing.assert_close(captured["out"], _explicit_attention(m.layer4[0].conv2, captured["inp"]),
                               rtol=1e-10, atol=1e-10)


def test_first_block_attends_then_pools_like_timms_strided_bottleneck_attn():
    torch.manual_seed(1)
    m = create_model("botnet50", img_size=64, dtype=torch.float64)
    blk = m.layer4[0]
    ref = BottleneckAttn(512, 512, feat_size=(4, 4), stride=2, num_heads=4, dtype=torch.float64)
    ref.load_state_dict(blk.conv2.state_dict())
    x = torch.randn(2, 512, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(blk.pool(blk.conv2(x)), ref(x), rtol=1e-10, atol=1e-10)
    assert blk.conv2.dim_head_qk == 128 and blk.conv2.num_heads == 4  # the paper's BoT50 heads
    assert [b.conv2.feat_size for b in m.layer4] == [(4, 4), (2, 2), (2, 2)]
    assert isinstance(m.layer4[1].pool, nn.Identity) and m.layer4[0].downsample[0].stride == (2, 2)


@pytest.mark.parametrize("size", [8, 16, 32, 24])
def test_botnet_mini_shapes(size):
    torch.manual_seed(size)
    m = create_model("botnet_mini", img_size=size)
    x = torch.randn(2, 3, size, size)
    maps = m.feature_maps(x)
    s = size // 4
    assert [tuple(t.shape) for t in maps] == [(2, 16, size, size), (2, 32, size // 2, size // 2),
                                              (2, 64, s, s), (2, 128, s // 2, s // 2)]
    assert m(x).shape == (2, 128) == m.features(x).shape
    assert m.stage_channels == (16, 32, 64, 128) and m.num_features == 128 and m.attn_size == (s, s)


@pytest.mark.parametrize("size", [64, 96])
def test_botnet50_shapes(size):
    torch.manual_seed(0)
    m = create_model("botnet50", img_size=size, num_classes=10)
    x = torch.randn(1, 3, size, size)
    maps = m.feature_maps(x)
    assert [t.shape[1] for t in maps] == [256, 512, 1024, 2048] == list(m.stage_channels)
    assert maps[2].shape[-1] == size // 16 and maps[3].shape[-1] == size // 32
    assert m(x).shape == (1, 10)
    assert isinstance(m.layer3[0], Bottleneck) and len(m.layer4) == 3


def test_default_sizes():
    assert create_model("botnet50").fixed_input_size and not create_model("resnet_mini").fixed_input_size
    assert create_model("botnet50").attn_size == (14, 14)
    assert create_model("botnet_mini").attn_size == (8, 8)


def test_gradients_reach_every_position_table():
    torch.manual_seed(0)
    m = create_model("botnet_mini", img_size=16)
    m.layer4.append(BoTBlock(128, 128, 128, (2, 2), num_heads=4))  # a second (stride-1) BoT block
    out = m(torch.randn(2, 3, 16, 16))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in m.named_parameters():
        if "rel" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {n for n, _ in m.named_parameters() if "rel" in n} == {
        f"layer4.{i}.conv2.pos_embed.{t}_rel" for i in (0, 1) for t in ("height", "width")}


def test_wrong_image_size_raises_naming_img_size():
    m = create_model("botnet_mini")
    with pytest.raises(ValueError, match=r"x must be 32x32 images \(img_size=\(32, 32\).*got shape \(2, 3, 16, 16\)"):
        m(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="img_size"):
        m.feature_maps(torch.randn(1, 3, 33, 32))
    with pytest.raises(ValueError, match=r"img_size 28 gives a 7x7 map before the BoT stage; it must be even"):
        create_model("botnet_mini", img_size=28)
    with pytest.raises(ValueError, match="img_size must be a positive int"):
        create_model("botnet_mini", img_size=0)
    with pytest.raises(ValueError, match=r"divisible by num_heads \(3\)"):
        create_model("botnet_mini", num_heads=3)


def test_options_and_keywords():
    names = ["botnet50", "botnet_mini"]
    assert set(names) <= set(list_models())
    m = create_model("botnet_mini", drop_path_rate=0.3, zero_init_residual=True, num_classes=3)
    rates = [0.0 if b.drop_path is None else b.drop_path.p for i in range(1, 5) for b in getattr(m, f"layer{i}")]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert torch.all(m.layer4[0].bn3.weight == 0) and torch.all(m.layer1[0].bn2.weight == 0)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    d = create_model("botnet_mini", dtype=torch.float64, img_size=16)
    assert {p.dtype for p in d.parameters()} == {torch.float64}
    assert d(torch.randn(2, 3, 16, 16, dtype=torch.float64)).dtype == torch.float64
    bb = BoTNet(BasicBlock, (1, 1, 1, 2), img_size=16, small_stem=True, width=8, last_stage_expansion=4)
    assert bb.stage_channels == (8, 16, 32, 256) and bb.layer4[1].conv2.feat_size == (2, 2)
    # timm's attention init: qkv std fan_in ** -0.5, tables std dim_head ** -0.5
    big = create_model("botnet50")
    w = big.layer4[0].conv2.qkv.weight
    assert abs(w.std().item() - 512 ** -0.5) < 0.1 * 512 ** -0.5
    t = big.layer4[0].conv2.pos_embed.height_rel
    assert t.shape == (27, 128) and abs(t.std().item() - 128 ** -0.5) < 0.2 * 128 ** -0.5
