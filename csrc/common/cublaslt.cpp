// cuBLASLt helper: PyTorch's Lt handle and workspace, a per-thread cache of GEMM plans (descriptor, layouts,
// algorithm choice), and one GEMM entry point. See cublaslt.h for the row-major <-> column-major convention.
#include "common/cublaslt.h"

#ifdef FASTVIT_WITH_CUDA

#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <array>
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>

// PyTorch >= 2.9 owns one cuBLASLt workspace per (Lt handle, stream) (pytorch/pytorch#156495) and drops it in
// clearCublasWorkspaces(), which torch.compile's CUDA-graph trees call around every warm-up and recording.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
#define FASTVIT_TORCH_OWNS_LT_WORKSPACE 1
#else
#define FASTVIT_TORCH_OWNS_LT_WORKSPACE 0
#endif

namespace fastvit {
namespace cublaslt {
namespace {

#define FASTVIT_CUBLASLT_CHECK(expr)                                                                   \
  do {                                                                                                 \
    const cublasStatus_t status_ = (expr);                                                             \
    TORCH_CHECK(status_ == CUBLAS_STATUS_SUCCESS, "fastvit: cuBLASLt call `", #expr, "` failed with ", \
                cublasLtGetStatusName(status_), ": ", cublasLtGetStatusString(status_));               \
  } while (0)

struct Workspace {
  void* ptr = nullptr;
  size_t bytes = 0;
};

#if FASTVIT_TORCH_OWNS_LT_WORKSPACE
// PyTorch's workspace for the current (Lt handle, stream), the one its own cuBLASLt GEMMs use (stream order
// serialises them with ours). Its lifetime follows PyTorch's CUDA-graph rules: CUDA-graph trees clear it before
// and after each warm-up / recording, so a block taken from a tree's private pool is never kept past the
// generation that pool belongs to (a block we cached ourselves would be handed to another tensor while split-K
// still writes into it).
Workspace workspace_for_current_stream(int /*device*/, cudaStream_t /*stream*/) {
  void* ptr = at::cuda::getCUDABlasLtWorkspace();
  return {ptr, ptr != nullptr ? at::cuda::getCUDABlasLtWorkspaceSize() : 0};  // none: algorithms without one
}
#else
bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// Older PyTorch has no managed Lt workspace: one of our own per (device, stream), from cudaMalloc, i.e. outside
// every caching-allocator pool (CUDA-graph trees route even their warm-up allocations to a private pool that is
// reset between generations), created once and never freed (destroying CUDA memory from static destructors at
// exit races with the runtime's teardown). Never created while the stream is capturing: cudaMalloc is illegal
// there. A GEMM captured on a stream that has none yet runs without a workspace (no split-K), which is always
// valid; warm up on the capture stream first (as InferenceSession does) to capture with one.
Workspace workspace_for_current_stream(int device, cudaStream_t stream) {
  static std::mutex mutex;
  static auto* workspaces = new std::map<std::pair<int, cudaStream_t>, Workspace>();
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, stream);
  const auto it = workspaces->find(key);
  if (it != workspaces->end()) return it->second;
  if (is_capturing(stream)) return {};
  // 32 MiB on Hopper and later, 4 MiB before (the sizes cuBLAS, PyTorch and TransformerEngine use).
  const size_t bytes = at::cuda::getCurrentDeviceProperties()->major >= 9 ? (size_t{32} << 20) : (size_t{4} << 20);
  Workspace workspace{nullptr, bytes};
  if (cudaMalloc(&workspace.ptr, bytes) != cudaSuccess) {
    (void)cudaGetLastError();  // e.g. another thread is capturing in global mode: run without, retry next call
    return {};
  }
  workspaces->emplace(key, workspace);
  return workspace;
}
#endif

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

cublasLtMatmulDesc_t raw(const DescPtr& desc) { return reinterpret_cast<cublasLtMatmulDesc_t>(desc.get()); }
cublasLtMatrixLayout_t raw(const LayoutPtr& layout) { return reinterpret_cast<cublasLtMatrixLayout_t>(layout.get()); }

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
  FASTVIT_CUBLASLT_CHECK(cublasLtMatmulDescSetAttribute(raw(desc), attr, &value, sizeof(T)));
}

template <typename T>
void set_pref(const PrefPtr& pref, cublasLtMatmulPreferenceAttributes_t attr, const T& value) {
  FASTVIT_CUBLASLT_CHECK(cublasLtMatmulPreferenceSetAttribute(reinterpret_cast<cublasLtMatmulPreference_t>(pref.get()),
                                                              attr, &value, sizeof(T)));
}

// Everything that decides a GEMM's descriptor, layouts and algorithm. Pointers enter only through their
// alignments (what the heuristic may assume); the bias and aux pointers are set on the cached descriptor per call.
using PlanKey = std::array<int64_t, 23>;

struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const noexcept {
    uint64_t hash = 1469598103934665603ull;  // FNV-1a over the fields
    for (const int64_t field : key) hash = (hash ^ static_cast<uint64_t>(field)) * 1099511628211ull;
    return static_cast<size_t>(hash);
  }
};

// A GEMM ready to run: created on the first call of its shape, then reused. `found == false` records that
// cuBLASLt has no algorithm for it (the caller's fallback runs). A fixed algorithm per shape also keeps results
// bit-identical from call to call.
struct Plan {
  DescPtr desc;
  LayoutPtr a_layout, b_layout, d_layout;
  bool found = false;
  cublasLtMatmulAlgo_t algo{};
};

