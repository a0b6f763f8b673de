"""Drop-in attention modules against the real modules they replace.

torch's ``nn.MultiheadAttention`` is the truth for :class:`ssl_fast.nn.MultiheadAttention`, and
timm's own classes for the rest: ``timm.layers.Attention`` (:class:`Attention`), Swin's
``WindowAttention`` (:class:`WindowAttention`), SAM-ViT's ``Attention`` (:class:`RelPosAttention`)
and ``timm.layers.BottleneckAttn`` (:class:`BoTAttention` with relative position). Each is checked
in both of timm's code paths where it has two (``fused_attn``: SDPA or the eager softmax).
BoTNet's factorised absolute position logits (``AbsPosEmb``, used by CARE) have no installable
implementation: :class:`AbsPosBottleneckAttn` re-states them from the BoTNet authors' reference
gist (https://gist.github.com/aravindsrinivas/56359b79f0ce4449bcb04ab4b56a57a2), in the layout
of timm's ``BottleneckAttn``.
"""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
pytest.importorskip("timm")  # the real library; where it is not installed (the GPU image) these tests skip
from timm.layers import Attention as TimmAttention
from timm.layers.bottleneck_attn import BottleneckAttn
from timm.models.swin_transformer import WindowAttention as TimmWindowAttention
from timm.models.vision_transformer_sam import Attention as TimmSamAttention
from timm.models.vision_transformer_sam import get_rel_pos
from torch import nn

from helpers import backend_params, rel_error
from ssl_fast import use_backend
from ssl_fast.nn import Attention, BoTAttention, MultiheadAttention, RelPosAttention, WindowAttention


# ------------------------------------------------------------------------------------------
# the one re-statement: BoTNet's absolute position embedding (no installable implementation)
# ------------------------------------------------------------------------------------------
class AbsPosBottleneckAttn(nn.Module):
    """BoTNet MHSA with ``AbsPosEmb`` (reference gist): ``logits = s q k^T + q (height[y'] + width[x'])^T``
    (or ``s (q k^T + q emb^T)`` with ``scale_pos_embed``), eager math, timm's ``BottleneckAttn``
    qkv layout (1x1 conv, channels ``[q heads | k heads | v heads]``)."""

    def __init__(self, dim, dim_out, feat_size, num_heads=4, scale_pos_embed=False):
        super().__init__()
        self.h, self.w = feat_size
        self.num_heads = num_heads
        self.dh = dim_out // num_heads
        self.dim_out = dim_out
        self.scale = self.dh ** -0.5
        self.scale_pos_embed = scale_pos_embed
        self.qkv = nn.Conv2d(dim, 3 * dim_out, 1, bias=False)
        self.pos_embed = nn.Module()
        self.pos_embed.height = nn.Parameter(torch.randn(self.h, self.dh) * 0.3)
        self.pos_embed.width = nn.Parameter(torch.randn(self.w, self.dh) * 0.3)

    def forward(self, x):
        b = x.shape[0]
        q, k, v = torch.split(self.qkv(x), [self.dim_out] * 3, dim=1)
        q = q.reshape(b * self.num_heads, self.dh, -1).transpose(-1, -2)
        k = k.reshape(b * self.num_heads, self.dh, -1)
        v = v.reshape(b * self.num_heads, self.dh, -1).transpose(-1, -2)
        emb = (self.pos_embed.height[:, None] + self.pos_embed.width[None]).reshape(self.h * self.w, self.dh)
        pos = q @ emb.t()
        attn = (q @ k + pos) * self.scale if self.scale_pos_embed else (q @ k) * self.scale + pos
        out = attn.softmax(-1) @ v
        return out.transpose(-1, -2).reshape(b, self.dim_out, self.h, self.w)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def assert_close(a, b, tol=1e-5, what="output"):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = rel_error(a, b)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"


def check_grads(mine, ref, inputs_mine, inputs_ref, tol=1e-5):
    """Compare gradients of every parameter (by name) and of every input."""
    for name, p in ref.named_parameters():
        q = dict(mine.named_parameters())[name]
        assert p.grad is not None and q.grad is not None, f"no gradient for {name}"
        if p.grad.norm() < 1e-12:  # mathematically zero (e.g. k_norm.bias: softmax shift invariance)
            assert q.grad.norm() < 1e-12, f"grad {name}: {q.grad.norm():.3g} where torch has ~0"
            continue
        assert_close(q.grad, p.grad, tol, what=f"grad {name}")
    for i, (a, b) in enumerate(zip(inputs_mine, inputs_ref)):
        if b.requires_grad:
            assert_close(a.grad, b.grad, tol, what=f"grad input {i}")


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def both_ways(mine, ref):
    """state dicts load both ways, strictly; returns (mine, ref) holding ref's weights."""
    ref.load_state_dict(copy.deepcopy(mine.state_dict()))  # mine -> ref
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    for p in mine.parameters():
        torch.nn.init.normal_(p)  # make the second load observable
    mine.load_state_dict(sd)  # ref -> mine
    for k, v in ref.state_dict().items():
        assert torch.equal(mine.state_dict()[k], v), k
    assert set(mine.state_dict()) == set(ref.state_dict())
    return mine, ref


