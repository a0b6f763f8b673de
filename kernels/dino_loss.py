"""Triton DINO loss, forward and backward, without a ``[rows, K]`` softmax in memory.

Notation (see ``ssl_fast/reference/dino_loss.py``): crop ``v`` of batch row ``b`` is student row
``v*B + b``, ``x_v = student_row / tau_s``; global view ``i`` is teacher row ``i*B + b``,
``z_i = (teacher_row - center) / tau_t``, ``t_i = softmax(z_i)``. Since ``sum_k t_i[k] = 1``::

    loss term (i, v) = -sum_k t_i[k] log softmax(x_v)[k] = log S_v - <t_i, x_v - m_v>
                     = log S_v - D_iv / Z_i,   D_iv = sum_k exp(z_i[k] - M_i) (x_v[k] - m_v) <= 0,
                                                Z_i  = sum_k exp(z_i[k] - M_i),  M_i = max_k z_i,
    with m_v = max_k x_v[k] and S_v = sum_k exp(x_v[k] - m_v), lse(x_v) = m_v + log S_v.

Both parts are non-negative, so nothing cancels: the older ``lse(x_v) - <t_i, x_v>`` subtracted
two numbers of the size of the logits (at logits ~1e12 the loss log 2 was lost). The online
statistics keep ``D_iv`` relative to the running max: when it moves from ``m`` to ``m'``,
``D_iv`` gains ``(m - m') Z_i`` (again <= 0).

Forward, step 1 (``_fwd_partial_kernel``, grid ``(B, S)``): program ``(b, s)`` reads the ``s``-th
slice of K of all ``ncrops`` student rows and ``n_global`` teacher rows of batch row ``b`` once,
tile by tile, keeping online statistics: per crop the running max and rescaled sum of
``exp(x_v)``; per global view ``(M_i, Z_i)`` and the rescaled dot products ``D_iv`` for every
crop. Crops form the first axis of a 2-D tile, so one program serves all crops of a row.
Step 2 (``_fwd_combine_kernel``, grid ``(B,)``) merges the ``S`` partial statistics in a fixed
order (deterministic, no atomics) into ``lse(x_v)``, ``lse(z_i) = M_i + log Z_i`` and the row's
loss sum; the launcher sums the ``B`` row losses. ``S`` is chosen so that ``B * S`` programs fill
the GPU (``K = 65536`` with ``B = 64`` still gets a few hundred programs).

Backward (``_bwd_kernel``, grid ``(B, cdiv(K, BLOCK))``)::

    dL/dstudent_v[k] = g / (B * n_terms * tau_s) * (count_v * softmax(x_v)[k] - sum_{i != v} t_i[k])

with ``count_v`` the number of global views ``i != v``. Both softmaxes are taken as
``exp(z - m) / S`` from each row's max ``m`` and exp-sum ``S``, recomputed by a pre-pass
(``_row_stats_kernel``, one program per row), and not as ``exp(z - lse)`` from the forward's
saved log-sum-exps: at ``|z|`` beyond about ``1e7`` a float32 ``lse = m + log S`` can no longer
hold ``log S``, and every entry tied at the maximum would get probability 1. The price is one
more read of the student and teacher rows; then each student row is read once more and its
gradient written once, the teacher row re-read (``n_global / ncrops`` of the traffic).

The center's column sums are not fused into the forward: ``update_center_`` is a separate
public op (as in the official code), and the teacher batch is ``n_global / ncrops`` of the bytes
the loss reads, so a plain reduction costs little next to the loss.

Inputs: float32, float16 or bfloat16 (student and teacher may differ); rows may be strided
(``stride(1) == 1``); math in float32; ``center`` float32 contiguous.
"""
import torch
import triton
import triton.language as tl

# Partial-statistics record per (b, split): m[C], s[C], D0[C], D1[C], M0, Z0, M1, Z1 (C = CROPS_P2).


