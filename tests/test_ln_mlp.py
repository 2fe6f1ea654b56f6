"""The fused LayerNorm -> fc1 -> GELU -> fc2 (+ residual) op of the extension, and the LNMLP layer.

CPU tests run the extension's C++ implementation (``backend='cuda'`` on CPU tensors) through the same
torch.library registration (schemas, fake impls, autograd) as the CUDA kernels: forward and every
gradient against the fp64 reference with the flash-attention rule (error <= 2x PyTorch's own error in
the same dtype), fp64 agreement, gradcheck, opcheck, torch.compile, bad inputs. GPU tests at the end
run the CUDA path (LN kernels, cuBLASLt GEMMs and epilogues, GELU kernels).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn

import fastvit
from fastvit import ops, reference
from fastvit.layers import LNMLP, LayerNorm, Mlp, mlp_blockers

from op_cases import (
    LN_MLP,
    REFERENCE,
    Sample,
    assert_compiles_with_backward,
    assert_deterministic_runs_are_bit_identical,
    assert_matches_reference,
    relative_floor,
    rounding_floor,
)
from utils import dtype_tols, needs_cuda, needs_extension

pytestmark = needs_extension


# The op-case table's ln_mlp inputs, on CPU tensors (the extension's C++ path) unless a test asks for CUDA.
cpu_sample = functools.partial(LN_MLP.make, device="cpu")
gpu_sample = functools.partial(LN_MLP.make, device="cuda")


def check_against_reference(sample: Sample, approximate="none", residual=True, floor_rel=1e-6, label=""):
    """The extension (backend='cuda') vs the fp64 reference, bounded by 2x the reference's own error in the same
    dtype (plus ``floor_rel`` of each tensor's scale), output and every gradient."""
    sample = sample.with_kwargs(approximate=approximate, residual=residual)
    assert_matches_reference(LN_MLP, sample, "cuda", floor=relative_floor(floor_rel), name=label)


# ------------------------------------------------------------------------------------------------
# Accuracy on the C++ CPU path


# (leading shape, C, hidden): token counts 1, 7, 197; odd widths and hidden sizes.
SHAPES = [((1, 1), 7, 13), ((2, 7), 24, 96), ((1, 197), 192, 768), ((3, 7), 24, 37), ((7,), 7, 28)]


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("lead, width, hidden", SHAPES)
def test_cpu_fp32_forward_and_every_grad_within_torch_error(lead, width, hidden, approximate, residual):
    sample = cpu_sample(lead=lead, width=width, hidden=hidden)
    check_against_reference(sample, approximate, residual, label=f"{lead}x{width}->{hidden} {approximate}")


@pytest.mark.parametrize("fc1_bias, fc2_bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_cpu_without_biases(fc1_bias, fc2_bias, approximate):
    sample = cpu_sample(lead=(2, 7), width=24, hidden=40, fc1_bias=fc1_bias, fc2_bias=fc2_bias)
    check_against_reference(sample, approximate, True, label="bias")
    _, *grads = LN_MLP.run(sample.with_kwargs(approximate=approximate), "cuda")
    assert (grads[4] is None) == (not fc1_bias) and (grads[6] is None) == (not fc2_bias)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_cpu_fp64_matches_the_reference(approximate, residual):
    sample = cpu_sample(torch.float64, lead=(3, 7), width=24, hidden=40)
    check_against_reference(sample, approximate, residual, label="fp64")  # float64: within DTYPE_TOLS[float64]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_half_precision_within_torch_error(dtype):
    check_against_reference(cpu_sample(dtype, lead=(2, 7), width=24, hidden=96), floor_rel=1e-3, label="half")


@pytest.mark.parametrize(
    "residual, approximate, biases", [(True, "none", True), (False, "tanh", True), (True, "tanh", False)]
)
def test_gradcheck_fp64(residual, approximate, biases):
    sample = cpu_sample(
        torch.float64, requires_grad=True, lead=(2, 3), width=5, hidden=6, fc1_bias=biases, fc2_bias=biases
    )
    sample = sample.with_kwargs(eps=1e-5, approximate=approximate, residual=residual)
    assert torch.autograd.gradcheck(LN_MLP.as_function(sample, "cuda"), sample.args)


def test_eps_and_non_contiguous_views():
    x, *params = cpu_sample(lead=(4, 6), width=48, hidden=40).args
    view = x.transpose(0, 1)[:, ::2, 5:29]  # strided x: [6, 2, 24]
    ln_w, ln_b = params[0][5:29], params[1][5:29]
    fc1_w = params[2][:, 5:29]  # non-contiguous weight view [40, 24]
    fc2_w = params[4][5:29].t().contiguous().t()  # transposed storage [24, 40]
    b2 = params[5][5:29]
    args = (view, ln_w, ln_b, fc1_w, params[3], fc2_w, b2)
    out = ops.ln_mlp(*args, eps=1e-5, backend="cuda")
    torch.testing.assert_close(out, reference.ln_mlp(*args, 1e-5), **dtype_tols(torch.float32))
    assert out.is_contiguous() and out.shape == view.shape


def test_empty_batch():
    out, *grads = LN_MLP.run(cpu_sample(lead=(0, 5), width=24, hidden=40), "cuda")
    assert out.shape == (0, 5, 24) and grads[0].shape == (0, 5, 24)
    assert all(g is not None and g.abs().sum() == 0 for g in grads[1:])


def test_no_grad_skips_the_saved_pre_activation():
    args = cpu_sample(lead=(2, 7), width=24, hidden=40).args
    out, mean, rstd, pre = torch.ops.fastvit.ln_mlp_fwd(*args, 1e-6, "none", True, False)
    assert pre.shape == (0,) and mean.shape == rstd.shape == (2, 7) and mean.dtype == torch.float32
    out2, _, _, pre2 = torch.ops.fastvit.ln_mlp_fwd(*args, 1e-6, "none", True, True)
    assert pre2.shape == (2, 7, 40)
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    torch.testing.assert_close(mean, args[0].mean(-1))
    with torch.no_grad():
        torch.testing.assert_close(ops.ln_mlp(*args, backend="cuda"), out)


# ------------------------------------------------------------------------------------------------
# Registration: opcheck and torch.compile


@pytest.mark.parametrize("save, biases", [(True, True), (False, True), (True, False)])
def test_ln_mlp_fwd_passes_opcheck(save, biases):
    # save=False is the inference form (nothing kept for a backward): opcheck it without grads.
    args = cpu_sample(requires_grad=save, lead=(3, 5), width=24, hidden=40, fc1_bias=biases, fc2_bias=biases).args
    torch.library.opcheck(torch.ops.fastvit.ln_mlp_fwd.default, (*args, 1e-5, "tanh", True, save))


def test_ln_mlp_bwd_passes_opcheck():
    args = cpu_sample(lead=(3, 5), width=24, hidden=40).args
    _, mean, rstd, pre = torch.ops.fastvit.ln_mlp_fwd(*args, 1e-6, "none", True, True)
    x, ln_w, ln_b, w1, _b1, w2, _b2 = args
    grad_out = torch.randn_like(x)
    for det in (False, True):
        torch.library.opcheck(
            torch.ops.fastvit.ln_mlp_bwd.default, (grad_out, x, ln_w, ln_b, mean, rstd, w1, pre, w2, "none", True, det)
        )


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_compiles_fullgraph_with_backward(approximate):
    sample = cpu_sample(requires_grad=True, lead=(3, 5), width=24, hidden=40).with_kwargs(approximate=approximate)
    compiled = torch.compile(LN_MLP.as_function(sample, "cuda"), fullgraph=True, backend="aot_eager")
    out = compiled(*sample.args)
    expected = LN_MLP.call(sample, REFERENCE)
    torch.testing.assert_close(out, expected, **dtype_tols(torch.float32))
    grads = torch.autograd.grad(out.square().sum(), sample.args)
    expected_grads = torch.autograd.grad(expected.square().sum(), sample.args)
    for name, got, want in zip(sample.tensors, grads, expected_grads):
        torch.testing.assert_close(got, want, **dtype_tols(torch.float32), msg=f"d{name}")


# ------------------------------------------------------------------------------------------------
# Bad inputs: clear errors before any kernel runs


def _fwd(args, eps=1e-6, approximate="none"):
    return torch.ops.fastvit.ln_mlp_fwd(*args, eps, approximate, True, True)


def _replace(args, index, value):
    args = list(args)
    args[index] = value
    return args


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda a: _replace(a, 1, a[1][:-1]), ValueError, "ln_weight must have shape"),
        (lambda a: _replace(a, 2, a[2][:-1]), ValueError, "ln_bias must have shape"),
        (lambda a: _replace(a, 3, a[3][:, :-1]), ValueError, "fc1_weight must have shape"),
        (lambda a: _replace(a, 3, a[3][0]), ValueError, "fc1_weight must be 2-D"),
        (lambda a: _replace(a, 4, a[4][:-1]), ValueError, "fc1_bias must have shape"),
        (lambda a: _replace(a, 5, a[5][:, :-1]), ValueError, "fc2_weight must have shape"),
        (lambda a: _replace(a, 5, a[5].t()), ValueError, "fc2_weight must have shape"),
        (lambda a: _replace(a, 6, a[6][:-1]), ValueError, "fc2_bias must have shape"),
        (lambda a: _replace(a, 3, a[3].double()), TypeError, "fc1_weight must have the dtype of x"),
        (lambda a: _replace(a, 6, a[6].half()), TypeError, "fc2_bias must have the dtype of x"),
        (lambda a: _replace(a, 0, a[0].int()), TypeError, "x must be float16, bfloat16, float32 or float64"),
        (lambda a: _replace(a, 0, a[0][..., :0]), ValueError, "must be > 0"),
    ],
)
def test_fwd_rejects_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        _fwd(make(cpu_sample(lead=(2, 3), width=8, hidden=16).args))


