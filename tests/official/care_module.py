"""Re-statement of CARE's training module and the parts of its ResNet it uses, for the tests of ``ssl_fast.methods.CARE``.

Source: ChongjianGE/CARE at commit 3187afb0a2e56d40684bd5a83bf4eda145431e7b:

- ``models/care_module.py``, class ``CARE``: a student encoder (with predictors) and a teacher
  encoder (without), the teacher's parameters frozen and copied from the student by
  ``momentum_update(m=0)``; ``momentum_update`` (EMA of every non-``fc`` parameter by name order,
  then of ``fc1`` and ``fc2`` by zip, which pairs the projector part of the student's heads with the
  teacher's heads); ``get_param_momentum`` (``1 - (1 - m_0)(cos(pi k / K) + 1) / 2`` with the
  iteration counter ``current_train_iter``); ``forward``, which applies the EMA first (at the
  momentum of the current iteration), runs the student on both views and the teacher on the
  swapped views, and returns ``loss, con_loss, con2_loss, lambda_fea * fea_loss`` with
  ``lambda_fea = 100`` and ``fea_loss`` an ``nn.MSELoss`` sum over both views and both networks.
- ``models/resnet_care.py``: ``Normalize``; the ``ResNet`` constructor's ``MLP="care"`` branch
  (``trans``, a ``TransStack`` on ``layer3``, and the heads ``fc1`` for the C-stream and ``fc2`` for
  the T-stream: ``Linear, BN1d, ReLU, Linear`` (projector), then with ``predictor=True``
  ``Linear, BN1d, ReLU, Linear`` (predictor), then ``Normalize``); its init loop; ``forward``
  returning ``(x, x2, feat_2)``.

The official repository is a training project, not a package, so it cannot be installed; the
code is written from those files with their names, module order (``conv1 .. layer4, avgpool,
trans, fc1, fc2``, which ``momentum_update``'s zips rely on) and arithmetic kept. The transformer
stack is ``TransStack`` from :mod:`official.care_bottleneck_transformer` (``models/trans.py``).

Deviations, none of which changes a result:

- The trunk (``conv1, bn1, relu, maxpool, layer1..layer4``) is torchvision's
  ``torchvision.models.resnet.ResNet``, of which ``resnet_care.py``'s ``BasicBlock``,
  ``Bottleneck`` and ``_make_layer`` are copies; its ``fc`` is removed (the ``care`` heads replace it).
- The official sizes are ResNet-50's, written as constants: ``TransStack(dim=1024, fmap_size=14,
  dim_out=2048, proj_factor=4, heads=4, num_layers=5, dim_head=128)`` and heads on
  ``512 * block.expansion`` features. Here ``dim = 256 * block.expansion`` and ``dim_out = 512 *
  block.expansion`` (1024 and 2048 for ResNet-50) and the other stack sizes are arguments with the
  official values as defaults, so that a small ResNet can be tested; ``CARE`` takes the ResNet's
  ``block``/``layers`` and the heads' sizes (official: ``resnet50(low_dim=256, hidden_dim=4096)``)
  as arguments.
- Only ``MLP="care"`` and ``CLS=False`` are restated (the module never uses the others), and the
  norm choices ``bn="vanilla"`` and ``bn="torchsync"`` (the official default; ``SyncBatchNorm``
  outside a process group normalises like ``BatchNorm``). The unused imports (``ipdb``,
  ``Attention``, ``Cross_Attention``) are left out.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn import Module

from official.care_bottleneck_transformer import TransStack


class Normalize(nn.Module):
    def __init__(self, p=2):
        super(Normalize, self).__init__()
        self.p = p

    def forward(self, x):
        return F.normalize(x, p=self.p, dim=1)


class ResNet(torchvision.models.resnet.ResNet):
    """``models/resnet_care.py``'s ``ResNet`` with ``MLP="care"`` on torchvision's trunk."""

    def __init__(self, block, layers, low_dim=128, width=1, MLP="care", CLS=False, hidden_dim=2048, groups=1,
                 bn="vanilla", predictor=False, zero_init_residual=False, replace_stride_with_dilation=None,
                 trans_fmap_size=14, trans_proj_factor=4, trans_heads=4, trans_num_layers=5, trans_dim_head=128):
        if bn == "vanilla":
            norm_layer, norm1d_layer = nn.BatchNorm2d, nn.BatchNorm1d
        elif bn == "torchsync":
            norm_layer, norm1d_layer = nn.SyncBatchNorm, nn.SyncBatchNorm
        else:
            raise ValueError("only bn='vanilla' and bn='torchsync' are restated, got {}".format(bn))
        if MLP != "care" or CLS:
            raise ValueError("only MLP='care' with CLS=False is restated")
        # the official: inplanes 64, base_width 64 * width, conv1 7x7/2 + maxpool, layer1..4, avgpool
        super(ResNet, self).__init__(block, layers, groups=groups, width_per_group=64 * width,
                                     replace_stride_with_dilation=replace_stride_with_dilation, norm_layer=norm_layer)
        del self.fc
        self._norm_layer = norm_layer
        self._norm1d_layer = norm1d_layer
        self.CLS = CLS
        self.predictor = predictor

        self.trans = TransStack(
            dim=256 * block.expansion,
            fmap_size=trans_fmap_size,
            dim_out=512 * block.expansion,
            proj_factor=trans_proj_factor,
            downsample=True,
            heads=trans_heads,
            num_layers=trans_num_layers,
            dim_head=trans_dim_head,
            rel_pos_emb=False,
            activation=nn.ReLU(),
        )
        if predictor:
            self.fc1 = nn.Sequential(
                nn.Linear(512 * block.expansion, hidden_dim),
                self._norm1d_layer(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, low_dim),
                nn.Linear(low_dim, hidden_dim),
                self._norm1d_layer(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, low_dim),
                Normalize(),
            )
            self.fc2 = nn.Sequential(
                nn.Linear(512 * block.expansion, hidden_dim),
                self._norm1d_layer(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, low_dim),
                nn.Linear(low_dim, hidden_dim),
                self._norm1d_layer(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, low_dim),
                Normalize(),
            )
        else:
            self.fc1 = nn.Sequential(
                nn.Linear(512 * block.expansion, hidden_dim),
                self._norm1d_layer(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, low_dim),
                Normalize(),
            )
            self.fc2 = nn.Sequential(
                nn.Linear(512 * block.expansion, hidden_dim),
                self._norm1d_layer(hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, low_dim),
                Normalize(),
            )

        # the official init loop runs over the whole model, the transformer stack included
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, torchvision.models.resnet.Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, torchvision.models.resnet.BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def forward(self, x, res5=False):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x_mid = self.layer3(x)
        x = self.layer4(x_mid)

        feat_1 = x
        if not res5:
            feat_2 = self.trans(x_mid)
            x2 = self.avgpool(feat_2)
            x2 = torch.flatten(x2, 1)

        x = self.avgpool(feat_1)
        x = torch.flatten(x, 1)

        if res5:
            return x.detach()

        x = self.fc1(x)
        x2 = self.fc2(x2)
        return x, x2, feat_2


class CARE(Module):
    """``models/care_module.py``'s ``CARE``; ``block``, ``layers`` and the sizes replace ``resnet50(...)``'s constants."""

    def __init__(self, param_momentum, total_iters, block=torchvision.models.resnet.Bottleneck, layers=(3, 4, 6, 3),
                 low_dim=256, hidden_dim=4096, bn="torchsync", **trans_kwargs):
        super(CARE, self).__init__()
        self.total_iters = total_iters
        self.param_momentum = param_momentum
        self.current_train_iter = 0

        self.student_encoder = ResNet(block, list(layers), low_dim=low_dim, width=1, hidden_dim=hidden_dim, MLP="care",
                                      CLS=False, bn=bn, predictor=True, **trans_kwargs)
        self.teacher_encoder = ResNet(block, list(layers), low_dim=low_dim, width=1, hidden_dim=hidden_dim, MLP="care",
                                      CLS=False, bn=bn, predictor=False, **trans_kwargs)

        self.avgpool = torch.nn.AdaptiveAvgPool2d((1, 1))
        self.lambda_fea = 100
        self.fea_loss = torch.nn.MSELoss()
        for p in self.teacher_encoder.parameters():
            p.requires_grad = False

        self.momentum_update(m=0)

    @torch.no_grad()
    def momentum_update(self, m):
        for p1, p2 in zip(self.student_encoder.named_parameters(), self.teacher_encoder.named_parameters()):
            flag = "fc" in p1[0]
            if not flag:
                p2[1].data = m * p2[1].data + (1.0 - m) * p1[1].detach().data

        for p1, p2 in zip(self.student_encoder.fc1.parameters(), self.teacher_encoder.fc1.parameters()):
            p2.data = m * p2.data + (1.0 - m) * p1.detach().data
        for p1, p2 in zip(self.student_encoder.fc2.parameters(), self.teacher_encoder.fc2.parameters()):
            p2.data = m * p2.data + (1.0 - m) * p1.detach().data

    def get_param_momentum(self):
        return 1.0 - (1.0 - self.param_momentum) * (
            (math.cos(math.pi * self.current_train_iter / self.total_iters) + 1) * 0.5
        )

    def forward(self, inps, update_param=True):
        if update_param:
            current_param_momentum = self.get_param_momentum()
            self.momentum_update(current_param_momentum)

        x1, x2 = inps[0], inps[1]
        q1, att_q1, fea_q1 = self.student_encoder(x1)
        q2, att_q2, fea_q2 = self.student_encoder(x2)

        with torch.no_grad():
            k1, att_k1, fea_k1 = self.teacher_encoder(x2)
            k2, att_k2, fea_k2 = self.teacher_encoder(x1)

        con_loss = (4 - 2 * ((q1 * k1).sum(dim=-1, keepdim=True) + (q2 * k2).sum(dim=-1, keepdim=True))).mean()
        con2_loss = (4 - 2 * ((att_q1 * att_k1).sum(dim=-1, keepdim=True)
                              + (att_q2 * att_k2).sum(dim=-1, keepdim=True))).mean()

        fea_loss = (self.fea_loss(q1, att_q1.detach()) + self.fea_loss(q2, att_q2.detach())
                    + self.fea_loss(k1, att_k1.detach()) + self.fea_loss(k2, att_k2.detach()))

        loss = con_loss + con2_loss + self.lambda_fea * fea_loss
        self.current_train_iter += 1
        if self.training:
            return loss, con_loss, con2_loss, self.lambda_fea * fea_loss
