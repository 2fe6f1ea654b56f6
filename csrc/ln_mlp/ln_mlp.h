// The MLP half of a pre-norm ViT block as one op: out = [x +] fc2(act(fc1(Norm(x)))).
//
// fastvit::ln_mlp_fwd(x, ln_weight, ln_bias?, fc1_weight, fc1_bias?, fc2_weight, fc2_bias?, eps,
//                     act, residual, save_for_backward, rms=False, hidden_norm_weight?=None,
//                     hidden_norm_bias?=None, hidden_norm_eps=1e-6) -> (out, mean, rstd, pre_act)
//   = [x +] fc2(HiddenNorm(act(fc1(Norm(x))))) with the optional hidden norm (timm's scale_mlp_norm, EVA02's
//   SwiGLU sub-LN): a norm of the same kind as the input norm (LayerNorm, or RMSNorm with rms=True) over the
//   hidden layer, weight [Hid], bias [Hid] or None (None with rms=True), its own eps > 0.
//   x:          [..., C]   (any strides; made contiguous), M = x.numel() / C rows
//   ln_weight:  [C], ln_bias: [C] or None (LayerNorm without bias); None with rms=True (RMSNorm)
//   fc1_weight: [P, C], fc1_bias: [P] or None, P = Hid (GELU forms) or 2·Hid (swiglu)
//   fc2_weight: [C, Hid], fc2_bias: [C] or None
//   eps > 0; act: "none"/"gelu" (exact erf GELU, timm's default), "tanh"/"gelu_tanh", "quick_gelu"
//   (x·σ(1.702x), OpenAI CLIP) or "swiglu" (SiLU(pre[:, :Hid]) · pre[:, Hid:], timm's SwiGLUPacked
//   order: the gate is the first half); residual: add x
//   out:        [..., C]; mean, rstd: [...] fp32 (fp64 for fp64 inputs); mean = 0 for RMSNorm
//   pre_act:    [..., P] = fc1(Norm(x)) + fc1_bias in the compute dtype when save_for_backward, else [0]
//   (the hidden norm's statistics are not returned: the backward recomputes them, see below)
// Weights are made contiguous (a no-op for nn.Linear parameters; a copy for a transposed view).
// All tensors share x's dtype and device: CPU float16/bfloat16/float32/float64, CUDA float16/
// bfloat16/float32 (fp32 accumulation everywhere; TF32 only when torch allows it for matmuls).
//
// fastvit::ln_mlp_bwd(grad_out, x, ln_weight, ln_bias?, mean, rstd, fc1_weight, pre_act, fc2_weight,
//                     act, residual, deterministic, rms=False, hidden_norm_weight?=None, hidden_norm_bias?=None,
//                     hidden_norm_eps=1e-6)
//   -> (grad_x, grad_ln_weight, grad_ln_bias, grad_fc1_weight, grad_fc1_bias [P], grad_fc2_weight,
//       grad_fc2_bias [C], grad_hidden_norm_weight, grad_hidden_norm_bias)   (the bias gradients are always
//       computed; drop them when the bias is None. The hidden norm's are [Hid], or [0] without a hidden norm.)
//
// What the backward needs, and why it is what the forward saves:
//   * x, mean, rstd. LayerNorm's backward needs x̂ = (x - mean)·rstd, so x is kept in any case; the
//     LN output LN(x) = x̂·w + b (needed for fc1's weight gradient) is then recomputed for free by
//     the LN backward kernel, which reads x anyway. Saving LN(x) instead would cost another [M, C]
//     per block, and recovering x̂ from it divides by the LN weight (unstable where w ≈ 0).
//   * pre_act, the fc1 pre-activation in the compute dtype: GELU' needs it. GELU(pre_act), the
//     largest activation ([M, Hid], 4C wide in a ViT), is not kept: one elementwise pass recomputes
//     it for fc2's weight gradient (fused with GELU' on the exact path). Together the op keeps
//     C + Hid values per token where eager PyTorch keeps C (x) + C (LN out) + 2·Hid (fc1 out, GELU out).
//   * Nothing for the hidden norm: the backward recomputes h = act(pre_act) anyway, and one norm-forward pass
//     over it gives both the hidden norm's statistics (for its backward) and its output HiddenNorm(h) (fc2's
//     weight gradient needs it); saving the statistics would spare the reductions only, not that pass.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastvit {

