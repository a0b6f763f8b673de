// Multi-head attention on the CPU, forward and backward, with every bias kind of
// ssl_fast.ops.attention computed inside the kernel (math: ssl_fast/reference/attention.py).
//
// Flash-style: a tile of BQ queries of one (batch, head) meets the keys BK at a time; the logits
// tile S = scale q k^T is finished in place with the bias (Swin table + shifted-window mask,
// decomposed relative position with any q grid / k grid, additive or boolean mask with any
// broadcast strides, hashed dropout), an online softmax keeps the row max m and sum l, and the
// output accumulates P v. The forward saves lse = m + log l (+inf for a fully masked row, so
// that exp(s - lse) = 0 there); the backward recomputes P = exp(S - lse) tile by tile. Nothing
// of size Nq x Nk exists: the decomposed terms are q_i . Rh[yi, ky] ([BQ, kh]) and q_i . Rw[xi, kx]
// ([BQ, kw]) per query tile, the table index is computed from the coordinates.
//
// Inner products: the four tile products (q k^T, P v in the forward; dO v^T, dS k, dS^T q, P^T dO
// in the backward) go through the BLAS sgemm/dgemm that torch's CPU library exports (MKL in
// torch's x86 builds) on float32 (float64) tiles, not through hand-written loops: see
// MEASURED below for the comparison on this host. The elementwise work around the products
// (bias, exp, row statistics) is hand-written with the shared vector layer cpu/vec.h.
// Measured (shared host, AMD EPYC with AVX-512, 1 thread, 64 x Nk x 64 tiles): q k^T by sgemm
// 102 us at Nk = 196 and 255 us at Nk = 512 against 128 and 402 us for a register-blocked
// AVX-512 loop (4 keys x 16 lanes, horizontal sums); P v by sgemm 100 and 258 us against 77 and
// 318 us for a broadcast-FMA loop. sgemm is kept for all four products: it wins or ties on the
// larger tiles, takes every head dim and float64 with one code path, and picks its own kernel
// for the host it runs on (AVX2 or AVX-512) at run time.
// bf16/fp16 inputs are widened to float once per call (O(N D) memory), so every product and
// accumulation is float32; float64 runs in float64 (gradcheck).
//
// Threads: the forward runs (batch, head, query tile) in parallel; the backward runs (batch,
// head) in parallel, each owning its dk, dv rows, and writes position-gradient partials per
// (batch, head) that are summed afterwards in a fixed order: results do not depend on the
// number of threads, and position gradients are deterministic.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "cpu/vec.h"

namespace {

using at::Tensor;
using ssl_fast::vec::exp_shift_sum;
using ssl_fast::vec::exp_vec;

constexpr int64_t kBQ = 64;   // query rows per tile
constexpr int64_t kBK = 512;  // keys per tile

// The Fortran BLAS entry points that torch's CPU library exports (MKL or OpenBLAS builds);
// at::native::cpublas::gemm is not exported to extensions. Weak, so that a torch without them
// still loads this module and takes the at::mm fallback below.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

// Row-major C[M, N] = alpha op(A) op(B) + beta C (C is not read when beta == 0), as the
// column-major C^T = op(B)^T op(A)^T.
template <typename acc_t>
inline void mm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, acc_t alpha, const acc_t* A, int64_t lda,
               const acc_t* B, int64_t ldb, acc_t beta, acc_t* C, int64_t ldc) {
  const char ca = ta ? 'T' : 'N', cb = tb ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<acc_t, float>) {
    if (sgemm_ != nullptr) return sgemm_(&cb, &ca, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&cb, &ca, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
  }
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  auto view = [&](const acc_t* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    at::Tensor x = at::from_blob(const_cast<acc_t*>(p), {rows, cols}, {ld, 1}, opt);
    return t ? x.t() : x;
  };
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  at::Tensor prod = at::mm(view(A, ta ? K : M, ta ? M : K, lda, ta), view(B, tb ? N : K, tb ? K : N, ldb, tb));
  if (beta == acc_t(0))
    c.copy_(prod.mul_(alpha));
  else
    c.mul_(beta).add_(prod, alpha);
}

