"""Show-Attend-Tell attention benchmark: the attention step, a whole LSTM decoder step, and the
backward of a whole caption (issue 14's memory claim).

Providers (same weights, same inputs; float32):
- ``eager_tutorial`` (baseline): the ``Attention`` module of the common PyTorch tutorial
  (sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning, ``models.py``, re-stated below with its names:
  ``nn.Linear`` + non-linearity + ``nn.Linear`` + softmax + weighted sum, eager autograd keeping
  the ``[B, L, A]`` activation for the backward) with the paper's ``tanh`` in place of the
  tutorial's ReLU, and with ``att1 = encoder_att(encoder_out)`` computed once per image, as
  ssl_fast's module does with ``precompute`` (the fair eager baseline);
- ``eager_as_written`` (attention step only): the same module exactly as the tutorial calls it,
  recomputing ``encoder_att(encoder_out)`` at every step;
- ``ssl_fast[<backend>]``: :class:`ssl_fast.nn.AdditiveAttention` with ``Ua`` from ``precompute``
  on each backend (``triton`` on CUDA; ``cpp`` and ``reference`` on the CPU).

Cases:
- ``step``: one attention call (``decoder_att(h)``, scores, softmax, context); fwd and fwd_bwd
  (the gradient reaches ``h``, ``Ua``, the weights; the encoder features are frozen);
- ``decoder step``: the tutorial's ``DecoderWithAttention`` loop body: attention, the gate
  ``sigmoid(f_beta(h))``, ``LSTMCell`` on ``[embedding, gated context]``, ``fc`` to the vocabulary;
- ``caption``: ``steps`` decoder steps under teacher forcing from the same encoder features,
  cross-entropy plus the doubly stochastic regulariser ``sum_l (1 - sum_t alpha_tl)^2``, and the
  backward through all of them (fwd_bwd). This is where eager autograd keeps one ``[B, L, A]``
  tanh per step. Before timing, the fused caption loss is checked against the eager one (relative
  difference at most 1e-4) and the outcome written in the row's note.

Peak memory (by the harness): CUDA's ``max_memory_allocated``; on the CPU the peak of torch's
allocations during one call above what was held before it, from the profiler's allocation events
(``benchmarks.harness.cpu_peak_mb``; the C++ kernel's per-thread row buffers, a few KiB, are not
counted).

Shapes: issue 14's ``B=64, L=196 (14x14), D=2048, A=512``, decoder and embedding 512, a
10000-word vocabulary, a 20-step caption, on the CPU and on CUDA; ``--quick`` runs
``B=8, L=49, D=256, A=128``, 5 steps on the CPU.
"""
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.harness import Case, Provider
from ssl_fast.nn import AdditiveAttention
from ssl_fast.ops.additive_attention import _reasons

RTOL = 1e-4


@dataclass(frozen=True)
class Shape:
    B: int
    L: int
    D: int
    A: int
    H: int
    E: int
    V: int
    steps: int

    def describe(self) -> str:
        return f"B{self.B} L{self.L} D{self.D} A{self.A} H{self.H}"


FULL = Shape(B=64, L=196, D=2048, A=512, H=512, E=512, V=10000, steps=20)
QUICK = Shape(B=8, L=49, D=256, A=128, H=128, E=128, V=1000, steps=5)


class TutorialAttention(nn.Module):
    """``Attention`` of sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning ``models.py`` (commit
    01f749f503c01e2698fdf77287480892b6d07610), with its names; ``self.relu`` is set to
    ``nn.Tanh()`` here (the paper's non-linearity, which ssl_fast computes). ``forward`` is the
    tutorial's; ``forward_precomputed`` is its body with ``att1`` passed in."""

    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.Tanh()
        self.softmax = nn.Softmax(dim=1)

    def forward(self, encoder_out, decoder_hidden):
        return self.forward_precomputed(encoder_out, self.encoder_att(encoder_out), decoder_hidden)

    def forward_precomputed(self, encoder_out, att1, decoder_hidden):
        att2 = self.decoder_att(decoder_hidden)
        att = self.full_att(self.relu(att1 + att2.unsqueeze(1))).squeeze(2)
        alpha = self.softmax(att)
        attention_weighted_encoding = (encoder_out * alpha.unsqueeze(2)).sum(dim=1)
        return attention_weighted_encoding, alpha


