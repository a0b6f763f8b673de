"""Each GPU op once against a float64 PyTorch computation: the first thing to run on a lent GPU
(``scripts/gpu_session.sh check``). ``SMOKE_DEVICE`` / ``SMOKE_BACKEND`` (default cuda / triton)
let it run on the CPU too."""
import os

import torch
import torch.nn.functional as F

from ssl_fast import ops


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def main():
    torch.manual_seed(0)
    dev, backend = os.environ.get("SMOKE_DEVICE", "cuda"), os.environ.get("SMOKE_BACKEND", "triton")
    x = torch.randn(4, 64, 28, 28, device=dev)
    ws = [torch.randn(64, 1, 3, 3, device=dev) for _ in range(3)]
    got = ops.conv_qkv_projection(x, ws, [torch.nn.BatchNorm2d(64).to(dev) for _ in range(3)], training=True,
                                  backend=backend)
    for name, g, w, s in zip("qkv", got, ws, (1, 2, 2)):
        y = F.conv2d(x.double(), w.double(), stride=s, padding=1, groups=64)
        want = F.batch_norm(y, None, None, training=True, eps=1e-5).flatten(2).transpose(1, 2)
        err = rel(g, want)
        print(f"conv_qkv_projection {backend} fp32 {name}: rel err {err:.2e}")
        assert err < 1e-4, err
    q, k, v = (torch.randn(2, 6, 197, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    err = rel(ops.attention(q, k, v, backend=backend), want)
    print(f"attention {backend} bf16: rel err {err:.2e}")
    assert err < 2e-2, err


if __name__ == "__main__":
    main()
