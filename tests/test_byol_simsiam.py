"""BYOL and SimSiam against lightly 1.6's real components, on the same tensors and seeds.

- ``BYOLLoss`` against ``lightly.loss.NegativeCosineSimilarity`` (per direction
  ``2 - 2 cos = 2 + 2 * NegativeCosineSimilarity``, summed over the two directions), ``SimSiamLoss``
  against lightly's SimSiam example loss ``0.5 * (criterion(p0, z1) + criterion(p1, z0))``.
- ``byol_mlp``, ``simsiam_projector``/``simsiam_predictor`` against ``BYOLProjectionHead``/
  ``BYOLPredictionHead``/``SimSiamProjectionHead``/``SimSiamPredictionHead``.
- ``MomentumTeacher.update`` against ``lightly.models.utils.update_momentum``.
- One training step of ``ssl_fast.methods.BYOL`` and ``SimSiam`` against the same step written
  as lightly's examples write it (``examples/pytorch/byol.py``, ``simsiam.py``), with lightly's
  heads (ssl_fast's weights loaded), loss and ``update_momentum``.

Everything runs in float64 so that a difference in the arithmetic cannot hide under rounding.
"""
import copy
import math

import pytest
import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import (BYOLPredictionHead, BYOLProjectionHead, SimSiamPredictionHead,
                                    SimSiamProjectionHead)
from lightly.models.utils import deactivate_requires_grad
from lightly.models.utils import update_momentum as lightly_update_momentum
from torch import nn

from ssl_fast.methods import Batch, MethodContext, create_method
from ssl_fast.models.heads import MLPHead, byol_mlp, simsiam_predictor, simsiam_projector
from ssl_fast.nn import MomentumTeacher
from ssl_fast.nn.byol_loss import BYOLLoss
from ssl_fast.nn.simsiam_loss import SimSiamLoss

TOL = dict(rtol=1e-10, atol=1e-12)


def _inputs(b, d, seed, dtype=torch.float64, z_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    p1, p2 = (torch.randn(b, d, generator=g, dtype=dtype) for _ in range(2))
    z1, z2 = (z_scale * torch.randn(b, d, generator=g, dtype=dtype) for _ in range(2))
    return p1, p2, z1, z2


def _leaves(*ts):
    return [t.clone().requires_grad_() for t in ts]


# ---- losses ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,d,seed,z_scale", [(1, 3, 0, 1.0), (8, 16, 1, 1.0), (7, 33, 2, 1e3), (5, 4, 3, 1e-3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_byol_loss_equals_lightly_negative_cosine_similarity(b, d, seed, z_scale, dtype):
    x = _inputs(b, d, seed, dtype, z_scale)
    ours, theirs = _leaves(*x), _leaves(*x)
    loss = BYOLLoss()(*ours)
    crit = NegativeCosineSimilarity()
    p1, p2, z1, z2 = theirs
    ref = (2 + 2 * crit(p1, z2.detach())) + (2 + 2 * crit(p2, z1.detach()))
    tol = TOL if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, ref, **tol)
    w = torch.tensor(0.7, dtype=dtype)  # a non-unit upstream gradient
    (w * loss).backward()
    (w * ref).backward()
    for name, a, r in zip(("p1", "p2"), ours[:2], theirs[:2]):
        torch.testing.assert_close(a.grad, r.grad, **tol, msg=name)
    assert ours[2].grad is None and ours[3].grad is None, "the target projections must get no gradient"


def test_byol_loss_range_and_identical_views():
    p1, p2, _, _ = _inputs(6, 8, 4)
    # p against itself: cos = 1 -> 0; against its negation: cos = -1 -> 2 + 2 = 4 per direction
    torch.testing.assert_close(BYOLLoss()(p1, p2, p2, p1), torch.zeros((), dtype=torch.float64), **TOL)
    torch.testing.assert_close(BYOLLoss()(p1, p2, -p2, -p1), torch.full((), 8.0, dtype=torch.float64), **TOL)


