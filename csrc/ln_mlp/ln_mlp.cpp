// The kernels of fastvit::ln_mlp_fwd / ln_mlp_bwd for both dispatch keys: every shape, dtype, device and scalar
// problem is reported (TypeError / ValueError in Python) before any work, then the device's implementation runs.
// Also the hidden norm's forward stage, the same on both devices but for the launcher.
#include "ln_mlp/ln_mlp.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <string>

#include "common/checks.h"
#include "common/devices.h"
#include "layer_norm/layer_norm.h"

namespace fastvit {
namespace {

// 'none' and 'tanh' are the names of F.gelu's `approximate` (the op's argument before it took other activations).
MlpAct parse_act(c10::string_view act, const char* op) {
  if (act == c10::string_view("none") || act == c10::string_view("gelu")) return MlpAct::kGelu;
  if (act == c10::string_view("tanh") || act == c10::string_view("gelu_tanh")) return MlpAct::kGeluTanh;
  if (act == c10::string_view("quick_gelu")) return MlpAct::kQuickGelu;
  if (act == c10::string_view("swiglu")) return MlpAct::kSwiglu;
  TORCH_CHECK_VALUE(false, op,
                    ": act must be 'gelu' (or 'none': exact erf GELU), 'gelu_tanh' (or 'tanh'), 'quick_gelu' or "
                    "'swiglu', got '",
                    std::string(act.data(), act.size()), "'");
  return MlpAct::kGelu;
}

// The parameter checks common to the forward and the backward.
// The optional norm over the hidden layer: weight [hidden], bias [hidden] or None (None with rms), eps > 0.
void check_hidden_norm(LnMlpArgs& args, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                       const std::optional<at::Tensor>& bias, double eps, const char* op) {
  const bool has_weight = weight.has_value() && weight->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  TORCH_CHECK_VALUE(has_weight || !has_bias, op, ": hidden_norm_bias given without hidden_norm_weight");
  if (!has_weight) return;
  const char* meaning = args.act == MlpAct::kSwiglu ? "[hidden], hidden = fc1_weight.shape[0] / 2 for swiglu"
                                                    : "[hidden], hidden = fc1_weight.shape[0]";
  check_shape(*weight, "hidden_norm_weight", {args.hidden}, meaning, op);
  check_like_x(*weight, "hidden_norm_weight", x, op);
  TORCH_CHECK_VALUE(!(args.rms && has_bias), op,
                    ": hidden_norm_bias must be None with rms=True (the hidden norm is an RMSNorm too: no bias)");
  if (has_bias) {
    check_shape(*bias, "hidden_norm_bias", {args.hidden}, meaning, op);
    check_like_x(*bias, "hidden_norm_bias", x, op);
    args.hidden_norm_bias = bias->contiguous();
  }
  // As the input norm's eps: 0 would divide by zero on constant rows of the hidden layer.
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, op, ": hidden_norm_eps must be a positive finite number, got ",
                    eps);
  args.hidden_norm_weight = weight->contiguous();
  args.hidden_norm_eps = eps;
}

LnMlpArgs check_parameters(c10::DeviceType device, const at::Tensor& x, const at::Tensor& ln_weight,
                           const std::optional<at::Tensor>& ln_bias, const at::Tensor& fc1_weight,
                           const at::Tensor& fc2_weight, c10::string_view act_name, bool rms,
                           const std::optional<at::Tensor>& hidden_norm_weight,
                           const std::optional<at::Tensor>& hidden_norm_bias, double hidden_norm_eps, const char* op) {
  check_device(x, device, op);
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least 1 dimension, got a 0-d tensor");
  check_floating(x, "x", op);
  const int64_t width = x.size(-1);
  TORCH_CHECK_VALUE(width > 0, op, ": the last dimension of x (the width C) must be > 0, got shape ", x.sizes());
  TORCH_CHECK_VALUE(fc1_weight.dim() == 2, op, ": fc1_weight must be 2-D [hidden, C], got shape ", fc1_weight.sizes());
  const MlpAct act = parse_act(act_name, op);
  const int64_t pre_width = fc1_weight.size(0);
  TORCH_CHECK_VALUE(pre_width > 0, op, ": fc1_weight must have at least one output feature, got shape ",
                    fc1_weight.sizes());
  const bool swiglu = act == MlpAct::kSwiglu;
  TORCH_CHECK_VALUE(!swiglu || pre_width % 2 == 0, op,
                    ": with act='swiglu' fc1_weight must have an even number of rows [2*hidden, C] (gate rows first), "
                    "got shape ",
                    fc1_weight.sizes());
  const int64_t hidden = swiglu ? pre_width / 2 : pre_width;
  check_shape(ln_weight, "ln_weight", {width}, "[C], C = the last dimension of x", op);
  check_shape(fc1_weight, "fc1_weight", {pre_width, width}, "[hidden, C], or [2*hidden, C] for swiglu", op);
  check_shape(fc2_weight, "fc2_weight", {width, hidden},
              swiglu ? "[C, hidden], hidden = fc1_weight.shape[0] / 2 for swiglu"
                     : "[C, hidden], hidden = fc1_weight.shape[0]",
              op);
  check_like_x(ln_weight, "ln_weight", x, op);
  check_like_x(fc1_weight, "fc1_weight", x, op);
  check_like_x(fc2_weight, "fc2_weight", x, op);

  LnMlpArgs args;
  const bool has_ln_bias = ln_bias.has_value() && ln_bias->defined();
  TORCH_CHECK_VALUE(!(rms && has_ln_bias), op, ": ln_bias must be None with rms=True (RMSNorm has no bias)");
  if (has_ln_bias) {
    check_shape(*ln_bias, "ln_bias", {width}, "[C], C = the last dimension of x", op);
    check_like_x(*ln_bias, "ln_bias", x, op);
    args.ln_bias = ln_bias->contiguous();
  }
  args.width = width;
  args.hidden = hidden;
  args.pre_width = pre_width;
  args.rows = x.numel() / width;
  args.act = act;
  args.rms = rms;
  args.x_shape = x.sizes().vec();
  args.stats_shape = std::vector<int64_t>(args.x_shape.begin(), args.x_shape.end() - 1);
  args.pre_shape = args.stats_shape;
  args.pre_shape.push_back(pre_width);
  args.stats_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  args.x = x.contiguous().view({args.rows, width});
  args.ln_weight = ln_weight.contiguous();
  args.fc1_weight = fc1_weight.contiguous();
  args.fc2_weight = fc2_weight.contiguous();
  check_hidden_norm(args, x, hidden_norm_weight, hidden_norm_bias, hidden_norm_eps, op);
  return args;
}

}  // namespace

