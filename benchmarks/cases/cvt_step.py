"""Whole CvT-13 training step: forward, cross-entropy, backward and an AdamW step.

``ssl_fast.models``' ``cvt_13`` (1000-class head) in train mode, batch 64 at 224 x 224 on CUDA
under bf16 autocast (``--quick``: batch 4 at 64 x 64, float32, for the CPU). Each provider builds
the same model from the same seed; the timed function is one optimiser step on fixed inputs.

Providers:
  * ``eager`` (baseline): the official CvT computation, the projections as written (three
    ``nn.Conv2d`` + ``nn.BatchNorm2d`` + flatten per attention) and ``einsum``/softmax attention,
    on the same parameters (each ``ConvAttention`` re-classed to :class:`EagerConvAttention`);
  * ``ssl_fast[reference]``: the unchanged model with every op on its plain-PyTorch
    ``reference`` backend (``ssl_fast.use_backend("reference")``);
  * ``ssl_fast[auto]``: the unchanged model with the automatic choice (CUDA: the fused Triton
    conv projection and attention; CPU: the C++ conv projection and reference attention).
"""
import contextlib

import torch
import torch.nn.functional as F

import ssl_fast
from benchmarks.harness import Case, Provider
from ssl_fast.models import create_model
from ssl_fast.nn import ConvAttention


class EagerConvAttention(ConvAttention):
    """``ConvAttention`` computed as the official CvT code does (same parameters and buffers)."""

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Args: x ``[B, T, C]`` tokens (class token first when present), h, w: the token grid.
        Returns ``[B, T, dim_out]``."""
        cls = None
        if self.with_cls_token:
            cls, x = torch.split(x, [1, h * w], dim=1)
        fmap = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)
        q, k, v = (m(fmap) if m is not None else x for m in (self.conv_proj_q, self.conv_proj_k, self.conv_proj_v))
        if cls is not None:
            q, k, v = (torch.cat([cls, t], dim=1) for t in (q, k, v))
        B = q.shape[0]
        q, k, v = (p(t).reshape(B, t.shape[1], self.num_heads, -1).transpose(1, 2)
                   for p, t in ((self.proj_q, q), (self.proj_k, k), (self.proj_v, v)))
        attn = torch.softmax(torch.einsum("bhld,bhtd->bhlt", q, k) * self.scale, dim=-1)
        out = torch.einsum("bhlt,bhtd->bhld", self.attn_drop(attn), v)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, -1, self.dim)))


def _model(device: torch.device, eager: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("cvt_13", num_classes=1000).to(device).train()
    if eager:
        for m in model.modules():
            if type(m) is ConvAttention:
                m.__class__ = EagerConvAttention
    return model


def _make(device, B, img, amp, eager, backend):
    def make():
        model = _model(device, eager)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        gen = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randn(B, 3, img, img, generator=gen).to(device)
        y = torch.randint(0, 1000, (B,), generator=gen).to(device)

        def step():
            cast = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
            with ssl_fast.use_backend(backend):
                with cast:
                    loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            return loss
        return step
    return make


def cases(device, quick):
    B, img = (4, 64) if quick else (64, 224)
    amp = device.type == "cuda"
    case = Case("cvt_step", f"cvt_13 B{B} {img}px {'bf16 autocast' if amp else 'float32'} AdamW", "fwd_bwd", "eager")
    case.providers.append(Provider("eager", _make(device, B, img, amp, True, None)))
    case.providers.append(Provider("ssl_fast[reference]", _make(device, B, img, amp, False, "reference")))
    case.providers.append(Provider("ssl_fast[auto]", _make(device, B, img, amp, False, None)))
    return [case]
