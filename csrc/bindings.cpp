// The one binding module of fastvit._C: TORCH_LIBRARY op schemas and their CPU/CUDA kernels,
// plus pybind11 helpers that are not ops (build facts reported by fastvit.backends()).
#include <torch/extension.h>

#include "layer_norm/layer_norm.h"

#ifdef FASTVIT_WITH_CUDA
#include <cublasLt.h>
#endif

TORCH_LIBRARY(fastvit, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor out, Tensor mean, Tensor rstd)");
}

TORCH_LIBRARY_IMPL(fastvit, CPU, m) { m.impl("layer_norm_fwd", &fastvit::layer_norm_fwd_cpu); }

#ifdef FASTVIT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastvit, CUDA, m) { m.impl("layer_norm_fwd", &fastvit::layer_norm_fwd_cuda); }
#endif

namespace {

bool built_with_cuda() {
#ifdef FASTVIT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// cuBLASLt's runtime version (e.g. 130101), or 0 in a CPU-only build. Calling it proves the
// library the extension links against loads, without needing a GPU.
int64_t cublaslt_version() {
#ifdef FASTVIT_WITH_CUDA
  return static_cast<int64_t>(cublasLtGetVersion());
#else
  return 0;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastvit C++/CUDA extension: ops are registered under torch.ops.fastvit";
  m.def("built_with_cuda", &built_with_cuda, "True when the extension was compiled with its CUDA kernels");
  m.def("cublaslt_version", &cublaslt_version, "cuBLASLt runtime version, 0 in a CPU-only build");
}
