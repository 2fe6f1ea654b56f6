"""The fused GEMM (``ops.ln_linear``, Triton: LayerNorm / RMSNorm prologue, bias / GELU / QuickGELU / SwiGLU /
residual epilogues, the norm's backward, split-K weight gradient) and ``ln_mlp``'s ``triton`` backend built from two
of them (its every variant: tests/test_triton_mlp.py).

CPU: Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest without a GPU) against the fp64 spec
(``fastvit.reference.ln_linear`` / ``ln_mlp``) with the suites' rule (``fastvit.accuracy``: error <= 2x PyTorch's
own in the same dtype plus a rounding floor), output and every gradient, fp32 and fp16 (bf16 ``tl.dot`` is broken
in the interpreter), ragged M/N/K and K not a multiple of the tile, every prologue/epilogue switch, small forced
tiles (several K steps, several programs per grid axis, grouped ordering); ``torch.compile(fullgraph=True)``; bad
inputs; how ``auto`` reads the choice table. opcheck, fake impls, NaN/Inf propagation, large magnitudes, awkward
sizes, non-contiguous and aliased inputs, empty batches and determinism run for this op from the op-case table
(``tests/op_cases.py``) in the cross-cutting suites.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from fastvit import dispatch, gemm_choices, ops, reference
from fastvit.ops.ln_linear import GemmCall
from fastvit.ops.ln_mlp import MlpCall
from fastvit.ops.triton import launch
from fastvit.ops.triton import linear as linear_triton

from op_cases import (
    LN_LINEAR,
    LN_MLP,
    assert_deterministic_runs_are_bit_identical,
    assert_matches_reference,
    fp32_noise_floor,
    rounding_floor,
)
from utils import DEVICE, DTYPE_TOLS, backend_skip_reason

pytestmark = pytest.mark.skipif(backend_skip_reason("triton") is not None, reason=str(backend_skip_reason("triton")))

# fp32: fp32 accumulation noise only (tf32 off); fp16 (bf16 on GPU): two roundings of the dtype (the normalised A tile
# and the output) at the scale of the exact results, where PyTorch's own answer happens to be exact.
FLOORS = {torch.float32: fp32_noise_floor(), torch.float16: rounding_floor(2.0), torch.bfloat16: rounding_floor(2.0)}
SMALL_TILES = (16, 16, 16, 2, 4, 1)  # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages


def check(sample, dtype=torch.float32, backend="triton", case=LN_LINEAR, label=""):
    assert_matches_reference(case, sample, backend, floor=FLOORS[dtype], name=f"{label} {dtype}")


# ------------------------------------------------------------------------------------------------
# Accuracy: forward and every gradient vs the fp64 spec


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["none", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("layer_norm", [True, False])
def test_every_activation_with_and_without_layer_norm(dtype, activation, layer_norm):
    sample = LN_LINEAR.make(dtype, DEVICE, lead=(2, 7), in_features=24, out_features=40, layer_norm=layer_norm,
                            activation=activation)  # fmt: skip
    check(sample, dtype, label=f"{activation} ln={layer_norm}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation", ["none", "quick_gelu", "swiglu"])
def test_rms_norm_prologue_forward_and_every_gradient(dtype, activation):
    # RMSNorm: no mean, no bias, in the statistics kernel, the A-tile prologue and the Triton norm backward.
    sample = LN_LINEAR.make(dtype, DEVICE, lead=(2, 7), in_features=24, out_features=20, norm="rms",
                            activation=activation)  # fmt: skip
    check(sample, dtype, label=f"rms {activation}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm, ln_bias", [("layer", True), ("layer", False), ("rms", False)])
@pytest.mark.parametrize("bias, residual", [(True, True), (False, False)], ids=["bias-residual", "neither"])
def test_swiglu_epilogue_with_every_prologue_and_switch(dtype, norm, ln_bias, bias, residual):
    # K = 37 (not a multiple of 16), N = 19: the gate and value tiles of one program, both ragged.
    sample = LN_LINEAR.make(dtype, DEVICE, lead=(3, 5), in_features=37, out_features=19, activation="swiglu",
                            norm=norm, ln_bias=ln_bias, bias=bias, residual=residual)  # fmt: skip
    check(sample, dtype, label=f"swiglu {norm} ln_bias={ln_bias} bias={bias} residual={residual}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("activation, norm", [("gelu", "layer"), ("gelu_tanh", "rms"), ("quick_gelu", "layer")])
@pytest.mark.parametrize("columns", [0, 17, 40], ids=["none-activated", "ragged-split", "all"])
def test_activation_on_the_first_columns_only(dtype, activation, norm, columns):
    # A parallel block's in_proj: the MLP's hidden columns activated, q, k, v not; 17 splits a 16-wide tile (the
    # small tiles below) and the interpreter's one wide tile alike; the backward forms act'(z) on those columns only.
    sample = LN_LINEAR.make(dtype, DEVICE, lead=(3, 5), in_features=24, out_features=40, activation=activation,
                            norm=norm, residual=False, activation_columns=columns)  # fmt: skip
    check(sample, dtype, label=f"{activation} {norm} columns={columns}")
    with linear_triton.forced_configs(dict.fromkeys(linear_triton.KINDS, SMALL_TILES)):
        check(sample, dtype, label=f"{activation} {norm} columns={columns} small tiles")


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_qkv_with_eva_q_and_v_only_bias(norm):
    # A block's qkv through ln_linear (item D, the lead's layers.py): EVA's q_bias / v_bias with k's bias a zero
    # buffer enter as cat([q_bias, zeros, v_bias]); the GEMM's bias gradient flows back to q_bias and v_bias.
    width = 24
    sample = LN_LINEAR.make(lead=(2, 7), in_features=width, out_features=3 * width, activation="none", residual=False,
                            bias=False, norm=norm)  # fmt: skip
    gen = torch.Generator().manual_seed(7)
    q_bias, v_bias = (torch.randn(width, generator=gen, dtype=torch.float64) for _ in range(2))
    x, ln_weight, ln_bias, weight = (sample[name] for name in ("x", "ln_weight", "ln_bias", "weight"))
    results = {}
    for fn in (functools.partial(ops.ln_linear, backend="triton"), reference.ln_linear):
        q, v = (t.to(DEVICE, torch.float32).requires_grad_() for t in (q_bias, v_bias))
        out = fn(x, ln_weight, ln_bias, weight, torch.cat([q, torch.zeros_like(q), v]), 1e-6, "none", None, norm=norm)
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype, device=DEVICE)).reshape(out.shape))
        results[fn] = (out.detach(), q.grad, v.grad)
    for got, want in zip(*results.values()):
        torch.testing.assert_close(got, want, **DTYPE_TOLS[torch.float32])


def _fwd_args(rows=11, k=24, n=20, norm=1, split=False, requires_grad=False):
    """Positional arguments of fastvit::ln_linear_fwd for a SwiGLU GEMM: packed [2N, K] weight, or the gate rows
    with ``weight_value`` (timm's split layout) when ``split``."""
    gen = torch.Generator().manual_seed(5)
    draw = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(DEVICE)
    x, ln_w, ln_b = draw(rows, k, scale=2.0), draw(k, scale=0.2) + 1.0, draw(k, scale=0.2) if norm == 1 else None
    weight, bias, residual = draw(2 * n, k, scale=k**-0.5), draw(2 * n, scale=0.2), draw(rows, n)
    gate, value = (t.contiguous() for t in weight.chunk(2)) if split else (weight, None)
    leaves = [t if t is None else t.requires_grad_(requires_grad) for t in (x, ln_w, ln_b, gate, bias, residual, value)]
    x, ln_w, ln_b, gate, bias, residual, value = leaves
    return [x, ln_w, ln_b, gate, bias, residual, 1e-6, linear_triton.ACTIVATION_CODES["swiglu"], True, norm, value]


@pytest.mark.parametrize("norm", [1, 2], ids=["layer", "rms"])
def test_swiglu_split_weights_equal_the_packed_weight_bit_for_bit(norm):
    # The kernels read the gate and value rows through two pointers either way: timm's separate fc1_g / fc1_x give
    # the packed weight's answers exactly, and their gradients are the packed gradient's halves.
    results = {}
    for split in (False, True):
        args = _fwd_args(norm=norm, split=split, requires_grad=True)
        out = torch.ops.fastvit.ln_linear_fwd(*args)[0]
        out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape))
        grads = [args[i].grad for i in (0, 1, 4, 5)]
        weight_grad = args[3].grad if not split else torch.cat([args[3].grad, args[10].grad])
        results[split] = [out.detach(), weight_grad, *grads]
    for packed, split in zip(results[False], results[True]):
        torch.testing.assert_close(split, packed, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "variant",
    [dict(activation="gelu"), dict(activation="swiglu", norm="rms"), dict(layer_norm=False, activation="none")],
    ids=["ln-gelu", "rms-swiglu", "plain"],
)
def test_split_k_weight_gradient_matches_the_spec_and_repeats_bit_for_bit(dtype, variant):
    # 16-row steps in 3 slices of the M = 50 reduction: slices of 32, 18 and 0 rows (an empty slice writes zero
    # partials); the fp32 partials are summed in slice order, so two runs agree bit for bit.
    sample = LN_LINEAR.make(dtype, DEVICE, lead=(50,), in_features=40, out_features=20, **variant)
    with linear_triton.forced_configs(dict.fromkeys(linear_triton.KINDS, SMALL_TILES)), linear_triton.forced_split_k(3):
        check(sample, dtype, label=f"split-K 3 {variant}")
        first, second = LN_LINEAR.run(sample, "triton"), LN_LINEAR.run(sample, "triton")
    for a, b in zip(first, second):
        if a is not None:
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_weight_split_k_splits_only_grids_that_leave_sms_idle(monkeypatch):
    # The host's choice on an H100-like GPU (132 SMs, sm_90 'weight' tiles of 128x128): no split where the dW tiles
    # fill the SMs or the rows are few, enough slices to fill them otherwise, at most SPLIT_K_MAX.
    monkeypatch.setattr(launch, "on_gpu", lambda t: True)
    monkeypatch.setattr(launch, "gpu_arch", lambda t: 90)
    monkeypatch.setattr(launch, "num_sms", lambda index: 132)
    like = torch.empty(0, dtype=torch.bfloat16)
    kernels = launch.kernels("linear")
    assert linear_triton.weight_split_k(64 * 197, 3072, 768, like) == 1  # ViT-B fc1: 24 x 6 = 144 tiles
    assert linear_triton.weight_split_k(8 * 197, 768, 768, like) == 3  # 36 tiles; 1576 rows: 3 slices of >= 512
    assert linear_triton.weight_split_k(300, 768, 768, like) == 1  # too few rows to split
    assert linear_triton.weight_split_k(1 << 20, 64, 64, like) == kernels.SPLIT_K_MAX  # one tile, a million rows
    with linear_triton.forced_split_k(5):
        assert linear_triton.weight_split_k(64 * 197, 3072, 768, like) == 5
    with pytest.raises(ValueError, match="split_k must be a positive int"), linear_triton.forced_split_k(0):
        pass


