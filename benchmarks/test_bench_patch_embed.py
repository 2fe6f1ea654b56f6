"""Patch embedding: the fused Triton op vs timm's PatchEmbed + cat(cls) + pos_embed vs the conv reference.

On a GPU: ViT-B/16 and ViT-H/14 at 224 px, bf16, batch 1 to 512, forward (inference) and forward+backward
(training: gradients of weight, bias, pos_embed and cls_token; the images need none), plus the uint8 inference
path (decoded [B, H, W, 3] images normalised in the kernel) against normalise-then-timm. Each result records
GB/s against the bytes that must move (image read + weight read + tokens written; for the backward also
dY and the image read again and the parameter gradients written): the floor this memory-bound op chases.

Without a GPU (smoke mode): one tiny shape in fp32, the Triton candidate in Triton's interpreter. It proves the
suite runs; the numbers say nothing about the kernels. Every candidate is checked against the fp32 reference
before it is timed.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import fastvit
from benchmarks.harness import DEVICE, profile_cases, record, run_benchmark
from fastvit import dispatch, reference

timm = pytest.importorskip("timm")
pe_ops = importlib.import_module("fastvit.ops.patch_embed")  # the module; fastvit.ops.patch_embed is the function

ON_GPU = DEVICE.type == "cuda"
if ON_GPU:
    # name: (img_size, patch, embed_dim)
    MODELS = {"vit_base_patch16_224": (224, 16, 768), "vit_huge_patch14_224": (224, 14, 1280)}
    BATCHES = [1, 64, 256, 512]
    MODELS, BATCHES = profile_cases(MODELS, ["vit_base_patch16_224"]), profile_cases(BATCHES, [256])
    DTYPE, REL_TOL = torch.bfloat16, 2e-2
else:
    MODELS = {"tiny_patch8_32": (32, 8, 32)}
    BATCHES = [2]
    DTYPE, REL_TOL = torch.float32, 1e-4
CANDIDATES = ["fastvit triton", "timm PatchEmbed + cat + pos", "fastvit reference (conv)"]
MODES = ["fwd", "fwd+bwd"]
ROUNDS = 20 if ON_GPU else 3


def _triton_reason() -> str | None:
    return dispatch.backend_unusable_reason("triton", DEVICE)


def _setup(name: str, batch: int):
    img_size, patch, dim = MODELS[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img_size, img_size, generator=gen)
    proj = timm.layers.PatchEmbed(img_size=img_size, patch_size=patch, in_chans=3, embed_dim=dim)
    num_patches = proj.num_patches
    pos = torch.randn(1, num_patches + 1, dim, generator=gen) * 0.02
    cls = torch.randn(1, 1, dim, generator=gen) * 0.02
    proj = proj.to(DEVICE, DTYPE)
    params = [proj.proj.weight, proj.proj.bias, pos.to(DEVICE, DTYPE).requires_grad_(), cls.to(DEVICE, DTYPE)]
    params[3].requires_grad_()
    return x.to(DEVICE, DTYPE), proj, params


def _candidate(candidate: str, proj, params):
    weight, bias, pos, cls = params
    if candidate == "fastvit triton":
        return lambda x: fastvit.ops.patch_embed(x, weight, bias, pos, cls, backend="triton")
    if candidate == "fastvit reference (conv)":
        return lambda x: fastvit.ops.patch_embed(x, weight, bias, pos, cls, backend="torch")

    def timm_sequence(x):  # what timm's VisionTransformer does: patch_embed, then _pos_embed
        tokens = proj(x)
        return torch.cat([cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + pos

    return timm_sequence


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_close(label: str, got: torch.Tensor, want: torch.Tensor) -> None:
    error = (got.float() - want).abs().max().item()
    scale = want.abs().max().item()
    assert error <= REL_TOL * scale, f"{label}: error {error:.3g} vs scale {scale:.3g}; not timing a wrong result"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(MODELS))
def test_patch_embed(benchmark, name, batch, candidate, mode):
    if candidate == "fastvit triton" and _triton_reason() is not None:
        pytest.skip(_triton_reason())
    x, proj, params = _setup(name, batch)
    fn = _candidate(candidate, proj, params)

    # Correctness first: tokens (and, for fwd+bwd, every parameter gradient) vs the fp32 conv reference.
    params32 = [p.detach().float().requires_grad_() for p in params]
    ref = fastvit.ops.patch_embed(x.float(), *params32, backend="torch")
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref_grads = torch.autograd.grad(ref, params32, grad_out)
    out = fn(x)
    _check_close(f"{candidate} tokens", out, ref.detach())
    if mode == "fwd+bwd":
        for label, got, want in zip(
            ("weight", "bias", "pos", "cls"), torch.autograd.grad(out, params, grad_out.to(out.dtype)), ref_grads
        ):
            _check_close(f"{candidate} grad {label}", got, want)

    grad_out = grad_out.to(out.dtype)
    moved = _nbytes(x, *params, out)
    if mode == "fwd":

        def run():
            with torch.no_grad():
                fn(x)

    else:
        moved += _nbytes(out, x, *params)  # dY and the image read again, the parameter gradients written

        def run():
            torch.autograd.grad(fn(x), params, grad_out)

    run_benchmark(benchmark, run, warmup_rounds=2, rounds=ROUNDS)
    record(
        benchmark,
        "patch_embed",
        f"{name} {mode} b{batch}",
        candidate,
        bytes_moved=moved,
        primary="gbps",
        model=name,
        op="patch_embed",
        mode=mode,
        batch=batch,
        dtype=str(DTYPE),
    )


UINT8_CANDIDATES = ["fastvit triton uint8", "timm PatchEmbed on normalised floats"]


@pytest.mark.parametrize("candidate", UINT8_CANDIDATES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(MODELS))
def test_patch_embed_uint8_inference(benchmark, name, batch, candidate):
    if candidate == "fastvit triton uint8" and _triton_reason() is not None:
        pytest.skip(_triton_reason())
    img_size, _patch, _dim = MODELS[name]
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, img_size, img_size, 3), generator=gen, dtype=torch.uint8).to(DEVICE)
    _, proj, params = _setup(name, batch)
    weight, bias, pos, cls = params
    mean_t = torch.tensor(pe_ops.IMAGENET_DEFAULT_MEAN, device=DEVICE).view(1, 3, 1, 1)
    std_t = torch.tensor(pe_ops.IMAGENET_DEFAULT_STD, device=DEVICE).view(1, 3, 1, 1)

    if candidate == "fastvit triton uint8":

        def fn():
            return pe_ops.patch_embed_uint8(images, weight, bias, pos, cls, backend="triton")

    else:

        def fn():  # the usual pipeline: to float, normalise, to the model dtype, then timm's sequence
            x = ((images.permute(0, 3, 1, 2).float() / 255 - mean_t) / std_t).to(DTYPE)
            tokens = proj(x)
            return torch.cat([cls.expand(batch, -1, -1), tokens], dim=1) + pos

    with torch.no_grad():
        x = reference.normalize_uint8(
            images.permute(0, 3, 1, 2), pe_ops.IMAGENET_DEFAULT_MEAN, pe_ops.IMAGENET_DEFAULT_STD, torch.float32
        )
        ref = fastvit.ops.patch_embed(x, *(p.float() for p in params), backend="torch")
        _check_close(candidate, fn(), ref)

    def run():
        with torch.no_grad():
            fn()

    moved = _nbytes(images, *params) + batch * (pos.shape[1]) * weight.shape[0] * weight.element_size()
    run_benchmark(benchmark, run, warmup_rounds=2, rounds=ROUNDS)
    record(
        benchmark,
        "patch_embed_uint8",
        f"{name} fwd uint8 b{batch}",
        candidate,
        bytes_moved=moved,
        primary="gbps",
        model=name,
        op="patch_embed_uint8",
        mode="fwd uint8",
        batch=batch,
        dtype=str(DTYPE),
    )
