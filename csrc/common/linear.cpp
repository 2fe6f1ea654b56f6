// nn.Linear's GEMMs as cuBLASLt calls (see linear.h; transposition convention in cublaslt.h).
#include "common/linear.h"

#ifdef FASTVIT_WITH_CUDA

#include <c10/util/Exception.h>

namespace fastvit {
namespace cublaslt {

namespace {

// One column-major GEMM  D[m, n] = op(A)[m, k] · op(B)[k, n]  with D's leading dimension m (D contiguous).
Matmul column_major(cublasOperation_t trans_a, cublasOperation_t trans_b, int64_t m, int64_t n, int64_t k,
                    const at::Tensor& a, int64_t lda, const at::Tensor& b, int64_t ldb, const at::Tensor& d,
                    bool deterministic) {
  Matmul mm;
  mm.trans_a = trans_a;
  mm.trans_b = trans_b;
  mm.m = m;
  mm.n = n;
  mm.k = k;
  mm.a = a.data_ptr();
  mm.lda = lda;
  mm.b = b.data_ptr();
  mm.ldb = ldb;
  mm.d = d.data_ptr();
  mm.ldd = m;
  mm.dtype = d.scalar_type();
  mm.deterministic = deterministic;
  return mm;
}

}  // namespace

Matmul linear_forward_matmul(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out) {
  // out[M, N] = x[M, K] · W[N, K]ᵀ  ->  outᵀ = W · xᵀ:  m = N, n = M, k = K.
  const int64_t k = x.size(1);
  return column_major(CUBLAS_OP_T, CUBLAS_OP_N, weight.size(0), x.size(0), k, weight, k, x, k, out, false);
}

Matmul linear_input_grad_matmul(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& grad_x,
                                bool deterministic) {
  // dx[M, K] = dy[M, N] · W[N, K]  ->  dxᵀ = Wᵀ · dyᵀ:  m = K, n = M, k = N.
  const int64_t m = weight.size(1), k = weight.size(0);
  return column_major(CUBLAS_OP_N, CUBLAS_OP_N, m, dy.size(0), k, weight, m, dy, k, grad_x, deterministic);
}

Matmul linear_weight_grad_matmul(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& grad_weight,
                                 bool deterministic) {
  // dW[N, K] = dy[M, N]ᵀ · x[M, K]  ->  dWᵀ = xᵀ · dy:  m = K, n = N, k = M.
  const int64_t m = x.size(1), n = dy.size(1);
  return column_major(CUBLAS_OP_N, CUBLAS_OP_T, m, n, x.size(0), x, m, dy, n, grad_weight, deterministic);
}

void linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& residual,
                    const at::Tensor& out, const char* what) {
  Matmul mm = linear_forward_matmul(x, weight, out);
  mm.c = residual.defined() ? residual.data_ptr() : nullptr;  // [M, N] contiguous: the layout of out
  if (bias.defined()) {
    Matmul with_bias = mm;
    with_bias.epilogue = CUBLASLT_EPILOGUE_BIAS;
    with_bias.bias = bias.data_ptr();
    if (matmul(with_bias) == CUBLAS_STATUS_SUCCESS) return;
    matmul_or_throw(mm, what);
    out.add_(bias);  // rare fallback: one extra pass
    return;
  }
  matmul_or_throw(mm, what);
}

void linear_input_grad(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& grad_x, bool deterministic,
                       const char* what) {
  matmul_or_throw(linear_input_grad_matmul(dy, weight, grad_x, deterministic), what);
}

void linear_weight_grad(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& grad_weight,
                        const at::Tensor& grad_bias, bool deterministic, const char* what) {
  const Matmul mm = linear_weight_grad_matmul(x, dy, grad_weight, deterministic);
  if (grad_bias.defined() && !deterministic) {
    Matmul with_bgrad = mm;
    with_bgrad.epilogue = CUBLASLT_EPILOGUE_BGRADB;  // sums op(B) = dy over the tokens: length n = N
    with_bgrad.bias = grad_bias.data_ptr();
    if (matmul(with_bgrad) == CUBLAS_STATUS_SUCCESS) return;
  }
  matmul_or_throw(mm, what);
  if (grad_bias.defined()) {
    at::Tensor bias_out = grad_bias;  // deterministic reduction (fixed order)
    at::sum_out(bias_out, dy, at::IntArrayRef{0});
  }
}

}  // namespace cublaslt
}  // namespace fastvit

#endif  // FASTVIT_WITH_CUDA
