"""The Hopper forward of the fused GEMM (``kernels/linear.py::linear_fwd_tma_kernel``, switched on by
``fastvit.ops.triton.linear.hopper_path()``): persistent programs looping over the output tiles, A and W tiles
through device-side tensor descriptors (TMA), the pointer kernel's prologue and epilogue.

CPU: Triton's interpreter runs the descriptors (``tl.make_tensor_descriptor`` loads, zero-filled outside the
tensor; it also asserts TMA's alignment rules) on CPU tensors, with ``INTERPRETER_PERSISTENT_PROGRAMS`` programs so
each loops over several tiles. The forward is held to the suites' rule against the fp64 spec (error <= 2x
PyTorch's own in the same dtype plus the dtype's rounding floor at the result's scale), equals the pointer kernel
bit for bit at the same tiles, repeats bit for bit, and falls back (with a reason) to the pointer kernel where TMA
cannot describe an operand. fp32 and fp16 here (bf16 ``tl.dot`` is broken in the interpreter); bf16 and ViT-B
shapes in the GPU tests (sm_90 only).
"""

from __future__ import annotations

import re

import pytest
import torch

from fastvit.ops.triton import launch, linear_launch
from fastvit.ops.triton import linear as linear_triton
from fastvit.selftest_cases import poisoned_triton_outputs

from op_cases import LN_LINEAR, Comparison, assert_matches_reference, fp32_noise_floor, rounding_floor
from utils import DEVICE, assert_within_torch_error, backend_skip_reason

pytestmark = pytest.mark.skipif(backend_skip_reason("triton") is not None, reason=str(backend_skip_reason("triton")))

# As tests/test_ln_linear.py: fp32 accumulation noise (tf32 off); 16-bit: two roundings of the dtype (the normalised A
# tile and the output) at the scale of the exact result.
FLOORS = {torch.float32: fp32_noise_floor(), torch.float16: rounding_floor(2.0), torch.bfloat16: rounding_floor(2.0)}
SMALL_TILES = (16, 16, 16, 2, 4, 1)  # BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages
BOTH_FORWARDS_SMALL = {"fwd": SMALL_TILES, "fwd_tma": SMALL_TILES}


def run_forward(sample, tma: bool):
    """(out, HopperPath record or None) of ``ln_linear`` on the Triton backend, in or out of ``hopper_path``."""
    if not tma:
        return LN_LINEAR.call(sample, "triton"), None
    with linear_triton.hopper_path() as path:
        out = LN_LINEAR.call(sample, "triton")
    return out, path


def check_forward(sample, label: str, equals_pointer: bool = True) -> torch.Tensor:
    """The TMA forward on ``sample``: it ran (no fallback), wrote every output element and nothing outside, keeps the
    rule against the fp64 spec and, with ``equals_pointer`` (the interpreter, both forwards forced to the same tiles),
    equals the pointer kernel bit for bit. Returns its output."""
    dtype = sample.dtype
    with poisoned_triton_outputs() as stray_store:
        ours, path = run_forward(sample, tma=True)
    assert stray_store() is None, label
    assert path.launches == 1 and not path.fallbacks, (label, path)
    exact = LN_LINEAR.reference(sample.double())
    same = LN_LINEAR.reference(sample)
    cmp = Comparison(["out"], [ours], [same], [exact], dtype, grad_out=exact)
    assert torch.isfinite(ours).all(), f"{label}: non-finite (an element not written?)"
    assert_within_torch_error(f"tma {label} {dtype}", ours, same, exact, floor=FLOORS[dtype](cmp, exact))
    if equals_pointer:
        pointer, _ = run_forward(sample, tma=False)
        torch.testing.assert_close(ours, pointer, atol=0, rtol=0, msg=f"{label}: TMA and pointer kernels differ")
    return ours


# ------------------------------------------------------------------------------------------------
# Accuracy and equality with the pointer kernel

