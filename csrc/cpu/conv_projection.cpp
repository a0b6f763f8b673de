// CvT convolutional q/k/v projection on the CPU: depthwise 3x3 conv (padding 1, strides s_q for q
// and s_kv for k and v) + BatchNorm2d, token map [B, H, W, C] (channels last) in, tokens
// [B, Ho*Wo, C] out. The conv runs row by row as a register stencil (nine weight vectors and a
// block of outputs in registers per channel vector). Train mode stores the conv outputs with
// their per-row statistics in one pass, then normalises them (they are also what the backward
// reads); eval mode normalises in registers and writes the tokens once, and its backward
// recomputes the conv. Batch statistics come from per-row partials (sum, M2) merged in a fixed
// order (Chan), so results do not depend on the number of threads.
// Math: ssl_fast/reference/conv_projection.py.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/vec.h"
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

using at::Tensor;

using namespace ssl_fast::vec;


// Runs f(Tag<Ops>, Int<NV>, c0) over channel blocks [c0, c0 + NV * Ops::W) covering
// [0, C): wide blocks first, then a scalar tail.
template <typename scalar_t, typename acc_t, typename F>
inline void for_channel_blocks(int64_t C, F&& f) {
  int64_t c0 = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>)
    for (; c0 + 64 <= C; c0 += 64) f(Tag<Avx512F>{}, Int<4>{}, c0);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    for (; c0 + 32 <= C; c0 += 32) f(Tag<Avx2F>{}, Int<4>{}, c0);
    for (; c0 + 8 <= C; c0 += 8) f(Tag<Avx2F>{}, Int<1>{}, c0);
  }
#endif
  for (; c0 + 4 <= C; c0 += 4) f(Tag<Scalar<scalar_t, acc_t>>{}, Int<4>{}, c0);
  for (; c0 < C; ++c0) f(Tag<Scalar<scalar_t, acc_t>>{}, Int<1>{}, c0);
}

inline int64_t out_len(int64_t n, int64_t s) { return (n - 1) / s + 1; }

// The three input rows h - 1, h, h + 1 of image b under a 3x3 tap window, the zero row zrow
// standing in for rows in the padding.
template <typename scalar_t>
inline void input_rows(const scalar_t* X, const scalar_t* zrow, int64_t b, int64_t h, int64_t H, int64_t W,
                       int64_t C, const scalar_t** xr) {
  for (int i = 0; i < 3; ++i) {
    const int64_t hh = h + i - 1;
    xr[i] = hh < 0 || hh >= H ? zrow : X + (b * H + hh) * W * C;
  }
}

// Runs f(Tag<Ops>, c0) over single-vector channel blocks [c0, c0 + Ops::W) covering [0, C): the
// stencil below keeps nine weight vectors and NO accumulators in registers, so one vector wide.
template <typename scalar_t, typename acc_t, typename F>
inline void for_channel_vectors(int64_t C, F&& f) {
  int64_t c0 = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>)
    for (; c0 + 16 <= C; c0 += 16) f(Tag<Avx512F>{}, c0);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>)
    for (; c0 + 8 <= C; c0 += 8) f(Tag<Avx2F>{}, c0);
#endif
  for (; c0 < C; ++c0) f(Tag<Scalar<scalar_t, acc_t>>{}, c0);
}

// One output row of one projection, one channel vector [c0, c0 + O::W): out[ow] = sum over the
// nine taps of w[t] * x[row i][s*ow + j - 1] (zero outside [0, W)). xr: the three input rows (a
// zero row where the row lies in the padding); wp: the projection's [9, C] weights, held in nine
// registers across the row. S is the stride when it is 1 or 2, known at compile time: interior
// outputs then go NO at a time, each loaded column feeding every output it touches, with NO
// independent FMA chains. Column edges, and any other stride (S = 0, s_rt), take the checked
// per-output path. EPI, the epilogue (see conv_row): RAW stores y; AFFINE stores
// (y - mean) * scale + beta; STATS stores y (non-temporal stores when `stream`: nothing reads it
// back here) and writes the row's mean and M2 to rmean[c0:], rm2[c0:], from sums of y - y[0]
// kept in registers (shifted data: no cancellation while the row's first value is within a few
// deviations of its mean).
enum class Epilogue { RAW, AFFINE, STATS };

