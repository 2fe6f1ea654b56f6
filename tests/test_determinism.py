"""Determinism: with ``fastvit.set_deterministic(True)`` or under ``torch.use_deterministic_algorithms(True)``, two
runs give bit-identical outputs and gradients (``torch.equal``), for every op on every backend that runs here and
for training steps of the whole model; and no op raises under those modes (none needs to: no fused op is
inherently non-deterministic; the one that uses atomics, patch embedding's dW split, switches them off).

GPU-only tests at the end: CUDA-graph capture never autotunes (the session warms up first) and replay equals eager
bit for bit; a fused bf16 training step is bit-identical run to run on the GPU.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastvit
from fastvit.ops.triton import attention as attention_triton
from fastvit.ops.triton import patch_embed as pe_triton

from op_cases import OP_CASES, PATCH_EMBED, backend_params
from utils import DEVICE, backend_skip_reason, needs_cuda

EXTENSION_REASON = backend_skip_reason("cuda")
TRITON_REASON = backend_skip_reason("triton")
MODES = ["fastvit", "torch"]


@contextlib.contextmanager
def deterministic(mode: str | None):
    """'fastvit': fastvit.set_deterministic(True); 'torch': torch.use_deterministic_algorithms(True); None: off."""
    if mode == "fastvit":
        fastvit.set_deterministic(True)
    elif mode == "torch":
        torch.use_deterministic_algorithms(True)
    try:
        assert fastvit.deterministic_enabled() == (mode is not None)
        yield
    finally:
        fastvit.set_deterministic(False)
        torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def _cublas_workspace(monkeypatch):
    """On a GPU, PyTorch's own cuBLAS matmuls (the reference backend, the model's Linears) refuse
    torch.use_deterministic_algorithms(True) without this setting; it changes nothing on CPU."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture
def tiny_tiles():
    """Patch embedding with 16-wide tiles and a 3-way split of the dW reduction: the path that uses atomics
    outside deterministic mode, reachable at CPU-test sizes."""
    saved = dict(pe_triton.CONFIG_OVERRIDES)
    pe_triton.CONFIG_OVERRIDES.update(
        fwd=dict(BLOCK_R=16, BLOCK_C=16, BLOCK_RED=16),
        bwd_input=dict(BLOCK_R=16, BLOCK_C=16, BLOCK_RED=16),
        bwd_weight=dict(BLOCK_D=16, BLOCK_K=16, BLOCK_M=16, split=3),
        colsum=dict(BLOCK_D=16),
    )
    yield
    pe_triton.CONFIG_OVERRIDES.clear()
    pe_triton.CONFIG_OVERRIDES.update(saved)


# Larger than the table's default samples: several tiles per kernel, a split dW reduction (with tiny_tiles), rows
# across thread blocks.
SHAPES = {
    "qkv_attention": dict(tokens=65, head_dim=64),
    "attention": dict(batch=1, q_tokens=50, kv_tokens=70),
    "patch_embed": dict(grid=(4, 6), dim=40, prefix=3),  # 16x24 image, 4x4 patches: 24 patches + 3 prefix tokens
    "patch_embed_uint8": dict(grid=(4, 6), dim=40, prefix=3),
    "ln_mlp": dict(lead=(4, 50)),
    "layer_norm": dict(lead=(777,), width=48),
    "linear_residual": dict(lead=(4, 50)),
}


def _registered() -> set[str]:
    return {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("fastvit::")}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op, backend", backend_params())
def test_two_runs_are_bit_identical(op, backend, mode, tiny_tiles):
    case = OP_CASES[op]
    sample = case.make(**SHAPES.get(op, {}))
    with deterministic(mode):
        first = case.run(sample, backend)
        second = case.run(sample, backend)
    for name, a, b in zip(case.labels(sample), first, second):
        if a is None:  # an absent argument or the uint8 images: no gradient either time
            assert b is None, name
            continue
        assert torch.isfinite(a).all(), f"{op} {backend} {name}: non-finite"
        assert torch.equal(a, b), f"{op} {backend} {name}: runs differ under deterministic mode {mode!r}"


