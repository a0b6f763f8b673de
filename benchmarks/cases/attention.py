"""Attention benchmark: vision shapes with and without relative-position terms.

Shapes (``--quick`` shrinks batches and grids for a CPU demo):

* Swin-T stage 1: 64 images x 64 windows of 7x7 = 49 tokens, 3 heads of 32, Swin table bias and
  the shifted-window mask (nW = 64);
* SAM ViT-B global layer: 64x64 grid (4096 tokens), 12 heads of 64, decomposed rel-pos, batch 1 and 4;
* SAM ViT-H global layer: 64x64 grid, 16 heads of 80, decomposed rel-pos, batch 1;
* ViT-S/16 and ViT-B/16 at 224: 197 tokens, 6 / 12 heads of 64, no bias, batch 64;
* DINO local crops (ViT-S/16 at 96): 37 tokens, 6 heads of 64, batch 512 (64 images x 8 crops);
* CvT-13 stage 1: 3136 queries, 784 keys (stride-2 key/value projection), 1 head of 64, batch 16;
* the main job's ViT-nano (digits preset: 96 wide, 3 heads of 32, 8-pixel patches on 32 px global
  crops: 17 tokens), batch 128 (64 images x 2 global crops).

Providers: ``eager`` (the baseline: timm's / SAM's default path, logits and bias materialised,
softmax in the input dtype), ``sdpa`` (torch SDPA with the materialised ``[B, H, Nq, Nk]`` bias as
``attn_mask``, built inside the timed call from the table / ``rel_h``, ``rel_w`` leaves, so the
position gradients flow through it, which is what timm's fused path does for Swin and SAM; for no
bias, SDPA's flash path), ``flex`` (compiled FlexAttention with a ``score_mod`` that reads the table / the SAM-style
projected terms, only on CUDA with a torch that has it), and each ssl_fast backend. Modes: forward
(no grad), backward (of one retained forward) and both; the harness records peak CUDA memory.
"""
import torch
import torch.nn.functional as F

from benchmarks.harness import MODES, Case, Provider
from ssl_fast import ops
from ssl_fast.ops.attention import DecomposedRelPos, RelPosTable, reasons
from ssl_fast.reference.attention import decomposed_index, window_relative_index


def _shapes(quick):
    """(name, spec) pairs; spec keys: B, H, Nq, Nk, D, kind and the kind's grid sizes."""
    if quick:
        return [
            ("swin_t_s1", dict(B=64, H=3, D=32, kind="table", window=(7, 7), n_windows=64)),
            ("sam_b_global", dict(B=1, H=12, D=64, kind="decomposed", q_size=(16, 16), k_size=(16, 16))),
            ("sam_h_global", dict(B=1, H=16, D=80, kind="decomposed", q_size=(16, 16), k_size=(16, 16))),
            ("vit_s16", dict(B=2, H=6, D=64, kind="none", Nq=197, Nk=197)),
            ("vit_b16", dict(B=2, H=12, D=64, kind="none", Nq=197, Nk=197)),
            ("dino_local", dict(B=8, H=6, D=64, kind="none", Nq=37, Nk=37)),
            ("cvt13_s1", dict(B=1, H=1, D=64, kind="none", Nq=3136, Nk=784)),
            ("vit_nano", dict(B=16, H=3, D=32, kind="none", Nq=17, Nk=17)),
        ]
    return [
        ("swin_t_s1", dict(B=64 * 64, H=3, D=32, kind="table", window=(7, 7), n_windows=64)),
        ("sam_b_global", dict(B=1, H=12, D=64, kind="decomposed", q_size=(64, 64), k_size=(64, 64))),
        ("sam_b_global", dict(B=4, H=12, D=64, kind="decomposed", q_size=(64, 64), k_size=(64, 64))),
        ("sam_h_global", dict(B=1, H=16, D=80, kind="decomposed", q_size=(64, 64), k_size=(64, 64))),
        ("vit_s16", dict(B=64, H=6, D=64, kind="none", Nq=197, Nk=197)),
        ("vit_b16", dict(B=64, H=12, D=64, kind="none", Nq=197, Nk=197)),
        ("dino_local", dict(B=512, H=6, D=64, kind="none", Nq=37, Nk=37)),
        ("cvt13_s1", dict(B=16, H=1, D=64, kind="none", Nq=3136, Nk=784)),
        ("vit_nano", dict(B=128, H=3, D=32, kind="none", Nq=17, Nk=17)),
    ]


