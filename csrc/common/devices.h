// What lets one definition of an op's kernel serve both dispatch keys: each op's API file defines it as a template
// on the device (`template <c10::DeviceType kDevice> ... ln_mlp_fwd(...)`), which checks its arguments and then runs
// that device's implementation; bindings.cpp registers the CPU instance for the CPU key and the CUDA one for CUDA.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace fastvit {

// `x` must be on the device of the kernel that runs (`device`): the dispatcher picks the kernel from all of the op's
// tensors, so mixed devices (or a redispatch) can send x to the other device's kernel.
inline void check_device(const at::Tensor& x, c10::DeviceType device, const char* op) {
  TORCH_CHECK_VALUE(x.device().type() == device, op, ": x must be a ", c10::DeviceTypeName(device),
                    " tensor here, got one on ", x.device(), " (keep all of the op's tensors on one device)");
}

}  // namespace fastvit

// The kernel template `fn` (of function type `fn_type`) for every device this build has kernels for: in the API file
// that defines it, where bindings.cpp cannot instantiate it.
#ifdef FASTVIT_WITH_CUDA
#define FASTVIT_INSTANTIATE_KERNEL(fn_type, fn) \
  template fn_type fn<c10::DeviceType::CPU>;    \
  template fn_type fn<c10::DeviceType::CUDA>
#else
#define FASTVIT_INSTANTIATE_KERNEL(fn_type, fn) template fn_type fn<c10::DeviceType::CPU>
#endif