# ------------------------------------------------------------------------------------------
# MultiheadAttention
# ------------------------------------------------------------------------------------------
MHA_CONFIGS = [
    dict(),
    dict(batch_first=True),
    dict(bias=False),
    dict(add_bias_kv=True),
    dict(add_zero_attn=True, batch_first=True),
    dict(add_bias_kv=True, add_zero_attn=True),
    dict(kdim=6, vdim=10),
    dict(kdim=6, vdim=10, batch_first=True, bias=False),
]


def mha_pair(embed=8, heads=2, **kw):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(embed, heads, **kw).double()
    mine = MultiheadAttention(embed, heads, **kw).double()
    with torch.no_grad():  # non-trivial biases
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return both_ways(mine, ref)


def mha_inputs(n, l, s, kw, cross):
    e = 8
    q = torch.randn(n, l, e, dtype=torch.float64)
    if cross or "kdim" in kw:
        k = torch.randn(n, s, kw.get("kdim", e), dtype=torch.float64)
        v = torch.randn(n, s, kw.get("vdim", e), dtype=torch.float64)
    else:
        k = v = q
    if not kw.get("batch_first", False):
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    return q, k, v


def make_masks(kind, n, heads, l, s, gen):
    """(key_padding_mask, attn_mask) in torch's convention; every query keeps at least key 0."""
    kpm = am = None
    if kind in ("kpm_bool", "both_bool", "mixed"):
        kpm = torch.rand(n, s, generator=gen) < 0.4
        kpm[:, 0] = False
    if kind in ("am2_bool", "both_bool"):
        am = torch.rand(l, s, generator=gen) < 0.4
        am[:, 0] = False
    if kind == "am3_bool":
        am = torch.rand(n * heads, l, s, generator=gen) < 0.4
        am[..., 0] = False
    if kind in ("am2_float", "mixed"):
        am = torch.randn(l, s, generator=gen, dtype=torch.float64)
    if kind == "am3_float":
        am = torch.randn(n * heads, l, s, generator=gen, dtype=torch.float64)
    if kind == "kpm_float":
        kpm = torch.randn(n, s, generator=gen, dtype=torch.float64)
    return kpm, am


