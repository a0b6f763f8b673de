"""Triton multi-tensor EMA: ``e <- m * e + (1 - m) * t`` over many tensors in one launch.

Tensors of one (teacher dtype, student dtype) group are cut into chunks of ``CHUNK`` elements;
a table holds each chunk's two start addresses and length, and one program handles one chunk.
"""
import torch
import triton
import triton.language as tl

CHUNK = 65536
BLOCK = 1024

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
       torch.float64: tl.float64}


@triton.jit
def _ema_chunks_kernel(ema_addr, src_addr, chunk_len, momentum, momentum_ptr,
                       HAS_MOMENTUM_PTR: tl.constexpr, EMA_DTYPE: tl.constexpr,
                       SRC_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
                       CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    n = tl.load(chunk_len + c)
    e_ptr = tl.load(ema_addr + c).to(tl.pointer_type(EMA_DTYPE))
    s_ptr = tl.load(src_addr + c).to(tl.pointer_type(SRC_DTYPE))
    if HAS_MOMENTUM_PTR:
        m = tl.load(momentum_ptr).to(ACC_DTYPE)
    else:
        m = tl.full((), momentum, ACC_DTYPE)
    for start in tl.range(0, CHUNK, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        e = tl.load(e_ptr + offs, mask=mask).to(ACC_DTYPE)
        s = tl.load(s_ptr + offs, mask=mask).to(ACC_DTYPE)
        tl.store(e_ptr + offs, (m * e + (1 - m) * s).to(EMA_DTYPE), mask=mask)


_TABLES = {}  # device chunk tables, keyed by the tensors' addresses and sizes
_MAX_TABLES = 16


def _chunk_table(ema_tensors, src_tensors, device):
    """``[3, n_chunks]`` int64 on ``device``: chunk start addresses (ema, src) and lengths.

    A momentum teacher updates the same tensors every step, so the table is built and copied to
    the device once and then reused; it depends only on the addresses and sizes in the key.
    """
    key = (str(device),) + tuple((e.data_ptr(), s.data_ptr(), e.numel(), e.element_size(), s.element_size())
                                 for e, s in zip(ema_tensors, src_tensors))
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= _MAX_TABLES:
            _TABLES.pop(next(iter(_TABLES)))
        table = _TABLES[key] = _build_chunk_table(ema_tensors, src_tensors, device)
    return table


def _build_chunk_table(ema_tensors, src_tensors, device):
    e_addr, s_addr, lens = [], [], []
    for e, s in zip(ema_tensors, src_tensors):
        n = e.numel()
        eb, sb = e.element_size(), s.element_size()
        for start in range(0, n, CHUNK):
            e_addr.append(e.data_ptr() + start * eb)
            s_addr.append(s.data_ptr() + start * sb)
            lens.append(min(CHUNK, n - start))
    table = torch.tensor([e_addr, s_addr, lens], dtype=torch.int64)
    return table.to(device, non_blocking=True)


def ema_group(ema_tensors, src_tensors, momentum, momentum_tensor=None) -> None:
    """One launch for tensors that share (ema dtype, src dtype, device); all contiguous."""
    if not ema_tensors:
        return
    e_dtype, s_dtype = ema_tensors[0].dtype, src_tensors[0].dtype
    device = ema_tensors[0].device
    table = _chunk_table(ema_tensors, src_tensors, device)
    n_chunks = table.shape[1]
    if n_chunks == 0:
        return
    acc = tl.float64 if e_dtype == torch.float64 else tl.float32
    _ema_chunks_kernel[(n_chunks,)](
        table[0], table[1], table[2], float(momentum),
        momentum_tensor if momentum_tensor is not None else table[2],
        HAS_MOMENTUM_PTR=momentum_tensor is not None,
        EMA_DTYPE=_TL[e_dtype], SRC_DTYPE=_TL[s_dtype], ACC_DTYPE=acc,
        CHUNK=CHUNK, BLOCK=BLOCK,
    )