@pytest.mark.parametrize("eps", [0.0, -1e-6, float("nan"), float("inf")])
def test_fwd_rejects_non_positive_eps(eps):
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        _fwd(cpu_sample(lead=(2, 3), width=8, hidden=16).args, eps=eps)


def test_fwd_rejects_unknown_gelu_form():
    with pytest.raises(ValueError, match="act must be 'gelu' \\(or 'none'"):
        _fwd(cpu_sample(lead=(2, 3), width=8, hidden=16).args, approximate="sigmoid")


def test_bwd_rejects_bad_arguments():
    args = cpu_sample(lead=(2, 3), width=8, hidden=16).args
    _, mean, rstd, pre = _fwd(args)
    x, ln_w, ln_b, w1, _b1, w2, _b2 = args
    dy = torch.randn_like(x)

    def bwd(dy=dy, mean=mean, rstd=rstd, pre=pre):
        return torch.ops.fastvit.ln_mlp_bwd(dy, x, ln_w, ln_b, mean, rstd, w1, pre, w2, "none", True, False)

    with pytest.raises(ValueError, match="save_for_backward=False"):
        bwd(pre=torch.empty(0))
    with pytest.raises(ValueError, match="grad_out must have shape"):
        bwd(dy=dy[:1])
    with pytest.raises(TypeError, match="mean must be Float"):
        bwd(mean=mean.double())
    with pytest.raises(ValueError, match="pre_act must have shape"):
        bwd(pre=pre[..., :-1])
    with pytest.raises(TypeError, match="grad_out must have the dtype of x"):
        bwd(dy=dy.double())


