// cuBLASLt helper: cached handle / workspace / algorithm choice, and one GEMM entry point.
// See cublaslt.h for the row-major <-> column-major convention.
#include "common/cublaslt.h"

#ifdef FASTVIT_WITH_CUDA

#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/util/Exception.h>

#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <utility>

namespace fastvit {
namespace cublaslt {
namespace {

#define FASTVIT_CUBLASLT_CHECK(expr)                                                                   \
  do {                                                                                                 \
    const cublasStatus_t status_ = (expr);                                                             \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "fastvit: cuBLASLt call `", #expr, "` failed with ", \
                cublasLtGetStatusName(status_), ": ", cublasLtGetStatusString(status_));               \
  } while (0)

// Everything below is created once and deliberately never destroyed: destroying CUDA objects from
// static destructors at interpreter exit races with the CUDA runtime's own teardown.
std::mutex g_mutex;

cublasLtHandle_t handle_for_device(int device) {
  static auto* handles = new std::map<int, cublasLtHandle_t>();
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = handles->find(device);
  if (it != handles->end()) return it->second;
  cublasLtHandle_t handle = nullptr;
  FASTVIT_CUBLASLT_CHECK(cublasLtCreate(&handle));
  handles->emplace(device, handle);
  return handle;
}

// 32 MiB on Hopper and later, 4 MiB before (the sizes cuBLAS, PyTorch and TransformerEngine use).
size_t workspace_bytes() {
  return at::cuda::getCurrentDeviceProperties()->major >= 9 ? (size_t{32} << 20) : (size_t{4} << 20);
}

// One workspace per (device, stream): two streams never share one, so concurrent GEMMs on different
// streams cannot overwrite each other's split-K scratch. Allocated from PyTorch's caching allocator
// on first use (do a warm-up call before CUDA-graph capture, as for any cuBLAS user) and kept.
void* workspace_for(int device, cudaStream_t stream, size_t bytes) {
  static auto* workspaces = new std::map<std::pair<int, cudaStream_t>, c10::DataPtr>();
  std::lock_guard<std::mutex> lock(g_mutex);
  const auto key = std::make_pair(device, stream);
  auto it = workspaces->find(key);
  if (it != workspaces->end()) return it->second.get();
  c10::DataPtr ptr = c10::cuda::CUDACachingAllocator::get()->allocate(bytes);
  void* raw = ptr.get();
  workspaces->emplace(key, std::move(ptr));
  return raw;
}

cudaDataType_t cuda_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return CUDA_R_16F;
    case at::kBFloat16:
      return CUDA_R_16BF;
    case at::kFloat:
      return CUDA_R_32F;
    default:
      TORCH_CHECK_TYPE(false, "fastvit cuBLASLt GEMM: unsupported dtype ", dtype,
                       " (float16, bfloat16 or float32 only)");
  }
}

// Largest power of two (<= 256) dividing the address: what the algorithm heuristic may assume.
uint32_t alignment_of(const void* ptr) {
  const auto address = reinterpret_cast<uintptr_t>(ptr);
  uint32_t alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

struct DescDeleter {
  void operator()(cublasLtMatmulDescOpaque_t* desc) const {
    cublasLtMatmulDescDestroy(reinterpret_cast<cublasLtMatmulDesc_t>(desc));
  }
};
struct LayoutDeleter {
  void operator()(cublasLtMatrixLayoutOpaque_t* layout) const {
    cublasLtMatrixLayoutDestroy(reinterpret_cast<cublasLtMatrixLayout_t>(layout));
  }
};
struct PrefDeleter {
  void operator()(cublasLtMatmulPreferenceOpaque_t* pref) const {
    cublasLtMatmulPreferenceDestroy(reinterpret_cast<cublasLtMatmulPreference_t>(pref));
  }
};
using DescPtr = std::unique_ptr<cublasLtMatmulDescOpaque_t, DescDeleter>;
using LayoutPtr = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, LayoutDeleter>;
using PrefPtr = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, PrefDeleter>;

DescPtr make_desc(cublasComputeType_t compute, cudaDataType_t scale) {
  cublasLtMatmulDesc_t desc = nullptr;
  FASTVIT_CUBLASLT_CHECK(cublasLtMatmulDescCreate(&desc, compute, scale));
  return DescPtr(reinterpret_cast<cublasLtMatmulDescOpaque_t*>(desc));
}

LayoutPtr make_layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t layout = nullptr;
  FASTVIT_CUBLASLT_CHECK(
      cublasLtMatrixLayoutCreate(&layout, type, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ld));
  return LayoutPtr(reinterpret_cast<cublasLtMatrixLayoutOpaque_t*>(layout));
}

