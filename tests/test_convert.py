"""Converters and weight loading: timm, torchvision and Hugging Face ViTs in and out of fastvit."""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch

import fastvit
from fastvit import convert
from fastvit.layers import LayerNorm

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _assert_same_state(a: dict, b: dict):
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_from_timm_module_and_state_dict():
    timm_model = TimmViT(**TINY, global_pool="avg", reg_tokens=1, init_values=0.1).eval()
    from_module = fastvit.from_timm(timm_model).eval()
    torch.testing.assert_close(from_module(X), timm_model(X), atol=1e-5, rtol=1e-4)
    from_state = fastvit.from_timm(timm_model.state_dict(), num_heads=3, global_pool="avg").eval()
    torch.testing.assert_close(from_state(X), timm_model(X), atol=1e-5, rtol=1e-4)


def test_from_timm_reads_eps_and_image_size():
    timm_model = TimmViT(**{**TINY, "img_size": (32, 48)}, norm_layer=partial(torch.nn.LayerNorm, eps=1e-5)).eval()
    ours = fastvit.from_timm(timm_model).eval()
    assert ours.blocks[0].norm1.eps == 1e-5 and ours.patch_embed.img_size == (32, 48)
    x = torch.randn(1, 3, 32, 48)
    torch.testing.assert_close(ours(x), timm_model(x), atol=1e-5, rtol=1e-4)


def test_from_timm_rejects_unsupported_features():
    # qk-norm and attention pooling load now (tests/test_families.py); these knobs are refused by name.
    with pytest.raises(ValueError, match="scale_attn_norm"):
        fastvit.from_timm(TimmViT(**TINY, scale_attn_norm=True))
    with pytest.raises(ValueError, match="AttentionPoolPrr"):
        fastvit.from_timm(TimmViT(**TINY, global_pool="prr"))


def test_infer_config_needs_num_heads_for_unusual_widths():
    with pytest.raises(ValueError, match="pass num_heads="):
        fastvit.from_timm(TimmViT(**TINY).state_dict())


def test_infer_config_recognises_standard_widths():
    config = convert.infer_config(fastvit.create_model("vit_small_patch16_224", depth=1).state_dict())
    assert config["num_heads"] == 6 and config["img_size"] == (224, 224) and config["patch_size"] == 16


# ------------------------------------------------------------------------------------------------
# torchvision


def _torchvision_vit(num_classes=5):
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=3, hidden_dim=48, mlp_dim=192, num_classes=num_classes
    ).eval()


def test_from_torchvision_matches_logits():
    tv = _torchvision_vit()
    with torch.no_grad():
        for p in tv.parameters():  # torchvision zero-inits the head and class token; randomise everything
            p.normal_(0, 0.2)
    ours = fastvit.from_torchvision(tv).eval()
    torch.testing.assert_close(ours(X), tv(X), atol=1e-5, rtol=1e-4)
    from_state = fastvit.from_torchvision(tv.state_dict(), num_heads=3).eval()
    torch.testing.assert_close(from_state(X), tv(X), atol=1e-5, rtol=1e-4)


def test_torchvision_round_trip_and_load_into_torchvision():
    ours = fastvit.ViT(**TINY).eval()
    tv_state = convert.timm_to_torchvision(ours.state_dict())
    _assert_same_state(convert.torchvision_to_timm(tv_state), ours.state_dict())
    tv = _torchvision_vit()
    tv.load_state_dict(tv_state, strict=True)
    torch.testing.assert_close(tv(X), ours(X), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Hugging Face


def _hf_vit(with_head=True):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=192,
        num_labels=5,
    )
    cls = transformers.ViTForImageClassification if with_head else transformers.ViTModel
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_from_hf_classifier_matches_logits():
    hf = _hf_vit()
    ours = fastvit.from_hf(hf).eval()
    with torch.no_grad():
        expected = hf(pixel_values=X).logits
    torch.testing.assert_close(ours(X), expected, atol=1e-5, rtol=1e-4)
    assert ours.blocks[0].norm1.eps == 1e-12


