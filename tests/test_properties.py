"""Property-based tests (hypothesis) of every op against the reference, and torch.library hygiene of every op.

Properties: for shapes, dtypes and strides drawn by hypothesis, each fused backend of each op (from the op-case
table, ``tests/op_cases.py``: ``triton`` in Triton's interpreter, ``cuda`` through the extension's C++ kernels)
gives the output and every gradient within 2x PyTorch's own error in the same dtype, against the fp64 reference
(plus one rounding). The dtypes drawn are the ones the backend's ``supports`` predicate takes. CPU runs are bounded
(few examples, small shapes, derandomized so CI is reproducible); ``gpu`` runs draw wider shapes and more examples.

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
from fastvit.ops.triton.attention import SUPPORTED_HEAD_DIMS
from fastvit.ops.triton.linear_launch import NORM_CODES

from op_cases import (
    ATTENTION,
    LAYER_NORM,
    LINEAR_RESIDUAL,
    LN_LINEAR,
    LN_MLP,
    OP_CASES,
    PATCH_EMBED,
    PATCH_EMBED_UINT8,
    QKV_ATTENTION,
    REFERENCE,
    OpCase,
    Sample,
    assert_matches_reference,
    backend_params,
    randn,
    relayout,
    rounding_floor,
)
from utils import DEVICE, backend_skip_reason, needs_cuda

TRITON_REASON = backend_skip_reason("triton")
EXTENSION_REASON = backend_skip_reason("cuda")
CPU_DEVICE = torch.device("cpu")

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
HEAD_DIMS = list(SUPPORTED_HEAD_DIMS)


def _fused(*op_names: str) -> list:
    return backend_params(op_names, fused_only=True)


def _dtypes(case: OpCase, backend: str) -> list[torch.dtype]:
    """The dtypes ``backend`` takes for ``case`` on DEVICE, then those it takes on CPU tensors only (the C++ twin's
    float64 on a GPU machine: drawn on CPU tensors). bf16 Triton is GPU-only (triton#11584)."""
    return list(dict.fromkeys((*case.dtypes(backend, DEVICE), *case.dtypes(backend, CPU_DEVICE))))


def _device(case: OpCase, backend: str, dtype: torch.dtype) -> torch.device:
    return DEVICE if dtype in case.dtypes(backend, DEVICE) else CPU_DEVICE


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


def _attention_shape(draw, dtypes, max_batch: int, max_heads: int) -> dict:
    """What every attention case draws: batch, heads, head dim, dtype and seed."""
    return dict(
        batch=draw(st.integers(1, max_batch)),
        heads=draw(st.integers(1, max_heads)),
        head_dim=draw(st.sampled_from(HEAD_DIMS)),
        dtype=draw(st.sampled_from(dtypes)),
        seed=draw(st.integers(0, 2**16)),
    )


LAYOUTS = ["contiguous", "slice", "transposed"]


@st.composite
def qkv_cases(draw, dtypes, max_tokens=80, max_batch=2, max_heads=2):
    return _attention_shape(draw, dtypes, max_batch, max_heads) | dict(
        tokens=draw(st.integers(1, max_tokens)),
        layout=draw(st.sampled_from(LAYOUTS)),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))),
        magnitude=draw(st.sampled_from([0.5, 1.0, 3.0])),
    )


def _check_qkv(case, backend):
    shape = {k: case[k] for k in ("batch", "tokens", "heads", "head_dim")}
    sample = QKV_ATTENTION.make(torch.float64, seed=case["seed"], **shape)
    qkv = (sample["qkv"] * case["magnitude"]).to(case["dtype"])
    sample = sample.replace(qkv=relayout(qkv, case["layout"])).with_kwargs(scale=case["scale"])
    floor = rounding_floor(per_grad_out=_attention_floor(case["head_dim"], qkv, qkv, qkv, case["scale"]))
    assert_matches_reference(QKV_ATTENTION, sample, backend, floor=floor, name=str(case))


