"""``ssl_fast.patch`` on the official research code that cannot be pip-installed: the DINO ViT
(facebookresearch/dino), segment-anything's image encoder and microsoft/CvT. The models come
from the faithful re-statements in ``tests/official/`` (each names its source and commit) and are
compared before/after with :func:`patch_compare.check_patched_matches` (float64: train outputs
and every gradient under the same random stream, eval outputs, state_dict both ways), plus what
each model exposes beyond its forward (DINO's ``get_last_selfattention``, CvT's running
statistics) and the variants the rules must skip, with their reasons.
"""
import copy

import pytest
import torch
from torch import nn

import ssl_fast
from helpers import available_backends, rel_error
pytest.importorskip("timm")  # the real library; where it is not installed (the GPU image) these tests skip
from official import dino_vision_transformer as dino
from official import microsoft_cvt as cvt
from official import segment_anything_image_encoder as sam
from patch_compare import _perturb, check_patched_matches
from ssl_fast.nn import Attention, ConvAttention, DINOBlock, RelPosAttention


def _images(b=2, size=32):
    return lambda: [torch.randn(b, 3, size, size)]


def _skips(report):
    return {s.name: s.reason for s in report.skipped}


# ----------------------------------------------------------------------------------------------
# DINO
# ----------------------------------------------------------------------------------------------
def _dino_vit(**kw):
    cfg = dict(img_size=[32], patch_size=8, embed_dim=32, depth=2, num_heads=4, qkv_bias=True)
    cfg.update(kw)
    return dino.VisionTransformer(**cfg)


_DINO_BLOCKS = {"blocks.0": DINOBlock, "blocks.1": DINOBlock}


def test_dino_vit_matches():
    # drop-path on: the residual draws must follow the same random stream after patching
    mine, _ = check_patched_matches(lambda: _dino_vit(drop_path_rate=0.2), _images(3), _DINO_BLOCKS)
    assert all(type(b.attn) is Attention for b in mine.blocks)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_dino_get_last_selfattention(batch):
    torch.manual_seed(0)
    ref = _dino_vit(qk_scale=0.3)
    _perturb(ref, 0)
    ref = ref.double().eval()
    mine = copy.deepcopy(ref)
    report = ssl_fast.patch(mine)
    assert sorted(report.replaced) == sorted(_DINO_BLOCKS), str(report)
    x = torch.randn(batch, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want, got = ref.get_last_selfattention(x), mine.get_last_selfattention(x)
        assert got.shape == want.shape == (batch, 4, 17, 17) and got.dtype == want.dtype
        assert rel_error(got, want) <= 1e-12
        assert rel_error(mine(x), ref(x)) <= 1e-12
        # every block's intermediate output, the other entry point DINO's evaluation uses
        for a, b in zip(mine.get_intermediate_layers(x, n=2), ref.get_intermediate_layers(x, n=2)):
            assert rel_error(a, b) <= 1e-12
    # train mode: the maps carry gradients back to the weights, as DINO's do
    ref.train(), mine.train()
    xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = ref.get_last_selfattention(xr), mine.get_last_selfattention(xm)
    assert rel_error(got, want) <= 1e-12
    w = torch.randn_like(want)
    (want * w).sum().backward()
    (got * w).sum().backward()
    assert rel_error(xm.grad, xr.grad) <= 1e-10
    for (name, p), q in zip(mine.named_parameters(), ref.parameters()):
        if q.grad is not None:
            assert rel_error(p.grad, q.grad) <= 1e-10, name


class _Student(nn.Module):
    """DINO's student as main_dino.py wraps it (MultiCropWrapper), fed the multi-crop list: 2 global
    32px crops and 2 local 16px crops (position embeddings interpolated). A Linear head stands in
    for DINOHead, whose weight-normed layer cannot be deep-copied."""

    def __init__(self):
        super().__init__()
        self.net = dino.MultiCropWrapper(_dino_vit(drop_path_rate=0.1),
                                         nn.Linear(32, 24))

    def forward(self, g1, g2, l1, l2):
        return self.net([g1, g2, l1, l2])


def test_dino_multicrop_student_matches():
    check_patched_matches(_Student, lambda: [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32),
                                             torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)],
                          {"net.backbone.blocks.0": DINOBlock, "net.backbone.blocks.1": DINOBlock})


class _Holder(nn.Module):
    """DINO's Attention used outside DINO's Block: its (x, attn) contract cannot be served."""

    def __init__(self):
        super().__init__()
        self.attn = dino.Attention(32, num_heads=4, qkv_bias=True)

    def forward(self, x):
        return self.attn(x)


