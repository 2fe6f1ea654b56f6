"""Triton kernels of the fused patch embedding (``fastvit.ops.patch_embed``): image -> [B, T+N, D] tokens.

The projection is a GEMM over an *implicit* im2col: the [rows, K] patch matrix (K = Cin·PH·PW) is never
materialised; each tile is gathered from the image by its strides (NCHW, channels_last or any view) and fed to
``tl.dot`` with an fp32 accumulator. The blocked-matmul structure follows Triton's tutorial
03-matrix-multiplication; everything else (the row space, the epilogue, the backward split) is fastvit's.

Notation: B batch, Cin channels, H×W image, PH×PW patch, grid GH×GW = (H/PH)×(W/PW), N = GH·GW patch tokens,
T prefix (class / register) tokens, L = T+N output tokens, D embedding dim, K = Cin·PH·PW.

Kernels (launched from ``fastvit/ops/triton/patch_embed.py``):
  ``patch_embed_fwd_kernel``            tokens = [prefix | im2col(x)·Wᵀ + bias] + pos_embed, one launch. The GEMM
                                        row space is the output's B·L token rows; prefix rows load no pixels
                                        and take the class/register token instead of the projection.
  ``patch_embed_norm_fwd_kernel``       tokens = [prefix | Norm(im2col(x)·Wᵀ + bias)] + pos_embed (LayerNorm or
                                        RMSNorm over D, timm's ``PatchEmbed(norm_layer=...)``: AIMv2): a full-row
                                        epilogue, each program owning BLOCK_M rows and all of D in two passes.
  ``patch_embed_bwd_input_kernel``      dX = dY·W over the B·N patch rows, scattered back by strides.
  ``patch_embed_bwd_weight_kernel``     dW = dYᵀ·im2col(x), split over the B·N rows (partials or atomics).
  ``patch_embed_bwd_colsum_kernel``     S[l, :] = Σ_b dY[b, l, :]; dpos, dcls, dbias are slices/sums of S.

The uint8 input path (``NORMALIZE``) converts each gathered pixel as ``x·scale[c] + shift[c]`` in fp32, with
``scale = 1/(255·std)`` and ``shift = -mean/std`` (torchvision's ``Normalize(mean, std)`` of ``x / 255``, up to
fp32 rounding), before the cast to the GEMM dtype. At most 4 channels on this path (scalar arguments, so that
no tensor has to be built per call and the launch stays CUDA-graph capturable).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _patch_index(
    ks,  # [BLOCK_K] int32: reduction indices in [0, K)
    IN_CHANS: tl.constexpr, PATCH_H: tl.constexpr, PATCH_W: tl.constexpr, CHANNELS_INNER: tl.constexpr,
):  # fmt: skip
    """(channel, row in patch, column in patch) of each reduction index.

    The order of K is free (image and weight are indexed by the same triple): channel-outermost for NCHW
    images (each patch row is PW contiguous pixels), channel-innermost for channels_last images (each patch
    row is PW·Cin contiguous values).
    """
    if CHANNELS_INNER:
        c = ks % IN_CHANS
        kw = (ks // IN_CHANS) % PATCH_W
        kh = ks // (IN_CHANS * PATCH_W)
    else:
        kw = ks % PATCH_W
        kh = (ks // PATCH_W) % PATCH_H
        c = ks // (PATCH_H * PATCH_W)
    return c, kh, kw


@triton.jit
def _to_gemm_dtype(t, GEMM_DTYPE: tl.constexpr):
    """``t`` cast to the GEMM input dtype: 0 fp32, 1 fp16, 2 bf16."""
    if GEMM_DTYPE == 1:
        t = t.to(tl.float16)
    elif GEMM_DTYPE == 2:
        t = t.to(tl.bfloat16)
    else:
        t = t.to(tl.float32)
    return t


@triton.jit
def _row_and_column_block(num_columns, BLOCK_C: tl.constexpr):
    """(row block, column block) of this program in a 1-D grid whose column blocks run fastest."""
    pid = tl.program_id(0)
    num_column_blocks = tl.cdiv(num_columns, BLOCK_C)
    return pid // num_column_blocks, pid % num_column_blocks


@triton.jit
def _patch_row_offsets(rows, T, N, GRID_W, sdb, sdl, sxb, sxh, sxw, PATCH_H: tl.constexpr, PATCH_W: tl.constexpr):
    """For patch rows in [0, B·N): the offset of each row's token gradient (token T + n of image b) and of its
    patch's origin pixel in the image."""
    b = rows // N
    n = rows % N
    dy_row = b.to(tl.int64) * sdb + (n + T).to(tl.int64) * sdl
    x_row = b.to(tl.int64) * sxb + ((n // GRID_W) * PATCH_H).to(tl.int64) * sxh
    return dy_row, x_row + ((n % GRID_W) * PATCH_W).to(tl.int64) * sxw


@triton.jit
def _load_patches(
    x_ptr,  # [B, Cin, H, W] image (any strides), float or uint8
    x_row,  # [BLOCK_M] int64: offset of each row's patch origin (b, ph·PH, pw·PW)
    row_mask,  # [BLOCK_M] bool: rows that are patch rows (else the tile row is 0)
    c,  # [BLOCK_K] int32 channel of each reduction index
    kh,  # [BLOCK_K] int32 row within the patch
    kw,  # [BLOCK_K] int32 column within the patch
    k_mask,  # [BLOCK_K] bool: reduction indices < K
    sxc, sxh, sxw,
    scale0, scale1, scale2, scale3,
    shift0, shift1, shift2, shift3,
    NORMALIZE: tl.constexpr,
):  # fmt: skip
    """A [BLOCK_M, BLOCK_K] tile of im2col(x), in fp32 when NORMALIZE (uint8 input), else in x's dtype."""
    x_col = c.to(tl.int64) * sxc + kh.to(tl.int64) * sxh + kw.to(tl.int64) * sxw
    mask = row_mask[:, None] & k_mask[None, :]
    tile = tl.load(x_ptr + x_row[:, None] + x_col[None, :], mask=mask, other=0)
    if NORMALIZE:
        scale = tl.where(c == 0, scale0, tl.where(c == 1, scale1, tl.where(c == 2, scale2, scale3)))
        shift = tl.where(c == 0, shift0, tl.where(c == 1, shift1, tl.where(c == 2, shift2, shift3)))
        tile = tile.to(tl.float32) * scale[None, :] + shift[None, :]
        tile = tl.where(mask, tile, 0.0)  # masked pixels must contribute 0, not `shift`
    return tile


@triton.jit
def _token_rows(
    pid_m, num_rows, T, L, GRID_W, sxb, sxh, sxw, PATCH_H: tl.constexpr, PATCH_W: tl.constexpr, BLOCK_M: tl.constexpr
):  # fmt: skip
    """Row block ``pid_m`` of the [B·L, D] output: (rows, row_valid, token index within the image, is-a-patch-row,
    offset of each patch row's origin pixel in the image)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # token rows of the [B·L, D] output
    row_valid = rows < num_rows
    b = rows // L
    tok = rows % L  # token index within the image
    is_patch = tok >= T
    n = tl.where(is_patch, tok - T, 0)
    ph = n // GRID_W
    pw = n % GRID_W
    x_row = b.to(tl.int64) * sxb + (ph * PATCH_H).to(tl.int64) * sxh + (pw * PATCH_W).to(tl.int64) * sxw
    return rows, row_valid, tok, is_patch, x_row


@triton.jit
def _projection_tile(
    x_ptr, w_ptr, bias_ptr,
    x_row,  # [BLOCK_M] int64: offset of each row's patch origin
    load_rows,  # [BLOCK_M] bool: rows that gather pixels (valid patch rows)
    ds,  # [BLOCK_D] int32: output columns
    d_mask,  # [BLOCK_D] bool: ds < D
    K,
    sxc, sxh, sxw,
    swd, swc, swh, sww,
    s_bias,
    scale0, scale1, scale2, scale3,
    shift0, shift1, shift2, shift3,
    IN_CHANS: tl.constexpr, PATCH_H: tl.constexpr, PATCH_W: tl.constexpr, CHANNELS_INNER: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """im2col(x)·Wᵀ + bias for one [BLOCK_M, BLOCK_D] tile, fp32 (rows outside ``load_rows``: the bias alone)."""
    w_row = ds.to(tl.int64) * swd

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        c, kh, kw = _patch_index(ks, IN_CHANS, PATCH_H, PATCH_W, CHANNELS_INNER)
        a = _load_patches(
            x_ptr, x_row, load_rows, c, kh, kw, k_mask, sxc, sxh, sxw,
            scale0, scale1, scale2, scale3, shift0, shift1, shift2, shift3, NORMALIZE,
        )  # fmt: skip
        w_col = c.to(tl.int64) * swc + kh.to(tl.int64) * swh + kw.to(tl.int64) * sww
        w = tl.load(w_ptr + w_row[None, :] + w_col[:, None], mask=k_mask[:, None] & d_mask[None, :], other=0)
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)

    # Epilogue, all in fp32, one rounding at the store.
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ds * s_bias, mask=d_mask, other=0).to(tl.float32)
        acc += bias[None, :]
    return acc


@triton.jit
def _prefix_and_position(
    acc,  # [BLOCK_M, BLOCK_D] fp32: the patch rows' values
    pos_ptr, cls_ptr,
    row_valid, tok, is_patch, ds, d_mask,
    T, POS_OFFSET,
    spos_l, spos_d,
    scls_t, scls_d,
    HAS_POS: tl.constexpr, HAS_PREFIX: tl.constexpr,
):  # fmt: skip
    """``acc`` with the prefix rows replaced by their class/register token and the position embedding added."""
    if HAS_PREFIX:
        # Prefix rows loaded no pixels (acc = bias there): they take their class/register token instead.
        t = tl.where(is_patch, 0, tok)
        cls_mask = (row_valid & ~is_patch)[:, None] & d_mask[None, :]
        cls = tl.load(cls_ptr + t[:, None] * scls_t + ds[None, :] * scls_d, mask=cls_mask, other=0)
        acc = tl.where(is_patch[:, None], acc, cls.to(tl.float32))
    if HAS_POS:
        pos_row = tok - POS_OFFSET  # < 0 for prefix rows under no_embed_class: no position embedding
        pos_mask = (row_valid & (pos_row >= 0))[:, None] & d_mask[None, :]
        pos_row = tl.where(pos_row >= 0, pos_row, 0)
        pos = tl.load(pos_ptr + pos_row[:, None] * spos_l + ds[None, :] * spos_d, mask=pos_mask, other=0)
        acc += pos.to(tl.float32)
    return acc


@triton.jit
def patch_embed_fwd_kernel(
    x_ptr,  # [B, Cin, H, W] image, strides (sxb, sxc, sxh, sxw): float, or uint8 when NORMALIZE
    w_ptr,  # [D, Cin, PH, PW] projection weight, strides (swd, swc, swh, sww); its dtype is the GEMM dtype
    bias_ptr,  # [D] bias, stride s_bias (read only when HAS_BIAS)
    pos_ptr,  # [1, Lp, D] position embedding, strides (spos_l, spos_d); row l - POS_OFFSET (read when HAS_POS)
    cls_ptr,  # [1, T, D] prefix tokens, strides (scls_t, scls_d) (read only when HAS_PREFIX)
    out_ptr,  # [B, L, D] tokens, contiguous
    num_rows,  # B·L output rows
    T,  # prefix tokens per image
    L,  # T + N tokens per image
    D,
    K,  # Cin·PH·PW
    GRID_W,  # patches per image row
    POS_OFFSET,  # 0: pos_embed covers all L tokens; T: patch tokens only (timm's no_embed_class)
    sxb, sxc, sxh, sxw,
    swd, swc, swh, sww,
    s_bias,
    spos_l, spos_d,
    scls_t, scls_d,
    scale0, scale1, scale2, scale3,
    shift0, shift1, shift2, shift3,
    IN_CHANS: tl.constexpr, PATCH_H: tl.constexpr, PATCH_W: tl.constexpr, CHANNELS_INNER: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_PREFIX: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # 1-D grid, D-blocks fastest: the programs sharing one row block (one gather of image tiles) run together.
    pid_m, pid_d = _row_and_column_block(D, BLOCK_D)
    rows, row_valid, tok, is_patch, x_row = _token_rows(
        pid_m, num_rows, T, L, GRID_W, sxb, sxh, sxw, PATCH_H, PATCH_W, BLOCK_M
    )
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = ds < D
    acc = _projection_tile(
        x_ptr, w_ptr, bias_ptr, x_row, row_valid & is_patch, ds, d_mask, K, sxc, sxh, sxw, swd, swc, swh, sww,
        s_bias, scale0, scale1, scale2, scale3, shift0, shift1, shift2, shift3,
        IN_CHANS, PATCH_H, PATCH_W, CHANNELS_INNER, NORMALIZE, HAS_BIAS, INPUT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_K,
    )  # fmt: skip
    acc = _prefix_and_position(
        acc, pos_ptr, cls_ptr, row_valid, tok, is_patch, ds, d_mask, T, POS_OFFSET, spos_l, spos_d, scls_t, scls_d,
        HAS_POS, HAS_PREFIX,
    )  # fmt: skip
    out_offsets = rows.to(tl.int64)[:, None] * D + ds[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


# Norm codes of patch_embed_norm_fwd_kernel (constexpr), as kernels/linear.py's NORM_LAYER / NORM_RMS.
NORM_LAYER = tl.constexpr(1)  # (z - mean) * rstd * weight (+ bias), rstd = 1 / sqrt(biased var + eps)
NORM_RMS = tl.constexpr(2)  # z * rstd * weight, rstd = 1 / sqrt(mean(z²) + eps)


@triton.jit
def patch_embed_norm_fwd_kernel(
    x_ptr,  # [B, Cin, H, W] image, strides (sxb, sxc, sxh, sxw): float, or uint8 when NORMALIZE
    w_ptr,  # [D, Cin, PH, PW] projection weight, strides (swd, swc, swh, sww); its dtype is the GEMM dtype
    bias_ptr,  # [D] bias, stride s_bias (read only when HAS_BIAS)
    pos_ptr,  # [1, Lp, D] position embedding, strides (spos_l, spos_d) (read when HAS_POS)
    cls_ptr,  # [1, T, D] prefix tokens, strides (scls_t, scls_d) (read only when HAS_PREFIX)
    norm_w_ptr,  # [D] norm weight, stride s_norm_w
    norm_b_ptr,  # [D] LayerNorm bias, stride s_norm_b (read only when HAS_NORM_BIAS)
    out_ptr,  # [B, L, D] tokens, contiguous
    z_ptr,  # SAVE: [B, N, D] contiguous, GEMM dtype: the pre-norm patch tokens z; else out_ptr (z kept in place)
    mean_ptr,  # [B·N] fp32 out (SAVE and NORM_LAYER): each patch row's mean
    rstd_ptr,  # [B·N] fp32 out (SAVE): each patch row's 1 / sqrt(var + eps) (RMSNorm: 1 / sqrt(mean(z²) + eps))
    num_rows, T, L, D, K, GRID_W, POS_OFFSET,  # as patch_embed_fwd_kernel's
    eps,  # the norm's epsilon
    sxb, sxc, sxh, sxw,
    swd, swc, swh, sww,
    s_bias,
    spos_l, spos_d,
    scls_t, scls_d,
    s_norm_w, s_norm_b,
    scale0, scale1, scale2, scale3,
    shift0, shift1, shift2, shift3,
    IN_CHANS: tl.constexpr, PATCH_H: tl.constexpr, PATCH_W: tl.constexpr, CHANNELS_INNER: tl.constexpr,
    NORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_PREFIX: tl.constexpr,
    NORM: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, SAVE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # A norm needs its whole row of D: one program per BLOCK_M rows walks every D tile, twice.
    # Pass 1: each tile's GEMM + bias z, rounded to the GEMM dtype (the eager conv's output, which the norm reads),
    # stored (to z, or in place in the output rows) and summed into fp32 row statistics. Pass 2: reload the tiles
    # this program just wrote (L2-hot), normalise, add the position embedding (prefix rows: their token), store.
    rows, row_valid, tok, is_patch, x_row = _token_rows(
        tl.program_id(0), num_rows, T, L, GRID_W, sxb, sxh, sxw, PATCH_H, PATCH_W, BLOCK_M
    )
    load_rows = row_valid & is_patch
    if SAVE:
        z_rows = (rows // L).to(tl.int64) * (L - T) + tl.where(is_patch, tok - T, 0)  # row b·N + n of z
    else:
        z_rows = rows.to(tl.int64)
    shift = tl.zeros((BLOCK_M,), dtype=tl.float32)  # LayerNorm: the first tile's mean, so the sums are centred
    centred_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        acc = _projection_tile(
            x_ptr, w_ptr, bias_ptr, x_row, load_rows, ds, d_mask, K, sxc, sxh, sxw, swd, swc, swh, sww,
            s_bias, scale0, scale1, scale2, scale3, shift0, shift1, shift2, shift3,
            IN_CHANS, PATCH_H, PATCH_W, CHANNELS_INNER, NORMALIZE, HAS_BIAS, INPUT_PRECISION, BLOCK_M, BLOCK_D, BLOCK_K,
        )  # fmt: skip
        z = acc.to(w_ptr.dtype.element_ty)
        mask = load_rows[:, None] & d_mask[None, :]
        tl.store(z_ptr + z_rows[:, None] * D + ds[None, :], z.to(z_ptr.dtype.element_ty), mask=mask)
        z = tl.where(mask, z.to(tl.float32), 0.0)
        if NORM == NORM_LAYER:
            if d0 == 0:
                shift = tl.sum(z, 1) / tl.minimum(D, BLOCK_D)
            z = tl.where(mask, z - shift[:, None], 0.0)
            centred_sum += tl.sum(z, 1)
        squares += tl.sum(z * z, 1)
    if NORM == NORM_LAYER:
        centred_mean = centred_sum / D
        mean = shift + centred_mean
        rstd = 1.0 / tl.sqrt(tl.maximum(squares / D - centred_mean * centred_mean, 0.0) + eps)
    else:
        mean = shift  # 0: RMSNorm does not centre
        rstd = 1.0 / tl.sqrt(squares / D + eps)
    if SAVE:
        tl.store(rstd_ptr + z_rows, rstd, mask=load_rows)
        if NORM == NORM_LAYER:
            tl.store(mean_ptr + z_rows, mean, mask=load_rows)
    tl.debug_barrier()  # pass 2 reads z elements other threads of this program stored

    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        z = tl.load(z_ptr + z_rows[:, None] * D + ds[None, :], mask=load_rows[:, None] & d_mask[None, :], other=0)
        weight = tl.load(norm_w_ptr + ds * s_norm_w, mask=d_mask, other=0).to(tl.float32)
        acc = (z.to(tl.float32) - mean[:, None]) * rstd[:, None] * weight[None, :]
        if HAS_NORM_BIAS:
            acc += tl.load(norm_b_ptr + ds * s_norm_b, mask=d_mask, other=0).to(tl.float32)[None, :]
        acc = _prefix_and_position(
            acc, pos_ptr, cls_ptr, row_valid, tok, is_patch, ds, d_mask, T, POS_OFFSET, spos_l, spos_d,
            scls_t, scls_d, HAS_POS, HAS_PREFIX,
        )  # fmt: skip
        out_offsets = rows.to(tl.int64)[:, None] * D + ds[None, :]
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


@triton.jit
def patch_embed_bwd_input_kernel(
    dy_ptr,  # [B, L, D] gradient of the tokens, strides (sdb, sdl, sdd)
    w_ptr,  # [D, Cin, PH, PW] projection weight, strides (swd, swc, swh, sww); its dtype is the GEMM dtype
    dx_ptr,  # [B, Cin, H, W] gradient of the image, strides (sxb, sxc, sxh, sxw): every element written once
    num_rows,  # B·N patch rows
    T, N, D, K, GRID_W,
    sdb, sdl, sdd,
    swd, swc, swh, sww,
    sxb, sxc, sxh, sxw,
    IN_CHANS: tl.constexpr, PATCH_H: tl.constexpr, PATCH_W: tl.constexpr, CHANNELS_INNER: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # Patches do not overlap: each (patch row, k) owns one pixel, so the scatter needs no atomics.
    pid_m, pid_k = _row_and_column_block(K, BLOCK_K)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # patch rows in [0, B·N)
    row_mask = rows < num_rows
    dy_row, x_row = _patch_row_offsets(rows, T, N, GRID_W, sdb, sdl, sxb, sxh, sxw, PATCH_H, PATCH_W)

    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    c, kh, kw = _patch_index(ks, IN_CHANS, PATCH_H, PATCH_W, CHANNELS_INNER)
    w_col = c.to(tl.int64) * swc + kh.to(tl.int64) * swh + kw.to(tl.int64) * sww

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        dy = tl.load(
            dy_ptr + dy_row[:, None] + ds[None, :].to(tl.int64) * sdd, mask=row_mask[:, None] & d_mask[None, :], other=0
        )
        w = tl.load(
            w_ptr + ds.to(tl.int64)[:, None] * swd + w_col[None, :], mask=d_mask[:, None] & k_mask[None, :], other=0
        )
        acc = tl.dot(dy.to(w.dtype), w, acc, input_precision=INPUT_PRECISION)

    x_col = c.to(tl.int64) * sxc + kh.to(tl.int64) * sxh + kw.to(tl.int64) * sxw
    tl.store(
        dx_ptr + x_row[:, None] + x_col[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=row_mask[:, None] & k_mask[None, :],
    )


@triton.jit
def patch_embed_bwd_weight_kernel(
    dy_ptr,  # [B, L, D] gradient of the tokens, strides (sdb, sdl, sdd)
    x_ptr,  # [B, Cin, H, W] image, strides (sxb, sxc, sxh, sxw): float, or uint8 when NORMALIZE
    dw_ptr,  # [SPLIT, D, Cin·PH·PW] contiguous: fp32 partial sums (ATOMIC: [D, K] fp32, zeroed; SPLIT=1: any dtype)
    num_rows,  # B·N patch rows
    rows_per_split,  # multiple of BLOCK_M: rows reduced by one program along grid axis 1
    T, N, D, K, GRID_W,
    sdb, sdl, sdd,
    sxb, sxc, sxh, sxw,
    scale0, scale1, scale2, scale3,
    shift0, shift1, shift2, shift3,
    IN_CHANS: tl.constexpr, PATCH_H: tl.constexpr, PATCH_W: tl.constexpr, CHANNELS_INNER: tl.constexpr,
    NORMALIZE: tl.constexpr, ATOMIC: tl.constexpr,
    GEMM_DTYPE: tl.constexpr,  # the forward's GEMM dtype (the weight's): 0 fp32, 1 fp16, 2 bf16
    INPUT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # dW[d, k] = Σ_rows dY[row, d] · im2col(x)[row, k]. Grid axis 0: (D-block, K-block) tiles, K fastest;
    # axis 1: the split of the B·N rows. Each program sums its rows in a fixed order; the splits are combined
    # by the host in a fixed order (deterministic) or by fp32 atomics (ATOMIC, order-dependent).
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_k_blocks = tl.cdiv(K, BLOCK_K)
    pid_d = pid // num_k_blocks
    pid_k = pid % num_k_blocks

    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = ds < D
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    c, kh, kw = _patch_index(ks, IN_CHANS, PATCH_H, PATCH_W, CHANNELS_INNER)

    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, num_rows)
    acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        dy_row, x_row = _patch_row_offsets(rows, T, N, GRID_W, sdb, sdl, sxb, sxh, sxw, PATCH_H, PATCH_W)
        dy = tl.load(
            dy_ptr + dy_row[:, None] + ds[None, :].to(tl.int64) * sdd, mask=row_mask[:, None] & d_mask[None, :], other=0
        )
        a = _load_patches(
            x_ptr, x_row, row_mask, c, kh, kw, k_mask, sxc, sxh, sxw,
            scale0, scale1, scale2, scale3, shift0, shift1, shift2, shift3, NORMALIZE,
        )  # fmt: skip
        a = _to_gemm_dtype(a, GEMM_DTYPE)
        dy = _to_gemm_dtype(dy, GEMM_DTYPE)
        acc = tl.dot(tl.trans(dy), a, acc, input_precision=INPUT_PRECISION)

    # Store in the weight's own [D, Cin, PH, PW] order whatever the order of K used above.
    k_canonical = c * (PATCH_H * PATCH_W) + kh * PATCH_W + kw
    offsets = ds.to(tl.int64)[:, None] * K + k_canonical[None, :]
    mask = d_mask[:, None] & k_mask[None, :]
    if ATOMIC:
        tl.atomic_add(dw_ptr + offsets, acc, mask=mask)
    else:
        tl.store(dw_ptr + split.to(tl.int64) * D * K + offsets, acc.to(dw_ptr.dtype.element_ty), mask=mask)


@triton.jit
def patch_embed_bwd_colsum_kernel(
    dy_ptr,  # [B, L, D] gradient of the tokens, strides (sdb, sdl, sdd)
    sum_ptr,  # [L, D] fp32, contiguous: Σ_b dY[b, l, :]
    B,
    D,
    sdb, sdl, sdd,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One program per (token, D-block); the batch is summed in a fixed order (elementwise over BLOCK_B-row
    # slabs, then one tree reduction): deterministic, no atomics.
    tok = tl.program_id(0)
    pid_d = tl.program_id(1)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = ds < D
    base = dy_ptr + tok.to(tl.int64) * sdl + ds[None, :].to(tl.int64) * sdd
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        bs = b0 + tl.arange(0, BLOCK_B)
        tile = tl.load(base + bs.to(tl.int64)[:, None] * sdb, mask=(bs < B)[:, None] & d_mask[None, :], other=0)
        acc += tile.to(tl.float32)
    tl.store(sum_ptr + tok.to(tl.int64) * D + ds, tl.sum(acc, axis=0), mask=d_mask)
