"""Images of different sizes through a whole ViT: packed (no padded work) against padded NaFlex batches.

The same mix of images (NaFlex sizes: each side a multiple of the patch, different aspect ratios) runs through
ViT-B/16-sized blocks three ways, inference:

- ``fastvit packed``: ``VisionTransformer.forward_packed(images)`` (``dynamic_img_size``): every image's tokens
  back to back in one sequence, ``ops.varlen_qkv_attention``, per-image pooling; no padding anywhere.
- ``timm naflex padded``: timm's ``NaFlexVit`` (``naflexvit_base_patch16_gap``) on its NaFlex dict: the images'
  patches padded to the longest image, ``patch_valid`` as SDPA's mask, masked average pooling (timm eager).
- ``fastvit naflex padded``: ``fastvit.from_timm`` of that NaFlexVit on the same dict (its blocks on fastvit's ops,
  the key-padding mask in the attention kernel).

The two NaFlex candidates share weights and are checked against each other; ``fastvit packed`` is checked against
running each image alone through the same model. Items are images; the recorded ``padding`` is the share of the
padded batch's token slots that hold no patch. On a GPU: 64 images with sides of 8-24 patches (128-384 px), bf16
autocast. Without one (smoke mode): 4 small images through a 2-block, width-64 model in fp32 (the `torch` backend
on CPU); it proves the suite runs, the numbers say nothing about GPUs.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from benchmarks.harness import DEVICE, SMOKE, check_close, record, run_benchmark

timm = pytest.importorskip("timm")
from timm.models import naflexvit  # noqa: E402  (after the importorskip)

PATCH = 16
if SMOKE:
    SIZE = dict(embed_dim=64, depth=2, num_heads=2)
    GRIDS = [(2, 3), (4, 4), (3, 1), (1, 2)]  # patches per side
    AMP_DTYPE, TOL, ROUNDS = None, 1e-4, 3
else:
    SIZE = {}
    _sides = torch.randint(8, 25, (64, 2), generator=torch.Generator().manual_seed(0)).tolist()
    GRIDS = [tuple(side) for side in _sides]
    AMP_DTYPE, TOL, ROUNDS = torch.bfloat16, 0.15, 20
CANDIDATES = ["fastvit packed", "timm naflex padded", "fastvit naflex padded"]


def _images() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(3, h * PATCH, w * PATCH, generator=gen).to(DEVICE) for h, w in GRIDS]


def _naflex_dict(images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's NaFlex input: each image's patches row-major (``batch_patchify``), then zero padding at coordinate
    (0, 0) up to the longest image, ``patch_valid`` False there (timm's collator's layout)."""
    tokens = max(h * w for h, w in GRIDS)
    patches, coords, valid = [], [], []
    for image in images:
        flat, (h, w) = naflexvit.batch_patchify(image[None], (PATCH, PATCH))
        pad = tokens - h * w
        grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), dim=-1).reshape(-1, 2)
        patches.append(torch.cat([flat[0], flat.new_zeros(pad, flat.shape[-1])]))
        coords.append(torch.cat([grid, grid.new_zeros(pad, 2)]).to(DEVICE))
        valid.append(torch.arange(tokens, device=DEVICE) < h * w)
    return dict(patches=torch.stack(patches), patch_coord=torch.stack(coords), patch_valid=torch.stack(valid))


def _autocast():
    return torch.autocast(DEVICE.type, dtype=AMP_DTYPE, enabled=AMP_DTYPE is not None)


def _candidate(candidate: str, images: list[torch.Tensor]):
    """(model, its input, the reference logits it is checked against)."""
    if candidate == "fastvit packed":
        model = fastvit.create_model("vit_base_patch16_224", dynamic_img_size=True, **SIZE).to(DEVICE).eval()
        # the reference, each image alone, on the PyTorch path: on a GPU the fused attention would autotune once per
        # distinct token count (~50 of the 64 images), minutes of a time-boxed round spent on the reference
        model.set_backend("torch")
        with torch.no_grad(), _autocast():
            alone = torch.cat([model(image[None]) for image in images])
        return model.set_backend("auto"), images, alone
    timm_model = timm.create_model("naflexvit_base_patch16_gap", **SIZE).to(DEVICE).eval()
    batch = _naflex_dict(images)
    with torch.no_grad(), _autocast():
        reference = timm_model(batch)
    model = timm_model if candidate == "timm naflex padded" else fastvit.from_timm(timm_model).to(DEVICE).eval()
    return model, batch, reference


@pytest.mark.parametrize("candidate", CANDIDATES)
def test_packed_inference(benchmark, candidate):
    images = _images()
    model, inputs, reference = _candidate(candidate, images)

    def infer():
        with torch.inference_mode(), _autocast():
            return model.forward_packed(inputs) if candidate == "fastvit packed" else model(inputs)

    error = check_close(candidate, infer().float(), reference.float(), atol=TOL * max(reference.abs().max().item(), 1))
    run_benchmark(benchmark, infer, rounds=ROUNDS)
    tokens = sum(h * w for h, w in GRIDS)
    padded_slots = len(GRIDS) * max(h * w for h, w in GRIDS)
    record(
        benchmark, "packed_model", f"naflex b16 mix of {len(GRIDS)} images", candidate, items=len(GRIDS),
        item_name="img", images=len(GRIDS), patch_tokens=tokens, padded_slots=padded_slots,
        padding=round(1.0 - tokens / padded_slots, 4), dtype=str(AMP_DTYPE or torch.float32), max_logit_error=error,
    )  # fmt: skip