# M = 39, K = 40, N = 45 with 16x16x16 tiles: ragged M and N tails, three K steps (the last half a tile, zero-filled by
# the descriptor), 3 x 3 = 9 tiles over 2 persistent programs. K = 40 keeps fp32 and fp16 rows 16-byte aligned.
VARIANTS = {
    "ln-gelu-bias-residual": dict(activation="gelu"),
    "ln-no-bias-gelu_tanh": dict(activation="gelu_tanh", ln_bias=False, bias=False, residual=False),
    "rms-quick_gelu": dict(activation="quick_gelu", norm="rms"),
    "no-norm-plain": dict(layer_norm=False, activation="none", bias=False, residual=False),
    "rms-swiglu-packed": dict(activation="swiglu", norm="rms"),
    "ln-swiglu-no-bias": dict(activation="swiglu", bias=False, residual=False),
    "ln-gelu-on-17-columns": dict(activation="gelu", residual=False, activation_columns=17),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_prologue_and_epilogue_matches_the_spec_and_the_pointer_kernel(dtype, variant):
    sample = LN_LINEAR.make(dtype, DEVICE, lead=(3, 13), in_features=40, out_features=45, **VARIANTS[variant])
    with linear_triton.forced_configs(BOTH_FORWARDS_SMALL):
        check_forward(sample, variant)


def test_swiglu_split_weights_equal_the_packed_weight_bit_for_bit():
    # timm's separate fc1_g / fc1_x: the value rows through their own descriptor, the packed weight's answers exactly.
    sample = LN_LINEAR.make(lead=(2, 11), in_features=24, out_features=20, activation="swiglu", norm="rms")
    x, ln_w, weight, bias, residual = (sample[n] for n in ("x", "ln_weight", "weight", "bias", "residual"))
    swiglu, rms = linear_triton.ACTIVATION_CODES["swiglu"], linear_triton.NORM_CODES["rms"]
    x, residual = x.reshape(22, 24), residual.reshape(22, 20)
    gate, value = (t.contiguous() for t in weight.chunk(2))
    outs = []
    with linear_triton.forced_configs(BOTH_FORWARDS_SMALL), linear_triton.hopper_path() as path:
        for w, v in ((weight, None), (gate, value)):
            outs.append(torch.ops.fastvit.ln_linear_fwd(x, ln_w, None, w, bias, residual, 1e-6, swiglu, True, rms, v))
    assert path.launches == 2 and not path.fallbacks, path
    for packed, split in zip(*outs):
        torch.testing.assert_close(split, packed, atol=0, rtol=0)
    # a value weight TMA cannot describe (base 4 bytes off) is named, and the op still answers exactly
    misaligned = _misaligned_base(value)
    assert linear_triton.tma_forward_reason(x, gate, misaligned) == (
        "value weight's base address is not 16-byte aligned (offset 4 bytes)"
    )
    with linear_triton.forced_configs(BOTH_FORWARDS_SMALL), linear_triton.hopper_path() as path:
        args = (x, ln_w, None, gate, bias, residual, 1e-6, swiglu, True, rms, misaligned)
        relaid = torch.ops.fastvit.ln_linear_fwd(*args)
    assert path.launches + len(path.fallbacks) == 1, path
    for packed, answer in zip(outs[0], relaid):
        torch.testing.assert_close(answer, packed, atol=0, rtol=0)


def test_more_tiles_than_programs_with_the_interpreter_tiles_and_bitwise_reruns():
    # The launcher's own interpreter config (16 x 128 x 128): K = 300 takes three K steps (the last ragged), M = 70
    # gives 5 row tiles, each of the 2 programs loops over two or three of them; two runs agree bit for bit.
    kernels = launch.kernels("linear")
    sample = LN_LINEAR.make(lead=(70,), in_features=300, out_features=33)
    block_m, block_n, *_ = kernels.INTERPRETER_CONFIG
    assert launch.cdiv(70, block_m) * launch.cdiv(33, block_n) > kernels.INTERPRETER_PERSISTENT_PROGRAMS
    first = check_forward(sample, "K300 interpreter tiles")
    again, _ = run_forward(sample, tma=True)
    torch.testing.assert_close(again, first, atol=0, rtol=0)


def test_training_inside_the_hopper_path_matches_the_spec():
    # Only the forward GEMM changes: the saved pre-activation feeds the unchanged backward kernels.
    sample = LN_LINEAR.make(lead=(2, 9), in_features=24, out_features=40, activation="gelu")
    with linear_triton.hopper_path() as path:
        assert_matches_reference(LN_LINEAR, sample, "triton", floor=FLOORS[torch.float32], name="tma training")
    assert path.launches >= 1 and not path.fallbacks, path


# ------------------------------------------------------------------------------------------------
# Off by default; where TMA cannot run: a reason and the pointer kernel


def test_the_path_is_off_outside_hopper_path():
    x = torch.empty(4, 8)
    tiles = lambda bm, bn, bk: 1  # noqa: E731
    assert linear_launch._forward_kind(x, x, None, tiles) == ("fwd", tiles)
    with linear_triton.hopper_path():
        kind, _ = linear_launch._forward_kind(x, x, None, tiles)
    assert kind == "fwd_tma"


def _misaligned_base(x):
    wide = torch.zeros(x.shape[0], x.shape[1] + 4, dtype=x.dtype, device=x.device)
    wide[:, 1 : 1 + x.shape[1]] = x
    return wide[:, 1 : 1 + x.shape[1]]  # row stride 44 fp32 = 176 bytes: aligned; base 4 bytes off


@pytest.mark.parametrize(
    "relayout, in_features, match",
    [
        (lambda x: x.t().contiguous().t(), 40, "last stride 39: TMA needs unit-stride rows"),
        (_misaligned_base, 40, "base address is not 16-byte aligned"),
        (lambda x: x, 37, r"row stride \(148 bytes\) is not a multiple of 16 bytes"),
    ],
    ids=["column-major", "misaligned-base", "odd-row-stride"],
)
def test_operands_tma_cannot_describe_fall_back_with_a_reason_and_equal_results(relayout, in_features, match):
    sample = LN_LINEAR.make(lead=(39,), in_features=in_features, out_features=45)
    sample = sample.replace(x=relayout(sample["x"]))
    with linear_triton.forced_configs(BOTH_FORWARDS_SMALL):
        ours, path = run_forward(sample, tma=True)
        pointer, _ = run_forward(sample, tma=False)
    assert path.launches == 0 and len(path.fallbacks) == 1, path
    assert re.search(match, path.fallbacks[0]), path.fallbacks
    torch.testing.assert_close(ours, pointer, atol=0, rtol=0)


def test_the_reason_names_the_gpu_the_dtype_and_an_old_triton(monkeypatch):
    x = torch.empty(8, 16, dtype=torch.float16)
    assert linear_triton.tma_forward_reason(x, x) is None
    assert "float64" in linear_triton.tma_forward_reason(x.double(), x.double())
    import triton.language as tl

    monkeypatch.delattr(tl, "make_tensor_descriptor")
    reason = linear_launch._tma_unavailable_in_triton.__wrapped__()  # feature detection, not the version string
    assert reason is not None and "make_tensor_descriptor" in reason
    monkeypatch.undo()
    monkeypatch.setattr(launch, "on_gpu", lambda t: True)
    monkeypatch.setattr(launch, "gpu_arch", lambda t: 80)
    assert "sm_90" in linear_triton.tma_forward_reason(x, x) and "sm_80" in linear_triton.tma_forward_reason(x, x)


@pytest.mark.parametrize("layout", ["contextvar (Triton >= 3.5)", "module global (Triton 3.4)"])
def test_the_scratch_allocator_is_installed_once_and_a_users_is_kept(monkeypatch, layout):
    # Runs on the GPU path only (_forward_kind with a CUDA input): checked here against both of Triton's layouts of
    # the allocator (3.4 keeps a plain global, 3.5+ a ContextVar), with its NullAllocator, ours and a user's.
    import contextvars

    import triton
    from triton.runtime import _allocation

    def holding(allocator):
        if layout.startswith("contextvar"):
            return contextvars.ContextVar("allocator_under_test", default=allocator)
        return allocator

    installed = []
    monkeypatch.setattr(triton, "set_allocator", installed.append)
    monkeypatch.setattr(_allocation, "_allocator", holding(_allocation.NullAllocator()))
    linear_launch._ensure_tma_allocator()
    assert installed == [linear_launch._tma_scratch]

    def users_allocator(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    for allocator in (users_allocator, linear_launch._tma_scratch):
        installed.clear()
        monkeypatch.setattr(_allocation, "_allocator", holding(allocator))
        linear_launch._ensure_tma_allocator()
        assert installed == []


def test_configs_of_the_tma_kind_are_tabled_and_forceable():
    for swiglu in (False, True):
        assert linear_triton.candidate_configs("fwd_tma", 90, 2, swiglu)
        assert linear_triton.candidate_configs("fwd_tma", 90, 4, swiglu)
    assert "fwd_tma" in linear_triton.TMA_KINDS and "fwd_tma" not in linear_triton.KINDS  # no sm_80 table
    with (
        pytest.raises(ValueError, match="powers of two"),
        linear_triton.forced_configs({"fwd_tma": (16, 24, 16, 1, 4, 1)}),
    ):
        pass


# ------------------------------------------------------------------------------------------------
# GPU (sm_90 only; skipped elsewhere)

needs_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9, reason="needs an sm_90 (Hopper) GPU"
)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape, variant",
    [
        ((768, 3072), dict(activation="gelu", residual=False)),  # ViT-B fc1
        ((3072, 768), dict(layer_norm=False, activation="none")),  # ViT-B fc2 (+ residual)
        ((768, 2048), dict(activation="swiglu", norm="rms", residual=False)),  # EVA02-B fc1
        ((776, 1000), dict(activation="gelu_tanh")),  # ragged K and N tails: the descriptors' zero-fill on hardware
    ],
    ids=["vit-b-fc1", "vit-b-fc2", "eva02-b-fc1", "ragged-k-n"],
)
def test_gpu_tma_forward_at_vit_b_shapes(dtype, shape, variant, no_tf32):
    sample = LN_LINEAR.make(dtype, "cuda", lead=(4, 197), in_features=shape[0], out_features=shape[1], **variant)
    with linear_triton.hopper_path() as path:
        assert_matches_reference(LN_LINEAR, sample, "triton", floor=FLOORS[dtype], name=f"gpu tma {shape} {variant}")
        first, again = run_forward(sample, tma=True)[0], run_forward(sample, tma=True)[0]
    assert path.launches >= 3 and not path.fallbacks, path
    torch.testing.assert_close(again, first, atol=0, rtol=0)


