"""Hugging Face CvT attention: ``ssl_fast.nn.CvtSelfAttention`` and the ``hf_cvt`` patch rule.

transformers is not installed (and must not be): the classes below re-state its CvT modules with
the same class names, attribute names and arithmetic (eager conv, BatchNorm2d, einsum softmax),
written for these tests. A small two-stage HF-style model (no class token in stage 1, class token
in stage 2) is patched and compared with an untouched copy: outputs, gradients, running
statistics, state_dict keys and values, shared parameter objects, modes.
"""
import copy
import functools

import pytest
import torch
from torch import nn

import ssl_fast
from helpers import available_backends, rel_error
from ssl_fast import ops
from ssl_fast.nn import CvtSelfAttention as FastCvtSelfAttention
from ssl_fast.patch import patch


# ------------------------------------------------------------------------------------------
# re-statement of transformers.models.cvt.modeling_cvt (names matter: the rule matches them)
# ------------------------------------------------------------------------------------------
class CvtSelfAttentionConvProjection(nn.Module):
    def __init__(self, embed_dim, kernel_size, padding, stride):
        super().__init__()
        self.convolution = nn.Conv2d(embed_dim, embed_dim, kernel_size, stride, padding, bias=False,
                                     groups=embed_dim)
        self.normalization = nn.BatchNorm2d(embed_dim)

    def forward(self, hidden_state):
        return self.normalization(self.convolution(hidden_state))


class CvtSelfAttentionLinearProjection(nn.Module):
    def forward(self, hidden_state):
        b, c, h, w = hidden_state.shape
        return hidden_state.reshape(b, c, h * w).permute(0, 2, 1)


class CvtSelfAttentionProjection(nn.Module):
    def __init__(self, embed_dim, kernel_size, padding, stride, projection_method="dw_bn"):
        super().__init__()
        if projection_method == "dw_bn":  # like HF: nothing is built for 'avg' / 'linear'
            self.convolution_projection = CvtSelfAttentionConvProjection(embed_dim, kernel_size, padding, stride)
        self.linear_projection = CvtSelfAttentionLinearProjection()

    def forward(self, hidden_state):
        return self.linear_projection(self.convolution_projection(hidden_state))


