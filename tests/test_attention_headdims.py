"""Head dims 32..128 in steps of 8 on the Triton attention kernels (SigLIP so400m's 72, and 40, 88, 104, 112, 120).

The host-side tiling (``kernels.attention.split_head_dim`` / ``head_dim_pieces``: the head dim as up to three
power-of-two pieces, each >= 16, the last one masked past the head dim) and its waste bound, dispatch accepting the
dims, what the launches pass (pieces, stride alignment), and the kernels against the fp64 spec under the accuracy rule
of tests/test_attention.py and test_attention_prologue.py (flash-attention's: max|ours - ref64| <= 2 x max|PyTorch same
dtype - ref64| + an fp32-rounding floor; their checks are reused), forward and the qkv gradient, with ragged token
counts, packed sequences, a key-padding mask and the qk-norm/RoPE prologue. Without a GPU the kernels run in Triton's
interpreter: B <= 4, H <= 2, N <= 40. The ``gpu`` tests add bfloat16 and longer sequences.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from test_attention import _check_against_reference, _check_qkv_attention, _run
from test_attention_prologue import _check, _qkv, _table
from test_varlen_attention import _check as _check_varlen
from test_varlen_attention import _key_padding_mask, _masked, _packed, _per_sequence_sdpa, _triton

from fastvit import dispatch, ops, reference
from fastvit.ops.attention import attention_call
from fastvit.ops.triton import attention as attention_triton

from utils import DEVICE, needs_cuda, triton_skip_reason

if triton_skip_reason() is not None:
    pytest.skip(triton_skip_reason(), allow_module_level=True)

from fastvit.kernels import attention as kernels  # noqa: E402  (needs Triton)

FP32_FP16 = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
NEW_HEAD_DIMS = (40, 72, 88, 104, 112, 120)
SPLIT_HEAD_DIMS = (40, 72, 88, 104, 112)  # the dims whose launches tile the head dim in pieces


# ------------------------------------------------------------------------------------------------
# The host-side tiling


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@pytest.mark.parametrize("head_dim", kernels.HEAD_DIMS)
def test_split_covers_the_head_dim_with_power_of_two_pieces_and_bounded_waste(head_dim):
    pieces = kernels.split_head_dim(head_dim)
    assert 1 <= len(pieces) <= kernels.MAX_PIECES, pieces
    # the narrowest cover, against a brute force over every multiset of at most MAX_PIECES power-of-two widths
    widths = [w for w in (16, 32, 64, 128) if w >= kernels.MIN_PIECE]
    covers = [
        sum(c)
        for n in range(1, kernels.MAX_PIECES + 1)
        for c in itertools.product(widths, repeat=n)
        if sum(c) >= head_dim
    ]
    assert sum(pieces) == min(covers), (pieces, min(covers))
    expected = {40: (32, 16), 72: (64, 16), 88: (64, 32), 104: (64, 32, 16), 112: (64, 32, 16), 120: (128,)}
    if head_dim in expected:  # widest first, the fewest pieces among equally narrow ones
        assert pieces == expected[head_dim]
    assert all(_is_power_of_two(p) and p >= kernels.MIN_PIECE for p in pieces), pieces
    width = sum(pieces)
    assert head_dim <= width and width - head_dim < pieces[-1], pieces  # only the last piece has masked columns
    waste = kernels.tile_waste(head_dim, pieces)
    if head_dim == 40:  # 32 + 16: no sum of pieces >= 16 lies in 40..45, so 8 of 48 columns are masked
        assert pieces == (32, 16) and waste == pytest.approx(1 / 6)
    else:
        assert waste <= 0.125, (pieces, waste)
    padded = kernels.block_d(head_dim)
    assert width <= padded and (width < padded or len(pieces) == 1)


def test_split_is_the_narrowest_cover():
    # Brute force over every multiset of at most three widths 16..128: none covers the dim with fewer columns.
    widths = [16, 32, 64, 128]
    covers = {(a,) for a in widths} | {(a, b) for a in widths for b in widths} | {(a, b, c) for a in widths for b in
                                                                                  widths for c in widths}  # fmt: skip
    for head_dim in kernels.HEAD_DIMS:
        narrowest = min(sum(c) for c in covers if sum(c) >= head_dim)
        assert sum(kernels.split_head_dim(head_dim)) == narrowest, head_dim


def test_launch_tiling_splits_exactly_where_padding_wastes_columns():
    split = [d for d in kernels.HEAD_DIMS if kernels.head_dim_pieces(d)[1] > 0]
    assert tuple(split) == SPLIT_HEAD_DIMS
    assert kernels.head_dim_pieces(72) == (64, 16, 0) and kernels.head_dim_pieces(104) == (64, 32, 16)
    for head_dim in kernels.HEAD_DIMS:  # the others keep today's single padded tile (and its compiled code)
        if head_dim not in SPLIT_HEAD_DIMS:
            assert kernels.head_dim_pieces(head_dim) == (kernels.block_d(head_dim), 0, 0)
    for head_dim in SPLIT_HEAD_DIMS:  # at most 12.5% of the tile's columns wasted (40: 16.7%, see above)
        assert kernels.tile_waste(head_dim, kernels.head_dim_pieces(head_dim)) <= (0.17 if head_dim == 40 else 0.125)


def test_ampere_keeps_the_padded_tile():
    # On the 80 tables (Ampere/Ada) the per-piece tiles make some candidate configs spill: padded there, pieces on
    # Hopper and newer and in the interpreter (arch None).
    for head_dim in SPLIT_HEAD_DIMS:
        assert kernels.head_dim_pieces(head_dim, 80) == kernels.head_dim_pieces(head_dim, 89)
        assert kernels.head_dim_pieces(head_dim, 86) == (kernels.block_d(head_dim), 0, 0)
        assert kernels.head_dim_pieces(head_dim, 90) == kernels.head_dim_pieces(head_dim, 100)
        assert kernels.head_dim_pieces(head_dim, 90) == kernels.head_dim_pieces(head_dim) != (128, 0, 0)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-8, ValueError), (72.0, TypeError), (True, TypeError)])
def test_split_rejects_bad_head_dims(bad, error):
    with pytest.raises(error, match="head_dim"):
        kernels.split_head_dim(bad)


# ------------------------------------------------------------------------------------------------
# Dispatch


def test_supports_every_multiple_of_8_in_32_to_128_and_nothing_else():
    assert attention_triton.SUPPORTED_HEAD_DIMS == kernels.HEAD_DIMS
    for head_dim in range(8, 257, 4):
        reason = attention_triton.supports(attention_call(DEVICE, torch.float16, head_dim))
        if head_dim % 8 == 0 and 32 <= head_dim <= 128:
            assert reason is None, (head_dim, reason)
        else:
            assert f"got head_dim={head_dim}" in reason
    siglip = attention_call(DEVICE, torch.float16, 72, prologue=("rope:half", "q_norm:layer", "k_norm:layer"))
    assert attention_triton.supports(siglip) is None
    assert dispatch.explain("qkv_attention", "triton", attention_call(DEVICE, torch.float32, 72))[0] == "triton"


# ------------------------------------------------------------------------------------------------
# What the launches pass


def _launch_constants(monkeypatch, qkv, heads, **kwargs) -> dict[str, dict]:
    """The keyword arguments each attention kernel is launched with for one forward and backward of ``qkv``."""
    seen = {}
    for name in ("attn_fwd_kernel", "attn_bwd_preprocess_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel"):
        real = getattr(kernels, name)

        class Spy:
            def __getitem__(self, grid, real=real, name=name):
                def run(*args, **constants):
                    seen[name] = constants
                    return real[grid](*args, **constants)

                return run

        monkeypatch.setattr(kernels, name, Spy())
    qkv = qkv.detach().requires_grad_(True)
    ops.qkv_attention(qkv, heads, backend="triton", **kwargs).sum().backward()
    return seen


@pytest.mark.parametrize("head_dim", [64, 72, 80, 104, 120])
def test_launches_pass_pieces_and_stride_alignment(monkeypatch, head_dim):
    if DEVICE.type != "cpu":
        pytest.skip("spies on the interpreter's plain launches (a GPU launch goes through the autotuner)")
    seen = _launch_constants(monkeypatch, torch.randn(1, 5, 3 * 2 * head_dim), 2)
    pieces = dict(zip(("BLOCK_D", "D1", "D2"), kernels.head_dim_pieces(head_dim)))
    padded = dict(BLOCK_D=kernels.block_d(head_dim), D1=0, D2=0)
    for name, constants in seen.items():
        launched = {key: constants.get(key, 0) for key in pieces}
        if name == "attn_bwd_preprocess_kernel":  # rowsum(dO * O): one padded tile, memory-bound
            assert launched == padded, name
        else:  # forward, dQ and dK/dV
            assert launched == (pieces if head_dim in SPLIT_HEAD_DIMS else padded), name
        if head_dim not in SPLIT_HEAD_DIMS:  # the plain launch: no piece arguments at all
            assert "D1" not in constants and "D2" not in constants, name
        assert constants.get("STRIDE_ALIGN", 1) == (8 if head_dim % 16 else 1), name


def test_prologue_and_unaligned_strides_keep_the_padded_unaligned_launch(monkeypatch):
    if DEVICE.type != "cpu":
        pytest.skip("spies on the interpreter's plain launches (a GPU launch goes through the autotuner)")
    qkv = torch.randn(1, 6, 3 * 72)
    seen = _launch_constants(monkeypatch, qkv, 1, rope=_table(6, 72, "half"), rope_layout="half")
    assert all(constants["BLOCK_D"] == 128 and "D1" not in constants for constants in seen.values())
    # q, k, v of an [N, 3C + 4] buffer: the token stride 220 is not a multiple of 8, so no alignment is claimed.
    wide = torch.randn(1, 6, 3 * 72 + 4)[..., : 3 * 72]
    seen = _launch_constants(monkeypatch, wide, 1)
    assert all("STRIDE_ALIGN" not in constants for constants in seen.values())
    assert seen["attn_fwd_kernel"]["D1"] == seen["attn_bwd_dq_kernel"]["D1"] == seen["attn_bwd_dkdv_kernel"]["D1"] == 16
    _check_qkv_attention(wide, 1, name="unaligned D=72")


# ------------------------------------------------------------------------------------------------
# Accuracy against the fp64 spec (forward and the qkv gradient)


@FP32_FP16
@pytest.mark.parametrize("head_dim, tokens", [(64, 37), (40, 33), (72, 37), (88, 9), (104, 40), (112, 31), (120, 17)])
def test_qkv_attention_matches_reference(head_dim, tokens, dtype):
    # Ragged token counts: the interpreter's tiles (64 queries, 32 keys) end in partial blocks.
    qkv = torch.randn(1, tokens, 3 * 2 * head_dim, generator=torch.Generator().manual_seed(head_dim)).to(DEVICE, dtype)
    out, (grad,) = _check_qkv_attention(qkv, 2, name=f"qkv N={tokens} D={head_dim} {dtype}")
    assert out.shape == (1, tokens, 2 * head_dim) and grad.shape == qkv.shape


@FP32_FP16
@pytest.mark.parametrize("head_dim", [72, 104])
@pytest.mark.parametrize(
    "layout, q_kind, k_kind", [("half", "layer", "layer"), ("interleaved", "rms", None)], ids=["half+ln", "inter+rms"]
)
def test_prologue_matches_reference(head_dim, layout, q_kind, k_kind, dtype):
    tokens, prefix = 35, 1  # one class token, a 34-row table: rotate-half partners cross the pieces at 72 and 104
    qkv = _qkv(1, tokens, 1, head_dim, dtype, seed=head_dim)
    rope = _table(tokens - prefix, head_dim, layout)
    _check(qkv, 1, rope=rope, prefix=prefix, layout=layout, q_kind=q_kind, k_kind=k_kind, name=f"D={head_dim}")


@pytest.mark.parametrize("head_dim", [72, 104])
def test_packed_sequences_and_key_padding_mask_on_pieces(head_dim):
    # The piece path under VARLEN (per-sequence pointer shifts) and KEY_MASK (masked keys, fully masked rows).
    qkv, cu_seqlens, max_seqlen = _packed(lengths=(7, 0, 1, 37), heads=1, head_dim=head_dim)
    _check_varlen(f"varlen D={head_dim}", _triton, _per_sequence_sdpa, qkv, cu_seqlens, max_seqlen, heads=1)
    keep = _key_padding_mask(37)
    qkv = torch.randn(4, 37, 3 * head_dim, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ours = _run(_masked("triton", keep), [qkv])
    theirs = _run(_masked("torch", keep), [qkv])
    exact = _run(lambda x: reference.qkv_attention(x, 1, key_padding_mask=keep), [qkv.double()])
    _check_against_reference(f"key mask D={head_dim}", ours, theirs, exact)


# ------------------------------------------------------------------------------------------------
# GPU: bfloat16 and longer sequences (skipped without CUDA)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", NEW_HEAD_DIMS)
def test_gpu_qkv_attention(head_dim, dtype):
    qkv = torch.randn(2, 729, 3 * 4 * head_dim, device=DEVICE).to(dtype)  # SigLIP so400m/14-384: 27 x 27 patches
    _check_qkv_attention(qkv, 4, name=f"gpu qkv D={head_dim} {dtype}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("head_dim", [72, 104, 112])
@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_gpu_prologue_bf16(layout, head_dim):
    grid = (27, 27)
    tokens, prefix = 1 + grid[0] * grid[1], 1
    rope = _table(tokens - prefix, head_dim, layout, "grid", grid)
    qkv = _qkv(2, tokens, 3, head_dim, torch.bfloat16)
    _check(qkv, 3, rope=rope, prefix=prefix, layout=layout, q_kind="layer", k_kind="rms", name=f"gpu D={head_dim}")