@pytest.mark.parametrize("b,d,seed", [(1, 3, 0), (8, 16, 1), (9, 64, 2)])
def test_simsiam_loss_equals_lightly_example_loss(b, d, seed):
    x = _inputs(b, d, seed)
    ours, theirs = _leaves(*x), _leaves(*x)
    loss = SimSiamLoss()(*ours)
    criterion = NegativeCosineSimilarity()
    p0, p1, z0, z1 = theirs  # lightly's example names views 0 and 1
    ref = 0.5 * (criterion(p0, z1.detach()) + criterion(p1, z0.detach()))
    torch.testing.assert_close(loss, ref, **TOL)
    (1.3 * loss).backward()
    (1.3 * ref).backward()
    for name, a, r in zip(("p1", "p2"), ours[:2], theirs[:2]):
        torch.testing.assert_close(a.grad, r.grad, **TOL, msg=name)
    assert ours[2].grad is None and ours[3].grad is None, "stop-gradient on z"


# ---- heads -------------------------------------------------------------------------------------------
HEADS = [
    ("byol projector", byol_mlp, BYOLProjectionHead, (24, 40, 12)),
    ("byol predictor", byol_mlp, BYOLPredictionHead, (12, 40, 12)),
    ("simsiam projector", simsiam_projector, SimSiamProjectionHead, (24, 40, 32)),
    ("simsiam predictor", simsiam_predictor, SimSiamPredictionHead, (32, 8, 32)),
]


def _randomise_bn(module: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm1d):
            n = m.num_features
            if m.affine:
                m.weight.data = 0.5 + torch.rand(n, generator=g, dtype=m.weight.dtype)
                m.bias.data = 0.1 * torch.randn(n, generator=g, dtype=m.bias.dtype)
            m.running_mean.data = 0.1 * torch.randn(n, generator=g, dtype=m.running_mean.dtype)
            m.running_var.data = 0.5 + torch.rand(n, generator=g, dtype=m.running_var.dtype)


@pytest.mark.parametrize("what,ours_fn,lightly_cls,dims", HEADS, ids=[h[0] for h in HEADS])
def test_heads_equal_lightly_heads(what, ours_fn, lightly_cls, dims):
    torch.manual_seed(0)
    ref = lightly_cls(*dims).double()
    _randomise_bn(ref, 1)
    mine = ours_fn(*dims, dtype=torch.float64)
    assert isinstance(mine, MLPHead)
    # same names, shapes and kinds of state (parameters vs buffers), so lightly's state dict loads
    assert [(n, p.shape) for n, p in mine.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert [(n, b.shape) for n, b in mine.named_buffers()] == [(n, b.shape) for n, b in ref.named_buffers()]
    assert [type(m) for m in mine.layers] == [type(m) for m in ref.layers]
    mine.load_state_dict(ref.state_dict(), strict=True)

    x = torch.randn(6, dims[0], dtype=torch.float64)
    for train in (True, False):
        mine.train(train), ref.train(train)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = mine(xa), ref(xb)
        assert a.shape == (6, dims[2])
        torch.testing.assert_close(a, b, **TOL)
        w = torch.randn_like(a)
        (a * w).sum().backward()
        (b * w).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, **TOL)
        theirs = dict(ref.named_parameters())
        for name, p in mine.named_parameters():
            torch.testing.assert_close(p.grad, theirs[name].grad, **TOL, msg=f"{what}: {name}")
        mine.zero_grad(), ref.zero_grad()
    for (name, a), b in zip(mine.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, **TOL, msg=f"{what}: {name} after the train-mode forward")


def test_byol_head_defaults_equal_lightly_defaults():
    """The paper's sizes by default: BYOL 2048-4096-256 and 256-4096-256, SimSiam 2048-2048-2048 and 2048-512-2048."""
    pairs = [(byol_mlp(2048), BYOLProjectionHead()), (byol_mlp(256), BYOLPredictionHead()),
             (simsiam_projector(2048), SimSiamProjectionHead()), (simsiam_predictor(), SimSiamPredictionHead())]
    for mine, ref in pairs:
        assert {n: p.shape for n, p in mine.state_dict().items()} == {n: p.shape for n, p in ref.state_dict().items()}


