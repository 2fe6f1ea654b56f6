// CUDA implementation of fastvit::ln_mlp_fwd / ln_mlp_bwd: our LayerNorm / RMSNorm kernels, cuBLASLt GEMMs
// with fused epilogues, and elementwise activation kernels where cuBLASLt has no epilogue (exact GELU,
// QuickGELU, SwiGLU).
// All work runs on the current stream of x's device; every intermediate comes from PyTorch's caching
// allocator (no cudaMalloc per call); cuBLASLt handle, workspace and GEMM plans: common/cublaslt.
//
// Forward (M tokens, C width, H hidden; row-major, see common/cublaslt.h for the column-major view):
//   1. LN kernel:  ln = LayerNorm(x) or RMSNorm(x) [M, C], mean/rstd [M] fp32.
//   2. fc1 GEMM:   act='gelu_tanh' (H % 8 == 0): epilogue GELU_AUX_BIAS writes h = GELU_tanh(pre)
//                  and the aux pre = ln·W1ᵀ + b1 in one pass.
//                  other acts (exact GELU, QuickGELU, SwiGLU; also the tanh fallback): epilogue BIAS
//                  writes pre [M, P] (P = 2H for SwiGLU), then one elementwise kernel writes h = act(pre).
//                  Inference (save_for_backward=False) writes pre into h's buffer and applies the
//                  activation in place (SwiGLU: into a scratch pre, h is half its width).
//   2b. hidden norm (optional: timm's scale_mlp_norm, EVA02's sub-LN): the same LayerNorm / RMSNorm kernel over
//                  h [M, H] writes hn = HiddenNorm(h) (one more pass over the hidden layer; not fused into the
//                  activation kernel, which is elementwise while the norm needs each row's statistics first).
//                  Its statistics are scratch: the backward recomputes them.
//   3. fc2 GEMM:   out = h·W2ᵀ + b2 + x (h: hn with a hidden norm): epilogue BIAS with C = x and beta = 1 (the
//                  residual add is part of the GEMM; no separate pass).
// Backward (dy = grad_out):
//   1. dgrad fc2:  dh = dy·W2 [M, H]. tanh: epilogue DGELU_BGRAD turns it into dpre = dh·GELU'(pre)
//                  and reduces db1 = Σ_tokens dpre (deterministic mode: epilogue DGELU, no reduction),
//                  then a kernel recomputes h = GELU(pre).
//                  other acts: plain GEMM, then one kernel reads pre and dh, writes dpre (in place; SwiGLU:
//                  into a [M, 2H] buffer) and h.
//   1'. with a hidden norm instead: a kernel recomputes h = act(pre); the norm kernel recomputes hn = HiddenNorm(h)
//                  and its statistics; dhn = dy·W2 (plain GEMM); the norm's backward kernels give dh, and the
//                  hidden norm's weight / bias gradients (deterministic two-stage sums); one kernel turns dh into
//                  dpre (no DGELU epilogue: the GEMM's output is dhn, not dh).
//   2. wgrad fc2:  dW2 = dyᵀ·h (hn with a hidden norm), epilogue BGRADB gives db2 = Σ_tokens dy.
//   3. dgrad fc1:  dln = dpre·W1 [M, C].
//   4. LN backward kernel: dx = LN'(dln) + dy (residual), dgamma/dbeta (deterministic two-stage
//                  reduction), and ln = LN(x) recomputed from x, mean, rstd for step 5.
//   5. wgrad fc1:  dW1 = dpreᵀ·ln, epilogue BGRADB gives db1 on the erf path.
// Deterministic mode avoids every cuBLASLt reduction epilogue (BGRAD*) and split-K; bias gradients
// then come from at::sum (deterministic), and our own kernels never use atomics. Epilogues without a
// reduction (DGELU) stay fused.
// Any epilogue cuBLASLt cannot run for a shape falls back to a plain GEMM + our kernel / at::sum.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "common/checks.h"
#include "common/cublaslt.h"
#include "common/linear.h"
#include "layer_norm/layer_norm.h"
#include "ln_mlp/gelu.h"
#include "ln_mlp/ln_mlp.h"