def test_the_backend_needs_no_extension(monkeypatch):
    # The norm's backward is a Triton kernel now: nothing in the backend asks for fastvit._C.
    monkeypatch.setattr(dispatch, "extension_available", lambda: False)
    call = GemmCall(DEVICE, torch.float32, 24, 40, True)
    assert linear_triton.supports(call) is None
    check(LN_LINEAR.make(lead=(2, 7), norm="rms"), label="rms without the extension")


@pytest.mark.parametrize("bias, residual", [(False, False), (True, False), (False, True)])
def test_bias_and_residual_switches(bias, residual):
    sample = LN_LINEAR.make(lead=(3, 5), in_features=37, out_features=19, bias=bias, residual=residual)
    check(sample, label=f"bias={bias} residual={residual}")
    _, *grads = LN_LINEAR.run(sample, "triton")
    assert (grads[4] is None) == (not bias) and (grads[5] is None) == (not residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "lead, k, n",
    [((1,), 1, 1), ((1,), 7, 13), ((50,), 57, 45), ((2, 33), 130, 17), ((197,), 24, 40)],
    ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v),
)
def test_ragged_shapes_with_small_tiles_take_several_steps_on_every_axis(dtype, lead, k, n):
    # 16x16x16 tiles: M, N and K ragged and (mostly) longer than one tile, so every loop runs several steps over a
    # masked tail, and the grouped program order maps several programs per axis (GROUP_M = 2).
    sample = LN_LINEAR.make(dtype, DEVICE, lead=lead, in_features=k, out_features=n)
    forced = dict.fromkeys(linear_triton.KINDS, SMALL_TILES)
    with linear_triton.forced_configs(forced):
        check(sample, dtype, label=f"{lead}x{k}->{n}")


