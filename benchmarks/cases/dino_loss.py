"""DINO loss benchmark: the loss over 2 global + 8 local crops, forward, backward and both.

Providers:
  * ``official_loop`` (baseline): ``DINOLoss.forward`` of the official DINO code
    (facebookresearch/dino, main_dino.py, class ``DINOLoss``), re-stated here because that
    repository is not an installable package: one ``log_softmax`` and one ``[B, K]`` product per
    (view, crop) pair, in the inputs' dtype;
  * ``lightly_DINOLoss``: lightly's own ``lightly.loss.DINOLoss`` (all views stacked, the pair
    sums by one ``einsum`` with the diagonal zeroed); skipped with the reason when lightly is
    not installed;
  * ``compiled_reference``: ``torch.compile`` of ``ssl_fast.reference.dino_loss``;
  * ``ssl_fast[<backend>]`` for each backend; ``ssl_fast[reference]`` is the fallback of users
    without the compiled extension, so its ratio to the baseline is the one to keep >= 1.
The center update is left out of every provider (it is the same column mean for all; lightly's
module, which updates its center inside ``forward``, has that update switched off).
Shapes: CUDA K = 65536, 64 rows per crop, fp32 and bf16 (DINO ViT-S/16 head); CPU K = 4096,
16 rows per crop.
"""
import torch
import torch.nn.functional as F

from benchmarks.harness import Case, Provider
from ssl_fast import ops
from ssl_fast.ops.dino_loss import _reasons
from ssl_fast.reference import dino_loss as reference

N_GLOBAL, N_LOCAL = 2, 8
STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04
# DINO's head ends in a weight-normalised layer on l2-normalised features, so its logits are
# of order 1 or less; larger synthetic logits at tau_t = 0.04 make most teacher probabilities
# float32 subnormals, which slows every CPU provider by orders of magnitude and is not DINO.
LOGIT_SCALE = 0.3


def official_loop(student, teacher, center, ncrops):
    """``DINOLoss.forward`` of facebookresearch/dino (main_dino.py), without its center update.

    The official code recomputes ``log_softmax`` of a crop for every view it is paired with.
    """
    student_out = (student / STUDENT_TEMP).chunk(ncrops)
    teacher_out = F.softmax((teacher - center) / TEACHER_TEMP, dim=-1).detach().chunk(N_GLOBAL)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    return total_loss / n_loss_terms


def _lightly_reason():
    try:
        import lightly.loss  # noqa: F401
    except Exception as exc:  # not installed, or its import fails here
        return f"lightly unavailable: {type(exc).__name__}: {exc}"
    return None


def lightly_dino_loss(center):
    """Build lightly's ``DINOLoss`` holding ``center``; returns the loss function to time.

    Its center buffer takes the center's values (and dtype, as for the official loop); its
    ``update_center`` is replaced by a no-op on this instance only.
    """
    from lightly.loss import DINOLoss

    k = center.shape[-1]
    module = DINOLoss(output_dim=k, warmup_teacher_temp=TEACHER_TEMP, teacher_temp=TEACHER_TEMP,
                      warmup_teacher_temp_epochs=1, student_temp=STUDENT_TEMP)
    module.center = center.detach().reshape(1, 1, k).clone()
    module.update_center = lambda teacher_out: None

    def loss(student, teacher, center, ncrops):
        return module(teacher_out=list(teacher.chunk(N_GLOBAL)), student_out=list(student.chunk(ncrops)),
                      teacher_temp=TEACHER_TEMP)
    return loss


_compiled = {}


def compiled_reference(student, teacher, center, ncrops):
    fn = _compiled.get("ref")
    if fn is None:
        fn = _compiled["ref"] = torch.compile(reference.dino_loss)
    return fn(student, teacher, center, ncrops, N_GLOBAL, STUDENT_TEMP, TEACHER_TEMP)


def _ssl_fast(backend):
    def loss(student, teacher, center, ncrops):
        return ops.dino_loss(student, teacher, center, ncrops=ncrops, n_global=N_GLOBAL,
                             student_temp=STUDENT_TEMP, teacher_temp=TEACHER_TEMP, backend=backend)
    return loss


def _make(loss_fn, mode, device, dtype, batch, k):
    """Set-up (untimed) and the function to time for one provider and mode."""
    ncrops = N_GLOBAL + N_LOCAL
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(ncrops * batch, k, generator=g) * LOGIT_SCALE).to(device, dtype).requires_grad_()
    teacher = (torch.randn(N_GLOBAL * batch, k, generator=g) * LOGIT_SCALE).to(device, dtype)
    center = (torch.randn(1, k, generator=g) * 0.1 * LOGIT_SCALE).to(device)
    if dtype != torch.float32 and loss_fn in (official_loop, lightly_dino_loss):
        center = center.to(dtype)  # the official code keeps the center in the logits' dtype
    if loss_fn is lightly_dino_loss:
        loss_fn = lightly_dino_loss(center)
    if mode == "fwd":
        return lambda: loss_fn(student, teacher, center, ncrops)
    if mode == "bwd":
        loss = loss_fn(student, teacher, center, ncrops)
        return lambda: torch.autograd.grad(loss, student, retain_graph=True)
    return lambda: torch.autograd.grad(loss_fn(student, teacher, center, ncrops), student)


def cases(device, quick):
    if device.type == "cuda":
        batch, k = 64, 65536
        dtypes = [torch.bfloat16] if quick else [torch.float32, torch.bfloat16]
    else:
        batch, k = 16, 4096
        dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    out = []
    for dtype in dtypes:
        shape = f"{N_GLOBAL}+{N_LOCAL} crops x {batch}, K={k}, {str(dtype)[6:]}"
        for mode in ("fwd", "bwd", "fwd_bwd"):
            case = Case("dino_loss", shape, mode, "official_loop")
            peers = [("official_loop", official_loop, None),
                     ("lightly_DINOLoss", lightly_dino_loss, _lightly_reason()),
                     ("compiled_reference", compiled_reference, None)]
            for name, fn, why in peers:
                case.providers.append(Provider(
                    name, lambda fn=fn, mode=mode, dtype=dtype: _make(fn, mode, device, dtype, batch, k), why))
            for b in ("triton", "cpp", "reference"):
                why = _reasons(b, device, dtype, dtype)
                case.providers.append(Provider(
                    f"ssl_fast[{b}]",
                    lambda b=b, mode=mode, dtype=dtype: _make(_ssl_fast(b), mode, device, dtype, batch, k),
                    "; ".join(why) or None))
            out.append(case)
    return out
