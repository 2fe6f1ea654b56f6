"""Images of different sizes in one batch: packed variable-length attention against padding plus a mask.

The op timed is a ViT block's attention between its Linears for a batch whose images have different token counts
(NaFlex / NaViT): fastvit's ``ops.varlen_qkv_attention`` on the tokens packed back to back ([T, 3C] with
``cu_seqlens``: no padded work), against what timm's NaFlexViT does (the batch padded to the longest image,
``F.scaled_dot_product_attention`` with a [B, 1, 1, N] key mask, under PyTorch's default SDPA choice), fastvit's
kernel on the same padded batch with its key-padding mask (fully masked key blocks skipped), and PyTorch's own
``torch.nn.attention.varlen.varlen_attn`` where this torch has it (pytorch#164502, CUDA only). Modes: ``fwd`` and
``fwd+bwd`` (gradient of qkv).

The mix: on a GPU, 64 images whose token counts (NaFlex sizes at patch 16 from 128 to 384 px, plus a class token)
pad to 45-50% of the padded batch (the ``padding`` figure recorded with each result); bfloat16, 12 heads of 64
(ViT-B). Without one (smoke mode): 4 tiny sequences in float32, the Triton candidates in Triton's interpreter; it
proves the suite runs, the numbers say nothing about GPUs. FLOPs count only the valid tokens
(4·H·D·Σ L_i² forward, 3.5x that forward+backward, FlashAttention-2's convention), so a padded candidate's
TFLOP/s is its useful throughput. Every candidate's output (and gradient) is checked against the per-sequence fp32
reference before it is timed.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness import DEVICE, SMOKE, check_close, record, rotating, run_benchmark
from fastvit import dispatch, ops, reference
from fastvit.packing import PackedSequences

if SMOKE:
    MIXES = {"smoke": ((5, 17, 33, 50), 2, 32)}
    DTYPE, REL_TOL, ROUNDS = torch.float32, 1e-4, 3
else:

    def _naflex_lengths(count: int, seed: int = 0) -> tuple[int, ...]:
        """Token counts of ``count`` images with random sides of 8-24 patches (128-384 px at patch 16) + 1."""
        gen = torch.Generator().manual_seed(seed)
        sides = torch.randint(8, 25, (count, 2), generator=gen)
        return tuple(int(h * w) + 1 for h, w in sides.tolist())

    # name: (token counts, heads, head_dim)
    MIXES = {"naflex_b16_mixed_128-384px": (_naflex_lengths(64), 12, 64)}
    DTYPE, REL_TOL, ROUNDS = torch.bfloat16, 2e-2, 20

CANDIDATES = ["fastvit triton varlen", "fastvit triton padded+mask", "sdpa padded+mask", "torch varlen_attn"]
MODES = ["fwd", "fwd+bwd"]


def _padding(packing: PackedSequences) -> tuple[Callable, torch.Tensor]:
    """A function taking packed [T, X] rows to the padded [B, L, X] batch (zeros at padding: a padded pipeline's
    data, and its output gradient there, since masked pooling drops those rows), and the [B, L] key mask."""
    lengths = packing.cu_seqlens.long().diff()
    keep = torch.arange(packing.max_seqlen, device=lengths.device) < lengths[:, None]

    def to_padded(rows: torch.Tensor) -> torch.Tensor:
        padded = rows.new_zeros(*keep.shape, rows.shape[-1])
        padded[keep] = rows
        return padded

    return to_padded, keep


def _sdpa_padded(qkv_padded: torch.Tensor, keep: torch.Tensor, heads: int) -> torch.Tensor:
    """timm NaFlexViT's attention: permute views, SDPA with a [B, 1, 1, L] bool key mask, back to [B, L, C]."""
    batch, tokens, width3 = qkv_padded.shape
    q, k, v = qkv_padded.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    return out.transpose(1, 2).reshape(batch, tokens, width3 // 3)


def _candidate(candidate: str, packing: PackedSequences, heads: int, head_dim: int):
    """(layout, fn, unlayout): ``layout`` turns packed [T, X] rows into the candidate's input layout (outside the
    timed region: a padded pipeline's data arrive padded), ``fn`` is the timed attention, ``unlayout`` takes its
    output (or gradient) back to packed rows for the correctness check."""
    cu_seqlens, max_seqlen = packing
    packed = (lambda rows: rows, lambda rows: rows)
    if candidate.startswith("fastvit triton"):
        reason = dispatch.backend_unusable_reason("triton", DEVICE)
        if reason is not None:
            pytest.skip(reason)
    if candidate == "fastvit triton varlen":
        return (
            packed[0],
            lambda qkv: ops.varlen_qkv_attention(
                qkv, cu_seqlens, max_seqlen, heads, check_seqlens=False, backend="triton"
            ),
            packed[1],
        )
    if candidate in ("fastvit triton padded+mask", "sdpa padded+mask"):
        to_padded, keep = _padding(packing)
        if candidate == "sdpa padded+mask":
            return to_padded, lambda qkv: _sdpa_padded(qkv, keep, heads), lambda out: out[keep]
        return (
            to_padded,
            lambda qkv: ops.qkv_attention(qkv, heads, backend="triton", key_padding_mask=keep),
            (lambda out: out[keep]),
        )
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        pytest.skip("this torch has no torch.nn.attention.varlen.varlen_attn")
    if DEVICE.type != "cuda":
        pytest.skip("torch.nn.attention.varlen.varlen_attn runs on CUDA only")

    def torch_varlen(qkv):
        q, k, v = qkv.unflatten(-1, (3, heads, head_dim)).unbind(1)  # [T, H, D] views
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen).flatten(1)

    return packed[0], torch_varlen, packed[1]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("mix", list(MIXES))
