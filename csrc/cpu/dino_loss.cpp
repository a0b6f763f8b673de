// DINO loss on the CPU, forward and backward (see ssl_fast/reference/dino_loss.py for the math).
//
// Work is shared among threads by batch row b: a thread computes the n_global teacher
// distributions t_i of row b once into a thread-local [n_global, K] buffer (float accumulation),
// then reads each of the ncrops student rows x_v of b (the row then sits in cache): one pass for
// m_v = max_k x_v[k], one for S_v = sum_k exp((x_v[k] - m_v) / tau_s), one for the dot products
// D_iv = sum_k t_i[k] z_v[k] with z_v[k] = (x_v[k] - m_v) / tau_s <= 0. The loss term (i, v) is
//   -sum_k t_i[k] log s_v[k] = log(S_v) * sum_k t_i[k] - D_iv,
// a sum of two non-negative numbers: nothing cancels, so the term keeps float32's relative
// precision at any logit scale (the older lse(x_v) - <t_i, x_v / tau_s> subtracted two numbers
// of the size of the logits: error 4e-3 at logits 1e4, inf and NaN at 1e8 and 1e9). Logits are
// shifted by their row maximum before the temperature scales them, so tied maxima stay exactly
// tied. Row sums are added in a fixed order, so results are deterministic.
// Backward, per row b: recompute t_i and p_v = softmax(x_v / tau_s) the same way (not as
// exp(z - lse) from the saved log-sum-exps: a float32 lse ~ 1e12 cannot hold log S_v, and every
// entry tied at the maximum would get probability 1), then write
//   grad_v[k] = g / (B * n_terms * tau_s) * (count_v * p_v[k] - sum_{i != v} t_i[k]).
// Inputs float32/float16/bfloat16/float64 (student and teacher may differ), center float32,
// rows with any stride (stride(1) == 1). Accumulation in float (double if an input is double).
#include <ATen/Dispatch.h>
#include "cpu/vec.h"
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

using namespace ssl_fast::vec;

// A row of S as Acc values: the row itself when S is Acc, else converted into `buf`, so that
// the loops below read plain float/double arrays (which the compiler vectorises).
template <typename S, typename Acc>
const Acc* widen_row(const S* row, int64_t k, Acc* buf) {
  if constexpr (std::is_same_v<S, Acc>) {
    return row;
  } else {
    for (int64_t j = 0; j < k; ++j) buf[j] = static_cast<Acc>(row[j]);
    return buf;
  }
}

struct Shape {
  int64_t ncrops, n_global, batch, k;
};

Shape check_inputs(const char* op, const at::Tensor& student, const at::Tensor& teacher,
                   const at::Tensor& center, int64_t ncrops, int64_t n_global) {
  TORCH_CHECK(student.dim() == 2 && teacher.dim() == 2, op, ": student and teacher must be 2-D");
  TORCH_CHECK(ncrops >= 2, op, ": ncrops must be >= 2, got ", ncrops);
  TORCH_CHECK(n_global >= 1 && n_global <= 2 && n_global <= ncrops, op,
              ": n_global must be 1 or 2 and <= ncrops, got ", n_global);
  const int64_t rows = student.size(0), k = student.size(1);
  TORCH_CHECK(rows > 0 && rows % ncrops == 0, op, ": student rows ", rows,
              " not a positive multiple of ncrops ", ncrops);
  const int64_t batch = rows / ncrops;
  TORCH_CHECK(teacher.size(0) == n_global * batch && teacher.size(1) == k, op,
              ": teacher must be [n_global * B, K] = [", n_global * batch, ", ", k, "]");
  TORCH_CHECK(center.scalar_type() == at::kFloat && center.numel() == k && center.is_contiguous(), op,
              ": center must be a contiguous float32 [1, K] tensor");
  TORCH_CHECK(k <= 1 || (student.stride(1) == 1 && teacher.stride(1) == 1), op,
              ": student and teacher rows must be unit-stride along K");
  return {ncrops, n_global, batch, k};
}

// out[k] = t[k] = softmax((teacher - center) / tau_t)[k] for one teacher row, computed as
// exp((w[k] - max w) / tau_t) / sum with w = teacher - center (ties stay exact). Returns the
// row's log-sum-exp max(w) / tau_t + log(sum) and writes sum_k t[k] (1 up to rounding) to `mass`.
template <typename Acc>
Acc teacher_probs(const Acc* __restrict__ row, const float* __restrict__ center, int64_t k, Acc inv_tau_t,
                  Acc* __restrict__ out, Acc* mass) {
  Acc mx = -std::numeric_limits<Acc>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < k; ++j) {
    const Acc w = row[j] - static_cast<Acc>(center[j]);
    out[j] = w;
    mx = w > mx ? w : mx;
  }
  const Acc sum = exp_affine<Acc>(out, k, inv_tau_t, mx, out);
  const Acc inv = Acc(1) / sum;
  Acc total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < k; ++j) {
    out[j] *= inv;
    total += out[j];
  }
  *mass = total;
  return mx * inv_tau_t + std::log(sum);
}

