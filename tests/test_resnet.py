"""ResNet backbones against the real torchvision and timm ResNets (same weights, same outputs and gradients)."""
import pytest
import timm
import torch
import torchvision
from torch import nn

from ssl_fast.models import create_model, list_models
from ssl_fast.models.resnet import BasicBlock, Bottleneck, ResNet

TV = {18: torchvision.models.resnet18, 34: torchvision.models.resnet34, 50: torchvision.models.resnet50}
LAYOUT = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)), 50: (Bottleneck, (3, 4, 6, 3))}


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN affine parameters and running statistics, so eval mode is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = 0.1 * torch.randn(n, generator=g)
            m.running_mean.data = 0.1 * torch.randn(n, generator=g)
            m.running_var.data = 0.5 + torch.rand(n, generator=g)


def _tv_maps(tv, x):
    x = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    out = []
    for layer in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
        x = layer(x)
        out.append(x)
    return out


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_torchvision_state_dict_loads_unchanged_and_gives_torchvisions_outputs(depth):
    torch.manual_seed(depth)
    tv = TV[depth]()
    _randomise_bn(tv, depth)
    mine = create_model(f"resnet{depth}", num_classes=1000)
    assert list(mine.state_dict()) == list(tv.state_dict())  # the same names, in the same order
    assert str(mine.load_state_dict(tv.state_dict())) == "<All keys matched successfully>"
    x = torch.randn(2, 3, 64, 48)
    tv.eval(), mine.eval()
    with torch.no_grad():
        torch.testing.assert_close(mine(x), tv(x), rtol=1e-5, atol=1e-5)
        for a, b in zip(mine.feature_maps(x), _tv_maps(tv, x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_train_mode_outputs_gradients_and_running_stats_match_torchvision(depth):
    torch.manual_seed(100 + depth)
    tv = TV[depth]()
    _randomise_bn(tv, depth)
    mine = create_model(f"resnet{depth}", num_classes=1000)
    mine.load_state_dict(tv.state_dict())
    x = torch.randn(3, 3, 40, 40)
    w = torch.randn(3, 1000)
    (tv(x) * w).sum().backward()
    (mine(x) * w).sum().backward()
    tv_params = dict(tv.named_parameters())
    for name, p in mine.named_parameters():
        torch.testing.assert_close(p.grad, tv_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), b in zip(mine.state_dict().items(), tv.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)  # running statistics updated alike


@pytest.mark.parametrize("depth", [18, 50])
def test_same_seed_gives_torchvisions_initialisation(depth):
    """Module creation order and init (kaiming fan-out, BN 1/0, zero_init_residual) as torchvision."""
    for zero in (False, True):
        torch.manual_seed(7)
        tv = TV[depth](zero_init_residual=zero)
        torch.manual_seed(7)
        mine = create_model(f"resnet{depth}", num_classes=1000, zero_init_residual=zero)
        for (name, a), b in zip(mine.state_dict().items(), tv.state_dict().values()):
            assert torch.equal(a, b), (name, zero)
    last = mine.layer1[0].bn3 if depth == 50 else mine.layer1[0].bn2
    assert torch.all(last.weight == 0)


@pytest.mark.parametrize("depth", [18, 50])
def test_backbone_mode_returns_the_pooled_feature_and_ignores_fc_weights(depth):
    torch.manual_seed(3)
    tv = TV[depth]()
    _randomise_bn(tv)
    mine = create_model(f"resnet{depth}")
    assert isinstance(mine.fc, nn.Identity) and mine.num_classes == 0
    res = mine.load_state_dict(tv.state_dict(), strict=False)
    assert res.missing_keys == [] and sorted(res.unexpected_keys) == ["fc.bias", "fc.weight"]
    tv.fc = nn.Identity()
    tv.eval(), mine.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = tv(x)
        assert want.shape == (2, mine.num_features)
        torch.testing.assert_close(mine(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.features(x), want, rtol=1e-5, atol=1e-5)
    assert mine.num_features == (2048 if depth == 50 else 512)
    assert mine.stage_channels == ((256, 512, 1024, 2048) if depth == 50 else (64, 128, 256, 512))


@pytest.mark.parametrize("name,block,layers", [("resnet18_cifar", BasicBlock, (2, 2, 2, 2)),
                                               ("resnet34_cifar", BasicBlock, (3, 4, 6, 3)),
                                               ("resnet50_cifar", Bottleneck, (3, 4, 6, 3))])
def test_small_stem_keeps_the_names_and_skips_the_downsampling(name, block, layers):
    m = create_model(name)
    tv_keys = list(TV[int(name[6:8])]().state_dict())
    assert list(m.state_dict()) == [k for k in tv_keys if not k.startswith("fc.")]
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and m.conv1.padding == (1, 1)
    assert isinstance(m.maxpool, nn.Identity)
    maps = m.feature_maps(torch.randn(2, 3, 16, 16))
    assert [tuple(t.shape) for t in maps] == [(2, c, 16 // s, 16 // s)
                                              for c, s in zip(m.stage_channels, (1, 2, 4, 8))]
    assert len(m.layer3) == layers[2] and isinstance(m.layer1[0], block)


def test_resnet_mini_layout():
    m = create_model("resnet_mini")
    assert m.stage_channels == (16, 32, 64, 128) and m.num_features == 128
    assert [len(getattr(m, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert isinstance(m.layer1[0], BasicBlock) and isinstance(m.maxpool, nn.Identity)
    for size in (8, 12, 32):
        maps = m.feature_maps(torch.randn(2, 3, size, size))
        assert [t.shape[-1] for t in maps] == [size, (size + 1) // 2, ((size + 1) // 2 + 1) // 2,
                                               (((size + 1) // 2 + 1) // 2 + 1) // 2]
        assert m(torch.randn(2, 3, size, size)).shape == (2, 128)


def test_width_and_in_chans():
    m = ResNet(Bottleneck, (1, 1, 1, 1), width=8, in_chans=1)
    assert m.stage_channels == (32, 64, 128, 256) and m.conv1.in_channels == 1
    assert m(torch.randn(2, 1, 32, 32)).shape == (2, 256)
    with pytest.raises(ValueError, match=r"1 channels \(in_chans\), got shape \(2, 3, 32, 32\)"):
        m(torch.randn(2, 3, 32, 32))


def test_drop_path_is_timms_stochastic_depth():
    """Same weights and seed: train-mode outputs equal timm's resnet50 with the same drop_path_rate
    (the same per-block rates, the same place in the block, the same random draws)."""
    torch.manual_seed(0)
    ref = timm.create_model("resnet50", pretrained=False, num_classes=0, drop_path_rate=0.3)
    _randomise_bn(ref)  # timm zeroes the last BN of each branch, which would hide the drop-path
    mine = create_model("resnet50", drop_path_rate=0.3)
    mine.load_state_dict(ref.state_dict())
    # float64: timm scales the mask before multiplying, ssl_fast after; train-mode BN over a batch
    # of 4 amplifies that rounding difference to ~1e-2 in float32 over 16 blocks
    ref, mine = ref.double(), mine.double()
    blocks = [b for i in range(1, 5) for b in getattr(mine, f"layer{i}")]
    ref_blocks = [b for i in range(1, 5) for b in getattr(ref, f"layer{i}")]
    rates = [0.0 if b.drop_path is None else b.drop_path.p for b in blocks]
    assert rates == pytest.approx([0.0 if b.drop_path is None else b.drop_path.drop_prob for b in ref_blocks])
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(11)
    want = ref(x)
    torch.manual_seed(11)
    got = mine(x)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    ref_state = ref.state_dict()
    for name, buf in mine.named_buffers():  # running statistics updated alike
        torch.testing.assert_close(buf, ref_state[name], rtol=1e-9, atol=1e-9, msg=name)
    torch.manual_seed(12)
    assert not torch.allclose(mine(x), got)  # really random in training
    mine.eval()
    torch.manual_seed(12)
    assert torch.equal(mine(x), mine(x))  # and off in eval mode


def test_every_constructor_takes_the_common_keywords():
    names = ["resnet18", "resnet34", "resnet50", "resnet18_cifar", "resnet34_cifar", "resnet50_cifar", "resnet_mini"]
    assert set(names) <= set(list_models())
    for name in names:
        m = create_model(name, img_size=24, drop_path_rate=0.1, num_classes=5, in_chans=3)
        assert m(torch.randn(2, 3, 24, 24)).shape == (2, 5)
        assert m.stage_channels[-1] == m.num_features


def test_device_and_dtype_pass_through():
    m = create_model("resnet_mini", dtype=torch.float64, device="cpu")
    assert {p.dtype for p in m.parameters()} == {torch.float64}
    assert {b.dtype for n, b in m.named_buffers() if "num_batches" not in n} == {torch.float64}
    assert m(torch.randn(2, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\), got 1.5"):
        create_model("resnet18", drop_path_rate=1.5)
    with pytest.raises(ValueError, match="num_classes must be >= 0, got -1"):
        create_model("resnet18", num_classes=-1)
    with pytest.raises(TypeError, match="width must be an int"):
        create_model("resnet18", width=16.0)
    with pytest.raises(ValueError, match="layers must be 4 block counts"):
        ResNet(BasicBlock, (1, 1, 1))
    with pytest.raises(TypeError, match="block must be BasicBlock or Bottleneck"):
        ResNet(nn.Conv2d, (1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"x must be images \[B, 3, H, W\], got \(3, 32, 32\)"):
        create_model("resnet_mini")(torch.randn(3, 32, 32))
