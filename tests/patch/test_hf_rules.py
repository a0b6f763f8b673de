"""``ssl_fast.patch`` on real Hugging Face transformers models (rules ``hf_vit``, ``hf_swin``,
``hf_swinv2``, ``hf_cvt`` in ssl_fast/patch/hf_rules.py).

Every model is built from a tiny config (nothing downloaded) and compared with its unpatched twin
by :func:`patch_compare.check_patched_matches`: report, train-mode outputs and every parameter
gradient under the same random stream (drop-path on), eval outputs and state_dict loading both
ways, in float64. A spy counts the fused-op calls, so a drop-in that silently ran Hugging Face's
own computation cannot pass where the fused path is expected (and the other way round).

Tolerances: SDPA and DINOv2's eager function compute in float64 here; ViT/DeiT/Swin's eager
function takes the softmax in float32 whatever the input dtype, so where the patched model runs
the fused op against it the outputs agree to float32 rounding (1e-5), and where the patched model
runs Hugging Face's own computation (``output_attentions=True`` with eager) they agree exactly.
"""
import copy
import pickle

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
import transformers  # noqa: E402
from transformers import (CvtConfig, CvtForImageClassification, CvtModel, DeiTConfig,  # noqa: E402
                          DeiTForImageClassificationWithTeacher, DeiTModel, Dinov2Config, Dinov2Model,
                          SwinConfig, SwinForImageClassification, SwinModel, Swinv2Config, Swinv2Model, ViTConfig,
                          ViTForImageClassification, ViTModel)
from transformers.models.cvt import modeling_cvt  # noqa: E402
from transformers.models.swin import modeling_swin  # noqa: E402
from transformers.models.vit import modeling_vit  # noqa: E402

import ssl_fast  # noqa: E402
from helpers import rel_error  # noqa: E402
from patch_compare import check_patched_matches  # noqa: E402
from ssl_fast import ops  # noqa: E402
from ssl_fast.nn import CvtSelfAttention as FastCvtSelfAttention  # noqa: E402
from ssl_fast.nn import HFSwinAttention, HFViTAttention, hf_attention  # noqa: E402
from ssl_fast.nn.hf_attention import hf_drop_in_class  # noqa: E402
from ssl_fast.patch import RULES, hf_rules, patch  # noqa: E402

try:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
except ImportError:  # older transformers
    Dinov2WithRegistersConfig = Dinov2WithRegistersModel = None

VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
           intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
DINO = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.2)
SWIN = dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.2)


def _cls(hf_class):
    drop_in = HFSwinAttention if hf_class.__name__ == "SwinAttention" else HFViTAttention
    return hf_drop_in_class(drop_in, hf_class)


def _vit_names(prefix, layers="layers"):
    return [f"{prefix}{layers}.{i}.attention" for i in range(2)]


SWIN_NAMES = [f"encoder.layers.{s}.blocks.{b}.attention" for s in range(2) for b in range(2)]

# name -> (build(attn_implementation), image size, {replaced name: Hugging Face class})
MODELS = {
    "ViTModel": (lambda impl: ViTModel(ViTConfig(**VIT, attn_implementation=impl)), 32,
                 {n: modeling_vit.ViTAttention for n in _vit_names("")}),
    "ViTForImageClassification": (
        lambda impl: ViTForImageClassification(ViTConfig(**VIT, num_labels=3, attn_implementation=impl)), 32,
        {n: modeling_vit.ViTAttention for n in _vit_names("vit.")}),
    "DeiTModel": (lambda impl: DeiTModel(DeiTConfig(**VIT, attn_implementation=impl)), 32,
                  {n: transformers.models.deit.modeling_deit.DeiTAttention for n in _vit_names("")}),
    "DeiTForImageClassificationWithTeacher": (
        lambda impl: DeiTForImageClassificationWithTeacher(DeiTConfig(**VIT, num_labels=3, attn_implementation=impl)),
        32, {n: transformers.models.deit.modeling_deit.DeiTAttention for n in _vit_names("deit.")}),
    "Dinov2Model(SwiGLU)": (
        lambda impl: Dinov2Model(Dinov2Config(**DINO, use_swiglu_ffn=True, attn_implementation=impl)), 32,
        {n: transformers.models.dinov2.modeling_dinov2.Dinov2Attention for n in _vit_names("encoder.", "layer")}),
    "SwinModel(40px, padded)": (lambda impl: SwinModel(SwinConfig(**SWIN, attn_implementation=impl)), 40,
                                {n: modeling_swin.SwinAttention for n in SWIN_NAMES}),
    "SwinForImageClassification": (
        lambda impl: SwinForImageClassification(SwinConfig(**SWIN, num_labels=3, attn_implementation=impl)), 32,
        {"swin." + n: modeling_swin.SwinAttention for n in SWIN_NAMES}),
}
if Dinov2WithRegistersModel is not None:
    MODELS["Dinov2WithRegistersModel"] = (
        lambda impl: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**DINO, num_register_tokens=2,
                                                                        attn_implementation=impl)), 32,
        {n: transformers.models.dinov2_with_registers.modeling_dinov2_with_registers.Dinov2WithRegistersAttention
         for n in _vit_names("encoder.", "layer")})

