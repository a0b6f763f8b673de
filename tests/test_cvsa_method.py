"""CVSA as a registered method: one step trains the conv heads, ``--init`` from a BYOL checkpoint
(and its refusals by name), deterministic Saliency Swap views from the cached saliency, the
alignment term through ssl_fast.ops against a float64 full-matrix computation, resume exactness,
and the trainer's localisation score where masks are known."""
import json

import pytest
import torch

import ssl_fast.nn.saliency_alignment as sa_module
from ssl_fast.data import ImageSet
from ssl_fast.data.cluttered_digits import load_cluttered_digits
from ssl_fast.data.saliency_swap import SaliencySwap
from ssl_fast.methods import Batch, MethodContext, create_method
from ssl_fast.methods.cvsa import CVSA_ONLY
from ssl_fast.train import TrainConfig
from ssl_fast.train.checkpoint import load_checkpoint
from ssl_fast.train.localisation import localisation_scores
from ssl_fast.train.trainer import Trainer

SMALL = dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32, conv_hidden_dim=16, conv_dim=8)
BYOL_SMALL = dict(proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)


@pytest.fixture(scope="module")
def cluttered():
    """48 training and 16 held-out cluttered digits at 32 px, with their masks."""
    tr, te = load_cluttered_digits(32)
    return (ImageSet(tr.images[:48], tr.labels[:48], tr.classes, "ctrain48", masks=tr.masks[:48]),
            ImageSet(te.images[:16], te.labels[:16], te.classes, "ctest16", masks=te.masks[:16]))


def _method(options=None, batch=8):
    ctx = MethodContext(arch="resnet_mini", epochs=2, steps_per_epoch=3, global_batch_size=batch, image_size=32,
                        options={**SMALL, **(options or {})})
    return create_method("cvsa", ctx)


def _cfg(out, method="cvsa", **kw):
    opts = dict(SMALL if method == "cvsa" else BYOL_SMALL)
    if method == "cvsa":
        opts["saliency"] = "masks"
    opts.update(kw.pop("options", {}))
    base = dict(method=method, data="cluttered-digits", arch="resnet_mini", epochs=2, batch_size=16, image_size=32,
                out=str(out), log_every=1, seed=0, linear_probe=False, options=opts)
    base.update(kw)
    return TrainConfig(**base)


def test_one_step_gives_gradients_to_the_conv_heads(cluttered):
    torch.manual_seed(0)
    m = _method(dict(saliency="masks"))
    tr, _ = cluttered
    m.attach_data(tr, tr.images, out=None)
    x = tr.images[:8]
    out = m.training_step(Batch(x, torch.Generator().manual_seed(1), slice(0, 8), 8), 0, 0)
    assert set(out) == {"loss", "loss_byol", "loss_align"}
    assert torch.allclose(out["loss"].detach(), out["loss_byol"] + m.config.align_weight * out["loss_align"])
    out["loss"].backward()
    for head in (m.student.encoder.conv_projector, m.student.conv_predictor, m.student.predictor,
                 m.student.encoder.projector, m.student.encoder.backbone):
        grads = [p.grad for p in head.parameters()]
        assert all(g is not None for g in grads)
        assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in m.teacher.parameters())
    # with align_weight 0 the conv heads get no gradient from the loss
    m0 = _method(dict(saliency="masks", align_weight=0.0))
    m0.attach_data(tr, tr.images, out=None)
    m0.training_step(Batch(x, torch.Generator().manual_seed(1), slice(0, 8), 8), 0, 0)["loss"].backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in m0.student.conv_predictor.parameters())