// lowbias32 (C. Wellons); the reference's dropout_keep restates these exact bits.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

inline bool dropout_keep(uint64_t n, uint32_t seed, uint32_t threshold) {
  const uint32_t r = mix32(static_cast<uint32_t>(n) ^ mix32(static_cast<uint32_t>(n >> 32) + seed));
  return (r >> 8) >= threshold;
}

// Everything the bias of one tile needs, as float/double arrays (converted once per call).
template <typename acc_t>
struct Bias {
  int64_t B = 0, H = 0, Nq = 0, Nk = 0, D = 0;
  // Swin table [L, H] and window mask [nW, N, N]
  const acc_t* table = nullptr;
  int64_t Wh = 0, Ww = 0;
  const acc_t* wmask = nullptr;
  int64_t nW = 1;
  // decomposed: rel_h [Lh, D], rel_w [Lw, D], index tables [qh, kh] and [qw, kw]
  const acc_t* rel_h = nullptr;
  const acc_t* rel_w = nullptr;
  int64_t qh = 0, qw = 0, kh = 0, kw = 0;
  std::vector<int64_t> idx_h, idx_w;
  // attn_mask viewed as [B, H, Nq, Nk] with broadcast (zero) strides
  const acc_t* amask = nullptr;
  const bool* bmask = nullptr;
  int64_t ms[4] = {0, 0, 0, 0};
  // dropout
  double p = 0.0;
  acc_t keep_scale = 1;
  uint32_t seed = 0, threshold = 0;

  bool decomposed() const { return rel_h != nullptr; }

  // Rh[r, ky] = q_r . rel_h[idx_h[yi, ky]] and Rw[r, kx] likewise, for rows i0 .. i0 + bq.
  void rel_dots(const acc_t* q, int64_t i0, int64_t bq, acc_t* rh, acc_t* rw) const {
    for (int64_t r = 0; r < bq; ++r) {
      const int64_t i = i0 + r, yi = i / qw, xi = i % qw;
      const acc_t* qi = q + r * D;
      for (int64_t ky = 0; ky < kh; ++ky) rh[r * kh + ky] = ssl_fast::vec::dot(qi, rel_h + idx_h[yi * kh + ky] * D, D);
      for (int64_t kx = 0; kx < kw; ++kx) rw[r * kw + kx] = ssl_fast::vec::dot(qi, rel_w + idx_w[xi * kw + kx] * D, D);
    }
  }

  // S[r, c] += bias(b, h, i0 + r, j0 + c) for the tile; masked entries become -inf.
  void add(acc_t* S, int64_t ld, int64_t b, int64_t h, int64_t i0, int64_t bq, int64_t j0, int64_t bk,
           const acc_t* rh, const acc_t* rw) const {
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    for (int64_t r = 0; r < bq; ++r) {
      acc_t* s = S + r * ld;
      const int64_t i = i0 + r;
      if (table != nullptr) {
        const int64_t yi = i / Ww, xi = i % Ww, row = 2 * Ww - 1;
        int64_t yj = j0 / Ww, xj = j0 % Ww;
        for (int64_t c = 0; c < bk; ++c) {
          s[c] += table[((yi - yj + Wh - 1) * row + (xi - xj + Ww - 1)) * H + h];
          if (++xj == Ww) xj = 0, ++yj;
        }
        if (wmask != nullptr) {
          const acc_t* w = wmask + ((b % nW) * Nq + i) * Nk + j0;
          for (int64_t c = 0; c < bk; ++c) s[c] += w[c];
        }
      }
      if (rel_h != nullptr) {
        const acc_t* a = rh + r * kh;
        const acc_t* e = rw + r * kw;
        int64_t ky = j0 / kw, kx = j0 % kw;
        for (int64_t c = 0; c < bk;) {  // one run of keys per key row: a[ky] + e[kx .. kx + run)
          const int64_t run = std::min(kw - kx, bk - c);
          const acc_t av = a[ky];
          acc_t* sc = s + c;
          const acc_t* ec = e + kx;
          for (int64_t t = 0; t < run; ++t) sc[t] += av + ec[t];
          c += run;
          kx += run;
          if (kx == kw) kx = 0, ++ky;
        }
      }
      if (amask != nullptr) {
        const acc_t* m = amask + b * ms[0] + h * ms[1] + i * ms[2] + j0 * ms[3];
        for (int64_t c = 0; c < bk; ++c) s[c] += m[c * ms[3]];
      } else if (bmask != nullptr) {
        const bool* m = bmask + b * ms[0] + h * ms[1] + i * ms[2] + j0 * ms[3];
        for (int64_t c = 0; c < bk; ++c) s[c] = m[c * ms[3]] ? s[c] : kNegInf;
      }
    }
  }

