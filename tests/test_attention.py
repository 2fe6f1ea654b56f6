"""The Triton attention kernels (``backend='triton'``) against the fp64 reference, forward and every gradient.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (the root conftest sets
TRITON_INTERPRET=1), so shapes stay small: B*H <= 4, N <= 257. With a GPU the same tests run the
compiled kernels on CUDA tensors, and the ``gpu`` tests add bfloat16, every head dim, long
sequences and big batches. Accuracy rule (flash-attention's): max|ours - ref64| <= 2 x
max|SDPA same dtype - ref64|, for the output and dq, dk, dv.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastvit
from fastvit import dispatch, ops, reference
from fastvit.ops.attention import attention_call
from fastvit.ops.triton import attention as attention_triton
from fastvit.ops.triton import launch

from op_cases import assert_compiled_gradients_equal_eager
from utils import DEVICE, assert_within_torch_error, needs_cuda, triton_skip_reason

ON_INTERPRETER = DEVICE.type == "cpu"
if triton_skip_reason() is not None:
    pytest.skip(triton_skip_reason(), allow_module_level=True)

TRITON_OPS = ("qkv_attention_fwd", "qkv_attention_bwd", "attention_fwd", "attention_bwd")


def _floor(ref: torch.Tensor) -> float:
    """An fp32-rounding-level allowance added to the 2x-SDPA bound.

    Needed where SDPA is (near) exact and the bound collapses: with one token softmax is 1, so dq and
    dk are exactly 0 in fp64, and PyTorch may get 0 too, while our fp32 ``P * (dP - Delta)`` leaves a
    few fp32 ulps of cancellation noise. 1e-6 relative is 10x under the DESIGN's fp32 target (1e-5).
    """
    return 1e-6 * (1.0 + ref.abs().max().item())


def _run(fn, inputs, grad_out=None):
    """(output, grads of every input) of ``fn`` with ``grad_out`` (default: fixed random weights)."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, grad_out.to(device=out.device, dtype=out.dtype))
    return out.detach(), list(grads)


def _check_against_reference(name, ours, sdpa, exact):
    """ours, sdpa, exact: (out, grads) from _run; the flash-attention rule on every tensor."""
    labels = ["out"] + [f"grad {i}" for i in range(len(ours[1]))]
    for label, mine, theirs, ref in zip(labels, [ours[0], *ours[1]], [sdpa[0], *sdpa[1]], [exact[0], *exact[1]]):
        assert mine.dtype == theirs.dtype and mine.shape == ref.shape, (label, mine.dtype, mine.shape, ref.shape)
        assert torch.isfinite(mine).all(), f"{name} {label}: non-finite values"
        assert_within_torch_error(f"{name} {label}", mine, theirs, ref, floor=_floor(ref))


def _qkv_sdpa(qkv, num_heads, scale=None):
    """qkv_attention through F.scaled_dot_product_attention (PyTorch's own kernel, same dtype)."""
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).flatten(2)


def _check_qkv_attention(qkv, num_heads, scale=None, name="qkv_attention"):
    ours = _run(lambda x: ops.qkv_attention(x, num_heads, scale, backend="triton"), [qkv])
    sdpa = _run(lambda x: _qkv_sdpa(x, num_heads, scale), [qkv])
    exact = _run(lambda x: reference.qkv_attention(x, num_heads, scale), [qkv.double()])
    _check_against_reference(name, ours, sdpa, exact)
    return ours


def _check_attention(q, k, v, scale=None, name="attention"):
    ours = _run(lambda q, k, v: ops.attention(q, k, v, scale, backend="triton"), [q, k, v])
    sdpa = _run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale), [q, k, v])
    exact = _run(lambda q, k, v: reference.attention(q, k, v, scale), [t.double() for t in (q, k, v)])
    _check_against_reference(name, ours, sdpa, exact)
    return ours


