"""A whole DINO training step: multi-crop forward of student and teacher, loss, backward, AdamW
step and the momentum-teacher update.

Providers:
- ``eager_official`` (baseline): the same ViT with the official DINO code's explicit attention
  (``softmax(q k^T * scale) v`` materialised), the official pair-by-pair loss with its center
  update, and the per-parameter EMA loop;
- ``sdpa_official``: as the baseline with torch's ``scaled_dot_product_attention`` (timm's path);
- ``ssl_fast[auto]``: ``ssl_fast.nn.Attention`` on the auto backend, ``ssl_fast.nn.DINOLoss`` and
  ``MomentumTeacher.update``.
CUDA: ViT-S/16, batch 64, 2 x 224 px + 8 x 96 px crops, K = 65536, bf16 autocast. CPU: a ViT-nano
with 8-pixel patches on 32/16 px crops and K = 1024 (a smoke run, not the issue's target shape).
"""
import contextlib
import copy

import torch
import torch.nn.functional as F

import ssl_fast
from benchmarks.cases.dino_loss import official_loop
from benchmarks.harness import Case, Provider
from ssl_fast.methods.dino import MultiCropWrapper
from ssl_fast.models import create_model
from ssl_fast.models.heads import DINOHead
from ssl_fast.nn import Attention, DINOLoss, MomentumTeacher

N_GLOBAL, N_LOCAL = 2, 8


class EagerAttention(Attention):
    """The official DINO ViT's attention: the probabilities are materialised."""

    def forward(self, x, attn_mask=None):
        b, n, _ = x.shape
        q, k, v = self._qkv(x)
        probs = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1))
        out = (probs @ v).transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(out)))


class SdpaAttention(Attention):
    """timm's fused path: torch's scaled_dot_product_attention."""

    def forward(self, x, attn_mask=None):
        b, n, _ = x.shape
        q, k, v = self._qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, n, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(out)))


def _student(arch, out_dim, attention_cls, device):
    torch.manual_seed(0)
    backbone = create_model(arch, drop_path_rate=0.1)
    if attention_cls is not None:
        for m in backbone.modules():
            if type(m) is Attention:
                m.__class__ = attention_cls
    head = DINOHead(backbone.embed_dim, out_dim)
    return MultiCropWrapper(backbone, head).to(device).train()


def _crops(batch, g_size, l_size, device):
    gen = torch.Generator().manual_seed(1)
    crops = [torch.randn(batch, 3, g_size, g_size, generator=gen) for _ in range(N_GLOBAL)]
    crops += [torch.randn(batch, 3, l_size, l_size, generator=gen) for _ in range(N_LOCAL)]
    return [c.to(device) for c in crops]


def _make(spec, device, fused, attention_cls=None):
    arch, batch, g_size, l_size, out_dim, amp = spec

    def make():
        student = _student(arch, out_dim, None if fused else attention_cls, device)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.04)
        crops = _crops(batch, g_size, l_size, device)
        cast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
        if fused:
            teacher = MomentumTeacher(student, 0.996, 1.0, total_steps=1000)
            loss_fn = DINOLoss(out_dim, N_GLOBAL + N_LOCAL, 0.04, 0.04, 0, 10).to(device)

            def step():
                with cast():
                    t_out = teacher(crops[:N_GLOBAL])
                    loss = loss_fn(student(crops), t_out, 0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                teacher.update()
                return loss
            return step

        teacher = copy.deepcopy(student)
        for p in teacher.parameters():
            p.requires_grad_(False)
        center = torch.zeros(1, out_dim, device=device)
        pairs = list(zip(student.parameters(), teacher.parameters()))

        def step():
            with cast():
                with torch.no_grad():
                    t_out = teacher(crops[:N_GLOBAL])
                s_out = student(crops)
                loss = official_loop(s_out.float(), t_out.float(), center, N_GLOBAL + N_LOCAL)
            with torch.no_grad():
                center.mul_(0.9).add_(t_out.float().mean(0, keepdim=True), alpha=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for ps, pt in pairs:
                    pt.data.mul_(0.996).add_((1 - 0.996) * ps.detach().data)
            return loss
        return step
    return make


def cases(device, quick):
    if device.type == "cuda":
        spec = ("vit_small", 64, 224, 96, 65536, True)
    else:
        spec = ("vit_nano_p8", 8 if quick else 16, 32, 16, 1024, False)
    arch, batch, g, l, k, amp = spec
    case = Case("dino_step", f"{arch} B{batch} {N_GLOBAL}x{g}px+{N_LOCAL}x{l}px K={k} "
                f"{'bf16 autocast' if amp else 'float32'}", "fwd_bwd", "eager_official")
    case.providers.append(Provider("eager_official", _make(spec, device, False, EagerAttention)))
    case.providers.append(Provider("sdpa_official", _make(spec, device, False, SdpaAttention)))
    case.providers.append(Provider("ssl_fast[auto]", _make(spec, device, True)))
    return [case]
