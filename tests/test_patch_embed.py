"""The Triton patch embedding (``backend='triton'``) against the fp64 reference, forward and every gradient.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (the root conftest sets TRITON_INTERPRET=1),
so shapes stay tiny (B=2, 16x16 / 16x24 images, D <= 48) and bfloat16 is left to the GPU tests (bf16 ``tl.dot``
is broken in the interpreter, triton#11584). Accuracy rule (flash-attention's): max|ours - ref64| <= 2 x
max|reference in the same dtype - ref64| (+ a one-rounding floor, see ``_floor``), for the tokens and the
gradients of x, weight, bias, pos_embed and cls_token.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

import fastvit
from fastvit import reference
from fastvit.ops.triton import launch
from fastvit.ops.triton import patch_embed as pe_triton

from utils import DEVICE, assert_within_torch_error, needs_cuda, triton_skip_reason

pe_ops = importlib.import_module("fastvit.ops.patch_embed")  # the module; fastvit.ops.patch_embed is the function

ON_INTERPRETER = DEVICE.type == "cpu"
if triton_skip_reason() is not None:
    pytest.skip(triton_skip_reason(), allow_module_level=True)

NAMES = ("tokens", "grad x", "grad weight", "grad bias", "grad pos_embed", "grad cls_token")
TRITON_OPS = ("patch_embed_fwd", "patch_embed_bwd_input", "patch_embed_bwd_weight", "patch_embed_bwd_colsum")


def _floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Half an ulp of the largest value in ``dtype``: the error of rounding the exact result once.

    No implementation can beat it, and it is needed where the reference in ``dtype`` happens to be (near)
    exact and the 2x bound collapses: e.g. the cls_token gradient is a sum of B=2 values, which PyTorch may
    round to exactly the fp64 sum while our fp32 sum rounded once to ``dtype`` lands one rounding away.
    """
    return 0.5 * torch.finfo(dtype).eps * ref.abs().max().item()


def _make(batch, in_chans, height, width, patch, dim, num_prefix, pos, bias=True, device=DEVICE, seed=0):
    """fp64 inputs (x, weight, bias, pos_embed, cls_token); ``pos``: 'all', 'patch' (no_embed_class) or None."""
    gen = torch.Generator().manual_seed(seed)
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
    num_patches = (height // patch_h) * (width // patch_w)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device)

    x = rand(batch, in_chans, height, width)
    weight = rand(dim, in_chans, patch_h, patch_w, scale=(in_chans * patch_h * patch_w) ** -0.5)
    tokens = {"all": num_patches + num_prefix, "patch": num_patches}
    return (
        x,
        weight,
        rand(dim) if bias else None,
        rand(1, tokens[pos], dim) if pos else None,
        rand(1, num_prefix, dim) if num_prefix else None,
    )


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "slice":  # a non-contiguous view: every other image column of a wider batch
        wide = torch.repeat_interleave(x, 2, dim=-1) + 0.0
        return wide[..., ::2]
    return x


def _run(fn, inputs, grad_seed=1):
    """(output, grads of every tensor input or None) of ``fn(*inputs)`` for a fixed random output gradient."""
    inputs = [None if t is None else t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    gen = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out))
    return [out.detach()] + [next(grads) if t is not None and t.requires_grad else None for t in inputs]


def _cast(inputs, dtype, layout="contiguous"):
    x, *rest = inputs
    return [_layout(x.to(dtype), layout), *(None if t is None else t.to(dtype) for t in rest)]


def _check(name, dtype, inputs, layout="contiguous"):
    """Triton vs the reference in ``dtype`` vs the fp64 reference, on the tokens and every gradient."""
    ours = _run(lambda *a: fastvit.ops.patch_embed(*a, backend="triton"), _cast(inputs, dtype, layout))
    same = _run(lambda *a: reference.patch_embed(*a), _cast(inputs, dtype, layout))
    exact = _run(lambda *a: reference.patch_embed(*a), inputs)
    for label, mine, theirs, ref in zip(NAMES, ours, same, exact):
        if ref is None:
            assert mine is None
            continue
        assert mine.dtype == theirs.dtype == dtype and mine.shape == ref.shape, (label, mine.dtype, mine.shape)
        assert torch.isfinite(mine).all(), f"{name} {label}: non-finite values"
        assert_within_torch_error(f"{name} {label}", mine, theirs, ref, floor=_floor(ref, dtype))
    return ours


