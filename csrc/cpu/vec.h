// Shared vector layer of the CPU kernels (attention.cpp, conv_projection.cpp, dino_loss.cpp).
//
// Hand-written AVX-512 / AVX2+FMA intrinsics with a scalar fallback, chosen at compile time by
// the target flags (setup.py builds with -march=native by default), rather than ATen's at::vec:
// at::vec::Vectorized<float> in an extension is compiled once for the extension's flags as well,
// so it brings no runtime dispatch here, and its exp (Sleef) is not reachable from extension code
// without torch's CPU_CAPABILITY build machinery; these few operations are all the kernels need.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if (defined(__AVX2__) && defined(__FMA__)) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define SSL_FAST_HAVE_AVX2 1
#endif
#if defined(__AVX512F__)
#define SSL_FAST_HAVE_AVX512 1
#endif

namespace ssl_fast {
namespace vec {

// Channel-block vector helpers: the kernels keep NV vectors of W channels in registers per
// accumulator. Scalar<scalar_t, acc_t> (W = 1) is the portable fallback (and the channel tail);
// Avx2F (W = 8, AVX2 + FMA) and Avx512F (W = 16) serve float inputs where the compiler targets
// them. Wider is faster even where 512-bit FMAs are split in two (AMD Zen 4 measured 1.45x the
// 256-bit FMA rate per thread): half the instructions for the same work.
template <typename scalar_t, typename acc_t>
struct Scalar {
  using V = acc_t;
  static constexpr int W = 1;
  static V zero() { return acc_t(0); }
  static V load(const acc_t* p) { return *p; }
  static V loadx(const scalar_t* p) { return static_cast<acc_t>(*p); }
  static void store(acc_t* p, V v) { *p = v; }
  template <typename T> static void put(T* p, V v) { *p = static_cast<T>(v); }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V set1(acc_t v) { return v; }
  static void stream(acc_t* p, V v) { *p = v; }
};

#if defined(__AVX2__) && defined(__FMA__)
struct Avx2F {
  using V = __m256;
  static constexpr int W = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V loadx(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  template <typename T> static void put(T* p, V v) {
    static_assert(std::is_same_v<T, float>, "Avx2F stores float only");
    _mm256_storeu_ps(p, v);
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static void stream(float* p, V v) { _mm256_stream_ps(p, v); }  // p 32-byte aligned
};
#endif

#if defined(__AVX512F__)
struct Avx512F {
  using V = __m512;
  static constexpr int W = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V loadx(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  template <typename T> static void put(T* p, V v) {
    static_assert(std::is_same_v<T, float>, "Avx512F stores float only");
    _mm512_storeu_ps(p, v);
  }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static void stream(float* p, V v) { _mm512_stream_ps(p, v); }  // p 64-byte aligned
};
#endif

template <typename T> struct Tag { using type = T; };
template <int N> using Int = std::integral_constant<int, N>;

// exp for float that GCC vectorises inside the loops below (std::exp does not without
// -ffast-math): exp(x) = 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 (two-part ln 2),
// e^r by Cephes' degree-6 polynomial (about 2 ulp); 2^n is applied as 2^h * 2^(n-h) so that
// n = 128 does not overflow the exponent field. Below -87.3365 (where exp leaves the normal
// range) the result is 0, not a subnormal; above 88.7228 it is inf; NaN stays NaN.
inline float exp_vec(float x) {
  constexpr float kLo = -87.3365f, kHi = 88.7228f;
  float xc = x < kLo ? kLo : x;
  xc = xc > kHi ? kHi : xc;
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = p * r * r + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t half = ni >> 1;
  const int32_t bits_a = (half + 127) << 23, bits_b = (ni - half + 127) << 23;
  float scale_a, scale_b;
  std::memcpy(&scale_a, &bits_a, sizeof(float));
  std::memcpy(&scale_b, &bits_b, sizeof(float));
  float y = er * scale_a * scale_b;
  y = x < kLo ? 0.0f : y;
  y = x > kHi ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}

inline double exp_vec(double x) { return std::exp(x); }

#ifdef SSL_FAST_HAVE_AVX2
// exp of 8 floats: x = n ln2 + r (two-part ln 2), e^r by a degree-6 polynomial, 2^n applied
// as 2^(n/2) * 2^(n - n/2) so that n = 128 cannot overflow the exponent; below -87.3365 the
// result is 0 (never a subnormal), above 88.7228 it is inf, and NaN stays NaN.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365f), hi = _mm256_set1_ps(88.7228f);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 er = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 sa = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 sb = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(er, sa), sb);
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, lo, _CMP_LT_OQ));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(__builtin_inff()), _mm256_cmp_ps(x, hi, _CMP_GT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// out[j] = exp((x[j] - c) * a) for j < k (out may be null, or equal to x); returns the sum.
// With c = max_j x[j] and a > 0 every argument is <= 0 (no overflow) and tied maxima give 1.
// GCC does not reliably vectorise exp_vec, so float runs 8 lanes at a time with AVX2/FMA
// where the build has them; the lane sums are added in a fixed order (deterministic).
template <typename Acc>
Acc exp_affine(const Acc* x, int64_t k, Acc a, Acc c, Acc* out) {
  Acc sum = 0;
  int64_t j = 0;
#ifdef SSL_FAST_HAVE_AVX2
  if constexpr (std::is_same_v<Acc, float>) {
    __m256 acc = _mm256_setzero_ps();
    const __m256 va = _mm256_set1_ps(a), vc = _mm256_set1_ps(c);
    for (; j + 8 <= k; j += 8) {
      const __m256 e = exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), vc), va));
      if (out != nullptr) _mm256_storeu_ps(out + j, e);
      acc = _mm256_add_ps(acc, e);
    }
    sum = hsum8(acc);
  }
#endif
  for (; j < k; ++j) {
    const Acc e = exp_vec((x[j] - c) * a);
    if (out != nullptr) out[j] = e;
    sum += e;
  }
  return sum;
}