// Row maximum of x; NaN entries are skipped here (they make the exp sum, hence the loss, NaN).
template <typename Acc>
Acc row_max(const Acc* __restrict__ x, int64_t k) {
  Acc mx = -std::numeric_limits<Acc>::infinity();
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < k; ++j) mx = x[j] > mx ? x[j] : mx;
  return mx;
}

template <typename S, typename T, typename Acc>
void forward_impl(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& center,
                  const Shape& sh, double tau_s, double tau_t, Acc* row_loss, Acc* student_lse,
                  Acc* teacher_lse) {
  const S* sp = student.data_ptr<S>();
  const T* tp = teacher.data_ptr<T>();
  const float* cp = center.data_ptr<float>();
  const int64_t ss = student.stride(0), ts = teacher.stride(0);
  const int64_t B = sh.batch, K = sh.k, NG = sh.n_global, NC = sh.ncrops;
  const Acc inv_s = Acc(1) / static_cast<Acc>(tau_s), inv_t = Acc(1) / static_cast<Acc>(tau_t);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<Acc> probs(NG * K), wide(K);
    constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();
    constexpr Acc kLowest = std::numeric_limits<Acc>::lowest();
    for (int64_t b = b0; b < b1; ++b) {
      Acc mass[2] = {0, 0};
      for (int64_t i = 0; i < NG; ++i)
        teacher_lse[i * B + b] = teacher_probs<Acc>(widen_row<T, Acc>(tp + (i * B + b) * ts, K, wide.data()),
                                                    cp, K, inv_t, probs.data() + i * K, &mass[i]);
      const Acc* t0 = probs.data();
      const Acc* t1 = NG == 2 ? probs.data() + K : probs.data();
      Acc loss_b = 0;
      for (int64_t v = 0; v < NC; ++v) {
        const Acc* x = widen_row<S, Acc>(sp + (v * B + b) * ss, K, wide.data());
        const Acc mx = row_max<Acc>(x, K);
        const Acc log_sum = std::log(exp_affine<Acc>(x, K, inv_s, mx, nullptr));
        Acc dot0 = 0, dot1 = 0;
#pragma omp simd reduction(+ : dot0, dot1)
        for (int64_t j = 0; j < K; ++j) {
          Acc z = (x[j] - mx) * inv_s;  // <= 0; NaN for NaN or +inf entries
          // a finite logit whose scaled gap overflows: a huge finite log-probability, so that a
          // zero teacher probability times it stays 0 (an input of -inf still gives NaN there)
          z = (z == kNegInf && x[j] != kNegInf) ? kLowest : z;
          dot0 += t0[j] * z;
          dot1 += t1[j] * z;
        }
        student_lse[v * B + b] = mx * inv_s + log_sum;
        if (v != 0) loss_b += log_sum * mass[0] - dot0;
        if (NG == 2 && v != 1) loss_b += log_sum * mass[1] - dot1;
      }
      row_loss[b] = loss_b;
    }
  });
}

template <typename S, typename T, typename Acc>
void backward_impl(Acc grad_loss, const at::Tensor& student, const at::Tensor& teacher,
                   const at::Tensor& center, const Shape& sh, double tau_s, double tau_t, at::Tensor& grad) {
  const S* sp = student.data_ptr<S>();
  const T* tp = teacher.data_ptr<T>();
  const float* cp = center.data_ptr<float>();
  S* gp = grad.data_ptr<S>();
  const int64_t ss = student.stride(0), ts = teacher.stride(0);
  const int64_t B = sh.batch, K = sh.k, NG = sh.n_global, NC = sh.ncrops;
  const int64_t n_terms = NG * NC - NG;
  const Acc inv_s = Acc(1) / static_cast<Acc>(tau_s), inv_t = Acc(1) / static_cast<Acc>(tau_t);
  const Acc coef = grad_loss * inv_s / static_cast<Acc>(B * n_terms);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    // rows: t_0, t_1 (when NG == 2), t_0 + t_1 (when NG == 2)
    std::vector<Acc> probs((NG == 2 ? 3 : 1) * K), wide(K), out(std::is_same_v<S, Acc> ? 0 : K);
    for (int64_t b = b0; b < b1; ++b) {
      Acc mass;
      for (int64_t i = 0; i < NG; ++i)
        teacher_probs<Acc>(widen_row<T, Acc>(tp + (i * B + b) * ts, K, wide.data()), cp, K, inv_t,
                           probs.data() + i * K, &mass);
      if (NG == 2) {
        Acc* both = probs.data() + 2 * K;
#pragma omp simd
        for (int64_t j = 0; j < K; ++j) both[j] = probs[j] + probs[K + j];
      }
      for (int64_t v = 0; v < NC; ++v) {
        const Acc* x = widen_row<S, Acc>(sp + (v * B + b) * ss, K, wide.data());
        S* g = gp + (v * B + b) * K;
        const Acc count = static_cast<Acc>(NG - (v < NG ? 1 : 0));
        // the teacher views paired with crop v: the other global view, or all of them
        const Acc* others = nullptr;
        if (NG == 2) others = probs.data() + (v == 0 ? K : v == 1 ? 0 : 2 * K);
        else if (v != 0) others = probs.data();
        if (others == nullptr) {  // n_global = 1 and v = 0: crop 0 is in no term
          for (int64_t j = 0; j < K; ++j) g[j] = static_cast<S>(0);
          continue;
        }
        Acc* g_acc;
        if constexpr (std::is_same_v<S, Acc>) g_acc = g;
        else g_acc = out.data();
        const Acc inv_sum = Acc(1) / exp_affine<Acc>(x, K, inv_s, row_max<Acc>(x, K), g_acc);
        const Acc coef_p = coef * count * inv_sum;  // g_acc * inv_sum = softmax(x_v / tau_s)
#pragma omp simd
        for (int64_t j = 0; j < K; ++j) g_acc[j] = coef_p * g_acc[j] - coef * others[j];
        if constexpr (!std::is_same_v<S, Acc>) {
          for (int64_t j = 0; j < K; ++j) g[j] = static_cast<S>(g_acc[j]);
        }
      }
    }
  });
}

