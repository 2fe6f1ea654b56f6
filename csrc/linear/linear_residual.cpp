// The kernels of fastvit::linear_residual_fwd / linear_residual_bwd for both dispatch keys: every shape, dtype and
// device problem is reported (TypeError / ValueError in Python) before any work, then the device's implementation
// runs.
#include "linear/linear_residual.h"

#include <c10/util/Exception.h>

#include "common/checks.h"
#include "common/devices.h"

namespace fastvit {
namespace {

// x (on the device of the kernel that runs) and weight, common to the forward and the backward.
LinearResidualArgs check_x_and_weight(c10::DeviceType device, const at::Tensor& x, const at::Tensor& weight,
                                      const char* op) {
  check_device(x, device, op);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dimension, got a 0-d tensor");
  check_floating(x, "x", op);
  const int64_t in_features = x.size(-1);
  TORCH_CHECK_VALUE(in_features > 0, op, ": the last dimension of x (in_features K) must be > 0, got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [N, K], got shape ", weight.sizes());
  const int64_t out_features = weight.size(0);
  TORCH_CHECK_VALUE(out_features > 0, op, ": weight must have at least one output feature, got shape ",
                    weight.sizes());
  check_shape(weight, "weight", {out_features, in_features}, "[N, K], K = the last dimension of x", op);
  check_like_x(weight, "weight", x, op);

  LinearResidualArgs args;
  args.in_features = in_features;
  args.out_features = out_features;
  args.rows = x.numel() / in_features;
  args.x_shape = x.sizes().vec();
  args.out_shape = args.x_shape;
  args.out_shape.back() = out_features;
  args.x = x.contiguous().view({args.rows, in_features});
  args.weight = weight.contiguous();
  return args;
}

}  // namespace

template <c10::DeviceType kDevice>
at::Tensor linear_residual_fwd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual) {
  const char* op = "linear_residual_fwd";
  LinearResidualArgs args = check_x_and_weight(kDevice, x, weight, op);
  if (bias.has_value() && bias->defined()) {
    check_shape(*bias, "bias", {args.out_features}, "[N], N = weight.shape[0]", op);
    check_like_x(*bias, "bias", x, op);
    args.bias = bias->contiguous();
  }
  if (residual.has_value() && residual->defined()) {
    check_shape(*residual, "residual", args.out_shape, "[..., N]: x's leading dimensions and N = weight.shape[0]",
                op);
    check_like_x(*residual, "residual", x, op);
    args.residual = residual->contiguous().view({args.rows, args.out_features});
  }
  if constexpr (kDevice == c10::DeviceType::CUDA) {
    return linear_residual_forward_cuda(args);
  } else {
    return linear_residual_forward_cpu(args);
  }
}

template <c10::DeviceType kDevice>
LinearResidualBackwardResult linear_residual_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                 const at::Tensor& weight, bool need_grad_x, bool need_grad_weight,
                                                 bool need_grad_bias, bool deterministic) {
  const char* op = "linear_residual_bwd";
  LinearResidualArgs args = check_x_and_weight(kDevice, x, weight, op);
  check_shape(grad_out, "grad_out", args.out_shape, "[..., N], the shape of the forward's output", op);
  check_like_x(grad_out, "grad_out", x, op);
  args.grad_out = grad_out.contiguous().view({args.rows, args.out_features});
  if constexpr (kDevice == c10::DeviceType::CUDA) {
    return linear_residual_backward_cuda(args, need_grad_x, need_grad_weight, need_grad_bias, deterministic);
  } else {
    return linear_residual_backward_cpu(args, need_grad_x, need_grad_weight, need_grad_bias, deterministic);
  }
}

FASTVIT_INSTANTIATE_KERNEL(LinearResidualForwardFn, linear_residual_fwd);
FASTVIT_INSTANTIATE_KERNEL(LinearResidualBackwardFn, linear_residual_bwd);

}  // namespace fastvit
