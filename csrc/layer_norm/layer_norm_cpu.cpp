// C++ CPU implementation of fastvit::layer_norm_fwd / layer_norm_bwd: the reference the CUDA kernels
// are tested against on GPU machines, and the path CI runs on machines without one. Also the shared
// argument checks of both devices.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "layer_norm/layer_norm.h"

namespace fastvit {

LayerNormForward prepare_layer_norm_forward(const at::Tensor& x, const at::Tensor& weight,
                                            const std::optional<at::Tensor>& bias_opt, double eps, bool rms) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "layer_norm: x must have at least 1 dimension, got a 0-d tensor");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   "layer_norm: x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  const int64_t width = x.size(-1);
  TORCH_CHECK_VALUE(width > 0, "layer_norm: the last dimension of x (the normalised width) must be > 0, got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == width, "layer_norm: weight must have shape [", width,
                    "] (the last dimension of x), got ", weight.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "layer_norm: weight must have the dtype of x (",
                   x.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device(), "layer_norm: x and weight must be on one device, got ", x.device(),
                    " and ", weight.device());
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  TORCH_CHECK_VALUE(!(rms && has_bias), "layer_norm: bias must be None with rms=True (RMSNorm has no bias)");
  if (has_bias) {
    const at::Tensor& bias = *bias_opt;
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == width, "layer_norm: bias must have shape [", width,
                      "] (the last dimension of x), got ", bias.sizes());
    TORCH_CHECK_TYPE(bias.scalar_type() == x.scalar_type(), "layer_norm: bias must have the dtype of x (",
                     x.scalar_type(), "), got ", bias.scalar_type());
    TORCH_CHECK_VALUE(bias.device() == x.device(), "layer_norm: x and bias must be on one device, got ", x.device(),
                      " and ", bias.device());
  }
  TORCH_CHECK_VALUE(eps >= 0.0, "layer_norm: eps must be >= 0, got ", eps);

  LayerNormForward fwd;
  fwd.x = x.contiguous();
  fwd.weight = weight.contiguous();
  if (has_bias) fwd.bias = bias_opt->contiguous();
  fwd.width = width;
  fwd.rows = x.numel() / width;
  const auto stats_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  fwd.out = at::empty_like(fwd.x);
  fwd.mean = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(stats_dtype));
  fwd.rstd = at::empty_like(fwd.mean);
  return fwd;
}

LayerNormBackward prepare_layer_norm_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                              const at::Tensor& mean, const at::Tensor& rstd) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "layer_norm_bwd: x must have at least 1 dimension, got a 0-d tensor");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   "layer_norm_bwd: x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  const int64_t width = x.size(-1);
  TORCH_CHECK_VALUE(width > 0, "layer_norm_bwd: the last dimension of x must be > 0, got shape ", x.sizes());
  TORCH_CHECK_VALUE(grad_out.sizes() == x.sizes(), "layer_norm_bwd: grad_out must have the shape of x (", x.sizes(),
                    "), got ", grad_out.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == width, "layer_norm_bwd: weight must have shape [", width,
                    "], got ", weight.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type() && weight.scalar_type() == x.scalar_type(),
                   "layer_norm_bwd: grad_out and weight must have the dtype of x (", x.scalar_type(), "), got ",
                   grad_out.scalar_type(), " and ", weight.scalar_type());
  const auto stats_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto stats_shape = x.sizes().slice(0, x.dim() - 1);
  TORCH_CHECK_VALUE(mean.sizes() == stats_shape && rstd.sizes() == stats_shape,
                    "layer_norm_bwd: mean and rstd must have shape ", stats_shape, " (x's leading dimensions), got ",
                    mean.sizes(), " and ", rstd.sizes());
  TORCH_CHECK_TYPE(mean.scalar_type() == stats_dtype && rstd.scalar_type() == stats_dtype,
                   "layer_norm_bwd: mean and rstd must be ", stats_dtype, " (as layer_norm_fwd returns them), got ",
                   mean.scalar_type(), " and ", rstd.scalar_type());
  for (const at::Tensor* t : {&grad_out, &weight, &mean, &rstd}) {
    TORCH_CHECK_VALUE(t->device() == x.device(), "layer_norm_bwd: all tensors must be on one device, got x on ",
                      x.device(), " and another on ", t->device());
  }

  LayerNormBackward bwd;
  bwd.grad_out = grad_out.contiguous();
  bwd.x = x.contiguous();
  bwd.weight = weight.contiguous();
  bwd.mean = mean.contiguous();
  bwd.rstd = rstd.contiguous();
  bwd.width = width;
  bwd.rows = x.numel() / width;
  bwd.grad_x = at::empty_like(bwd.x);
  bwd.grad_weight = at::empty_like(bwd.weight);
  bwd.grad_bias = at::empty_like(bwd.weight);
  return bwd;
}

