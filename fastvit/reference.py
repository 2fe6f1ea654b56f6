"""Pure-PyTorch definitions of every fastvit op: the specification.

Every backend of every op (``torch``, ``triton``, ``cuda``) is tested against these functions, run in
fp64 for the ground truth; autograd gives their backward. They are written to be read, not to be fast
(attention materialises the N×N matrix, the patch embedding cuts patches out explicitly): the fast
plain-PyTorch forms are the ``torch`` backends in ``fastvit/ops/<op>.py``. They take the same arguments as
the public ops in ``fastvit.ops`` but do not validate them: validation lives in the op layer, once per op.

Shapes: ``B`` batch, ``N`` tokens, ``H`` heads, ``D`` head dim, ``C = H*D`` width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dimension. x: [..., C], weight/bias: [C]."""
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) over the keys, [B, H, N, M], in q's dtype (softmax in fp32 for fp16/bf16).

    The attention weights themselves: what ``attention`` multiplies v by, and what attention rollout reads.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    return scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v, no mask. q, k, v: [B, H, N, D] -> [B, H, N, D].

    ``scale`` defaults to D**-0.5. The softmax runs in fp32 for fp16/bf16 inputs (the numerics rule
    of every fastvit kernel). ``dropout_p`` drops attention probabilities (training only; the
    fused kernels do not implement it).
    """
    probs = attention_probs(q, k, scale)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def qkv_attention(
    qkv: torch.Tensor, num_heads: int, scale: float | None = None, dropout_p: float = 0.0
) -> torch.Tensor:
    """Multi-head self-attention on the packed output of a qkv Linear.

    qkv: [B, N, 3*C], laid out as timm's ``reshape(B, N, 3, H, D)``; returns [B, N, C] (heads
    concatenated, ready for the proj Linear).
    """
    batch, tokens, width3 = qkv.shape
    head_dim = width3 // (3 * num_heads)
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    out = attention(q, k, v, scale=scale, dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(batch, tokens, num_heads * head_dim)


def patch_embed(x, weight, bias, pos_embed=None, cls_token=None):
    """Image to token sequence: non-overlapping P×P patches projected to D dims.

    x: [B, Cin, Hin, Win] (Hin, Win divisible by P); weight: [D, Cin, P, P] (a conv kernel with
    stride P); bias: [D] or None. ``cls_token``: [1, T, D] prefix tokens (class and/or register
    tokens), prepended to the N patch tokens. ``pos_embed``: [1, T+N, D] is added to every token
    (timm's default), or [1, N, D] to the patch tokens only (timm's ``no_embed_class``).
    Returns [B, T+N, D].
    """
    batch, in_chans, height, width = x.shape
    embed_dim, _, patch_h, patch_w = weight.shape
    grid_h, grid_w = height // patch_h, width // patch_w
    # One row per patch, its pixels in the conv weight's (Cin, P, P) order: [B, N, Cin·P·P].
    patches = x.reshape(batch, in_chans, grid_h, patch_h, grid_w, patch_w).permute(0, 2, 4, 1, 3, 5)
    tokens = F.linear(patches.reshape(batch, grid_h * grid_w, -1), weight.reshape(embed_dim, -1), bias)
    num_prefix = 0 if cls_token is None else cls_token.shape[1]
    if num_prefix:
        tokens = torch.cat([cls_token.expand(batch, -1, -1).to(tokens.dtype), tokens], dim=1)
    if pos_embed is None:
        return tokens
    if pos_embed.shape[1] == grid_h * grid_w:  # patch tokens only: nothing is added to the prefix tokens
        return torch.cat([tokens[:, :num_prefix], tokens[:, num_prefix:] + pos_embed], dim=1)
    return tokens + pos_embed


def normalize_uint8(images: torch.Tensor, mean, std, dtype: torch.dtype) -> torch.Tensor:
    """The spec of the uint8 path's input: ``((images / 255 - mean[c]) / std[c]).to(dtype)``.

    ``images``: uint8 [B, C, H, W] (any strides). Computed in fp32 (fp64 for an fp64 ``dtype``) exactly as
    torchvision's ``Normalize`` on ``images.float() / 255``, then rounded to ``dtype``.
    """
    work = torch.promote_types(dtype, torch.float32)
    mean = torch.tensor(mean, dtype=work, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=work, device=images.device).view(1, -1, 1, 1)
    return ((images.to(work) / 255 - mean) / std).to(dtype)


def ln_mlp(
    x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=1e-6, approximate="none", residual=True
):
    """The MLP half of a pre-norm ViT block: ``x + fc2(gelu(fc1(LayerNorm(x))))``.

    x: [..., C]; fc1_weight: [Hid, C]; fc2_weight: [C, Hid]. ``approximate`` is GELU's
    ('none' = exact erf, as timm's nn.GELU; 'tanh'). ``residual=False`` drops the ``x +``.
    """
    hidden = F.gelu(F.linear(layer_norm(x, ln_weight, ln_bias, eps), fc1_weight, fc1_bias), approximate=approximate)
    out = F.linear(hidden, fc2_weight, fc2_bias)
    return x + out if residual else out


def linear_residual(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor
) -> torch.Tensor:
    """A Linear layer and the residual add after it: ``residual + x @ weight.T + bias``.

    x: [..., K]; weight: [N, K]; bias: [N] or None; residual: [..., N] (x's leading shape). In a ViT
    block this is the attention half's ``x + proj(attn_out)``.
    """
    return residual + F.linear(x, weight, bias)
