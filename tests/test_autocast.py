"""Every op under CPU autocast: each backend answers what the torch backend answers (dtype and values), or refuses.

Custom ops are not cast by ``torch.autocast``, so each fused backend applies autocast's rule itself (Linears in the
autocast dtype, LayerNorm as ``F.layer_norm`` does under that autocast). On CPU the ``cuda`` backend is the
extension's C++ twin of the CUDA kernels (same Python autocast handling); the ``triton`` backend runs in the
interpreter, which cannot compute bfloat16 ``tl.dot`` and so refuses bfloat16 (under CPU autocast its inputs are
cast to bfloat16, as matmuls are) with a ``TypeError``.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastvit import ops

from utils import DTYPE_TOLS, triton_skip_reason

EXTENSION_REASON = "FASTVIT_NO_EXT=1" if os.environ.get("FASTVIT_NO_EXT") == "1" else None


def _inputs(op: str) -> tuple[list, dict]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    if op == "layer_norm":
        return [rand(2, 7, 48, scale=3.0) + 1.0, 1 + rand(48, scale=0.1), rand(48, scale=0.1)], {}
    if op == "ln_mlp":
        c, h = 48, 96
        return [rand(2, 7, c), 1 + rand(c, scale=0.1), rand(c, scale=0.1), rand(h, c, scale=0.1), rand(h, scale=0.1),
                rand(c, h, scale=0.1), rand(c, scale=0.1)], {}  # fmt: skip
    if op == "linear_residual":
        return [rand(2, 7, 48), rand(64, 48, scale=0.1), rand(64, scale=0.1), rand(2, 7, 64)], {}
    if op == "qkv_attention":
        return [rand(2, 7, 3 * 2 * 32)], {"num_heads": 2}
    if op == "attention":
        return [rand(1, 2, 7, 32), rand(1, 2, 9, 32), rand(1, 2, 9, 32)], {}
    if op == "patch_embed":
        return [rand(2, 3, 8, 8), rand(16, 3, 4, 4, scale=0.1), rand(16), rand(1, 5, 16), rand(1, 1, 16)], {}
    raise KeyError(op)


CASES = [
    ("layer_norm", "cuda"),
    ("ln_mlp", "cuda"),
    ("linear_residual", "cuda"),
    ("qkv_attention", "triton"),
    ("attention", "triton"),
    ("patch_embed", "triton"),
]


def _run(op, backend, args, kwargs, x_dtype):
    args = [args[0].to(x_dtype), *args[1:]]  # the activations in x_dtype, the parameters fp32 (master weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return getattr(ops, op)(*args, **kwargs, backend=backend)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=["fp32-x", "bf16-x"])
@pytest.mark.parametrize("op, backend", CASES, ids=[f"{op}-{b}" for op, b in CASES])
def test_cpu_bf16_autocast_answers_as_the_torch_backend_or_refuses(op, backend, x_dtype):
    reason = triton_skip_reason() if backend == "triton" else EXTENSION_REASON
    if reason is not None:
        pytest.skip(reason)
    args, kwargs = _inputs(op)
    if op in ("attention", "qkv_attention", "patch_embed") and x_dtype == torch.bfloat16:
        args = [a.to(x_dtype) for a in args]  # one dtype for every tensor of these ops outside the Linears' rule
    expected = _run(op, "torch", args, kwargs, x_dtype)
    if backend == "triton":  # the interpreter's bf16 tl.dot is broken: refused, never answered
        with pytest.raises(TypeError, match="bfloat16 under Triton's CPU interpreter"):
            _run(op, backend, args, kwargs, x_dtype)
        return
    got = _run(op, backend, args, kwargs, x_dtype)
    assert got.dtype == expected.dtype, (got.dtype, expected.dtype)
    tols = DTYPE_TOLS[torch.bfloat16]
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(got.float(), expected.float(), atol=tols["atol"] * max(scale, 1.0), rtol=tols["rtol"])
