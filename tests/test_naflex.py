"""fastvit.NaFlexVit against timm's NaFlexVit: same state dict, same outputs and parameter gradients for an image batch
and for timm's NaFlex dict input (per-sample sizes, padding), strict loads both ways, the presets, the fusion report,
bad inputs, and the masked attention path on the Triton kernel (interpreter).

Error model for fp32 parity: both sides run the same math in a different order (a Conv2d vs a Linear over the patch,
SDPA vs the fused ops' reductions), so each dot product of length K may differ by about sqrt(K) roundings of its
O(1) terms; the differences add over the L sequential matmul stages (patch projection, qkv, attention, proj, fc1, fc2
per block, the pool and the head). Relative to the output's scale: ``REL_TOL = 4 · eps32 · sqrt(K_max) · L``
(factor 4: margin for the worst of many outputs). A wrong position embedding, mask or pooling moves outputs by O(1).
"""

from __future__ import annotations

import copy
import math
import time
from functools import partial

import pytest
import torch
import torch.nn as nn

import fastvit
from fastvit.naflex import NAFLEX_PRESETS, NaFlexVit, NaFlexVitCfg

from utils import assert_within_torch_error, needs_cuda, triton_skip_reason

timm = pytest.importorskip("timm")
naflexvit = pytest.importorskip("timm.models.naflexvit")

PATCH, IN_CHANS, DIM, DEPTH, HEADS = 8, 3, 64, 2, 2
TINY = dict(embed_dim=DIM, depth=DEPTH, num_heads=HEADS, patch_size=PATCH, pos_embed_grid_size=(4, 4), num_classes=5)
K_MAX = int(DIM * 4)  # the longest reduction: fc2 over the MLP hidden width
STAGES = 2 + DEPTH * 5 + 2  # patch projection (+ position embedding), 5 matmul stages per block, pool, head
REL_TOL = 4 * torch.finfo(torch.float32).eps * math.sqrt(K_MAX) * STAGES

# One entry per shape of the family: (timm preset, extra config for the tiny model).
FAMILIES = [
    ("naflexvit_base_patch16_gap", {}),  # 4 registers, LayerScale, fc_norm after 'avg'
    ("naflexvit_base_patch16_par_gap", {}),  # aspect-preserving position embedding
    ("naflexvit_base_patch16_parfac_gap", {}),  # factorized position embedding
    ("naflexvit_base_patch16_map", {}),  # 'map' attention pooling, 1 register
    ("naflexvit_so150m2_patch16_reg1_gap", dict(mlp_ratio=34 / 13)),  # no qkv bias
    ("naflexvit_so150m2_patch16_reg1_map", dict(mlp_ratio=34 / 13)),
    ("naflexvit_base_patch16_siglip", {}),  # tanh GELU, bilinear resampling, 'map', no prefix tokens
    ("naflexvit_base_patch16_radio_v3", dict(pos_embed_grid_size=(8, 8))),  # class token, 'token', align_corners
    ("naflexvit_base_patch16_gap", dict(global_pool="max", pos_embed_use_grid_sample=True)),
    ("naflexvit_base_patch16_gap", dict(global_pool="avgmax", pool_include_prefix=True, pre_norm=True)),
]
IDS = ["gap", "par_gap", "parfac_gap", "map", "reg1_gap", "reg1_map", "siglip", "radio", "max-grid_sample", "avgmax"]
SIZES = [(5, 4), (3, 2), (4, 6)]  # per-sample patch grids (h, w): downsampled and upsampled position embeddings


def _timm_model(name: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**TINY, **kwargs})
    with torch.no_grad():  # timm zero-inits some parts (latent, biases, LayerScale 1e-5): make every path count
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def _images(sizes=((5, 4), (5, 4))) -> torch.Tensor:
    (h, w), batch = sizes[0], len(sizes)
    return torch.randn(batch, IN_CHANS, h * PATCH, w * PATCH, generator=torch.Generator().manual_seed(1))