def test_k_longer_than_the_interpreter_tile():
    # The interpreter's own config (BLOCK_K = 128): K = 300 takes three K steps, the last one ragged.
    check(LN_LINEAR.make(lead=(7,), in_features=300, out_features=33), label="K300")


def test_strided_rows_and_transposed_input():
    sample = LN_LINEAR.make(lead=(4, 6), in_features=24, out_features=40)
    wide = torch.randn(4, 6, 64, device=DEVICE)
    wide[..., 5 : 5 + 24] = sample["x"]
    check(sample.replace(x=wide[..., 5 : 5 + 24]), label="row stride 64")  # a row stride, not contiguous
    columns = sample["x"].reshape(24, 24).t().contiguous().t().reshape(4, 6, 24)  # unit row stride
    check(sample.replace(x=columns), label="column-major rows")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("approximate, residual", [("none", True), ("tanh", False)])
def test_ln_mlp_triton_backend_matches_the_spec(dtype, approximate, residual):
    sample = LN_MLP.make(dtype, DEVICE, lead=(2, 9), width=24, hidden=70).with_kwargs(
        approximate=approximate, residual=residual
    )
    check(sample, dtype, case=LN_MLP, label=f"ln_mlp {approximate} residual={residual}")


def test_inference_saves_nothing_and_matches_training_output():
    sample = LN_LINEAR.make(lead=(2, 7), in_features=24, out_features=40)
    with torch.no_grad():
        inference = LN_LINEAR.call(sample, "triton")
    trained, *_ = LN_LINEAR.run(sample, "triton")
    torch.testing.assert_close(inference, trained, atol=0, rtol=0)
    x, lnw, lnb, w, b, r = (t.reshape(-1, t.shape[-1]) if t.dim() > 1 and t is not sample["weight"] else t
                            for t in sample.args)  # fmt: skip
    _, mean, rstd, pre_act = torch.ops.fastvit.ln_linear_fwd(x, lnw, lnb, w, b, r, 1e-6, 1, False)
    assert pre_act.numel() == 0 and mean.shape == rstd.shape == (14,)