def test_from_hf_backbone_matches_last_hidden_state():
    hf = _hf_vit(with_head=False)
    ours = fastvit.from_hf(hf.state_dict(), num_heads=3).eval()  # pooler dropped, eps 1e-12 assumed
    with torch.no_grad():
        expected = hf(pixel_values=X).last_hidden_state
    torch.testing.assert_close(ours.forward_features(X), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layout", ["legacy", "v5"])
def test_hf_round_trip(layout):
    ours = fastvit.ViT(**TINY)
    hf_state = convert.timm_to_hf(ours.state_dict(), layout=layout)
    assert ("vit.encoder.layer.0.attention.attention.query.weight" in hf_state) == (layout == "legacy")
    _assert_same_state(convert.hf_to_timm(hf_state), ours.state_dict())


def test_timm_to_hf_loads_into_transformers():
    hf = _hf_vit()
    ours = fastvit.ViT(**TINY, norm_layer=partial(LayerNorm, eps=1e-12)).eval()
    layout = "legacy" if any(".encoder.layer." in k for k in hf.state_dict()) else "v5"
    hf.load_state_dict(convert.timm_to_hf(ours.state_dict(), layout=layout), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=X).logits, ours(X), atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# load_weights: files, formats, errors


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_load_weights_from_files(tmp_path, suffix):
    source = fastvit.ViT(**TINY)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save({"model": source.state_dict(), "epoch": 3}, path)  # a training checkpoint wrapper
    target = fastvit.load_weights(fastvit.ViT(**TINY), path)
    _assert_same_state(target.state_dict(), source.state_dict())


def test_load_weights_accepts_every_format():
    source = fastvit.ViT(**TINY)
    for state in (
        source.state_dict(),
        convert.timm_to_torchvision(source.state_dict()),
        convert.timm_to_hf(source.state_dict()),
        convert.timm_to_hf(source.state_dict(), layout="v5"),
    ):
        target = fastvit.load_weights(fastvit.ViT(**TINY), state)
        _assert_same_state(target.state_dict(), source.state_dict())


def _untouched(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_mismatched_state_dict_raises_and_leaves_model_untouched():
    model = fastvit.ViT(**TINY)
    before = _untouched(model)
    wrong_depth = fastvit.ViT(**{**TINY, "depth": 3}).state_dict()
    with pytest.raises(KeyError, match="keys the model does not have: blocks.2"):
        fastvit.load_weights(model, wrong_depth)
    missing = {k: v for k, v in fastvit.ViT(**TINY).state_dict().items() if k != "head.bias"}
    with pytest.raises(KeyError, match="missing 1 keys the model needs: head.bias"):
        fastvit.load_weights(model, missing)
    wrong_classes = fastvit.ViT(**{**TINY, "num_classes": 9}).state_dict()
    with pytest.raises(ValueError, match=r"head.weight: checkpoint \(9, 48\) vs model \(5, 48\)"):
        fastvit.load_weights(model, wrong_classes)
    _assert_same_state(model.state_dict(), before)


def test_corrupted_or_foreign_files_raise_clear_errors(tmp_path):
    model = fastvit.ViT(**TINY)
    good = tmp_path / "good.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: os.path.getsize(good) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        fastvit.load_weights(model, truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        fastvit.load_weights(model, garbage)
    with pytest.raises(FileNotFoundError):
        fastvit.load_weights(model, tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="unrecognised checkpoint"):
        fastvit.load_weights(model, {"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match="expected a state dict"):
        fastvit.load_weights(model, [1, 2, 3])


# ------------------------------------------------------------------------------------------------
# The data config comes along (issue 21: timm.data.resolve_model_data_config on a converted model)

DATA_KEYS = ("interpolation", "crop_pct", "crop_mode", "mean", "std")


def test_from_timm_carries_the_data_config():
    timm_model = timm.create_model(
        "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
        pretrained=False,
        depth=1,
        img_size=32,
        patch_size=8,
        num_classes=5,
        pretrained_cfg_overlay=dict(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), crop_pct=0.95),
    )
    ours = fastvit.from_timm(timm_model)
    theirs = timm.data.resolve_model_data_config(timm_model)
    resolved = timm.data.resolve_model_data_config(ours)
    assert {k: resolved[k] for k in DATA_KEYS} == {k: theirs[k] for k in DATA_KEYS}
    assert resolved["mean"] == (0.1, 0.2, 0.3) and resolved["crop_pct"] == 0.95
    assert resolved["input_size"] == (3, 32, 32)  # the model's own size (timm's cfg still says 224)
    assert ours.pretrained_cfg["tag"] == "augreg_in21k_ft_in1k"


def test_from_hf_and_torchvision_carry_their_preprocessing():
    hf = fastvit.from_hf(_hf_vit()).pretrained_cfg
    assert hf["mean"] == hf["std"] == (0.5, 0.5, 0.5) and hf["crop_mode"] == "squash" and hf["crop_pct"] == 1.0
    assert hf["label_names"] == [f"LABEL_{i}" for i in range(5)]  # the classifier's id2label
    tv = fastvit.from_torchvision(_torchvision_vit()).pretrained_cfg
    from fastvit.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    assert tv["mean"] == IMAGENET_DEFAULT_MEAN and tv["std"] == IMAGENET_DEFAULT_STD
    assert tv["crop_pct"] == 224 / 256 and tv["interpolation"] == "bilinear"


def test_weights_files_of_torchvision_and_hf_bring_their_preprocessing(tmp_path):
    # A bare weights file has no data config; its format says whose preprocessing the weights expect.
    ours = fastvit.ViT(**TINY)
    for name, state, expected in (
        ("tv.pth", convert.timm_to_torchvision(ours.state_dict()), convert.TORCHVISION_DATA_CFG),
        ("hf.pth", convert.timm_to_hf(ours.state_dict()), convert.HF_DATA_CFG),
        ("timm.pth", ours.state_dict(), {k: ours.pretrained_cfg[k] for k in DATA_KEYS}),
    ):
        torch.save(state, tmp_path / name)
        loaded = fastvit.load_run(tmp_path / name, num_heads=3).pretrained_cfg
        assert {k: loaded[k] for k in DATA_KEYS} == {k: expected[k] for k in DATA_KEYS}, name
