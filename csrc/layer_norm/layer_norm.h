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

// Contiguous inputs and freshly allocated outputs of one forward call, shared by every device.
struct LayerNormForward {
  at::Tensor x, weight, bias;  // contiguous copies (or the inputs themselves when already contiguous)
  at::Tensor out, mean, rstd;  // [rows, width] as x's shape; [rows] as x's leading shape
  int64_t rows = 0, width = 0;
};

// Checks shapes, dtypes, devices and eps (ValueError/TypeError in Python), then allocates the outputs.
LayerNormForward prepare_layer_norm_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                            double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                  const at::Tensor& bias, double eps);

#ifdef FASTVIT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                   const at::Tensor& bias, double eps);
#endif

}  // namespace fastvit
