"""``qkv_attention``'s prologue (qk-norm then RoPE applied to q and k inside the Triton kernels) against the fp64 spec.

The spec is ``fastvit.reference.qkv_attention`` with the prologue arguments (``qk_norm_attention``: timm's order, norm
then RoPE, prefix tokens unrotated). Accuracy rule (``fastvit.accuracy``, flash-attention's): max|ours - ref64| <= 2 x
max|torch backend same dtype - ref64| + an fp32-rounding floor, for the output, dqkv and every norm weight gradient.
Without a GPU the kernels run in Triton's interpreter, so shapes stay tiny (B·H <= 4, N <= 70); the ``gpu`` tests add
bfloat16, every head dim and longer sequences.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from fastvit import dispatch, ops, reference
from fastvit.eva import rope_table
from fastvit.ops import QKNorm
from fastvit.ops.attention import attention_call
from fastvit.ops.triton import attention as attention_triton

from op_cases import assert_compiled_gradients_equal_eager
from utils import DEVICE, assert_within_torch_error, check_table_gradient, needs_cuda, triton_skip_reason

if triton_skip_reason() is not None:
    pytest.skip(triton_skip_reason(), allow_module_level=True)

FP32_FP16 = pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])


def _floor(ref: torch.Tensor) -> float:
    """fp32-rounding-level allowance (as test_attention's): where the torch path is (near) exact the 2x bound
    collapses, while the kernels' fp32 sums still round. 1e-6 relative is 10x under the DESIGN's fp32 target."""
    return 1e-6 * (1.0 + ref.abs().max().item())


def _table(tokens: int, head_dim: int, layout: str, kind: str = "random", grid=None) -> torch.Tensor:
    """A [tokens, 2·D] cat(sin, cos) table: eva.rope_table's for ``grid``, or random per-channel values (the kernel
    applies the table column by column, so a table whose pairs do not share an angle is a sharper test)."""
    if kind == "grid":
        return rope_table(grid, head_dim, rotate_half=layout == "half").to(DEVICE)
    gen = torch.Generator().manual_seed(tokens * 131 + head_dim)
    angles = torch.rand(tokens, head_dim, generator=gen) * 6.3
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(DEVICE)


def _norm_params(kind: str | None, head_dim: int, seed: int, bias: bool = True) -> list[torch.Tensor]:
    """[weight] or [weight, bias] of a q or k norm (weights around 1, so the norm's backward is not trivial)."""
    if kind is None:
        return []
    gen = torch.Generator().manual_seed(seed)
    weight = 1.0 + 0.5 * torch.randn(head_dim, generator=gen)
    params = [weight] + ([0.5 * torch.randn(head_dim, generator=gen)] if kind == "layer" and bias else [])
    return [p.to(DEVICE) for p in params]


def _as_norm(kind, params, eps) -> QKNorm | None:
    if kind is None:
        return None
    return QKNorm(params[0], params[1] if len(params) > 1 else None, eps, kind)


def _run(fn, inputs, seed=1):
    """(output, grads of every input) of ``fn`` with fixed random output weights."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return out.detach(), list(torch.autograd.grad(out, inputs, grad_out.to(device=out.device, dtype=out.dtype)))


def _check(qkv, heads, *, rope=None, prefix=0, layout="interleaved", q_kind=None, k_kind=None, bias=True, name=""):
    """Triton vs the fp64 spec under the accuracy rule, the torch backend in qkv's dtype giving PyTorch's error."""
    head_dim = qkv.shape[-1] // (3 * heads)
    q_params, k_params = _norm_params(q_kind, head_dim, 1, bias), _norm_params(k_kind, head_dim, 2, bias)
    n_q = len(q_params)

    def call(fn, dtype):
        def run(x, *params):
            kwargs = dict(rope=rope, num_prefix_tokens=prefix, rope_layout=layout)
            q_norm = _as_norm(q_kind, [p.to(dtype) for p in params[:n_q]], 1e-6)
            k_norm = _as_norm(k_kind, [p.to(dtype) for p in params[n_q:]], 1e-5)
            return fn(x, heads, q_norm=q_norm, k_norm=k_norm, **kwargs)

        return run

    params = [*q_params, *k_params]
    ours = _run(call(lambda *a, **k: ops.qkv_attention(*a, backend="triton", **k), qkv.dtype), [qkv, *params])
    torch_path = _run(call(lambda *a, **k: ops.qkv_attention(*a, backend="torch", **k), qkv.dtype), [qkv, *params])
    exact = _run(call(reference.qkv_attention, torch.float64), [qkv.double(), *(p.double() for p in params)])
    labels = ["out", "dqkv"] + [f"d{n}" for n in ("q_weight", "q_bias")[:n_q]] + ["dk_weight", "dk_bias"]
    for label, mine, theirs, ref in zip(labels, [ours[0], *ours[1]], [torch_path[0], *torch_path[1]],
                                        [exact[0], *exact[1]]):  # fmt: skip
        assert mine.dtype == theirs.dtype and mine.shape == ref.shape, (label, mine.dtype, mine.shape, ref.shape)
        assert torch.isfinite(mine).all(), f"{name} {label}: non-finite values"
        assert_within_torch_error(f"{name} {label}", mine, theirs, ref, floor=_floor(ref))
    return ours


def _qkv(batch, tokens, heads, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, 3 * heads * head_dim, generator=gen).to(device=DEVICE, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# Accuracy: RoPE, qk-norm, both


@FP32_FP16
@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("prefix", [0, 1, 5])
def test_rope_on_an_odd_grid_with_prefix_tokens(prefix, layout, dtype):
    grid = (3, 5)
    tokens = prefix + grid[0] * grid[1]
    rope = _table(tokens - prefix, 32, layout, "grid", grid)
    qkv = _qkv(1, tokens, 2, 32, dtype)
    _check(qkv, 2, rope=rope, prefix=prefix, layout=layout, name=f"rope {layout} T={prefix} {dtype}")


@FP32_FP16
@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_rope_padded_head_dim_and_several_blocks(layout, dtype):
    # D=48 runs in a 64-wide tile (rotate-half pairs i with i + 24, not with i + 32); 70 tokens cross the query and
    # key blocks and end in ragged tails; a random per-channel table.
    tokens, prefix = 70, 4
    rope = _table(tokens - prefix, 48, layout)
    qkv = _qkv(1, tokens, 2, 48, dtype, seed=3)
    _check(qkv, 2, rope=rope, prefix=prefix, layout=layout, name=f"rope {layout} D=48 N=70 {dtype}")


@FP32_FP16
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_qk_norm(kind, dtype):
    qkv = _qkv(2, 37, 2, 48, dtype, seed=4) * 2 + 0.5  # an offset and scale for the norms to remove
    _check(qkv, 2, q_kind=kind, k_kind=kind, name=f"qk-norm {kind} {dtype}")


@FP32_FP16
@pytest.mark.parametrize("layout", ["interleaved", "half"])
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_qk_norm_then_rope(kind, layout, dtype):
    grid = (4, 7)
    tokens, prefix = 1 + grid[0] * grid[1], 1
    rope = _table(tokens - prefix, 32, layout, "grid", grid)
    qkv = _qkv(1, tokens, 2, 32, dtype, seed=5)
    _check(qkv, 2, rope=rope, prefix=prefix, layout=layout, q_kind=kind, k_kind=kind, name=f"{kind}+{layout} {dtype}")


def test_norm_on_one_side_layer_norm_without_bias_and_many_slots():
    # Only q normalised (LayerNorm without bias), 70 tokens: the weight-gradient partials span several 16-row slots
    # and two dq / three dk tiles, the last ones ragged.
    qkv = _qkv(1, 70, 2, 32, torch.float32, seed=6)
    _check(qkv, 2, q_kind="layer", bias=False, name="q-only layer norm, no bias")
    _check(qkv, 2, k_kind="rms", rope=_table(70, 32, "half"), layout="half", name="k-only rms + rope")


def test_strided_view_of_a_bigger_buffer():
    # Every other token of a wider buffer, offset columns: the partner columns and norms go through the strides.
    heads, head_dim, tokens = 2, 32, 21
    width3 = 3 * heads * head_dim
    big = torch.randn(1, 2 * tokens, width3 + 24, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    qkv = big[:, ::2, 8 : 8 + width3]
    assert not qkv.is_contiguous()
    rope = _table(tokens - 1, head_dim, "half")
    _check(qkv, heads, rope=rope, prefix=1, layout="half", q_kind="layer", k_kind="layer", name="strided view")


@pytest.mark.parametrize("layout", ["every-other-element", "expanded"])
def test_norm_weight_views_answer_as_their_dense_copies(layout):
    # The kernels read the q/k norm weights at unit stride: views of other layouts are copied for them (before the
    # fix, a strided weight gave a wrong output and an expanded one read out of bounds).
    heads, head_dim = 2, 32
    qkv = torch.randn(1, 9, 3 * heads * head_dim, device=DEVICE)
    base = torch.randn(2 * head_dim if layout == "every-other-element" else 1, device=DEVICE) + 1.0
    bias_base = torch.randn(2 * head_dim if layout == "every-other-element" else 1, device=DEVICE)

    def view(t):
        return t[::2] if layout == "every-other-element" else t.expand(head_dim)

    runs = []
    for dense in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (qkv, base, bias_base)]
        weight, bias = view(leaves[1]), view(leaves[2])
        if dense:
            weight, bias = weight.contiguous(), bias.contiguous()
        norm = QKNorm(weight, bias, 1e-6, "layer")
        out = ops.qkv_attention(leaves[0], heads, backend="triton", q_norm=norm, k_norm=norm)
        out.square().sum().backward()
        runs.append([out.detach()] + [t.grad for t in leaves])
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_torch_backend_float64_is_the_spec():
    # The torch backend's fast form (F.layer_norm / F.rms_norm, the rotation, SDPA) against the spec, both exact.
    qkv = _qkv(2, 16, 2, 32, torch.float64, seed=8)
    for layout, kind in (("interleaved", "layer"), ("half", "rms")):
        norm = _as_norm(kind, [p.double() for p in _norm_params(kind, 32, 1)], 1e-6)
        kwargs = dict(rope=_table(13, 32, layout).double(), num_prefix_tokens=3, rope_layout=layout)
        ours = ops.qkv_attention(qkv, 2, backend="torch", q_norm=norm, k_norm=norm, **kwargs)
        torch.testing.assert_close(ours, reference.qkv_attention(qkv, 2, q_norm=norm, k_norm=norm, **kwargs))


def test_no_prologue_arguments_is_todays_op():
    qkv = _qkv(1, 9, 2, 32, torch.float32)
    plain = ops.qkv_attention(qkv, 2, backend="triton")
    assert torch.equal(ops.qkv_attention(qkv, 2, backend="triton", rope=None, q_norm=None, k_norm=None), plain)


def test_prefix_only_tokens_equal_plain_attention():
    # All tokens are prefix tokens: the (empty) table rotates nothing, so the output is plain attention's.
    qkv = _qkv(1, 5, 2, 32, torch.float32)
    rope = torch.empty(0, 64, device=DEVICE)
    out = ops.qkv_attention(qkv, 2, backend="triton", rope=rope, num_prefix_tokens=5)
    torch.testing.assert_close(out, ops.qkv_attention(qkv, 2, backend="triton"), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Determinism, torch.library, torch.compile, dispatch


def _prologue_op_args(qkv, heads=2):
    head_dim = qkv.shape[-1] // (3 * heads)
    rope = _table(qkv.shape[1] - 1, head_dim, "half")
    q_w, q_b = _norm_params("layer", head_dim, 1)
    (k_w,) = _norm_params("rms", head_dim, 2)
    return (rope, 1, True, "layer", q_w, q_b, 1e-6, "rms", k_w, None, 1e-5)


def test_gradients_are_bit_identical_run_to_run():
    qkv = _qkv(2, 40, 2, 32, torch.float32)
    first, second = (_check_once(qkv) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _check_once(qkv, heads=2):
    """Output and every gradient of one qkv_attention call with the full prologue (rotate-half, LayerNorm q, RMSNorm
    k)."""
    rope, prefix, _, _, q_w, q_b, _, _, k_w, _, _ = _prologue_op_args(qkv, heads)
    q_norm, k_norm = QKNorm(q_w, q_b, 1e-6, "layer"), QKNorm(k_w, None, 1e-5, "rms")
    fn = lambda x, a, b, c: ops.qkv_attention(  # noqa: E731
        x, heads, backend="triton", rope=rope, num_prefix_tokens=prefix, rope_layout="half",
        q_norm=q_norm._replace(weight=a, bias=b), k_norm=k_norm._replace(weight=c),
    )  # fmt: skip
    out, grads = _run(fn, [qkv, q_w, q_b, k_w])
    return [out, *grads]


def test_norm_gradients_do_not_depend_on_the_tile_sizes():
    # The weight-gradient partials go to 16-row slots whatever the tile: 16-row dq and dk tiles (one slot each; the
    # fp32 GPU table has (16, 32) for dq) give the sums of the interpreter's 64-row tiles (four slots, three zeros).
    qkv = _qkv(1, 45, 2, 32, torch.float32, seed=9)
    default = _check_once(qkv)
    with attention_triton.forced_configs({"dq": (16, 32, 4, 1), "dkdv": (32, 16, 4, 1)}):
        small = _check_once(qkv)
    for a, b in zip(default, small):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op_name", ["qkv_attention_prologue_fwd", "qkv_attention_prologue_bwd"])
def test_opcheck(op_name):
    qkv = _qkv(1, 9, 2, 32, torch.float32)
    prologue = _prologue_op_args(qkv)
    out, lse = torch.ops.fastvit.qkv_attention_prologue_fwd(qkv, 2, 0.2, *prologue)
    if op_name.endswith("fwd"):
        rope, prefix, half, q_kind, q_w, q_b, q_eps, k_kind, k_w, k_b, k_eps = prologue
        grad_params = (q_w.clone().requires_grad_(), q_b.clone().requires_grad_(), k_w.clone().requires_grad_())
        args = (qkv.clone().requires_grad_(), 2, 0.2, rope, prefix, half, q_kind, grad_params[0], grad_params[1],
                q_eps, k_kind, grad_params[2], k_b, k_eps)  # fmt: skip
    else:
        args = (torch.randn_like(out), qkv, out, lse, 2, 0.2, *prologue)
    torch.library.opcheck(getattr(torch.ops.fastvit, op_name).default, args)


def test_torch_compile_fullgraph_with_backward():
    qkv = _qkv(1, 21, 2, 32, torch.float32)
    rope = _table(20, 32, "interleaved")
    q_w, q_b = _norm_params("layer", 32, 1)

    def step(x, w, b):
        norm = QKNorm(w, b, 1e-6, "layer")
        out = ops.qkv_attention(x, 2, backend="triton", rope=rope, num_prefix_tokens=1, q_norm=norm, k_norm=norm)
        return (out * 1.5).square().sum()

    assert_compiled_gradients_equal_eager(step, [qkv, q_w, q_b])


def test_dispatch_falls_back_to_torch_where_the_kernels_do_not_cover_the_head_dim():
    prologue = ("rope:half", "q_norm:layer", "k_norm:layer")
    assert attention_triton.supports(attention_call(DEVICE, torch.float16, 64, prologue=prologue)) is None
    uncovered = attention_call(DEVICE, torch.float16, 16, prologue=prologue)
    assert "head_dim" in attention_triton.supports(uncovered)
    assert dispatch.explain("qkv_attention", "auto", uncovered)[0] == "torch"
    qkv = _qkv(1, 6, 2, 16, torch.float32)
    norm = QKNorm(torch.ones(16, device=DEVICE), None, 1e-6, "rms")
    with pytest.raises(ValueError, match="head_dim"):
        ops.qkv_attention(qkv, 2, backend="triton", rope=_table(6, 16, "half"), rope_layout="half", q_norm=norm)


# ------------------------------------------------------------------------------------------------
# Bad inputs


def _bad_cases():
    w = torch.ones(32, device=DEVICE)
    table = _table(8, 32, "half")
    return [
        (dict(rope=table[:, :60]), ValueError, r"rope must be the cat\(sin, cos\) table .*\[8, 64\]"),
        (dict(rope=table[:7]), ValueError, "num_prefix_tokens"),
        (dict(rope=table, num_prefix_tokens=1), ValueError, r"\[7, 64\]"),
        (dict(rope=table, num_prefix_tokens=9), ValueError, r"num_prefix_tokens must be in \[0, N=8\]"),
        (dict(rope=table, num_prefix_tokens=1.0), TypeError, "num_prefix_tokens must be an int"),
        (dict(num_prefix_tokens=1), ValueError, "only applies with a rope table"),
        (dict(rope=table.to(torch.int32)), TypeError, "rope must be a floating-point"),
        (dict(rope=table[0]), ValueError, "rope"),
        (dict(rope=table, rope_layout="halves"), ValueError, "rope_layout must be one of"),
        (dict(q_norm=(w, None, 1e-6, "layer")), TypeError, "q_norm must be a fastvit.ops.QKNorm"),
        (dict(k_norm=QKNorm(w, None, 1e-6, "batch")), ValueError, "k_norm.kind must be one of"),
        (dict(q_norm=QKNorm(w, w, 1e-6, "rms")), ValueError, "q_norm.bias must be None for kind='rms'"),
        (dict(q_norm=QKNorm(w[:16])), ValueError, r"q_norm.weight must have shape \[head_dim=32\]"),
        (dict(k_norm=QKNorm(w, w[:8])), ValueError, r"k_norm.bias must have shape \[head_dim=32\]"),
        (dict(q_norm=QKNorm(None)), TypeError, "q_norm.weight must be a"),
        (dict(q_norm=QKNorm(w.int())), TypeError, "q_norm.weight must be a floating-point"),
        (dict(q_norm=QKNorm(w, eps=0.0)), ValueError, "q_norm.eps must be a positive finite number"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_inputs_are_clear_errors(case):
    kwargs, error, match = _bad_cases()[case]
    qkv = _qkv(1, 8, 2, 32, torch.float32)
    with pytest.raises(error, match=match):
        ops.qkv_attention(qkv, 2, backend="torch", **kwargs)


def test_odd_head_dim_with_rope_is_refused():
    qkv = _qkv(1, 4, 1, 33, torch.float32)
    with pytest.raises(ValueError, match="head dim must be even"):
        ops.qkv_attention(qkv, 1, rope=torch.zeros(4, 66, device=DEVICE))


# ------------------------------------------------------------------------------------------------
# Models: the Eva family's attention (qk-norm + RoPE) as one fused call


def _tiny_eva(name: str) -> torch.nn.Module:
    """A 2-block, head-dim-32 model of a RoPE family with random (non-trivial) parameters, in fp32."""
    sizes = {
        # DINOv3: rotate-half RoPE ('dinov3' table), a class token + 4 registers, LayerScale, 3x3 grid.
        "dinov3": ("vit_base_patch16_dinov3", dict(img_size=48)),
        # EVA02: interleaved RoPE ('cat' table), q/v biases, sub-LN SwiGLU, 4x4 grid.
        "eva02": ("eva02_base_patch14_448", dict(img_size=56)),
    }
    preset, size = sizes[name]
    torch.manual_seed(0)
    model = fastvit.create_model(preset, depth=2, embed_dim=64, num_heads=2, num_classes=5, **size).to(DEVICE)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def _set_attention_backend(model: torch.nn.Module, backend: str) -> None:
    for module in model.modules():
        if getattr(module, "op_name", None) == "qkv_attention":
            module.backend = backend


def _check_triton_step_equals_torch(model: torch.nn.Module, images: torch.Tensor):
    """A training step's logits and every parameter gradient with the attention on triton equal its torch path's, and
    the fusion report puts the first block's attention on the prologue kernel. Returns the torch path's."""
    results = {}
    for backend in ("torch", "triton"):
        _set_attention_backend(model, backend)
        model.zero_grad(set_to_none=True)
        logits = model(images)
        logits.square().sum().backward()
        results[backend] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    report = model.fusion_report(DEVICE)
    assert report[0]["attn"].backends["qkv_attention"] == "triton", str(report)  # (+ proj + residual's op)
    assert not any("RoPE" in reason or "qk-norm" in reason for reason in report[0]["attn"].why_not), str(report)
    (want, want_grads), (got, got_grads) = results["torch"], results["triton"]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    return want, want_grads


# DINOv3 (rotate-half) with timm's qk_norm=True, EVA02 (interleaved, separate q/k/v projections) without.
@pytest.mark.parametrize("name, qk_norm", [("dinov3", True), ("eva02", False)], ids=["dinov3+qk_norm", "eva02"])
def test_eva_family_model_on_triton_equals_its_torch_path(name, qk_norm):
    model = _tiny_eva(name)
    if qk_norm:  # timm's qk_norm=True: LayerNorm q_norm / k_norm (random weights)
        for block in model.blocks:
            for attr in ("q_norm", "k_norm"):
                norm = fastvit.layers.LayerNorm(32, device=DEVICE)
                torch.nn.init.normal_(norm.weight, 1.0, 0.3), torch.nn.init.normal_(norm.bias, 0.0, 0.3)
                setattr(block.attn, attr, norm)
    assert all(block.attn.packed() for block in model.blocks)
    images = torch.randn(2, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    _check_triton_step_equals_torch(model, images)


def test_unfusable_qk_norm_module_runs_the_module_path_and_says_why():
    model = _tiny_eva("dinov3")
    model.blocks[0].attn.q_norm = torch.nn.GroupNorm(1, 1)  # a norm the prologue cannot read
    assert not model.blocks[0].attn.packed() and model.blocks[1].attn.packed()
    report = model.fusion_report(DEVICE)
    assert "attention" in report[0]["attn"].backends and "GroupNorm" in " ".join(report[0]["attn"].why_not)
    assert "qkv_attention" in report[1]["attn"].backends


@FP32_FP16
@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_per_head_rope_tables_with_prefix_tokens(layout, dtype):
    # RoPE-Mixed's form: one [N - T, 2·D] table per head (each head its own angles), a class token left unrotated.
    heads, tokens, head_dim, prefix = 2, 23, 32, 1
    table = _table(tokens - prefix, head_dim, layout)
    rope = torch.stack([table, table.flip(0)])
    qkv = _qkv(2, tokens, heads, head_dim, dtype, seed=5)
    _check(qkv, heads, rope=rope, prefix=prefix, layout=layout, q_kind="rms", name=f"per-head {layout}")


def test_per_head_tables_are_checked():
    qkv = _qkv(1, 9, 2, 32, torch.float32)
    with pytest.raises(ValueError, match=r"\[num_heads, N - num_prefix_tokens, 2 \* head_dim\] = \[2, 9, 64\]"):
        ops.qkv_attention(qkv, 2, rope=torch.zeros(3, 9, 64, device=DEVICE), backend="torch")
    with pytest.raises(ValueError, match=r"= \[2, 9, 64\]"):  # the varlen op: [H, T - prefix, 2*D]
        cu_seqlens = torch.tensor([0, 9], dtype=torch.int32, device=DEVICE)
        ops.varlen_qkv_attention(qkv[0], cu_seqlens, 9, 2, rope=torch.zeros(2, 8, 64, device=DEVICE))


@FP32_FP16
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per-head"])
@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_a_learned_table_gets_its_gradient_from_the_kernels(layout, per_head, dtype):
    # RoPE-Mixed trains its tables: the backward kernels store dsin = g·sign·n[p], dcos = g·n per row (q and k both),
    # summed over the batch (and the heads for a shared table); prefix rows have no table row.
    heads, tokens, head_dim, prefix = 2, 23, 32, 1
    table = _table(tokens - prefix, head_dim, layout)
    table = torch.stack([table, table.flip(0)]) if per_head else table
    norm = QKNorm(torch.linspace(0.5, 1.5, head_dim, device=DEVICE), None, 1e-6, "rms")

    def run(backend, x, t):
        fn = reference.qkv_attention if backend is None else lambda *a, **k: ops.qkv_attention(*a, backend=backend, **k)
        q_norm = norm._replace(weight=norm.weight.to(x.dtype))
        return fn(x, heads, rope=t.to(x.dtype), num_prefix_tokens=prefix, rope_layout=layout, q_norm=q_norm)

    qkv = _qkv(2, tokens, heads, head_dim, dtype)
    check_table_gradient(f"{layout} {'per-head' if per_head else 'shared'}", run, qkv, table)


def test_rope_mixed_model_trains_and_infers_on_the_prologue_kernel():
    # RoPE-Mixed: per-head tables built from learned frequencies (rope.freqs), the prologue's input with their
    # gradient; the model on triton equals its torch path in logits and every gradient, freqs included.
    torch.manual_seed(0)
    size = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=3)
    model = fastvit.Eva(**size, use_rot_pos_emb=True, rope_type="mixed").to(DEVICE)
    with torch.no_grad():
        torch.nn.init.normal_(model.rope.freqs, 0.0, 1.0)  # per-head angles far from the initial ones
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    want, want_grads = _check_triton_step_equals_torch(model, images)
    assert want_grads["rope.freqs"].abs().sum() > 0
    with torch.inference_mode():  # inference: the same kernel, the table without a gradient
        torch.testing.assert_close(model.eval()(images), want, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# GPU: bfloat16, every head dim, longer sequences (skipped without CUDA)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("head_dim", [32, 48, 64, 80, 96, 128])
@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_gpu_rope_and_qk_norm_all_head_dims(layout, head_dim, dtype):
    grid = (27, 27)  # DINOv3-like: 729 patches + 1 class + 4 registers
    tokens, prefix = 5 + grid[0] * grid[1], 5
    rope = _table(tokens - prefix, head_dim, layout, "grid", grid)
    qkv = _qkv(2, tokens, 3, head_dim, dtype)
    _check(qkv, 3, rope=rope, prefix=prefix, layout=layout, q_kind="layer", k_kind="layer", name=f"gpu {dtype}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_gpu_deterministic_mode_repeats_bitwise(kind):
    qkv = _qkv(4, 197, 6, 64, torch.bfloat16)
    fastvit.set_deterministic(True)
    try:
        first, second = (_check_once(qkv, heads=6) for _ in range(2))
    finally:
        fastvit.set_deterministic(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
