"""Every public entry point rejects bad input with a clear error naming the argument, its value and what was
expected, and handles awkward-but-valid input (empty batches, views, channels_last, aliasing) correctly.

Entry points: the model, every op in ``fastvit.ops`` on every backend that can run here (``torch``; ``triton``
through Triton's interpreter; ``cuda`` through the extension's C++ kernels), the converters and loaders, the
CLI and ``InferenceSession``.
"""

from __future__ import annotations

import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import fastvit
from fastvit import dispatch
from fastvit.ops.triton import launch
from fastvit.ops.triton.attention import SUPPORTED_HEAD_DIMS

from op_cases import OP_CASES, Sample, backend_params, fixed_grad, relayout
from utils import DEVICE, backend_skip_reason, triton_skip_reason

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=5)


@pytest.fixture(scope="module")
def model():
    return fastvit.ViT(**TINY).eval()


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(2, 3, 30, 32), ValueError, "must be 32x32 pixels \\(img_size\\), got 30x32"),
        (torch.randn(2, 1, 32, 32), ValueError, "must have 3 channels \\(in_chans\\)"),
        (torch.randn(3, 32, 32), ValueError, "4-D image batch"),
        (torch.randn(1, 2, 3, 32, 32), ValueError, "4-D image batch"),
        (
            torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8),
            TypeError,
            "floating-point image batch, got torch.uint8",
        ),
        (torch.ones(2, 3, 32, 32, dtype=torch.bool), TypeError, "floating-point"),
        (torch.randn(2, 3, 32, 32, dtype=torch.complex64), TypeError, "floating-point"),
        ([[1.0]], TypeError, "must be a torch.Tensor"),
    ],
)
def test_forward_rejects(model, x, error, match):
    with pytest.raises(error, match=match):
        model(x)


def test_dynamic_size_still_needs_divisible_sizes():
    model = fastvit.ViT(**TINY, dynamic_img_size=True)
    assert model(torch.randn(1, 3, 40, 24)).shape == (1, 5)
    with pytest.raises(ValueError, match="image size 30x32 is not divisible by the patch size 8x8"):
        model(torch.randn(1, 3, 30, 32))


def test_empty_batch_returns_empty_logits(model):
    # As PyTorch layers do: an empty batch is valid input and gives an empty output of the right shape.
    out = model(torch.randn(0, 3, 32, 32))
    assert out.shape == (0, 5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(img_size=6), "img_size 6x6 holds no 8x8 patch"),
        (dict(embed_dim=50), "embed_dim \\(50\\) must be divisible by num_heads \\(3\\)"),
        (dict(global_pool="prr"), "global_pool must be one of"),
        (dict(class_token=False), "global_pool='token' needs the class token"),
        (dict(drop_path_rate=1.5), "drop_path_rate must be in \\[0, 1\\)"),
        (dict(depth=-1), "depth must be an int >= 0"),
        (dict(num_heads=0), "num_heads must be a positive int"),
        (dict(pos_embed="sincos"), "pos_embed must be 'learn' or 'none'"),
        (dict(backend="tpu"), "backend must be one of"),
    ],
)
def test_constructor_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastvit.ViT(**{**TINY, **kwargs})


def test_patch_size_type_is_checked():
    with pytest.raises(TypeError, match="patch_size must be an int or a pair of ints"):
        fastvit.ViT(**{**TINY, "patch_size": "8"})


def test_unknown_preset_name():
    with pytest.raises(KeyError, match="unknown model 'vit_tiny_patch8_1024'; available: .*vit_base_patch16_224"):
        fastvit.create_model("vit_tiny_patch8_1024")


def test_pretrained_is_refused_with_a_way_forward():
    with pytest.raises(ValueError, match="load_weights"):
        fastvit.create_model("vit_tiny_patch16_224", pretrained=True)


