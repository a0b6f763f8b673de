// Additive (Bahdanau) attention of Show-Attend-Tell on the CPU, forward and backward (see
// ssl_fast/reference/additive_attention.py for the math).
//
// Threads share the work by batch row b (at::parallel_for, OpenMP). Forward, per row: the
// scores e_l = sum_k w_k tanh(Ua[b,l,k] + Wh[b,k]) one position at a time (the tanh lives in
// registers, never in memory), the masked softmax over L, then context = sum_l alpha_l a[b,l].
// Backward, per row: one pass over a[b] gives grad_a = alpha_l gc and dalpha_l = galpha_l +
// a[b,l] . gc; then de_l = alpha_l (dalpha_l - sum alpha dalpha), except at the largest alpha,
// where it is minus the sum of the others (no cancellation as alpha -> 1); one pass over Ua[b] recomputes
// t = tanh(Ua + Wh) and writes grad_Ua = de_l w (1 - t^2), accumulating grad_Wh[b] = w sum_l
// de_l (t_0^2 - t_l^2) (equal to sum_l grad_Ua since sum_l de_l = 0, without its cancellation)
// and the row's share of grad_w (sum_l de_l t), added over b in a fixed order afterwards (so results
// do not depend on the thread count). Inputs float32/float16/bfloat16/float64 (one dtype), all
// contiguous; arithmetic in float (double for double inputs); alpha is returned, and read back
// by the backward, in that accumulation dtype. A row whose positions are all masked gets
// alpha = 0, context = 0 and zero gradients.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// exp(y) for y in [0, 88] (the range tanh_acc needs), branch-free so that GCC vectorises the
// loops calling it: y = n ln 2 + r with ln 2 in two parts, e^r by the degree-6 polynomial of the
// Cephes library's expf (S. L. Moshier), 2^n built in the exponent field (n <= 127).
inline float exp_pos(float y) {
  // n = round(y / ln 2) by the 1.5 * 2^23 trick: std::floor keeps GCC from vectorising the
  // loops under the default -ftrapping-math
  const float n = (y * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (y - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(float));
  return er * scale;
}

// tanh for float, branch-free, after Cephes' tanhf: |x| < 0.625 by its odd polynomial (no
// cancellation near 0), otherwise 1 - 2 / (exp(2|x|) + 1) with the sign of x (|x| >= 44 gives
// exactly +-1). NaN stays NaN. About 2 ulp.
inline float tanh_acc(float x) {
  const float ax = std::fabs(x);
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float y = 2.0f * ax;
  const float e = exp_pos(y < 88.0f ? y : 88.0f);
  float large = 1.0f - 2.0f / (e + 1.0f);
  large = x < 0.0f ? -large : large;
  const float t = ax < 0.625f ? small : large;
  return x != x ? x : t;
}

inline double tanh_acc(double x) { return std::tanh(x); }

// A row of S as Acc values: the row itself when S is Acc, else converted into `buf`.
template <typename S, typename Acc>
const Acc* widen(const S* row, int64_t n, Acc* buf) {
  if constexpr (std::is_same_v<S, Acc>) {
    return row;
  } else {
    for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<Acc>(row[j]);
    return buf;
  }
}

template <typename S, typename Acc>
void narrow(const Acc* src, int64_t n, S* dst) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<S>(src[j]);
}

struct Shape {
  int64_t B, L, D, A;
};

Shape check_inputs(const char* op, const at::Tensor& a, const at::Tensor& Ua, const at::Tensor& Wh,
                   const at::Tensor& w) {
  TORCH_CHECK(a.dim() == 3 && Ua.dim() == 3 && Wh.dim() == 2 && w.dim() == 1, op,
              ": a, Ua, Wh, w must be [B, L, D], [B, L, A], [B, A], [A]");
  const Shape s{a.size(0), a.size(1), a.size(2), Ua.size(2)};
  TORCH_CHECK(Ua.size(0) == s.B && Ua.size(1) == s.L && Wh.size(0) == s.B && Wh.size(1) == s.A &&
                  w.size(0) == s.A, op, ": shapes of a, Ua, Wh, w do not fit together");
  const auto dt = a.scalar_type();
  TORCH_CHECK(Ua.scalar_type() == dt && Wh.scalar_type() == dt && w.scalar_type() == dt, op,
              ": a, Ua, Wh, w must have one dtype");
  TORCH_CHECK(a.is_contiguous() && Ua.is_contiguous() && Wh.is_contiguous() && w.is_contiguous(), op,
              ": a, Ua, Wh, w must be contiguous");
  return s;
}

