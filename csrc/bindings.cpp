// The one binding module of fastvit._C: TORCH_LIBRARY op schemas and their CPU/CUDA kernels,
// plus pybind11 helpers that are not ops (build facts reported by fastvit.backends()).
//
// Fake (meta) impls and autograd formulas are registered from Python (fastvit/ops/layer_norm.py,
// fastvit/ops/ln_mlp.py, fastvit/ops/linear_residual.py) with torch.library.register_fake /
// register_autograd.
#include <torch/extension.h>

#include "layer_norm/layer_norm.h"
#include "linear/linear_residual.h"
#include "ln_mlp/ln_mlp.h"

#ifdef FASTVIT_WITH_CUDA
#include <cublasLt.h>
#endif

TORCH_LIBRARY(fastvit, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, Tensor rstd) -> (Tensor grad_x, Tensor "
      "grad_weight, Tensor grad_bias)");
  m.def(
      "ln_mlp_fwd(Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, "
      "Tensor? fc2_bias, float eps, str approximate, bool residual, bool save_for_backward) -> (Tensor out, Tensor "
      "mean, Tensor rstd, Tensor pre_act)");
  m.def(
      "ln_mlp_bwd(Tensor grad_out, Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor mean, Tensor rstd, Tensor "
      "fc1_weight, Tensor pre_act, Tensor fc2_weight, str approximate, bool residual, bool deterministic) -> (Tensor "
      "grad_x, Tensor grad_ln_weight, Tensor grad_ln_bias, Tensor grad_fc1_weight, Tensor grad_fc1_bias, Tensor "
      "grad_fc2_weight, Tensor grad_fc2_bias)");
  m.def("linear_residual_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? residual) -> Tensor");
  m.def(
      "linear_residual_bwd(Tensor grad_out, Tensor x, Tensor weight, bool need_grad_x, bool need_grad_weight, bool "
      "need_grad_bias, bool deterministic) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)");
}

TORCH_LIBRARY_IMPL(fastvit, CPU, m) {
  m.impl("layer_norm_fwd", &fastvit::layer_norm_fwd_cpu);
  m.impl("layer_norm_bwd", &fastvit::layer_norm_bwd_cpu);
  m.impl("ln_mlp_fwd", &fastvit::ln_mlp_fwd_cpu);
  m.impl("ln_mlp_bwd", &fastvit::ln_mlp_bwd_cpu);
  m.impl("linear_residual_fwd", &fastvit::linear_residual_fwd_cpu);
  m.impl("linear_residual_bwd", &fastvit::linear_residual_bwd_cpu);
}

#ifdef FASTVIT_WITH_CUDA
TORCH_LIBRARY_IMPL(fastvit, CUDA, m) {
  m.impl("layer_norm_fwd", &fastvit::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &fastvit::layer_norm_bwd_cuda);
  m.impl("ln_mlp_fwd", &fastvit::ln_mlp_fwd_cuda);
  m.impl("ln_mlp_bwd", &fastvit::ln_mlp_bwd_cuda);
  m.impl("linear_residual_fwd", &fastvit::linear_residual_fwd_cuda);
  m.impl("linear_residual_bwd", &fastvit::linear_residual_bwd_cuda);
}
#else
namespace {
// A CPU-only build still registers a CUDA kernel for every op, so that CUDA tensors get this
// message instead of the dispatcher's generic "could not run ... with arguments from the 'CUDA' backend".
[[noreturn]] void built_without_cuda(const c10::OperatorHandle& op, torch::jit::Stack*) {
  TORCH_CHECK(false,
              "fastvit._C was built without CUDA kernels (nvcc was not found at build time, or "
              "FASTVIT_FORCE_CPU=1), so ",
              op.schema().name(),
              " cannot run on CUDA tensors. Rebuild with the CUDA "
              "toolkit (`pip install --no-build-isolation -e .`) or use backend='torch'.");
}
}  // namespace

TORCH_LIBRARY_IMPL(fastvit, CUDA, m) {
  for (const char* op : {"layer_norm_fwd", "layer_norm_bwd", "ln_mlp_fwd", "ln_mlp_bwd", "linear_residual_fwd",
                         "linear_residual_bwd"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&built_without_cuda>());
  }
}
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