def _token_counts(spec):
    if spec["kind"] == "table":
        n = spec["window"][0] * spec["window"][1]
        return n, n
    if spec["kind"] == "decomposed":
        (qh, qw), (kh, kw) = spec["q_size"], spec["k_size"]
        return qh * qw, kh * kw
    return spec["Nq"], spec["Nk"]


def _make_inputs(spec, device, dtype):
    """Fresh leaves: q, k, v (requires grad), and the position terms of the spec's kind."""
    g = torch.Generator().manual_seed(0)
    b, h, d = spec["B"], spec["H"], spec["D"]
    nq, nk = _token_counts(spec)

    def leaf(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device, dt).requires_grad_()

    x = dict(q=leaf(b, h, nq, d), k=leaf(b, h, nk, d), v=leaf(b, h, nk, d))
    if spec["kind"] == "table":
        wh, ww = spec["window"]
        x["table"] = leaf((2 * wh - 1) * (2 * ww - 1), h, scale=0.02, dt=torch.float32)
        n_w = spec["n_windows"]
        # a shifted-window mask: 0 inside a region, -100 across regions (as Swin builds it)
        region = torch.randint(0, 4, (n_w, nq), generator=g)
        x["window_mask"] = torch.where(region[:, :, None] == region[:, None, :], 0.0, -100.0).to(device)
    if spec["kind"] == "decomposed":
        (qh, qw), (kh, kw) = spec["q_size"], spec["k_size"]
        x["rel_h"] = leaf(2 * max(qh, kh) - 1, d, scale=0.02, dt=torch.float32)
        x["rel_w"] = leaf(2 * max(qw, kw) - 1, d, scale=0.02, dt=torch.float32)
    return x


def _leaves(x):
    return [t for t in x.values() if t.requires_grad]


