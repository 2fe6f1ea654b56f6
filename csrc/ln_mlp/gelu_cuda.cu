// Elementwise activation forward / backward kernels (see gelu.h): grid-stride, 16-byte packs when the row
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

constexpr float kQuickGeluScale = 1.702f;  // OpenAI CLIP's QuickGELU: x·σ(1.702x)

// The elementwise activations (every form but swiglu, which pairs two inputs).
enum ElementwiseAct : int { kErf = 0, kTanh = 1, kQuick = 2 };

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

template <int ACT>
__device__ __forceinline__ float act_fn(float x) {
  if constexpr (ACT == kTanh) {
    const float u = kSqrt2OverPi * (x + kTanhCoeff * x * x * x);
    return 0.5f * x * (1.0f + tanh_accurate(u));
  } else if constexpr (ACT == kQuick) {
    return x * sigmoid(kQuickGeluScale * x);
  } else {
    return 0.5f * x * (1.0f + erff(x * kSqrt1_2));  // erff is not affected by --use_fast_math
  }
}

template <int ACT>
__device__ __forceinline__ float act_grad(float x) {
  if constexpr (ACT == kTanh) {
    const float u = kSqrt2OverPi * (x + kTanhCoeff * x * x * x);
    const float t = tanh_accurate(u);
    const float du = kSqrt2OverPi * (1.0f + 3.0f * kTanhCoeff * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
  } else if constexpr (ACT == kQuick) {
    const float s = sigmoid(kQuickGeluScale * x);
    return s + kQuickGeluScale * x * s * (1.0f - s);
  } else {
    const float cdf = 0.5f * (1.0f + erff(x * kSqrt1_2));
    const float pdf = kInvSqrt2Pi * expf(-0.5f * x * x);
    return cdf + x * pdf;
  }
}

// in, pre_out, h_out: [rows, cols] (pre_out may be nullptr); bias: [cols] or nullptr.
// No __restrict__ on in / pre_out / h_out: they may alias (in-place use).
template <typename T, int VEC, int ACT>
__global__ void __launch_bounds__(kThreads)
    bias_act_forward_kernel(const T* in, const T* __restrict__ bias, T* pre_out, T* h_out, int64_t packs,
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
      pre.v[j] = static_cast<T>(z);  // the activation sees the rounded pre-activation, as the saved one
      h.v[j] = static_cast<T>(act_fn<ACT>(static_cast<float>(pre.v[j])));
    }
    if (pre_out != nullptr) reinterpret_cast<P*>(pre_out)[p] = pre;
    reinterpret_cast<P*>(h_out)[p] = h;
  }
}

template <typename T, int VEC, int ACT>
__global__ void __launch_bounds__(kThreads)
    act_backward_kernel(const T* __restrict__ pre,  // [rows, cols]
                        T* grad,                    // [rows, cols] in: dL/dh, out: dL/dpre (in place)
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
      g.v[j] = static_cast<T>(static_cast<float>(g.v[j]) * act_grad<ACT>(xf));
      h.v[j] = static_cast<T>(act_fn<ACT>(xf));
    }
    reinterpret_cast<P*>(grad)[p] = g;
    if (h_out != nullptr) reinterpret_cast<P*>(h_out)[p] = h;
  }
}

// SwiGLU forward: in, pre_out [rows, 2·hidden] (gate half first), h_out [rows, hidden]; packs count VEC-wide
// groups of h (hidden % VEC == 0). pre_out may alias in (each element is read before it is written, by the
// thread that writes it).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    bias_swiglu_forward_kernel(const T* in, const T* __restrict__ bias, T* pre_out, T* __restrict__ h_out,
                               int64_t packs, int64_t hidden) {
  using P = Pack<T, VEC>;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = (p * VEC) / hidden, col = (p * VEC) % hidden;
    const int64_t gate_at = row * 2 * hidden + col, value_at = gate_at + hidden;  // element offsets in `in`
    const P gv = *reinterpret_cast<const P*>(in + gate_at);
    const P vv = *reinterpret_cast<const P*>(in + value_at);
    P gate, value, h;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      float g = static_cast<float>(gv.v[j]), v = static_cast<float>(vv.v[j]);
      if (bias != nullptr) {
        g += static_cast<float>(bias[col + j]);
        v += static_cast<float>(bias[hidden + col + j]);
      }
      gate.v[j] = static_cast<T>(g);
      value.v[j] = static_cast<T>(v);
      const float gr = static_cast<float>(gate.v[j]);
      h.v[j] = static_cast<T>(gr * sigmoid(gr) * static_cast<float>(value.v[j]));
    }
    if (pre_out != nullptr) {
      *reinterpret_cast<P*>(pre_out + gate_at) = gate;
      *reinterpret_cast<P*>(pre_out + value_at) = value;
    }
    reinterpret_cast<P*>(h_out)[p] = h;
  }
}