def test_public_op_rejects_mixed_dtypes_on_the_cuda_backend():
    x, *params = cpu_sample(lead=(2, 3), width=8, hidden=16).args
    with pytest.raises(TypeError, match="one dtype"):
        ops.ln_mlp(x.double(), *params, backend="cuda")


# ------------------------------------------------------------------------------------------------
# The hidden-layer norm (timm's scale_mlp_norm, EVA02's SwiGLU sub-LN) on the C++ path: the norm kernels over the
# activation, the backward through them (the norm's weight / bias gradients), recomputed statistics


HIDDEN_SHAPE = dict(lead=(2, 7), width=24, hidden=37)  # odd hidden width: no 16-byte packs in the hidden norm


def hidden_norm_sample(dtype=torch.float32, act="gelu", norm="layer", layer_scale=False, **shape):
    return cpu_sample(dtype, **{**HIDDEN_SHAPE, **shape}, act=act, norm=norm, hidden_norm=True, layer_scale=layer_scale)


def hidden_norm_floor(dtype, layer_scale):
    """The error rule's floor: 1e-6 relative in fp32 (1e-3 in fp16/bf16, as test_cpu_half_precision...), plus, with
    LayerScale in fp16/bf16, one rounding at each tensor's scale: ops.ln_mlp folds gamma into fc2, so fc2's gradients
    are gamma·round(dyᵀh) rounded again where eager PyTorch rounds once."""
    base = relative_floor(1e-6 if dtype == torch.float32 else 1e-3)
    if not layer_scale or dtype.itemsize > 2:
        return base
    one_rounding = rounding_floor(1.0)
    return lambda cmp, exact: base(cmp, exact) + one_rounding(cmp, exact)


