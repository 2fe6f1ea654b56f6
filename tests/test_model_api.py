"""The Python API as a timm user expects it: string layers, one activation/norm rule, list_models filters,
pretrained tags, the data config that travels with the model, and one call to load what the CLI trained."""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch
import torch.nn as nn

import fastvit
from fastvit import checkpoint as ckpt
from fastvit import convert
from fastvit.data import create_transform, resolve_data_config

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=5)
DATA_KEYS = ("interpolation", "crop_pct", "crop_mode", "mean", "std")


# ------------------------------------------------------------------------------------------------
# Layers as timm takes them, and one rule for what fastvit builds


@pytest.mark.parametrize(
    "act_layer, approximate",
    [
        (None, "none"),
        ("gelu", "none"),
        ("gelu_tanh", "tanh"),
        (nn.GELU, "none"),
        (partial(nn.GELU, approximate="tanh"), "tanh"),
    ],
)
def test_act_layer_as_timm_takes_it(act_layer, approximate):
    model = fastvit.ViT(**TINY, act_layer=act_layer)
    assert type(model.blocks[0].mlp.act) is nn.GELU and model.blocks[0].mlp.act.approximate == approximate


@pytest.mark.parametrize(
    "norm_layer, eps",
    [(None, 1e-6), ("layernorm", 1e-6), (nn.LayerNorm, 1e-5), (partial(nn.LayerNorm, eps=1e-12), 1e-12)],
)
def test_norm_layer_as_timm_takes_it(norm_layer, eps):
    model = fastvit.ViT(**TINY, norm_layer=norm_layer)
    assert isinstance(model.blocks[0].norm1, nn.LayerNorm) and model.blocks[0].norm1.eps == eps
    assert model.norm.eps == eps


@pytest.mark.parametrize("act_layer", [nn.ReLU, "relu", nn.Hardswish])  # SiLU, QuickGELU: tests/test_families.py
def test_one_activation_rule_for_the_constructor_and_from_timm(act_layer):
    # Both refuse what fastvit cannot build, with the same message (resolve_act_layer decides for both).
    with pytest.raises(ValueError, match="the MLP activation must be GELU") as constructor:
        fastvit.ViT(**TINY, act_layer=act_layer)
    if not isinstance(act_layer, str):
        with pytest.raises(ValueError, match="the MLP activation must be GELU") as converter:
            fastvit.from_timm(TimmViT(**TINY, act_layer=act_layer))
        assert str(converter.value) == str(constructor.value)


def test_one_norm_rule_for_the_constructor_and_from_timm():
    no_affine = partial(nn.LayerNorm, elementwise_affine=False)  # RmsNorm is supported: tests/test_families.py
    with pytest.raises(ValueError, match="an affine LayerNorm with bias, or an affine RmsNorm") as constructor:
        fastvit.ViT(**TINY, norm_layer=no_affine)
    with pytest.raises(ValueError, match="an affine LayerNorm with bias, or an affine RmsNorm") as converter:
        fastvit.from_timm(TimmViT(**TINY, norm_layer=no_affine))
    assert str(converter.value) == str(constructor.value)
    with pytest.raises(ValueError, match="norm_layer 'batchnorm' is not supported"):
        fastvit.ViT(**TINY, norm_layer="batchnorm")
    with pytest.raises(TypeError, match="norm_layer must be a layer class"):
        fastvit.ViT(**TINY, norm_layer=3)


def test_timm_gelu_classes_convert_to_the_same_model():
    timm_model = TimmViT(**TINY, act_layer="gelu_tanh").eval()  # timm.layers.GELUTanh
    ours = fastvit.from_timm(timm_model).eval()
    assert ours.blocks[0].mlp.act.approximate == "tanh"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(ours(x), timm_model(x), atol=1e-5, rtol=1e-4)


def test_qk_norm_builds_timms_keys():  # parity with timm: tests/test_families.py
    keys = set(fastvit.ViT(**TINY, qk_norm=True).state_dict())
    assert keys == set(TimmViT(**TINY, qk_norm=True).state_dict()) and "blocks.0.attn.q_norm.weight" in keys
    assert "blocks.0.attn.q_norm.weight" not in fastvit.ViT(**TINY, qk_norm=False).state_dict()


@pytest.mark.parametrize(
    "img_size, error, match",
    [
        (-8, ValueError, "img_size must be positive"),  # 0 and (32, 0): tests/test_model_validation.py
        ((32,), TypeError, "img_size must be an int or a pair of ints"),
        (32.0, TypeError, "img_size must be an int or a pair of ints"),
        (True, TypeError, "img_size must be an int or a pair of ints"),
    ],
)
def test_img_size_is_checked(img_size, error, match):
    with pytest.raises(error, match=match):
        fastvit.ViT(**{**TINY, "img_size": img_size})