def naflex_batch(images: list[torch.Tensor], tokens: int) -> dict[str, torch.Tensor]:
    """timm's NaFlex dict for images [C, H_i, W_i]: each image's patches first (row-major, timm's ``batch_patchify``
    layout), then padding up to ``tokens`` slots: random pixels (they must not matter) at coordinate (0, 0), as timm's
    NaFlex collator writes them (a sample's grid is max(patch_coord) + 1 over all its slots, in timm and here)."""
    gen = torch.Generator().manual_seed(3)
    patches, coords, valid = [], [], []
    for image in images:
        flat, (h, w) = naflexvit.batch_patchify(image[None], (PATCH, PATCH))
        pad = tokens - h * w
        grid = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), dim=-1).reshape(-1, 2)
        patches.append(torch.cat([flat[0], 100 * torch.randn(pad, flat.shape[-1], generator=gen)]))
        coords.append(torch.cat([grid, torch.zeros(pad, 2, dtype=grid.dtype)]))
        valid.append(torch.arange(tokens) < h * w)
    return dict(patches=torch.stack(patches), patch_coord=torch.stack(coords), patch_valid=torch.stack(valid))


def _mixed_batch(tokens: int = 26) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return naflex_batch([torch.randn(IN_CHANS, h * PATCH, w * PATCH, generator=gen) for h, w in SIZES], tokens)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _outputs_and_grads(model: nn.Module, x) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    (out * weight).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_outputs_and_grads(ours: nn.Module, theirs: nn.Module, x) -> None:
    want, want_grads = _outputs_and_grads(theirs, x)
    got, got_grads = _outputs_and_grads(ours, x)
    assert set(got_grads) == set(want_grads)
    errors = {"logits": relative_error(got, want)}
    errors.update({name: relative_error(got_grads[name], grad) for name, grad in want_grads.items()})
    worst = max(errors, key=errors.get)
    print(f"worst relative error {errors[worst]:.2e} ({worst}), tolerance {REL_TOL:.2e}")
    assert errors[worst] <= REL_TOL, f"{worst}: relative error {errors[worst]:.3e} > {REL_TOL:.3e}"


@pytest.mark.parametrize("name, extra", FAMILIES, ids=IDS)
def test_from_timm_matches_images_and_padded_naflex_batches(name, extra):
    theirs = _timm_model(name, **extra)
    ours = fastvit.from_timm(theirs).eval()
    assert isinstance(ours, NaFlexVit)
    assert_same_outputs_and_grads(ours, theirs, _images())
    batch = _mixed_batch()
    assert not batch["patch_valid"].all(), "the batch must hold padding"
    assert_same_outputs_and_grads(ours, theirs, batch)


@pytest.mark.parametrize("name, extra", FAMILIES[:8], ids=IDS[:8])
def test_state_dict_loads_strictly_both_ways(name, extra):
    theirs = _timm_model(name, **extra)
    ours = fastvit.create_model(name, **{**TINY, **extra})
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    fresh = _timm_model(name, **extra)
    with torch.no_grad():
        for param in ours.parameters():
            param.mul_(1.5)
    fresh.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_presets_are_timms_architectures():
    for name in NAFLEX_PRESETS:
        assert name in timm.list_models("naflexvit_*"), name
    assert set(fastvit.list_models("naflexvit_*")) == set(NAFLEX_PRESETS)
    for name in ("naflexvit_base_patch16_map", "naflexvit_base_patch16_radio_v3"):  # full size, on the meta device
        with torch.device("meta"):
            ours = fastvit.create_model(name)
            theirs = timm.create_model(name)
        assert {k: v.shape for k, v in ours.state_dict().items()} == {
            k: v.shape for k, v in theirs.state_dict().items()
        }


