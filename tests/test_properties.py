"""Property-based tests (hypothesis) of every op against the reference, and torch.library hygiene of every op.

Properties: for shapes, dtypes and strides drawn by hypothesis, each fused op (``triton`` in Triton's interpreter,
``cuda`` through the extension's C++ kernels) gives the output and every gradient within 2x PyTorch's own error
in the same dtype, against the fp64 reference (plus one rounding). CPU runs are bounded (few examples, small
shapes, derandomized so CI is reproducible); ``gpu`` runs draw wider shapes and more examples.

Hygiene: ``torch.library.opcheck`` on every registered ``fastvit::`` op (the list comes from the dispatcher, so a new
op without a sample here fails), ``torch.autograd.gradcheck`` in fp64 through each op's reference-equivalent path
(the C++ ops take fp64 themselves; the Triton ops do not, so their reference is gradchecked and the kernels are
compared to it), and fake/meta outputs with the real outputs' shapes, dtypes and strides.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastvit
from fastvit import dispatch, ops, reference
from fastvit.ops.triton.attention import SUPPORTED_HEAD_DIMS

from utils import DEVICE, DTYPE_TOLS, assert_within_torch_error, needs_cuda, triton_skip_reason

TRITON_REASON = triton_skip_reason()
EXTENSION_REASON = dispatch.backend_unusable_reason("cuda", DEVICE)
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=str(TRITON_REASON))
needs_extension = pytest.mark.skipif(EXTENSION_REASON is not None, reason=str(EXTENSION_REASON))
ON_GPU = DEVICE.type == "cuda"

# CPU: a handful of derandomized examples per op (the interpreter is slow); GPU: wider and random.
CPU = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CPP = settings(CPU, max_examples=100)  # the extension's C++ kernels are fast
GPU = settings(CPU, max_examples=200, derandomize=False)

# bf16 tl.dot is broken in Triton's interpreter (triton#11584): bf16 Triton properties are GPU-only.
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
HEAD_DIMS = list(SUPPORTED_HEAD_DIMS)


def _grad_out(shape, seed=1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run(fn, inputs: list, grad_out: torch.Tensor) -> list:
    """[fn(*inputs), gradient of every floating input (None elsewhere)]."""
    leaves = [None if t is None else t.detach().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, grad_out.to(out.device, out.dtype)))
    return [out.detach()] + [next(grads) if t is not None and t.requires_grad else None for t in leaves]


def _check(name, fused, reference_fn, inputs: list, rounding_floor: float = 2.0, per_grad_out: float = 0.0):
    """fused vs the reference in the inputs' dtype vs the reference in fp64: the flash-attention rule everywhere.

    The floor is ``rounding_floor`` roundings of the dtype at the scale of the exact result (needed where PyTorch
    happens to be exact, e.g. a sum of two values), plus 1e-6 of it for fp32 cancellation noise, plus
    ``per_grad_out`` x max|grad_out| (attention: see ``_attention_floor``).
    """
    dtype = next(t.dtype for t in inputs if t is not None and t.is_floating_point())
    exact_inputs = [None if t is None else (t.double() if t.is_floating_point() else t) for t in inputs]
    probe = reference_fn(*exact_inputs)
    grad_out = _grad_out(probe.shape).to(probe.device)
    ours = _run(fused, inputs, grad_out)
    same = _run(reference_fn, inputs, grad_out)
    exact = _run(reference_fn, exact_inputs, grad_out)
    scale = max(ref.abs().max().item() for ref in exact if ref is not None and ref.numel())
    floor = (rounding_floor * torch.finfo(dtype).eps + 1e-6) * (
        1.0 + scale
    ) + per_grad_out * grad_out.abs().max().item()
    for i, (mine, theirs, ref) in enumerate(zip(ours, same, exact)):
        if ref is None:
            assert mine is None
            continue
        label = "out" if i == 0 else f"grad {i - 1}"
        assert mine.shape == ref.shape and mine.dtype == theirs.dtype, (label, mine.shape, mine.dtype, theirs.dtype)
        assert torch.isfinite(mine).all(), f"{name} {label}: non-finite"
        if dtype == torch.float64:
            torch.testing.assert_close(mine, ref, **DTYPE_TOLS[torch.float64])
        else:
            assert_within_torch_error(f"{name} {label}", mine, theirs, ref, floor=floor)


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` in another memory layout: a view with other strides (never a copy's strides)."""
    if layout == "slice":  # every other element along the last dim of a wider buffer, with an offset
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1] + 3, dtype=x.dtype, device=x.device)
        wide[..., 3::2] = x
        return wide[..., 3::2]
    if layout == "transposed":  # the first two dims swapped in memory
        return x.transpose(0, 1).contiguous().transpose(0, 1) if x.dim() >= 2 else x
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _randn(*shape, dtype, seed, scale=1.0, device=DEVICE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)