# ---- momentum update ---------------------------------------------------------------------------------
def _student(seed: int, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), byol_mlp(7, 9, 3)).to(dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, TOL), (torch.float32, dict(rtol=1e-6, atol=1e-7))])
def test_momentum_teacher_update_equals_lightly_update_momentum(dtype, tol):
    student = _student(0, dtype)
    teacher = MomentumTeacher(student, base_momentum=0.9, final_momentum=1.0, total_steps=4)
    ema = copy.deepcopy(student)  # lightly's momentum copy
    deactivate_requires_grad(ema)
    g = torch.Generator().manual_seed(1)
    for k in range(6):  # past total_steps: the momentum is held at 1
        with torch.no_grad():  # the student moves (as an optimizer would) and its BN statistics change
            for p in student.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=dtype))
        student.train()(torch.randn(4, 5, generator=g, dtype=dtype))
        m = teacher.update()
        # the cosine schedule m_k = 1 - (1 - m_0)(cos(pi k / K) + 1) / 2, written out here
        want_m = 1.0 - (1.0 - 0.9) * (math.cos(math.pi * min(k, 4) / 4) + 1) / 2
        assert math.isclose(m, want_m, rel_tol=1e-12), (k, m, want_m)
        lightly_update_momentum(student, ema, m)
        for (name, a), b in zip(teacher.module.named_parameters(), ema.parameters()):
            torch.testing.assert_close(a, b, **tol, msg=f"step {k}: {name}")
        # lightly's update_momentum leaves buffers alone; MomentumTeacher copies them (BatchNorm
        # running statistics follow the student's)
        for (name, a), b in zip(teacher.module.named_buffers(), student.buffers()):
            assert torch.equal(a, b), f"step {k}: buffer {name} not copied"
    assert int(teacher.step) == 6


def test_update_momentum_function_equals_lightly():
    from ssl_fast.nn import update_momentum

    student, ema_a = _student(0), _student(1)
    ema_b = copy.deepcopy(ema_a)
    buffers_before = [b.clone() for b in ema_a.buffers()]
    update_momentum(student, ema_a, 0.75)
    lightly_update_momentum(student, ema_b, 0.75)
    for (name, a), b in zip(ema_a.named_parameters(), ema_b.parameters()):
        torch.testing.assert_close(a, b, **TOL, msg=name)
    assert all(torch.equal(a, b) for a, b in zip(ema_a.buffers(), buffers_before)), "buffers untouched, as lightly"


# ---- one whole training step -------------------------------------------------------------------------
class _RecordViews:
    """Wraps a method's ``ViewSet`` and keeps the views it made, so the lightly step sees the same ones."""

    def __init__(self, views):
        self.views, self.last = views, None

    def __call__(self, *args, **kwargs):
        out = self.views(*args, **kwargs)
        self.last = [v.detach().clone() for v in out]
        return out

    def __getattr__(self, name):
        return getattr(self.views, name)


def _batch(seed: int, b: int = 8, size: int = 16) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(b, 3, size, size, generator=g, dtype=torch.float64), torch.Generator().manual_seed(seed + 100),
                 slice(0, b), b)


def _sgd(params):
    return torch.optim.SGD(params, lr=0.3, momentum=0.9, weight_decay=1e-4)


def _assert_same(named_mine, theirs: dict, mapping, what: str, grads: bool = False):
    """``named_mine``: (name, tensor) pairs; ``mapping(name)`` gives the key in ``theirs``."""
    seen = set()
    for name, p in named_mine:
        key = mapping(name)
        seen.add(key)
        a, b = (p.grad, theirs[key].grad) if grads else (p, theirs[key])
        assert a is not None and b is not None, f"{what}: no gradient for {name}"
        torch.testing.assert_close(a, b, **TOL, msg=f"{what}: {name}")
    assert seen == set(theirs), f"{what}: not compared: {sorted(set(theirs) - seen)}"


class LightlyBYOL(nn.Module):
    """lightly's BYOL example (``examples/pytorch/byol.py``): backbone + ``BYOLProjectionHead`` +
    ``BYOLPredictionHead``, momentum copies of backbone and projection head."""

    def __init__(self, backbone, in_dim, hidden, proj_dim, pred_hidden):
        super().__init__()
        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(in_dim, hidden, proj_dim)
        self.prediction_head = BYOLPredictionHead(proj_dim, pred_hidden, proj_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x):
        y = self.backbone(x).flatten(start_dim=1)
        return self.prediction_head(self.projection_head(y))

    def forward_momentum(self, x):
        y = self.backbone_momentum(x).flatten(start_dim=1)
        return self.projection_head_momentum(y).detach()