class _LayerScaleBlock(dino.Block):
    """A DINO-derived block with layer scale (as in iBOT/DeiT-III): extra parameters."""

    def __init__(self, dim, num_heads):
        super().__init__(dim, num_heads, qkv_bias=True)
        self.gamma_1 = nn.Parameter(torch.full((dim,), 0.1))
        self.gamma_2 = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x, return_attention=False):
        y, attn = self.attn(self.norm1(x))
        if return_attention:
            return attn
        x = x + self.drop_path(self.gamma_1 * y)
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))


class _PostNormBlock(dino.Block):
    """Same state and signature as DINO's Block, another computation (post-norm)."""

    def forward(self, x, return_attention=False):
        y, attn = self.attn(x)
        if return_attention:
            return attn
        x = self.norm1(x + self.drop_path(y))
        return self.norm2(x + self.drop_path(self.mlp(x)))


class _Blocks(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


@pytest.mark.parametrize("build, skipped", [
    (_Holder, {"attn": "returns a tuple (x, attn)"}),
    (lambda: _Blocks(_LayerScaleBlock(32, 4)),
     {"block": "extra state ['gamma_1', 'gamma_2']", "block.attn": "returns a tuple (x, attn)"}),
    (lambda: _Blocks(_PostNormBlock(32, 4, qkv_bias=True)),
     {"block": "computes something else", "block.attn": "returns a tuple (x, attn)"}),
])
def test_dino_variants_skipped(build, skipped):
    check_patched_matches(build, lambda: [torch.randn(2, 5, 32)], {}, skipped)


def test_dino_hooked_attention_skipped():
    """A hook on attn_drop (how attention-rollout scripts grab DINO's maps) would stop firing."""
    seen = []
    model = _dino_vit()
    model.blocks[1].attn.attn_drop.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    report = ssl_fast.patch(model)
    assert report.replaced == ["blocks.0"], str(report)
    reasons = _skips(report)
    assert "forward hooks are registered on attn.attn_drop" in reasons["blocks.1"]
    assert "returns a tuple (x, attn)" in reasons["blocks.1.attn"]
    model(torch.randn(1, 3, 32, 32))
    assert seen == [(1, 4, 17, 17)]


def test_dino_block_drop_in_constructor():
    """DINOBlock built by hand is DINO's Block: same state_dict keys, same outputs and maps."""
    torch.manual_seed(0)
    ref = dino.Block(32, 4, mlp_ratio=2., qkv_bias=True, qk_scale=0.25).double().eval()
    _perturb(ref, 2)
    mine = DINOBlock(32, 4, mlp_ratio=2., qkv_bias=True, qk_scale=0.25).double().eval()
    assert list(mine.state_dict()) == list(ref.state_dict())
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    with torch.no_grad():
        assert rel_error(mine(x), ref(x)) <= 1e-12
        assert rel_error(mine(x, return_attention=True), ref(x, return_attention=True)) <= 1e-12
    with pytest.raises(ValueError, match="num_heads"):
        DINOBlock(30, 4)
    with pytest.raises(ValueError, match="drop_path"):
        DINOBlock(32, 4, drop_path=1.0)
    with pytest.raises(ValueError, match="mlp_ratio"):
        DINOBlock(32, 4, mlp_ratio=0)
    with pytest.raises(ValueError, match=r"x must be \[B, N, C\]"):
        mine(torch.randn(7, 32, dtype=torch.float64), return_attention=True)


def test_patch_leaves_weights_modes_and_random_stream_alone():
    torch.manual_seed(0)
    model = _dino_vit(drop_path_rate=0.1)
    model.train()
    model.blocks[1].eval()
    model.blocks[0].attn.eval()
    params = {n: p for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in params.items()}
    state = torch.get_rng_state()
    ssl_fast.patch(model)
    assert torch.equal(torch.get_rng_state(), state)
    for n, p in model.named_parameters():
        assert p is params[n] and torch.equal(p, values[n]), n
    assert model.blocks[0].training and not model.blocks[1].training
    assert not model.blocks[1].attn.training and model.blocks[0].mlp.training
    assert not model.blocks[0].attn.training and not model.blocks[0].attn.qkv.training


# ----------------------------------------------------------------------------------------------
# segment-anything image encoder
# ----------------------------------------------------------------------------------------------
def _sam_encoder(use_rel_pos=True):
    # 8 x 8 tokens; windowed block 0 (window 3: padded to 9 x 9, 9 windows), global block 1
    return sam.ImageEncoderViT(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                               out_chans=16, use_rel_pos=use_rel_pos, window_size=3, global_attn_indexes=(1,))


@pytest.mark.parametrize("use_rel_pos", [True, False])
def test_sam_image_encoder_matches(use_rel_pos):
    mine, _ = check_patched_matches(lambda: _sam_encoder(use_rel_pos), _images(2),
                                    {"blocks.0.attn": RelPosAttention, "blocks.1.attn": RelPosAttention})
    assert mine.blocks[0].window_size == 3 and mine.blocks[1].window_size == 0
    if use_rel_pos:
        assert tuple(mine.blocks[0].attn.rel_pos_h.shape) == (5, 16)
        assert tuple(mine.blocks[1].attn.rel_pos_h.shape) == (15, 16)


class _Grid(nn.Module):
    """A SAM Attention run on a grid of its own size (tables made for 4 x 4, used on 3 x 5)."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x)


class _TemperatureAttention(sam.Attention):
    """Same state and signature as SAM's Attention, another computation."""

    def forward(self, x):
        return super().forward(x * 2.0)


class _NoBiasProjAttention(sam.Attention):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.proj = nn.Linear(self.proj.in_features, self.proj.out_features, bias=False)


def _sam_attn(cls=sam.Attention, **kw):
    return lambda: _Grid(cls(32, num_heads=2, use_rel_pos=True, input_size=(4, 4), **kw))


@pytest.mark.parametrize("build", [_sam_attn(), _sam_attn(qkv_bias=False), _sam_attn(_NoBiasProjAttention)])
def test_sam_attention_resized_tables_matches(build):
    check_patched_matches(build, lambda: [torch.randn(2, 3, 5, 32)], {"attn": RelPosAttention})


def _sam_wrong_table():
    m = _sam_attn()()
    m.attn.rel_pos_w = nn.Parameter(torch.zeros(7, 8))
    return m


@pytest.mark.parametrize("build, reason", [
    (_sam_attn(_TemperatureAttention), "computes something else"),
    (_sam_wrong_table, "not [L, head_dim=16]"),
])
def test_sam_variants_skipped(build, reason):
    report = ssl_fast.patch(build())
    assert not report.replaced and set(_skips(report)) == {"attn"}, str(report)
    assert reason in _skips(report)["attn"] and "rule sam_attention" in _skips(report)["attn"]


# ----------------------------------------------------------------------------------------------
# microsoft/CvT
# ----------------------------------------------------------------------------------------------
def _cvt_spec(method="dw_bn", cls_token=(False, True), drop_path=0.0):
    return {
        "NUM_STAGES": 2, "PATCH_SIZE": [7, 3], "PATCH_STRIDE": [4, 2], "PATCH_PADDING": [2, 1],
        "DIM_EMBED": [16, 32], "DEPTH": [1, 1], "NUM_HEADS": [1, 2], "MLP_RATIO": [2.0, 2.0],
        "QKV_BIAS": [True, True], "DROP_RATE": [0.0, 0.0], "ATTN_DROP_RATE": [0.0, 0.0],
        "DROP_PATH_RATE": [0.0, drop_path], "CLS_TOKEN": list(cls_token), "QKV_PROJ_METHOD": [method, method],
        "KERNEL_QKV": [3, 3], "PADDING_Q": [1, 1], "PADDING_KV": [1, 1], "STRIDE_KV": [2, 2], "STRIDE_Q": [1, 1],
    }


_CVT_ATTN = {"stage0.blocks.0.attn": ConvAttention, "stage1.blocks.0.attn": ConvAttention}


@pytest.mark.parametrize("method, cls_token", [("dw_bn", (False, True)), ("dw_bn", (False, False)),
                                               ("avg", (False, True))])
def test_cvt_matches(method, cls_token):
    # 32px: stage 0 on an 8 x 8 map (k/v 4 x 4), stage 1 on 4 x 4 (k/v 2 x 2)
    mine, _ = check_patched_matches(
        lambda: cvt.ConvolutionalVisionTransformer(num_classes=10, spec=_cvt_spec(method, cls_token, 0.1)),
        _images(3), _CVT_ATTN)
    for name in _CVT_ATTN:
        attn = mine.get_submodule(name)
        assert attn.method == method and attn.stride_kv == 2 and attn.stride_q == 1
    assert mine.stage1.blocks[0].attn.with_cls_token is cls_token[1]


def test_cvt_batchnorm_statistics_and_frozen_norms():
    """Train steps update the projections' running statistics as the official module does; a norm
    frozen in eval mode stays frozen after patching."""
    torch.manual_seed(0)
    ref = cvt.ConvolutionalVisionTransformer(num_classes=10, spec=_cvt_spec()).double().train()
    _perturb(ref, 3)
    ref.stage1.blocks[0].attn.conv_proj_k.bn.eval()
    mine = copy.deepcopy(ref)
    report = ssl_fast.patch(mine)
    assert sorted(report.replaced) == sorted(_CVT_ATTN)
    assert not mine.stage1.blocks[0].attn.conv_proj_k.bn.training
    assert mine.stage1.blocks[0].attn.conv_proj_q.bn.training
    for _ in range(2):
        x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
        assert rel_error(mine(x), ref(x)) <= 1e-10
    buffers = dict(ref.named_buffers())
    for name, b in mine.named_buffers():
        assert rel_error(b, buffers[name]) <= 1e-12, name
    assert int(mine.stage0.blocks[0].attn.conv_proj_q.bn.num_batches_tracked) == 2


class _CvtAttn(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = cvt.Attention(16, 16, 2, qkv_bias=True, stride_kv=2, **kw)

    def forward(self, x):
        return self.attn(x, 4, 4)


def test_cvt_linear_method_skipped():
    report = ssl_fast.patch(_CvtAttn(method="linear", with_cls_token=True))
    assert not report.replaced
    assert "UnboundLocalError" in _skips(report)["attn"], str(report)
    with pytest.raises(UnboundLocalError):  # what the official forward does with it
        _CvtAttn(method="linear", with_cls_token=True)(torch.randn(1, 17, 16))


def test_cvt_attention_other_kernel_and_no_cls():
    """kernel 5 / padding 2 (not the fused 3 x 3 stencil): replaced, the projections run as written."""
    check_patched_matches(lambda: _CvtAttn(kernel_size=5, padding_kv=2, padding_q=2, with_cls_token=False),
                          lambda: [torch.randn(2, 16, 16)], {"attn": ConvAttention})


# ----------------------------------------------------------------------------------------------
# float32 through the Triton kernels (the interpreter on the CPU): what a GPU runs
# ----------------------------------------------------------------------------------------------
def _cvt_tiny():
    return cvt.ConvolutionalVisionTransformer(num_classes=10, spec=_cvt_spec("dw_bn", (False, True), 0.1))


@pytest.mark.skipif("triton" not in available_backends("attention", "cpu")
                    or "triton" not in available_backends("conv_projection", "cpu"),
                    reason="the Triton kernels cannot take CPU tensors here (TRITON_INTERPRET is not set)")
@pytest.mark.parametrize("build, maps", [(lambda: _dino_vit(drop_path_rate=0.1), True), (_sam_encoder, False),
                                         (_cvt_tiny, False)], ids=["dino", "sam", "cvt"])
def test_float32_through_triton_kernels(build, maps):
    """Patched model on the Triton backend against the eager model, float32: train outputs and every
    gradient under the same random stream (gradients that are zero in exact arithmetic, such as a
    key bias, are rounding noise in both: against a floor of 1e-3 of the total gradient norm), eval
    outputs, DINO's maps."""
    torch.manual_seed(0)
    ref = build()
    _perturb(ref, 0)
    mine = ssl_fast.patch(copy.deepcopy(ref)).model
    x = torch.randn(2, 3, 32, 32)
    with ssl_fast.use_backend("triton"):
        outs = []
        for m in (ref, mine):
            m.train()
            torch.manual_seed(5)
            y = m(x)
            (y * y.cos()).sum().backward()
            outs.append(y.detach())
        assert rel_error(outs[1], outs[0]) <= 1e-5
        grads = {n: p.grad for n, p in ref.named_parameters()}
        floor = 1e-3 * sum(float(g.norm()) ** 2 for g in grads.values()) ** 0.5
        for name, p in mine.named_parameters():
            err = float((p.grad - grads[name]).norm()) / max(float(grads[name].norm()), floor)
            assert err <= 1e-5, f"grad of {name}: {err:.3g}"
        ref.eval(), mine.eval()
        with torch.no_grad():
            assert rel_error(mine(x), ref(x)) <= 1e-5
            if maps:
                assert rel_error(mine.get_last_selfattention(x), ref.get_last_selfattention(x)) <= 1e-5
