// Python module ssl_fast._C. The operators themselves are registered from each op's source
// file with TORCH_LIBRARY_FRAGMENT(ssl_fast_C, ...), so importing this module makes
// torch.ops.ssl_fast_C.<op> available.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ssl_fast compiled kernels (operators live in torch.ops.ssl_fast_C)";
#ifdef SSL_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