@pytest.mark.parametrize("variant", [dict(), dict(activation="swiglu", norm="rms")], ids=["ln-gelu", "rms-swiglu"])
def test_torch_compile_fullgraph_matches_eager(variant):
    sample = LN_LINEAR.make(lead=(2, 7), in_features=24, out_features=40, **variant)
    fn = LN_LINEAR.as_function(sample, "triton")
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    leaves = [None if t is None else t.detach().requires_grad_() for t in sample.args]
    out = compiled(*leaves)
    out.square().sum().backward()
    eager_leaves = [None if t is None else t.detach().requires_grad_() for t in sample.args]
    eager = fn(*eager_leaves)
    eager.square().sum().backward()
    torch.testing.assert_close(out, eager, atol=0, rtol=0)
    for got, want in zip(leaves, eager_leaves):
        if want is not None:
            torch.testing.assert_close(got.grad, want.grad, atol=0, rtol=0)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU float16 autocast (the interpreter refuses bfloat16)")
@pytest.mark.parametrize("case", [LN_LINEAR, LN_MLP], ids=["ln_linear", "ln_mlp"])
def test_cpu_float16_autocast_answers_as_eager_autocast(case):
    # Custom ops see no autocast: the backend casts x and the parameters to float16 (differentiably: fp32 master
    # weights get fp32 gradients), centres x before rounding it for the LayerNorm, and adds an fp32 residual outside.
    sample = case.make(lead=(2, 7))
    results = {}
    for backend in ("torch", "triton"):
        leaves = [None if t is None else t.clone().requires_grad_() for t in sample.args]
        with torch.autocast("cpu", dtype=torch.float16):
            out = case.call(type(sample)(dict(zip(sample.tensors, leaves)), sample.kwargs), backend)
        out.float().square().sum().backward()
        results[backend] = [out, *(None if t is None else t.grad for t in leaves)]
    # Two float16 computations that round at different places (eager: the LN output, z, GELU's output, dz; ours: the
    # normalised tile, z saved, dz): up to four float16 roundings apart at the scale of each result.
    tols = DTYPE_TOLS[torch.float16]
    for got, want in zip(results["triton"], results["torch"]):
        if want is None:
            continue
        assert got.dtype == want.dtype, (got.dtype, want.dtype)
        scale = max(want.abs().max().item(), 1.0)
        torch.testing.assert_close(got, want, atol=4 * tols["atol"] * scale, rtol=tols["rtol"])