CASES = {
    # batch, in_chans, height, width, patch, dim, prefix tokens, pos_embed, bias
    "rgb-cls-pos": (2, 3, 16, 16, 4, 32, 1, "all", True),
    "gray-p8-reg3-noembedclass": (2, 1, 16, 24, 8, 48, 3, "patch", True),
    "rgb-nocls-nopos": (2, 3, 16, 24, 4, 16, 0, None, True),
    "rgba-nobias-pos-patchonly": (1, 4, 8, 16, 4, 24, 1, "patch", False),
    "rect-patch-reg3-pos": (2, 2, 16, 16, (4, 8), 20, 3, "all", True),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype, layout):
    *shape, bias = CASES[case]
    _check(f"{case} {layout} {dtype}", dtype, _make(*shape, bias=bias), layout)


def test_fp32_within_design_tolerance():
    # DESIGN numerics rule: fp32 within ~1e-5 relative of fp64 (full-precision fp32 GEMMs, no tf32).
    inputs = _make(2, 3, 16, 24, 4, 40, 1, "all")
    ours = _run(lambda *a: fastvit.ops.patch_embed(*a, backend="triton"), _cast(inputs, torch.float32))
    exact = _run(reference.patch_embed, inputs)
    for label, mine, ref in zip(NAMES, ours, exact):
        error = (mine.double() - ref).abs().max().item() / ref.abs().max().item()
        assert error < 1e-5, f"{label}: relative error {error:.2e}"


