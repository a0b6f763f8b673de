// CvT convolutional q/k/v projection on the CPU: depthwise 3x3 conv (padding 1, strides s_q for q
// and s_kv for k and v) + BatchNorm2d, token map [B, H, W, C] (channels last) in, tokens
// [B, Ho*Wo, C] out. One pass over the token map computes all three convolutions: every centre
// pixel loads its nine taps once and feeds q (when the centre lies on the q grid) and k, v (on the
// k/v grid). Batch statistics come from per-row partials (sum, M2) merged in a fixed order (Chan),
// so results do not depend on the number of threads. Math: ssl_fast/reference/conv_projection.py.
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

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

// Channel-block vector helpers: the kernels keep NV vectors of W channels in registers per
// accumulator. Scalar<scalar_t, acc_t> (W = 1) is the portable fallback (and the channel tail);
// Avx2F (W = 8, AVX2 + FMA) serves float inputs where the compiler targets it.
template <typename scalar_t, typename acc_t>
struct Scalar {
  using V = acc_t;
  static constexpr int W = 1;
  static V zero() { return acc_t(0); }
  static V load(const acc_t* p) { return *p; }
  static V loadx(const scalar_t* p) { return static_cast<acc_t>(*p); }
  static void store(acc_t* p, V v) { *p = v; }
  static void storex(scalar_t* p, V v) { *p = static_cast<scalar_t>(v); }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V fnma(V a, V b, V c) { return c - a * b; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
};

#if defined(__AVX2__) && defined(__FMA__)
struct Avx2F {
  using V = __m256;
  static constexpr int W = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V loadx(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static void storex(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnma(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
};
#endif

template <typename T> struct Tag { using type = T; };
template <int N> using Int = std::integral_constant<int, N>;

// Runs f(Tag<Ops>, Int<NV>, c0) over channel blocks [c0, c0 + NV * Ops::W) covering
// [0, C): wide blocks first, then a scalar tail.
template <typename scalar_t, typename acc_t, typename F>
inline void for_channel_blocks(int64_t C, F&& f) {
  int64_t c0 = 0;
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

// Conv outputs of the three projections in the accumulation dtype, channels last:
// y[p] is [B, Ho_p*Wo_p, C]. wt is [3, 9, C] (taps outermost, so the channel loop is contiguous).
// When stats is true, also per-centre-row partial sums and M2 (around the row mean) of every
// projection: part_sum/part_m2 are [3, B*H, C]; rows off a projection's grid hold zeros.
template <typename scalar_t, typename acc_t>
void conv3(const scalar_t* X, const acc_t* wt, acc_t* const* Y, int64_t B, int64_t H, int64_t W,
           int64_t C, const int64_t* s, bool stats, acc_t* part_sum, acc_t* part_m2) {
  int64_t Ho[3], Wo[3];
  for (int p = 0; p < 3; ++p) { Ho[p] = out_len(H, s[p]); Wo[p] = out_len(W, s[p]); }
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / H, h = r % H;
      bool on_row[3];
      for (int p = 0; p < 3; ++p) on_row[p] = h % s[p] == 0;
      if (!on_row[0] && !on_row[1] && !on_row[2]) continue;
      acc_t* rowp[3];
      for (int p = 0; p < 3; ++p)
        rowp[p] = on_row[p] ? Y[p] + ((b * Ho[p] + h / s[p]) * Wo[p]) * C : nullptr;
      const int i_lo = h == 0 ? 1 : 0, i_hi = h == H - 1 ? 1 : 2;
      for (int64_t w = 0; w < W; ++w) {
        acc_t* dst[3];
        bool any = false;
        for (int p = 0; p < 3; ++p) {
          dst[p] = on_row[p] && w % s[p] == 0 ? rowp[p] + (w / s[p]) * C : nullptr;
          any = any || dst[p];
        }
        if (!any) continue;
        const int j_lo = w == 0 ? 1 : 0, j_hi = w == W - 1 ? 1 : 2;
        const scalar_t* xc = X + ((b * H + h) * W + w) * C;  // centre tap
        for_channel_blocks<scalar_t, acc_t>(C, [&](auto ot, auto nvt, int64_t c0) {
          using O = typename decltype(ot)::type;
          constexpr int NV = decltype(nvt)::value, VW = O::W;
          typename O::V a[3][NV];
          for (int p = 0; p < 3; ++p)
            for (int k = 0; k < NV; ++k) a[p][k] = O::zero();
          for (int i = i_lo; i <= i_hi; ++i)
            for (int j = j_lo; j <= j_hi; ++j) {
              const scalar_t* xp = xc + ((i - 1) * W + (j - 1)) * C + c0;
              typename O::V xv[NV];
              for (int k = 0; k < NV; ++k) xv[k] = O::loadx(xp + k * VW);
              const int t = 3 * i + j;
              for (int p = 0; p < 3; ++p) {
                if (!dst[p]) continue;
                const acc_t* wp = wt + (p * 9 + t) * C + c0;
                for (int k = 0; k < NV; ++k) a[p][k] = O::fma(O::load(wp + k * VW), xv[k], a[p][k]);
              }
            }
          for (int p = 0; p < 3; ++p) {
            if (!dst[p]) continue;
            for (int k = 0; k < NV; ++k) O::store(dst[p] + c0 + k * VW, a[p][k]);
          }
        });
      }
      if (!stats) continue;
      for (int p = 0; p < 3; ++p) {
        if (!on_row[p]) continue;
        acc_t* ps = part_sum + (p * B * H + r) * C;
        acc_t* pm = part_m2 + (p * B * H + r) * C;
        const acc_t* row = rowp[p];
        for (int64_t c = 0; c < C; ++c) ps[c] = 0;
        for (int64_t o = 0; o < Wo[p]; ++o) {
_Pragma("omp simd")
          for (int64_t c = 0; c < C; ++c) ps[c] += row[o * C + c];
        }
        const acc_t inv_n = acc_t(1) / static_cast<acc_t>(Wo[p]);
        for (int64_t c = 0; c < C; ++c) pm[c] = 0;
        for (int64_t o = 0; o < Wo[p]; ++o) {
_Pragma("omp simd")
          for (int64_t c = 0; c < C; ++c) {
            const acc_t d = row[o * C + c] - ps[c] * inv_n;
            pm[c] += d * d;
          }
        }
      }
    }
  });
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
    yacc[p] = at::empty({B, Ho[p] * Wo[p], C}, aopt);
    out[p] = at::empty({B, Ho[p] * Wo[p], C}, x.options());
    // same dtype: the saved conv output is the accumulation buffer itself (no copy pass)
    ysave[p] = !use_batch_stats ? at::empty({0}, x.options())
               : acc_type == x.scalar_type() ? yacc[p] : at::empty({B, Ho[p] * Wo[p], C}, x.options());
  }
  Tensor mean = at::empty({3, C}, aopt), invstd = at::empty({3, C}, aopt), var = at::empty({3, C}, aopt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_qkv_projection_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* Y[3] = {yacc[0].data_ptr<acc_t>(), yacc[1].data_ptr<acc_t>(), yacc[2].data_ptr<acc_t>()};
    Tensor psum, pm2;
    if (use_batch_stats) {
      psum = at::empty({3, B * H, C}, aopt);
      pm2 = at::empty({3, B * H, C}, aopt);
    }
    conv3<scalar_t, acc_t>(x.data_ptr<scalar_t>(), wt.data_ptr<acc_t>(), Y, B, H, W, C, s, use_batch_stats,
                           use_batch_stats ? psum.data_ptr<acc_t>() : nullptr,
                           use_batch_stats ? pm2.data_ptr<acc_t>() : nullptr);
    acc_t* M = mean.data_ptr<acc_t>();
    acc_t* IS = invstd.data_ptr<acc_t>();
    acc_t* V = var.data_ptr<acc_t>();
    if (use_batch_stats) {
      // merge the per-row partials in row order (deterministic)
      for (int p = 0; p < 3; ++p) {
        const int64_t n_total = B * Ho[p] * Wo[p];
        TORCH_CHECK(n_total > 1, "conv_qkv_projection_fwd: batch statistics need more than one value per channel");
        const acc_t* ps = psum.data_ptr<acc_t>() + p * B * H * C;
        const acc_t* pm = pm2.data_ptr<acc_t>() + p * B * H * C;
        const acc_t inv_total = acc_t(1) / static_cast<acc_t>(n_total);
        const acc_t n_row = static_cast<acc_t>(Wo[p]);
        // parallel over channel blocks; every channel still merges its rows in row order
        at::parallel_for(0, C, 16, [&](int64_t cbeg, int64_t cend) {
          const int64_t nc = cend - cbeg;
          std::vector<acc_t> tot(nc, 0), m2(nc, 0);
          acc_t* T = tot.data();
          acc_t* M2 = m2.data();
          for (int64_t r = 0; r < B * H; ++r) {
            if ((r % H) % s[p] != 0) continue;
            const acc_t* pr = ps + r * C + cbeg;
_Pragma("omp simd")
            for (int64_t c = 0; c < nc; ++c) T[c] += pr[c];
          }
          for (int64_t r = 0; r < B * H; ++r) {
            if ((r % H) % s[p] != 0) continue;
            const acc_t* pr = ps + r * C + cbeg;
            const acc_t* qr = pm + r * C + cbeg;
_Pragma("omp simd")
            for (int64_t c = 0; c < nc; ++c) {
              const acc_t d = pr[c] / n_row - T[c] * inv_total;
              M2[c] += qr[c] + n_row * d * d;
            }
          }
          for (int64_t c = 0; c < nc; ++c) {
            const acc_t vb = M2[c] * inv_total;
            M[p * C + cbeg + c] = T[c] * inv_total;
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
    for (int p = 0; p < 3; ++p) {
      std::vector<acc_t> scale(C), shift(C);
      for (int64_t c = 0; c < C; ++c) {
        scale[c] = G[p * C + c] * IS[p * C + c];
        shift[c] = Be[p * C + c] - M[p * C + c] * scale[c];
      }
      const acc_t* y = Y[p];
      scalar_t* o = out[p].data_ptr<scalar_t>();
      scalar_t* ys = use_batch_stats && !ysave[p].is_same(yacc[p]) ? ysave[p].data_ptr<scalar_t>() : nullptr;
      at::parallel_for(0, B * Ho[p] * Wo[p], 64, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
_Pragma("omp simd")
          for (int64_t c = 0; c < C; ++c) o[i * C + c] = static_cast<scalar_t>(y[i * C + c] * scale[c] + shift[c]);
          if (ys) {
_Pragma("omp simd")
            for (int64_t c = 0; c < C; ++c) ys[i * C + c] = static_cast<scalar_t>(y[i * C + c]);
          }
        }
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
  int64_t Ho[3], Wo[3];
  for (int p = 0; p < 3; ++p) { Ho[p] = out_len(H, s[p]); Wo[p] = out_len(W, s[p]); }
  const Tensor gin[3] = {gq, gk, gv};
  const Tensor ys[3] = {yq, yk, yv};
  Tensor y[3];
  Tensor gx = at::empty({B, H, W, C}, x.options());
  Tensor gw = at::empty({3, 9, C}, aopt), gg = at::empty({3, C}, aopt), gb = at::empty({3, C}, aopt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_qkv_projection_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bool need_conv = false;
    for (int p = 0; p < 3; ++p) {
      if (ys[p].numel() == 0) need_conv = true;
      else y[p] = ys[p].to(acc_type).contiguous();
    }
    if (need_conv) {  // eval mode: recompute the conv outputs (they are not saved)
      Tensor yc[3];
      acc_t* Y[3];
      for (int p = 0; p < 3; ++p) { yc[p] = at::empty({B, Ho[p] * Wo[p], C}, aopt); Y[p] = yc[p].data_ptr<acc_t>(); }
      conv3<scalar_t, acc_t>(x.data_ptr<scalar_t>(), wt.data_ptr<acc_t>(), Y, B, H, W, C, s, false, nullptr, nullptr);
      for (int p = 0; p < 3; ++p) if (ys[p].numel() == 0) y[p] = yc[p];
    }
    const acc_t* WT = wt.data_ptr<acc_t>();
    // Per projection: dbeta/dgamma from per-row partials (registers across the row, one store
    // per row), merged in row order per channel (deterministic, parallel over channels), then the
    // per-channel dy coefficients. dy itself is not materialised: the gather below recomputes
    // the dy rows it needs, per chunk, into a cache-resident scratch buffer.
    Tensor g[3];
    const acc_t* Gp[3];
    const acc_t* Yp[3];
    std::vector<acc_t> coef[3];  // [4, C]: ca, cb, e = IS * cc, Mu
    for (int p = 0; p < 3; ++p) {
      g[p] = gin[p].to(acc_type).contiguous();
      const int64_t rows = B * Ho[p], rowlen = Wo[p] * C, n = B * Ho[p] * Wo[p];
      const acc_t* G = g[p].data_ptr<acc_t>();
      const acc_t* Y = y[p].data_ptr<acc_t>();
      Gp[p] = G;
      Yp[p] = Y;
      const acc_t* Mu = mu.data_ptr<acc_t>() + p * C;
      const acc_t* IS = is.data_ptr<acc_t>() + p * C;
      const acc_t* GA = ga.data_ptr<acc_t>() + p * C;
      // partial row r: [sum g, sum g * (y - mu)] ([rows, 2, C]); every entry is written
      Tensor part = at::empty({rows, 2, C}, aopt);
      acc_t* P = part.data_ptr<acc_t>();
      const int64_t Wop = Wo[p];
      at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          acc_t* pb = P + r * 2 * C;
          acc_t* pg = pb + C;
          const acc_t* gr = G + r * rowlen;
          const acc_t* yr = Y + r * rowlen;
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
      });
      acc_t* DB = gb.data_ptr<acc_t>() + p * C;
      acc_t* DG = gg.data_ptr<acc_t>() + p * C;
      coef[p].assign(4 * C, acc_t(0));
      acc_t* CF = coef[p].data();
      const acc_t on = use_batch_stats ? acc_t(1) : acc_t(0);
      // dy = a * (g - k1 - xhat * k2) per channel (train; eval: k1 = k2 = 0). Kept in this form:
      // expanding it into b*y + c cancels badly when |mean| >> std.
      at::parallel_for(0, C, 16, [&](int64_t cbeg, int64_t cend) {
        for (int64_t c = cbeg; c < cend; ++c) { DB[c] = 0; DG[c] = 0; }
        for (int64_t r = 0; r < rows; ++r) {
          const acc_t* pr = P + r * 2 * C;
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
    // dx and dw in one gather over the input pixels: every (input pixel, projection, tap) pair
    // that links pixel x[h, w] to output dy_p[o] adds w_p[t] * dy_p[o] to dx[h, w] and
    // dy_p[o] * x[h, w] to dw_p[t]. dw partials [chunks, 27, C] over fixed chunks of RB input
    // rows (a function of the shape only), merged in chunk order: deterministic. Each chunk
    // first computes the dy rows it touches (output rows lo..hi per projection, a few recomputed
    // at chunk edges; the values do not depend on which chunk computes them) into scratch.
    const scalar_t* X = x.data_ptr<scalar_t>();
    scalar_t* GX = gx.data_ptr<scalar_t>();
    constexpr int64_t RB = 16;
    const int64_t nrows = B * H, nchunks = (nrows + RB - 1) / RB;
    Tensor wpart = at::empty({nchunks, 27, C}, aopt);
    acc_t* WP = wpart.data_ptr<acc_t>();
    int64_t soff[4] = {0, 0, 0, 0};
    for (int p = 0; p < 3; ++p) soff[p + 1] = soff[p] + (RB + 2) * Wo[p] * C;
    at::parallel_for(0, nchunks, 1, [&](int64_t cbeg, int64_t cend) {
      std::vector<acc_t> scratch(soff[3]);
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
          const acc_t* CF = coef[p].data();
          const acc_t *CA = CF, *CB = CF + C, *CE = CF + 2 * C, *MU = CF + 3 * C;
          const acc_t* G = Gp[p] + lo[p] * Wo[p] * C;
          const acc_t* Y = Yp[p] + lo[p] * Wo[p] * C;
          const int64_t npix = (hi[p] - lo[p] + 1) * Wo[p];
          for (int64_t i = 0; i < npix; ++i) {
_Pragma("omp simd")
            for (int64_t c = 0; c < C; ++c)
              D[i * C + c] = CA[c] * ((G[i * C + c] - CB[c]) - (Y[i * C + c] - MU[c]) * CE[c]);
          }
        }
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t b = r / H, h = r % H;
          // valid (i, output row) pairs per projection for this input row
          int ni[3], ii[3][3];
          int64_t orow[3][3];
          for (int p = 0; p < 3; ++p) {
            ni[p] = 0;
            for (int i = 0; i < 3; ++i) {
              const int64_t nh = h + 1 - i;
              if (nh < 0 || nh % s[p] != 0 || nh / s[p] >= Ho[p]) continue;
              ii[p][ni[p]] = i;
              orow[p][ni[p]] = (b * Ho[p] + nh / s[p]) * Wo[p];
              ++ni[p];
            }
          }
          for (int64_t w = 0; w < W; ++w) {
            int nj[3], jj[3][3];
            int64_t ocol[3][3];
            for (int p = 0; p < 3; ++p) {
              nj[p] = 0;
              for (int j = 0; j < 3; ++j) {
                const int64_t nw = w + 1 - j;
                if (nw < 0 || nw % s[p] != 0 || nw / s[p] >= Wo[p]) continue;
                jj[p][nj[p]] = j;
                ocol[p][nj[p]] = nw / s[p];
                ++nj[p];
              }
            }
            const int64_t pix = (b * H + h) * W + w;
            for_channel_blocks<scalar_t, acc_t>(C, [&](auto ot, auto nvt, int64_t c0) {
              using O = typename decltype(ot)::type;
              constexpr int NV = decltype(nvt)::value, VW = O::W;
              typename O::V acc[NV], xv[NV];
              for (int k = 0; k < NV; ++k) {
                acc[k] = O::zero();
                xv[k] = O::loadx(X + pix * C + c0 + k * VW);
              }
              for (int p = 0; p < 3; ++p)
                for (int a = 0; a < ni[p]; ++a)
                  for (int e = 0; e < nj[p]; ++e) {
                    const int t = 3 * ii[p][a] + jj[p][e];
                    const acc_t* d = DYp[p] + (orow[p][a] + ocol[p][e]) * C + c0;
                    const acc_t* wp = WT + (p * 9 + t) * C + c0;
                    acc_t* gp = wpc + (p * 9 + t) * C + c0;
                    for (int k = 0; k < NV; ++k) {
                      const typename O::V dv = O::load(d + k * VW);
                      acc[k] = O::fma(O::load(wp + k * VW), dv, acc[k]);
                      O::store(gp + k * VW, O::fma(dv, xv[k], O::load(gp + k * VW)));
                    }
                  }
              for (int k = 0; k < NV; ++k) O::storex(GX + pix * C + c0 + k * VW, acc[k]);
            });
          }
        }
      }
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