@pytest.mark.parametrize("layer_scale", [False, True], ids=["", "layer_scale"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_cpu_hidden_norm_forward_and_every_grad_within_torch_error(act, norm, residual, layer_scale):
    sample = hidden_norm_sample(act=act, norm=norm, layer_scale=layer_scale).with_kwargs(residual=residual)
    cmp = assert_matches_reference(
        LN_MLP, sample, "cuda", floor=hidden_norm_floor(torch.float32, layer_scale), name=f"{act} {norm} sub-norm"
    )
    grads = dict(zip(cmp.labels, cmp.ours))
    assert grads["grad hidden_norm_weight"] is not None
    assert (grads["grad hidden_norm_bias"] is None) == (norm == "rms")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("act, norm, layer_scale", [("swiglu", "layer", True), ("gelu_tanh", "rms", False)])
def test_cpu_hidden_norm_half_precision_within_torch_error(act, norm, layer_scale, dtype):
    sample = hidden_norm_sample(dtype, act=act, norm=norm, layer_scale=layer_scale)
    assert_matches_reference(LN_MLP, sample, "cuda", floor=hidden_norm_floor(dtype, layer_scale), name="sub-norm")


@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_cpu_hidden_norm_fp64_and_odd_shapes(norm):
    assert_matches_reference(LN_MLP, hidden_norm_sample(torch.float64, act="quick_gelu", norm=norm), "cuda")
    for lead, width, hidden in (((1,), 1, 1), ((1, 1), 7, 13), ((3,), 50, 8)):
        sample = hidden_norm_sample(act="swiglu", norm=norm, lead=lead, width=width, hidden=hidden)
        assert_matches_reference(LN_MLP, sample, "cuda", floor=relative_floor(1e-6), name=f"{lead}x{width}->{hidden}")


def test_cpu_hidden_layer_norm_without_bias_and_its_own_eps():
    sample = hidden_norm_sample(act="swiglu").replace(hidden_norm_bias=None).with_kwargs(hidden_norm_eps=0.5)
    cmp = assert_matches_reference(LN_MLP, sample, "cuda", floor=relative_floor(1e-6), name="no bias, eps 0.5")
    # eps 0.5 against the hidden layer's O(1) variance: a different result from the input norm's eps (the argument
    # reaches the kernel), and no bias gradient for the absent bias.
    default_eps = LN_MLP.call(sample.with_kwargs(hidden_norm_eps=None), "cuda")
    assert (cmp.ours[0] - default_eps).abs().max() > 1e-3
    assert dict(zip(cmp.labels, cmp.ours))["grad hidden_norm_bias"] is None


@pytest.mark.parametrize("act, norm", [("gelu", "layer"), ("swiglu", "rms"), ("gelu_tanh", "layer")])
def test_gradcheck_fp64_hidden_norm(act, norm):
    sample = cpu_sample(
        torch.float64, requires_grad=True, lead=(2, 3), width=5, hidden=6, act=act, norm=norm, hidden_norm=True,
        layer_scale=act == "swiglu",
    ).with_kwargs(eps=1e-5, hidden_norm_eps=1e-4)  # fmt: skip
    names = [n for n, t in sample.tensors.items() if t is not None]

    def fn(*tensors):
        return LN_MLP.call(sample.replace(**dict(zip(names, tensors))), "cuda")

    assert torch.autograd.gradcheck(fn, [sample.tensors[n] for n in names])


def test_hidden_norm_empty_batch_and_no_grad():
    out, *grads = LN_MLP.run(hidden_norm_sample(lead=(0, 5)), "cuda")
    assert out.shape == (0, 5, 24) and grads[0].shape == (0, 5, 24)
    assert all(g is not None and g.abs().sum() == 0 for g in grads[1:] if g is not None)
    sample = hidden_norm_sample(act="swiglu")
    with_grad = LN_MLP.run(sample, "cuda")[0]
    with torch.no_grad():  # the inference form (no pre-activation kept): the same values
        torch.testing.assert_close(LN_MLP.call(sample, "cuda"), with_grad, rtol=0, atol=0)


def _hidden_norm_ext_args(rms: bool, requires_grad=False):
    """The positional arguments of ln_mlp_fwd before ``eps``, and the hidden norm's (weight, bias) after ``rms``."""
    tensors = hidden_norm_sample(act="swiglu", norm="rms" if rms else "layer", lead=(3, 5), width=24, hidden=20)
    tensors = tensors.map(lambda t: t.requires_grad_(requires_grad)).tensors
    return [tensors[n] for n in LN_MLP.arg_names], [tensors["hidden_norm_weight"], tensors["hidden_norm_bias"]]


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_hidden_norm_ops_pass_opcheck(rms):
    args, hidden_norm = _hidden_norm_ext_args(rms, requires_grad=True)
    torch.library.opcheck(
        torch.ops.fastvit.ln_mlp_fwd.default, (*args, 1e-5, "swiglu", True, True, rms, *hidden_norm, 1e-4)
    )
    args = [None if t is None else t.detach() for t in args]
    hidden_norm = [None if t is None else t.detach() for t in hidden_norm]
    _, mean, rstd, pre = torch.ops.fastvit.ln_mlp_fwd(*args, 1e-5, "swiglu", True, True, rms, *hidden_norm, 1e-4)
    x, ln_w, ln_b, w1, _b1, w2, _b2 = args
    for det in (False, True):
        torch.library.opcheck(
            torch.ops.fastvit.ln_mlp_bwd.default,
            (torch.randn_like(x), x, ln_w, ln_b, mean, rstd, w1, pre, w2, "swiglu", True, det, rms, *hidden_norm, 1e-4),
        )


def test_ln_mlp_bwd_without_hidden_norm_returns_empty_hidden_norm_grads():
    args = cpu_sample(lead=(2, 3), width=8, hidden=16).args
    _, mean, rstd, pre = _fwd(args)
    x, ln_w, ln_b, w1, _b1, w2, _b2 = args
    dy = torch.randn_like(x)
    grads = torch.ops.fastvit.ln_mlp_bwd(dy, x, ln_w, ln_b, mean, rstd, w1, pre, w2, "none", True, False)
    assert len(grads) == 9 and grads[7].shape == grads[8].shape == (0,)


def test_hidden_norm_compiles_fullgraph_with_backward():
    sample = hidden_norm_sample(act="swiglu", layer_scale=True).map(lambda t: t.requires_grad_())
    assert_compiles_with_backward(LN_MLP, sample, "cuda")


def test_hidden_norm_bad_arguments():
    args, (hn_w, hn_b) = _hidden_norm_ext_args(rms=False)
    rms_args, (rms_w, _) = _hidden_norm_ext_args(rms=True)

    def fwd(args=args, hn_w=hn_w, hn_b=hn_b, heps=1e-6, rms=False):
        return torch.ops.fastvit.ln_mlp_fwd(*args, 1e-6, "swiglu", True, True, rms, hn_w, hn_b, heps)

    with pytest.raises(ValueError, match="hidden_norm_weight must have shape"):
        fwd(hn_w=hn_w[:-1])
    with pytest.raises(ValueError, match="hidden_norm_bias must have shape"):
        fwd(hn_b=hn_b[:-1])
    with pytest.raises(ValueError, match="hidden_norm_bias given without hidden_norm_weight"):
        fwd(hn_w=None)
    with pytest.raises(ValueError, match="hidden_norm_bias must be None with rms=True"):
        fwd(args=rms_args, hn_w=rms_w, rms=True)
    with pytest.raises(TypeError, match="hidden_norm_weight must have the dtype of x"):
        fwd(hn_w=hn_w.double())
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="hidden_norm_eps must be a positive finite number"):
            fwd(heps=eps)
    _, mean, rstd, pre = fwd()
    x, ln_w, ln_b, w1, _b1, w2, _b2 = args
    with pytest.raises(ValueError, match="hidden_norm_weight must have shape"):
        torch.ops.fastvit.ln_mlp_bwd(
            torch.randn_like(x), x, ln_w, ln_b, mean, rstd, w1, pre, w2, "swiglu", True, False, False, hn_w[:-1], hn_b
        )


def test_eva02_mlp_half_with_its_sub_ln_is_fused_and_equals_the_module_path(pretend_gpu):
    """EVA02 (SwiGLU with a LayerNorm over the hidden layer): the MLP half is one ops.ln_mlp call on the extension
    (its C++ twin here; the CUDA kernels on a GPU: the report for CUDA inputs, with the GPU pretended), and equals the
    modules, output and every parameter gradient."""
    torch.manual_seed(0)
    model = fastvit.create_model("eva02_base_patch14_448", depth=1, embed_dim=48, num_heads=2, img_size=28)
    with torch.no_grad():  # zero biases and unit norms at init: make every path count
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    model = model.eval().set_backend({"ln_mlp": "cuda"})
    assert not isinstance(model.blocks[0].mlp.norm, nn.Identity)  # the sub-LN is there
    for device, dtype in (("cpu", torch.float32), ("cpu", torch.bfloat16), ("cuda", torch.bfloat16)):
        mlp_half = model.fusion_report(device, dtype)[0]["mlp"]
        assert mlp_half.fused and mlp_half.backends == {"ln_mlp": "cuda"}, str(mlp_half)
    modules = copy.deepcopy(model)
    for block in modules.blocks:  # a replaced forward: what the fusion rule never bypasses
        block.mlp.forward = block.mlp.forward
    assert not modules.fusion_report("cpu")[0]["mlp"].fused
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for m in (model, modules):
        out = m(x)
        outs.append(out)
        names, params = zip(*m.named_parameters())
        grads.append(dict(zip(names, torch.autograd.grad(out.square().sum(), params))))
    torch.testing.assert_close(outs[0], outs[1], **dtype_tols(torch.float32))
    for name, got in grads[0].items():
        torch.testing.assert_close(got, grads[1][name], **dtype_tols(torch.float32), msg=name)


# ------------------------------------------------------------------------------------------------
# The LNMLP layer


def test_mlp_has_timm_keys_and_the_block_half_matches_the_unfused_modules():
    from timm.layers import Mlp as TimmMlp

    assert list(Mlp(24, 40).state_dict()) == list(TimmMlp(24, 40).state_dict())
    norm, mlp = LayerNorm(24), Mlp(24, 40)
    with torch.no_grad():
        for p in (*norm.parameters(), *mlp.parameters()):
            p.normal_()
    x = torch.randn(2, 7, 24)
    assert next(mlp_blockers(norm, mlp, mlp.norm, training=False), None) is None
    fused = ops.ln_mlp(
        x, norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, backend="cuda"
    )
    torch.testing.assert_close(fused, x + mlp(norm(x)), **dtype_tols(torch.float32))


def test_lnmlp_owns_its_norm():
    layer = LNMLP(24, 40)
    assert sorted(layer.state_dict()) == [
        "fc1.bias",
        "fc1.weight",
        "fc2.bias",
        "fc2.weight",
        "norm.bias",
        "norm.weight",
    ]
    x = torch.randn(2, 5, 24)
    expected = x + layer.fc2(layer.act(layer.fc1(layer.norm(x))))
    layer.backend = "cuda"
    torch.testing.assert_close(layer(x), expected, **dtype_tols(torch.float32))
    torch.testing.assert_close(layer(x, residual=False), expected - x, **dtype_tols(torch.float32))


def test_lnmlp_unfused_paths():
    layer = LNMLP(16, 32, act_layer=nn.ReLU)  # not a GELU: unfused
    assert "mlp.act is a ReLU" in next(mlp_blockers(layer.norm, layer, nn.Identity(), layer.training))
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), x + layer.fc2(torch.relu(layer.fc1(layer.norm(x)))))
    dropping = LNMLP(16, 32, drop=0.5).train()  # dropout while training: unfused; eval: fused
    assert "MLP dropout is active" in next(mlp_blockers(dropping.norm, dropping, nn.Identity(), True))
    dropping.eval()
    assert next(mlp_blockers(dropping.norm, dropping, nn.Identity(), False), None) is None
    torch.testing.assert_close(dropping(x), x + dropping.fc2(dropping.act(dropping.fc1(dropping.norm(x)))))


