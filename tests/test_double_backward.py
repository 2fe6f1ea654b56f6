"""Higher-order gradients: the torch backend supports them; every fused backend refuses them with a clear error.

A fused backward is not itself differentiable. ``torch.autograd.grad(..., create_graph=True)`` through one must
raise (naming the way out), never return second derivatives of 0 or leave parameter gradients missing.
"""

from __future__ import annotations

import os

import pytest
import torch

import fastvit
from fastvit import dispatch, ops

from utils import DEVICE, triton_skip_reason

TRITON_REASON = triton_skip_reason()
EXTENSION_REASON = "FASTVIT_NO_EXT=1" if os.environ.get("FASTVIT_NO_EXT") == "1" else None


def _inputs(op: str, dtype: torch.dtype, head_dim: int = 32) -> tuple[list[torch.Tensor], dict]:
    """Small inputs for ``op`` (tensors needing gradients, extra arguments); the Triton kernels need head dims of
    32 or more, gradgradcheck wants few elements."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype).requires_grad_(True)

    if op == "qkv_attention":
        return [rand(1, 3, 3 * 2 * head_dim)], dict(num_heads=2)
    if op == "attention":
        return [rand(1, 2, 3, head_dim), rand(1, 2, 4, head_dim), rand(1, 2, 4, head_dim)], {}
    if op == "patch_embed":
        return [rand(1, 2, 8, 8), rand(6, 2, 4, 4), rand(6), rand(1, 5, 6), rand(1, 1, 6)], {}
    if op == "layer_norm":
        return [rand(3, 6), rand(6), rand(6)], {}
    if op == "ln_mlp":
        return [rand(2, 6), rand(6), rand(6), rand(8, 6), rand(8), rand(6, 8), rand(6)], {}
    if op == "linear_residual":
        return [rand(2, 5), rand(6, 5), rand(6), rand(2, 6)], {}
    raise KeyError(op)


OPS = ["qkv_attention", "attention", "patch_embed", "layer_norm", "ln_mlp", "linear_residual"]
FUSED = [(op, backend) for op in OPS for backend in dispatch.implementations(op) if backend != "torch"]


def _call(op, tensors, extra, backend):
    return getattr(ops, op)(*tensors, **extra, backend=backend)


@pytest.mark.parametrize("op", OPS)
def test_torch_backend_passes_gradgradcheck(op):
    # The torch backend's attention is SDPA, whose fused CPU/GPU kernels have no double backward (PyTorch raises);
    # its math kernel has one, as timm's attention.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tensors, extra = _inputs(op, torch.float64, head_dim=4)
    with sdpa_kernel(SDPBackend.MATH):
        assert torch.autograd.gradgradcheck(lambda *t: _call(op, t, extra, "torch"), tensors, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("op, backend", FUSED, ids=[f"{op}-{b}" for op, b in FUSED])
def test_fused_backends_refuse_double_backward(op, backend):
    reason = TRITON_REASON if backend == "triton" else EXTENSION_REASON
    if reason is not None:
        pytest.skip(reason)
    dtype = torch.float32 if backend == "triton" else torch.float64  # the interpreter takes fp16/fp32
    tensors, extra = _inputs(op, dtype)
    out = _call(op, tensors, extra, backend)
    # A plain backward works...
    grads = torch.autograd.grad(out.square().sum(), tensors)
    assert all(g is not None for g in grads)
    # ...a differentiable one is refused.
    with pytest.raises(RuntimeError, match=f"{op}: the fused backward is not differentiable.*backend='torch'"):
        torch.autograd.grad(_call(op, tensors, extra, backend).square().sum(), tensors, create_graph=True)


@pytest.mark.skipif(EXTENSION_REASON is not None, reason=str(EXTENSION_REASON))
def test_a_gradient_penalty_through_a_fused_model_is_refused_and_works_on_torch():
    model = fastvit.ViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=1, num_classes=3)
    x = torch.randn(2, 3, 16, 16, device=DEVICE, requires_grad=True)

    def penalty():
        (grad_x,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
        return grad_x.square().sum()

    model.set_backend({"layer_norm": "cuda", "ln_mlp": "cuda", "linear_residual": "cuda"})
    with pytest.raises(RuntimeError, match="not differentiable"):
        penalty()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model.set_backend("torch")
    with sdpa_kernel(SDPBackend.MATH):  # SDPA's fused kernels have no double backward (see above)
        penalty().backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
