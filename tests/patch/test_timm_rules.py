"""``ssl_fast.patch`` on real timm models (tiny configs, ``pretrained=False``, float64 on the CPU).

The acceptance list of issue 10: every model either runs patched and matches the unpatched model
(outputs and every gradient in train mode under one random stream, eval outputs, state_dict
loading both ways: :func:`patch_compare.check_patched_matches`), or is skipped with its reason.
ViT, DeiT (plain and distilled), DeiT-3, CLIP, FlexiViT, DINOv2 (and with registers), Swin (shifted
windows; ``set_input_size`` after patching) and SAM-ViT are replaced; SAM-ViT with rope, BEiT (with
and without q/v biases), Swin V2, NesT, FastViT and VOLO are skipped, each with its reason.
Same-named modules that the ViT rule must refuse (a tuple return, a changed scale) are timm's own
class with one thing changed.
"""
import copy
from functools import partial

import pytest
pytest.importorskip("timm")  # the real library; where it is not installed (the GPU image) these tests skip
import timm
import torch
from timm.layers import Attention as TimmAttention
from timm.models._manipulate import reinit_non_persistent_buffers
from timm.models.nest import Nest
from timm.models.volo import VOLO
from torch import nn

from patch_compare import _assert_close, _loss, _outputs, _perturb, check_patched_matches, forward_with_seed
from ssl_fast.nn import Attention, RelPosAttention, WindowAttention
from ssl_fast.patch import patch

VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5)
SWIN = dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4), num_classes=5)
SAM = dict(img_size=64, patch_size=16, depth=2, embed_dim=32, num_heads=2, window_size=2, global_attn_indexes=(1,),
           neck_chans=16, num_classes=5)


def images(size=32):
    return lambda: [torch.randn(2, 3, size, size)]


def create(name, **kw):
    return partial(timm.create_model, name, pretrained=False, **kw)


def blocks(cls, names):
    return {n: cls for n in names}


VIT_ATTN = blocks(Attention, ["blocks.0.attn", "blocks.1.attn"])


# ------------------------------------------------------------------------------------------
# replaced: timm.layers.Attention in the ViT family
# ------------------------------------------------------------------------------------------
VIT_MODELS = {
    "vit": create("vit_tiny_patch16_224", **VIT),
    "vit_qk_norm_dropout_droppath": create("vit_tiny_patch16_224", qk_norm=True, qkv_bias=False, proj_drop_rate=0.1,
                                           drop_path_rate=0.2, **VIT),
    "deit": create("deit_tiny_patch16_224", **VIT),
    "deit_distilled": create("deit_tiny_distilled_patch16_224", **VIT),
    "deit3": create("deit3_small_patch16_224", **VIT),
    "clip": create("vit_base_patch16_clip_224", **VIT),
    "flexivit": create("flexivit_small", **VIT),
    "dinov2": create("vit_small_patch14_dinov2", **VIT),
    "dinov2_registers": create("vit_small_patch14_reg4_dinov2", **VIT),
}


@pytest.mark.parametrize("name", list(VIT_MODELS))
def test_vit_family_replaced_and_matches(name):
    mine, report = check_patched_matches(VIT_MODELS[name], images(), replaced=VIT_ATTN)
    assert report.skipped == []
    assert all(r == ("Attention", "timm_vit") for r in report.rules.values())


class Features(nn.Module):
    """``model.forward_features(x, **kw)``: timm's way to pass ``attn_mask``/``is_causal`` to the blocks."""

    def __init__(self, model, **kw):
        super().__init__()
        self.model, self.kw = model, kw

    def forward(self, x):
        return self.model.forward_features(x, **self.kw)


def _keep_mask():
    g = torch.Generator().manual_seed(7)
    keep = torch.rand(2, 1, 17, 17, generator=g) < 0.7
    return keep | torch.eye(17, dtype=torch.bool)


@pytest.mark.parametrize("kw", [dict(is_causal=True), dict(attn_mask=_keep_mask())], ids=["is_causal", "bool_mask"])
def test_vit_masked_forward_matches(kw):
    build = lambda: Features(timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT), **kw)  # noqa: E731
    check_patched_matches(build, images(), replaced=blocks(Attention, ["model.blocks.0.attn", "model.blocks.1.attn"]))


@pytest.mark.parametrize("kw,forward_kwargs", [
    (dict(gated=True, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm), dict(is_causal=True)),
    (dict(attn_head_dim=5, dim_out=12, scale_norm=True, norm_layer=nn.LayerNorm, proj_bias=False), {}),
], ids=["gated_qk_norm_causal", "head_dim_dim_out_scale_norm"])
def test_timm_attention_module_replaced(kw, forward_kwargs):
    """The module itself as the root, with the options no ViT config in the zoo turns on."""
    _, report = check_patched_matches(lambda: TimmAttention(16, 2, **kw), lambda: [torch.randn(2, 5, 16)],
                                      replaced={"": Attention}, forward_kwargs=forward_kwargs)
    assert isinstance(report.model, Attention) and (report.model.gate is not None) == bool(kw.get("gated"))


