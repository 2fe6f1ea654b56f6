"""The qk-norm / RoPE prologue on packed sequences (``ops.varlen_qkv_attention``) and under a key-padding mask
(``ops.qkv_attention(key_padding_mask=)``): issue 19's "works together with RoPE/qk-norm prologues".

The reference of a packed batch is each sequence alone through ``fastvit.reference.qkv_attention`` with its own RoPE
table (its first ``num_prefix_tokens`` tokens unrotated); the kernels get the packed table instead (identity rows at
the later sequences' prefix tokens, as ``fastvit.packing.packed_rope_table`` builds it). Accuracy rule
(``fastvit.accuracy``): max|ours - ref64| <= 2 x max|torch backend same dtype - ref64| + a rounding floor, for the
output, the qkv gradient and every norm weight / bias gradient. Without a GPU the kernels run in Triton's interpreter:
T = 111 tokens, H = 2, D = 32, sequence lengths covering an empty one, length 1 (a prefix token alone), one longer
than every interpreter block (64 rows) and ragged tails.
"""

from __future__ import annotations

import pytest
import torch

from fastvit import accuracy, dispatch, ops, reference
from fastvit.ops import QKNorm
from fastvit.ops.attention import attention_call
from fastvit.ops.triton import attention as attention_triton

from op_cases import assert_compiled_gradients_equal_eager
from utils import DEVICE, assert_within_torch_error, check_table_gradient, needs_cuda, triton_skip_reason

needs_triton = pytest.mark.skipif(triton_skip_reason() is not None, reason=str(triton_skip_reason()))
FP32_FP16 = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
LAYOUTS = pytest.mark.parametrize("layout", ["interleaved", "half"])

HEADS, HEAD_DIM = 2, 32
LENGTHS = (7, 0, 1, 70, 33)  # empty, length 1, 70 > every interpreter block (64), ragged tails


def _cu_seqlens(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32).to(DEVICE)


def _sequence_tables(lengths, prefix, seed=0, head_dim=HEAD_DIM) -> list[torch.Tensor | None]:
    """Each sequence's own [L - prefix, 2·D] table of random angles (per channel: a sharper test than shared pair
    angles), None where the sequence has no token past its prefix."""
    gen = torch.Generator().manual_seed(seed)
    tables = []
    for length in lengths:
        angles = torch.rand(max(length - prefix, 0), head_dim, generator=gen, dtype=torch.float64) * 6.3
        table = torch.cat([angles.sin(), angles.cos()], dim=-1).float().double()  # values exact in fp32 (the kernels')
        tables.append(table if length > prefix else None)
    return tables


def _packed_table(lengths, prefix, tables, head_dim=HEAD_DIM) -> torch.Tensor:
    """The packed [T - prefix, 2·D] table: sequence b's table at rows cu_seqlens[b]..cu_seqlens[b + 1] - prefix,
    identity rows elsewhere (written out here, independently of ``fastvit.packing.packed_rope_table``)."""
    total = sum(lengths)
    packed = torch.cat([torch.zeros(total - prefix, head_dim), torch.ones(total - prefix, head_dim)], dim=-1)
    packed = packed.double()
    start = 0
    for length, table in zip(lengths, tables):
        if table is not None:
            packed[start : start + length - prefix] = table
        start += length
    return packed.to(DEVICE)


def _norms(kinds, dtype, seed=3, head_dim=HEAD_DIM) -> dict[str, QKNorm | None]:
    """q_norm / k_norm of the given kinds (None: none), weights around 1 and biases so the backward is not trivial."""
    gen = torch.Generator().manual_seed(seed)
    norms = {}
    for name, kind in zip(("q_norm", "k_norm"), kinds):
        if kind is None:
            norms[name] = None
            continue
        weight = (1.0 + 0.5 * torch.randn(head_dim, generator=gen, dtype=torch.float64)).to(DEVICE, dtype)
        bias = (0.5 * torch.randn(head_dim, generator=gen, dtype=torch.float64)).to(DEVICE, dtype)
        norms[name] = QKNorm(weight, bias if kind == "layer" else None, 1e-6 if name == "q_norm" else 1e-5, kind)
    return norms


