// C++ CPU implementation of fastvit::layer_norm_fwd: the reference the CUDA kernel is tested
// against on GPU machines, and the path CI runs on machines without one.
#include "layer_norm/layer_norm.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace fastvit {

LayerNormForward prepare_layer_norm_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                            double eps) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "layer_norm: x must have at least 1 dimension, got a 0-d tensor");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   "layer_norm: x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  const int64_t width = x.size(-1);
  TORCH_CHECK_VALUE(width > 0, "layer_norm: the last dimension of x (the normalised width) must be > 0, got shape ",
                    x.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == width, "layer_norm: weight must have shape [", width,
                    "] (the last dimension of x), got ", weight.sizes());
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == width, "layer_norm: bias must have shape [", width,
                    "] (the last dimension of x), got ", bias.sizes());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type() && bias.scalar_type() == x.scalar_type(),
                   "layer_norm: weight and bias must have the dtype of x (", x.scalar_type(), "), got ",
                   weight.scalar_type(), " and ", bias.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == x.device() && bias.device() == x.device(),
                    "layer_norm: x, weight and bias must be on one device, got ", x.device(), ", ", weight.device(),
                    ", ", bias.device());
  TORCH_CHECK_VALUE(eps >= 0.0, "layer_norm: eps must be >= 0, got ", eps);

  LayerNormForward fwd;
  fwd.x = x.contiguous();
  fwd.weight = weight.contiguous();
  fwd.bias = bias.contiguous();
  fwd.width = width;
  fwd.rows = x.numel() / width;
  const auto stats_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  fwd.out = at::empty_like(fwd.x);
  fwd.mean = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(stats_dtype));
  fwd.rstd = at::empty_like(fwd.mean);
  return fwd;
}

namespace {

template <typename scalar_t>
void layer_norm_fwd_cpu_kernel(const scalar_t* x, const scalar_t* weight, const scalar_t* bias, scalar_t* out,
                               at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* rstd_out,
                               int64_t rows, int64_t width, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* x_row = x + row * width;
      scalar_t* out_row = out + row * width;
      // Two passes over the row (mean, then centred sum of squares): no cancellation for
      // rows with a large mean, unlike E[x^2] - E[x]^2.
      acc_t sum = 0;
      for (int64_t i = 0; i < width; ++i) sum += static_cast<acc_t>(x_row[i]);
      const acc_t mean = sum / static_cast<acc_t>(width);
      acc_t sq_sum = 0;
      for (int64_t i = 0; i < width; ++i) {
        const acc_t centred = static_cast<acc_t>(x_row[i]) - mean;
        sq_sum += centred * centred;
      }
      const acc_t var = sq_sum / static_cast<acc_t>(width);
      const acc_t rstd = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
      for (int64_t i = 0; i < width; ++i) {
        const acc_t normed = (static_cast<acc_t>(x_row[i]) - mean) * rstd;
        out_row[i] = static_cast<scalar_t>(normed * static_cast<acc_t>(weight[i]) + static_cast<acc_t>(bias[i]));
      }
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                  const at::Tensor& bias, double eps) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "layer_norm_fwd_cpu: x must be a CPU tensor, got ", x.device());
  LayerNormForward fwd = prepare_layer_norm_forward(x, weight, bias, eps);
  if (fwd.rows == 0) return {fwd.out, fwd.mean, fwd.rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    layer_norm_fwd_cpu_kernel<scalar_t>(fwd.x.const_data_ptr<scalar_t>(), fwd.weight.const_data_ptr<scalar_t>(),
                                        fwd.bias.const_data_ptr<scalar_t>(), fwd.out.mutable_data_ptr<scalar_t>(),
                                        fwd.mean.mutable_data_ptr<acc_t>(), fwd.rstd.mutable_data_ptr<acc_t>(),
                                        fwd.rows, fwd.width, eps);
  });
  return {fwd.out, fwd.mean, fwd.rstd};
}

}  // namespace fastvit
