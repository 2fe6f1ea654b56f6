"""Packed mode (images of different sizes in one sequence) and the ``attn_mask`` forms of ``fastvit.packing``.

Accuracy: a packed fp32 forward must sit within the flash-attention rule of the fp32 forward of each image alone,
both measured against the fp64 forward of each image alone (``assert_within_torch_error`` with the fp32 rounding
floor): the packing changes only which tokens share one GEMM, so its error must be the error of the same math.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from fastvit.accuracy import rounding_floor
from fastvit.eva import Eva
from fastvit.layers import Block, DropPath, ParallelScalingBlock
from fastvit.model import VisionTransformer
from fastvit.packing import (
    ImagePacking,
    PackedSequences,
    PackingCollate,
    packed_rope_table,
    pad_packing,
    padded_tokens,
    parse_sizes,
    pick_token_budget,
    resize_each,
    segment_pool,
)
from fastvit.session import PackedInferenceSession

from utils import assert_within_torch_error, dtype_tols, needs_backend, needs_cuda

# Tiny models (patch 4, head dim 32: the Triton kernels cover it) and four images: a repeated non-square size, the
# model's own 16x16, and a thin 4x20 strip.
TINY = dict(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=64, depth=2, num_heads=2)
SIZES = [(8, 12), (16, 16), (4, 20), (8, 12)]

VIT_CASES = {
    "token": dict(),
    "avg_registers": dict(global_pool="avg", reg_tokens=2),
    "max_no_class_token": dict(global_pool="max", class_token=False, no_embed_class=True),
    "avgmax_prefix_pooled": dict(global_pool="avgmax", reg_tokens=1, pool_include_prefix=True),
    "map": dict(global_pool="map", class_token=False),
    "map_registers_prefix_pooled": dict(global_pool="map", reg_tokens=2, pool_include_prefix=True),
    "no_pooling": dict(global_pool=""),
    "qk_norm_layerscale_pre_norm": dict(qk_norm=True, init_values=0.1, pre_norm=True),
    "parallel_blocks": dict(block_fn=ParallelScalingBlock, global_pool="avg"),
}
EVA_CASES = {
    "eva_rope_registers": dict(use_rot_pos_emb=True, num_reg_tokens=2),
    "eva_rope_half_avg": dict(use_rot_pos_emb=True, rope_type="dinov3", rope_rotate_half=True, global_pool="avg"),
    "eva_rope_mixed": dict(use_rot_pos_emb=True, rope_type="mixed", use_abs_pos_emb=False),
}


def _images(sizes=SIZES, chans: int = 3) -> list[torch.Tensor]:
    return [torch.randn(chans, h, w) for h, w in sizes]


def _outputs_and_grads(model, images, weights, packed: bool):
    """Every output (flattened, image after image) and every parameter's gradient of sum_b <out_b, weights_b>."""
    model.zero_grad(set_to_none=True)
    outs = model.forward_packed(images) if packed else [model(image[None])[0] for image in images]
    loss = sum((out * weight).sum() for out, weight in zip(outs, weights))
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return torch.cat([out.detach().flatten() for out in outs]), grads


def _check_packed_equals_alone(model: torch.nn.Module, images: list[torch.Tensor]) -> None:
    """forward_packed(images) vs each image alone (fp32), both against each image alone in fp64: outputs and every
    parameter gradient."""
    model64 = copy.deepcopy(model).double().set_backend("torch")  # the spec: fp64, plain PyTorch
    with torch.no_grad():
        shapes = [out.shape for out in (model(image[None])[0] for image in images)]
    weights = [torch.randn(shape) for shape in shapes]
    ref_out, ref_grads = _outputs_and_grads(model64, [i.double() for i in images], [w.double() for w in weights], False)
    alone_out, alone_grads = _outputs_and_grads(model, images, weights, packed=False)
    packed_out, packed_grads = _outputs_and_grads(model, images, weights, packed=True)
    assert packed_grads.keys() == alone_grads.keys() == ref_grads.keys()
    floor = rounding_floor(ref_out, torch.float32)
    assert_within_torch_error("outputs", packed_out, alone_out, ref_out, floor=floor)
    for name, ref in ref_grads.items():
        floor = rounding_floor(ref, torch.float32)
        assert_within_torch_error(f"grad {name}", packed_grads[name], alone_grads[name], ref, floor=floor)