template <typename O, int S, int NO, Epilogue EPI, typename scalar_t, typename acc_t, typename out_t>
__attribute__((always_inline)) inline void conv_row_vector(
    const scalar_t* const* xr, int64_t W, int64_t C, int64_t s_rt, int64_t Wo, const acc_t* wp, int64_t c0,
    out_t* dst, const acc_t* mean, const acc_t* scale, const acc_t* beta, acc_t* rmean, acc_t* rm2,
    bool stream) {
  using V = typename O::V;
  const int64_t s = S ? S : s_rt;
  V wv[9];  // kept in registers across the row
  for (int t = 0; t < 9; ++t) wv[t] = O::load(wp + t * C + c0);
  V mu = O::zero(), sc = O::zero(), be = O::zero(), k0 = O::zero(), s1 = O::zero(), s2 = O::zero();
  if constexpr (EPI == Epilogue::AFFINE) {
    mu = O::load(mean + c0);
    sc = O::load(scale + c0);
    be = O::load(beta + c0);
  }
  auto emit = [&](int64_t ow, V a) {
    if constexpr (EPI == Epilogue::AFFINE) a = O::fma(O::sub(a, mu), sc, be);
    if constexpr (EPI == Epilogue::STATS) {
      if (ow == 0) k0 = a;  // output 0 is always emitted first
      const V d = O::sub(a, k0);
      s1 = O::add(s1, d);
      s2 = O::fma(d, d, s2);
      if constexpr (std::is_same_v<out_t, acc_t>) {
        if (stream) {
          O::stream(dst + ow * C + c0, a);
          return;
        }
      }
    }
    O::put(dst + ow * C + c0, a);
  };
  auto finish = [&] {
    if constexpr (EPI == Epilogue::STATS) {
      // mean = y[0] + s1 / Wo, M2 = s2 - s1^2 / Wo
      const V inv = O::set1(acc_t(1) / static_cast<acc_t>(Wo));
      O::store(rmean + c0, O::fma(s1, inv, k0));
      O::store(rm2 + c0, O::sub(s2, O::mul(O::mul(s1, s1), inv)));
    }
  };
  auto checked = [&](int64_t ow) {
    V a = O::zero();
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) {
        const int64_t col = s * ow + j - 1;
        if (col >= 0 && col < W) a = O::fma(wv[3 * i + j], O::loadx(xr[i] + col * C + c0), a);
      }
    emit(ow, a);
  };
  // interior outputs: columns s*ow - 1 >= 0 and s*ow + 1 <= W - 1
  const int64_t lo = 1, hi = std::min(Wo - 1, W >= 2 ? (W - 2) / s : int64_t(-1));
  if (hi < lo) {
    for (int64_t ow = 0; ow < Wo; ++ow) checked(ow);
    finish();
    return;
  }
  checked(0);
  int64_t ow = lo;
  if constexpr (S > 0) {
    // walk each input row once per block of N outputs: every loaded column feeds the (up to
    // three) outputs whose taps cover it; one pointer per row keeps the addressing in registers
    auto block = [&](auto nt) {
      constexpr int N = decltype(nt)::value, NCOL = S * (N - 1) + 3;
      V a[N];
      for (int o = 0; o < N; ++o) a[o] = O::zero();
#pragma GCC unroll 3
      for (int i = 0; i < 3; ++i) {
        const scalar_t* xp = xr[i] + (S * ow - 1) * C + c0;
#pragma GCC unroll 32
        for (int k = 0; k < NCOL; ++k) {
          const V v = O::loadx(xp);
          xp += C;
#pragma GCC unroll 16
          for (int o = 0; o < N; ++o) {
            const int j = k - S * o;
            if (j >= 0 && j < 3) a[o] = O::fma(wv[3 * i + j], v, a[o]);
          }
        }
      }
      for (int o = 0; o < N; ++o) emit(ow + o, a[o]);
      ow += N;
    };
    // NO at a time, then smaller blocks for the rest of the interior (short rows: CvT stage 3
    // is 14 wide)
    while (ow + NO - 1 <= hi) block(Int<NO>{});
    if constexpr (NO > 4) if (ow + 3 <= hi) block(Int<4>{});
    if constexpr (NO > 2) if (ow + 1 <= hi) block(Int<2>{});
    if (ow <= hi) block(Int<1>{});
  }
  for (; ow <= hi; ++ow) checked(ow);
  for (ow = hi + 1; ow < Wo; ++ow) checked(ow);
  finish();
}

// BatchNorm's affine map, [3, C] each, applied as (y - mean) * scale + beta: folded into
// scale * y + shift it would cancel badly when |mean| >> std (y * scale and shift then nearly
// equal and opposite).
template <typename acc_t>
struct Affine {
  const acc_t* mean;
  const acc_t* scale;  // gamma * invstd
  const acc_t* beta;
};

// Depthwise 3x3 conv of input centre row h of image b for every projection p with dst[p] set
// (the caller sets only projections whose grid holds row h: h % s[p] == 0). dst[p] points at
// output column 0 of that output row ([Wo_p, C], channels last). Epilogue: the raw conv value y;
// or, when affine is given, BatchNorm's (y - mean[p, c]) * scale[p, c] + beta[p, c];
// or, when rmean is given, y plus the row's per-channel mean and M2 into rmean[p], rm2[p] ([C]
// each), with y written by non-temporal stores when `stream` (dst rows 64-byte aligned, C a
// multiple of 16). Stored as out_t. wt is [3, 9, C] (taps outermost, so the channel loop is
// contiguous); zrow is a zero row of W * C values standing in for the padding rows.
template <typename scalar_t, typename acc_t, typename out_t>
inline void conv_row(const scalar_t* X, const acc_t* wt, const scalar_t* zrow, int64_t b, int64_t h, int64_t H,
                     int64_t W, int64_t C, const int64_t* s, out_t* const* dst, const Affine<acc_t>* affine,
                     acc_t* const* rmean = nullptr, acc_t* const* rm2 = nullptr,
                     bool stream = false) {
  const scalar_t* xr[3];
  input_rows(X, zrow, b, h, H, W, C, xr);
  // Rows are visited in order and each channel vector strides across a row, which the hardware
  // prefetcher follows poorly: fetch the row after next while this one computes.
  if (h + 2 < H) {
    const char* next = reinterpret_cast<const char*>(X + (b * H + h + 2) * W * C);
    const int64_t bytes = W * C * static_cast<int64_t>(sizeof(scalar_t));
    for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(next + k, 0, 2);
  }
  for (int p = 0; p < 3; ++p) {
    if (!dst[p]) continue;
    const int64_t Wo = out_len(W, s[p]);
    const acc_t* mu = affine ? affine->mean + p * C : nullptr;
    const acc_t* sc = affine ? affine->scale + p * C : nullptr;
    const acc_t* be = affine ? affine->beta + p * C : nullptr;
    acc_t* ps = rmean ? rmean[p] : nullptr;
    acc_t* pm = rm2 ? rm2[p] : nullptr;
    const acc_t* wp = wt + p * 9 * C;
    for_channel_vectors<scalar_t, acc_t>(C, [&](auto ot, int64_t c0) {
      using O = typename decltype(ot)::type;
      auto run = [&](auto epi) {
        constexpr Epilogue E = decltype(epi)::value;
        if (s[p] == 1)
          conv_row_vector<O, 1, 8, E, scalar_t, acc_t, out_t>(xr, W, C, 1, Wo, wp, c0, dst[p], mu, sc, be, ps, pm,
                                                              stream);
        else if (s[p] == 2)
          conv_row_vector<O, 2, 8, E, scalar_t, acc_t, out_t>(xr, W, C, 2, Wo, wp, c0, dst[p], mu, sc, be, ps, pm,
                                                              stream);
        else
          conv_row_vector<O, 0, 1, E, scalar_t, acc_t, out_t>(xr, W, C, s[p], Wo, wp, c0, dst[p], mu, sc, be, ps,
                                                              pm, stream);
      };
      if (sc) run(std::integral_constant<Epilogue, Epilogue::AFFINE>{});
      else if (ps) run(std::integral_constant<Epilogue, Epilogue::STATS>{});
      else run(std::integral_constant<Epilogue, Epilogue::RAW>{});
    });
  }
}

