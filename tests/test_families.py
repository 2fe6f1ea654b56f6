"""The ViT families people use today (issue 17), on the torch path: SigLIP/SigLIP2, CLIP/OpenCLIP, DINOv2 (incl. the
giant's packed SwiGLU), qk-norm; and the parts they add, against ``fastvit.reference`` in fp64.

Each family is timm's own model at small depth and width (timm's architecture knobs: pooling, activation, norm eps,
MLP type and width, head dim), converted with ``fastvit.from_timm``. Parity is fp32 on the same math: logits and every
parameter gradient within 1e-5 of the largest magnitude (the DESIGN's fp32 rule; the two run the same PyTorch kernels,
so the measured error is at the level of fp32 summation-order noise, ~1e-7).
"""

from __future__ import annotations

import copy
import os
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastvit
from fastvit import reference
from fastvit.layers import (
    Attention,
    AttentionPoolLatent,
    GluMlp,
    LayerNorm,
    LayerScale,
    ParallelScalingBlock,
    QuickGELU,
    RmsNorm,
    SwiGLU,
    SwiGLUPacked,
    mlp_half_blockers,
)

from utils import FUSED, triton_skip_reason

timm = pytest.importorskip("timm")

REL_TOL = 1e-5  # fp32, same math on both sides (see the module docstring)


def small(**kwargs) -> dict:
    """A tiny model of a family: width 64, 2 heads, 32 px, unless ``kwargs`` say otherwise."""
    return dict(embed_dim=64, num_heads=2, img_size=32) | kwargs


# (test id, timm model name, small size kwargs). The comments say what each one exercises.
FAMILIES = [
    # SigLIP: no class token, attention-pool head ('map'), 4x MLP.
    ("siglip", "vit_base_patch16_siglip_224", small()),
    # SigLIP so400m: head dim 72, MLP 1152 -> 4304 (ratio 3.7362), 384 px with patch 14 (a remainder the conv drops).
    ("siglip-so400m", "vit_so400m_patch14_siglip_384", small(embed_dim=144, img_size=46)),
    # SigLIP2 so400m/16: GELU tanh; head dim 96 here.
    ("siglip2", "vit_so400m_patch16_siglip_256", small(embed_dim=192)),
    # OpenCLIP / CLIP-L/14-336: pre-norm, eps 1e-5, no patch-embedding bias.
    ("clip", "vit_large_patch14_clip_336", small(img_size=28)),
    # OpenAI CLIP weights: QuickGELU; head dim 80 (as H/14).
    ("clip-quickgelu", "vit_base_patch32_clip_quickgelu_224", small(embed_dim=160, img_size=64)),
    # DINOv2: LayerScale, 518 px grid resampled, register tokens in the reg4 variant.
    ("dinov2", "vit_base_patch14_dinov2", small(img_size=28)),
    ("dinov2-reg4", "vit_base_patch14_reg4_dinov2", small(img_size=28)),
    # DINOv2 giant: packed SwiGLU (SwiGLUPacked, SiLU).
    ("dinov2-giant", "vit_giant_patch14_dinov2", small(embed_dim=96, img_size=28)),
    # AIMv2: RmsNorm (also on the patch embedding), split SwiGLU, no qkv/proj bias, avg pooling without fc_norm.
    ("aimv2", "aimv2_large_patch14_224", small(img_size=28)),
    # DeiT3: LayerScale, no class-token position embedding (no_embed_class).
    ("deit3", "deit3_base_patch16_224", small()),
    # qk-norm (timm's qk_norm=True, keys attn.q_norm/k_norm) on a plain ViT.
    ("qk-norm", "vit_base_patch16_224", small(qk_norm=True)),
    # The _xp models: ParallelScalingBlock (attention and MLP side by side, one in_proj), RmsNorm qk-norm, pre-norm.
    ("xp", "vit_base_patch16_xp_224", small()),
    ("xp-qkv-bias", "vit_base_patch16_xp_224", small(qkv_bias=True)),
    # timm's Eva class (fastvit.Eva): 2D RoPE.
    # EVA02: interleaved RoPE rescaled to the pretraining grid, separate q/k/v (no k bias), SwiGLU with sub-LN.
    ("eva02", "eva02_base_patch14_448", small(img_size=56)),
    # EVA02-CLIP: fused qkv with q/v biases, a norm before the attention proj (scale_attn_inner).
    ("eva02-clip", "eva02_base_patch16_clip_224", small(img_size=48)),
    # DINOv3: rotate-half RoPE on patch centres, 4 registers + class token untouched, no abs. position embedding,
    # LayerScale, no qkv bias, eps 1e-5, dynamic image size; S+ has packed SwiGLU, _qkvb q/v biases.
    ("dinov3", "vit_base_patch16_dinov3", small(img_size=48)),
    ("dinov3-splus", "vit_small_plus_patch16_dinov3", small(img_size=48)),
    ("dinov3-qkvb", "vit_small_patch16_dinov3_qkvb", small(img_size=48)),
    # timm RoPE ViT: 'xy' grid indexing, AttentionRope (plain qkv bias), token pooling.
    ("rope-vit", "vit_base_patch16_rope_224", small(img_size=48)),
    # RoPE-Mixed: learned per-block, per-head frequencies (key rope.freqs, trained); _ape adds an abs. embedding.
    ("rope-mixed", "vit_base_patch16_rope_mixed_224", small(img_size=48)),
    ("rope-mixed-ape", "vit_base_patch16_rope_mixed_ape_224", small(img_size=48)),
    # Perception Encoder: attention-pool head with its own heads, pre-norm, grid offset 1, ref grid.
    ("pe-core", "vit_pe_core_base_patch16_224", small(img_size=48, attn_pool_num_heads=4)),
]
IDS = [family[0] for family in FAMILIES]
EVA = {
    "eva02",
    "eva02-clip",
    "dinov3",
    "dinov3-splus",
    "dinov3-qkvb",
    "rope-vit",
    "rope-mixed",
    "rope-mixed-ape",
    "pe-core",
}