at::ScalarType acc_type(const at::Tensor& a) {
  return a.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename S, typename Acc>
void forward_impl(const at::Tensor& a, const at::Tensor& Ua, const at::Tensor& Wh, const at::Tensor& w,
                  const bool* mask, const Shape& sh, S* context, Acc* alpha) {
  const int64_t B = sh.B, L = sh.L, D = sh.D, A = sh.A;
  const S* ap = a.data_ptr<S>();
  const S* up = Ua.data_ptr<S>();
  const S* hp = Wh.data_ptr<S>();
  std::vector<Acc> w_buf(std::is_same_v<S, Acc> ? 0 : A);
  const Acc* wv = widen<S, Acc>(w.data_ptr<S>(), A, w_buf.data());
  constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<Acc> wh_buf(A), u_buf(A), e(L), ctx(D), a_buf(D);
    for (int64_t b = b0; b < b1; ++b) {
      const Acc* wh = widen<S, Acc>(hp + b * A, A, wh_buf.data());
      const bool* mrow = mask ? mask + b * L : nullptr;
      Acc mx = kNegInf;
      for (int64_t l = 0; l < L; ++l) {
        if (mrow && !mrow[l]) {
          e[l] = kNegInf;
          continue;
        }
        const Acc* u = widen<S, Acc>(up + (b * L + l) * A, A, u_buf.data());
        Acc score = 0;
#pragma omp simd reduction(+ : score)
        for (int64_t k = 0; k < A; ++k) score += wv[k] * tanh_acc(u[k] + wh[k]);
        e[l] = score;
        mx = score > mx ? score : mx;  // NaN scores are skipped here and make the sum NaN below
      }
      Acc* al = alpha + b * L;
      if (mx == kNegInf) {  // every position masked (or every score -inf: not reachable, tanh is bounded)
        for (int64_t l = 0; l < L; ++l) al[l] = 0;
      } else {
        Acc sum = 0;
        for (int64_t l = 0; l < L; ++l) {
          al[l] = std::exp(e[l] - mx);
          sum += al[l];
        }
        const Acc inv = Acc(1) / sum;
        for (int64_t l = 0; l < L; ++l) al[l] *= inv;
      }
      std::fill(ctx.begin(), ctx.end(), Acc(0));
      for (int64_t l = 0; l < L; ++l) {
        const Acc p = al[l];
        const Acc* x = widen<S, Acc>(ap + (b * L + l) * D, D, a_buf.data());
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ctx[d] += p * x[d];
      }
      narrow<S, Acc>(ctx.data(), D, context + b * D);
    }
  });
}