class CvtSelfAttention(nn.Module):
    def __init__(self, num_heads, embed_dim, kernel_size, padding_q, padding_kv, stride_q, stride_kv,
                 qkv_projection_method, qkv_bias, attention_drop_rate, with_cls_token=True, **kwargs):
        super().__init__()
        self.scale = embed_dim ** -0.5
        self.with_cls_token = with_cls_token
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        q_method = "linear" if qkv_projection_method == "avg" else qkv_projection_method
        self.convolution_projection_query = CvtSelfAttentionProjection(embed_dim, kernel_size, padding_q, stride_q,
                                                                       projection_method=q_method)
        self.convolution_projection_key = CvtSelfAttentionProjection(embed_dim, kernel_size, padding_kv, stride_kv,
                                                                     projection_method=qkv_projection_method)
        self.convolution_projection_value = CvtSelfAttentionProjection(embed_dim, kernel_size, padding_kv,
                                                                       stride_kv, projection_method=qkv_projection_method)
        self.projection_query = nn.Linear(embed_dim, embed_dim, bias=qkv_bias)
        self.projection_key = nn.Linear(embed_dim, embed_dim, bias=qkv_bias)
        self.projection_value = nn.Linear(embed_dim, embed_dim, bias=qkv_bias)
        self.dropout = nn.Dropout(attention_drop_rate)

    def _split_heads(self, t):
        b, n, _ = t.shape
        return t.reshape(b, n, self.num_heads, self.embed_dim // self.num_heads).permute(0, 2, 1, 3)

    def forward(self, hidden_state, height, width):
        if self.with_cls_token:
            cls_token, hidden_state = torch.split(hidden_state, [1, height * width], 1)
        b, _, c = hidden_state.shape
        fmap = hidden_state.permute(0, 2, 1).reshape(b, c, height, width)
        key = self.convolution_projection_key(fmap)
        query = self.convolution_projection_query(fmap)
        value = self.convolution_projection_value(fmap)
        if self.with_cls_token:
            query, key, value = (torch.cat((cls_token, t), dim=1) for t in (query, key, value))
        query = self._split_heads(self.projection_query(query))
        key = self._split_heads(self.projection_key(key))
        value = self._split_heads(self.projection_value(value))
        probs = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", query, key) * self.scale, dim=-1)
        context = torch.einsum("bhqk,bhkd->bhqd", self.dropout(probs), value)
        return context.permute(0, 2, 1, 3).reshape(b, context.shape[2], self.embed_dim)


class CvtSelfOutput(nn.Module):
    def __init__(self, embed_dim, drop_rate):
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(drop_rate)

    def forward(self, hidden_state, input_tensor):
        return self.dropout(self.dense(hidden_state))


class CvtAttention(nn.Module):
    def __init__(self, *args, drop_rate=0.0, **kwargs):
        super().__init__()
        self.attention = CvtSelfAttention(*args, **kwargs)
        self.output = CvtSelfOutput(self.attention.embed_dim, drop_rate)

    def forward(self, hidden_state, height, width):
        return self.output(self.attention(hidden_state, height, width), hidden_state)


class CvtLayer(nn.Module):
    def __init__(self, embed_dim, mlp_ratio=2, **attention_kwargs):
        super().__init__()
        self.attention = CvtAttention(embed_dim=embed_dim, **attention_kwargs)
        self.intermediate = nn.Sequential(nn.Linear(embed_dim, mlp_ratio * embed_dim), nn.GELU())
        self.output_dense = nn.Linear(mlp_ratio * embed_dim, embed_dim)
        self.layernorm_before = nn.LayerNorm(embed_dim)
        self.layernorm_after = nn.LayerNorm(embed_dim)

    def forward(self, hidden_state, height, width):
        hidden_state = hidden_state + self.attention(self.layernorm_before(hidden_state), height, width)
        return hidden_state + self.output_dense(self.intermediate(self.layernorm_after(hidden_state)))


class CvtStage(nn.Module):
    """Convolutional embedding (+ LayerNorm), optional class token, ``depth`` layers."""

    def __init__(self, in_ch, embed_dim, depth, num_heads, patch, stride, cls_token, method="dw_bn",
                 kernel_size=3, padding=1):
        super().__init__()
        self.with_cls = cls_token
        if cls_token:
            self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.projection = nn.Conv2d(in_ch, embed_dim, patch, stride, patch // 2)
        self.normalization = nn.LayerNorm(embed_dim)
        self.layers = nn.Sequential(*[
            CvtLayer(embed_dim, num_heads=num_heads, kernel_size=kernel_size, padding_q=padding,
                     padding_kv=padding, stride_q=1, stride_kv=2, qkv_projection_method=method, qkv_bias=True,
                     attention_drop_rate=0.0, with_cls_token=cls_token) for _ in range(depth)])

    def forward(self, x):
        x = self.projection(x)
        b, c, h, w = x.shape
        t = self.normalization(x.flatten(2).transpose(1, 2))
        if self.with_cls:
            t = torch.cat((self.cls_token.expand(b, -1, -1), t), dim=1)
        for layer in self.layers:
            t = layer(t, h, w)
        cls = None
        if self.with_cls:
            cls, t = torch.split(t, [1, h * w], 1)
        return t.transpose(1, 2).reshape(b, c, h, w), cls


class CvtModel(nn.Module):
    def __init__(self, **stage2_kwargs):
        super().__init__()
        self.stages = nn.ModuleList([CvtStage(3, 8, 1, 1, 5, 4, False),
                                     CvtStage(8, 16, 2, 2, 3, 2, True, **stage2_kwargs)])
        self.head = nn.Linear(16, 3)

    def forward(self, img):
        x, cls = img, None
        for stage in self.stages:
            x, cls = stage(x)
        return self.head(cls[:, 0] + x.mean((2, 3)))


ATTN_NAMES = ["stages.0.layers.0.attention.attention", "stages.1.layers.0.attention.attention",
              "stages.1.layers.1.attention.attention"]


def _randomise_norms(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


def _grads(model, out, cot, extra=()):
    named = [(n, p) for n, p in model.named_parameters()]
    gs = torch.autograd.grad(out, [p for _, p in named] + list(extra), cot, allow_unused=True)
    return {n: g for (n, _), g in zip(named, gs)}, gs[len(named):]


def _close_grads(ga, gb, tol):
    assert ga.keys() == gb.keys()
    for n in ga:
        a, b = ga[n], gb[n]
        assert (a is None) == (b is None), n
        if a is not None:  # absolute floor: e.g. projection_key.bias gets a zero gradient up to rounding
            assert (a - b).norm() <= tol * (1 + b.norm()), (n, rel_error(a, b))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The shapes here are tiny: intra-op threads only add synchronisation (on a loaded 2-core CI
    machine a 2-thread depthwise conv of a 5x7 map took ~0.2 s, against 0.1 ms on one thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of the fused ops (so a silent fall-back to the plain path cannot pass)."""
    calls = {"conv": 0, "attention": 0}
    conv, attn = ops.conv_qkv_projection, ops.attention

    def conv_spy(*a, **k):
        calls["conv"] += 1
        return conv(*a, **k)

    def attn_spy(*a, **k):
        calls["attention"] += 1
        return attn(*a, **k)

    monkeypatch.setattr(ops, "conv_qkv_projection", conv_spy)
    monkeypatch.setattr(ops, "attention", attn_spy)
    return calls


# ------------------------------------------------------------------------------------------
# the drop-in against the re-statement
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls_token", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("hw,heads,strides", [((5, 7), 2, (1, 2)), ((4, 4), 1, (2, 2)), ((6, 3), 3, (1, 1))])
def test_drop_in_matches_hf(cls_token, training, hw, heads, strides, spy):
    torch.manual_seed(hash((cls_token, training, hw)) % 1000)
    C, (h, w), (sq, skv) = 12, hw, strides
    hf = _randomise_norms(CvtSelfAttention(heads, C, 3, 1, 1, sq, skv, "dw_bn", True, 0.0, cls_token)).double()
    mine = FastCvtSelfAttention(heads, C, 3, 1, 1, sq, skv, "dw_bn", True, 0.0, cls_token).double()
    assert list(mine.state_dict()) == list(hf.state_dict())
    res = mine.load_state_dict(hf.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    hf.train(training), mine.train(training)
    x = torch.randn(3, h * w + int(cls_token), C, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expect, got = hf(x1, h, w), mine(x2, h, w)
    assert spy == {"conv": 1, "attention": 1}
    tq = ((h - 1) // sq + 1) * ((w - 1) // sq + 1) + int(cls_token)
    assert got.shape == expect.shape == (3, tq, C)
    assert rel_error(got, expect) < 1e-10
    cot = torch.randn_like(expect)
    ge, (gxe,) = _grads(hf, expect, cot, [x1])
    gg, (gxg,) = _grads(mine, got, cot, [x2])
    assert rel_error(gxg, gxe) < 1e-10
    _close_grads(gg, ge, 1e-10)
    for (k1, b1), (k2, b2) in zip(mine.named_buffers(), hf.named_buffers()):
        assert k1 == k2 and rel_error(b1, b2) < 1e-12, k1
    if training:  # the running statistics moved (and by the same amount, above)
        assert int(mine.convolution_projection_key.convolution_projection.normalization.num_batches_tracked) == 1
    # and back: the drop-in's state loads into a fresh HF module and gives the same output
    back = CvtSelfAttention(heads, C, 3, 1, 1, sq, skv, "dw_bn", True, 0.0, cls_token).double().train(training)
    back.load_state_dict(mine.state_dict(), strict=True)
    mine_again = copy.deepcopy(mine)
    x3 = torch.randn_like(x)
    assert rel_error(mine_again(x3, h, w), back(x3, h, w)) < 1e-10


def test_drop_in_plain_path_for_other_kernels(spy):
    """kernel 5 / padding 2 (not what the fused op computes): the projections run as written."""
    torch.manual_seed(1)
    hf = _randomise_norms(CvtSelfAttention(2, 8, 5, 2, 2, 1, 2, "dw_bn", False, 0.0, True)).double()
    mine = FastCvtSelfAttention(2, 8, 5, 2, 2, 1, 2, "dw_bn", False, 0.0, True).double()
    mine.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2, 1 + 6 * 5, 8, dtype=torch.float64, requires_grad=True)
    for training in (True, False):
        hf.train(training), mine.train(training)
        assert rel_error(mine(x, 6, 5), hf(x, 6, 5)) < 1e-10
    assert spy == {"conv": 0, "attention": 2}


@pytest.mark.parametrize("backend", ["cpp", "reference", "triton"])
def test_drop_in_backends_float32(backend, monkeypatch):
    """float32 through each conv-projection backend available here (attention through the same
    backend where it has one, else the reference), against the float64 re-statement."""
    if backend not in available_backends("conv_projection", "cpu"):
        pytest.skip(f"{backend} is not available here")
    attn_backend = backend if backend in available_backends("attention", "cpu") else "reference"
    monkeypatch.setattr(ops, "conv_qkv_projection", functools.partial(ops.conv_qkv_projection, backend=backend))
    monkeypatch.setattr(ops, "attention", functools.partial(ops.attention, backend=attn_backend))
    torch.manual_seed(2)
    hf = _randomise_norms(CvtSelfAttention(2, 16, 3, 1, 1, 1, 2, "dw_bn", True, 0.0, True)).double().train()
    mine = FastCvtSelfAttention(2, 16).train()
    mine.load_state_dict(hf.state_dict())
    x = torch.randn(2, 1 + 5 * 4, 16, dtype=torch.float64)
    x32 = x.float().requires_grad_(True)
    x64 = x.clone().requires_grad_(True)
    got = mine(x32, 5, 4)
    expect = hf(x64, 5, 4)
    assert got.dtype == torch.float32 and rel_error(got, expect) < 1e-5
    cot = torch.randn_like(expect)
    (gx,) = torch.autograd.grad(got, [x32], cot.float())
    (gx64,) = torch.autograd.grad(expect, [x64], cot)
    assert rel_error(gx, gx64) < 1e-5


def test_drop_in_dropout_and_constructor():
    m = FastCvtSelfAttention(2, 8, attention_drop_rate=0.5, with_cls_token=False).train()
    x = torch.randn(2, 16, 8)
    torch.manual_seed(0)
    a = m(x, 4, 4)
    torch.manual_seed(1)
    b = m(x, 4, 4)
    assert not torch.allclose(a, b)  # dropout on the probabilities acts in train mode
    m.eval()
    assert torch.equal(m(x, 4, 4), m(x, 4, 4))
    for method in ("avg", "linear"):
        with pytest.raises(ValueError, match="dw_bn"):
            FastCvtSelfAttention(2, 8, 3, 1, 1, 1, 2, method, True, 0.0)
    with pytest.raises(ValueError, match="divisible"):
        FastCvtSelfAttention(3, 8)
    # HF's positional order; unknown keyword arguments are accepted, as HF does
    m = FastCvtSelfAttention(2, 8, 3, 1, 1, 1, 2, "dw_bn", False, 0.1, False, unused=1)
    assert m.projection_query.bias is None and m.dropout.p == 0.1 and not m.with_cls_token
    assert m.scale == 8 ** -0.5


# ------------------------------------------------------------------------------------------
# ssl_fast.patch on the HF-style model
# ------------------------------------------------------------------------------------------
def _pair(**stage2_kwargs):
    torch.manual_seed(0)
    hf = _randomise_norms(CvtModel(**stage2_kwargs)).double()
    return hf, copy.deepcopy(hf)


def test_patch_round_trip_train(spy):
    hf, patched = _pair()
    params_before = {n: p for n, p in patched.named_parameters()}
    buffers_before = {n: b for n, b in patched.named_buffers()}
    keys = list(hf.state_dict())
    report = patch(patched)
    assert report.replaced == ATTN_NAMES
    assert all(report.rules[n] == ("CvtSelfAttention", "hf_cvt") for n in ATTN_NAMES)
    # the CvtAttention wrappers hold a replaced module, so they are not reported as skipped
    assert report.skipped == []
    assert any("CvtAttention" in n for n in report.notes)
    for name in ATTN_NAMES:
        assert isinstance(patched.get_submodule(name), FastCvtSelfAttention)
    assert list(patched.state_dict()) == keys
    # the very parameter and buffer objects (optimisers and tied weights keep working)
    assert all(p is params_before[n] for n, p in patched.named_parameters())
    assert all(b is buffers_before[n] for n, b in patched.named_buffers())
    hf.train(), patched.train()
    opt_a = torch.optim.SGD(hf.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(patched.parameters(), lr=0.1)
    for step in range(2):
        img = torch.randn(2, 3, 24, 20, dtype=torch.float64)
        out_a, out_b = hf(img), patched(img)
        assert rel_error(out_b, out_a) < 1e-10
        cot = torch.randn_like(out_a)
        ga, _ = _grads(hf, out_a, cot)
        gb, _ = _grads(patched, out_b, cot)
        _close_grads(gb, ga, 1e-9)
        for (opt, model, g) in ((opt_a, hf, ga), (opt_b, patched, gb)):
            for n, p in model.named_parameters():
                p.grad = g[n]
            opt.step()
    assert spy["conv"] == 2 * len(ATTN_NAMES) and spy["attention"] == 2 * len(ATTN_NAMES)
    sa, sb = hf.state_dict(), patched.state_dict()
    for k in keys:  # running statistics (and parameters after two steps) moved the same way
        assert rel_error(sb[k], sa[k]) < 1e-9, k
    bn = "stages.1.layers.1.attention.attention.convolution_projection_value.convolution_projection.normalization"
    assert int(sb[bn + ".num_batches_tracked"]) == 2
    hf.eval(), patched.eval()
    img = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    assert rel_error(patched(img), hf(img)) < 1e-10
    # state dicts load both ways
    fresh = CvtModel().double()
    fresh.load_state_dict(patched.state_dict(), strict=True)
    patch(fresh).model.load_state_dict(hf.state_dict(), strict=True)


def test_patch_keeps_modes_device_dtype():
    hf, patched = _pair()
    patched.float().train()
    frozen = patched.stages[1].layers[0].attention.attention.convolution_projection_query.convolution_projection
    frozen.normalization.eval()  # fine-tuning with a frozen BatchNorm
    patch(patched)
    new = patched.stages[1].layers[0].attention.attention
    assert isinstance(new, FastCvtSelfAttention) and new.training
    assert not new.convolution_projection_query.convolution_projection.normalization.training
    assert new.convolution_projection_key.convolution_projection.normalization.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in patched.parameters())
    # mixed BatchNorm modes run the projection as written; outputs still match HF
    hf.float().train()
    hf.stages[1].layers[0].attention.attention.convolution_projection_query.convolution_projection \
        .normalization.eval()
    img = torch.randn(2, 3, 16, 16)
    assert rel_error(patched(img), hf(img)) < 1e-5


def test_patch_other_kernel_is_replaced_and_matches(spy):
    hf, patched = _pair(kernel_size=5, padding=2)
    for m in (hf, patched):  # a non-default constant scale is carried over
        m.stages[0].layers[0].attention.attention.scale = 0.37
    report = patch(patched)
    assert patched.stages[0].layers[0].attention.attention.scale == 0.37
    assert report.replaced == ATTN_NAMES
    img = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert rel_error(patched(img), hf(img)) < 1e-10
    assert spy["conv"] == 1  # stage 1 (kernel 3) fused; stage 2 runs its kernel-5 projections as written


def _skip_reasons(model):
    report = patch(model)
    return report, {s.name: s.reason for s in report.skipped if s.class_name == "CvtSelfAttention"}


def test_patch_skips_unsupported():
    # 'avg' builds no convolution in HF (its forward fails): left alone, with the reason
    _, model = _pair(method="avg")
    report, why = _skip_reasons(model)
    assert report.replaced == ATTN_NAMES[:1]
    assert set(why) == set(ATTN_NAMES[1:]) and all("'dw_bn'" in r for r in why.values())
    assert all(type(model.get_submodule(n)) is CvtSelfAttention for n in ATTN_NAMES[1:])

    _, model = _pair()
    model.stages[0].layers[0].attention.attention.scale = torch.tensor(0.5)
    model.stages[1].layers[0].attention.attention.projection_key = nn.Identity()
    model.stages[1].layers[1].attention.attention.register_buffer("extra", torch.zeros(1))
    report, why = _skip_reasons(model)
    assert report.replaced == []
    assert "scale is a tensor" in why[ATTN_NAMES[0]]
    assert "projection_key is Identity" in why[ATTN_NAMES[1]]
    assert "extra state ['extra']" in why[ATTN_NAMES[2]]


def test_rule_does_not_match_others():
    from ssl_fast.patch import RULES

    rule = next(r for r in RULES if r.name == "hf_cvt")
    assert rule.matches(CvtSelfAttention(1, 4, 3, 1, 1, 1, 2, "dw_bn", True, 0.0))
    assert not rule.matches(FastCvtSelfAttention(1, 4))
    assert not rule.matches(ssl_fast.nn.ConvAttention(4, 4, 1))
    impostor = type("CvtSelfAttention", (nn.Module,), {})()
    assert not rule.matches(impostor)