  // P[r, c] *= keep(b, h, i0 + r, j0 + c) / (1 - p), into `out` (may equal P).
  void dropout(const acc_t* P, acc_t* out, int64_t ld, int64_t b, int64_t h, int64_t i0, int64_t bq, int64_t j0,
               int64_t bk) const {
    for (int64_t r = 0; r < bq; ++r) {
      const uint64_t base = static_cast<uint64_t>(((b * H + h) * Nq + i0 + r) * Nk + j0);
      for (int64_t c = 0; c < bk; ++c)
        out[r * ld + c] = dropout_keep(base + c, seed, threshold) ? P[r * ld + c] * keep_scale : acc_t(0);
    }
  }
};

// SAM's get_rel_pos index along one axis (ssl_fast/reference/attention.py decomposed_index).
std::vector<int64_t> decomposed_index(int64_t q_len, int64_t k_len) {
  std::vector<int64_t> idx(q_len * k_len);
  const double qs = std::max(static_cast<double>(k_len) / q_len, 1.0);
  const double ks = std::max(static_cast<double>(q_len) / k_len, 1.0);
  for (int64_t y = 0; y < q_len; ++y)
    for (int64_t x = 0; x < k_len; ++x)
      idx[y * k_len + x] = static_cast<int64_t>(std::floor(y * qs - x * ks + (k_len - 1) * ks));
  return idx;
}

struct Prepared {
  at::ScalarType acc;
  Tensor q, k, v, table, wmask, rel_h, rel_w, amask;  // acc dtype, contiguous (amask: expanded view)
};

template <typename acc_t>
Bias<acc_t> make_bias(const Prepared& P, const Tensor& q, const Tensor& k, at::IntArrayRef sizes, double dropout_p,
                      int64_t seed) {
  Bias<acc_t> bias;
  bias.B = q.size(0), bias.H = q.size(1), bias.Nq = q.size(2), bias.Nk = k.size(2), bias.D = q.size(3);
  if (P.table.defined()) {
    bias.table = P.table.data_ptr<acc_t>();
    bias.Wh = sizes[0], bias.Ww = sizes[1];
    if (P.wmask.defined()) bias.wmask = P.wmask.data_ptr<acc_t>(), bias.nW = P.wmask.size(0);
  }
  if (P.rel_h.defined()) {
    bias.rel_h = P.rel_h.data_ptr<acc_t>(), bias.rel_w = P.rel_w.data_ptr<acc_t>();
    bias.qh = sizes[2], bias.qw = sizes[3], bias.kh = sizes[4], bias.kw = sizes[5];
    bias.idx_h = decomposed_index(bias.qh, bias.kh);
    bias.idx_w = decomposed_index(bias.qw, bias.kw);
  }
  if (P.amask.defined()) {
    if (P.amask.scalar_type() == at::kBool)
      bias.bmask = P.amask.data_ptr<bool>();
    else
      bias.amask = P.amask.data_ptr<acc_t>();
    for (int d = 0; d < 4; ++d) bias.ms[d] = P.amask.stride(d);
  }
  bias.p = dropout_p;
  if (dropout_p > 0.0) {
    bias.keep_scale = dropout_p < 1.0 ? acc_t(1.0 / (1.0 - dropout_p)) : acc_t(0);
    // keep when (r >> 8) / 2^24 >= p, as in the reference
    bias.threshold = static_cast<uint32_t>(std::min(std::ceil(dropout_p * 16777216.0), 16777216.0));
    bias.seed = static_cast<uint32_t>(static_cast<uint64_t>(seed) & 0xffffffffULL);
  }
  return bias;
}

