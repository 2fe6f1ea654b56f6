// A Linear layer with the residual add in its GEMM: out = residual + x·weightᵀ + bias. In a ViT block
// it is the attention half's proj Linear and the `x +` after it (x = x + proj(attn_out)) as one op.
//
// fastvit::linear_residual_fwd(x, weight, bias?, residual?) -> out
//   x:        [..., K]  (any strides; made contiguous), M = x.numel() / K rows, K > 0
//   weight:   [N, K], N > 0 (made contiguous: a no-op for nn.Linear parameters, a copy for a transposed view)
//   bias:     [N] or None
//   residual: [..., N] with x's leading shape, or None (then a plain Linear)
//   out:      [..., N], contiguous, dtype of x
// All tensors share x's dtype and device: CPU float16/bfloat16/float32/float64, CUDA float16/bfloat16/
// float32 (fp32 accumulation; TF32 only when torch allows it for its own matmuls). On CUDA the whole
// op is one cuBLASLt GEMM: epilogue BIAS with C = residual and beta = 1, so the residual is read once
// and the Linear's output is never written on its own.
//
// fastvit::linear_residual_bwd(grad_out, x, weight, need_grad_x, need_grad_weight, need_grad_bias,
//                              deterministic) -> (grad_x, grad_weight, grad_bias)
//   grad_x = grad_out·weight [..., K];  grad_weight = grad_outᵀ·x [N, K];  grad_bias = Σ_rows grad_out [N].
//   An output not asked for is an empty [0] tensor (its GEMM is skipped). The residual's gradient is
//   grad_out itself: the autograd formula (fastvit/ops/linear_residual.py) passes it through, no copy.
//   On CUDA grad_bias comes from the weight-gradient GEMM's BGRADB epilogue where cuBLASLt has one,
//   and from at::sum (fixed order) in deterministic mode, which also rules out split-K reductions.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastvit {

using LinearResidualBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Validated, contiguous arguments of one call, shared by the CPU and CUDA implementations.
struct LinearResidualArgs {
  at::Tensor x;               // [rows, in_features]
  at::Tensor weight;          // [out_features, in_features]
  at::Tensor bias, residual;  // forward: [out_features], [rows, out_features], or undefined
  at::Tensor grad_out;        // backward: [rows, out_features]
  int64_t rows = 0, in_features = 0, out_features = 0;
  std::vector<int64_t> x_shape, out_shape;  // [..., K], [..., N]
};

// The op's kernels, one signature for both devices.
using LinearResidualForwardFn = at::Tensor(const at::Tensor& x, const at::Tensor& weight,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& residual);
using LinearResidualBackwardFn = LinearResidualBackwardResult(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& weight, bool need_grad_x,
                                                              bool need_grad_weight, bool need_grad_bias,
                                                              bool deterministic);

// The kernel registered for kDevice's dispatch key (CPU, or CUDA in a build with the CUDA kernels), one definition
// for both (linear_residual.cpp): checks x's device and everything else (TypeError / ValueError in Python) before
// any work, then runs that device's implementation below on the checked arguments.
template <c10::DeviceType kDevice>
LinearResidualForwardFn linear_residual_fwd;
template <c10::DeviceType kDevice>
LinearResidualBackwardFn linear_residual_bwd;

// The devices' implementations. The CUDA ones exist in builds with the CUDA kernels only; they run on the current
// stream of x's device.
at::Tensor linear_residual_forward_cpu(const LinearResidualArgs& a);
LinearResidualBackwardResult linear_residual_backward_cpu(const LinearResidualArgs& a, bool need_grad_x,
                                                          bool need_grad_weight, bool need_grad_bias,
                                                          bool deterministic);
at::Tensor linear_residual_forward_cuda(const LinearResidualArgs& a);
LinearResidualBackwardResult linear_residual_backward_cuda(const LinearResidualArgs& a, bool need_grad_x,
                                                           bool need_grad_weight, bool need_grad_bias,
                                                           bool deterministic);

}  // namespace fastvit
