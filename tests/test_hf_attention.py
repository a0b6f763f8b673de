"""``ssl_fast.nn.HFViTAttention`` and ``HFSwinAttention`` (ssl_fast/nn/hf_attention.py), standing
alone, against Hugging Face transformers' real ``ViTAttention``/``Dinov2Attention`` and
``SwinAttention``: same constructor and state_dict; outputs and every gradient under the eager and
SDPA implementations, with the masks Hugging Face builds (padding masks, Swin's shifted windows);
what the forward returns as ``attn_weights``; float32 through every attention backend available
here; dropout; bad arguments. (Patching real models: tests/patch/test_hf_rules.py.)
"""
import functools

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
from transformers import Dinov2Config, SwinConfig, ViTConfig  # noqa: E402
from transformers.models.dinov2.modeling_dinov2 import Dinov2Attention  # noqa: E402
from transformers.models.swin.modeling_swin import SwinAttention, SwinLayer  # noqa: E402
from transformers.models.vit.modeling_vit import ViTAttention  # noqa: E402

from helpers import available_backends, rel_error  # noqa: E402
from ssl_fast.nn import HFSwinAttention, HFViTAttention, hf_attention  # noqa: E402
from ssl_fast.nn.hf_attention import hf_drop_in_class  # noqa: E402

VIT = dict(hidden_size=32, num_attention_heads=2, attention_probs_dropout_prob=0.0)


@pytest.fixture
def fused_calls(monkeypatch):
    calls, real = [], hf_attention.attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "attention", spy)
    return calls


def _pair(hf_cls, mine_cls, *args, seed=0):
    torch.manual_seed(seed)
    hf = hf_cls(*args).double()
    mine = mine_cls(*args).double()
    assert list(mine.state_dict()) == list(hf.state_dict())
    with torch.no_grad():  # random biases and table, not HF's zeros
        for p in hf.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    mine.load_state_dict(hf.state_dict(), strict=True)
    return hf, mine


def _compare(hf, mine, args, tol, grads=True):
    xr = args[0].clone().requires_grad_()
    xm = args[0].clone().requires_grad_()
    out_r, w_r = hf(xr, *args[1:])
    out_m, w_m = mine(xm, *args[1:])
    assert rel_error(out_m, out_r) <= tol
    if grads:
        cot = torch.randn_like(out_r)
        (out_r * cot).sum().backward()
        (out_m * cot).sum().backward()
        assert rel_error(xm.grad, xr.grad) <= tol
        ref = dict(hf.named_parameters())
        # floor: the key bias's gradient is zero up to rounding (in float32 in HF's eager softmax)
        floor = 0.1 * sum(float(p.grad.norm()) ** 2 for p in ref.values()) ** 0.5
        for name, p in mine.named_parameters():
            g = ref[name].grad
            assert (p.grad - g).norm() <= tol * max(float(g.norm()), floor), name
    return w_r, w_m