def _timm_model(name: str, size: dict, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, depth=2, num_classes=5, **size, **kwargs)
    with torch.no_grad():  # timm zero-inits some parts (latent, biases, LayerScale 1e-5): make every path count
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


def _images(model: nn.Module, batch: int = 2, size=None) -> torch.Tensor:
    size = size or model.patch_embed.img_size
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))


def _logits_and_grads(model: nn.Module, x: torch.Tensor, weight: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(x)
    (logits * weight).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over max |want| (the fp32 parity measure)."""
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def assert_same_logits_and_grads(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> float:
    """Logits and every parameter gradient of ``ours`` within REL_TOL of ``theirs``; returns the worst error."""
    weight = torch.randn(5, generator=torch.Generator().manual_seed(2)).expand(x.shape[0], 5)
    want_logits, want_grads = _logits_and_grads(theirs, x, weight)
    got_logits, got_grads = _logits_and_grads(ours, x, weight)
    errors = {"logits": relative_error(got_logits, want_logits)}
    assert set(got_grads) == set(want_grads)
    errors.update({name: relative_error(got_grads[name], grad) for name, grad in want_grads.items()})
    worst = max(errors, key=errors.get)
    print(f"worst relative error {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= REL_TOL, f"{worst}: relative error {errors[worst]:.3e} > {REL_TOL}"
    return errors[worst]


@pytest.mark.parametrize("name, size", [family[1:] for family in FAMILIES], ids=IDS)
def test_from_timm_matches_logits_and_every_gradient(name, size):
    theirs = _timm_model(name, size).eval()
    ours = fastvit.from_timm(theirs).eval()
    assert ours.backend_plan("cpu")["qkv_attention"] == "torch"
    assert_same_logits_and_grads(ours, theirs, _images(theirs))


@pytest.mark.parametrize("name, size", [family[1:] for family in FAMILIES], ids=IDS)
def test_state_dict_round_trip_both_ways(name, size):
    theirs = _timm_model(name, size)
    ours = fastvit.from_timm(theirs)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    back = _timm_model(name, size)
    with torch.no_grad():
        for param in back.parameters():
            param.zero_()
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    if type(ours).__name__ == "Eva":  # RoPE settings are not in the weights: build the model, then load_weights
        # Eva's own keys say so in a clear error (PE's keys are a plain ViT's: its RoPE cannot be seen in them)
        if any(key.endswith(("gamma_1", "q_bias", "q_proj.weight")) for key in theirs.state_dict()):
            with pytest.raises(ValueError, match="Eva class"):
                fastvit.from_timm(theirs.state_dict())
        fresh = fastvit.from_timm(theirs)
        fastvit.load_weights(fresh, theirs.state_dict())
        return
    # and from the state dict alone, with what weights do not record given as arguments
    again = fastvit.from_timm(theirs.state_dict(), **_unrecorded(ours))
    assert_same_logits_and_grads(again.eval(), theirs.eval(), _images(theirs))


def _unrecorded(model: fastvit.ViT) -> dict:
    """What a state dict does not record (heads, image size, eps, activation), read off a built model."""
    block = model.blocks[0]
    parallel = isinstance(block, ParallelScalingBlock)  # its norm, heads and activation sit on the block itself
    norm, act = (block.in_norm, block.mlp_act) if parallel else (block.norm1, block.mlp.act)
    embed_norm = model.patch_embed.norm
    if not isinstance(embed_norm, nn.Identity):
        extra = dict(embed_norm_layer=partial(type(embed_norm), eps=embed_norm.eps))
    else:
        extra = {}
    return dict(
        **extra,
        num_heads=(block if parallel else block.attn).num_heads,
        img_size=model.patch_embed.img_size,
        norm_layer=partial(type(norm), eps=norm.eps),
        act_layer=type(act) if not isinstance(act, nn.GELU) else partial(nn.GELU, approximate=act.approximate),
        global_pool=model.global_pool,
    )


@pytest.mark.parametrize("name, size", [family[1:] for family in FAMILIES], ids=IDS)
def test_resolution_change(name, size):
    theirs = _timm_model(name, size).eval()
    ours = fastvit.from_timm(theirs).eval()
    patch = theirs.patch_embed.patch_size[0]
    new_size = (3 * patch, 4 * patch)
    theirs.set_input_size(new_size)
    ours.set_input_size(new_size)
    x = _images(theirs, size=new_size)
    error = relative_error(ours(x), theirs(x))
    assert error <= REL_TOL, error


@pytest.mark.parametrize("name, size", [family[1:] for family in FAMILIES], ids=IDS)
def test_one_training_step_matches_timm(name, size):
    theirs = _timm_model(name, size).train()
    ours = fastvit.from_timm(theirs).train()
    x, target = _images(theirs), torch.tensor([1, 3])
    for model in (theirs, ours):
        # SGD: a step moves each parameter by lr * grad, so the gradients' agreement carries over. (Adam's first step
        # is lr * grad / |grad|: a sign flip of a near-zero gradient, fp32 noise, would move it by 2 * lr.)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        F.cross_entropy(model(x), target).backward()
        optimizer.step()
    for key, value in theirs.state_dict().items():
        assert relative_error(ours.state_dict()[key], value) <= REL_TOL, key


@pytest.mark.parametrize(
    "name, size",
    [
        ("vit_so400m_patch14_siglip_384", dict(embed_dim=144, num_heads=2, img_size=46)),  # map pooling, head dim 72
        ("vit_base_patch16_dinov3", dict(embed_dim=64, num_heads=2, img_size=48)),  # RoPE, registers, LayerScale
        ("vit_base_patch16_rope_mixed_224", dict(embed_dim=64, num_heads=2, img_size=48)),  # learned per-block RoPE
        ("vit_base_patch16_xp_224", dict(embed_dim=64, num_heads=2, img_size=32)),  # parallel blocks, qk-norm
        ("eva02_base_patch14_448", dict(embed_dim=64, num_heads=2, img_size=56)),  # q/k/v Linears, SwiGLU + sub-LN
        ("aimv2_large_patch14_224", dict(embed_dim=64, num_heads=2, img_size=28)),  # RmsNorm, split SwiGLU, avg pool
        ("vit_base_patch32_clip_quickgelu_224", dict(embed_dim=64, num_heads=2, img_size=64)),  # pre-norm, QuickGELU
        ("vit_giant_patch14_dinov2", dict(embed_dim=96, num_heads=2, img_size=28)),  # LayerScale, packed SwiGLU
        ("vit_pe_core_base_patch16_224", dict(embed_dim=64, num_heads=2, img_size=48, attn_pool_num_heads=4)),  # PE
        ("deit3_base_patch16_224", dict(embed_dim=64, num_heads=2, img_size=32)),  # LayerScale, no_embed_class
    ],
    ids=[
        "siglip-so400m",
        "dinov3",
        "rope-mixed",
        "xp",
        "eva02",
        "aimv2",
        "clip-quickgelu",
        "dinov2-giant",
        "pe",
        "deit3",
    ],
)
def test_torch_compile_fullgraph(name, size):
    theirs = _timm_model(name, size).eval()
    ours = fastvit.from_timm(theirs).eval().set_backend("torch")
    x = _images(theirs)
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), ours(x))


# ------------------------------------------------------------------------------------------------
# Presets and refusals


PLAIN_KEYS = {"patch_size", "embed_dim", "depth", "num_heads"}  # the plain ViTs: tests/test_model_parity.py
PRESETS = [
    name
    for name in fastvit.list_models()
    if name != "vit_digits_patch4_32"
    and set(fastvit.PRESETS.get(name, {})) != PLAIN_KEYS
    and not name.startswith("naflexvit_")  # tests/test_naflex.py (no patch_embed: NaFlexEmbeds)
]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_is_timms_architecture(name):
    theirs = timm.create_model(name, pretrained=False, depth=1)
    ours = fastvit.create_model(name, depth=1)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert ours.patch_embed.img_size == theirs.patch_embed.img_size
    assert type(ours.blocks[0].mlp.act).__name__ == type(theirs.blocks[0].mlp.act).__name__.replace("Tanh", "")
    assert ours.blocks[0].norm1.eps == theirs.blocks[0].norm1.eps
    assert name in fastvit.list_models() and type(ours).__name__ == type(theirs).__name__


def test_parallel_blocks_swap_explain_and_refusals():
    from fastvit.explain import attention_rollout

    theirs = _timm_model("vit_base_patch16_xp_224", dict(embed_dim=64, num_heads=2, img_size=32)).eval()
    x = _images(theirs)
    with torch.no_grad():
        want = theirs(x)
        swapped = fastvit.optimize(copy.deepcopy(theirs), backend="torch")  # blocks swapped in place, weights shared
        assert type(swapped.blocks[0]).__name__ == "ParallelScalingBlock"
        assert relative_error(swapped(x), want) <= REL_TOL
    ours = fastvit.from_timm(theirs).eval()
    assert attention_rollout(ours, x[:1]).shape == (1, 2, 2)  # a parallel block's attention
    report = ours.fusion_report()
    assert "ln_linear: 'auto' runs the torch backend" in str(report)  # the in_proj GEMM, reported with the MLP half
    assert report[0]["attn"].backends["linear_residual"] == "torch"
    parallel_vit = timm.create_model("vit_small_patch16_18x2_224", pretrained=False, depth=1, embed_dim=64, num_heads=2)
    for convert in (fastvit.from_timm, fastvit.optimize):
        with pytest.raises(ValueError, match="block_fn=ParallelThingsBlock is not supported"):
            convert(parallel_vit)
    with pytest.raises(TypeError, match="for timm's Eva use fastvit.from_timm"):
        fastvit.optimize(timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1))


@pytest.mark.parametrize("fuse_out_proj", [False, True])
def test_parallel_block_matches_timms_and_its_unfused_path(fuse_out_proj):
    """timm's VisionTransformer cannot pass fuse_out_proj: compare the blocks themselves; and the fused residual path
    (two ops.linear_residual calls) against the modules, which LayerScale forces."""
    from timm.models.vision_transformer import ParallelScalingBlock as TimmParallelBlock

    from fastvit.layers import parallel_block_blockers

    torch.manual_seed(0)
    kwargs = dict(dim=32, num_heads=2, qk_norm=True, fuse_out_proj=fuse_out_proj)
    theirs = TimmParallelBlock(**kwargs, norm_layer=nn.LayerNorm).eval()
    ours = ParallelScalingBlock(**kwargs, norm_layer=partial(LayerNorm, eps=1e-5)).eval()
    with torch.no_grad():
        for param in theirs.parameters():
            param.add_(0.05 * torch.randn_like(param))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert relative_error(ours(x), theirs(x)) <= REL_TOL
        unfused = next(parallel_block_blockers(ours), None)
        assert (unfused is None) != fuse_out_proj
        ours.ls = LayerScale(32, init_values=1.0)  # gamma 1: same function, the modules' path
        assert next(parallel_block_blockers(ours)).startswith(
            "fuse_out_proj" if fuse_out_proj else "ls is a LayerScale"
        )
        assert relative_error(ours(x), theirs(x)) <= REL_TOL


@pytest.mark.parametrize(
    "kwargs, knob",
    [
        (dict(use_post_norm=True), "use_post_norm"),
        (dict(attn_type="rope", qkv_fused=False, num_kv_heads=1), "num_kv_heads"),
        (dict(use_rot_pos_emb=True, rope_shift_coords=0.5), "coordinate augmentation"),
    ],
)
def test_unsupported_eva_knobs_are_one_clear_error(kwargs, knob):
    from timm.models.eva import Eva as TimmEva

    model = TimmEva(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, **kwargs)
    with pytest.raises(ValueError, match=knob):
        fastvit.from_timm(model)


def test_optimize_swaps_family_blocks_in_place():
    theirs = _timm_model("vit_giant_patch14_dinov2", dict(embed_dim=96, num_heads=2, img_size=28)).eval()
    x = _images(theirs)
    want = theirs(x)
    optimized = fastvit.optimize(copy.deepcopy(theirs), backend="torch")
    assert type(optimized.blocks[0]).__module__ == "fastvit.layers"
    assert relative_error(optimized(x), want) <= REL_TOL


def test_map_pooling_reset_classifier():
    model = fastvit.ViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, class_token=False,
                        global_pool="map", num_classes=3)  # fmt: skip
    with pytest.raises(ValueError, match="global_pool='map' cannot be added"):
        fastvit.ViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2).reset_classifier(3, "map")
    model.reset_classifier(4, "avg")
    assert model.attn_pool is None and model(torch.randn(1, 3, 16, 16)).shape == (1, 4)


# ------------------------------------------------------------------------------------------------
# Fusion: what runs fused in each family


def test_fusion_report_names_the_unfused_family_parts():
    base = dict(img_size=16, patch_size=4, embed_dim=64, depth=1, num_heads=2, num_classes=3)
    # SwiGLU and QuickGELU MLP halves are one ops.ln_mlp call now (tests/test_ln_mlp_variants.py).
    swiglu = fastvit.ViT(**base, mlp_layer=SwiGLUPacked, act_layer="silu", mlp_ratio=8.0)
    quick = fastvit.ViT(**base, act_layer="quick_gelu")
    for model in (swiglu, quick):
        assert next(mlp_half_blockers(model.blocks[0]), None) is None
    qk = fastvit.ViT(**base, qk_norm=True).fusion_report()  # qk-norm is qkv_attention's prologue
    assert "qk-norm" not in " ".join(qk[0]["attn"].why_not) and "qkv_attention" in qk[0]["attn"].backends
    siglip = fastvit.ViT(**base, class_token=False, global_pool="map").fusion_report()
    assert siglip.pool is not None and "attn_pool mlp" in str(siglip)
    eva = fastvit.Eva(**base, use_rot_pos_emb=True, global_pool="avg").fusion_report()  # GELU Mlp, no LayerScale
    assert {"qkv_attention", "linear_residual"} <= set(eva[0]["attn"].backends)  # proj + residual: one op
    assert not any("attn." in w or "drop_path" in w for w in eva[0]["attn"].why_not)  # no structural blocker
    assert not any("gated" in w for w in eva[0]["mlp"].why_not)
    dinov3 = fastvit.create_model("vit_base_patch16_dinov3", depth=1, embed_dim=64, num_heads=2).fusion_report()
    assert not any("gamma_2" in w for w in dinov3[0]["mlp"].why_not)  # LayerScale: folded into fc2


FUSED_SKIP_REASON = triton_skip_reason() or (
    "FASTVIT_NO_EXT=1: the extension is not built" if os.environ.get("FASTVIT_NO_EXT") == "1" else None
)


@pytest.mark.parametrize(
    "name, size",
    [
        # SigLIP2, head dim 32 (the Triton kernels' coverage), GELU tanh: blocks whole (attention, proj + residual,
        # LN-MLP) and the pool's LN-MLP and one-query attention.
        ("vit_so400m_patch16_siglip_256", dict(embed_dim=64, num_heads=2, img_size=48)),
        # PE (Eva): the attention kernel on RoPE-rotated q/k, LN-MLP in the blocks and the pool.
        ("vit_pe_core_base_patch16_224", dict(embed_dim=64, num_heads=2, img_size=48, attn_pool_num_heads=2)),
        # DINOv3 (Eva): RoPE prologue, LayerScale gamma_1 folded into proj + residual, gamma_2 into fc2.
        ("vit_base_patch16_dinov3", dict(embed_dim=64, num_heads=2, img_size=32)),
        # DINOv2 (ViT): ls1 folded into proj + residual, norm1 + qkv through ops.ln_linear (FUSED: Triton GEMM).
        ("vit_base_patch14_dinov2", dict(embed_dim=64, num_heads=2, img_size=28)),
        # EVA02: interleaved RoPE prologue, SwiGLU with sub-LN in the extension.
        ("eva02_tiny_patch14_224", dict(embed_dim=64, num_heads=2, img_size=28)),
        # AIMv2: the patch embedding's RMSNorm inside the one ops.patch_embed call; RMSNorm -> split SwiGLU MLP.
        ("aimv2_large_patch14_224", dict(embed_dim=64, num_heads=2, img_size=28)),
    ],
    ids=["siglip2", "pe-core", "dinov3", "dinov2", "eva02", "aimv2"],
)
@pytest.mark.skipif(FUSED_SKIP_REASON is not None, reason=str(FUSED_SKIP_REASON))
def test_fused_backends_match_timm(name, size):
    theirs = _timm_model(name, size).eval()
    ours = fastvit.from_timm(theirs).eval().set_backend(FUSED)
    report = ours.fusion_report()
    assert all(half.fused for block in report for half in block.values()), str(report)  # every block whole
    assert report.embed.fused and report.embed.backends == {"patch_embed": "triton"}, str(report)
    assert report.pool is None or report.pool["mlp"].fused, str(report)
    assert set(report[0]["attn"].backends.values()) <= {"triton", "cuda"}, str(report)
    assert_same_logits_and_grads(ours, theirs, _images(theirs, batch=1))


@pytest.mark.skipif(FUSED_SKIP_REASON is not None, reason=str(FUSED_SKIP_REASON))
def test_parallel_block_attention_is_the_prologue_kernel_on_the_in_proj_slice():
    """The _xp block's q, k, v are a strided [B, N, 3C] slice of in_proj's output; qk-norm runs as the prologue."""
    theirs = _timm_model("vit_base_patch16_xp_224", dict(embed_dim=64, num_heads=2, img_size=32)).eval()
    ours = fastvit.from_timm(theirs).eval().set_backend(FUSED)
    report = ours.fusion_report()
    assert report[0]["attn"].fused and report[0]["attn"].backends["qkv_attention"] == "triton", str(report)
    assert report[0]["mlp"].fused and report[0]["mlp"].backends["ln_linear"] == "triton", str(report)
    assert_same_logits_and_grads(ours, theirs, _images(theirs, batch=1))


@pytest.mark.skipif(FUSED_SKIP_REASON is not None, reason=str(FUSED_SKIP_REASON))
@pytest.mark.parametrize("qkv_bias, norm_layer", [(False, LayerNorm), (True, RmsNorm)], ids=["mlp_bias-ln", "bias-rms"])
def test_parallel_block_in_proj_is_one_gemm_with_the_norm_and_the_mlp_activation_fused(qkv_bias, norm_layer):
    """in_norm -> in_proj -> GELU on the MLP's columns as one ops.ln_linear call on the Triton GEMM (fc1's separate
    ``mlp_bias`` entering as the bias of those columns), forward and every gradient vs the module path in fp64."""
    from fastvit.fusion import parallel_block_fusion
    from fastvit.layers import in_proj_blockers

    torch.manual_seed(0)
    block = _randomise(ParallelScalingBlock(32, num_heads=2, qkv_bias=qkv_bias, qk_norm=True, norm_layer=norm_layer))
    exact = copy.deepcopy(block).double()  # the module path (torch backends) in fp64
    block.in_proj.backend = "triton"  # the ln_linear op; the rest as auto picks on CPU
    x = torch.randn(2, 9, 32)
    assert block.in_proj_fusion(x) is not None and exact.in_proj_fusion(x.double()) is None
    assert parallel_block_fusion(block, x.device, x.dtype)["mlp"].backends["ln_linear"] == "triton"
    got, got_grads = _output_and_grads(block, x)
    want, want_grads = _output_and_grads(exact, x.double())
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-4)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad.float(), atol=1e-5, rtol=1e-4, msg=name)
    block.mlp_act = nn.SiLU()
    assert block.in_proj_fusion(x) is None and "mlp_act is a SiLU" in next(in_proj_blockers(block))


def _output_and_grads(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A module's output and the gradients of x and every parameter under fixed output weights."""
    x = x.clone().requires_grad_(True)
    out = module(x)
    weight = torch.cos(torch.arange(out.numel(), dtype=out.dtype)).reshape(out.shape)
    grads = torch.autograd.grad((out * weight).sum(), [x, *module.parameters()])
    return out.detach(), dict(zip(["x", *dict(module.named_parameters())], grads))


