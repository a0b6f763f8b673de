// EMA (momentum-teacher) update on the CPU: e <- m*e + (1-m)*t for every pair of tensors.
// All pairs are cut into chunks and the chunks shared among OpenMP threads, so a model made
// of many small and a few large tensors keeps every core busy.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 16;

template <typename E, typename S, typename Acc>
void ema_span(E* __restrict__ e, const S* __restrict__ s, int64_t n, Acc m) {
  const Acc one_minus_m = Acc(1) - m;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    e[i] = static_cast<E>(m * static_cast<Acc>(e[i]) + one_minus_m * static_cast<Acc>(s[i]));
  }
}

struct Chunk {
  int64_t pair;
  int64_t start;
  int64_t len;
};

template <typename E, typename S>
void ema_chunk(const at::Tensor& e, const at::Tensor& s, const Chunk& c, double m) {
  using Acc = std::conditional_t<std::is_same_v<E, double>, double, float>;
  ema_span<E, S, Acc>(e.data_ptr<E>() + c.start, s.data_ptr<S>() + c.start, c.len,
                      static_cast<Acc>(m));
}

template <typename E>
void ema_chunk_src(const at::Tensor& e, const at::Tensor& s, const Chunk& c, double m) {
  switch (s.scalar_type()) {
    case at::kFloat: return ema_chunk<E, float>(e, s, c, m);
    case at::kDouble: return ema_chunk<E, double>(e, s, c, m);
    case at::kHalf: return ema_chunk<E, c10::Half>(e, s, c, m);
    case at::kBFloat16: return ema_chunk<E, c10::BFloat16>(e, s, c, m);
    default: TORCH_CHECK(false, "ema_: unsupported student dtype ", s.scalar_type());
  }
}

void ema_cpu(at::TensorList ema, at::TensorList src, double momentum,
             const std::optional<at::Tensor>& momentum_tensor) {
  TORCH_CHECK(ema.size() == src.size(), "ema_: ", ema.size(), " ema tensors but ", src.size(),
              " source tensors");
  double m = momentum;
  if (momentum_tensor.has_value()) m = momentum_tensor->item<double>();  // already on the CPU
  std::vector<Chunk> chunks;
  for (int64_t p = 0; p < static_cast<int64_t>(ema.size()); ++p) {
    const auto& e = ema[p];
    const auto& s = src[p];
    TORCH_CHECK(e.is_contiguous() && s.is_contiguous(), "ema_: tensors must be contiguous");
    TORCH_CHECK(e.numel() == s.numel(), "ema_: pair ", p, " has ", e.numel(), " and ", s.numel(),
                " elements");
    TORCH_CHECK(e.is_floating_point(), "ema_: integer tensors are copied by the caller");
    for (int64_t start = 0; start < e.numel(); start += kChunk)
      chunks.push_back({p, start, std::min(kChunk, e.numel() - start)});
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Chunk& c = chunks[i];
      const auto& e = ema[c.pair];
      const auto& s = src[c.pair];
      switch (e.scalar_type()) {
        case at::kFloat: ema_chunk_src<float>(e, s, c, m); break;
        case at::kDouble: ema_chunk_src<double>(e, s, c, m); break;
        case at::kHalf: ema_chunk_src<c10::Half>(e, s, c, m); break;
        case at::kBFloat16: ema_chunk_src<c10::BFloat16>(e, s, c, m); break;
        default: TORCH_CHECK(false, "ema_: unsupported teacher dtype ", e.scalar_type());
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ssl_fast_C, m) {
  m.def("ema_(Tensor(a!)[] ema, Tensor[] src, float momentum, Tensor? momentum_tensor) -> ()");
}

TORCH_LIBRARY_IMPL(ssl_fast_C, CPU, m) { m.impl("ema_", &ema_cpu); }
