"""The MLP half of a ViT block: fused ``ops.ln_mlp`` (C++/CUDA extension, Triton GEMMs) vs eager and compiled
PyTorch; and each of a ViT block's four fused GEMMs (``ops.ln_linear``) against ``torch.mm`` at the same shape.

Candidates, same weights and inputs:
  "fastvit cuda"   ``fastvit.ops.ln_mlp(..., backend='cuda')``: LN kernel, cuBLASLt GEMMs with bias /
                   GELU / residual epilogues, exact-GELU kernel; fused backward.
  "fastvit triton" ``fastvit.ops.ln_mlp(..., backend='triton')``: two Triton GEMMs, fc1 with the LayerNorm
                   prologue and bias + exact-GELU epilogue, fc2 with the bias + residual epilogue; the GELU
                   derivative fused into the backward GEMMs. Its wins (per width, batch bucket, dtype, GPU) go
                   into ``fastvit/gemm_choices.json``, which ``auto`` reads.
  "fastvit triton tma"  the same with the persistent TMA forward GEMMs (``hopper_path()``, sm_90 only; off by
                   default elsewhere, not yet measured): skipped where the forward would fall back to the
                   pointer kernel. Not read by ``benchmarks/gemm_choices.py``.
  "torch eager"    ``x + timm.layers.Mlp(nn.LayerNorm(x))`` (baseline).
  "torch compile"  ``torch.compile`` of the same module (baseline).
Modes: "fwd" (inference, no autograd) and "fwd+bwd" (forward, then the gradients of x and of every
parameter). On a GPU: ViT-S/B/L/H widths (384, 768, 1024, 1280; hidden = 4x), tokens = batch x 197
with batch 32 and 128, bf16. FLOPs are the two GEMMs (4·M·C·H forward, 3x that for fwd+bwd), so
TFLOP/s and MFU (against the measured bf16 matmul peak) compare candidates doing the same work: the
floor this GEMM-bound op chases is the two (six) GEMMs at the matmul peak.

Without a GPU (smoke mode): one tiny shape in fp32 on the extension's C++ CPU path; the compiled
candidate is skipped (compiling on CPU takes long and says nothing about GPUs). Every candidate's
output (and, for fwd+bwd, every gradient) is checked against an fp32 reference before it is timed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastvit
from benchmarks.harness import DEVICE, SMOKE, check_close, profile_cases, record, rotating, run_benchmark
from fastvit import dispatch
from fastvit.ops.triton import linear as linear_triton

try:
    from timm.layers import Mlp
except ImportError:  # the same module names and math as timm's
    from fastvit.layers import Mlp

TOKENS_PER_IMAGE = 197
if SMOKE:
    WIDTHS = {"tiny": 32}
    BATCHES = [2]
    DTYPE, REL_TOL = torch.float32, 1e-4
else:
    WIDTHS = profile_cases({"vit_small": 384, "vit_base": 768, "vit_large": 1024, "vit_huge": 1280}, ["vit_base"])
    BATCHES = profile_cases([32, 128], [128])
    DTYPE, REL_TOL = torch.bfloat16, 3e-2
TMA = "fastvit triton tma"
CANDIDATES = ["fastvit cuda", "fastvit triton", TMA, "torch eager", "torch compile"]
FUSED_BACKENDS = {"fastvit cuda": "cuda", "fastvit triton": "triton", TMA: "triton"}
GPU_ONLY = {"torch compile", TMA}
MODES = ["fwd", "fwd+bwd"]


class EagerHalfBlock(nn.Module):
    """``x + mlp(norm(x))`` with PyTorch's LayerNorm and timm's Mlp: what a timm ViT block runs."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, hidden, act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def _module(width: int) -> EagerHalfBlock:
    torch.manual_seed(0)
    module = EagerHalfBlock(width, 4 * width)
    with torch.no_grad():  # non-trivial LN affine parameters
        module.norm.weight.uniform_(0.5, 1.5)
        module.norm.bias.normal_(0.0, 0.1)
    return module.to(DEVICE, DTYPE)


def _params(module: EagerHalfBlock) -> list[torch.Tensor]:
    mlp = module.mlp
    return [module.norm.weight, module.norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias]


