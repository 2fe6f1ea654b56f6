// A thin cuBLASLt GEMM helper for row-major torch tensors: PyTorch's cuBLASLt handle and per-stream workspace
// (our own, allocated outside every memory pool, before PyTorch 2.9), GEMM plans (descriptor, layouts,
// algorithm) cached per shape and per thread, and the epilogues the fused ops use.
//
// Transposition convention (used by every caller):
//   cuBLASLt is column-major; torch tensors are row-major. A contiguous row-major [R, S] tensor is,
//   byte for byte, the column-major [S, R] matrix (its transpose) with leading dimension S. So we
//   never transpose data: every row-major product is rewritten as the product of the transposes.
//   Forward Linear, Y[M, N] = X[M, K] · W[N, K]ᵀ:  Yᵀ = W · Xᵀ, i.e.
//     m = N, n = M, k = K;  A = W with op T (lda = K);  B = X with op N (ldb = K);  D = Y (ldd = N).
//   cuBLASLt's "rows of D" are thus our features and its "columns of D" our tokens: a BIAS epilogue
//   vector of length m is the per-feature Linear bias, and the GELU aux matrix has Y's layout.
//   Weight gradient, dW[N, K] = dY[M, N]ᵀ · X[M, K]:  dWᵀ = Xᵀ · dY, i.e.
//     m = K, n = N, k = M;  A = X with op N (lda = K);  B = dY with op T (ldb = N);  D = dW (ldd = K).
//   BGRADB sums op(B) = dY over k (the tokens): the per-feature bias gradient, length n = N.
//   Input gradient, dX[M, K] = dY[M, N] · W[N, K]:  dXᵀ = Wᵀ · dYᵀ, i.e.
//     m = K, n = M, k = N;  A = W with op N (lda = K);  B = dY with op N (ldb = N);  D = dX (ldd = K).
//   DGELU_BGRAD multiplies D by GELU'(aux) and sums it over n (the tokens): length m = K.
#pragma once

#ifdef FASTVIT_WITH_CUDA

#include <ATen/ATen.h>
#include <cublasLt.h>

#include <cstdint>

namespace fastvit {
namespace cublaslt {

// One GEMM  D = op(A)·op(B) (+ C) (+ epilogue), column-major (see the header comment).
struct Matmul {
  cublasOperation_t trans_a = CUBLAS_OP_N, trans_b = CUBLAS_OP_N;
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;  // [lda, ...] column-major, element type `dtype`
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  const void* c = nullptr;  // nullptr: beta = 0 (C not read); else beta = 1, same shape and ld as D
  void* d = nullptr;
  int64_t ldd = 0;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;  // BIAS*: bias vector [m] (input); *BGRAD*: bias gradient ([m] DGELU_BGRAD, [n] BGRADB)
  void* aux = nullptr;         // GELU_AUX*: pre-activation written; DGELU*: pre-activation read. Same shape as D
  int64_t aux_ld = 0;          // must be a multiple of 8 (cuBLASLt requirement)
  at::ScalarType dtype = at::kFloat;  // of A, B, C, D, bias and aux
  bool deterministic = false;         // forbid split-K reductions (bit-identical results run to run)
};

// Runs the GEMM on the current stream of the current device. Returns CUBLAS_STATUS_SUCCESS, or
// CUBLAS_STATUS_NOT_SUPPORTED when cuBLASLt has no algorithm for this epilogue / layout / alignment
// (the caller then falls back to a plainer epilogue plus its own kernel). Any other failure throws.
cublasStatus_t matmul(const Matmul& args);

// Like matmul, but a missing algorithm is an error too (for the plain GEMMs every fallback ends on).
void matmul_or_throw(const Matmul& args, const char* what);

}  // namespace cublaslt
}  // namespace fastvit

#endif  // FASTVIT_WITH_CUDA