class Decoder(nn.Module):
    """The tutorial's ``DecoderWithAttention`` layers (embedding, LSTMCell, init_h/init_c, f_beta,
    fc) around either attention module; :meth:`step` is its loop body (dropout off)."""

    def __init__(self, attention: nn.Module, s: Shape):
        super().__init__()
        self.attention = attention
        self.embedding = nn.Embedding(s.V, s.E)
        self.decode_step = nn.LSTMCell(s.E + s.D, s.H)
        self.init_h = nn.Linear(s.D, s.H)
        self.init_c = nn.Linear(s.D, s.H)
        self.f_beta = nn.Linear(s.H, s.D)
        self.fc = nn.Linear(s.H, s.V)

    def attend(self, encoder_out, Ua, h, backend):
        if isinstance(self.attention, AdditiveAttention):
            return self.attention(encoder_out, h, Ua=Ua, backend=backend)
        return self.attention.forward_precomputed(encoder_out, Ua, h)

    def step(self, encoder_out, Ua, emb, h, c, backend=None):
        context, alpha = self.attend(encoder_out, Ua, h, backend)
        context = torch.sigmoid(self.f_beta(h)) * context
        h, c = self.decode_step(torch.cat([emb, context], dim=1), (h, c))
        return self.fc(h), h, c, alpha

    def caption_loss(self, encoder_out, captions, backend=None, alpha_c=1.0):
        """Teacher-forced loss of a whole caption: cross-entropy + the doubly stochastic term."""
        mean = encoder_out.mean(dim=1)
        h, c = self.init_h(mean), self.init_c(mean)
        Ua = self.attention.encoder_att(encoder_out)
        emb = self.embedding(captions)
        loss, alpha_sum = 0.0, 0.0
        for t in range(captions.shape[1] - 1):
            preds, h, c, alpha = self.step(encoder_out, Ua, emb[:, t], h, c, backend)
            loss = loss + F.cross_entropy(preds, captions[:, t + 1])
            alpha_sum = alpha_sum + alpha
        return loss + alpha_c * ((1.0 - alpha_sum) ** 2).mean()


def _pair(s: Shape, device):
    """The fused and the eager decoder with the same weights, and the frozen inputs."""
    torch.manual_seed(0)
    fused = Decoder(AdditiveAttention(s.D, s.H, s.A), s).to(device)
    eager = Decoder(TutorialAttention(s.D, s.H, s.A), s).to(device)
    eager.load_state_dict(fused.state_dict())
    g = torch.Generator().manual_seed(1)
    encoder_out = torch.randn(s.B, s.L, s.D, generator=g).relu_().to(device)  # post-ReLU ResNet features
    captions = torch.randint(0, s.V, (s.B, s.steps + 1), generator=g).to(device)
    h = (torch.randn(s.B, s.H, generator=g) * 0.5).to(device)
    c = (torch.randn(s.B, s.H, generator=g) * 0.5).to(device)
    return fused, eager, encoder_out, captions, h, c


def _finish(fn: Callable, device, note: str = "") -> Callable:
    fn()  # warm-up before the harness times it and takes its peak memory
    fn.note = note
    return fn


