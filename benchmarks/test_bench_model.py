"""End-to-end ViT throughput: inference img/s and training-step img/s, every candidate in one run.

Candidates (same weights): timm eager, timm + torch.compile (default and max-autotune), fastvit
torch (backend='torch': the plain-PyTorch form of every op), fastvit auto (fused kernels where they exist
for the device and call), and fastvit auto + torch.compile. On a GPU: ViT-S/16, B/16, L/16 at 224 px in
bf16 autocast, inference at batch 1, 32, 256 and training steps (forward + backward + AdamW) at batch 64,
128, 256, with peak memory. Without a GPU (smoke mode), fp32, eager candidates only (compiling on CPU would
take minutes and say nothing about GPUs): a 2-block ViT-Ti at 64 px (fast), and ViT-S/16 at 224 px, batch 8,
where fastvit ``auto`` runs the ``torch`` backend and must keep up with timm eager (``FASTVIT_BENCH_ROUNDS``
sets the timed rounds of a committed CPU run).

FLOPs are counted from the shapes (matmuls only: patch projection, qkv, q·kᵀ, attn·v, proj, fc1,
fc2, head; training = 3× forward), so TFLOP/s and MFU compare candidates doing the same work.
Each candidate's logits are checked against timm eager's before anything is timed.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from benchmarks.harness import DEVICE, PROFILE, SMOKE, check_close, profile_cases, record, run_benchmark

timm = pytest.importorskip("timm")

# The families' headline models (issue 17), at their own image sizes, with a 1000-class head to train.
FAMILY_MODELS = [
    "vit_so400m_patch14_siglip_384",  # SigLIP: map pooling, head dim 72 (64 + 16 pieces on Hopper), MLP 1152 -> 4304
    "vit_large_patch14_clip_336",  # CLIP L/14-336 (LLaVA's tower): pre-norm, eps 1e-5
    "vit_base_patch14_dinov2",  # DINOv2 B/14 at 518 px: LayerScale
    "vit_base_patch16_dinov3",  # DINOv3 B/16 (timm's Eva): RoPE, registers
    "eva02_base_patch14_448",  # EVA02 B/14-448: RoPE, separate q/k/v, SwiGLU with sub-LN
]
ROPE_FAMILY_MODELS = {"vit_base_patch16_dinov3", "eva02_base_patch14_448"}
GOALS = ["vit_base_patch16_dinov3", "eva02_base_patch14_448", "vit_so400m_patch14_siglip_384"]  # issue 18 item 6

# (model name, timm kwargs, inference batches, training batches)
if SMOKE:
    MODELS = [
        ("vit_tiny_patch16_224", dict(img_size=64, depth=2), [2, 4], [2, 4]),
        ("vit_small_patch16_224", {}, [8], [8]),
        # one family at smoke size: SigLIP so400m's shape (head dim 72, map pooling, 384/14-like crop), tiny
        (
            "vit_so400m_patch14_siglip_384",
            dict(img_size=46, depth=1, embed_dim=144, num_heads=2, num_classes=10),
            [2],
            [2],
        ),
    ]
    AMP_DTYPE, LOGIT_TOL = None, 1e-4
else:
    MODELS = [(name, {}, [1, 32, 256], [64, 128, 256]) for name in ("vit_small_patch16_224", "vit_base_patch16_224")]
    MODELS.append(("vit_large_patch16_224", {}, [1, 32, 256], [64, 128, 256]))
    # issue 18's goals: DINOv3-B/16 and EVA02-B/14 inference at batch 256 against timm + torch.compile
    MODELS += [
        (name, dict(num_classes=1000), [1, 32, 256] if name in ROPE_FAMILY_MODELS else [1, 32], [32])
        for name in FAMILY_MODELS
    ]
    if PROFILE == "headline":  # ViT-B/16: inference at batch 256, a training step at batch 128
        MODELS = [("vit_base_patch16_224", {}, [256], [128])]
    elif PROFILE == "families":  # issue 18's goals: inference only, DINOv3 / EVA02 at batch 256
        MODELS = [(name, dict(num_classes=1000), [256 if name in ROPE_FAMILY_MODELS else 32], []) for name in GOALS]
    AMP_DTYPE, LOGIT_TOL = torch.bfloat16, 0.15  # bf16 autocast: logits differ by bf16 rounding, not by math
INFER_CASES = [(name, kwargs, batch) for name, kwargs, batches, _ in MODELS for batch in batches]
TRAIN_CASES = [(name, kwargs, batch) for name, kwargs, _, batches in MODELS for batch in batches]
CASE_IDS = lambda cases: [f"{name}-b{batch}" for name, _, batch in cases]  # noqa: E731

CANDIDATES = [
    "timm eager",
    "timm compile",
    "timm compile max-autotune",
    "fastvit torch",
    "fastvit auto",
    "fastvit auto compile",
]
# headline: against timm eager and timm + torch.compile; max-autotune and compiling fastvit too cost minutes
CANDIDATES = profile_cases(
    CANDIDATES,
    ["timm eager", "timm compile", "fastvit torch", "fastvit auto"],
    families=["timm eager", "timm compile", "fastvit auto"],  # the goals are against timm + torch.compile
)
INFERENCE_ONLY = ["fastvit auto cuda-graphs"]
GPU_ONLY = {"timm compile", "timm compile max-autotune", "fastvit auto compile", "fastvit auto cuda-graphs"}


def vit_forward_flops(model, batch: int) -> float:
    """Matmul FLOPs of one forward pass, from the model's shapes."""
    embed = model.embed_dim if hasattr(model, "embed_dim") else model.num_features
    patch = model.patch_embed.proj.weight
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    # every Linear of a block (qkv or q/k/v, proj, fc1 or its gate and value halves, fc2), per token
    linear_macs = sum(
        m.in_features * m.out_features for m in model.blocks[0].modules() if isinstance(m, torch.nn.Linear)
    )
    per_block = 2 * tokens * linear_macs + 4 * tokens * tokens * embed
    patch_flops = 2 * model.patch_embed.num_patches * embed * patch[0].numel()
    head = 2 * embed * model.num_classes
    return float(batch * (patch_flops + len(model.blocks) * per_block + head))