@triton.jit
def _fwd_partial_kernel(student_ptr, teacher_ptr, center_ptr, part_ptr,
                        B, K, stride_s, stride_t, inv_tau_s, inv_tau_t,
                        NCROPS: tl.constexpr, CROPS_P2: tl.constexpr, N_GLOBAL: tl.constexpr,
                        BLOCK_K: tl.constexpr, TILES_PER_SPLIT: tl.constexpr):
    b = tl.program_id(0)
    split = tl.program_id(1)
    n_split = tl.num_programs(1)
    crops = tl.arange(0, CROPS_P2)
    # padding crops re-read the last real crop (finite values, never stored)
    crop_rows = (tl.minimum(crops, NCROPS - 1) * B + b).to(tl.int64)
    s_rows = student_ptr + crop_rows[:, None] * stride_s
    t0_row = teacher_ptr + b.to(tl.int64) * stride_t
    t1_row = teacher_ptr + (B + b).to(tl.int64) * stride_t
    k_lo = split * (TILES_PER_SPLIT * BLOCK_K)
    k_hi = tl.minimum(k_lo + TILES_PER_SPLIT * BLOCK_K, K)

    neg_inf = float("-inf")
    run_max = tl.full([CROPS_P2], neg_inf, tl.float32)
    run_sum = tl.zeros([CROPS_P2], tl.float32)
    max0 = tl.full([1], neg_inf, tl.float32)
    norm0 = tl.zeros([1], tl.float32)
    dot0 = tl.zeros([CROPS_P2], tl.float32)
    max1 = tl.full([1], neg_inf, tl.float32)
    norm1 = tl.zeros([1], tl.float32)
    dot1 = tl.zeros([CROPS_P2], tl.float32)
    # Loop bounds are compile-time constants (runtime bounds also break the interpreter with
    # numpy >= 2.4). The first tile of a slice always holds a real column, so the running maxima
    # are finite after it; trailing tiles of the last slice may be fully masked and add nothing.
    for tile in range(TILES_PER_SPLIT):
        offs = k_lo + tile * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = offs < k_hi
        x = tl.load(s_rows + offs[None, :], mask=kmask[None, :], other=0.0).to(tl.float32) * inv_tau_s
        x_masked = tl.where(kmask[None, :], x, neg_inf)
        new_max = tl.maximum(run_max, tl.max(x_masked, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x_masked - new_max[:, None]), axis=1)
        # the dot products are kept relative to the crop's running max (see the module docstring):
        # moving the max from m to m' adds (m - m') * Z to them (0 before the first tile)
        shift = tl.where(run_max == neg_inf, 0.0, run_max - new_max)
        xs = x - new_max[:, None]  # <= 0 at real columns
        run_max = new_max

        c = tl.load(center_ptr + offs, mask=kmask, other=0.0)
        z0 = (tl.load(t0_row + offs, mask=kmask, other=0.0).to(tl.float32) - c) * inv_tau_t
        z0 = tl.where(kmask, z0, neg_inf)
        new0 = tl.maximum(max0, tl.max(z0, axis=0))
        alpha0 = tl.exp(max0 - new0)
        e0 = tl.exp(z0[None, :] - new0[:, None])  # [1, BLOCK_K]
        dot0 = (dot0 + shift * norm0) * alpha0 + tl.sum(e0 * xs, axis=1)
        norm0 = norm0 * alpha0 + tl.sum(e0, axis=1)
        max0 = new0
        if N_GLOBAL == 2:
            z1 = (tl.load(t1_row + offs, mask=kmask, other=0.0).to(tl.float32) - c) * inv_tau_t
            z1 = tl.where(kmask, z1, neg_inf)
            new1 = tl.maximum(max1, tl.max(z1, axis=0))
            alpha1 = tl.exp(max1 - new1)
            e1 = tl.exp(z1[None, :] - new1[:, None])
            dot1 = (dot1 + shift * norm1) * alpha1 + tl.sum(e1 * xs, axis=1)
            norm1 = norm1 * alpha1 + tl.sum(e1, axis=1)
            max1 = new1

    width = 4 * CROPS_P2 + 4
    rec = part_ptr + (b.to(tl.int64) * n_split + split) * width
    tl.store(rec + crops, run_max)
    tl.store(rec + CROPS_P2 + crops, run_sum)
    tl.store(rec + 2 * CROPS_P2 + crops, dot0)
    tl.store(rec + 3 * CROPS_P2 + crops, dot1)
    one = tl.arange(0, 1)
    tl.store(rec + 4 * CROPS_P2 + one, max0)
    tl.store(rec + 4 * CROPS_P2 + 1 + one, norm0)
    tl.store(rec + 4 * CROPS_P2 + 2 + one, max1)
    tl.store(rec + 4 * CROPS_P2 + 3 + one, norm1)


