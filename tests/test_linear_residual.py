"""The extension's Linear-with-residual op (``ops.linear_residual``) and the layers that use it.

CPU tests run the extension's C++ implementation (``backend='cuda'`` on CPU tensors) through the same
torch.library registration (schemas, fake impls, autograd) as the CUDA kernels: forward and every
gradient against the fp64 reference with the flash-attention rule (error <= 2x PyTorch's own error in
the same dtype), fp64 agreement, gradcheck, opcheck, torch.compile, bad inputs. GPU tests at the end
run the CUDA path (one cuBLASLt GEMM with the BIAS epilogue and C = residual; BGRADB backward).
"""

from __future__ import annotations

import functools
import logging

import pytest
import torch

from fastvit import dispatch, ops, reference
from fastvit.layers import Attention, ResidualLinear

from op_cases import LINEAR_RESIDUAL, REFERENCE, Sample, assert_matches_reference, relative_floor, rounding_floor
from utils import dtype_tols, needs_cuda, needs_extension

pytestmark = needs_extension


# The op-case table's linear_residual inputs, on CPU tensors (the extension's C++ path) unless a test asks for CUDA.
cpu_sample = functools.partial(LINEAR_RESIDUAL.make, device="cpu")
gpu_sample = functools.partial(LINEAR_RESIDUAL.make, device="cuda")


def check_against_reference(sample: Sample, floor_rel=1e-6, label=""):
    """The extension (backend='cuda') vs the fp64 reference, bounded by 2x the reference's own error in the same
    dtype (plus ``floor_rel`` of each tensor's scale), output and every gradient."""
    assert_matches_reference(LINEAR_RESIDUAL, sample, "cuda", floor=relative_floor(floor_rel), name=label)


# ------------------------------------------------------------------------------------------------
# Accuracy on the C++ CPU path