# (attn_implementation, output_attentions): whether the patched model runs the fused op
MODES = [("sdpa", False, True), ("eager", False, True), ("eager", True, False)]


@pytest.fixture
def checking(monkeypatch):
    """A list that is non-empty while a conversion's numerical check runs (the spies below count
    the calls in the models' forwards only)."""
    flag, real_check = [], hf_rules.require_same_function

    def check(*args, **kwargs):
        flag.append(True)
        try:
            return real_check(*args, **kwargs)
        finally:
            flag.pop()

    monkeypatch.setattr(hf_rules, "require_same_function", check)
    return flag


@pytest.fixture
def fused_calls(monkeypatch, checking):
    """Counts the ViT/Swin drop-ins' calls of the fused attention op in the models' forwards."""
    calls, real_attention = [], hf_attention.attention

    def spy(*args, **kwargs):
        if not checking:
            calls.append(args[0].shape)
        return real_attention(*args, **kwargs)

    monkeypatch.setattr(hf_attention, "attention", spy)
    return calls


def _images(size):
    return lambda: [torch.randn(2, 3, size, size)]


def _tol(impl, fused):
    return 1e-5 if impl == "eager" and fused else 1e-7


# ------------------------------------------------------------------------------------------
# ViT, DeiT, DINOv2 (registers), Swin: replaced, and the same as before in every mode
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl,output_attentions,fused", MODES)
@pytest.mark.parametrize("model", list(MODELS))
def test_hf_model_patched_matches(model, impl, output_attentions, fused, fused_calls):
    build, size, hf_classes = MODELS[model]
    replaced = {name: _cls(c) for name, c in hf_classes.items()}
    mine, report = check_patched_matches(lambda: build(impl), _images(size), replaced,
                                         forward_kwargs=dict(output_attentions=output_attentions),
                                         tol=_tol(impl, fused))
    assert all(report.rules[n][1] in ("hf_vit", "hf_swin") for n in replaced)
    # patched forwards: train, eval, and the fresh patched model loaded from the unpatched state
    assert len(fused_calls) == (3 * len(replaced) if fused else 0)
    for name, hf_class in hf_classes.items():  # transformers' isinstance checks still find it
        new = mine.get_submodule(name)
        assert isinstance(new, (HFViTAttention, HFSwinAttention)) and isinstance(new, hf_class)
    if impl == "eager" and output_attentions:  # recorded by transformers' hooks, one per layer (Swin: per stage)
        with torch.no_grad():
            out = mine(torch.randn(1, 3, size, size, dtype=torch.float64), output_attentions=True)
        assert len(out.attentions) == 2 and all(a is not None for a in out.attentions)


def test_sdpa_output_attentions_is_empty_as_before(fused_calls):
    """SDPA gives no probabilities: transformers records none, patched or not (and the op runs)."""
    build, size, replaced = MODELS["ViTModel"]
    ref = build("sdpa").double().eval()
    mine = patch(copy.deepcopy(ref)).model
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        a, b = ref(x, output_attentions=True), mine(x, output_attentions=True)
    assert a.attentions == () and b.attentions == ()
    assert len(fused_calls) == 2 and rel_error(b.last_hidden_state, a.last_hidden_state) < 1e-12