def test_each_padded_sample_equals_that_image_alone_and_the_image_path():
    """Padding is invisible: a sample of a padded batch gives what the image gives alone, unpadded, as patches and as
    an image tensor (the image path runs ops.patch_embed with the Linear viewed as a Conv2d)."""
    ours = fastvit.from_timm(_timm_model("naflexvit_base_patch16_gap")).eval()
    gen = torch.Generator().manual_seed(5)
    images = [torch.randn(IN_CHANS, h * PATCH, w * PATCH, generator=gen) for h, w in SIZES]
    with torch.no_grad():
        padded = ours(naflex_batch(images, 30))
        for i, image in enumerate(images):
            alone = ours(naflex_batch([image], image[0].numel() // PATCH**2))
            as_image = ours(image[None])
            assert relative_error(padded[i : i + 1], alone) <= REL_TOL
            assert relative_error(as_image, alone) <= REL_TOL


def test_key_only_mask_equals_timms_symmetric_mask_at_valid_tokens():
    """timm's default mask hides padding queries too; ours masks keys only: the valid tokens' features agree with both
    (a valid query softmaxes over the same valid keys; valid values never read padding)."""
    batch = _mixed_batch()
    valid = torch.nn.functional.pad(batch["patch_valid"], (4, 0), value=True)  # 4 register tokens
    ours = None
    for key_only in (False, True):
        theirs = _timm_model("naflexvit_base_patch16_gap", use_key_only_attn_mask=key_only)
        ours = ours or fastvit.from_timm(theirs).eval()
        with torch.no_grad():
            want = theirs.forward_features(**batch)["patches"]
            got = ours.forward_features(**batch)["patches"]
        assert relative_error(got[valid], want[valid]) <= REL_TOL


def test_forward_intermediates_match_timm_for_images_and_naflex_batches():
    """timm's ``forward_intermediates`` on both inputs: image batches as NCHW maps and NLC tokens with the prefix
    tokens split off, a NaFlex dict as NLC in its ``output_dict`` form (compared at valid tokens: timm's default mask
    also hides padding queries, ours keys only), and NCHW refused for NaFlex input as in timm."""
    theirs = _timm_model("naflexvit_base_patch16_gap", depth=3)  # 4 register tokens
    ours = fastvit.from_timm(theirs).eval()
    images = _images()
    with torch.no_grad():
        for kwargs in (
            dict(),
            dict(indices=2, norm=True, output_fmt="NLC", return_prefix_tokens=True),
            dict(indices=[0], stop_early=True, intermediates_only=True),
        ):
            want = theirs.forward_intermediates(images, **kwargs)
            got = ours.forward_intermediates(images, **kwargs)
            if not kwargs.get("intermediates_only"):
                (got_final, got), (want_final, want) = got, want
                assert relative_error(got_final, want_final) <= REL_TOL
            assert len(got) == len(want)
            for got_i, want_i in zip(got, want):
                pairs = zip(got_i, want_i) if isinstance(got_i, tuple) else [(got_i, want_i)]  # (spatial, prefix)
                for got_part, want_part in pairs:
                    assert got_part.shape == want_part.shape
                    assert relative_error(got_part, want_part) <= REL_TOL
        batch = _mixed_batch()
        want = theirs.forward_intermediates(
            batch, indices=2, output_fmt="NLC", output_dict=True, return_prefix_tokens=True
        )
        got = ours.forward_intermediates(
            batch, indices=2, output_fmt="NLC", output_dict=True, return_prefix_tokens=True
        )
    assert (
        set(got) == set(want) == {"image_intermediates", "image_intermediates_prefix", "patch_valid", "image_features"}
    )
    valid = batch["patch_valid"]
    assert torch.equal(got["patch_valid"], valid)
    for got_i, want_i in zip(got["image_intermediates"], want["image_intermediates"]):
        assert relative_error(got_i[valid], want_i[valid]) <= REL_TOL
    for got_i, want_i in zip(got["image_intermediates_prefix"], want["image_intermediates_prefix"]):
        assert relative_error(got_i, want_i) <= REL_TOL
    full_valid = torch.nn.functional.pad(valid, (4, 0), value=True)
    assert relative_error(got["image_features"][full_valid], want["image_features"][full_valid]) <= REL_TOL
    with pytest.raises(ValueError, match="NCHW"):
        ours.forward_intermediates(batch)


def test_parallel_scaling_blocks():
    from timm.models.vision_transformer import ParallelScalingBlock

    for fuse_out_proj in (False, True):
        block_fn = partial(ParallelScalingBlock, fuse_out_proj=fuse_out_proj)
        # timm's fix_init does not know the fused out_proj: leave it off
        theirs = _timm_model("naflexvit_base_patch16_gap", block_fn=block_fn, qkv_bias=False, fix_init=False)
        ours = fastvit.from_timm(theirs).eval()
        assert type(ours.blocks[0]).__name__ == "ParallelScalingBlock"
        assert_same_outputs_and_grads(ours, theirs, _mixed_batch())


def test_fusion_report_and_backends_reach_the_blocks():
    ours = fastvit.create_model("naflexvit_base_patch16_siglip", **TINY).eval()
    report = ours.fusion_report()
    assert len(report) == DEPTH and report.pool is not None
    text = str(report)
    assert "torch backend on cpu" in text  # on CPU, 'auto' runs the torch backend: unfused, and says why
    ours.set_backend({"qkv_attention": "triton", "ln_mlp": "cuda", "linear_residual": "cuda", "patch_embed": "triton"})
    report = ours.fusion_report()
    assert all(entry["attn"].fused and entry["mlp"].fused for entry in report), str(report)
    assert ours.embeds.backend == "triton" and ours.backend_plan()["patch_embed"] == "triton"
    assert fastvit.optimize(ours, "torch") is ours and ours.blocks[0].attn.backend == "torch"
    assert ours.attn_pool.backend == "torch" and ours.embeds.backend == "torch"
    with pytest.raises(TypeError, match="from_timm"):
        fastvit.optimize(_timm_model("naflexvit_base_patch16_gap"))


@pytest.mark.skipif(triton_skip_reason() is not None, reason=str(triton_skip_reason()))
def test_masked_attention_on_the_triton_kernel():
    ours = fastvit.from_timm(_timm_model("naflexvit_base_patch16_siglip")).eval()
    batch = _mixed_batch()
    with torch.no_grad():
        want = ours(batch)
        ours.set_backend({"qkv_attention": "triton"})
        start = time.perf_counter()
        got = ours(batch)
    print(f"triton interpreter: {time.perf_counter() - start:.2f} s")
    assert relative_error(got, want) <= REL_TOL


def test_build_model_and_config_kwargs():
    model = fastvit.convert.build_model({"model_class": "NaFlexVit", **TINY, "global_pool": "avg"})
    assert isinstance(model, NaFlexVit) and model.global_pool == "avg"
    cfg = NaFlexVitCfg(**{k: v for k, v in TINY.items() if k != "num_classes"})
    assert fastvit.NaFlexVit(cfg, num_classes=3).head.out_features == 3


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda b: b.update(patch_coord=b["patch_coord"][:, :-1]), ValueError, "patch_coord must be"),
        (lambda b: b.update(patch_valid=b["patch_valid"][:, :-1]), ValueError, "patch_valid must be"),
        (lambda b: b.update(patches=b["patches"][..., :-3]), ValueError, "patches must be"),
        (lambda b: b.update(patch_valid=b["patch_valid"].float()), TypeError, "patch_valid must be a bool"),
        (lambda b: b.update(patch_coord=b["patch_coord"].float()), TypeError, "patch_coord must be an integer"),
        (lambda b: b.pop("patch_valid"), ValueError, "patch_valid"),
        (lambda b: b.pop("patches"), ValueError, "patches"),
    ],
)
def test_bad_naflex_inputs_are_clear_errors(change, error, match):
    ours = fastvit.create_model("naflexvit_base_patch16_gap", **TINY)
    batch = _mixed_batch()
    change(batch)
    with pytest.raises(error, match=match):
        ours(batch)


