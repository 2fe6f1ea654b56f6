"""fastvit.ViT against timm's VisionTransformer: same state_dict, same logits and gradients (fp32, CPU).

timm's random-init weights are loaded into fastvit (strict), then logits and every parameter
gradient are compared. Presets run at reduced depth; options run on a tiny config.
"""

from __future__ import annotations

import pytest
import torch

import fastvit
from fastvit.layers import resample_abs_pos_embed

timm = pytest.importorskip("timm")
from timm.layers import resample_abs_pos_embed as timm_resample_abs_pos_embed  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

LOGIT_ATOL = 1e-5

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7)


def _logits_and_grads(model, x, weight):
    model.zero_grad(set_to_none=True)
    logits = model(x)
    (logits * weight).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def assert_parity(timm_model, ours, x, eval_mode=True):
    ours.load_state_dict(timm_model.state_dict(), strict=True)
    timm_model.train(not eval_mode)
    ours.train(not eval_mode)
    weight = torch.randn(timm_model(x).shape, generator=torch.Generator().manual_seed(3))
    timm_logits, timm_grads = _logits_and_grads(timm_model, x, weight)
    our_logits, our_grads = _logits_and_grads(ours, x, weight)
    assert our_logits.shape == timm_logits.shape
    error = (our_logits - timm_logits).abs().max().item()
    assert error <= LOGIT_ATOL, f"max |logits - timm| = {error:.3e}"
    assert set(our_grads) == set(timm_grads)
    for name, grad in timm_grads.items():
        scale = grad.abs().max().item()
        diff = (our_grads[name] - grad).abs().max().item()
        assert diff <= 1e-5 * max(scale, 1.0), f"{name}: grad differs by {diff:.3e} (scale {scale:.3e})"


PLAIN_KEYS = {"patch_size", "embed_dim", "depth", "num_heads"}
PRESET_NAMES = [name for name, config in fastvit.PRESETS.items() if set(config) == PLAIN_KEYS]  # plain ViTs


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_matches_timm(name):
    kwargs = dict(depth=2, num_classes=11)
    torch.manual_seed(0)
    timm_model = timm.create_model(name, pretrained=False, **kwargs)
    ours = fastvit.create_model(name, **kwargs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in timm_model.state_dict().items()
    }
    assert_parity(timm_model, ours, torch.randn(2, 3, 224, 224))


def test_presets_are_the_documented_architectures():
    assert set(PRESET_NAMES + ["vit_digits_patch4_32"]) <= set(fastvit.list_models())  # families: test_families.py
    for name in PRESET_NAMES:
        assert getattr(fastvit, name)(depth=1).embed_dim == fastvit.PRESETS[name]["embed_dim"]
        full = fastvit.PRESETS[name]
        timm_cfg = timm.create_model(name, pretrained=False, depth=1)  # compare shapes of the real presets
        assert timm_cfg.embed_dim == full["embed_dim"]
        assert timm_cfg.blocks[0].attn.num_heads == full["num_heads"]
        assert timm_cfg.patch_embed.patch_size == (full["patch_size"],) * 2