def _on_hopper_path(fn):
    """``fn`` with its forward GEMMs on the persistent TMA kernel (``hopper_path``); skips the case where one would
    fall back to the pointer kernel (its time would not be the TMA kernel's)."""

    def run(*args):
        with linear_triton.hopper_path() as path:
            out = fn(*args)
        if path.fallbacks or not path.launches:
            pytest.skip(f"{TMA}: the TMA forward did not run ({path.fallbacks or 'no forward launch'})")
        return out

    return run


def _candidate(candidate: str, module: EagerHalfBlock):
    if candidate in FUSED_BACKENDS:
        params = _params(module)
        fn = lambda x: fastvit.ops.ln_mlp(x, *params, eps=1e-6, backend=FUSED_BACKENDS[candidate])  # noqa: E731
        return _on_hopper_path(fn) if candidate == TMA else fn
    if candidate == "torch compile":
        return torch.compile(module)
    return module


def _skip_unusable(candidate: str) -> None:
    backend = FUSED_BACKENDS.get(candidate)
    reason = None if backend is None else dispatch.backend_unusable_reason(backend, DEVICE)
    if reason is None and candidate == TMA and (DEVICE.type != "cuda" or torch.cuda.get_device_capability()[0] != 9):
        reason = "the TMA forward is for sm_90 (Hopper) GPUs"
    if reason is not None:
        pytest.skip(f"{candidate}: {reason}")


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(WIDTHS))
def test_ln_mlp(benchmark, name, batch, candidate, mode):
    if SMOKE and candidate in GPU_ONLY:
        pytest.skip(f"{candidate}: GPU-only candidate (compiling on CPU takes long and measures nothing useful)")
    _skip_unusable(candidate)
    width = WIDTHS[name]
    hidden = 4 * width
    tokens = batch * TOKENS_PER_IMAGE
    module = _module(width)
    params = _params(module)
    fn = _candidate(candidate, module)

    def make_inputs():
        x = torch.randn(batch, TOKENS_PER_IMAGE, width, device=DEVICE, dtype=DTYPE)
        return x.requires_grad_(mode == "fwd+bwd"), torch.randn_like(x)

    next_inputs = rotating(make_inputs, 2 * tokens * width * torch.finfo(DTYPE).bits // 8)

    # Correctness first: output (and every gradient) vs the fp32 reference of the same weights.
    x, grad_out = next_inputs()
    params32 = [p.detach().float().requires_grad_(True) for p in params]
    x32 = x.detach().float().requires_grad_(True)
    ref = fastvit.ops.ln_mlp(x32, *params32, backend="torch")
    scale = max(ref.abs().max().item(), 1.0)
    out = fn(x)
    error = check_close(f"{candidate} out", out, ref, atol=REL_TOL * scale)
    if mode == "fwd+bwd":
        ref_grads = torch.autograd.grad(ref, [x32, *params32], grad_out.float())
        grads = torch.autograd.grad(out, [x, *params], grad_out)
        for label, got, want in zip(("x", "ln_w", "ln_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b"), grads, ref_grads):
            check_close(f"{candidate} grad {label}", got, want, atol=REL_TOL * max(want.abs().max().item(), 1.0))

    if mode == "fwd":

        def run():
            x, _ = next_inputs()
            with torch.inference_mode():
                return fn(x)

    else:

        def run():
            x, grad_out = next_inputs()
            return torch.autograd.grad(fn(x), [x, *params], grad_out)

    run_benchmark(benchmark, run)
    gemm_flops = 4.0 * tokens * width * hidden
    weights = _nbytes(*params)
    activations = 2 * _nbytes(x)  # x read, out written
    if mode == "fwd+bwd":  # dy read, x read again, dx written, weight gradients written
        activations += 3 * _nbytes(x)
        weights *= 2
    record(
        benchmark, "ln_mlp", f"{name} C{width} b{batch} {mode}", candidate,
        flops=gemm_flops if mode == "fwd" else 3 * gemm_flops, bytes_moved=weights + activations, items=tokens,
        item_name="token", model=name, width=width, hidden=hidden, batch=batch, tokens=tokens, mode=mode,
        dtype=str(DTYPE), max_abs_error=error,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Each fused GEMM of a ViT block vs torch.mm at the same shape (the floor: the bare GEMM on cuBLAS)

# name -> (K, N as multiples of the width, LayerNorm prologue, activation, residual): qkv, proj, fc1, fc2
BLOCK_GEMMS = {
    "qkv": (1, 3, True, "none", False),
    "proj": (1, 1, False, "none", True),
    "fc1": (1, 4, True, "gelu", False),
    "fc2": (4, 1, False, "none", True),
}
GEMM_WIDTHS = {"tiny": 32} if SMOKE else profile_cases({"vit_base": 768, "vit_large": 1024}, ["vit_base"])
GEMM_BATCH = 1 if SMOKE else 256
GEMM_CANDIDATES = ["fastvit triton", TMA, "torch mm", "torch eager"]


@pytest.mark.parametrize("candidate", GEMM_CANDIDATES)
@pytest.mark.parametrize("gemm", list(BLOCK_GEMMS))
@pytest.mark.parametrize("name", list(GEMM_WIDTHS))
def test_block_gemm(benchmark, name, gemm, candidate):
    """Forward TFLOP/s of one fused GEMM (``ops.ln_linear``, Triton) vs ``torch.mm`` (no glue: the floor the fused
    kernel chases, goal >= 0.95x) and vs eager PyTorch doing the same glue (LN, bias, GELU, residual unfused)."""
    _skip_unusable(candidate)
    width = GEMM_WIDTHS[name]
    k_mult, n_mult, layer_norm, activation, with_residual = BLOCK_GEMMS[gemm]
    rows, k, n = GEMM_BATCH * TOKENS_PER_IMAGE, k_mult * width, n_mult * width
    torch.manual_seed(0)
    weight = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * k**-0.5
    bias = torch.randn(n, device=DEVICE, dtype=DTYPE) * 0.1
    ln_weight, ln_bias = (torch.ones(k, device=DEVICE, dtype=DTYPE), torch.zeros(k, device=DEVICE, dtype=DTYPE))
    if not layer_norm:
        ln_weight = ln_bias = None

    def make_inputs():
        x = torch.randn(rows, k, device=DEVICE, dtype=DTYPE)
        return x, torch.randn(rows, n, device=DEVICE, dtype=DTYPE) if with_residual else None

    next_inputs = rotating(make_inputs, (rows * k + rows * n) * torch.finfo(DTYPE).bits // 8)
    glue = dict(eps=1e-6, activation=activation)
    if candidate == "torch mm":
        fn = lambda x, residual: torch.mm(x, weight.t())  # noqa: E731
    else:
        backend = FUSED_BACKENDS.get(candidate, "torch")
        fn = lambda x, residual: fastvit.ops.ln_linear(  # noqa: E731
            x, ln_weight, ln_bias, weight, bias, **glue, residual=residual, backend=backend
        )
        fn = _on_hopper_path(fn) if candidate == TMA else fn
    x, residual = next_inputs()
    if candidate != "torch mm":  # correctness first (torch.mm is the bare GEMM: nothing to compare)
        ref = fastvit.ops.ln_linear(
            *(None if t is None else t.float() for t in (x, ln_weight, ln_bias, weight, bias)), **glue,
            residual=None if residual is None else residual.float(), backend="torch",
        )  # fmt: skip
        error = check_close(f"{candidate} {gemm}", fn(x, residual), ref, atol=REL_TOL * max(ref.abs().max().item(), 1))
    else:
        error = None

    def run():
        with torch.inference_mode():
            return fn(*next_inputs())

    run_benchmark(benchmark, run)
    record(
        benchmark, "block_gemm", f"{name} {gemm} {rows}x{k}->{n}", candidate, flops=2.0 * rows * k * n,
        bytes_moved=(rows * k + n * k + rows * n * (2 if with_residual else 1)) * torch.finfo(DTYPE).bits // 8,
        primary="tflops", model=name, gemm=gemm, rows=rows, k=k, n=n, dtype=str(DTYPE), max_abs_error=error,
    )  # fmt: skip