def test_the_spec_is_layer_norm_linear_gelu_residual():
    sample = LN_LINEAR.make(torch.float64, "cpu", lead=(3,), in_features=8, out_features=5, activation="gelu_tanh")
    x, lnw, lnb, w, b, r = sample.args
    by_hand = r + torch.nn.functional.gelu((reference.layer_norm(x, lnw, lnb, 1e-6)) @ w.t() + b, approximate="tanh")
    torch.testing.assert_close(LN_LINEAR.reference(sample), by_hand, atol=1e-12, rtol=0)
    torch.testing.assert_close(LN_LINEAR.call(sample, "torch"), by_hand, atol=1e-12, rtol=0)


@pytest.mark.parametrize("norm, split", [(1, True), (2, False)], ids=["layer-split-swiglu", "rms-packed-swiglu"])
def test_opcheck_of_the_swiglu_and_rms_ops(norm, split):
    args = _fwd_args(norm=norm, split=split, requires_grad=True)
    torch.library.opcheck(torch.ops.fastvit.ln_linear_fwd.default, tuple(args))
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    _, mean, rstd, pre_act = torch.ops.fastvit.ln_linear_fwd(*detached)
    x, ln_w, ln_b, weight, _bias, residual, _eps, activation, _save, _norm, value = detached
    bwd = (torch.randn_like(residual), x, ln_w, ln_b, mean, rstd, weight, pre_act, activation, True, norm, value)
    torch.library.opcheck(torch.ops.fastvit.ln_linear_bwd.default, bwd)


def test_opcheck_with_the_activation_on_the_first_columns():
    sample = LN_LINEAR.make(lead=(9,), in_features=24, out_features=20, residual=False)
    x, ln_w, ln_b, weight, bias = (sample[n] for n in ("x", "ln_weight", "ln_bias", "weight", "bias"))
    gelu = linear_triton.ACTIVATION_CODES["gelu"]
    fwd = [t.clone().requires_grad_() for t in (x, ln_w, ln_b, weight, bias)]
    torch.library.opcheck(torch.ops.fastvit.ln_linear_fwd.default, (*fwd, None, 1e-6, gelu, True, 1, None, 7))
    _, mean, rstd, pre_act = torch.ops.fastvit.ln_linear_fwd(x, ln_w, ln_b, weight, bias, None, 1e-6, gelu, True, 1,
                                                              None, 7)  # fmt: skip
    bwd = (torch.randn(9, 20, device=DEVICE), x, ln_w, ln_b, mean, rstd, weight, pre_act, gelu, True, 1, None, 7)
    torch.library.opcheck(torch.ops.fastvit.ln_linear_bwd.default, bwd)


# ------------------------------------------------------------------------------------------------
# Bad inputs


