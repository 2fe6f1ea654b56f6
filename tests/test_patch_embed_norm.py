"""The patch embedding with a norm of its patch tokens (``ops.patch_embed(..., norm_weight=...)``: AIMv2's RMSNorm,
or a LayerNorm), Triton vs the fp64 reference: forward and every gradient, the two-pass full-row epilogue over
several (ragged) D tiles, the custom ops, torch.compile, bad inputs, the model's one-call path and its fusion report.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: tiny shapes (D <= 72, <= 7 patches an image),
bfloat16 and the AIMv2-L shapes are GPU tests. Accuracy rule (flash-attention's, ``op_cases.assert_matches_reference``):
max|ours - ref64| <= 2 x max|reference in the same dtype - ref64| + the fp32 noise floor.
"""

from __future__ import annotations

import importlib
from functools import partial

import pytest
import torch

import fastvit
from fastvit import dispatch
from fastvit.layers import LayerNorm, RmsNorm
from fastvit.ops.triton import launch
from fastvit.ops.triton.linear_launch import NORM_CODES

from op_cases import PATCH_EMBED, assert_compiled_gradients_equal_eager, assert_matches_reference
from utils import DEVICE, TINY, needs_cuda, triton_skip_reason

pe_ops = importlib.import_module("fastvit.ops.patch_embed")  # the module; fastvit.ops.patch_embed is the function
if triton_skip_reason() is not None:
    pytest.skip(triton_skip_reason(), allow_module_level=True)
pe_triton = importlib.import_module("fastvit.ops.triton.patch_embed")

# 16-wide D tiles: D = 40 is three tiles, the last one ragged (the two-pass loop with a masked tail).
TINY_NORM_TILES = {"fwd_norm": dict(BLOCK_R=16, BLOCK_C=16, BLOCK_RED=16)}

