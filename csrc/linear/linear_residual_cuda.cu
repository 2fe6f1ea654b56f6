// CUDA implementation of fastvit::linear_residual_fwd / linear_residual_bwd: cuBLASLt GEMMs with fused
// epilogues (common/linear.h), on the current stream of x's device, outputs from PyTorch's caching
// allocator.
//
// Forward (M tokens, K in, N out):  out = x·Wᵀ + b + residual as ONE GEMM: epilogue BIAS, C = residual,
//   beta = 1. Compared with eager `residual + F.linear(x, W, b)` this saves writing and re-reading the
//   [M, N] Linear output and one launch. Without a bias it is the plain GEMM with C = residual.
// Backward (dy = grad_out): dx = dy·W (m = K, n = M, k = N); dW = dyᵀ·x with db = Σ_tokens dy from the
//   same GEMM's BGRADB epilogue (m = K, n = N, k = M), or from at::sum in deterministic mode (which
//   also forbids split-K). d(residual) = dy needs no kernel: the autograd formula passes dy through.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/checks.h"
#include "common/linear.h"
#include "linear/linear_residual.h"

namespace fastvit {

at::Tensor linear_residual_forward_cuda(const LinearResidualArgs& a) {
  const c10::cuda::CUDAGuard device_guard(a.x.device());
  check_cuda_gemm_dtype(a.x, "linear_residual_fwd");
  const at::Tensor out = at::empty({a.rows, a.out_features}, a.x.options());
  if (a.rows > 0) cublaslt::linear_forward(a.x, a.weight, a.bias, a.residual, out, "linear_residual");
  return out.view(a.out_shape);
}

LinearResidualBackwardResult linear_residual_backward_cuda(const LinearResidualArgs& a, bool need_grad_x,
                                                           bool need_grad_weight, bool need_grad_bias,
                                                           bool deterministic) {
  const c10::cuda::CUDAGuard device_guard(a.x.device());
  check_cuda_gemm_dtype(a.x, "linear_residual_bwd");
  const auto options = a.x.options();
  const at::Tensor grad_x = at::empty(need_grad_x ? a.x_shape : std::vector<int64_t>{0}, options);
  const at::Tensor grad_weight = need_grad_weight ? at::empty_like(a.weight) : at::empty({0}, options);
  const at::Tensor grad_bias = at::empty({need_grad_bias ? a.out_features : 0}, options);
  if (a.rows == 0) {  // no tokens: zero parameter gradients, an empty grad_x
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_x, grad_weight, grad_bias};
  }
  const at::Tensor& dy = a.grad_out;  // [M, N]
  if (need_grad_x) {
    cublaslt::linear_input_grad(dy, a.weight, grad_x.view({a.rows, a.in_features}), deterministic,
                                "linear_residual input-gradient");
  }
  if (need_grad_weight) {
    cublaslt::linear_weight_grad(a.x, dy, grad_weight, need_grad_bias ? grad_bias : at::Tensor(), deterministic,
                                 "linear_residual weight-gradient");
  } else if (need_grad_bias) {
    at::Tensor bias_out = grad_bias;
    at::sum_out(bias_out, dy, at::IntArrayRef{0});
  }
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace fastvit