# ------------------------------------------------------------------------------------------------
# Accuracy: qkv_attention on the packed buffer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_dim", [32, 64, 80])
@pytest.mark.parametrize("tokens", [1, 7, 50, 197, 257])
def test_qkv_attention_matches_reference(tokens, head_dim, dtype):
    heads = 2
    qkv = torch.randn(1, tokens, 3 * heads * head_dim, device=DEVICE).to(dtype)
    out, (grad,) = _check_qkv_attention(qkv, heads, name=f"qkv N={tokens} D={head_dim} {dtype}")
    assert out.shape == (1, tokens, heads * head_dim) and grad.shape == qkv.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_dim", [48, 96, 128])
def test_qkv_attention_other_head_dims_and_peaked_softmax(head_dim, dtype):
    # 48 and 96 pad their tiles to 64 and 128 columns; inputs x3 make the softmax peaked (scores up to ~50),
    # which exercises the running-max rescaling.
    qkv = (torch.randn(1, 70, 3 * 2 * head_dim, device=DEVICE) * 3).to(dtype)
    _check_qkv_attention(qkv, 2, name=f"qkv D={head_dim} {dtype} peaked")


def test_qkv_attention_on_strided_view_of_a_bigger_buffer():
    # Every other token of a wider buffer: token stride 2 * (3C + 24), offset 8 columns in.
    heads, head_dim, tokens = 2, 48, 50
    width3 = 3 * heads * head_dim
    big = torch.randn(2, 2 * tokens, width3 + 24, device=DEVICE)
    qkv = big[:, ::2, 8 : 8 + width3]
    assert not qkv.is_contiguous()
    _check_qkv_attention(qkv, heads, scale=0.2, name="qkv strided view")


def test_qkv_attention_batch_and_heads():
    # B=2, H=2: programs for different (b, h) must not read or write each other's rows.
    qkv = torch.randn(2, 33, 3 * 2 * 32, device=DEVICE) * 2
    _check_qkv_attention(qkv, 2, name="qkv B=2 H=2")


def test_small_blocks_cover_many_block_boundaries(monkeypatch):
    # The interpreter's fixed tiles are 32-64 rows; 16-row tiles make N=50 cross several full blocks
    # plus a ragged tail in every loop, with BLOCK_M != BLOCK_N in both directions.
    if not ON_INTERPRETER:
        pytest.skip("fixed tile sizes apply to the interpreter; GPUs autotune")
    from fastvit.kernels import attention as attention_kernels

    monkeypatch.setattr(
        attention_kernels, "INTERPRETER_CONFIGS", {"fwd": (16, 32, 1, 1), "dkdv": (16, 32, 1, 1), "dq": (32, 16, 1, 1)}
    )
    q, k, v = (torch.randn(1, 2, n, 64) for n in (50, 41, 41))
    _check_attention(q, k, v, name="attention small tiles")