// dw of one output row of one projection, one channel vector: wsum[t, c0:] += sum over ow of
// dy[ow] * x[row i][s*ow + j - 1] (zero outside [0, W)), the nine sums in registers across the
// row. xr: the three input rows under the output row (zero rows in the padding).
template <typename O, typename scalar_t, typename acc_t>
inline void dw_row_vector(const scalar_t* const* xr, const acc_t* dy, int64_t W, int64_t C, int64_t s,
                          int64_t Wo, int64_t c0, acc_t* wsum) {
  using V = typename O::V;
  V a[9];
  for (int t = 0; t < 9; ++t) a[t] = O::zero();
  auto checked = [&](int64_t ow) {
    const V dv = O::load(dy + ow * C + c0);
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) {
        const int64_t col = s * ow + j - 1;
        if (col >= 0 && col < W) a[3 * i + j] = O::fma(dv, O::loadx(xr[i] + col * C + c0), a[3 * i + j]);
      }
  };
  const int64_t lo = 1, hi = std::min(Wo - 1, W >= 2 ? (W - 2) / s : int64_t(-1));
  if (hi < lo) {
    for (int64_t ow = 0; ow < Wo; ++ow) checked(ow);
  } else {
    checked(0);
    const scalar_t* x0 = xr[0] + (s * lo - 1) * C + c0;
    const scalar_t* x1 = xr[1] + (s * lo - 1) * C + c0;
    const scalar_t* x2 = xr[2] + (s * lo - 1) * C + c0;
    const acc_t* d = dy + lo * C + c0;
    const int64_t step = s * C;
    for (int64_t ow = lo; ow <= hi; ++ow, x0 += step, x1 += step, x2 += step, d += C) {
      const V dv = O::load(d);
      a[0] = O::fma(dv, O::loadx(x0), a[0]);
      a[1] = O::fma(dv, O::loadx(x0 + C), a[1]);
      a[2] = O::fma(dv, O::loadx(x0 + 2 * C), a[2]);
      a[3] = O::fma(dv, O::loadx(x1), a[3]);
      a[4] = O::fma(dv, O::loadx(x1 + C), a[4]);
      a[5] = O::fma(dv, O::loadx(x1 + 2 * C), a[5]);
      a[6] = O::fma(dv, O::loadx(x2), a[6]);
      a[7] = O::fma(dv, O::loadx(x2 + C), a[7]);
      a[8] = O::fma(dv, O::loadx(x2 + 2 * C), a[8]);
    }
    for (int64_t ow = hi + 1; ow < Wo; ++ow) checked(ow);
  }
  for (int t = 0; t < 9; ++t) O::store(wsum + t * C + c0, O::add(O::load(wsum + t * C + c0), a[t]));
}

// dx of one input row from one projection, one channel vector (the transposed conv):
// dx[w] (+)= sum over the R given (weight row wr[r], dy row dyr[r]) pairs and taps j with
// (w + 1 - j) % s == 0 and 0 <= (w + 1 - j) / s < Wo of wr[r][j] * dyr[r][(w + 1 - j) / s].
// first: store instead of accumulate. S: the stride when 1 or 2 (fast interior paths), else 0.
template <typename O, int S, int R, typename acc_t>
inline void dx_row_vector(acc_t* dx, const acc_t* const* dyr, const typename O::V (*wr)[3], int64_t W,
                          int64_t C, int64_t s_rt, int64_t Wo, int64_t c0, bool first) {
  using V = typename O::V;
  const int64_t s = S ? S : s_rt;
  auto emit = [&](int64_t w, V a) {
    acc_t* p = dx + w * C + c0;
    O::store(p, first ? a : O::add(O::load(p), a));
  };
  auto checked = [&](int64_t w) {
    V a = O::zero();
    for (int j = 0; j < 3; ++j) {
      const int64_t num = w + 1 - j;
      if (num < 0 || num % s != 0 || num / s >= Wo) continue;
      for (int r = 0; r < R; ++r) a = O::fma(wr[r][j], O::load(dyr[r] + (num / s) * C + c0), a);
    }
    emit(w, a);
  };
  int64_t w = 0;
  if constexpr (S == 1) {
    // interior 1 <= w <= W - 2 (Wo == W): columns w - 1 .. w + NO, each feeding up to three outputs
    constexpr int NO = 8;
    checked(0);
    w = 1;
    auto block = [&](auto nt) {
      constexpr int N = decltype(nt)::value;
      V a[N];
      for (int o = 0; o < N; ++o) a[o] = O::zero();
#pragma GCC unroll 3
      for (int r = 0; r < R; ++r) {
        const acc_t* dp = dyr[r] + (w - 1) * C + c0;
#pragma GCC unroll 16
        for (int k = 0; k < N + 2; ++k) {
          const V v = O::load(dp);
          dp += C;
#pragma GCC unroll 8
          for (int o = 0; o < N; ++o) {
            const int j = o + 2 - k;
            if (j >= 0 && j < 3) a[o] = O::fma(wr[r][j], v, a[o]);
          }
        }
      }
      for (int o = 0; o < N; ++o) emit(w + o, a[o]);
      w += N;
    };
    while (w + NO - 1 <= W - 2) block(Int<NO>{});
    if (w + 3 <= W - 2) block(Int<4>{});
    if (w + 1 <= W - 2) block(Int<2>{});
    if (w <= W - 2) block(Int<1>{});
  } else if constexpr (S == 2) {
    // pairs (2m, 2m + 1) with m + 1 < Wo and 2m + 1 < W: dx[2m] = sum_r wr[r][1] dy[m],
    // dx[2m + 1] = sum_r wr[r][0] dy[m + 1] + wr[r][2] dy[m]
    checked(0);
    w = 1;
    for (int64_t m = 1; m + 1 < Wo && 2 * m + 1 < W; ++m) {
      for (; w < 2 * m; ++w) checked(w);
      V ae = O::zero(), ao = O::zero();
      for (int r = 0; r < R; ++r) {
        const V d0 = O::load(dyr[r] + m * C + c0), d1 = O::load(dyr[r] + (m + 1) * C + c0);
        ae = O::fma(wr[r][1], d0, ae);
        ao = O::fma(wr[r][2], d0, O::fma(wr[r][0], d1, ao));
      }
      emit(2 * m, ae);
      emit(2 * m + 1, ao);
      w = 2 * m + 2;
    }
  }
  for (; w < W; ++w) checked(w);
}