def test_reset_classifier_checks_arguments(model):
    with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
        model.reset_classifier(-1)
    with pytest.raises(ValueError, match="global_pool must be one of"):
        model.reset_classifier(3, global_pool="mean")


def test_forward_intermediates_checks_arguments(model):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC'"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="indices must name blocks"):
        model.forward_intermediates(x, indices=[5])


# ================================================================================================
# Every public op on every backend that implements it and can run here (the op-case table, tests/op_cases.py):
# the same input rules, the same errors. 'torch' everywhere; 'triton' (attention, patch embedding) through
# Triton's interpreter on CPU tensors; 'cuda' (LayerNorm, LN-MLP, Linear+residual) through the extension's C++
# kernels on CPU tensors.

REPO = pathlib.Path(__file__).resolve().parent.parent
EXTENSION_REASON = backend_skip_reason("cuda")
ALL = backend_params()
WITH_PARAMETERS = backend_params([op for op, case in OP_CASES.items() if len(case.arg_names) > 1])


@pytest.fixture
def no_kernel_launch(monkeypatch):
    """Any Triton kernel reached from here on fails the test; the kernels modules' plain helpers and config tables
    (e.g. ``block_d``) stay readable."""
    from triton.runtime import KernelInterface

    real_kernels = launch.kernels

    class NoKernels:
        def __init__(self, module):
            self._module = module

        def __getattr__(self, name):
            value = getattr(self._module, name)
            if isinstance(value, KernelInterface):
                raise AssertionError(f"a Triton kernel ({name}) was launched for an empty input")
            return value

    monkeypatch.setattr(launch, "kernels", lambda op_file: NoKernels(real_kernels(op_file)))


# ------------------------------------------------------------------------------------------------
# Types and ranks


@pytest.mark.parametrize("bad", [torch.int32, torch.bool, torch.complex64], ids=["int32", "bool", "complex64"])
@pytest.mark.parametrize("op, backend", ALL)
def test_non_float_main_input_is_a_type_error_naming_it(op, backend, bad):
    case = OP_CASES[op]
    sample = case.make()
    name = sample.main
    if op == "patch_embed_uint8":  # its main input must be uint8: a float or bool batch is the error here
        bad = torch.float32 if bad == torch.int32 else bad
        message = f"images must be a uint8 tensor .*got {bad}"
    else:
        message = f"{name} must be a floating-point tensor .*got {bad}"
    with pytest.raises(TypeError, match=message):
        case.call(sample.replace(**{name: sample[name].to(bad)}), backend)


@pytest.mark.parametrize("op, backend", WITH_PARAMETERS)
def test_non_float_parameter_is_a_type_error_naming_it(op, backend):
    case = OP_CASES[op]
    sample, name = case.make(), case.arg_names[1]
    with pytest.raises(TypeError, match=f"{name} must be a floating-point tensor .*got torch.int64"):
        case.call(sample.replace(**{name: sample[name].long()}), backend)


@pytest.mark.parametrize("op, backend", ALL)
def test_wrong_rank_is_a_value_error_naming_the_argument_and_shape(op, backend):
    case = OP_CASES[op]
    sample = case.make()
    name, main = sample.main, sample[sample.main]
    if case.main_rank is None:  # x: [..., C], any rank >= 1
        bad, expected = main.sum(), "at least 1 dimensions, got shape \\(\\)"
    else:
        bad = main[0]
        expected = f"{case.main_rank} dimensions.*got shape {re.escape(str(tuple(bad.shape)))}"
    with pytest.raises(ValueError, match=f"{name} must have {expected}"):
        case.call(sample.replace(**{name: bad}), backend)
    if len(case.arg_names) > 1:  # a parameter of the wrong rank
        param = case.arg_names[1]
        with pytest.raises(ValueError, match=f"{param} must have"):
            case.call(sample.replace(**{param: sample[param].unsqueeze(0)}), backend)