template <c10::DeviceType kDevice>
LnMlpForwardResult ln_mlp_fwd(const at::Tensor& x, const at::Tensor& ln_weight,
                              const std::optional<at::Tensor>& ln_bias, const at::Tensor& fc1_weight,
                              const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
                              const std::optional<at::Tensor>& fc2_bias, double eps, c10::string_view act,
                              bool residual, bool save_for_backward, bool rms,
                              const std::optional<at::Tensor>& hidden_norm_weight,
                              const std::optional<at::Tensor>& hidden_norm_bias, double hidden_norm_eps) {
  const char* op = "ln_mlp_fwd";
  LnMlpArgs args = check_parameters(kDevice, x, ln_weight, ln_bias, fc1_weight, fc2_weight, act, rms,
                                    hidden_norm_weight, hidden_norm_bias, hidden_norm_eps, op);
  if (fc1_bias.has_value() && fc1_bias->defined()) {
    check_shape(*fc1_bias, "fc1_bias", {args.pre_width}, "[fc1_weight.shape[0]]", op);
    check_like_x(*fc1_bias, "fc1_bias", x, op);
    args.fc1_bias = fc1_bias->contiguous();
  }
  if (fc2_bias.has_value() && fc2_bias->defined()) {
    check_shape(*fc2_bias, "fc2_bias", {args.width}, "[C]", op);
    check_like_x(*fc2_bias, "fc2_bias", x, op);
    args.fc2_bias = fc2_bias->contiguous();
  }
  // eps = 0 would divide by zero on constant rows (rstd = inf): the fused op asks for a positive eps.
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0.0, op, ": eps must be a positive finite number, got ", eps);
  args.eps = eps;
  if constexpr (kDevice == c10::DeviceType::CUDA) {
    return ln_mlp_forward_cuda(args, residual, save_for_backward);
  } else {
    return ln_mlp_forward_cpu(args, residual, save_for_backward);
  }
}

