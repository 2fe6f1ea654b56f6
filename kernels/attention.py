"""Fused multi-head attention (forward and backward) in Triton, FlashAttention-2 style.

The algorithm is FlashAttention-2 (Tri Dao, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", 2023) as laid out in Triton's fused-attention tutorial
(python/tutorials/06-fused-attention.py): online softmax with a running max in fp32, exp2 on
log2(e)-scaled scores, only the per-row log-sum-exp saved for the backward, and a backward that
recomputes the probabilities block by block. The code here is our own; the differences that matter
for fastvit:

- q, k, v, out and their gradients are addressed through four strides each ([B, H, N, D] order), so
  the kernels read q/k/v straight out of the packed qkv Linear output ``[B, N, 3, H, D]`` and write
  the output as ``[B, N, H*D]`` (and the gradients into one ``[B, N, 3*C]`` buffer): no permutes.
- Any token count: masked loads and masked stores at the ragged tail, no padding copies. The key
  loop runs over the full key blocks without masks and finishes with one masked block.
- Head dims 32..128 in steps of 8: the tile is ``BLOCK_D`` = next power of two, and the columns
  past ``HEAD_DIM`` are masked (loaded as zeros, never stored); or, where that wastes columns (40, 72, 88, 104,
  112), the head dim runs as up to three power-of-two pieces (``D1``/``D2`` constexprs; 72 = 64 + 16 with 8
  columns masked, 112 = 64 + 32 + 16): see ``_piece_ptrs`` and ``head_dim_pieces``. Odd multiples of 8 also get
  ``STRIDE_ALIGN`` (see ``_aligned``), without which their strides defeat vectorised loads and pipelining.
- 1-D grid of ``num_blocks * B * H`` programs (no 65535 limit on B*H); batch/head and block offsets
  are int64 before they meet a stride, tile-local offsets stay int32.
- Packed variable-length sequences (``VARLEN``: cu_seqlens, programs per (sequence, block), as flash-attn's
  varlen kernels) and key-padding masks (``KEY_MASK``) are constexpr switches on the same kernels, with trailing
  arguments whose defaults leave the plain path's compiled code unchanged.
- The backward has no atomics: one kernel owns dK/dV of a key block (looping over query blocks),
  another owns dQ of a query block (looping over key blocks). Every gradient element is written by
  one program in a fixed order, so gradients are bit-identical run to run, always.
- An optional prologue (constexpr-switched, off by default: the plain kernels compile as without it): qk-norm
  (LayerNorm / RMSNorm over the head dim) then RoPE applied to every q and k tile as it is loaded, and its
  backward (transposed rotation, norm backward, norm-weight gradient partials) applied to dQ / dK before they
  are stored. No normalised or rotated copy of q or k is written. See ``_prologue``.

The launchers (grid, strides, allocation, autotuning) are in ``fastvit/ops/attention.py``; the
spec is ``fastvit.reference.attention``. The block-size configurations tried by the autotuner are
listed at the bottom of this file.
"""

from __future__ import annotations

import itertools

import triton
import triton.language as tl

# Globals read inside @triton.jit functions must be tl.constexpr (compiled kernels reject plain floats).
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2):   log(x) == log2(x) * LN2


# ------------------------------------------------------------------------------------------------
# Tile helpers: a [ROWS, width] tile of columns offs_d whose rows may run past the sequence (MASK_ROWS) and whose
# columns run past HEAD_DIM when the tile's end column END > HEAD_DIM. Masked elements load as 0 and are not stored.
# The plain tile is columns 0..BLOCK_D (END = BLOCK_D); a head dim split in pieces (see ``head_dim_pieces``) loads
# each piece as its own tile, at columns START..START + width (``_piece_ptrs``), END = START + width.