namespace fastvit {
namespace {

void* data(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// cuBLASLt's GELU aux matrix needs a leading dimension divisible by 8.
bool aux_ld_ok(int64_t hidden) { return hidden % 8 == 0; }

// fc1 GEMM + bias + activation: writes h [M, H], and pre [M, P] when `pre` is defined (always for SwiGLU,
// whose h cannot hold pre).
void fc1_bias_act(const LnMlpArgs& a, const at::Tensor& ln_out, const at::Tensor& pre, const at::Tensor& h) {
  const bool has_bias = a.fc1_bias.defined();
  const bool swiglu = a.act == MlpAct::kSwiglu;
  TORCH_CHECK(!swiglu || pre.defined(), "ln_mlp_fwd: SwiGLU needs a pre-activation buffer");
  // pre[M, P] = ln[M, C] · W1[P, C]ᵀ; D is set below (h, or pre).
  cublaslt::Matmul mm = cublaslt::linear_forward_matmul(ln_out, a.fc1_weight, swiglu ? pre : h);

  if (a.act == MlpAct::kGeluTanh && aux_ld_ok(a.hidden)) {  // one pass: cuBLASLt's GELU epilogue is the tanh form
    cublaslt::Matmul fused = mm;
    fused.d = h.data_ptr();
    fused.bias = has_bias ? a.fc1_bias.data_ptr() : nullptr;
    if (pre.defined()) {
      fused.aux = pre.data_ptr();
      fused.aux_ld = a.hidden;
      fused.epilogue = has_bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    } else {
      fused.epilogue = has_bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
    }
    if (cublaslt::matmul(fused) == CUBLAS_STATUS_SUCCESS) return;
  }

  // GEMM (+ bias epilogue) into pre (or straight into h's buffer when pre is not kept), then GELU.
  const at::Tensor& target = pre.defined() ? pre : h;
  mm.d = target.data_ptr();
  bool bias_done = true;
  if (has_bias) {
    cublaslt::Matmul with_bias = mm;
    with_bias.epilogue = CUBLASLT_EPILOGUE_BIAS;
    with_bias.bias = a.fc1_bias.data_ptr();
    bias_done = cublaslt::matmul(with_bias) == CUBLAS_STATUS_SUCCESS;
  }
  if (!has_bias || !bias_done) cublaslt::matmul_or_throw(mm, "fc1");
  launch_bias_act_forward(target, bias_done ? at::Tensor() : a.fc1_bias,
                          (!bias_done && pre.defined()) ? pre : at::Tensor(), h, a.act);
}

}  // namespace

LnMlpForwardResult ln_mlp_forward_cuda(const LnMlpArgs& a, bool residual, bool save_for_backward) {
  const c10::cuda::CUDAGuard device_guard(a.x.device());
  check_cuda_gemm_dtype(a.x, "ln_mlp_fwd");
  const auto options = a.x.options();
  const at::Tensor mean = at::empty({a.rows}, options.dtype(a.stats_dtype));
  const at::Tensor rstd = at::empty_like(mean);
  const at::Tensor out = at::empty({a.rows, a.width}, options);
  const bool keep_pre = save_for_backward || a.act == MlpAct::kSwiglu;  // SwiGLU's h cannot hold pre
  const at::Tensor pre = keep_pre ? at::empty({a.rows, a.pre_width}, options) : at::Tensor();
  const at::Tensor saved_pre = save_for_backward ? pre.view(a.pre_shape) : at::empty({0}, options);
  if (a.rows == 0) return {out.view(a.x_shape), mean.view(a.stats_shape), rstd.view(a.stats_shape), saved_pre};

  const at::Tensor ln_out = at::empty({a.rows, a.width}, options);
  layer_norm_forward_out_cuda(a.x, a.ln_weight, a.ln_bias, a.eps, ln_out, mean, rstd, a.rms);
  const at::Tensor h = at::empty({a.rows, a.hidden}, options);
  fc1_bias_act(a, ln_out, pre, h);
  const at::Tensor fc2_in = hidden_norm_forward(a, h).out;
  cublaslt::linear_forward(fc2_in, a.fc2_weight, a.fc2_bias, residual ? a.x : at::Tensor(), out, "fc2");
  return {out.view(a.x_shape), mean.view(a.stats_shape), rstd.view(a.stats_shape), saved_pre};
}

LnMlpBackwardResult ln_mlp_backward_cuda(const LnMlpArgs& a, bool residual, bool deterministic) {
  const c10::cuda::CUDAGuard device_guard(a.x.device());
  const bool has_hidden_norm = a.hidden_norm_weight.defined();
  check_cuda_gemm_dtype(a.x, "ln_mlp_bwd");
  const auto options = a.x.options();
  const at::Tensor grad_x = at::empty({a.rows, a.width}, options);
  const at::Tensor grad_ln_weight = at::empty_like(a.ln_weight);
  const at::Tensor grad_ln_bias = at::empty_like(a.ln_weight);
  const at::Tensor grad_fc1_weight = at::empty_like(a.fc1_weight);
  const at::Tensor grad_fc1_bias = at::empty({a.pre_width}, options);
  const at::Tensor grad_fc2_weight = at::empty_like(a.fc2_weight);
  const at::Tensor grad_fc2_bias = at::empty({a.width}, options);
  // [H] with a hidden norm, else [0] (the op's outputs are never undefined).
  const at::Tensor grad_hn_weight = at::empty({has_hidden_norm ? a.hidden : 0}, options);
  const at::Tensor grad_hn_bias = at::empty({has_hidden_norm ? a.hidden : 0}, options);
  if (a.rows == 0) {
    for (const at::Tensor& t : {grad_ln_weight, grad_ln_bias, grad_fc1_weight, grad_fc1_bias, grad_fc2_weight,
                                grad_fc2_bias, grad_hn_weight, grad_hn_bias}) {
      t.zero_();
    }
    return {grad_x.view(a.x_shape), grad_ln_weight, grad_ln_bias,   grad_fc1_weight, grad_fc1_bias,
            grad_fc2_weight,        grad_fc2_bias,  grad_hn_weight, grad_hn_bias};
  }
  const at::Tensor& dy = a.grad_out;  // [M, C]
  const at::Tensor grad_pre = at::empty({a.rows, a.pre_width}, options);
  const at::Tensor hidden = at::empty({a.rows, a.hidden}, options);
  // dh: in grad_pre's buffer (the GELU forms turn it into dpre in place), or its own for SwiGLU.
  const at::Tensor grad_hidden = a.act == MlpAct::kSwiglu ? at::empty({a.rows, a.hidden}, options) : grad_pre;

  // 1. dh = dy · W2  ([M, H]; m = H, n = M, k = C), then dpre = dh · act'(pre) and h = act(pre).
  const cublaslt::Matmul dgrad2 = cublaslt::linear_input_grad_matmul(dy, a.fc2_weight, grad_hidden, deterministic);
  bool gelu_done = false, fc1_bias_done = false;
  at::Tensor fc2_in = hidden;  // fc2's input: h, or HiddenNorm(h)
  if (has_hidden_norm) {
    // 1'. h = act(pre) recomputed; hn = HiddenNorm(h) and its statistics recomputed; dhn = dy · W2; dh from the
    // norm's backward (+ its weight / bias gradients); dpre = dh · act'(pre). dh lives in grad_hidden (grad_pre's
    // buffer for the GELU forms: the activation backward runs in place), dhn in a buffer of its own (the norm's
    // backward kernels read it after dh is written).
    launch_bias_act_forward(a.pre_act, at::Tensor(), at::Tensor(), hidden, a.act);
    const HiddenNormed normed = hidden_norm_forward(a, hidden);
    fc2_in = normed.out;
    const at::Tensor grad_normed = at::empty({a.rows, a.hidden}, options);
    cublaslt::linear_input_grad(dy, a.fc2_weight, grad_normed, deterministic, "fc2 input-gradient");
    LayerNormBackwardExtras hidden_extras;
    hidden_extras.rms = a.rms;
    layer_norm_backward_out_cuda(grad_normed, hidden, a.hidden_norm_weight, normed.mean, normed.rstd, grad_hidden,
                                 grad_hn_weight, grad_hn_bias, hidden_extras);
    launch_act_backward(a.pre_act, grad_hidden, grad_pre, at::Tensor(), a.act);
    gelu_done = true;
  } else if (a.act == MlpAct::kGeluTanh && aux_ld_ok(a.hidden)) {
    // DGELU_BGRAD also reduces db1 over the tokens (an order cuBLASLt does not fix); deterministic mode keeps
    // the elementwise DGELU epilogue and takes db1 from at::sum in step 5.
    cublaslt::Matmul fused = dgrad2;
    fused.epilogue = deterministic ? CUBLASLT_EPILOGUE_DGELU : CUBLASLT_EPILOGUE_DGELU_BGRAD;
    fused.aux = data(a.pre_act);
    fused.aux_ld = a.hidden;
    fused.bias = deterministic ? nullptr : grad_fc1_bias.data_ptr();
    if (cublaslt::matmul(fused) == CUBLAS_STATUS_SUCCESS) {
      gelu_done = true;
      fc1_bias_done = !deterministic;
      launch_bias_act_forward(a.pre_act, at::Tensor(), at::Tensor(), hidden, MlpAct::kGeluTanh);
    }
  }
  if (!gelu_done) {
    cublaslt::matmul_or_throw(dgrad2, "fc2 input-gradient");
    launch_act_backward(a.pre_act, grad_hidden, grad_pre, hidden, a.act);
  }

  // 2. dW2 = dyᵀ · h (HiddenNorm(h) with a hidden norm) and db2 = Σ_tokens dy.
  cublaslt::linear_weight_grad(fc2_in, dy, grad_fc2_weight, grad_fc2_bias, deterministic, "fc2 weight-gradient");

  // 3. dln = dpre · W1  ([M, C]; m = C, n = M, k = H).
  const at::Tensor grad_ln_out = at::empty({a.rows, a.width}, options);
  cublaslt::linear_input_grad(grad_pre, a.fc1_weight, grad_ln_out, deterministic, "fc1 input-gradient");

  // 4. LayerNorm / RMSNorm backward (+ the residual's dy), writing Norm(x) recomputed for step 5.
  LayerNormBackwardExtras extras;
  if (residual) extras.residual_grad = dy;
  extras.bias = a.ln_bias;
  extras.rms = a.rms;
  extras.normed_out = at::empty({a.rows, a.width}, options);
  layer_norm_backward_out_cuda(grad_ln_out, a.x, a.ln_weight, a.mean, a.rstd, grad_x, grad_ln_weight, grad_ln_bias,
                               extras);

  // 5. dW1 = dpreᵀ · LN(x), and db1 = Σ_tokens dpre unless step 1 already produced it.
  cublaslt::linear_weight_grad(extras.normed_out, grad_pre, grad_fc1_weight,
                               fc1_bias_done ? at::Tensor() : grad_fc1_bias, deterministic, "fc1 weight-gradient");
  return {grad_x.view(a.x_shape), grad_ln_weight, grad_ln_bias,   grad_fc1_weight, grad_fc1_bias,
          grad_fc2_weight,        grad_fc2_bias,  grad_hn_weight, grad_hn_bias};
}

}  // namespace fastvit