namespace {

template <typename scalar_t>
void layer_norm_fwd_cpu_kernel(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, scalar_t* out,
                               at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* rstd_out, int64_t rows,
                               int64_t width, double eps, bool rms) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* x_row = x + row * width;
      scalar_t* out_row = out + row * width;
      const acc_t n = static_cast<acc_t>(width);
      acc_t mean = 0, var = 0;
      if (rms) {  // RMSNorm: the mean is not subtracted; var is the mean square
        for (int64_t i = 0; i < width; ++i) var += static_cast<acc_t>(x_row[i]) * static_cast<acc_t>(x_row[i]);
        var /= n;
      } else {
        // Corrected two-pass statistics (Chan, Golub & LeVeque): a first mean, then the centred sums;
        // the centred sum corrects the mean's rounding error, which grows with |mean| / std, and the
        // variance avoids the E[x^2] - E[x]^2 cancellation.
        acc_t sum = 0;
        for (int64_t i = 0; i < width; ++i) sum += static_cast<acc_t>(x_row[i]);
        const acc_t rough_mean = sum / n;
        acc_t centred_sum = 0, sq_sum = 0;
        for (int64_t i = 0; i < width; ++i) {
          const acc_t centred = static_cast<acc_t>(x_row[i]) - rough_mean;
          centred_sum += centred;
          sq_sum += centred * centred;
        }
        mean = rough_mean + centred_sum / n;
        var = std::max(acc_t(0), (sq_sum - centred_sum * centred_sum / n) / n);
      }
      const acc_t rstd = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
      for (int64_t i = 0; i < width; ++i) {
        const acc_t normed = (static_cast<acc_t>(x_row[i]) - mean) * rstd;
        const acc_t shift = bias != nullptr ? static_cast<acc_t>(bias[i]) : acc_t(0);
        out_row[i] = static_cast<scalar_t>(normed * static_cast<acc_t>(weight[i]) + shift);
      }
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  });
}

