// C++ CPU implementation of fastvit::ln_mlp_fwd / ln_mlp_bwd: the same contract and the same stages
// as the CUDA path (norm kernel, GEMMs, activation, the hidden norm's forward / backward kernels, norm backward
// kernel writing the recomputed norm output), with ATen's CPU matmuls (addmm / mm) standing in for cuBLASLt.
// It is what CI runs without a GPU: it tests the op contract, the registration, the fake impl and the autograd wiring.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "layer_norm/layer_norm.h"
#include "ln_mlp/ln_mlp.h"

namespace fastvit {
namespace {

constexpr double kQuickGeluScale = 1.702;  // OpenAI CLIP's QuickGELU: x·σ(1.702x)

// quick_gelu and swiglu in the op-math dtype (fp32 for fp16/bf16), rounded once, as the CUDA kernels do.
at::Tensor op_math(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? t : t.to(at::kFloat);
}

// act(pre): pre [rows, P] -> [rows, hidden].
at::Tensor act_forward(const at::Tensor& pre, MlpAct act) {
  switch (act) {
    case MlpAct::kGelu:
      return at::gelu(pre, "none");
    case MlpAct::kGeluTanh:
      return at::gelu(pre, "tanh");
    case MlpAct::kQuickGelu: {
      const at::Tensor z = op_math(pre);
      return (z * at::sigmoid(z * kQuickGeluScale)).to(pre.scalar_type());
    }
    case MlpAct::kSwiglu: {
      const auto halves = op_math(pre).chunk(2, /*dim=*/1);  // gate first (timm's SwiGLUPacked)
      return (at::silu(halves[0]) * halves[1]).to(pre.scalar_type());
    }
  }
  TORCH_CHECK(false, "ln_mlp: unknown activation");
  return pre;  // unreachable
}

// dL/dpre [rows, P] from dL/dact [rows, hidden] and pre [rows, P].
at::Tensor act_backward(const at::Tensor& grad_hidden, const at::Tensor& pre, MlpAct act) {
  switch (act) {
    case MlpAct::kGelu:
      return at::gelu_backward(grad_hidden, pre, "none");
    case MlpAct::kGeluTanh:
      return at::gelu_backward(grad_hidden, pre, "tanh");
    case MlpAct::kQuickGelu: {
      const at::Tensor z = op_math(pre);
      const at::Tensor s = at::sigmoid(z * kQuickGeluScale);
      return (op_math(grad_hidden) * (s + kQuickGeluScale * z * s * (1 - s))).to(pre.scalar_type());
    }
    case MlpAct::kSwiglu: {
      const auto halves = op_math(pre).chunk(2, /*dim=*/1);
      const at::Tensor& gate = halves[0];
      const at::Tensor& value = halves[1];
      const at::Tensor g = op_math(grad_hidden);
      const at::Tensor s = at::sigmoid(gate);
      const at::Tensor grad_gate = g * value * s * (1 + gate * (1 - s));  // d SiLU(u)/du = σ(u)(1 + u(1 - σ(u)))
      const at::Tensor grad_value = g * gate * s;
      return at::cat({grad_gate, grad_value}, /*dim=*/1).to(pre.scalar_type());
    }
  }
  TORCH_CHECK(false, "ln_mlp: unknown activation");
  return pre;  // unreachable
}

}  // namespace

LnMlpForwardResult ln_mlp_forward_cpu(const LnMlpArgs& a, bool residual, bool save_for_backward) {
  const at::Tensor mean = at::empty({a.rows}, a.x.options().dtype(a.stats_dtype));
  const at::Tensor rstd = at::empty_like(mean);
  const at::Tensor ln_out = at::empty({a.rows, a.width}, a.x.options());
  layer_norm_forward_out_cpu(a.x, a.ln_weight, a.ln_bias, a.eps, ln_out, mean, rstd, a.rms);

  const at::Tensor pre = a.fc1_bias.defined() ? at::addmm(a.fc1_bias, ln_out, a.fc1_weight.t())
                                              : at::mm(ln_out, a.fc1_weight.t());  // [rows, P]
  const at::Tensor hidden = hidden_norm_forward(a, act_forward(pre, a.act)).out;  // [rows, hidden]
  at::Tensor out = a.fc2_bias.defined() ? at::addmm(a.fc2_bias, hidden, a.fc2_weight.t())
                                        : at::mm(hidden, a.fc2_weight.t());  // [rows, width]
  if (residual) out.add_(a.x);
  const at::Tensor saved_pre = save_for_backward ? pre.view(a.pre_shape) : at::empty({0}, a.x.options());
  return {out.view(a.x_shape), mean.view(a.stats_shape), rstd.view(a.stats_shape), saved_pre};
}

LnMlpBackwardResult ln_mlp_backward_cpu(const LnMlpArgs& a, bool residual,
                                        bool /*deterministic: the CPU path always is, for a given thread count*/) {
  const at::Tensor& dy = a.grad_out;  // [rows, width]

  const at::Tensor hidden = act_forward(a.pre_act, a.act);  // recomputed, [rows, hidden]
  const HiddenNormed fc2_in = hidden_norm_forward(a, hidden);  // recomputed with its statistics; or hidden
  const at::Tensor grad_fc2_weight = at::mm(dy.t(), fc2_in.out);  // [width, hidden]
  const at::Tensor grad_fc2_bias = dy.sum(0);                     // [width]
  at::Tensor grad_hidden = at::mm(dy, a.fc2_weight);              // [rows, hidden]: dL/d fc2's input
  at::Tensor grad_hn_weight = at::empty({0}, a.x.options()), grad_hn_bias = at::empty({0}, a.x.options());
  if (a.hidden_norm_weight.defined()) {  // through the hidden norm: dL/dh, and its weight / bias gradients
    const at::Tensor grad_normed = grad_hidden;
    grad_hidden = at::empty_like(hidden);
    grad_hn_weight = at::empty_like(a.hidden_norm_weight);
    grad_hn_bias = at::empty_like(a.hidden_norm_weight);
    LayerNormBackwardExtras hidden_extras;
    hidden_extras.rms = a.rms;
    layer_norm_backward_out_cpu(grad_normed, hidden, a.hidden_norm_weight, fc2_in.mean, fc2_in.rstd, grad_hidden,
                                grad_hn_weight, grad_hn_bias, hidden_extras);
  }
  const at::Tensor grad_pre = act_backward(grad_hidden, a.pre_act, a.act);  // [rows, P]
  const at::Tensor grad_fc1_bias = grad_pre.sum(0);                         // [P]
  const at::Tensor grad_ln_out = at::mm(grad_pre, a.fc1_weight);            // [rows, width]

  const at::Tensor grad_x = at::empty({a.rows, a.width}, a.x.options());
  const at::Tensor grad_ln_weight = at::empty_like(a.ln_weight);
  const at::Tensor grad_ln_bias = at::empty_like(a.ln_weight);
  LayerNormBackwardExtras extras;
  if (residual) extras.residual_grad = dy;
  extras.bias = a.ln_bias;
  extras.rms = a.rms;
  extras.normed_out = at::empty({a.rows, a.width}, a.x.options());  // Norm(x), recomputed from x, mean, rstd
  layer_norm_backward_out_cpu(grad_ln_out, a.x, a.ln_weight, a.mean, a.rstd, grad_x, grad_ln_weight, grad_ln_bias,
                              extras);
  const at::Tensor grad_fc1_weight = at::mm(grad_pre.t(), extras.normed_out);  // [P, width]
  return {grad_x.view(a.x_shape), grad_ln_weight, grad_ln_bias,   grad_fc1_weight, grad_fc1_bias,
          grad_fc2_weight,        grad_fc2_bias,  grad_hn_weight, grad_hn_bias};
}

}  // namespace fastvit