@triton.jit
def _fwd_combine_kernel(part_ptr, row_loss_ptr, student_lse_ptr, teacher_lse_ptr, B,
                        NCROPS: tl.constexpr, CROPS_P2: tl.constexpr, N_GLOBAL: tl.constexpr,
                        N_SPLIT: tl.constexpr):
    b = tl.program_id(0)
    crops = tl.arange(0, CROPS_P2)
    one = tl.arange(0, 1)
    width = 4 * CROPS_P2 + 4
    neg_inf = float("-inf")
    run_max = tl.full([CROPS_P2], neg_inf, tl.float32)
    run_sum = tl.zeros([CROPS_P2], tl.float32)
    max0 = tl.full([1], neg_inf, tl.float32)
    norm0 = tl.zeros([1], tl.float32)
    dot0 = tl.zeros([CROPS_P2], tl.float32)
    max1 = tl.full([1], neg_inf, tl.float32)
    norm1 = tl.zeros([1], tl.float32)
    dot1 = tl.zeros([CROPS_P2], tl.float32)
    for j in range(N_SPLIT):  # fixed order: the result does not depend on scheduling
        rec = part_ptr + (b.to(tl.int64) * N_SPLIT + j) * width
        m_j = tl.load(rec + crops)
        s_j = tl.load(rec + CROPS_P2 + crops)
        new_max = tl.maximum(run_max, m_j)
        run_sum = run_sum * tl.exp(run_max - new_max) + s_j * tl.exp(m_j - new_max)
        # dot products relative to the crop max: re-based from run_max and m_j to new_max
        shift_old = tl.where(run_max == neg_inf, 0.0, run_max - new_max)
        shift_new = m_j - new_max
        run_max = new_max

        mx = tl.load(rec + 4 * CROPS_P2 + one)
        new0 = tl.maximum(max0, mx)
        a_old = tl.exp(max0 - new0)
        a_new = tl.exp(mx - new0)
        n_j = tl.load(rec + 4 * CROPS_P2 + 1 + one)
        dot0 = ((dot0 + shift_old * norm0) * a_old
                + (tl.load(rec + 2 * CROPS_P2 + crops) + shift_new * n_j) * a_new)
        norm0 = norm0 * a_old + n_j * a_new
        max0 = new0
        if N_GLOBAL == 2:
            mx1 = tl.load(rec + 4 * CROPS_P2 + 2 + one)
            new1 = tl.maximum(max1, mx1)
            a_old1 = tl.exp(max1 - new1)
            a_new1 = tl.exp(mx1 - new1)
            n1_j = tl.load(rec + 4 * CROPS_P2 + 3 + one)
            dot1 = ((dot1 + shift_old * norm1) * a_old1
                    + (tl.load(rec + 3 * CROPS_P2 + crops) + shift_new * n1_j) * a_new1)
            norm1 = norm1 * a_old1 + n1_j * a_new1
            max1 = new1

    log_sum = tl.log(run_sum)
    lse = run_max + log_sum
    real = crops < NCROPS
    tl.store(student_lse_ptr + crops * B + b, lse, mask=real)
    tl.store(teacher_lse_ptr + one * B + b, max0 + tl.log(norm0))
    # terms (0, v) for v != 0 and, with two global views, (1, v) for v != 1
    term0 = tl.where(real & (crops != 0), log_sum - dot0 / norm0, 0.0)
    row = tl.sum(term0, axis=0)
    if N_GLOBAL == 2:
        tl.store(teacher_lse_ptr + (1 + one) * B + b, max1 + tl.log(norm1))
        term1 = tl.where(real & (crops != 1), log_sum - dot1 / norm1, 0.0)
        row += tl.sum(term1, axis=0)
    tl.store(row_loss_ptr + b + one, tl.zeros([1], tl.float32) + row)


@triton.jit
def _row_stats_kernel(x_ptr, center_ptr, out_ptr, K, stride_x, inv_tau,
                      HAS_CENTER: tl.constexpr, BLOCK_K: tl.constexpr, N_TILES: tl.constexpr):
    """Row ``r``: ``m = max_k z[k]`` and ``S = sum_k exp(z[k] - m)`` with ``z = (x - c) * inv_tau``
    (``c`` the center when ``HAS_CENTER``, else 0), stored at ``out[2r], out[2r + 1]``."""
    r = tl.program_id(0)
    row = x_ptr + r.to(tl.int64) * stride_x
    neg_inf = float("-inf")
    run_max = tl.full([1], neg_inf, tl.float32)
    run_sum = tl.zeros([1], tl.float32)
    for tile in range(N_TILES):
        offs = tile * BLOCK_K + tl.arange(0, BLOCK_K)
        kmask = offs < K
        z = tl.load(row + offs, mask=kmask, other=0.0).to(tl.float32)
        if HAS_CENTER:
            z = z - tl.load(center_ptr + offs, mask=kmask, other=0.0)
        z = tl.where(kmask, z * inv_tau, neg_inf)[None, :]
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
    one = tl.arange(0, 1)
    tl.store(out_ptr + 2 * r + one, run_max)
    tl.store(out_ptr + 2 * r + 1 + one, run_sum)


