"""The patch walker, its report and the rule table, and the torch rule (``nn.MultiheadAttention``,
also inside ``nn.TransformerEncoder``), on torch's and timm's real modules; generic toy modules
only where the test is about the walker itself."""
import copy

import pytest
pytest.importorskip("timm")  # the real library; where it is not installed (the GPU image) these tests skip
import timm
import torch
from timm.layers import Attention as TimmAttention
from timm.layers import RotaryEmbeddingCat
from timm.models.beit import Attention as BeitAttention
from timm.models.swin_transformer_v2 import WindowAttention as SwinV2WindowAttention
from timm.models.vision_transformer_sam import Attention as SamAttention
from torch import nn

import ssl_fast
from helpers import rel_error
from patch_compare import _perturb, check_patched_matches
from ssl_fast.nn import MultiheadAttention
from ssl_fast.patch import RULES, PatchRule, Unsupported, patch, register_rule


# ------------------------------------------------------------------------------------------
# the walker: shared objects, modes, shared modules, the root, the report
# ------------------------------------------------------------------------------------------
def test_patch_shares_weights_device_dtype_mode():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=32, num_heads=2, qk_norm=True).to(torch.float64).eval()
    model.blocks[0].attn.q_norm.train()  # a submodule in its own mode keeps it
    old = model.blocks[0].attn
    qkv_weight, proj, q_norm = old.qkv.weight, old.proj, old.q_norm
    optim = torch.optim.SGD(model.parameters(), lr=0.1)
    report = patch(model)
    new = model.blocks[0].attn
    assert new is not old and report.model is model and isinstance(new, ssl_fast.nn.Attention)
    assert new.qkv.weight is qkv_weight and new.proj is proj and new.q_norm is q_norm
    assert new.qkv.weight.dtype == torch.float64 and not new.training and new.q_norm.training
    assert any(p is qkv_weight for g in optim.param_groups for p in g["params"])  # same parameter objects
    probs = new.attention_map(torch.randn(2, 17, 32, dtype=torch.float64), query_index=0)
    assert probs.shape == (2, 2, 1, 17) and torch.allclose(probs.sum(-1), torch.ones(2, 2, 1))


def test_patch_shared_module_and_root():
    shared = TimmAttention(16, 2)
    model = nn.Sequential(shared, nn.GELU(), shared)
    report = patch(model)
    assert report.replaced == ["0"] and model[0] is model[2] and isinstance(model[0], ssl_fast.nn.Attention)
    root = TimmAttention(16, 2)
    report = patch(root)
    assert report.replaced == [""] and isinstance(report.model, ssl_fast.nn.Attention)
    assert report.model.qkv is root.qkv


class CrossAttention(nn.Module):
    """Attention-like by name, recognised by no rule."""

    def __init__(self):
        super().__init__()
        self.q, self.kv = nn.Linear(4, 4), nn.Linear(4, 8)

    def forward(self, x):
        return self.q(x)


class MyMHA(nn.MultiheadAttention):
    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def test_patch_reports_skipped():
    model = nn.ModuleDict({
        "rope": SamAttention(16, 2, rope=RotaryEmbeddingCat(8, in_pixels=False, feat_shape=(2, 2))),
        "beit": BeitAttention(16, 2, qkv_bias=True),
        "swinv2": SwinV2WindowAttention(16, window_size=(2, 2), num_heads=2),
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
    assert isinstance(model["rope"], SamAttention) and isinstance(model["ours"], ssl_fast.nn.Attention)
    text = str(report)
    assert "skipped  rope" in text and "replaced ok" in text


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
        with pytest.raises(TypeError, match="PatchRule"):
            register_rule("toy")
    finally:
        RULES[:] = saved


def test_patch_rejects_non_module():
    with pytest.raises(TypeError, match="nn.Module"):
        patch("model")


# ------------------------------------------------------------------------------------------
# torch: nn.MultiheadAttention, nn.TransformerEncoder
# ------------------------------------------------------------------------------------------
def encoder(norm_first=False, heads=2):
    layer = nn.TransformerEncoderLayer(16, heads, dim_feedforward=32, dropout=0.0, batch_first=True,
                                       norm_first=norm_first)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)


class EncoderWithMask(nn.Module):
    def __init__(self, norm_first):
        super().__init__()
        self.enc = encoder(norm_first)
        kpm = torch.zeros(3, 7, dtype=torch.bool)
        kpm[1, 5:] = True
        self.register_buffer("kpm", kpm)

    def forward(self, x):
        return self.enc(x, src_key_padding_mask=self.kpm)


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True", "ignore:The PyTorch API of nested")
@pytest.mark.parametrize("norm_first", [False, True])
def test_patch_transformer_encoder(norm_first):
    mine, report = check_patched_matches(lambda: EncoderWithMask(norm_first), lambda: [torch.randn(3, 7, 16)],
                                         replaced={f"enc.layers.{i}.self_attn": MultiheadAttention for i in (0, 1)})
    assert any("TransformerEncoderLayer" in n for n in report.notes)
    calls = []
    mine.enc.layers[0].self_attn.register_forward_hook(lambda *a: calls.append(1))
    mine.train()(torch.randn(3, 7, 16, dtype=torch.float64))
    assert calls, "in training the patched self_attn must run"


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True", "ignore:The PyTorch API of nested")
@pytest.mark.parametrize("fastpath", [True, False])
def test_patch_transformer_encoder_eval(fastpath):
    torch.manual_seed(0)
    ref = encoder().eval()
    _perturb(ref, 0)
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


class Cross(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=6, add_bias_kv=True)

    def forward(self, q, k, v):
        return self.mha(q, k, v, average_attn_weights=False)


def test_patch_mha_seq_first_and_kdim():
    check_patched_matches(Cross, lambda: [torch.randn(4, 2, 8), torch.randn(3, 2, 5), torch.randn(3, 2, 6)],
                          replaced={"mha": MultiheadAttention})