Prepared prepare(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& table,
                 const std::optional<Tensor>& window_mask, const std::optional<Tensor>& rel_h,
                 const std::optional<Tensor>& rel_w, const std::optional<Tensor>& attn_mask, at::IntArrayRef sizes) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention_fwd: q, k, v must be [B, H, N, D]");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && k.size(0) == v.size(0) && k.size(1) == v.size(1) &&
                  q.size(3) == k.size(3) && k.size(2) == v.size(2),
              "attention: q, k, v shapes do not fit together");
  TORCH_CHECK(sizes.size() == 6, "attention: sizes must be [Wh, Ww, qh, qw, kh, kw]");
  Prepared P;
  P.acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto widen = [&](const Tensor& t) { return t.to(P.acc).contiguous(); };
  P.q = widen(q), P.k = widen(k), P.v = widen(v);
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Nk = k.size(2), D = q.size(3);
  if (table.has_value() && table->defined()) {
    TORCH_CHECK(sizes[0] * sizes[1] == Nq && Nq == Nk, "attention: window size does not match the tokens");
    TORCH_CHECK(table->dim() == 2 && table->size(0) == (2 * sizes[0] - 1) * (2 * sizes[1] - 1) && table->size(1) == H,
                "attention: table must be [(2Wh-1)(2Ww-1), H]");
    P.table = widen(*table);
    if (window_mask.has_value() && window_mask->defined()) {
      TORCH_CHECK(window_mask->dim() == 3 && window_mask->size(1) == Nq && window_mask->size(2) == Nk &&
                      B % window_mask->size(0) == 0,
                  "attention: window_mask must be [nW, N, N] with B a multiple of nW");
      P.wmask = widen(*window_mask);
    }
  }
  if (rel_h.has_value() && rel_h->defined()) {
    TORCH_CHECK(rel_w.has_value() && rel_w->defined(), "attention: rel_h needs rel_w");
    TORCH_CHECK(sizes[2] * sizes[3] == Nq && sizes[4] * sizes[5] == Nk, "attention: grids do not match the tokens");
    TORCH_CHECK(rel_h->dim() == 2 && rel_h->size(0) == 2 * std::max(sizes[2], sizes[4]) - 1 && rel_h->size(1) == D &&
                    rel_w->dim() == 2 && rel_w->size(0) == 2 * std::max(sizes[3], sizes[5]) - 1 && rel_w->size(1) == D,
                "attention: rel_h / rel_w have the wrong shape");
    P.rel_h = widen(*rel_h), P.rel_w = widen(*rel_w);
  }
  if (attn_mask.has_value() && attn_mask->defined()) {
    TORCH_CHECK(attn_mask->dim() <= 4, "attention: attn_mask must have at most 4 dimensions");
    const Tensor m = attn_mask->scalar_type() == at::kBool ? *attn_mask : attn_mask->to(P.acc);
    P.amask = m.expand({B, H, Nq, Nk});
  }
  return P;
}