# ------------------------------------------------------------------------------------------------
# The parts against their specs (fp64: what is left is the modules' arithmetic, not rounding)

F64 = dict(dtype=torch.float64)


def _check_against_spec(module, spec, x: torch.Tensor, params=None) -> None:
    params = list(module.parameters()) if params is None else params
    x = x.clone().requires_grad_(True)
    got = module(x)
    got_grads = torch.autograd.grad(got.sum(), [x, *params])
    want = spec(x)
    want_grads = torch.autograd.grad(want.sum(), [x, *params])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    for got_grad, want_grad in zip(got_grads, want_grads):
        torch.testing.assert_close(got_grad, want_grad, atol=1e-12, rtol=1e-10)


def _randomise(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.5)
    return module


X = torch.randn(2, 7, 12, **F64)


def test_quick_gelu_and_rms_norm_match_the_spec():
    _check_against_spec(QuickGELU(), reference.quick_gelu, X)
    norm = _randomise(RmsNorm(12, eps=1e-5, **F64))
    _check_against_spec(norm, lambda x: reference.rms_norm(x, norm.weight, 1e-5), X)


@pytest.mark.parametrize("gate_last", [False, True])
def test_packed_glu_mlp_matches_the_spec(gate_last):
    mlp = _randomise(GluMlp(12, 10, act_layer=nn.SiLU, gate_last=gate_last, norm_layer=LayerNorm, **F64))
    spec = partial(
        reference.glu_mlp, fc1_weight=mlp.fc1.weight, fc1_bias=mlp.fc1.bias, fc2_weight=mlp.fc2.weight,
        fc2_bias=mlp.fc2.bias, act=F.silu, gate_last=gate_last,
        norm=lambda h: reference.layer_norm(h, mlp.norm.weight, mlp.norm.bias, mlp.norm.eps),
    )  # fmt: skip
    _check_against_spec(mlp, spec, X)


