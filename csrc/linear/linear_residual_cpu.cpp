// C++ CPU implementation of fastvit::linear_residual_fwd / linear_residual_bwd: the same contract as the
// CUDA path, with ATen's CPU matmuls (addmm / mm) standing in for cuBLASLt. It is what CI runs without
// a GPU: it tests the op contract, the registration, the fake impl and the autograd wiring.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "linear/linear_residual.h"

namespace fastvit {

at::Tensor linear_residual_forward_cpu(const LinearResidualArgs& a) {
  // F.linear's own formula (addmm with the bias), then the residual: the order of the reference.
  at::Tensor out = a.bias.defined() ? at::addmm(a.bias, a.x, a.weight.t()) : at::mm(a.x, a.weight.t());
  if (a.residual.defined()) out = a.residual + out;
  return out.view(a.out_shape);
}

LinearResidualBackwardResult linear_residual_backward_cpu(
    const LinearResidualArgs& a, bool need_grad_x, bool need_grad_weight, bool need_grad_bias,
    bool /*deterministic: the CPU path always is, per thread count*/) {
  const auto none = [&] { return at::empty({0}, a.x.options()); };  // one per output: outputs never alias
  const at::Tensor& dy = a.grad_out;                                   // [rows, N]
  const at::Tensor grad_x = need_grad_x ? at::mm(dy, a.weight).view(a.x_shape) : none();
  const at::Tensor grad_weight = need_grad_weight ? at::mm(dy.t(), a.x) : none();  // [N, K]
  const at::Tensor grad_bias = need_grad_bias ? dy.sum(0) : none();               // [N]
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace fastvit