@pytest.mark.parametrize("case", VIT_CASES)
def test_vit_packed_equals_each_image_alone(case):
    model = VisionTransformer(**TINY, **VIT_CASES[case], dynamic_img_size=True, backend="torch")
    _check_packed_equals_alone(model, _images())


@pytest.mark.parametrize("case", EVA_CASES)
def test_eva_packed_equals_each_image_alone(case):
    model = Eva(**TINY, **EVA_CASES[case], dynamic_img_size=True, backend="torch")
    _check_packed_equals_alone(model, _images())


@needs_backend("triton")
def test_packed_attention_on_the_triton_varlen_kernel():
    """The blocks' attention as ``ops.varlen_qkv_attention`` on the Triton kernel (the interpreter on CPU)."""
    model = VisionTransformer(**{**TINY, "depth": 1}, dynamic_img_size=True, backend={"qkv_attention": "triton"})
    _check_packed_equals_alone(model, _images([(8, 12), (4, 4), (12, 8)]))


@needs_backend("triton")
@pytest.mark.parametrize(
    "case",
    [
        dict(use_rot_pos_emb=True, num_reg_tokens=2, qk_norm=True),
        dict(use_rot_pos_emb=True, rope_type="dinov3", rope_rotate_half=True, global_pool="avg"),
        dict(use_rot_pos_emb=True, rope_type="mixed", use_abs_pos_emb=False),  # per-head tables (no_grad only)
    ],
    ids=["interleaved+qk_norm+registers", "rotate_half", "rope_mixed"],
)
def test_eva_packed_attention_runs_the_varlen_kernel_with_its_prologue(case, monkeypatch):
    """Eva's packed blocks: one ``ops.varlen_qkv_attention`` per block on the Triton kernel with RoPE (the packed
    table) and qk-norm as its prologue (no dense [T, T] mask), equal to each image alone."""
    from fastvit.ops.triton import attention_prologue

    model = Eva(**{**TINY, "depth": 1}, **case, dynamic_img_size=True, backend={"qkv_attention": "triton"})
    launches = []
    forward = attention_prologue._attention_forward

    def spy(*args, **kwargs):
        launches.append(args[7] if len(args) > 7 else kwargs.get("varlen"))  # the Varlen of a packed launch
        return forward(*args, **kwargs)

    monkeypatch.setattr(attention_prologue, "_attention_forward", spy)
    images = _images([(8, 12), (4, 4), (12, 8)])
    with torch.no_grad():
        model.forward_packed(images)
    assert len(launches) == 1 and launches[0] is not None, launches  # one block, one packed launch
    _check_packed_equals_alone(model, images)


