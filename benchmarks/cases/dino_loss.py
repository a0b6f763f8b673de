"""DINO loss benchmark: the loss over 2 global + 8 local crops, forward, backward and both.

Providers:
  * ``official_loop`` (baseline): the official DINO code's double loop over (view, crop) pairs,
    one ``log_softmax`` per crop and one ``[B, K]`` product per pair, in the inputs' dtype
    (re-written here from the semantics);
  * ``lightly_einsum``: lightly's form, all log-softmaxes stacked and the pair sums taken by
    one ``einsum`` with the diagonal (i == v) masked out (re-written here from the semantics);
  * ``compiled_reference``: ``torch.compile`` of ``ssl_fast.reference.dino_loss``;
  * ``ssl_fast[<backend>]`` for each backend.
The center update is left out of every provider (it is the same column mean for all).
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
    """Pair by pair, as the official DINO training script does it."""
    crops = (student / STUDENT_TEMP).chunk(ncrops)
    views = F.softmax((teacher - center) / TEACHER_TEMP, dim=-1).detach().chunk(N_GLOBAL)
    total, terms = 0, 0
    for i, q in enumerate(views):
        for v in range(ncrops):
            if v == i:
                continue
            total = total + torch.sum(-q * F.log_softmax(crops[v], dim=-1), dim=-1).mean()
            terms += 1
    return total / terms


def lightly_einsum(student, teacher, center, ncrops):
    """Every (view, crop) pair sum at once: ``-einsum('ibk,vbk->iv')`` with i == v masked."""
    batch = teacher.shape[0] // N_GLOBAL
    t = F.softmax((teacher - center) / TEACHER_TEMP, dim=-1).detach().view(N_GLOBAL, batch, -1)
    log_s = F.log_softmax(student / STUDENT_TEMP, dim=-1).view(ncrops, batch, -1)
    pair_sums = -torch.einsum("ibk,vbk->iv", t, log_s)
    same = torch.eye(N_GLOBAL, ncrops, dtype=torch.bool, device=student.device)
    n_terms = N_GLOBAL * ncrops - N_GLOBAL
    return pair_sums.masked_fill(same, 0).sum() / (n_terms * batch)


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
    if dtype != torch.float32 and loss_fn in (official_loop, lightly_einsum):
        center = center.to(dtype)  # the official code keeps the center in the logits' dtype
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
            peers = [("official_loop", official_loop), ("lightly_einsum", lightly_einsum),
                     ("compiled_reference", compiled_reference)]
            for name, fn in peers:
                case.providers.append(Provider(
                    name, lambda fn=fn, mode=mode, dtype=dtype: _make(fn, mode, device, dtype, batch, k)))
            for b in ("triton", "cpp", "reference"):
                why = _reasons(b, device, dtype, dtype)
                case.providers.append(Provider(
                    f"ssl_fast[{b}]",
                    lambda b=b, mode=mode, dtype=dtype: _make(_ssl_fast(b), mode, device, dtype, batch, k),
                    "; ".join(why) or None))
            out.append(case)
    return out