# ViT-S sizes on a GPU: the cuBLASLt GEMMs' split-K and the extension's column reductions really run in parallel.
GPU_SHAPES = {
    "ln_mlp": dict(lead=(16, 197), width=384, hidden=1536),
    "linear_residual": dict(lead=(32, 197), in_features=384, out_features=384),
}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", list(GPU_SHAPES))
def test_gpu_extension_ops_are_bit_identical_at_vit_sizes(op, dtype, approximate):
    case = OP_CASES[op]
    sample = case.make(dtype, "cuda", **GPU_SHAPES[op])
    if op == "ln_mlp":
        sample = sample.with_kwargs(approximate=approximate)
    elif approximate == "tanh":
        pytest.skip("linear_residual has no activation")
    with deterministic("fastvit"):
        runs = [case.run(sample, "cuda") for _ in range(3)]
    for run in runs[1:]:
        for label, got, first in zip(case.labels(sample), run, runs[0]):
            assert torch.equal(got, first), f"{op} {label} differs between runs"


@pytest.mark.skipif(TRITON_REASON is not None, reason=str(TRITON_REASON))
@pytest.mark.parametrize("mode", [None, *MODES])
def test_patch_embed_dw_uses_atomics_only_outside_deterministic_mode(mode, tiny_tiles, monkeypatch):
    # The one fused reduction that can use atomics (fp32 atomic adds of the split dW partials, order-dependent on
    # a GPU) must switch to the fixed-order sum of partials under either deterministic switch.
    real = pe_triton._kernels()
    flags = []

    class Spy:
        def __getattr__(self, name):
            kernel = getattr(real, name)
            if name != "patch_embed_bwd_weight_kernel":
                return kernel

            class Launcher:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        flags.append((grid[1], kwargs["ATOMIC"]))
                        return kernel[grid](*args, **kwargs)

                    return launch

            return Launcher()

    monkeypatch.setattr(pe_triton, "_kernels", Spy)
    with deterministic(mode):
        PATCH_EMBED.run(PATCH_EMBED.make(**SHAPES["patch_embed"]), "triton")
    assert flags == [(3, mode is None)], flags  # a 3-way split; atomics only with both switches off


def test_no_registered_op_refuses_deterministic_mode():
    # An op without a deterministic implementation would have to raise under these modes; fastvit has none:
    # attention's backward has no atomics, patch embedding switches its dW atomics off (above), the extension's
    # LayerNorm reductions are two-stage and fixed-order, and ln_mlp forbids cuBLASLt split-K and fused bias-
    # gradient epilogues when the flag is on (csrc/ln_mlp). Each is exercised in test_two_runs_are_bit_identical.
    # linear_residual's backward takes the flag too: at::sum instead of cuBLASLt's BGRADB epilogue. The Triton
    # GEMM (ln_linear) has no atomics; its split-K dW sums fp32 slice partials on the host in slice order. The
    # attention prologue (qk-norm, RoPE) sums its norm-weight gradients from fixed 16-row slots in a fixed order
    # (tests/test_attention_prologue.py checks two runs are bit-identical). varlen attention runs the attention
    # kernels (VARLEN=True); tests/test_varlen_attention.py checks it bit for bit against each sequence alone under
    # deterministic mode, and the selftest repeats it. attention_prologue (qk-norm on [B, H, N, D] q/k/v: the
    # attention-pooling head) runs the same kernels and sums (tests/test_attention_pool.py checks it bit for bit).
    # patch_embed_norm_fwd/_bwd (the patch tokens' norm) reuse ln_linear's norm backward (fixed-order per-row-block
    # partials) and the patch-embedding dW above (tests/test_patch_embed_norm.py checks two runs bit for bit).
    known = {
        "qkv_attention_fwd", "qkv_attention_bwd", "attention_fwd", "attention_bwd", "patch_embed_fwd",
        "patch_embed_bwd_input", "patch_embed_bwd_weight", "patch_embed_bwd_colsum", "patch_embed_norm_fwd",
        "patch_embed_norm_bwd", "layer_norm_fwd",
        "layer_norm_bwd", "ln_mlp_fwd", "ln_mlp_bwd", "linear_residual_fwd", "linear_residual_bwd",
        "ln_linear_fwd", "ln_linear_bwd", "qkv_attention_prologue_fwd", "qkv_attention_prologue_bwd",
        "varlen_qkv_attention_fwd", "varlen_qkv_attention_bwd", "attention_prologue_fwd", "attention_prologue_bwd",
    }  # fmt: skip
    unreviewed = sorted(_registered() - known)
    assert not unreviewed, (
        f"fastvit ops {unreviewed} are not reviewed for deterministic mode: add them to test_two_runs_are_bit_identical"
        " (or make them raise under fastvit.deterministic_enabled() if they cannot be deterministic)"
    )


# ------------------------------------------------------------------------------------------------
# Training steps of the whole model