# ------------------------------------------------------------------------------------------------
# Attention


def _attention_floor(head_dim: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None) -> float:
    """fp32 cancellation noise of the fused backward, per unit of max|grad_out|.

    dS = P * (dP - Delta), with dP = dO·v and Delta = rowsum(dO * O) computed by different kernels: where the
    exact dS is 0 (one key, or a one-hot softmax) the fused backward keeps their fp32 rounding difference, about
    eps32 · sqrt(D) · |dO| · |v|, which dq and dk multiply by scale · |k| (or |q|). PyTorch's eager backward forms
    both from one matmul and cancels exactly.
    """
    scale = head_dim**-0.5 if scale is None else scale
    largest = max(q.abs().max().item(), k.abs().max().item())
    return 4 * torch.finfo(torch.float32).eps * head_dim**0.5 * v.abs().max().item() * scale * largest


@st.composite
def qkv_cases(draw, max_tokens=80, max_batch=2, max_heads=2):
    return dict(
        batch=draw(st.integers(1, max_batch)),
        tokens=draw(st.integers(1, max_tokens)),
        heads=draw(st.integers(1, max_heads)),
        head_dim=draw(st.sampled_from(HEAD_DIMS)),
        dtype=draw(st.sampled_from(TRITON_DTYPES)),
        layout=draw(st.sampled_from(["contiguous", "slice", "transposed"])),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
        magnitude=draw(st.sampled_from([0.5, 1.0, 3.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def _check_qkv(case):
    qkv = _randn(
        case["batch"], case["tokens"], 3 * case["heads"] * case["head_dim"],
        dtype=case["dtype"], seed=case["seed"], scale=case["magnitude"],
    )  # fmt: skip
    heads, scale = case["heads"], case["scale"]
    _check(
        f"qkv_attention {case}",
        lambda x: ops.qkv_attention(x, heads, scale, backend="triton"),
        lambda x: reference.qkv_attention(x, heads, scale),
        [_layout(qkv, case["layout"])],
        per_grad_out=_attention_floor(case["head_dim"], qkv, qkv, qkv, scale),
    )


@needs_triton
@CPU
@given(qkv_cases())
def test_qkv_attention_property(case):
    _check_qkv(case)


@st.composite
def attention_cases(draw, max_tokens=60, max_batch=2, max_heads=2):
    return dict(
        batch=draw(st.integers(1, max_batch)),
        heads=draw(st.integers(1, max_heads)),
        q_tokens=draw(st.integers(1, max_tokens)),
        kv_tokens=draw(st.integers(1, max_tokens)),
        head_dim=draw(st.sampled_from(HEAD_DIMS)),
        dtype=draw(st.sampled_from(TRITON_DTYPES)),
        layouts=draw(st.lists(st.sampled_from(["contiguous", "slice", "transposed"]), min_size=3, max_size=3)),
        seed=draw(st.integers(0, 2**16)),
    )


def _check_attention(case):
    shapes = [(case["batch"], case["heads"], n, case["head_dim"]) for n in (case["q_tokens"], case["kv_tokens"])]
    q, k, v = (_randn(*shapes[min(i, 1)], dtype=case["dtype"], seed=case["seed"] + i) for i in range(3))
    inputs = [_layout(t, layout) for t, layout in zip((q, k, v), case["layouts"])]
    _check(
        f"attention {case}",
        lambda q, k, v: ops.attention(q, k, v, backend="triton"),
        reference.attention,
        inputs,
        per_grad_out=_attention_floor(case["head_dim"], q, k, v, None),
    )


@needs_triton
@CPU
@given(attention_cases())
def test_attention_property(case):
    _check_attention(case)


# ------------------------------------------------------------------------------------------------
# Patch embedding


@st.composite
def patch_cases(draw, max_grid=5, max_dim=48, max_batch=2):
    return dict(
        batch=draw(st.integers(1, max_batch)),
        in_chans=draw(st.integers(1, 4)),
        patch=(draw(st.integers(1, 8)), draw(st.integers(1, 8))),
        grid=(draw(st.integers(1, max_grid)), draw(st.integers(1, max_grid))),
        dim=draw(st.integers(1, max_dim)),
        prefix=draw(st.integers(0, 3)),
        pos=draw(st.sampled_from([None, "all", "patch"])),
        bias=draw(st.booleans()),
        dtype=draw(st.sampled_from(TRITON_DTYPES)),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "slice"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _patch_inputs(case, dtype):
    (ph, pw), (gh, gw), dim, prefix = case["patch"], case["grid"], case["dim"], case["prefix"]
    seed = case["seed"]
    fan_in = case["in_chans"] * ph * pw
    pos_tokens = {"all": gh * gw + prefix, "patch": gh * gw}.get(case["pos"])
    return [
        _randn(case["batch"], case["in_chans"], gh * ph, gw * pw, dtype=dtype, seed=seed),
        _randn(dim, case["in_chans"], ph, pw, dtype=dtype, seed=seed + 1, scale=fan_in**-0.5),
        _randn(dim, dtype=dtype, seed=seed + 2) if case["bias"] else None,
        _randn(1, pos_tokens, dim, dtype=dtype, seed=seed + 3) if pos_tokens else None,
        _randn(1, prefix, dim, dtype=dtype, seed=seed + 4) if prefix else None,
    ]


def _check_patch(case):
    x, *params = _patch_inputs(case, case["dtype"])
    _check(
        f"patch_embed {case}",
        lambda *a: ops.patch_embed(*a, backend="triton"),
        reference.patch_embed,
        [_layout(x, case["layout"]), *params],
        rounding_floor=4.0,  # sums of B·N values rounded once in fp32 vs PyTorch's reduction order
    )


@needs_triton
@CPU
@given(patch_cases())
def test_patch_embed_property(case):
    _check_patch(case)


@st.composite
def uint8_cases(draw):
    in_chans = draw(st.integers(1, 4))
    return dict(
        case=draw(patch_cases()),
        in_chans=in_chans,
        channels_last=draw(st.booleans()),
        mean=draw(st.lists(st.floats(0.0, 1.0), min_size=in_chans, max_size=in_chans)),
        std=draw(st.lists(st.floats(0.1, 1.0), min_size=in_chans, max_size=in_chans)),
    )


def _check_uint8(draw_case):
    case = {**draw_case["case"], "in_chans": draw_case["in_chans"]}
    _, *params = _patch_inputs(case, case["dtype"])
    (ph, pw), (gh, gw) = case["patch"], case["grid"]
    gen = torch.Generator().manual_seed(case["seed"])
    images = torch.randint(0, 256, (case["batch"], gh * ph, gw * pw, case["in_chans"]), generator=gen).byte()
    images = images.to(DEVICE)
    if not draw_case["channels_last"]:
        images = images.permute(0, 3, 1, 2).contiguous()
    mean, std, channels_last = draw_case["mean"], draw_case["std"], draw_case["channels_last"]

    def spec(*p):
        nchw = images.permute(0, 3, 1, 2) if channels_last else images
        return reference.patch_embed(reference.normalize_uint8(nchw, mean, std, p[0].dtype), *p)

    fused = lambda *p: ops.patch_embed_uint8(  # noqa: E731
        images, *p, mean=mean, std=std, channels_last=channels_last, backend="triton"
    )
    _check(f"patch_embed_uint8 {draw_case}", fused, spec, params, rounding_floor=8.0)


@needs_triton
@settings(CPU, max_examples=15)
@given(uint8_cases())
def test_patch_embed_uint8_property(case):
    _check_uint8(case)


# ------------------------------------------------------------------------------------------------
# LayerNorm and LN-MLP on the extension (C++ on CPU tensors)

EXT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def ln_mlp_cases(draw, max_width=64, max_hidden=96):
    return dict(
        lead=tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))),
        width=draw(st.integers(1, max_width)),
        hidden=draw(st.integers(1, max_hidden)),
        dtype=draw(st.sampled_from(EXT_DTYPES)),
        fc1_bias=draw(st.booleans()),
        fc2_bias=draw(st.booleans()),
        residual=draw(st.booleans()),
        approximate=draw(st.sampled_from(["none", "tanh"])),
        eps=draw(st.sampled_from([1e-6, 1e-5, 1e-2])),
        layout=draw(st.sampled_from(["contiguous", "slice", "transposed"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _check_ln_mlp(case):
    dtype, width, hidden, seed = case["dtype"], case["width"], case["hidden"], case["seed"]
    device = "cpu" if dtype == torch.float64 else DEVICE  # the CUDA kernels take 16/32-bit floats; C++ all four
    inputs = [
        _randn(*case["lead"], width, dtype=dtype, seed=seed, scale=2.0, device=device) + 0.5,
        1 + _randn(width, dtype=dtype, seed=seed + 1, scale=0.2, device=device),
        _randn(width, dtype=dtype, seed=seed + 2, scale=0.2, device=device),
        _randn(hidden, width, dtype=dtype, seed=seed + 3, scale=width**-0.5, device=device),
        _randn(hidden, dtype=dtype, seed=seed + 4, scale=0.2, device=device) if case["fc1_bias"] else None,
        _randn(width, hidden, dtype=dtype, seed=seed + 5, scale=hidden**-0.5, device=device),
        _randn(width, dtype=dtype, seed=seed + 6, scale=0.2, device=device) if case["fc2_bias"] else None,
    ]
    inputs[0] = _layout(inputs[0], case["layout"])
    kwargs = dict(eps=case["eps"], approximate=case["approximate"], residual=case["residual"])
    _check(
        f"ln_mlp {case}",
        lambda *a: ops.ln_mlp(*a, **kwargs, backend="cuda"),
        lambda *a: reference.ln_mlp(*a, **kwargs),
        inputs,
        rounding_floor=4.0,
    )


@needs_extension
@CPP
@given(ln_mlp_cases())
def test_ln_mlp_property(case):
    _check_ln_mlp(case)


@st.composite
def layer_norm_cases(draw, max_width=300):
    return dict(
        lead=tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=3))),
        width=draw(st.integers(1, max_width)),
        dtype=draw(st.sampled_from(EXT_DTYPES)),
        eps=draw(st.sampled_from([1e-12, 1e-6, 1e-5])),  # positive: eps = 0 is refused (0/0 on a constant row)
        layout=draw(st.sampled_from(["contiguous", "slice", "transposed"])),
        offset=draw(st.floats(-10.0, 10.0)),  # |mean| <= 3.3 std: see test_layer_norm_accuracy_with_a_large_mean
        seed=draw(st.integers(0, 2**16)),
    )


def _check_layer_norm(case):
    dtype, width, seed = case["dtype"], case["width"], case["seed"]
    x = _randn(*case["lead"], width, dtype=torch.float64, seed=seed, scale=3.0) + case["offset"]
    eps = case["eps"]
    inputs = [
        _layout(x.to(dtype), case["layout"]),
        _randn(width, dtype=dtype, seed=seed + 1),
        _randn(width, dtype=dtype, seed=seed + 2),
    ]
    _check(
        f"layer_norm {case}",
        lambda *a: ops.layer_norm(*a, eps=eps, backend="cuda"),
        lambda *a: reference.layer_norm(*a, eps),
        inputs,
        rounding_floor=4.0,
    )


@needs_extension
@CPP
@given(layer_norm_cases())
def test_layer_norm_property(case):
    _check_layer_norm(case)


# ------------------------------------------------------------------------------------------------
# GPU: the same properties on wider shapes and more examples


@pytest.mark.gpu
@needs_cuda
@needs_triton
@GPU
@given(qkv_cases(max_tokens=1100, max_batch=4, max_heads=16))
def test_gpu_qkv_attention_property(case):
    _check_qkv(case)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@GPU
@given(attention_cases(max_tokens=1100, max_batch=4, max_heads=8))
def test_gpu_attention_property(case):
    _check_attention(case)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@GPU
@given(patch_cases(max_grid=40, max_dim=1280, max_batch=8))
def test_gpu_patch_embed_property(case):
    _check_patch(case)


@pytest.mark.gpu
@needs_cuda
@needs_extension
@GPU
@given(ln_mlp_cases(max_width=1536, max_hidden=6144))
def test_gpu_ln_mlp_property(case):
    _check_ln_mlp(case)


@pytest.mark.gpu
@needs_cuda
@needs_extension
@GPU
@given(layer_norm_cases(max_width=8192))
def test_gpu_layer_norm_property(case):
    _check_layer_norm(case)


# ------------------------------------------------------------------------------------------------
# torch.library hygiene: opcheck on every registered op


def _registered_ops() -> list[str]:
    import fastvit.ops  # noqa: F401  (registers every op)

    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastvit::"))


def _f32(*shape, grad=False, seed=0):
    return _randn(*shape, dtype=torch.float32, seed=seed).requires_grad_(grad)


def _samples_qkv_attention():
    qkv = _f32(1, 9, 3 * 2 * 32, grad=True)
    out, lse = torch.ops.fastvit.qkv_attention_fwd(qkv.detach(), 2, 0.2)
    return {
        "qkv_attention_fwd": [(qkv, 2, 0.2), (_layout(qkv.detach(), "slice").requires_grad_(), 2, 0.3)],
        "qkv_attention_bwd": [(torch.randn_like(out), qkv.detach(), out, lse, 2, 0.2)],
    }


def _samples_attention():
    q, k, v = (_f32(1, 2, n, 48, grad=True, seed=n) for n in (9, 12, 12))
    out, lse = torch.ops.fastvit.attention_fwd(q.detach(), k.detach(), v.detach(), 0.2)
    return {
        "attention_fwd": [(q, k, v, 0.2)],
        "attention_bwd": [(torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.2)],
    }


def _samples_patch_embed():
    x, w, b, pos, cls = _f32(2, 3, 8, 12, grad=True), _f32(16, 3, 4, 4, grad=True), _f32(16, grad=True), None, None
    pos, cls = _f32(1, 7, 16, grad=True, seed=3), _f32(1, 1, 16, grad=True, seed=4)
    images = torch.randint(0, 256, (2, 8, 12, 3), dtype=torch.uint8, device=DEVICE).permute(0, 3, 1, 2)
    grad = _f32(2, 7, 16, seed=5)
    return {
        "patch_embed_fwd": [
            (x, w, b, pos, cls, None, None),
            (
                x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(),
                w,
                None,
                None,
                None,
                None,
                None,
            ),
            (images, w, b, pos, cls, [1 / 255.0] * 3, [-0.5] * 3),
        ],
        "patch_embed_bwd_input": [(grad, x.detach(), w.detach())],
        "patch_embed_bwd_weight": [(grad, x.detach(), w.detach(), None, None)],
        "patch_embed_bwd_colsum": [(grad,)],
    }


def _samples_layer_norm():
    x, w, b = _f32(3, 5, 24, grad=True), _f32(24, grad=True, seed=1), _f32(24, grad=True, seed=2)
    _, mean, rstd = torch.ops.fastvit.layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    return {
        "layer_norm_fwd": [(x, w, b, 1e-5), (_layout(x.detach(), "slice").requires_grad_(), w, b, 1e-6)],
        "layer_norm_bwd": [(torch.randn_like(x.detach()), x.detach(), w.detach(), mean, rstd)],
    }


def _samples_ln_mlp():
    x, lnw, lnb = _f32(3, 5, 24, grad=True), _f32(24, grad=True, seed=1), _f32(24, grad=True, seed=2)
    w1, b1, w2, b2 = _f32(40, 24, grad=True, seed=3), _f32(40, grad=True, seed=4), _f32(24, 40, grad=True, seed=5), None
    args = (x, lnw, lnb, w1, b1, w2, b2)
    _, mean, rstd, pre = torch.ops.fastvit.ln_mlp_fwd(
        *(t if t is None else t.detach() for t in args), 1e-6, "none", True, True
    )
    detached = [t.detach() for t in (x, lnw, lnb)]
    return {
        "ln_mlp_fwd": [(*args, 1e-6, "none", True, True), (*args, 1e-5, "tanh", False, True)],
        "ln_mlp_bwd": [
            (torch.randn_like(x.detach()), *detached, mean, rstd, w1.detach(), pre, w2.detach(), "none", True, det)
            for det in (False, True)
        ],
    }


def _samples_linear_residual():
    x, weight = _f32(3, 5, 24, grad=True), _f32(40, 24, grad=True, seed=1)
    bias, residual = _f32(40, grad=True, seed=2), _f32(3, 5, 40, grad=True, seed=3)
    grad = _f32(3, 5, 40, seed=4)
    return {
        "linear_residual_fwd": [(x, weight, bias, residual), (x, weight, None, None)],
        "linear_residual_bwd": [
            (grad, x.detach(), weight.detach(), True, True, True, det) for det in (False, True)
        ],  # fmt: skip
    }


_SAMPLE_GROUPS = {
    "qkv_attention": (_samples_qkv_attention, TRITON_REASON),
    "attention": (_samples_attention, TRITON_REASON),
    "patch_embed": (_samples_patch_embed, TRITON_REASON),
    "layer_norm": (_samples_layer_norm, EXTENSION_REASON),
    "ln_mlp": (_samples_ln_mlp, EXTENSION_REASON),
    "linear_residual": (_samples_linear_residual, EXTENSION_REASON),
}


def _group_of(op_name: str) -> str | None:
    for group in sorted(_SAMPLE_GROUPS, key=len, reverse=True):
        if op_name.startswith(group + "_"):
            return group
    return None


@pytest.mark.parametrize("op_name", _registered_ops())
def test_every_registered_op_passes_opcheck(op_name):
    group = _group_of(op_name)
    assert group is not None, f"fastvit::{op_name} has no opcheck sample: add one to _SAMPLE_GROUPS in {__file__}"
    make, reason = _SAMPLE_GROUPS[group]
    if reason:
        pytest.skip(reason)
    samples = make()
    assert op_name in samples, f"fastvit::{op_name} has no opcheck sample in {make.__name__}"
    for args in samples[op_name]:
        torch.library.opcheck(getattr(torch.ops.fastvit, op_name).default, args)


def test_the_registry_lists_the_ops_fastvit_ships():
    names = set(_registered_ops())
    assert {"qkv_attention_fwd", "attention_fwd", "patch_embed_fwd"} <= names  # registered even without triton
    if EXTENSION_REASON is None:
        assert {"layer_norm_fwd", "layer_norm_bwd", "ln_mlp_fwd", "ln_mlp_bwd"} <= names


@pytest.mark.parametrize("op_name", _registered_ops())
def test_fake_outputs_have_the_real_shapes_dtypes_and_strides(op_name):
    from torch._subclasses.fake_tensor import FakeTensorMode

    group = _group_of(op_name)
    make, reason = _SAMPLE_GROUPS[group] if group else (None, "no sample (see opcheck test)")
    if reason:
        pytest.skip(reason)
    op = getattr(torch.ops.fastvit, op_name).default
    for args in make()[op_name]:
        args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=False) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = op(*fake_args)
        real = real if isinstance(real, (tuple, list)) else [real]
        fake = fake if isinstance(fake, (tuple, list)) else [fake]
        for i, (r, f) in enumerate(zip(real, fake)):
            assert (r.shape, r.dtype, r.device) == (f.shape, f.dtype, f.device), (op_name, i)
            if r.numel() > 1:
                assert r.stride() == f.stride(), (op_name, i, r.stride(), f.stride())


@pytest.mark.parametrize(
    "op", ["qkv_attention", "attention", "patch_embed", "patch_embed_uint8", "ln_mlp", "layer_norm"]
)
def test_public_ops_on_meta_tensors_give_the_real_shapes(op):
    # 'auto' runs the reference on meta tensors: shape inference for a whole model without memory.
    cases = {
        "qkv_attention": lambda d: ops.qkv_attention(torch.randn(2, 7, 3 * 2 * 32, device=d), 2),
        "attention": lambda d: ops.attention(*(torch.randn(2, 2, n, 32, device=d) for n in (7, 9, 9))),
        "patch_embed": lambda d: ops.patch_embed(
            torch.randn(2, 3, 8, 12, device=d), torch.randn(16, 3, 4, 4, device=d), None, None,
            torch.randn(1, 2, 16, device=d),
        ),
        "patch_embed_uint8": lambda d: ops.patch_embed_uint8(
            torch.zeros(2, 8, 12, 3, dtype=torch.uint8, device=d), torch.randn(16, 3, 4, 4, device=d), None
        ),
        "ln_mlp": lambda d: ops.ln_mlp(
            torch.randn(2, 5, 24, device=d), torch.ones(24, device=d), torch.zeros(24, device=d),
            torch.randn(40, 24, device=d), None, torch.randn(24, 40, device=d), None,
        ),
        "layer_norm": lambda d: ops.layer_norm(
            torch.randn(2, 5, 24, device=d), torch.ones(24, device=d), torch.zeros(24, device=d)
        ),
    }  # fmt: skip
    meta, real = cases[op]("meta"), cases[op]("cpu")
    assert meta.device.type == "meta" and (meta.shape, meta.dtype) == (real.shape, real.dtype)


def test_model_on_the_meta_device_infers_shapes():
    model = fastvit.ViT(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5).to("meta")
    out = model(torch.randn(4, 3, 32, 32, device="meta"))
    assert out.device.type == "meta" and out.shape == (4, 5)


# ------------------------------------------------------------------------------------------------
# gradcheck in fp64 through each op's reference-equivalent path


@needs_extension
@pytest.mark.parametrize("shape", [(2, 3, 5), (4, 1), (1, 7)])
def test_layer_norm_extension_gradcheck_fp64(shape):
    gen = torch.Generator().manual_seed(0)
    inputs = [
        torch.randn(shape, dtype=torch.float64, generator=gen).requires_grad_(),
        torch.randn(shape[-1], dtype=torch.float64, generator=gen).requires_grad_(),
        torch.randn(shape[-1], dtype=torch.float64, generator=gen).requires_grad_(),
    ]
    fn = lambda *a: ops.layer_norm(*a, eps=1e-5, backend="cuda")  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


@needs_extension
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("residual", [True, False])
def test_ln_mlp_extension_gradcheck_fp64(approximate, residual):
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).requires_grad_()

    inputs = [randn(2, 3, 5), 1 + randn(5, scale=0.1), randn(5), randn(7, 5), randn(7), randn(5, 7), randn(5)]
    inputs[1] = inputs[1].detach().requires_grad_()
    fn = lambda *a: ops.ln_mlp(*a, eps=1e-5, approximate=approximate, residual=residual, backend="cuda")  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


def _gradcheck_and_compare(reference_fn, fused_fn, inputs_fp64: list):
    """gradcheck the reference in fp64; then the fused kernel's fp32 gradients must match those fp64 gradients."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs_fp64]
    assert torch.autograd.gradcheck(reference_fn, leaves)
    grad_out = _grad_out(reference_fn(*leaves).shape).to(leaves[0].device)
    exact = _run(reference_fn, leaves, grad_out)
    fused = _run(fused_fn, [t.float() if t.is_floating_point() else t for t in leaves], grad_out)
    for i, (got, want) in enumerate(zip(fused, exact)):
        if want is not None:
            scale = 1.0 + want.abs().max().item()
            assert (got.double() - want).abs().max().item() <= 1e-5 * scale, f"tensor {i}"


@needs_triton
@pytest.mark.parametrize("head_dim", [32, 80])
def test_qkv_attention_reference_gradcheck_and_kernel_agree(head_dim):
    qkv = torch.randn(1, 5, 3 * 2 * head_dim, dtype=torch.float64, device=DEVICE)
    _gradcheck_and_compare(
        lambda x: reference.qkv_attention(x, 2), lambda x: ops.qkv_attention(x, 2, backend="triton"), [qkv]
    )


@needs_triton
def test_attention_reference_gradcheck_and_kernel_agree():
    q, k, v = (torch.randn(1, 2, n, 32, dtype=torch.float64, device=DEVICE) for n in (4, 6, 6))
    _gradcheck_and_compare(
        lambda q, k, v: reference.attention(q, k, v, 0.3),
        lambda q, k, v: ops.attention(q, k, v, 0.3, backend="triton"),
        [q, k, v],
    )


@needs_triton
@pytest.mark.parametrize("pos", ["all", "patch"])
def test_patch_embed_reference_gradcheck_and_kernel_agree(pos):
    x, weight, bias = torch.randn(2, 2, 4, 8), torch.randn(5, 2, 2, 4) * 0.3, torch.randn(5)
    tokens = 4 + 1 if pos == "all" else 4
    pos_embed, cls_token = torch.randn(1, tokens, 5), torch.randn(1, 1, 5)
    _gradcheck_and_compare(
        reference.patch_embed,
        lambda *a: ops.patch_embed(*a, backend="triton"),
        [t.to(DEVICE, torch.float64) for t in (x, weight, bias, pos_embed, cls_token)],
    )


@needs_triton
def test_patch_embed_uint8_reference_gradcheck_and_kernel_agree():
    images = torch.randint(0, 256, (2, 4, 8, 3), dtype=torch.uint8, device=DEVICE)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)

    def spec(*p):
        x = reference.normalize_uint8(images.permute(0, 3, 1, 2), mean, std, p[0].dtype)
        return reference.patch_embed(x, *p)

    params = [torch.randn(5, 3, 2, 4) * 0.3, torch.randn(5), torch.randn(1, 5, 5), torch.randn(1, 1, 5)]
    _gradcheck_and_compare(
        spec,
        lambda *p: ops.patch_embed_uint8(images, *p, mean=mean, std=std, backend="triton"),
        [t.to(DEVICE, torch.float64) for t in params],
    )
