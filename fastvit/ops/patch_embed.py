"""Patch embedding: ``fastvit.ops.patch_embed`` (image -> [B, T+N, D] tokens).

Conv-equivalent projection of non-overlapping P×P patches (kernel = stride = P), plus the
position embedding and the prefix (class / register) tokens. Backends: ``torch`` (the reference).
"""

from __future__ import annotations

import torch

from fastvit import dispatch, reference
from fastvit.ops._validate import check_same_device, check_shape, check_tensor


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Cut ``x`` into patches, project them, add position embeddings, prepend prefix tokens.

    Args:
        x: [B, Cin, H, W] image batch, H and W divisible by the patch size P (any memory format).
        weight: [D, Cin, P, P] projection (a Conv2d weight with stride P).
        bias: [D] or None.
        pos_embed: [1, T+N, D] added to all tokens, or [1, N, D] added to the N = (H/P)·(W/P)
            patch tokens only (timm's ``no_embed_class``); or None.
        cls_token: [1, T, D] prefix tokens (class and/or register tokens), or None.
        backend: 'auto' | 'triton' | 'cuda' | 'torch'; None = the process default.

    Returns:
        [B, T+N, D].
    """
    check_tensor("x", x, ndim=4)
    check_tensor("weight", weight, ndim=4)
    embed_dim, in_chans, patch_h, patch_w = weight.shape
    if x.shape[1] != in_chans:
        raise ValueError(
            f"x must have {in_chans} channels (weight is {tuple(weight.shape)}), got shape {tuple(x.shape)}"
        )
    height, width = x.shape[-2:]
    if height % patch_h != 0 or width % patch_w != 0:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the patch size {patch_h}x{patch_w}; "
            "resize or crop the input to a multiple of the patch size"
        )
    num_patches = (height // patch_h) * (width // patch_w)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_shape("bias", bias, (embed_dim,), "the embedding dim D of weight")
    num_prefix = 0
    if cls_token is not None:
        check_tensor("cls_token", cls_token, ndim=3)
        if cls_token.shape[0] != 1 or cls_token.shape[2] != embed_dim:
            raise ValueError(f"cls_token must have shape [1, T, {embed_dim}], got {tuple(cls_token.shape)}")
        num_prefix = cls_token.shape[1]
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=3)
        allowed = {num_patches + num_prefix, num_patches}
        if pos_embed.shape[0] != 1 or pos_embed.shape[2] != embed_dim or pos_embed.shape[1] not in allowed:
            raise ValueError(
                f"pos_embed must have shape [1, {num_patches + num_prefix}, {embed_dim}] (all tokens) or "
                f"[1, {num_patches}, {embed_dim}] (patch tokens only) for a {height}x{width} image with "
                f"{patch_h}x{patch_w} patches and {num_prefix} prefix tokens; got {tuple(pos_embed.shape)} "
                "(resample it with fastvit.layers.resample_abs_pos_embed for another image size)"
            )
    check_same_device(x=x, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    return dispatch.implementation("patch_embed", backend, x.device)(x, weight, bias, pos_embed, cls_token)


@dispatch.register("patch_embed", "torch")
def _patch_embed_torch(x, weight, bias, pos_embed, cls_token):
    return reference.patch_embed(x, weight, bias, pos_embed, cls_token)