@triton.jit
def _load_tile(ptrs, rows_valid, offs_d, HEAD_DIM: tl.constexpr, END: tl.constexpr, MASK_ROWS: tl.constexpr):
    if MASK_ROWS:
        if END <= HEAD_DIM:
            tile = tl.load(ptrs, mask=rows_valid[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows_valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if END <= HEAD_DIM:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _store_tile(ptrs, value, rows_valid, offs_d, HEAD_DIM: tl.constexpr, END: tl.constexpr):
    if END <= HEAD_DIM:
        tl.store(ptrs, value, mask=rows_valid[:, None])
    else:
        tl.store(ptrs, value, mask=rows_valid[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _block_rows(X, b, h, start, offs, offs_d, stride_b, stride_h, stride_n, stride_d):
    """Row pointers [ROWS, 1] and tile pointers [ROWS, BLOCK_D] of rows ``start + offs`` of head (b, h) of the
    strided [B, H, N, D] tensor ``X`` (``start`` goes through int64 before it meets its stride)."""
    rows = X + b * stride_b + h * stride_h + start.to(tl.int64) * stride_n
    rows = rows + offs[:, None] * stride_n
    return rows, rows + offs_d[None, :] * stride_d


@triton.jit
def _piece_ptrs(row_ptrs, stride_d, START: tl.constexpr, WIDTH: tl.constexpr):
    """([ROWS, WIDTH] pointers to columns START..START + WIDTH of the rows ``row_ptrs`` [ROWS, 1] points at, those
    columns [WIDTH])."""
    cols = START + tl.arange(0, WIDTH)
    return row_ptrs + cols[None, :] * stride_d, cols


# Head-dim pieces (forward; D1 > 0 or D2 > 0, see ``head_dim_pieces``): the first piece is the plain BLOCK_D tile at
# columns 0..BLOCK_D, the second D1 columns from BLOCK_D, the third D2 columns from BLOCK_D + D1, the last masked
# past HEAD_DIM. q kᵀ sums one tl.dot per piece into the same scores; p v runs one tl.dot per piece into one
# accumulator per piece. With D1 = D2 = 0 (the default) none of this is compiled.


@triton.jit
def _piece_setup(res_rows, a_rows, b_rows, stride_res_d, stride_a_d, stride_b_d, rows_valid, HEAD_DIM: tl.constexpr,
                 START: tl.constexpr, WIDTH: tl.constexpr):  # fmt: skip
    """One more head-dim piece of a program: (the piece [ROWS, WIDTH] of its resident tile, pointers to the pieces
    [STREAMED_ROWS, WIDTH] of the two tiles its loop streams, the piece's columns). ``*_rows``: [rows, 1] row
    pointers of the resident tile and of the two streamed ones."""
    res = _load_piece(res_rows, stride_res_d, rows_valid, HEAD_DIM, START, WIDTH)
    a_ptrs, cols = _piece_ptrs(a_rows, stride_a_d, START, WIDTH)
    b_ptrs, _ = _piece_ptrs(b_rows, stride_b_d, START, WIDTH)
    return res, a_ptrs, b_ptrs, cols


@triton.jit
def _pieces_setup(res_rows, a_rows, b_rows, stride_res_d, stride_a_d, stride_b_d, rows_valid, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):  # fmt: skip
    """``_piece_setup`` of the second and the third piece, each four values None where its width is 0."""
    res1, a1_ptrs, b1_ptrs, cols1 = None, None, None, None
    res2, a2_ptrs, b2_ptrs, cols2 = None, None, None, None
    if D1 > 0:
        res1, a1_ptrs, b1_ptrs, cols1 = _piece_setup(
            res_rows, a_rows, b_rows, stride_res_d, stride_a_d, stride_b_d, rows_valid, HEAD_DIM, BLOCK_D, D1
        )
    if D2 > 0:
        res2, a2_ptrs, b2_ptrs, cols2 = _piece_setup(
            res_rows, a_rows, b_rows, stride_res_d, stride_a_d, stride_b_d, rows_valid, HEAD_DIM, BLOCK_D + D1, D2
        )
    return res1, a1_ptrs, b1_ptrs, cols1, res2, a2_ptrs, b2_ptrs, cols2


@triton.jit
def _load_pieces(row_ptrs, stride_d, rows_valid, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, D1: tl.constexpr,
                 D2: tl.constexpr):  # fmt: skip
    """The second and third pieces of the tile at rows ``row_ptrs`` [ROWS, 1] (None where the width is 0)."""
    piece1, piece2 = None, None
    if D1 > 0:
        piece1 = _load_piece(row_ptrs, stride_d, rows_valid, HEAD_DIM, BLOCK_D, D1)
    if D2 > 0:
        piece2 = _load_piece(row_ptrs, stride_d, rows_valid, HEAD_DIM, BLOCK_D + D1, D2)
    return piece1, piece2


@triton.jit
def _piece_zeros(ROWS: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """Zeroed fp32 accumulators [ROWS, D1] and [ROWS, D2] for the second and third pieces (None where 0 wide)."""
    acc1, acc2 = None, None
    if D1 > 0:
        acc1 = tl.zeros([ROWS, D1], dtype=tl.float32)
    if D2 > 0:
        acc2 = tl.zeros([ROWS, D2], dtype=tl.float32)
    return acc1, acc2


@triton.jit
def _advance_pieces(a1_ptrs, b1_ptrs, a2_ptrs, b2_ptrs, step_a, step_b, D1: tl.constexpr, D2: tl.constexpr):
    """The streamed pieces' pointers moved on by one loop step (``step_a`` / ``step_b`` elements)."""
    if D1 > 0:
        a1_ptrs += step_a
        b1_ptrs += step_b
    if D2 > 0:
        a2_ptrs += step_a
        b2_ptrs += step_b
    return a1_ptrs, b1_ptrs, a2_ptrs, b2_ptrs


@triton.jit
def _load_piece(row_ptrs, stride_d, rows_valid, HEAD_DIM: tl.constexpr, START: tl.constexpr, WIDTH: tl.constexpr):
    """The [ROWS, WIDTH] piece at columns START.. of rows ``row_ptrs`` [ROWS, 1] (missing rows as 0)."""
    ptrs, cols = _piece_ptrs(row_ptrs, stride_d, START, WIDTH)
    return _load_tile(ptrs, rows_valid, cols, HEAD_DIM, START + WIDTH, True)


@triton.jit
def _store_piece(row_ptrs, stride_d, value, rows_valid, HEAD_DIM: tl.constexpr, START: tl.constexpr,
                 WIDTH: tl.constexpr):  # fmt: skip
    """Store ``value`` [ROWS, WIDTH] at columns START.. of rows ``row_ptrs`` [ROWS, 1] (valid rows, columns below
    HEAD_DIM)."""
    ptrs, cols = _piece_ptrs(row_ptrs, stride_d, START, WIDTH)
    _store_tile(ptrs, value, rows_valid, cols, HEAD_DIM, START + WIDTH)


@triton.jit
def _store_pieces(row_ptrs, stride_d, acc1, acc2, scale, rows_valid, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  D1: tl.constexpr, D2: tl.constexpr):  # fmt: skip
    """Store the second and third pieces' fp32 accumulators times ``scale`` (a scalar or [ROWS, 1]) in the dtype of
    the tile at rows ``row_ptrs`` [ROWS, 1]."""
    if D1 > 0:
        piece1 = (acc1 * scale).to(row_ptrs.dtype.element_ty)
        _store_piece(row_ptrs, stride_d, piece1, rows_valid, HEAD_DIM, BLOCK_D, D1)
    if D2 > 0:
        piece2 = (acc2 * scale).to(row_ptrs.dtype.element_ty)
        _store_piece(row_ptrs, stride_d, piece2, rows_valid, HEAD_DIM, BLOCK_D + D1, D2)


@triton.jit
def _piece_dot_t(acc, a, b_ptrs, b_valid, cols, HEAD_DIM: tl.constexpr, END: tl.constexpr, MASK_B: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):  # fmt: skip
    """(acc + a bᵀ, b): one more piece's term of a product over the head dim (q kᵀ, k qᵀ, v dOᵀ, dO vᵀ), with the
    piece b [B_ROWS, width] loaded here from ``b_ptrs`` and returned for the caller's other products."""
    b = _load_tile(b_ptrs, b_valid, cols, HEAD_DIM, END, MASK_B)
    return tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION), b


@triton.jit
def _piece_pv(acc, alpha, p, v_ptrs, keys_valid, cols, HEAD_DIM: tl.constexpr, END: tl.constexpr,
              MASK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr):  # fmt: skip
    """One piece's running sum of p v [BLOCK_M, width] fp32, rescaled by ``alpha`` then accumulated."""
    v = _load_tile(v_ptrs, keys_valid, cols, HEAD_DIM, END, MASK_N)
    return acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)


@triton.jit
def _pieces_dot_t(acc, a1, a2, b1_ptrs, b2_ptrs, b_valid, cols1, cols2, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  MASK_B: tl.constexpr, INPUT_PRECISION: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):  # fmt: skip
    """(acc + the second and third pieces' a bᵀ terms, the b pieces loaded for them): ``_piece_dot_t`` of every piece
    past the first (None where a width is 0)."""
    b1, b2 = None, None
    if D1 > 0:
        acc, b1 = _piece_dot_t(acc, a1, b1_ptrs, b_valid, cols1, HEAD_DIM, BLOCK_D + D1, MASK_B, INPUT_PRECISION)
    if D2 > 0:
        acc, b2 = _piece_dot_t(acc, a2, b2_ptrs, b_valid, cols2, HEAD_DIM, BLOCK_D + D1 + D2, MASK_B, INPUT_PRECISION)
    return acc, b1, b2


@triton.jit
def _pieces_accumulate(acc1, acc2, w, x1, x2, INPUT_PRECISION: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """The second and third pieces' accumulators plus w x (``w`` [ROWS, STREAMED_ROWS] fp32, cast to x's dtype)."""
    if D1 > 0:
        acc1 += tl.dot(w.to(x1.dtype), x1, input_precision=INPUT_PRECISION)
    if D2 > 0:
        acc2 += tl.dot(w.to(x2.dtype), x2, input_precision=INPUT_PRECISION)
    return acc1, acc2


@triton.jit
def _key_block_scores(
    q,  # [BLOCK_M, BLOCK_D] the query tile (after its prologue)
    k_ptrs,  # [BLOCK_N, BLOCK_D] pointers to the key tile
    v_ptrs,  # [BLOCK_N, BLOCK_D] pointers to the value tile
    start_n,
    N_KV,
    offs_n,
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr,  # this key block runs past N_KV
    INPUT_PRECISION: tl.constexpr,
    stride_kd,  # the key prologue's arguments (see _prologue)
    Rope,
    stride_rope_n,
    NUM_PREFIX,
    KW,
    KB,
    k_eps,
    ROPE: tl.constexpr,
    K_NORM: tl.constexpr,
    keep_ptrs,  # [BLOCK_N] pointers into the key-padding mask (KEY_MASK only)
    KEY_MASK: tl.constexpr,
    q1, q2, k1_ptrs, k2_ptrs, cols1, cols2,  # the head-dim pieces past the first (see _pieces_setup)
    D1: tl.constexpr,
    D2: tl.constexpr,
):  # fmt: skip
    """What a query-owning program (the forward, dQ) reads of one key block: (which keys count, the key tile after
    its prologue, the value tile, the key tile's further pieces, the raw scores q kᵀ [BLOCK_M, BLOCK_N] fp32)."""
    keys_valid = (start_n + offs_n) < N_KV
    if KEY_MASK:
        keys_valid = keys_valid & (tl.load(keep_ptrs + start_n, mask=keys_valid, other=0) != 0)
    k = _load_prologued(
        k_ptrs, stride_kd, start_n + offs_n, keys_valid, offs_d, Rope, stride_rope_n, NUM_PREFIX, KW, KB, k_eps,
        HEAD_DIM, BLOCK_D, MASK_N, ROPE, K_NORM,
    )  # fmt: skip
    v = _load_tile(v_ptrs, keys_valid, offs_d, HEAD_DIM, BLOCK_D, MASK_N)
    qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
    qk, k1, k2 = _pieces_dot_t(
        qk, q1, q2, k1_ptrs, k2_ptrs, keys_valid, cols1, cols2, HEAD_DIM, BLOCK_D, MASK_N, INPUT_PRECISION, D1, D2
    )
    return keys_valid, k, v, k1, k2, qk


# Stride alignment, STRIDE_ALIGN > 1: Triton specialises an int argument as divisible by 16 when it is, and nothing
# weaker, so with a head dim that is an odd multiple of 8 (40, 56, 72, 88, 104, 120) the packed qkv's head and token
# strides (multiples of 8, not of 16) leave the compiler without any alignment for the tile pointers: element-wise
# loads, no asynchronous copies, no software pipelining, and spilled registers. The launcher checks that every
# stride is a multiple of STRIDE_ALIGN (8: 16 bytes of 16-bit data) and passes it; ``x // A * A`` (exact then)
# states the divisibility in a form the compiler's alignment analysis reads. STRIDE_ALIGN = 1 compiles nothing.


@triton.jit
def _aligned(stride_b, stride_h, stride_n, STRIDE_ALIGN: tl.constexpr):
    """The batch, head and token strides of one tensor, known to the compiler as multiples of STRIDE_ALIGN."""
    return (
        stride_b // STRIDE_ALIGN * STRIDE_ALIGN,
        stride_h // STRIDE_ALIGN * STRIDE_ALIGN,
        stride_n // STRIDE_ALIGN * STRIDE_ALIGN,
    )


@triton.jit
def _program_coords(num_blocks, H):
    """1-D program id -> (block index, batch index, head index); batch/head as int64."""
    pid = tl.program_id(0)
    block = pid % num_blocks
    pid_bh = (pid // num_blocks).to(tl.int64)
    return block, pid_bh // H, pid_bh % H


# Variable-length (packed) sequences, VARLEN=True: q/k/v/out and the gradients are [1, H, T, D] strided views of the
# packed [T, 3, H, D] buffer (T tokens back to back, N_Q = N_KV = T), sequence s owns tokens cu_seqlens[s] to
# cu_seqlens[s + 1], and Lse/Delta are [H, T]. The grid has cdiv(max_seqlen, BLOCK) blocks per (sequence, head), as
# flash-attn's varlen kernels: a program past its sequence's end returns after reading two int32 (no host sync; the
# grid depends on max_seqlen and B alone, so a CUDA graph can replay it). A kernel then shifts its base pointers to
# the sequence's first token, sets b = 0 and N_Q = N_KV = the sequence's length, and runs the plain code unchanged;
# with VARLEN=False nothing of this is compiled. With the prologue the RoPE table is the packed one ([T - NUM_PREFIX,
# 2·D], ``fastvit.packing.packed_rope_table``: row g - NUM_PREFIX rotates token g): shifted by the sequence's first
# token like the tensors, the plain code's local row r - NUM_PREFIX lands on row g - NUM_PREFIX, and every sequence's
# first NUM_PREFIX tokens stay unrotated. The norm-weight gradient partials get one row of slots per (sequence, head),
# cdiv(max_seqlen, NORM_GRAD_ROWS) slots each (see ``_store_norm_grad``).


@triton.jit
def _varlen_coords(num_blocks, H, Cu_seqlens):
    """1-D program id -> (block index, sequence index, head index, first token of the sequence as int64, its length)."""
    block, seq, h = _program_coords(num_blocks, H)
    start = tl.load(Cu_seqlens + seq)
    length = tl.load(Cu_seqlens + seq + 1) - start
    return block, seq, h, start.to(tl.int64), length


@triton.jit
def _varlen_stats_shift(h, tokens, seq_start, length):
    """Lse/Delta pointer shift for the plain addressing ``(b * H + h) * N_Q + row`` (b = 0, N_Q = ``length``) to land
    on row ``seq_start + row`` of head ``h`` in the [H, T] layout (T = ``tokens``)."""
    return h * (tokens - length) + seq_start


# Key-padding mask, KEY_MASK=True ([B, N_KV] uint8, nonzero = keep; the padded NaFlex layout): masked keys get
# score -inf (P = 0). Key loops stop after each batch's last kept key, so trailing padding (where NaFlex puts it)
# costs no key block; a dK/dV program whose keys are all past it writes zeros without visiting a query. Rows with
# no kept key at all give output 0 (lse = +inf), as the spec.


@triton.jit
def _key_mask_setup(KeyKeep, KeyExtent, b, N_KV, offs_n):
    """(pointers to batch ``b``'s mask row at ``offs_n``, the number of keys the loops visit: up to its last kept
    one)."""
    return KeyKeep + b * N_KV + offs_n, tl.load(KeyExtent + b)


# ------------------------------------------------------------------------------------------------
# Prologue: qk-norm then RoPE applied to q and k tiles as they are loaded (timm's order), and its backward applied
# to dq/dk before they are stored. Switched by constexprs (ROPE: 0 none, 1 interleaved pairs (2i, 2i+1), 2
# rotate-half pairs (i, i + D/2); Q_NORM / K_NORM: 0 none, 1 LayerNorm, 2 RMSNorm over the head dim): with all three
# 0 no prologue code is compiled. RoPE of channel c: y[c] = n[c]·cos[c] + sign[c]·n[p(c)]·sin[c], p(c) the partner
# column and sign -1 on the first of each pair (``fastvit.reference.apply_rope``); the table row of token t is
# t - NUM_PREFIX (prefix tokens are not rotated). Rotation and norm are computed in fp32 and the result rounded once
# to the tile's dtype. Ideas from flash-attention's rotary kernel and Liger-Kernel's rope; the code is ours.
# Partner columns: where the pairs are a register tile's own (interleaved always; rotate-half when HEAD_DIM == BLOCK_D)
# rot(y) is built in registers (``_rope_rotated``: tl.reshape to [ROWS, D/2, 2] or [ROWS, 2, D/2] + tl.permute,
# tl.split, tl.join back), so neither a second load of the partner columns nor the norm of that partner tile is live
# next to the tile, sin and cos; rotate-half with a padded tile (HEAD_DIM < BLOCK_D) still loads the partners
# (``_rope_partner``). sin and cos stay full-width fp32 tables (learned and per-head tables have per-column values).
# The dK/dV kernel stores dV before dK's prologue backward (the accumulator is dead there).
# Registers (ptxas -v, ahead-of-time compiles: ``python -m fastvit.kernels.resources --kernel attention``, Triton 3.8,
# sm_90a, bf16, tf32 flag, HEAD_DIM = BLOCK_D, the cases of resources.PROLOGUE_CASES, 5 prefix tokens, fp32 table);
# "regs/spill B" per thread. Before (the partner-load prologue with the plain lists):
#   fwd D=64 rope-half+LN: 0-1952 B (only (128, 64, 8, 2) clean); interleaved 0-1204 B; RMSNorm 0-256 B;
#       D=128 LN 0-332 B.
#   dK/dV D=64 rope-half+LN: 120-1096 B (every config); interleaved 0-336 B; RMSNorm 0-16 B; D=128 LN 40-1244 B (all).
#   dQ D=64 rope-half+LN: 60-1408 B (every config); interleaved 0-516 B; RMSNorm 0; D=128 LN 56-524 B (all).
# Same configs with the register rotation (and dV first): fwd (128, 64, 4, 3) rope-half+LN 1952 -> 584 B,
# interleaved 1204 -> 104 B; dQ (64, 64, 4, 3) rope-half+LN 1408 -> 504 B, (128, 32, 8, 3) 60 -> 0; dK/dV
# (32, 64, 4, 3) rope-half+LN 796 -> 0, (64, 64, 8, 3) 120 -> 0, D=128 LN (32, 64, 8, 2) 40 -> 0. The 4-warp tiles with
# 64+ streamed rows still spill at D = 64 with rope-half+LN, so prologue launches get ``PROLOGUE_CONFIGS`` (sm_90),
# all of which compile without spills (65 launches; test_resources checks it):
#   fwd D=64: rope-half+LN 172-220 regs, +varlen 172-220, interleaved 142-187, RMSNorm 134-179; D=128 LN 221-255.
#   dK/dV D=64: rope-half+LN 190-244, +varlen 194-248, interleaved 126-203, RMSNorm 134-215; D=128 LN 231-250.
#   dQ D=64: rope-half+LN 216-255, +varlen 218-251, interleaved 130-199, RMSNorm 124-193; D=128 LN 239-252.
# Not covered: sm_80 (the plain lists, unchecked with a prologue), fp16, ROPE_GRAD, per-head tables, head dims other
# than 64 and 128.
ROPE_INTERLEAVED = tl.constexpr(1)
ROPE_HALF = tl.constexpr(2)
NORM_LAYER = tl.constexpr(1)
NORM_RMS = tl.constexpr(2)
# The norm-weight gradient partials are written per slot of NORM_GRAD_ROWS rows (every tile size is a multiple), so
# that the partial buffer does not depend on the tile size the autotuner picks: see ``_store_norm_grad``.
NORM_GRAD_ROWS = tl.constexpr(16)


@triton.jit
def _rope_partner(offs_d, HEAD_DIM: tl.constexpr, ROPE: tl.constexpr):
    """The partner column p(c) of each column c and the sign of ``rot(x)[c] = sign[c]·x[p(c)]``; the padded columns
    (c >= HEAD_DIM) are their own partners."""
    if ROPE == ROPE_INTERLEAVED:
        partner = offs_d ^ 1
        sign = tl.where((offs_d % 2) == 0, -1.0, 1.0)
    else:
        first = offs_d < HEAD_DIM // 2
        partner = tl.where(first, offs_d + HEAD_DIM // 2, offs_d - HEAD_DIM // 2)
        sign = tl.where(first, -1.0, 1.0)
    partner = tl.where(offs_d < HEAD_DIM, partner, offs_d)
    return partner, sign


@triton.jit
def _rope_sin_cos(Rope, stride_rope_n, rows, rows_valid, offs_d, NUM_PREFIX, HEAD_DIM: tl.constexpr):
    """sin, cos [ROWS, BLOCK_D] fp32 of tokens ``rows`` from the cat(sin, cos) table [N - NUM_PREFIX, 2·HEAD_DIM]
    (unit stride along columns); prefix tokens, missing rows and padded columns get sin 0, cos 1 (no rotation)."""
    mask = (rows_valid & (rows >= NUM_PREFIX))[:, None] & (offs_d[None, :] < HEAD_DIM)
    table_rows = tl.maximum(rows - NUM_PREFIX, 0).to(tl.int64)
    ptrs = Rope + table_rows[:, None] * stride_rope_n + offs_d[None, :]
    sin = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(ptrs + HEAD_DIM, mask=mask, other=1.0).to(tl.float32)
    return sin, cos


@triton.jit
def _rope_halves(x, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr):
    """(a, b) [ROWS, BLOCK_D / 2]: the first and second column of every RoPE pair of x [ROWS, BLOCK_D], split in
    registers (interleaved: columns 2i, 2i+1; rotate-half with HEAD_DIM == BLOCK_D: columns i, i + D/2)."""
    if ROPE == ROPE_INTERLEAVED:
        pairs = tl.reshape(x, [x.shape[0], BLOCK_D // 2, 2])
    else:
        pairs = tl.permute(tl.reshape(x, [x.shape[0], 2, BLOCK_D // 2]), (0, 2, 1))
    return tl.split(pairs)


@triton.jit
def _rope_join(a, b, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr):
    """The [ROWS, BLOCK_D] tile whose pairs' first columns are ``a`` and second ``b`` (``_rope_halves``' inverse)."""
    pairs = tl.join(a, b)
    if ROPE != ROPE_INTERLEAVED:
        pairs = tl.permute(pairs, (0, 2, 1))
    return tl.reshape(pairs, [a.shape[0], BLOCK_D])


@triton.jit
def _rope_rotated(y, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr):
    """rot(y) [ROWS, BLOCK_D]: rot(y)[c] = sign[c]·y[p(c)] (see ``_rope_partner``), the partner columns of the register
    tile y taken in registers by splitting its pairs (interleaved always; rotate-half where HEAD_DIM == BLOCK_D)."""
    a, b = _rope_halves(y, HEAD_DIM, BLOCK_D, ROPE)
    return _rope_join(-b, a, HEAD_DIM, BLOCK_D, ROPE)


@triton.jit
def _norm_stats(x, offs_d, eps, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr):
    """Row mean (0 for RMSNorm) and 1/sqrt(var + eps) of x [ROWS, BLOCK_D] fp32 over its HEAD_DIM columns, and
    x̂ = (x - mean)·rstd (0 on the padded columns)."""
    if NORM == NORM_LAYER:
        mean = tl.sum(x, 1) / HEAD_DIM
        centred = x - mean[:, None]
        if BLOCK_D != HEAD_DIM:
            centred = tl.where(offs_d[None, :] < HEAD_DIM, centred, 0.0)
    else:
        mean = tl.sum(x, 1) * 0.0
        centred = x
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 1) / HEAD_DIM + eps)
    return mean, rstd, centred * rstd[:, None]


@triton.jit
def _norm_apply(xhat, W, Bias, cols, HEAD_DIM: tl.constexpr, NORM: tl.constexpr):
    """x̂·w (+ b for LayerNorm) with the weights of columns ``cols`` (0 past HEAD_DIM); x̂ [ROWS, BLOCK_D] fp32."""
    valid = cols < HEAD_DIM
    y = xhat * tl.load(W + cols, mask=valid, other=0.0).to(tl.float32)[None, :]
    if NORM == NORM_LAYER:
        y += tl.load(Bias + cols, mask=valid, other=0.0).to(tl.float32)[None, :]
    return y


@triton.jit
def _prologue(
    x,  # [ROWS, BLOCK_D] the raw q or k tile, as loaded from ptrs
    ptrs,  # [ROWS, BLOCK_D] its pointers (the partner columns are loaded through them)
    stride_d,
    rows,  # [ROWS] token indices
    rows_valid,
    offs_d,
    Rope,  # [N - NUM_PREFIX, 2·HEAD_DIM] cat(sin, cos), or None when ROPE == 0
    stride_rope_n,
    NUM_PREFIX,
    W,  # [HEAD_DIM] norm weight, or None when NORM == 0
    Bias,  # [HEAD_DIM] norm bias (LayerNorm), or None
    eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    ROPE: tl.constexpr,
    NORM: tl.constexpr,
):
    """The tile attention uses: rope(norm(x)), in x's dtype. Missing rows come out as the norm's bias (callers mask
    them as they mask the plain path's zero rows)."""
    y = x.to(tl.float32)
    if NORM != 0:
        mean, rstd, xhat = _norm_stats(y, offs_d, eps, HEAD_DIM, BLOCK_D, NORM)
        y = _norm_apply(xhat, W, Bias, offs_d, HEAD_DIM, NORM)
    if ROPE == ROPE_INTERLEAVED or (ROPE == ROPE_HALF and HEAD_DIM == BLOCK_D):  # pairs split in registers
        sin, cos = _rope_sin_cos(Rope, stride_rope_n, rows, rows_valid, offs_d, NUM_PREFIX, HEAD_DIM)
        y = y * cos + _rope_rotated(y, HEAD_DIM, BLOCK_D, ROPE) * sin
    elif ROPE != 0:
        partner, sign = _rope_partner(offs_d, HEAD_DIM, ROPE)
        partner_ptrs = ptrs + ((partner - offs_d) * stride_d)[None, :]
        y_partner = _load_tile(partner_ptrs, rows_valid, offs_d, HEAD_DIM, BLOCK_D, MASK_ROWS).to(tl.float32)
        if NORM != 0:
            xhat_partner = (y_partner - mean[:, None]) * rstd[:, None]
            y_partner = _norm_apply(xhat_partner, W, Bias, partner, HEAD_DIM, NORM)
        sin, cos = _rope_sin_cos(Rope, stride_rope_n, rows, rows_valid, offs_d, NUM_PREFIX, HEAD_DIM)
        y = y * cos + sign[None, :] * y_partner * sin
    return y.to(x.dtype)


@triton.jit
def _load_prologued(
    ptrs, stride_d, rows, rows_valid, offs_d, Rope, stride_rope_n, NUM_PREFIX, W, Bias, eps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr, ROPE: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    """A q or k tile loaded from ``ptrs`` with its prologue applied (see ``_prologue``; the plain load without one)."""
    x = _load_tile(ptrs, rows_valid, offs_d, HEAD_DIM, BLOCK_D, MASK_ROWS)
    if ROPE != 0 or NORM != 0:
        x = _prologue(
            x, ptrs, stride_d, rows, rows_valid, offs_d, Rope, stride_rope_n, NUM_PREFIX, W, Bias, eps,
            HEAD_DIM, BLOCK_D, MASK_ROWS, ROPE, NORM,
        )  # fmt: skip
    return x


@triton.jit
def _prologue_backward(
    g,  # [ROWS, BLOCK_D] fp32: gradient w.r.t. the tile _prologue returned
    x,  # [ROWS, BLOCK_D] the raw tile
    rows,
    rows_valid,
    offs_d,
    Rope,
    stride_rope_n,
    NUM_PREFIX,
    W,
    Bias,
    eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROPE: tl.constexpr,
    NORM: tl.constexpr,
):
    """(gradient w.r.t. x [ROWS, BLOCK_D] fp32, this tile's row sums of the norm weight and bias gradients
    [BLOCK_D] fp32 each: zero without a norm or for RMSNorm's bias). The rotation's backward is its transpose:
    dn[c] = g[c]·cos[c] - sign[c]·(g·sin)[p(c)]; the partner columns of a register tile come from ``tl.gather``."""
    if ROPE == ROPE_INTERLEAVED or (ROPE == ROPE_HALF and HEAD_DIM == BLOCK_D):  # pairs split in registers
        sin, cos = _rope_sin_cos(Rope, stride_rope_n, rows, rows_valid, offs_d, NUM_PREFIX, HEAD_DIM)
        g = g * cos - _rope_rotated(g * sin, HEAD_DIM, BLOCK_D, ROPE)
    elif ROPE != 0:
        partner, sign = _rope_partner(offs_d, HEAD_DIM, ROPE)
        sin, cos = _rope_sin_cos(Rope, stride_rope_n, rows, rows_valid, offs_d, NUM_PREFIX, HEAD_DIM)
        g_sin = g * sin
        g = g * cos - sign[None, :] * tl.gather(g_sin, tl.broadcast_to(partner[None, :], g_sin.shape), 1)
    dw = tl.sum(g, 0) * 0.0
    db = dw
    if NORM != 0:
        mean, rstd, xhat = _norm_stats(x.to(tl.float32), offs_d, eps, HEAD_DIM, BLOCK_D, NORM)
        g_valid = tl.where(rows_valid[:, None], g, 0.0)  # missing rows carry garbage gradients: keep them out
        dw = tl.sum(g_valid * xhat, 0)
        if NORM == NORM_LAYER:
            db = tl.sum(g_valid, 0)
        g_w = g * tl.load(W + offs_d, mask=offs_d < HEAD_DIM, other=0.0).to(tl.float32)[None, :]
        g = g_w - xhat * (tl.sum(g_w * xhat, 1) / HEAD_DIM)[:, None]
        if NORM == NORM_LAYER:
            g -= (tl.sum(g_w, 1) / HEAD_DIM)[:, None]
        g = g * rstd[:, None]
    return g, dw, db


@triton.jit
def _store_norm_grad(
    NormGrad,  # [B·H, cdiv(SLOT_ROWS, NORM_GRAD_ROWS), 2, HEAD_DIM] fp32: per-slot partial weight / bias gradients
    bh,  # this program's row of slots: b * H + h (VARLEN: sequence * H + h)
    start,  # first row of this program's tile
    N,  # rows of the sequence: slots past cdiv(N, NORM_GRAD_ROWS) are not written
    slot_rows,  # rows each (batch or sequence, head) has slots for: N (VARLEN: max_seqlen)
    dw,  # [BLOCK_D] fp32 partial weight gradient of the tile
    db,  # [BLOCK_D] fp32 partial bias gradient
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    """Write the tile's partials into its first slot and zeros into the other slots it covers: every slot of the
    sequence is written by exactly one program whatever the tile size, so the host's sum over slots is deterministic
    and never sees a slot left over from another config the autotuner tried (VARLEN: the host zeroes the slots past
    each sequence's end, which no program covers)."""
    offs_s = tl.arange(0, BLOCK_ROWS // NORM_GRAD_ROWS)
    slots = start // NORM_GRAD_ROWS + offs_s
    first = (offs_s == 0)[:, None]
    row = bh * tl.cdiv(slot_rows, NORM_GRAD_ROWS)
    ptrs = NormGrad + (row + slots.to(tl.int64))[:, None] * (2 * HEAD_DIM) + offs_d[None, :]
    mask = (slots < tl.cdiv(N, NORM_GRAD_ROWS))[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.store(ptrs, tl.where(first, dw[None, :], 0.0), mask=mask)
    tl.store(ptrs + HEAD_DIM, tl.where(first, db[None, :], 0.0), mask=mask)


@triton.jit
def _store_rope_grad(
    g, x, rows, rows_valid, offs_d, RopeGrad, stride_rg_n, NUM_PREFIX, W, Bias, eps,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr, NORM: tl.constexpr,
):  # fmt: skip
    """The RoPE table's gradient at this tile's rows (past the prefix): with n = norm(x) and y = n·cos + sign·n[p]·sin,
    dsin = g·sign·n[p] and dcos = g·n, stored fp32 into this (batch or sequence, head)'s [rows, 2·D] slab of
    ``RopeGrad`` (``g``: the gradient w.r.t. y). Every row is one program's: the host sums the slabs."""
    n = x.to(tl.float32)
    if NORM != 0:
        _, _, xhat = _norm_stats(n, offs_d, eps, HEAD_DIM, BLOCK_D, NORM)
        n = _norm_apply(xhat, W, Bias, offs_d, HEAD_DIM, NORM)
    partner, sign = _rope_partner(offs_d, HEAD_DIM, ROPE)
    n_partner = tl.gather(n, tl.broadcast_to(partner[None, :], n.shape), 1)
    table_rows = rows - NUM_PREFIX
    keep = (rows_valid & (table_rows >= 0))[:, None] & (offs_d[None, :] < HEAD_DIM)
    ptrs = RopeGrad + table_rows.to(tl.int64)[:, None] * stride_rg_n + offs_d[None, :]
    tl.store(ptrs, g * sign[None, :] * n_partner, mask=keep)
    tl.store(ptrs + HEAD_DIM, g * n, mask=keep)


@triton.jit
def _prologue_grad(
    g,  # [ROWS, BLOCK_D] fp32: gradient w.r.t. the tile _prologue returned
    x_ptrs,  # [ROWS, BLOCK_D] pointers to the raw tile
    start,  # first row of the tile
    offs,  # [ROWS] row offsets within the tile
    rows_valid,
    offs_d,
    Rope,
    stride_rope_n,
    NUM_PREFIX,
    W,
    Bias,
    eps,
    NormGrad,  # the norm-weight gradient partials (see _store_norm_grad)
    bh,  # this program's row of slots: seq * H + h
    N,  # rows of the sequence
    max_seqlen,  # VARLEN: the slots per (sequence, head) are max_seqlen's
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROWS: tl.constexpr,
    VARLEN: tl.constexpr,
    ROPE: tl.constexpr,
    NORM: tl.constexpr,
    RopeGrad=None,  # this program's slab of the RoPE table's gradient (ROPE_GRAD only; see _store_rope_grad)
    stride_rg_n=0,
    ROPE_GRAD: tl.constexpr = False,
):
    """A backward kernel's end of the prologue: the gradient w.r.t. the raw tile (reloaded here), with the norm's
    weight and bias gradient partials stored (and with ROPE_GRAD the table's gradient)."""
    x = _load_tile(x_ptrs, rows_valid, offs_d, HEAD_DIM, BLOCK_D, True)
    if ROPE_GRAD:
        _store_rope_grad(
            g, x, start + offs, rows_valid, offs_d, RopeGrad, stride_rg_n, NUM_PREFIX, W, Bias, eps,
            HEAD_DIM, BLOCK_D, ROPE, NORM,
        )  # fmt: skip
    g, dw, db = _prologue_backward(
        g, x, start + offs, rows_valid, offs_d, Rope, stride_rope_n, NUM_PREFIX, W, Bias, eps, HEAD_DIM, BLOCK_D, ROPE,
        NORM,
    )  # fmt: skip
    if NORM != 0:
        slot_rows = N
        if VARLEN:
            slot_rows = max_seqlen
        _store_norm_grad(NormGrad, bh, start, N, slot_rows, dw, db, offs_d, HEAD_DIM, ROWS)
    return g


@triton.jit
def _program_setup(
    Q, K, V, DO, Lse, Delta,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    H, N_Q, N_KV, num_blocks_plain, BLOCK: tl.constexpr,
    Cu_seqlens, max_seqlen, VARLEN: tl.constexpr, STRIDE_ALIGN: tl.constexpr,
    Rope, stride_rope_n, stride_rope_h, ROPE: tl.constexpr,
):  # fmt: skip
    """The setup every kernel shares: the inputs' strides aligned (see ``_aligned``), the program's coordinates, and
    in VARLEN mode its sequence's base pointers and lengths (see ``_varlen_coords``). The forward passes (Q, K, V,
    Out, Lse, Lse) for (Q, K, V, DO, Lse, Delta).

    ``num_blocks_plain``: blocks per (batch, head) without VARLEN (cdiv of the owned axis by BLOCK). Returns (Q, K, V,
    DO, Lse, Delta shifted to the sequence, their aligned strides, block index, b, h, N_Q, N_KV, the sequence's first
    token as int64 (0 without VARLEN; the kernel shifts its own outputs by it), whether the block lies past its
    sequence's end (the kernel returns then; always False without VARLEN), the RoPE table shifted likewise, the
    sequence index (b without VARLEN: the norm-gradient partials' row is seq * H + h)).
    """
    if STRIDE_ALIGN > 1:
        stride_qb, stride_qh, stride_qn = _aligned(stride_qb, stride_qh, stride_qn, STRIDE_ALIGN)
        stride_kb, stride_kh, stride_kn = _aligned(stride_kb, stride_kh, stride_kn, STRIDE_ALIGN)
        stride_vb, stride_vh, stride_vn = _aligned(stride_vb, stride_vh, stride_vn, STRIDE_ALIGN)
        stride_dob, stride_doh, stride_don = _aligned(stride_dob, stride_doh, stride_don, STRIDE_ALIGN)
    if VARLEN:
        block, seq, h, seq_start, length = _varlen_coords(tl.cdiv(max_seqlen, BLOCK), H, Cu_seqlens)
        past_end = block * BLOCK >= length
        Q += seq_start * stride_qn
        K += seq_start * stride_kn
        V += seq_start * stride_vn
        DO += seq_start * stride_don
        if ROPE != 0:
            Rope += seq_start * stride_rope_n
        stats_shift = _varlen_stats_shift(h, N_Q, seq_start, length)
        Lse += stats_shift
        Delta += stats_shift
        b, N_Q, N_KV = 0, length, length
    else:
        block, b, h = _program_coords(num_blocks_plain, H)
        seq = b
        seq_start = 0
        past_end = False
    if ROPE != 0:
        Rope += h * stride_rope_h  # per-head tables; 0 when the heads share one
    return (
        Q, K, V, DO, Lse, Delta,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
        block, b, h, N_Q, N_KV, seq_start, past_end, Rope, seq,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_key_block(
    acc,  # [BLOCK_M, BLOCK_D] fp32, running sum of p @ v (unnormalised)
    l_i,  # [BLOCK_M] fp32, running row sum of p
    m_i,  # [BLOCK_M] fp32, running row max of the log2-scaled scores
    q,  # [BLOCK_M, BLOCK_D] the query tile
    k_ptrs,  # [BLOCK_N, BLOCK_D] pointers to the key tile
    v_ptrs,  # [BLOCK_N, BLOCK_D] pointers to the value tile
    start_n,
    N_KV,
    qk_scale,  # softmax scale * log2(e)
    offs_n,
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr,  # this key block runs past N_KV
    INPUT_PRECISION: tl.constexpr,
    stride_kd,  # the key prologue's arguments (see _prologue)
    Rope,
    stride_rope_n,
    NUM_PREFIX,
    KW,
    KB,
    k_eps,
    ROPE: tl.constexpr,
    K_NORM: tl.constexpr,
    keep_ptrs=None,  # [BLOCK_N] pointers into the key-padding mask (KEY_MASK only)
    KEY_MASK: tl.constexpr = False,
    acc1=None,  # [BLOCK_M, D1] fp32 running p @ v of the second head-dim piece (D1 > 0 only), likewise acc2
    acc2=None,
    q1=None,  # [BLOCK_M, D1] the query tile's second piece, likewise q2
    q2=None,
    k1_ptrs=None,  # [BLOCK_N, D1] pointers to the key tile's second piece, likewise k2_ptrs, v1_ptrs, v2_ptrs
    k2_ptrs=None,
    v1_ptrs=None,
    v2_ptrs=None,
    cols1=None,  # [D1] the second piece's columns, likewise cols2
    cols2=None,
    D1: tl.constexpr = 0,  # widths of the second and third head-dim pieces (0: no such piece)
    D2: tl.constexpr = 0,
):
    keys_valid, k, v, _, _, qk = _key_block_scores(
        q, k_ptrs, v_ptrs, start_n, N_KV, offs_n, offs_d, HEAD_DIM, BLOCK_D, MASK_N, INPUT_PRECISION,
        stride_kd, Rope, stride_rope_n, NUM_PREFIX, KW, KB, k_eps, ROPE, K_NORM, keep_ptrs, KEY_MASK,
        q1, q2, k1_ptrs, k2_ptrs, cols1, cols2, D1, D2,
    )  # fmt: skip
    if MASK_N | KEY_MASK:
        qk = tl.where(keys_valid[None, :], qk, float("-inf"))
    # Without KEY_MASK every row has a valid key in every block we reach (N_KV >= 1, and the masked block holds at
    # least one valid key), so m_new is finite and no exp2 sees (-inf) - (-inf). With it, a row may have seen no kept
    # key yet (m_new = -inf): subtracting 0 instead keeps p = 0 and alpha = 0 there.
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if KEY_MASK:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
    if D1 > 0:
        acc1 = _piece_pv(acc1, alpha, p, v1_ptrs, keys_valid, cols1, HEAD_DIM, BLOCK_D + D1, MASK_N, INPUT_PRECISION)
    if D2 > 0:
        acc2 = _piece_pv(acc2, alpha, p, v2_ptrs, keys_valid, cols2, HEAD_DIM, BLOCK_D + D1 + D2, MASK_N,
                         INPUT_PRECISION)  # fmt: skip
    return acc, l_i, m_new, acc1, acc2


@triton.jit
def attn_fwd_kernel(
    Q,  # [B, H, N_Q, HEAD_DIM] strided, e.g. a view of qkv [B, N, 3, H, D]
    K,  # [B, H, N_KV, HEAD_DIM] strided
    V,  # [B, H, N_KV, HEAD_DIM] strided
    Out,  # [B, H, N_Q, HEAD_DIM] strided, e.g. a view of out [B, N, H, D]; dtype of Q
    Lse,  # [B, H, N_Q] fp32 contiguous: natural-log log-sum-exp of each row of scaled scores
    sm_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, N_Q, N_KV,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM; with D1 > 0: the first head-dim piece's width
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # key rows per loop step
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), else "tf32" (ignored for 16-bit)
    # Prologue (qk-norm then RoPE on the q and k tiles; all off by default): see _prologue.
    Rope=None,  # [N - NUM_PREFIX, 2·HEAD_DIM] cat(sin, cos), unit column stride; or one such table per head
    stride_rope_n=0,
    stride_rope_h=0,  # 0: one table for every head; else the per-head tables' stride (RoPE-Mixed)
    NUM_PREFIX=0,  # leading tokens left unrotated
    QW=None,  # [HEAD_DIM] q norm weight
    QB=None,  # [HEAD_DIM] q norm bias (LayerNorm)
    q_eps=0.0,
    KW=None,  # [HEAD_DIM] k norm weight
    KB=None,  # [HEAD_DIM] k norm bias (LayerNorm)
    k_eps=0.0,
    ROPE: tl.constexpr = 0,  # 0 none, ROPE_INTERLEAVED, ROPE_HALF
    Q_NORM: tl.constexpr = 0,  # 0 none, NORM_LAYER, NORM_RMS
    K_NORM: tl.constexpr = 0,
    Cu_seqlens=None,  # [B + 1] int32 sequence boundaries (VARLEN only)
    max_seqlen=None,  # at least the longest sequence: cdiv(max_seqlen, BLOCK) blocks per (sequence, head) (VARLEN)
    VARLEN: tl.constexpr = False,  # packed variable-length sequences (see _varlen_coords)
    KeyKeep=None,  # [B, N_KV] uint8 contiguous key-padding mask, nonzero = keep (KEY_MASK only)
    KeyExtent=None,  # [B] int32: 1 + index of each batch's last kept key, 0 if none (KEY_MASK only)
    KEY_MASK: tl.constexpr = False,
    D1: tl.constexpr = 0,  # widths of the second and third head-dim pieces, 0: none (see _piece_ptrs; no prologue)
    D2: tl.constexpr = 0,
    STRIDE_ALIGN: tl.constexpr = 1,  # every stride but the head dim's is a multiple of it (see _aligned)
):  # fmt: skip
    (
        Q, K, V, Out, Lse, _,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
        pid_m, b, h, N_Q, N_KV, _, past_end, Rope, _,
    ) = _program_setup(
        Q, K, V, Out, Lse, Lse,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
        H, N_Q, N_KV, tl.cdiv(N_Q, BLOCK_M), BLOCK_M, Cu_seqlens, max_seqlen, VARLEN, STRIDE_ALIGN,
        Rope, stride_rope_n, stride_rope_h, ROPE,
    )  # fmt: skip
    if VARLEN:  # noqa: SIM102 (VARLEN is a constexpr: without it, no runtime branch is compiled)
        if past_end:
            return
    start_m = pid_m * BLOCK_M  # int32: token indices fit; pointer offsets below go through int64
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_valid = (start_m + offs_m) < N_Q

    q_rows, q_ptrs = _block_rows(Q, b, h, start_m, offs_m, offs_d, stride_qb, stride_qh, stride_qn, stride_qd)
    k_rows = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn
    k_ptrs = k_rows + offs_d[None, :] * stride_kd
    v_rows = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn
    v_ptrs = v_rows + offs_d[None, :] * stride_vd
    q = _load_prologued(
        q_ptrs, stride_qd, start_m + offs_m, rows_valid, offs_d, Rope, stride_rope_n, NUM_PREFIX, QW, QB, q_eps,
        HEAD_DIM, BLOCK_D, True, ROPE, Q_NORM,
    )  # fmt: skip
    tl.static_assert(D1 + D2 == 0 or (ROPE == 0 and Q_NORM == 0 and K_NORM == 0), "head-dim pieces: no prologue")
    q1, k1_ptrs, v1_ptrs, cols1, q2, k2_ptrs, v2_ptrs, cols2 = _pieces_setup(
        q_rows, k_rows, v_rows, stride_qd, stride_kd, stride_vd, rows_valid, HEAD_DIM, BLOCK_D, D1, D2
    )
    acc1, acc2 = _piece_zeros(BLOCK_M, D1, D2)
    keep_ptrs = KeyKeep
    if KEY_MASK:
        keep_ptrs, N_KV = _key_mask_setup(KeyKeep, KeyExtent, b, N_KV, offs_n)

    qk_scale = sm_scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (N_KV // BLOCK_N) * BLOCK_N
    # The full key blocks unmasked, then the ragged last one (if any) masked: only that block pays for the bounds
    # checks. One call site for both: the static loop compiles its body once per part, and the tail's loop (one
    # block, constant bounds) folds into its `if`; a real loop there, even an unpipelined one, costs registers.
    for TAIL in tl.static_range(2):
        if (n_full < N_KV) if TAIL else True:
            for offset in range(0, BLOCK_N if TAIL else n_full, BLOCK_N):
                start_n = n_full + offset if TAIL else offset
                acc, l_i, m_i, acc1, acc2 = _fwd_key_block(
                    acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, N_KV, qk_scale, offs_n, offs_d,
                    HEAD_DIM, BLOCK_D, TAIL == 1, INPUT_PRECISION,
                    stride_kd, Rope, stride_rope_n, NUM_PREFIX, KW, KB, k_eps, ROPE, K_NORM, keep_ptrs, KEY_MASK,
                    acc1, acc2, q1, q2, k1_ptrs, k2_ptrs, v1_ptrs, v2_ptrs, cols1, cols2, D1, D2,
                )  # fmt: skip
                k_ptrs += BLOCK_N * stride_kn
                v_ptrs += BLOCK_N * stride_vn
                k1_ptrs, v1_ptrs, k2_ptrs, v2_ptrs = _advance_pieces(
                    k1_ptrs, v1_ptrs, k2_ptrs, v2_ptrs, BLOCK_N * stride_kn, BLOCK_N * stride_vn, D1, D2
                )

    if KEY_MASK:  # a row without any kept key (acc = 0, l_i = 0): output 0 and lse = +inf, so the backward's P = 0
        no_keys = l_i == 0.0
        l_i = tl.where(no_keys, 1.0, l_i)
        m_i = tl.where(no_keys, float("inf"), m_i)
    inv_l = 1.0 / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * LN2
    o_rows, o_ptrs = _block_rows(Out, b, h, start_m, offs_m, offs_d, stride_ob, stride_oh, stride_on, stride_od)
    _store_tile(o_ptrs, (acc * inv_l).to(Out.dtype.element_ty), rows_valid, offs_d, HEAD_DIM, BLOCK_D)
    _store_pieces(o_rows, stride_od, acc1, acc2, inv_l, rows_valid, HEAD_DIM, BLOCK_D, D1, D2)
    lse_ptrs = Lse + (b * H + h) * N_Q + start_m + offs_m
    tl.store(lse_ptrs, lse, mask=rows_valid)


# ------------------------------------------------------------------------------------------------
# Backward. With S = scale * q kᵀ, P = softmax(S), O = P v and dO the incoming gradient:
#   dV = Pᵀ dO,  dP = dO vᵀ,  dS = P * (dP - Delta) with Delta = rowsum(dO * O),
#   dQ = scale * dS k,  dK = scale * dSᵀ q.
# P is recomputed from q, k and the saved log-sum-exp: P = exp2(S * log2(e) - lse * log2(e)).


@triton.jit
def _at_most_zero(exponent):
    """min(exponent, 0), NaN kept: P = exp2(S·log2e - lse·log2e) is at most 1, but the recomputed scores and the saved
    lse round differently (by about |S|·1e-7): with scores of ~1e9 and more that difference alone would overflow
    exp2 into inf gradients for finite inputs. NaN must pass through (a NaN input gives NaN, as in PyTorch)."""
    return tl.minimum(exponent, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def attn_bwd_preprocess_kernel(
    Out,  # [B, H, N_Q, HEAD_DIM] strided: the forward's output
    DO,  # [B, H, N_Q, HEAD_DIM] strided: gradient of the output
    Delta,  # [B, H, N_Q] fp32 contiguous: rowsum(dO * O), written here
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    H,
    N_Q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    STRIDE_ALIGN: tl.constexpr = 1,  # every stride but the head dim's is a multiple of it (see _aligned)
):  # fmt: skip
    if STRIDE_ALIGN > 1:
        stride_ob, stride_oh, stride_on = _aligned(stride_ob, stride_oh, stride_on, STRIDE_ALIGN)
        stride_dob, stride_doh, stride_don = _aligned(stride_dob, stride_doh, stride_don, STRIDE_ALIGN)
    pid_m, b, h = _program_coords(tl.cdiv(N_Q, BLOCK_M), H)
    start_m = pid_m * BLOCK_M  # int32: token indices fit; pointer offsets below go through int64
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_valid = (start_m + offs_m) < N_Q
    o_ptrs = Out + b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_on
    o_ptrs = o_ptrs + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    do_ptrs = DO + b * stride_dob + h * stride_doh + start_m.to(tl.int64) * stride_don
    do_ptrs = do_ptrs + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod
    o = _load_tile(o_ptrs, rows_valid, offs_d, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    do = _load_tile(do_ptrs, rows_valid, offs_d, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(Delta + (b * H + h) * N_Q + start_m + offs_m, delta, mask=rows_valid)


@triton.jit
def _bwd_dkdv_query_block(
    dk,  # [BLOCK_N, BLOCK_D] fp32 accumulator
    dv,  # [BLOCK_N, BLOCK_D] fp32 accumulator
    k,  # [BLOCK_N, BLOCK_D] this program's key tile
    v,  # [BLOCK_N, BLOCK_D] this program's value tile
    q_ptrs,  # [BLOCK_M, BLOCK_D] pointers to the query tile
    do_ptrs,  # [BLOCK_M, BLOCK_D] pointers to the output-gradient tile
    lse_ptrs,  # [BLOCK_M] pointers into Lse
    delta_ptrs,  # [BLOCK_M] pointers into Delta
    start_m,
    N_Q,
    qk_scale,
    offs_m,
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_M: tl.constexpr,  # this query block runs past N_Q
    INPUT_PRECISION: tl.constexpr,
    stride_qd,  # the query prologue's arguments (see _prologue)
    Rope,
    stride_rope_n,
    NUM_PREFIX,
    QW,
    QB,
    q_eps,
    ROPE: tl.constexpr,
    Q_NORM: tl.constexpr,
    key_keep=None,  # [BLOCK_N] bool: the program's keys the key-padding mask keeps (KEY_MASK only)
    KEY_MASK: tl.constexpr = False,
    # The head-dim pieces past the first (D1 > 0 only; the third's when D2 > 0): fp32 dK/dV accumulators
    # [BLOCK_N, D1], the program's key and value tiles, pointers to the query and dO tiles, the columns.
    dk1=None, dk2=None, dv1=None, dv2=None, k1=None, k2=None, v1=None, v2=None,
    q1_ptrs=None, q2_ptrs=None, do1_ptrs=None, do2_ptrs=None, cols1=None, cols2=None,
    D1: tl.constexpr = 0, D2: tl.constexpr = 0,  # the pieces' widths (0: no such piece)
):  # fmt: skip
    rows_valid = (start_m + offs_m) < N_Q
    q = _load_prologued(
        q_ptrs, stride_qd, start_m + offs_m, rows_valid, offs_d, Rope, stride_rope_n, NUM_PREFIX, QW, QB, q_eps,
        HEAD_DIM, BLOCK_D, MASK_M, ROPE, Q_NORM,
    )  # fmt: skip
    do = _load_tile(do_ptrs, rows_valid, offs_d, HEAD_DIM, BLOCK_D, MASK_M)
    if MASK_M:
        # lse = +inf makes P exactly 0 on the missing rows (q and dO load as 0 there too).
        lse = tl.load(lse_ptrs, mask=rows_valid, other=float("inf"))
        delta = tl.load(delta_ptrs, mask=rows_valid, other=0.0)
    else:
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    qk_t = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # [BLOCK_N, BLOCK_M]
    qk_t, q1, q2 = _pieces_dot_t(
        qk_t, k1, k2, q1_ptrs, q2_ptrs, rows_valid, cols1, cols2, HEAD_DIM, BLOCK_D, MASK_M, INPUT_PRECISION, D1, D2
    )
    p_t = tl.math.exp2(_at_most_zero(qk_t * qk_scale - (lse * LOG2E)[None, :]))
    if KEY_MASK:
        p_t = tl.where(key_keep[:, None], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=INPUT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # [BLOCK_N, BLOCK_M]
    dp_t, do1, do2 = _pieces_dot_t(
        dp_t, v1, v2, do1_ptrs, do2_ptrs, rows_valid, cols1, cols2, HEAD_DIM, BLOCK_D, MASK_M, INPUT_PRECISION, D1, D2
    )
    dv1, dv2 = _pieces_accumulate(dv1, dv2, p_t, do1, do2, INPUT_PRECISION, D1, D2)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=INPUT_PRECISION)
    dk1, dk2 = _pieces_accumulate(dk1, dk2, ds_t, q1, q2, INPUT_PRECISION, D1, D2)
    return dk, dv, dk1, dk2, dv1, dv2


@triton.jit
def attn_bwd_dkdv_kernel(
    Q,  # [B, H, N_Q, HEAD_DIM] strided
    K,  # [B, H, N_KV, HEAD_DIM] strided
    V,  # [B, H, N_KV, HEAD_DIM] strided
    DO,  # [B, H, N_Q, HEAD_DIM] strided
    Lse,  # [B, H, N_Q] fp32 contiguous (from the forward)
    Delta,  # [B, H, N_Q] fp32 contiguous (from the preprocess kernel)
    DK,  # [B, H, N_KV, HEAD_DIM] strided, e.g. a view of dqkv [B, N, 3, H, D]; dtype of K
    DV,  # [B, H, N_KV, HEAD_DIM] strided, likewise; dtype of V
    sm_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, N_Q, N_KV,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per loop step
    BLOCK_N: tl.constexpr,  # key rows owned by this program
    INPUT_PRECISION: tl.constexpr,
    # The prologue, varlen, key-mask and head-dim-piece arguments are attn_fwd_kernel's (described there).
    Rope=None, stride_rope_n=0, stride_rope_h=0, NUM_PREFIX=0, QW=None, QB=None, q_eps=0.0, KW=None, KB=None, k_eps=0.0,
    # ROPE_GRAD: the table's gradient into RopeGrad [B, H, rows, 2·HEAD_DIM] fp32 (packed: [1, H, T - NUM_PREFIX, ..])
    RopeGrad=None, stride_rg_b=0, stride_rg_h=0, stride_rg_n=0, ROPE_GRAD: tl.constexpr = False,
    NormGrad=None,  # [B·H, cdiv(N_KV, NORM_GRAD_ROWS), 2, HEAD_DIM] fp32: k norm weight / bias gradient partials
    ROPE: tl.constexpr = 0, Q_NORM: tl.constexpr = 0, K_NORM: tl.constexpr = 0,
    Cu_seqlens=None, max_seqlen=None, VARLEN: tl.constexpr = False,
    KeyKeep=None, KeyExtent=None, KEY_MASK: tl.constexpr = False,
    D1: tl.constexpr = 0, D2: tl.constexpr = 0, STRIDE_ALIGN: tl.constexpr = 1,
):  # fmt: skip
    (
        Q, K, V, DO, Lse, Delta,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
        pid_n, b, h, N_Q, N_KV, seq_start, past_end, Rope, seq,
    ) = _program_setup(
        Q, K, V, DO, Lse, Delta,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
        H, N_Q, N_KV, tl.cdiv(N_KV, BLOCK_N), BLOCK_N, Cu_seqlens, max_seqlen, VARLEN, STRIDE_ALIGN,
        Rope, stride_rope_n, stride_rope_h, ROPE,
    )  # fmt: skip
    if STRIDE_ALIGN > 1:
        stride_dkb, stride_dkh, stride_dkn = _aligned(stride_dkb, stride_dkh, stride_dkn, STRIDE_ALIGN)
        stride_dvb, stride_dvh, stride_dvn = _aligned(stride_dvb, stride_dvh, stride_dvn, STRIDE_ALIGN)
    if VARLEN:
        if past_end:
            return
        DK += seq_start * stride_dkn
        DV += seq_start * stride_dvn
    start_n = pid_n * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    keys_valid = (start_n + offs_n) < N_KV

    k_rows, k_ptrs = _block_rows(K, b, h, start_n, offs_n, offs_d, stride_kb, stride_kh, stride_kn, stride_kd)
    v_rows, v_ptrs = _block_rows(V, b, h, start_n, offs_n, offs_d, stride_vb, stride_vh, stride_vn, stride_vd)
    # Missing key rows load as 0; their dK/dV rows are computed but never stored.
    k = _load_prologued(
        k_ptrs, stride_kd, start_n + offs_n, keys_valid, offs_d, Rope, stride_rope_n, NUM_PREFIX, KW, KB, k_eps,
        HEAD_DIM, BLOCK_D, True, ROPE, K_NORM,
    )  # fmt: skip
    v = _load_tile(v_ptrs, keys_valid, offs_d, HEAD_DIM, BLOCK_D, True)
    key_keep = KeyKeep
    if KEY_MASK:
        keep_ptrs, extent = _key_mask_setup(KeyKeep, KeyExtent, b, N_KV, offs_n)
        key_keep = tl.load(keep_ptrs + start_n, mask=keys_valid, other=0) != 0
        N_Q = tl.where(start_n < extent, N_Q, 0)  # no kept key here: dK = dV = 0, no query visited

    q_rows = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn
    q_ptrs = q_rows + offs_d[None, :] * stride_qd
    do_rows = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don
    do_ptrs = do_rows + offs_d[None, :] * stride_dod
    tl.static_assert(D1 + D2 == 0 or (ROPE == 0 and Q_NORM == 0 and K_NORM == 0), "head-dim pieces: no prologue")
    k1, q1_ptrs, do1_ptrs, cols1, k2, q2_ptrs, do2_ptrs, cols2 = _pieces_setup(
        k_rows, q_rows, do_rows, stride_kd, stride_qd, stride_dod, keys_valid, HEAD_DIM, BLOCK_D, D1, D2
    )
    v1, v2 = _load_pieces(v_rows, stride_vd, keys_valid, HEAD_DIM, BLOCK_D, D1, D2)
    dk1, dk2 = _piece_zeros(BLOCK_N, D1, D2)
    dv1, dv2 = _piece_zeros(BLOCK_N, D1, D2)
    lse_ptrs = Lse + (b * H + h) * N_Q + offs_m
    delta_ptrs = Delta + (b * H + h) * N_Q + offs_m

    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_full = (N_Q // BLOCK_M) * BLOCK_M
    for TAIL in tl.static_range(2):  # the full query blocks, then the masked ragged one: see attn_fwd_kernel
        if (m_full < N_Q) if TAIL else True:
            for offset in range(0, BLOCK_M if TAIL else m_full, BLOCK_M):
                start_m = m_full + offset if TAIL else offset
                dk, dv, dk1, dk2, dv1, dv2 = _bwd_dkdv_query_block(
                    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, start_m, N_Q, qk_scale, offs_m, offs_d,
                    HEAD_DIM, BLOCK_D, TAIL == 1, INPUT_PRECISION,
                    stride_qd, Rope, stride_rope_n, NUM_PREFIX, QW, QB, q_eps, ROPE, Q_NORM, key_keep, KEY_MASK,
                    dk1, dk2, dv1, dv2, k1, k2, v1, v2, q1_ptrs, q2_ptrs, do1_ptrs, do2_ptrs, cols1, cols2, D1, D2,
                )  # fmt: skip
                q_ptrs += BLOCK_M * stride_qn
                do_ptrs += BLOCK_M * stride_don
                lse_ptrs += BLOCK_M
                delta_ptrs += BLOCK_M
                q1_ptrs, do1_ptrs, q2_ptrs, do2_ptrs = _advance_pieces(
                    q1_ptrs, do1_ptrs, q2_ptrs, do2_ptrs, BLOCK_M * stride_qn, BLOCK_M * stride_don, D1, D2
                )

    dk *= sm_scale
    dk_rows, dk_ptrs = _block_rows(DK, b, h, start_n, offs_n, offs_d, stride_dkb, stride_dkh, stride_dkn, stride_dkd)
    dv_rows, dv_ptrs = _block_rows(DV, b, h, start_n, offs_n, offs_d, stride_dvb, stride_dvh, stride_dvn, stride_dvd)
    if ROPE != 0 or K_NORM != 0:  # dk is the gradient w.r.t. the prologue's k: back to the raw k
        # dV first: its accumulator is dead while dK's prologue backward runs (that peak spilled at D = 128 otherwise).
        _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), keys_valid, offs_d, HEAD_DIM, BLOCK_D)
        if ROPE_GRAD:
            RopeGrad += b * stride_rg_b + h * stride_rg_h + seq_start * stride_rg_n
        dk = _prologue_grad(
            dk, k_ptrs, start_n, offs_n, keys_valid, offs_d, Rope, stride_rope_n, NUM_PREFIX, KW, KB, k_eps,
            NormGrad, seq * H + h, N_KV, max_seqlen, HEAD_DIM, BLOCK_D, BLOCK_N, VARLEN, ROPE, K_NORM,
            RopeGrad, stride_rg_n, ROPE_GRAD,
        )  # fmt: skip
        _store_tile(dk_ptrs, dk.to(DK.dtype.element_ty), keys_valid, offs_d, HEAD_DIM, BLOCK_D)
    else:
        _store_tile(dk_ptrs, dk.to(DK.dtype.element_ty), keys_valid, offs_d, HEAD_DIM, BLOCK_D)
        _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), keys_valid, offs_d, HEAD_DIM, BLOCK_D)
        _store_pieces(dk_rows, stride_dkd, dk1, dk2, sm_scale, keys_valid, HEAD_DIM, BLOCK_D, D1, D2)
        _store_pieces(dv_rows, stride_dvd, dv1, dv2, 1.0, keys_valid, HEAD_DIM, BLOCK_D, D1, D2)


@triton.jit
def _bwd_dq_key_block(
    dq,  # [BLOCK_M, BLOCK_D] fp32 accumulator
    q,  # [BLOCK_M, BLOCK_D] this program's query tile
    do,  # [BLOCK_M, BLOCK_D] this program's output-gradient tile
    lse2,  # [BLOCK_M] fp32, lse * log2(e)
    delta,  # [BLOCK_M] fp32
    k_ptrs,  # [BLOCK_N, BLOCK_D] pointers to the key tile
    v_ptrs,  # [BLOCK_N, BLOCK_D] pointers to the value tile
    start_n,
    N_KV,
    qk_scale,
    offs_n,
    offs_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASK_N: tl.constexpr,  # this key block runs past N_KV
    INPUT_PRECISION: tl.constexpr,
    stride_kd,  # the key prologue's arguments (see _prologue)
    Rope,
    stride_rope_n,
    NUM_PREFIX,
    KW,
    KB,
    k_eps,
    ROPE: tl.constexpr,
    K_NORM: tl.constexpr,
    keep_ptrs=None,  # [BLOCK_N] pointers into the key-padding mask (KEY_MASK only)
    KEY_MASK: tl.constexpr = False,
    # The head-dim pieces past the first (D1 > 0 only; the third's when D2 > 0): fp32 dQ accumulators
    # [BLOCK_M, D1], the program's query and dO tiles, pointers to the key and value tiles, the columns.
    dq1=None, dq2=None, q1=None, q2=None, do1=None, do2=None,
    k1_ptrs=None, k2_ptrs=None, v1_ptrs=None, v2_ptrs=None, cols1=None, cols2=None,
    D1: tl.constexpr = 0, D2: tl.constexpr = 0,  # the pieces' widths (0: no such piece)
):  # fmt: skip
    keys_valid, k, v, k1, k2, qk = _key_block_scores(
        q, k_ptrs, v_ptrs, start_n, N_KV, offs_n, offs_d, HEAD_DIM, BLOCK_D, MASK_N, INPUT_PRECISION,
        stride_kd, Rope, stride_rope_n, NUM_PREFIX, KW, KB, k_eps, ROPE, K_NORM, keep_ptrs, KEY_MASK,
        q1, q2, k1_ptrs, k2_ptrs, cols1, cols2, D1, D2,
    )  # fmt: skip
    p = tl.math.exp2(_at_most_zero(qk * qk_scale - lse2[:, None]))
    if MASK_N | KEY_MASK:
        p = tl.where(keys_valid[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)  # [BLOCK_M, BLOCK_N]
    dp, _, _ = _pieces_dot_t(
        dp, do1, do2, v1_ptrs, v2_ptrs, keys_valid, cols1, cols2, HEAD_DIM, BLOCK_D, MASK_N, INPUT_PRECISION, D1, D2
    )
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
    dq1, dq2 = _pieces_accumulate(dq1, dq2, ds, k1, k2, INPUT_PRECISION, D1, D2)
    return dq, dq1, dq2


@triton.jit
def attn_bwd_dq_kernel(
    Q,  # [B, H, N_Q, HEAD_DIM] strided
    K,  # [B, H, N_KV, HEAD_DIM] strided
    V,  # [B, H, N_KV, HEAD_DIM] strided
    DO,  # [B, H, N_Q, HEAD_DIM] strided
    Lse,  # [B, H, N_Q] fp32 contiguous
    Delta,  # [B, H, N_Q] fp32 contiguous
    DQ,  # [B, H, N_Q, HEAD_DIM] strided, e.g. a view of dqkv [B, N, 3, H, D]; dtype of Q
    sm_scale,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    H, N_Q, N_KV,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows owned by this program
    BLOCK_N: tl.constexpr,  # key rows per loop step
    INPUT_PRECISION: tl.constexpr,
    # The prologue, varlen, key-mask and head-dim-piece arguments are attn_fwd_kernel's (described there).
    Rope=None, stride_rope_n=0, stride_rope_h=0, NUM_PREFIX=0, QW=None, QB=None, q_eps=0.0, KW=None, KB=None, k_eps=0.0,
    # ROPE_GRAD: the table's gradient into RopeGrad [B, H, rows, 2·HEAD_DIM] fp32 (packed: [1, H, T - NUM_PREFIX, ..])
    RopeGrad=None, stride_rg_b=0, stride_rg_h=0, stride_rg_n=0, ROPE_GRAD: tl.constexpr = False,
    NormGrad=None,  # [B·H, cdiv(N_Q, NORM_GRAD_ROWS), 2, HEAD_DIM] fp32: q norm weight / bias gradient partials
    ROPE: tl.constexpr = 0, Q_NORM: tl.constexpr = 0, K_NORM: tl.constexpr = 0,
    Cu_seqlens=None, max_seqlen=None, VARLEN: tl.constexpr = False,
    KeyKeep=None, KeyExtent=None, KEY_MASK: tl.constexpr = False,
    D1: tl.constexpr = 0, D2: tl.constexpr = 0, STRIDE_ALIGN: tl.constexpr = 1,
):  # fmt: skip
    (
        Q, K, V, DO, Lse, Delta,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
        pid_m, b, h, N_Q, N_KV, seq_start, past_end, Rope, seq,
    ) = _program_setup(
        Q, K, V, DO, Lse, Delta,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
        H, N_Q, N_KV, tl.cdiv(N_Q, BLOCK_M), BLOCK_M, Cu_seqlens, max_seqlen, VARLEN, STRIDE_ALIGN,
        Rope, stride_rope_n, stride_rope_h, ROPE,
    )  # fmt: skip
    if STRIDE_ALIGN > 1:
        stride_dqb, stride_dqh, stride_dqn = _aligned(stride_dqb, stride_dqh, stride_dqn, STRIDE_ALIGN)
    if VARLEN:
        if past_end:
            return
        DQ += seq_start * stride_dqn
    start_m = pid_m * BLOCK_M  # int32: token indices fit; pointer offsets below go through int64
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_valid = (start_m + offs_m) < N_Q

    q_rows, q_ptrs = _block_rows(Q, b, h, start_m, offs_m, offs_d, stride_qb, stride_qh, stride_qn, stride_qd)
    do_rows, do_ptrs = _block_rows(DO, b, h, start_m, offs_m, offs_d, stride_dob, stride_doh, stride_don, stride_dod)
    # Missing query rows load as 0 (lse and delta too); their dQ rows are never stored.
    q = _load_prologued(
        q_ptrs, stride_qd, start_m + offs_m, rows_valid, offs_d, Rope, stride_rope_n, NUM_PREFIX, QW, QB, q_eps,
        HEAD_DIM, BLOCK_D, True, ROPE, Q_NORM,
    )  # fmt: skip
    do = _load_tile(do_ptrs, rows_valid, offs_d, HEAD_DIM, BLOCK_D, True)
    row_offset = (b * H + h) * N_Q + start_m + offs_m
    lse2 = tl.load(Lse + row_offset, mask=rows_valid, other=0.0) * LOG2E
    delta = tl.load(Delta + row_offset, mask=rows_valid, other=0.0)

    k_rows = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn
    k_ptrs = k_rows + offs_d[None, :] * stride_kd
    v_rows = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn
    v_ptrs = v_rows + offs_d[None, :] * stride_vd
    tl.static_assert(D1 + D2 == 0 or (ROPE == 0 and Q_NORM == 0 and K_NORM == 0), "head-dim pieces: no prologue")
    q1, k1_ptrs, v1_ptrs, cols1, q2, k2_ptrs, v2_ptrs, cols2 = _pieces_setup(
        q_rows, k_rows, v_rows, stride_qd, stride_kd, stride_vd, rows_valid, HEAD_DIM, BLOCK_D, D1, D2
    )
    do1, do2 = _load_pieces(do_rows, stride_dod, rows_valid, HEAD_DIM, BLOCK_D, D1, D2)
    dq1, dq2 = _piece_zeros(BLOCK_M, D1, D2)
    qk_scale = sm_scale * LOG2E
    keep_ptrs = KeyKeep
    if KEY_MASK:
        keep_ptrs, N_KV = _key_mask_setup(KeyKeep, KeyExtent, b, N_KV, offs_n)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (N_KV // BLOCK_N) * BLOCK_N
    for TAIL in tl.static_range(2):  # the full key blocks, then the masked ragged one: see attn_fwd_kernel
        if (n_full < N_KV) if TAIL else True:
            for offset in range(0, BLOCK_N if TAIL else n_full, BLOCK_N):
                start_n = n_full + offset if TAIL else offset
                dq, dq1, dq2 = _bwd_dq_key_block(
                    dq, q, do, lse2, delta, k_ptrs, v_ptrs, start_n, N_KV, qk_scale, offs_n, offs_d,
                    HEAD_DIM, BLOCK_D, TAIL == 1, INPUT_PRECISION,
                    stride_kd, Rope, stride_rope_n, NUM_PREFIX, KW, KB, k_eps, ROPE, K_NORM, keep_ptrs, KEY_MASK,
                    dq1, dq2, q1, q2, do1, do2, k1_ptrs, k2_ptrs, v1_ptrs, v2_ptrs, cols1, cols2, D1, D2,
                )  # fmt: skip
                k_ptrs += BLOCK_N * stride_kn
                v_ptrs += BLOCK_N * stride_vn
                k1_ptrs, v1_ptrs, k2_ptrs, v2_ptrs = _advance_pieces(
                    k1_ptrs, v1_ptrs, k2_ptrs, v2_ptrs, BLOCK_N * stride_kn, BLOCK_N * stride_vn, D1, D2
                )

    dq *= sm_scale
    if ROPE != 0 or Q_NORM != 0:  # dq is the gradient w.r.t. the prologue's q: back to the raw q
        if ROPE_GRAD:
            RopeGrad += b * stride_rg_b + h * stride_rg_h + seq_start * stride_rg_n
        dq = _prologue_grad(
            dq, q_ptrs, start_m, offs_m, rows_valid, offs_d, Rope, stride_rope_n, NUM_PREFIX, QW, QB, q_eps,
            NormGrad, seq * H + h, N_Q, max_seqlen, HEAD_DIM, BLOCK_D, BLOCK_M, VARLEN, ROPE, Q_NORM,
            RopeGrad, stride_rg_n, ROPE_GRAD,
        )  # fmt: skip
    dq_rows, dq_ptrs = _block_rows(DQ, b, h, start_m, offs_m, offs_d, stride_dqb, stride_dqh, stride_dqn, stride_dqd)
    _store_tile(dq_ptrs, dq.to(DQ.dtype.element_ty), rows_valid, offs_d, HEAD_DIM, BLOCK_D)
    _store_pieces(dq_rows, stride_dqd, dq1, dq2, sm_scale, rows_valid, HEAD_DIM, BLOCK_D, D1, D2)


# ------------------------------------------------------------------------------------------------
# Block-size configurations, (BLOCK_M, BLOCK_N, num_warps, num_stages), tried by the autotuner on GPUs, keyed on (N_Q,
# N_KV, HEAD_DIM, INPUT_PRECISION) and the tensors' dtypes. 16-bit inputs: one list per GPU generation (80:
# Ampere/Ada, 90: Hopper and newer) and BLOCK_D bound (<= 64: head dims 32-64; <= 128: head dims 72-128; a launch in
# head-dim pieces takes the list of its padded width, e.g. 72 = 64 + 16 the 128 list); fp32 inputs: one list.
# ``autotune_configs`` hands the autotuner the entries of the launch's list that ``keep_config`` keeps for the GPU's
# shared memory. Starting points from the Triton tutorial's search space and FlashAttention-2's Triton kernels; ViT
# sequences are short (197-577 tokens), so 64-row query blocks keep enough programs in flight and 128-row blocks win
# at large B*H.
#
# Chosen from ahead-of-time compiles (python -m fastvit.kernels.resources --all, no GPU): every 16-bit entry compiles
# without spilling for its generation at every head dim of its BLOCK_D list, with Triton 3.8. CI (test_resources.py)
# keeps that true for bf16/fp16 at head dims 64, 72 (pieces on sm_90a, padded on sm_80) and 128 on sm_90a and sm_80;
# the autotuner candidates of 40, 88, 104, 112 (and 56, 120 on sm_90a) were compiled for bf16 once, without spills
# (pieces on sm_90a; on sm_80 pieces spilled 8-160 B in some, hence ``head_dim_pieces``' arch rule); the committed
# tables benchmarks/results/resources-sm90a.md and -sm80.md hold that set (0 spills; at most 255 registers, shared
# memory up to 224 KiB of sm_90's 227 KiB for (128, 128, 8, 3)). At BLOCK_D = 128 the sm_80 kernels need 8 warps
# (4-warp tiles spill 100-1000 B per thread, (128, 64, 4, 3) 20 KB), and dK/dV has only two spill-free tiles there.
# fp32 (full-precision "ieee" dots run on FMA units, not tensor cores) spills at head dims >= 48 whatever the tile,
# and some tiles at 32: supported for accuracy, not speed (the tool reports its spills without failing them).
#
# Forward (BLOCK_M query rows per program, BLOCK_N keys per step).
FWD_CONFIGS = {
    80: {
        64: [(128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4), (128, 64, 8, 3)],
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 8, 3)],
    },
    90: {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 128, 4, 3)],
        128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 128, 8, 3)],
    },
    "fp32": [(32, 32, 8, 2), (16, 32, 4, 2), (64, 32, 8, 2)],
}
# dK/dV (BLOCK_N keys per program, BLOCK_M queries per step): two [BLOCK_N, BLOCK_D] fp32 accumulators.
BWD_DKDV_CONFIGS = {
    80: {
        64: [(32, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (16, 128, 8, 2)],
        128: [(16, 128, 8, 2), (32, 32, 8, 2)],
    },
    90: {
        64: [(32, 64, 4, 3), (64, 64, 4, 2), (32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 8, 3)],
        128: [(32, 64, 4, 3), (32, 128, 8, 3), (64, 64, 8, 3), (64, 64, 8, 2), (32, 64, 8, 2)],
    },
    "fp32": [(32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 4, 2)],
}
# dQ (BLOCK_M queries per program, BLOCK_N keys per step): one [BLOCK_M, BLOCK_D] fp32 accumulator.
BWD_DQ_CONFIGS = {
    80: {
        64: [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3)],
        128: [(128, 32, 8, 2), (128, 16, 8, 2), (32, 64, 4, 2), (32, 32, 4, 3), (32, 32, 4, 2)],
    },
    90: {
        64: [(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 64, 8, 3)],
        128: [(64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 64, 8, 3)],
    },
    "fp32": [(32, 32, 8, 2), (16, 32, 4, 2), (64, 32, 8, 2)],
}
# Prologue launches (qk-norm and/or RoPE: ROPE, Q_NORM or K_NORM set) on Hopper get their own lists: the prologue's
# fp32 tiles (the q/k tile, sin and cos, the rotated tile) need registers that the plain lists' 4-warp tiles with 64+
# streamed rows do not have. Chosen from ahead-of-time compiles of a wider pool (sm_90a, bf16, Triton 3.8; the cases of
# ``fastvit.kernels.resources.PROLOGUE_CASES``: rotate-half RoPE + LayerNorm with and without VARLEN, interleaved RoPE,
# RMSNorm at D = 64, LayerNorm at D = 128): every entry compiles without spilling in every case (table in the comment
# above ``ROPE_INTERLEAVED``); mostly 8 warps. Other generations keep the plain lists (not checked with a prologue).
PROLOGUE_CONFIGS = {
    "fwd": {
        90: {
            64: [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3)],
            128: [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3)],
        },
    },
    "dkdv": {
        90: {
            64: [(32, 64, 8, 3), (64, 64, 8, 2), (32, 128, 8, 3), (32, 64, 8, 2), (16, 128, 8, 2)],
            128: [(32, 64, 8, 3), (32, 64, 8, 2), (16, 64, 8, 2)],
        },
    },
    "dq": {
        90: {
            64: [(64, 64, 8, 3), (128, 32, 8, 3), (64, 32, 8, 3), (128, 32, 8, 2)],
            128: [(64, 64, 8, 3), (64, 32, 8, 3)],
        },
    },
}
# When keep_config drops every candidate, the autotuner runs this one: small tiles, no pipelining.
FALLBACK_CONFIGS = {"fwd": (32, 32, 4, 1), "dkdv": (32, 32, 4, 1), "dq": (32, 32, 4, 1)}
# Under TRITON_INTERPRET=1 (CPU) one fixed config, no tuning (it would time the interpreter): tiles
# big enough to keep the interpreter's Python loop short, small enough that the CI shapes
# (N = 7...257) cross several blocks and end in ragged tails. Warps and stages mean nothing there.
INTERPRETER_CONFIGS = {"fwd": (64, 32, 1, 1), "dkdv": (32, 64, 1, 1), "dq": (64, 32, 1, 1)}
PREPROCESS_BLOCK_M = 64

# Shared memory one block may use (bytes; cudaDevAttrMaxSharedMemoryPerBlockOptin), by compute capability
# 10*major+minor: what Triton checks every compiled kernel against before launching it.
SHARED_MEMORY_PER_BLOCK = {
    80: 163 * 1024,  # A100
    86: 99 * 1024,  # RTX 30xx, A10, A40
    87: 163 * 1024,  # Jetson Orin
    89: 99 * 1024,  # RTX 40xx, L4, L40
    90: 227 * 1024,  # H100, H200
    100: 227 * 1024,  # B200
    103: 227 * 1024,  # B300
    120: 99 * 1024,  # RTX 50xx
}


def shared_memory_limit(arch: int) -> int:
    """Shared memory per block, in bytes, on a GPU of compute capability ``arch`` (10*major+minor, e.g. 90).

    A GPU missing from ``SHARED_MEMORY_PER_BLOCK`` gets the smallest limit of the table: configs may be dropped
    that would fit, never kept when they cannot launch.
    """
    if isinstance(arch, bool) or not isinstance(arch, int):
        raise TypeError(f"arch must be an int compute capability 10*major+minor (e.g. 90), got {arch!r}")
    if arch < 80:
        raise ValueError(f"arch must be a compute capability >= 80 (the kernels need sm_80+), got {arch}")
    return SHARED_MEMORY_PER_BLOCK.get(arch, min(SHARED_MEMORY_PER_BLOCK.values()))


def config_generation(arch: int) -> int:
    """The key of the 16-bit config tables for compute capability ``arch``: 90 for Hopper and newer, else 80."""
    return 90 if arch >= 90 else 80


# Head dims the kernels take: every multiple of 8 in 32..128 (SigLIP so400m: 72).
HEAD_DIMS = tuple(range(32, 129, 8))
MIN_PIECE = 16  # tl.dot's smallest K and N
MAX_PIECES = 3
# Head dims whose launches keep today's single padded tile although ``split_head_dim`` finds a narrower split (48 =
# 32 + 16, 80 = 64 + 16, 96 = 64 + 32): their tuned, resource-checked code stays as it is until a GPU run shows the
# split is faster there too.
PADDED_HEAD_DIMS = (48, 80, 96)


def block_d(head_dim: int) -> int:
    """``BLOCK_D`` of a head dim: the next power of two, at least 16 (the smallest tl.dot size)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def split_head_dim(head_dim: int) -> tuple[int, ...]:
    """The narrowest tiling of ``head_dim`` columns by at most ``MAX_PIECES`` power-of-two pieces of at least
    ``MIN_PIECE`` (widest first; fewest pieces among equally narrow ones), e.g. 72 -> (64, 16), 104 -> (64, 32, 16),
    120 -> (128,). The last piece is masked past ``head_dim``.

    Wasted columns, ``sum(pieces) - head_dim`` over ``sum(pieces)``, are at most 12.5% for every multiple of 8 in
    32..128 except 40: 40 = 32 + 16 with 8 of 48 masked (16.7%), as no sum of pieces >= 16 lies in 40..45.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int):
        raise TypeError(f"head_dim must be an int, got {head_dim!r}")
    if head_dim < 1:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    widths = [w for w in (1 << i for i in range(block_d(head_dim).bit_length() - 1, -1, -1)) if w >= MIN_PIECE]
    pieces = (c for n in range(1, MAX_PIECES + 1) for c in itertools.combinations_with_replacement(widths, n))
    covering = [c for c in pieces if sum(c) >= head_dim]
    return min(covering, key=lambda c: (sum(c), len(c)))


def head_dim_pieces(head_dim: int, arch: int | None = None) -> tuple[int, int, int]:
    """The head-dim tiling of the forward, dQ and dK/dV kernels as their constexprs (BLOCK_D, D1, D2), 0 = no such
    piece: the split of ``split_head_dim`` where it is narrower than the padded tile ``block_d(head_dim)`` (40, 72,
    88, 104, 112), else the padded tile alone (the plain path's compiled code), as for ``PADDED_HEAD_DIMS``.

    ``arch``: the GPU's compute capability (None: the interpreter). Pieces run on Hopper and newer (90+), where every
    candidate config compiles without spilling; on Ampere/Ada (the 80 tables, register-bound at 8 warps already at
    BLOCK_D = 128) the extra per-piece tiles make some of them spill (8-160 B per thread; 104's dK/dV the most), so
    there the new head dims keep the padded tile.
    """
    pieces = split_head_dim(head_dim)
    if len(pieces) == 1 or head_dim in PADDED_HEAD_DIMS or (arch is not None and config_generation(arch) < 90):
        return block_d(head_dim), 0, 0
    return (*pieces, 0, 0)[:MAX_PIECES]


def tile_waste(head_dim: int, pieces: tuple[int, ...]) -> float:
    """The fraction of a tile's columns that are masked: (sum(pieces) - head_dim) / sum(pieces)."""
    width = sum(pieces)
    return (width - head_dim) / width


def keep_config(
    kernel: str,
    block_m: int,
    block_n: int,
    num_stages: int,
    block_d: int,
    elem_bytes: int,
    arch: int,
    rope: bool = False,
) -> bool:
    """False when a config's shared memory exceeds the GPU's per-block limit (an estimate of Triton's allocation).

    ``kernel`` is 'fwd', 'dkdv' or 'dq'; ``arch`` the compute capability (10*major+minor). Two tiles are streamed
    through the loop and buffered ``num_stages`` deep (k and v for 'fwd' and 'dq'; q and dO for 'dkdv', with their
    fp32 lse and delta rows); the program's own tiles stay resident (q for 'fwd'; q and dO for 'dq'; k and v for
    'dkdv'). With Triton 3.8 on sm_90 this is what the compiled kernels allocate (to the byte for 'fwd' and 'dq',
    a few hundred bytes more for 'dkdv'); on sm_80 Triton needs less, so a config that would fit there may be
    dropped. The static resource check compares the real allocation of every kept config with the limit. With
    ``rope`` (the RoPE prologue) the streamed tile's sin and cos rows (fp32) are streamed with it: counted as
    ``num_stages`` buffers each (Triton 3.8 on sm_90 allocates ``num_stages - 1``: an over-estimate, on the safe side).
    """
    streamed_rows = block_m if kernel == "dkdv" else block_n
    resident_tiles, resident_rows = {"fwd": (1, block_m), "dq": (2, block_m), "dkdv": (2, block_n)}[kernel]
    streamed = num_stages * 2 * streamed_rows * block_d * elem_bytes
    if kernel == "dkdv":
        streamed += num_stages * 2 * block_m * 4  # lse and delta rows (fp32) of each query block
    if rope:
        streamed += num_stages * streamed_rows * block_d * 2 * 4
    resident = resident_tiles * resident_rows * block_d * elem_bytes
    return streamed + resident <= shared_memory_limit(arch)


CONFIG_TABLES = {"fwd": FWD_CONFIGS, "dkdv": BWD_DKDV_CONFIGS, "dq": BWD_DQ_CONFIGS}


def table_configs(
    kernel: str, arch: int, block_d: int, elem_bytes: int, prologue: bool = False
) -> list[tuple[int, int, int, int]]:
    """The table entries for one launch, before the shared-memory check: fp32 inputs have their own list,
    16-bit inputs the list of the arch's generation for this ``BLOCK_D`` (``prologue``: a launch with the qk-norm /
    RoPE prologue, ``PROLOGUE_CONFIGS`` where it has a list for the generation)."""
    tables = CONFIG_TABLES[kernel]
    if elem_bytes == 4:
        return list(tables["fp32"])
    if prologue and config_generation(arch) in PROLOGUE_CONFIGS[kernel]:
        tables = PROLOGUE_CONFIGS[kernel]
    by_block_d = tables[config_generation(arch)]
    return list(by_block_d[min(bound for bound in by_block_d if bound >= block_d)])


def autotune_configs(
    kernel: str, arch: int, block_d: int, elem_bytes: int, rope: bool = False, prologue: bool = False
) -> list[tuple[int, int, int, int]]:
    """Every config the autotuner may pick for one launch, as (BLOCK_M, BLOCK_N, num_warps, num_stages).

    The launcher's prune step returns exactly these, and the static resource check (``fastvit.kernels.resources``)
    compiles exactly these: the table entries that ``keep_config`` keeps for ``arch``, or ``FALLBACK_CONFIGS`` when
    it keeps none. With ``rope`` (the RoPE prologue streams its sin/cos rows too) an entry that does not fit is kept
    with the deepest pipeline (fewest stages, down to 1) that does. ``prologue``: the launch runs the qk-norm and/or
    RoPE prologue (``rope`` implies it): the lists of ``PROLOGUE_CONFIGS`` where the generation has them.
    """
    kept = []
    for block_m, block_n, warps, stages in table_configs(kernel, arch, block_d, elem_bytes, prologue or rope):
        for depth in range(stages, 0, -1) if rope else (stages,):
            if keep_config(kernel, block_m, block_n, depth, block_d, elem_bytes, arch, rope):
                kept.append((block_m, block_n, warps, depth))
                break
    return list(dict.fromkeys(kept)) or [FALLBACK_CONFIGS[kernel]]


def dtype_table_configs(kernel: str, arch: int, elem_bytes: int) -> list[tuple[int, int, int, int]]:
    """Every table entry for inputs of ``elem_bytes`` on ``arch`` (all BLOCK_D lists), then the fallback."""
    tables = CONFIG_TABLES[kernel]
    lists = [tables["fp32"]] if elem_bytes == 4 else tables[config_generation(arch)].values()
    return list(dict.fromkeys([*(e for configs in lists for e in configs), FALLBACK_CONFIGS[kernel]]))


def all_table_configs(kernel: str, arch: int) -> list[tuple[int, int, int, int]]:
    """Every entry the autotuner of ``arch`` can be handed for ``kernel``, whatever the dtype and BLOCK_D."""
    return list(dict.fromkeys([*dtype_table_configs(kernel, arch, 2), *dtype_table_configs(kernel, arch, 4)]))