def _leaves(norms) -> list[torch.Tensor]:
    return [t for norm in norms.values() if norm is not None for t in (norm.weight, norm.bias) if t is not None]


def _with_leaves(norms, leaves):
    """``norms`` with their tensors replaced, in ``_leaves`` order, by ``leaves``."""
    leaves = iter(leaves)
    out = {}
    for name, norm in norms.items():
        if norm is None:
            out[name] = None
            continue
        weight = next(leaves)
        bias = next(leaves) if norm.bias is not None else None
        out[name] = norm._replace(weight=weight, bias=bias)
    return out


def _forward_backward(fn, inputs, seed=1):
    """(out, [grad of every input]) of ``fn(*inputs)`` for fixed random output weights."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    gen = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
    return out.detach(), list(torch.autograd.grad(out, inputs, grad_out))


def _per_sequence(fn, qkv, lengths, prefix, tables, layout, norms, heads=HEADS):
    """Each sequence alone through ``fn`` (``qkv_attention``'s signature) with its own table, concatenated: the
    spec of a packed batch (``fn`` = the reference), or PyTorch's own error in qkv's dtype (the torch backend)."""
    parts, start = [], 0
    for length, table in zip(lengths, tables):
        rope_kw = {}
        if any(t is not None for t in tables):
            dtype = torch.float64 if qkv.dtype == torch.float64 else torch.float32  # the spec's, the kernels' table
            head_dim = qkv.shape[-1] // (3 * heads)
            rope = table.to(dtype) if table is not None else qkv.new_zeros(0, 2 * head_dim, dtype=dtype)
            rope_kw = dict(rope=rope, num_prefix_tokens=min(prefix, length), rope_layout=layout)
        parts.append(fn(qkv[None, start : start + length], heads, **rope_kw, **norms)[0])
        start += length
    return torch.cat(parts)


def _torch_backend(*args, **kwargs):
    return ops.qkv_attention(*args, backend="torch", **kwargs)


def _check_packed(name, backend, qkv, lengths, prefix, layout, norm_kinds, rope=True, heads=HEADS, per_head=False):
    """``backend`` on the packed batch vs the per-sequence fp64 spec on out, grad qkv and the norm gradients, bounded
    by the error of PyTorch in qkv's dtype (the torch backend's ``qkv_attention`` of each sequence alone).
    ``per_head``: one table per head (RoPE-Mixed's form; heads 2: the first head's rows reversed)."""
    cu_seqlens, max_seqlen, head_dim = _cu_seqlens(lengths), max(lengths), qkv.shape[-1] // (3 * heads)
    tables = _sequence_tables(lengths, prefix, head_dim=head_dim) if rope else [None] * len(lengths)
    packed = _packed_table(lengths, prefix, tables, head_dim).float() if rope else None
    if per_head:
        second = [None if t is None else t.flip(0) for t in tables]
        packed = torch.stack([packed, _packed_table(lengths, prefix, second, head_dim).float()])
        tables = [None if t is None else torch.stack([t, u]) for t, u in zip(tables, second)]
    norms = _norms(norm_kinds, qkv.dtype, head_dim=head_dim)

    def packed_call(backend_name):
        def run(x, *leaves):
            kwargs = dict(rope=packed, rope_layout=layout)
            kwargs.update(num_prefix_tokens=prefix if rope else 0, **_with_leaves(norms, leaves))
            return ops.varlen_qkv_attention(x, cu_seqlens, max_seqlen, heads, backend=backend_name, **kwargs)

        return run

    def per_sequence(fn):
        return lambda x, *leaves: _per_sequence(
            fn, x, lengths, prefix, tables, layout, _with_leaves(norms, leaves), heads
        )

    leaves = _leaves(norms)
    ours = _forward_backward(packed_call(backend), [qkv, *leaves])
    theirs = _forward_backward(per_sequence(_torch_backend), [qkv, *leaves])
    exact = _forward_backward(per_sequence(reference.qkv_attention), [qkv.double(), *(t.double() for t in leaves)])
    labels = ["out", "grad qkv"] + [f"grad norm tensor {i}" for i in range(len(leaves))]
    for label, mine, peer, ref in zip(labels, [ours[0], *ours[1]], [theirs[0], *theirs[1]], [exact[0], *exact[1]]):
        assert mine.shape == ref.shape and mine.dtype == qkv.dtype, (label, mine.shape, mine.dtype)
        assert torch.isfinite(mine).all(), f"{name} {label}: non-finite values"
        assert_within_torch_error(f"{name} {label}", mine, peer, ref, floor=accuracy.rounding_floor(ref, mine.dtype))
    return ours


def _qkv(tokens, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, 3 * HEADS * HEAD_DIM, generator=gen, dtype=torch.float64).to(DEVICE, dtype)


# ------------------------------------------------------------------------------------------------
# Packed sequences


@needs_triton
@FP32_FP16
@LAYOUTS
@pytest.mark.parametrize("norm", [None, "layer", "rms"])
def test_triton_varlen_prologue_equals_each_sequence_alone(norm, layout, dtype):
    qkv = _qkv(sum(LENGTHS), dtype)
    _check_packed(f"triton {layout} {norm}", "triton", qkv, LENGTHS, 1, layout, (norm, norm))


@needs_triton
@pytest.mark.parametrize("prefix", [0, 5])
def test_triton_varlen_prefix_counts_and_norms_on_one_side(prefix):
    # prefix 5 > the length-1 and empty sequences: those are all prefix, the rest rotate from their 6th token.
    qkv = _qkv(sum(LENGTHS), torch.float32, seed=prefix)
    _check_packed(f"triton prefix {prefix}", "triton", qkv, LENGTHS, prefix, "half", ("rms", "layer"))


@needs_triton
def test_triton_varlen_qk_norm_without_rope():
    qkv = _qkv(sum(LENGTHS), torch.float16, seed=4)
    _check_packed("triton norm only", "triton", qkv, LENGTHS, 0, "interleaved", ("layer", None), rope=False)


@FP32_FP16
@pytest.mark.parametrize("compiling", [False, True], ids=["per-sequence", "padded"])
def test_torch_backend_varlen_prologue_equals_each_sequence_alone(compiling, dtype, monkeypatch):
    # The torch backend's two packed paths: one SDPA per sequence (CPU eager) and pad + mask (CUDA tensors,
    # torch.compile tracing; chosen here by faking is_compiling), with the packed table read per token.
    qkv = _qkv(sum(LENGTHS), dtype, seed=5)
    if compiling:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    _check_packed("torch", "torch", qkv, LENGTHS, 1, "half", ("layer", "rms"))


@pytest.mark.parametrize(
    "backend, compiling", [("triton", False), ("torch", False), ("torch", True)], ids=["triton", "torch", "padded"]
)
def test_varlen_per_head_tables(backend, compiling, monkeypatch):
    # RoPE-Mixed's per-head tables under a packing: the kernels' per-head shift and the torch backend's two paths.
    if backend == "triton" and triton_skip_reason() is not None:
        pytest.skip(triton_skip_reason())
    if compiling:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    qkv = _qkv(sum(LENGTHS), torch.float32, seed=6)
    _check_packed(f"{backend} per-head", backend, qkv, LENGTHS, 1, "half", ("rms", None), per_head=True)


@needs_triton
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
def test_varlen_learned_table_gets_its_gradient(per_head):
    # The packed table's gradient: each sequence's rows from its own tokens, none at later sequences' prefix rows.
    prefix, cu_seqlens, max_seqlen = 1, _cu_seqlens(LENGTHS), max(LENGTHS)
    table = _packed_table(LENGTHS, prefix, _sequence_tables(LENGTHS, prefix)).float()
    table = torch.stack([table, table.flip(0)]) if per_head else table

    def run(backend, x, t):
        if backend is None:
            return reference.varlen_qkv_attention(
                x, cu_seqlens, HEADS, rope=t, num_prefix_tokens=prefix, rope_layout="half"
            )
        return ops.varlen_qkv_attention(
            x,
            cu_seqlens,
            max_seqlen,
            HEADS,
            rope=t.to(x.dtype),
            num_prefix_tokens=prefix,
            rope_layout="half",
            backend=backend,
        )

    check_table_gradient(
        f"varlen {'per-head' if per_head else 'shared'}", run, _qkv(sum(LENGTHS), torch.float32), table
    )


def test_reference_varlen_prologue_is_each_sequence_alone():
    lengths, prefix = (5, 0, 1, 9), 1
    qkv = _qkv(sum(lengths), torch.float64, seed=6)
    tables = _sequence_tables(lengths, prefix)
    norms = _norms(("rms", "layer"), torch.float64)
    got = reference.varlen_qkv_attention(
        qkv, _cu_seqlens(lengths), HEADS, rope=_packed_table(lengths, prefix, tables), num_prefix_tokens=prefix,
        rope_layout="half", **norms,
    )  # fmt: skip
    spec = _per_sequence(reference.qkv_attention, qkv, lengths, prefix, tables, "half", norms)
    torch.testing.assert_close(got, spec, rtol=0, atol=0)


def test_rows_at_later_prefix_tokens_are_not_read():
    # The packed table's rows at sequences 1.. 's prefix tokens: identity from packed_rope_table, but any values there
    # must leave the result unchanged (those tokens are unrotated by the prefix count, as in the kernels).
    lengths, prefix = (6, 8), 2
    qkv = _qkv(sum(lengths), torch.float64, seed=7)
    table = _packed_table(lengths, prefix, _sequence_tables(lengths, prefix))
    junk = table.clone()
    junk[lengths[0] - prefix : lengths[0]] = 7.0  # the rows of sequence 1's prefix tokens
    backends = ["torch"] + (["triton"] if triton_skip_reason() is None else [])
    for backend in backends:
        x = qkv.float() if backend == "triton" else qkv
        kw = dict(num_prefix_tokens=prefix, backend=backend)
        clean = ops.varlen_qkv_attention(x, _cu_seqlens(lengths), 8, HEADS, rope=table.to(x.dtype), **kw)
        dirty = ops.varlen_qkv_attention(x, _cu_seqlens(lengths), 8, HEADS, rope=junk.to(x.dtype), **kw)
        torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


@needs_triton
def test_varlen_norm_gradients_do_not_depend_on_the_tile_sizes():
    # Per (sequence, head) rows of 16-row slots: 16-row dq/dk tiles give the sums of the interpreter's larger tiles.
    qkv = _qkv(sum(LENGTHS), torch.float32, seed=8)
    norms = _norms(("layer", "rms"), torch.float32)
    table = _packed_table(LENGTHS, 1, _sequence_tables(LENGTHS, 1)).float()

    def run(x, *leaves):
        return ops.varlen_qkv_attention(
            x, _cu_seqlens(LENGTHS), max(LENGTHS), HEADS, backend="triton", rope=table, num_prefix_tokens=1,
            **_with_leaves(norms, leaves),
        )  # fmt: skip

    default = _forward_backward(run, [qkv, *_leaves(norms)])
    with attention_triton.forced_configs({"dq": (16, 32, 4, 1), "dkdv": (32, 16, 4, 1)}):
        small = _forward_backward(run, [qkv, *_leaves(norms)])
    for a, b in zip(default[1], small[1]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def _layout_op_args(packed: bool):
    """(qkv, prologue args, layout args) of a small call of the prologue ops: packed sequences or a key mask."""
    lengths = (5, 0, 1, 11)
    tokens = sum(lengths)
    gen = torch.Generator().manual_seed(9)
    weight = (1 + 0.5 * torch.randn(HEAD_DIM, generator=gen)).to(DEVICE)
    bias = (0.5 * torch.randn(HEAD_DIM, generator=gen)).to(DEVICE)
    if packed:
        qkv = _qkv(tokens, torch.float32)
        rope = _packed_table(lengths, 1, _sequence_tables(lengths, 1)).float()
        layout = (_cu_seqlens(lengths), max(lengths), None)
    else:
        qkv = _qkv(2 * 9, torch.float32).reshape(2, 9, -1)
        rope = _packed_table((9,), 1, _sequence_tables((9,), 1)).float()
        layout = (None, 0, torch.arange(9, device=DEVICE)[None, :] < torch.tensor([[6], [9]], device=DEVICE))
    prologue = (rope, 1, True, "layer", weight, bias, 1e-6, "rms", weight * 0.5, None, 1e-5)
    return qkv, prologue, layout


@needs_triton
@pytest.mark.parametrize("packed", [True, False], ids=["varlen", "key-mask"])
@pytest.mark.parametrize("op_name", ["qkv_attention_prologue_fwd", "qkv_attention_prologue_bwd"])
def test_opcheck(op_name, packed):
    qkv, prologue, layout = _layout_op_args(packed)
    out, lse = torch.ops.fastvit.qkv_attention_prologue_fwd(qkv, HEADS, 0.2, *prologue, *layout)
    if op_name.endswith("fwd"):
        rope, prefix, half, q_kind, q_w, q_b, q_eps, k_kind, k_w, k_b, k_eps = prologue
        leaves = [t.clone().requires_grad_() for t in (q_w, q_b, k_w)]
        args = (qkv.clone().requires_grad_(), HEADS, 0.2, rope, prefix, half, q_kind, leaves[0], leaves[1], q_eps,
                k_kind, leaves[2], k_b, k_eps, *layout)  # fmt: skip
    else:
        args = (torch.randn_like(out), qkv, out, lse, HEADS, 0.2, *prologue, *layout)
    torch.library.opcheck(getattr(torch.ops.fastvit, op_name).default, args)


@needs_triton
def test_torch_compile_fullgraph_with_backward():
    torch._dynamo.reset()
    lengths = (5, 0, 1, 11)
    qkv = _qkv(sum(lengths), torch.float32, seed=10)
    table = _packed_table(lengths, 1, _sequence_tables(lengths, 1)).float()
    norms = _norms(("layer", "layer"), torch.float32)
    cu_seqlens = _cu_seqlens(lengths)

    def step(x, *leaves):
        out = ops.varlen_qkv_attention(
            x, cu_seqlens, max(lengths), HEADS, check_seqlens=False, backend="triton", rope=table,
            num_prefix_tokens=1, **_with_leaves(norms, leaves),
        )  # fmt: skip
        return (out * 1.5).square().sum()

    assert_compiled_gradients_equal_eager(step, [qkv, *_leaves(norms)])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(rope="table", num_prefix_tokens=1, rows=-1), ValueError, r"rope must be the cat\(sin, cos\) table"),
        (dict(rope="table", num_prefix_tokens=0), ValueError, r"rope must be the cat\(sin, cos\) table"),
        (dict(num_prefix_tokens=1), ValueError, "only applies with a rope table"),
        (dict(rope="table", num_prefix_tokens=99), ValueError, r"num_prefix_tokens must be in \[0, N=14\]"),
        (dict(rope_layout="pairs"), ValueError, "rope_layout must be one of"),
        (dict(q_norm="rms"), TypeError, "q_norm must be a fastvit.ops.QKNorm"),
    ],
)
def test_bad_prologue_inputs_are_clear_errors(kwargs, error, match):
    lengths = (5, 9)
    qkv = _qkv(sum(lengths), torch.float32)
    kwargs = dict(kwargs)
    extra_rows = kwargs.pop("rows", 0)
    if kwargs.get("rope") == "table":
        kwargs["rope"] = torch.zeros(sum(lengths) - 1 + extra_rows, 2 * HEAD_DIM, device=DEVICE)
    with pytest.raises(error, match=match):
        ops.varlen_qkv_attention(qkv, _cu_seqlens(lengths), 9, HEADS, backend="torch", **kwargs)


def test_auto_picks_triton_on_cuda_for_a_varlen_prologue(pretend_gpu):
    call = attention_call(torch.device("cuda"), torch.bfloat16, 64, prologue=("rope:half", "q_norm:layer"))
    assert dispatch.explain("varlen_qkv_attention", "auto", call)[0] == "triton"


# ------------------------------------------------------------------------------------------------
# Key-padding mask (NaFlex's padded layout) with the prologue


@needs_triton
@FP32_FP16
@LAYOUTS
def test_triton_key_padding_mask_with_prologue_matches_reference(layout, dtype):
    tokens, prefix = 37, 1
    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(3, tokens, 3 * HEADS * HEAD_DIM, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    table = _packed_table((tokens,), prefix, _sequence_tables((tokens,), prefix, seed=11))
    keep = torch.arange(tokens, device=DEVICE)[None, :] < torch.tensor([[tokens], [20], [0]], device=DEVICE)
    norms = _norms(("layer", "rms"), dtype)

    def call(backend):
        def run(x, *leaves):
            return ops.qkv_attention(
                x, HEADS, backend=backend, rope=table.to(x.dtype), num_prefix_tokens=prefix, rope_layout=layout,
                key_padding_mask=keep, **_with_leaves(norms, leaves),
            )  # fmt: skip

        return run

    def spec(x, *leaves):
        return reference.qkv_attention(
            x, HEADS, key_padding_mask=keep, rope=table, num_prefix_tokens=prefix, rope_layout=layout,
            **_with_leaves(norms, leaves),
        )  # fmt: skip

    leaves = _leaves(norms)
    ours = _forward_backward(call("triton"), [qkv, *leaves])
    theirs = _forward_backward(call("torch"), [qkv, *leaves])
    exact = _forward_backward(spec, [qkv.double(), *(t.double() for t in leaves)])
    for i, (mine, peer, ref) in enumerate(zip([ours[0], *ours[1]], [theirs[0], *theirs[1]], [exact[0], *exact[1]])):
        assert torch.isfinite(mine).all(), f"tensor {i}: non-finite values"
        floor = accuracy.rounding_floor(ref, mine.dtype)
        assert_within_torch_error(f"masked {layout} {dtype} tensor {i}", mine, peer, ref, floor=floor)
    assert not ours[0][2].any() and not ours[1][0][2].any()  # the entry without kept keys: output and gradient 0


# ------------------------------------------------------------------------------------------------
# GPU: bfloat16, realistic lengths, ViT-S heads


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@LAYOUTS
def test_gpu_varlen_prologue_realistic_mix(layout, dtype):
    # NaFlex-like: 12 images of 16-576 patches + 1 class token (and an empty and a one-token sequence), D = 64.
    lengths = tuple(int(n) for n in torch.randint(17, 578, (12,), generator=torch.Generator().manual_seed(0)))
    lengths += (0, 1)
    gen = torch.Generator().manual_seed(13)
    qkv = torch.randn(sum(lengths), 3 * 6 * 64, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    _check_packed(f"gpu {layout} {dtype}", "triton", qkv, lengths, 1, layout, ("layer", "rms"), heads=6)