@st.composite
def attention_cases(draw, dtypes, max_tokens=60, max_batch=2, max_heads=2):
    return _attention_shape(draw, dtypes, max_batch, max_heads) | dict(
        q_tokens=draw(st.integers(1, max_tokens)),
        kv_tokens=draw(st.integers(1, max_tokens)),
        layouts=draw(st.lists(st.sampled_from(LAYOUTS), min_size=3, max_size=3)),
    )


def _check_attention(case, backend):
    shape = {k: case[k] for k in ("batch", "heads", "q_tokens", "kv_tokens", "head_dim")}
    sample = ATTENTION.make(case["dtype"], seed=case["seed"], **shape)
    q, k, v = sample.args
    sample = sample.replace(**{n: relayout(sample[n], layout) for n, layout in zip("qkv", case["layouts"])})
    floor = rounding_floor(per_grad_out=_attention_floor(case["head_dim"], q, k, v, None))
    assert_matches_reference(ATTENTION, sample, backend, floor=floor, name=str(case))


# ------------------------------------------------------------------------------------------------
# Patch embedding


@st.composite
def patch_cases(draw, dtypes, max_grid=5, max_dim=48, max_batch=2):
    return dict(
        batch=draw(st.integers(1, max_batch)),
        in_chans=draw(st.integers(1, 4)),
        patch=(draw(st.integers(1, 8)), draw(st.integers(1, 8))),
        grid=(draw(st.integers(1, max_grid)), draw(st.integers(1, max_grid))),
        dim=draw(st.integers(1, max_dim)),
        prefix=draw(st.integers(0, 3)),
        pos=draw(st.sampled_from([None, "all", "patch"])),
        bias=draw(st.booleans()),
        dtype=draw(st.sampled_from(dtypes)),
        layout=draw(st.sampled_from(["contiguous", "channels_last", "slice"])),
        seed=draw(st.integers(0, 2**16)),
    )


_PATCH_SHAPE = ("batch", "in_chans", "patch", "grid", "dim", "prefix", "pos", "bias")


def _check_patch(case, backend):
    sample = PATCH_EMBED.make(case["dtype"], seed=case["seed"], **{k: case[k] for k in _PATCH_SHAPE})
    sample = sample.replace(x=relayout(sample["x"], case["layout"]))
    # rounding_floor 4: sums of B·N values rounded once in fp32 vs PyTorch's reduction order
    assert_matches_reference(PATCH_EMBED, sample, backend, floor=rounding_floor(4.0), name=str(case))


@st.composite
def uint8_cases(draw, dtypes):
    in_chans = draw(st.integers(1, 4))
    return dict(
        case=draw(patch_cases(dtypes)),
        in_chans=in_chans,
        channels_last=draw(st.booleans()),
        mean=draw(st.lists(st.floats(0.0, 1.0), min_size=in_chans, max_size=in_chans)),
        std=draw(st.lists(st.floats(0.1, 1.0), min_size=in_chans, max_size=in_chans)),
    )


def _check_uint8(draw_case, backend):
    case = {**draw_case["case"], "in_chans": draw_case["in_chans"]}
    options = {k: draw_case[k] for k in ("channels_last", "mean", "std")}
    sample = PATCH_EMBED_UINT8.make(case["dtype"], seed=case["seed"], **{k: case[k] for k in _PATCH_SHAPE}, **options)
    assert_matches_reference(PATCH_EMBED_UINT8, sample, backend, floor=rounding_floor(8.0), name=str(draw_case))


# ------------------------------------------------------------------------------------------------
# LayerNorm and LN-MLP on the extension (C++ on CPU tensors)


@st.composite
def ln_mlp_cases(draw, dtypes, max_width=64, max_hidden=96):
    return dict(
        lead=tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=2))),
        width=draw(st.integers(1, max_width)),
        hidden=draw(st.integers(1, max_hidden)),
        dtype=draw(st.sampled_from(dtypes)),
        fc1_bias=draw(st.booleans()),
        fc2_bias=draw(st.booleans()),
        residual=draw(st.booleans()),
        approximate=draw(st.sampled_from(["none", "tanh"])),
        eps=draw(st.sampled_from([1e-6, 1e-5, 1e-2])),
        layout=draw(st.sampled_from(["contiguous", "slice", "transposed"])),
        seed=draw(st.integers(0, 2**16)),
    )