def test_deit_distilled_models_get_a_clear_message():
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", depth=1, img_size=32, patch_size=8)
    for source in (distilled, distilled.state_dict()):
        with pytest.raises(ValueError, match="DeiT distilled models .* are not supported by fastvit"):
            fastvit.from_timm(source)


# ------------------------------------------------------------------------------------------------
# list_models and create_model as timm's


def test_list_models_filters_like_timm():
    assert fastvit.list_models("vit_sm*") == ["vit_small_patch16_224"]
    assert fastvit.list_models(["vit_base_patch32_2*", "*digits*"]) == ["vit_base_patch32_224", "vit_digits_patch4_32"]
    assert "vit_base_patch16_224" not in fastvit.list_models(exclude_filters="vit_base*")
    tagged = fastvit.list_models("vit_small_patch16_224*", pretrained=True)
    assert "vit_small_patch16_224.augreg_in21k" in tagged
    assert tagged == timm.list_pretrained("vit_small_patch16_224*")


def test_create_model_accepts_pretrained_tags():
    model = fastvit.create_model("vit_tiny_patch16_224.augreg_in21k", depth=1)
    timm_cfg = timm.models.get_pretrained_cfg("vit_tiny_patch16_224.augreg_in21k").to_dict()
    assert model.num_classes == timm_cfg["num_classes"] == 21843  # the tag's head, as timm builds it
    assert model.pretrained_cfg["tag"] == "augreg_in21k"
    assert all(model.pretrained_cfg[k] == timm_cfg[k] for k in DATA_KEYS)
    with pytest.raises(ValueError, match="unknown pretrained tag 'nope' for vit_tiny_patch16_224; timm knows: "):
        fastvit.create_model("vit_tiny_patch16_224.nope")
    with pytest.raises(ValueError, match="pretrained=True is not supported"):
        fastvit.create_model("vit_tiny_patch16_224", pretrained=True)


@pytest.mark.parametrize("name", [n for n in fastvit.list_models() if n != "vit_digits_patch4_32"])
def test_preset_data_config_is_timms(name):
    ours = fastvit.create_model(name, depth=1, device="meta").pretrained_cfg
    theirs = timm.create_model(name, depth=1, pretrained=False).pretrained_cfg
    assert {k: ours[k] for k in (*DATA_KEYS, "input_size")} == {k: theirs[k] for k in (*DATA_KEYS, "input_size")}


# ------------------------------------------------------------------------------------------------
# The data config travels with the model


def test_data_config_follows_the_model():
    model = fastvit.create_model("vit_digits_patch4_32")
    expected = dict(input_size=(1, 32, 32), interpolation="bilinear", crop_pct=1.0, crop_mode="squash")
    assert timm.data.resolve_model_data_config(model) == resolve_data_config(model)
    assert {k: resolve_data_config(model)[k] for k in expected} == expected
    model.set_input_size(48)
    assert model.pretrained_cfg["input_size"] == (1, 48, 48) == timm.data.resolve_model_data_config(model)["input_size"]
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": [str(i) for i in range(10)]}
    model.reset_classifier(3)
    assert model.pretrained_cfg["num_classes"] == 3 and model.pretrained_cfg["label_names"] is None
    assert model.default_cfg is model.pretrained_cfg  # timm's older name


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"mean": (0.5, 0.5)}, r"pretrained_cfg\['mean'\] must hold 3 finite numbers"),
        ({"std": (0.5, 0.0, 0.5)}, r"pretrained_cfg\['std'\] must be positive"),
        ({"crop_pct": 0}, r"pretrained_cfg\['crop_pct'\] must be in \(0, 1\]"),
        ({"interpolation": "cubic"}, r"pretrained_cfg\['interpolation'\] must be one of"),
        ({"crop_mode": "middle"}, r"pretrained_cfg\['crop_mode'\] must be one of"),
        ({"label_names": "abc"}, r"pretrained_cfg\['label_names'\] must be a list of strings"),
    ],
)
def test_pretrained_cfg_is_checked(cfg, match):
    model = fastvit.ViT(**TINY)
    with pytest.raises(ValueError, match=match):
        model.pretrained_cfg = cfg


