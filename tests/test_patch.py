"""ssl_fast.patch on models built here: timm-style ViT, Swin and SAM blocks (re-stated, timm is
not installed), torch's TransformerEncoder; same outputs and gradients before and after,
shared weights, skipped-module reporting, the rule table."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ssl_fast
from helpers import rel_error
from ssl_fast.patch import RULES, PatchRule, Unsupported, patch, register_rule
from test_attention_modules import EagerSamAttention, EagerWindowAttention


# ------------------------------------------------------------------------------------------
# timm-like classes (names matter: patch recognises by class name and attributes)
# ------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """timm.layers.Attention, fused (SDPA) path."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, scale_norm=False, proj_bias=True,
                 attn_drop=0.0, proj_drop=0.0, norm_layer=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, attn_mask=None):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(b, n, c))))


SamAttention = type("Attention", (EagerSamAttention,), {})          # vision_transformer_sam.Attention
WindowAttention = type("WindowAttention", (EagerWindowAttention,), {})  # swin_transformer.WindowAttention


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, dim, heads, **kw):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, **kw)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self, dim=16, heads=2, depth=2):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.patch_embed = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(ViTBlock(dim, heads, qkv_bias=True),
                                    *[ViTBlock(dim, heads, qk_norm=True, norm_layer=nn.LayerNorm)
                                      for _ in range(depth - 1)])
        self.head = nn.Linear(dim, 5)

    def forward(self, img):
        x = self.patch_embed(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.head(self.blocks(x)[:, 0])


class SwinBlock(nn.Module):
    """Shifted-window block on a [B, H, W, C] map (window 3, shift 1)."""

    def __init__(self, dim=12, heads=3, window=3, shift=1, grid=6):
        super().__init__()
        self.window, self.shift, self.grid = window, shift, grid
        self.norm1, self.attn = nn.LayerNorm(dim), WindowAttention(dim, heads, window_size=window)
        self.norm2, self.mlp = nn.LayerNorm(dim), Mlp(dim)
        img = torch.zeros(1, grid, grid, 1)
        cnt = 0
        for hs in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for ws in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                img[:, hs, ws] = cnt
                cnt += 1
        win = self._partition(img).squeeze(-1)
        mask = win[:, None, :] - win[:, :, None]
        self.register_buffer("attn_mask", mask.masked_fill(mask != 0, -100.0), persistent=False)

    def _partition(self, x):
        b, h, w, c = x.shape
        s = self.window
        return x.reshape(b, h // s, s, w // s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, c)

    def forward(self, x):
        b, h, w, c = x.shape
        s = self.window
        y = torch.roll(self.norm1(x), (-self.shift, -self.shift), (1, 2))
        y = self.attn(self._partition(y), mask=self.attn_mask)
        y = y.reshape(b, h // s, w // s, s, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        x = x + torch.roll(y, (self.shift, self.shift), (1, 2))
        return x + self.mlp(self.norm2(x))


class SamBlocks(nn.Module):
    """A windowed (2x2 windows, tables for the window) and a global SAM block, plus a block
    whose tables were made for a bigger grid (resized on the fly)."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.windowed = SamAttention(dim, heads, use_rel_pos=True, input_size=(2, 2))
        self.glob = SamAttention(dim, heads, use_rel_pos=True, input_size=(4, 4), qk_norm=True)
        self.resized = SamAttention(dim, heads, use_rel_pos=True, input_size=(6, 6))
        self.plain = SamAttention(dim, heads)

    def forward(self, x):
        b, h, w, c = x.shape
        win = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 2, 2, c)
        y = self.windowed(win).reshape(b, h // 2, w // 2, 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        x = x + y
        x = x + self.glob(x)
        x = x + self.resized(x)
        return x + self.plain(x)


# ------------------------------------------------------------------------------------------
def perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def compare(model, make_inputs, expect_replaced, tol=1e-5, train=True):
    """Patch a copy of ``model``; outputs and every gradient match the original."""
    torch.manual_seed(0)
    ref = perturb(model).double().train(train)
    mine = copy.deepcopy(ref)
    keys_before = set(mine.state_dict())
    report = patch(mine)
    assert sorted(report.replaced) == sorted(expect_replaced), str(report)
    assert set(mine.state_dict()) == keys_before
    assert mine.training == train and all(m.training == train for m in mine.modules())
    for name in expect_replaced:
        assert type(mine.get_submodule(name)).__module__.startswith("ssl_fast.nn"), name
    inputs = make_inputs()
    xa = [t.double().requires_grad_(True) for t in inputs]
    xb = [t.double().requires_grad_(True) for t in inputs]
    out_ref, out_mine = ref(*xb), mine(*xa)
    err = rel_error(out_mine, out_ref)
    assert err <= tol, f"output relative error {err:.3g}"
    (out_ref * out_ref.cos()).sum().backward()
    (out_mine * out_mine.cos()).sum().backward()
    grads_ref = dict(ref.named_parameters())
    for name, p in mine.named_parameters():
        g_ref = grads_ref[name].grad
        if g_ref.norm() < 1e-12:
            assert p.grad.norm() < 1e-12, name
            continue
        assert rel_error(p.grad, g_ref) <= tol, f"grad {name}: {rel_error(p.grad, g_ref):.3g}"
    for a, b in zip(xa, xb):
        assert rel_error(a.grad, b.grad) <= tol
    return mine, report


def test_patch_vit():
    mine, report = compare(TinyViT(), lambda: [torch.randn(2, 3, 8, 8)], ["blocks.0.attn", "blocks.1.attn"])
    assert report.skipped == []
    attn = mine.blocks[1].attn
    assert isinstance(attn, ssl_fast.nn.Attention)
    assert isinstance(attn.q_norm, nn.LayerNorm)  # the original norm modules are reused
    probs = attn.attention_map(torch.randn(2, 5, 16, dtype=torch.float64), query_index=0)
    assert probs.shape == (2, 2, 1, 5)


def test_patch_swin_block():
    mine, _ = compare(SwinBlock(), lambda: [torch.randn(2, 6, 6, 12)], ["attn"])
    assert isinstance(mine.attn, ssl_fast.nn.WindowAttention)
    assert "relative_position_index" in dict(mine.attn.named_buffers())


def test_patch_sam_blocks():
    mine, report = compare(SamBlocks(), lambda: [torch.randn(2, 4, 4, 16)],
                           ["windowed", "glob", "resized", "plain"])
    assert mine.resized.rel_pos_h.shape == (11, 8) and mine.glob.use_rel_pos and not mine.plain.use_rel_pos


def test_patch_shares_weights_device_dtype_mode():
    model = TinyViT().to(torch.float64).eval()
    old = model.blocks[0].attn
    qkv_weight, proj = old.qkv.weight, old.proj
    report = patch(model)
    new = model.blocks[0].attn
    assert new is not old and report.model is model
    assert new.qkv.weight is qkv_weight and new.proj is proj
    assert new.qkv.weight.dtype == torch.float64 and not new.training
    optim = torch.optim.SGD(model.parameters(), lr=0.1)  # same parameter objects as before patching
    assert any(p is qkv_weight for g in optim.param_groups for p in g["params"])


def encoder(norm_first=False, heads=2):
    layer = nn.TransformerEncoderLayer(16, heads, dim_feedforward=32, dropout=0.0, batch_first=True,
                                       norm_first=norm_first)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")
@pytest.mark.parametrize("norm_first", [False, True])
def test_patch_transformer_encoder_train(norm_first):
    model = encoder(norm_first)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 5:] = True

    class WithMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = model

        def forward(self, x):
            return self.enc(x, src_key_padding_mask=kpm)

    mine, report = compare(WithMask(), lambda: [torch.randn(3, 7, 16)],
                           ["enc.layers.0.self_attn", "enc.layers.1.self_attn"])
    assert any("TransformerEncoderLayer" in n for n in report.notes)
    calls = []
    mine.enc.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    mine(torch.randn(3, 7, 16, dtype=torch.float64))
    assert calls, "in training the patched self_attn must run"


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True", "ignore:The PyTorch API of nested")
@pytest.mark.parametrize("fastpath", [True, False])
def test_patch_transformer_encoder_eval(fastpath):
    torch.manual_seed(0)
    ref = perturb(encoder()).eval()
    mine = copy.deepcopy(ref)
    patch(mine)
    x = torch.randn(3, 7, 16)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 4:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        with torch.no_grad():
            for kw in (dict(), dict(src_key_padding_mask=kpm), dict(mask=causal, is_causal=True)):
                a, b = ref(x, **kw), mine(x, **kw)
                keep = ~kpm[..., None] if "src_key_padding_mask" in kw else torch.ones(1, dtype=torch.bool)
                assert rel_error(b * keep, a * keep) <= 1e-5, kw
        if fastpath:
            # a hook on self_attn keeps the layer off torch's fused path while the encoder still
            # hands it a nested tensor: the drop-in's nested path runs
            mine.layers[0].self_attn.register_forward_hook(lambda *a: None)
            mine.layers[1].self_attn.register_forward_hook(lambda *a: None)
            with torch.no_grad():
                a, b = ref(x, src_key_padding_mask=kpm), mine(x, src_key_padding_mask=kpm)
            assert rel_error(b * ~kpm[..., None], a * ~kpm[..., None]) <= 1e-5
    finally:
        torch.backends.mha.set_fastpath_enabled(old)


def test_patch_mha_seq_first_and_kdim():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=6, add_bias_kv=True)

        def forward(self, q, k, v):
            out, w = self.mha(q, k, v, average_attn_weights=False)
            return torch.cat([out.flatten(), w.flatten()])

    compare(Cross(), lambda: [torch.randn(4, 2, 8), torch.randn(3, 2, 5), torch.randn(3, 2, 6)], ["mha"])


# ------------------------------------------------------------------------------------------
# skipped modules and the rule table
# ------------------------------------------------------------------------------------------
class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.kv = nn.Linear(4, 4), nn.Linear(4, 8)

    def forward(self, x):
        return self.q(x)


def beit_attention():
    """BEiT's Attention: same class name, plus q_bias/v_bias parameters (not the plain one)."""
    m = type("Attention", (Attention,), {})(16, 2)
    m.q_bias = nn.Parameter(torch.zeros(16))
    return m


class SwinV2Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.zeros(2, 1, 1))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
        self.num_heads = 2


class MyMHA(nn.MultiheadAttention):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def test_patch_reports_skipped():
    model = nn.ModuleDict({
        "rope": SamAttention(16, 2, rope=nn.Identity()),
        "beit": beit_attention(),
        "swinv2": type("WindowAttention", (SwinV2Attention,), {})(),
        "cross": CrossAttention(),
        "sub_mha": MyMHA(8, 2),
        "ok": nn.MultiheadAttention(8, 2),
        "ours": ssl_fast.nn.Attention(16, 2),
    })
    report = patch(model)
    assert report.replaced == ["ok"]
    reasons = {s.name: (s.class_name, s.reason) for s in report.skipped}
    assert set(reasons) == {"rope", "beit", "swinv2", "cross", "sub_mha"}, str(report)
    assert "rope" in reasons["rope"][1]
    assert "q_bias" in reasons["beit"][1]
    assert "cpb_mlp" in reasons["swinv2"][1]
    assert reasons["cross"] == ("CrossAttention", "unknown class: no rule recognises it")
    assert "overrides forward" in reasons["sub_mha"][1]
    assert isinstance(model["rope"], EagerSamAttention) and isinstance(model["ours"], ssl_fast.nn.Attention)
    text = str(report)
    assert "skipped  rope" in text and "replaced ok" in text


def test_patch_shared_module_and_root():
    shared = Attention(16, 2)
    model = nn.Sequential(shared, nn.GELU(), shared)
    report = patch(model)
    assert report.replaced == ["0"] and model[0] is model[2] and isinstance(model[0], ssl_fast.nn.Attention)
    root = Attention(16, 2)
    report = patch(root)
    assert report.replaced == [""] and isinstance(report.model, ssl_fast.nn.Attention)
    assert report.model.qkv is root.qkv


def test_register_rule_joins_without_touching_the_walker():
    class ToySelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj, self.num_heads = nn.Linear(8, 24), nn.Linear(8, 8), 2

    def convert(m):
        if m.num_heads != 2:
            raise Unsupported("only two heads")
        new = ssl_fast.nn.Attention(8, 2, qkv_bias=True)
        new.qkv, new.proj = m.qkv, m.proj
        return new

    saved = list(RULES)
    try:
        register_rule(PatchRule("toy", lambda m: type(m).__name__ == "ToySelfAttention", convert),
                      before="timm_vit")
        assert [r.name for r in RULES].index("toy") == [r.name for r in RULES].index("timm_vit") - 1
        assert ssl_fast.patch.RULES is RULES and ssl_fast.patch.register_rule is register_rule
        model = nn.ModuleList([ToySelfAttention(), ToySelfAttention()])
        model[1].num_heads = 3
        report = patch(model)
        assert report.replaced == ["0"] and report.rules["0"] == ("ToySelfAttention", "toy")
        assert report.skipped[0].name == "1" and "only two heads" in report.skipped[0].reason
        with pytest.raises(ValueError, match="names no rule"):
            register_rule(PatchRule("x", lambda m: False, convert), before="nope")
    finally:
        RULES[:] = saved


def test_patch_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        patch("model")
