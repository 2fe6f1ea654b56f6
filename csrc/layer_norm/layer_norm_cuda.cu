// CUDA LayerNorm forward and backward (fastvit::layer_norm_fwd / layer_norm_bwd, and the LN stages of
// fastvit::ln_mlp_fwd / ln_mlp_bwd).
//
// RMSNorm (rms=true) runs on the same kernels: the mean is fixed at 0 (and saved as 0), the variance is
// the mean square, and the backward drops dx's mean(g) term; the bias is absent.
//
// Forward: one warp per row, fp32 statistics (fp64 for fp64 inputs), two passes for the variance
// (mean, then the centred sum of squares: no E[x²] - E[x]² cancellation), then the normalisation.
// Every pass reads the row with 16-byte vector loads when the row length and pointers allow it;
// the row stays in L1/L2 between passes, so DRAM traffic is one read of x and one write of out.
//
// Backward: one warp per row for dx (two passes: the row sums Σg and Σg·x̂, then dx), optionally
// adding the residual gradient and writing the recomputed LN output (for ln_mlp). dweight and dbias
// are reduced deterministically in two stages, with no atomics: a [chunks, C] fp32 buffer of
// per-chunk column sums (chunk size fixed by the row count, see layer_norm_rows_per_chunk; rows read
// with 16-byte loads when aligned), then a per-column sum over the chunks in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>

#include <type_traits>

#include "common/cuda_utils.h"
#include "layer_norm/layer_norm.h"

namespace fastvit {
namespace {

constexpr int kRowsPerBlock = 4;  // warps per block in the row kernels, one row per warp
constexpr int kColTile = 32;      // columns per block in the column-reduction kernels
constexpr int kRowLanes = 8;      // threads along the rows in the column-reduction kernels
constexpr int kRowKernelThreads = kWarpSize * kRowsPerBlock;
constexpr int kColKernelThreads = kColTile * kRowLanes;

// LayerNorm's output for pack p of a row: (x - mean) · rstd · w + b (b nullptr: no bias), rounded once to T.
template <typename T, typename acc_t, int VEC>
__device__ __forceinline__ Pack<T, VEC> normalize_pack(const Pack<T, VEC>& xv, const Pack<T, VEC>* w,
                                                       const Pack<T, VEC>* b, int64_t p, acc_t mean, acc_t rstd) {
  const Pack<T, VEC> wv = w[p];
  Pack<T, VEC> bv;
  if (b != nullptr) bv = b[p];
  Pack<T, VEC> out;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    const acc_t xhat = (static_cast<acc_t>(xv.v[j]) - mean) * rstd;
    const acc_t shift = b != nullptr ? static_cast<acc_t>(bv.v[j]) : acc_t(0);
    out.v[j] = static_cast<T>(xhat * static_cast<acc_t>(wv.v[j]) + shift);
  }
  return out;
}

template <typename T, typename acc_t, int VEC>
__global__ void __launch_bounds__(kRowKernelThreads) layer_norm_fwd_kernel(const T* __restrict__ x,  // [rows, width]
                                                                           const T* __restrict__ weight,  // [width]
                                                                           const T* __restrict__ bias,    // [width] or nullptr
                                                                           T* __restrict__ out,  // [rows, width]
                                                                           acc_t* __restrict__ mean_out,  // [rows]
                                                                           acc_t* __restrict__ rstd_out,  // [rows]
                                                                           int64_t rows, int64_t width, acc_t eps,
                                                                           bool rms) {
  using P = Pack<T, VEC>;
  const int lane = threadIdx.x;
  const int64_t packs = width / VEC;
  const acc_t inv_width = acc_t(1) / static_cast<acc_t>(width);
  const P* w = reinterpret_cast<const P*>(weight);
  const P* b = reinterpret_cast<const P*>(bias);
  // The row index depends on threadIdx.y only: a warp enters and leaves the loop together.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const P* x_row = reinterpret_cast<const P*>(x + row * width);  // int64: rows * width may pass 2^31
    acc_t mean = 0, var = 0;
    if (rms) {  // RMSNorm (uniform per launch): mean fixed at 0, var = mean(x²)
      acc_t sq_sum = 0;
      for (int64_t p = lane; p < packs; p += kWarpSize) {
        const P v = x_row[p];
#pragma unroll
        for (int j = 0; j < VEC; ++j) sq_sum += static_cast<acc_t>(v.v[j]) * static_cast<acc_t>(v.v[j]);
      }
      var = warp_all_reduce_sum(sq_sum) * inv_width;
    } else {
      acc_t sum = 0;
      for (int64_t p = lane; p < packs; p += kWarpSize) {
        const P v = x_row[p];
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum += static_cast<acc_t>(v.v[j]);
      }
      const acc_t rough_mean = warp_all_reduce_sum(sum) * inv_width;

      // Corrected two-pass statistics: the centred sum corrects the first mean's rounding error
      // (which grows with |mean| / std); the centred squares avoid E[x^2] - E[x]^2 cancellation.
      acc_t centred_sum = 0, sq_sum = 0;
      for (int64_t p = lane; p < packs; p += kWarpSize) {
        const P v = x_row[p];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t centred = static_cast<acc_t>(v.v[j]) - rough_mean;
          centred_sum += centred;
          sq_sum += centred * centred;
        }
      }
      centred_sum = warp_all_reduce_sum(centred_sum);
      mean = rough_mean + centred_sum * inv_width;
      var = (warp_all_reduce_sum(sq_sum) - centred_sum * centred_sum * inv_width) * inv_width;
    }
    const acc_t rstd = rsqrt(fmax(var, acc_t(0)) + eps);

