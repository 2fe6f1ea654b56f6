// CUDA implementation of fastvit::layer_norm_fwd: one warp per row, fp32 statistics.
//
// Each warp strides over its row three times (sum, centred sum of squares, normalise); the
// row stays in L1/L2 between passes, so DRAM traffic is one read of x and one write of out.
// This is the starting kernel that exercises the build; the vectorised forward/backward pair
// of the LN-GELU-MLP op replaces it.
#include "layer_norm/layer_norm.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

namespace fastvit {
namespace {

constexpr int kWarpSize = 32;
constexpr int kRowsPerBlock = 4;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_all_reduce_sum(acc_t value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

template <typename scalar_t, typename acc_t>
__global__ void layer_norm_fwd_kernel(const scalar_t* __restrict__ x,       // [rows, width]
                                      const scalar_t* __restrict__ weight,  // [width]
                                      const scalar_t* __restrict__ bias,    // [width]
                                      scalar_t* __restrict__ out,           // [rows, width]
                                      acc_t* __restrict__ mean_out,         // [rows]
                                      acc_t* __restrict__ rstd_out,         // [rows]
                                      int64_t rows, int64_t width, acc_t eps) {
  const int lane = threadIdx.x;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (row >= rows) return;
  const scalar_t* x_row = x + row * width;  // int64: rows * width may pass 2^31
  scalar_t* out_row = out + row * width;

  acc_t sum = 0;
  for (int64_t i = lane; i < width; i += kWarpSize) sum += static_cast<acc_t>(x_row[i]);
  const acc_t mean = warp_all_reduce_sum(sum) / static_cast<acc_t>(width);

  acc_t sq_sum = 0;
  for (int64_t i = lane; i < width; i += kWarpSize) {
    const acc_t centred = static_cast<acc_t>(x_row[i]) - mean;
    sq_sum += centred * centred;
  }
  const acc_t var = warp_all_reduce_sum(sq_sum) / static_cast<acc_t>(width);
  const acc_t rstd = rsqrt(var + eps);

  for (int64_t i = lane; i < width; i += kWarpSize) {
    const acc_t normed = (static_cast<acc_t>(x_row[i]) - mean) * rstd;
    out_row[i] = static_cast<scalar_t>(normed * static_cast<acc_t>(weight[i]) + static_cast<acc_t>(bias[i]));
  }
  if (lane == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                   const at::Tensor& bias, double eps) {
  TORCH_CHECK_VALUE(x.is_cuda(), "layer_norm_fwd_cuda: x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  LayerNormForward fwd = prepare_layer_norm_forward(x, weight, bias, eps);
  if (fwd.rows == 0) return {fwd.out, fwd.mean, fwd.rstd};

  const dim3 block(kWarpSize, kRowsPerBlock);
  const int64_t num_blocks = (fwd.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK_VALUE(num_blocks <= static_cast<int64_t>(INT32_MAX), "layer_norm: too many rows (", fwd.rows, ")");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    layer_norm_fwd_kernel<scalar_t, acc_t><<<static_cast<unsigned>(num_blocks), block, 0, stream>>>(
        fwd.x.const_data_ptr<scalar_t>(), fwd.weight.const_data_ptr<scalar_t>(), fwd.bias.const_data_ptr<scalar_t>(),
        fwd.out.mutable_data_ptr<scalar_t>(), fwd.mean.mutable_data_ptr<acc_t>(), fwd.rstd.mutable_data_ptr<acc_t>(),
        fwd.rows, fwd.width, static_cast<acc_t>(eps));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {fwd.out, fwd.mean, fwd.rstd};
}

}  // namespace fastvit
