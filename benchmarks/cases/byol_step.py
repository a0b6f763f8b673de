"""A whole BYOL training step on views already made: forward of both views through the online
and target networks, loss, backward, SGD step and the target's EMA update.

Providers (same networks, same weights, same views, same optimizer):
- ``eager_lightly`` (baseline): the step a user writes without ssl_fast: the backbone
  (torchvision's ResNet where torchvision builds the architecture, with the small stem swapped in
  for ``*_cifar``; ssl_fast's plain-PyTorch ResNet for ``resnet_mini``, whose width 16 torchvision's
  BasicBlock refuses), lightly's ``BYOLProjectionHead``/``BYOLPredictionHead`` and
  ``NegativeCosineSimilarity``, a ``copy.deepcopy`` target, and ``lightly.models.utils.update_momentum``
  with ``lightly.utils.scheduler.cosine_schedule`` plus a copy of every buffer (what
  ``MomentumTeacher.update`` does too). The loss is written as ``4 + 2 (ncs(p1, z2) + ncs(p2, z1))``,
  BYOL's symmetrised ``2 - 2 cos`` (lightly's example scales it by -1/4; the value is kept equal
  to ssl_fast's so the two can be compared);
- ``ssl_fast[auto]``: ``ssl_fast.methods.BYOL``'s ``training_step`` (its views replaced by the fixed
  ones), backward, the optimizer, and ``after_optimizer_step`` (``MomentumTeacher.update``: one
  fused ``ssl_fast.ops.ema_`` over every parameter, buffers copied).

Before timing, the ssl_fast provider runs two steps of both from the same state (float32, TF32
off, also for a bf16 case) and requires the same loss: relative difference at most 1e-5 at the
first step and 1e-3 at the second (see :data:`RTOL_AFTER_STEP`); the outcome is printed and
written into the row's note, with the backends ``auto`` picked.
Optimizer on both sides: ``torch.optim.SGD`` (lr 0.05, momentum 0.9, weight decay 1e-4 except on
biases and norms, BYOL's ``param_groups``). Peak memory: CUDA's ``max_memory_allocated`` (by the
harness); on the CPU the peak of tensor memory allocated during one step above what was held
before it, from the profiler's allocation events (tracemalloc does not see torch's allocator).

Shapes: CPU the digits preset (resnet_mini at 16 px, batch 64, heads 512/128/512) and, without
``--quick``, resnet18_cifar at 32 px, batch 64 (BYOL's heads 4096/256/4096); CUDA ResNet-50 at
224 px, batch 64, heads 4096/256/4096, bf16 autocast (listed as unavailable without CUDA).
"""
import contextlib
import copy
import gc
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from benchmarks.harness import Case, Provider
from ssl_fast.methods import MethodContext, create_method
from ssl_fast.methods.base import Batch

#: length of the momentum schedules (long, so a timing run stays near the base momentum)
TOTAL_STEPS = 10_000
SGD_LR, SGD_MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 1e-4
#: the first step's loss (forward and loss from equal weights) must agree to RTOL; the second
#: step's (after backward, SGD and EMA) to RTOL_AFTER_STEP: one SGD step at lr 0.05 amplifies the
#: float32 rounding of the gradients (CARE, ResNet-50 at 64 px, batch 8: 2e-4 in float32, 1e-13
#: in float64); the tests hold both steps to RTOL at tiny sizes and to 1e-10 in float64
RTOL = 1e-5
RTOL_AFTER_STEP = 1e-3
CHECK_STEPS = 2


@dataclass(frozen=True)
class StepSpec:
    """One benchmarked shape: the method's arch, view side, batch, options and precision."""
    label: str
    arch: str
    image_size: int
    batch: int
    options: Dict = field(default_factory=dict)
    amp: bool = False
    cuda_only: bool = False
    detail: str = ""  # heads, T-stream: shown in the shape column

    def describe(self) -> str:
        return (f"{self.label}: {self.arch} {self.image_size}px B{self.batch} {self.detail + ' ' if self.detail else ''}"
                f"{'bf16 autocast' if self.amp else 'float32'}")


@dataclass
class StepPair:
    """The two step functions (each returns its detached loss), ssl_fast's method and the eager online networks."""
    fused: Callable[[], torch.Tensor]
    eager: Callable[[], torch.Tensor]
    method: nn.Module
    eager_net: nn.Module


