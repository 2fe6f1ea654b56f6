// Elementwise activation kernels of the fused MLP (CUDA), math in fp32: exact (erf) GELU, tanh GELU,
// QuickGELU (x·σ(1.702x)) and SwiGLU (SiLU(gate) · value on fc1's two halves).
//
// cuBLASLt's GELU epilogues compute the tanh form only, and it has no QuickGELU or SwiGLU epilogue, so
// the fc1 GEMM writes the pre-activation and these kernels do the rest; the tanh form also uses them
// whenever cuBLASLt's GELU epilogues are unavailable (shape, alignment, deterministic mode).
#pragma once

#ifdef FASTVIT_WITH_CUDA

#include <ATen/ATen.h>

#include "ln_mlp/ln_mlp.h"

namespace fastvit {

// Forward, on contiguous tensors (rows·cols may pass 2^31):
//   pre = in (+ bias[col]) rounded to the dtype;  pre_out = pre (optional);  h_out = act(pre).
//   GELU forms: in, pre_out, h_out [rows, H]; `pre_out` and `h_out` may alias `in` (in place).
//   swiglu: in, pre_out [rows, 2H] (pre_out may alias in), h_out [rows, H] = SiLU(pre[:, :H]) · pre[:, H:].
// `bias` and `pre_out` may be undefined.
void launch_bias_act_forward(const at::Tensor& in, const at::Tensor& bias, const at::Tensor& pre_out,
                             const at::Tensor& h_out, MlpAct act);

// Backward: grad_pre = dL/dpre from grad_h = dL/dact and pre; also h_out = act(pre) when defined (the
// recomputed activation fc2's weight gradient needs).
//   GELU forms: pre, grad_h, grad_pre, h_out [rows, H]; grad_pre may alias grad_h (in place).
//   swiglu: pre, grad_pre [rows, 2H]; grad_h, h_out [rows, H]; no aliasing.
void launch_act_backward(const at::Tensor& pre, const at::Tensor& grad_h, const at::Tensor& grad_pre,
                         const at::Tensor& h_out, MlpAct act);

}  // namespace fastvit

#endif  // FASTVIT_WITH_CUDA