MASK_KINDS = ["none", "kpm_bool", "am2_bool", "am3_bool", "both_bool", "am2_float", "am3_float",
              "kpm_float", "mixed"]


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@pytest.mark.parametrize("kw", MHA_CONFIGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_mha_matches_torch(kw, cross):
    mine, ref = mha_pair(**kw)
    gen = torch.Generator().manual_seed(1)
    n, l, s = 3, 5, (7 if cross else 5)
    for kind in MASK_KINDS:
        for need_weights, average in [(True, True), (True, False), (False, True)]:
            q, k, v = mha_inputs(n, l, s, kw, cross)
            kpm, am = make_masks(kind, n, 2, l, k.shape[0 if not kw.get("batch_first") else 1], gen)
            args_ref = [leaf(q)] + ([leaf(k), leaf(v)] if k is not q else [])
            args_mine = [leaf(q)] + ([leaf(k), leaf(v)] if k is not q else [])
            qkv_ref = args_ref if len(args_ref) == 3 else args_ref * 3
            qkv_mine = args_mine if len(args_mine) == 3 else args_mine * 3
            ref.zero_grad()
            mine.zero_grad()
            o_ref, w_ref = ref(*qkv_ref, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights,
                               average_attn_weights=average)
            o_mine, w_mine = mine(*qkv_mine, key_padding_mask=kpm, attn_mask=am,
                                  need_weights=need_weights, average_attn_weights=average)
            what = f"{kind} need_weights={need_weights} average={average}"
            assert_close(o_mine, o_ref, what="output " + what)
            if need_weights:
                assert_close(w_mine, w_ref, what="weights " + what)
                loss_ref = (o_ref * torch.cos(o_ref)).sum() + (w_ref ** 2).sum()
                loss_mine = (o_mine * torch.cos(o_mine)).sum() + (w_mine ** 2).sum()
            else:
                assert w_mine is None
                loss_ref, loss_mine = (o_ref * torch.cos(o_ref)).sum(), (o_mine * torch.cos(o_mine)).sum()
            loss_ref.backward()
            loss_mine.backward()
            check_grads(mine, ref, args_mine, args_ref)


@pytest.mark.parametrize("batch_first", [False, True])
def test_mha_unbatched(batch_first):
    mine, ref = mha_pair(batch_first=batch_first, add_bias_kv=True)
    torch.manual_seed(3)
    q = torch.randn(5, 8, dtype=torch.float64)
    k = torch.randn(6, 8, dtype=torch.float64)
    kpm = torch.tensor([False, True, False, False, True, False])
    am = torch.rand(2, 5, 6) < 0.3
    am[..., 0] = False
    for need_weights, average in [(True, True), (True, False), (False, True)]:
        o_ref, w_ref = ref(q, k, k, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights,
                           average_attn_weights=average)
        o_mine, w_mine = mine(q, k, k, key_padding_mask=kpm, attn_mask=am, need_weights=need_weights,
                              average_attn_weights=average)
        assert_close(o_mine, o_ref)
        if need_weights:
            assert_close(w_mine, w_ref, what="weights")
    probs = mine.attention_map(q, k, key_padding_mask=kpm, attn_mask=am, query_index=[0, 3])
    w_ref = ref(q, k, k, key_padding_mask=kpm, attn_mask=am, average_attn_weights=False)[1]
    assert_close(probs.double(), w_ref[:, [0, 3]], tol=1e-6, what="attention_map")


def test_mha_is_causal():
    mine, ref = mha_pair(batch_first=True)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64)
    for need_weights in (False, True):
        o_ref, _ = ref(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
        o_mine, _ = mine(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
        assert_close(o_mine, o_ref)
    # without a mask the causal hint must change the answer: compare to the unmasked output
    assert rel_error(o_mine, mine(x, x, x, need_weights=False)[0]) > 1e-3
    with pytest.raises(ValueError, match="is_causal"):
        mine(x, x, x, is_causal=True)


def test_mha_dropout_weights_consistent():
    """In training with dropout, the returned weights are the ones the output was computed with."""
    torch.manual_seed(0)
    mine = MultiheadAttention(8, 2, dropout=0.5, batch_first=True).double().train()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    out, w = mine(x, x, x, average_attn_weights=False)
    assert (w == 0).any(), "dropout should zero some weights in training"
    v = F.linear(x, mine.in_proj_weight.chunk(3)[2], mine.in_proj_bias.chunk(3)[2])
    v = v.reshape(2, 5, 2, 4).transpose(1, 2)
    expect = mine.out_proj((w @ v).transpose(1, 2).reshape(2, 5, 8))
    assert_close(out, expect, tol=1e-10)
    mine.eval()
    out_eval, w_eval = mine(x, x, x)
    assert torch.allclose(w_eval.sum(-1), torch.ones(2, 5, dtype=torch.float64))


def test_mha_float32_and_bad_input():
    mine, ref = mha_pair(batch_first=True)
    mine, ref = mine.float(), ref.float()
    x = torch.randn(2, 4, 8)
    assert_close(mine(x, x, x)[0], ref(x, x, x)[0], tol=1e-5)
    kpm = torch.tensor([[False, False, True, True], [False, True, False, False]])
    causal = nn.Transformer.generate_square_subsequent_mask(4) == float("-inf")
    for kw in (dict(key_padding_mask=kpm), dict(attn_mask=causal), dict(attn_mask=causal, is_causal=True)):
        assert_close(mine(x, x, x, need_weights=False, **kw)[0], ref(x, x, x, need_weights=False, **kw)[0],
                     tol=1e-5, what=str(list(kw)))
    with pytest.raises(ValueError, match="attn_mask"):
        mine(x, x, x, attn_mask=torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        mine(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D .* or 3-D"):
        mine(x[0, 0], x[0, 0], x[0, 0])
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(10, 3)


def test_mha_state_dict_and_attributes():
    ref = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, add_bias_kv=True)
    mine = MultiheadAttention(8, 2, kdim=4, vdim=6, add_bias_kv=True)
    assert [n for n, _ in mine.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert mine.in_proj_weight is None and mine.q_proj_weight.shape == ref.q_proj_weight.shape
    assert type(mine.out_proj) is type(ref.out_proj)
    for attr in ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout",
                 "batch_first", "head_dim", "add_zero_attn"):
        assert getattr(mine, attr) == getattr(ref, attr), attr
    ref.load_state_dict(mine.state_dict())
    mine.load_state_dict(ref.state_dict())


def test_mha_merge_masks_matches_torch():
    mine, ref = mha_pair(batch_first=True)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    kpm = torch.zeros(3, 5, dtype=torch.float64).masked_fill_(torch.rand(3, 5) < 0.3, float("-inf"))
    am = torch.randn(5, 5, dtype=torch.float64)
    for a, k in [(None, None), (None, kpm), (am, None), (am, kpm), (am.expand(6, 5, 5), kpm)]:
        m1, t1 = ref.merge_masks(a, k, x)
        m2, t2 = mine.merge_masks(a, k, x)
        assert t1 == t2 and ((m1 is None and m2 is None) or torch.equal(m1, m2))


def test_mha_fully_masked_query_is_zero():
    mine, _ = mha_pair(batch_first=True)
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    am = torch.zeros(3, 3, dtype=torch.bool)
    am[1] = True  # query 1 may attend to nothing
    out, w = mine(x, x, x, attn_mask=am)
    assert torch.isfinite(out).all() and torch.equal(w[0, 1], torch.zeros(3, dtype=torch.float64))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_mha_nested_input_matches_padded():
    mine, _ = mha_pair(batch_first=True)
    mine.eval()
    seqs = [torch.randn(4, 8, dtype=torch.float64), torch.randn(2, 8, dtype=torch.float64)]
    nt = torch.nested.as_nested_tensor(seqs)
    out, w = mine(nt, nt, nt, need_weights=False)
    assert out.is_nested and w is None
    for s, o in zip(seqs, out.unbind()):
        assert_close(o, mine(s[None], s[None], s[None], need_weights=False)[0][0])




# ------------------------------------------------------------------------------------------
# the drop-ins keep timm's signatures and, under the same seed, build timm's weights
# ------------------------------------------------------------------------------------------
def _params(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("mine,ref", [(Attention, TimmAttention), (WindowAttention, TimmWindowAttention),
                                      (RelPosAttention, TimmSamAttention)], ids=lambda c: c.__name__)
def test_signatures_match_timm(mine, ref):
    assert _params(mine.__init__) == _params(ref.__init__)
    assert _params(mine.forward) == _params(ref.forward)


SAME_SEED = {
    "vit": (Attention, TimmAttention,
            dict(qkv_bias=True, qk_norm=True, scale_norm=True, gated=True, norm_layer=nn.LayerNorm)),
    "swin": (WindowAttention, TimmWindowAttention, dict(head_dim=5, window_size=(2, 3))),
    "sam": (RelPosAttention, TimmSamAttention, dict(use_rel_pos=True, input_size=(3, 4), qk_norm=True)),
}


@pytest.mark.parametrize("kind", list(SAME_SEED))
def test_same_seed_same_weights_as_timm(kind):
    """Children in timm's order, and under one seed the same parameters and buffers (so a model
    built with the drop-in, or re-initialised by timm's init_weights, draws what timm would)."""
    mine_cls, ref_cls, kw = SAME_SEED[kind]
    torch.manual_seed(0)
    ref = ref_cls(12, 3, **kw)
    torch.manual_seed(0)
    mine = mine_cls(12, 3, **kw)
    assert [n for n, _ in mine.named_children()] == [n for n, _ in ref.named_children()]
    sd_m, sd_r = mine.state_dict(), ref.state_dict()
    assert list(sd_m) == list(sd_r)
    for k in sd_r:
        assert torch.equal(sd_m[k], sd_r[k]), k
    assert [n for n, _ in mine.named_buffers()] == [n for n, _ in ref.named_buffers()]
    for (n, b_m), (_, b_r) in zip(mine.named_buffers(), ref.named_buffers()):
        assert torch.equal(b_m, b_r), n


def test_same_device_dtype_arguments_as_timm():
    m = Attention(16, 2, qk_norm=True, scale_norm=True, gated=True, norm_layer=nn.LayerNorm, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())
    m = RelPosAttention(16, 2, qk_norm=True, use_rel_pos=True, input_size=(2, 2), device="meta")
    assert all(p.is_meta for p in m.parameters())
    m = WindowAttention(8, 2, window_size=3, device="meta", dtype=torch.float16)
    assert all(p.is_meta and p.dtype == torch.float16 for p in m.parameters())


# ------------------------------------------------------------------------------------------
# Attention (timm.layers.Attention: ViT, DeiT, CLIP, DINOv2, ...)
# ------------------------------------------------------------------------------------------
ATTN_CONFIGS = [
    dict(),
    dict(qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm),
    dict(scale_norm=True, norm_layer=nn.LayerNorm, proj_bias=False),
    dict(gated=True, qkv_bias=True),
    dict(attn_head_dim=5, dim_out=12, gated=True),
]


def attention_masks(b, n, gen):
    """name -> forward kwargs: none, boolean (True = attend), additive float, causal."""
    keep = torch.rand(b, 1, n, n, generator=gen) < 0.6
    keep |= torch.eye(n, dtype=torch.bool)
    return {"none": {}, "bool": dict(attn_mask=keep),
            "float": dict(attn_mask=torch.randn(n, n, generator=gen, dtype=torch.float64)),
            "causal": dict(is_causal=True)}


@pytest.mark.parametrize("cfg", ATTN_CONFIGS, ids=lambda c: ",".join(f"{k}={getattr(v, '__name__', v)}"
                                                                     for k, v in c.items()) or "default")
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
def test_attention_matches_timm(cfg, fused):
    torch.manual_seed(0)
    ref, mine = TimmAttention(16, 2, **cfg).double(), Attention(16, 2, **cfg).double()
    with torch.no_grad():
        for p in mine.parameters():
            p.add_(0.2 * torch.randn_like(p))
    mine, ref = both_ways(mine, ref)
    ref.fused_attn = fused
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    for name, kw in attention_masks(2, 6, gen).items():
        ref.zero_grad(), mine.zero_grad()
        xa, xb = leaf(x), leaf(x)
        o_ref, o_mine = ref(xb, **kw), mine(xa, **kw)
        assert_close(o_mine, o_ref, tol=1e-10, what=f"output ({name})")
        w = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
        (o_ref * w).sum().backward()
        (o_mine * w).sum().backward()
        check_grads(mine, ref, [xa], [xb], tol=1e-10)
    probs = mine.attention_map(x, query_index=[0, 5], is_causal=True)
    assert probs.shape == (2, 2, 2, 6)
    assert torch.allclose(probs[:, :, 0, 0], torch.ones(2, 2)) and (probs[:, :, 1] > 0).all()


def test_attention_causal_needs_no_mask_and_changes_the_answer():
    torch.manual_seed(0)
    m = Attention(8, 2).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    causal = m(x, is_causal=True)
    assert rel_error(causal, m(x)) > 1e-3
    assert_close(causal, m(x, attn_mask=torch.ones(5, 5, dtype=torch.bool).tril()), tol=1e-12)
    with pytest.raises(ValueError, match="attn_mask and is_causal"):
        m(x, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        m(x[0])
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, 3)
    with pytest.raises(ValueError, match="norm_layer"):
        Attention(8, 2, qk_norm=True)


# ------------------------------------------------------------------------------------------
# WindowAttention (Swin)
# ------------------------------------------------------------------------------------------
def swin_mask(n_windows, wh, ww, gen):
    m = torch.zeros(n_windows, wh * ww, wh * ww, dtype=torch.float64)
    m.masked_fill_(torch.rand(m.shape, generator=gen) < 0.3, -100.0)
    return m


def visible_table(m):
    """Swin's tables start at std 0.02: make the bias matter."""
    with torch.no_grad():
        m.relative_position_bias_table.normal_(0.0, 0.5)
    return m


@pytest.mark.parametrize("window,head_dim,with_mask,fused", [
    ((3, 3), None, False, False), ((3, 3), None, True, False), ((2, 4), 5, True, False), (4, None, True, True)])
def test_window_attention_matches_timm(window, head_dim, with_mask, fused):
    torch.manual_seed(0)
    ref = TimmWindowAttention(12, 3, head_dim=head_dim, window_size=window).double()
    mine = visible_table(WindowAttention(12, 3, head_dim=head_dim, window_size=window).double())
    mine, ref = both_ways(mine, ref)
    ref.fused_attn = fused
    assert torch.equal(mine.relative_position_index, ref.relative_position_index)
    assert "relative_position_index" not in mine.state_dict()
    wh, ww = mine.window_size
    gen = torch.Generator().manual_seed(2)
    mask = swin_mask(2, wh, ww, gen) if with_mask else None
    x = torch.randn(4, wh * ww, 12, dtype=torch.float64)
    xa, xb = leaf(x), leaf(x)
    o_ref, o_mine = ref(xb, mask), mine(xa, mask)
    assert_close(o_mine, o_ref, tol=1e-10)
    (o_ref * o_ref.sin()).sum().backward()
    (o_mine * o_mine.sin()).sum().backward()
    check_grads(mine, ref, [xa], [xb], tol=1e-10)
    assert_close(mine._get_rel_pos_bias(), ref._get_rel_pos_bias(), tol=0)
    probs = mine.attention_map(x, mask, query_index=[1])
    assert probs.shape == (4, 3, 1, wh * ww)
    assert torch.allclose(probs.sum(-1), torch.ones(4, 3, 1))


@pytest.mark.filterwarnings("ignore:torch.searchsorted", "ignore:Using a non-tuple sequence")  # timm's resize
@pytest.mark.parametrize("old,new", [((4, 4), (2, 3)), ((3, 3), (5, 5)), ((2, 3), (3, 2))])
def test_window_attention_set_window_size_as_timm(old, new):
    torch.manual_seed(0)
    ref = visible_table(TimmWindowAttention(8, 2, window_size=old).double())
    torch.manual_seed(0)
    mine = visible_table(WindowAttention(8, 2, window_size=old).double())
    before = mine.relative_position_bias_table
    mine.relative_position_bias_table.requires_grad_(False)
    ref.relative_position_bias_table.requires_grad_(False)
    ref.set_window_size(new)
    mine.set_window_size(new)
    assert mine.window_size == ref.window_size == new and mine.window_area == ref.window_area
    assert mine.relative_position_bias_table is not before and not mine.relative_position_bias_table.requires_grad
    assert torch.equal(mine.relative_position_bias_table, ref.relative_position_bias_table)
    assert torch.equal(mine.relative_position_index, ref.relative_position_index)
    x = torch.randn(3, new[0] * new[1], 8, dtype=torch.float64)
    assert_close(mine(x), ref(x), tol=1e-10)
    mine.set_window_size(new)  # unchanged size: nothing happens
    assert mine.relative_position_bias_table.shape[0] == (2 * new[0] - 1) * (2 * new[1] - 1)
    mine.relative_position_index.zero_()
    mine.init_non_persistent_buffers()
    assert torch.equal(mine.relative_position_index, ref.relative_position_index)
    torch.manual_seed(5)
    ref.reset_parameters()
    torch.manual_seed(5)
    mine.reset_parameters()
    assert torch.equal(mine.relative_position_bias_table, ref.relative_position_bias_table)


def test_window_attention_bad_input():
    m = WindowAttention(8, 2, window_size=3)
    with pytest.raises(ValueError, match="tokens per window"):
        m(torch.randn(2, 8, 8))
    with pytest.raises(ValueError, match="window_size"):
        WindowAttention(8, 2, window_size=(3, 0))
    with pytest.raises(ValueError, match="window_size"):
        m.set_window_size((2, -1))


# ------------------------------------------------------------------------------------------
# RelPosAttention (SAM / ViTDet)
# ------------------------------------------------------------------------------------------
def visible_rel_pos(m):
    """SAM's tables start at zero: make the position terms matter."""
    with torch.no_grad():
        if m.use_rel_pos:
            m.rel_pos_h.normal_(0.0, 0.3)
            m.rel_pos_w.normal_(0.0, 0.3)
    return m


@pytest.mark.parametrize("cfg,grid,fused", [
    (dict(use_rel_pos=True, input_size=(4, 3)), (4, 3), True),
    (dict(use_rel_pos=True, input_size=(4, 3)), (4, 3), False),
    (dict(use_rel_pos=True, input_size=(4, 3), qk_norm=True), (4, 3), True),
    (dict(use_rel_pos=True, input_size=(5, 5)), (3, 4), True),   # tables interpolated on the fly
    (dict(use_rel_pos=False), (3, 3), True),
])
def test_rel_pos_attention_matches_timm(cfg, grid, fused):
    torch.manual_seed(0)
    ref = TimmSamAttention(16, 2, **cfg).double()
    mine = visible_rel_pos(RelPosAttention(16, 2, **cfg).double())
    mine, ref = both_ways(mine, ref)
    ref.fused_attn = fused
    if cfg.get("qk_norm"):
        with torch.no_grad():
            for p in ref.q_norm.parameters():
                p.add_(torch.randn_like(p) * 0.2)
        mine.load_state_dict(ref.state_dict())
    x = torch.randn(2, *grid, 16, dtype=torch.float64)
    xa, xb = leaf(x), leaf(x)
    o_ref, o_mine = ref(xb), mine(xa)
    assert_close(o_mine, o_ref, tol=1e-10)
    (o_ref * o_ref.cos()).sum().backward()
    (o_mine * o_mine.cos()).sum().backward()
    check_grads(mine, ref, [xa], [xb], tol=1e-10)
    probs = mine.attention_map(x, query_index=0)
    assert probs.shape == (2, 2, 1, grid[0] * grid[1])


def test_rel_pos_attention_loads_other_table_size():
    torch.manual_seed(0)
    src = visible_rel_pos(TimmSamAttention(16, 2, use_rel_pos=True, input_size=(6, 6)).double())
    mine = RelPosAttention(16, 2, use_rel_pos=True, input_size=(4, 4)).double()
    mine.load_state_dict(src.state_dict())
    assert mine.rel_pos_h.shape == (7, 8)
    expect = get_rel_pos(1, 4, src.rel_pos_h)  # timm's resized table, read through its indexing
    assert_close(mine.rel_pos_h[expect.shape[1] - 1 - torch.arange(4)], expect[0], tol=1e-12)
    # and the loaded module behaves as SAM does with the big table on a 4x4 grid
    x = torch.randn(1, 4, 4, 16, dtype=torch.float64)
    assert_close(mine(x), src(x), tol=1e-10)


def test_rel_pos_attention_rejects():
    with pytest.raises(ValueError, match="rope"):
        RelPosAttention(16, 2, rope=nn.Identity())
    with pytest.raises(ValueError, match="input_size"):
        RelPosAttention(16, 2, use_rel_pos=True)
    with pytest.raises(ValueError, match="divisible"):
        RelPosAttention(15, 2)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        RelPosAttention(16, 2)(torch.randn(2, 9, 16))


# ------------------------------------------------------------------------------------------
# BoTAttention
# ------------------------------------------------------------------------------------------
def check_bot(mine, ref, feat):
    mine, ref = both_ways(mine, ref)
    x = torch.randn(2, 6, *feat, dtype=torch.float64)
    xa, xb = leaf(x), leaf(x)
    o_ref, o_mine = ref(xb), mine(xa)
    assert o_mine.shape == (2, 8, *feat)
    assert_close(o_mine, o_ref, tol=1e-10)
    (o_ref * o_ref.cos()).sum().backward()
    (o_mine * o_mine.cos()).sum().backward()
    check_grads(mine, ref, [xa], [xb], tol=1e-10)
    probs = mine.attention_map(x, query_index=slice(0, 2))
    assert probs.shape == (2, 2, 2, feat[0] * feat[1])


@pytest.mark.parametrize("scale_pos_embed", [False, True])
@pytest.mark.parametrize("feat", [(3, 4), (4, 4)])
def test_bot_attention_rel_matches_timm(scale_pos_embed, feat):
    torch.manual_seed(0)
    ref = BottleneckAttn(6, 8, feat_size=feat, num_heads=2, scale_pos_embed=scale_pos_embed).double()
    mine = BoTAttention(6, 8, feat, num_heads=2, pos_embed="rel", scale_pos_embed=scale_pos_embed).double()
    with torch.no_grad():  # timm's tables start at std dim_head ** -0.5; make them larger
        mine.pos_embed.height_rel.normal_(0.0, 0.5)
        mine.pos_embed.width_rel.normal_(0.0, 0.5)
    check_bot(mine, ref, feat)


@pytest.mark.parametrize("scale_pos_embed", [False, True])
def test_bot_attention_abs_matches_restatement(scale_pos_embed):
    torch.manual_seed(0)
    ref = AbsPosBottleneckAttn(6, 8, (3, 4), num_heads=2, scale_pos_embed=scale_pos_embed).double()
    mine = BoTAttention(6, 8, (3, 4), num_heads=2, pos_embed="abs", scale_pos_embed=scale_pos_embed).double()
    check_bot(mine, ref, (3, 4))


def test_bot_attention_rejects():
    with pytest.raises(ValueError, match="pos_embed"):
        BoTAttention(4, 8, (3, 3), pos_embed="sin")
    with pytest.raises(ValueError, match="feat_size"):
        BoTAttention(4, 8)
    with pytest.raises(ValueError, match="feat_size"):
        BoTAttention(4, 8, (3, 3), num_heads=2)(torch.randn(1, 4, 3, 4))


# ------------------------------------------------------------------------------------------
# low precision: every module against the real one in the same dtype (DESIGN's 2x rule)
# ------------------------------------------------------------------------------------------
def _pair(mine, ref):
    """``mine`` loaded with ``ref``'s weights (after making ``ref``'s position terms visible)."""
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "rel" in name or "relative" in name:
                p.normal_(0.0, 0.5)
    mine.load_state_dict(ref.state_dict())
    return mine, ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_modules_low_precision(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    cases = [
        (*_pair(WindowAttention(12, 3, window_size=3), TimmWindowAttention(12, 3, window_size=3)),
         (torch.randn(4, 9, 12), swin_mask(2, 3, 3, torch.Generator().manual_seed(0)))),
        (*_pair(RelPosAttention(16, 2, use_rel_pos=True, input_size=(3, 4)),
                TimmSamAttention(16, 2, use_rel_pos=True, input_size=(3, 4))), (torch.randn(2, 3, 4, 16),)),
        (*_pair(Attention(16, 2, qkv_bias=True), TimmAttention(16, 2, qkv_bias=True)), (torch.randn(2, 7, 16),)),
        (*_pair(MultiheadAttention(8, 2, batch_first=True), nn.MultiheadAttention(8, 2, batch_first=True)),
         (x, x, x)),
    ]
    for mine, ref, args in cases:
        truth = copy.deepcopy(ref).double()(*[a.double() for a in args])
        low_ref = copy.deepcopy(ref).to(dtype)(*[a.to(dtype) for a in args])
        out = copy.deepcopy(mine).to(dtype)(*[a.to(dtype) for a in args])
        if isinstance(truth, tuple):
            truth, low_ref, out = truth[0], low_ref[0], out[0]
        assert out.dtype == dtype
        base = rel_error(low_ref, truth)
        err = rel_error(out, truth)
        assert err <= 2 * base + 4 * torch.finfo(dtype).eps, f"{type(mine).__name__}: {err:.3g} vs {base:.3g}"


# ------------------------------------------------------------------------------------------
# every backend available here (the Triton kernel runs through the interpreter on the CPU)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backend_params("attention"))
def test_modules_float32_each_backend(backend):
    """float32 modules, forced onto one backend, against the real modules in float64 (outputs
    and every gradient): the same module code runs the reference and the kernel."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(5)
    kpm = torch.tensor([[False, False, True, False, True], [False, False, False, False, False]])
    win_mask = swin_mask(2, 2, 3, gen)
    keep = torch.rand(2, 1, 5, 5, generator=gen) < 0.6
    keep |= torch.eye(5, dtype=torch.bool)
    cases = [
        (WindowAttention(12, 3, window_size=(2, 3)), TimmWindowAttention(12, 3, window_size=(2, 3)),
         lambda m, x: m(x, win_mask.to(x.dtype)), (4, 6, 12)),
        (RelPosAttention(16, 2, use_rel_pos=True, input_size=(3, 3)),
         TimmSamAttention(16, 2, use_rel_pos=True, input_size=(3, 3)), lambda m, x: m(x), (2, 2, 3, 16)),
        (BoTAttention(6, 8, (2, 3), num_heads=2), BottleneckAttn(6, 8, feat_size=(2, 3), num_heads=2),
         lambda m, x: m(x), (2, 6, 2, 3)),
        (Attention(16, 2, gated=True), TimmAttention(16, 2, gated=True), lambda m, x: m(x, attn_mask=keep), (2, 5, 16)),
        (Attention(16, 2), TimmAttention(16, 2), lambda m, x: m(x, is_causal=True), (2, 5, 16)),
        (MultiheadAttention(8, 2, batch_first=True), nn.MultiheadAttention(8, 2, batch_first=True),
         lambda m, x: m(x, x, x, key_padding_mask=kpm, need_weights=False)[0], (2, 5, 8)),
    ]
    with use_backend(backend):
        for mine, ref, run, shape in cases:
            mine, ref = _pair(mine, ref)
            ref = ref.double()
            x = torch.randn(shape)
            xa, xb = leaf(x), leaf(x.double())
            state = torch.random.get_rng_state()
            o_ref = run(ref, xb)
            torch.random.set_rng_state(state)
            o_mine = run(mine, xa)
            assert o_mine.dtype == torch.float32
            assert_close(o_mine, o_ref, tol=1e-5, what=f"{type(mine).__name__} output")
            w = torch.randn(o_ref.shape, dtype=torch.float64)
            (o_ref * w).sum().backward()
            (o_mine * w.float()).sum().backward()
            check_grads(mine, ref, [xa], [xb], tol=1e-5)
