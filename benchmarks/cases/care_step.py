"""A whole CARE training step on views already made: both streams of the online network and the
target on both views, loss, backward, SGD step and the target's EMA update.

Providers (same networks, same weights, same views, same optimizer):
- ``eager_lightly`` (baseline): CARE as a user builds it without ssl_fast, after the official code
  (ChongjianGE/CARE at a6b8032, ``models/resnet_care.py`` ``ResNet.forward`` and
  ``models/care_module.py`` ``CARE.forward``): the backbone (torchvision's ResNet, or ssl_fast's
  plain-PyTorch ``resnet_mini``; see ``byol_step``) runs to layer3, then layer4 -> avgpool ->
  C-stream head and, in parallel, the official transformer stack with its eager attention
  (``TransStack`` from ``tests/official/care_bottleneck_transformer.py``, a faithful re-statement
  of the official ``models/trans.py``: ``einsum`` logits and the ``[B, h, N, N]`` softmax
  materialised) -> avgpool -> T-stream head. Heads are lightly's ``ProjectionHead`` with CARE's
  biased layers; the loss is the official one written with lightly's ``NegativeCosineSimilarity``
  (on unit vectors ``4 + 2 (ncs(q1, k1) + ncs(q2, k2)) = 4 - 2 (<q1, k1> + <q2, k2>)``) and
  ``nn.MSELoss`` for the supervision (lambda 100); the target is a ``copy.deepcopy`` of backbone,
  stack and projectors, updated by ``lightly.models.utils.update_momentum`` after the optimizer
  step (the official code updates at the start of the next step; the same arithmetic) with every
  buffer copied;
- ``ssl_fast[auto]``: ``ssl_fast.methods.CARE``'s ``training_step`` (views replaced by the fixed
  ones), backward, the optimizer and ``after_optimizer_step``: ``BoTStack`` on the fused
  ``ssl_fast.ops.attention`` (absolute position logits folded into the keys) and
  ``MomentumTeacher.update`` (one fused ``ssl_fast.ops.ema_``).

Weights: the official stack is built and initialised as the official CARE model leaves it (its
ResNet's init loop: kaiming-normal convs, every BatchNorm weight 1, so the attention contributes
from the first step) and loaded into ssl_fast's with ``convert_official_state_dict``; backbone and
heads are copied from ssl_fast's method. The equality check, optimizer (SGD, weight decay on every
parameter as CARE's ``param_groups``) and memory figures are ``byol_step``'s.

Shapes: CPU the digits preset (resnet_mini at 16 px, batch 64, heads 512/128/512, a T-stream of 2
blocks x 4 heads x 16 on layer3's 4x4 map) and, without ``--quick``, ResNet-50 at 64 px, batch 8
(CARE's heads and T-stream: 5 blocks x 4 heads x 128 on a 4x4 layer3 map); CUDA ResNet-50 at
224 px, batch 64 (14x14 layer3 map), bf16 autocast (listed as unavailable without CUDA).
"""
import copy
import importlib.util
import os
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.cases.byol_step import (StepPair, StepSpec, autocast_for, eager_backbone, heads_detail,
                                        lightly_momentum_update, make_views, method_step, new_method, sgd, step_cases)
from ssl_fast.models.bot_stack import convert_official_state_dict

_OFFICIAL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         "tests", "official", "care_bottleneck_transformer.py")


def official_trans_stack():
    """``TransStack`` of tests/official/care_bottleneck_transformer.py (loaded by path: tests/ is no package)."""
    spec = importlib.util.spec_from_file_location("care_official_trans", _OFFICIAL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TransStack


class EagerCAREEncoder(nn.Module):
    """Backbone, stack and both projectors; ``x -> (z_c, z_t)`` as the official ``ResNet.forward``
    (layer4 and the stack both on layer3's output, each average-pooled, then its projector)."""

    def __init__(self, backbone: nn.Module, trans: nn.Module, c_projector: nn.Module, t_projector: nn.Module):
        super().__init__()
        self.backbone, self.trans = backbone, trans
        self.c_projector, self.t_projector = c_projector, t_projector
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x):
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x_mid = b.layer3(b.layer2(b.layer1(x)))
        c = torch.flatten(self.avgpool(b.layer4(x_mid)), 1)
        t = torch.flatten(self.avgpool(self.trans(x_mid)), 1)
        return self.c_projector(c), self.t_projector(t)