def _check_ln_mlp(case, backend):
    dtype = case["dtype"]
    shape = {k: case[k] for k in ("lead", "width", "hidden", "fc1_bias", "fc2_bias")}
    sample = LN_MLP.make(dtype, _device(LN_MLP, backend, dtype), seed=case["seed"], **shape)
    sample = sample.replace(x=relayout(sample["x"], case["layout"]))
    sample = sample.with_kwargs(eps=case["eps"], approximate=case["approximate"], residual=case["residual"])
    assert_matches_reference(LN_MLP, sample, backend, floor=rounding_floor(4.0), name=str(case))


@st.composite
def layer_norm_cases(draw, dtypes, max_width=300):
    return dict(
        lead=tuple(draw(st.lists(st.integers(1, 6), min_size=0, max_size=3))),
        width=draw(st.integers(1, max_width)),
        dtype=draw(st.sampled_from(dtypes)),
        eps=draw(st.sampled_from([1e-12, 1e-6, 1e-5])),  # eps must be positive; 1e-12: next to no regularisation
        layout=draw(st.sampled_from(["contiguous", "slice", "transposed"])),
        offset=draw(st.floats(-10.0, 10.0)),  # |mean| <= 3.3 std: see test_layer_norm_accuracy_with_a_large_mean
        seed=draw(st.integers(0, 2**16)),
    )


def _check_layer_norm(case, backend):
    dtype, lead, width, seed = case["dtype"], case["lead"], case["width"], case["seed"]
    device = _device(LAYER_NORM, backend, dtype)
    x = randn(*lead, width, dtype=torch.float64, device=device, seed=seed + 1, scale=3.0, offset=case["offset"])
    sample = LAYER_NORM.make(torch.float64, device, seed=seed, lead=lead, width=width).replace(x=x).to(dtype)
    # One element per row: the variance is 0 and rstd = eps**-0.5 (1e6 at eps 1e-12) multiplies the rounding
    # residue of x - mean, so the gradient, exactly 0, comes out as noise of ~1e-10 even in fp64 (and PyTorch's
    # float16 answer overflows): such a row is drawn with a regularising eps.
    eps = max(case["eps"], 1e-6) if width == 1 else case["eps"]
    sample = sample.replace(x=relayout(sample["x"], case["layout"])).with_kwargs(eps=eps)
    assert_matches_reference(LAYER_NORM, sample, backend, floor=rounding_floor(4.0), name=str(case))


# ------------------------------------------------------------------------------------------------
# The property tests: per op its check, its hypothesis strategy (of the dtypes to draw, then sizes) and op case


PROPERTIES = {
    "qkv_attention": (_check_qkv, qkv_cases, QKV_ATTENTION),
    "attention": (_check_attention, attention_cases, ATTENTION),
    "patch_embed": (_check_patch, patch_cases, PATCH_EMBED),
    "patch_embed_uint8": (_check_uint8, uint8_cases, PATCH_EMBED_UINT8),
    "ln_mlp": (_check_ln_mlp, ln_mlp_cases, LN_MLP),
    "layer_norm": (_check_layer_norm, layer_norm_cases, LAYER_NORM),
}
# On a GPU: wider shapes than the strategies' CPU defaults.
GPU_SIZES = {
    "qkv_attention": dict(max_tokens=1100, max_batch=4, max_heads=16),
    "attention": dict(max_tokens=1100, max_batch=4, max_heads=8),
    "patch_embed": dict(max_grid=40, max_dim=1280, max_batch=8),
    "ln_mlp": dict(max_width=1536, max_hidden=6144),
    "layer_norm": dict(max_width=8192),
}


def property_test(op_names, test_settings, extension: bool | None = None, sizes: dict | None = None):
    """A hypothesis test of ``op_names``' fused backends (``extension``: only the C++ ones, or only the others)."""
    params = [p for p in _fused(*op_names) if extension is None or (p.values[1] == "cuda") == extension]

    @test_settings
    @given(data=st.data())
    @pytest.mark.parametrize("op, backend", params)
    def test(op, backend, data):
        check, cases, op_case = PROPERTIES[op]
        check(data.draw(cases(_dtypes(op_case, backend), **(sizes or {}).get(op, {}))), backend)

    return test


