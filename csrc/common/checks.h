// Argument checks shared by the ops' API files (csrc/<op>/<op>.cpp): each raises a TypeError /
// ValueError in Python (TORCH_CHECK_TYPE / TORCH_CHECK_VALUE) naming the op and the argument, before
// any kernel runs. Host code only; include from .cpp and .cu files alike.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace fastvit {

// `t` must be float16, bfloat16, float32 or float64.
inline void check_floating(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

// `t` must have the dtype and the device of `x` (the op's main input).
inline void check_like_x(const at::Tensor& t, const char* name, const at::Tensor& x, const char* op) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (", x.scalar_type(),
                   "), got ", t.scalar_type(), " (mixed dtypes are not supported; cast the inputs)");
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": all tensors must be on one device, got x on ", x.device(), " and ",
                    name, " on ", t.device());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected, const char* meaning,
                        const char* op) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": ", name, " must have shape ", expected, " (", meaning, "), got ",
                    t.sizes());
}

// The dtypes of the CUDA paths built on cuBLASLt GEMMs (fp32 accumulation): float16, bfloat16, float32.
inline void check_cuda_gemm_dtype(const at::Tensor& x, const char* op) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, op,
                   " on CUDA supports float16, bfloat16 and float32, got ", dtype,
                   " (the C++ CPU path and backend='torch' also take float64)");
}

}  // namespace fastvit