template <typename S, typename Acc>
void backward_impl(const at::Tensor& grad_context, const at::Tensor& grad_alpha, const at::Tensor& a,
                   const at::Tensor& Ua, const at::Tensor& Wh, const at::Tensor& w, const Acc* alpha,
                   const Shape& sh, S* grad_a, S* grad_Ua, S* grad_Wh, Acc* grad_w_rows) {
  // grad_a == nullptr: not wanted (frozen encoder features), only dalpha is computed
  const int64_t B = sh.B, L = sh.L, D = sh.D, A = sh.A;
  const S* gcp = grad_context.data_ptr<S>();
  const Acc* gap = grad_alpha.data_ptr<Acc>();
  const S* ap = a.data_ptr<S>();
  const S* up = Ua.data_ptr<S>();
  const S* hp = Wh.data_ptr<S>();
  std::vector<Acc> w_buf(std::is_same_v<S, Acc> ? 0 : A);
  const Acc* wv = widen<S, Acc>(w.data_ptr<S>(), A, w_buf.data());
  constexpr bool same = std::is_same_v<S, Acc>;
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<Acc> gc_buf(D), x_buf(D), out_d(same ? 0 : D), wh_buf(A), u_buf(A), out_a(same ? 0 : A),
        gwh(A), t0sq(A), de(L);
    for (int64_t b = b0; b < b1; ++b) {
      const Acc* gc = widen<S, Acc>(gcp + b * D, D, gc_buf.data());
      const Acc* al = alpha + b * L;
      Acc delta = 0;
      for (int64_t l = 0; l < L; ++l) {
        const Acc* x = widen<S, Acc>(ap + (b * L + l) * D, D, x_buf.data());
        const Acc p = al[l];
        Acc dot = 0;
        if (grad_a == nullptr) {
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += x[d] * gc[d];
        } else {
          Acc* ga;
          if constexpr (same) ga = grad_a + (b * L + l) * D;
          else ga = out_d.data();
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) {
            dot += x[d] * gc[d];
            ga[d] = p * gc[d];
          }
          if constexpr (!same) narrow<S, Acc>(ga, D, grad_a + (b * L + l) * D);
        }
        de[l] = gap[b * L + l] + dot;  // dalpha_l for now
        delta += p * de[l];
      }
      // de at the largest alpha is minus the sum of the others (equal, since sum_l de_l = 0):
      // alpha_m (dalpha_m - delta) cancels as alpha_m -> 1 (1e-3 relative error at 0.9999)
      int64_t top = 0;
      Acc rest = 0;
      for (int64_t l = 0; l < L; ++l) {
        de[l] = al[l] * (de[l] - delta);
        top = al[l] > al[top] ? l : top;
      }
      for (int64_t l = 0; l < L; ++l) rest += l == top ? Acc(0) : de[l];
      de[top] = -rest;
      const Acc* wh = widen<S, Acc>(hp + b * A, A, wh_buf.data());
      Acc* gw = grad_w_rows + b * A;
      std::fill(gwh.begin(), gwh.end(), Acc(0));
      std::fill(gw, gw + A, Acc(0));
      // grad_Wh = w sum_l de_l (1 - t_l^2) = w sum_l de_l (t_0^2 - t_l^2), since sum_l de_l = 0:
      // the direct sum cancels (relative error 1e-4 in float32 where the t_l^2 are alike), the
      // differences do not
      const Acc* u0 = widen<S, Acc>(up + b * L * A, A, u_buf.data());
      for (int64_t k = 0; k < A; ++k) {
        const Acc t0 = tanh_acc(u0[k] + wh[k]);
        t0sq[k] = t0 * t0;
      }
      for (int64_t l = 0; l < L; ++l) {
        const Acc* u = widen<S, Acc>(up + (b * L + l) * A, A, u_buf.data());
        const Acc g = de[l];
        Acc* gu;
        if constexpr (same) gu = grad_Ua + (b * L + l) * A;
        else gu = out_a.data();
        Acc* gwh_p = gwh.data();
        const Acc* t0p = t0sq.data();
#pragma omp simd
        for (int64_t k = 0; k < A; ++k) {
          const Acc t = tanh_acc(u[k] + wh[k]);
          const Acc t2 = t * t;
          gu[k] = g * wv[k] * (Acc(1) - t2);
          gwh_p[k] += g * (t0p[k] - t2);
          gw[k] += g * t;
        }
        if constexpr (!same) narrow<S, Acc>(gu, A, grad_Ua + (b * L + l) * A);
      }
      for (int64_t k = 0; k < A; ++k) gwh[k] *= wv[k];
      narrow<S, Acc>(gwh.data(), A, grad_Wh + b * A);
    }
  });
}

// out[k] = sum over b of rows[b, k], added in the order b = 0, 1, ... (independent of threads)
template <typename S, typename Acc>
void sum_rows(const Acc* rows, int64_t B, int64_t A, S* out) {
  std::vector<Acc> total(A, Acc(0));
  for (int64_t b = 0; b < B; ++b) {
#pragma omp simd
    for (int64_t k = 0; k < A; ++k) total[k] += rows[b * A + k];
  }
  narrow<S, Acc>(total.data(), A, out);
}

