"""The model rejects impossible sizes with a ValueError naming the argument, and validates before it mutates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastvit

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, num_classes=5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(patch_size=0), "patch_size must be positive"),
        (dict(patch_size=-8), "patch_size must be positive"),
        (dict(patch_size=(8, 0)), "patch_size must be positive"),
        (dict(img_size=0), "img_size must be positive"),
        (dict(img_size=(32, 0)), "img_size must be positive"),
        (dict(mlp_ratio=float("inf")), "mlp_ratio must be a positive finite number"),
        (dict(mlp_ratio=float("nan")), "mlp_ratio must be a positive finite number"),
        (dict(mlp_ratio=0), "mlp_ratio must be a positive finite number"),
    ],
)
def test_impossible_sizes_are_value_errors_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastvit.ViT(**{**TINY, **kwargs})


def test_dynamic_img_size_rejects_an_image_smaller_than_a_patch():
    model = fastvit.ViT(**TINY, dynamic_img_size=True).eval()
    assert model(torch.randn(1, 3, 16, 24)).shape == (1, 5)
    for height, width in [(0, 32), (32, 0), (4, 32)]:
        with pytest.raises(ValueError, match="holds no 8x8 patch"):
            model(torch.randn(1, 3, height, width))


def test_set_input_size_validates_before_it_changes_anything():
    model = fastvit.ViT(**TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    before = model(x)
    for bad in (0, -16, (32, 0), 6):
        with pytest.raises(ValueError):
            model.set_input_size(bad)
        torch.testing.assert_close(model(x), before)  # still the 32x32 model
    model.set_input_size(48)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)


def test_patch_embedding_weight_gradient_keeps_the_parameter_layout():
    # A 1-channel image that went through a channels_last permute has odd strides on its size-1 channel dim; conv2d
    # then returned the weight gradient channels_last, which DDP warns about every step. The gradient must have the
    # parameter's own strides.
    model = fastvit.ViT(img_size=32, patch_size=4, in_chans=1, embed_dim=64, depth=1, num_heads=4, num_classes=3)
    x = torch.randn(8, 32, 32, 1).permute(0, 3, 1, 2)
    assert x.is_contiguous() and x.stride() != torch.empty(x.shape).stride()
    F.cross_entropy(model(x), torch.zeros(8, dtype=torch.long)).backward()
    weight = model.patch_embed.proj.weight
    assert weight.grad.stride() == weight.stride()