_SHAPE_ERRORS = [
    ("qkv_attention", "width", r"not divisible by 3 \* num_heads = 6"),
    ("attention", "k head dim", r"k's head dim must equal q's \(32\)"),
    ("patch_embed", "channels", r"x must have 3 channels"),
    ("patch_embed", "size", r"image size 8x10 is not divisible by the patch size 4x4"),
    ("patch_embed_uint8", "channels", r"images must have 3 channels"),
    ("patch_embed_uint8", "size", r"image size 8x10 is not divisible by the patch size 4x4"),
    ("ln_mlp", "width", r"ln_weight must have shape \(23,\)"),
    ("layer_norm", "width", r"weight must have shape \(23,\)"),
    ("linear_residual", "width", r"weight must have shape \(40, 23\)"),
]


@pytest.mark.parametrize(
    "op, backend, change, match",
    [param for op, change, match in _SHAPE_ERRORS for param in backend_params([op], extra=[(change, match)])],
)
def test_wrong_channel_count_or_size_names_what_was_expected(op, backend, change, match):
    case = OP_CASES[op]
    sample = case.make()
    name, main = sample.main, sample[sample.main]
    bad = {
        "width": main[..., :-1],
        "k head dim": main,
        "channels": main[:, :2] if op == "patch_embed" else main[..., :2],
        "size": main[..., :10] if op == "patch_embed" else main[:, :, :10],
    }[change]
    if change == "k head dim":
        sample = sample.replace(k=sample["k"][..., :16])
    with pytest.raises(ValueError, match=match):
        case.call(sample.replace(**{name: bad}), backend)


@pytest.mark.parametrize("head_dim", [8, 16, 24, 36, 136])
@pytest.mark.parametrize("op", ["qkv_attention", "attention"])
def test_unsupported_head_dim_on_triton_names_the_value_and_the_supported_ones(op, head_dim):
    if triton_skip_reason():
        pytest.skip(triton_skip_reason())
    case = OP_CASES[op]
    sample = case.make(batch=1, head_dim=head_dim)
    supported = re.escape(str(SUPPORTED_HEAD_DIMS))
    with pytest.raises(ValueError, match=rf"head_dim in {supported}, got head_dim={head_dim}"):
        case.call(sample, "triton")
    assert case.call(sample, "auto").shape == case.reference(sample).shape


# ------------------------------------------------------------------------------------------------
# Mixed dtypes and devices


@pytest.mark.parametrize("op, backend", WITH_PARAMETERS)
def test_mixed_dtypes_are_a_type_error_naming_each_tensor(op, backend):
    case = OP_CASES[op]
    sample = case.make()
    first, second = sample.float_names()[:2]
    with pytest.raises(TypeError, match=f"one dtype, got .*{first} torch.float32.*{second} torch.float64"):
        case.call(sample.replace(**{second: sample[second].double()}), backend)


@pytest.mark.parametrize("op, backend", WITH_PARAMETERS)
def test_mixed_devices_are_a_value_error_naming_each_device(op, backend):
    # The meta device stands in for a second device on a machine without a GPU.
    case = OP_CASES[op]
    sample = case.make()
    first, second = case.arg_names[:2]
    with pytest.raises(ValueError, match=f"one device, got {first} on {sample[first].device}, {second} on meta"):
        case.call(sample.replace(**{second: sample[second].to("meta")}), backend)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fused_backends_refuse_meta_tensors_with_a_reason(backend):
    reason = backend_skip_reason(backend)
    if reason:
        pytest.skip(reason)
    case = OP_CASES["qkv_attention" if backend == "triton" else "layer_norm"]
    with pytest.raises(RuntimeError, match="device type 'meta' is not supported"):
        case.call(case.make(device="meta"), backend)


# ------------------------------------------------------------------------------------------------
# Empty batches, awkward layouts, aliasing: handled, never rejected


