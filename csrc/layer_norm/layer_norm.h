// LayerNorm over the last dimension: the C++/CUDA entry points of fastvit::layer_norm_fwd and
// fastvit::layer_norm_bwd, and the launchers the fused ln_mlp op reuses.
//
// Contract (same as fastvit.reference.layer_norm / rms_norm):
//   x:      [..., C]  float16 / bfloat16 / float32 / float64, any strides (made contiguous)
//   weight: [C], bias: [C] or None (= 0), same dtype as x
//   rms:    RMSNorm instead (mean fixed at 0, so x̂ = x·rstd, rstd = 1/√(mean(x²) + eps)); bias must be None
//   out:    [..., C]  dtype of x
//   mean, rstd: [...] float32 (float64 when x is float64); saved for the backward pass
// Statistics are accumulated in fp32 (fp64 for fp64 inputs), variance is biased, as torch.
//
// Backward, from the saved statistics (x̂ = (x - mean)·rstd, g = dy·weight, means over C):
//   dx = rstd · (g - mean(g) - x̂ · mean(g·x̂)),  dweight = Σ_rows dy·x̂,  dbias = Σ_rows dy
//   (RMSNorm: the mean(g) term drops out, since the mean is not subtracted; the saved mean is 0.)
// The dweight/dbias sums are deterministic on every device: fixed row chunks summed into an fp32
// [chunks, C] buffer, then the chunks summed in a fixed order (no atomics).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <optional>
#include <tuple>

#include "common/devices.h"

namespace fastvit {

// Contiguous inputs and freshly allocated outputs of one forward call, shared by every device.
struct LayerNormForward {
  at::Tensor x, weight, bias;  // contiguous copies (or the inputs themselves when already contiguous); bias may be undefined
  at::Tensor out, mean, rstd;  // [rows, width] as x's shape; [rows] as x's leading shape
  int64_t rows = 0, width = 0;
};

// Checks shapes, dtypes, devices and eps (ValueError/TypeError in Python), then allocates the outputs.
LayerNormForward prepare_layer_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias, double eps, bool rms);

// Contiguous inputs and freshly allocated outputs of one backward call.
struct LayerNormBackward {
  at::Tensor grad_out, x, weight, mean, rstd;  // contiguous
  at::Tensor grad_x, grad_weight, grad_bias;
  int64_t rows = 0, width = 0;
};

LayerNormBackward prepare_layer_norm_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                              const at::Tensor& mean, const at::Tensor& rstd);

// Optional extras of the backward launchers (undefined tensors = absent), used by ln_mlp:
//   residual_grad [rows, C]: added to grad_x (the gradient of a residual `x + f(LN(x))`);
//   bias + normed_out [rows, C]: also write LN(x) = x̂·weight + bias, recomputed from the saved
//   statistics (ln_mlp's fc1 weight gradient needs it and does not keep it from the forward);
//   bias may be undefined (= 0);
//   rms: the statistics are RMSNorm's (mean = 0): drop the mean(g) term of dx.
struct LayerNormBackwardExtras {
  at::Tensor residual_grad;
  at::Tensor bias;
  at::Tensor normed_out;
  bool rms = false;
};

// The *_out launchers, one signature for both devices: they work on contiguous [rows, C] tensors with preallocated
// outputs (rows may be 0; bias may be undefined); the CUDA ones run on the current stream of the tensors' device (the
// caller sets the device guard) and exist in builds with the CUDA kernels only.
using LayerNormForwardOutFn = void(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                                 const at::Tensor& out, const at::Tensor& mean, const at::Tensor& rstd, bool rms);
using LayerNormBackwardOutFn = void(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& grad_x,
                                  const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                                  const LayerNormBackwardExtras& extras);
LayerNormForwardOutFn layer_norm_forward_out_cpu;
LayerNormBackwardOutFn layer_norm_backward_out_cpu;
LayerNormForwardOutFn layer_norm_forward_out_cuda;
LayerNormBackwardOutFn layer_norm_backward_out_cuda;

// Rows of x [..., C] for a backward launcher; with none the weight and bias gradients are zeroed here and there is
// nothing to launch (returns 0).
inline int64_t backward_rows_or_zero_grads(const at::Tensor& x, const at::Tensor& grad_weight,
                                           const at::Tensor& grad_bias) {
  const int64_t width = x.size(-1), rows = width > 0 ? x.numel() / width : 0;
  if (rows == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
  }
  return rows;
}

// The kernels registered for kDevice's dispatch key (CPU, or CUDA in a build with the CUDA kernels), one definition
// for both: checked, contiguous inputs and fresh outputs, then that device's launcher.
template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias, double eps,
                                                              bool rms) {
  check_device(x, kDevice, "layer_norm_fwd");
  LayerNormForward fwd = prepare_layer_norm_forward(x, weight, bias, eps, rms);
  if constexpr (kDevice == c10::DeviceType::CUDA) {
    const c10::DeviceGuard device_guard(x.device());
    layer_norm_forward_out_cuda(fwd.x, fwd.weight, fwd.bias, eps, fwd.out, fwd.mean, fwd.rstd, rms);
  } else {
    layer_norm_forward_out_cpu(fwd.x, fwd.weight, fwd.bias, eps, fwd.out, fwd.mean, fwd.rstd, rms);
  }
  return {fwd.out, fwd.mean, fwd.rstd};
}

template <c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& weight, const at::Tensor& mean,
                                                              const at::Tensor& rstd, bool rms) {
  check_device(x, kDevice, "layer_norm_bwd");
  LayerNormBackward bwd = prepare_layer_norm_backward(grad_out, x, weight, mean, rstd);
  LayerNormBackwardExtras extras;
  extras.rms = rms;
  if constexpr (kDevice == c10::DeviceType::CUDA) {
    const c10::DeviceGuard device_guard(x.device());
    layer_norm_backward_out_cuda(bwd.grad_out, bwd.x, bwd.weight, bwd.mean, bwd.rstd, bwd.grad_x, bwd.grad_weight,
                                 bwd.grad_bias, extras);
  } else {
    layer_norm_backward_out_cpu(bwd.grad_out, bwd.x, bwd.weight, bwd.mean, bwd.rstd, bwd.grad_x, bwd.grad_weight,
                                bwd.grad_bias, extras);
  }
  return {bwd.grad_x, bwd.grad_weight, bwd.grad_bias};
}

// Rows per chunk of the deterministic dweight/dbias reduction: depends on the row count only, so
// the summation order (and the bits of the result) is the same on every run and every GPU.
inline int64_t layer_norm_rows_per_chunk(int64_t rows) {
  constexpr int64_t kMaxChunks = 256, kMinRowsPerChunk = 32;
  const int64_t per_chunk = (rows + kMaxChunks - 1) / kMaxChunks;
  return per_chunk < kMinRowsPerChunk ? kMinRowsPerChunk : per_chunk;
}

}  // namespace fastvit
