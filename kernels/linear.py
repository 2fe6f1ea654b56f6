"""A GEMM with a norm prologue and bias / activation / residual epilogues, forward and backward, in Triton.

``out = act(prologue(A) @ Wᵀ + bias) + residual`` for A [M, K] (any strides), W [N, K] (``nn.Linear.weight``).

The tiling is Triton's matmul tutorial (python/tutorials/03-matrix-multiplication.py): one program per
[BLOCK_M, BLOCK_N] output tile, a K loop of ``tl.dot`` into an fp32 accumulator, and "grouped ordering" of the
programs (GROUP_M row tiles walk the N tiles together, so the W tiles they share stay in L2). What fastvit adds:

- **Prologue** (``NORM``): LayerNorm or RMSNorm applied to each A tile as it is loaded, from per-row statistics
  (fp32 mean and rstd, or rstd alone for RMSNorm: :func:`norm_stats_kernel`) and the per-column weight (and bias)
  of K. The normalised tile is rounded to W's dtype, as the stored norm output would be, and never written to
  memory: no ``ln_out`` [M, K] round trip. The same prologue serves fc1 (the block's norm2) and fc2 (a sub-LN over
  the hidden layer).
- **Epilogue**: bias, the activation (none, exact-erf GELU, tanh GELU, QuickGELU, SwiGLU) and the residual add on
  the fp32 accumulator; optionally the pre-activation is stored for the backward (``SAVE_PRE_ACT``). SwiGLU keeps
  two accumulators side by side in one program, gate (rows of W) and value (rows of ``WValue``: the second half
  of a packed fc1, or timm's separate ``fc1_x``), and writes ``silu(gate) * value``: the [M, 2·N] pre-activation
  is never read back in the forward.
- **Hopper forward** (:func:`linear_fwd_tma_kernel`, off by default: ``fastvit.ops.triton.linear.hopper_path()``):
  the same tiles, prologue and epilogue, but persistent (``min(#SMs, #tiles)`` programs, each looping over output
  tiles in the same grouped order) and with the A and W tiles loaded through device-side tensor descriptors (TMA,
  ``tl.make_tensor_descriptor``, Triton >= 3.4) instead of pointer arithmetic, after Triton's persistent-matmul
  tutorial (python/tutorials/09-persistent-matmul.py). Not yet measured on a GPU.
- **Backward**: ``dz = dout * act'(z)`` is formed tile by tile as the output gradient is loaded (from the saved
  pre-activation z; for SwiGLU both halves from gate and value), in both backward GEMMs: dÂ = dz @ W
  (:func:`linear_bwd_input_kernel`) and dW = dzᵀ @ Â with Â re-normalised by the same prologue, plus db = Σ_M dz
  (:func:`linear_bwd_weight_kernel`, optionally split over M into ``SPLIT_K`` fp32 partials for skinny grids).
  Neither dz nor Â is written. The norm's own backward (dx, and per-row-block partials of its weight and bias
  gradients) is :func:`norm_bwd_kernel`. No atomics anywhere: each gradient element (or partial) is written by one
  program in a fixed order and partials are summed on the host in a fixed order (bit-identical runs).

The prologue and epilogue live in one place each (:func:`_normalise_a_tile`, :func:`_fwd_epilogue`,
:func:`_activation`, :func:`_grad_pre_activation`, :func:`_grad_swiglu`), switched by constexpr flags; so does the
tile order (:func:`_tile_coords` of a tile index, :func:`_tile_offsets`). Every M, N, K is masked (ragged
tails, K not a multiple of BLOCK_K); row offsets are int64 before they meet a stride. Launchers, custom ops and
autograd: ``fastvit/ops/triton/linear_launch.py`` and ``linear.py``; the spec: ``fastvit.reference``.
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
ACT_SWIGLU = tl.constexpr(4)  # silu(gate) * value, gate = A Wᵀ, value = A WValueᵀ (timm's SwiGLU / SwiGLUPacked)
# Norm codes of the prologue (constexpr).
NORM_NONE = tl.constexpr(0)
NORM_LAYER = tl.constexpr(1)  # (a - mean) * rstd * weight (+ bias), rstd = 1 / sqrt(biased var + eps)
NORM_RMS = tl.constexpr(2)  # a * rstd * weight, rstd = 1 / sqrt(mean(a²) + eps)
QUICK_GELU_SCALE = tl.constexpr(1.702)
SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
TANH_C = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
TANH_A = tl.constexpr(0.044715)


# ------------------------------------------------------------------------------------------------
# Shared pieces: program -> tile, the A-tile prologue, the activation and its derivative.


@triton.jit
def _tile_coords(tile, ROWS, COLS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_R: tl.constexpr):
    """Tile index -> (row tile, column tile) in grouped order: GROUP_R row tiles sweep the columns together. The
    one-program-per-tile kernels pass their program id, the persistent one each tile it loops over."""
    tiles_r = tl.cdiv(ROWS, BLOCK_R)
    tiles_c = tl.cdiv(COLS, BLOCK_C)
    per_group = GROUP_R * tiles_c
    first_r = (tile // per_group) * GROUP_R
    group_rows = min(tiles_r - first_r, GROUP_R)
    return first_r + (tile % per_group) % group_rows, (tile % per_group) // group_rows


@triton.jit
def _tile_offsets(pid_r, pid_c, ROWS, COLS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row offsets, column offsets and their in-bounds masks of output tile (pid_r, pid_c)."""
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return offs_r, offs_c, offs_r < ROWS, offs_c < COLS


