"""The reference ops (the spec) against independent formulations, in fp64, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvit import reference

from utils import assert_within_torch_error


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    weight = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    (out * weight).sum().backward()
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("tokens", [1, 7, 50, 197])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_attention_matches_sdpa(tokens, scale):
    q, k, v = (torch.randn(2, 3, tokens, 16, dtype=torch.float64) for _ in range(3))
    out, grads = _grads(lambda q, k, v: reference.attention(q, k, v, scale=scale), q, k, v)
    expected, expected_grads = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale), q, k, v)
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_attention_half_precision_within_twice_sdpa_error():
    q, k, v = (torch.randn(1, 2, 33, 8) * 4 for _ in range(3))
    exact = reference.attention(q.double(), k.double(), v.double())
    half = reference.attention(q.half(), k.half(), v.half())
    sdpa_half = F.scaled_dot_product_attention(q.half(), k.half(), v.half())
    assert half.dtype == torch.float16
    assert_within_torch_error("attention fp16", half, sdpa_half, exact)


def test_qkv_attention_matches_chunked_heads():
    batch, tokens, heads, head_dim = 2, 13, 4, 8
    width = heads * head_dim
    qkv = torch.randn(batch, tokens, 3 * width, dtype=torch.float64)

    def by_chunks(qkv):
        # q, k, v as the three width-C slices of the last dim, heads as D-sized slices of each.
        q, k, v = (t.unflatten(-1, (heads, head_dim)).transpose(1, 2) for t in qkv.split(width, dim=-1))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)

    out, (grad,) = _grads(lambda x: reference.qkv_attention(x, heads), qkv)
    expected, (expected_grad,) = _grads(by_chunks, qkv)
    assert out.shape == (batch, tokens, width)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, expected_grad)


def _patch_embed_by_unfold(x, weight, bias, pos_embed, cls_token):
    """im2col + matmul, an independent formulation of the conv projection."""
    embed_dim, _, patch, _ = weight.shape
    cols = F.unfold(x, kernel_size=patch, stride=patch)  # [B, Cin*P*P, N]
    tokens = cols.transpose(1, 2) @ weight.reshape(embed_dim, -1).T + bias
    num_patches = tokens.shape[1]
    if pos_embed is not None and pos_embed.shape[1] == num_patches:
        tokens = tokens + pos_embed
        pos_embed = None
    if cls_token is not None:
        tokens = torch.cat([cls_token.repeat(x.shape[0], 1, 1), tokens], dim=1)
    if pos_embed is not None:
        tokens = tokens + pos_embed
    return tokens


@pytest.mark.parametrize(
    "num_prefix, pos_covers_prefix", [(0, False), (1, True), (1, False), (3, True), (3, False), (1, None)]
)
def test_patch_embed_matches_unfold(num_prefix, pos_covers_prefix):
    batch, in_chans, height, width, patch, dim = 2, 3, 16, 24, 4, 10
    num_patches = (height // patch) * (width // patch)
    x = torch.randn(batch, in_chans, height, width, dtype=torch.float64)
    weight = torch.randn(dim, in_chans, patch, patch, dtype=torch.float64)
    bias = torch.randn(dim, dtype=torch.float64)
    cls = torch.randn(1, num_prefix, dim, dtype=torch.float64) if num_prefix else None
    pos = None
    if pos_covers_prefix is not None:
        pos = torch.randn(1, num_patches + (num_prefix if pos_covers_prefix else 0), dim, dtype=torch.float64)
    inputs = [t for t in (x, weight, bias, pos, cls) if t is not None]

    def call(fn):
        def wrapped(*args):
            it = iter(args)
            return fn(
                next(it),
                next(it),
                next(it),
                next(it) if pos is not None else None,
                next(it) if cls is not None else None,
            )

        return wrapped

    out, grads = _grads(call(reference.patch_embed), *inputs)
    expected, expected_grads = _grads(call(_patch_embed_by_unfold), *inputs)
    assert out.shape == (batch, num_prefix + num_patches, dim)
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("residual", [True, False])
def test_ln_mlp_matches_modules(approximate, residual):
    width, hidden = 24, 40
    ln = nn.LayerNorm(width, eps=1e-6).double()
    fc1, fc2 = nn.Linear(width, hidden).double(), nn.Linear(hidden, width).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(3, 11, width, dtype=torch.float64, requires_grad=True)
    out = reference.ln_mlp(
        x, ln.weight, ln.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, 1e-6, approximate, residual
    )
    expected = fc2(F.gelu(fc1(ln(x)), approximate=approximate)) + (x if residual else 0)
    torch.testing.assert_close(out, expected)
    params = [x, ln.weight, ln.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    weight = torch.randn_like(out)
    grads = torch.autograd.grad((out * weight).sum(), params)
    expected_grads = torch.autograd.grad((expected * weight).sum(), params)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_ln_mlp_gradcheck():
    width, hidden = 6, 10
    args = [
        torch.randn(2, 3, width),
        torch.randn(width),
        torch.randn(width),
        torch.randn(hidden, width),
        torch.randn(hidden),
        torch.randn(width, hidden),
        torch.randn(width),
    ]
    args = [a.double().requires_grad_() for a in args]
    assert torch.autograd.gradcheck(lambda *a: reference.ln_mlp(*a, 1e-6, "none", True), args)
