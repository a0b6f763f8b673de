"""Re-statement of CARE's transformer stack (the T-stream), for the tests of ``ssl_fast.models.bot_stack``.

Source: ChongjianGE/CARE, ``models/trans.py``, classes ``AbsPosEmb``, ``Attention``, ``BottleBlock``
and ``TransStack``, at commit 3187afb0a2e56d40684bd5a83bf4eda145431e7b (2021-11-09; the file last
changed in a6b803293832639d41142a3fad7c1d1ffafb74e6). The official repository is a training
project, not a package, so it cannot be installed; these classes are written from that file with
its names, constructor arguments, module structure (``net``/``shortcut`` ``nn.Sequential`` indices,
``to_qkv``, ``pos_emb.height``/``pos_emb.width``) and arithmetic kept. That file follows lucidrains'
bottleneck-transformer-pytorch ``BottleStack``.

Deviations, none of which changes a result:
- ``einops.rearrange``/``einsum`` patterns are written as ``reshape``/``transpose``/``torch.einsum``
  (einops is not installed here); each pattern is quoted beside its replacement.
- Only the absolute (factorised) position embedding is restated: CARE builds every ``TransStack``
  with ``rel_pos_emb=False`` (``models/resnet_care.py``), so the ``RelPosEmb`` branch is left out and
  ``rel_pos_emb=True`` is refused.
"""
import torch
from torch import nn


def pair(x):
    return (x, x) if not isinstance(x, tuple) else x


class AbsPosEmb(nn.Module):
    def __init__(self, fmap_size, dim_head):
        super().__init__()
        height, width = pair(fmap_size)
        scale = dim_head ** -0.5
        self.height = nn.Parameter(torch.randn(height, dim_head) * scale)
        self.width = nn.Parameter(torch.randn(width, dim_head) * scale)

    def forward(self, q):
        # rearrange(height, 'h d -> h () d') + rearrange(width, 'w d -> () w d'), then 'h w d -> (h w) d'
        emb = self.height[:, None, :] + self.width[None, :, :]
        emb = emb.reshape(-1, emb.shape[-1])
        return torch.einsum("bhid,jd->bhij", q, emb)


class Attention(nn.Module):
    def __init__(self, *, dim, fmap_size, heads=4, dim_head=128, rel_pos_emb=False):
        super().__init__()
        if rel_pos_emb:
            raise ValueError("the relative-position branch is not restated (CARE uses rel_pos_emb=False)")
        self.heads = heads
        self.scale = dim_head ** -0.5
        inner_dim = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, inner_dim * 3, 1, bias=False)
        self.pos_emb = AbsPosEmb(fmap_size, dim_head)

    def forward(self, fmap):
        heads, b, c, h, w = self.heads, *fmap.shape  # noqa: F841  (c unused, as officially)
        q, k, v = self.to_qkv(fmap).chunk(3, dim=1)
        # rearrange(t, 'b (h d) x y -> b h (x y) d', h=heads)
        q, k, v = (t.reshape(b, heads, t.shape[1] // heads, h * w).transpose(-1, -2) for t in (q, k, v))
        q = q * self.scale
        sim = torch.einsum("bhid,bhjd->bhij", q, k)
        sim += self.pos_emb(q)
        attn = sim.softmax(dim=-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v)
        # rearrange(out, 'b h (x y) d -> b (h d) x y', x=h, y=w)
        return out.transpose(-1, -2).reshape(b, -1, h, w)


class BottleBlock(nn.Module):
    def __init__(self, *, dim, fmap_size, dim_out, proj_factor, downsample, heads=4, dim_head=128,
                 rel_pos_emb=False, activation=nn.ReLU()):
        super().__init__()
        # shortcut
        if dim != dim_out or downsample:
            kernel_size, stride, padding = (3, 2, 1) if downsample else (1, 1, 0)
            self.shortcut = nn.Sequential(
                nn.Conv2d(dim, dim_out, kernel_size, stride=stride, padding=padding, bias=False),
                nn.BatchNorm2d(dim_out),
                activation,
            )
        else:
            self.shortcut = nn.Identity()
        # contraction and expansion
        attn_dim_in = dim_out // proj_factor
        attn_dim_out = heads * dim_head
        self.net = nn.Sequential(
            nn.Conv2d(dim, attn_dim_in, 1, bias=False),
            nn.BatchNorm2d(attn_dim_in),
            activation,
            Attention(dim=attn_dim_in, fmap_size=fmap_size, heads=heads, dim_head=dim_head, rel_pos_emb=rel_pos_emb),
            nn.AvgPool2d((2, 2)) if downsample else nn.Identity(),
            nn.BatchNorm2d(attn_dim_out),
            activation,
            nn.Conv2d(attn_dim_out, dim_out, 1, bias=False),
            nn.BatchNorm2d(dim_out),
        )
        # the last batch norm's gamma starts at zero
        nn.init.zeros_(self.net[-1].weight)
        self.activation = activation

    def forward(self, x):
        shortcut = self.shortcut(x)
        x = self.net(x)
        x += shortcut
        return self.activation(x)


class TransStack(nn.Module):
    def __init__(self, *, dim, fmap_size, dim_out=2048, proj_factor=4, num_layers=3, heads=4, dim_head=128,
                 downsample=True, rel_pos_emb=False, activation=nn.ReLU()):
        super().__init__()
        fmap_size = pair(fmap_size)
        self.dim = dim
        self.fmap_size = fmap_size
        layers = []
        for i in range(num_layers):
            is_first = i == 0
            dim = dim if is_first else dim_out
            layer_downsample = is_first and downsample
            fmap_divisor = 2 if downsample and not is_first else 1
            layer_fmap_size = tuple(t // fmap_divisor for t in fmap_size)
            layers.append(BottleBlock(dim=dim, fmap_size=layer_fmap_size, dim_out=dim_out, proj_factor=proj_factor,
                                      heads=heads, dim_head=dim_head, downsample=layer_downsample,
                                      rel_pos_emb=rel_pos_emb, activation=activation))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        _, c, h, w = x.shape
        assert c == self.dim, f"channels of feature map {c} must match channels given at init {self.dim}"
        assert h == self.fmap_size[0] and w == self.fmap_size[1], (
            f"height and width ({h} {w}) of feature map must match the fmap_size given at init {self.fmap_size}")
        return self.net(x)