# ------------------------------------------------------------------------------------------------
# GPU: the CUDA path (LN kernels, cuBLASLt epilogues, GELU kernels)


def _gpu_case(lead, width, hidden, dtype, approximate, residual=True, biases=True):
    sample = gpu_sample(dtype, lead=lead, width=width, hidden=hidden, fc1_bias=biases, fc2_bias=biases)
    floor = 1e-6 if dtype == torch.float32 else 0.0
    check_against_reference(sample, approximate, residual, floor_rel=floor, label=f"cuda {width}->{hidden}")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("width", [192, 384, 768, 1024, 1280])
def test_gpu_forward_and_grads(width, dtype, approximate, no_tf32):
    _gpu_case((2, 197), width, 4 * width, dtype, approximate)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gpu_odd_shapes_biases_none_and_no_residual(dtype, approximate, no_tf32):
    # hidden % 8 != 0 (no GELU epilogue), width not a multiple of 8 (no 16-byte packs), 1 and 7 tokens.
    _gpu_case((7,), 100, 300, dtype, approximate, residual=False, biases=False)
    _gpu_case((1, 1), 24, 37, dtype, approximate)
    _gpu_case((3, 7), 192, 768, dtype, approximate, biases=False)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gpu_large_batch_bf16(approximate):
    _gpu_case((64, 197), 768, 3072, torch.bfloat16, approximate)


