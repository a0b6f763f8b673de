"""``ssl_fast.methods.CARE`` against the official CARE module (tests/official/care_module.py, a re-statement
of ChongjianGE/CARE ``models/care_module.py`` and ``models/resnet_care.py`` at 3187afb) with the
same weights on the same two views, in float64: the loss and its parts, every gradient, the
online network after an SGD step and the target after the EMA.

The backbone is a torchvision-layout ResNet with one BasicBlock per stage: ssl_fast's on our
side, torchvision's own ``ResNet`` inside the official re-statement, at 64 px (layer3 4x4, layer4
2x2: the stack attends over 16 tokens, pools, then attends over 4).

Parameter names, ours -> official: ``student.encoder.backbone.*`` -> ``student_encoder.*``,
``student.encoder.transformer.*`` -> ``student_encoder.trans.*`` (``qkv``/``pos_embed`` ->
``to_qkv``/``pos_emb``), ``student.encoder.c_projector.layers.i`` -> ``student_encoder.fc1.i`` and
``student.c_predictor.layers.i`` -> ``student_encoder.fc1.(4 + i)`` (the official ``fc1`` is projector,
predictor and ``Normalize`` in one ``nn.Sequential``); ``t_*`` likewise with ``fc2``; the target
``teacher.module.*`` -> ``teacher_encoder.*``.
"""
import copy
import math

import pytest
import torch
import torchvision

from official.care_module import CARE as OfficialCARE
from ssl_fast.methods import CARE, Batch, CAREConfig, MethodContext, create_method
from ssl_fast.methods.config import config_from_options
from ssl_fast.methods.two_view import two_views
from ssl_fast.models.resnet import BasicBlock, ResNet
from ssl_fast.nn import cosine_momentum

TOL = dict(rtol=1e-9, atol=1e-11)
IMAGE = 64
EPOCHS, STEPS = 2, 3
OPTIONS = dict(proj_hidden_dim=48, proj_dim=24, pred_hidden_dim=48, momentum_target=0.9, t_layers=2, t_heads=2,
               t_dim_head=16, t_proj_factor=4)


def _ours(seed: int = 0) -> CARE:
    ctx = MethodContext(arch="resnet18", epochs=EPOCHS, steps_per_epoch=STEPS, global_batch_size=6, image_size=IMAGE,
                        options=OPTIONS)
    c = config_from_options(CAREConfig, OPTIONS)
    torch.manual_seed(seed)
    backbone = ResNet(BasicBlock, (1, 1, 1, 1))  # torchvision's names, ImageNet stem
    return CARE(backbone, IMAGE, EPOCHS, STEPS, two_views(c, ctx), config=c).double()


def _official() -> OfficialCARE:
    # official: hidden_dim serves the projector and the predictor alike, so ours uses one width for both
    return OfficialCARE(0.9, EPOCHS * STEPS, block=torchvision.models.resnet.BasicBlock, layers=(1, 1, 1, 1),
                        low_dim=OPTIONS["proj_dim"], hidden_dim=OPTIONS["proj_hidden_dim"], bn="torchsync",
                        trans_fmap_size=IMAGE // 16, trans_proj_factor=4, trans_heads=2, trans_num_layers=2,
                        trans_dim_head=16).double()


_PREFIXES = [
    ("student.encoder.backbone.", "student_encoder.", 0), ("student.encoder.transformer.", "student_encoder.trans.", 0),
    ("student.encoder.c_projector.layers.", "student_encoder.fc1.", 0), ("student.c_predictor.layers.", "student_encoder.fc1.", 4),
    ("student.encoder.t_projector.layers.", "student_encoder.fc2.", 0), ("student.t_predictor.layers.", "student_encoder.fc2.", 4),
    ("teacher.module.backbone.", "teacher_encoder.", 0), ("teacher.module.transformer.", "teacher_encoder.trans.", 0),
    ("teacher.module.c_projector.layers.", "teacher_encoder.fc1.", 0),
    ("teacher.module.t_projector.layers.", "teacher_encoder.fc2.", 0),
]


def official_name(name: str) -> str:
    """ssl_fast's CARE state-dict key -> the official module's."""
    for ours, theirs, shift in _PREFIXES:
        if name.startswith(ours):
            rest = name[len(ours):]
            if shift:
                index, tail = rest.split(".", 1)
                rest = f"{int(index) + shift}.{tail}"
            return theirs + rest.replace(".qkv.", ".to_qkv.").replace(".pos_embed.", ".pos_emb.")
    raise AssertionError(f"unmapped key {name}")


def _pair(seed: int = 0):
    ours = _ours(seed)
    ref = _official()
    state = {official_name(k): v for k, v in ours.state_dict().items() if k != "teacher.step"}
    ref.load_state_dict(state, strict=True)  # every official key, nothing left over
    return ours, ref


