// Argument checks of fastvit::linear_residual_fwd / linear_residual_bwd, shared by the CPU and CUDA
// implementations: every shape, dtype and device problem is reported (TypeError / ValueError in
// Python) before any kernel runs.
#include "linear/linear_residual.h"

#include <c10/util/Exception.h>

#include "common/checks.h"

namespace fastvit {
namespace {

// x and weight, common to the forward and the backward.
LinearResidualArgs check_x_and_weight(const at::Tensor& x, const at::Tensor& weight, const char* op) {
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

LinearResidualArgs prepare_linear_residual_forward(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias,
                                                   const std::optional<at::Tensor>& residual) {
  const char* op = "linear_residual_fwd";
  LinearResidualArgs args = check_x_and_weight(x, weight, op);
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
  return args;
}

LinearResidualArgs prepare_linear_residual_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                    const at::Tensor& weight) {
  const char* op = "linear_residual_bwd";
  LinearResidualArgs args = check_x_and_weight(x, weight, op);
  check_shape(grad_out, "grad_out", args.out_shape, "[..., N], the shape of the forward's output", op);
  check_like_x(grad_out, "grad_out", x, op);
  args.grad_out = grad_out.contiguous().view({args.rows, args.out_features});
  return args;
}

}  // namespace fastvit