def _padding_mask(impl, b=2, n=9):
    """What ``create_bidirectional_mask`` gives ViT for an ``attention_mask [B, N]`` with padding."""
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[1, n // 2 + 1:] = False
    mask = keep[:, None, None, :].expand(b, 1, n, n)
    if impl == "sdpa":
        return mask
    return torch.zeros(b, 1, n, n, dtype=torch.float64).masked_fill(~mask, torch.finfo(torch.float64).min)


# ------------------------------------------------------------------------------------------
# ViT family
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("hf_cls,config", [(ViTAttention, ViTConfig), (Dinov2Attention, Dinov2Config)])
def test_vit_matches_hugging_face(hf_cls, config, impl, masked, fused_calls):
    cfg = config(**VIT, attn_implementation=impl)
    hf, mine = _pair(hf_cls, HFViTAttention, cfg)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    mask = _padding_mask(impl) if masked else None
    # ViT's eager function takes the softmax in float32; DINOv2's and SDPA compute in float64
    tol = 1e-5 if impl == "eager" and hf_cls is ViTAttention else 1e-10
    w_r, w_m = _compare(hf, mine, (x, mask), tol)
    assert len(fused_calls) == 1
    assert w_m is None and (w_r is None) == (impl == "sdpa")  # nobody can see them: not computed


def test_vit_weights_returned_exactly_when_observed(fused_calls):
    """Under eager, a forward hook on the module may read ``attn_weights``: the drop-in then runs
    Hugging Face's arithmetic and returns them (with gradients)."""
    hf, mine = _pair(ViTAttention, HFViTAttention, ViTConfig(**VIT, attn_implementation="eager"))
    seen = []
    mine.register_forward_hook(lambda m, a, out: seen.append(out[1]))
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    w_r, w_m = _compare(hf, mine, (x, _padding_mask("eager")), 1e-12)
    assert fused_calls == [] and seen[0] is w_m and w_m.requires_grad
    assert rel_error(w_m, w_r) < 1e-12
    # attention_map: the same probabilities on request, without running the forward
    assert rel_error(mine.attention_map(x, _padding_mask("eager")), w_r) < 1e-6  # HF's softmax is float32
    assert rel_error(mine.attention_map(x, _padding_mask("sdpa"), query_index=[0, 3]), w_r[:, :, [0, 3]]) < 1e-6


@pytest.mark.parametrize("kwargs", [{"is_causal": False}, {"position_bias": None}])
def test_vit_unknown_kwargs_run_hugging_face_computation(kwargs, fused_calls):
    """Keyword arguments an attention function may read: not fused, passed on as Hugging Face does."""
    hf, mine = _pair(ViTAttention, HFViTAttention, ViTConfig(**VIT, attn_implementation="sdpa"))
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    assert rel_error(mine(x, None, **kwargs)[0], hf(x, None, **kwargs)[0]) < 1e-12
    assert fused_calls == []
    mine(x, None, output_attentions=False, output_hidden_states=True)  # passive ones: fused
    assert len(fused_calls) == 1


def test_vit_head_dim_from_config():
    cfg = ViTConfig(hidden_size=32, num_attention_heads=2, attn_implementation="sdpa")
    cfg.head_dim = 24  # ViTAttention honours config.head_dim
    hf, mine = _pair(ViTAttention, HFViTAttention, cfg)
    assert mine.q_proj.out_features == 48 and mine.o_proj.in_features == 48 and mine.scaling == 24 ** -0.5
    _compare(hf, mine, (torch.randn(2, 5, 32, dtype=torch.float64), None), 1e-10)


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
def test_vit_backends_float32(backend, monkeypatch):
    if backend not in available_backends("attention", "cpu"):
        pytest.skip(f"{backend} is not available here")
    monkeypatch.setattr(hf_attention, "attention", functools.partial(hf_attention.attention, backend=backend))
    hf, mine = _pair(ViTAttention, HFViTAttention, ViTConfig(**VIT, attn_implementation="sdpa"))
    mine.float()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    for mask in (None, _padding_mask("sdpa")):
        x32 = x.float().requires_grad_()
        x64 = x.clone().requires_grad_()
        got, expect = mine(x32, mask)[0], hf(x64, mask)[0]
        assert got.dtype == torch.float32 and rel_error(got, expect) < 1e-5
        cot = torch.randn_like(expect)
        (g32,) = torch.autograd.grad(got, [x32], cot.float())
        (g64,) = torch.autograd.grad(expect, [x64], cot)
        assert rel_error(g32, g64) < 1e-5


def test_vit_dropout():
    cfg = ViTConfig(hidden_size=32, num_attention_heads=2, attention_probs_dropout_prob=0.5,
                    attn_implementation="sdpa")
    hf, mine = _pair(ViTAttention, HFViTAttention, cfg)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.manual_seed(0)
    a = mine(x)[0]
    torch.manual_seed(1)
    b = mine(x)[0]
    assert not torch.allclose(a, b)  # dropout on the probabilities acts in train mode
    hf.eval(), mine.eval()
    assert rel_error(mine(x)[0], hf(x)[0]) < 1e-10 and torch.equal(mine(x)[0], mine(x)[0])


def test_vit_constructor_and_bad_arguments():
    cfg = ViTConfig(**VIT)
    m = HFViTAttention(cfg, device="meta", dtype=torch.float16)
    hf = ViTAttention(cfg)
    for attr in ("num_attention_heads", "head_dim", "attention_dropout", "scaling", "is_causal"):
        assert getattr(m, attr) == getattr(hf, attr), attr
    assert m.q_proj.weight.is_meta and m.q_proj.weight.dtype == torch.float16 and m.config is cfg
    with pytest.raises(ValueError, match="hidden_size 30 is not divisible by num_attention_heads 4"):
        HFViTAttention(ViTConfig(hidden_size=30, num_attention_heads=4))
    with pytest.raises(ValueError, match="num_attention_heads must be a positive int"):
        HFViTAttention(ViTConfig(hidden_size=32, num_attention_heads=0))
    with pytest.raises(ValueError, match="attention_probs_dropout_prob must be in"):
        HFViTAttention(ViTConfig(hidden_size=32, num_attention_heads=2, attention_probs_dropout_prob=1.5))


# ------------------------------------------------------------------------------------------
# Swin
# ------------------------------------------------------------------------------------------
def _swin_mask(window, shift, size):
    """The shifted-window mask ``[nW, N, N]`` Hugging Face's SwinLayer builds for a ``size`` map."""
    layer = SwinLayer(SwinConfig(window_size=window), dim=8, input_resolution=(size, size), num_heads=2,
                      shift_size=shift)
    return layer.get_attn_mask(size, size, dtype=torch.float64, device=torch.device("cpu"))


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_swin_matches_hugging_face(impl, shifted, fused_calls):
    cfg = SwinConfig(attention_probs_dropout_prob=0.0, attn_implementation=impl)
    hf, mine = _pair(SwinAttention, HFSwinAttention, cfg, 16, 2, 3)
    mask = _swin_mask(3, 1, 6) if shifted else None  # 4 windows of 3x3
    assert mask is None or mask.shape == (4, 9, 9)
    x = torch.randn(2 * 4, 9, 16, dtype=torch.float64)
    w_r, w_m = _compare(hf, mine, (x, mask), 1e-5 if impl == "eager" else 1e-10)
    assert len(fused_calls) == 1 and fused_calls[0]["rel_pos"].window_mask is mask
    table = "relative_position_bias.relative_position_bias_table"
    assert dict(mine.named_parameters())[table].grad.norm() > 0
    assert w_m is None
    # attention_map: the probabilities with the bias and the mask, as Hugging Face's eager gives them
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        want = hf(x, mask)[1]
    assert rel_error(mine.attention_map(x, mask), want) < 1e-6


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
def test_swin_backends_float32(backend, monkeypatch):
    """The table bias and the shifted-window mask through each attention backend, float32 against
    Hugging Face in float64, with the table's gradient."""
    if backend not in available_backends("attention", "cpu"):
        pytest.skip(f"{backend} is not available here")
    monkeypatch.setattr(hf_attention, "attention", functools.partial(hf_attention.attention, backend=backend))
    hf, mine = _pair(SwinAttention, HFSwinAttention, SwinConfig(attn_implementation="sdpa"), 16, 2, 3)
    mine.float()
    mask = _swin_mask(3, 1, 6)
    x = torch.randn(2 * 4, 9, 16, dtype=torch.float64)
    x32, x64 = x.float().requires_grad_(), x.clone().requires_grad_()
    got, expect = mine(x32, mask.float())[0], hf(x64, mask)[0]
    assert got.dtype == torch.float32 and rel_error(got, expect) < 1e-5
    cot = torch.randn_like(expect)
    (got * cot.float()).sum().backward()
    (expect * cot).sum().backward()
    assert rel_error(x32.grad, x64.grad) < 1e-5
    table = "relative_position_bias.relative_position_bias_table"
    assert rel_error(dict(mine.named_parameters())[table].grad, dict(hf.named_parameters())[table].grad) < 1e-5


def test_swin_runs_hugging_face_computation_where_the_kernel_cannot(fused_calls):
    """A window of another size than the table's, or a mask whose windows do not divide the batch:
    Hugging Face's own computation (which raises, here, as it does unpatched)."""
    hf, mine = _pair(SwinAttention, HFSwinAttention, SwinConfig(attn_implementation="sdpa"), 16, 2, 3)
    for x, mask in ((torch.randn(2, 4, 16, dtype=torch.float64), None),
                    (torch.randn(6, 9, 16, dtype=torch.float64), _swin_mask(3, 1, 6))):
        with pytest.raises(RuntimeError) as theirs:
            hf(x, mask)
        with pytest.raises(RuntimeError) as ours:
            mine(x, mask)
        assert str(ours.value) == str(theirs.value)
    assert fused_calls == []


def test_swin_constructor_and_bad_arguments():
    cfg = SwinConfig()
    m, hf = HFSwinAttention(cfg, 16, 2, 3), SwinAttention(cfg, 16, 2, 3)
    assert m.relative_position_bias.window_size == hf.relative_position_bias.window_size == (3, 3)
    assert torch.equal(m.relative_position_bias.relative_position_index,
                       hf.relative_position_bias.relative_position_index)
    assert torch.equal(m.relative_position_bias(), hf.relative_position_bias())
    assert m.relative_position_bias.window_area == 9
    with pytest.raises(ValueError, match="window_size must be a positive int"):
        HFSwinAttention(cfg, 16, 2, 0)
    with pytest.raises(ValueError, match="hidden_size 15 is not divisible by num_attention_heads 2"):
        HFSwinAttention(cfg, 15, 2, 3)


def test_hf_drop_in_class_checks_its_arguments():
    cls = hf_drop_in_class(HFViTAttention, ViTAttention)
    assert cls is hf_drop_in_class(HFViTAttention, ViTAttention)
    assert cls.__mro__[1] is HFViTAttention and issubclass(cls, ViTAttention)
    m = cls(ViTConfig(**VIT))
    assert isinstance(m, ViTAttention) and list(m.state_dict()) == list(ViTAttention(ViTConfig(**VIT)).state_dict())
    with pytest.raises(ValueError, match="drop_in must be one of"):
        hf_drop_in_class(nn.Linear, ViTAttention)
    with pytest.raises(TypeError, match="hf_class must be a Hugging Face nn.Module class"):
        hf_drop_in_class(HFViTAttention, int)
