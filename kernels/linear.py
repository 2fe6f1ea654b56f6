"""A GEMM with a LayerNorm prologue and bias / activation / residual epilogues, forward and backward, in Triton.

``out = act(prologue(A) @ Wᵀ + bias) + residual`` for A [M, K] (any strides), W [N, K] (``nn.Linear.weight``).

The tiling is Triton's matmul tutorial (python/tutorials/03-matrix-multiplication.py): one program per
[BLOCK_M, BLOCK_N] output tile, a K loop of ``tl.dot`` into an fp32 accumulator, and "grouped ordering" of the
programs (GROUP_M row tiles walk the N tiles together, so the W tiles they share stay in L2). What fastvit adds:

- **Prologue** (``HAS_LN``): LayerNorm applied to each A tile as it is loaded, from per-row mean/rstd (fp32,
  :func:`ln_stats_kernel`) and the per-column gamma/beta of K. The normalised tile is rounded to W's dtype, as the
  stored LayerNorm output would be, and never written to memory: no ``ln_out`` [M, K] round trip.
- **Epilogue**: bias, the activation (none, exact-erf GELU, tanh GELU, QuickGELU) and the residual add on the fp32
  accumulator; optionally the pre-activation is stored for the backward (``SAVE_PRE_ACT``).
- **Backward**: ``dz = dout * act'(z)`` is formed tile by tile as the output gradient is loaded (from the saved
  pre-activation z), in both backward GEMMs: dÂ = dz @ W (:func:`linear_bwd_input_kernel`) and dW = dzᵀ @ Â with
  Â re-normalised by the same prologue, plus db = Σ_M dz (:func:`linear_bwd_weight_kernel`). Neither dz nor Â is
  written. No atomics: each gradient element is written by one program in a fixed order (bit-identical runs).
  LayerNorm's own backward (dx, dgamma, dbeta from dÂ) is the extension's ``fastvit::layer_norm_bwd``.

The prologue and epilogue live in one place each (:func:`_load_a_tile`, :func:`_activation`,
:func:`_grad_pre_activation`), switched by constexpr flags, so RMSNorm / quick_gelu / SwiGLU can plug in there.
Every M, N, K is masked (ragged tails, K not a multiple of BLOCK_K); row offsets are int64 before they meet a
stride. Launchers, custom ops and autograd: ``fastvit/ops/triton/linear.py``; the spec: ``fastvit.reference``.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Activation codes (constexpr): the launcher maps the op's names to these. Under the interpreter a constexpr on the
# left of a tensor product yields a wrapped value tl.exp rejects: write `tensor * CONSTANT`.
ACT_NONE = tl.constexpr(0)
ACT_GELU = tl.constexpr(1)  # exact: 0.5 z (1 + erf(z / sqrt 2)), timm's nn.GELU
ACT_GELU_TANH = tl.constexpr(2)  # 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))) == z * sigmoid(2 u)
ACT_QUICK_GELU = tl.constexpr(3)  # z * sigmoid(1.702 z), OpenAI CLIP's QuickGELU
QUICK_GELU_SCALE = tl.constexpr(1.702)
SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
TANH_C = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
TANH_A = tl.constexpr(0.044715)


# ------------------------------------------------------------------------------------------------
# Shared pieces: program -> tile, the A-tile prologue, the activation and its derivative.


@triton.jit
def _tile_coords(ROWS, COLS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_R: tl.constexpr):
    """1-D program id -> (row tile, column tile) in grouped order: GROUP_R row tiles sweep the columns together."""
    pid = tl.program_id(0)
    tiles_r = tl.cdiv(ROWS, BLOCK_R)
    tiles_c = tl.cdiv(COLS, BLOCK_C)
    per_group = GROUP_R * tiles_c
    first_r = (pid // per_group) * GROUP_R
    group_rows = min(tiles_r - first_r, GROUP_R)
    return first_r + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _output_tile(ROWS, COLS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_R: tl.constexpr):
    """This program's output tile (grouped order): row offsets, column offsets and their in-bounds masks."""
    pid_r, pid_c = _tile_coords(ROWS, COLS, BLOCK_R, BLOCK_C, GROUP_R)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return offs_r, offs_c, offs_r < ROWS, offs_c < COLS