// SwiGLU backward: pre, grad_pre [rows, 2·hidden]; grad_h, h_out [rows, hidden] (h_out may be nullptr).
//   d gate = dh · value · σ(gate)(1 + gate(1 - σ(gate))),  d value = dh · SiLU(gate).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(const T* __restrict__ pre, const T* __restrict__ grad_h, T* __restrict__ grad_pre,
                           T* __restrict__ h_out, int64_t packs, int64_t hidden) {
  using P = Pack<T, VEC>;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; p < packs;
       p += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = (p * VEC) / hidden, col = (p * VEC) % hidden;
    const int64_t gate_at = row * 2 * hidden + col, value_at = gate_at + hidden;
    const P gv = *reinterpret_cast<const P*>(pre + gate_at);
    const P vv = *reinterpret_cast<const P*>(pre + value_at);
    const P dh = reinterpret_cast<const P*>(grad_h)[p];
    P d_gate, d_value, h;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float g = static_cast<float>(gv.v[j]), v = static_cast<float>(vv.v[j]), d = static_cast<float>(dh.v[j]);
      const float s = sigmoid(g), silu = g * s;
      d_gate.v[j] = static_cast<T>(d * v * s * (1.0f + g * (1.0f - s)));
      d_value.v[j] = static_cast<T>(d * silu);
      h.v[j] = static_cast<T>(silu * v);
    }
    *reinterpret_cast<P*>(grad_pre + gate_at) = d_gate;
    *reinterpret_cast<P*>(grad_pre + value_at) = d_value;
    if (h_out != nullptr) reinterpret_cast<P*>(h_out)[p] = h;
  }
}

template <int V>
using VecTag = std::integral_constant<int, V>;

template <typename T, typename Fn>
void with_vec(bool vectorize, Fn&& fn) {
  if (vectorize) {
    fn(VecTag<vec_width<T>()>{});
  } else {
    fn(VecTag<1>{});
  }
}

template <typename Fn>
void with_elementwise_act(MlpAct act, Fn&& fn) {
  switch (act) {
    case MlpAct::kGeluTanh:
      fn(std::integral_constant<int, kTanh>{});
      break;
    case MlpAct::kQuickGelu:
      fn(std::integral_constant<int, kQuick>{});
      break;
    default:
      fn(std::integral_constant<int, kErf>{});
  }
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

}  // namespace

void launch_bias_act_forward(const at::Tensor& in, const at::Tensor& bias, const at::Tensor& pre_out,
                             const at::Tensor& h_out, MlpAct act) {
  const int64_t hidden = h_out.size(-1), numel = h_out.numel();
  if (numel == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTVIT_DISPATCH_HALF_BF16_FLOAT(in.scalar_type(), "bias_act_forward", [&] {
    const scalar_t* in_ptr = static_cast<const scalar_t*>(in.data_ptr());
    const scalar_t* bias_ptr = ptr_or_null<scalar_t>(bias);
    scalar_t* pre_ptr = ptr_or_null<scalar_t>(pre_out);
    scalar_t* h_ptr = static_cast<scalar_t*>(h_out.data_ptr());
    // hidden % VEC == 0 keeps every pack inside one half of one row (and the halves' starts aligned).
    const bool vectorize = can_vectorize<scalar_t>(hidden, {in_ptr, pre_ptr, h_ptr});
    with_vec<scalar_t>(vectorize, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const int64_t packs = numel / V;
      if (act == MlpAct::kSwiglu) {
        bias_swiglu_forward_kernel<scalar_t, V>
            <<<grid_for(packs, kThreads), kThreads, 0, stream>>>(in_ptr, bias_ptr, pre_ptr, h_ptr, packs, hidden);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      with_elementwise_act(act, [&](auto form) {
        bias_act_forward_kernel<scalar_t, V, decltype(form)::value>
            <<<grid_for(packs, kThreads), kThreads, 0, stream>>>(in_ptr, bias_ptr, pre_ptr, h_ptr, packs, hidden);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void launch_act_backward(const at::Tensor& pre, const at::Tensor& grad_h, const at::Tensor& grad_pre,
                         const at::Tensor& h_out, MlpAct act) {
  const int64_t hidden = grad_h.size(-1), numel = grad_h.numel();
  if (numel == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  FASTVIT_DISPATCH_HALF_BF16_FLOAT(pre.scalar_type(), "act_backward", [&] {
    const scalar_t* pre_ptr = static_cast<const scalar_t*>(pre.data_ptr());
    const scalar_t* grad_h_ptr = static_cast<const scalar_t*>(grad_h.data_ptr());
    scalar_t* grad_pre_ptr = static_cast<scalar_t*>(grad_pre.data_ptr());
    scalar_t* h_ptr = ptr_or_null<scalar_t>(h_out);
    const bool vectorize = can_vectorize<scalar_t>(hidden, {pre_ptr, grad_h_ptr, grad_pre_ptr, h_ptr});
    with_vec<scalar_t>(vectorize, [&](auto vec) {
      constexpr int V = decltype(vec)::value;
      const int64_t packs = numel / V;
      if (act == MlpAct::kSwiglu) {
        swiglu_backward_kernel<scalar_t, V><<<grid_for(packs, kThreads), kThreads, 0, stream>>>(
            pre_ptr, grad_h_ptr, grad_pre_ptr, h_ptr, packs, hidden);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      TORCH_CHECK(grad_pre_ptr == grad_h_ptr, "act_backward: the GELU forms work in place (grad_pre = grad_h)");
      with_elementwise_act(act, [&](auto form) {
        act_backward_kernel<scalar_t, V, decltype(form)::value>
            <<<grid_for(packs, kThreads), kThreads, 0, stream>>>(pre_ptr, grad_pre_ptr, h_ptr, packs);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace fastvit