def test_views_are_deterministic_and_are_the_saliency_swap_of_the_cached_masks(cluttered):
    tr, _ = cluttered
    m = _method(dict(saliency="masks", swap_group=4))
    m.attach_data(tr, tr.images, out=None)
    idx = torch.tensor([5, 2, 40, 11, 7, 30, 3, 19])
    x = tr.images[idx]
    sal = m.saliency_of(x)
    assert torch.equal(sal, (tr.masks[idx].clamp(0, 1) * 255).round() / 255)
    a = m.views(x, sal, torch.Generator().manual_seed(3))
    b = m.views(x, sal, torch.Generator().manual_seed(3))
    c = m.views(x, sal, torch.Generator().manual_seed(4))
    for va, vb in zip(a, b):
        assert torch.equal(va.view, vb.view) and torch.equal(va.mask, vb.mask)
    assert not torch.equal(a[0].view, c[0].view)
    # the same swap, built independently from the method's options
    ref = SaliencySwap(32, 4, box_scale=m.config.box_scale, photometric=m.views.specs, group_size=4,
                       mean=m.views.mean, std=m.views.std)
    for va, vr in zip(a, ref(x, sal, torch.Generator().manual_seed(3))):
        assert torch.equal(va.view, vr.view) and torch.equal(va.mask, vr.mask)
    # two steps from the same generator seed: the same loss
    torch.manual_seed(0)
    l1 = m.training_step(Batch(x, torch.Generator().manual_seed(9), slice(0, 8), 8), 0, 0)["loss"]
    l2 = m.training_step(Batch(x, torch.Generator().manual_seed(9), slice(0, 8), 8), 0, 0)["loss"]
    assert torch.equal(l1, l2)
    with pytest.raises(ValueError, match="equal no image"):
        m.saliency_of(x + 0.01)


def test_alignment_goes_through_the_attention_op_and_equals_float64_full_matrix(cluttered, monkeypatch):
    tr, _ = cluttered
    m = _method(dict(saliency="masks", align_temperature=0.2))
    m.attach_data(tr, tr.images, out=None)
    calls, seen = [], []
    real_attention = sa_module.attention

    def spy(q, k, v, **kw):
        calls.append(q.shape)
        return real_attention(q, k, v, **kw)

    monkeypatch.setattr(sa_module, "attention", spy)
    real_forward = m.align_fn.forward

    def record(*args):
        seen.append([a.detach().double() for a in args])
        return real_forward(*args)

    monkeypatch.setattr(m.align_fn, "forward", record)
    out = m.training_step(Batch(tr.images[:8], torch.Generator().manual_seed(0), slice(0, 8), 8), 0, 0)
    assert len(calls) == 2 and calls[0] == (8, 1, 16, SMALL["conv_dim"])
    p1, p2, z1, z2, m1, m2 = seen[0]

    def direction(p, z, mq, mk):
        pn = torch.nn.functional.normalize(p.flatten(2), dim=1)  # [B, C, n]
        zn = torch.nn.functional.normalize(z.flatten(2), dim=1)
        a = torch.softmax(pn.transpose(1, 2) @ zn / 0.2, dim=-1)  # [B, n, n]
        mass = (a * mk.flatten(1)[:, None, :]).sum(-1)
        w = mq.flatten(1)
        return (w * -torch.log(mass + 1e-6)).sum() / w.sum()

    want = 0.5 * (direction(p1, z2, m1, m2) + direction(p2, z1, m2, m1))
    assert float(out["loss_align"]) == pytest.approx(float(want), rel=1e-5, abs=1e-6)