class FixedViews:
    """Stands in for a method's ``ViewSet``: returns the same two views for every batch."""

    def __init__(self, v1: torch.Tensor, v2: torch.Tensor):
        self.v1, self.v2 = v1, v2

    def __call__(self, images, generator=None, rows=None, total=None) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.v1, self.v2


def make_views(spec: StepSpec, device: torch.device, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two normalised-image-like views ``[B, 3, S, S]`` (seeded)."""
    gen = torch.Generator().manual_seed(1)
    shape = (spec.batch, 3, spec.image_size, spec.image_size)
    return tuple(torch.randn(shape, generator=gen).to(device, dtype) for _ in range(2))


def autocast_for(amp: bool, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if amp:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def sgd(groups: List[Dict]) -> torch.optim.SGD:
    """SGD over groups in the methods' ``param_groups`` form (``apply_weight_decay`` per group)."""
    return torch.optim.SGD([{"params": g["params"], "weight_decay": WEIGHT_DECAY if g["apply_weight_decay"] else 0.0}
                            for g in groups if g["params"]], lr=SGD_LR, momentum=SGD_MOMENTUM)


def decay_groups(module: nn.Module) -> List[Dict]:
    """BYOL's rule (``SSLMethod.param_groups``) on an eager module: no decay on biases and 1-D parameters."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
    return [{"params": decay, "apply_weight_decay": True}, {"params": no_decay, "apply_weight_decay": False}]


def method_step(method, v1: torch.Tensor, v2: torch.Tensor, opt, amp: bool, device) -> Callable[[], torch.Tensor]:
    """ssl_fast's step: the method's ``training_step`` on fixed views, backward, SGD, ``after_optimizer_step``."""
    method.views = FixedViews(v1, v2)
    batch = Batch(images=v1, generator=torch.Generator(), rows=slice(0, v1.shape[0]), global_size=v1.shape[0])
    cast = autocast_for(amp, device)
    counter = [0]

    def step():
        with cast():
            out = method.training_step(batch, 0, counter[0])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        method.after_optimizer_step(0, counter[0])
        counter[0] += 1
        return out["loss"].detach()
    return step


def lightly_momentum_update(pairs: List[Tuple[nn.Module, nn.Module]], base: float) -> Callable[[], None]:
    """The eager EMA: lightly's ``update_momentum`` per (online, target) module with lightly's
    ``cosine_schedule`` (``max_steps = K + 1`` gives ``1 - (1 - base)(cos(pi k / K) + 1) / 2``,
    MomentumTeacher's schedule), then every buffer copied."""
    from lightly.models.utils import update_momentum
    from lightly.utils.scheduler import cosine_schedule

    counter = [0]

    @torch.no_grad()
    def update():
        m = cosine_schedule(counter[0], TOTAL_STEPS + 1, base, 1.0)
        counter[0] += 1
        for online, target in pairs:
            update_momentum(online, target, m)
            for bt, bs in zip(target.buffers(), online.buffers()):
                bt.copy_(bs)
    return update


def eager_backbone(arch: str, backbone: nn.Module) -> nn.Module:
    """The backbone as a user builds it without ssl_fast, loaded with ``backbone``'s weights:
    torchvision's ResNet-18/34/50 (``fc = Identity``; 3x3 stride-1 ``conv1`` and no max-pool for
    ``*_cifar``, the CIFAR recipe), else a copy of ``backbone`` (plain PyTorch; ``resnet_mini``)."""
    import torchvision

    name = arch[:-len("_cifar")] if arch.endswith("_cifar") else arch
    if name not in ("resnet18", "resnet34", "resnet50"):
        return copy.deepcopy(backbone)
    net = getattr(torchvision.models, name)()
    net.fc = nn.Identity()
    if getattr(backbone, "small_stem", False):
        net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.load_state_dict(backbone.state_dict())
    return net.to(next(backbone.parameters()).device)


def new_method(name: str, spec: StepSpec, device: torch.device):
    """``create_method(name)`` for ``spec`` (seeded), on ``device``, in train mode."""
    torch.manual_seed(0)
    ctx = MethodContext(arch=spec.arch, epochs=1, steps_per_epoch=TOTAL_STEPS, global_batch_size=spec.batch,
                        image_size=spec.image_size, options=dict(spec.options))
    return create_method(name, ctx).to(device).train()


def build_byol(spec: StepSpec, device: torch.device, amp: bool, dtype=torch.float32) -> StepPair:
    """ssl_fast's BYOL and the eager lightly BYOL with its weights, on the same views
    (parameters and views in ``dtype``; ``amp``: forward under bf16 autocast)."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead

    method = new_method("byol", spec, device)
    c, enc = method.config, method.student.encoder
    backbone = eager_backbone(spec.arch, enc.backbone)
    projector = BYOLProjectionHead(enc.backbone.num_features, c.proj_hidden_dim, c.proj_dim).to(device)
    predictor = BYOLPredictionHead(c.proj_dim, c.pred_hidden_dim, c.proj_dim).to(device)
    projector.load_state_dict(enc.projector.state_dict())
    predictor.load_state_dict(method.student.predictor.state_dict())
    online = nn.ModuleDict({"backbone": backbone, "projector": projector, "predictor": predictor}).train()
    t_backbone, t_projector = copy.deepcopy(backbone), copy.deepcopy(projector)
    for p in (*t_backbone.parameters(), *t_projector.parameters()):
        p.requires_grad_(False)
    for module in (method, online, t_backbone, t_projector):
        module.to(dtype)

    v1, v2 = make_views(spec, device, dtype)
    fused = method_step(method, v1, v2, sgd(method.param_groups()), amp, device)

    opt = sgd(decay_groups(online))
    criterion = NegativeCosineSimilarity()
    ema = lightly_momentum_update([(backbone, t_backbone), (projector, t_projector)], c.momentum_target)
    cast = autocast_for(amp, device)

    def eager():
        with cast():
            p1 = predictor(projector(backbone(v1).flatten(start_dim=1)))
            p2 = predictor(projector(backbone(v2).flatten(start_dim=1)))
            with torch.no_grad():
                z1 = t_projector(t_backbone(v1).flatten(start_dim=1))
                z2 = t_projector(t_backbone(v2).flatten(start_dim=1))
            loss = 4 + 2 * (criterion(p1, z2) + criterion(p2, z1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema()
        return loss.detach()
    return StepPair(fused, eager, method, online)


# ---- checks, memory and the harness's providers (shared with care_step) -------------------

@contextlib.contextmanager
def exact_float32():
    """TF32 off for cuDNN and matmuls (restored after)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def compare_losses(pair: StepPair, steps: int = CHECK_STEPS) -> Tuple[List[Tuple[float, float]], float]:
    """Run ``steps`` steps of each side from the same state; returns the (fused, eager) losses and
    the largest relative difference ``|fused - eager| / |eager|``."""
    with exact_float32():
        losses = [(float(pair.fused()), float(pair.eager())) for _ in range(steps)]
    worst = max(abs(a - b) / max(abs(b), 1e-30) for a, b in losses)
    return losses, worst


def check_equal(pair: StepPair, rtol: float = RTOL, rtol_after_step: float = RTOL_AFTER_STEP) -> str:
    """The same loss from both steps of a float32 ``pair`` over :data:`CHECK_STEPS` steps, or ``RuntimeError``.

    Args:
        pair: freshly built steps (equal weights).
        rtol: largest relative difference of the first step's losses.
        rtol_after_step: largest relative difference of the later steps' losses.

    Returns:
        One line saying so, with the relative difference of each step.
    """
    losses, _ = compare_losses(pair)
    diffs = [abs(a - b) / max(abs(b), 1e-30) for a, b in losses]
    shown = ", ".join(f"{a:.6f}/{b:.6f}" for a, b in losses)
    limits = [rtol] + [rtol_after_step] * (len(diffs) - 1)
    if not all(d <= tol for d, tol in zip(diffs, limits)):
        raise RuntimeError(f"fused and eager losses differ: {shown} (fused/eager per step), relative "
                           f"differences {', '.join(f'{d:.2e}' for d in diffs)} > {', '.join(f'{t:g}' for t in limits)}")
    steps = ", ".join(f"step {i + 1} {d:.1e} <= {t:g}" for i, (d, t) in enumerate(zip(diffs, limits)))
    return f"loss = eager's (float32, relative difference {steps}; {shown})"


def cpu_peak_mb(fn: Callable[[], object]) -> float:
    """Peak tensor memory (MiB) allocated by one call of ``fn`` above what was held before it.

    The CPU allocator's allocation and free events, recorded by the profiler over two calls; the
    first only makes every block freed in the second known to the profiler (blocks allocated
    before profiling starts are freed without an event), the running sum is read over the second.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
        with record_function("peak_window"):
            fn()
    events = prof.profiler.kineto_results.events()
    start = min(e.start_ns() for e in events if e.name() == "peak_window")
    held, base, peak = 0, None, 0
    for t, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        if base is None and t >= start:
            base = held
        held += nbytes
        if base is not None:
            peak = max(peak, held - base)
    return peak / 2**20


def auto_backends(device: torch.device, ops=("ema_",)) -> str:
    """Which backend ``auto`` picks for each op on ``device`` (judged on the op's sample input)."""
    from ssl_fast import _backend
    from ssl_fast.ops import _registry

    picks = []
    for op in ops:
        spec = _registry.get(op)
        picks.append(f"{op}->{_backend.resolve(op, device, lambda b: spec.sample_reasons(b, device), 'auto')}")
    return "auto: " + ", ".join(picks)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _prepare(step: Callable[[], torch.Tensor], device: torch.device, note: str) -> Callable[[], torch.Tensor]:
    step()  # warm-up (allocator, lazy initialisation) before the harness times it
    if device.type == "cpu":
        step.peak_mb = cpu_peak_mb(step)
    step.note = note
    return step


def step_cases(op: str, build: Callable[..., StepPair], specs: List[StepSpec], device: torch.device,
               fused_ops=("ema_",)) -> List[Case]:
    """One harness case per spec, providers ``eager_lightly`` (baseline) and ``ssl_fast[auto]``;
    a CUDA-only spec on another device is listed with both providers unavailable."""
    cases = []
    for spec in specs:
        case = Case(op, spec.describe(), "fwd_bwd", "eager_lightly")
        why = None
        if spec.cuda_only and not (device.type == "cuda" and torch.cuda.is_available()):
            why = "needs CUDA (run with --device cuda on a GPU)"

        def make_eager(spec=spec):
            pair = build(spec, device, spec.amp)
            step, pair = pair.eager, None
            _release(device)
            return _prepare(step, device, "")

        def make_fused(spec=spec):
            pair = build(spec, device, False)
            verdict = check_equal(pair)
            print(f"  {op} {spec.describe()}: {verdict}", file=sys.stderr, flush=True)
            if spec.amp:  # checked in float32; timed in bf16 on fresh networks
                pair = None
                _release(device)
                pair = build(spec, device, True)
            step, pair = pair.fused, None
            _release(device)
            return _prepare(step, device, f"{verdict}; {auto_backends(device, fused_ops)}")

        case.providers.append(Provider("eager_lightly", make_eager, why))
        case.providers.append(Provider("ssl_fast[auto]", make_fused, why))
        cases.append(case)
    return cases


def heads_detail(config) -> str:
    """``heads <projector hidden>/<projection>/<predictor hidden>`` of a two-view config."""
    return f"heads {config.proj_hidden_dim}/{config.proj_dim}/{config.pred_hidden_dim}"


def _byol_spec(label: str, arch: str, size: int, batch: int, preset: str, **kwargs) -> StepSpec:
    from ssl_fast.methods.byol import BYOL, BYOLConfig
    from ssl_fast.methods.config import config_from_options

    options = dict(BYOL.presets[preset].get("options", {}))
    detail = heads_detail(config_from_options(BYOLConfig, options))
    return StepSpec(label, arch, size, batch, options, detail=detail, **kwargs)


def specs(device: torch.device, quick: bool) -> List[StepSpec]:
    """The digits preset, a larger CPU shape (not with ``quick``), and the CUDA ResNet-50 case."""
    cpu = [_byol_spec("digits preset", "resnet_mini", 16, 64, "digits")]
    if not quick:
        cpu.append(_byol_spec("cifar", "resnet18_cifar", 32, 64, "default"))
    gpu = _byol_spec("imagenet", "resnet50", 224, 64, "default", amp=True, cuda_only=True)
    return [gpu] if device.type == "cuda" else cpu + [gpu]


def cases(device, quick):
    return step_cases("byol_step", build_byol, specs(device, quick), device)