def _build(candidate: str, name: str, kwargs: dict):
    if SMOKE and candidate in GPU_ONLY:
        pytest.skip(f"{candidate}: GPU-only candidate (torch.compile / CUDA graphs); smoke mode runs the eager ones")
    torch.manual_seed(0)
    timm_model = timm.create_model(name, pretrained=False, **kwargs).to(DEVICE)
    if candidate.startswith("timm"):
        model = timm_model
    else:
        backend = "torch" if candidate == "fastvit torch" else "auto"  # "auto": fused kernels on CUDA
        model = fastvit.from_timm(timm_model).to(DEVICE).set_backend(backend)
    if "max-autotune" in candidate:
        model = torch.compile(model, mode="max-autotune")
    elif "compile" in candidate:
        model = torch.compile(model)
    return model, timm_model


def _autocast():
    return torch.autocast(DEVICE.type, dtype=AMP_DTYPE, enabled=AMP_DTYPE is not None)


def _check_logits(candidate, model, timm_model, x):
    with torch.no_grad(), _autocast():
        expected = timm_model.eval()(x).float()
        got = model.eval()(x).float()
    return check_close(candidate, got, expected, atol=LOGIT_TOL * max(expected.abs().max().item(), 1.0))


def _ops_plan(model) -> dict | str:
    inner = getattr(model, "_orig_mod", model)
    return inner.backend_plan(DEVICE) if hasattr(inner, "backend_plan") else "timm"


def _record_model(benchmark, candidate, name, batch, mode, flops, error, model):
    """One model row: images/s, TFLOP/s, the logit error against timm, peak memory (CUDA) and the ops' backends."""
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else None
    label = "infer" if mode == "inference" else "train"
    record(
        benchmark, "model", f"{name} {label} b{batch}", candidate, flops=flops, items=batch, model=name, mode=mode,
        batch=batch, dtype=str(AMP_DTYPE or torch.float32), max_logit_error=error, peak_memory_gib=peak,
        ops=_ops_plan(model),
    )  # fmt: skip


@pytest.mark.parametrize("candidate", CANDIDATES + INFERENCE_ONLY)
@pytest.mark.parametrize("name, kwargs, batch", INFER_CASES, ids=CASE_IDS(INFER_CASES))
def test_inference(benchmark, name, kwargs, batch, candidate):
    model, timm_model = _build(candidate, name, kwargs)
    x = torch.randn(batch, 3, *timm_model.patch_embed.img_size, device=DEVICE)
    error = _check_logits(candidate, model, timm_model, x)
    model.eval()
    if candidate.endswith("cuda-graphs"):
        session = fastvit.InferenceSession(model, batch_sizes=batch, dtype=AMP_DTYPE)

        def infer():
            return session(x)

    else:

        def infer():
            with torch.inference_mode(), _autocast():
                return model(x)

    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_benchmark(benchmark, infer)
    _record_model(benchmark, candidate, name, batch, "inference", vit_forward_flops(timm_model, batch), error, model)


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("name, kwargs, batch", TRAIN_CASES, ids=CASE_IDS(TRAIN_CASES))
def test_training_step(benchmark, name, kwargs, batch, candidate):
    model, timm_model = _build(candidate, name, kwargs)
    x = torch.randn(batch, 3, *timm_model.patch_embed.img_size, device=DEVICE)
    labels = torch.randint(0, timm_model.num_classes, (batch,), device=DEVICE)
    error = _check_logits(candidate, model, timm_model, x)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=DEVICE.type == "cuda")

    def step():
        with _autocast():
            loss = torch.nn.functional.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_benchmark(benchmark, step)
    _record_model(benchmark, candidate, name, batch, "training", 3 * vit_forward_flops(timm_model, batch), error, model)
