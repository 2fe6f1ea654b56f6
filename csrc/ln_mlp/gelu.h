// Elementwise GELU kernels of the fused MLP (CUDA), exact (erf) or tanh form, math in fp32.
//
// The exact GELU of timm's nn.GELU is not among cuBLASLt's epilogues (its GELU epilogues compute
// the tanh form), so the fc1 GEMM writes the pre-activation and these kernels do the rest; the
// tanh form also uses them whenever cuBLASLt's GELU epilogues are unavailable (shape, alignment,
// deterministic mode).
#pragma once

#ifdef FASTVIT_WITH_CUDA

#include <ATen/ATen.h>

namespace fastvit {

// Forward, on [rows, cols] contiguous tensors (rows·cols may pass 2^31):
//   pre = in (+ bias[col]) rounded to the dtype;  pre_out = pre (optional);  h_out = GELU(pre).
// `bias` and `pre_out` may be undefined. `pre_out` and `h_out` may alias `in` (in-place).
void launch_bias_gelu_forward(const at::Tensor& in, const at::Tensor& bias, const at::Tensor& pre_out,
                              const at::Tensor& h_out, bool tanh);

// Backward, in place: grad = grad · GELU'(pre) (grad holds dL/dGELU on entry, dL/dpre on exit);
// also h_out = GELU(pre) when defined (the recomputed activation fc2's weight gradient needs).
void launch_gelu_backward(const at::Tensor& pre, const at::Tensor& grad, const at::Tensor& h_out, bool tanh);

}  // namespace fastvit

#endif  // FASTVIT_WITH_CUDA