test_attention_property = property_test(["qkv_attention", "attention"], CPU)
test_patch_embed_property = property_test(["patch_embed"], CPU)
test_patch_embed_uint8_property = property_test(["patch_embed_uint8"], settings(CPU, max_examples=15))
test_extension_property = property_test(["ln_mlp", "layer_norm"], CPP, extension=True)
# Triton's interpreter: fewer examples than the C++ twin's (~0.8 s each)
test_ln_mlp_property_interpreted = property_test(["ln_mlp"], CPU, extension=False)
test_gpu_property = pytest.mark.gpu(needs_cuda(property_test(list(GPU_SIZES), GPU, sizes=GPU_SIZES)))


# ------------------------------------------------------------------------------------------------
# torch.library hygiene: opcheck on every registered op


def _registered_ops() -> list[str]:
    import fastvit.ops  # noqa: F401  (registers every op)

    return sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastvit::"))


def _samples_qkv_attention():
    qkv = QKV_ATTENTION.make(batch=1, tokens=9, requires_grad=True)["qkv"]
    out, lse = torch.ops.fastvit.qkv_attention_fwd(qkv.detach(), 2, 0.2)
    keep = torch.arange(9, device=qkv.device)[None, :] < 5  # a key-padding mask: the last 4 keys masked
    masked_out, masked_lse = torch.ops.fastvit.qkv_attention_fwd(qkv.detach(), 2, 0.2, keep)
    return {
        "qkv_attention_fwd": [
            (qkv, 2, 0.2),
            (relayout(qkv.detach(), "slice").requires_grad_(), 2, 0.3),
            (qkv, 2, 0.2, keep),
        ],
        "qkv_attention_bwd": [
            (torch.randn_like(out), qkv.detach(), out, lse, 2, 0.2),
            (torch.randn_like(out), qkv.detach(), masked_out, masked_lse, 2, 0.2, keep),
        ],
    }


def _samples_qkv_attention_prologue():
    from fastvit.eva import rope_table

    qkv = randn(1, 9, 3 * 2 * 32, seed=6).requires_grad_()  # 2 heads of 32; 1 class token + a 2x4 grid
    rope = rope_table((2, 4), 32).to(DEVICE)
    q_weight, q_bias, k_weight = (1 + 0.1 * randn(32, seed=seed) for seed in (7, 8, 9))
    prologue = (rope, 1, False, "layer", q_weight.requires_grad_(), q_bias, 1e-6, "rms", k_weight, None, 1e-5)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in prologue]
    out, lse = torch.ops.fastvit.qkv_attention_prologue_fwd(qkv.detach(), 2, 0.2, *detached)
    return {
        "qkv_attention_prologue_fwd": [(qkv, 2, 0.2, *prologue)],
        "qkv_attention_prologue_bwd": [(torch.randn_like(out), qkv.detach(), out, lse, 2, 0.2, *detached)],
    }


def _samples_varlen_qkv_attention():
    qkv = randn(9, 3 * 2 * 32, seed=5).requires_grad_()
    cu_seqlens = torch.tensor([0, 4, 4, 9], dtype=torch.int32, device=DEVICE)  # an empty sequence in the middle
    out, lse = torch.ops.fastvit.varlen_qkv_attention_fwd(qkv.detach(), cu_seqlens, 5, 2, 0.2)
    return {
        "varlen_qkv_attention_fwd": [(qkv, cu_seqlens, 5, 2, 0.2)],
        "varlen_qkv_attention_bwd": [(torch.randn_like(out), qkv.detach(), cu_seqlens, out, lse, 5, 2, 0.2)],
    }