def test_varlen_attention(benchmark, mix, candidate, mode):
    lengths, heads, head_dim = MIXES[mix]
    packing = PackedSequences.from_lengths(lengths, device=DEVICE)
    layout, fn, unlayout = _candidate(candidate, packing, heads, head_dim)
    tokens, width = sum(lengths), heads * head_dim
    padding = 1.0 - tokens / (len(lengths) * max(lengths))
    gen = torch.Generator().manual_seed(0)

    def make_packed():
        return torch.randn(tokens, 3 * width, generator=gen), torch.randn(tokens, width, generator=gen)

    def make_inputs():
        qkv, grad_out = make_packed()
        qkv = layout(qkv.to(DEVICE, DTYPE)).requires_grad_(mode != "fwd")
        return qkv, layout(grad_out.to(DEVICE, DTYPE))

    element = torch.finfo(DTYPE).bits // 8
    next_inputs = rotating(make_inputs, bytes_per_set=4 * len(lengths) * max(lengths) * width * element)

    # Correctness first: output (and dqkv) vs the per-sequence fp32 reference, in packed rows.
    qkv, grad_out = next_inputs()
    try:
        out = fn(qkv)
        grad = torch.autograd.grad(out, qkv, grad_out)[0] if mode != "fwd" else None
    except RuntimeError as exc:  # e.g. torch varlen_attn or an SDPA kernel that does not take this dtype/device
        pytest.skip(f"{candidate} cannot run {mix} in {DTYPE}: {str(exc).splitlines()[0][:200]}")
    qkv32 = unlayout(qkv.detach()).float().requires_grad_(mode != "fwd")
    ref = reference.varlen_qkv_attention(qkv32, packing.cu_seqlens, heads)
    errors = {"out": check_close(f"{candidate} out", unlayout(out), ref, atol=0.0, rtol=REL_TOL)}
    if grad is not None:
        (ref_grad,) = torch.autograd.grad(ref, qkv32, unlayout(grad_out).float())
        errors["dqkv"] = check_close(f"{candidate} dqkv", unlayout(grad), ref_grad, atol=0.0, rtol=REL_TOL)

    def run():
        qkv, grad_out = next_inputs()
        if mode == "fwd":
            with torch.no_grad():
                fn(qkv)
        else:
            torch.autograd.grad(fn(qkv), qkv, grad_out)

    run_benchmark(benchmark, run, rounds=ROUNDS)
    forward_flops = 4.0 * heads * head_dim * sum(n * n for n in lengths)
    moved = 4 * tokens * width * element * (1 if mode == "fwd" else 3)
    record(
        benchmark, "varlen_attention", f"{mix} {mode}", candidate,
        flops=forward_flops if mode == "fwd" else 3.5 * forward_flops, bytes_moved=moved, items=len(lengths),
        item_name="img", primary="tflops", mode=mode, images=len(lengths), tokens=tokens, max_seqlen=max(lengths),
        padding=round(padding, 4), heads=heads, head_dim=head_dim, dtype=str(DTYPE), max_error=errors,
    )  # fmt: skip