@needs_backend("triton")
def test_packed_map_pooling_is_one_masked_call_on_the_attention_kernel(monkeypatch):
    """Packed attention pooling: one ``ops.attention`` call for all images (each image's tokens padded to the longest,
    its key-padding mask in the Triton kernel), equal to each image alone."""
    from fastvit import layers

    model = VisionTransformer(
        **{**TINY, "depth": 1},
        global_pool="map",
        reg_tokens=1,
        dynamic_img_size=True,
        backend={"qkv_attention": "triton"},
    )
    images = _images([(8, 12), (4, 4), (12, 8)])
    calls = []
    attention = layers.ops.attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((k.shape, kwargs.get("key_padding_mask")))
        return attention(q, k, v, *args, **kwargs)

    monkeypatch.setattr(layers.ops, "attention", spy)
    with torch.no_grad():
        model.forward_packed(images)
    assert len(calls) == 1, calls
    (shape, keep) = calls[0]
    patches = [h * w // 16 for h, w in [(8, 12), (4, 4), (12, 8)]]  # pool_include_prefix=False: patch tokens only
    assert keep is not None and keep.shape == (3, max(patches))
    assert keep.sum(1).tolist() == patches and all(bool(row[:n].all()) for row, n in zip(keep, patches))
    _check_packed_equals_alone(model, images)


def test_pre_logits_features_and_the_model_call_on_a_list():
    model = VisionTransformer(**TINY, dynamic_img_size=True, backend="torch").eval()
    images = _images()
    with torch.no_grad():
        logits = model.forward_packed(images)
        assert logits.shape == (len(images), TINY["num_classes"])
        torch.testing.assert_close(model(images), logits, rtol=0, atol=0)  # forward(list) is forward_packed
        pre_logits = model.forward_packed(images, pre_logits=True)
        assert pre_logits.shape == (len(images), TINY["embed_dim"])
        tokens, packing = model.forward_features_packed(images)
        assert tokens.shape == (1, packing.num_tokens, TINY["embed_dim"])
        assert packing.grids == tuple((h // 4, w // 4) for h, w in SIZES)
        assert packing.lengths == [1 + h * w // 16 for h, w in SIZES]
        for image, own in zip(images, packing.split(tokens)):
            alone = model.forward_features(image[None])[0]
            torch.testing.assert_close(own, alone, atol=1e-5, rtol=1e-4)


def test_a_model_of_fixed_size_packs_images_of_its_own_size():
    model = VisionTransformer(**TINY, backend="torch").eval()
    images = _images([(16, 16), (16, 16)])
    with torch.no_grad():
        torch.testing.assert_close(model.forward_packed(images), model(torch.stack(images)), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"images\[1\] is 8x8 pixels.*dynamic_img_size=True"):
        model.forward_packed([images[0], torch.randn(3, 8, 8)])


@pytest.mark.parametrize(
    "images, error, match",
    [
        (torch.randn(2, 3, 16, 16), TypeError, "images must be a list"),
        ([], ValueError, "at least one"),
        ([torch.randn(3, 16, 16), "cat"], TypeError, r"images\[1\] must be a torch.Tensor"),
        ([torch.randn(1, 3, 16, 16)], ValueError, r"images\[0\] must be one \[C, H, W\] image"),
        ([torch.randn(3, 8, 8), torch.randn(1, 8, 8)], ValueError, r"images\[1\] must have 3 channels"),
        ([torch.randn(3, 8, 8), torch.randn(3, 8, 10)], ValueError, r"images\[1\] is 8x10 pixels.*multiple of"),
        ([torch.randn(3, 0, 8)], ValueError, r"images\[0\] is 0x8 pixels"),
        ([torch.zeros(3, 8, 8, dtype=torch.uint8)], TypeError, r"images\[0\] must be a floating-point"),
        ([torch.randn(3, 8, 8), torch.randn(3, 8, 8).double()], ValueError, r"images\[1\] is torch.float64"),
    ],
)
def test_bad_images_are_clear_errors(images, error, match):
    model = VisionTransformer(**TINY, dynamic_img_size=True, backend="torch")
    with pytest.raises(error, match=match):
        model.forward_packed(images)


def test_patch_dropout_is_refused_while_training_packed():
    """Patch dropout keeps a token count per batch row: on a packing it would mix the images' counts."""
    model = VisionTransformer(**TINY, patch_drop_rate=0.5, dynamic_img_size=True, backend="torch")
    with pytest.raises(NotImplementedError, match="packed mode"):
        model.forward_packed(_images())
    model.eval()  # inactive in eval: packing is fine
    assert model.forward_packed(_images()).shape == (len(SIZES), TINY["num_classes"])


def test_stochastic_depth_keeps_or_drops_each_packed_image_whole():
    """Under a packing DropPath draws once per image (as per batch row in a batch): each image's tokens are all kept
    (scaled by 1/keep_prob) or all zero, and images of one packing get different draws."""
    torch.manual_seed(0)
    drop, lengths = DropPath(0.5).train(), [3, 0, 5, 1, 4]
    packing = PackedSequences.from_lengths(lengths)
    draws = []
    for _ in range(32):
        segments = drop(torch.ones(1, sum(lengths), 2), packing)[0].split([n for n in lengths if n])
        assert all(segment.unique().numel() == 1 and segment[0, 0].item() in (0.0, 2.0) for segment in segments)
        draws.append(tuple(segment[0, 0].item() == 2.0 for segment in segments))
    assert any(len(set(draw)) > 1 for draw in draws)  # not one draw for the whole packing
    kept = sum(map(sum, draws)) / (len(draws) * len(draws[0]))
    assert 0.25 < kept < 0.75, kept  # Bernoulli(0.5) over 128 draws: far outside this only if broken

    model = VisionTransformer(**TINY, drop_path_rate=0.5, dynamic_img_size=True, backend="torch").train()
    logits = model.forward_packed(_images())
    logits.square().sum().backward()
    assert logits.shape == (len(SIZES), TINY["num_classes"]) and all(
        p.grad is not None and p.grad.isfinite().all() for p in model.parameters() if p.requires_grad
    )


def test_segment_pool_and_rope_table_helpers():
    packing = ImagePacking.from_grids([(1, 2), (2, 2)], num_prefix_tokens=1)
    assert packing.lengths == [3, 5] and packing.starts == [0, 3] and packing.num_tokens == 8
    tokens = torch.arange(16.0).reshape(8, 2)
    torch.testing.assert_close(segment_pool(tokens, packing, "token", False), tokens[[0, 3]])
    expected_avg = torch.stack([tokens[1:3].mean(0), tokens[4:8].mean(0)])
    torch.testing.assert_close(segment_pool(tokens[None], packing, "avg", False), expected_avg)
    torch.testing.assert_close(segment_pool(tokens, packing, "max", True), torch.stack([tokens[2], tokens[7]]))
    with pytest.raises(ValueError, match="pool_type"):
        segment_pool(tokens, packing, "mean", False)
    padded, keep = padded_tokens(tokens[None], packing, include_prefix=False)  # patch tokens: 2 and 4 per image
    assert keep.tolist() == [[True, True, False, False], [True] * 4]
    torch.testing.assert_close(padded, torch.stack([torch.cat([tokens[1:3], tokens.new_zeros(2, 2)]), tokens[4:8]]))
    padded, keep = padded_tokens(tokens, packing, include_prefix=True)
    assert padded.shape == (2, 5, 2) and keep.sum(1).tolist() == [3, 5]
    torch.testing.assert_close(padded[0, :3], tokens[:3])
    tables = [torch.randn(2, 8), torch.randn(4, 8)]
    rope = packed_rope_table(tables, num_prefix_tokens=1)  # image 0's prefix is skipped by apply_rope itself
    assert rope.shape == (2 + 1 + 4, 8)
    torch.testing.assert_close(rope[2], torch.cat([torch.zeros(4), torch.ones(4)]))  # image 1's class token
    torch.testing.assert_close(rope[3:], tables[1])


# ------------------------------------------------------------------------------------------------
# Mixed-resolution training


def test_parse_sizes_and_resize_each():
    assert parse_sizes("16, 24,32x16") == [(16, 16), (24, 24), (32, 16)]
    for bad in ("", "16,,24", "16x", "0", "a", "16x16x16", "-8"):
        with pytest.raises(ValueError, match="sizes"):
            parse_sizes(bad)
    images = torch.randn(3, 1, 8, 8)
    resized = resize_each(images, [(16, 8), (8, 8), (16, 8)])
    assert [tuple(image.shape) for image in resized] == [(1, 16, 8), (1, 8, 8), (1, 16, 8)]
    assert torch.equal(resized[1], images[1])  # already at its size: untouched
    with pytest.raises(ValueError, match="one size per image"):
        resize_each(images, [(8, 8)])


def test_packing_collate_draws_sizes_per_image_and_augments_first():
    batch = [(torch.full((1, 8, 8), float(i)), i) for i in range(64)]
    seen = []
    collate = PackingCollate([(8, 8), (16, 12)], augment=lambda x: seen.append(x.shape) or x + 1)
    images, labels = collate(batch)
    assert seen == [(64, 1, 8, 8)] and labels.tolist() == list(range(64))
    assert {tuple(image.shape) for image in images} == {(1, 8, 8), (1, 16, 12)}  # both drawn (64 draws)
    for i, image in enumerate(images):
        torch.testing.assert_close(image, torch.full_like(image, i + 1.0))  # image i, augmented, resized
    with pytest.raises(ValueError, match="at least one"):
        PackingCollate([])


def test_packed_training_on_digits_reduces_the_loss():
    """Mixed-resolution training as ``train --sizes`` runs it: the digits through PackingCollate, model(list)."""
    from torch.utils.data import DataLoader

    from fastvit.data import build_data

    data = build_data("digits", 16, classes="0-2", shift=1)
    collate = PackingCollate([(8, 8), (16, 16), (12, 8)], augment=data.batch_augment)
    loader = DataLoader(data.train, batch_size=32, shuffle=True, collate_fn=collate, drop_last=True)
    model = VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, num_classes=3, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
        dynamic_img_size=True, backend="torch",
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    held_out, held_labels = PackingCollate(collate.sizes)(list(data.test))

    def held_out_loss() -> float:
        with torch.no_grad():
            return F.cross_entropy(model.eval()(held_out), held_labels).item()

    before = held_out_loss()
    model.train()
    batches = (batch for _epoch in itertools.count() for batch in loader)  # new sizes drawn every epoch
    for images, labels in itertools.islice(batches, 40):
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_loss()
    print(f"held-out loss {before:.3f} -> {after:.3f}")
    assert after < 0.75 * before  # 3 classes: chance is ln 3 = 1.10


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(sizes="16,x"), "--sizes: 'x' is not a size"),
        (dict(sizes="16,30"), "--sizes 30x30 not divisible by the patch size 4"),
        (dict(sizes="16,1000000000000"), "--sizes 1000000000000x1000000000000 above 8192 pixels"),
        (dict(sizes="16,24", mixup=0.2), "--sizes cannot be combined with --mixup"),
        (dict(sizes="16,24", compile=True), "--sizes cannot be combined with --compile"),
    ],
)
def test_train_sizes_option_is_checked(tmp_path, capsys, options, message):
    from fastvit import train

    with pytest.raises(SystemExit) as exit_info:
        train.default_args(output=str(tmp_path / "run"), **options)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The attn_mask forms every block takes


def _block(dim: int = 64, heads: int = 2) -> Block:
    return Block(dim, heads, qkv_bias=True)


def test_key_padding_mask_matches_timm_forward_features_attn_mask():
    """fastvit's [B, N] key-padding mask is timm's SDPA mask [B, 1, 1, N] on the same weights."""
    timm = pytest.importorskip("timm")
    reference = timm.models.vision_transformer.VisionTransformer(**TINY).eval()
    model = VisionTransformer(**TINY, backend="torch").eval()
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 16, 16)
    keep = torch.rand(2, 17) > 0.4
    keep[:, 0] = True  # every row keeps a key (a row without one is NaN in both)
    with torch.no_grad():
        ours = model.forward_features(x, attn_mask=keep)
        theirs = reference.forward_features(x, attn_mask=keep[:, None, None, :])
        exact = copy.deepcopy(reference).double().forward_features(x.double(), attn_mask=keep[:, None, None, :])
    assert_within_torch_error("key-padding", ours, theirs, exact, floor=rounding_floor(exact, torch.float32))
    assert not torch.allclose(ours, model.forward_features(x), atol=1e-3)  # the mask did act


