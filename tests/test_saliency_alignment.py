"""Cross-view saliency alignment loss: float64 plain-PyTorch truth, gradients, what is kept for the backward."""
import pytest
import torch

from ssl_fast.nn.saliency_alignment import SaliencyAlignmentLoss, cross_view_attention
from tests.helpers import backend_params, rel_error


def _truth(p, z, mq, mk, tau, eps):
    """L(Q -> K) written out in float64 with the full [B, n, n] attention matrix."""
    p, z = p.double(), z.double().detach()
    q = p.flatten(2).transpose(1, 2)
    k = z.flatten(2).transpose(1, 2)
    q = q / q.norm(dim=-1, keepdim=True)
    k = k / k.norm(dim=-1, keepdim=True)
    a = torch.softmax(q @ k.transpose(1, 2) / tau, dim=-1)  # [B, nq, nk]
    mass = (a * mk.double().flatten(1)[:, None, :]).sum(-1)
    w = mq.double().flatten(1)
    return (w * -torch.log(mass + eps)).sum() / w.sum()


def _inputs(b=3, c=24, h=5, w=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    p1, p2, z1, z2 = (torch.randn(b, c, h, w, generator=g, dtype=dtype) for _ in range(4))
    m1, m2 = ((torch.rand(b, 1, h, w, generator=g) > 0.6).to(dtype) * torch.rand(b, 1, h, w, generator=g).to(dtype)
              for _ in range(2))
    return p1.requires_grad_(), p2.requires_grad_(), z1, z2, m1, m2


@pytest.mark.parametrize("backend", backend_params("attention"))
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_matches_float64_truth_with_gradients(backend, tau):
    p1, p2, z1, z2, m1, m2 = _inputs()
    loss_fn = SaliencyAlignmentLoss(temperature=tau, backend=backend)
    loss = loss_fn(p1, p2, z1, z2, m1, m2)
    g1, g2 = torch.autograd.grad(loss, (p1, p2))
    r1, r2 = (x.detach().double().requires_grad_() for x in (p1, p2))
    ref = 0.5 * (_truth(r1, z2, m1, m2, tau, 1e-6) + _truth(r2, z1, m2, m1, tau, 1e-6))
    ref.backward()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert rel_error(g1, r1.grad) < 1e-5 and rel_error(g2, r2.grad) < 1e-5


@pytest.mark.parametrize("backend", [b for b in backend_params("attention") if not hasattr(b, "marks")
                                     and b != "triton"])
def test_gradcheck_float64(backend):
    p1, _, _, z2, m1, m2 = _inputs(b=2, c=6, h=3, w=2, dtype=torch.float64)
    loss_fn = SaliencyAlignmentLoss(temperature=0.2, backend=backend)
    assert torch.autograd.gradcheck(lambda p: loss_fn.one_direction(p, z2, m1, m2), (p1.detach().requires_grad_(),))


@pytest.mark.parametrize("backend", backend_params("attention"))
def test_nothing_of_size_n_squared_is_kept_for_the_backward(backend):
    # n = 24 x 24 = 576 positions: a [B, n, n] map would hold 331,776 elements per image
    b, c, n_side = 2, 32, 24
    p1, p2, z1, z2, m1, m2 = _inputs(b=b, c=c, h=n_side, w=n_side)
    kept = []

    def pack(t):
        kept.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = SaliencyAlignmentLoss(backend=backend)(p1, p2, z1, z2, m1, m2)
    n = n_side * n_side
    assert kept and max(kept) <= b * n * c, f"largest saved tensor has {max(kept)} elements (n^2 = {n * n})"
    loss.backward()
    assert torch.isfinite(p1.grad).all()


def test_loss_is_low_when_object_attends_to_object():
    # view 2's salient positions carry view 1's salient features; backgrounds are random
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 2, 16, 4, 4
    obj = torch.nn.functional.normalize(torch.randn(b, c, 1, 1, generator=g), dim=1)
    m1, m2 = torch.zeros(b, 1, h, w), torch.zeros(b, 1, h, w)
    m1[:, :, :2, :2] = 1
    m2[:, :, 2:, 1:3] = 1
    bg = torch.randn(b, c, h, w, generator=g)
    p1 = torch.where(m1 > 0, obj.expand(b, c, h, w), bg)
    z2 = torch.where(m2 > 0, obj.expand(b, c, h, w), -obj.expand(b, c, h, w) + 0.1 * bg)
    fn = SaliencyAlignmentLoss(temperature=0.1)
    good = fn.one_direction(p1, z2, m1, m2)
    bad = fn.one_direction(p1, z2, m1, 1 - m2)
    assert good.item() < 0.05 < 2.0 < bad.item()
    att = cross_view_attention(p1, z2, 0.1, query_index=[0])
    assert att.shape == (b, 1, h, w) and torch.allclose(att.sum((2, 3)), torch.ones(b, 1))
    assert float((att * m2).sum((2, 3)).min()) > 0.99


def test_zero_query_mask_gives_zero_and_bad_input_names_the_argument():
    p1, p2, z1, z2, m1, m2 = _inputs()
    fn = SaliencyAlignmentLoss()
    assert fn.one_direction(p1, z2, torch.zeros_like(m1), m2).item() == 0.0
    with pytest.raises(ValueError, match="mask_pred must be"):
        fn.one_direction(p1, z2, m1[:, :, :2], m2)
    with pytest.raises(ValueError, match="target .* must share B and C"):
        fn.one_direction(p1, z2[:, :5], m1, m2)
    with pytest.raises(ValueError, match="pred must be"):
        fn.one_direction(p1[0], z2, m1, m2)
    with pytest.raises(TypeError, match="pred must be a torch.Tensor"):
        fn.one_direction(None, z2, m1, m2)
    with pytest.raises(ValueError, match="temperature must be"):
        SaliencyAlignmentLoss(temperature=0)
