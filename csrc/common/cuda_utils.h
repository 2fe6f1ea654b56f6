// Small device helpers shared by the CUDA kernels (include from .cu files only): 16-byte vector packs,
// warp reductions, launch sizes, the fp16/bf16/fp32 dispatch macro.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>

#include <cstdint>
#include <initializer_list>

// AT_DISPATCH over the dtypes of the fused MLP's CUDA path (cuBLASLt GEMMs): fp16, bf16, fp32.
#define FASTVIT_DISPATCH_HALF_BF16_FLOAT(TYPE, NAME, ...)                                                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                                                           \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                         AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__))

namespace fastvit {

constexpr int kWarpSize = 32;

// VEC elements of T moved as one aligned load/store (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_all_reduce_sum(acc_t value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// 16-byte packs are used when every row starts on a 16-byte boundary: the row length is a multiple
// of the pack and every (non-null) base pointer is 16-byte aligned. Otherwise scalar accesses.
template <typename T>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(T));
}

template <typename T>
inline bool can_vectorize(int64_t row_length, std::initializer_list<const void*> pointers) {
  if (row_length % vec_width<T>() != 0) return false;
  for (const void* ptr : pointers) {
    if (ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  }
  return true;
}

// Grid size for grid-stride kernels: enough blocks to fill the device several times over, never
// more than the work needs (and always within the grid limits).
inline unsigned grid_for(int64_t work_items, int64_t items_per_block) {
  const int64_t needed = (work_items + items_per_block - 1) / items_per_block;
  const int64_t cap = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  const int64_t blocks = needed < cap ? needed : cap;
  return static_cast<unsigned>(blocks > 0 ? blocks : 1);
}

}  // namespace fastvit