std::unique_ptr<Plan> make_plan(const Matmul& args, cublasLtHandle_t handle, cublasComputeType_t compute,
                                const void* c, size_t workspace_bytes) {
  auto plan = std::make_unique<Plan>();
  const cudaDataType_t type = cuda_dtype(args.dtype);
  plan->desc = make_desc(compute, CUDA_R_32F);
  set_desc(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, static_cast<int32_t>(args.trans_a));
  set_desc(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, static_cast<int32_t>(args.trans_b));
  set_desc(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<uint32_t>(args.epilogue));
  // The heuristic needs the pointers set (their presence decides the epilogue's kernels); each call resets them.
  if (args.bias != nullptr) set_desc(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, args.bias);
  if (args.aux != nullptr) {
    set_desc(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, args.aux);
    set_desc(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, args.aux_ld);
  }
  const bool a_n = args.trans_a == CUBLAS_OP_N, b_n = args.trans_b == CUBLAS_OP_N;
  plan->a_layout = make_layout(type, a_n ? args.m : args.k, a_n ? args.k : args.m, args.lda);
  plan->b_layout = make_layout(type, b_n ? args.k : args.n, b_n ? args.n : args.k, args.ldb);
  plan->d_layout = make_layout(type, args.m, args.n, args.ldd);

  cublasLtMatmulPreference_t raw_pref = nullptr;
  FASTVIT_CUBLASLT_CHECK(cublasLtMatmulPreferenceCreate(&raw_pref));
  PrefPtr pref(reinterpret_cast<cublasLtMatmulPreferenceOpaque_t*>(raw_pref));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<uint64_t>(workspace_bytes));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment_of(args.a));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment_of(args.b));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment_of(c));
  set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment_of(args.d));
  // Deterministic: no split-K at all. Otherwise 16-bit outputs must not be split-K-reduced in their own
  // precision (fp32 accumulation is the numerics rule), fp32 may use any scheme.
  uint32_t schemes = CUBLASLT_REDUCTION_SCHEME_MASK;
  if (args.deterministic) {
    schemes = CUBLASLT_REDUCTION_SCHEME_NONE;
  } else if (args.dtype != at::kFloat) {
    schemes &= ~static_cast<uint32_t>(CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE);
  }
  set_pref(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, schemes);

  cublasLtMatmulHeuristicResult_t result{};
  int returned = 0;
  const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(
      handle, raw(plan->desc), raw(plan->a_layout), raw(plan->b_layout), raw(plan->d_layout), raw(plan->d_layout),
      raw_pref, 1, &result, &returned);
  // NOT_SUPPORTED / INVALID_VALUE here mean "no kernel for this epilogue or layout": fall back.
  plan->found = status == CUBLAS_STATUS_SUCCESS && returned > 0;
  if (plan->found) plan->algo = result.algo;
  return plan;
}

// Plans are cached per thread: no lock on the per-GEMM path (the eager batch-1 case is host-bound), and a plan's
// descriptor can take this call's bias/aux pointers without racing another thread. Descriptors and layouts are
// host objects (no CUDA calls in their destructors), so freeing them at thread exit is safe.
Plan& plan_for(const PlanKey& key, const Matmul& args, cublasLtHandle_t handle, cublasComputeType_t compute,
               const void* c, size_t workspace_bytes) {
  thread_local std::unordered_map<PlanKey, std::unique_ptr<Plan>, PlanKeyHash> plans;
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, make_plan(args, handle, compute, c, workspace_bytes)).first;
  return *it->second;
}

}  // namespace

cublasStatus_t matmul(const Matmul& args) {
  TORCH_CHECK(args.m > 0 && args.n > 0 && args.k > 0, "fastvit cuBLASLt GEMM: empty problem (m=", args.m,
              ", n=", args.n, ", k=", args.k, ") must be handled by the caller");
  const int device = c10::cuda::current_device();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const Workspace workspace = workspace_for_current_stream(device, stream);

  // fp32 accumulation always; fp32 inputs may use TF32 tensor cores only when PyTorch allows it
  // for its own matmuls (torch.backends.cuda.matmul.allow_tf32 / set_float32_matmul_precision).
  const cublasComputeType_t compute = (args.dtype == at::kFloat && at::globalContext().allowTF32CuBLAS())
                                          ? CUBLAS_COMPUTE_32F_FAST_TF32
                                          : CUBLAS_COMPUTE_32F;
  const void* c = args.c != nullptr ? args.c : args.d;  // beta = 0: C is not read
  const PlanKey key = {device,
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
                       args.bias != nullptr,
                       args.aux != nullptr,
                       args.aux_ld,
                       alignment_of(args.a),
                       alignment_of(args.b),
                       alignment_of(c),
                       alignment_of(args.d),
                       args.bias != nullptr ? alignment_of(args.bias) : 0,
                       args.aux != nullptr ? alignment_of(args.aux) : 0,
                       args.deterministic,
                       static_cast<int64_t>(workspace.bytes)};
  Plan& plan = plan_for(key, args, handle, compute, c, workspace.bytes);
  if (!plan.found) return CUBLAS_STATUS_NOT_SUPPORTED;
  if (args.bias != nullptr) set_desc(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, args.bias);
  if (args.aux != nullptr) set_desc(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, args.aux);

  const float alpha = 1.0f, beta = args.c != nullptr ? 1.0f : 0.0f;
  const cublasStatus_t status =
      cublasLtMatmul(handle, raw(plan.desc), &alpha, args.a, raw(plan.a_layout), args.b, raw(plan.b_layout), &beta, c,
                     raw(plan.d_layout), args.d, raw(plan.d_layout), &plan.algo, workspace.ptr, workspace.bytes, stream);
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