def _samples_attention():
    q, k, v = ATTENTION.make(batch=2, q_tokens=9, kv_tokens=12, head_dim=48, requires_grad=True).args
    qkv = [t.detach() for t in (q, k, v)]
    keep = torch.arange(12, device=DEVICE)[None, :] < torch.tensor([[7], [0]], device=DEVICE)  # one entry all masked
    out, lse = torch.ops.fastvit.attention_fwd(*qkv, 0.2)
    masked_out, masked_lse = torch.ops.fastvit.attention_fwd(*qkv, 0.2, keep)
    return {
        "attention_fwd": [(q, k, v, 0.2), (q, k, v, 0.2, keep)],
        "attention_bwd": [
            (torch.randn_like(out), *qkv, out, lse, 0.2),
            (torch.randn_like(out), *qkv, masked_out, masked_lse, 0.2, keep),
        ],
    }


def _samples_attention_prologue():
    # The attention-pooling head's form: one query broadcast over the batch (stride 0), a k-norm, a key mask.
    latent = randn(1, 2, 1, 32, seed=10).requires_grad_()
    k, v = (randn(2, 2, 11, 32, seed=seed).requires_grad_() for seed in (11, 12))
    keep = torch.arange(11, device=DEVICE)[None, :] < torch.tensor([[11], [4]], device=DEVICE)
    q_weight, k_weight, k_bias = (1 + 0.1 * randn(32, seed=seed) for seed in (13, 14, 15))
    prologue = (None, 0, False, "rms", q_weight.requires_grad_(), None, 1e-6, "layer", k_weight, k_bias, 1e-5)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in prologue]
    q = latent.expand(2, -1, -1, -1)
    inputs = (q.detach(), k.detach(), v.detach())
    out, lse = torch.ops.fastvit.attention_prologue_fwd(*inputs, 0.2, *detached, keep)
    return {
        "attention_prologue_fwd": [(q, k, v, 0.2, *prologue, keep), (q, k, v, 0.2, *prologue, None)],
        "attention_prologue_bwd": [(torch.randn_like(out), *inputs, out, lse, 0.2, *detached, keep)],
    }


def _samples_patch_embed():
    x, w, b, pos, cls = PATCH_EMBED.make(requires_grad=True).args  # x [2, 3, 8, 12], 4x4 patches, 7 tokens
    images = PATCH_EMBED_UINT8.make()["images"].permute(0, 3, 1, 2)
    grad = randn(2, 7, 16, seed=5)
    channels_last = relayout(x.detach(), "channels_last").requires_grad_()
    return {
        "patch_embed_fwd": [
            (x, w, b, pos, cls, None, None),
            (channels_last, w, None, None, None, None, None),
            (images, w, b, pos, cls, [1 / 255.0] * 3, [-0.5] * 3),
        ],
        "patch_embed_bwd_input": [(grad, x.detach(), w.detach())],
        "patch_embed_bwd_weight": [(grad, x.detach(), w.detach(), None, None)],
        "patch_embed_bwd_colsum": [(grad,)],
        **_samples_patch_embed_norm(),
    }


def _samples_patch_embed_norm():
    """The normed patch embedding (AIMv2's RMSNorm; LayerNorm with bias): training (z and statistics saved) and
    inference forwards, and the norm's backward from a training forward's saved tensors."""
    sample = PATCH_EMBED.make(requires_grad=True, dim=24, norm="layer")  # x [2, 3, 8, 12]: 6 patches + 1 prefix
    x, w, b, pos, cls, norm_weight, norm_bias = sample.args
    rms, layer = NORM_CODES["rms"], NORM_CODES["layer"]
    _, z, mean, rstd = torch.ops.fastvit.patch_embed_norm_fwd(
        *(t.detach() for t in (x, w, b, pos, cls)), None, None, norm_weight.detach(), norm_bias.detach(), 1e-5,
        layer, True,
    )  # fmt: skip
    return {
        "patch_embed_norm_fwd": [
            (x, w, b, pos, cls, None, None, norm_weight, norm_bias, 1e-5, layer, True),
            (x, w, None, None, None, None, None, norm_weight, None, 1e-6, rms, True),
            (*(t.detach() for t in (x, w, b, pos, cls)), None, None, norm_weight.detach(), None, 1e-6, rms, False),
        ],
        "patch_embed_norm_bwd": [(randn(2, 7, 24, seed=6), z, mean, rstd, norm_weight.detach(), layer, True)],
    }