template <typename scalar_t>
void layer_norm_bwd_cpu_kernel(const scalar_t* grad_out, const scalar_t* x, const scalar_t* weight,
                               const at::opmath_type<scalar_t>* mean, const at::opmath_type<scalar_t>* rstd,
                               const scalar_t* residual_grad, const scalar_t* bias, scalar_t* normed_out,
                               scalar_t* grad_x, scalar_t* grad_weight, scalar_t* grad_bias, int64_t rows,
                               int64_t width, bool rms) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_width = acc_t(1) / static_cast<acc_t>(width);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t offset = row * width;
      const acc_t mu = mean[row], r = rstd[row];
      acc_t sum_g = 0, sum_g_xhat = 0;
      for (int64_t i = 0; i < width; ++i) {
        const acc_t xhat = (static_cast<acc_t>(x[offset + i]) - mu) * r;
        const acc_t g = static_cast<acc_t>(grad_out[offset + i]) * static_cast<acc_t>(weight[i]);
        sum_g += g;
        sum_g_xhat += g * xhat;
      }
      // RMSNorm does not subtract the mean, so its backward has no mean(g) term.
      const acc_t mean_g = rms ? acc_t(0) : sum_g * inv_width, mean_g_xhat = sum_g_xhat * inv_width;
      for (int64_t i = 0; i < width; ++i) {
        const acc_t xhat = (static_cast<acc_t>(x[offset + i]) - mu) * r;
        const acc_t g = static_cast<acc_t>(grad_out[offset + i]) * static_cast<acc_t>(weight[i]);
        acc_t dx = r * (g - mean_g - xhat * mean_g_xhat);
        if (residual_grad != nullptr) dx += static_cast<acc_t>(residual_grad[offset + i]);
        grad_x[offset + i] = static_cast<scalar_t>(dx);
        if (normed_out != nullptr) {
          const acc_t shift = bias != nullptr ? static_cast<acc_t>(bias[i]) : acc_t(0);
          normed_out[offset + i] = static_cast<scalar_t>(xhat * static_cast<acc_t>(weight[i]) + shift);
        }
      }
    }
  });

  // dweight / dbias: fixed row chunks (independent of the thread count) summed in parallel, then
  // the chunk sums added in order: the same bits for any number of threads.
  const int64_t rows_per_chunk = layer_norm_rows_per_chunk(rows);
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  std::vector<acc_t> partial_weight(chunks * width, acc_t(0)), partial_bias(chunks * width, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      acc_t* dw = partial_weight.data() + chunk * width;
      acc_t* db = partial_bias.data() + chunk * width;
      const int64_t last = std::min(rows, (chunk + 1) * rows_per_chunk);
      for (int64_t row = chunk * rows_per_chunk; row < last; ++row) {
        const int64_t offset = row * width;
        const acc_t mu = mean[row], r = rstd[row];
        for (int64_t i = 0; i < width; ++i) {
          const acc_t dy = static_cast<acc_t>(grad_out[offset + i]);
          dw[i] += dy * (static_cast<acc_t>(x[offset + i]) - mu) * r;
          db[i] += dy;
        }
      }
    }
  });
  for (int64_t i = 0; i < width; ++i) {
    acc_t dw = 0, db = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      dw += partial_weight[chunk * width + i];
      db += partial_bias[chunk * width + i];
    }
    grad_weight[i] = static_cast<scalar_t>(dw);
    grad_bias[i] = static_cast<scalar_t>(db);
  }
}

}  // namespace

void layer_norm_forward_out_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                                const at::Tensor& out, const at::Tensor& mean, const at::Tensor& rstd, bool rms) {
  const int64_t width = x.size(-1), rows = width > 0 ? x.numel() / width : 0;
  if (rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    layer_norm_fwd_cpu_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                                        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                        out.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<acc_t>(),
                                        rstd.mutable_data_ptr<acc_t>(), rows, width, eps, rms);
  });
}

void layer_norm_backward_out_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                 const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& grad_x,
                                 const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                                 const LayerNormBackwardExtras& extras) {
  const int64_t width = x.size(-1), rows = backward_rows_or_zero_grads(x, grad_weight, grad_bias);
  if (rows == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool write_normed = extras.normed_out.defined();
    layer_norm_bwd_cpu_kernel<scalar_t>(
        grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
        mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(),
        extras.residual_grad.defined() ? extras.residual_grad.const_data_ptr<scalar_t>() : nullptr,
        write_normed && extras.bias.defined() ? extras.bias.const_data_ptr<scalar_t>() : nullptr,
        write_normed ? extras.normed_out.mutable_data_ptr<scalar_t>() : nullptr, grad_x.mutable_data_ptr<scalar_t>(),
        grad_weight.mutable_data_ptr<scalar_t>(), grad_bias.mutable_data_ptr<scalar_t>(), rows, width, extras.rms);
  });
}

}  // namespace fastvit