def test_attn_layer_argument():
    """README's ``timm.create_model(..., attn_layer=ssl_fast.nn.Attention)``: under one seed the same
    weights as timm's own model, and the same outputs and gradients."""
    kw = dict(VIT, qk_norm=True, qkv_bias=True, proj_drop_rate=0.1, drop_path_rate=0.1)
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kw)
    torch.manual_seed(0)
    mine = timm.create_model("vit_tiny_patch16_224", pretrained=False, attn_layer=Attention, **kw)
    assert all(type(b.attn) is Attention for b in mine.blocks)
    sd_r, sd_m = ref.state_dict(), mine.state_dict()
    assert list(sd_r) == list(sd_m) and all(torch.equal(sd_r[k], sd_m[k]) for k in sd_r)
    _perturb(ref, 0)
    mine.load_state_dict(ref.state_dict())
    ref, mine = ref.double().train(), mine.double().train()
    x = images()()[0].double()
    out_r, out_m = forward_with_seed(ref, [x]), forward_with_seed(mine, [x])
    _assert_close(out_m, out_r, 1e-7, "train output")
    _loss(_outputs(out_r)).backward()
    _loss(_outputs(out_m)).backward()
    grads = dict(ref.named_parameters())
    floor = 1e-4 * sum(float(p.grad.norm()) ** 2 for p in grads.values()) ** 0.5  # k_norm.bias: zero but for rounding
    for name, p in mine.named_parameters():
        err = float((p.grad - grads[name].grad).norm()) / max(float(grads[name].grad.norm()), floor)
        assert err <= 1e-7, f"grad of {name}: relative error {err:.3g}"
    with torch.no_grad():
        _assert_close(mine.eval()(x), ref.eval()(x), 1e-7, "eval output")


# ------------------------------------------------------------------------------------------
# the ViT rule refuses what it cannot serve exactly
# ------------------------------------------------------------------------------------------
def _tuple_return(self, x):
    return TimmAttention.forward(self, x), x


TupleAttention = type("Attention", (TimmAttention,), {"forward": _tuple_return})  # timm's, returning (x, extra)


def test_vit_rule_refuses_tuple_return():
    build = lambda: nn.Sequential(TupleAttention(16, 2), TimmAttention(16, 2))  # noqa: E731

    class First(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = build()

        def forward(self, x):
            return self.seq[1](self.seq[0](x)[0])

    check_patched_matches(First, lambda: [torch.randn(2, 5, 16)], replaced={"seq.1": Attention},
                          skipped={"seq.0": ["returns a tuple of 2", "one tensor"]})


def _residual_inside(self, x, attn_mask=None, is_causal=False):
    return TimmAttention.forward(self, x, attn_mask=attn_mask, is_causal=is_causal) + x


ResidualAttention = type("Attention", (TimmAttention,), {"forward": _residual_inside})  # same state and layout


def test_vit_rule_refuses_other_function():
    """Same name, state, forward parameters and layout, another function: only running it shows."""
    check_patched_matches(lambda: ResidualAttention(16, 2), lambda: [torch.randn(2, 5, 16)], replaced={},
                          skipped={"": "computes something else"})


def _vit_with_scale():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT)
    for blk, fused in zip(model.blocks, (True, False)):
        blk.attn.scale, blk.attn.fused_attn = 0.3, fused
    return model


def test_vit_rule_scale_follows_timms_path():
    """timm's SDPA path ignores a changed ``scale``; its eager path uses it. The first is
    ambiguous and skipped, the second replaced with that scale."""
    mine, _ = check_patched_matches(_vit_with_scale, images(), replaced={"blocks.1.attn": Attention},
                                    skipped={"blocks.0.attn": ["scale=0.3", "fused_attn=True"]})
    assert mine.blocks[1].attn.scale == 0.3 and mine.blocks[1].attn.fused_attn is False


# ------------------------------------------------------------------------------------------
# Swin
# ------------------------------------------------------------------------------------------
SWIN_ATTN = blocks(WindowAttention, [f"layers.{s}.blocks.{b}.attn" for s in (0, 1) for b in (0, 1)])
swin = create("swin_tiny_patch4_window7_224", **SWIN)


def test_swin_replaced_and_matches():
    mine, _ = check_patched_matches(swin, images(), replaced=SWIN_ATTN)
    assert mine.layers[0].blocks[1].shift_size == (2, 2)  # shifted windows (the masked kernel) are covered
    assert mine.layers[0].blocks[1].attn_mask is not None


@pytest.mark.filterwarnings("ignore:torch.searchsorted", "ignore:Using a non-tuple sequence")  # timm's resize
@pytest.mark.parametrize("img,window", [(None, 2), ((48, 48), 3)], ids=["window2", "img48_window3"])
def test_swin_set_input_size_after_patching(img, window):
    """timm's ``SwinTransformer.set_input_size`` on the patched model (it calls the attention's
    ``set_window_size``), against the unpatched model doing the same."""
    def resize(model):
        model.set_input_size(img_size=img, window_size=window)
        assert all(b.attn.window_size == (window, window) for layer in model.layers for b in layer.blocks)

    mine, _ = check_patched_matches(swin, images(img[0] if img else 32), replaced=SWIN_ATTN, after_patch=resize)
    assert isinstance(mine.layers[0].blocks[0].attn, WindowAttention)