def _samples_layer_norm():
    x, w, b = LAYER_NORM.make(lead=(3, 5), requires_grad=True).args
    _, mean, rstd = torch.ops.fastvit.layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    return {
        "layer_norm_fwd": [(x, w, b, 1e-5), (relayout(x.detach(), "slice").requires_grad_(), w, b, 1e-6)],
        "layer_norm_bwd": [(torch.randn_like(x.detach()), x.detach(), w.detach(), mean, rstd)],
    }


def _samples_ln_mlp():
    args = LN_MLP.make(lead=(3, 5), fc2_bias=False, requires_grad=True).args
    x, lnw, lnb, w1, _, w2, _ = args
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
    x, weight, bias, residual = LINEAR_RESIDUAL.make(lead=(3, 5), requires_grad=True).args
    grad = randn(3, 5, 40, seed=4)
    return {
        "linear_residual_fwd": [(x, weight, bias, residual), (x, weight, None, None)],
        "linear_residual_bwd": [
            (grad, x.detach(), weight.detach(), True, True, True, det) for det in (False, True)
        ],  # fmt: skip
    }


def _samples_ln_linear():
    x, lnw, lnb, w, b, r = LN_LINEAR.make(lead=(3, 5), requires_grad=True).args
    x2d, r2d = x.detach().reshape(15, -1).requires_grad_(), r.detach().reshape(15, -1).requires_grad_()
    detached = [t.detach() for t in (x2d, lnw, lnb, w, b, r2d)]
    _, mean, rstd, pre = torch.ops.fastvit.ln_linear_fwd(*detached, 1e-6, 1, True)
    grad = randn(15, 40, seed=4)
    gelu = (grad, detached[0], lnw.detach(), lnb.detach(), mean, rstd, w.detach(), pre, 1, True)
    empty = x2d.new_empty(0, dtype=torch.float32)
    no_ln = (grad, detached[0], None, None, empty, empty.clone(), w.detach(), x2d.new_empty(0), 0, False)
    return {
        "ln_linear_fwd": [
            (x2d, lnw, lnb, w, b, r2d, 1e-6, 1, True),
            (relayout(x2d.detach(), "slice").requires_grad_(), None, None, w, None, None, 1e-6, 0, False),
            (x2d, lnw, lnb, w, b, None, 1e-5, 2, True),
            (x2d, lnw, lnb, w, b, None, 1e-6, 1, True, 1, None, 17),  # GELU on the first 17 columns only
        ],
        "ln_linear_bwd": [gelu, no_ln, (*gelu, 1, None, 17)],
    }