@pytest.mark.parametrize("op, backend", ALL)
def test_empty_batch_gives_empty_output_and_zero_grads_without_a_launch(op, backend, no_kernel_launch):
    case = OP_CASES[op]
    full = case.call(case.make(), "torch")  # the fixture forbids kernels from here on
    empty = case.make(**case.empty)
    out, *grads = case.run(empty, backend)
    assert out.shape == (0, *full.shape[1:]) and out.dtype == full.dtype
    for (name, tensor), grad in zip(empty.tensors.items(), grads):
        if grad is not None:
            assert grad.shape == tensor.shape and not grad.any(), name


@pytest.mark.parametrize("op, backend", ALL)
def test_non_contiguous_inputs_match_contiguous(op, backend):
    case = OP_CASES[op]
    sample = case.make()
    expected = case.run(sample, backend)
    views = sample.map(lambda t: relayout(t, "slice"), floats_only=False)  # the images too
    assert all(t.numel() <= 1 or not t.is_contiguous() for t in views.tensors.values() if t is not None)
    variants = [views]
    if op == "patch_embed":
        variants.append(sample.replace(x=relayout(sample["x"], "channels_last")))
    if case.main_rank in (None, 3):  # token-major / transposed views of [B, N, C] and [..., C] inputs
        variants.append(sample.replace(**{sample.main: relayout(sample[sample.main], "transposed")}))
    for variant in variants:
        got = case.run(variant, backend)
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
        for grad, want in zip(got[1:], expected[1:]):
            if want is not None:
                torch.testing.assert_close(grad, want, atol=1e-5, rtol=1e-5)


def test_uint8_channels_first_view_matches_channels_last():
    case = OP_CASES["patch_embed_uint8"]
    sample = case.make()
    nchw_view = sample["images"].permute(0, 3, 1, 2)  # a non-contiguous [B, C, H, W] view of the same bytes
    channels_first = sample.replace(images=nchw_view).with_kwargs(channels_last=False)
    for backend in case.runnable_backends:
        torch.testing.assert_close(case.call(channels_first, backend), case.call(sample, backend), atol=1e-5, rtol=1e-5)


def _aliased(op: str) -> Sample:
    """Inputs that share memory with each other (same tensor twice, overlapping views of one buffer)."""
    sample = OP_CASES[op].make()
    if op == "qkv_attention":
        qkv = sample["qkv"]
        base = torch.randn(*qkv.shape[:-1], qkv.shape[-1] + 32, device=DEVICE)
        return sample.replace(qkv=base[..., 16 : 16 + qkv.shape[-1]])
    if op == "attention":
        q = sample["q"]
        return sample.replace(k=q, v=q)
    if op in ("patch_embed", "patch_embed_uint8"):
        tokens, dim = sample["pos_embed"].shape[1:]
        buffer = torch.randn(1, tokens + 1, dim, device=DEVICE)
        return sample.replace(pos_embed=buffer[:, :tokens], cls_token=buffer[:, tokens - 1 : tokens])  # overlapping
    if op == "ln_mlp":
        width = sample["x"].shape[-1]
        square = torch.randn(width, width, device=DEVICE) * width**-0.5
        return sample.replace(
            ln_bias=sample["ln_weight"], fc1_weight=square, fc1_bias=sample["fc2_bias"], fc2_weight=square.t()
        )
    if op in ("linear_residual", "ln_linear"):  # the residual overlaps x in one buffer; the bias is a weight column
        x, residual = sample["x"], sample["residual"]
        buffer = torch.randn(*x.shape[:-1], x.shape[-1] + residual.shape[-1] // 2, device=DEVICE)
        weight = sample["weight"]
        aliased = sample.replace(
            x=buffer[..., : x.shape[-1]], residual=buffer[..., -residual.shape[-1] :], bias=weight[:, 3]
        )
        return aliased.replace(ln_bias=sample["ln_weight"]) if op == "ln_linear" else aliased
    if op == "rms_norm":  # the weight is a row of x
        return sample.replace(weight=sample["x"][0, 0])
    return sample.replace(bias=sample["weight"])


def _run_aliased(run, sample: Sample):
    """run(sample) on leaves that keep the aliasing: one leaf per distinct storage, every input a view of its leaf."""
    leaves, inputs = {}, {}
    for name, t in sample.tensors.items():
        key = t.untyped_storage().data_ptr()
        if key not in leaves:
            base = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype, device=t.device)
            base.untyped_storage().copy_(t.untyped_storage())
            leaves[key] = base.requires_grad_(t.is_floating_point())
        inputs[name] = leaves[key].as_strided(t.shape, t.stride(), t.storage_offset())
    views = Sample(inputs, sample.kwargs)
    out = run(views)
    wanted = [leaf for leaf in leaves.values() if leaf.requires_grad]
    return out.detach(), torch.autograd.grad(out, wanted, fixed_grad(out)), views


