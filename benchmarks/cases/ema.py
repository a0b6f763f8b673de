"""EMA benchmark: the teacher update of a ViT-S/16 or ViT-B/16 (parameter shapes built here, no timm).

Providers:
  * ``official_loop`` (baseline): the per-parameter loop of the official DINO code
    (facebookresearch/dino, main_dino.py, the EMA update of the teacher in ``train_one_epoch``:
    ``param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)``), re-stated here;
  * ``lightly_update_momentum``: lightly's own ``lightly.models.utils.update_momentum`` (what
    lightly's DINO/BYOL examples call each step, with ``m`` from
    ``lightly.utils.scheduler.cosine_schedule``, a Python float), on modules holding the tensors;
    skipped with the reason when lightly is not installed;
  * ``foreach_lerp``: timm's ``torch._foreach_lerp_`` (ModelEmaV3's path, re-stated);
  * ``ssl_fast[<backend>]`` for each backend; ``ssl_fast[reference]`` is the fallback of users
    without the compiled extension, so its ratio to the baseline is the one to keep >= 1.
"""
import torch

from benchmarks.harness import Case, Provider
from ssl_fast import ops
from ssl_fast.ops.ema import _reasons


def vit_param_shapes(dim: int, depth: int, patch: int = 16, img: int = 224, in_chans: int = 3):
    n_tokens = (img // patch) ** 2 + 1
    shapes = [(1, 1, dim), (1, n_tokens, dim), (dim, in_chans, patch, patch), (dim,)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,),
                   (dim,), (dim,), (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    return shapes + [(dim,), (dim,)]


VITS = {"vit_s16": (384, 12), "vit_b16": (768, 12)}


def _official_loop(teacher, student, m):
    def fn():
        with torch.no_grad():
            for pt, ps in zip(teacher, student):
                pt.data.mul_(m).add_((1 - m) * ps.detach().data)
    return fn


def _lightly_reason():
    try:
        import lightly.models.utils  # noqa: F401
    except Exception as exc:  # not installed, or its import fails here
        return f"lightly unavailable: {type(exc).__name__}: {exc}"
    return None


def _lightly_update_momentum(teacher, student, m):
    from lightly.models.utils import update_momentum

    def holder(tensors):
        module = torch.nn.Module()
        module.params = torch.nn.ParameterList(torch.nn.Parameter(t, requires_grad=False) for t in tensors)
        return module

    model, model_ema = holder(student), holder(teacher)
    return lambda: update_momentum(model, model_ema, m)


def _foreach_lerp(teacher, student, m):
    def fn():
        with torch.no_grad():
            # ModelEmaV3's path; it needs matching dtypes, so a bf16 student is cast first
            src = student if student[0].dtype == teacher[0].dtype else [s.to(teacher[0].dtype) for s in student]
            torch._foreach_lerp_(teacher, src, 1.0 - m)
    return fn


def cases(device, quick):
    out = []
    names = ["vit_s16"] if quick else list(VITS)
    for name in names:
        dim, depth = VITS[name]
        shapes = vit_param_shapes(dim, depth)
        for s_dtype in (torch.float32, torch.bfloat16):
            def tensors(s_dtype=s_dtype, shapes=shapes):
                g = torch.Generator().manual_seed(0)
                t = [torch.randn(s, generator=g).to(device) for s in shapes]
                s = [torch.randn(s, generator=g).to(device, s_dtype) for s in shapes]
                return t, s

            n = sum(torch.Size(s).numel() for s in shapes)
            case = Case("ema", f"{name} ({n / 1e6:.1f}M, fp32<-{str(s_dtype)[6:]})", "fwd", "official_loop")
            case.providers.append(Provider("official_loop", lambda t=tensors: _official_loop(*t(), 0.996)))
            case.providers.append(Provider("lightly_update_momentum",
                                           lambda t=tensors: _lightly_update_momentum(*t(), 0.996),
                                           _lightly_reason()))
            case.providers.append(Provider("foreach_lerp", lambda t=tensors: _foreach_lerp(*t(), 0.996)))
            for b in ("triton", "cpp", "reference"):
                why = _reasons(b, device)

                def make(b=b, t=tensors):
                    te, st = t()
                    return lambda: ops.ema_(te, st, 0.996, backend=b)
                case.providers.append(Provider(f"ssl_fast[{b}]", make, "; ".join(why) or None))
            out.append(case)
    return out
