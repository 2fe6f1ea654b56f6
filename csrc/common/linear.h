// nn.Linear's three GEMMs on row-major torch tensors, as cuBLASLt calls with fused epilogues. Used by
// every CUDA op that contains a Linear layer (ln_mlp's fc1/fc2, linear_residual).
//
// Shapes (row-major, contiguous, one dtype: float16, bfloat16 or float32; M rows = tokens):
//   forward        out[M, N]    = x[M, K] · weight[N, K]ᵀ (+ bias[N]) (+ residual[M, N])
//   input grad     grad_x[M, K] = dy[M, N] · weight[N, K]
//   weight grad    grad_w[N, K] = dy[M, N]ᵀ · x[M, K],  grad_b[N] = Σ_rows dy
// The *_matmul builders return the plain GEMM in cuBLASLt's column-major terms (the transposition
// convention is in common/cublaslt.h), for callers that add their own epilogue (GELU, DGELU_BGRAD).
// Every function runs on the current stream and expects M, N, K > 0 (callers handle empty inputs).
#pragma once

#ifdef FASTVIT_WITH_CUDA

#include <ATen/ATen.h>

#include "common/cublaslt.h"

namespace fastvit {
namespace cublaslt {

Matmul linear_forward_matmul(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out);
Matmul linear_input_grad_matmul(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& grad_x,
                                bool deterministic);
Matmul linear_weight_grad_matmul(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& grad_weight,
                                 bool deterministic);

// out = x·weightᵀ + bias + residual in one GEMM: epilogue BIAS, C = residual with beta = 1 (residual
// has out's layout). `bias` / `residual` may be undefined. Where cuBLASLt has no BIAS algorithm for
// the problem (rare), the plain GEMM (still with C = residual) is followed by one bias add.
void linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& residual,
                    const at::Tensor& out, const char* what);

// grad_x = dy·weight.
void linear_input_grad(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& grad_x, bool deterministic,
                       const char* what);

// grad_weight = dyᵀ·x and, when `grad_bias` is defined, grad_bias = Σ_rows dy: from the BGRADB epilogue
// of the same GEMM where cuBLASLt allows it, else (and always in deterministic mode) from at::sum.
void linear_weight_grad(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& grad_weight,
                        const at::Tensor& grad_bias, bool deterministic, const char* what);

}  // namespace cublaslt
}  // namespace fastvit

#endif  // FASTVIT_WITH_CUDA
