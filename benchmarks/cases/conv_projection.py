"""CvT conv-projection benchmark: q/k/v depthwise 3x3 conv + BatchNorm2d (train mode) + flatten.

Shapes: CvT-13 stage 1 (C = 64, 56 x 56), stage 2 (192, 28 x 28), stage 3 (384, 14 x 14), B = 64
(``--quick``: B = 4, for the CPU). Input is CvT's token tensor ``[B, H*W, C]``; q uses stride 1,
k and v stride 2.

Providers:
  * ``eager`` (baseline): what CvT runs, token map -> three ``nn.Conv2d`` + ``nn.BatchNorm2d`` ->
    flatten to tokens;
  * ``compiled_eager``: ``torch.compile`` of the same function;
  * ``ssl_fast[<backend>]``: ``ssl_fast.ops.conv_qkv_projection`` with that backend.
Modes: ``fwd`` (forward, running statistics updated), ``bwd`` (backward only, graph retained),
``fwd_bwd``.
"""
import torch
from torch import nn

from benchmarks.harness import Case, Provider
from ssl_fast import ops
from ssl_fast.ops.conv_projection import _reasons

STAGES = {"cvt13_s1": (64, 56, 56), "cvt13_s2": (192, 28, 28), "cvt13_s3": (384, 14, 14)}


def _modules(C, device, dtype):
    torch.manual_seed(0)
    convs = nn.ModuleList(nn.Conv2d(C, C, 3, stride=s, padding=1, groups=C, bias=False) for s in (1, 2, 2))
    bns = nn.ModuleList(nn.BatchNorm2d(C) for _ in range(3))
    return convs.to(device, dtype).train(), bns.to(device, dtype).train()


def _eager(x, convs, bns, h, w):
    B, N, C = x.shape
    fmap = x.transpose(1, 2).reshape(B, C, h, w)
    return tuple(bn(conv(fmap)).flatten(2).transpose(1, 2) for conv, bn in zip(convs, bns))


_compiled = {}


def _compiled_eager(x, convs, bns, h, w):
    # one static-shape compilation per shape (a shared dynamic-shape graph trips Inductor here)
    key = (tuple(x.shape), x.dtype, x.device.type, x.requires_grad)
    fn = _compiled.get(key)
    if fn is None:
        fn = _compiled[key] = torch.compile(_eager, dynamic=False)
    return fn(x, convs, bns, h, w)


def _fused(backend):
    def fn(x, convs, bns, h, w):
        return ops.conv_qkv_projection(x, [c.weight for c in convs], list(bns), size=(h, w), stride_q=1,
                                       stride_kv=2, training=True, backend=backend)
    return fn


def _make(fn, B, C, H, W, device, dtype, mode):
    def make():
        convs, bns = _modules(C, device, dtype)
        x = torch.randn(B, H * W, C, device=device, dtype=dtype, requires_grad=mode != "fwd")
        params = [x] + list(convs.parameters()) + list(bns.parameters())
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    return fn(x, convs, bns, H, W)
            return run
        outs = fn(x, convs, bns, H, W)
        grads = [torch.randn_like(o) for o in outs]
        if mode == "bwd":
            return lambda: torch.autograd.grad(outs, params, grads, retain_graph=True)

        def run():
            o = fn(x, convs, bns, H, W)
            return torch.autograd.grad(o, params, grads)
        return run
    return make


def cases(device, quick):
    out = []
    B = 4 if quick else 64
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    for name, (C, H, W) in STAGES.items():
        for mode in ("fwd", "bwd", "fwd_bwd"):
            case = Case("conv_projection", f"{name} B{B} C{C} {H}x{W} {str(dtype)[6:]}", mode, "eager")
            case.providers.append(Provider("eager", _make(_eager, B, C, H, W, device, dtype, mode)))
            case.providers.append(Provider("compiled_eager", _make(_compiled_eager, B, C, H, W, device, dtype, mode)))
            for b in ("triton", "cpp", "reference"):
                why = _reasons(b, device)
                if b == "triton" and device.type == "cpu" and not why:
                    why = ["the Triton interpreter is a test tool, not timed"]
                case.providers.append(Provider(f"ssl_fast[{b}]", _make(_fused(b), B, C, H, W, device, dtype, mode),
                                               "; ".join(why) or None))
            out.append(case)
    return out
