"""The compiled extension fastvit._C: build facts, and its LayerNorm ops on the C++ CPU path.

``layer_norm_fwd`` / ``layer_norm_bwd``: the autograd of ``ops.layer_norm(backend='cuda')`` calls the
extension's backward (C++ on CPU tensors, CUDA kernels on CUDA tensors).

CI has no GPU: these tests run the C++ CPU kernels through the same torch.library registration
(schema, fake impl, autograd) that the CUDA kernels use. GPU tests at the end run the CUDA kernel.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastvit
from fastvit import dispatch, ops

from op_cases import LINEAR_RESIDUAL, LN_MLP, OP_CASES, assert_matches_reference, fp32_noise_floor, relative_floor
from utils import assert_within_torch_error, dtype_tols, needs_cuda, needs_extension


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
@pytest.mark.parametrize("shape", [(1, 7), (4, 24), (3, 5, 192), (300, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_layer_norm_bwd_op_matches_autograd(shape, dtype):
    x, weight, bias = _layer_norm_inputs(shape, dtype)
    grad_out = torch.randn(shape, dtype=torch.float64)
    _out, mean, rstd = torch.ops.fastvit.layer_norm_fwd(x, weight, bias, 1e-6)
    grads = torch.ops.fastvit.layer_norm_bwd(grad_out.to(dtype), x, weight, mean, rstd)

    def autograd_grads(dtype_):
        leaves = [t.detach().to(dtype_).requires_grad_(True) for t in (x, weight, bias)]
        out = F.layer_norm(leaves[0], shape[-1:], leaves[1], leaves[2], 1e-6)
        return torch.autograd.grad(out, leaves, grad_out.to(dtype_))

    same, exact = autograd_grads(dtype), autograd_grads(torch.float64)
    floor = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 0.0)
    for name, got, torch_same, want in zip(("dx", "dweight", "dbias"), grads, same, exact):
        assert got.dtype == dtype and got.shape == want.shape
        assert_within_torch_error(
            f"layer_norm_bwd {name} {dtype}", got, torch_same, want, floor=floor * want.abs().max()
        )


@needs_extension
def test_layer_norm_bwd_reduction_does_not_depend_on_the_thread_count():
    # dweight/dbias are summed over fixed row chunks, then the chunks in order: the same bits with
    # any number of threads (and run to run).
    x, weight, bias = _layer_norm_inputs((777, 48), torch.float32)
    grad_out = torch.randn(777, 48)
    _out, mean, rstd = torch.ops.fastvit.layer_norm_fwd(x, weight, bias, 1e-6)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(torch.ops.fastvit.layer_norm_bwd(grad_out, x, weight, mean, rstd))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for got, first in zip(other, results[0]):
            assert torch.equal(got, first)


@needs_extension
def test_layer_norm_bwd_passes_opcheck():
    x, weight, bias = _layer_norm_inputs((3, 5, 24), torch.float32)
    _out, mean, rstd = torch.ops.fastvit.layer_norm_fwd(x, weight, bias, 1e-6)
    grad_out = torch.randn_like(x)
    torch.library.opcheck(torch.ops.fastvit.layer_norm_bwd.default, (grad_out, x, weight, mean, rstd))
    # Non-contiguous grad_out (an expanded gradient, as autograd produces for sums) is accepted.
    expanded = torch.ones(1, 1, 24).expand(3, 5, 24)
    grad_x, _, grad_bias = torch.ops.fastvit.layer_norm_bwd(expanded, x, weight, mean, rstd)
    torch.testing.assert_close(grad_bias, torch.full((24,), 15.0))
    assert grad_x.is_contiguous()


@needs_extension
def test_layer_norm_bwd_rejects_bad_arguments():
    x, weight, bias = _layer_norm_inputs((4, 8), torch.float32)
    _out, mean, rstd = torch.ops.fastvit.layer_norm_fwd(x, weight, bias, 1e-6)
    dy = torch.randn_like(x)
    bwd = torch.ops.fastvit.layer_norm_bwd
    with pytest.raises(ValueError, match="grad_out must have the shape of x"):
        bwd(dy[:2], x, weight, mean, rstd)
    with pytest.raises(ValueError, match="weight must have shape"):
        bwd(dy, x, weight[:-1], mean, rstd)
    with pytest.raises(ValueError, match="mean and rstd must have shape"):
        bwd(dy, x, weight, mean[:-1], rstd)
    with pytest.raises(TypeError, match="mean and rstd must be Float"):
        bwd(dy, x, weight, mean.double(), rstd)
    with pytest.raises(TypeError, match="must have the dtype of x"):
        bwd(dy.double(), x, weight, mean, rstd)


@needs_extension
def test_layer_norm_bwd_empty_rows():
    x, weight, bias = _layer_norm_inputs((0, 16), torch.float32)
    _out, mean, rstd = torch.ops.fastvit.layer_norm_fwd(x, weight, bias, 1e-6)
    grad_x, grad_weight, grad_bias = torch.ops.fastvit.layer_norm_bwd(torch.empty(0, 16), x, weight, mean, rstd)
    assert grad_x.shape == (0, 16) and grad_weight.abs().sum() == 0 and grad_bias.abs().sum() == 0


# The extension's ops: their forward custom op, a small CPU sample and the op's trailing non-tensor arguments.
EXTENSION_FORWARDS = {
    "layer_norm": ("layer_norm_fwd", dict(lead=(2, 3), width=8), (1e-6,)),
    "ln_mlp": ("ln_mlp_fwd", dict(lead=(2, 3), width=8, hidden=16), (1e-6, "none", True, False)),
    "linear_residual": ("linear_residual_fwd", dict(lead=(2, 3), in_features=8, out_features=16), ()),
}


@needs_extension
@pytest.mark.parametrize("op_name", list(EXTENSION_FORWARDS))
def test_cuda_backend_on_cpu_is_the_cpp_kernel(op_name):
    assert dispatch.resolve(op_name, "cuda", torch.device("cpu")) == "cuda"
    assert dispatch.resolve(op_name, "auto", torch.device("cpu")) == "torch"
    assert op_name in fastvit.backends()["cuda"].ops


@needs_extension
@pytest.mark.parametrize("op_name", list(EXTENSION_FORWARDS))
def test_cuda_kernel_reports_a_clear_error_for_cpu_tensors(op_name):
    # CPU tensors sent to the CUDA kernel: the CPU-only build says it has no CUDA kernels, the CUDA build that x
    # must be a CUDA tensor. Either way a clear message, never a crash.
    custom_op, shape, options = EXTENSION_FORWARDS[op_name]
    args = OP_CASES[op_name].make(torch.float32, "cpu", **shape).args
    cuda_keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    with pytest.raises((RuntimeError, ValueError), match="built without CUDA kernels|must be a CUDA tensor"):
        getattr(torch.ops.fastvit, custom_op).default.redispatch(cuda_keys, *args, *options)


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


@needs_cuda
@needs_extension
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 7), (197, 768), (3, 257, 1280), (4096, 1000), (64 * 197, 384)])
def test_layer_norm_cuda_backward_kernel(shape, dtype):
    x, weight, bias = _layer_norm_inputs(shape, dtype, device="cuda")
    grad_out = torch.randn(shape, dtype=torch.float64, device="cuda")

    def run(fn, dtype_):
        leaves = [t.detach().to(dtype_).requires_grad_(True) for t in (x, weight, bias)]
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, grad_out.to(dtype_))

    ours = run(lambda x, w, b: ops.layer_norm(x, w, b, 1e-6, backend="cuda"), dtype)
    same = run(lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-6), dtype)
    exact = run(lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-6), torch.float64)
    for name, got, torch_same, want in zip(("dx", "dweight", "dbias"), ours, same, exact):
        floor = 1e-6 * want.abs().max().item()
        assert_within_torch_error(f"layer_norm cuda bwd {name} {dtype}", got, torch_same, want, floor=floor)


@needs_cuda
@needs_extension
@pytest.mark.gpu
def test_layer_norm_cuda_unaligned_rows_and_bit_identical_backward():
    # A view starting one element in: rows are not 16-byte aligned, so the scalar (non-vector) path runs.
    base, weight, bias = _layer_norm_inputs((513, 769), torch.bfloat16, device="cuda")
    x = base[:, 1:]
    weight, bias = weight[1:], bias[1:]
    out, mean, rstd = torch.ops.fastvit.layer_norm_fwd(x, weight, bias, 1e-6)
    torch.testing.assert_close(out, F.layer_norm(x, (768,), weight, bias, 1e-6), atol=2e-2, rtol=2e-2)
    grad_out = torch.randn_like(x)
    first = torch.ops.fastvit.layer_norm_bwd(grad_out, x, weight, mean, rstd)
    for _ in range(3):
        for got, want in zip(torch.ops.fastvit.layer_norm_bwd(grad_out, x, weight, mean, rstd), first):
            assert torch.equal(got, want)


@needs_cuda
@needs_extension
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [768, 769, 4104])
def test_layer_norm_cuda_weight_gradients_vectorised_and_scalar(width, dtype):
    # Stage 1 of dweight/dbias reads 16-byte packs of VEC columns when rows are aligned (768, 4104: VEC columns
    # per thread, tiles of 256 (bf16) / 128 (fp32) columns, 4104 ends in a partial tile) and single columns
    # otherwise (769). Same bound as every LayerNorm gradient: 2x PyTorch's own error.
    x, weight, bias = _layer_norm_inputs((333, width), dtype, device="cuda")
    grad_out = torch.randn(333, width, dtype=torch.float64, device="cuda")

    def grads(fn, dtype_):
        leaves = [t.detach().to(dtype_).requires_grad_(True) for t in (x, weight, bias)]
        return torch.autograd.grad(fn(*leaves), leaves[1:], grad_out.to(dtype_))

    ours = grads(lambda x, w, b: ops.layer_norm(x, w, b, 1e-6, backend="cuda"), dtype)
    same = grads(lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-6), dtype)
    exact = grads(lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, 1e-6), torch.float64)
    for name, got, torch_same, want in zip(("dweight", "dbias"), ours, same, exact):
        floor = 1e-6 * want.abs().max().item()
        assert_within_torch_error(f"layer_norm cuda {name} {dtype} C={width}", got, torch_same, want, floor=floor)


@needs_cuda
@needs_extension
@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_ln_mlp_deterministic_backward_keeps_its_accuracy(approximate):
    # Deterministic mode keeps the DGELU epilogue (only the bias gradient moves to at::sum): the same error bound as
    # the default path (test_ln_mlp's GPU tests; bit-identical repeats are checked there too).
    sample = LN_MLP.make(torch.bfloat16, "cuda", lead=(8, 197), width=384, hidden=1536)
    fastvit.set_deterministic(True)
    try:
        assert_matches_reference(
            LN_MLP, sample.with_kwargs(approximate=approximate), "cuda", floor=relative_floor(0.0), name="deterministic"
        )
    finally:
        fastvit.set_deterministic(False)


# The extension's GEMM ops under torch.compile: the forward op's registration (schema, fake impl) by opcheck, then the
# public op compiled fullgraph with inductor, its backward included.
_OPCHECK_CASES = [
    pytest.param(LN_MLP, "ln_mlp_fwd", dict(width=64, hidden=256), (1e-6, "none", True, True), id="ln_mlp"),
    pytest.param(
        LINEAR_RESIDUAL, "linear_residual_fwd", dict(in_features=64, out_features=64), (), id="linear_residual"
    ),
]


@needs_cuda
@needs_extension
@pytest.mark.gpu
@pytest.mark.parametrize("case, fwd_op, sizes, fwd_flags", _OPCHECK_CASES)
def test_gpu_op_passes_opcheck_and_compiles(case, fwd_op, sizes, fwd_flags):
    sample = case.make(torch.bfloat16, "cuda", requires_grad=True, lead=(3, 50), **sizes)
    args = sample.args
    torch.library.opcheck(getattr(torch.ops.fastvit, fwd_op).default, (*args, *fwd_flags))
    compiled = torch.compile(case.as_function(sample, "cuda"), fullgraph=True)
    out = compiled(*args)
    torch.testing.assert_close(out, case.reference(sample), **dtype_tols(torch.bfloat16))
    out.float().square().sum().backward()


# The extension's cuBLASLt GEMMs: ln_mlp (fc1 with the bias/GELU epilogue, fc2) and linear_residual, ViT-B sizes.
_GEMM_CASES = [
    pytest.param(LN_MLP, dict(width=768, hidden=3072), id="ln_mlp"),
    pytest.param(LINEAR_RESIDUAL, dict(in_features=768, out_features=768), id="linear_residual"),
]


@needs_cuda
@needs_extension
@pytest.mark.gpu
@pytest.mark.parametrize("case, sizes", _GEMM_CASES)
def test_cublaslt_gemms_under_cuda_graph_trees_stay_correct_across_generations(case, sizes):
    # torch.compile(mode="reduce-overhead") records the ops into CUDA-graph trees whose private memory pool is
    # reset between generations. The GEMMs' cuBLASLt workspace must not be a block of that pool kept across
    # generations (it would be handed to another tensor while split-K writes into it): every replay, with new
    # inputs and other allocations in between, must give what eager gives.
    torch._dynamo.reset()
    template = case.make(torch.bfloat16, "cuda", lead=(32, 197), **sizes)
    compiled = torch.compile(case.as_function(template, "cuda"), mode="reduce-overhead")
    try:
        with torch.inference_mode():
            for step in range(6):
                sample = case.make(torch.bfloat16, "cuda", seed=step, lead=(32, 197), **sizes)
                got = compiled(*sample.args).clone()
                scratch = torch.full((64, 1 << 20), float(step), device="cuda")  # reuse freed blocks in between
                want = case.call(sample, "cuda")
                # Same ops, same shapes: at most a different GEMM algorithm, i.e. bf16 rounding differences.
                torch.testing.assert_close(got, want, **dtype_tols(torch.bfloat16), msg=f"generation {step}")
                del scratch
    finally:
        torch._dynamo.reset()


@needs_cuda
@needs_extension
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cublaslt_plan_cache_gives_each_gemm_shape_its_own_plan(dtype, monkeypatch):
    # Descriptors, layouts and the algorithm are cached per GEMM shape (and dtype, strides, epilogue): calls that
    # alternate between shapes differing in one dimension only, the bias on and off, must each match the spec.
    shapes = [
        dict(lead=(7,), in_features=64, out_features=128),
        dict(lead=(7,), in_features=128, out_features=64),
        dict(lead=(9,), in_features=64, out_features=128),
        dict(lead=(7,), in_features=64, out_features=136),
        dict(lead=(7,), in_features=64, out_features=128, bias=False),
    ]
    floor = fp32_noise_floor() if dtype == torch.float32 else relative_floor(0.0)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 GEMMs under the fp32 rule
    for _round in range(2):
        for shape in shapes:
            sample = LINEAR_RESIDUAL.make(dtype, "cuda", **shape)
            assert_matches_reference(LINEAR_RESIDUAL, sample, "cuda", floor=floor, name=str(shape))
