// Elementwise GELU forward / backward kernels (see gelu.h): grid-stride, 16-byte packs when the row
// length and pointers allow, fp32 math rounded once to the tensor dtype.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>

#include <type_traits>

#include "common/cuda_utils.h"
#include "ln_mlp/gelu.h"

namespace fastvit {
namespace {

constexpr int kThreads = 256;
constexpr float kSqrt1_2 = 0.70710678118654752440f;      // 1/√2
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;   // 1/√(2π)
constexpr float kSqrt2OverPi = 0.79788456080286535588f;  // √(2/π)
constexpr float kTanhCoeff = 0.044715f;

// tanh(u) = 1 - 2 / (exp(2u) + 1). setup.py compiles with --use_fast_math, under which tanhf may
// become the ~2^-11-accurate tanh.approx instruction: too coarse for fp32 outputs. This form stays
// within about 1e-6 of tanh in absolute terms even with the fast expf, and saturates to ±1.
__device__ __forceinline__ float tanh_accurate(float u) { return 1.0f - 2.0f / (expf(2.0f * u) + 1.0f); }

template <bool TANH>
__device__ __forceinline__ float gelu(float x) {
  if constexpr (TANH) {
    const float u = kSqrt2OverPi * (x + kTanhCoeff * x * x * x);
    return 0.5f * x * (1.0f + tanh_accurate(u));
  } else {
    return 0.5f * x * (1.0f + erff(x * kSqrt1_2));  // erff is not affected by --use_fast_math
  }
}

template <bool TANH>
__device__ __forceinline__ float gelu_grad(float x) {
  if constexpr (TANH) {
    const float u = kSqrt2OverPi * (x + kTanhCoeff * x * x * x);
    const float t = tanh_accurate(u);
    const float du = kSqrt2OverPi * (1.0f + 3.0f * kTanhCoeff * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
  } else {
    const float cdf = 0.5f * (1.0f + erff(x * kSqrt1_2));
    const float pdf = kInvSqrt2Pi * expf(-0.5f * x * x);
    return cdf + x * pdf;
  }
}

// in, pre_out, h_out: [rows, cols] (pre_out may be nullptr); bias: [cols] or nullptr.
// No __restrict__ on in / pre_out / h_out: they may alias (in-place use).
template <typename T, int VEC, bool TANH>
__global__ void __launch_bounds__(kThreads)
    bias_gelu_forward_kernel(const T* in, const T* __restrict__ bias, T* pre_out, T* h_out, int64_t packs,
                             int64_t cols) {
  using P = Pack<T, VEC>;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * kThreads) {
    const P v = reinterpret_cast<const P*>(in)[p];
    const int64_t col = (p * VEC) % cols;  // cols % VEC == 0: a pack never straddles two rows
    P pre, h;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float z = static_cast<float>(v.v[j]);
      if (bias != nullptr) z += static_cast<float>(bias[col + j]);
      pre.v[j] = static_cast<T>(z);  // GELU sees the rounded pre-activation, as the saved one
      h.v[j] = static_cast<T>(gelu<TANH>(static_cast<float>(pre.v[j])));
    }
    if (pre_out != nullptr) reinterpret_cast<P*>(pre_out)[p] = pre;
    reinterpret_cast<P*>(h_out)[p] = h;
  }
}

template <typename T, int VEC, bool TANH>
__global__ void __launch_bounds__(kThreads)
    gelu_backward_kernel(const T* __restrict__ pre,  // [rows, cols]
                         T* __restrict__ grad,       // [rows, cols] in: dL/dh, out: dL/dpre
                         T* __restrict__ h_out,      // [rows, cols] or nullptr
                         int64_t packs) {
  using P = Pack<T, VEC>;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * kThreads) {
    const P x = reinterpret_cast<const P*>(pre)[p];
    P g = reinterpret_cast<const P*>(grad)[p];
    P h;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float xf = static_cast<float>(x.v[j]);
      g.v[j] = static_cast<T>(static_cast<float>(g.v[j]) * gelu_grad<TANH>(xf));
      h.v[j] = static_cast<T>(gelu<TANH>(xf));
    }
    reinterpret_cast<P*>(grad)[p] = g;
    if (h_out != nullptr) reinterpret_cast<P*>(h_out)[p] = h;
  }
}

template <typename T, typename Fn>
void with_vec_and_form(bool vectorize, bool tanh, Fn&& fn) {
  constexpr int kVec = vec_width<T>();
  if (vectorize) {
    tanh ? fn(std::integral_constant<int, kVec>{}, std::true_type{})
         : fn(std::integral_constant<int, kVec>{}, std::false_type{});
  } else {
    tanh ? fn(std::integral_constant<int, 1>{}, std::true_type{})
         : fn(std::integral_constant<int, 1>{}, std::false_type{});
  }
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

}  // namespace

void launch_bias_gelu_forward(const at::Tensor& in, const at::Tensor& bias, const at::Tensor& pre_out,
                              const at::Tensor& h_out, bool tanh) {
  const int64_t cols = in.size(-1), numel = in.numel();
  if (numel == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTVIT_DISPATCH_HALF_BF16_FLOAT(in.scalar_type(), "bias_gelu_forward", [&] {
    const scalar_t* in_ptr = static_cast<const scalar_t*>(in.data_ptr());
    const scalar_t* bias_ptr = ptr_or_null<scalar_t>(bias);
    scalar_t* pre_ptr = ptr_or_null<scalar_t>(pre_out);
    scalar_t* h_ptr = static_cast<scalar_t*>(h_out.data_ptr());
    const bool vectorize = can_vectorize<scalar_t>(cols, {in_ptr, pre_ptr, h_ptr});
    with_vec_and_form<scalar_t>(vectorize, tanh, [&](auto vec, auto form) {
      constexpr int V = decltype(vec)::value;
      const int64_t packs = numel / V;
      bias_gelu_forward_kernel<scalar_t, V, decltype(form)::value>
          <<<grid_for(packs, kThreads), kThreads, 0, stream>>>(in_ptr, bias_ptr, pre_ptr, h_ptr, packs, cols);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void launch_gelu_backward(const at::Tensor& pre, const at::Tensor& grad, const at::Tensor& h_out, bool tanh) {
  const int64_t cols = pre.size(-1), numel = pre.numel();
  if (numel == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTVIT_DISPATCH_HALF_BF16_FLOAT(pre.scalar_type(), "gelu_backward", [&] {
    const scalar_t* pre_ptr = static_cast<const scalar_t*>(pre.data_ptr());
    scalar_t* grad_ptr = static_cast<scalar_t*>(grad.data_ptr());
    scalar_t* h_ptr = ptr_or_null<scalar_t>(h_out);
    const bool vectorize = can_vectorize<scalar_t>(cols, {pre_ptr, grad_ptr, h_ptr});
    with_vec_and_form<scalar_t>(vectorize, tanh, [&](auto vec, auto form) {
      constexpr int V = decltype(vec)::value;
      const int64_t packs = numel / V;
      gelu_backward_kernel<scalar_t, V, decltype(form)::value>
          <<<grid_for(packs, kThreads), kThreads, 0, stream>>>(pre_ptr, grad_ptr, h_ptr, packs);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace fastvit