// out[c] = (y[c] - mean[c]) * scale[c] + beta[c] for one float pixel row written with
// non-temporal stores:
// the tokens are not read again here, and streaming them skips the read-for-ownership of every
// output line (a third of this pass's memory traffic). Returns false (nothing written) where
// this does not apply: another dtype, no AVX2, C not a multiple of 8 or an unaligned row.
template <typename scalar_t, typename acc_t>
inline bool stream_affine_row(scalar_t* out, const acc_t* y, const Affine<acc_t>& aff, int64_t p, int64_t C) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (C % 8 != 0 || reinterpret_cast<uintptr_t>(out) % 32 != 0) return false;
    const float *mu = aff.mean + p * C, *sc = aff.scale + p * C, *be = aff.beta + p * C;
    for (int64_t c = 0; c < C; c += 8)
      _mm256_stream_ps(out + c, _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(y + c), _mm256_loadu_ps(mu + c)),
                                                _mm256_loadu_ps(sc + c), _mm256_loadu_ps(be + c)));
    return true;
  }
#endif
  return false;
}

// out[k] = src[k] (k < n) for float rows, with non-temporal stores (see stream_affine_row).
// Returns false (nothing written) for another dtype, without AVX2 or for unaligned rows.
template <typename scalar_t, typename acc_t>
inline bool stream_row(scalar_t* out, const acc_t* src, int64_t n) {
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (n % 8 != 0 || reinterpret_cast<uintptr_t>(out) % 32 != 0) return false;
    for (int64_t k = 0; k < n; k += 8) _mm256_stream_ps(out + k, _mm256_loadu_ps(src + k));
    return true;
  }
#endif
  return false;
}

// Orders this thread's non-temporal stores before whatever follows (another thread reading them).
inline void stream_fence() {
#if defined(__AVX2__) && defined(__FMA__)
  _mm_sfence();
#endif
}

