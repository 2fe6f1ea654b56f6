"""The model's entry points reject bad input with clear errors naming what was expected."""

from __future__ import annotations

import pytest
import torch

import fastvit

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=5)


@pytest.fixture(scope="module")
def model():
    return fastvit.ViT(**TINY).eval()


@pytest.mark.parametrize(
    "x, error, match",
    [
        (torch.randn(2, 3, 30, 32), ValueError, "must be 32x32 pixels \\(img_size\\), got 30x32"),
        (torch.randn(2, 1, 32, 32), ValueError, "must have 3 channels \\(in_chans\\)"),
        (torch.randn(3, 32, 32), ValueError, "4-D image batch"),
        (torch.randn(1, 2, 3, 32, 32), ValueError, "4-D image batch"),
        (
            torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8),
            TypeError,
            "floating-point image batch, got torch.uint8",
        ),
        (torch.ones(2, 3, 32, 32, dtype=torch.bool), TypeError, "floating-point"),
        (torch.randn(2, 3, 32, 32, dtype=torch.complex64), TypeError, "floating-point"),
        ([[1.0]], TypeError, "must be a torch.Tensor"),
    ],
)
def test_forward_rejects(model, x, error, match):
    with pytest.raises(error, match=match):
        model(x)


def test_dynamic_size_still_needs_divisible_sizes():
    model = fastvit.ViT(**TINY, dynamic_img_size=True)
    assert model(torch.randn(1, 3, 40, 24)).shape == (1, 5)
    with pytest.raises(ValueError, match="image size 30x32 is not divisible by the patch size 8x8"):
        model(torch.randn(1, 3, 30, 32))


def test_empty_batch_returns_empty_logits(model):
    # As PyTorch layers do: an empty batch is valid input and gives an empty output of the right shape.
    out = model(torch.randn(0, 3, 32, 32))
    assert out.shape == (0, 5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(img_size=30), "img_size 30x30 is not divisible by the patch size 8x8"),
        (dict(embed_dim=50), "embed_dim \\(50\\) must be divisible by num_heads \\(3\\)"),
        (dict(global_pool="map"), "global_pool must be one of"),
        (dict(class_token=False), "global_pool='token' needs the class token"),
        (dict(drop_path_rate=1.5), "drop_path_rate must be in \\[0, 1\\)"),
        (dict(depth=-1), "depth must be an int >= 0"),
        (dict(num_heads=0), "num_heads must be a positive int"),
        (dict(pos_embed="sincos"), "pos_embed must be 'learn' or 'none'"),
        (dict(backend="tpu"), "backend must be one of"),
    ],
)
def test_constructor_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastvit.ViT(**{**TINY, **kwargs})


def test_patch_size_type_is_checked():
    with pytest.raises(TypeError, match="patch_size must be an int or a pair of ints"):
        fastvit.ViT(**{**TINY, "patch_size": "8"})


def test_unknown_preset_name():
    with pytest.raises(KeyError, match="unknown model 'vit_tiny_patch8_1024'; available: vit_base_patch16_224"):
        fastvit.create_model("vit_tiny_patch8_1024")


def test_pretrained_is_refused_with_a_way_forward():
    with pytest.raises(ValueError, match="load_weights"):
        fastvit.create_model("vit_tiny_patch16_224", pretrained=True)


def test_reset_classifier_checks_arguments(model):
    with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
        model.reset_classifier(-1)
    with pytest.raises(ValueError, match="global_pool must be one of"):
        model.reset_classifier(3, global_pool="mean")


def test_forward_intermediates_checks_arguments(model):
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC'"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="indices must name blocks"):
        model.forward_intermediates(x, indices=[5])