@needs_cuda
@pytest.mark.gpu
def test_gpu_inference_path_and_autocast():
    inputs = gpu_sample(lead=(8, 197), width=384, hidden=1536).args
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = ops.ln_mlp(*inputs, backend="cuda")
        expected = ops.ln_mlp(*inputs, backend="torch")
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, **dtype_tols(torch.bfloat16))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act, norm", [("swiglu", "layer"), ("gelu", "rms"), ("gelu_tanh", "layer")])
@pytest.mark.parametrize("lead, width, hidden", [((2, 197), 192, 512), ((1, 7), 24, 37)])
def test_gpu_hidden_norm(act, norm, dtype, lead, width, hidden, no_tf32):
    """The CUDA path with a hidden norm: the norm kernel over the activation, its backward kernels, the act backward
    kernel in place of the DGELU epilogue (gelu_tanh); 16-byte packs (hidden 512) and scalar ones (hidden 37)."""
    for layer_scale in (False, True):
        sample = gpu_sample(dtype, lead=lead, width=width, hidden=hidden, act=act, norm=norm, hidden_norm=True,
                            layer_scale=layer_scale)  # fmt: skip
        floor = hidden_norm_floor(dtype, layer_scale) if dtype != torch.float32 else relative_floor(1e-6)
        assert_matches_reference(LN_MLP, sample, "cuda", floor=floor, name=f"cuda sub-norm {act} {norm}")
    with torch.no_grad():  # the inference form: no pre-activation kept (SwiGLU: a scratch one)
        torch.testing.assert_close(LN_MLP.call(sample, "cuda"), LN_MLP.call(sample, "torch"), **dtype_tols(dtype))


@needs_cuda
@pytest.mark.gpu
def test_gpu_hidden_norm_deterministic_backward_is_bit_identical():
    sample = gpu_sample(torch.bfloat16, lead=(4, 197), width=192, hidden=512, act="swiglu", hidden_norm=True)
    assert_deterministic_runs_are_bit_identical(LN_MLP, sample, "cuda")


@needs_cuda
@pytest.mark.gpu
def test_gpu_eva02_mlp_half_fused_on_auto():
    model = fastvit.create_model("eva02_base_patch14_448", depth=1, embed_dim=64, num_heads=2, img_size=28)
    report = model.cuda().eval().set_backend("auto").fusion_report("cuda", torch.bfloat16)
    assert report[0]["mlp"].fused, str(report)