def _byol_name(name: str) -> str:
    """ssl_fast's BYOL parameter name -> the lightly example's."""
    for ours, theirs in (("student.encoder.backbone.", "backbone."), ("student.encoder.projector.", "projection_head."),
                         ("student.predictor.", "prediction_head."), ("teacher.module.backbone.", "backbone_momentum."),
                         ("teacher.module.projector.", "projection_head_momentum.")):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise AssertionError(f"unmapped parameter {name}")


def test_byol_training_steps_equal_lightly_example():
    """Two steps (the second with a target that differs from the online network): loss, every
    gradient, the online parameters after SGD and the target after the EMA."""
    opts = dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=24, momentum_target=0.9)
    ctx = MethodContext(arch="resnet_mini", epochs=2, steps_per_epoch=3, global_batch_size=8, image_size=16,
                        options=opts)
    torch.manual_seed(0)
    method = create_method("byol", ctx).double()
    method.views = _RecordViews(method.views)
    torch.manual_seed(1)
    ref = LightlyBYOL(copy.deepcopy(method.student.encoder.backbone), 128, 32, 16, 24).double()
    # lightly's heads get ssl_fast's weights; the momentum copies the ssl_fast target's
    ref.projection_head.load_state_dict(method.student.encoder.projector.state_dict())
    ref.prediction_head.load_state_dict(method.student.predictor.state_dict())
    ref.backbone_momentum.load_state_dict(method.teacher.module.backbone.state_dict())
    ref.projection_head_momentum.load_state_dict(method.teacher.module.projector.state_dict())
    online = [n for n, _ in method.named_parameters() if n.startswith("student.")]
    assert [_byol_name(n) for n in online] == [n for n, p in ref.named_parameters() if p.requires_grad]

    opt_mine = _sgd(method.trainable().parameters())
    opt_ref = _sgd([p for p in ref.parameters() if p.requires_grad])
    criterion = NegativeCosineSimilarity()
    method.train(), ref.train()
    for step in range(2):
        loss = method.training_step(_batch(step), 0, step)["loss"]
        x0, x1 = method.views.last
        p0, z0 = ref(x0), ref.forward_momentum(x0)
        p1, z1 = ref(x1), ref.forward_momentum(x1)
        ref_loss = (2 + 2 * criterion(p0, z1)) + (2 + 2 * criterion(p1, z0))
        torch.testing.assert_close(loss, ref_loss, **TOL)
        opt_mine.zero_grad(), opt_ref.zero_grad()
        loss.backward()
        ref_loss.backward()
        theirs = dict(ref.named_parameters())
        _assert_same(method.student.named_parameters(prefix="student"),
                     {k: v for k, v in theirs.items() if v.requires_grad}, _byol_name, f"step {step} grad", grads=True)
        assert all(p.grad is None for p in method.teacher.parameters()), "the target must get no gradient"
        opt_mine.step(), opt_ref.step()
        m = method.after_optimizer_step(0, step)["momentum"]
        assert math.isclose(m, 1 - 0.1 * (math.cos(math.pi * step / 6) + 1) / 2, rel_tol=1e-12)
        # lightly's example updates at the start of each step with that step's momentum; here the
        # same update is applied where ssl_fast applies it, after the optimizer step, with its m
        lightly_update_momentum(ref.backbone, ref.backbone_momentum, m)
        lightly_update_momentum(ref.projection_head, ref.projection_head_momentum, m)
        _assert_same(method.named_parameters(), dict(ref.named_parameters()), _byol_name, f"step {step} params")
    # the BN running statistics of the online network saw the same batches
    _assert_same(method.student.named_buffers(prefix="student"),
                 {k: v for k, v in ref.named_buffers() if "momentum" not in k}, _byol_name, "online buffers")


