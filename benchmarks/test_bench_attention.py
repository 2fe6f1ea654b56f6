"""Attention: fastvit's Triton kernel against every PyTorch SDPA backend and the naive reference.

The op timed is a ViT block's attention between its two Linears, ``[B, N, 3*C] -> [B, N, C]``:
fastvit reads the packed qkv buffer and writes the proj input directly; the SDPA candidates do what
timm does (reshape/permute views, ``F.scaled_dot_product_attention`` under one ``sdpa_kernel``
backend, transpose + reshape copy). Modes: ``fwd`` (inference, no autograd) and ``fwd+bwd``
(gradient of qkv). The floor to chase is the best SDPA backend (FlashAttention-2 / cuDNN) on the same
GPU in the same run; TFLOP/s and MFU are recorded against the measured bf16 matmul peak.

FLOPs (FlashAttention-2's convention): forward 4*B*H*N^2*D (q kᵀ and P v); the backward counts 2.5x
the forward (five N^2*D matmuls, q kᵀ recomputed), so forward+backward = 3.5x the forward.

On a GPU: ViT-S/B/L/H shapes (N = 197, 257, 577; D = 64, 80) and the families' head dims 72 (SigLIP so400m,
N = 729), 88, 104, 112 (CLIP g/bigG, EVA02-E) in bfloat16 with B*H = 768. Without one
(smoke mode): one tiny fp32 shape, the Triton candidate in Triton's interpreter; it proves the suite
runs, the numbers say nothing about GPUs. Every candidate's output (and gradient) is checked against
the fp32 reference before it is timed; an SDPA backend that cannot take a case is skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness import DEVICE, SMOKE, check_close, profile_cases, record, rotating, run_benchmark
from fastvit import dispatch, ops, reference
from fastvit.ops.attention import attention_call

if SMOKE:
    CASES = {"smoke": (1, 50, 2, 32)}
    DTYPE, REL_TOL, ROUNDS = torch.float32, 1e-4, 3
else:
    # name: (batch, tokens, heads, head_dim); B*H = 768 fills an A100/H100 several waves deep.
    CASES = {
        "vit_small_patch16_224": (128, 197, 6, 64),
        "vit_base_patch16_224": (64, 197, 12, 64),
        "vit_large_patch16_224": (48, 197, 16, 64),
        "vit_huge_patch14_224": (48, 257, 16, 80),
        "vit_base_patch16_384": (64, 577, 12, 64),
        # the families' head dims that are not powers of two (issue 18's goal: >= 1.2x the best SDPA backend)
        "vit_so400m_patch14_siglip_384": (48, 729, 16, 72),
        "vit_giant_patch14_clip_224": (32, 257, 24, 88),
        "vit_bigG_patch14_clip_224": (48, 257, 16, 104),
        "eva02_enormous_patch14_224": (48, 257, 16, 112),
    }
    CASES = profile_cases(
        CASES,
        headline=["vit_base_patch16_224", "vit_base_patch16_384"],  # N = 197, 577; D = 64
        families=["vit_so400m_patch14_siglip_384"],  # issue 18's goal: N = 729, D = 72
    )
    DTYPE, REL_TOL, ROUNDS = torch.bfloat16, 2e-2, 30

SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
CANDIDATES = ["fastvit triton", *(f"sdpa {name.lower()}" for name in SDPA_BACKENDS), "torch reference (naive)"]
MODES = ["fwd", "fwd+bwd"]


def _timm_sdpa(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """timm's Attention between its Linears: permute views -> SDPA -> [B, N, C]."""
    batch, tokens, width3 = qkv.shape
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, width3 // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width3 // 3)


def _candidate(candidate: str, num_heads: int, head_dim: int):
    if candidate == "fastvit triton":
        reason = dispatch.backend_unusable_reason("triton", DEVICE)
        chosen, why = dispatch.explain("qkv_attention", "triton", attention_call(DEVICE, DTYPE, head_dim))
        if reason is not None or chosen == "unusable":
            pytest.skip(reason or why)  # e.g. a head dim the kernel does not cover yet
        return lambda qkv: ops.qkv_attention(qkv, num_heads, backend="triton")
    if candidate == "torch reference (naive)":
        return lambda qkv: reference.qkv_attention(qkv, num_heads)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    name = candidate.removeprefix("sdpa ").upper()
    backend = getattr(SDPBackend, name, None)
    if backend is None:
        pytest.skip(f"this torch has no SDPBackend.{name}")

    def run(qkv):
        with sdpa_kernel(backend):
            return _timm_sdpa(qkv, num_heads)

    return run


def attention_flops(batch: int, tokens: int, heads: int, head_dim: int, mode: str) -> float:
    forward = 4.0 * batch * heads * tokens * tokens * head_dim
    return forward if mode == "fwd" else 3.5 * forward


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("case", list(CASES))
def test_attention(benchmark, case, candidate, mode):
    batch, tokens, heads, head_dim = CASES[case]
    fn = _candidate(candidate, heads, head_dim)
    width = heads * head_dim
    gen = torch.Generator().manual_seed(0)

    def make_inputs():
        qkv = torch.randn(batch, tokens, 3 * width, generator=gen).to(DEVICE, DTYPE)
        grad_out = torch.randn(batch, tokens, width, generator=gen).to(DEVICE, DTYPE)
        return qkv.requires_grad_(mode != "fwd"), grad_out

    element = torch.finfo(DTYPE).bits // 8
    next_inputs = rotating(make_inputs, bytes_per_set=4 * batch * tokens * width * element)

    # Correctness first, on the first input set: output (and dqkv) vs the fp32 reference.
    qkv, grad_out = next_inputs()
    try:
        out = fn(qkv)
        grad = torch.autograd.grad(out, qkv, grad_out)[0] if mode != "fwd" else None
    except RuntimeError as exc:  # an SDPA backend that does not take this shape, dtype or device
        pytest.skip(f"{candidate} cannot run {case} in {DTYPE}: {str(exc).splitlines()[0][:200]}")
    qkv32 = qkv.detach().float().requires_grad_(mode != "fwd")
    ref = reference.qkv_attention(qkv32, heads)
    errors = {"out": check_close(f"{candidate} out", out, ref, atol=0.0, rtol=REL_TOL)}
    if grad is not None:
        (ref_grad,) = torch.autograd.grad(ref, qkv32, grad_out.float())
        errors["dqkv"] = check_close(f"{candidate} dqkv", grad, ref_grad, atol=0.0, rtol=REL_TOL)

    if mode == "fwd":

        def run():
            qkv, _ = next_inputs()
            with torch.no_grad():
                fn(qkv)

    else:

        def run():
            qkv, grad_out = next_inputs()
            torch.autograd.grad(fn(qkv), qkv, grad_out)

    # Bytes a fused kernel must move: qkv in, out written; the backward reads qkv, out, dO and writes dqkv.
    moved = 4 * batch * tokens * width * element
    if mode != "fwd":
        moved += 8 * batch * tokens * width * element
    run_benchmark(benchmark, run, rounds=ROUNDS)
    record(
        benchmark, "attention", f"{case} {mode}", candidate,
        flops=attention_flops(batch, tokens, heads, head_dim, mode), bytes_moved=moved, primary="tflops",
        op="qkv_attention", mode=mode, batch=batch, tokens=tokens, heads=heads, head_dim=head_dim, dtype=str(DTYPE),
        max_error=errors, flops_convention="fwd 4*B*H*N^2*D; fwd+bwd 3.5x fwd (FlashAttention-2)",
    )  # fmt: skip