@pytest.mark.parametrize("op, backend", ALL)
def test_inputs_that_alias_each_other_give_the_reference_result(op, backend):
    case = OP_CASES[op]
    sample = _aliased(op)
    got, got_grads, inputs = _run_aliased(lambda s: case.call(s, backend), sample)
    want, want_grads, _ = _run_aliased(case.reference, sample)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for grad, expected in zip(got_grads, want_grads):  # gradients of aliased inputs add up in the shared leaf
        torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5)
    # The output is a new tensor: writing to it cannot change an input.
    out = case.call(inputs.map(torch.Tensor.detach), backend)
    storages = {t.untyped_storage().data_ptr() for t in inputs.tensors.values()}
    assert out.untyped_storage().data_ptr() not in storages


# ------------------------------------------------------------------------------------------------
# Model entry points: dtypes, devices, layouts, empty batches on the fused backends


def test_model_forward_rejects_another_dtype_or_device(model):
    with pytest.raises(TypeError, match="one dtype, got x torch.float64, weight torch.float32"):
        model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="one device, got x on meta, weight on cpu"):
        model(torch.randn(1, 3, 32, 32, device="meta"))
    with pytest.raises(ValueError, match="must be 32x32 pixels"):
        model.forward_features(torch.randn(1, 3, 16, 32))


def test_model_forward_on_views_and_channels_last_matches_contiguous(model):
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    wide = torch.zeros(2, 3, 32, 64)
    wide[..., ::2] = x
    for variant in (x.contiguous(memory_format=torch.channels_last), wide[..., ::2], x.flip(0).flip(0)):
        torch.testing.assert_close(model(variant), expected, atol=1e-5, rtol=1e-5)


FUSED_PLANS = [
    pytest.param({"patch_embed": "triton", "qkv_attention": "triton"}, id="triton", marks=[
        pytest.mark.skipif(triton_skip_reason() is not None, reason=str(triton_skip_reason()))]),
    pytest.param({"ln_mlp": "cuda", "layer_norm": "cuda"}, id="cuda", marks=[
        pytest.mark.skipif(EXTENSION_REASON is not None, reason=str(EXTENSION_REASON))]),
]  # fmt: skip


@pytest.mark.parametrize("plan", FUSED_PLANS)
def test_model_empty_batch_on_fused_backends(plan, no_kernel_launch):
    model = fastvit.ViT(img_size=16, patch_size=4, embed_dim=64, depth=1, num_heads=2, num_classes=5)
    model = model.to(DEVICE).set_backend(plan)
    out = model(torch.randn(0, 3, 16, 16, device=DEVICE))
    assert out.shape == (0, 5)
    out.sum().backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# Converters and loaders