def test_other_image_size_with_interpolated_positions(fused_calls):
    """48 px images on a 32 px DINOv2 (37 tokens instead of 17): positions interpolated, attention fused."""
    build, _, hf_classes = MODELS["Dinov2Model(SwiGLU)"]
    check_patched_matches(lambda: build("sdpa"), _images(48), {n: _cls(c) for n, c in hf_classes.items()})
    assert len(fused_calls) == 6 and all(shape[2] == 37 for shape in fused_calls)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padding_attention_mask(impl, fused_calls):
    """ViT takes an ``attention_mask [B, N]``: Hugging Face makes it an additive (eager) or boolean
    (SDPA) ``[B, 1, N, N]`` mask, which the op takes as it is."""
    build, size, replaced = MODELS["ViTModel"]
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, 11:] = 0
    check_patched_matches(lambda: build(impl), _images(size), {n: _cls(c) for n, c in replaced.items()},
                          forward_kwargs=dict(attention_mask=mask), tol=_tol(impl, True))
    assert len(fused_calls) == 6


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fully_masked_sample_runs_hf_computation(impl, dtype, fused_calls):
    """A sample whose every token is masked: what Hugging Face gives depends on the function and the
    dtype (eager in float32: a uniform average; eager in float64 and SDPA: NaN), the op gives zeros,
    so the drop-in runs Hugging Face's computation for that input, bit for bit."""
    torch.manual_seed(0)
    ref = ViTModel(ViTConfig(**VIT, attn_implementation=impl)).to(dtype).eval()
    mine = patch(copy.deepcopy(ref)).model
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[0] = 0
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        a, b = ref(x, attention_mask=mask), mine(x, attention_mask=mask)
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, rtol=0, atol=0, equal_nan=True)
    assert fused_calls == []


def test_switching_attention_implementation_after_patching(fused_calls):
    """``config._attn_implementation`` is read at every forward (``set_attn_implementation``)."""
    build, size, _ = MODELS["SwinModel(40px, padded)"]
    torch.manual_seed(0)
    ref = build("sdpa").double().eval()
    mine = patch(copy.deepcopy(ref)).model
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    for impl in ("eager", "sdpa"):
        ref.set_attn_implementation(impl)
        mine.set_attn_implementation(impl)
        with torch.no_grad():
            assert rel_error(mine(x).last_hidden_state, ref(x).last_hidden_state) < 1e-5
    assert len(fused_calls) == 8


def test_other_attention_functions_run_unchanged(fused_calls):
    """An implementation the drop-in does not compute (here a function registered with
    transformers; flex attention and flash attention likewise) runs Hugging Face's forward, which
    calls it, unchanged."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []

    def counting(module, *args, **kwargs):
        seen.append(type(module).__name__)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("ssl_fast_test_counting", counting)
    try:
        build, size, replaced = MODELS["ViTModel"]
        check_patched_matches(lambda: build("ssl_fast_test_counting"), _images(size),
                              {n: _cls(c) for n, c in replaced.items()})
    finally:
        AttentionInterface._global_mapping.pop("ssl_fast_test_counting", None)
    assert fused_calls == []
    assert "HFViTAttention_for_ViTAttention" in seen and "ViTAttention" in seen
    notes = patch(MODELS["ViTModel"][0]("flex_attention")).notes
    assert len(notes) == 1 and "'flex_attention' is not fused" in notes[0]


def test_recording_hooks_installed_before_patching():
    """transformers installs its ``output_attentions`` hooks once, on the first forward that asks;
    a model patched after that keeps them."""
    torch.manual_seed(0)
    ref = ViTModel(ViTConfig(**VIT, attn_implementation="eager")).double().eval()
    mine = copy.deepcopy(ref)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        mine(x, output_attentions=True)
        patch(mine)
        a, b = ref(x, output_attentions=True), mine(x, output_attentions=True)
    assert len(a.attentions) == len(b.attentions) == 2
    for wa, wb in zip(a.attentions, b.attentions):
        assert rel_error(wb, wa) < 1e-12


def test_forward_hook_on_the_module_sees_the_weights(fused_calls):
    """A user's forward hook on the attention may read ``output[1]``: under eager the drop-in then
    returns Hugging Face's probabilities, exactly."""
    torch.manual_seed(0)
    ref = DeiTModel(DeiTConfig(**VIT, attn_implementation="eager")).double().eval()
    mine = patch(copy.deepcopy(ref)).model
    got = {}
    for tag, model in (("ref", ref), ("mine", mine)):
        model.layers[1].attention.register_forward_hook(lambda m, a, out, tag=tag: got.__setitem__(tag, out[1]))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_error(mine(x).last_hidden_state, ref(x).last_hidden_state) < 1e-5
    assert got["mine"] is not None and rel_error(got["mine"], got["ref"]) < 1e-12
    assert len(fused_calls) == 1  # layer 0 (no hook) fused, layer 1 exact