def _args(**changes):
    sample = LN_LINEAR.make(lead=(2, 3), in_features=8, out_features=5)
    args = dict(sample.tensors, **sample.kwargs)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(ln_weight=None), ValueError, "ln_bias given without ln_weight"),
        (dict(norm="rms"), ValueError, "ln_bias must be None with norm='rms'"),
        (dict(norm="group"), ValueError, "norm must be one of"),
        (dict(activation="swiglu", weight=torch.randn(5, 8), bias=None), ValueError, "even number of rows"),
        (dict(activation="swiglu", weight=torch.randn(10, 8)), ValueError, r"bias must have shape \(10,\)"),
        (dict(activation="relu"), ValueError, "activation must be one of"),
        (dict(residual=torch.randn(2, 3, 4)), ValueError, r"residual must have shape \(2, 3, 5\)"),
        (dict(weight=torch.randn(5, 7)), ValueError, r"weight must have shape \(5, 8\)"),
        (dict(ln_weight=torch.randn(7)), ValueError, r"ln_weight must have shape \(8,\)"),
        (dict(eps=0.0), ValueError, "eps must be a positive finite number"),
        (dict(x=torch.randn(2, 3, 8, dtype=torch.float64)), TypeError, "one dtype"),
        (dict(x=torch.ones(2, 3, 8, dtype=torch.int64)), TypeError, "x must be a floating-point tensor"),
        (dict(activation_columns=6), ValueError, r"activation_columns must be in \[0, N=5\], got 6"),
        (dict(activation_columns=2.0), TypeError, "activation_columns must be an int or None"),
        (dict(activation="none", activation_columns=2), ValueError, "activation_columns applies to a single-input"),
    ],
)
def test_bad_inputs_are_clear_errors(changes, error, match):
    with pytest.raises(error, match=match):
        ops.ln_linear(**_args(**changes), backend="torch")


