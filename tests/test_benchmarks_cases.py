"""The whole-training-step benchmark cases (benchmarks/cases/byol_step.py, care_step.py) at tiny sizes.

Each case times ssl_fast's method step against an eager step built from lightly, torchvision and
the official CARE stack (tests/official/care_bottleneck_transformer.py) with the same weights; its
figures mean something only if the two steps compute the same thing. These tests run the cases'
own equality check, hold its steps to 1e-5 over three float32 steps and to 1e-10 in float64,
show that the check fails when the eager networks or the EMA differ slightly, and run one case
through the harness.
"""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.cases import byol_step, care_step  # noqa: E402
from benchmarks.harness import run_case  # noqa: E402

HEADS = dict(proj_hidden_dim=64, proj_dim=32, pred_hidden_dim=64)
BYOL_TINY = byol_step.StepSpec("tiny", "resnet_mini", 16, 8, HEADS)
CARE_TINY = byol_step.StepSpec("tiny", "resnet_mini", 16, 8, dict(HEADS, t_layers=2, t_heads=2, t_dim_head=16))


@pytest.mark.parametrize("build,spec", [(byol_step.build_byol, BYOL_TINY), (care_step.build_care, CARE_TINY)],
                         ids=["byol", "care"])
def test_fused_and_eager_steps_give_equal_losses(build, spec, device):
    losses, worst = byol_step.compare_losses(build(spec, device, False), steps=3)
    assert worst <= byol_step.RTOL, losses
    # the steps train: the loss moves between steps, so step 2 and 3 compare updated weights
    assert abs(losses[2][1] - losses[0][1]) > 1e-3 * abs(losses[0][1])
    assert "loss = eager's" in byol_step.check_equal(build(spec, device, False))


@pytest.mark.parametrize("build,spec", [(byol_step.build_byol, BYOL_TINY), (care_step.build_care, CARE_TINY)],
                         ids=["byol", "care"])
def test_fused_and_eager_steps_agree_in_float64(build, spec):
    losses, worst = byol_step.compare_losses(build(spec, torch.device("cpu"), False, torch.float64), steps=2)
    assert worst <= 1e-10, losses


def _perturb_(param: torch.Tensor, rel: float = 1e-2) -> None:
    """Add noise of ``rel`` times the parameter's spread (not a scaling: BatchNorm and cosines ignore those)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        param.add_(rel * param.std() * torch.randn(param.shape, generator=gen).to(param))


@pytest.mark.parametrize("what", ["byol_predictor", "byol_momentum", "care_attention", "care_momentum"])
def test_equality_check_fails_when_the_steps_differ(what):
    cpu = torch.device("cpu")
    build, spec = (byol_step.build_byol, BYOL_TINY) if what.startswith("byol") else (care_step.build_care, CARE_TINY)
    pair = build(spec, cpu, False)
    if what == "byol_predictor":
        _perturb_(pair.eager_net["predictor"].layers[3].weight)
    elif what == "care_attention":  # the T-stream's attention must count in the check
        _perturb_(pair.eager_net["encoder"].trans.net[1].net[3].to_qkv.weight)
    else:  # another target momentum: the EMA must count in the check (from the second step)
        pair.method.teacher.base_momentum = 0.0  # the target takes the student's weights
    with pytest.raises(RuntimeError, match="losses differ"):
        byol_step.check_equal(pair)


def test_cases_list_the_cuda_shape_as_unavailable_on_the_cpu():
    cpu = torch.device("cpu")
    for mod in (byol_step, care_step):
        cases = mod.cases(cpu, quick=True)
        assert [c.shape.split(":")[0] for c in cases] == ["digits preset", "imagenet"]
        gpu = cases[-1]
        assert "resnet50 224px B64" in gpu.shape and gpu.shape.endswith("bf16 autocast")
        assert all(p.unavailable and "CUDA" in p.unavailable for p in gpu.providers)
        assert [p.name for p in cases[0].providers] == ["eager_lightly", "ssl_fast[auto]"]
        assert all(p.unavailable is None for p in cases[0].providers)


def test_a_case_runs_through_the_harness():
    cpu = torch.device("cpu")
    (case,) = byol_step.step_cases("care_step", care_step.build_care, [CARE_TINY], cpu,
                                   fused_ops=("attention", "ema_"))
    results = run_case(case, cpu, quick=True)
    eager, fused = results
    assert eager.provider == "eager_lightly" and fused.provider == "ssl_fast[auto]"
    for r in results:
        assert r.p50 > 0 and math.isfinite(r.p50), r.note
        assert r.peak_mb > 0.1, r  # CPU peak from the profiler's allocation events
    assert "loss = eager's" in fused.note and "attention->" in fused.note and "ema_->" in fused.note


def test_cpu_peak_counts_tensor_memory():
    def step():
        a = torch.randn(256, 1024)           # 1 MiB
        b = torch.relu(a) * 2                # 2 more MiB at the peak (relu's result, then the product)
        del a
        return b.sum()

    assert byol_step.cpu_peak_mb(step) == pytest.approx(3.0, abs=0.01)