std::tuple<at::Tensor, at::Tensor> additive_attention_fwd_cpu(const at::Tensor& a, const at::Tensor& Ua,
                                                              const at::Tensor& Wh, const at::Tensor& w,
                                                              const std::optional<at::Tensor>& mask) {
  const Shape sh = check_inputs("additive_attention_fwd", a, Ua, Wh, w);
  const bool* mp = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == sh.B &&
                    mask->size(1) == sh.L && mask->is_contiguous(),
                "additive_attention_fwd: mask must be a contiguous bool [B, L] tensor");
    mp = mask->data_ptr<bool>();
  }
  auto context = at::empty({sh.B, sh.D}, a.options());
  auto alpha = at::empty({sh.B, sh.L}, a.options().dtype(acc_type(a)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "additive_attention_fwd", [&] {
    using S = scalar_t;
    using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;
    forward_impl<S, Acc>(a, Ua, Wh, w, mp, sh, context.data_ptr<S>(), alpha.data_ptr<Acc>());
  });
  return {context, alpha};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> additive_attention_bwd_cpu(
    const at::Tensor& grad_context, const at::Tensor& grad_alpha, const at::Tensor& a, const at::Tensor& Ua,
    const at::Tensor& Wh, const at::Tensor& w, const at::Tensor& alpha, bool need_grad_a) {
  const Shape sh = check_inputs("additive_attention_bwd", a, Ua, Wh, w);
  const auto acc = acc_type(a);
  TORCH_CHECK(alpha.scalar_type() == acc && alpha.dim() == 2 && alpha.size(0) == sh.B && alpha.size(1) == sh.L &&
                  alpha.is_contiguous(),
              "additive_attention_bwd: alpha must be the forward's contiguous [B, L] alpha in the accumulation dtype");
  TORCH_CHECK(grad_context.scalar_type() == a.scalar_type() && grad_context.dim() == 2 &&
                  grad_context.size(0) == sh.B && grad_context.size(1) == sh.D,
              "additive_attention_bwd: grad_context must be [B, D] in the inputs' dtype");
  TORCH_CHECK(grad_alpha.sizes() == alpha.sizes(), "additive_attention_bwd: grad_alpha must be [B, L]");
  const auto gc = grad_context.contiguous();
  const auto ga = grad_alpha.to(acc).contiguous();
  auto grad_a = need_grad_a ? at::empty_like(a) : at::empty({0}, a.options());
  auto grad_Ua = at::empty_like(Ua);
  auto grad_Wh = at::empty_like(Wh);
  auto grad_w_rows = at::empty({sh.B, sh.A}, a.options().dtype(acc));
  at::Tensor grad_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "additive_attention_bwd", [&] {
    using S = scalar_t;
    using Acc = std::conditional_t<std::is_same_v<S, double>, double, float>;
    backward_impl<S, Acc>(gc, ga, a, Ua, Wh, w, alpha.data_ptr<Acc>(), sh, need_grad_a ? grad_a.data_ptr<S>() : nullptr,
                          grad_Ua.data_ptr<S>(), grad_Wh.data_ptr<S>(), grad_w_rows.data_ptr<Acc>());
    grad_w = at::empty_like(w);
    sum_rows<S, Acc>(grad_w_rows.data_ptr<Acc>(), sh.B, sh.A, grad_w.data_ptr<S>());
  });
  return {grad_a, grad_Ua, grad_Wh, grad_w};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ssl_fast_C, m) {
  m.def("additive_attention_fwd(Tensor a, Tensor Ua, Tensor Wh, Tensor w, Tensor? mask) -> (Tensor, Tensor)");
  m.def("additive_attention_bwd(Tensor grad_context, Tensor grad_alpha, Tensor a, Tensor Ua, Tensor Wh, "
        "Tensor w, Tensor alpha, bool need_grad_a) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ssl_fast_C, CPU, m) {
  m.impl("additive_attention_fwd", &additive_attention_fwd_cpu);
  m.impl("additive_attention_bwd", &additive_attention_bwd_cpu);
}