OPTIONS = [
    dict(),
    dict(global_pool="avg"),
    dict(global_pool="avgmax"),
    dict(global_pool="max"),
    dict(global_pool="", num_classes=0),
    dict(global_pool="avg", class_token=False),
    dict(global_pool="avg", fc_norm=False),
    dict(global_pool="token", fc_norm=True),
    dict(final_norm=False),
    dict(no_embed_class=True),
    dict(reg_tokens=4),
    dict(reg_tokens=2, no_embed_class=True, global_pool="avg"),
    dict(reg_tokens=2, class_token=False, global_pool="avg", pool_include_prefix=True),
    dict(pre_norm=True),
    dict(init_values=0.1),
    dict(qkv_bias=False),
    dict(proj_bias=False),
    dict(mlp_ratio=3.0),
    dict(pos_embed="none"),
    dict(img_size=(32, 48)),
    dict(patch_size=4, in_chans=1),
    dict(num_classes=0),
    dict(fix_init=True),
    dict(weight_init="jax"),
    dict(weight_init="moco"),
    dict(drop_rate=0.1, pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_option_matches_timm(options):
    config = {**TINY, **options}
    timm_model = TimmViT(**config)
    ours = fastvit.ViT(**config)
    size = config["img_size"] if isinstance(config["img_size"], tuple) else (config["img_size"],) * 2
    x = torch.randn(3, config.get("in_chans", 3), *size)
    assert_parity(timm_model, ours, x)


def test_layer_scale_and_gelu_tanh_match_timm():
    from functools import partial

    config = dict(TINY, init_values=0.5, act_layer=partial(torch.nn.GELU, approximate="tanh"))
    assert_parity(TimmViT(**config), fastvit.ViT(**config), torch.randn(2, 3, 32, 32))


def test_dropout_in_training_mode_is_active_and_eval_is_deterministic():
    model = fastvit.ViT(
        **TINY, drop_rate=0.3, proj_drop_rate=0.3, attn_drop_rate=0.3, drop_path_rate=0.3, patch_drop_rate=0.3
    )
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_weight_init_schemes():
    jax = fastvit.ViT(**TINY, weight_init="jax_nlhb")
    assert torch.count_nonzero(jax.head.weight) == 0
    torch.testing.assert_close(jax.head.bias, torch.full((7,), -torch.log(torch.tensor(7.0)).item()))
    timm_init = fastvit.ViT(**{**TINY, "embed_dim": 192, "num_heads": 3})
    assert abs(timm_init.blocks[0].mlp.fc1.weight.std().item() - 0.02) < 0.002
    assert torch.count_nonzero(timm_init.blocks[0].mlp.fc1.bias) == 0
    with pytest.raises(ValueError, match="weight_init must be one of"):
        fastvit.ViT(**TINY, weight_init="xavier")


@pytest.mark.parametrize("new_size", [(48, 48), (40, 24), (16, 16)])
@pytest.mark.parametrize("num_prefix", [0, 1, 3])
def test_resample_abs_pos_embed_matches_timm(new_size, num_prefix):
    posemb = torch.randn(1, num_prefix + 16, 24)
    ours = resample_abs_pos_embed(posemb, new_size, (4, 4), num_prefix_tokens=num_prefix)
    expected = timm_resample_abs_pos_embed(posemb, new_size, (4, 4), num_prefix_tokens=num_prefix)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("options", [dict(), dict(no_embed_class=True, reg_tokens=1)])
def test_dynamic_img_size_matches_timm(options):
    config = dict(TINY, dynamic_img_size=True, **options)
    timm_model, ours = TimmViT(**config), fastvit.ViT(**config)
    for size in [(32, 32), (48, 40), (16, 64)]:
        assert_parity(timm_model, ours, torch.randn(2, 3, *size))


def test_set_input_size_matches_timm():
    timm_model, ours = TimmViT(**TINY), fastvit.ViT(**TINY)
    ours.load_state_dict(timm_model.state_dict())
    timm_model.set_input_size(img_size=(48, 64))
    ours.set_input_size((48, 64))
    assert_parity(timm_model, ours, torch.randn(2, 3, 48, 64))


def test_fine_tune_at_higher_resolution_from_lower_resolution_weights():
    # 224 -> 384 px in miniature: weights of a 32 px model loaded into a 64 px model.
    small = TimmViT(**TINY)
    big = fastvit.load_weights(fastvit.ViT(**{**TINY, "img_size": 64}), small.state_dict())
    expected = timm_resample_abs_pos_embed(small.pos_embed.detach(), (8, 8), (4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(big.pos_embed.detach(), expected)
    assert big(torch.randn(1, 3, 64, 64)).shape == (1, 7)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(indices=1),
        dict(indices=[0, -1], norm=True),
        dict(output_fmt="NLC", return_prefix_tokens=True),
        dict(indices=[0], stop_early=True, intermediates_only=True),
    ],
)
def test_forward_intermediates_matches_timm(kwargs):
    config = dict(TINY, reg_tokens=1)
    timm_model, ours = TimmViT(**config).eval(), fastvit.ViT(**config).eval()
    ours.load_state_dict(timm_model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    expected, got = timm_model.forward_intermediates(x, **kwargs), ours.forward_intermediates(x, **kwargs)
    torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=1e-4)


def test_grad_checkpointing_gives_the_same_gradients():
    model = fastvit.ViT(**TINY)
    x = torch.randn(2, 3, 32, 32)
    weight = torch.randn(2, 7)
    logits, grads = _logits_and_grads(model, x, weight)
    model.set_grad_checkpointing(True)
    logits_ckpt, grads_ckpt = _logits_and_grads(model, x, weight)
    torch.testing.assert_close(logits_ckpt, logits)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name])


def test_timm_api_surface():
    timm_model, ours = TimmViT(**TINY), fastvit.ViT(**TINY)
    assert ours.no_weight_decay() == timm_model.no_weight_decay()
    assert ours.group_matcher() == timm_model.group_matcher()
    assert ours.num_features == ours.embed_dim == 48 and ours.num_prefix_tokens == 1
    ours.reset_classifier(5)
    assert ours.get_classifier().out_features == 5
    ours.reset_classifier(0, global_pool="avg")
    x = torch.randn(2, 3, 32, 32)
    assert ours(x).shape == (2, 48)
    assert ours.forward_head(ours.forward_features(x), pre_logits=True).shape == (2, 48)


def test_state_dict_round_trip_both_ways():
    ours = fastvit.ViT(**TINY, reg_tokens=2, init_values=1e-3)
    timm_model = TimmViT(**TINY, reg_tokens=2, init_values=1e-3)
    timm_model.load_state_dict(ours.state_dict(), strict=True)
    again = fastvit.ViT(**TINY, reg_tokens=2, init_values=1e-3)
    again.load_state_dict(timm_model.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_float64_model_and_device_dtype_arguments():
    model = fastvit.ViT(**TINY, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_torch_compile_fullgraph_matches_eager():
    model = fastvit.ViT(**TINY, backend="torch").eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x))


def test_explicit_backend_must_cover_every_op():
    with pytest.raises(ValueError, match="backend 'cuda' does not implement patch_embed"):
        fastvit.ViT(**TINY, backend="cuda")
    model = fastvit.ViT(**TINY)
    assert model.backend_plan("cpu") == dict.fromkeys(
        ("patch_embed", "layer_norm", "rms_norm", "ln_linear", "qkv_attention", "linear_residual", "ln_mlp"), "torch"
    )
