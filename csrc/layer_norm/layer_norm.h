// LayerNorm forward over the last dimension: the C++/CUDA entry points of fastvit::layer_norm_fwd.
//
// Contract (same as fastvit.reference.layer_norm):
//   x:      [..., C]  float16 / bfloat16 / float32 / float64, any strides (made contiguous)
//   weight: [C], bias: [C], same dtype as x
//   out:    [..., C]  dtype of x
//   mean, rstd: [...] float32 (float64 when x is float64); saved for the backward pass
// Statistics are accumulated in fp32 (fp64 for fp64 inputs), variance is biased, as torch.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace fastvit {

// Argument checks shared by every device: shapes and dtypes of x, weight and bias.
void check_layer_norm_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                  const at::Tensor& bias, double eps);

#ifdef FASTVIT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                   const at::Tensor& bias, double eps);
#endif

}  // namespace fastvit