def test_packed_sequences_equal_each_sequence_alone_in_a_block():
    block = _block().double()
    lengths = [5, 0, 1, 9]  # an empty and a one-token sequence too
    x = torch.randn(1, sum(lengths), 64, dtype=torch.float64)
    packed = block(x, attn_mask=PackedSequences.from_lengths(lengths))
    alone = torch.cat([block(part[None])[0] for part in x[0].split(lengths) if len(part)])
    torch.testing.assert_close(packed[0], alone, rtol=1e-10, atol=1e-12)
    dense = block(x, attn_mask=PackedSequences.from_lengths(lengths).dense_mask(x.shape[1]))  # its SDPA form
    torch.testing.assert_close(dense, packed, rtol=1e-10, atol=1e-12)


def test_four_d_sdpa_masks_equal_the_key_padding_mask():
    block = _block().double()
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    keep = torch.tensor([[1, 1, 0, 1, 0, 1, 1], [1, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    with_keys = block(x, attn_mask=keep)
    bool_mask = keep[:, None, None, :].expand(2, 1, 7, 7)
    additive = torch.zeros(2, 1, 7, 7, dtype=torch.float64).masked_fill(~bool_mask, float("-inf"))
    torch.testing.assert_close(block(x, attn_mask=bool_mask), with_keys, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(block(x, attn_mask=additive), with_keys, rtol=1e-10, atol=1e-12)
    # a key-padding mask is SDPA's masking of the keys, row by row
    q, k, v = block.attn.heads(block.norm1(x))
    per_row = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :]).transpose(1, 2).flatten(2)
    torch.testing.assert_close(block.attn.attend(block.norm1(x), keep), per_row, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "x_shape, mask, error, match",
    [
        ((2, 7, 64), PackedSequences.from_lengths([7, 7]), ValueError, r"PackedSequences needs the packed tokens"),
        ((1, 7, 64), PackedSequences.from_lengths([3, 3]), ValueError, "packs 6 tokens, x holds 7"),
        ((2, 7, 64), [[True] * 7] * 2, TypeError, "attn_mask must be a tensor"),
        ((2, 7, 64), torch.ones(2, 6, dtype=torch.bool), ValueError, r"key-padding mask must be \[B, N\]"),
    ],
)
def test_bad_attn_masks_are_clear_errors(x_shape, mask, error, match):
    with pytest.raises(error, match=match):
        _block()(torch.randn(x_shape), attn_mask=mask)


@pytest.mark.parametrize("lengths", [[3, -1], [2.0, 1], [True]])
def test_bad_lengths_are_clear_errors(lengths):
    with pytest.raises(ValueError, match="lengths must be non-negative ints"):
        PackedSequences.from_lengths(lengths)


def test_a_packing_built_from_lengths_skips_the_device_check_of_cu_seqlens(monkeypatch):
    """forward_packed reads nothing back from the device per block: its packing is right by construction (the token
    count is checked on the host); a PackedSequences built by hand is still checked by the op."""
    import fastvit.ops.varlen_attention as varlen

    checked = []
    monkeypatch.setattr(varlen, "check_cu_seqlens", lambda *args: checked.append(args))
    model = VisionTransformer(**TINY, dynamic_img_size=True, backend="torch").eval()
    with torch.no_grad():
        model.forward_packed(_images())
    assert checked == []
    by_hand = PackedSequences(torch.tensor([0, 3, 7], dtype=torch.int32), 4)
    assert by_hand.host_num_tokens is None
    _block()(torch.randn(1, 7, 64), attn_mask=by_hand)
    assert len(checked) == 1


# ------------------------------------------------------------------------------------------------
# Token budgets: fixed shapes for CUDA-graph replay of packed batches


def test_token_budget_bucketing_and_fixed_shape_padding():
    assert pick_token_budget(37, [128, 32, 64]) == 64 and pick_token_budget(64, [32, 64]) == 64
    with pytest.raises(ValueError, match="exceed the largest token budget"):
        pick_token_budget(65, [32, 64])
    with pytest.raises(ValueError, match="at least one"):
        pick_token_budget(1, [])
    for lengths in ([7, 17], [3], [5, 5, 5, 5]):
        padded = pad_packing(lengths, 32, max_sequences=4)
        assert padded.cu_seqlens.shape == (6,) and padded.max_seqlen == 32 and padded.host_num_tokens == 32
        assert padded.cu_seqlens.diff().tolist() == [*lengths, 32 - sum(lengths)] + [0] * (4 - len(lengths))
    with pytest.raises(ValueError, match="exceed max_sequences"):
        pad_packing([1] * 5, 32, max_sequences=4)
    with pytest.raises(ValueError, match="exceed the token budget"):
        pad_packing([20, 20], 32, max_sequences=4)


def test_padding_to_a_token_budget_leaves_every_image_unchanged():
    """The budget's padding tokens (here large random values) form their own sequence: the images never see them."""
    model = VisionTransformer(**TINY, dynamic_img_size=True, backend="torch").eval()
    images = _images()
    with torch.no_grad():
        tokens, packing = model.forward_features_packed(images)
        budget = pick_token_budget(packing.num_tokens, [32, 64, 128])
        padding = 1e3 * torch.randn(1, budget - packing.num_tokens, TINY["embed_dim"])
        x = torch.cat([model.embed_packed(images, packing), padding], dim=1)
        fixed = pad_packing(packing.lengths, budget, max_sequences=8)
        for block in model.blocks:
            x = block(x, attn_mask=fixed)
        x = model.norm(x)
    assert budget == 64 and x.shape == (1, 64, TINY["embed_dim"])
    torch.testing.assert_close(x[:, : packing.num_tokens], tokens, atol=1e-5, rtol=1e-4)


def _session_model(**options) -> VisionTransformer:
    return VisionTransformer(**TINY, **options, dynamic_img_size=True, backend="torch").eval()


def test_packed_inference_session_on_cpu_pads_to_budgets_and_equals_forward_packed():
    model = _session_model(global_pool="avg", reg_tokens=1)
    session = PackedInferenceSession(model, token_budgets=[128, 32, 64], max_images=6, dtype=torch.float32)
    assert session.token_budgets == [32, 64, 128] and not session.use_cuda_graphs
    for sizes in (SIZES, [(4, 4)], [(16, 16)] * 6):
        images = _images(sizes)
        with torch.no_grad():
            expected = model.forward_packed(images)
        torch.testing.assert_close(session(images), expected, atol=1e-5, rtol=1e-4)
    tokens = sum(2 + h * w // 16 for h, w in SIZES) + 3 + 6 * 18  # 41 -> 64, 3 -> 32, 108 -> 128
    assert session.tokens == tokens and session.padding_tokens == (64 + 32 + 128) - tokens
    assert session.padding_overhead == pytest.approx(session.padding_tokens / (64 + 32 + 128))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda m: PackedInferenceSession(m, token_budgets=0), ValueError, "token_budgets must be positive ints"),
        (lambda m: PackedInferenceSession(m, token_budgets=[32, "64"]), ValueError, r"token_budgets\[1\]"),
        (lambda m: PackedInferenceSession(m, 32, max_images=0), ValueError, "max_images must be an int >= 1"),
        (lambda m: PackedInferenceSession(m, 32, use_cuda_graphs=True), ValueError, "CUDA graphs need the model"),
        (lambda m: PackedInferenceSession(torch.nn.Linear(2, 2), 32), TypeError, "fastvit VisionTransformer"),
        (lambda m: PackedInferenceSession(m, 32, max_images=1)(_images()), ValueError, "exceed the session's max"),
        (lambda m: PackedInferenceSession(m, 32)([torch.randn(3, 32, 32)]), ValueError, "largest token budget"),
    ],
)
def test_packed_inference_session_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make(_session_model())