# ---------------------------------------------------------------------------------------------
# materialised-bias peers
# ---------------------------------------------------------------------------------------------
def _swin_bias(x, spec):
    """timm Swin: ``[B, H, N, N]`` relative-position bias plus the window mask, materialised."""
    b, h = spec["B"], spec["H"]
    n = x["q"].shape[2]
    idx = window_relative_index(spec["window"], x["q"].device)
    bias = x["table"][idx.reshape(-1)].view(n, n, h).permute(2, 0, 1)           # [H, N, N]
    n_w = x["window_mask"].shape[0]
    full = bias.unsqueeze(0).unsqueeze(0) + x["window_mask"].view(1, n_w, 1, n, n)
    return full.expand(b // n_w, n_w, h, n, n).reshape(b, h, n, n).to(x["q"].dtype)


def _sam_terms(x, spec):
    """SAM's ``add_decomposed_rel_pos`` projections: ``[B, H, qh, qw, kh]`` and ``[.., kw]``."""
    (qh, qw), (kh, kw) = spec["q_size"], spec["k_size"]
    q = x["q"]
    r_h = x["rel_h"][decomposed_index(qh, kh, q.device)].to(q.dtype)
    r_w = x["rel_w"][decomposed_index(qw, kw, q.device)].to(q.dtype)
    grid = q.reshape(q.shape[0], q.shape[1], qh, qw, q.shape[3])
    return (torch.einsum("bhyxd,ykd->bhyxk", grid, r_h), torch.einsum("bhyxd,xkd->bhyxk", grid, r_w))


def _sam_bias(x, spec):
    (qh, qw), (kh, kw) = spec["q_size"], spec["k_size"]
    th, tw = _sam_terms(x, spec)
    b, h = x["q"].shape[:2]
    return (th[..., :, None] + tw[..., None, :]).reshape(b, h, qh * qw, kh * kw)


def _bias(x, spec):
    if spec["kind"] == "table":
        return _swin_bias(x, spec)
    if spec["kind"] == "decomposed":
        return _sam_bias(x, spec)
    return None


def _eager(x, spec):
    def fn():
        q, k, v = x["q"], x["k"], x["v"]
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        bias = _bias(x, spec)
        if bias is not None:
            attn = attn + bias
        return attn.softmax(dim=-1) @ v
    return fn


def _sdpa(x, spec):
    def fn():
        return F.scaled_dot_product_attention(x["q"], x["k"], x["v"], attn_mask=_bias(x, spec))
    return fn


def _flex_unavailable(device):
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except Exception as exc:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention ({type(exc).__name__})"
    if device.type != "cuda":
        return "compiled FlexAttention needs a CUDA device here"
    return None


_FLEX = {}


def _flex(x, spec):
    from torch.nn.attention.flex_attention import flex_attention

    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    flex = _FLEX["fn"]
    kind = spec["kind"]

    def fn():
        score_mod = None
        if kind == "table":
            wh, ww = spec["window"]
            table, wmask = x["table"], x["window_mask"]
            n_w = wmask.shape[0]

            def score_mod(score, b, h, qi, kj):
                r = (qi // ww - kj // ww + wh - 1) * (2 * ww - 1) + (qi % ww - kj % ww + ww - 1)
                return score + table[r, h] + wmask[b % n_w, qi, kj]
        elif kind == "decomposed":
            (qh, qw), (kh, kw) = spec["q_size"], spec["k_size"]
            th, tw = _sam_terms(x, spec)
            b_, h_ = x["q"].shape[:2]
            th = th.reshape(b_, h_, qh * qw, kh)
            tw = tw.reshape(b_, h_, qh * qw, kw)

            def score_mod(score, b, h, qi, kj):
                return score + th[b, h, qi, kj // kw] + tw[b, h, qi, kj % kw]
        return flex(x["q"], x["k"], x["v"], score_mod=score_mod)
    return fn


def _ssl_fast(backend):
    def build(x, spec):
        rel_pos = None
        if spec["kind"] == "table":
            rel_pos = RelPosTable(x["table"], spec["window"], x["window_mask"])
        elif spec["kind"] == "decomposed":
            rel_pos = DecomposedRelPos(x["rel_h"], x["rel_w"], spec["q_size"], spec["k_size"])

        def fn():
            return ops.attention(x["q"], x["k"], x["v"], rel_pos=rel_pos, backend=backend)
        return fn
    return build


def _timed(build, spec, device, dtype, mode, warm=False):
    """``make()`` for the harness: set-up (and one forward for ``bwd``) outside the timing."""
    def make():
        x = _make_inputs(spec, device, dtype)
        forward = build(x, spec)
        leaves = _leaves(x)
        if warm:  # compile outside the timing
            out = forward()
            torch.autograd.grad(out, leaves, torch.ones_like(out))
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    return forward()
            return run
        out = forward()
        dout = torch.randn_like(out)
        if mode == "bwd":
            return lambda: torch.autograd.grad(out, leaves, dout, retain_graph=True)
        return lambda: torch.autograd.grad(forward(), leaves, dout)
    return make


def _reason_for(backend, spec, device, dtype):
    nq, nk = _token_counts(spec)
    q = torch.empty(0, spec["H"], nq, spec["D"], dtype=dtype, device=device)
    return "; ".join(reasons(backend, q, q, q)) or None


def cases(device, quick):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    flex_why = _flex_unavailable(device)
    out = []
    for name, spec in _shapes(quick):
        nq, nk = _token_counts(spec)
        bias = {"table": "table+shift mask", "decomposed": "decomposed", "none": "no bias"}[spec["kind"]]
        shape = (f"{name} B={spec['B']} H={spec['H']} Nq={nq} Nk={nk} D={spec['D']} {bias} "
                 f"{str(dtype).replace('torch.', '')}")
        for mode in MODES:
            case = Case("attention", shape, mode, "eager")
            case.providers.append(Provider("eager", _timed(_eager, spec, device, dtype, mode)))
            case.providers.append(Provider("sdpa", _timed(_sdpa, spec, device, dtype, mode)))
            case.providers.append(Provider("flex", _timed(_flex, spec, device, dtype, mode, warm=True),
                                           flex_why))
            for b in ("triton", "cpp", "reference"):
                case.providers.append(Provider(f"ssl_fast[{b}]", _timed(_ssl_fast(b), spec, device, dtype, mode),
                                               _reason_for(b, spec, device, dtype)))
            out.append(case)
    return out