def test_triton_refuses_float64_and_interpreted_bfloat16_with_a_type_error():
    args = _args()
    as64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(TypeError, match="float64"):
        ops.ln_linear(**as64, backend="triton")
    if DEVICE.type == "cpu":
        as_bf16 = {k: v.bfloat16() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with pytest.raises(TypeError, match="bfloat16 under Triton's CPU interpreter"):
            ops.ln_linear(**as_bf16, backend="triton")


@pytest.mark.parametrize(
    "configs, match",
    [
        ({"dq": SMALL_TILES}, "unknown kernel kind"),
        ({"fwd": (16, 16, 16)}, "positive ints"),
        ({"fwd": (16, 24, 16, 1, 4, 1)}, "powers of two >= 16"),
    ],
)
def test_forced_configs_reject_bad_entries(configs, match):
    with pytest.raises(ValueError, match=match), linear_triton.forced_configs(configs):
        pass


# ------------------------------------------------------------------------------------------------
# auto and the choice table (call signatures only: no kernel runs)

CUDA = torch.device("cuda")


@pytest.fixture
def choices(monkeypatch):
    """Replace the shipped choice table with the entries given; restores it and dispatch's cache afterwards."""

    def install(*entries):
        monkeypatch.setattr(gemm_choices, "table", lambda path=None: {
            (e["op"], e["bucket"], e["dtype"], e["capability"], e.get("variant", "*")): e["backend"] for e in entries
        })  # fmt: skip
        monkeypatch.setattr(gemm_choices, "capability", lambda device: "9.0")
        dispatch.clear_cache()

    yield install
    dispatch.clear_cache()


def test_the_shipped_choice_table_is_well_formed_and_empty():
    assert gemm_choices.table() == {}  # no GPU evidence yet: auto keeps cuBLASLt / cuBLAS


def test_a_malformed_choice_table_is_a_clear_error(tmp_path):
    path = tmp_path / "choices.json"
    path.write_text(json.dumps({"format": 1, "choices": [{"op": "ln_mlp"}]}))
    with pytest.raises(ValueError, match="malformed entry"):
        gemm_choices.table.__wrapped__(path)
    path.write_text(json.dumps({"format": 2, "choices": []}))
    with pytest.raises(ValueError, match="expected"):
        gemm_choices.table.__wrapped__(path)


def test_without_evidence_auto_keeps_cublaslt_and_says_why(pretend_gpu, choices):
    choices()
    call = GemmCall(CUDA, torch.bfloat16, 768, 3072, True)
    assert dispatch.explain("ln_mlp", "auto", call) == ("cuda", None)
    chosen, why = dispatch.explain("ln_linear", "auto", call)
    assert chosen == "torch" and "no benchmark evidence" in why and "768x3072" in why
    assert dispatch.explain("ln_mlp", "triton", call) == ("triton", None)  # explicit: always the kernel
    assert dispatch.resolve("ln_mlp", "auto", CUDA, torch.bfloat16) == "cuda"  # device level: no shape, no choice


def test_a_measured_choice_makes_auto_pick_triton_for_its_bucket_dtype_and_arch_only(pretend_gpu, choices):
    choices(
        dict(op="ln_mlp", bucket="768x3072", dtype="bfloat16", capability="9.0", backend="triton"),
        dict(op="ln_linear", bucket="*", dtype="float16", capability="9.0", backend="triton"),
    )
    assert dispatch.explain("ln_mlp", "auto", GemmCall(CUDA, torch.bfloat16, 768, 3072, True))[0] == "triton"
    assert dispatch.explain("ln_mlp", "auto", GemmCall(CUDA, torch.bfloat16, 384, 1536, True))[0] == "cuda"
    assert dispatch.explain("ln_mlp", "auto", GemmCall(CUDA, torch.float16, 768, 3072, True))[0] == "cuda"
    assert dispatch.explain("ln_linear", "auto", GemmCall(CUDA, torch.float16, 5, 7, False))[0] == "triton"  # '*'
    assert dispatch.resolve("ln_linear", "auto", CUDA, torch.float16) == "triton"
    assert dispatch.explain("ln_mlp", "auto", GemmCall(torch.device("cpu"), torch.float32, 768, 3072, True)) == (
        "torch",
        "'auto' runs the torch backend on cpu tensors",
    )


def test_a_choice_measured_on_one_mlp_variant_does_not_speak_for_another(pretend_gpu, choices):
    # SwiGLU's two accumulators and a hidden norm change who wins: a 'layer/gelu' entry leaves an RMSNorm-SwiGLU MLP
    # at the same bucket on cuBLASLt; an entry without a variant holds for every variant.
    choices(dict(op="ln_mlp", bucket="768x2048", dtype="bfloat16", capability="9.0", backend="triton",
                 variant="layer/gelu"))  # fmt: skip
    gelu = MlpCall(CUDA, torch.bfloat16, 768, 2048, True, "gelu", "layer", False)
    swiglu = MlpCall(CUDA, torch.bfloat16, 768, 2048, True, "swiglu", "rms", True)
    assert dispatch.explain("ln_mlp", "auto", gelu)[0] == "triton"
    assert dispatch.explain("ln_mlp", "auto", swiglu) == ("cuda", None)  # no evidence for this variant: cuBLASLt
    why = linear_triton.measured_choice("ln_mlp")(swiglu)
    assert "no benchmark evidence" in why and "768x2048 (rms/swiglu/hidden_norm)" in why, why
    choices(dict(op="ln_mlp", bucket="768x2048", dtype="bfloat16", capability="9.0", backend="triton"))
    assert dispatch.explain("ln_mlp", "auto", swiglu)[0] == "triton"


# ------------------------------------------------------------------------------------------------
# GPU (skipped without one)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_split_k_weight_gradient_is_chosen_accurate_and_deterministic(dtype, no_tf32):
    # A qkv-like dW of batch 2 (394 tokens x 768 -> 768 outputs: a few dozen 128x128 tiles) leaves SMs idle: the
    # host splits the token reduction; the answer keeps the rule and repeats bit for bit in deterministic mode.
    sample = LN_LINEAR.make(dtype, "cuda", lead=(8, 197), in_features=768, out_features=768, activation="none")
    assert linear_triton.weight_split_k(8 * 197, 768, 768, sample["x"]) > 1
    check(sample, dtype, label="gpu split-K")
    assert_deterministic_runs_are_bit_identical(LN_LINEAR, sample, "triton")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", [dict(norm="rms", activation="swiglu"), dict(activation="quick_gelu")])
def test_gpu_new_prologues_and_epilogues_at_model_shapes(dtype, variant, no_tf32):
    sample = LN_LINEAR.make(dtype, "cuda", lead=(4, 197), in_features=768, out_features=2048, **variant)
    check(sample, dtype, label=f"gpu {variant}")