# (leading shape, K, N): token counts 1, 7, 197; square (a ViT's proj) and odd widths.
SHAPES = [((1, 1), 7, 13), ((2, 7), 24, 24), ((1, 197), 192, 192), ((3, 7), 24, 37), ((7,), 100, 28)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead, in_features, out_features", SHAPES)
def test_cpu_fp32_forward_and_every_grad_within_torch_error(lead, in_features, out_features, bias):
    sample = cpu_sample(lead=lead, in_features=in_features, out_features=out_features, bias=bias)
    check_against_reference(sample, label=f"{lead}x{in_features}->{out_features}")


@pytest.mark.parametrize("bias", [True, False])
def test_cpu_fp64_matches_the_reference(bias):
    sample = cpu_sample(torch.float64, lead=(3, 7), in_features=24, out_features=40, bias=bias)
    check_against_reference(sample, label="fp64")  # float64: within DTYPE_TOLS[float64], None where no bias


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_precision_within_torch_error(dtype):
    check_against_reference(
        cpu_sample(dtype, lead=(2, 7), in_features=24, out_features=40), floor_rel=1e-3, label="half"
    )


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_fp64(bias):
    sample = cpu_sample(torch.float64, requires_grad=True, lead=(2, 3), in_features=5, out_features=6, bias=bias)
    assert torch.autograd.gradcheck(LINEAR_RESIDUAL.as_function(sample, "cuda"), sample.args)


def test_non_contiguous_x_residual_and_weight():
    x, weight, bias, residual = cpu_sample(lead=(4, 6), in_features=48, out_features=40).args
    x_view = x.transpose(0, 1)[:, ::2, 5:29]  # [6, 2, 24], strided
    residual_view = residual.transpose(0, 1)[:, ::2]  # [6, 2, 40], strided
    weight_view = weight[:, 5:29]  # [40, 24], non-contiguous rows
    weight_t = weight[:, 5:29].t().contiguous().t()  # [40, 24], transposed storage
    for w in (weight_view, weight_t):
        args = (x_view, w, bias, residual_view)
        out = ops.linear_residual(*args, backend="cuda")
        torch.testing.assert_close(out, reference.linear_residual(*args), **dtype_tols(torch.float32))
        assert out.is_contiguous() and out.shape == residual_view.shape
    views = Sample(dict(x=x_view, weight=weight_view, bias=bias, residual=residual_view))
    check_against_reference(views, label="views")


def test_residual_gradient_is_grad_out_itself():
    x, weight, bias, residual = cpu_sample(requires_grad=True, lead=(2, 5), in_features=16, out_features=16).args
    out = ops.linear_residual(x, weight, bias, residual, backend="cuda")
    grad_out = torch.randn_like(out)
    (grad_residual,) = torch.autograd.grad(out, residual, grad_out)
    assert grad_residual.data_ptr() == grad_out.data_ptr()  # passed through: no copy, no kernel


def test_only_the_needed_gradients_are_computed(monkeypatch):
    x, weight, bias, residual = cpu_sample(lead=(2, 5), in_features=16, out_features=24).args
    calls = []
    original = torch.ops.fastvit.linear_residual_bwd

    def spy(*args):
        calls.append(args[3:6])
        return original(*args)

    monkeypatch.setattr(torch.ops.fastvit, "linear_residual_bwd", spy)
    x.requires_grad_(True)  # frozen layer: weight and bias need no gradient (linear probe, LoRA)
    out = ops.linear_residual(x, weight, bias, residual, backend="cuda")
    (grad_x,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad_x, weight.sum(0).expand(2, 5, 16), **dtype_tols(torch.float32))
    assert calls == [(True, False, False)]


def test_empty_batch():
    out, *grads = LINEAR_RESIDUAL.run(cpu_sample(lead=(0, 5), in_features=24, out_features=40), "cuda")
    assert out.shape == (0, 5, 40) and grads[3].shape == (0, 5, 40)
    assert grads[0].shape == (0, 5, 24) and grads[1].abs().sum() == 0 and grads[2].abs().sum() == 0


def test_autocast_residual_in_the_autocast_dtype_stays_in_the_op(monkeypatch):
    x, weight, bias, residual = cpu_sample(lead=(2, 7), in_features=32, out_features=32).args
    residual = residual.bfloat16()
    seen = []
    original = torch.ops.fastvit.linear_residual_fwd
    monkeypatch.setattr(torch.ops.fastvit, "linear_residual_fwd", lambda *a: seen.append(a[3]) or original(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.linear_residual(x, weight, bias, residual, backend="cuda")
        expected = ops.linear_residual(x, weight, bias, residual, backend="torch")
    assert out.dtype == expected.dtype == torch.bfloat16 and seen[0] is residual
    torch.testing.assert_close(out, expected, **dtype_tols(torch.bfloat16))


# ------------------------------------------------------------------------------------------------
# LayerScale: residual + gamma * (x @ Wᵀ + b), gamma folded into W and b before any backend runs


def layer_scale_floor(dtype):
    """The error rule's floor: 1e-6 relative in fp32 (1e-3 in fp16/bf16, as test_cpu_half_precision...), plus in
    fp16/bf16 one rounding at each tensor's scale: the fold rounds gamma·W (and the weight's gradient is
    gamma·round(dyᵀx), rounded again) where eager ``gamma * linear(x)`` rounds the Linear's output once more instead."""
    if dtype.itemsize > 2:
        return relative_floor(1e-6 if dtype == torch.float32 else 0.0)
    base, one_rounding = relative_floor(1e-3), rounding_floor(1.0)
    return lambda cmp, exact: base(cmp, exact) + one_rounding(cmp, exact)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["cuda", "torch"])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_scale_forward_and_every_grad_within_torch_error(bias, backend, dtype):
    for lead, in_features, out_features in ((2, 7), 24, 24), ((3, 7), 24, 37), ((1,), 1, 1):
        sample = cpu_sample(dtype, lead=lead, in_features=in_features, out_features=out_features, bias=bias,
                            layer_scale=True)  # fmt: skip
        cmp = assert_matches_reference(
            LINEAR_RESIDUAL, sample, backend, floor=layer_scale_floor(dtype), name=f"layer_scale {lead} {out_features}"
        )
        assert cmp.labels[-1] == "grad layer_scale" and cmp.ours[-1] is not None


def test_layer_scale_changes_the_result_and_none_is_the_plain_op():
    sample = cpu_sample(lead=(2, 7), in_features=24, out_features=24, layer_scale=True)
    plain = Sample({n: t for n, t in sample.tensors.items() if n != "layer_scale"})
    scaled = LINEAR_RESIDUAL.call(sample, "cuda")
    x, residual = sample["x"], sample["residual"]
    torch.testing.assert_close(
        scaled - residual,
        sample["layer_scale"] * (LINEAR_RESIDUAL.call(plain, "cuda") - residual),
        **dtype_tols(torch.float32),
    )
    none = ops.linear_residual(x, sample["weight"], sample["bias"], residual, backend="cuda", layer_scale=None)
    torch.testing.assert_close(none, LINEAR_RESIDUAL.call(plain, "cuda"), rtol=0, atol=0)


def test_layer_scale_gradcheck_fp64_and_compile():
    sample = cpu_sample(torch.float64, requires_grad=True, lead=(2, 3), in_features=5, out_features=6, layer_scale=True)
    assert torch.autograd.gradcheck(LINEAR_RESIDUAL.as_function(sample, "cuda"), sample.args)
    sample = cpu_sample(requires_grad=True, lead=(3, 5), in_features=24, out_features=40, layer_scale=True)
    compiled = torch.compile(LINEAR_RESIDUAL.as_function(sample, "cuda"), fullgraph=True, backend="aot_eager")
    out, expected = compiled(*sample.args), LINEAR_RESIDUAL.call(sample, REFERENCE)
    torch.testing.assert_close(out, expected, **dtype_tols(torch.float32))
    grads = torch.autograd.grad(out.square().sum(), sample.args)
    expected_grads = torch.autograd.grad(expected.square().sum(), sample.args)
    for name, got, want in zip(sample.tensors, grads, expected_grads):
        torch.testing.assert_close(got, want, **dtype_tols(torch.float32), msg=f"d{name}")


@pytest.mark.parametrize(
    "layer_scale, error, match",
    [
        (torch.ones(39), ValueError, "layer_scale must have shape"),
        (torch.ones(1, 40), ValueError, "layer_scale must have 1 dimensions"),
        (torch.ones(40, dtype=torch.float64), TypeError, "one dtype"),
        (torch.ones(40, dtype=torch.int32), TypeError, "layer_scale must be a floating-point tensor"),
        ([1.0] * 40, TypeError, "layer_scale must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_layer_scale_bad_arguments(layer_scale, error, match, backend):
    x, weight, bias, residual = cpu_sample(lead=(2, 3), in_features=24, out_features=40).args
    with pytest.raises(error, match=match):
        ops.linear_residual(x, weight, bias, residual, backend=backend, layer_scale=layer_scale)


# ------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile


@pytest.mark.parametrize("bias, residual, grad", [(True, True, True), (False, True, True), (True, False, False)])
def test_linear_residual_fwd_passes_opcheck(bias, residual, grad):
    x, w, b, r = cpu_sample(requires_grad=grad, lead=(3, 5), in_features=24, out_features=40, bias=bias).args
    args = [x, w, b, r if residual else None]
    torch.library.opcheck(torch.ops.fastvit.linear_residual_fwd.default, tuple(args))


@pytest.mark.parametrize(
    "flags", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]
)
def test_linear_residual_bwd_passes_opcheck(flags):
    x, w, _b, _r = cpu_sample(lead=(3, 5), in_features=24, out_features=40).args
    grad_out = torch.randn(3, 5, 40)
    for det in (False, True):
        torch.library.opcheck(torch.ops.fastvit.linear_residual_bwd.default, (grad_out, x, w, *flags, det))


@pytest.mark.parametrize("bias", [True, False])
def test_compiles_fullgraph_with_backward(bias):
    sample = cpu_sample(requires_grad=True, lead=(3, 5), in_features=24, out_features=40, bias=bias)
    compiled = torch.compile(LINEAR_RESIDUAL.as_function(sample, "cuda"), fullgraph=True, backend="aot_eager")
    out = compiled(*sample.args)
    expected = LINEAR_RESIDUAL.call(sample, REFERENCE)
    torch.testing.assert_close(out, expected, **dtype_tols(torch.float32))
    present = [t for t in sample.args if t is not None]
    grads = torch.autograd.grad(out.square().sum(), present)
    expected_grads = torch.autograd.grad(expected.square().sum(), present)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, **dtype_tols(torch.float32))


# ------------------------------------------------------------------------------------------------
# Debug log: 'auto' taking the torch backend on CUDA tensors says why


def test_auto_torch_for_uncovered_cuda_input_is_logged(caplog, pretend_gpu):
    cuda = torch.device("cuda")
    with caplog.at_level(logging.DEBUG, logger="fastvit"):
        fn = dispatch.select("linear_residual", "auto", dispatch.DeviceDtypeCall(cuda, torch.float64))
    assert fn is dispatch._REGISTRY["linear_residual"]["torch"].fn
    assert "linear_residual: 'auto' runs the torch backend on CUDA tensors (cuda: float64" in caplog.text
    # A covered call takes the kernel; an explicit backend raises the predicate's reason.
    assert dispatch.explain("linear_residual", "auto", dispatch.DeviceDtypeCall(cuda, torch.float16)) == ("cuda", None)
    with pytest.raises(TypeError, match="does not cover this input: float64"):
        dispatch.select("linear_residual", "cuda", dispatch.DeviceDtypeCall(cuda, torch.float64))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_auto_on_cuda_tensors_without_a_gpu_logs_why(caplog):
    with caplog.at_level(logging.DEBUG, logger="fastvit"):
        call = dispatch.DeviceDtypeCall(torch.device("cuda"), torch.float32)
        assert dispatch.select("linear_residual", "auto", call) is dispatch._REGISTRY["linear_residual"]["torch"].fn
    assert dispatch.resolve("linear_residual", "auto", torch.device("cuda")) == "torch"
    assert "linear_residual: 'auto' runs the torch backend on CUDA tensors (cuda: no CUDA device is available)" in (
        caplog.text
    )


# ------------------------------------------------------------------------------------------------
# Bad inputs: clear errors before any kernel runs


def _replace(args, index, value):
    args = list(args)
    args[index] = value
    return args


BAD_CASES = [
    (lambda a: _replace(a, 1, a[1][:, :-1]), ValueError, "weight must have shape"),
    (lambda a: _replace(a, 1, a[1][0]), ValueError, "weight must .*2"),
    (lambda a: _replace(a, 2, a[2][:-1]), ValueError, "bias must have shape"),
    (lambda a: _replace(a, 3, a[3][:, :-1]), ValueError, "residual must have shape"),
    (lambda a: _replace(a, 3, a[3][..., :-1]), ValueError, "residual must have shape"),
    (lambda a: _replace(a, 0, a[0][..., :0]), ValueError, "must be (>|>=) (0|1)"),
    (lambda a: _replace(a, 1, a[1][:0]), ValueError, "at least one output feature"),
]


@pytest.mark.parametrize("make, error, match", BAD_CASES)
@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_public_op_rejects_bad_arguments(make, error, match, backend):
    with pytest.raises(error, match=match):
        ops.linear_residual(*make(cpu_sample(lead=(2, 3), in_features=8, out_features=16).args), backend=backend)


@pytest.mark.parametrize("make, error, match", BAD_CASES)
def test_extension_op_rejects_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        torch.ops.fastvit.linear_residual_fwd(*make(cpu_sample(lead=(2, 3), in_features=8, out_features=16).args))


@pytest.mark.parametrize(
    "index, value, match",
    [
        (1, lambda t: t.double(), "weight must have the dtype of x"),
        (2, lambda t: t.half(), "bias must have the dtype of x"),
        (3, lambda t: t.bfloat16(), "residual must have the dtype of x"),
        (0, lambda t: t.int(), "x must be float16, bfloat16, float32 or float64"),
    ],
)
def test_extension_op_rejects_bad_dtypes(index, value, match):
    args = cpu_sample(lead=(2, 3), in_features=8, out_features=16).args
    args[index] = value(args[index])
    with pytest.raises(TypeError, match=match):
        torch.ops.fastvit.linear_residual_fwd(*args)


def test_public_op_rejects_mixed_and_unsupported_dtypes_and_non_tensors():
    x, weight, bias, residual = cpu_sample(lead=(2, 3), in_features=8, out_features=16).args
    with pytest.raises(TypeError, match="one dtype"):
        ops.linear_residual(x, weight, bias, residual.double(), backend="cuda")
    with pytest.raises(TypeError, match="floating-point"):
        ops.linear_residual(x.int(), weight, bias, residual, backend="cuda")
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        ops.linear_residual(x, weight, bias, None, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.linear_residual(x, weight, bias, residual, backend="cublas")
    with pytest.raises(ValueError, match="'triton' backend does not implement this op"):
        ops.linear_residual(x, weight, bias, residual, backend="triton")


def test_bwd_rejects_bad_arguments():
    x, w, _b, _r = cpu_sample(lead=(2, 3), in_features=8, out_features=16).args
    with pytest.raises(ValueError, match="grad_out must have shape"):
        torch.ops.fastvit.linear_residual_bwd(torch.randn(2, 3, 8), x, w, True, True, True, False)
    with pytest.raises(TypeError, match="grad_out must have the dtype of x"):
        torch.ops.fastvit.linear_residual_bwd(torch.randn(2, 3, 16).double(), x, w, True, True, True, False)


# ------------------------------------------------------------------------------------------------
# The layers: ResidualLinear and Attention.forward_residual


def test_residual_linear_is_an_nn_linear_with_the_same_keys():
    layer = ResidualLinear(16, 24)
    assert isinstance(layer, torch.nn.Linear) and sorted(layer.state_dict()) == ["bias", "weight"]
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_attention_forward_residual_equals_residual_plus_attention():
    attn = Attention(64, num_heads=2, qkv_bias=True)
    attn.proj.backend = "cuda"
    x, residual = torch.randn(2, 7, 64), torch.randn(2, 7, 64)
    torch.testing.assert_close(attn.forward_residual(x, residual), residual + attn(x), **dtype_tols(torch.float32))


# ------------------------------------------------------------------------------------------------
# GPU: the CUDA path (cuBLASLt BIAS epilogue with C = residual, BGRADB backward)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", [192, 384, 768, 1024, 1280])
def test_gpu_forward_and_grads(width, dtype, bias, no_tf32):
    sample = gpu_sample(dtype, lead=(4, 197), in_features=width, out_features=width, bias=bias)
    check_against_reference(sample, floor_rel=1e-6 if dtype == torch.float32 else 0.0, label=f"cuda {width}")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_odd_shapes_and_views(dtype, no_tf32):
    # K, N not multiples of 8 (no 16-byte alignment), 1 and 7 tokens, strided x and residual.
    for lead, k, n in [((1, 1), 7, 13), ((7,), 100, 300), ((3, 7), 24, 37)]:
        sample = gpu_sample(dtype, lead=lead, in_features=k, out_features=n)
        check_against_reference(sample, floor_rel=1e-6, label="odd")
    sample = gpu_sample(dtype, lead=(4, 6), in_features=96, out_features=64)
    x, residual = sample["x"].transpose(0, 1)[:, ::2], sample["residual"].transpose(0, 1)[:, ::2]
    check_against_reference(sample.replace(x=x, residual=residual), floor_rel=1e-6)


@needs_cuda
@pytest.mark.gpu
def test_gpu_large_batch_bf16():
    sample = gpu_sample(torch.bfloat16, lead=(128, 197), in_features=768, out_features=768)
    check_against_reference(sample, label="B128 bf16")


@needs_cuda
@pytest.mark.gpu
def test_gpu_autocast_and_float64_fallback(caplog):
    inputs = gpu_sample(lead=(8, 197), in_features=384, out_features=384).args
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = ops.linear_residual(*inputs, backend="cuda")
        expected = ops.linear_residual(*inputs, backend="torch")
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, **dtype_tols(torch.bfloat16))
    doubles = gpu_sample(torch.float64, lead=(2, 7), in_features=16, out_features=16).args
    with caplog.at_level(logging.DEBUG, logger="fastvit"):
        torch.testing.assert_close(ops.linear_residual(*doubles), reference.linear_residual(*doubles))
    assert "'auto' runs the torch backend on CUDA tensors (cuda: float64" in caplog.text
    with pytest.raises(TypeError, match="does not cover this input: float64"):
        ops.linear_residual(*doubles, backend="cuda")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_layer_scale(dtype, no_tf32):
    for lead, k, n in (((2, 197), 384, 384), ((1, 7), 24, 37)):
        sample = gpu_sample(dtype, lead=lead, in_features=k, out_features=n, layer_scale=True)
        assert_matches_reference(LINEAR_RESIDUAL, sample, "cuda", floor=layer_scale_floor(dtype), name="layer_scale")