def test_patched_model_pickles_and_copies():
    torch.manual_seed(0)
    ref = SwinModel(SwinConfig(**SWIN)).double().eval()
    mine = patch(copy.deepcopy(ref)).model
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = ref(x).last_hidden_state
        for other in (copy.deepcopy(mine), pickle.loads(pickle.dumps(mine))):
            assert type(other.encoder.layers[0].blocks[0].attention) is _cls(modeling_swin.SwinAttention)
            assert rel_error(other(x).last_hidden_state, want) < 1e-12
        # in a fresh process the class does not exist yet: the module rebuilds it by name
        blob = pickle.dumps(mine)
        cls = _cls(modeling_swin.SwinAttention)
        hf_attention._BUILT.pop((HFSwinAttention, modeling_swin.SwinAttention))
        del vars(hf_attention)[cls.__qualname__]
        again = pickle.loads(blob)
        rebuilt = type(again.encoder.layers[0].blocks[0].attention)
        assert rebuilt is not cls and rebuilt.__qualname__ == cls.__qualname__
        assert rel_error(again(x).last_hidden_state, want) < 1e-12


def test_shares_parameters_modes_and_attributes():
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**DINO, attn_implementation="sdpa"))
    model.encoder.layer[0].attention.eval()
    old = model.encoder.layer[0].attention
    params = {n: p for n, p in model.named_parameters()}
    patch(model)
    new = model.encoder.layer[0].attention
    assert all(p is params[n] for n, p in model.named_parameters())
    assert new.q_proj is old.q_proj and new.config is model.config and not new.training
    assert model.encoder.layer[1].attention.training
    assert new.scaling == old.scaling and new.head_dim == 16 and new._is_hf_initialized
    assert isinstance(new, transformers.models.dinov2.modeling_dinov2.Dinov2Attention)


# ------------------------------------------------------------------------------------------
# skipped, with the reason
# ------------------------------------------------------------------------------------------
def test_swinv2_is_skipped_with_reason():
    names = [f"encoder.layers.{s}.blocks.{b}.attention" for s in range(2) for b in range(2)]
    skipped = {n: "Swinv2SelfAttention" for n in names}
    skipped.update({n + ".self": ["cosine", "logit scale"] for n in names})
    check_patched_matches(
        lambda: Swinv2Model(Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                         window_size=4, drop_path_rate=0.2)),
        _images(32), {}, skipped)


