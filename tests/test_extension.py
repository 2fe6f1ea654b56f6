"""The compiled extension fastvit._C: build facts, and its LayerNorm op on the C++ CPU path.

CI has no GPU: these tests run the C++ CPU kernels through the same torch.library registration
(schema, fake impl, autograd) that the CUDA kernels use. GPU tests at the end run the CUDA kernel.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_within_torch_error

import fastvit
from fastvit import dispatch, ops

EXTENSION_DISABLED = os.environ.get("FASTVIT_NO_EXT", "0") == "1"
needs_extension = pytest.mark.skipif(EXTENSION_DISABLED, reason="FASTVIT_NO_EXT=1: extension deliberately not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_extension
def test_extension_is_built_and_reported():
    # A failed build must fail the suite, not skip the extension's tests.
    report = fastvit.backends()["cuda"]
    assert report.available, report.reason
    assert "layer_norm" in report.ops
    import fastvit._C as ext

    if ext.built_with_cuda():
        assert ext.cublaslt_version() >= 110000  # the linked cuBLASLt loads and answers
    else:
        assert ext.cublaslt_version() == 0


def _layer_norm_inputs(shape, dtype, device="cpu"):
    width = shape[-1]
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 1.5).to(device)
    weight = torch.randn(width, dtype=torch.float64).to(device)
    bias = torch.randn(width, dtype=torch.float64).to(device)
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


@needs_extension
@pytest.mark.parametrize("shape", [(1, 7), (3, 192), (2, 5, 384), (4, 1000), (2, 3, 1280), (65, 33)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_layer_norm_cpu_forward_and_backward(shape, dtype):
    x, weight, bias = _layer_norm_inputs(shape, dtype)
    grad_out = torch.randn(shape, dtype=torch.float64)

    def run(fn, x, weight, bias):
        inputs = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias)]
        out = fn(*inputs)
        out.backward(grad_out.to(out.dtype))
        return [out.detach()] + [t.grad for t in inputs]

    ours = run(lambda x, w, b: ops.layer_norm(x, w, b, 1e-6, backend="cuda"), x, weight, bias)
    torch_same = run(lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-6), x, weight, bias)
    exact = run(lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-6), x.double(), weight.double(), bias.double())
    floor = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 0.0)
    for name, got, same, ref in zip(("out", "dx", "dweight", "dbias"), ours, torch_same, exact):
        assert got.dtype == dtype and got.shape == ref.shape
        assert_within_torch_error(f"layer_norm {name} {dtype}", got, same, ref, floor=floor * ref.abs().max().item())


@needs_extension
def test_layer_norm_cpu_statistics_and_non_contiguous_input():
    x, weight, bias = _layer_norm_inputs((6, 4, 40), torch.float32)
    view = x.transpose(0, 1)[:, ::2]  # non-contiguous
    out, mean, rstd = torch.ops.fastvit.layer_norm_fwd(view, weight, bias, 1e-6)
    torch.testing.assert_close(out, F.layer_norm(view, (40,), weight, bias, 1e-6))
    torch.testing.assert_close(mean, view.mean(-1))
    torch.testing.assert_close(rstd, torch.rsqrt(view.var(-1, unbiased=False) + 1e-6))
    assert mean.dtype == torch.float32 and mean.shape == view.shape[:-1]


@needs_extension
def test_layer_norm_cpu_empty_rows():
    x, weight, bias = _layer_norm_inputs((0, 3, 16), torch.float32)
    out = ops.layer_norm(x, weight, bias, backend="cuda")
    assert out.shape == (0, 3, 16)


@needs_extension
def test_layer_norm_op_passes_opcheck():
    x, weight, bias = _layer_norm_inputs((3, 5, 24), torch.float32)
    for t in (x, weight, bias):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.fastvit.layer_norm_fwd.default, (x, weight, bias, 1e-5))


@needs_extension
def test_layer_norm_op_compiles_fullgraph():
    # aot_eager traces through the fake impl and the registered autograd, with no graph break.
    x, weight, bias = (t.requires_grad_(True) for t in _layer_norm_inputs((3, 5, 24), torch.float32))
    fn = torch.compile(
        lambda x, w, b: ops.layer_norm(x, w, b, 1e-6, backend="cuda"), fullgraph=True, backend="aot_eager"
    )
    out = fn(x, weight, bias)
    expected = F.layer_norm(x, (24,), weight, bias, 1e-6)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (x, weight, bias))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, weight, bias))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


@needs_extension
@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda x, w, b: (x, w.double(), b), TypeError, "dtype"),
        (lambda x, w, b: (x, w[:-1], b), ValueError, "weight must have shape"),
        (lambda x, w, b: (x[..., :0], w[:0], b[:0]), ValueError, "must be > 0"),
        (lambda x, w, b: (x, w, b, -1.0), ValueError, "eps"),
    ],
)
def test_layer_norm_extension_rejects_bad_arguments(make, error, match):
    args = make(*_layer_norm_inputs((2, 8), torch.float32))
    eps = args[3] if len(args) == 4 else 1e-6
    with pytest.raises(error, match=match):
        torch.ops.fastvit.layer_norm_fwd(args[0], args[1], args[2], eps)


@needs_extension
def test_cuda_backend_on_cpu_is_the_cpp_kernel():
    assert dispatch.resolve("layer_norm", "cuda", torch.device("cpu")) == "cuda"
    assert dispatch.resolve("layer_norm", "auto", torch.device("cpu")) == "torch"


@needs_cuda
@needs_extension
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (197, 768), (3, 257, 1280), (4096, 1000)])
def test_layer_norm_cuda_kernel(shape, dtype):
    x, weight, bias = _layer_norm_inputs(shape, dtype, device="cuda")
    ours = ops.layer_norm(x, weight, bias, backend="cuda")
    same = F.layer_norm(x, x.shape[-1:], weight, bias, 1e-6)
    exact = F.layer_norm(x.double(), x.shape[-1:], weight.double(), bias.double(), 1e-6)
    assert_within_torch_error(f"layer_norm cuda {dtype}", ours, same, exact, floor=1e-6 * exact.abs().max().item())