def test_split_swiglu_with_sub_ln_matches_the_spec():
    mlp = _randomise(SwiGLU(12, 6, norm_layer=LayerNorm, **F64))
    spec = partial(
        reference.swiglu_mlp, fc1_g_weight=mlp.fc1_g.weight, fc1_g_bias=mlp.fc1_g.bias, fc1_x_weight=mlp.fc1_x.weight,
        fc1_x_bias=mlp.fc1_x.bias, fc2_weight=mlp.fc2.weight, fc2_bias=mlp.fc2.bias,
        norm=lambda h: reference.layer_norm(h, mlp.norm.weight, mlp.norm.bias, mlp.norm.eps),
    )  # fmt: skip
    _check_against_spec(mlp, spec, X)


@pytest.mark.parametrize("norm_layer", [LayerNorm, RmsNorm])
def test_qk_norm_attention_matches_the_spec(norm_layer):
    attn = _randomise(Attention(12, num_heads=2, qkv_bias=True, qk_norm=True, norm_layer=norm_layer, **F64))

    def head_norm(module):
        if isinstance(module, RmsNorm):
            return lambda t: reference.rms_norm(t, module.weight, module.eps)
        return lambda t: reference.layer_norm(t, module.weight, module.bias, module.eps)

    def spec(x):
        qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias)
        out = reference.qk_norm_attention(qkv, 2, head_norm(attn.q_norm), head_norm(attn.k_norm))
        return F.linear(out, attn.proj.weight, attn.proj.bias)

    _check_against_spec(attn, spec, X)