// Asks Linux for transparent huge pages under a large, not yet touched output buffer. Buffers
// this size come from a fresh mmap on every call, and first-touch faults on 4 KiB pages (one per
// 4 KiB written) cost more than the kernel's own work at CvT stage-1 sizes. A hint only: no
// effect where THP is off, and the contents are unchanged either way.
inline void advise_huge_pages(const Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = end & ~(kHuge - 1);
  if (t.nbytes() >= 4 * kHuge && hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// Offsets of the per-projection output rows in one [sum_p Wo_p, C] row buffer.
inline void row_offsets(const int64_t* Wo, int64_t C, int64_t* off) {
  off[0] = 0;
  for (int p = 0; p < 3; ++p) off[p + 1] = off[p] + Wo[p] * C;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> fwd_cpu(
    const Tensor& x_in, const Tensor& weight, const Tensor& gamma, const Tensor& beta,
    const std::optional<Tensor>& running_mean, const std::optional<Tensor>& running_var,
    at::ArrayRef<double> eps, int64_t stride_q, int64_t stride_kv, bool use_batch_stats) {
  TORCH_CHECK(x_in.dim() == 4, "conv_qkv_projection_fwd: x must be [B, H, W, C]");
  TORCH_CHECK(eps.size() == 3, "conv_qkv_projection_fwd: eps needs 3 values");
  TORCH_CHECK(stride_q >= 1 && stride_kv >= 1, "conv_qkv_projection_fwd: strides must be >= 1");
  const Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  TORCH_CHECK(weight.sizes() == at::IntArrayRef({3, C, 9}), "conv_qkv_projection_fwd: weight must be [3, C, 9]");
  const int64_t s[3] = {stride_q, stride_kv, stride_kv};
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto aopt = x.options().dtype(acc_type);
  const Tensor wt = weight.to(acc_type).permute({0, 2, 1}).contiguous();  // [3, 9, C]
  const Tensor g = gamma.to(acc_type).contiguous(), be = beta.to(acc_type).contiguous();
  int64_t Ho[3], Wo[3];
  Tensor yacc[3], out[3], ysave[3];
  for (int p = 0; p < 3; ++p) {
    Ho[p] = out_len(H, s[p]);
    Wo[p] = out_len(W, s[p]);
    out[p] = at::empty({B, Ho[p] * Wo[p], C}, x.options());
    // train: the conv outputs, kept for the backward (the same buffer when x is in the
    // accumulation dtype); eval: none (normalised in registers; the backward recomputes them)
    yacc[p] = use_batch_stats ? at::empty({B, Ho[p] * Wo[p], C}, aopt) : at::empty({0}, aopt);
    ysave[p] = !use_batch_stats ? at::empty({0}, x.options())
               : acc_type == x.scalar_type() ? yacc[p] : at::empty({B, Ho[p] * Wo[p], C}, x.options());
    advise_huge_pages(out[p]);
    advise_huge_pages(yacc[p]);
    if (!ysave[p].is_same(yacc[p])) advise_huge_pages(ysave[p]);
  }
  Tensor mean = at::empty({3, C}, aopt), invstd = at::empty({3, C}, aopt), var = at::empty({3, C}, aopt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_qkv_projection_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* X = x.data_ptr<scalar_t>();
    const acc_t* WT = wt.data_ptr<acc_t>();
    const Tensor zero_row = at::zeros({W * C}, x.options());  // the padding rows
    const scalar_t* Z = zero_row.data_ptr<scalar_t>();
    acc_t* M = mean.data_ptr<acc_t>();
    acc_t* IS = invstd.data_ptr<acc_t>();
    acc_t* V = var.data_ptr<acc_t>();
    if (use_batch_stats) {
      // pass 1: per input row, the conv rows of every projection on it with their per-row
      // partials (mean, M2 around it) from registers: [3, B*H, C], off-grid rows unused
      Tensor pmean = at::empty({3, B * H, C}, aopt), pm2 = at::empty({3, B * H, C}, aopt);
      acc_t* PS = pmean.data_ptr<acc_t>();
      acc_t* PM = pm2.data_ptr<acc_t>();
      acc_t* Y[3] = {yacc[0].data_ptr<acc_t>(), yacc[1].data_ptr<acc_t>(), yacc[2].data_ptr<acc_t>()};
      // y is not read again in this pass: stream it out where every row is 64-byte aligned
      bool stream = C % 16 == 0;
      for (int p = 0; p < 3; ++p) stream = stream && reinterpret_cast<uintptr_t>(Y[p]) % 64 == 0;
      at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / H, h = r % H;
          acc_t* d[3];
          acc_t* ps[3];
          acc_t* pm[3];
          bool any = false;
          for (int p = 0; p < 3; ++p) {
            d[p] = h % s[p] == 0 ? Y[p] + ((b * Ho[p] + h / s[p]) * Wo[p]) * C : nullptr;
            ps[p] = PS + (p * B * H + r) * C;
            pm[p] = PM + (p * B * H + r) * C;
            any = any || d[p];
          }
          if (any) conv_row<scalar_t, acc_t, acc_t>(X, WT, Z, b, h, H, W, C, s, d, nullptr, ps, pm, stream);
        }
        stream_fence();
      });
      // merge the per-row partials in row order (deterministic), parallel over channel blocks.
      // Every row holds Wo values, so the mean is the mean of the row means, summed as offsets
      // from the first row's (small numbers, little rounding even when |mean| >> std); then
      // M2 = sum over rows of M2_row + Wo * (mean_row - mean)^2 (Chan).
      for (int p = 0; p < 3; ++p) {
        const int64_t n_total = B * Ho[p] * Wo[p];
        TORCH_CHECK(n_total > 1, "conv_qkv_projection_fwd: batch statistics need more than one value per channel");
        const acc_t* ps = PS + p * B * H * C;
        const acc_t* pm = PM + p * B * H * C;
        const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(B * Ho[p]);
        const acc_t n_row = static_cast<acc_t>(Wo[p]);
        at::parallel_for(0, C, 16, [&](int64_t cbeg, int64_t cend) {
          const int64_t nc = cend - cbeg;
          std::vector<acc_t> off(nc, 0), m2(nc, 0);
          acc_t* T = off.data();
          acc_t* M2 = m2.data();
          const acc_t* ref = ps + cbeg;  // row 0 of image 0 is on every grid
          for (int64_t r = 0; r < B * H; ++r) {
            if ((r % H) % s[p] != 0) continue;
            const acc_t* pr = ps + r * C + cbeg;
_Pragma("omp simd")
            for (int64_t c = 0; c < nc; ++c) T[c] += pr[c] - ref[c];
          }
          for (int64_t c = 0; c < nc; ++c) T[c] = ref[c] + T[c] * inv_rows;  // the mean
          for (int64_t r = 0; r < B * H; ++r) {
            if ((r % H) % s[p] != 0) continue;
            const acc_t* pr = ps + r * C + cbeg;
            const acc_t* qr = pm + r * C + cbeg;
_Pragma("omp simd")
            for (int64_t c = 0; c < nc; ++c) {
              const acc_t dv = pr[c] - T[c];
              M2[c] += qr[c] + n_row * dv * dv;
            }
          }
          for (int64_t c = 0; c < nc; ++c) {
            const acc_t vb = M2[c] / static_cast<acc_t>(n_total);
            M[p * C + cbeg + c] = T[c];
            IS[p * C + cbeg + c] = acc_t(1) / std::sqrt(vb + static_cast<acc_t>(eps[p]));
            V[p * C + cbeg + c] = M2[c] / static_cast<acc_t>(n_total - 1);
          }
        });
      }
    } else {
      TORCH_CHECK(running_mean.has_value() && running_var.has_value(),
                  "conv_qkv_projection_fwd: eval mode needs running_mean and running_var");
      const Tensor rm = running_mean->to(acc_type).contiguous(), rv = running_var->to(acc_type).contiguous();
      for (int p = 0; p < 3; ++p)
        for (int64_t c = 0; c < C; ++c) {
          M[p * C + c] = rm.data_ptr<acc_t>()[p * C + c];
          V[p * C + c] = rv.data_ptr<acc_t>()[p * C + c];
          IS[p * C + c] = acc_t(1) / std::sqrt(V[p * C + c] + static_cast<acc_t>(eps[p]));
        }
    }
    const acc_t* G = g.data_ptr<acc_t>();
    const acc_t* Be = be.data_ptr<acc_t>();
    std::vector<acc_t> scale(3 * C);
    for (int64_t k = 0; k < 3 * C; ++k) scale[k] = G[k] * IS[k];
    const Affine<acc_t> aff{M, scale.data(), Be};
    scalar_t* OUT[3] = {out[0].data_ptr<scalar_t>(), out[1].data_ptr<scalar_t>(), out[2].data_ptr<scalar_t>()};
    if (!use_batch_stats) {
      // eval: one pass, the conv normalised in registers and written once as tokens
      at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / H, h = r % H;
          scalar_t* d[3];
          bool any = false;
          for (int p = 0; p < 3; ++p) {
            d[p] = h % s[p] == 0 ? OUT[p] + ((b * Ho[p] + h / s[p]) * Wo[p]) * C : nullptr;
            any = any || d[p];
          }
          if (any) conv_row<scalar_t, acc_t, scalar_t>(X, WT, Z, b, h, H, W, C, s, d, &aff);
        }
      });
      return;
    }
    // train, pass 2: normalise the stored conv outputs (and copy them to x's dtype when it differs)
    for (int p = 0; p < 3; ++p) {
      const acc_t* y = yacc[p].data_ptr<acc_t>();
      const acc_t *mu = M + p * C, *sc = scale.data() + p * C, *bt = Be + p * C;
      scalar_t* o = OUT[p];
      scalar_t* ys = ysave[p].is_same(yacc[p]) ? nullptr : ysave[p].data_ptr<scalar_t>();
      at::parallel_for(0, B * Ho[p] * Wo[p], 64, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          if (!stream_affine_row(o + i * C, y + i * C, aff, p, C)) {
_Pragma("omp simd")
            for (int64_t c = 0; c < C; ++c)
              o[i * C + c] = static_cast<scalar_t>((y[i * C + c] - mu[c]) * sc[c] + bt[c]);
          }
          if (ys) {
_Pragma("omp simd")
            for (int64_t c = 0; c < C; ++c) ys[i * C + c] = static_cast<scalar_t>(y[i * C + c]);
          }
        }
        stream_fence();
      });
    }
  });
  return {out[0], out[1], out[2], ysave[0], ysave[1], ysave[2], mean, invstd, var};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> bwd_cpu(
    const Tensor& gq, const Tensor& gk, const Tensor& gv, const Tensor& x_in, const Tensor& weight,
    const Tensor& gamma, const Tensor& mean, const Tensor& invstd, const Tensor& yq, const Tensor& yk,
    const Tensor& yv, int64_t stride_q, int64_t stride_kv, bool use_batch_stats) {
  TORCH_CHECK(x_in.dim() == 4, "conv_qkv_projection_bwd: x must be [B, H, W, C]");
  const Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const int64_t s[3] = {stride_q, stride_kv, stride_kv};
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto aopt = x.options().dtype(acc_type);
  const Tensor wt = weight.to(acc_type).permute({0, 2, 1}).contiguous();  // [3, 9, C]
  const Tensor ga = gamma.to(acc_type).contiguous(), mu = mean.to(acc_type).contiguous(),
               is = invstd.to(acc_type).contiguous();
  int64_t Ho[3], Wo[3], off[4];
  for (int p = 0; p < 3; ++p) { Ho[p] = out_len(H, s[p]); Wo[p] = out_len(W, s[p]); }
  row_offsets(Wo, C, off);
  const Tensor gin[3] = {gq, gk, gv};
  const Tensor ys[3] = {yq, yk, yv};
  Tensor gx = at::empty({B, H, W, C}, x.options());
  advise_huge_pages(gx);
  Tensor gw = at::empty({3, 9, C}, aopt), gg = at::empty({3, C}, aopt), gb = at::empty({3, C}, aopt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_qkv_projection_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* X = x.data_ptr<scalar_t>();
    const acc_t* WT = wt.data_ptr<acc_t>();
    const Tensor zero_row = at::zeros({W * C}, x.options());  // the padding rows
    const scalar_t* Z = zero_row.data_ptr<scalar_t>();
    // the conv outputs saved by the train-mode forward; recomputed from x where empty (eval)
    Tensor g[3], y[3];
    const acc_t* Gp[3];
    const acc_t* Yp[3];
    for (int p = 0; p < 3; ++p) {
      g[p] = gin[p].to(acc_type).contiguous();
      Gp[p] = g[p].data_ptr<acc_t>();
      Yp[p] = nullptr;
      if (ys[p].numel() != 0) {
        TORCH_CHECK(ys[p].numel() == gin[p].numel(), "conv_qkv_projection_bwd: y and grad shapes differ");
        y[p] = ys[p].to(acc_type).contiguous();
        Yp[p] = y[p].data_ptr<acc_t>();
      }
    }
    const acc_t* MU = mu.data_ptr<acc_t>();
    // pass 1: per output row of every projection, [sum g, sum g * (y - mu)] (y recomputed per
    // input row into a thread-local buffer when not saved); partials [3, B*H, 2, C] (off-grid
    // rows unused), registers across the row, one store per row
    Tensor part = at::empty({3, B * H, 2, C}, aopt);
    acc_t* P = part.data_ptr<acc_t>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(off[3]);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / H, h = r % H;
        acc_t* d[3];
        bool recompute = false;
        for (int p = 0; p < 3; ++p) {
          d[p] = h % s[p] == 0 && !Yp[p] ? buf.data() + off[p] : nullptr;
          recompute = recompute || d[p];
        }
        if (recompute) conv_row<scalar_t, acc_t, acc_t>(X, WT, Z, b, h, H, W, C, s, d, nullptr);
        for (int p = 0; p < 3; ++p) {
          if (h % s[p] != 0) continue;
          const int64_t Wop = Wo[p];
          acc_t* pb = P + (p * B * H + r) * 2 * C;
          acc_t* pg = pb + C;
          const int64_t orow = (b * Ho[p] + h / s[p]) * Wop * C;
          const acc_t* gr = Gp[p] + orow;
          const acc_t* yr = Yp[p] ? Yp[p] + orow : d[p];
          const acc_t* Mu = MU + p * C;
          for_channel_blocks<scalar_t, acc_t>(C, [&](auto ot, auto nvt, int64_t c0) {
            using O = typename decltype(ot)::type;
            constexpr int NV = decltype(nvt)::value, VW = O::W;
            typename O::V sb[NV], sg[NV], m[NV];
            for (int k = 0; k < NV; ++k) {
              sb[k] = O::zero();
              sg[k] = O::zero();
              m[k] = O::load(Mu + c0 + k * VW);
            }
            for (int64_t o = 0; o < Wop; ++o)
              for (int k = 0; k < NV; ++k) {
                const typename O::V gv = O::load(gr + o * C + c0 + k * VW);
                sb[k] = O::add(sb[k], gv);
                sg[k] = O::fma(gv, O::sub(O::load(yr + o * C + c0 + k * VW), m[k]), sg[k]);
              }
            for (int k = 0; k < NV; ++k) {
              O::store(pb + c0 + k * VW, sb[k]);
              O::store(pg + c0 + k * VW, sg[k]);
            }
          });
        }
      }
    });
    // dbeta, dgamma: the row partials merged in row order per channel (deterministic, parallel
    // over channels); then the per-channel coefficients of
    // dy = a * (g - k1 - (y - mu) * invstd * k2)   (train; eval: k1 = k2 = 0).
    // Kept in this form: expanding it into b*y + c cancels badly when |mean| >> std.
    std::vector<acc_t> coef[3];  // [4, C]: a, k1, e = invstd * k2, mu
    for (int p = 0; p < 3; ++p) {
      const int64_t n = B * Ho[p] * Wo[p];
      const acc_t* Mu = MU + p * C;
      const acc_t* IS = is.data_ptr<acc_t>() + p * C;
      const acc_t* GA = ga.data_ptr<acc_t>() + p * C;
      const acc_t* Pp = P + p * B * H * 2 * C;
      acc_t* DB = gb.data_ptr<acc_t>() + p * C;
      acc_t* DG = gg.data_ptr<acc_t>() + p * C;
      coef[p].assign(4 * C, acc_t(0));
      acc_t* CF = coef[p].data();
      const acc_t on = use_batch_stats ? acc_t(1) : acc_t(0);
      at::parallel_for(0, C, 16, [&](int64_t cbeg, int64_t cend) {
        for (int64_t c = cbeg; c < cend; ++c) { DB[c] = 0; DG[c] = 0; }
        for (int64_t r = 0; r < B * H; ++r) {
          if ((r % H) % s[p] != 0) continue;
          const acc_t* pr = Pp + r * 2 * C;
_Pragma("omp simd")
          for (int64_t c = cbeg; c < cend; ++c) { DB[c] += pr[c]; DG[c] += pr[C + c]; }
        }
        for (int64_t c = cbeg; c < cend; ++c) {
          DG[c] *= IS[c];
          CF[c] = GA[c] * IS[c];
          CF[C + c] = on * DB[c] / static_cast<acc_t>(n);
          CF[2 * C + c] = IS[c] * (on * DG[c] / static_cast<acc_t>(n));
          CF[3 * C + c] = Mu[c];
        }
      });
    }
    // pass 2, dx and dw over fixed chunks of RB input rows (a function of the shape only). Each
    // chunk first computes the dy rows it touches (output rows lo..hi per projection; a few rows
    // twice at chunk edges, with values independent of the chunk) into scratch; then dw of the
    // output rows centred in the chunk (register stencils, partials [chunks, 27, C] merged in
    // chunk order: deterministic) and dx of its input rows (the transposed conv, per row).
    scalar_t* GX = gx.data_ptr<scalar_t>();
    constexpr int64_t RB = 16;
    const int64_t nrows = B * H, nchunks = (nrows + RB - 1) / RB;
    Tensor wpart = at::empty({nchunks, 27, C}, aopt);
    acc_t* WP = wpart.data_ptr<acc_t>();
    int64_t soff[4] = {0, 0, 0, 0};
    for (int p = 0; p < 3; ++p) soff[p + 1] = soff[p] + (RB + 2) * Wo[p] * C;
    at::parallel_for(0, nchunks, 1, [&](int64_t cbeg, int64_t cend) {
      std::vector<acc_t> scratch(soff[3]);
      std::vector<acc_t> dxbuf(W * C);  // one dx row, accumulated in cache, then streamed out
      for (int64_t ch = cbeg; ch < cend; ++ch) {
        acc_t* wpc = WP + ch * 27 * C;
        std::fill(wpc, wpc + 27 * C, acc_t(0));
        const int64_t r0 = ch * RB, r1 = std::min(nrows, (ch + 1) * RB);
        // dy rows [lo_p, hi_p] (global output rows b * Ho + oh) needed by input rows r0..r1-1
        int64_t lo[3], hi[3];
        const acc_t* DYp[3];
        for (int p = 0; p < 3; ++p) {
          lo[p] = INT64_MAX;
          hi[p] = -1;
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t b = r / H, h = r % H;
            for (int i = 0; i < 3; ++i) {
              const int64_t nh = h + 1 - i;
              if (nh < 0 || nh % s[p] != 0 || nh / s[p] >= Ho[p]) continue;
              const int64_t o = b * Ho[p] + nh / s[p];
              lo[p] = std::min(lo[p], o);
              hi[p] = std::max(hi[p], o);
            }
          }
          acc_t* D = scratch.data() + soff[p];
          DYp[p] = D - (hi[p] >= lo[p] ? lo[p] * Wo[p] * C : 0);
          if (hi[p] < lo[p]) continue;
          TORCH_INTERNAL_ASSERT(hi[p] - lo[p] + 1 <= RB + 2);
          const acc_t* Y = Yp[p] ? Yp[p] + lo[p] * Wo[p] * C : D;
          if (!Yp[p])
            for (int64_t o = lo[p]; o <= hi[p]; ++o) {
              acc_t* d[3] = {nullptr, nullptr, nullptr};
              d[p] = D + (o - lo[p]) * Wo[p] * C;
              conv_row<scalar_t, acc_t, acc_t>(X, WT, Z, o / Ho[p], (o % Ho[p]) * s[p], H, W, C, s, d, nullptr);
            }
          const acc_t* CF = coef[p].data();
          const acc_t *CA = CF, *CB = CF + C, *CE = CF + 2 * C, *CM = CF + 3 * C;
          const acc_t* G = Gp[p] + lo[p] * Wo[p] * C;
          const int64_t npix = (hi[p] - lo[p] + 1) * Wo[p];
          for (int64_t i = 0; i < npix; ++i) {
_Pragma("omp simd")
            for (int64_t c = 0; c < C; ++c)
              D[i * C + c] = CA[c] * ((G[i * C + c] - CB[c]) - (Y[i * C + c] - CM[c]) * CE[c]);
          }
        }
        // dw: the output rows whose centre input row lies in this chunk (each row in one chunk)
        for (int p = 0; p < 3; ++p) {
          for (int64_t o = lo[p]; o <= hi[p]; ++o) {
            const int64_t b = o / Ho[p], hc = (o % Ho[p]) * s[p];
            if (b * H + hc < r0 || b * H + hc >= r1) continue;
            const scalar_t* xr[3];
            input_rows(X, Z, b, hc, H, W, C, xr);
            const acc_t* dy = DYp[p] + o * Wo[p] * C;
            for_channel_vectors<scalar_t, acc_t>(C, [&](auto ot, int64_t c0) {
              using O = typename decltype(ot)::type;
              dw_row_vector<O, scalar_t, acc_t>(xr, dy, W, C, s[p], Wo[p], c0, wpc + p * 9 * C);
            });
          }
        }
        // dx, one input row at a time: the transposed conv of every projection, accumulated in
        // the gx row itself (float) or in an acc_t row then converted
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / H, h = r % H;
          acc_t* dxr = dxbuf.data();
          bool first = true;
          for (int p = 0; p < 3; ++p) {
            int n = 0, iv[3];
            const acc_t* rows[3];
            for (int i = 0; i < 3; ++i) {
              const int64_t nh = h + 1 - i;
              if (nh < 0 || nh % s[p] != 0 || nh / s[p] >= Ho[p]) continue;
              iv[n] = i;
              rows[n] = DYp[p] + (b * Ho[p] + nh / s[p]) * Wo[p] * C;
              ++n;
            }
            if (n == 0) continue;
            for_channel_vectors<scalar_t, acc_t>(C, [&](auto ot, int64_t c0) {
              using O = typename decltype(ot)::type;
              typename O::V wr[3][3];
              for (int k = 0; k < n; ++k)
                for (int j = 0; j < 3; ++j) wr[k][j] = O::load(WT + (p * 9 + 3 * iv[k] + j) * C + c0);
              auto call = [&](auto st, auto rt) {
                dx_row_vector<O, decltype(st)::value, decltype(rt)::value, acc_t>(dxr, rows, wr, W, C, s[p], Wo[p],
                                                                                  c0, first);
              };
              auto by_rows = [&](auto st) {
                if (n == 1) call(st, Int<1>{});
                else if (n == 2) call(st, Int<2>{});
                else call(st, Int<3>{});
              };
              if (s[p] == 1) by_rows(Int<1>{});
              else if (s[p] == 2) by_rows(Int<2>{});
              else by_rows(Int<0>{});
            });
            first = false;
          }
          if (first) std::fill(dxr, dxr + W * C, acc_t(0));
          scalar_t* gxr = GX + r * W * C;
          if (!stream_row(gxr, dxr, W * C)) {
_Pragma("omp simd")
            for (int64_t k = 0; k < W * C; ++k) gxr[k] = static_cast<scalar_t>(dxr[k]);
          }
        }
      }
      stream_fence();
    });
    acc_t* GW = gw.data_ptr<acc_t>();
    at::parallel_for(0, 27 * C, 256, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) GW[k] = 0;
      for (int64_t ch = 0; ch < nchunks; ++ch) {
        const acc_t* src = WP + ch * 27 * C;
_Pragma("omp simd")
        for (int64_t k = begin; k < end; ++k) GW[k] += src[k];
      }
    });
  });
  return {gx, gw.permute({0, 2, 1}).contiguous(), gg, gb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ssl_fast_C, m) {
  m.def("conv_qkv_projection_fwd(Tensor x, Tensor weight, Tensor gamma, Tensor beta, Tensor? running_mean, "
        "Tensor? running_var, float[] eps, int stride_q, int stride_kv, bool use_batch_stats) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("conv_qkv_projection_bwd(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor x, Tensor weight, "
        "Tensor gamma, Tensor mean, Tensor invstd, Tensor y_q, Tensor y_k, Tensor y_v, int stride_q, "
        "int stride_kv, bool use_batch_stats) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ssl_fast_C, CPU, m) {
  m.impl("conv_qkv_projection_fwd", &fwd_cpu);
  m.impl("conv_qkv_projection_bwd", &bwd_cpu);
}