def test_load_weights_reports_every_problem_in_one_error_and_leaves_the_model_untouched():
    from fastvit.convert import CheckpointMismatchError

    model = fastvit.ViT(**TINY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = fastvit.ViT(**{**TINY, "num_classes": 9}).state_dict()  # head.weight/bias mis-shaped
    del state["norm.weight"]  # missing
    state["blocks.7.attn.qkv.weight"] = torch.zeros(3)  # unexpected
    state["pos_embed"] = torch.zeros(1, 17, 40)  # other width: cannot be resampled
    with pytest.raises(CheckpointMismatchError) as info:
        fastvit.load_weights(model, state)
    message = str(info.value)
    for part in (
        "missing 1 keys the model needs: norm.weight",
        "1 keys the model does not have: blocks.7.attn.qkv.weight",
        "3 shapes do not match the model",
        "head.weight: checkpoint (9, 48) vs model (5, 48)",
        "head.bias: checkpoint (9,) vs model (5,)",
        "pos_embed: checkpoint (1, 17, 40) vs model (1, 17, 48)",
        "the model was left unchanged",
    ):
        assert part in message, (part, message)
    assert info.value.missing == ["norm.weight"] and info.value.unexpected == ["blocks.7.attn.qkv.weight"]
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)  # either except clause catches it
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    # strict=False tolerates unexpected keys only.
    state = fastvit.ViT(**TINY).state_dict()
    state["extra.weight"] = torch.zeros(1)
    fastvit.load_weights(model, state, strict=False)
    with pytest.raises(KeyError, match="keys the model does not have: extra.weight"):
        fastvit.load_weights(model, state)


