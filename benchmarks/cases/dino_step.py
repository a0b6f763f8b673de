"""A whole DINO training step against what a user would pick instead: timm's ViT with lightly's
head, loss and ``update_momentum``.

One step: the teacher on the global crops, the student on every crop, equal-size crops
concatenated into one backbone call per resolution (as the official DINO ``MultiCropWrapper``
does), the head on all features at once, the loss, backward, AdamW step and the momentum update.

Providers (the same timm model, the same head and the same crops, from one seed):

- ``timm+lightly`` (baseline): ``timm`` ``VisionTransformer`` (its default attention path, torch
  SDPA), ``lightly.models.modules.DINOProjectionHead``, ``lightly.loss.DINOLoss`` and
  ``lightly.models.utils.update_momentum``;
- ``ssl_fast``: that model after ``ssl_fast.patch`` (fused attention on the auto backend), the same
  lightly head, ``ssl_fast.nn.DINOLoss`` and ``ssl_fast.update_momentum`` (lightly's signature).

Before timing, one step of each from the same state is compared: the note gives the largest
difference of the losses and of the student parameters after the step.

Presets: ``digits`` (DINO's ViT digits preset ``digits/vit_nano_p8``: ViT-nano, 96 wide, 4 blocks,
3 heads, 8-pixel patches, 2 x 32 px + 4 x 16 px crops, head 256/64 with BatchNorm, K = 1024, batch
64) and ``vit_s16``
(ViT-S/16, 2 x 224 px + 8 x 96 px crops, head 2048/256, K = 65536; batch 64 on CUDA with bf16
autocast, 8 on the CPU in float32, 2 with ``--quick``).
"""
import contextlib

import torch

import ssl_fast
from benchmarks.harness import Case, Provider

PRESETS = {
    "digits": dict(model=dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3),
                   head=dict(hidden_dim=256, bottleneck_dim=64, batch_norm=True), out_dim=1024,
                   n_global=2, n_local=4, g_size=32, l_size=16, batch=64, quick_batch=16, cpu_batch=64),
    "vit_s16": dict(model=dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
                    head=dict(hidden_dim=2048, bottleneck_dim=256, batch_norm=False), out_dim=65536,
                    n_global=2, n_local=8, g_size=224, l_size=96, batch=64, quick_batch=2, cpu_batch=8),
}
MOMENTUM = 0.996


def _models(p, device):
    """(student backbone, student head): timm's ViT (class token, no classifier, any crop size)
    and lightly's DINO head, from seed 0."""
    import timm
    from lightly.models.modules import DINOProjectionHead

    torch.manual_seed(0)
    backbone = timm.models.vision_transformer.VisionTransformer(
        num_classes=0, dynamic_img_size=True, drop_path_rate=0.0, **p["model"])
    head = DINOProjectionHead(p["model"]["embed_dim"], output_dim=p["out_dim"], **p["head"])
    return backbone.to(device).train(), head.to(device).train()


def _crops(p, batch, device):
    gen = torch.Generator().manual_seed(1)
    crops = [torch.randn(batch, 3, p["g_size"], p["g_size"], generator=gen) for _ in range(p["n_global"])]
    crops += [torch.randn(batch, 3, p["l_size"], p["l_size"], generator=gen) for _ in range(p["n_local"])]
    return [c.to(device) for c in crops]


def _multicrop(backbone, head, crops):
    """Official DINO's MultiCropWrapper: one backbone call per run of equal-size crops."""
    feats, start = [], 0
    while start < len(crops):
        end = start
        while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
            end += 1
        feats.append(backbone(torch.cat(crops[start:end])))
        start = end
    return head(torch.cat(feats))


def _build(p, batch, device, amp, fused):
    """``(step, student parameters)``: one training step of the provider, from the shared seed."""
    from lightly.loss import DINOLoss as LightlyDINOLoss
    from lightly.models.utils import update_momentum as lightly_update_momentum

    nets = []
    for _ in range(2):  # student, teacher (lightly's weight-normed head cannot be deep-copied)
        backbone, head = _models(p, device)
        if fused:
            ssl_fast.patch(backbone)
        nets.append(torch.nn.ModuleDict(dict(backbone=backbone, head=head)))
    student, teacher = nets
    teacher.load_state_dict(student.state_dict())
    for t in teacher.parameters():
        t.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.04)
    crops = _crops(p, batch, device)
    ng, nc = p["n_global"], p["n_global"] + p["n_local"]
    cast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    if fused:
        loss_fn = ssl_fast.nn.DINOLoss(p["out_dim"], nc, 0.04, 0.04, 0, 10).to(device)
        update = ssl_fast.update_momentum
    else:
        loss_fn = LightlyDINOLoss(p["out_dim"], 0.04, 0.04, warmup_teacher_temp_epochs=0).to(device)
        update = lightly_update_momentum

    def step():
        with cast():
            with torch.no_grad():
                t_out = _multicrop(teacher["backbone"], teacher["head"], crops[:ng])
            s_out = _multicrop(student["backbone"], student["head"], crops)
            if fused:
                loss = loss_fn(s_out, t_out, 0)
            else:
                loss = loss_fn(list(t_out.chunk(ng)), list(s_out.chunk(nc)), epoch=0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update(student, teacher, MOMENTUM)
        return loss
    return step, list(student.parameters())


def _agreement(p, batch, device, amp) -> str:
    """One step of both providers from the same state: the largest loss and parameter differences."""
    ref_step, ref_params = _build(p, batch, device, amp, fused=False)
    fast_step, fast_params = _build(p, batch, device, amp, fused=True)
    dl = abs(ref_step().item() - fast_step().item())
    with torch.no_grad():
        dp = max((a - b).abs().max().item() for a, b in zip(ref_params, fast_params))
    return f"one step from the same state: |loss diff| {dl:.2g}, max |param diff| {dp:.2g}"


def cases(device, quick):
    amp = device.type == "cuda"
    out = []
    for name, p in PRESETS.items():
        batch = p["batch"] if device.type == "cuda" else (p["quick_batch"] if quick else p["cpu_batch"])
        shape = (f"{name} B{batch} {p['n_global']}x{p['g_size']}px+{p['n_local']}x{p['l_size']}px "
                 f"K={p['out_dim']} {'bf16 autocast' if amp else 'float32'}")
        case = Case("dino_step", shape, "fwd_bwd", "timm+lightly")

        def make(p=p, batch=batch, fused=False):
            return _build(p, batch, device, amp, fused)[0]

        def make_fused(p=p, batch=batch):
            note = _agreement(p, batch, device, amp)
            fn = make(p, batch, fused=True)
            fn.note = note
            return fn

        case.providers.append(Provider("timm+lightly", make))
        case.providers.append(Provider("ssl_fast", make_fused))
        out.append(case)
    return out
