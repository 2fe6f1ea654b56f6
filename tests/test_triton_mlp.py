"""``ln_mlp``'s ``triton`` backend on every variant of ``ops.ln_mlp``: two fused GEMMs (fc1 with the LayerNorm or
RMSNorm prologue and the GELU / GELU-tanh / QuickGELU / SwiGLU epilogue, fc2 with the hidden norm as its prologue and
the bias + residual epilogue), LayerScale folded into fc2 by the op.

CPU: Triton's interpreter against the fp64 spec (``fastvit.reference.ln_mlp``) with the suites' rule
(``op_cases.assert_matches_reference``: error <= 2x PyTorch's own in the same dtype plus a rounding floor), output
and every gradient (x, both norms' weights and biases, both Linears, LayerScale), fp32 and fp16; small forced tiles
for several programs and K steps; ``torch.compile(fullgraph=True)``; and that dispatch (so ``auto`` with evidence,
explicit backends and ``fusion_report()``) counts every variant as covered.
"""

from __future__ import annotations

import pytest
import torch

from fastvit import dispatch
from fastvit.ops.ln_mlp import MlpCall
from fastvit.ops.triton import linear as linear_triton

from op_cases import LN_MLP, assert_matches_reference, fp32_noise_floor, rounding_floor
from utils import DEVICE, backend_skip_reason

pytestmark = pytest.mark.skipif(backend_skip_reason("triton") is not None, reason=str(backend_skip_reason("triton")))

# fp32: accumulation noise only; fp16: two roundings of the dtype at each result's scale (as tests/test_ln_linear.py).
FLOORS = {torch.float32: fp32_noise_floor(), torch.float16: rounding_floor(2.0)}
SMALL_TILES = (16, 16, 16, 2, 4, 1)  # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages


def _sample(dtype, act, norm, hidden_norm, layer_scale=False, **shape):
    shape = {"lead": (2, 7), "width": 24, "hidden": 20, **shape}
    return LN_MLP.make(dtype, DEVICE, act=act, norm=norm, hidden_norm=hidden_norm, layer_scale=layer_scale, **shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu", "swiglu"])
@pytest.mark.parametrize("norm, hidden_norm", [("layer", False), ("layer", True), ("rms", True)])
def test_every_variant_matches_the_spec(dtype, act, norm, hidden_norm):
    sample = _sample(dtype, act, norm, hidden_norm, layer_scale=hidden_norm)
    label = f"{act} {norm} hidden_norm={hidden_norm} {dtype}"
    assert_matches_reference(LN_MLP, sample, "triton", floor=FLOORS[dtype], name=label)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_sub_ln_with_small_tiles_and_ragged_shapes(dtype):
    # EVA02's MLP: SwiGLU then a LayerNorm over the hidden layer (fc2's prologue). 16-wide tiles: C = 37 and
    # Hid = 23 take several ragged K/N steps, 50 rows several programs.
    sample = _sample(dtype, "swiglu", "layer", True, lead=(50,), width=37, hidden=23)
    with linear_triton.forced_configs(dict.fromkeys(linear_triton.KINDS, SMALL_TILES)):
        assert_matches_reference(LN_MLP, sample, "triton", floor=FLOORS[dtype], name=f"swiglu sub-LN {dtype}")


def test_no_biases_no_residual_rms_swiglu():
    sample = LN_MLP.make(lead=(3, 5), act="swiglu", norm="rms", fc1_bias=False, fc2_bias=False, hidden_norm=True)
    assert_matches_reference(LN_MLP, sample.with_kwargs(residual=False), "triton", name="bias-free, no residual")


def test_torch_compile_fullgraph_matches_eager():
    sample = _sample(torch.float32, "swiglu", "rms", True, layer_scale=True)
    names = list(sample.tensors)

    def fn(*tensors):
        return LN_MLP.call(type(sample)(dict(zip(names, tensors)), sample.kwargs), "triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (compiled, fn):
        leaves = [None if t is None else t.detach().requires_grad_() for t in sample.args]
        out = f(*leaves)
        out.square().sum().backward()
        results.append([out, *(t.grad for t in leaves if t is not None)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu", "swiglu"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("hidden_norm", [False, True])
def test_dispatch_counts_every_variant_as_covered(act, norm, hidden_norm):
    # What auto (with evidence), explicit backends and fusion_report() ask: no variant falls back any more.
    call = MlpCall(DEVICE, torch.float32, 24, 96, True, act, norm, hidden_norm)
    assert linear_triton.mlp_supports(call) is None
    assert dispatch.explain("ln_mlp", "triton", call) == ("triton", None)


# ------------------------------------------------------------------------------------------------
# GPU (skipped without one): the compiled kernels at model shapes, autotuned, bf16 too

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "act, norm, hidden_norm, width, hidden",
    [("gelu", "layer", False, 768, 3072), ("swiglu", "layer", True, 768, 2048), ("swiglu", "rms", False, 1024, 2730),
     ("quick_gelu", "layer", False, 1024, 4096), ("gelu_tanh", "rms", True, 384, 1536)],
    ids=["vit-b", "eva02-b", "rms-swiglu-odd-hidden", "clip-l", "rms-tanh-subnorm"],
)  # fmt: skip
def test_gpu_every_variant_at_model_shapes(dtype, act, norm, hidden_norm, width, hidden, no_tf32):
    sample = LN_MLP.make(dtype, "cuda", lead=(2, 197), width=width, hidden=hidden, act=act, norm=norm,
                         hidden_norm=hidden_norm, layer_scale=hidden_norm)  # fmt: skip
    assert_matches_reference(LN_MLP, sample, "triton", floor=rounding_floor(2.0), name=f"gpu {act} {norm} {dtype}")