@pytest.fixture
def tiny_tiles():
    """16-wide tiles everywhere and a 3-way split of the dW reduction: many partial tiles at tiny sizes."""
    overrides = {
        "fwd": dict(BLOCK_R=16, BLOCK_C=16, BLOCK_RED=16),
        "bwd_input": dict(BLOCK_R=16, BLOCK_C=16, BLOCK_RED=16),
        "bwd_weight": dict(BLOCK_D=16, BLOCK_K=16, BLOCK_M=16, split=3),
        "colsum": dict(BLOCK_D=16),
    }
    saved = dict(pe_triton.CONFIG_OVERRIDES)
    pe_triton.CONFIG_OVERRIDES.update(overrides)
    yield
    pe_triton.CONFIG_OVERRIDES.clear()
    pe_triton.CONFIG_OVERRIDES.update(saved)


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output starts as NaN: an element a kernel fails to write shows up as non-finite."""

    def new_output(shape, dtype, device, memory_format=torch.contiguous_format):
        return torch.full(shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=memory_format)

    monkeypatch.setattr(launch, "new_output", new_output)


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomics"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_tiny_tiles_split_reduction_every_element_written(tiny_tiles, poisoned, layout, deterministic):
    inputs = _make(2, 3, 16, 24, 4, 40, 3, "all")
    fastvit.set_deterministic(deterministic)
    try:
        ours = _check(f"tiny tiles {layout}", torch.float32, inputs, layout)
    finally:
        fastvit.set_deterministic(False)
    assert all(torch.isfinite(t).all() for t in ours)


def test_every_output_element_written(poisoned):
    for case in ("gray-p8-reg3-noembedclass", "rgba-nobias-pos-patchonly"):
        *shape, bias = CASES[case]
        ours = _run(
            lambda *a: fastvit.ops.patch_embed(*a, backend="triton"), _cast(_make(*shape, bias=bias), torch.float16)
        )
        assert all(t is None or torch.isfinite(t).all() for t in ours), case


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomics"])
def test_gpu_tile_heuristics_run_in_the_interpreter(monkeypatch, poisoned, deterministic):
    # The GPU tile sizes (128-row blocks, 8 warps) and the dW split heuristic (fp32: 32-row blocks, so 1024 patch
    # rows and one D×K tile on 132 SMs give min(264, 32 // 8, 16) = a 4-way split), which no other CPU test
    # reaches, run through the interpreter on a mid-size shape.
    monkeypatch.setattr(launch, "on_gpu", lambda tensor: True)
    monkeypatch.setattr(launch, "num_sms", lambda index: 132)
    inputs = _make(4, 3, 64, 64, 4, 32, 1, "all")
    fastvit.set_deterministic(deterministic)
    try:
        _check("gpu heuristics", torch.float32, inputs, "channels_last")
    finally:
        fastvit.set_deterministic(False)


def test_deterministic_gradients_are_bit_identical(tiny_tiles):
    inputs = _cast(_make(2, 3, 16, 16, 4, 32, 1, "all"), torch.float32)
    fastvit.set_deterministic(True)
    try:
        runs = [_run(lambda *a: fastvit.ops.patch_embed(*a, backend="triton"), inputs) for _ in range(2)]
    finally:
        fastvit.set_deterministic(False)
    for label, first, second in zip(NAMES, *runs):
        assert torch.equal(first, second), label


def test_gradient_only_where_asked():
    x, weight, bias, pos, cls = _cast(_make(2, 3, 16, 16, 4, 32, 1, "all"), torch.float32)
    weight.requires_grad_(True)
    out = fastvit.ops.patch_embed(x, weight, bias, pos, cls, backend="triton")
    (grad_weight,) = torch.autograd.grad(out.sum(), [weight])
    expected = torch.autograd.grad(reference.patch_embed(x, weight, bias, pos, cls).sum(), [weight])[0]
    torch.testing.assert_close(grad_weight, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(fastvit.ops.patch_embed(x, weight, bias, pos, cls, backend="triton"), out.detach())


def test_expanded_output_gradient():
    # out.sum() backpropagates a stride-0 (expanded) gradient: the kernels read dY by its strides.
    inputs = [t.requires_grad_(True) for t in _cast(_make(2, 3, 16, 16, 4, 16, 1, "all"), torch.float32)]
    grads = torch.autograd.grad(fastvit.ops.patch_embed(*inputs, backend="triton").sum(), inputs)
    expected = torch.autograd.grad(reference.patch_embed(*inputs).sum(), inputs)
    for label, got, want in zip(NAMES[1:], grads, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=label)


def test_empty_batch():
    x, weight, bias, pos, cls = _cast(_make(1, 3, 8, 8, 4, 16, 1, "all"), torch.float32)
    out = fastvit.ops.patch_embed(x[:0], weight, bias, pos, cls, backend="triton")
    assert out.shape == (0, 5, 16)


# ------------------------------------------------------------------------------------------------
# uint8 images, normalised in the kernel


def _uint8_images(batch, in_chans, height, width, channels_last, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, height, width, in_chans), generator=gen, dtype=torch.uint8)
    images = images if channels_last else images.permute(0, 3, 1, 2).contiguous()
    return images.to(DEVICE)


def _nchw(images, channels_last):
    return images.permute(0, 3, 1, 2) if channels_last else images


UINT8_CASES = {
    "rgb-hwc-imagenet": (3, True, pe_ops.IMAGENET_DEFAULT_MEAN, pe_ops.IMAGENET_DEFAULT_STD, 1, "all"),
    "rgb-chw-imagenet": (3, False, pe_ops.IMAGENET_DEFAULT_MEAN, pe_ops.IMAGENET_DEFAULT_STD, 0, None),
    "gray-hwc-custom": (1, True, (0.5,), (0.25,), 3, "patch"),
    "rgba-chw-custom": (4, False, (0.1, 0.2, 0.3, 0.4), (0.5, 0.6, 0.7, 0.8), 1, "all"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(UINT8_CASES))
def test_uint8_matches_normalise_then_reference(case, dtype):
    in_chans, channels_last, mean, std, num_prefix, pos = UINT8_CASES[case]
    images = _uint8_images(2, in_chans, 16, 24, channels_last)
    _, weight, bias, pos_embed, cls = _make(2, in_chans, 16, 24, 4, 32, num_prefix, pos)
    params = [weight, bias, pos_embed, cls]

    def ours(*p):
        return pe_ops.patch_embed_uint8(images, *p, mean=mean, std=std, channels_last=channels_last, backend="triton")

    def spec(*p):  # normalise in fp32 (fp64 for the fp64 run), round to the GEMM dtype, then the reference
        x = reference.normalize_uint8(_nchw(images, channels_last), mean, std, p[0].dtype)
        return reference.patch_embed(x, *p)

    mine = _run(ours, [None if t is None else t.to(dtype) for t in params])
    same = _run(spec, [None if t is None else t.to(dtype) for t in params])
    exact = _run(spec, params)
    for label, a, b, ref in zip(["tokens", *NAMES[2:]], mine, same, exact):
        if ref is None:
            continue
        assert a.dtype == dtype and torch.isfinite(a).all(), label
        assert_within_torch_error(f"uint8 {case} {dtype} {label}", a, b, ref, floor=_floor(ref, dtype))
    # The torch backend of the same op (conv2d after the same normalisation) obeys the same rule.
    torch_backend = pe_ops.patch_embed_uint8(
        images, *(None if t is None else t.to(dtype) for t in params), mean=mean, std=std,
        channels_last=channels_last, backend="torch",
    )  # fmt: skip
    assert_within_torch_error(
        f"uint8 {case} {dtype} torch backend", torch_backend, same[0], exact[0], floor=_floor(exact[0], dtype)
    )


def test_uint8_normalisation_is_torchvision_normalize():
    transforms = pytest.importorskip("torchvision.transforms")
    images = _uint8_images(2, 3, 8, 8, channels_last=False)
    mean, std = pe_ops.IMAGENET_DEFAULT_MEAN, pe_ops.IMAGENET_DEFAULT_STD
    expected = transforms.Normalize(mean, std)(images.float() / 255)
    assert torch.equal(reference.normalize_uint8(images, mean, std, torch.float32), expected)


def test_uint8_kernel_normalisation_within_fp32_rounding():
    # Identity projection (one 1x1 "patch" per pixel, D = C): the tokens are the normalised pixels themselves.
    images = _uint8_images(2, 3, 4, 4, channels_last=True)
    weight = torch.eye(3, dtype=torch.float32, device=DEVICE).view(3, 3, 1, 1)
    mean, std = pe_ops.IMAGENET_DEFAULT_MEAN, pe_ops.IMAGENET_DEFAULT_STD
    out = pe_ops.patch_embed_uint8(images, weight, None, mean=mean, std=std, backend="triton")
    expected = (
        reference.normalize_uint8(images.permute(0, 3, 1, 2), mean, std, torch.float32).flatten(2).transpose(1, 2)
    )
    torch.testing.assert_close(out, expected, atol=4 * torch.finfo(torch.float32).eps * 3, rtol=0)


def test_uint8_poisoned_and_deterministic(tiny_tiles, poisoned):
    images = _uint8_images(2, 3, 16, 24, channels_last=True)
    _, weight, bias, pos, cls = _cast(_make(2, 3, 16, 24, 4, 40, 1, "all"), torch.float32)
    fastvit.set_deterministic(True)
    try:
        runs = [_run(lambda *p: pe_ops.patch_embed_uint8(images, *p, backend="triton"), [weight, bias, pos, cls])]
        runs.append(_run(lambda *p: pe_ops.patch_embed_uint8(images, *p, backend="triton"), [weight, bias, pos, cls]))
    finally:
        fastvit.set_deterministic(False)
    for first, second in zip(*runs):
        assert torch.isfinite(first).all() and torch.equal(first, second)


# ------------------------------------------------------------------------------------------------
# torch.library registration: opcheck and torch.compile


def test_ops_are_registered():
    for name in TRITON_OPS:
        assert hasattr(torch.ops.fastvit, name), name


@pytest.mark.parametrize("case", ["rgb-cls-pos", "gray-p8-reg3-noembedclass", "rgba-nobias-pos-patchonly"])
def test_opcheck_forward(case):
    *shape, bias = CASES[case]
    x, weight, bias, pos, cls = [
        None if t is None else t.requires_grad_(True) for t in _cast(_make(*shape, bias=bias), torch.float32)
    ]
    torch.library.opcheck(torch.ops.fastvit.patch_embed_fwd.default, (x, weight, bias, pos, cls, None, None))
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    torch.library.opcheck(torch.ops.fastvit.patch_embed_fwd.default, (x_cl, weight, bias, pos, cls, None, None))


def test_opcheck_uint8_forward():
    images = _nchw(_uint8_images(2, 3, 8, 8, channels_last=True), True)
    _, weight, bias, pos, cls = [
        None if t is None else t.requires_grad_(True) for t in _cast(_make(2, 3, 8, 8, 4, 16, 1, "all"), torch.float32)
    ]
    scale, shift = [1 / (255 * 0.25)] * 3, [-2.0] * 3
    torch.library.opcheck(torch.ops.fastvit.patch_embed_fwd.default, (images, weight, bias, pos, cls, scale, shift))


def test_opcheck_backward_ops():
    x, weight, *_ = _cast(_make(2, 3, 8, 8, 4, 16, 1, "all"), torch.float32)
    grad = torch.randn(2, 5, 16, device=DEVICE)
    torch.library.opcheck(torch.ops.fastvit.patch_embed_bwd_input.default, (grad, x, weight))
    torch.library.opcheck(torch.ops.fastvit.patch_embed_bwd_weight.default, (grad, x, weight, None, None))
    torch.library.opcheck(torch.ops.fastvit.patch_embed_bwd_colsum.default, (grad,))


def test_torch_compile_fullgraph_with_backward():
    torch._dynamo.reset()
    inputs = _cast(_make(2, 3, 16, 16, 4, 32, 1, "all"), torch.float32)

    def fn(*args):
        return fastvit.ops.patch_embed(*args, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager = _run(fn, inputs)
    got = _run(compiled, inputs)
    for label, a, b in zip(NAMES, got, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=label)


def test_torch_compile_uint8_fullgraph():
    torch._dynamo.reset()
    images = _uint8_images(2, 3, 8, 8, channels_last=True)
    params = _cast(_make(2, 3, 8, 8, 4, 16, 1, "all"), torch.float32)[1:]

    def fn(*p):
        return pe_ops.patch_embed_uint8(images, *p, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for label, a, b in zip(["tokens", *NAMES[2:]], _run(compiled, params), _run(fn, params)):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=label)


# ------------------------------------------------------------------------------------------------
# Bad inputs: clear errors before any kernel runs


def _bad_input_cases():
    x, w, b, pos, cls = _make(1, 3, 8, 8, 4, 16, 1, "all", device="cpu")
    f32 = [t.float() for t in (x, w, b, pos, cls)]
    images = torch.zeros(1, 8, 8, 3, dtype=torch.uint8)
    return [
        (lambda: fastvit.ops.patch_embed(x, w, b, pos, cls, backend="triton"), TypeError, "use backend='torch'"),
        (
            lambda: fastvit.ops.patch_embed(f32[0], f32[1].half(), *f32[2:], backend="triton"),
            TypeError,
            "one dtype",
        ),
        (lambda: fastvit.ops.patch_embed(f32[0].half(), *f32[1:], backend="triton"), TypeError, "one dtype"),
        (
            lambda: pe_ops.patch_embed_uint8(images.float(), *f32[1:], backend="triton"),
            TypeError,
            "images must be a uint8 tensor",
        ),
        (lambda: pe_ops.patch_embed_uint8(images[0], *f32[1:]), ValueError, "images must have 4 dimensions"),
        (
            lambda: pe_ops.patch_embed_uint8(images, *f32[1:], channels_last=False),
            ValueError,
            "images must have 3 channels",
        ),
        (lambda: pe_ops.patch_embed_uint8(images, *f32[1:], mean=(0.5, 0.5)), ValueError, "mean must be 3 finite"),
        (lambda: pe_ops.patch_embed_uint8(images, *f32[1:], std=(0.5, 0.0, 0.5)), ValueError, "std must be positive"),
        (lambda: pe_ops.patch_embed_uint8(images, *f32[1:], mean="rgb"), TypeError, "mean must be a sequence"),
        (
            lambda: pe_ops.patch_embed_uint8(images, *(t.double() for t in f32[1:]), backend="triton"),
            TypeError,
            "use backend='torch'",
        ),
        (
            lambda: pe_ops.patch_embed_uint8(
                torch.zeros(1, 8, 8, 5, dtype=torch.uint8),
                torch.randn(16, 5, 4, 4),
                None,
                mean=[0.0] * 5,
                std=[1.0] * 5,
                backend="triton",
            ),
            ValueError,
            "at most 4 channels",
        ),  # fmt: skip
        (
            lambda: pe_ops.patch_embed_uint8(torch.zeros(1, 10, 8, 3, dtype=torch.uint8), *f32[1:]),
            ValueError,
            "not divisible by the patch size",
        ),
    ]


@pytest.mark.parametrize("index", range(len(_bad_input_cases())))
def test_bad_inputs(index):
    call, error, message = _bad_input_cases()[index]
    with pytest.raises(error, match=message):
        call()


def test_one_coverage_rule_for_the_triton_kernels():
    cpu = torch.device("cpu")
    f32, f64 = torch.ones(1), torch.ones(1, dtype=torch.float64)

    def why_not(*tensors, in_chans=3, uint8=False):
        return pe_triton.supports(pe_ops.patch_embed_call(cpu, *tensors, in_chans=in_chans, uint8=uint8))

    assert why_not(f32, f32, None) is None
    assert "float64" in why_not(f64, f64)
    assert "mixed dtypes" in why_not(f32, f32.half())
    assert "bfloat16" in why_not(f32.bfloat16())  # the interpreter's bf16 tl.dot is broken: refused
    assert "at most 4 channels" in why_not(f32, in_chans=5, uint8=True)
    with pytest.raises(TypeError, match="float64"):
        fastvit.ops.patch_embed(
            torch.randn(1, 3, 8, 8).double(), torch.randn(6, 3, 4, 4).double(), None, backend="triton"
        )


def test_import_without_triton_still_works():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import importlib, fastvit, torch\n"
        "pe = importlib.import_module('fastvit.ops.patch_embed')\n"
        "x, w = torch.randn(1, 3, 8, 8), torch.randn(6, 3, 4, 4)\n"
        "print(fastvit.ops.patch_embed(x, w, None).shape)\n"
        "print(pe.patch_embed_uint8(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), w, None).shape)\n"
        "try:\n"
        "    fastvit.ops.patch_embed(x, w, None, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('error:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("torch.Size([1, 4, 6])") == 2 and "triton is not importable" in result.stdout


def test_uint8_torch_backend_supports_many_channels_and_fp64():
    images = torch.randint(0, 256, (1, 8, 8, 5), dtype=torch.uint8)
    weight = torch.randn(6, 5, 4, 4, dtype=torch.float64)
    out = pe_ops.patch_embed_uint8(images, weight, None, mean=[0.5] * 5, std=[0.5] * 5, backend="torch")
    assert out.shape == (1, 4, 6) and out.dtype == torch.float64


# ------------------------------------------------------------------------------------------------
# GPU only: bfloat16, real sizes, autocast, CUDA graphs, determinism with the real split, int64 offsets


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize(
    "name, shape",
    [
        ("vit_base_patch16_224", (64, 3, 224, 224, 16, 768, 1, "all")),
        ("vit_huge_patch14_224", (64, 3, 224, 224, 14, 1280, 1, "all")),
        ("vit_small_patch16_384_reg4_noembedclass", (8, 3, 384, 384, 16, 384, 5, "patch")),
        ("cifar_patch4", (32, 3, 32, 32, 4, 192, 1, "all")),
        ("gray_patch32", (4, 1, 224, 224, 32, 256, 0, None)),
    ],
)
def test_gpu_real_sizes(name, shape, layout, dtype):
    _check(f"gpu {name} {layout} {dtype}", dtype, _make(*shape), layout)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_uint8_vit_base(dtype):
    images = _uint8_images(64, 3, 224, 224, channels_last=True)
    _, weight, bias, pos, cls = _make(64, 3, 224, 224, 16, 768, 1, "all")
    params = [weight, bias, pos, cls]
    out = _run(lambda *p: pe_ops.patch_embed_uint8(images, *p, backend="triton"), [t.to(dtype) for t in params])
    same = _run(lambda *p: pe_ops.patch_embed_uint8(images, *p, backend="torch"), [t.to(dtype) for t in params])
    exact = _run(lambda *p: pe_ops.patch_embed_uint8(images, *p, backend="torch"), params)
    for label, a, b, ref in zip(["tokens", *NAMES[2:]], out, same, exact):
        assert_within_torch_error(f"gpu uint8 {dtype} {label}", a, b, ref, floor=_floor(ref, dtype))


@pytest.mark.gpu
@needs_cuda
def test_gpu_autocast_matches_reference_dtype_and_values():
    x, weight, bias, pos, cls = [t.float().requires_grad_(True) for t in _make(8, 3, 224, 224, 16, 768, 1, "all")]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fastvit.ops.patch_embed(x, weight, bias, pos, cls, backend="triton")
        expected = fastvit.ops.patch_embed(x, weight, bias, pos, cls, backend="torch")
    assert out.dtype == expected.dtype == torch.float32  # bf16 GEMM, promoted by the fp32 pos_embed
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=3e-2)
    out.sum().backward()
    for t in (x, weight, bias, pos, cls):
        assert t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()


@pytest.mark.gpu
@needs_cuda
def test_gpu_cuda_graph_capture_and_replay():
    x, weight, bias, pos, cls = _cast(_make(16, 3, 224, 224, 16, 768, 1, "all"), torch.bfloat16)
    params = [t.requires_grad_(True) for t in (weight, bias, pos, cls)]

    def step():
        out = fastvit.ops.patch_embed(x, *params, backend="triton")
        return torch.autograd.grad(out.float().square().sum(), params)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = step()  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.gpu
@needs_cuda
def test_gpu_deterministic_large_batch():
    inputs = _cast(_make(256, 3, 224, 224, 14, 1280, 1, "all"), torch.bfloat16)
    fastvit.set_deterministic(True)
    try:
        runs = [_run(lambda *a: fastvit.ops.patch_embed(*a, backend="triton"), inputs) for _ in range(2)]
    finally:
        fastvit.set_deterministic(False)
    for label, first, second in zip(NAMES, *runs):
        assert torch.equal(first, second), label


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_gpu_int64_offsets():
    # 14_300 ViT-B images: the input (2.15e9 elements) and the output (2.16e9) both pass 2**31 elements.
    batch = 14_300
    free, _total = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip(f"needs ~12 GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    x = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2**31 and batch * 197 * 768 > 2**31
    _, weight, bias, pos, cls = _cast(_make(1, 3, 224, 224, 16, 768, 1, "all"), torch.bfloat16)
    out = fastvit.ops.patch_embed(x, weight, bias, pos, cls, backend="triton")
    expected = reference.patch_embed(x[-2:].double(), weight.double(), bias.double(), pos.double(), cls.double())
    torch.testing.assert_close(out[-2:].double(), expected, atol=5e-2, rtol=2e-2)