def _attention_step(s, device, provider, mode):
    fused, eager, encoder_out, _, h, _ = _pair(s, device)
    h.requires_grad_(mode == "fwd_bwd")
    if provider.startswith("ssl_fast"):
        backend = provider[len("ssl_fast["):-1]
        att = fused.attention
        with torch.no_grad():
            Ua = att.precompute(encoder_out)
        Ua.requires_grad_(mode == "fwd_bwd")

        def call():
            return att(encoder_out, h, Ua=Ua, backend=backend)
    else:
        att = eager.attention
        with torch.no_grad():
            att1 = att.encoder_att(encoder_out)
        att1.requires_grad_(mode == "fwd_bwd")
        if provider == "eager_as_written":
            def call():
                return att(encoder_out, h)
        else:
            def call():
                return att.forward_precomputed(encoder_out, att1, h)

    if mode == "fwd":
        def fn():
            with torch.no_grad():
                return call()
    else:
        def fn():
            context, alpha = call()
            (context.sum() + alpha.square().sum()).backward()
    return _finish(fn, device)


def _decoder_step(s, device, provider, mode):
    fused, eager, encoder_out, captions, h, c = _pair(s, device)
    model = fused if provider.startswith("ssl_fast") else eager
    backend = provider[len("ssl_fast["):-1] if provider.startswith("ssl_fast") else None
    emb_idx = captions[:, 0]

    def fn():
        with torch.set_grad_enabled(mode == "fwd_bwd"):
            Ua = model.attention.encoder_att(encoder_out)
            preds, h2, c2, alpha = model.step(encoder_out, Ua, model.embedding(emb_idx), h, c, backend)
            if mode == "fwd_bwd":
                (F.cross_entropy(preds, captions[:, 1]) + alpha.square().sum()).backward()
            return preds
    return _finish(fn, device)


def _check_equal_loss(fused, eager, encoder_out, captions, backend) -> str:
    with torch.no_grad():
        a = float(fused.caption_loss(encoder_out, captions, backend))
        b = float(eager.caption_loss(encoder_out, captions))
    diff = abs(a - b) / max(abs(b), 1e-30)
    if not diff <= RTOL:
        raise RuntimeError(f"fused and eager caption losses differ: {a:.6g} vs {b:.6g} (rel {diff:.1e} > {RTOL:g})")
    return f"caption loss = eager's (rel diff {diff:.1e} <= {RTOL:g})"


def _caption(s, device, provider):
    fused, eager, encoder_out, captions, _, _ = _pair(s, device)
    if provider.startswith("ssl_fast"):
        backend = provider[len("ssl_fast["):-1]
        note = _check_equal_loss(fused, eager, encoder_out, captions, backend)

        def fn():
            fused.zero_grad(set_to_none=True)
            fused.caption_loss(encoder_out, captions, backend).backward()
    else:
        note = ""

        def fn():
            eager.zero_grad(set_to_none=True)
            eager.caption_loss(encoder_out, captions).backward()
    return _finish(fn, device, note)


def _providers(device, build, with_as_written=False):
    out = [Provider("eager_tutorial", lambda: build("eager_tutorial"))]
    if with_as_written:
        out.append(Provider("eager_as_written", lambda: build("eager_as_written")))
    for b in ("triton", "cpp", "reference"):
        why = _reasons(b, device, torch.float32)
        if b == "triton" and device.type == "cpu" and not why:
            why = ["the Triton interpreter is for tests, not timing"]
        name = f"ssl_fast[{b}]"
        out.append(Provider(name, lambda name=name: build(name), "; ".join(why) or None))
    return out


def cases(device, quick):
    s = QUICK if quick and device.type == "cpu" else FULL
    out = []
    for mode in ("fwd", "fwd_bwd"):
        case = Case("additive_attention", f"step {s.describe()}", mode, "eager_tutorial")
        case.providers = _providers(device, lambda p, mode=mode: _attention_step(s, device, p, mode),
                                    with_as_written=True)
        out.append(case)
    for mode in ("fwd", "fwd_bwd"):
        case = Case("additive_attention", f"decoder step {s.describe()} V{s.V}", mode, "eager_tutorial")
        case.providers = _providers(device, lambda p, mode=mode: _decoder_step(s, device, p, mode))
        out.append(case)
    case = Case("additive_attention", f"caption {s.steps} steps {s.describe()} V{s.V}", "fwd_bwd", "eager_tutorial")
    case.providers = _providers(device, lambda p: _caption(s, device, p))
    out.append(case)
    return out