def test_swin_patched_keeps_timms_init_methods():
    torch.manual_seed(0)
    ref = swin()
    mine = copy.deepcopy(ref)
    patch(mine)
    torch.manual_seed(1)
    ref.init_weights()  # calls reset_parameters on every WindowAttention
    torch.manual_seed(1)
    mine.init_weights()
    sd_r, sd_m = ref.state_dict(), mine.state_dict()
    assert all(torch.equal(sd_r[k], sd_m[k]) for k in sd_r)
    attn = mine.layers[0].blocks[0].attn
    attn.relative_position_index.zero_()
    assert "layers.0.blocks.0.attn" in reinit_non_persistent_buffers(mine)
    assert torch.equal(attn.relative_position_index, ref.layers[0].blocks[0].attn.relative_position_index)


def test_swin_v2_skipped():
    build = create("swinv2_tiny_window8_256", img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1),
                   num_heads=(2, 4), num_classes=5)
    check_patched_matches(build, images(), replaced={},
                          skipped={f"layers.{s}.blocks.0.attn": "cpb_mlp" for s in (0, 1)})


# ------------------------------------------------------------------------------------------
# SAM-ViT (vision_transformer_sam)
# ------------------------------------------------------------------------------------------
SAM_ATTN = blocks(RelPosAttention, ["blocks.0.attn", "blocks.1.attn"])


@pytest.mark.parametrize("size", [64, 80], ids=["native", "other_size"])
def test_sam_replaced_and_matches(size):
    """Windowed (block 0) and global (block 1) attention; at 80 px the windows are padded and the
    global block's tables are interpolated on the fly."""
    mine, _ = check_patched_matches(create("samvit_base_patch16", **SAM), images(size), replaced=SAM_ATTN)
    assert mine.blocks[0].window_size == 2 and mine.blocks[1].window_size == 0
    assert mine.blocks[0].attn.rel_pos_h.shape[0] == 3 and mine.blocks[1].attn.rel_pos_h.shape[0] == 7


def test_sam_without_rel_pos_replaced():
    mine, _ = check_patched_matches(create("samvit_base_patch16", use_rel_pos=False, **SAM), images(64),
                                    replaced=SAM_ATTN)
    assert not mine.blocks[0].attn.use_rel_pos


def test_sam_rope_skipped():
    check_patched_matches(create("samvit_base_patch16", use_rel_pos=False, use_rope=True, **SAM), images(64),
                          replaced={}, skipped={"blocks.0.attn": "rope", "blocks.1.attn": "rope"})


# ------------------------------------------------------------------------------------------
# skipped: BEiT, NesT, FastViT, VOLO
# ------------------------------------------------------------------------------------------
SKIPPED = {
    # q_bias/v_bias (and the relative-position table with a class-token row) are extra state
    "beit": (create("beit_base_patch16_224", **VIT), images(),
             {"blocks.0.attn": ["extra state", "q_bias", "v_bias"], "blocks.1.attn": ["extra state", "q_bias"]}),
    # nothing extra, but the forward takes a shared relative-position bias the drop-in cannot add
    "beit_no_qv_bias": (create("beit_base_patch16_224", qkv_bias=False, use_rel_pos_bias=False,
                               use_abs_pos_emb=True, **VIT), images(),
                        {f"blocks.{i}.attn": "shared_rel_pos_bias" for i in (0, 1)}),
    # [B, T, N, C] blocks of tokens
    "nest": (lambda: Nest(img_size=32, patch_size=4, embed_dims=(16, 32, 32), num_heads=(1, 2, 2), depths=(1, 1, 1),
                          num_classes=5), images(),
             {f"levels.{i}.transformer_encoder.0.attn": ["[B, N, C]", "4-D channels-last"] for i in range(3)}),
    # [B, C, H, W] maps
    "fastvit": (create("fastvit_sa12", layers=(1, 1, 1, 1), embed_dims=(8, 16, 16, 32), num_classes=5), images(),
                {"stages.3.blocks.0.token_mixer": ["[B, N, C]", "4-D channels-first"],
                 "stages.3.blocks.0": "unknown class"}),
    # [B, H, W, C] maps; outlook and class attention have no rule
    "volo": (lambda: VOLO(layers=(1, 1, 1, 1), img_size=32, embed_dims=(16, 32, 32, 32), num_heads=(1, 2, 2, 2),
                          num_classes=5, stem_hidden_dim=8), images(),
             {**{f"network.{i}.0.attn": ["[B, N, C]", "4-D channels-last"] for i in (2, 3, 4)},
              "network.0.0.attn": "unknown class", "post_network.0.attn": "unknown class",
              "post_network.1.attn": "unknown class"}),
}


@pytest.mark.parametrize("name", list(SKIPPED))
def test_skipped_with_reason(name):
    build, inputs, skipped = SKIPPED[name]
    _, report = check_patched_matches(build, inputs, replaced={}, skipped=skipped)
    assert f"skipped  {next(iter(skipped))}" in str(report)