@triton.jit
def _bwd_kernel(grad_loss_ptr, student_ptr, teacher_ptr, center_ptr, student_stats_ptr,
                teacher_stats_ptr, grad_ptr, B, K, stride_s, stride_t, stride_g,
                inv_tau_s, inv_tau_t, scale,
                NCROPS: tl.constexpr, CROPS_P2: tl.constexpr, N_GLOBAL: tl.constexpr,
                BLOCK_K: tl.constexpr):
    b = tl.program_id(0)
    kb = tl.program_id(1)
    offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = offs < K
    crops = tl.arange(0, CROPS_P2)
    real = crops < NCROPS
    rows = (tl.minimum(crops, NCROPS - 1) * B + b).to(tl.int64)
    one = tl.arange(0, 1)
    coef = tl.load(grad_loss_ptr + one).to(tl.float32) * scale * inv_tau_s  # [1]

    c = tl.load(center_ptr + offs, mask=kmask, other=0.0)
    # softmaxes as exp(z - max) / sum (not exp(z - lse): see the module docstring)
    m_t0 = tl.load(teacher_stats_ptr + 2 * b + one)
    s_t0 = tl.load(teacher_stats_ptr + 2 * b + 1 + one)
    z0 = (tl.load(teacher_ptr + b.to(tl.int64) * stride_t + offs, mask=kmask, other=0.0).to(tl.float32)
          - c) * inv_tau_t
    t0 = tl.exp(z0[None, :] - m_t0[:, None]) / s_t0[:, None]  # [1, BLOCK_K]
    if N_GLOBAL == 2:
        m_t1 = tl.load(teacher_stats_ptr + 2 * (B + b) + one)
        s_t1 = tl.load(teacher_stats_ptr + 2 * (B + b) + 1 + one)
        z1 = (tl.load(teacher_ptr + (B + b).to(tl.int64) * stride_t + offs, mask=kmask,
                      other=0.0).to(tl.float32) - c) * inv_tau_t
        t1 = tl.exp(z1[None, :] - m_t1[:, None]) / s_t1[:, None]
        # crop 0 pairs with view 1, crop 1 with view 0, local crops with both
        others = tl.where(crops[:, None] == 0, t1, tl.where(crops[:, None] == 1, t0, t0 + t1))
    else:
        others = tl.where(crops[:, None] == 0, 0.0, t0)
    count = N_GLOBAL - (crops < N_GLOBAL).to(tl.float32)

    srow = (crops * B + b) * 2
    m_s = tl.load(student_stats_ptr + srow, mask=real, other=float("inf"))  # padding: p = 0
    s_s = tl.load(student_stats_ptr + srow + 1, mask=real, other=1.0)
    x = tl.load(student_ptr + rows[:, None] * stride_s + offs[None, :], mask=kmask[None, :],
                other=0.0).to(tl.float32)
    p = tl.exp(x * inv_tau_s - m_s[:, None]) / s_s[:, None]
    grad = coef[:, None] * (count[:, None] * p - others)
    g_rows = (crops * B + b).to(tl.int64)
    tl.store(grad_ptr + g_rows[:, None] * stride_g + offs[None, :],
             grad.to(grad_ptr.dtype.element_ty), mask=real[:, None] & kmask[None, :])


def _crops_p2(ncrops: int) -> int:
    return max(2, triton.next_power_of_2(ncrops))


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one after another; fewer, larger ones are faster