def test_create_transform_matches_timm_and_converts_channels():
    from PIL import Image

    model = fastvit.ViT(**{**TINY, "img_size": (32, 48)})
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.2, 0.3, 0.4), "std": (0.5, 0.6, 0.7), "crop_pct": 0.8}
    image = Image.fromarray(torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8).numpy())
    ours = create_transform(model)(image)
    theirs = timm.data.create_transform(**timm.data.resolve_model_data_config(model))(image)
    assert ours.shape == (3, 32, 48) and torch.equal(ours, theirs)
    with pytest.warns(UserWarning, match="grey .* image was repeated into 3 channels"):
        grey = create_transform(model)(image.convert("L"))
    assert grey.shape == (3, 32, 48)
    digits = fastvit.create_model("vit_digits_patch4_32")
    with pytest.warns(UserWarning, match="colour .* image was converted to 1 grey channel"):
        assert create_transform(digits)(image).shape == (1, 32, 32)
    assert create_transform(digits, train=True)(image.convert("L")).shape == (1, 32, 32)


def test_session_takes_its_input_shape_from_the_data_config():
    model = fastvit.create_model("vit_digits_patch4_32", img_size=48)
    session = fastvit.InferenceSession(model, use_cuda_graphs=False, dtype=torch.float32)
    assert session.input_shape == model.pretrained_cfg["input_size"] == (1, 48, 48)


# ------------------------------------------------------------------------------------------------
# One call to load what the CLI trained


def _saved_run(tmp_path, epochs_done: int = 1) -> tuple[str, fastvit.ViT]:
    """A run folder as ``python -m fastvit train`` writes it (checkpoint/ with metadata), without training."""
    model = fastvit.create_model("vit_digits_patch4_32", num_classes=3)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": (0.3,), "std": (0.4,), "label_names": ["a", "b", "c"]}
    config = dict(fastvit.model.PRESETS["vit_digits_patch4_32"], num_classes=3)
    metadata = dict(
        config=convert.config_to_json(config),
        pretrained_cfg={k: list(v) if isinstance(v, tuple) else v for k, v in model.pretrained_cfg.items()},
        model="vit_digits_patch4_32",
    )
    state = dict(epoch=epochs_done, num_updates=1, optimizer={}, scheduler={}, rng=[], history=[])
    output = str(tmp_path / "run")
    ckpt.save_checkpoint(os.path.join(output, "checkpoint"), model.state_dict(), state, metadata)
    return output, model


def test_load_run_and_load_weights_take_a_run_folder(tmp_path):
    output, saved = _saved_run(tmp_path)
    model = fastvit.load_run(output)
    assert not model.training and model.num_classes == 3
    assert model.pretrained_cfg["label_names"] == ["a", "b", "c"] and model.pretrained_cfg["mean"] == (0.3,)
    assert resolve_data_config(model)["std"] == (0.4,)
    for name, value in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    # The call: a preset, then load_weights on the run folder (also brings the data config).
    loaded = fastvit.load_weights(fastvit.create_model("vit_digits_patch4_32", num_classes=3), output)
    assert loaded.pretrained_cfg["label_names"] == ["a", "b", "c"]
    created = fastvit.create_model("vit_digits_patch4_32", num_classes=3, checkpoint_path=output)
    assert torch.equal(created.head.weight, saved.head.weight) and created.pretrained_cfg["mean"] == (0.3,)


def test_config_round_trips_through_checkpoint_metadata():
    config = dict(TINY, act_layer="gelu_tanh", norm_layer=partial(nn.LayerNorm, eps=1e-12), img_size=(32, 48))
    restored = convert.config_from_json(convert.config_to_json(config))
    original, rebuilt = fastvit.ViT(**config), fastvit.ViT(**restored)
    assert rebuilt.blocks[0].mlp.act.approximate == "tanh" and rebuilt.blocks[0].norm1.eps == 1e-12
    assert rebuilt.patch_embed.img_size == original.patch_embed.img_size == (32, 48)


def test_loading_a_run_written_before_data_configs_were_stored(tmp_path):
    # Older checkpoints kept mean/std/classes as separate metadata keys; they still load with that preprocessing.
    from safetensors.torch import save_file

    model = fastvit.create_model("vit_digits_patch4_32", num_classes=3)
    path = tmp_path / "old.safetensors"
    import json

    config = json.dumps(dict(fastvit.model.PRESETS["vit_digits_patch4_32"], num_classes=3))
    metadata = {"config": config, "mean": "[0.25]", "std": "[0.5]", "classes": '["x", "y", "z"]'}
    save_file(model.state_dict(), str(path), metadata)
    loaded = fastvit.load_run(path)
    assert loaded.pretrained_cfg["mean"] == (0.25,) and loaded.pretrained_cfg["label_names"] == ["x", "y", "z"]