class _RecordViews:
    """Wraps a method's ``ViewSet`` and keeps the views it made, so the official step sees the same ones."""

    def __init__(self, views):
        self.views, self.last = views, None

    def __call__(self, *args, **kwargs):
        out = self.views(*args, **kwargs)
        self.last = [v.detach().clone() for v in out]
        return out

    def __getattr__(self, name):
        return getattr(self.views, name)


def _batch(seed: int, b: int = 6, size: int = IMAGE) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(b, 3, size, size, generator=g, dtype=torch.float64),
                 torch.Generator().manual_seed(seed + 100), slice(0, b), b)


def _sgd(params):
    # the official optimizer (exps/arxiv/care_exp.py): SGD, momentum 0.9, weight decay 1e-4 on every parameter
    return torch.optim.SGD(params, lr=0.2, momentum=0.9, weight_decay=1e-4)


def _compare(named, theirs: dict, what: str, grads: bool = False) -> None:
    seen = set()
    for name, t in named:
        key = official_name(name)
        seen.add(key)
        a, b = (t.grad, theirs[key].grad) if grads else (t, theirs[key])
        assert a is not None and b is not None, f"{what}: no gradient for {name}"
        torch.testing.assert_close(a, b, **TOL, msg=f"{what}: {name} ({key})")
    assert seen == set(theirs), f"{what}: not compared: {sorted(set(theirs) - seen)}"


def test_names_shapes_and_initial_target_match_the_official_module():
    ours, ref = _pair()
    mapped = {official_name(k): tuple(v.shape) for k, v in ours.state_dict().items() if k != "teacher.step"}
    assert mapped == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sorted(official_name(n) for n, _ in ours.named_parameters()) == sorted(n for n, _ in ref.named_parameters())
    # both targets start as copies of their online networks (the official: momentum_update(m=0))
    fresh = _official()
    student = dict(fresh.student_encoder.named_parameters())
    for n, t in fresh.teacher_encoder.named_parameters():  # the teacher's fc1/fc2 are the projector part
        assert torch.equal(t, student[n]), n
    for n, t in ours.teacher.module.named_parameters():
        assert torch.equal(t, dict(ours.student.encoder.named_parameters())[n]), n
    assert not any(p.requires_grad for p in ours.teacher.parameters())


def test_training_steps_equal_the_official_module():
    """Two steps (the second with a target that differs from the online network): loss and parts,
    every gradient, the online parameters and BN statistics after SGD, the target after the EMA."""
    ours, ref = _pair()
    ours.views = _RecordViews(ours.views)
    # the official optimizer covers the whole student encoder with weight decay; so do our param groups
    groups = ours.param_groups()
    assert len(groups) == 1 and groups[0]["apply_weight_decay"]
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in ours.student.parameters()]
    opt_ours, opt_ref = _sgd(groups[0]["params"]), _sgd(ref.student_encoder.parameters())
    ours.train(), ref.train()
    for step in range(2):
        out = ours.training_step(_batch(step), 0, step)
        x1, x2 = ours.views.last
        # the official forward would first apply the EMA with this step's momentum; here the EMA of
        # each step is applied explicitly after the optimizer step, where ssl_fast applies it
        loss, con_loss, con2_loss, fea = ref([x1, x2], update_param=False)
        for name, a, b in (("loss", out["loss"], loss), ("loss_c", out["loss_c"], con_loss),
                           ("loss_t", out["loss_t"], con2_loss), ("loss_sup", out["loss_sup"], fea)):
            torch.testing.assert_close(a, b, **TOL, msg=f"step {step}: {name}")
        assert out["loss_sup"].item() > 0 and out["loss_t"].item() > 0
        opt_ours.zero_grad(), opt_ref.zero_grad()
        out["loss"].backward()
        loss.backward()
        online = {k: v for k, v in ref.named_parameters() if k.startswith("student_encoder.")}
        _compare(ours.student.named_parameters(prefix="student"), online, f"step {step} grad", grads=True)
        assert all(p.grad is None for p in ours.teacher.parameters())
        opt_ours.step(), opt_ref.step()

        # the official schedule at this iteration is ssl_fast's momentum for this step
        ref.current_train_iter = step
        m_official = ref.get_param_momentum()
        m = ours.after_optimizer_step(0, step)["momentum"]
        assert math.isclose(m, m_official, rel_tol=1e-12), (m, m_official)
        ref.momentum_update(m)
        _compare(ours.named_parameters(), dict(ref.named_parameters()), f"step {step} params")
        # online BN running statistics saw the same batches; the target's BN statistics differ by design
        # (ssl_fast copies the online ones, the official target keeps those of its own forwards)
        _compare(ours.student.named_buffers(prefix="student"),
                 {k: v for k, v in ref.named_buffers() if k.startswith("student_encoder.")}, f"step {step} buffers")
        for (n, t), s in zip(ours.teacher.module.named_buffers(), ours.student.encoder.buffers()):
            assert torch.equal(t, s), n