@needs_hopper
@pytest.mark.gpu
@pytest.mark.parametrize("swiglu", [False, True])
def test_gpu_every_tma_config_keeps_the_rule(swiglu, no_tf32):
    variant = dict(activation="swiglu", norm="rms") if swiglu else dict(activation="gelu")
    sample = LN_LINEAR.make(torch.bfloat16, "cuda", lead=(2, 197), in_features=768, out_features=1024, **variant)
    for entry in linear_triton.candidate_configs("fwd_tma", 90, 2, swiglu):
        with linear_triton.forced_configs({"fwd_tma": entry}):
            out = check_forward(sample, f"config {entry}", equals_pointer=False)
        assert out.shape == (2, 197, 1024)


# ------------------------------------------------------------------------------------------------
# The selftest's TMA checks (sm_90 GPUs only; their mechanics here)


@pytest.mark.parametrize("arch, expected", [(90, True), (80, False)])
def test_the_selftest_plans_tma_checks_on_hopper_only(monkeypatch, arch, expected):
    from fastvit import selftest_cases

    monkeypatch.setattr(selftest_cases, "_on_gpu", lambda device: True)  # plan as on a GPU (no check runs)
    monkeypatch.setattr(launch, "gpu_arch", lambda tensor: arch)
    for quick in (True, False):
        labels = [c.label for c in selftest_cases.build_checks("ln_linear", "triton", DEVICE, quick=quick)]
        assert any(label.startswith("TMA forward") for label in labels) == expected, (arch, quick)
    mlp = selftest_cases.build_checks("ln_mlp", "triton", DEVICE, quick=True)
    assert not any(c.label.startswith("TMA forward") for c in mlp)  # the same GEMMs: checked once, via ln_linear


def test_a_selftest_tma_check_passes_and_a_fallback_fails_it():
    from fastvit import selftest_cases

    aligned = selftest_cases._ln_linear_case((2, 7), 24, 40)
    odd = selftest_cases._ln_linear_case((2, 7), 37, 40)  # 148-byte fp32 rows: the pointer kernel runs
    args = (torch.float32, 90, [("aligned", aligned), ("odd", odd)], (), True, 0)
    passing, falling_back = selftest_cases._hopper_checks("ln_linear", DEVICE, *args)
    assert passing.run().passed
    with pytest.raises(RuntimeError, match=r"the TMA forward did not run: .*row stride \(148 bytes\)"):
        falling_back.run()  # the runner reports a raising check as failed, with this message