template <c10::DeviceType kDevice>
LnMlpBackwardResult ln_mlp_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& ln_weight,
                               const std::optional<at::Tensor>& ln_bias, const at::Tensor& mean, const at::Tensor& rstd,
                               const at::Tensor& fc1_weight, const at::Tensor& pre_act, const at::Tensor& fc2_weight,
                               c10::string_view act, bool residual, bool deterministic, bool rms,
                               const std::optional<at::Tensor>& hidden_norm_weight,
                               const std::optional<at::Tensor>& hidden_norm_bias, double hidden_norm_eps) {
  const char* op = "ln_mlp_bwd";
  LnMlpArgs args = check_parameters(kDevice, x, ln_weight, ln_bias, fc1_weight, fc2_weight, act, rms,
                                    hidden_norm_weight, hidden_norm_bias, hidden_norm_eps, op);
  check_shape(grad_out, "grad_out", args.x_shape, "the shape of x", op);
  check_like_x(grad_out, "grad_out", x, op);
  TORCH_CHECK_VALUE(pre_act.numel() != 0 || args.rows == 0, op,
                    ": pre_act is empty: the forward ran with save_for_backward=False, so there is nothing to "
                    "differentiate");
  check_shape(pre_act, "pre_act", args.pre_shape, "[..., fc1_weight.shape[0]], as returned by ln_mlp_fwd", op);
  check_like_x(pre_act, "pre_act", x, op);
  auto check_stats = [&](const at::Tensor& t, const char* name) {
    check_shape(t, name, args.stats_shape, "x's leading dimensions, as returned by ln_mlp_fwd", op);
    TORCH_CHECK_TYPE(t.scalar_type() == args.stats_dtype, op, ": ", name, " must be ", args.stats_dtype,
                     " (as ln_mlp_fwd returns it), got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x.device(), op, ": all tensors must be on one device, got x on ", x.device(),
                      " and ", name, " on ", t.device());
  };
  check_stats(mean, "mean");
  check_stats(rstd, "rstd");
  args.grad_out = grad_out.contiguous().view({args.rows, args.width});
  args.pre_act = pre_act.contiguous().view({args.rows, args.pre_width});
  args.mean = mean.contiguous().view({args.rows});
  args.rstd = rstd.contiguous().view({args.rows});
  if constexpr (kDevice == c10::DeviceType::CUDA) {
    return ln_mlp_backward_cuda(args, residual, deterministic);
  } else {
    return ln_mlp_backward_cpu(args, residual, deterministic);
  }
}

FASTVIT_INSTANTIATE_KERNEL(LnMlpForwardFn, ln_mlp_fwd);
FASTVIT_INSTANTIATE_KERNEL(LnMlpBackwardFn, ln_mlp_bwd);

HiddenNormed hidden_norm_forward(const LnMlpArgs& a, const at::Tensor& h) {
  if (!a.hidden_norm_weight.defined()) return {h, at::Tensor(), at::Tensor()};
  HiddenNormed normed{at::empty_like(h), at::empty({a.rows}, h.options().dtype(a.stats_dtype)), at::Tensor()};
  normed.rstd = at::empty_like(normed.mean);
  if (h.is_cuda()) {
#ifdef FASTVIT_WITH_CUDA
    layer_norm_forward_out_cuda(h, a.hidden_norm_weight, a.hidden_norm_bias, a.hidden_norm_eps, normed.out,
                                normed.mean, normed.rstd, a.rms);
#else
    TORCH_CHECK(false, "ln_mlp: fastvit._C was built without CUDA kernels");
#endif
  } else {
    layer_norm_forward_out_cpu(h, a.hidden_norm_weight, a.hidden_norm_bias, a.hidden_norm_eps, normed.out, normed.mean,
                               normed.rstd, a.rms);
  }
  return normed;
}

}  // namespace fastvit