template <typename T>
void set_desc(const DescPtr& desc, cublasLtMatmulDescAttributes_t attr, const T& value) {
  FASTVIT_CUBLASLT_CHECK(
      cublasLtMatmulDescSetAttribute(reinterpret_cast<cublasLtMatmulDesc_t>(desc.get()), attr, &value, sizeof(T)));
}

template <typename T>
void set_pref(const PrefPtr& pref, cublasLtMatmulPreferenceAttributes_t attr, const T& value) {
  FASTVIT_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(reinterpret_cast<cublasLtMatmulPreference_t>(pref.get()),
                                                              attr, &value, sizeof(T)));
}

// Algorithm choice cache: the heuristic query costs tens of microseconds, so it runs once per
// (device, problem, epilogue, alignments); a cached choice also keeps results bit-identical from
// call to call. `found == false` records that no algorithm exists (the caller's fallback runs).
using AlgoKey = std::array<int64_t, 20>;
struct AlgoChoice {
  bool found = false;
  cublasLtMatmulAlgo_t algo{};
};

}  // namespace

cublasStatus_t matmul(const Matmul& args) {
  TORCH_CHECK(args.m > 0 && args.n > 0 && args.k > 0, "fastvit cuBLASLt GEMM: empty problem (m=", args.m,
              ", n=", args.n, ", k=", args.k, ") must be handled by the caller");
  const int device = c10::cuda::current_device();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cublasLtHandle_t handle = handle_for_device(device);
  const size_t ws_bytes = workspace_bytes();
  void* workspace = workspace_for(device, stream, ws_bytes);

  const cudaDataType_t type = cuda_dtype(args.dtype);
  // fp32 accumulation always; fp32 inputs may use TF32 tensor cores only when PyTorch allows it
  // for its own matmuls (torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision).
  const cublasComputeType_t compute = (args.dtype == at::kFloat && at::globalContext().allowTF32CuBLAS())
                                          ? CUBLAS_COMPUTE_32F_FAST_TF32
                                          : CUBLAS_COMPUTE_32F;
  DescPtr desc = make_desc(compute, CUDA_R_32F);
  set_desc(desc, CUBLASLT_MATMUL_DESC_TRANSA, static_cast<int32_t>(args.trans_a));
  set_desc(desc, CUBLASLT_MATMUL_DESC_TRANSB, static_cast<int32_t>(args.trans_b));
  set_desc(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<uint32_t>(args.epilogue));
  if (args.bias != nullptr) set_desc(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, args.bias);
  if (args.aux != nullptr) {
    set_desc(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, args.aux);
    set_desc(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, args.aux_ld);
  }

  const bool a_n = args.trans_a == CUBLAS_OP_N, b_n = args.trans_b == CUBLAS_OP_N;
  LayoutPtr a_layout = make_layout(type, a_n ? args.m : args.k, a_n ? args.k : args.m, args.lda);
  LayoutPtr b_layout = make_layout(type, b_n ? args.k : args.n, b_n ? args.n : args.k, args.ldb);
  LayoutPtr d_layout = make_layout(type, args.m, args.n, args.ldd);
  const void* c = args.c != nullptr ? args.c : args.d;  // beta = 0: C is not read

  const bool half_precision = args.dtype != at::kFloat;
  const AlgoKey key = {device,
                       static_cast<int64_t>(args.dtype),
                       static_cast<int64_t>(compute),
                       static_cast<int64_t>(args.trans_a) * 2 + static_cast<int64_t>(args.trans_b),
                       args.m,
                       args.n,
                       args.k,
                       args.lda,
                       args.ldb,
                       args.ldd,
                       static_cast<int64_t>(args.epilogue),
                       args.c != nullptr,
                       args.aux_ld,
                       alignment_of(args.a),
                       alignment_of(args.b),
                       alignment_of(c),
                       alignment_of(args.d),
                       args.bias != nullptr ? alignment_of(args.bias) : 0,
                       args.aux != nullptr ? alignment_of(args.aux) : 0,
                       args.deterministic};
  static auto* algo_cache = new std::map<AlgoKey, AlgoChoice>();
  AlgoChoice choice;
  bool cached = false;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = algo_cache->find(key);
    if (it != algo_cache->end()) {
      choice = it->second;
      cached = true;
    }
  }
  if (!cached) {
    cublasLtMatmulPreference_t raw_pref = nullptr;
    FASTVIT_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&raw_pref));
    PrefPtr pref(reinterpret_cast<cublasLtMatmulPreferenceOpaque_t*>(raw_pref));
    set_pref(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(ws_bytes));
    set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment_of(args.a));
    set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment_of(args.b));
    set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment_of(c));
    set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment_of(args.d));
    // Deterministic: no split-K at all. Otherwise 16-bit outputs must not be split-K-reduced in
    // their own precision (fp32 accumulation is the numerics rule), fp32 may use any scheme.
    uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_MASK;
    if (args.deterministic) {
      schemes = CUBLASLT_REDUCTION_SCHEME_NONE;
    } else if (half_precision) {
      schemes &= ~static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE);
    }
    set_pref(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, schemes);

    cublasLtMatmulHeuristicResult_t result{};
    int returned = 0;
    const cublasStatus_t status =
        cublasLtMatmulAlgoGetHeuristic(handle, reinterpret_cast<cublasLtMatmulDesc_t>(desc.get()),
                                       reinterpret_cast<cublasLtMatrixLayout_t>(a_layout.get()),
                                       reinterpret_cast<cublasLtMatrixLayout_t>(b_layout.get()),
                                       reinterpret_cast<cublasLtMatrixLayout_t>(d_layout.get()),
                                       reinterpret_cast<cublasLtMatrixLayout_t>(d_layout.get()),
                                       reinterpret_cast<cublasLtMatmulPreference_t>(raw_pref), 1, &result, &returned);
    // NOT_SUPPORTED / INVALID_VALUE here mean "no kernel for this epilogue or layout": fall back.
    choice.found = status == CUBLAS_STATUS_SUCCESS && returned > 0;
    if (choice.found) choice.algo = result.algo;
    std::lock_guard<std::mutex> lock(g_mutex);
    algo_cache->emplace(key, choice);
  }
  if (!choice.found) return CUBLAS_STATUS_NOT_SUPPORTED;

  const float alpha = 1.0f, beta = args.c != nullptr ? 1.0f : 0.0f;
  const cublasStatus_t status = cublasLtMatmul(handle, reinterpret_cast<cublasLtMatmulDesc_t>(desc.get()), &alpha,
                                               args.a, reinterpret_cast<cublasLtMatrixLayout_t>(a_layout.get()), args.b,
                                               reinterpret_cast<cublasLtMatrixLayout_t>(b_layout.get()), &beta, c,
                                               reinterpret_cast<cublasLtMatrixLayout_t>(d_layout.get()), args.d,
                                               reinterpret_cast<cublasLtMatrixLayout_t>(d_layout.get()), &choice.algo,
                                               workspace, ws_bytes, stream);
  if (status == CUBLAS_STATUS_NOT_SUPPORTED) return status;
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "fastvit: cublasLtMatmul failed with ", cublasLtGetStatusName(status),
              ": ", cublasLtGetStatusString(status), " (m=", args.m, ", n=", args.n, ", k=", args.k,
              ", epilogue=", static_cast<int>(args.epilogue), ")");
  return status;
}

void matmul_or_throw(const Matmul& args, const char* what) {
  const cublasStatus_t status = matmul(args);
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "fastvit: cuBLASLt has no algorithm for the ", what, " GEMM (m=", args.m,
              ", n=", args.n, ", k=", args.k, ", dtype ", args.dtype, ")");
}

}  // namespace cublaslt
}  // namespace fastvit

#endif  // FASTVIT_WITH_CUDA