def test_bad_images_and_configs_are_clear_errors():
    ours = fastvit.create_model("naflexvit_base_patch16_gap", **TINY)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ours(torch.randn(1, IN_CHANS, 36, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ours(torch.randn(1, 4, 32, 32))
    with pytest.raises(TypeError, match="image batch"):
        ours([torch.randn(1, IN_CHANS, 32, 32)])
    with pytest.raises(ValueError, match="rope_type"):
        NaFlexVit(rope_type="axial", **{k: v for k, v in TINY.items()})
    with pytest.raises(TypeError, match="unexpected keyword"):
        NaFlexVit(no_such_knob=1)
    with pytest.raises(ValueError, match="rope"):
        fastvit.from_timm(_timm_model("naflexvit_base_patch16_gap", rope_type="axial"))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kernels_on_gpu_within_torchs_error(dtype):
    """The fused path (Triton key-padding attention and patch embedding, the extension's LN->MLP and proj+residual)
    under autocast, against timm's own error in the same dtype, both measured from timm in fp64."""
    theirs = _timm_model("naflexvit_base_patch16_siglip").cuda()
    ours = fastvit.from_timm(theirs).eval()
    ours.set_backend({"qkv_attention": "triton", "ln_mlp": "cuda", "linear_residual": "cuda", "patch_embed": "triton"})
    exact = copy.deepcopy(theirs).double()
    for x in (_mixed_batch(), _images()):
        x = {k: v.cuda() for k, v in x.items()} if isinstance(x, dict) else x.cuda()
        x64 = (
            {k: v.double() if v.is_floating_point() else v for k, v in x.items()} if isinstance(x, dict) else x.double()
        )
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
            got, torch_same = ours(x).float(), theirs(x).float()
        with torch.no_grad():
            want = exact(x64)
        assert_within_torch_error(f"NaFlexVit logits {dtype}", got, torch_same, want)
