"""CARE's transformer stack against the official ``TransStack`` (tests/official/care_bottleneck_transformer.py,
ChongjianGE/CARE models/trans.py at 3187afb): same weights -> same outputs and gradients, float64."""
import pytest
import torch
from torch import nn

from official.care_bottleneck_transformer import TransStack
from ssl_fast.models import list_models
from ssl_fast.models.bot_stack import BoTStack, convert_official_state_dict


def _randomise(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN parameters and statistics, the zero-gamma last BNs included (a zero gamma would
    hide the attention branch entirely)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n, dt = m.num_features, m.weight.dtype
            m.weight.data = 0.5 + torch.rand(n, generator=g, dtype=dt)
            m.bias.data = 0.1 * torch.randn(n, generator=g, dtype=dt)
            m.running_mean.data = 0.1 * torch.randn(n, generator=g, dtype=dt)
            m.running_var.data = 0.5 + torch.rand(n, generator=g, dtype=dt)


def _pair(cfg, official_activation=None, seed=0):
    torch.manual_seed(seed)
    ref = TransStack(**{k: v for k, v in cfg.items() if k != "in_channels"}, dim=cfg["in_channels"],
                     **({} if official_activation is None else {"activation": official_activation})).double()
    _randomise(ref, seed)
    mine_cfg = {k: v for k, v in cfg.items() if k != "fmap_size"}
    mine = BoTStack(feat_size=cfg["fmap_size"], dtype=torch.float64, **mine_cfg)
    res = mine.load_state_dict(convert_official_state_dict(ref.state_dict()))
    assert not res.missing_keys and not res.unexpected_keys
    return ref, mine


CONFIGS = [
    dict(in_channels=24, fmap_size=8, dim_out=64, proj_factor=4, num_layers=3, heads=4, dim_head=16, downsample=True),
    dict(in_channels=16, fmap_size=(4, 6), dim_out=32, proj_factor=2, num_layers=2, heads=2, dim_head=24,
         downsample=True),
    dict(in_channels=24, fmap_size=(3, 5), dim_out=32, proj_factor=4, num_layers=2, heads=4, dim_head=8,
         downsample=False),  # 1x1 shortcut in the first block only
    dict(in_channels=32, fmap_size=4, dim_out=32, proj_factor=4, num_layers=2, heads=1, dim_head=16,
         downsample=False),  # identity shortcuts
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_same_weights_give_the_official_outputs_and_gradients(cfg):
    ref, mine = _pair(cfg)
    x = torch.randn(3, cfg["in_channels"], *mine.feat_size, dtype=torch.float64)
    ref_params = dict(ref.named_parameters())
    names = convert_official_state_dict({n: n for n in ref_params})  # ours -> official
    for train in (True, False):
        ref.train(train), mine.train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = mine(xa), ref(xb)
        assert a.shape == (3, cfg["dim_out"], *mine.out_size)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        w = torch.randn_like(a)
        (a * w).sum().backward()
        (b * w).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
        for name, p in mine.named_parameters():
            torch.testing.assert_close(p.grad, ref_params[names[name]].grad, rtol=1e-9, atol=1e-10, msg=name)
        mine.zero_grad(), ref.zero_grad()
    for (name, buf), other in zip(mine.state_dict().items(), convert_official_state_dict(ref.state_dict()).values()):
        torch.testing.assert_close(buf, other, msg=name)  # running statistics updated alike


def test_official_activation_instance_and_class_agree():
    cfg = CONFIGS[0]
    ref, _ = _pair(cfg, official_activation=nn.GELU(), seed=3)
    for act in (nn.GELU, nn.GELU()):
        mine = BoTStack(feat_size=8, dtype=torch.float64, activation=act,
                        **{k: v for k, v in cfg.items() if k != "fmap_size"}).eval()
        mine.load_state_dict(convert_official_state_dict(ref.state_dict()))
        x = torch.randn(2, 24, 8, 8, dtype=torch.float64)
        torch.testing.assert_close(mine(x), ref.eval()(x), rtol=1e-10, atol=1e-10)
    shared = BoTStack(24, 8, dim_out=64, num_layers=1, dim_head=16, activation=nn.GELU())
    assert shared.net[0].activation is shared.net[0].net[2]  # one module, as officially


def test_care_configuration_matches_the_official_one():
    """The CARE setting (layer3 of ResNet-50: 1024 x 14 x 14; 5 blocks, 2048 out, 4 heads of 128):
    the same parameter names (after renaming), shapes, count and output, float32."""
    torch.manual_seed(0)
    ref = TransStack(dim=1024, fmap_size=14, dim_out=2048, proj_factor=4, num_layers=5, heads=4, dim_head=128,
                     downsample=True, rel_pos_emb=False, activation=nn.ReLU()).eval()
    mine = BoTStack(1024, 14).eval()
    official = convert_official_state_dict(ref.state_dict())
    assert {k: tuple(v.shape) for k, v in mine.state_dict().items()} == {k: tuple(v.shape) for k, v in official.items()}
    assert sum(p.numel() for p in mine.parameters()) == sum(p.numel() for p in ref.parameters())
    _randomise(ref)
    mine.load_state_dict(convert_official_state_dict(ref.state_dict()))
    x = torch.randn(1, 1024, 14, 14)
    with torch.no_grad():
        out = mine(x)
        assert out.shape == (1, 2048, 7, 7) and mine.out_size == (7, 7)
        torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-4)
    assert [b.attn.feat_size for b in mine.net] == [(14, 14)] + [(7, 7)] * 4
    first = mine.net[0].shortcut[0]
    assert (first.kernel_size, first.stride, first.padding) == ((3, 3), (2, 2), (1, 1))


def test_blocks_start_as_their_shortcut_and_positions_get_gradients():
    torch.manual_seed(0)
    m = BoTStack(16, 8, dim_out=32, num_layers=2, heads=2, dim_head=8).eval()
    for blk in m.net:
        assert torch.all(blk.net[-1].weight == 0)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        first = m.net[0]
        want = torch.relu(first.shortcut(x))
        torch.testing.assert_close(first(x), want)
        torch.testing.assert_close(m.net[1](want), want)  # identity shortcut, relu of a relu
    m.train()
    for blk in m.net:
        nn.init.ones_(blk.net[-1].weight)
    out = m(x)
    (out * torch.randn_like(out)).sum().backward()
    for name, p in m.named_parameters():
        if "pos_embed" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_reset_parameters_as_care_resnet():
    torch.manual_seed(0)
    m = BoTStack(32, 4, dim_out=64, num_layers=2, heads=2, dim_head=16)
    before = m.net[0].attn.pos_embed.height.detach().clone()
    m.reset_parameters_as_care_resnet()
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)
    qkv = m.net[0].attn.qkv.weight  # kaiming fan-out: std sqrt(2 / out_channels)
    assert abs(qkv.std().item() - (2 / qkv.shape[0]) ** 0.5) < 0.1 * (2 / qkv.shape[0]) ** 0.5
    assert torch.equal(m.net[0].attn.pos_embed.height, before)