CASES = {
    # shape options of op_cases.PATCH_EMBED (x [2, Cin, 4·GH, 4·GW], 4x4 patches) and the tiles
    "rms-cls-pos-3tiles": (dict(grid=(2, 3), prefix=1, dim=40, norm="rms"), TINY_NORM_TILES),
    "layer-bias-reg3-noembedclass": (dict(grid=(2, 3), prefix=3, pos="patch", dim=40, norm="layer"), TINY_NORM_TILES),
    "layer-nonormbias-noconvbias-noprefix-nopos": (
        dict(grid=(1, 3), prefix=0, pos=None, bias=False, dim=24, norm="layer", norm_bias=False),
        {},
    ),
    "rms-d72-default-tiles-channels_last": (dict(grid=(2, 2), dim=72, norm="rms", channels_last=True), {}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype):
    shape, tiles = CASES[case]
    with pe_triton.forced_configs(tiles):
        assert_matches_reference(PATCH_EMBED, PATCH_EMBED.make(dtype, **shape), "triton", name=case)


def test_fp32_within_design_tolerance():
    # DESIGN numerics rule: fp32 within ~1e-5 relative of fp64, output and every gradient (tf32 off).
    sample = PATCH_EMBED.make(grid=(2, 3), dim=40, norm="layer")
    with pe_triton.forced_configs(TINY_NORM_TILES):
        ours = PATCH_EMBED.run(sample, "triton")
    exact = PATCH_EMBED.run(PATCH_EMBED.make(torch.float64, grid=(2, 3), dim=40, norm="layer"), None)
    for label, mine, ref in zip(PATCH_EMBED.labels(sample), ours, exact):
        error = (mine.double() - ref).abs().max().item() / ref.abs().max().item()
        assert error < 1e-5, f"{label}: relative error {error:.2e}"


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output starts as NaN: an element a kernel fails to write shows up as non-finite."""

    def new_output(shape, dtype, device, memory_format=torch.contiguous_format):
        return torch.full(shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=memory_format)

    monkeypatch.setattr(launch, "new_output", new_output)


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_inference_in_place_equals_training_and_every_element_is_written(kind, poisoned):
    # Inference keeps z in the output rows (no z buffer), training in its own buffer: the same tokens, bit for bit.
    sample = PATCH_EMBED.make(grid=(2, 3), prefix=3, dim=40, norm=kind)
    with pe_triton.forced_configs(TINY_NORM_TILES):
        trained = PATCH_EMBED.run(sample, "triton")
        with torch.no_grad():
            inferred = PATCH_EMBED.call(sample, "triton")
    assert all(t is None or torch.isfinite(t).all() for t in trained)
    assert torch.equal(inferred, trained[0])


def test_saved_statistics_and_z_are_the_norms():
    x, w, b, pos, cls, norm_weight, norm_bias = PATCH_EMBED.make(grid=(2, 3), dim=40, norm="layer").args
    with pe_triton.forced_configs(TINY_NORM_TILES):
        out, z, mean, rstd = torch.ops.fastvit.patch_embed_norm_fwd(
            x, w, b, pos, cls, None, None, norm_weight, norm_bias, 1e-5, NORM_CODES["layer"], True
        )
    expected_z = fastvit.ops.patch_embed(x, w, b, backend="torch")  # the projection alone [B, N, D]
    torch.testing.assert_close(z, expected_z, atol=1e-5, rtol=1e-5)
    flat = z.double().flatten(0, 1)
    torch.testing.assert_close(mean.double(), flat.mean(-1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), (flat.var(-1, unbiased=False) + 1e-5).rsqrt(), atol=1e-5, rtol=1e-5)
    assert out.shape == (2, 7, 40) and z.shape == (2, 6, 40) and mean.shape == rstd.shape == (12,)


def test_layer_norm_statistics_of_rows_far_from_zero():
    # A large common offset (conv bias 300 against unit-scale features): the centred sums keep the variance exact
    # where Σz² / D - mean² would cancel catastrophically in fp32.
    sample = PATCH_EMBED.make(grid=(2, 3), dim=40, norm="layer")
    sample.tensors["bias"] = sample.tensors["bias"] + 300.0
    with pe_triton.forced_configs(TINY_NORM_TILES):
        assert_matches_reference(PATCH_EMBED, sample, "triton", name="offset 300")


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_two_runs_bit_identical_in_deterministic_mode(kind):
    sample = PATCH_EMBED.make(grid=(2, 3), prefix=1, dim=40, norm=kind)
    tiles = {**TINY_NORM_TILES, "bwd_weight": dict(BLOCK_D=16, BLOCK_K=16, BLOCK_M=16, split=3)}
    fastvit.set_deterministic(True)
    try:
        with pe_triton.forced_configs(tiles):
            first, second = PATCH_EMBED.run(sample, "triton"), PATCH_EMBED.run(sample, "triton")
    finally:
        fastvit.set_deterministic(False)
    for label, a, b in zip(PATCH_EMBED.labels(sample), first, second):
        assert (a is None and b is None) or torch.equal(a, b), label


def test_uint8_images_with_a_norm():
    images = torch.randint(0, 256, (2, 8, 12, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    _, w, b, pos, cls, norm_weight = PATCH_EMBED.make(grid=(2, 3), dim=40, norm="rms").args[:6]
    kwargs = dict(norm_weight=norm_weight, norm="rms", norm_eps=1e-5)
    with pe_triton.forced_configs(TINY_NORM_TILES):
        ours = pe_ops.patch_embed_uint8(images, w, b, pos, cls, backend="triton", **kwargs)
    expected = pe_ops.patch_embed_uint8(images, w, b, pos, cls, backend="torch", **kwargs)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_opcheck_and_compiled_gradients():
    sample = PATCH_EMBED.make(grid=(2, 3), prefix=1, dim=40, norm="layer")
    x, w, b, pos, cls, norm_weight, norm_bias = sample.args
    layer = NORM_CODES["layer"]
    with pe_triton.forced_configs(TINY_NORM_TILES):
        for save in (True, False):
            args = (x, w, b, pos, cls, None, None, norm_weight, norm_bias, 1e-5, layer, save)
            args = [t.detach().requires_grad_(save) if isinstance(t, torch.Tensor) else t for t in args]
            torch.library.opcheck(torch.ops.fastvit.patch_embed_norm_fwd.default, args)
        _, z, mean, rstd = torch.ops.fastvit.patch_embed_norm_fwd(*args[:-1], True)
        grad = torch.randn(2, 7, 40, device=DEVICE)
        torch.library.opcheck(
            torch.ops.fastvit.patch_embed_norm_bwd.default, (grad, z, mean, rstd, norm_weight, layer, True)
        )

        def step(*tensors):
            out = fastvit.ops.patch_embed(*tensors[:5], backend="triton", norm_weight=tensors[5], norm_bias=tensors[6])
            return out.square().sum()

        assert_compiled_gradients_equal_eager(step, list(sample.args))


@pytest.mark.parametrize("layout", ["batch-rows-of-a-bigger-buffer", "expanded", "transposed"])
def test_backward_reads_the_gradient_through_its_strides(layout):
    # The norm's backward reads dY's patch rows in place (one batch stride, one row stride, one column stride; the
    # prefix row before them): any layout gives the bits of a contiguous dY.
    x, w, b, pos, cls, norm_weight, norm_bias = PATCH_EMBED.make(grid=(2, 3), prefix=1, dim=40, norm="layer").args
    layer = NORM_CODES["layer"]
    with pe_triton.forced_configs(TINY_NORM_TILES):
        _, z, mean, rstd = torch.ops.fastvit.patch_embed_norm_fwd(
            x, w, b, pos, cls, None, None, norm_weight, norm_bias, 1e-5, layer, True
        )
        grad = {
            "batch-rows-of-a-bigger-buffer": lambda: torch.randn(3, 9, 40, device=DEVICE)[::2, 1:8],
            "expanded": lambda: torch.randn(1, 1, 40, device=DEVICE).expand(2, 7, 40),  # dY of a .sum(): stride 0
            "transposed": lambda: torch.randn(2, 40, 7, device=DEVICE).transpose(1, 2),
        }[layout]()
        assert not grad.is_contiguous()
        strided = torch.ops.fastvit.patch_embed_norm_bwd(grad, z, mean, rstd, norm_weight, layer, True)
        dense = torch.ops.fastvit.patch_embed_norm_bwd(grad.contiguous(), z, mean, rstd, norm_weight, layer, True)
    for got, want in zip(strided, dense):
        assert torch.equal(got, want)


@pytest.mark.parametrize("layout", ["every-other-element", "expanded"])
def test_a_norm_weight_view_gets_the_gradients_of_its_dense_copy(layout):
    # The norm's backward reads the weight at unit stride: a strided or expanded view must answer as its copy.
    x, w, b, pos, cls, _, norm_bias = PATCH_EMBED.make(grid=(2, 3), prefix=1, dim=40, norm="layer").args
    base = torch.randn(80 if layout == "every-other-element" else 1, device=DEVICE) + 1.0
    view = base[::2] if layout == "every-other-element" else base.expand(40)
    runs = []
    with pe_triton.forced_configs(TINY_NORM_TILES):
        for norm_weight in (view, view.contiguous()):
            inputs = [t.detach().clone().requires_grad_() for t in (x, w, b)]
            out = fastvit.ops.patch_embed(
                *inputs, pos, cls, backend="triton", norm_weight=norm_weight, norm_bias=norm_bias
            )
            out.square().sum().backward()
            runs.append([out.detach()] + [t.grad for t in inputs])
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_position_and_prefix_gradients_alone_save_no_pre_norm_tokens(monkeypatch):
    # pos_embed's and the prefix tokens' gradients are column sums of dY: the forward keeps no z for them.
    x, w, b, pos, cls, norm_weight, norm_bias = PATCH_EMBED.make(grid=(2, 3), prefix=1, dim=40, norm="layer").args
    saved = []
    real = torch.ops.fastvit.patch_embed_norm_fwd

    def recording(*args):
        saved.append(args[-1])
        return real(*args)

    monkeypatch.setattr(pe_triton.torch.ops.fastvit, "patch_embed_norm_fwd", recording, raising=False)
    grads = []
    with pe_triton.forced_configs(TINY_NORM_TILES):
        for through_norm in (False, True):
            leaves = [t.detach().clone().requires_grad_() for t in (pos, cls)]
            x_in = x.detach().clone().requires_grad_(through_norm)
            out = fastvit.ops.patch_embed(
                x_in, w, b, *leaves, backend="triton", norm_weight=norm_weight, norm_bias=norm_bias
            )
            out.square().sum().backward()
            grads.append([t.grad for t in leaves])
    assert saved == [False, True]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_a_torch_layernorm_in_another_dtype_runs_as_a_module():
    # fp32 norm parameters on a half-precision projection (mixed-precision recipes keep norms in fp32): torch's
    # LayerNorm takes them, the fused op does not outside autocast: the module path runs, and the report says why.
    from fastvit.layers import PatchEmbed, patch_embed_blockers

    embed = PatchEmbed(img_size=16, patch_size=4, in_chans=3, embed_dim=24, norm_layer=torch.nn.LayerNorm).to(DEVICE)
    embed.proj.half()
    embed.backend = "triton"
    assert any("outside autocast" in why for why in patch_embed_blockers(embed)), patch_embed_blockers(embed)
    images = torch.randn(2, 3, 16, 16, device=DEVICE, dtype=torch.float16)
    expected = embed.norm(embed.proj(images).flatten(2).transpose(1, 2))
    torch.testing.assert_close(embed(images), expected, atol=0, rtol=0)
    embed.norm.half()
    assert not patch_embed_blockers(embed)


def _bad_input_cases():
    x, w, b, pos, cls, norm_weight, norm_bias = PATCH_EMBED.make(dim=16, norm="layer", device="cpu").args

    def call(**kwargs):
        return lambda: fastvit.ops.patch_embed(x, w, b, pos, cls, backend="triton", **kwargs)

    return [
        (call(norm_weight=norm_weight[:8]), ValueError, "norm_weight must have shape"),
        (call(norm_weight=norm_weight[None]), ValueError, "norm_weight"),
        (call(norm_weight=norm_weight, norm_bias=norm_bias[:3]), ValueError, "norm_bias must have shape"),
        (call(norm_weight=norm_weight.half()), TypeError, "norm_weight torch.float16"),
        (call(norm_weight=norm_weight.to("meta")), ValueError, "norm_weight on meta"),
        (call(norm_weight=norm_weight, norm="batch"), ValueError, "norm must be one of"),
        (call(norm_weight=norm_weight, norm_bias=norm_bias, norm="rms"), ValueError, "norm_bias must be None"),
        (call(norm_bias=norm_bias), ValueError, "norm_bias given without norm_weight"),
        (call(norm_weight=norm_weight, norm_eps=0.0), ValueError, "norm_eps must be a positive"),
        (call(norm_weight=[1.0] * 16), TypeError, "norm_weight must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_input_cases())))
def test_bad_inputs(index):
    call, error, message = _bad_input_cases()[index]
    with pytest.raises(error, match=message):
        call()


# ------------------------------------------------------------------------------------------------
# The model: AIMv2's embed_norm_layer inside the one ops.patch_embed call, and the fusion report


AIMV2_NORM = partial(RmsNorm, eps=1e-5)  # model.py's aimv2 embed_norm_layer


def _aimv2_tiny(norm_layer=AIMV2_NORM, **kwargs):
    torch.manual_seed(0)
    model = fastvit.VisionTransformer(
        **{**TINY, "embed_dim": 72, "depth": 1}, embed_norm_layer=norm_layer, backend="torch", **kwargs
    )
    with torch.no_grad():
        model.patch_embed.norm.weight.normal_(1.0, 0.2)
    return model


@pytest.mark.parametrize("norm_layer", [AIMV2_NORM, LayerNorm], ids=["rms", "layer"])
def test_aimv2_style_model_on_triton_equals_its_torch_path(norm_layer):
    model = _aimv2_tiny(norm_layer).to(DEVICE)
    images = torch.randn(2, 3, 16, 16, device=DEVICE, generator=None)
    runs = []
    for backend in ("torch", "triton"):
        model.set_backend({"patch_embed": backend})
        model.zero_grad()
        out = model(images)
        out.square().sum().backward()
        runs.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref_out, ref_grads), (out, grads) = runs
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    assert set(grads) == set(ref_grads) and "patch_embed.norm.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_fusion_report_shows_the_patch_embedding():
    model = _aimv2_tiny()
    model.set_backend({"patch_embed": "triton"})
    report = model.fusion_report(DEVICE)
    assert report.embed.fused and report.embed.backends == {"patch_embed": "triton"}, str(report)
    assert str(report).splitlines()[0] == "patch_embed    fused (patch_embed=triton)"
    calls = []
    real = dispatch.select
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dispatch, "select", lambda op, *a: calls.append(op) or real(op, *a))
        model(torch.randn(1, 3, 16, 16, device=DEVICE))
    assert calls.count("patch_embed") == 1 and "rms_norm" not in calls  # the norm is inside the one call

    model.patch_embed.norm.register_forward_hook(lambda *args: None)  # no longer plain: conv, norm, then the rest
    report = model.fusion_report(DEVICE)
    assert not report.embed.fused and not report.all_fused
    assert "norm is a RmsNorm, not a plain LayerNorm / RmsNorm with a weight" in str(report)

    torch_model = _aimv2_tiny()
    assert "patch_embed: backend 'torch' was asked for" in str(torch_model.fusion_report("cpu").embed)


# ------------------------------------------------------------------------------------------------
# GPU only: AIMv2-L shapes (224 px, 14-pixel patches, D 1024: eight 128-wide D tiles a row) in bf16


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("batch", [1, 32])
def test_gpu_aimv2_large_shapes(batch, kind, dtype):
    sample = PATCH_EMBED.make(
        dtype, batch=batch, patch=(14, 14), grid=(16, 16), dim=1024, prefix=0, pos="all", norm=kind
    )
    assert_matches_reference(PATCH_EMBED, sample, "triton", name=f"aimv2-L B={batch} {kind}")


@pytest.mark.gpu
@needs_cuda
def test_gpu_aimv2_large_model_embedding_is_one_fused_call():
    model = fastvit.create_model("aimv2_large_patch14_224", depth=1, num_classes=0).cuda().bfloat16()
    model.set_backend({"patch_embed": "triton"})
    report = model.fusion_report("cuda", torch.bfloat16)
    assert report.embed.fused, str(report)
    images = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        fused = model.forward_features(images)
        model.set_backend({"patch_embed": "torch"})
        eager = model.forward_features(images)
    torch.testing.assert_close(fused.float(), eager.float(), atol=6e-2, rtol=6e-2)