template <typename F>
void dispatch_pair(at::ScalarType s_type, at::ScalarType t_type, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s_type, "dino_loss_student", [&] {
    using S = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t_type, "dino_loss_teacher", [&] {
      using T = scalar_t;
      using Acc = std::conditional_t<std::is_same_v<S, double> || std::is_same_v<T, double>, double, float>;
      f(S{}, T{}, Acc{});
    });
  });
}

at::ScalarType acc_type(const at::Tensor& a, const at::Tensor& b) {
  return (a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dino_loss_fwd_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& center, int64_t ncrops,
    int64_t n_global, double student_temp, double teacher_temp) {
  const Shape sh = check_inputs("dino_loss_fwd", student, teacher, center, ncrops, n_global);
  const auto opts = student.options().dtype(acc_type(student, teacher));
  auto row_loss = at::empty({sh.batch}, opts);
  auto student_lse = at::empty({student.size(0)}, opts);
  auto teacher_lse = at::empty({teacher.size(0)}, opts);
  dispatch_pair(student.scalar_type(), teacher.scalar_type(), [&](auto s, auto t, auto acc) {
    using S = decltype(s);
    using T = decltype(t);
    using Acc = decltype(acc);
    forward_impl<S, T, Acc>(student, teacher, center, sh, student_temp, teacher_temp,
                            row_loss.data_ptr<Acc>(), student_lse.data_ptr<Acc>(),
                            teacher_lse.data_ptr<Acc>());
  });
  const int64_t n_terms = n_global * ncrops - n_global;
  auto loss = row_loss.sum() / static_cast<double>(sh.batch * n_terms);  // fixed-order sum
  return {loss, student_lse, teacher_lse};
}

at::Tensor dino_loss_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& student,
                             const at::Tensor& teacher, const at::Tensor& center,
                             const at::Tensor& student_lse, const at::Tensor& teacher_lse,
                             int64_t ncrops, int64_t n_global, double student_temp, double teacher_temp) {
  const Shape sh = check_inputs("dino_loss_bwd", student, teacher, center, ncrops, n_global);
  const auto acc = acc_type(student, teacher);
  TORCH_CHECK(student_lse.scalar_type() == acc && teacher_lse.scalar_type() == acc &&
                  student_lse.numel() == student.size(0) && teacher_lse.numel() == teacher.size(0),
              "dino_loss_bwd: student_lse/teacher_lse must be the forward's outputs");
  // The saved log-sum-exps only fix the accumulation dtype: the backward recomputes both
  // softmaxes (see the top of this file).
  auto grad = at::empty({student.size(0), student.size(1)}, student.options());
  dispatch_pair(student.scalar_type(), teacher.scalar_type(), [&](auto s, auto t, auto a) {
    using S = decltype(s);
    using T = decltype(t);
    using Acc = decltype(a);
    const Acc g = grad_loss.item<Acc>();
    backward_impl<S, T, Acc>(g, student, teacher, center, sh, student_temp, teacher_temp, grad);
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ssl_fast_C, m) {
  m.def("dino_loss_fwd(Tensor student, Tensor teacher, Tensor center, int ncrops, int n_global, "
        "float student_temp, float teacher_temp) -> (Tensor, Tensor, Tensor)");
  m.def("dino_loss_bwd(Tensor grad_loss, Tensor student, Tensor teacher, Tensor center, "
        "Tensor student_lse, Tensor teacher_lse, int ncrops, int n_global, float student_temp, "
        "float teacher_temp) -> Tensor");
}

TORCH_LIBRARY_IMPL(ssl_fast_C, CPU, m) {
  m.impl("dino_loss_fwd", &dino_loss_fwd_cpu);
  m.impl("dino_loss_bwd", &dino_loss_bwd_cpu);
}