template <typename acc_t>
void forward_kernel(const Prepared& P, const Bias<acc_t>& bias, acc_t scale, acc_t* out, acc_t* lse) {
  const int64_t B = bias.B, H = bias.H, Nq = bias.Nq, Nk = bias.Nk, D = bias.D, Dv = P.v.size(3);
  const acc_t* Q = P.q.data_ptr<acc_t>();
  const acc_t* K = P.k.data_ptr<acc_t>();
  const acc_t* V = P.v.data_ptr<acc_t>();
  const int64_t n_qt = (Nq + kBQ - 1) / kBQ;
  const int64_t bk_max = std::min(kBK, Nk);
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, B * H * n_qt, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> S(kBQ * bk_max), m(kBQ), l(kBQ), rh(kBQ * std::max<int64_t>(bias.kh, 1)),
        rw(kBQ * std::max<int64_t>(bias.kw, 1));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / n_qt, b = bh / H, h = bh % H;
      const int64_t i0 = (task % n_qt) * kBQ, bq = std::min(kBQ, Nq - i0);
      const acc_t* Qt = Q + (bh * Nq + i0) * D;
      const acc_t* Kb = K + bh * Nk * D;
      const acc_t* Vb = V + bh * Nk * Dv;
      acc_t* O = out + (bh * Nq + i0) * Dv;
      std::fill(O, O + bq * Dv, acc_t(0));
      std::fill(m.begin(), m.end(), -kInf);
      std::fill(l.begin(), l.end(), acc_t(0));
      if (bias.decomposed()) bias.rel_dots(Qt, i0, bq, rh.data(), rw.data());
      for (int64_t j0 = 0; j0 < Nk; j0 += kBK) {
        const int64_t bk = std::min(kBK, Nk - j0);
        mm<acc_t>(false, true, bq, bk, D, scale, Qt, D, Kb + j0 * D, D, acc_t(0), S.data(), bk_max);
        bias.add(S.data(), bk_max, b, h, i0, bq, j0, bk, rh.data(), rw.data());
        for (int64_t r = 0; r < bq; ++r) {
          acc_t* s = S.data() + r * bk_max;
          bool nan = false;
          const acc_t mx = ssl_fast::vec::max_and_nan(s, bk, &nan);
          acc_t m_new = std::max(m[r], mx);
          if (nan || m[r] != m[r]) m_new = std::numeric_limits<acc_t>::quiet_NaN();
          if (m_new == -kInf) {  // every key so far masked: nothing to add
            std::fill(s, s + bk, acc_t(0));
            continue;
          }
          const acc_t alpha = m[r] == -kInf ? acc_t(0) : exp_vec(m[r] - m_new);
          const acc_t sum = exp_shift_sum(s, bk, m_new);
          l[r] = l[r] * alpha + sum;
          m[r] = m_new;
          if (alpha != acc_t(1)) {
            acc_t* o = O + r * Dv;
            for (int64_t d = 0; d < Dv; ++d) o[d] *= alpha;
          }
        }
        if (bias.p > 0.0) bias.dropout(S.data(), S.data(), bk_max, b, h, i0, bq, j0, bk);
        mm<acc_t>(false, false, bq, Dv, bk, acc_t(1), S.data(), bk_max, Vb + j0 * Dv, Dv, acc_t(1), O, Dv);
      }
      for (int64_t r = 0; r < bq; ++r) {
        acc_t* o = O + r * Dv;
        if (m[r] == -kInf) {  // fully masked row: zero output, lse = +inf
          std::fill(o, o + Dv, acc_t(0));
          lse[bh * Nq + i0 + r] = kInf;
          continue;
        }
        const acc_t inv = acc_t(1) / l[r];
        for (int64_t d = 0; d < Dv; ++d) o[d] *= inv;
        lse[bh * Nq + i0 + r] = m[r] + std::log(l[r]);
      }
    }
  });
}

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const std::optional<Tensor>& table, const std::optional<Tensor>& window_mask,
                                         const std::optional<Tensor>& rel_h, const std::optional<Tensor>& rel_w,
                                         const std::optional<Tensor>& attn_mask, double scale, at::IntArrayRef sizes,
                                         double dropout_p, int64_t seed) {
  const Prepared P = prepare(q, k, v, table, window_mask, rel_h, rel_w, attn_mask, sizes);
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), Dv = v.size(3);
  Tensor out = at::empty({B, H, Nq, Dv}, q.options().dtype(P.acc));
  Tensor lse = at::empty({B, H, Nq}, q.options().dtype(P.acc));
  if (P.acc == at::kDouble) {
    forward_kernel<double>(P, make_bias<double>(P, q, k, sizes, dropout_p, seed), scale, out.data_ptr<double>(),
                           lse.data_ptr<double>());
  } else {
    forward_kernel<float>(P, make_bias<float>(P, q, k, sizes, dropout_p, seed), static_cast<float>(scale),
                          out.data_ptr<float>(), lse.data_ptr<float>());
  }
  return {out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type()), lse};
}