@triton.jit
def _load_a_tile(
    a_ptrs,  # [BLOCK_M, BLOCK_K] pointers into A [M, K]
    rows_valid,  # [BLOCK_M]
    offs_k,  # [BLOCK_K] column indices of this tile
    K,
    mean,  # [BLOCK_M] fp32 row means (unused without HAS_LN)
    rstd,  # [BLOCK_M] fp32 row 1/std
    LnWeight,  # [K] gamma
    LnBias,  # [K] beta
    dtype: tl.constexpr,  # the GEMM operand dtype (W's)
    HAS_LN: tl.constexpr,
):
    """The A operand tile: A itself, or LayerNorm(A) rounded to ``dtype``; zero outside [M, K]."""
    k_valid = offs_k < K
    mask = rows_valid[:, None] & k_valid[None, :]
    a = tl.load(a_ptrs, mask=mask, other=0.0)
    if HAS_LN:
        gamma = tl.load(LnWeight + offs_k, mask=k_valid, other=0.0).to(tl.float32)
        beta = tl.load(LnBias + offs_k, mask=k_valid, other=0.0).to(tl.float32)
        normed = (a.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
        a = tl.where(mask, normed, 0.0)
    return a.to(dtype)


@triton.jit
def _sigmoid(u):
    # Written out: tl.sigmoid fails under Triton 3.8's interpreter. exp(-u) = inf for very negative u gives 0.
    return 1.0 / (1.0 + tl.exp(-u))


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """act(z) in fp32."""
    if ACTIVATION == ACT_GELU:
        z = 0.5 * z * (1.0 + tl.math.erf(z * SQRT1_2))
    elif ACTIVATION == ACT_GELU_TANH:
        z = z * _sigmoid((z + z * z * z * TANH_A) * (2.0 * TANH_C))
    elif ACTIVATION == ACT_QUICK_GELU:
        z = z * _sigmoid(z * QUICK_GELU_SCALE)
    return z


@triton.jit
def _grad_pre_activation(grad_ptrs, z_ptrs, mask, ACTIVATION: tl.constexpr):
    """dz = dout * act'(z) for one [rows, cols] tile (fp32; 0 outside ``mask``); z is the saved pre-activation."""
    grad = tl.load(grad_ptrs, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == ACT_GELU:
        z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(z * SQRT1_2))
        grad = grad * (cdf + z * INV_SQRT_2PI * tl.exp(-0.5 * z * z))
    elif ACTIVATION == ACT_GELU_TANH:
        z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
        s = _sigmoid((z + z * z * z * TANH_A) * (2.0 * TANH_C))
        grad = grad * (s + z * 2.0 * s * (1.0 - s) * (1.0 + z * z * (3.0 * TANH_A)) * TANH_C)
    elif ACTIVATION == ACT_QUICK_GELU:
        z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
        s = _sigmoid(z * QUICK_GELU_SCALE)
        grad = grad * (s + QUICK_GELU_SCALE * z * s * (1.0 - s))
    return grad


@triton.jit
def _load_row_stats(Mean, Rstd, offs_m, rows_valid, HAS_LN: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per-row (mean, rstd) of the LayerNorm prologue as fp32 [BLOCK_M] vectors (zeros without HAS_LN)."""
    if HAS_LN:
        mean = tl.load(Mean + offs_m, mask=rows_valid, other=0.0)
        rstd = tl.load(Rstd + offs_m, mask=rows_valid, other=0.0)
    else:
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        rstd = mean
    return mean, rstd


# ------------------------------------------------------------------------------------------------
# LayerNorm statistics


@triton.jit
def ln_stats_kernel(
    A,  # [M, K] strided
    Mean,  # [M] fp32 out
    Rstd,  # [M] fp32 out: 1 / sqrt(var + eps), biased variance
    M,
    K,
    stride_am,
    stride_ak,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Row statistics, corrected two-pass (a first mean, then centred sums), as the extension's LayerNorm."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_valid = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    row_ptrs = A + offs_m.to(tl.int64)[:, None] * stride_am
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = rows_valid[:, None] & ((k0 + offs_k) < K)[None, :]
        total += tl.sum(tl.load(row_ptrs + (k0 + offs_k)[None, :] * stride_ak, mask=mask, other=0.0).to(tl.float32), 1)
    rough_mean = total / K
    centred_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = rows_valid[:, None] & ((k0 + offs_k) < K)[None, :]
        x = tl.load(row_ptrs + (k0 + offs_k)[None, :] * stride_ak, mask=mask, other=0.0).to(tl.float32)
        centred = tl.where(mask, x - rough_mean[:, None], 0.0)
        centred_sum += tl.sum(centred, 1)
        squares += tl.sum(centred * centred, 1)
    var = tl.maximum((squares - centred_sum * centred_sum / K) / K, 0.0)
    tl.store(Mean + offs_m, rough_mean + centred_sum / K, mask=rows_valid)
    tl.store(Rstd + offs_m, 1.0 / tl.sqrt(var + eps), mask=rows_valid)


# ------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def linear_fwd_kernel(
    A,  # [M, K] strided (the LayerNorm input with HAS_LN)
    W,  # [N, K] strided
    Bias,  # [N] (HAS_BIAS)
    Residual,  # [M, N] strided (HAS_RESIDUAL)
    Out,  # [M, N] contiguous
    PreAct,  # [M, N] contiguous, dtype of Out: z = prologue(A) @ Wᵀ + bias (SAVE_PRE_ACT)
    Mean,  # [M] fp32 (HAS_LN)
    Rstd,  # [M] fp32 (HAS_LN)
    LnWeight,  # [K] (HAS_LN)
    LnBias,  # [K] (HAS_LN)
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_wn,
    stride_wk,
    stride_rm,
    stride_rn,
    HAS_LN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SAVE_PRE_ACT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    offs_m, offs_n, rows_valid, cols_valid = _output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    rows64 = offs_m.to(tl.int64)
    a_ptrs = A + rows64[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
    mean, rstd = _load_row_stats(Mean, Rstd, offs_m, rows_valid, HAS_LN, BLOCK_M)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = _load_a_tile(a_ptrs, rows_valid, k0 + offs_k, K, mean, rstd, LnWeight, LnBias, W.dtype.element_ty, HAS_LN)
        w = tl.load(w_ptrs, mask=cols_valid[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    # Epilogue, on the fp32 accumulator.
    mask = rows_valid[:, None] & cols_valid[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=cols_valid, other=0.0).to(tl.float32)[None, :]
    out_offsets = rows64[:, None] * N + offs_n[None, :]
    if SAVE_PRE_ACT:
        tl.store(PreAct + out_offsets, acc.to(PreAct.dtype.element_ty), mask=mask)
    acc = _activation(acc, ACTIVATION)
    if HAS_RESIDUAL:
        residual_ptrs = Residual + rows64[:, None] * stride_rm + offs_n[None, :] * stride_rn
        acc += tl.load(residual_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + out_offsets, acc.to(Out.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Backward. dz = dout * act'(z) is formed from the output gradient and the saved pre-activation tile by tile.


@triton.jit
def linear_bwd_input_kernel(
    GradOut,  # [M, N] contiguous
    PreAct,  # [M, N] contiguous (ACTIVATION != none)
    W,  # [N, K] strided
    GradA,  # [M, K] contiguous out: dÂ = dz @ W (the gradient of LayerNorm's output with a LN prologue)
    M,
    N,
    K,
    stride_wn,
    stride_wk,
    ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # the reduction tile
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    offs_m, offs_k, rows_valid, k_valid = _output_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_n = tl.arange(0, BLOCK_N)
    rows64 = offs_m.to(tl.int64)
    grad_offsets = rows64[:, None] * N + offs_n[None, :]
    w_ptrs = W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_valid = (n0 + offs_n) < N
        dz = _grad_pre_activation(
            GradOut + grad_offsets, PreAct + grad_offsets, rows_valid[:, None] & n_valid[None, :], ACTIVATION
        )
        w = tl.load(w_ptrs, mask=n_valid[:, None] & k_valid[None, :], other=0.0)
        acc = tl.dot(dz.to(W.dtype.element_ty), w, acc, input_precision=INPUT_PRECISION)
        grad_offsets += BLOCK_N
        w_ptrs += BLOCK_N * stride_wn
    grad_ptrs = GradA + rows64[:, None] * K + offs_k[None, :]
    tl.store(grad_ptrs, acc.to(GradA.dtype.element_ty), mask=rows_valid[:, None] & k_valid[None, :])


@triton.jit
def linear_bwd_weight_kernel(
    GradOut,  # [M, N] contiguous
    PreAct,  # [M, N] contiguous (ACTIVATION != none)
    A,  # [M, K] strided (the LayerNorm input with HAS_LN)
    Mean,  # [M] fp32 (HAS_LN)
    Rstd,  # [M] fp32 (HAS_LN)
    LnWeight,  # [K] (HAS_LN)
    LnBias,  # [K] (HAS_LN)
    GradW,  # [N, K] contiguous out: dzᵀ @ prologue(A)
    GradBias,  # [N] out (HAS_BIAS): Σ_M dz, written by the programs of the first K tile
    M,
    N,
    K,
    stride_am,
    stride_ak,
    HAS_LN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # the reduction tile
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # groups of N tiles here
):
    pid_n, pid_k = _tile_coords(N, K, BLOCK_N, BLOCK_K, GROUP_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    cols_valid = offs_n < N

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    grad_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rows = m0 + offs_m
        rows_valid = rows < M
        rows64 = rows.to(tl.int64)
        grad_offsets = rows64[:, None] * N + offs_n[None, :]
        dz = _grad_pre_activation(
            GradOut + grad_offsets, PreAct + grad_offsets, rows_valid[:, None] & cols_valid[None, :], ACTIVATION
        )
        mean, rstd = _load_row_stats(Mean, Rstd, rows, rows_valid, HAS_LN, BLOCK_M)
        a_ptrs = A + rows64[:, None] * stride_am + offs_k[None, :] * stride_ak
        a = _load_a_tile(a_ptrs, rows_valid, offs_k, K, mean, rstd, LnWeight, LnBias, GradW.dtype.element_ty, HAS_LN)
        acc = tl.dot(tl.trans(dz.to(GradW.dtype.element_ty)), a, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            grad_bias += tl.sum(dz, 0)
    k_valid = offs_k < K
    grad_ptrs = GradW + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(grad_ptrs, acc.to(GradW.dtype.element_ty), mask=cols_valid[:, None] & k_valid[None, :])
    if HAS_BIAS:  # every K tile summed the same dz: the first one stores it
        tl.store(GradBias + offs_n, grad_bias.to(GradBias.dtype.element_ty), mask=cols_valid & (pid_k == 0))


# ------------------------------------------------------------------------------------------------
# Configurations: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) per kernel kind and GPU generation. For the
# backward kinds the three block names keep the forward's meaning (M rows, N outputs, K inputs); the reduction
# runs over N ('input') or M ('weight'). Autotuned on a GPU (the first entry in deterministic mode), one fixed entry
# under the interpreter. Every 16-bit entry compiles without spills within the arch's shared memory at ViT-B's fc1
# (LN prologue, GELU) and fc2 (residual) for sm_90a / sm_80 (``python -m fastvit.kernels.resources``, CI's
# test_resources.py): e.g. 128x128 tiles spill with 4 warps once the GELU derivative is formed on the dz tile, and
# the 'weight' kernel (dz and the re-normalised A tile live together) needs 32-64 rows per step.

_FP32 = [(64, 64, 32, 8, 4, 3), (32, 64, 32, 8, 4, 3)]
CONFIGS = {
    "fwd": {
        90: [(128, 128, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4)],
        80: [(128, 64, 32, 8, 4, 4), (64, 128, 32, 8, 4, 4), (64, 64, 32, 8, 4, 4)],
        "fp32": _FP32,
    },
    "input": {
        90: [(128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4)],
        80: [(128, 64, 32, 8, 8, 3), (64, 64, 32, 8, 4, 4)],
        "fp32": _FP32,
    },
    "weight": {
        90: [(64, 128, 128, 8, 8, 3), (32, 64, 64, 8, 4, 4)],
        80: [(64, 64, 32, 8, 8, 3), (32, 64, 32, 8, 4, 4)],
        "fp32": _FP32,
    },
}
INTERPRETER_CONFIG = (16, 128, 128, 4, 4, 1)  # few, wide tiles: the interpreter pays per op, not per element
STATS_BLOCK_M = 16
STATS_BLOCK_K = 128
