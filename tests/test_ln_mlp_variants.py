"""The MLP variants of ``ops.ln_mlp`` (issue 18, item 3) and ``ops.rms_norm``.

Variants: ``act`` gelu_tanh / quick_gelu / swiglu, ``norm='rms'``, bias-free norm and Linears, a hidden-layer norm
(sub-LN) and LayerScale. Each runs on every backend that covers it — ``torch``, ``cuda`` (on CPU tensors the
extension's C++ twin, through the same registration as the CUDA kernels), ``triton`` (every variant, under the
interpreter; its own suite is tests/test_triton_mlp.py) — against the fp64 reference with the flash-attention rule
(``op_cases.assert_matches_reference``: error <= 2x PyTorch's own error in the same dtype, plus a floor), output and
every gradient. Then gradcheck, opcheck, torch.compile, bad inputs, and tiny family models (DINOv2 giant, AIMv2,
SigLIP2, OpenAI CLIP) whose fused MLP equals the module path. GPU tests at the end run the CUDA kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch

import fastvit
from fastvit import dispatch, ops
from fastvit.layers import GluMlp, RmsNorm, SwiGLU, mlp_half_blockers
from fastvit.ops.ln_mlp import mlp_call

from op_cases import (
    LN_MLP,
    REFERENCE,
    RMS_NORM,
    assert_compiles_with_backward,
    assert_matches_reference,
    relative_floor,
    rounding_floor,
)
from utils import EXTENSION_DISABLED, dtype_tols, needs_cuda, needs_extension, triton_skip_reason

# Variant label -> LN_MLP shape options. Odd widths and hidden sizes; swiglu's fc1 has 2·hidden rows.
VARIANTS = {
    "gelu_tanh": dict(act="gelu_tanh"),
    "quick_gelu": dict(act="quick_gelu"),
    "swiglu": dict(act="swiglu"),
    "rms": dict(norm="rms"),
    "rms-swiglu-no-bias": dict(norm="rms", act="swiglu", fc1_bias=False, fc2_bias=False),
    "ln-no-bias-quick_gelu": dict(act="quick_gelu", ln_bias=False, fc1_bias=False),
    "layer_scale-gelu_tanh": dict(act="gelu_tanh", layer_scale=True),
    "layer_scale-rms-swiglu": dict(norm="rms", act="swiglu", layer_scale=True, fc2_bias=False),
}
HIDDEN_NORM_VARIANTS = {  # torch and the extension (tests/test_ln_mlp.py has the extension's hidden-norm tests)
    "sub-ln-swiglu": dict(act="swiglu", hidden_norm=True),
    "sub-rms-gelu-layer_scale": dict(norm="rms", hidden_norm=True, layer_scale=True),
}
SHAPE = dict(lead=(2, 7), width=24, hidden=37)
FLOORS = {torch.float32: 1e-6, torch.float64: 0.0, torch.float16: 1e-3, torch.bfloat16: 1e-3}  # as test_ln_mlp


def floor_for(variant: dict, dtype: torch.dtype):
    """The floor of the error rule: ``FLOORS``' relative one, plus, for LayerScale in fp16/bf16, one rounding at each
    tensor's scale: ops.ln_mlp folds gamma into fc2, so fc2's gradients are gamma·round(dyᵀh), rounded again, where
    eager PyTorch rounds once (a second rounding of each element, which the 2x factor alone does not cover)."""
    base = relative_floor(FLOORS[dtype])
    if not variant.get("layer_scale") or dtype.itemsize > 2:
        return base
    one_rounding = rounding_floor(1.0)
    return lambda cmp, exact: base(cmp, exact) + one_rounding(cmp, exact)


def check(variant: dict, backend: str, dtype=torch.float32, label="", **shape):
    sample = LN_MLP.make(dtype, "cpu", **{**SHAPE, **shape, **variant})
    return assert_matches_reference(LN_MLP, sample, backend, floor=floor_for(variant, dtype), name=label)


# ------------------------------------------------------------------------------------------------
# Accuracy: every variant x backend x dtype vs the fp64 reference, output and every gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("label", [*VARIANTS, *HIDDEN_NORM_VARIANTS])
def test_torch_backend_every_variant(label, dtype):
    check({**VARIANTS, **HIDDEN_NORM_VARIANTS}[label], "torch", dtype, label)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("label", [*VARIANTS, *HIDDEN_NORM_VARIANTS])
def test_cpp_twin_every_variant(label, dtype):
    check({**VARIANTS, **HIDDEN_NORM_VARIANTS}[label], "cuda", dtype, label)


@needs_extension
@pytest.mark.parametrize("label", ["swiglu", "rms-swiglu-no-bias", "quick_gelu"])
def test_cpp_twin_fp64_and_other_shapes(label):
    check(VARIANTS[label], "cuda", torch.float64, label)
    for lead, width, hidden in (((1,), 1, 1), ((1, 1), 7, 13), ((3,), 50, 8)):
        check(VARIANTS[label], "cuda", torch.float32, f"{label} {lead}x{width}->{hidden}", lead=lead, width=width,
              hidden=hidden)  # fmt: skip


@pytest.mark.skipif(triton_skip_reason() is not None or EXTENSION_DISABLED, reason="needs Triton and the extension")
@pytest.mark.parametrize("label", ["gelu_tanh", "layer_scale-gelu_tanh", "quick_gelu"])
def test_triton_backend_bias_free_norm_and_layer_scale(label):
    check({**VARIANTS[label], "ln_bias": False, "fc1_bias": False}, "triton", torch.float32, label, lead=(1, 5))


@pytest.mark.skipif(triton_skip_reason() is not None, reason="needs Triton")
@pytest.mark.parametrize("label", ["swiglu", "rms"])
def test_triton_backend_runs_swiglu_and_rms_norm(label):
    # Issue 23: the Triton GEMMs grew the RMSNorm prologue and the SwiGLU epilogue (every variant: test_triton_mlp.py).
    check(VARIANTS[label], "triton", torch.float32, label, lead=(1, 5))


def test_hidden_norm_is_taken_by_the_extension():
    variant = HIDDEN_NORM_VARIANTS["sub-ln-swiglu"]
    sample = LN_MLP.make(torch.float32, "cpu", **SHAPE, **variant)
    call = mlp_call(sample.tensors["x"], 24, 37, "swiglu", "layer", True)
    assert dispatch.explain("ln_mlp", "cuda", call) == ("cuda", None)
    torch.testing.assert_close(LN_MLP.call(sample, "auto"), LN_MLP.call(sample, REFERENCE))


def test_approximate_stays_an_alias_of_act():
    sample = LN_MLP.make(torch.float32, "cpu", **SHAPE)
    tanh = LN_MLP.call(sample.with_kwargs(approximate="tanh"), "torch")
    torch.testing.assert_close(tanh, LN_MLP.call(sample.with_kwargs(act="gelu_tanh"), "torch"), rtol=0, atol=0)
    torch.testing.assert_close(tanh, LN_MLP.call(sample.with_kwargs(act="gelu_tanh", approximate="tanh"), "torch"))


def test_split_swiglu_is_the_packed_layout_gate_first():
    """timm's SwiGLU (fc1_g, fc1_x) equals ln_mlp(act='swiglu') on cat([fc1_g, fc1_x]); GluMlp's gate_last=False too."""
    torch.manual_seed(0)
    split, packed = SwiGLU(24, 20, bias=True), GluMlp(24, 40, act_layer=torch.nn.SiLU, gate_last=False)
    x = torch.randn(3, 24)
    w1 = torch.cat([split.fc1_g.weight, split.fc1_x.weight])
    b1 = torch.cat([split.fc1_g.bias, split.fc1_x.bias])
    ones, zeros = torch.ones(24), torch.zeros(24)
    normed = torch.nn.functional.layer_norm(x, (24,), ones, zeros, 1e-6)
    fused = ops.ln_mlp(x, ones, zeros, w1, b1, split.fc2.weight, split.fc2.bias, residual=False, act="swiglu")
    torch.testing.assert_close(fused, split(normed), **dtype_tols(torch.float32))
    with torch.no_grad():
        packed.fc1.weight.copy_(w1), packed.fc1.bias.copy_(b1)
        packed.fc2.weight.copy_(split.fc2.weight), packed.fc2.bias.copy_(split.fc2.bias)
    torch.testing.assert_close(packed(normed), split(normed), **dtype_tols(torch.float32))


# ------------------------------------------------------------------------------------------------
# Registration: gradcheck, opcheck, torch.compile


@needs_extension
@pytest.mark.parametrize("label", ["swiglu", "rms-swiglu-no-bias", "quick_gelu", "layer_scale-gelu_tanh"])
def test_gradcheck_fp64(label):
    sample = LN_MLP.make(torch.float64, "cpu", requires_grad=True, lead=(2, 3), width=5, hidden=6, **VARIANTS[label])
    sample = sample.with_kwargs(eps=1e-5)
    args = tuple(t for t in sample.tensors.values())
    present = [t for t in args if t is not None]
    names = [n for n, t in sample.tensors.items() if t is not None]

    def fn(*tensors):
        return LN_MLP.as_function(sample, "cuda")(*[dict(zip(names, tensors)).get(n) for n in sample.tensors])

    assert torch.autograd.gradcheck(fn, present)


def _ext_args(act: str, rms: bool, requires_grad=False):
    variant = dict(act=act, norm="rms" if rms else "layer")
    return list(LN_MLP.make(torch.float32, "cpu", requires_grad=requires_grad, lead=(3, 5), width=24, hidden=20,
                            **variant).tensors.values())  # fmt: skip


@needs_extension
@pytest.mark.parametrize("act, rms", [("swiglu", True), ("quick_gelu", False), ("gelu_tanh", True)])
def test_extension_ops_pass_opcheck(act, rms):
    args = _ext_args(act, rms, requires_grad=True)
    torch.library.opcheck(torch.ops.fastvit.ln_mlp_fwd.default, (*args, 1e-5, act, True, True, rms))
    args = [None if t is None else t.detach() for t in args]
    _, mean, rstd, pre = torch.ops.fastvit.ln_mlp_fwd(*args, 1e-5, act, True, True, rms)
    x, ln_w, ln_b, w1, _b1, w2, _b2 = args
    torch.library.opcheck(
        torch.ops.fastvit.ln_mlp_bwd.default,
        (torch.randn_like(x), x, ln_w, ln_b, mean, rstd, w1, pre, w2, act, False, False, rms),
    )
    if rms:
        assert mean.abs().max() == 0  # RMSNorm: the mean is not subtracted (saved as 0)


@needs_extension
def test_compiles_fullgraph_with_backward():
    sample = LN_MLP.make(torch.float32, "cpu", requires_grad=True, **SHAPE, **VARIANTS["layer_scale-rms-swiglu"])
    assert_compiles_with_backward(LN_MLP, sample, "cuda")


# ------------------------------------------------------------------------------------------------
# Bad inputs: clear errors naming the parameter


def _public(**changes):
    tensors = dict(LN_MLP.make(torch.float32, "cpu", **SHAPE).tensors)
    kwargs = {k: changes.pop(k) for k in list(changes) if k not in tensors}
    tensors.update(changes)
    return ops.ln_mlp(**tensors, **kwargs, backend="torch")


@pytest.mark.parametrize(
    "changes, error, match",
    [
        (dict(act="relu"), ValueError, "act must be one of"),
        (dict(act="quick_gelu", approximate="tanh"), ValueError, "contradicts"),
        (dict(approximate="sigmoid"), ValueError, "approximate must be one of"),
        (dict(norm="batch"), ValueError, "norm must be one of"),
        (dict(norm="rms"), ValueError, "ln_bias must be None with norm='rms'"),
        (dict(act="swiglu"), ValueError, "fc1_weight must have an even number of rows|fc2_weight must have shape"),
        (dict(hidden_norm_bias=torch.zeros(37)), ValueError, "without hidden_norm_weight"),
        (dict(hidden_norm_weight=torch.ones(36)), ValueError, "hidden_norm_weight must have shape"),
        (dict(layer_scale=torch.ones(23)), ValueError, "layer_scale must have shape"),
        (dict(layer_scale=torch.ones(24, dtype=torch.float64)), TypeError, "dtype"),
    ],
)
def test_public_op_rejects_bad_variants(changes, error, match):
    with pytest.raises(error, match=match):
        _public(**changes)


@needs_extension
def test_extension_rejects_bad_variants():
    x, ln_w, ln_b, w1, b1, w2, b2 = _ext_args("gelu", False)
    fwd = torch.ops.fastvit.ln_mlp_fwd
    with pytest.raises(ValueError, match="act must be 'gelu'"):
        fwd(x, ln_w, ln_b, w1, b1, w2, b2, 1e-6, "relu", True, True)
    with pytest.raises(ValueError, match="ln_bias must be None with rms=True"):
        fwd(x, ln_w, ln_b, w1, b1, w2, b2, 1e-6, "gelu", True, True, True)
    with pytest.raises(ValueError, match="even number of rows"):
        fwd(x, ln_w, ln_b, w1[:-1], b1[:-1], w2, b2, 1e-6, "swiglu", True, True)
    with pytest.raises(ValueError, match="fc2_weight must have shape"):
        fwd(x, ln_w, ln_b, w1, b1, w2, b2, 1e-6, "swiglu", True, True)  # fc2 must be [C, hidden / 2]
    with pytest.raises(ValueError, match="bias must be None with rms=True"):
        torch.ops.fastvit.layer_norm_fwd(x, ln_w, ln_b, 1e-6, True)


# ------------------------------------------------------------------------------------------------
# ops.rms_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["torch", pytest.param("cuda", marks=needs_extension)])
def test_rms_norm_matches_the_reference(backend, dtype):
    for shape in (dict(), dict(lead=(1,), width=1), dict(lead=(7,), width=257)):
        sample = RMS_NORM.make(dtype, "cpu", **shape)
        assert_matches_reference(RMS_NORM, sample, backend, floor=relative_floor(FLOORS[dtype]), name=str(shape))


@needs_extension
def test_rms_norm_extension_opcheck_and_bad_inputs():
    x, w = RMS_NORM.make(torch.float32, "cpu", requires_grad=True).tensors.values()
    torch.library.opcheck(torch.ops.fastvit.layer_norm_fwd.default, (x, w, None, 1e-6, True))
    _, mean, rstd = torch.ops.fastvit.layer_norm_fwd(x.detach(), w.detach(), None, 1e-6, True)
    torch.library.opcheck(torch.ops.fastvit.layer_norm_bwd.default, (torch.randn_like(x), x.detach(), w.detach(),
                                                                        mean, rstd, True))  # fmt: skip
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.rms_norm(x, w[:-1], backend="cuda")
    with pytest.raises(ValueError, match="eps"):
        ops.rms_norm(x, w, eps=-1.0)


# ------------------------------------------------------------------------------------------------
# The layers: tiny family models, the fused MLP (C++ twin) equal to the module path

FAMILIES = {  # preset -> scaled-down size (depth 1); what the MLP half is
    "dinov2-giant": ("vit_giant_patch14_dinov2", dict(embed_dim=48, num_heads=2, img_size=28)),  # SwiGLUPacked + LS
    "aimv2": ("aimv2_large_patch14_224", dict(embed_dim=32, num_heads=2, img_size=28)),  # RmsNorm + split SwiGLU
    "siglip2": ("vit_so400m_patch16_siglip_256", dict(embed_dim=32, num_heads=2, img_size=32)),  # GELU tanh
    "clip-quickgelu": ("vit_base_patch32_clip_quickgelu_224", dict(embed_dim=32, num_heads=2, img_size=64)),
}


def _family(name: str) -> torch.nn.Module:
    preset, size = FAMILIES[name]
    torch.manual_seed(0)
    model = fastvit.create_model(preset, depth=1, num_classes=5, **size)
    with torch.no_grad():  # LayerScale 1e-5, zero biases: make every path count
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def _unfused(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose MLPs run as modules: a replaced ``forward`` is what the fusion rule never bypasses."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "mlp"):
            module.mlp.forward = module.mlp.forward
    return model


@needs_extension
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_fused_mlp_equals_the_module_path(name):
    model = _family(name).set_backend({"ln_mlp": "cuda"})
    for dtype in (torch.float32, torch.bfloat16):
        report = model.fusion_report("cpu", dtype)
        assert report[0]["mlp"].fused and report[0]["mlp"].backends == {"ln_mlp": "cuda"}, str(report)
    modules = _unfused(model)
    assert not modules.fusion_report("cpu")[0]["mlp"].fused
    if name == "aimv2":
        assert isinstance(model.blocks[0].norm2, RmsNorm) and isinstance(model.blocks[0].mlp, SwiGLU)
    x = torch.randn(2, 3, *model.patch_embed.img_size, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for m in (model, modules):
        m.zero_grad(set_to_none=True)
        out = m(x)
        out.square().sum().backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[0], outs[1], **dtype_tols(torch.float32))
    assert set(grads[0]) == set(grads[1])
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], **dtype_tols(torch.float32), msg=key)


def test_layer_scale_and_gated_mlps_no_longer_block_the_fused_half():
    model = _family("dinov2-giant")
    assert next(mlp_half_blockers(model.blocks[0]), None) is None
    glu_last = fastvit.ViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, mlp_layer=GluMlp)
    assert "gate_last=True" in " ".join(mlp_half_blockers(glu_last.blocks[0]))


# ------------------------------------------------------------------------------------------------
# GPU: the CUDA kernels (RMSNorm in the norm kernel, QuickGELU / SwiGLU elementwise kernels, tanh epilogue)


@needs_cuda
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("label", list(VARIANTS))
@pytest.mark.parametrize("lead, width, hidden", [((2, 197), 192, 768), ((1, 7), 24, 37)])
def test_gpu_every_variant(label, dtype, lead, width, hidden):
    sample = LN_MLP.make(dtype, "cuda", lead=lead, width=width, hidden=hidden, **VARIANTS[label])
    assert_matches_reference(LN_MLP, sample, "cuda", floor=floor_for(VARIANTS[label], dtype), name=label)
    with torch.no_grad():  # inference form (no pre-activation kept; SwiGLU uses a scratch one)
        torch.testing.assert_close(LN_MLP.call(sample, "cuda"), LN_MLP.call(sample, "torch"), **dtype_tols(dtype))


@needs_cuda
@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_rms_norm(dtype):
    for shape in (dict(lead=(394,), width=192), dict(lead=(3,), width=1280), dict(lead=(5,), width=7)):
        sample = RMS_NORM.make(dtype, "cuda", **shape)
        assert_matches_reference(RMS_NORM, sample, "cuda", floor=relative_floor(FLOORS[dtype]), name=str(shape))


@needs_cuda
@needs_extension
@pytest.mark.parametrize("name", list(FAMILIES))
def test_gpu_fusion_report_fuses_the_family_mlps_on_auto(name):
    model = _family(name).cuda().set_backend("auto")
    report = model.fusion_report("cuda", torch.bfloat16)
    assert report[0]["mlp"].fused, str(report)