def care_head(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Module:
    """lightly's ``ProjectionHead`` in CARE's form: ``Linear -> BN -> ReLU -> Linear``, both Linear biased."""
    from lightly.models.modules.heads import ProjectionHead

    return ProjectionHead([(in_dim, hidden_dim, nn.BatchNorm1d(hidden_dim), nn.ReLU(), True),
                           (hidden_dim, out_dim, None, None, True)])


def build_care(spec: StepSpec, device: torch.device, amp: bool, dtype=torch.float32) -> StepPair:
    """ssl_fast's CARE and the eager official-style CARE with the same weights, on the same views
    (parameters and views in ``dtype``; ``amp``: forward under bf16 autocast)."""
    from lightly.loss import NegativeCosineSimilarity

    method = new_method("care", spec, device)
    c, enc = method.config, method.student.encoder
    stack = enc.transformer
    trans = official_trans_stack()(dim=stack.in_channels, fmap_size=stack.feat_size, dim_out=stack.dim_out,
                                   proj_factor=c.t_proj_factor, num_layers=c.t_layers, heads=c.t_heads,
                                   dim_head=c.t_dim_head, downsample=stack.downsample, activation=nn.ReLU())
    for m in trans.modules():  # the official CARE ResNet's init loop, which covers its stack
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    trans.to(device)
    stack.load_state_dict(convert_official_state_dict(trans.state_dict()))
    method.teacher.module.load_state_dict(enc.state_dict())

    width = enc.backbone.num_features
    heads = {name: care_head(*dims).to(device) for name, dims in (
        ("c_projector", (width, c.proj_hidden_dim, c.proj_dim)), ("t_projector", (width, c.proj_hidden_dim, c.proj_dim)),
        ("c_predictor", (c.proj_dim, c.pred_hidden_dim, c.proj_dim)),
        ("t_predictor", (c.proj_dim, c.pred_hidden_dim, c.proj_dim)))}
    heads["c_projector"].load_state_dict(enc.c_projector.state_dict())
    heads["t_projector"].load_state_dict(enc.t_projector.state_dict())
    heads["c_predictor"].load_state_dict(method.student.c_predictor.state_dict())
    heads["t_predictor"].load_state_dict(method.student.t_predictor.state_dict())
    encoder = EagerCAREEncoder(eager_backbone(spec.arch, enc.backbone), trans, heads["c_projector"],
                               heads["t_projector"])
    c_pred, t_pred = heads["c_predictor"], heads["t_predictor"]
    online = nn.ModuleDict({"encoder": encoder, "c_predictor": c_pred, "t_predictor": t_pred}).train()
    target = copy.deepcopy(encoder)
    for p in target.parameters():
        p.requires_grad_(False)
    for module in (method, online, target):
        module.to(dtype)

    v1, v2 = make_views(spec, device, dtype)
    fused = method_step(method, v1, v2, sgd(method.param_groups()), amp, device)

    opt = sgd([{"params": list(online.parameters()), "apply_weight_decay": True}])
    criterion, mse = NegativeCosineSimilarity(), nn.MSELoss()
    ema = lightly_momentum_update([(encoder, target)], c.momentum_target)
    cast = autocast_for(amp, device)
    sup_weight = c.sup_weight

    def student(x):
        z_c, z_t = encoder(x)
        return F.normalize(c_pred(z_c), dim=1), F.normalize(t_pred(z_t), dim=1)

    def eager():
        with cast():
            q1, att_q1 = student(v1)
            q2, att_q2 = student(v2)
            with torch.no_grad():
                k1, att_k1 = (F.normalize(z, dim=1) for z in target(v2))
                k2, att_k2 = (F.normalize(z, dim=1) for z in target(v1))
            con_loss = 4 + 2 * (criterion(q1, k1) + criterion(q2, k2))
            con2_loss = 4 + 2 * (criterion(att_q1, att_k1) + criterion(att_q2, att_k2))
            fea_loss = (mse(q1, att_q1.detach()) + mse(q2, att_q2.detach()) + mse(k1, att_k1) + mse(k2, att_k2))
            loss = con_loss + con2_loss + sup_weight * fea_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema()
        return loss.detach()
    return StepPair(fused, eager, method, online)


def _care_spec(label: str, arch: str, size: int, batch: int, preset: str, **kwargs) -> StepSpec:
    from ssl_fast.methods.care import CARE, CAREConfig
    from ssl_fast.methods.config import config_from_options

    options = dict(CARE.presets[preset].get("options", {}))
    c = config_from_options(CAREConfig, options)
    stride = 4 if arch == "resnet_mini" or arch.endswith("_cifar") else 16  # layer3's stride
    detail = (f"{heads_detail(c)} T {c.t_layers}x({c.t_heads}x{c.t_dim_head}) on "
              f"{size // stride}x{size // stride}")
    return StepSpec(label, arch, size, batch, options, detail=detail, **kwargs)


def specs(device: torch.device, quick: bool) -> List[StepSpec]:
    """The digits preset, ResNet-50 at 64 px (not with ``quick``), and the CUDA ResNet-50 case."""
    cpu = [_care_spec("digits preset", "resnet_mini", 16, 64, "digits")]
    if not quick:
        cpu.append(_care_spec("cpu-large", "resnet50", 64, 8, "default"))
    gpu = _care_spec("imagenet", "resnet50", 224, 64, "default", amp=True, cuda_only=True)
    return [gpu] if device.type == "cuda" else cpu + [gpu]


def cases(device, quick):
    return step_cases("care_step", build_care, specs(device, quick), device, fused_ops=("attention", "ema_"))