def test_attention_pool_matches_the_spec():
    pool = _randomise(AttentionPoolLatent(12, num_heads=3, mlp_ratio=2.0, **F64))

    def spec(x):
        mlp = pool.mlp
        return reference.attention_pool(
            x, pool.latent, pool.q.weight, pool.q.bias, pool.kv.weight, pool.kv.bias, pool.proj.weight,
            pool.proj.bias, 3, norm=lambda y: reference.layer_norm(y, pool.norm.weight, pool.norm.bias, pool.norm.eps),
            mlp=lambda y: F.linear(F.gelu(F.linear(y, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias),
        )  # fmt: skip

    _check_against_spec(pool, spec, X)


@pytest.mark.parametrize("rotate_half", [False, True], ids=["interleaved", "rotate-half"])
def test_rope_matches_the_spec_and_timm(rotate_half):
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    from fastvit.layers import apply_rope

    x = torch.randn(2, 3, 1 + 12, 8, **F64)  # one prefix token, a 3x4 grid, head dim 8
    rope = torch.randn(12, 16, **F64)
    want = reference.apply_rope(x, rope, num_prefix_tokens=1, rotate_half=rotate_half)
    torch.testing.assert_close(want[:, :, :1], x[:, :, :1], atol=0, rtol=0)  # the prefix token is not rotated
    timm_out = apply_rot_embed_cat(x[:, :, 1:], rope, half=rotate_half)
    torch.testing.assert_close(want[:, :, 1:], timm_out, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(apply_rope(x, rope, 1, rotate_half), want, atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize(
    "name, size", [f[1:] for f in FAMILIES if f[0] in EVA], ids=[f[0] for f in FAMILIES if f[0] in EVA]
)
def test_rope_table_is_timms(name, size):
    theirs = _timm_model(name, size)
    ours = fastvit.from_timm(theirs)
    for grid in (theirs.patch_embed.grid_size, (2, 5)):
        want = (
            theirs.rope.get_embed(shape=list(grid))
            if theirs.dynamic_img_size or grid != theirs.patch_embed.grid_size
            else theirs.rope.get_embed()
        )
        if grid != theirs.patch_embed.grid_size and not theirs.dynamic_img_size:
            continue  # a fixed-size timm model's RoPE has one grid
        torch.testing.assert_close(ours.rope(grid, torch.device("cpu")), want, atol=1e-6, rtol=1e-6)


def test_mixed_rope_initial_frequencies_have_timms_magnitudes_and_turns():
    from fastvit.eva import init_mixed_rope_freqs

    freqs = init_mixed_rope_freqs(head_dim=16, depth=3, num_heads=2, temperature=10.0)  # [2, depth, heads, D/2]
    magnitude = 1.0 / 10.0 ** (torch.arange(0, 16, 4) / 16)
    torch.testing.assert_close(freqs.norm(dim=0), magnitude.repeat(2).expand(3, 2, -1))
    angle = torch.atan2(freqs[1], freqs[0])  # the second half is the first turned by 90 degrees
    turn = torch.remainder(angle[..., 4:] - angle[..., :4], 2 * torch.pi)
    torch.testing.assert_close(turn, torch.full_like(turn, torch.pi / 2))


def test_eva_attention_with_rope_and_qk_norm_matches_the_spec():
    from fastvit.eva import rope_table
    from fastvit.layers import EvaAttention

    attn = EvaAttention(16, num_heads=2, qkv_bias=True, qk_norm=True, num_prefix_tokens=1, rotate_half=True, **F64)
    attn = _randomise(attn)
    rope = rope_table((2, 3), 8, rope_type="dinov3", temperature=100.0, rotate_half=True).double()
    x = torch.randn(2, 7, 16, **F64)

    def spec(x):
        qkv = F.linear(x, attn.qkv.weight, torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias]))
        norm = lambda m: lambda t: reference.layer_norm(t, m.weight, m.bias, m.eps)  # noqa: E731
        out = reference.qk_norm_attention(
            qkv, 2, norm(attn.q_norm), norm(attn.k_norm), rope=rope, num_prefix_tokens=1, rotate_half=True
        )
        return F.linear(reference.layer_norm(out, attn.norm.weight, attn.norm.bias, attn.norm.eps), attn.proj.weight,
                        attn.proj.bias)  # fmt: skip

    _check_against_spec(lambda t: attn(t, rope), spec, x, params=list(attn.parameters()))


@pytest.mark.parametrize(
    "name",
    [
        "vit_base_patch16_siglip_224",
        "vit_base_patch16_dinov3",
        "vit_base_patch16_224",
        "vit_base_patch16_rope_mixed_224",
    ],
)
def test_attention_rollout_covers_map_pooling_rope_and_qk_norm(name):
    from fastvit.explain import attention_rollout

    extra = dict(qk_norm=True) if name == "vit_base_patch16_224" else {}
    if "mixed" in name:  # not a preset: timm's architecture, converted
        model = fastvit.from_timm(
            timm.create_model(name, pretrained=False, depth=2, embed_dim=64, num_heads=2, img_size=48)
        )
    else:
        model = fastvit.create_model(name, depth=2, embed_dim=64, num_heads=2, img_size=48, **extra)
    heat = attention_rollout(model, torch.randn(2, 3, 48, 48))
    assert heat.shape == (2, 3, 3) and torch.allclose(heat.sum(dim=(1, 2)), torch.ones(2))


TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=3)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: fastvit.ViT(**TINY_VIT, act_layer="relu6"), "act_layer.*relu6"),
        (lambda: fastvit.ViT(**TINY_VIT, norm_layer="batchnorm"), "norm_layer.*batchnorm"),
        (lambda: fastvit.ViT(**TINY_VIT, mlp_layer=GluMlp, mlp_ratio=33 / 32), "hidden_features must be even"),
        (lambda: fastvit.Eva(**TINY_VIT, use_rot_pos_emb=True, rope_type="mrope"), "rope_type must be one of"),
        (lambda: fastvit.Eva(**TINY_VIT, rope_grid_indexing="yx"), "rope_grid_indexing must be 'ij' or 'xy'"),
        (lambda: fastvit.Eva(**TINY_VIT, attn_type="gqa"), "attn_type must be 'eva' or 'rope'"),
        (lambda: fastvit.Eva(**{**TINY_VIT, "embed_dim": 36, "num_heads": 6}, use_rot_pos_emb=True), "divisible by 4"),
    ],
    ids=["act", "norm", "glu-width", "rope-type", "rope-indexing", "attn-type", "rope-head-dim"],
)
def test_bad_family_knobs_are_value_errors_naming_them(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "name, size",
    [
        ("vit_base_patch16_dinov3", dict(embed_dim=64, num_heads=2, img_size=48)),
        ("vit_base_patch16_siglip_224", dict(embed_dim=64, num_heads=2, img_size=32)),
    ],
    ids=["dinov3", "siglip"],
)
def test_forward_intermediates_and_grad_checkpointing_match_timm(name, size):
    theirs = _timm_model(name, size).eval()
    ours = fastvit.from_timm(theirs).eval()
    x = _images(theirs)
    want_final, want = theirs.forward_intermediates(x, indices=2, return_prefix_tokens=True)
    got_final, got = ours.forward_intermediates(x, indices=2, return_prefix_tokens=True)
    assert relative_error(got_final, want_final) <= REL_TOL
    for (got_map, got_prefix), (want_map, want_prefix) in zip(got, want):
        assert relative_error(got_map, want_map) <= REL_TOL and relative_error(got_prefix, want_prefix) <= REL_TOL
    ours.train().set_grad_checkpointing(True)
    assert_same_logits_and_grads(ours, theirs.train(), x)


@pytest.mark.parametrize("name", ["vit_base_patch16_rope_mixed_224", "vit_base_patch16_xp_224"])
def test_forward_intermediates_match_timms(name):
    """Per-block arguments (RoPE-Mixed's own table per block) and parallel blocks through forward_intermediates."""
    theirs = _timm_model(name, dict(embed_dim=64, num_heads=2, img_size=48)).eval()
    ours = fastvit.from_timm(theirs).eval()
    x = _images(theirs)
    with torch.no_grad():
        want = theirs.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        got = ours.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
    for g, w in zip(got, want, strict=True):
        assert relative_error(g, w) <= REL_TOL