// Gradients written by the backward kernel: dq, dk, dv ([B, H, N, D] acc), position partials
// per (b, h): table [B, H, L] or decomposed [B, H, Lh + Lw, D].
template <typename acc_t>
void backward_kernel(const Prepared& P, const Bias<acc_t>& bias, acc_t scale, const acc_t* dO, const acc_t* Oa,
                     const acc_t* lse, acc_t* dq, acc_t* dk, acc_t* dv, acc_t* part, int64_t part_len) {
  const int64_t B = bias.B, H = bias.H, Nq = bias.Nq, Nk = bias.Nk, D = bias.D, Dv = P.v.size(3);
  const acc_t* Q = P.q.data_ptr<acc_t>();
  const acc_t* K = P.k.data_ptr<acc_t>();
  const acc_t* V = P.v.data_ptr<acc_t>();
  const int64_t bk_max = std::min(kBK, Nk);
  const int64_t Lh = bias.decomposed() ? P.rel_h.size(0) : 0;
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> S(kBQ * bk_max), dS(kBQ * bk_max), Pd(bias.p > 0.0 ? kBQ * bk_max : 0), Di(kBQ),
        rh(kBQ * std::max<int64_t>(bias.kh, 1)), rw(kBQ * std::max<int64_t>(bias.kw, 1)),
        drh(kBQ * std::max<int64_t>(bias.kh, 1)), drw(kBQ * std::max<int64_t>(bias.kw, 1));
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const acc_t* Kb = K + bh * Nk * D;
      const acc_t* Vb = V + bh * Nk * Dv;
      acc_t* dKb = dk + bh * Nk * D;
      acc_t* dVb = dv + bh * Nk * Dv;
      acc_t* pt = part_len ? part + bh * part_len : nullptr;
      std::fill(dKb, dKb + Nk * D, acc_t(0));
      std::fill(dVb, dVb + Nk * Dv, acc_t(0));
      if (pt) std::fill(pt, pt + part_len, acc_t(0));
      for (int64_t i0 = 0; i0 < Nq; i0 += kBQ) {
        const int64_t bq = std::min(kBQ, Nq - i0);
        const acc_t* Qt = Q + (bh * Nq + i0) * D;
        const acc_t* dOt = dO + (bh * Nq + i0) * Dv;
        const acc_t* Ot = Oa + (bh * Nq + i0) * Dv;
        const acc_t* L = lse + bh * Nq + i0;
        acc_t* dQt = dq + (bh * Nq + i0) * D;
        std::fill(dQt, dQt + bq * D, acc_t(0));
        for (int64_t r = 0; r < bq; ++r) {
          acc_t s = 0;
          for (int64_t d = 0; d < Dv; ++d) s += dOt[r * Dv + d] * Ot[r * Dv + d];
          Di[r] = s;
        }
        if (bias.decomposed()) {
          bias.rel_dots(Qt, i0, bq, rh.data(), rw.data());
          std::fill(drh.begin(), drh.end(), acc_t(0));
          std::fill(drw.begin(), drw.end(), acc_t(0));
        }
        for (int64_t j0 = 0; j0 < Nk; j0 += kBK) {
          const int64_t bk = std::min(kBK, Nk - j0);
          mm<acc_t>(false, true, bq, bk, D, scale, Qt, D, Kb + j0 * D, D, acc_t(0), S.data(), bk_max);
          bias.add(S.data(), bk_max, b, h, i0, bq, j0, bk, rh.data(), rw.data());
          // P = exp(S - lse); a fully masked row has lse = +inf and gets exp(-inf) = 0
          for (int64_t r = 0; r < bq; ++r) exp_shift_sum(S.data() + r * bk_max, bk, L[r]);
          const acc_t* Pv = S.data();
          if (bias.p > 0.0) {
            bias.dropout(S.data(), Pd.data(), bk_max, b, h, i0, bq, j0, bk);
            Pv = Pd.data();
          }
          mm<acc_t>(true, false, bk, Dv, bq, acc_t(1), Pv, bk_max, dOt, Dv, acc_t(1), dVb + j0 * Dv, Dv);
          mm<acc_t>(false, true, bq, bk, Dv, acc_t(1), dOt, Dv, Vb + j0 * Dv, Dv, acc_t(0), dS.data(), bk_max);
          if (bias.p > 0.0) bias.dropout(dS.data(), dS.data(), bk_max, b, h, i0, bq, j0, bk);
          for (int64_t r = 0; r < bq; ++r) {
            const acc_t* p = S.data() + r * bk_max;
            acc_t* g = dS.data() + r * bk_max;
            const acc_t di = Di[r];
            for (int64_t c = 0; c < bk; ++c) g[c] = p[c] * (g[c] - di);
          }
          if (bias.table != nullptr) {
            const int64_t row = 2 * bias.Ww - 1, Ww = bias.Ww, Wh = bias.Wh;
            for (int64_t r = 0; r < bq; ++r) {
              const int64_t i = i0 + r, yi = i / Ww, xi = i % Ww;
              int64_t yj = j0 / Ww, xj = j0 % Ww;
              const acc_t* g = dS.data() + r * bk_max;
              for (int64_t c = 0; c < bk; ++c) {
                pt[(yi - yj + Wh - 1) * row + (xi - xj + Ww - 1)] += g[c];
                if (++xj == Ww) xj = 0, ++yj;
              }
            }
          }
          if (bias.decomposed()) {
            const int64_t kw = bias.kw, kh = bias.kh;
            for (int64_t r = 0; r < bq; ++r) {
              const acc_t* g = dS.data() + r * bk_max;
              acc_t* a = drh.data() + r * kh;
              acc_t* e = drw.data() + r * kw;
              int64_t ky = j0 / kw, kx = j0 % kw;
              for (int64_t c = 0; c < bk;) {  // one run of keys per key row: its sum to a, elementwise to e
                const int64_t run = std::min(kw - kx, bk - c);
                a[ky] += ssl_fast::vec::sum_and_accumulate(g + c, run, e + kx);
                c += run;
                kx += run;
                if (kx == kw) kx = 0, ++ky;
              }
            }
          }
          mm<acc_t>(false, false, bq, D, bk, scale, dS.data(), bk_max, Kb + j0 * D, D, acc_t(1), dQt, D);
          mm<acc_t>(true, false, bk, D, bq, scale, dS.data(), bk_max, Qt, D, acc_t(1), dKb + j0 * D, D);
        }
        if (bias.decomposed()) {  // dq += dRh Rh + dRw Rw; drel_h[idx] += dRh q (unscaled q)
          const int64_t kh = bias.kh, kw = bias.kw, qw = bias.qw;
          for (int64_t r = 0; r < bq; ++r) {
            const int64_t i = i0 + r, yi = i / qw, xi = i % qw;
            const acc_t* qi = Qt + r * D;
            acc_t* gq = dQt + r * D;
            for (int64_t ky = 0; ky < kh; ++ky) {
              const int64_t t = bias.idx_h[yi * kh + ky];
              const acc_t a = drh[r * kh + ky];
              const acc_t* row = bias.rel_h + t * D;
              acc_t* grow = pt + t * D;
              for (int64_t d = 0; d < D; ++d) gq[d] += a * row[d], grow[d] += a * qi[d];
            }
            for (int64_t kx = 0; kx < kw; ++kx) {
              const int64_t t = bias.idx_w[xi * kw + kx];
              const acc_t a = drw[r * kw + kx];
              const acc_t* row = bias.rel_w + t * D;
              acc_t* grow = pt + (Lh + t) * D;
              for (int64_t d = 0; d < D; ++d) gq[d] += a * row[d], grow[d] += a * qi[d];
            }
          }
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> attention_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    const std::optional<Tensor>& table, const std::optional<Tensor>& window_mask, const std::optional<Tensor>& rel_h,
    const std::optional<Tensor>& rel_w, const std::optional<Tensor>& attn_mask, double scale, at::IntArrayRef sizes,
    double dropout_p, int64_t seed) {
  const Prepared P = prepare(q, k, v, table, window_mask, rel_h, rel_w, attn_mask, sizes);
  const int64_t B = q.size(0), H = q.size(1);
  const Tensor dO = dout.to(P.acc).contiguous(), Oa = out.to(P.acc).contiguous(), La = lse.to(P.acc).contiguous();
  Tensor dq = at::empty(P.q.sizes(), P.q.options()), dk = at::empty(P.k.sizes(), P.k.options()),
         dv = at::empty(P.v.sizes(), P.v.options());
  int64_t part_len = 0;
  if (P.table.defined()) part_len = P.table.size(0);
  if (P.rel_h.defined()) part_len = (P.rel_h.size(0) + P.rel_w.size(0)) * q.size(3);
  Tensor part = at::empty({B * H * std::max<int64_t>(part_len, 1)}, P.q.options());
  if (P.acc == at::kDouble) {
    backward_kernel<double>(P, make_bias<double>(P, q, k, sizes, dropout_p, seed), scale, dO.data_ptr<double>(),
                            Oa.data_ptr<double>(), La.data_ptr<double>(), dq.data_ptr<double>(), dk.data_ptr<double>(),
                            dv.data_ptr<double>(), part.data_ptr<double>(), part_len);
  } else {
    backward_kernel<float>(P, make_bias<float>(P, q, k, sizes, dropout_p, seed), static_cast<float>(scale),
                           dO.data_ptr<float>(), Oa.data_ptr<float>(), La.data_ptr<float>(), dq.data_ptr<float>(),
                           dk.data_ptr<float>(), dv.data_ptr<float>(), part.data_ptr<float>(), part_len);
  }
  // fixed-order sums of the per-(b, h) partials (at::sum over a leading dim of a contiguous
  // tensor reduces in a fixed order for a given shape: no atomics, no thread dependence)
  Tensor dtable = at::empty({0}, q.options()), drel_h = at::empty({0}, q.options()),
         drel_w = at::empty({0}, q.options());
  if (P.table.defined()) {
    Tensor pt = part.view({B, H, part_len});
    Tensor acc = pt.select(0, 0).clone();
    for (int64_t b = 1; b < B; ++b) acc.add_(pt.select(0, b));
    dtable = at::empty_like(*table).copy_(acc.t());  // the strides of empty_like, as the fake
  }
  if (P.rel_h.defined()) {
    const int64_t D = q.size(3), Lh = P.rel_h.size(0);
    Tensor pt = part.view({B * H, part_len});
    Tensor acc = pt.select(0, 0).clone();
    for (int64_t i = 1; i < B * H; ++i) acc.add_(pt.select(0, i));
    acc = acc.view({-1, D});
    drel_h = at::empty_like(*rel_h).copy_(acc.narrow(0, 0, Lh));
    drel_w = at::empty_like(*rel_w).copy_(acc.narrow(0, Lh, P.rel_w.size(0)));
  }
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()), dtable, drel_h, drel_w};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ssl_fast_C, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? table, Tensor? window_mask, Tensor? rel_h, "
      "Tensor? rel_w, Tensor? attn_mask, float scale, int[] sizes, float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? table, "
      "Tensor? window_mask, Tensor? rel_h, Tensor? rel_w, Tensor? attn_mask, float scale, int[] sizes, "
      "float dropout_p, int seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ssl_fast_C, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}