#ifdef SSL_FAST_HAVE_AVX512
// exp of 16 floats, the same method and limits as exp8.
inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3365f), hi = _mm512_set1_ps(88.7228f);
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, lo), hi);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 er = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i ni = _mm512_cvtps_epi32(n);
  const __m512i half = _mm512_srai_epi32(ni, 1);
  const __m512i bias = _mm512_set1_epi32(127);
  const __m512 sa = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(half, bias), 23));
  const __m512 sb = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(ni, half), bias), 23));
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(er, sa), sb);
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ), y, _mm512_setzero_ps());
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, hi, _CMP_GT_OQ), y, _mm512_set1_ps(__builtin_inff()));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), y, x);
}
#endif

// max_j x[j] for j < n (-inf when n = 0), and whether any x[j] is NaN (the max is then not
// meaningful: the caller propagates NaN).
template <typename Acc>
inline Acc max_and_nan(const Acc* x, int64_t n, bool* any_nan) {
  Acc mx = -std::numeric_limits<Acc>::infinity();
  bool nan = false;
  int64_t j = 0;
  if constexpr (std::is_same_v<Acc, float>) {
#ifdef SSL_FAST_HAVE_AVX512
    __m512 vm = _mm512_set1_ps(mx);
    __mmask16 bad = 0;
    for (; j + 16 <= n; j += 16) {
      const __m512 v = _mm512_loadu_ps(x + j);
      bad |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      vm = _mm512_max_ps(vm, v);
    }
    mx = _mm512_reduce_max_ps(vm);
    nan = bad != 0;
#elif defined(SSL_FAST_HAVE_AVX2)
    __m256 vm = _mm256_set1_ps(mx), bad = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
      const __m256 v = _mm256_loadu_ps(x + j);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      vm = _mm256_max_ps(vm, v);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vm);
    for (float f : lanes) mx = f > mx ? f : mx;
    nan = _mm256_movemask_ps(bad) != 0;
#endif
  }
  for (; j < n; ++j) {
    mx = x[j] > mx ? x[j] : mx;
    nan |= x[j] != x[j];
  }
  *any_nan = nan;
  return mx;
}

// sum_j x[j] * y[j] for j < n (lanes added in a fixed order: deterministic).
template <typename Acc>
inline Acc dot(const Acc* x, const Acc* y, int64_t n) {
  Acc sum = 0;
  int64_t j = 0;
  if constexpr (std::is_same_v<Acc, float>) {
#ifdef SSL_FAST_HAVE_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + j), _mm512_loadu_ps(y + j), acc);
    sum = _mm512_reduce_add_ps(acc);
#elif defined(SSL_FAST_HAVE_AVX2)
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j), acc);
    sum = hsum8(acc);
#endif
  }
  for (; j < n; ++j) sum += x[j] * y[j];
  return sum;
}

// e[j] += g[j] for j < n; returns sum_j g[j] (lanes added in a fixed order: deterministic).
template <typename Acc>
inline Acc sum_and_accumulate(const Acc* g, int64_t n, Acc* e) {
  Acc sum = 0;
  int64_t j = 0;
  if constexpr (std::is_same_v<Acc, float>) {
#ifdef SSL_FAST_HAVE_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) {
      const __m512 v = _mm512_loadu_ps(g + j);
      _mm512_storeu_ps(e + j, _mm512_add_ps(_mm512_loadu_ps(e + j), v));
      acc = _mm512_add_ps(acc, v);
    }
    sum = _mm512_reduce_add_ps(acc);
#elif defined(SSL_FAST_HAVE_AVX2)
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
      const __m256 v = _mm256_loadu_ps(g + j);
      _mm256_storeu_ps(e + j, _mm256_add_ps(_mm256_loadu_ps(e + j), v));
      acc = _mm256_add_ps(acc, v);
    }
    sum = hsum8(acc);
#endif
  }
  for (; j < n; ++j) {
    e[j] += g[j];
    sum += g[j];
  }
  return sum;
}

// x[j] = exp(x[j] - c) for j < n, in place; returns the sum (lanes added in a fixed order).
template <typename Acc>
inline Acc exp_shift_sum(Acc* x, int64_t n, Acc c) {
  Acc sum = 0;
  int64_t j = 0;
  if constexpr (std::is_same_v<Acc, float>) {
#ifdef SSL_FAST_HAVE_AVX512
    __m512 acc = _mm512_setzero_ps();
    const __m512 vc = _mm512_set1_ps(c);
    for (; j + 16 <= n; j += 16) {
      const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(x + j), vc));
      _mm512_storeu_ps(x + j, e);
      acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#elif defined(SSL_FAST_HAVE_AVX2)
    __m256 acc = _mm256_setzero_ps();
    const __m256 vc = _mm256_set1_ps(c);
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + j), vc));
      _mm256_storeu_ps(x + j, e);
      acc = _mm256_add_ps(acc, e);
    }
    sum = hsum8(acc);
#endif
  }
  for (; j < n; ++j) {
    const Acc e = exp_vec(x[j] - c);
    x[j] = e;
    sum += e;
  }
  return sum;
}

}  // namespace vec
}  // namespace ssl_fast
