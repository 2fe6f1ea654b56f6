"""Multi-head self-attention: ``fastvit.ops.attention`` and ``fastvit.ops.qkv_attention``.

``qkv_attention`` takes the packed ``[B, N, 3*C]`` output of the qkv Linear and returns
``[B, N, C]`` for the proj Linear; ``attention`` is the SDPA-shaped ``[B, H, N, D]`` variant.

Backends:
  ``torch``   ``F.scaled_dot_product_attention`` on strided q/k/v views (timm's own path); every dtype,
              head dim and dropout.
  ``triton``  FlashAttention-2-style kernels (``fastvit/ops/triton/attention.py``): head dims 32, 48, 64,
              80, 96, 128, v's head dim equal to q's, float16/bfloat16/float32, no dropout. ``auto`` leaves
              float32 without TF32 to ``torch`` (the kernels then have no tensor cores).
The spec both are tested against is ``fastvit.reference.attention``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastvit import dispatch
from fastvit.validation import (
    autocast_dtype,
    check_positive_int,
    check_probability,
    check_same_device,
    check_same_dtype,
    check_scale,
    check_tensor,
)


class AttentionCall(NamedTuple):
    """What a backend's ``supports`` may read about an attention call (see ``fastvit.dispatch``)."""

    device: torch.device
    dtype: torch.dtype  # the dtype the kernels compute in: the input's, or the autocast dtype
    head_dim: int
    v_head_dim: int
    dropout: bool
    allow_tf32: bool  # torch.backends.cuda.matmul.allow_tf32, read for float32 only


def attention_call(
    device: torch.device, dtype: torch.dtype, head_dim: int, v_head_dim: int | None = None, dropout: bool = False
) -> AttentionCall:
    """The call signature of an attention on ``device`` with inputs of ``dtype`` (autocast applied here)."""
    amp = autocast_dtype(device)
    if amp is not None and dtype in (torch.float16, torch.float32):
        dtype = amp
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    return AttentionCall(device, dtype, head_dim, head_dim if v_head_dim is None else v_head_dim, dropout, tf32)


def qkv_attention(
    qkv: torch.Tensor,
    num_heads: int,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Self-attention on a packed qkv buffer.

    Args:
        qkv: [B, N, 3*C], the qkv Linear's output in timm's layout (``reshape(B, N, 3, H, D)``).
        num_heads: H; C must be divisible by it.
        scale: softmax scale, default D**-0.5.
        dropout_p: attention-probability dropout (``torch`` backend only).
        backend: 'auto' | 'triton' | 'torch' (the backends implementing it); None = the process default.

    Returns:
        [B, N, C], heads concatenated.
    """
    check_tensor("qkv", qkv, ndim=3)
    check_positive_int("num_heads", num_heads)
    if qkv.shape[-1] == 0:
        raise ValueError(
            f"qkv's last dimension must be 3 * num_heads * head_dim with head_dim >= 1, got qkv of shape "
            f"{tuple(qkv.shape)}"
        )
    if qkv.shape[-1] % (3 * num_heads) != 0:
        raise ValueError(
            f"qkv's last dimension must be 3 * num_heads * head_dim; got {qkv.shape[-1]}, "
            f"which is not divisible by 3 * num_heads = {3 * num_heads}"
        )
    scale = check_scale(scale)
    dropout_p = check_probability("dropout_p", dropout_p)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    call = attention_call(qkv.device, qkv.dtype, head_dim, dropout=dropout_p > 0.0)
    return dispatch.select("qkv_attention", backend, call)(qkv, num_heads, scale, dropout_p)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v without mask, as ``F.scaled_dot_product_attention``.

    Args:
        q: [B, H, N, D]; k: [B, H, M, D]; v: [B, H, M, Dv].
        scale: softmax scale, default D**-0.5.
        dropout_p: attention-probability dropout (``torch`` backend only).
        backend: 'auto' | 'triton' | 'torch' (the backends implementing it); None = the process default.

    Returns:
        [B, H, N, Dv].
    """
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, tensor, ndim=4)
    check_same_dtype(q=q, k=k, v=v)
    check_same_device(q=q, k=k, v=v)
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(
            f"q, k and v must share batch and head dimensions [B, H, ...]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[-1] == 0:
        raise ValueError(f"q's head dim must be >= 1, got q of shape {tuple(q.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k's head dim must equal q's ({q.shape[-1]}), got k {tuple(k.shape)}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v must have as many tokens as k ({k.shape[-2]}), got v {tuple(v.shape)}")
    scale = check_scale(scale)
    dropout_p = check_probability("dropout_p", dropout_p)
    call = attention_call(q.device, q.dtype, q.shape[-1], v.shape[-1], dropout=dropout_p > 0.0)
    return dispatch.select("attention", backend, call)(q, k, v, scale, dropout_p)


# ------------------------------------------------------------------------------------------------
# The torch backend: SDPA on strided views, as timm's Attention (fused_attn=True).


@dispatch.register("qkv_attention", "torch")
def _qkv_attention_torch(qkv, num_heads, scale, dropout_p):
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D] views
    return _sdpa(q, k, v, scale, dropout_p).transpose(1, 2).flatten(2)


@dispatch.register("attention", "torch")
def _attention_torch(q, k, v, scale, dropout_p):
    return _sdpa(q, k, v, scale, dropout_p)


def _sdpa(q, k, v, scale, dropout_p):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