def forward(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, ncrops: int,
            n_global: int, student_temp: float, teacher_temp: float, *, block_k: int = None,
            k_splits: int = None):
    """Fused forward.

    Args:
        student: ``[ncrops * B, K]``, ``stride(1) == 1``.
        teacher: ``[n_global * B, K]``, ``stride(1) == 1``.
        center: ``[1, K]`` float32, contiguous.
        block_k, k_splits: tile width and number of K slices; chosen here when ``None``
            (the tests force small values to exercise the multi-tile and multi-slice paths).

    Returns:
        ``(loss, student_lse [ncrops * B], teacher_lse [n_global * B])``, all float32.
    """
    rows, k = student.shape
    b = rows // ncrops
    crops_p2 = _crops_p2(ncrops)
    if block_k is None:
        block_k = max(16, min(4096 // crops_p2, triton.next_power_of_2(k)))
    n_tiles = triton.cdiv(k, block_k)
    if k_splits is None:
        k_splits = triton.cdiv(_target_programs(student.device), b)
    k_splits = max(1, min(k_splits, n_tiles))
    tiles_per_split = triton.cdiv(n_tiles, k_splits)
    k_splits = triton.cdiv(n_tiles, tiles_per_split)  # every slice holds at least one column
    f32 = dict(device=student.device, dtype=torch.float32)
    partials = torch.empty((b, k_splits, 4 * crops_p2 + 4), **f32)
    row_loss = torch.empty((b,), **f32)
    student_lse = torch.empty((rows,), **f32)
    teacher_lse = torch.empty((n_global * b,), **f32)
    num_warps = 8 if crops_p2 * block_k >= 4096 else 4
    _fwd_partial_kernel[(b, k_splits)](
        student, teacher, center, partials, b, k, student.stride(0), teacher.stride(0),
        1.0 / student_temp, 1.0 / teacher_temp, NCROPS=ncrops, CROPS_P2=crops_p2,
        N_GLOBAL=n_global, BLOCK_K=block_k, TILES_PER_SPLIT=tiles_per_split, num_warps=num_warps)
    _fwd_combine_kernel[(b,)](partials, row_loss, student_lse, teacher_lse, b, NCROPS=ncrops,
                              CROPS_P2=crops_p2, N_GLOBAL=n_global, N_SPLIT=k_splits, num_warps=1)
    n_terms = n_global * ncrops - n_global
    loss = row_loss.sum() / (b * n_terms)
    return loss, student_lse, teacher_lse


def backward(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
             center: torch.Tensor, student_lse: torch.Tensor, teacher_lse: torch.Tensor,
             ncrops: int, n_global: int, student_temp: float, teacher_temp: float, *,
             block_k: int = None) -> torch.Tensor:
    """Fused backward: the ``[ncrops * B, K]`` student gradient (student's dtype, contiguous).

    ``grad_loss`` is the 0-d upstream gradient; it is read on the device (no host sync).
    ``student_lse`` and ``teacher_lse`` are not used: a pre-pass (``_row_stats_kernel``)
    recomputes each row's max and exp-sum, see the module docstring.
    """
    rows, k = student.shape
    b = rows // ncrops
    crops_p2 = _crops_p2(ncrops)
    if block_k is None:
        block_k = max(16, min(4096 // crops_p2, triton.next_power_of_2(k)))
    stats_block = max(16, min(1024, triton.next_power_of_2(k)))
    stats_tiles = triton.cdiv(k, stats_block)
    student_stats = torch.empty((rows, 2), device=student.device, dtype=torch.float32)
    teacher_stats = torch.empty((n_global * b, 2), device=student.device, dtype=torch.float32)
    _row_stats_kernel[(rows,)](student, center, student_stats, k, student.stride(0), 1.0 / student_temp,
                               HAS_CENTER=False, BLOCK_K=stats_block, N_TILES=stats_tiles)
    _row_stats_kernel[(n_global * b,)](teacher, center, teacher_stats, k, teacher.stride(0),
                                       1.0 / teacher_temp, HAS_CENTER=True, BLOCK_K=stats_block,
                                       N_TILES=stats_tiles)
    grad = torch.empty((rows, k), device=student.device, dtype=student.dtype)
    n_terms = n_global * ncrops - n_global
    num_warps = 8 if crops_p2 * block_k >= 4096 else 4
    _bwd_kernel[(b, triton.cdiv(k, block_k))](
        grad_loss, student, teacher, center, student_stats, teacher_stats, grad, b, k,
        student.stride(0), teacher.stride(0), grad.stride(0),
        1.0 / student_temp, 1.0 / teacher_temp, 1.0 / (b * n_terms),
        NCROPS=ncrops, CROPS_P2=crops_p2, N_GLOBAL=n_global, BLOCK_K=block_k, num_warps=num_warps)
    return grad