# ------------------------------------------------------------------------------------------------
# Accuracy: attention on [B, H, N, D] tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("q_tokens, kv_tokens", [(50, 50), (7, 197), (197, 7), (33, 1)])
def test_attention_matches_reference(q_tokens, kv_tokens, dtype):
    q, k, v = (torch.randn(1, 2, n, 64, device=DEVICE).to(dtype) for n in (q_tokens, kv_tokens, kv_tokens))
    out, grads = _check_attention(q, k, v, name=f"attention {q_tokens}x{kv_tokens} {dtype}")
    assert out.shape == q.shape and [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_attention_on_non_contiguous_inputs():
    batch, heads, tokens, head_dim = 1, 2, 37, 80
    q = torch.randn(batch, tokens, heads, head_dim, device=DEVICE).transpose(1, 2)  # token-major
    k = torch.randn(batch, heads, tokens, head_dim + 16, device=DEVICE)[..., 8 : 8 + head_dim]  # column slice
    v = torch.randn(batch, heads, head_dim, tokens, device=DEVICE).transpose(-1, -2)  # head-dim stride != 1
    assert not any(t.is_contiguous() for t in (q, k, v))
    _check_attention(q, k, v, scale=0.15, name="attention non-contiguous")


def test_non_contiguous_output_gradient():
    # The gradient reaching the backward is an expanded (all-zero-stride) tensor here.
    qkv = torch.randn(1, 20, 3 * 2 * 32, device=DEVICE, requires_grad=True)
    ops.qkv_attention(qkv, 2, backend="triton").sum().backward()
    ref = qkv.detach().double().requires_grad_(True)
    reference.qkv_attention(ref, 2).sum().backward()
    torch.testing.assert_close(qkv.grad.double(), ref.grad, atol=1e-5, rtol=1e-4)


def test_empty_inputs():
    assert ops.qkv_attention(torch.randn(0, 5, 3 * 64, device=DEVICE), 2, backend="triton").shape == (0, 5, 64)
    q = torch.randn(1, 2, 4, 32, device=DEVICE, requires_grad=True)
    k = torch.randn(1, 2, 0, 32, device=DEVICE, requires_grad=True)
    v = torch.randn(1, 2, 0, 32, device=DEVICE, requires_grad=True)
    out = ops.attention(q, k, v, backend="triton")
    expected = reference.attention(q, k, v)  # attention over no keys: zeros
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert torch.equal(q.grad, torch.zeros_like(q)) and k.grad.shape == k.shape


# ------------------------------------------------------------------------------------------------
# Stores: every output element written, nothing written outside the outputs


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Make every launcher allocation NaN-filled, inside a NaN guard band; returns the (base, guard, numel) list."""
    guards = []

    def allocate(shape, dtype, device, memory_format=torch.contiguous_format):
        numel = 1
        for size in shape:
            numel *= size
        guard = 64 * 1024
        base = torch.full((numel + 2 * guard,), float("nan"), dtype=dtype, device=device)
        guards.append((base, guard, numel))
        return base[guard : guard + numel].view(shape)

    monkeypatch.setattr(launch, "new_output", allocate)
    return guards


def test_poisoned_outputs_are_fully_overwritten(poisoned_outputs):
    # D=80 pads tiles to 128 columns, N=50 and 37 leave ragged row tails: masked stores must cover
    # exactly the valid rows and columns (a NaN left over or a NaN guard overwritten fails).
    qkv = torch.randn(2, 50, 3 * 2 * 80, device=DEVICE)
    _check_qkv_attention(qkv, 2, name="qkv poisoned")
    q, k, v = (torch.randn(1, 2, n, 80, device=DEVICE) for n in (37, 50, 50))
    _check_attention(q, k, v, name="attention poisoned")
    assert len(poisoned_outputs) == 8  # qkv: out, lse, dqkv; attention: out, lse, dq, dk, dv
    for base, guard, numel in poisoned_outputs:
        assert torch.isnan(base[:guard]).all() and torch.isnan(base[guard + numel :]).all(), "store outside output"


# ------------------------------------------------------------------------------------------------
# Determinism, torch.library and torch.compile


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "default"])
def test_gradients_are_bit_identical_run_to_run(deterministic):
    # No atomics anywhere in the backward: both modes must repeat exactly.
    qkv = torch.randn(2, 65, 3 * 2 * 64, device=DEVICE)
    fastvit.set_deterministic(deterministic)
    try:
        first = _run(lambda x: ops.qkv_attention(x, 2, backend="triton"), [qkv])
        second = _run(lambda x: ops.qkv_attention(x, 2, backend="triton"), [qkv])
    finally:
        fastvit.set_deterministic(False)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1][0], second[1][0])


def _op_samples():
    qkv = torch.randn(1, 9, 3 * 2 * 32, device=DEVICE)
    out, lse = torch.ops.fastvit.qkv_attention_fwd(qkv, 2, 0.2)
    q, k, v = (torch.randn(1, 2, n, 32, device=DEVICE) for n in (9, 12, 12))
    a_out, a_lse = torch.ops.fastvit.attention_fwd(q, k, v, 0.2)
    return {
        "qkv_attention_fwd": [(qkv.clone().requires_grad_(True), 2, 0.2)],
        "qkv_attention_bwd": [(torch.randn_like(out), qkv, out, lse, 2, 0.2)],
        "attention_fwd": [tuple(t.clone().requires_grad_(True) for t in (q, k, v)) + (0.2,)],
        "attention_bwd": [(torch.randn_like(a_out), q, k, v, a_out, a_lse, 0.2)],
    }


@pytest.mark.parametrize("op_name", TRITON_OPS)
def test_opcheck(op_name):
    for args in _op_samples()[op_name]:
        torch.library.opcheck(getattr(torch.ops.fastvit, op_name).default, args)


def test_torch_compile_fullgraph_with_backward():
    qkv = torch.randn(2, 21, 3 * 2 * 32, device=DEVICE)

    def step(x):
        return (ops.qkv_attention(x, 2, backend="triton") * 1.5).square().sum()

    assert_compiled_gradients_equal_eager(step, [qkv])


@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
@pytest.mark.parametrize("arch", [80, 90])
def test_autotune_pruning_always_leaves_a_config(kind, arch):
    # GPU-only code path, checked here without launching: the autotuner wrapper builds, is keyed on
    # (N_Q, N_KV, HEAD_DIM, precision, prologue switches) (+ dtypes), and its prune step never returns an empty list.
    tuned = attention_triton._autotuned(kind, arch, 1)
    assert tuned.keys == ["N_Q", "N_KV", "HEAD_DIM", "INPUT_PRECISION", "ROPE", "Q_NORM", "K_NORM"]
    for block_d in (32, 64, 128):
        for dtype in dispatch.KERNEL_DTYPES:
            kept = tuned.early_config_prune(tuned.configs, {"Q": torch.empty(0, dtype=dtype)}, BLOCK_D=block_d)
            assert kept, (kind, arch, block_d, dtype)


_AOT_COMPILE = r"""
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastvit.kernels import attention as K

POINTERS = {"Q", "K", "V", "Out", "DO", "DK", "DV", "DQ"}
FP32_POINTERS = {"Lse", "Delta", "Rope", "QW", "QB", "KW", "KB", "NormGrad", "RopeGrad"}
PLAIN = dict(ROPE=0, Q_NORM=0, K_NORM=0, ROPE_GRAD=False, **dict.fromkeys(FP32_POINTERS - {"Lse", "Delta"}))  # defaults
# With the prologue the backward kernels also store a learned table's gradient (ROPE_GRAD).
for prologue, archs in ((PLAIN, (80, 90)), (dict(ROPE=2, Q_NORM=1, K_NORM=2, ROPE_GRAD=True), (90,))):
  for kind, fn, (block_m, block_n, warps, stages) in [
    ("fwd", K.attn_fwd_kernel, K.autotune_configs("fwd", 80, 128, 2, prologue["ROPE"] != 0)[0]),
    ("dkdv", K.attn_bwd_dkdv_kernel, K.autotune_configs("dkdv", 80, 128, 2, prologue["ROPE"] != 0)[0]),
    ("dq", K.attn_bwd_dq_kernel, K.autotune_configs("dq", 80, 128, 2, prologue["ROPE"] != 0)[0]),
  ]:
    # HEAD_DIM 80 in 128-wide tiles: the masked-column paths. Specialised as the JIT would for a
    # packed qkv buffer: unit head-dim strides, 16-divisible pointers and strides. Without a prologue its
    # arguments are the defaults (None pointers, constexpr 0 switches); with one, rotate-half RoPE and both norms.
    consts = dict(HEAD_DIM=80, BLOCK_D=128, BLOCK_M=block_m, BLOCK_N=block_n, INPUT_PRECISION="tf32", **prologue)
    consts.update({n: 1 for n in fn.arg_names if n.startswith("stride_") and n.endswith("d")})
    # The plain path: the packed-sequence, key-padding-mask, head-dim-piece and stride-alignment arguments unset.
    consts.update(Cu_seqlens=None, max_seqlen=None, VARLEN=False, KeyKeep=None, KeyExtent=None, KEY_MASK=False)
    consts.update(D1=0, D2=0, STRIDE_ALIGN=1)
    consts = {n: v for n, v in consts.items() if n in fn.arg_names}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in POINTERS or name in FP32_POINTERS:
            sig[name] = "*fp32" if name in FP32_POINTERS else "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in ("sm_scale", "q_eps", "k_eps") else "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    for arch in archs:
        try:
            src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
        except TypeError:
            print("SKIP-API"); sys.exit(0)
        options = dict(num_warps=warps, num_stages=stages)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        print(kind, arch, prologue["ROPE"], "shared", kernel.metadata.shared)
"""


def test_kernels_compile_for_sm80_and_sm90_without_a_gpu():
    # The interpreter does not run Triton's compiler, so errors that only compiled kernels hit (a
    # non-constexpr global, an unsupported op, a layout problem) would pass the CPU tests. Compile
    # the three main kernels ahead of time for A100 and H100 targets (no GPU needed: ptxas ships with Triton), and
    # with the qk-norm + RoPE prologue for H100.
    if not ON_INTERPRETER:
        pytest.skip("on a GPU the kernels are compiled and run by every other test")
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton install has no bundled ptxas")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", _AOT_COMPILE], capture_output=True, text=True, env=env, timeout=300)
    if "SKIP-API" in result.stdout:
        pytest.skip(f"triton {triton.__version__}: ASTSource has another signature; compile check written for 3.8")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("shared") == 9, result.stdout


def test_backends_report_lists_the_triton_attention_ops():
    report = fastvit.backends()["triton"]
    assert {"attention", "qkv_attention"} <= set(report.ops)


# ------------------------------------------------------------------------------------------------
# Bad inputs and backend selection


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: ops.qkv_attention(torch.randn(1, 5, 3 * 2 * 16, device=DEVICE), 2, backend="triton"),
            ValueError,
            r"head_dim in \(32, 40, 48, .*, 120, 128\), got head_dim=16",
        ),
        (
            lambda: ops.attention(*(torch.randn(1, 2, 5, 256, device=DEVICE) for _ in range(3)), backend="triton"),
            ValueError,
            "got head_dim=256",
        ),
        (
            lambda: ops.qkv_attention(
                torch.randn(1, 5, 3 * 64, device=DEVICE, dtype=torch.float64), 1, backend="triton"
            ),
            TypeError,
            "float16, bfloat16 and float32.*use backend='torch'",
        ),
        (
            lambda: ops.attention(
                torch.randn(1, 2, 5, 32, device=DEVICE),
                torch.randn(1, 2, 5, 32, device=DEVICE).half(),
                torch.randn(1, 2, 5, 32, device=DEVICE),
                backend="triton",
            ),
            TypeError,
            "one dtype",
        ),
        (
            lambda: ops.attention(
                *(torch.randn(1, 2, 5, 32, device=DEVICE) for _ in range(2)),
                torch.randn(1, 2, 5, 64, device=DEVICE),
                backend="triton",
            ),
            ValueError,
            "v's head dim to equal q's",
        ),
    ],
)
def test_bad_inputs_are_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_cpu_tensors_without_interpreter_say_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.qkv_attention(torch.randn(1, 5, 3 * 64), 1, backend="triton")


def test_one_coverage_rule_for_auto_explicit_backends_and_the_report():
    def why_not(head_dim, v_head_dim, dtype, dropout=False):
        return attention_triton.supports(attention_call(DEVICE, dtype, head_dim, v_head_dim, dropout))

    assert why_not(64, 64, torch.float16) is None
    assert "got head_dim=16" in why_not(16, 16, torch.float16)
    assert "v's head dim to equal q's" in why_not(64, 32, torch.float16)
    assert "float64" in why_not(64, 64, torch.float64)
    assert "dropout" in why_not(64, 64, torch.float16, dropout=True)
    if DEVICE.type == "cpu":  # the interpreter's bf16 tl.dot is broken: refused, never answered
        assert "bfloat16" in why_not(64, 64, torch.bfloat16)
    # An explicit backend raises the predicate's reason; 'auto' runs the torch backend for such inputs
    # (so a model with 16-wide heads still runs under 'auto'; on a GPU it would otherwise hit the kernel).
    qkv = torch.randn(1, 5, 3 * 2 * 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"'triton' backend does not cover this input: .*got head_dim=16"):
        ops.qkv_attention(qkv, 2, backend="triton")
    assert ops.qkv_attention(qkv, 2, backend="auto").shape == (1, 5, 32)
    assert dispatch.explain("qkv_attention", "triton", attention_call(DEVICE, torch.float16, 16))[0] == "unusable"


# ------------------------------------------------------------------------------------------------
# GPU only: bfloat16, every head dim, long sequences, big batches, autocast, int64 offsets


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("head_dim", [32, 48, 64, 80, 96, 128])
@pytest.mark.parametrize("tokens", [1, 97, 197, 257, 577, 1025])
def test_gpu_qkv_attention_all_head_dims(tokens, head_dim, dtype):
    heads = 3
    qkv = torch.randn(2, tokens, 3 * heads * head_dim, device="cuda").to(dtype)
    _check_qkv_attention(qkv, heads, name=f"gpu qkv N={tokens} D={head_dim} {dtype}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("q_tokens, kv_tokens", [(197, 577), (1025, 113), (203, 203)])
def test_gpu_attention_cross_lengths(q_tokens, kv_tokens, dtype):
    q, k, v = (torch.randn(2, 4, n, 64, device="cuda", dtype=dtype) for n in (q_tokens, kv_tokens, kv_tokens))
    _check_attention(q, k, v, name=f"gpu attention {q_tokens}x{kv_tokens} {dtype}")


@pytest.mark.gpu
@needs_cuda
def test_gpu_large_batch_vit_base():
    # ViT-B/16 training shape: B=256, N=197, H=12, D=64 (B*H = 3072 programs per block row).
    qkv = torch.randn(256, 197, 3 * 768, device="cuda", dtype=torch.bfloat16)
    _check_qkv_attention(qkv, 12, name="gpu ViT-B batch 256")


@pytest.mark.gpu
@needs_cuda
def test_gpu_autocast_casts_to_the_autocast_dtype():
    qkv = torch.randn(2, 50, 3 * 2 * 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ops.qkv_attention(qkv, 2, backend="triton")
        expected = ops.qkv_attention(qkv, 2, backend="torch")
    assert out.dtype == expected.dtype == torch.bfloat16
    out.float().sum().backward()
    assert qkv.grad.dtype == torch.float32 and torch.isfinite(qkv.grad).all()
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_gpu_deterministic_large():
    qkv = torch.randn(32, 577, 3 * 16 * 80, device="cuda", dtype=torch.bfloat16)
    fastvit.set_deterministic(True)
    try:
        runs = [_run(lambda x: ops.qkv_attention(x, 16, backend="triton"), [qkv]) for _ in range(2)]
    finally:
        fastvit.set_deterministic(False)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1][0], runs[1][1][0])


@pytest.mark.gpu
@pytest.mark.slow
@needs_cuda
def test_gpu_int64_offsets():
    # B*N*3C > 2**31 elements in the packed buffer: every offset past 2**31 must go through int64.
    # bf16 qkv of 1056 x 1025 x 3 x 12 x 64 = 2.49e9 elements (~5 GB); out, grad and dqkv add ~13 GB.
    batch, tokens, heads, head_dim = 1056, 1025, 12, 64
    need = batch * tokens * 3 * heads * head_dim * 2 * 4
    free, _total = torch.cuda.mem_get_info()
    if free < need * 1.2:
        pytest.skip(f"needs ~{need / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} GiB free")
    assert batch * tokens * 3 * heads * head_dim > 2**31
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = ops.qkv_attention(qkv, heads, backend="triton")
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    # Check the last batch entries (whose offsets all exceed 2**31) against the reference.
    tail = qkv.detach()[-2:].double().requires_grad_(True)
    ref = reference.qkv_attention(tail, heads)
    ref.backward(grad_out[-2:].double())
    torch.testing.assert_close(out[-2:].double(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(qkv.grad[-2:].double(), tail.grad, atol=5e-2, rtol=5e-2)