@triton.jit
def _output_tile(ROWS, COLS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_R: tl.constexpr):
    """This program's output tile (grouped order): row offsets, column offsets and their in-bounds masks."""
    pid_r, pid_c = _tile_coords(tl.program_id(0), ROWS, COLS, BLOCK_R, BLOCK_C, GROUP_R)
    return _tile_offsets(pid_r, pid_c, ROWS, COLS, BLOCK_R, BLOCK_C)


@triton.jit
def _normalise_a_tile(
    a,  # [BLOCK_M, BLOCK_K] loaded A tile (zero outside [M, K])
    rows_valid,  # [BLOCK_M]
    offs_k,  # [BLOCK_K] column indices of this tile
    K,
    mean,  # [BLOCK_M] fp32 row means (NORM_LAYER)
    rstd,  # [BLOCK_M] fp32 row 1/std or 1/rms (NORM != NORM_NONE)
    NormWeight,  # [K]
    NormBias,  # [K] (HAS_NORM_BIAS)
    dtype: tl.constexpr,  # the GEMM operand dtype (W's)
    NORM: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
):
    """The prologue on a loaded A tile: A itself, or Norm(A) rounded to ``dtype``; zero outside [M, K] (whether the
    tile came from masked pointer loads or a zero-padded tensor-descriptor load)."""
    if NORM != NORM_NONE:
        k_valid = offs_k < K
        normed = a.to(tl.float32)
        if NORM == NORM_LAYER:
            normed = normed - mean[:, None]
        weight = tl.load(NormWeight + offs_k, mask=k_valid, other=0.0).to(tl.float32)
        normed = normed * rstd[:, None] * weight[None, :]
        if HAS_NORM_BIAS:
            normed += tl.load(NormBias + offs_k, mask=k_valid, other=0.0).to(tl.float32)[None, :]
        a = tl.where(rows_valid[:, None] & k_valid[None, :], normed, 0.0)
    return a.to(dtype)


@triton.jit
def _load_a_tile(
    a_ptrs, rows_valid, offs_k, K, mean, rstd, NormWeight, NormBias, dtype: tl.constexpr, NORM: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
):  # fmt: skip
    """:func:`_normalise_a_tile` of the tile loaded through ``a_ptrs`` [BLOCK_M, BLOCK_K] (pointers into A [M, K]),
    masked: zero outside [M, K]."""
    a = tl.load(a_ptrs, mask=rows_valid[:, None] & (offs_k < K)[None, :], other=0.0)
    return _normalise_a_tile(a, rows_valid, offs_k, K, mean, rstd, NormWeight, NormBias, dtype, NORM, HAS_NORM_BIAS)


@triton.jit
def _sigmoid(u):
    # Written out: tl.sigmoid fails under Triton 3.8's interpreter. exp(-u) = inf for very negative u gives 0.
    return 1.0 / (1.0 + tl.exp(-u))


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """act(z) in fp32 (single-input activations; SwiGLU is :func:`_swiglu`)."""
    if ACTIVATION == ACT_GELU:
        z = 0.5 * z * (1.0 + tl.math.erf(z * SQRT1_2))
    elif ACTIVATION == ACT_GELU_TANH:
        z = z * _sigmoid((z + z * z * z * TANH_A) * (2.0 * TANH_C))
    elif ACTIVATION == ACT_QUICK_GELU:
        z = z * _sigmoid(z * QUICK_GELU_SCALE)
    return z


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr, cols, act_cols, PARTIAL_ACT: tl.constexpr):
    """act(z) on a [rows, cols] tile; with ``PARTIAL_ACT`` only on the columns ``cols < act_cols``, the others left
    as they are (the parallel blocks' in_proj: the MLP's hidden columns, then q, k, v)."""
    activated = _activation(z, ACTIVATION)
    if PARTIAL_ACT:
        activated = tl.where((cols < act_cols)[None, :], activated, z)
    return activated


