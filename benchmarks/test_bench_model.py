"""End-to-end inference throughput: fastvit vs timm eager and the fastvit reference, same weights, same run.

On a GPU: ViT-S/16 and ViT-B/16 at 224 px, bf16 autocast, batch 64. Without one: a tiny ViT in fp32
(smoke mode: proves the suite runs; the numbers say nothing about fused kernels, none run on CPU).
Every candidate's logits are checked against timm's before it is timed.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from benchmarks.conftest import DEVICE, synchronized

timm = pytest.importorskip("timm")

if DEVICE.type == "cuda":
    CASES = [("vit_small_patch16_224", dict(), 64), ("vit_base_patch16_224", dict(), 64)]
    AUTOCAST_DTYPE, LOGIT_TOL = torch.bfloat16, 0.1
else:
    CASES = [("vit_tiny_patch16_224", dict(img_size=64, depth=2), 8)]
    AUTOCAST_DTYPE, LOGIT_TOL = None, 1e-4
CANDIDATES = ["timm eager", "fastvit reference", "fastvit auto"]


def _build(candidate: str, name: str, kwargs: dict):
    torch.manual_seed(0)
    timm_model = timm.create_model(name, pretrained=False, **kwargs).to(DEVICE).eval()
    if candidate == "timm eager":
        return timm_model, timm_model
    backend = "torch" if candidate == "fastvit reference" else "auto"
    ours = fastvit.from_timm(timm_model).to(DEVICE).eval().set_backend(backend)
    return ours, timm_model


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("name, kwargs, batch", CASES, ids=[c[0] for c in CASES])
def test_inference_throughput(benchmark, candidate, name, kwargs, batch):
    model, timm_model = _build(candidate, name, kwargs)
    img_size = kwargs.get("img_size", 224)
    x = torch.randn(batch, 3, img_size, img_size, device=DEVICE)
    autocast = torch.autocast(DEVICE.type, dtype=AUTOCAST_DTYPE, enabled=AUTOCAST_DTYPE is not None)

    def infer():
        with torch.inference_mode(), autocast:
            return model(x)

    expected = timm_model(x).float() if candidate != "timm eager" else None
    out = infer().float()
    if expected is not None:
        error = (out - expected).abs().max().item()
        assert error <= LOGIT_TOL, f"{candidate} logits differ from timm by {error:.3g}; not timing a wrong result"
    benchmark.extra_info.update(
        model=name,
        batch=batch,
        candidate=candidate,
        dtype=str(AUTOCAST_DTYPE or "float32"),
        ops=model.backend_plan(DEVICE) if hasattr(model, "backend_plan") else "timm",
    )
    benchmark.pedantic(synchronized(infer), warmup_rounds=2, rounds=5 if DEVICE.type == "cpu" else 20, iterations=1)
    benchmark.extra_info["img_per_s"] = batch / benchmark.stats["median"] if benchmark.stats else None