def test_load_weights_summarises_long_key_lists():
    # A message lists the count and the first few keys of each kind (issue 21: never hundreds of names on one
    # line); every key stays available as data.
    from fastvit.convert import CheckpointMismatchError

    model = fastvit.ViT(**TINY)
    deeper = fastvit.ViT(**{**TINY, "depth": 3}).state_dict()  # 2 extra blocks: 2 x 12 unexpected keys
    with pytest.raises(KeyError) as info:
        fastvit.load_weights(model, deeper)
    extra = sorted(k for k in deeper if k.startswith(("blocks.1.", "blocks.2.")))
    shown = CheckpointMismatchError.SHOWN
    summary = f"{len(extra)} keys the model does not have: {', '.join(extra[:shown])}, ... ({len(extra) - shown} more"
    assert summary in str(info.value)
    assert info.value.unexpected == extra


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: fastvit.load_weights("model", {}), TypeError, "model must be a fastvit/timm VisionTransformer"),
        (lambda: fastvit.load_weights(fastvit.ViT(**TINY), 3), TypeError, "expected a state dict"),
        (lambda: fastvit.load_weights(fastvit.ViT(**TINY), {"a": 1}), TypeError, "entry 'a' is a int, not a tensor"),
        (lambda: fastvit.from_timm([1, 2]), TypeError, "expected a state dict"),
        (lambda: fastvit.from_timm({}), ValueError, "unrecognised checkpoint: expected a timm/fastvit"),
        (lambda: fastvit.from_timm(torch.nn.Linear(2, 2)), TypeError, "expected a timm VisionTransformer"),
        (
            lambda: fastvit.from_torchvision({"conv_proj.weight": torch.zeros(1)}),
            KeyError,
            "torchvision state dict is missing 'class_token'",
        ),
        (lambda: fastvit.from_hf({}), KeyError, "Hugging Face state dict is missing 'embeddings.cls_token'"),
        (lambda: fastvit.convert.timm_to_hf({}, layout="v4"), ValueError, "layout must be one of"),
        (
            lambda: fastvit.convert.infer_config(fastvit.ViT(**{**TINY, "embed_dim": 40, "num_heads": 2}).state_dict()),
            ValueError,
            "cannot infer num_heads for embed_dim=40",
        ),
    ],
)
def test_converters_reject_bad_sources(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_loaders_report_missing_truncated_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    from fastvit import checkpoint as ckpt
    from fastvit import load_run

    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_run(str(tmp_path / "absent.pth"))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_run(str(tmp_path))  # a directory without a checkpoint
    good = tmp_path / "good.safetensors"
    save_file(fastvit.ViT(**TINY).state_dict(), str(good), {"config": '{"img_size": 32, "no_such_option": 1}'})
    with pytest.raises(ValueError, match="the model config in its metadata is not valid here"):
        load_run(str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_run(str(truncated))
    state_dir = tmp_path / "run" / "checkpoint"
    state_dir.mkdir(parents=True)
    save_file(fastvit.ViT(**TINY).state_dict(), str(state_dir / ckpt.MODEL_FILE))
    torch.save({"epoch": 1}, state_dir / ckpt.STATE_FILE)
    with pytest.raises(ValueError, match="is not a fastvit training state"):
        ckpt.load_checkpoint(str(tmp_path / "run"))


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_cli_bad_checkpoint_is_one_line_and_exit_code_2(tmp_path, capsys, command):
    from fastvit.__main__ import main

    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    image = tmp_path / "digit.png"
    image.write_bytes(b"")
    argv = [command, "--init", str(bad)] + ([str(image)] if command == "predict" else ["--data", "synthetic"])
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "not a readable torch checkpoint" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------------------------------------
# InferenceSession


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(model="model"), TypeError, "model must be an nn.Module"),
        (dict(model=torch.nn.Identity()), ValueError, "model has no parameters"),
        (dict(warmup=0), ValueError, "warmup must be an int >= 1"),
        (dict(input_shape=(3, 32)), ValueError, "input_shape must be \\(C, H, W\\)"),
        (dict(batch_sizes=[1, True]), ValueError, "batch_sizes must be positive ints"),
        (dict(dtype="bf16"), TypeError, "dtype must be"),
    ],
)
def test_inference_session_constructor_rejects(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        fastvit.InferenceSession(**{"model": model, **kwargs})


def test_inference_session_call_rejects_and_accepts(model):
    session = fastvit.InferenceSession(model, dtype=torch.float32)
    with pytest.raises(TypeError, match="x must be a floating-point image batch, got torch.uint8"):
        session(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="x is on meta, the session's model on cpu"):
        session(torch.zeros(1, 3, 32, 32, device="meta"))
    with pytest.raises(ValueError, match="x must have shape \\[B, 3, 32, 32\\], got \\(3, 32, 32\\)"):
        session(torch.zeros(3, 32, 32))
    assert session(torch.zeros(0, 3, 32, 32)).shape == (0, 5)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(session(x.contiguous(memory_format=torch.channels_last)), session(x))


# ------------------------------------------------------------------------------------------------
# No assert-based validation: `python -O` strips asserts


def test_no_assert_statements_in_the_package():
    offenders = []
    for folder in ("fastvit", "kernels"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Assert):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"assert used for validation (stripped by python -O); raise instead: {offenders}"


def test_validation_survives_python_O():
    code = (
        "import torch, fastvit\n"
        "try:\n"
        "    fastvit.ops.layer_norm(torch.randn(2, 4), torch.ones(5), torch.ones(4))\n"
        "except ValueError as e:\n"
        "    print('ok', e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-O", "-c", code], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert result.returncode == 0 and result.stdout.startswith("ok weight must have shape (4,)"), result.stderr


def test_auto_sends_float64_cuda_input_of_ln_mlp_to_the_torch_backend(pretend_gpu):
    # The CUDA kernels of ln_mlp take 16/32-bit floats only: under 'auto' a float64 CUDA call must run the torch
    # backend, not reach the kernel's TypeError. Checked on call signatures (no GPU needed).
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    call = dispatch.DeviceDtypeCall
    assert dispatch.explain("ln_mlp", "auto", call(cuda, torch.float64))[0] == "torch"
    assert dispatch.explain("ln_mlp", "auto", call(cuda, torch.float32)) == ("cuda", None)
    assert dispatch.explain("ln_mlp", "cuda", call(cuda, torch.float64))[0] == "unusable"  # explicit: raises
    assert dispatch.explain("ln_mlp", "cuda", call(cpu, torch.float64)) == ("cuda", None)  # the C++ twin: fp64 ok