def test_momentum_schedule_equals_get_param_momentum():
    ours = _ours()
    ref = _official()
    assert ours.teacher.total_steps == ref.total_iters and ours.teacher.base_momentum == ref.param_momentum
    for k in range(ref.total_iters + 1):
        ref.current_train_iter = k
        assert math.isclose(ours.teacher.momentum, ref.get_param_momentum(), rel_tol=1e-12), k
        assert math.isclose(cosine_momentum(k, ref.total_iters, 0.9, 1.0), ref.get_param_momentum(), rel_tol=1e-12)
        ours.teacher.update()


def test_official_momentum_update_equals_ours_on_a_moved_student():
    """The official EMA (by name order, skipping 'fc', then fc1/fc2 zipped) and MomentumTeacher agree
    on every target parameter when the student differs from the target."""
    ours, ref = _pair()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ours.student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    ref.load_state_dict({official_name(k): v for k, v in ours.state_dict().items() if k != "teacher.step"})
    m = ours.teacher.update(ours.student.encoder)
    ref.momentum_update(m)
    _compare(ours.named_parameters(), dict(ref.named_parameters()), "after the EMA")


# ---- behaviour of ssl_fast's CARE on its own ---------------------------------------------------------
_SMALL = dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, t_layers=2, t_heads=2, t_dim_head=8)


def _small(arch: str = "resnet_mini") -> CARE:
    ctx = MethodContext(arch=arch, epochs=1, steps_per_epoch=2, global_batch_size=8, image_size=16, options=_SMALL)
    torch.manual_seed(0)
    return create_method("care", ctx)


def test_care_refuses_a_vit_naming_arch():
    ctx = MethodContext(arch="vit_nano_p4", epochs=1, steps_per_epoch=1, global_batch_size=8, image_size=16,
                        options=_SMALL)
    with pytest.raises(ValueError, match="--arch vit_nano_p4 has no feature maps"):
        create_method("care", ctx)


def test_t_stream_gets_gradients_from_the_first_step_and_none_from_the_supervision():
    care = _small()
    # the official model's init loop leaves every BN gamma of the stack at 1 (not the stack's own zero)
    for blk in care.student.encoder.transformer.net:
        assert torch.all(blk.net[-1].weight == 1)
    care.train()
    batch = Batch(torch.rand(8, 3, 16, 16), torch.Generator().manual_seed(0), slice(0, 8), 8)
    out = care.training_step(batch, 0, 0)
    out["loss"].backward()
    t_stream = {**dict(care.student.encoder.transformer.named_parameters(prefix="transformer")),
                **dict(care.student.encoder.t_projector.named_parameters(prefix="t_projector")),
                **dict(care.student.t_predictor.named_parameters(prefix="t_predictor"))}
    for name, p in t_stream.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"

    # the supervision pulls the C-stream towards the T-stream, never the other way
    care.zero_grad()
    x = torch.randn(8, 3, 16, 16)
    q_c1, q_t1 = care.student(x)
    q_c2, q_t2 = care.student(x.flip(-1))
    k = [torch.nn.functional.normalize(torch.randn_like(q_c1), dim=1) for _ in range(4)]
    sup = care.loss_fn(q_c1, q_c2, k[0], k[1], q_t1, q_t2, k[2], k[3])["loss_sup"]
    sup.backward()
    assert all(p.grad is None or not p.grad.any() for p in t_stream.values())
    assert care.student.c_predictor.layers[0].weight.grad.abs().sum() > 0


def test_features_use_only_the_cnn():
    care = _small()
    calls = []
    for name in ("transformer", "c_projector", "t_projector"):
        getattr(care.student.encoder, name).register_forward_hook(lambda *a, n=name: calls.append(n))
    for name in ("c_predictor", "t_predictor"):
        getattr(care.student, name).register_forward_hook(lambda *a, n=name: calls.append(n))
    care.teacher.module.register_forward_hook(lambda *a: calls.append("teacher"))
    care.train()
    images = torch.rand(5, 3, 16, 16)
    feats = care.features(images)
    assert calls == []
    backbone = copy.deepcopy(care.student.encoder.backbone).eval()
    with torch.no_grad():
        want = backbone(care.views.eval_view(images))
    assert feats.shape == (5, backbone.num_features)
    torch.testing.assert_close(feats, want)
    assert care.student.encoder.backbone.training, "features() restores the training mode"
    # changing the transformer stream leaves the features unchanged
    with torch.no_grad():
        for p in care.student.encoder.transformer.parameters():
            p.mul_(-3.0)
    torch.testing.assert_close(care.features(images), feats)