ROPE_SESSION_MODELS = {
    "cat_class_token": dict(),
    "rotate_half_registers_qk_norm": dict(rope_rotate_half=True, num_reg_tokens=2, qk_norm=True, global_pool="avg"),
    "rope_mixed": dict(rope_type="mixed", use_abs_pos_emb=False),  # per-block, per-head tables
}


def _rope_session_model(backend: str, **options) -> Eva:
    """A tiny Eva with RoPE; ``backend`` 'triton': its attention on the Triton kernels, the rest on the default."""
    backend = {"qkv_attention": "triton"} if backend == "triton" else backend  # packed: varlen_qkv_attention
    model = Eva(**TINY, **options, use_rot_pos_emb=True, dynamic_img_size=True, backend=backend).eval()
    # Peaked attention and an attention output that moves the logits: the initial weights leave the attention near
    # uniform and its output small, where RoPE hardly shows.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("qkv.weight", "attn.proj.weight", "head.weight")):
                param.normal_(0.0, 2.0 / param.shape[1] ** 0.5, generator=gen)
    return model


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_backend("triton"))])
@pytest.mark.parametrize("options", ROPE_SESSION_MODELS.values(), ids=ROPE_SESSION_MODELS.keys())
def test_packed_inference_session_serves_rope_models_equal_to_forward_packed(backend, options):
    # The packed RoPE table is a per-batch input padded with identity rows to the budget; the padding sequence's rows
    # are never read by a real image. triton: the varlen kernel's RoPE/qk-norm prologue (interpreter on CPU).
    model = _rope_session_model(backend, **options)
    session = PackedInferenceSession(model, token_budgets=[32, 64, 128], max_images=6, dtype=torch.float32)
    for sizes in (SIZES, [(4, 4)], [(16, 8), (8, 16)]):
        images = _images(sizes)
        with torch.no_grad():
            expected = model.forward_packed(images)
        got = session(images)
        assert session.padding_tokens > 0  # every batch here is padded: the identity rows are exercised
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_packed_inference_session_refuses_budgets_without_room_for_an_image():
    with pytest.raises(ValueError, match=r"token_budgets must each exceed num_prefix_tokens=3"):
        PackedInferenceSession(_rope_session_model("torch", num_reg_tokens=2), token_budgets=[64, 3])


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_packed_session_graph_replay_equals_eager(dtype):
    """Two batches of different sizes in one budget replay one graph; each equals the eager padded run."""
    model = _session_model(global_pool="avg").cuda()
    graphs = PackedInferenceSession(model, token_budgets=[64, 256], max_images=8, dtype=dtype)
    eager = PackedInferenceSession(model, token_budgets=[64, 256], max_images=8, dtype=dtype, use_cuda_graphs=False)
    for sizes in (SIZES, [(12, 12), (4, 8)], [(32, 16), (8, 8), (16, 16)]):
        images = [image.cuda() for image in _images(sizes)]
        torch.testing.assert_close(graphs(images), eager(images), **dtype_tols(dtype))
    assert graphs.replays == 3


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_packed_session_rope_graph_replay_equals_forward_packed(dtype):
    """An Eva with RoPE (registers, qk-norm): the static table is refilled before each replay; batches of different
    grids in one budget each equal ``forward_packed`` under the same autocast."""
    model = _rope_session_model("auto", **ROPE_SESSION_MODELS["rotate_half_registers_qk_norm"]).cuda()
    session = PackedInferenceSession(model, token_budgets=[64, 256], max_images=8, dtype=dtype)
    for sizes in (SIZES, [(12, 12), (4, 8)], [(32, 16), (8, 8), (16, 16)]):
        images = [image.cuda() for image in _images(sizes)]
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            expected = model.forward_packed(images)
        torch.testing.assert_close(session(images), expected, **dtype_tols(dtype))
    assert session.replays == 3