class _Plain(nn.Module):
    """A user's class that happens to be called ViTAttention and hold the same layers."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_attention_heads, self.head_dim = 2, 16
        self.scaling, self.attention_dropout, self.is_causal = 0.25, 0.0, False
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(32, 32) for _ in range(4))

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        return self.o_proj(self.v_proj(hidden_states)), None


def _skip_reason(model, name):
    report = patch(model)
    assert name not in report.replaced, str(report)
    return {s.name: s.reason for s in report.skipped}[name]


_PlainNamedLikeHF = type("ViTAttention", (_Plain,), {"forward": _Plain.forward})


@pytest.mark.parametrize("change,words", [
    (lambda m: setattr(m.layers[0], "attention", _PlainNamedLikeHF(m.config)), "not in Hugging Face transformers"),
    (lambda m: setattr(m.layers[0], "attention", type("ViTAttention", (modeling_vit.ViTAttention,), {})(m.config)),
     "inherits its forward"),
    (lambda m: m.layers[0].attention.register_buffer("head_mask", torch.ones(2)), "extra state ['head_mask']"),
    (lambda m: setattr(m.layers[0].attention, "is_causal", True), "is_causal is True"),
    (lambda m: setattr(m.layers[0].attention, "scaling", torch.tensor(0.3)), "scaling is Tensor"),
    (lambda m: setattr(m.layers[0].attention, "k_proj", nn.Identity()), "k_proj is Identity"),
    (lambda m: setattr(m.layers[0].attention, "o_proj", nn.Linear(24, 32)), "o_proj maps 24 -> 32"),
])
def test_vit_variants_skipped(change, words):
    model = ViTModel(ViTConfig(**VIT))
    change(model)
    reason = _skip_reason(model, "layers.0.attention")
    assert "rule hf_vit" in reason and words in reason, reason
    assert type(model.layers[1].attention) is _cls(modeling_vit.ViTAttention)


def test_another_eager_function_is_refused(monkeypatch):
    """Behaviour, not names: were Hugging Face's eager function to compute something else, the
    numerical check at the end of the conversion refuses the module."""
    def softcapped(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        logits = 30.0 * torch.tanh(torch.matmul(query, key.transpose(2, 3)) * scaling / 30.0)
        w = logits.softmax(-1)
        return torch.matmul(w, value).transpose(1, 2).contiguous(), w

    monkeypatch.setattr(modeling_vit, "eager_attention_forward", softcapped)
    model = ViTModel(ViTConfig(**VIT, attn_implementation="eager"))
    reason = _skip_reason(model, "layers.0.attention")
    assert "computes something else" in reason, reason


def test_swin_nonstandard_index_skipped():
    model = SwinModel(SwinConfig(**SWIN))
    rpb = model.encoder.layers[0].blocks[1].attention.relative_position_bias
    rpb.relative_position_index.copy_(rpb.relative_position_index.flip(0))
    assert "not Swin's standard index" in _skip_reason(model, "encoder.layers.0.blocks.1.attention")


def test_rules_do_not_match_others():
    rules = {r.name: r for r in RULES}
    cfg = ViTConfig(**VIT)
    assert rules["hf_vit"].matches(modeling_vit.ViTAttention(cfg))
    assert not rules["hf_vit"].matches(HFViTAttention(cfg))
    assert not rules["hf_vit"].matches(_cls(modeling_vit.ViTAttention)(cfg))
    assert not rules["hf_vit"].matches(ssl_fast.nn.Attention(32, 2))
    assert not rules["hf_swin"].matches(modeling_vit.ViTAttention(cfg))
    assert not rules["hf_swin"].matches(ssl_fast.nn.WindowAttention(32, 2, window_size=4))
    assert rules["hf_swin"].matches(modeling_swin.SwinAttention(SwinConfig(**SWIN), 16, 2, 4))


# ------------------------------------------------------------------------------------------
# CvT (CvtSelfAttention -> ssl_fast.nn.CvtSelfAttention)
# ------------------------------------------------------------------------------------------
def _cvt_config(**kw):
    c = dict(num_channels=3, patch_sizes=[7, 3], patch_stride=[4, 2], patch_padding=[2, 1], embed_dim=[16, 32],
             num_heads=[1, 2], depth=[1, 2], mlp_ratio=[2.0, 2.0], attention_drop_rate=[0.0, 0.0],
             drop_rate=[0.0, 0.0], drop_path_rate=[0.0, 0.2], qkv_bias=[True, True], cls_token=[False, True],
             qkv_projection_method=["dw_bn", "dw_bn"], kernel_qkv=[3, 3], padding_kv=[1, 1], stride_kv=[2, 2],
             padding_q=[1, 1], stride_q=[1, 1])
    c.update(kw)
    return CvtConfig(**c)


CVT_NAMES = ["encoder.stages.0.layers.0.attention.attention", "encoder.stages.1.layers.0.attention.attention",
             "encoder.stages.1.layers.1.attention.attention"]


@pytest.fixture
def cvt_calls(monkeypatch, checking):
    """Counts the CvT drop-in's calls of the fused conv-projection and attention ops in the models' forwards."""
    calls = {"conv": 0, "attention": 0}
    conv, attn = ops.conv_qkv_projection, ops.attention

    def conv_spy(*a, **k):
        calls["conv"] += not checking
        return conv(*a, **k)

    def attn_spy(*a, **k):
        calls["attention"] += not checking
        return attn(*a, **k)

    monkeypatch.setattr(ops, "conv_qkv_projection", conv_spy)
    monkeypatch.setattr(ops, "attention", attn_spy)
    return calls


@pytest.mark.parametrize("case", ["CvtModel", "CvtForImageClassification(28x36)", "stride_kv 1, kernel 5",
                                  "qkv_bias off"])
def test_cvt_patched_matches(case, cvt_calls):
    """Stage 1 without, stage 2 with a class token; 3x3 projections fused (conv + BatchNorm in one
    op, running statistics updated as nn.BatchNorm2d does), other kernels run as written."""
    prefix, size, fused_convs = "", (32, 32), 3
    if case == "CvtModel":
        build = lambda: CvtModel(_cvt_config())  # noqa: E731
    elif case.startswith("CvtForImageClassification"):
        build, prefix, size = lambda: CvtForImageClassification(_cvt_config(num_labels=5)), "cvt.", (28, 36)  # noqa
    elif case == "qkv_bias off":
        build = lambda: CvtModel(_cvt_config(qkv_bias=[False, False]))  # noqa: E731
    else:
        build = lambda: CvtModel(_cvt_config(stride_kv=[1, 2], kernel_qkv=[3, 5], padding_kv=[1, 2],  # noqa
                                             padding_q=[1, 2]))
        fused_convs = 1
    mine, report = check_patched_matches(build, lambda: [torch.randn(2, 3, *size)],
                                         {prefix + n: FastCvtSelfAttention for n in CVT_NAMES})
    assert all(report.rules[prefix + n] == ("CvtSelfAttention", "hf_cvt") for n in CVT_NAMES)
    assert any("CvtAttention" in note for note in report.notes)
    assert cvt_calls == {"conv": 3 * fused_convs, "attention": 3 * len(CVT_NAMES)}


def test_cvt_patch_shares_objects_and_trains_the_same(cvt_calls):
    """Two SGD steps patched and unpatched: parameters and running statistics move the same way."""
    torch.manual_seed(0)
    ref = CvtModel(_cvt_config()).double().train()
    mine = copy.deepcopy(ref)
    params = {n: p for n, p in mine.named_parameters()}
    buffers = {n: b for n, b in mine.named_buffers()}
    patch(mine)
    assert all(p is params[n] for n, p in mine.named_parameters())
    assert all(b is buffers[n] for n, b in mine.named_buffers())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, mine)]
    for step in range(2):
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        for model, opt in zip((ref, mine), opts):
            opt.zero_grad()
            torch.manual_seed(step)  # the same drop-path draws
            out = model(x)
            (out.last_hidden_state.sin().sum() + out.cls_token_value.sum()).backward()
            opt.step()
    sa, sb = ref.state_dict(), mine.state_dict()
    for k in sa:  # absolute floor: the key BatchNorm's bias gets a zero gradient up to rounding
        assert (sb[k] - sa[k]).double().norm() <= 1e-9 * (1 + sa[k].double().norm()), k
    bn = CVT_NAMES[2] + ".convolution_projection_value.convolution_projection.normalization"
    assert int(sb[bn + ".num_batches_tracked"]) == 2
    assert cvt_calls["conv"] == 2 * 3


def test_cvt_frozen_batchnorm_modes():
    """Fine-tuning with some BatchNorms frozen (eval) inside a training model: the modes are kept,
    and mixed modes run the projections as written, matching Hugging Face."""
    torch.manual_seed(0)
    ref = CvtModel(_cvt_config()).double().train()
    mine = copy.deepcopy(ref)
    frozen = CVT_NAMES[1] + ".convolution_projection_query.convolution_projection.normalization"
    all_frozen = [CVT_NAMES[2] + f".convolution_projection_{p}.convolution_projection.normalization"
                  for p in ("query", "key", "value")]
    for model in (ref, mine):
        for name in [frozen] + all_frozen:
            model.get_submodule(name).eval()
    patch(mine)
    assert not mine.get_submodule(frozen).training
    assert mine.get_submodule(frozen.replace("query", "key")).training and mine.get_submodule(CVT_NAMES[1]).training
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)
    a = ref(xr).last_hidden_state
    torch.manual_seed(1)  # the same drop-path draws
    b = mine(xm).last_hidden_state
    assert rel_error(b, a) < 1e-10
    a.sin().sum().backward()
    b.sin().sum().backward()
    assert rel_error(xm.grad, xr.grad) < 1e-10
    for (n, p), q in zip(mine.named_parameters(), ref.parameters()):
        assert (p.grad - q.grad).norm() <= 1e-9 * (1 + q.grad.norm()), n
    for (n, s), t in zip(mine.named_buffers(), ref.buffers()):
        assert torch.equal(s, t) or rel_error(s, t) < 1e-12, n


def test_cvt_avg_projection_skipped():
    """Hugging Face builds no convolution for 'avg' (its forward then fails): left alone, with the reason."""
    model = CvtModel(_cvt_config(qkv_projection_method=["dw_bn", "avg"]))
    report = patch(model)
    assert report.replaced == CVT_NAMES[:1]
    # (its projections and the CvtAttention wrapper are walked into and listed as unknown classes)
    why = {s.name: s.reason for s in report.skipped if s.class_name == "CvtSelfAttention"}
    assert set(why) == set(CVT_NAMES[1:]) and all("'dw_bn'" in r for r in why.values())
    assert all(type(model.get_submodule(n)) is modeling_cvt.CvtSelfAttention for n in CVT_NAMES[1:])
    with pytest.raises(AttributeError, match="convolution_projection"):
        model(torch.randn(1, 3, 32, 32))  # as before patching: Hugging Face's own forward fails


@pytest.mark.parametrize("change,words", [
    (lambda a: setattr(a, "scale", torch.tensor(0.5)), "scale is a tensor"),
    (lambda a: setattr(a, "projection_key", nn.Identity()), "projection_key is Identity"),
    (lambda a: a.register_buffer("extra", torch.zeros(1)), "extra state ['extra']"),
    (lambda a: setattr(a.convolution_projection_value.convolution_projection, "normalization", nn.LayerNorm(32)),
     "not a BatchNorm"),
])
def test_cvt_variants_skipped(change, words):
    model = CvtModel(_cvt_config())
    change(model.get_submodule(CVT_NAMES[1]))
    reason = _skip_reason(model, CVT_NAMES[1])
    assert "rule hf_cvt" in reason and words in reason, reason


def test_cvt_constant_scale_carried_over():
    torch.manual_seed(0)
    ref = CvtModel(_cvt_config()).double().eval()
    ref.get_submodule(CVT_NAMES[0]).scale = 0.37
    mine = patch(copy.deepcopy(ref)).model
    assert mine.get_submodule(CVT_NAMES[0]).scale == 0.37
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_error(mine(x).last_hidden_state, ref(x).last_hidden_state) < 1e-10


def test_cvt_rule_does_not_match_others():
    rule = next(r for r in RULES if r.name == "hf_cvt")
    assert rule.matches(modeling_cvt.CvtSelfAttention(1, 4, 3, 1, 1, 1, 2, "dw_bn", True, 0.0))
    assert not rule.matches(FastCvtSelfAttention(1, 4))
    assert not rule.matches(ssl_fast.nn.ConvAttention(4, 4, 1))
    assert not rule.matches(type("CvtSelfAttention", (nn.Module,), {})())