def test_init_from_a_byol_checkpoint_loads_and_refuses_mismatches_by_name(tmp_path, cluttered):
    Trainer(_cfg(tmp_path / "byol", method="byol", epochs=1), data=cluttered).fit()
    path = str(tmp_path / "byol" / "checkpoint.pth")
    byol_state = load_checkpoint(path)["method"]
    t = Trainer(_cfg(tmp_path / "cvsa", epochs=1, init=path), data=cluttered)
    own = t.method.state_dict()
    for k, v in byol_state.items():
        if k != "teacher.step":
            assert torch.equal(own[k], v), k
    assert int(own["teacher.step"]) == 0  # stage 2 runs its own momentum schedule
    fresh = create_method("cvsa", MethodContext(arch="resnet_mini", epochs=1, steps_per_epoch=1,
                                                global_batch_size=16, image_size=32, options=SMALL))
    assert any(k.startswith(CVSA_ONLY) for k in own)
    for k in own:
        if k.startswith(CVSA_ONLY):
            assert k not in byol_state
    # the target's conv projector starts equal to the online one
    for a, b in zip(t.method.student.encoder.conv_projector.state_dict().values(),
                    t.method.teacher.module.conv_projector.state_dict().values()):
        assert torch.equal(a, b)
    t.fit()
    # a projector of another width: refused, naming the tensor
    with pytest.raises(ValueError, match=r"other shapes, e\.g\. student\.encoder\.projector"):
        Trainer(_cfg(tmp_path / "bad", epochs=1, init=path, options=dict(proj_dim=8)), data=cluttered)
    # a BYOL run of another projection width: its method and arch quoted, the first differing tensor named
    Trainer(_cfg(tmp_path / "byol_r18", method="byol", epochs=1,
                 options=dict(proj_hidden_dim=32, proj_dim=8, pred_hidden_dim=32)), data=cluttered).fit()
    with pytest.raises(ValueError, match=r"'byol' run with --arch 'resnet_mini'.*student\.encoder\.projector"):
        Trainer(_cfg(tmp_path / "bad2", epochs=1, init=str(tmp_path / "byol_r18" / "checkpoint.pth")),
                data=cluttered)
    # tensors CVSA has no place for: named
    state = dict(byol_state, **{"student.extra.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"not part of CVSA, e\.g\. student\.extra\.weight"):
        fresh.load_init(state, "x.pth")
    # missing online tensors: named
    state = {k: v for k, v in byol_state.items() if not k.startswith("student.predictor.")}
    with pytest.raises(ValueError, match=r"missing, e\.g\. student\.predictor\."):
        fresh.load_init(state, "x.pth")
    # a method without the hook refuses --init with a clear message
    with pytest.raises(ValueError, match="cannot start from another run's checkpoint"):
        Trainer(_cfg(tmp_path / "byol2", method="byol", epochs=1, init=path), data=cluttered)
    with pytest.raises(ValueError, match="is not a checkpoint file"):
        Trainer(_cfg(tmp_path / "bad3", epochs=1, init=str(tmp_path / "none.pth")), data=cluttered)


def test_resume_equals_an_uninterrupted_run(tmp_path, cluttered):
    full = Trainer(_cfg(tmp_path / "full"), data=cluttered)
    full.fit()
    part = Trainer(_cfg(tmp_path / "part", stop_after_epochs=1), data=cluttered)
    part.fit()
    resumed = Trainer(_cfg(tmp_path / "part", resume="auto"), data=cluttered)
    assert resumed.start_epoch == 1
    resumed.fit()
    assert resumed.history["steps"] == full.history["steps"]
    a, b = resumed.method.state_dict(), full.method.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the saliency cache beside the run was written once and read back
    assert (tmp_path / "part" / "saliency-ctrain48-masks-32x32.pt").is_file()


def test_trainer_reports_localisation_when_masks_exist(tmp_path, cluttered, capsys):
    t = Trainer(_cfg(tmp_path / "cvsa", epochs=1), data=cluttered)
    summary = t.fit()
    # the cluttered-digits preset is a second stage: a start without --init says so
    assert "note: cvsa's preset for cluttered-digits is a second stage after 2 epochs of byol" in capsys.readouterr().out
    loc = summary["localisation"]
    assert set(loc) == {"iou", "pointing", "activation_iou", "activation_pointing"}
    assert all(0.0 <= v <= 1.0 for v in loc.values())
    _, te = cluttered
    for prefix, maps in (("", t.method.localisation_maps(te.images)), ("activation_", t.method.activation_maps(te.images))):
        want = localisation_scores(maps, te.masks)
        assert loc[prefix + "iou"] == pytest.approx(float(want["mean_iou"]))
        assert loc[prefix + "pointing"] == pytest.approx(float(want["pointing_accuracy"]))
    # the activation map is the channel norm of the online backbone's last stage, eval mode
    bb = t.method.student.encoder.backbone
    bb.eval()
    with torch.no_grad():
        want = bb.feature_maps(t.method.eval_view(te.images[:4]))[-1].norm(dim=1)
    torch.testing.assert_close(t.method.activation_maps(te.images[:4]), want)
    log = json.loads((tmp_path / "cvsa" / "log.json").read_text())
    assert log["summary"]["localisation"] == loc
    # each map is a distribution over the 4x4 positions of the last stage
    maps = t.method.localisation_maps(te.images[:4])
    assert maps.shape == (4, 4, 4) and torch.allclose(maps.sum((1, 2)), torch.ones(4), atol=1e-5)
    # without masks nothing is reported
    tr, te = cluttered
    plain = (ImageSet(tr.images, tr.labels, tr.classes, "ctrain48", masks=tr.masks),
             ImageSet(te.images, te.labels, te.classes, "ctest16"))
    assert Trainer(_cfg(tmp_path / "nomask", epochs=1), data=plain).fit()["localisation"] is None
    # BYOL has no maps of its own; its backbone's activation is scored the same way as CVSA's
    assert set(Trainer(_cfg(tmp_path / "byol", method="byol", epochs=1), data=cluttered).fit()["localisation"]) == {
        "activation_iou", "activation_pointing"}