@triton.jit
def _swiglu(gate, value):
    """silu(gate) * value in fp32."""
    return gate * _sigmoid(gate) * value


@triton.jit
def _grad_pre_activation(grad_ptrs, z_ptrs, mask, ACTIVATION: tl.constexpr, cols, act_cols, PARTIAL_ACT: tl.constexpr):
    """dz = dout * act'(z) for one [rows, cols] tile (fp32; 0 outside ``mask``); z is the saved pre-activation.
    ``PARTIAL_ACT``: only the columns ``cols < act_cols`` went through the activation (see :func:`_activate`)."""
    grad = tl.load(grad_ptrs, mask=mask, other=0.0).to(tl.float32)
    plain = grad
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
    if PARTIAL_ACT:
        grad = tl.where((cols < act_cols)[None, :], grad, plain)
    return grad


@triton.jit
def _grad_swiglu(grad_ptrs, gate_ptrs, value_ptrs, mask):
    """(d gate, d value) of out = silu(gate) * value for one tile (fp32; 0 outside ``mask``), from the saved
    pre-activations: d value = dout·silu(gate), d gate = dout·value·σ(gate)(1 + gate(1 − σ(gate)))."""
    grad = tl.load(grad_ptrs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    value = tl.load(value_ptrs, mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(gate)
    return grad * value * (s + gate * s * (1.0 - s)), grad * (gate * s)


@triton.jit
def _load_row_stats(Mean, Rstd, offs_m, rows_valid, NORM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per-row (mean, rstd) of the norm prologue as fp32 [BLOCK_M] vectors (zeros where the norm has none)."""
    mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
    rstd = mean
    if NORM == NORM_LAYER:
        mean = tl.load(Mean + offs_m, mask=rows_valid, other=0.0)
    if NORM != NORM_NONE:
        rstd = tl.load(Rstd + offs_m, mask=rows_valid, other=0.0)
    return mean, rstd


# ------------------------------------------------------------------------------------------------
# Norm statistics and the norm's backward


@triton.jit
def norm_stats_kernel(
    A,  # [M, K] strided
    Mean,  # [M] fp32 out (NORM_LAYER)
    Rstd,  # [M] fp32 out: 1 / sqrt(biased var + eps), or 1 / sqrt(mean(a²) + eps) for RMSNorm
    M,
    K,
    stride_am,
    stride_ak,
    eps,
    NORM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Row statistics. LayerNorm: corrected two-pass (a first mean, then centred sums), as the extension's
    LayerNorm; RMSNorm: one pass of squares."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_valid = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    row_ptrs = A + offs_m.to(tl.int64)[:, None] * stride_am
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask = rows_valid[:, None] & ((k0 + offs_k) < K)[None, :]
        x = tl.load(row_ptrs + (k0 + offs_k)[None, :] * stride_ak, mask=mask, other=0.0).to(tl.float32)
        total += tl.sum(x * x if NORM == NORM_RMS else x, 1)
    if NORM == NORM_RMS:
        tl.store(Rstd + offs_m, 1.0 / tl.sqrt(total / K + eps), mask=rows_valid)
    else:
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


@triton.jit
def _normalised_rows(x_ptrs, mask, mean, rstd, NORM: tl.constexpr):
    """x̂ = (x − mean)·rstd (LayerNorm) or x·rstd (RMSNorm) in fp32 for one [rows, cols] tile; 0 outside ``mask``."""
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if NORM == NORM_LAYER:
        x = x - mean[:, None]
    return tl.where(mask, x * rstd[:, None], 0.0)


@triton.jit
def norm_bwd_kernel(
    GradNormed,  # dy, the gradient of the norm's output (the GEMM's dÂ): row m at (m // ROWS_PER_GROUP, m % ...)
    X,  # [M, K] strided: the norm's input
    Mean,  # [M] fp32 (NORM_LAYER)
    Rstd,  # [M] fp32
    NormWeight,  # [K]
    GradX,  # [M, K] contiguous out
    PartialWeight,  # [cdiv(M, BLOCK_M), K] fp32 out: this row block's Σ dy·x̂
    PartialBias,  # [cdiv(M, BLOCK_M), K] fp32 out (HAS_NORM_BIAS): this row block's Σ dy
    M,
    K,
    stride_xm,
    stride_xk,
    rows_per_group,  # dy's rows come in groups of this many (the patch embedding: patch rows per image; else M)
    stride_dy_group,
    stride_dy_m,
    stride_dy_k,
    NORM: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dx = rstd·(g − mean_K(g) − x̂·mean_K(g·x̂)) with g = dy·weight (RMSNorm: without the mean_K(g) term), two
    passes over K per block of rows; the weight (and bias) gradients as per-row-block partials, summed on the host
    in a fixed order (no atomics). dy is read in place through group / row / column strides, so that the patch rows
    of a [B, T + N, D] gradient (not one stride apart when T > 0) need no dense copy."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_valid = offs_m < M
    rows64 = offs_m.to(tl.int64)
    dy_rows = (rows64 // rows_per_group) * stride_dy_group + (rows64 % rows_per_group) * stride_dy_m
    offs_k = tl.arange(0, BLOCK_K)
    mean, rstd = _load_row_stats(Mean, Rstd, offs_m, rows_valid, NORM, BLOCK_M)
    sum_g = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sum_gx = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        cols64 = cols.to(tl.int64)  # a transposed dY's column stride is B·L: cols·stride may pass 2^31
        k_valid = cols < K
        mask = rows_valid[:, None] & k_valid[None, :]
        x_hat = _normalised_rows(X + rows64[:, None] * stride_xm + cols[None, :] * stride_xk, mask, mean, rstd, NORM)
        dy = tl.load(GradNormed + dy_rows[:, None] + cols64[None, :] * stride_dy_k, mask=mask, other=0.0).to(tl.float32)
        g = dy * tl.load(NormWeight + cols, mask=k_valid, other=0.0).to(tl.float32)[None, :]
        sum_g += tl.sum(g, 1)
        sum_gx += tl.sum(g * x_hat, 1)
    mean_g = sum_g / K
    mean_gx = sum_gx / K
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + offs_k
        cols64 = cols.to(tl.int64)
        k_valid = cols < K
        mask = rows_valid[:, None] & k_valid[None, :]
        x_hat = _normalised_rows(X + rows64[:, None] * stride_xm + cols[None, :] * stride_xk, mask, mean, rstd, NORM)
        dy = tl.load(GradNormed + dy_rows[:, None] + cols64[None, :] * stride_dy_k, mask=mask, other=0.0).to(tl.float32)
        g = dy * tl.load(NormWeight + cols, mask=k_valid, other=0.0).to(tl.float32)[None, :]
        dx = g - x_hat * mean_gx[:, None]
        if NORM == NORM_LAYER:
            dx -= mean_g[:, None]
        tl.store(
            GradX + rows64[:, None] * K + cols[None, :], (dx * rstd[:, None]).to(GradX.dtype.element_ty), mask=mask
        )
        tl.store(PartialWeight + pid * K + cols, tl.sum(dy * x_hat, 0), mask=k_valid)
        if HAS_NORM_BIAS:
            tl.store(PartialBias + pid * K + cols, tl.sum(dy, 0), mask=k_valid)


# ------------------------------------------------------------------------------------------------
# Forward: the one-program-per-tile kernel with pointer loads, and the persistent Hopper kernel whose A and W tiles
# come through tensor descriptors (TMA). Both end in the same epilogue.


@triton.jit
def _fwd_epilogue(
    acc,  # [BLOCK_M, BLOCK_N] fp32: prologue(A) Wᵀ (the gate half for SwiGLU)
    acc_value,  # [BLOCK_M, BLOCK_N] fp32 (ACT_SWIGLU): prologue(A) WValueᵀ
    offs_m,  # [BLOCK_M] output rows of the tile
    offs_n,  # [BLOCK_N] output columns of the tile
    rows_valid,
    cols_valid,
    N,
    Bias,  # [N], or [2N] (gate then value) for SwiGLU (HAS_BIAS)
    Residual,  # [M, N] strided (HAS_RESIDUAL)
    Out,  # [M, N] contiguous
    PreAct,  # [M, N] (or [M, 2N]) contiguous (SAVE_PRE_ACT)
    stride_rm,
    stride_rn,
    act_cols,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SAVE_PRE_ACT: tl.constexpr,
    PARTIAL_ACT: tl.constexpr,
):
    """The forward's epilogue on the fp32 accumulator(s): bias, the pre-activation store, the activation (on the
    columns below ``act_cols`` only with ``PARTIAL_ACT``; SwiGLU combines gate and value), the residual, the store."""
    rows64 = offs_m.to(tl.int64)
    mask = rows_valid[:, None] & cols_valid[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=cols_valid, other=0.0).to(tl.float32)[None, :]
        if ACTIVATION == ACT_SWIGLU:
            acc_value += tl.load(Bias + N + offs_n, mask=cols_valid, other=0.0).to(tl.float32)[None, :]
    if SAVE_PRE_ACT:
        if ACTIVATION == ACT_SWIGLU:
            pre_offsets = rows64[:, None] * (2 * N) + offs_n[None, :]
            tl.store(PreAct + pre_offsets + N, acc_value.to(PreAct.dtype.element_ty), mask=mask)
        else:
            pre_offsets = rows64[:, None] * N + offs_n[None, :]
        tl.store(PreAct + pre_offsets, acc.to(PreAct.dtype.element_ty), mask=mask)
    if ACTIVATION == ACT_SWIGLU:
        acc = _swiglu(acc, acc_value)
    else:
        acc = _activate(acc, ACTIVATION, offs_n, act_cols, PARTIAL_ACT)
    if HAS_RESIDUAL:
        residual_ptrs = Residual + rows64[:, None] * stride_rm + offs_n[None, :] * stride_rn
        acc += tl.load(residual_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + rows64[:, None] * N + offs_n[None, :], acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def linear_fwd_kernel(
    A,  # [M, K] strided (the norm's input with a prologue)
    W,  # [N, K] strided (the gate rows for SwiGLU)
    WValue,  # [N, K] strided (ACT_SWIGLU): the value rows
    Bias,  # [N], or [2N] (gate then value) for SwiGLU (HAS_BIAS)
    Residual,  # [M, N] strided (HAS_RESIDUAL)
    Out,  # [M, N] contiguous
    PreAct,  # [M, N] (or [M, 2N]: gate then value for SwiGLU) contiguous, dtype of Out: z = prologue(A) Wᵀ + bias
    Mean,  # [M] fp32 (NORM_LAYER)
    Rstd,  # [M] fp32 (NORM != NORM_NONE)
    NormWeight,  # [K] (NORM != NORM_NONE)
    NormBias,  # [K] (HAS_NORM_BIAS)
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_wn,
    stride_wk,
    stride_vn,
    stride_vk,
    stride_rm,
    stride_rn,
    NORM: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SAVE_PRE_ACT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    act_cols=0,  # PARTIAL_ACT: the activation applies to the output columns < act_cols only
    PARTIAL_ACT: tl.constexpr = False,
):
    offs_m, offs_n, rows_valid, cols_valid = _output_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    rows64 = offs_m.to(tl.int64)
    cols64 = offs_n.to(tl.int64)
    a_ptrs = A + rows64[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = W + cols64[:, None] * stride_wn + offs_k[None, :] * stride_wk
    v_ptrs = WValue + cols64[:, None] * stride_vn + offs_k[None, :] * stride_vk
    mean, rstd = _load_row_stats(Mean, Rstd, offs_m, rows_valid, NORM, BLOCK_M)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_value = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # SwiGLU's value tile, beside the gate's
    for k0 in range(0, K, BLOCK_K):
        a = _load_a_tile(
            a_ptrs, rows_valid, k0 + offs_k, K, mean, rstd, NormWeight, NormBias, W.dtype.element_ty, NORM,
            HAS_NORM_BIAS,
        )  # fmt: skip
        w_mask = cols_valid[:, None] & ((k0 + offs_k) < K)[None, :]
        acc = tl.dot(a, tl.trans(tl.load(w_ptrs, mask=w_mask, other=0.0)), acc, input_precision=INPUT_PRECISION)
        if ACTIVATION == ACT_SWIGLU:
            v = tl.load(v_ptrs, mask=w_mask, other=0.0)
            acc_value = tl.dot(a, tl.trans(v), acc_value, input_precision=INPUT_PRECISION)
            v_ptrs += BLOCK_K * stride_vk
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    _fwd_epilogue(
        acc, acc_value, offs_m, offs_n, rows_valid, cols_valid, N, Bias, Residual, Out, PreAct, stride_rm, stride_rn,
        act_cols, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, SAVE_PRE_ACT, PARTIAL_ACT,
    )  # fmt: skip


@triton.jit
def linear_fwd_tma_kernel(
    A, W, WValue, Bias, Residual, Out, PreAct, Mean, Rstd, NormWeight, NormBias,
    M, N, K, stride_am, stride_ak, stride_wn, stride_wk, stride_vn, stride_vk, stride_rm, stride_rn,
    NORM: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, SAVE_PRE_ACT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    act_cols=0, PARTIAL_ACT: tl.constexpr = False,
):  # fmt: skip
    """:func:`linear_fwd_kernel` (the same arguments, the same prologue, dots and epilogue) for Hopper: persistent,
    ``min(#SMs, #tiles)`` programs each looping over the output tiles in the same grouped order, and the A, W (and
    WValue) tiles loaded through device-side tensor descriptors (TMA), zero-filled outside [M, K] / [N, K]. The
    launcher checks what TMA needs (``tma_forward_reason``): unit last strides (stride_ak, stride_wk, stride_vk are
    1 and unused here), 16-byte aligned bases and row strides; the descriptors need ``triton.set_allocator``."""
    a_desc = tl.make_tensor_descriptor(A, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(W, shape=[N, K], strides=[stride_wn, 1], block_shape=[BLOCK_N, BLOCK_K])
    if ACTIVATION == ACT_SWIGLU:
        v_desc = tl.make_tensor_descriptor(WValue, [N, K], [stride_vn, 1], [BLOCK_N, BLOCK_K])
    offs_k = tl.arange(0, BLOCK_K)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m, offs_n, rows_valid, cols_valid = _tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
        mean, rstd = _load_row_stats(Mean, Rstd, offs_m, rows_valid, NORM, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_value = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = _normalise_a_tile(
                a_desc.load([pid_m * BLOCK_M, k0]), rows_valid, k0 + offs_k, K, mean, rstd, NormWeight, NormBias,
                W.dtype.element_ty, NORM, HAS_NORM_BIAS,
            )  # fmt: skip
            acc = tl.dot(a, tl.trans(w_desc.load([pid_n * BLOCK_N, k0])), acc, input_precision=INPUT_PRECISION)
            if ACTIVATION == ACT_SWIGLU:
                value = v_desc.load([pid_n * BLOCK_N, k0])
                acc_value = tl.dot(a, tl.trans(value), acc_value, input_precision=INPUT_PRECISION)
        _fwd_epilogue(
            acc, acc_value, offs_m, offs_n, rows_valid, cols_valid, N, Bias, Residual, Out, PreAct, stride_rm,
            stride_rn, act_cols, HAS_BIAS, ACTIVATION, HAS_RESIDUAL, SAVE_PRE_ACT, PARTIAL_ACT,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Backward. dz = dout * act'(z) is formed from the output gradient and the saved pre-activation tile by tile.


@triton.jit
def linear_bwd_input_kernel(
    GradOut,  # [M, N] contiguous
    PreAct,  # [M, N] ([M, 2N] for SwiGLU) contiguous (ACTIVATION != none)
    W,  # [N, K] strided (the gate rows for SwiGLU)
    WValue,  # [N, K] strided (ACT_SWIGLU)
    GradA,  # [M, K] contiguous out: dÂ = dz @ W (the gradient of the norm's output with a prologue)
    M,
    N,
    K,
    stride_wn,
    stride_wk,
    stride_vn,
    stride_vk,
    ACTIVATION: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # the reduction tile
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    act_cols=0,  # PARTIAL_ACT: the forward's activation covered the output columns < act_cols only
    PARTIAL_ACT: tl.constexpr = False,
):
    offs_m, offs_k, rows_valid, k_valid = _output_tile(M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_n = tl.arange(0, BLOCK_N)
    rows64 = offs_m.to(tl.int64)
    grad_offsets = rows64[:, None] * N + offs_n[None, :]
    if ACTIVATION == ACT_SWIGLU:  # z [M, 2N]: gate then value
        pre_offsets = rows64[:, None] * (2 * N) + offs_n[None, :]
    w_ptrs = W + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
    v_ptrs = WValue + offs_n.to(tl.int64)[:, None] * stride_vn + offs_k[None, :] * stride_vk

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        n_valid = (n0 + offs_n) < N
        mask = rows_valid[:, None] & n_valid[None, :]
        w_mask = n_valid[:, None] & k_valid[None, :]
        if ACTIVATION == ACT_SWIGLU:
            dz, dz_value = _grad_swiglu(GradOut + grad_offsets, PreAct + pre_offsets, PreAct + pre_offsets + N, mask)
            v = tl.load(v_ptrs, mask=w_mask, other=0.0)
            acc = tl.dot(dz_value.to(W.dtype.element_ty), v, acc, input_precision=INPUT_PRECISION)
            v_ptrs += BLOCK_N * stride_vn
            pre_offsets += BLOCK_N
        else:  # z has dout's layout: one offset tile for both
            dz = _grad_pre_activation(
                GradOut + grad_offsets, PreAct + grad_offsets, mask, ACTIVATION, n0 + offs_n, act_cols, PARTIAL_ACT
            )
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        acc = tl.dot(dz.to(W.dtype.element_ty), w, acc, input_precision=INPUT_PRECISION)
        grad_offsets += BLOCK_N
        w_ptrs += BLOCK_N * stride_wn
    grad_ptrs = GradA + rows64[:, None] * K + offs_k[None, :]
    tl.store(grad_ptrs, acc.to(GradA.dtype.element_ty), mask=rows_valid[:, None] & k_valid[None, :])


@triton.jit
def linear_bwd_weight_kernel(
    GradOut,  # [M, N] contiguous
    PreAct,  # [M, N] ([M, 2N] for SwiGLU) contiguous (ACTIVATION != none)
    A,  # [M, K] strided (the norm's input with a prologue)
    Mean,  # [M] fp32 (NORM_LAYER)
    Rstd,  # [M] fp32 (NORM != NORM_NONE)
    NormWeight,  # [K] (NORM != NORM_NONE)
    NormBias,  # [K] (HAS_NORM_BIAS)
    GradW,  # [SPLIT_K, R, K] contiguous out, R = N (2N for SwiGLU: gate rows then value rows): dzᵀ @ prologue(A)
    GradBias,  # [SPLIT_K, R] out (HAS_BIAS): Σ_M dz, written by the programs of the first K tile
    M,
    N,
    K,
    stride_am,
    stride_ak,
    NORM: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    SPLIT_K: tl.constexpr,  # slices of the M reduction, one per grid row: fp32 partials the host sums (1: direct)
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,  # the reduction tile
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # groups of N tiles here
    act_cols=0,  # PARTIAL_ACT: the forward's activation covered the output columns < act_cols only
    PARTIAL_ACT: tl.constexpr = False,
):
    pid_n, pid_k = _tile_coords(tl.program_id(0), N, K, BLOCK_N, BLOCK_K, GROUP_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    cols_valid = offs_n < N
    # This program's slice of the reduction over M: whole BLOCK_M steps, the slices in order.
    split = tl.program_id(1)
    rows_per_split = tl.cdiv(tl.cdiv(M, SPLIT_K), BLOCK_M) * BLOCK_M
    m_start = split * rows_per_split
    m_end = min(M, m_start + rows_per_split)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    grad_bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if ACTIVATION == ACT_SWIGLU:  # the value rows' accumulators
        acc_value = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        grad_bias_value = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        rows = m0 + offs_m
        rows_valid = rows < m_end
        rows64 = rows.to(tl.int64)
        mask = rows_valid[:, None] & cols_valid[None, :]
        grad_offsets = rows64[:, None] * N + offs_n[None, :]
        if ACTIVATION == ACT_SWIGLU:
            pre_ptrs = PreAct + rows64[:, None] * (2 * N) + offs_n[None, :]
            dz, dz_value = _grad_swiglu(GradOut + grad_offsets, pre_ptrs, pre_ptrs + N, mask)
        else:  # z has dout's layout: one offset tile for both
            dz = _grad_pre_activation(
                GradOut + grad_offsets, PreAct + grad_offsets, mask, ACTIVATION, offs_n, act_cols, PARTIAL_ACT
            )
        mean, rstd = _load_row_stats(Mean, Rstd, rows, rows_valid, NORM, BLOCK_M)
        a_ptrs = A + rows64[:, None] * stride_am + offs_k[None, :] * stride_ak
        a = _load_a_tile(
            a_ptrs, rows_valid, offs_k, K, mean, rstd, NormWeight, NormBias, A.dtype.element_ty, NORM, HAS_NORM_BIAS
        )
        acc = tl.dot(tl.trans(dz.to(A.dtype.element_ty)), a, acc, input_precision=INPUT_PRECISION)
        if ACTIVATION == ACT_SWIGLU:
            acc_value = tl.dot(tl.trans(dz_value.to(A.dtype.element_ty)), a, acc_value, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            grad_bias += tl.sum(dz, 0)
            if ACTIVATION == ACT_SWIGLU:
                grad_bias_value += tl.sum(dz_value, 0)
    rows_out = 2 * N if ACTIVATION == ACT_SWIGLU else N  # rows of GradW / entries of GradBias per split
    k_valid = offs_k < K
    out_mask = cols_valid[:, None] & k_valid[None, :]
    grad_ptrs = GradW + split * rows_out * K + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(grad_ptrs, acc.to(GradW.dtype.element_ty), mask=out_mask)
    if ACTIVATION == ACT_SWIGLU:
        tl.store(grad_ptrs + N * K, acc_value.to(GradW.dtype.element_ty), mask=out_mask)
    if HAS_BIAS:  # every K tile summed the same dz: the first one stores it
        bias_ptrs = GradBias + split * rows_out + offs_n
        tl.store(bias_ptrs, grad_bias.to(GradBias.dtype.element_ty), mask=cols_valid & (pid_k == 0))
        if ACTIVATION == ACT_SWIGLU:
            tl.store(bias_ptrs + N, grad_bias_value.to(GradBias.dtype.element_ty), mask=cols_valid & (pid_k == 0))


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
    # The persistent TMA forward (linear_fwd_tma_kernel): Hopper only (no 80 entry: the launcher never runs it there).
    # Not yet measured on a GPU: the pointer forward's sm_90 tiles, spill-free for this kernel too.
    "fwd_tma": {
        90: [(128, 128, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4), (128, 64, 64, 8, 4, 4)],
        "fp32": _FP32,
    },
}
# SwiGLU keeps two accumulators (gate and value) and, backward, three input tiles (dout, gate, value) and two
# weight tiles per step: smaller tiles than the single-activation kernels, each spill-free on its arch at EVA02-B's
# fc1 (RMSNorm prologue, 768 -> 2x2048); e.g. the forward's 128x128x64 spills 72 B on sm_90a, 128x128x32 does not.
CONFIGS_SWIGLU = {
    "fwd": {
        90: [(128, 64, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4), (128, 128, 32, 8, 8, 3)],
        80: [(128, 64, 32, 8, 8, 3), (64, 128, 32, 8, 8, 3), (64, 64, 32, 8, 4, 4)],
        "fp32": _FP32,
    },
    "input": {
        90: [(128, 64, 64, 8, 8, 3), (64, 128, 64, 8, 8, 3)],
        80: [(128, 64, 32, 8, 8, 3), (64, 64, 32, 8, 4, 4)],
        "fp32": _FP32,
    },
    "weight": {
        90: [(32, 128, 64, 8, 8, 3), (32, 64, 64, 8, 4, 4)],
        80: [(64, 64, 32, 8, 8, 3), (32, 64, 32, 8, 4, 4)],
        "fp32": _FP32,
    },
    # The TMA forward holds a little more per thread than the pointer one (the persistent loop's state): its 4-warp
    # 64x128x64 and 8-warp 128x128x32 spill 28-64 B on sm_90a at EVA02-B's fc1, the 8-warp 64x128x64 does not.
    "fwd_tma": {
        90: [(128, 64, 64, 8, 8, 3), (64, 128, 64, 8, 8, 3), (64, 64, 64, 8, 4, 4)],
        "fp32": _FP32,
    },
}
INTERPRETER_CONFIG = (16, 128, 128, 4, 4, 1)  # few, wide tiles: the interpreter pays per op, not per element
# Programs of the persistent TMA forward under the interpreter (on a GPU: the SM count): few enough that small test
# shapes give each program several tiles to loop over.
INTERPRETER_PERSISTENT_PROGRAMS = 2
STATS_BLOCK_M = 16
STATS_BLOCK_K = 128
# Split-K of the weight gradient (the host's choice, ``fastvit.ops.triton.linear_launch.weight_split_k``): when the
# [N, K] tiles of dW fill fewer than the GPU's SMs (skinny dW of a small batch: K = tokens is the long axis), the
# M reduction is cut into up to SPLIT_K_MAX slices of at least SPLIT_K_MIN_ROWS rows each, one grid row per slice.
SPLIT_K_MAX = 16
SPLIT_K_MIN_ROWS = 512
