// EMA (momentum-teacher) update on CUDA: one launch per (teacher dtype, student dtype) group
// over a table of chunk addresses, so a ViT's ~150 parameter tensors cost a few launches,
// not one per tensor. The momentum may live on the device (no host synchronisation).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <array>
#include <map>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 16;
constexpr int kThreads = 512;
constexpr int kVec = 4;

template <typename E, typename S, typename Acc>
__global__ void ema_chunks_kernel(const int64_t* __restrict__ table, int64_t n_chunks,
                                  Acc momentum, const float* __restrict__ momentum_ptr) {
  const int64_t c = blockIdx.x;
  E* e = reinterpret_cast<E*>(table[c]);
  const S* s = reinterpret_cast<const S*>(table[n_chunks + c]);
  const int64_t n = table[2 * n_chunks + c];
  const Acc m = momentum_ptr ? static_cast<Acc>(*momentum_ptr) : momentum;
  const Acc one_minus_m = Acc(1) - m;
  for (int64_t base = threadIdx.x * kVec; base < n; base += kThreads * kVec) {
    E ev[kVec];
    S sv[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (base + j < n) {
        ev[j] = e[base + j];
        sv[j] = s[base + j];
      }
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if (base + j < n)
        e[base + j] = static_cast<E>(m * static_cast<Acc>(ev[j]) + one_minus_m * static_cast<Acc>(sv[j]));
    }
  }
}

template <typename E, typename S>
void launch(const at::Tensor& host_table, int64_t n_chunks, double momentum,
            const float* momentum_ptr, const at::Device& device) {
  using Acc = std::conditional_t<std::is_same_v<E, double>, double, float>;
  // Pinned host table + non-blocking copy: the caching host allocator keeps the block alive
  // until the copy has run, and the host never waits for the GPU.
  auto table = host_table.to(device, /*non_blocking=*/true);
  auto stream = c10::cuda::getCurrentCUDAStream();
  ema_chunks_kernel<E, S, Acc><<<n_chunks, kThreads, 0, stream>>>(
      table.data_ptr<int64_t>(), n_chunks, static_cast<Acc>(momentum), momentum_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename E>
void launch_src(at::ScalarType s_type, const at::Tensor& table, int64_t n, double m,
                const float* mp, const at::Device& d) {
  switch (s_type) {
    case at::kFloat: return launch<E, float>(table, n, m, mp, d);
    case at::kDouble: return launch<E, double>(table, n, m, mp, d);
    case at::kHalf: return launch<E, at::Half>(table, n, m, mp, d);
    case at::kBFloat16: return launch<E, at::BFloat16>(table, n, m, mp, d);
    default: TORCH_CHECK(false, "ema_: unsupported student dtype ", s_type);
  }
}

void ema_cuda(at::TensorList ema, at::TensorList src, double momentum,
              const std::optional<at::Tensor>& momentum_tensor) {
  TORCH_CHECK(ema.size() == src.size(), "ema_: list lengths differ");
  if (ema.empty()) return;
  const c10::cuda::CUDAGuard guard(ema[0].device());
  at::Tensor m_dev;
  const float* mp = nullptr;
  if (momentum_tensor.has_value()) {
    m_dev = momentum_tensor->to(ema[0].device(), at::kFloat).contiguous();
    mp = m_dev.data_ptr<float>();
  }
  // Group chunks by dtype pair; each group's table is [e addresses | s addresses | lengths].
  std::map<std::pair<int, int>, std::vector<std::array<int64_t, 3>>> groups;
  for (size_t p = 0; p < ema.size(); ++p) {
    const auto& e = ema[p];
    const auto& s = src[p];
    TORCH_CHECK(e.is_cuda() && s.is_cuda(), "ema_: tensors must be CUDA tensors");
    TORCH_CHECK(e.is_contiguous() && s.is_contiguous(), "ema_: tensors must be contiguous");
    TORCH_CHECK(e.is_floating_point(), "ema_: integer tensors are copied by the caller");
    auto& chunks = groups[{static_cast<int>(e.scalar_type()), static_cast<int>(s.scalar_type())}];
    auto eb = reinterpret_cast<int64_t>(e.data_ptr());
    auto sb = reinterpret_cast<int64_t>(s.data_ptr());
    for (int64_t start = 0; start < e.numel(); start += kChunk)
      chunks.push_back({eb + start * static_cast<int64_t>(e.element_size()),
                        sb + start * static_cast<int64_t>(s.element_size()),
                        std::min(kChunk, e.numel() - start)});
  }
  for (const auto& [types, chunks] : groups) {
    const int64_t n = static_cast<int64_t>(chunks.size());
    if (n == 0) continue;
    auto table = at::empty({3 * n}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* t = table.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
      for (int j = 0; j < 3; ++j) t[j * n + i] = chunks[i][j];
    const auto e_type = static_cast<at::ScalarType>(types.first);
    const auto s_type = static_cast<at::ScalarType>(types.second);
    const auto& dev = ema[0].device();
    switch (e_type) {
      case at::kFloat: launch_src<float>(s_type, table, n, momentum, mp, dev); break;
      case at::kDouble: launch_src<double>(s_type, table, n, momentum, mp, dev); break;
      case at::kHalf: launch_src<at::Half>(s_type, table, n, momentum, mp, dev); break;
      case at::kBFloat16: launch_src<at::BFloat16>(s_type, table, n, momentum, mp, dev); break;
      default: TORCH_CHECK(false, "ema_: unsupported teacher dtype ", e_type);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(ssl_fast_C, CUDA, m) { m.impl("ema_", &ema_cuda); }