def test_convert_official_state_dict_prefix():
    sd = {"module.student_encoder.trans.net.0.net.3.to_qkv.weight": torch.zeros(1),
          "module.student_encoder.trans.net.0.net.3.pos_emb.height": torch.ones(1),
          "module.student_encoder.fc1.0.weight": torch.ones(2)}
    out = convert_official_state_dict(sd, prefix="module.student_encoder.trans.")
    assert sorted(out) == ["net.0.net.3.pos_embed.height", "net.0.net.3.qkv.weight"]


def test_bad_input_raises_naming_it():
    m = BoTStack(16, (4, 6), dim_out=32, num_layers=1, heads=2, dim_head=8)
    with pytest.raises(ValueError, match=r"x must be \[B, 16, 4, 6\] \(in_channels, feat_size\), got \(2, 16, 6, 4\)"):
        m(torch.randn(2, 16, 6, 4))
    with pytest.raises(ValueError, match=r"got \(2, 8, 4, 6\)"):
        m(torch.randn(2, 8, 4, 6))
    with pytest.raises(ValueError, match=r"feat_size \(7, 7\) must be even with downsample=True"):
        BoTStack(16, 7)
    assert BoTStack(16, 7, dim_out=32, num_layers=1, heads=2, dim_head=8, downsample=False).out_size == (7, 7)
    with pytest.raises(ValueError, match="num_layers must be an int >= 1, got 0"):
        BoTStack(16, 8, num_layers=0)
    with pytest.raises(ValueError, match="feat_size must be a positive int"):
        BoTStack(16, (8, 0))
    with pytest.raises(TypeError, match="activation must be an nn.Module"):
        BoTStack(16, 8, activation=torch.relu)


def test_not_registered_as_a_backbone():
    assert not any("stack" in n for n in list_models())