_SAMPLE_GROUPS = {
    "qkv_attention": (_samples_qkv_attention, TRITON_REASON),
    "attention": (_samples_attention, TRITON_REASON),
    "varlen_qkv_attention": (_samples_varlen_qkv_attention, TRITON_REASON),
    "qkv_attention_prologue": (_samples_qkv_attention_prologue, TRITON_REASON),
    "attention_prologue": (_samples_attention_prologue, TRITON_REASON),
    "patch_embed": (_samples_patch_embed, TRITON_REASON),
    "layer_norm": (_samples_layer_norm, EXTENSION_REASON),
    "ln_mlp": (_samples_ln_mlp, EXTENSION_REASON),
    "linear_residual": (_samples_linear_residual, EXTENSION_REASON),
    "ln_linear": (_samples_ln_linear, TRITON_REASON or EXTENSION_REASON),  # its LN backward is the extension's
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


@pytest.mark.parametrize("op", list(OP_CASES))
def test_public_ops_on_meta_tensors_give_the_real_shapes(op):
    # 'auto' runs the torch backend on meta tensors: shape inference for a whole model without memory.
    case = OP_CASES[op]
    for absent in ((), case.optional):  # every tensor argument given, then the optional ones left out
        meta = case.call(case.make(device="meta").replace(**dict.fromkeys(absent)), "auto")
        real = case.call(case.make(device="cpu").replace(**dict.fromkeys(absent)), "auto")
        assert meta.device.type == "meta" and (meta.shape, meta.dtype) == (real.shape, real.dtype)


def test_model_on_the_meta_device_infers_shapes():
    model = fastvit.ViT(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5).to("meta")
    out = model(torch.randn(4, 3, 32, 32, device="meta"))
    assert out.device.type == "meta" and out.shape == (4, 5)


# ------------------------------------------------------------------------------------------------
# gradcheck in fp64 through each op's reference-equivalent path


@pytest.mark.parametrize("op, backend", _fused("layer_norm"))
@pytest.mark.parametrize("shape", [(2, 3, 5), (4, 1), (1, 7)])
def test_layer_norm_extension_gradcheck_fp64(op, backend, shape):
    sample = LAYER_NORM.make(torch.float64, requires_grad=True, lead=shape[:-1], width=shape[-1])
    sample = sample.with_kwargs(eps=1e-5)
    assert torch.autograd.gradcheck(LAYER_NORM.as_function(sample, backend), sample.args)


@pytest.mark.parametrize("op, backend", _fused("ln_mlp"))
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("residual", [True, False])
def test_ln_mlp_extension_gradcheck_fp64(op, backend, approximate, residual):
    if torch.float64 not in _dtypes(LN_MLP, backend):
        pytest.skip(f"the {backend!r} kernels of ln_mlp take no float64 (their fp32 gradients are checked elsewhere)")
    sample = LN_MLP.make(torch.float64, requires_grad=True, lead=(2, 3), width=5, hidden=7)
    sample = sample.with_kwargs(eps=1e-5, approximate=approximate, residual=residual)
    assert torch.autograd.gradcheck(LN_MLP.as_function(sample, backend), sample.args)


def _gradcheck_and_compare(case: OpCase, sample: Sample, backend: str):
    """gradcheck the reference on the fp64 ``sample``; then ``backend``'s fp32 gradients must match those fp64
    gradients."""
    leaves = sample.map(lambda t: t.detach().requires_grad_())
    assert torch.autograd.gradcheck(case.as_function(leaves, REFERENCE), leaves.args)
    exact = case.run(sample, REFERENCE)
    fused = case.run(sample.to(torch.float32), backend)
    for i, (got, want) in enumerate(zip(fused, exact)):
        if want is not None:
            assert got.shape == want.shape, f"tensor {i}"
            scale = 1.0 + want.abs().max().item()
            assert (got.double() - want).abs().max().item() <= 1e-5 * scale, f"tensor {i}"


@pytest.mark.parametrize("op, backend", _fused("qkv_attention"))
@pytest.mark.parametrize("head_dim", [32, 80])
def test_qkv_attention_reference_gradcheck_and_kernel_agree(op, backend, head_dim):
    sample = QKV_ATTENTION.make(torch.float64, batch=1, tokens=5, head_dim=head_dim)
    _gradcheck_and_compare(QKV_ATTENTION, sample, backend)


@pytest.mark.parametrize("op, backend", _fused("attention"))
def test_attention_reference_gradcheck_and_kernel_agree(op, backend):
    sample = ATTENTION.make(torch.float64, batch=1, q_tokens=4, kv_tokens=6).with_kwargs(scale=0.3)
    _gradcheck_and_compare(ATTENTION, sample, backend)


# x [2, 2, 4, 8], weight [5, 2, 2, 4]: 4 patches of 2x4, one prefix token
_SMALL_PATCHES = dict(batch=2, patch=(2, 4), grid=(2, 2), dim=5, prefix=1)


@pytest.mark.parametrize("op, backend", _fused("patch_embed"))
@pytest.mark.parametrize("pos", ["all", "patch"])
def test_patch_embed_reference_gradcheck_and_kernel_agree(op, backend, pos):
    sample = PATCH_EMBED.make(torch.float64, in_chans=2, pos=pos, **_SMALL_PATCHES)
    _gradcheck_and_compare(PATCH_EMBED, sample, backend)


@pytest.mark.parametrize("op, backend", _fused("patch_embed_uint8"))
def test_patch_embed_uint8_reference_gradcheck_and_kernel_agree(op, backend):
    options = dict(in_chans=3, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4), **_SMALL_PATCHES)
    _gradcheck_and_compare(PATCH_EMBED_UINT8, PATCH_EMBED_UINT8.make(torch.float64, **options), backend)