// The activation between the GEMMs.
enum class MlpAct { kGelu, kGeluTanh, kQuickGelu, kSwiglu };

using LnMlpForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LnMlpBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                       at::Tensor, at::Tensor, at::Tensor>;

// Validated, contiguous arguments of one call, shared by the CPU and CUDA implementations.
struct LnMlpArgs {
  at::Tensor x;                              // [rows, width]
  at::Tensor ln_weight, ln_bias;             // [width], [width] or undefined
  double eps = 0.0;                          // the input norm's (forward only)
  at::Tensor fc1_weight, fc1_bias;           // [pre_width, width], [pre_width] or undefined
  at::Tensor fc2_weight, fc2_bias;           // [width, hidden], [width] or undefined
  at::Tensor hidden_norm_weight;             // [hidden], or undefined: no norm over the hidden layer
  at::Tensor hidden_norm_bias;               // [hidden] or undefined
  double hidden_norm_eps = 1e-6;
  at::Tensor grad_out, mean, rstd, pre_act;  // backward only: [rows, width], [rows], [rows], [rows, pre_width]
  int64_t rows = 0, width = 0, hidden = 0;   // hidden: the activation's width (fc2's input)
  int64_t pre_width = 0;                     // fc1's output: hidden, or 2·hidden for swiglu
  MlpAct act = MlpAct::kGelu;
  bool rms = false;                                      // RMSNorm instead of LayerNorm
  std::vector<int64_t> x_shape, stats_shape, pre_shape;  // [..., C], [...], [..., P]
  at::ScalarType stats_dtype = at::kFloat;
};

// HiddenNorm(h) [rows, hidden] and its statistics [rows] (LayerNorm, or RMSNorm with a.rms: the norm kernels of
// csrc/layer_norm on h's device), or h itself without a hidden norm (mean and rstd then stay undefined).
struct HiddenNormed {
  at::Tensor out, mean, rstd;
};
HiddenNormed hidden_norm_forward(const LnMlpArgs& a, const at::Tensor& h);

// The op's kernels, one signature for both devices.
using LnMlpForwardFn = LnMlpForwardResult(const at::Tensor& x, const at::Tensor& ln_weight,
                                        const std::optional<at::Tensor>& ln_bias, const at::Tensor& fc1_weight,
                                        const std::optional<at::Tensor>& fc1_bias, const at::Tensor& fc2_weight,
                                        const std::optional<at::Tensor>& fc2_bias, double eps, c10::string_view act,
                                        bool residual, bool save_for_backward, bool rms,
                                        const std::optional<at::Tensor>& hidden_norm_weight,
                                        const std::optional<at::Tensor>& hidden_norm_bias, double hidden_norm_eps);
using LnMlpBackwardFn = LnMlpBackwardResult(const at::Tensor& grad_out, const at::Tensor& x,
                                          const at::Tensor& ln_weight, const std::optional<at::Tensor>& ln_bias,
                                          const at::Tensor& mean, const at::Tensor& rstd,
                                          const at::Tensor& fc1_weight, const at::Tensor& pre_act,
                                          const at::Tensor& fc2_weight, c10::string_view act, bool residual,
                                          bool deterministic, bool rms,
                                          const std::optional<at::Tensor>& hidden_norm_weight,
                                          const std::optional<at::Tensor>& hidden_norm_bias, double hidden_norm_eps);

// The kernel registered for kDevice's dispatch key (CPU, or CUDA in a build with the CUDA kernels), one definition
// for both (ln_mlp.cpp): checks x's device and everything else (TypeError / ValueError in Python) before any work,
// then runs that device's implementation below on the checked arguments.
template <c10::DeviceType kDevice>
LnMlpForwardFn ln_mlp_fwd;
template <c10::DeviceType kDevice>
LnMlpBackwardFn ln_mlp_bwd;

// The devices' implementations. The CUDA ones exist in builds with the CUDA kernels only; they run on the current
// stream of x's device.
LnMlpForwardResult ln_mlp_forward_cpu(const LnMlpArgs& a, bool residual, bool save_for_backward);
LnMlpBackwardResult ln_mlp_backward_cpu(const LnMlpArgs& a, bool residual, bool deterministic);
LnMlpForwardResult ln_mlp_forward_cuda(const LnMlpArgs& a, bool residual, bool save_for_backward);
LnMlpBackwardResult ln_mlp_backward_cuda(const LnMlpArgs& a, bool residual, bool deterministic);

}  // namespace fastvit