FUSED_PLAN = {"patch_embed": "triton", "qkv_attention": "triton", "ln_mlp": "cuda", "layer_norm": "cuda"}
PLANS = [
    pytest.param("torch", id="torch"),
    pytest.param(
        FUSED_PLAN,
        id="fused",
        marks=[
            pytest.mark.skipif(bool(TRITON_REASON or EXTENSION_REASON), reason=str(TRITON_REASON or EXTENSION_REASON))
        ],
    ),
]


def _train(plan, steps: int = 2) -> tuple[list, list, list]:
    """(losses, parameters, last gradients) after ``steps`` AdamW updates of a tiny ViT, from fixed seeds."""
    torch.manual_seed(0)
    model = fastvit.ViT(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=3, backend=None)
    model = model.to(DEVICE).set_backend(plan)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 3, 16, 16, generator=gen).to(DEVICE)
        y = torch.randint(0, 3, (4,), generator=gen).to(DEVICE)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    parameters = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    return losses, parameters, grads


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("plan", PLANS)
def test_training_steps_are_bit_identical(plan, mode, tiny_tiles):
    with deterministic(mode):
        first, second = _train(plan), _train(plan)
    for kind, a_list, b_list in zip(("loss", "parameter", "gradient"), first, second):
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            assert torch.isfinite(a).all() and torch.equal(a, b), f"{kind} {i} differs between runs ({mode})"


@pytest.mark.skipif(bool(TRITON_REASON or EXTENSION_REASON), reason=str(TRITON_REASON or EXTENSION_REASON))
def test_fused_training_step_follows_the_reference():
    # Determinism is not bought with wrong numbers: the fused step stays within fp32 rounding of the reference.
    with deterministic("fastvit"):
        fused, reference = _train(FUSED_PLAN, steps=1), _train("torch", steps=1)
    torch.testing.assert_close(fused[0][0], reference[0][0], atol=1e-5, rtol=1e-5)
    for got, want in zip(fused[2], reference[2]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# GPU only: CUDA graphs and a bf16 training step


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_capture_never_autotunes_and_replay_equals_eager(monkeypatch, dtype):
    from triton.runtime import autotuner

    tuned_while = []  # one entry per autotuning (a cache miss): was a CUDA graph being captured?
    original = autotuner.Autotuner.prune_configs

    def spy(self, *args, **kwargs):
        tuned_while.append(torch.cuda.is_current_stream_capturing())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(autotuner.Autotuner, "prune_configs", spy)
    attention_triton._autotuned.cache_clear()  # fresh autotuners: every key of this test is tuned here
    model = fastvit.create_model("vit_small_patch16_224", depth=2, num_classes=10).cuda().eval()
    assert model.backend_plan("cuda")["qkv_attention"] == "triton"
    session = fastvit.InferenceSession(model, batch_sizes=[1, 3], dtype=dtype)
    assert tuned_while, "the attention kernels were never autotuned"
    assert not any(tuned_while), "autotuning ran inside a CUDA-graph capture"
    for batch in (1, 3):
        x = torch.randn(batch, 3, 224, 224, device="cuda")
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            expected = model(x)
        assert torch.equal(session(x), expected), f"batch {batch}: graph replay differs from eager"
    assert session.replays == 2 and session.fallback_calls == 0


@pytest.mark.gpu
@needs_cuda
def test_gpu_capture_with_explicit_fused_backends_replays_bit_exactly():
    model = fastvit.create_model("vit_small_patch16_224", depth=2, num_classes=10).cuda().eval()
    model.set_backend({"patch_embed": "triton", "qkv_attention": "triton", "ln_mlp": "cuda", "layer_norm": "cuda"})
    session = fastvit.InferenceSession(model, batch_sizes=[2], dtype=torch.bfloat16)
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        expected = model(x)
    first, second = session(x), session(x)
    assert torch.equal(first, expected) and torch.equal(second, expected)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_gpu_fused_bf16_training_step_is_bit_identical(mode):
    def train():
        torch.manual_seed(0)
        model = fastvit.create_model("vit_small_patch16_224", depth=2, num_classes=10).cuda()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(2):
            x = torch.randn(32, 3, 224, 224, device="cuda", generator=gen)
            y = torch.randint(0, 10, (32,), device="cuda", generator=gen)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        return [p.detach().clone() for p in model.parameters()] + [p.grad.clone() for p in model.parameters()]

    with deterministic(mode):
        first, second = train(), train()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"tensor {i} differs between runs"