    P* out_row = reinterpret_cast<P*>(out + row * width);
    for (int64_t p = lane; p < packs; p += kWarpSize) {
      out_row[p] = normalize_pack<T, acc_t, VEC>(x_row[p], w, b, p, mean, rstd);
    }
    if (lane == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

template <typename T, typename acc_t, int VEC>
__global__ void __launch_bounds__(kRowKernelThreads)
    layer_norm_bwd_dx_kernel(const T* __restrict__ grad_out,       // [rows, width]
                             const T* __restrict__ x,              // [rows, width]
                             const T* __restrict__ weight,         // [width]
                             const acc_t* __restrict__ mean,       // [rows]
                             const acc_t* __restrict__ rstd,       // [rows]
                             const T* __restrict__ residual_grad,  // [rows, width] or nullptr
                             const T* __restrict__ bias,           // [width] or nullptr, with normed_out
                             T* __restrict__ normed_out,           // [rows, width] or nullptr
                             T* __restrict__ grad_x,               // [rows, width]
                             int64_t rows, int64_t width, bool rms) {
  using P = Pack<T, VEC>;
  const int lane = threadIdx.x;
  const int64_t packs = width / VEC;
  const acc_t inv_width = acc_t(1) / static_cast<acc_t>(width);
  const P* w = reinterpret_cast<const P*>(weight);
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y; row < rows;
       row += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t offset = row * width;
    const P* dy_row = reinterpret_cast<const P*>(grad_out + offset);
    const P* x_row = reinterpret_cast<const P*>(x + offset);
    const acc_t mu = mean[row], r = rstd[row];

    acc_t sum_g = 0, sum_g_xhat = 0;
    for (int64_t p = lane; p < packs; p += kWarpSize) {
      const P dv = dy_row[p], xv = x_row[p], wv = w[p];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t xhat = (static_cast<acc_t>(xv.v[j]) - mu) * r;
        const acc_t g = static_cast<acc_t>(dv.v[j]) * static_cast<acc_t>(wv.v[j]);
        sum_g += g;
        sum_g_xhat += g * xhat;
      }
    }
    // RMSNorm does not subtract the mean, so its backward has no mean(g) term.
    const acc_t mean_g = rms ? acc_t(0) : warp_all_reduce_sum(sum_g) * inv_width;
    const acc_t mean_g_xhat = warp_all_reduce_sum(sum_g_xhat) * inv_width;

    P* dx_row = reinterpret_cast<P*>(grad_x + offset);
    const P* res_row = residual_grad != nullptr ? reinterpret_cast<const P*>(residual_grad + offset) : nullptr;
    P* normed_row = normed_out != nullptr ? reinterpret_cast<P*>(normed_out + offset) : nullptr;
    const P* b = reinterpret_cast<const P*>(bias);
    for (int64_t p = lane; p < packs; p += kWarpSize) {
      const P dv = dy_row[p], xv = x_row[p], wv = w[p];
      P res;
      if (res_row != nullptr) res = res_row[p];
      P dx;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t xhat = (static_cast<acc_t>(xv.v[j]) - mu) * r;
        const acc_t g = static_cast<acc_t>(dv.v[j]) * static_cast<acc_t>(wv.v[j]);
        acc_t value = r * (g - mean_g - xhat * mean_g_xhat);
        if (res_row != nullptr) value += static_cast<acc_t>(res.v[j]);
        dx.v[j] = static_cast<T>(value);
      }
      dx_row[p] = dx;
      // The forward's LN output: the same expression from the same statistics, rounded once.
      if (normed_row != nullptr) normed_row[p] = normalize_pack<T, acc_t, VEC>(xv, w, b, p, mu, r);
    }
  }
}