class LightlySimSiam(nn.Module):
    """lightly's SimSiam example (``examples/pytorch/simsiam.py``)."""

    def __init__(self, backbone, in_dim, proj_hidden, proj_dim, pred_hidden):
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimSiamProjectionHead(in_dim, proj_hidden, proj_dim)
        self.prediction_head = SimSiamPredictionHead(proj_dim, pred_hidden, proj_dim)

    def forward(self, x):
        f = self.backbone(x).flatten(start_dim=1)
        z = self.projection_head(f)
        p = self.prediction_head(z)
        return z.detach(), p


def _simsiam_name(name: str) -> str:
    for ours, theirs in (("student.encoder.backbone.", "backbone."), ("student.encoder.projector.", "projection_head."),
                         ("student.predictor.", "prediction_head.")):
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise AssertionError(f"unmapped parameter {name}")


def test_simsiam_training_step_equals_lightly_example():
    opts = dict(proj_hidden_dim=32, proj_dim=24, pred_hidden_dim=8)
    ctx = MethodContext(arch="resnet_mini", epochs=1, steps_per_epoch=2, global_batch_size=8, image_size=16,
                        options=opts)
    torch.manual_seed(0)
    method = create_method("simsiam", ctx).double()
    method.views = _RecordViews(method.views)
    torch.manual_seed(1)
    ref = LightlySimSiam(copy.deepcopy(method.student.encoder.backbone), 128, 32, 24, 8).double()
    ref.projection_head.load_state_dict(method.student.encoder.projector.state_dict())
    ref.prediction_head.load_state_dict(method.student.predictor.state_dict())
    opt_mine, opt_ref = _sgd(method.trainable().parameters()), _sgd(ref.parameters())
    criterion = NegativeCosineSimilarity()
    method.train(), ref.train()
    for step in range(2):
        out = method.training_step(_batch(step), 0, step)
        x0, x1 = method.views.last
        z0, p0 = ref(x0)
        z1, p1 = ref(x1)
        ref_loss = 0.5 * (criterion(z0, p1) + criterion(z1, p0))
        torch.testing.assert_close(out["loss"], ref_loss, **TOL)
        # the collapse monitor: mean per-dimension std of the normalised projections (float32)
        torch.testing.assert_close(out["z_std"], nn.functional.normalize(z0.float(), dim=1).std(0).mean())
        opt_mine.zero_grad(), opt_ref.zero_grad()
        out["loss"].backward()
        ref_loss.backward()
        _assert_same(method.student.named_parameters(prefix="student"), dict(ref.named_parameters()), _simsiam_name,
                     f"step {step} grad", grads=True)
        opt_mine.step(), opt_ref.step()
        _assert_same(method.student.named_parameters(prefix="student"), dict(ref.named_parameters()), _simsiam_name,
                     f"step {step} params")
    _assert_same(method.student.named_buffers(prefix="student"), dict(ref.named_buffers()), _simsiam_name, "buffers")


# ---- bad input ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_fn", [BYOLLoss(), SimSiamLoss()], ids=["byol", "simsiam"])
def test_losses_refuse_mismatched_shapes_naming_the_argument(loss_fn):
    a, b = torch.randn(4, 8), torch.randn(4, 9)
    with pytest.raises(ValueError, match=r"p1 \(4, 8\) and z2 \(4, 9\)"):
        loss_fn(a, a, a, b)
    with pytest.raises(ValueError, match=r"p2 \(4, 8\) and z1 \(4, 9\)"):
        loss_fn(a, a, b, a)
    with pytest.raises(ValueError, match=r"p1 \(8,\) and z2 \(8,\).*\[B, D\]"):
        loss_fn(a[0], a, a, a[0])
    with pytest.raises(ValueError, match=r"p2 \(3, 8\) and z1 \(4, 8\)"):
        loss_fn(a, a[:3], a, a)


def test_heads_and_teacher_refuse_bad_sizes():
    with pytest.raises(ValueError, match=r"head widths must be >= 1, got 0 -> 16"):
        byol_mlp(0, 16, 8)
    with pytest.raises(ValueError, match="blocks"):
        MLPHead([])
    student = _student(0)
    teacher = MomentumTeacher(student)
    other = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), byol_mlp(8, 9, 3)).double()
    with pytest.raises(ValueError, match=r"student parameter '0.weight' has shape \(8, 5\)"):
        teacher.update(other)
    with pytest.raises(TypeError, match="student must be an nn.Module"):
        teacher.update("student")