// Stage 1 of dweight/dbias: block (kColTile, kRowLanes) sums kColTile·VEC columns over one row chunk. Each
// thread owns VEC adjacent columns and reads them as one 16-byte pack per row (VEC = 1: scalar fallback for
// unaligned rows); a warp reads 32 consecutive packs of a row, 512 contiguous bytes.
template <typename T, typename acc_t, int VEC>
__global__ void __launch_bounds__(kColKernelThreads)
    layer_norm_bwd_partial_kernel(const T* __restrict__ grad_out,      // [rows, width]
                                  const T* __restrict__ x,             // [rows, width]
                                  const acc_t* __restrict__ mean,      // [rows]
                                  const acc_t* __restrict__ rstd,      // [rows]
                                  acc_t* __restrict__ partial_weight,  // [chunks, width]
                                  acc_t* __restrict__ partial_bias,    // [chunks, width]
                                  int64_t rows, int64_t width, int64_t rows_per_chunk) {
  using P = Pack<T, VEC>;
  constexpr int kTileCols = kColTile * VEC;
  // [row lane][column in tile]. The final reads below are conflict-free (consecutive threads, consecutive
  // columns); the VEC-strided writes before them are not, a once-per-block cost next to the row loop.
  __shared__ acc_t s_weight[kRowLanes][kTileCols];
  __shared__ acc_t s_bias[kRowLanes][kTileCols];
  const int64_t tile_start = static_cast<int64_t>(blockIdx.x) * kTileCols;
  const int64_t pack = tile_start / VEC + threadIdx.x;  // this thread's pack of VEC columns within a row
  const int64_t chunk = blockIdx.y;
  const int64_t first = chunk * rows_per_chunk;
  const int64_t last = first + rows_per_chunk < rows ? first + rows_per_chunk : rows;
  acc_t dw[VEC], db[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) dw[j] = db[j] = 0;
  if (pack * VEC < width) {  // width % VEC == 0: a pack is all in or all out
    for (int64_t row = first + threadIdx.y; row < last; row += kRowLanes) {
      const P dv = reinterpret_cast<const P*>(grad_out + row * width)[pack];
      const P xv = reinterpret_cast<const P*>(x + row * width)[pack];
      const acc_t mu = mean[row], r = rstd[row];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const acc_t dy = static_cast<acc_t>(dv.v[j]);
        dw[j] += dy * (static_cast<acc_t>(xv.v[j]) - mu) * r;
        db[j] += dy;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    s_weight[threadIdx.y][threadIdx.x * VEC + j] = dw[j];
    s_bias[threadIdx.y][threadIdx.x * VEC + j] = db[j];
  }
  __syncthreads();
  // Every thread of the block finishes columns of the tile: consecutive threads, consecutive columns.
  for (int c = threadIdx.y * kColTile + threadIdx.x; c < kTileCols; c += kColKernelThreads) {
    const int64_t col = tile_start + c;
    if (col >= width) break;
    acc_t total_w = 0, total_b = 0;
#pragma unroll
    for (int i = 0; i < kRowLanes; ++i) {  // fixed order: deterministic
      total_w += s_weight[i][c];
      total_b += s_bias[i][c];
    }
    partial_weight[chunk * width + col] = total_w;
    partial_bias[chunk * width + col] = total_b;
  }
}

// Stage 2: per column, the sum over the chunks in a fixed order, rounded once to T.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kColKernelThreads)
    layer_norm_bwd_finalize_kernel(const acc_t* __restrict__ partial_weight,  // [chunks, width]
                                   const acc_t* __restrict__ partial_bias,    // [chunks, width]
                                   int64_t chunks, int64_t width,
                                   T* __restrict__ grad_weight,  // [width]
                                   T* __restrict__ grad_bias) {  // [width]
  __shared__ acc_t s_weight[kRowLanes][kColTile + 1];
  __shared__ acc_t s_bias[kRowLanes][kColTile + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  acc_t dw = 0, db = 0;
  if (col < width) {
    for (int64_t chunk = threadIdx.y; chunk < chunks; chunk += kRowLanes) {
      dw += partial_weight[chunk * width + col];
      db += partial_bias[chunk * width + col];
    }
  }
  s_weight[threadIdx.y][threadIdx.x] = dw;
  s_bias[threadIdx.y][threadIdx.x] = db;
  __syncthreads();
  if (threadIdx.y == 0 && col < width) {
    acc_t total_w = 0, total_b = 0;
#pragma unroll
    for (int i = 0; i < kRowLanes; ++i) {
      total_w += s_weight[i][threadIdx.x];
      total_b += s_bias[i][threadIdx.x];
    }
    grad_weight[col] = static_cast<T>(total_w);
    grad_bias[col] = static_cast<T>(total_b);
  }
}

template <int V>
using VecTag = std::integral_constant<int, V>;

// Calls fn(VecTag<vec_width<T>()>) when 16-byte packs are possible, else fn(VecTag<1>).
template <typename T, typename Fn>
void with_vec_width(bool vectorize, Fn&& fn) {
  if (vectorize) {
    fn(VecTag<vec_width<T>()>{});
  } else {
    fn(VecTag<1>{});
  }
}

}  // namespace

void layer_norm_forward_out_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                                 const at::Tensor& out, const at::Tensor& mean, const at::Tensor& rstd, bool rms) {
  const int64_t width = x.size(-1), rows = width > 0 ? x.numel() / width : 0;
  if (rows == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const dim3 block(kWarpSize, kRowsPerBlock);
  const unsigned grid = grid_for(rows, kRowsPerBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* bias_ptr = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    const bool vectorize =
        can_vectorize<scalar_t>(width, {x.const_data_ptr(), weight.const_data_ptr(), bias_ptr, out.const_data_ptr()});
    with_vec_width<scalar_t>(vectorize, [&](auto vec) {
      layer_norm_fwd_kernel<scalar_t, acc_t, decltype(vec)::value><<<grid, block, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), bias_ptr, out.mutable_data_ptr<scalar_t>(),
          mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>(), rows, width, static_cast<acc_t>(eps), rms);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void layer_norm_backward_out_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& grad_x,
                                  const at::Tensor& grad_weight, const at::Tensor& grad_bias,
                                  const LayerNormBackwardExtras& extras) {
  const int64_t width = x.size(-1), rows = backward_rows_or_zero_grads(x, grad_weight, grad_bias);
  if (rows == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool write_normed = extras.normed_out.defined();
  const int64_t rows_per_chunk = layer_norm_rows_per_chunk(rows);
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Scratch for stage 1 (from PyTorch's caching allocator: no cudaMalloc per call).
  const at::Tensor partial = at::empty({2, chunks, width}, x.options().dtype(acc_dtype));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* residual =
        extras.residual_grad.defined() ? extras.residual_grad.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* bias = write_normed && extras.bias.defined() ? extras.bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* normed = write_normed ? extras.normed_out.mutable_data_ptr<scalar_t>() : nullptr;
    const bool vectorize =
        can_vectorize<scalar_t>(width, {grad_out.const_data_ptr(), x.const_data_ptr(), weight.const_data_ptr(),
                                        grad_x.const_data_ptr(), residual, bias, normed});
    with_vec_width<scalar_t>(vectorize, [&](auto vec) {
      layer_norm_bwd_dx_kernel<scalar_t, acc_t, decltype(vec)::value>
          <<<grid_for(rows, kRowsPerBlock), dim3(kWarpSize, kRowsPerBlock), 0, stream>>>(
              grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
              mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), residual, bias, normed,
              grad_x.mutable_data_ptr<scalar_t>(), rows, width, extras.rms);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });

    acc_t* partial_weight = partial.mutable_data_ptr<acc_t>();
    acc_t* partial_bias = partial_weight + chunks * width;
    const dim3 block(kColTile, kRowLanes);
    const bool vectorize_columns =
        can_vectorize<scalar_t>(width, {grad_out.const_data_ptr(), x.const_data_ptr()});
    with_vec_width<scalar_t>(vectorize_columns, [&](auto vec) {
      constexpr int kVec = decltype(vec)::value;
      const int64_t tiles = (width + kColTile * kVec - 1) / (kColTile * kVec);
      layer_norm_bwd_partial_kernel<scalar_t, acc_t, kVec>
          <<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks)), block, 0, stream>>>(
              grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
              rstd.const_data_ptr<acc_t>(), partial_weight, partial_bias, rows, width, rows_per_chunk);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const int64_t col_tiles = (width + kColTile - 1) / kColTile;
    TORCH_CHECK_VALUE(col_tiles <= static_cast<int64_t>(INT32_MAX), "layer_norm_bwd: width too large (", width, ")");
    layer_norm_bwd_finalize_kernel<scalar_t, acc_t><<<static_cast<unsigned>(col_tiles), block, 0, stream>>>(
        partial_weight, partial_bias, chunks, width, grad_weight.mutable_data_ptr<scalar_t>(),
        grad_bias.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastvit
