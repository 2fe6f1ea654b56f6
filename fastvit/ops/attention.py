"""Multi-head self-attention: ``fastvit.ops.attention`` and ``fastvit.ops.qkv_attention``.

``qkv_attention`` takes the packed ``[B, N, 3*C]`` output of the qkv Linear and returns
``[B, N, C]`` for the proj Linear; ``attention`` is the SDPA-shaped ``[B, H, N, D]`` variant.
Backends: ``torch`` (the reference). Dropout on the attention probabilities is an option only
the reference implements: ``auto`` picks it whenever ``dropout_p > 0``.
"""

from __future__ import annotations

import torch

from fastvit import dispatch, reference
from fastvit.ops._validate import (
    check_positive_int,
    check_probability,
    check_same_device,
    check_same_dtype,
    check_scale,
    check_tensor,
)


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
        dropout_p: attention-probability dropout (reference backend only).
        backend: 'auto' | 'triton' | 'cuda' | 'torch'; None = the process default.

    Returns:
        [B, N, C], heads concatenated.
    """
    check_tensor("qkv", qkv, ndim=3)
    check_positive_int("num_heads", num_heads)
    if qkv.shape[-1] % (3 * num_heads) != 0:
        raise ValueError(
            f"qkv's last dimension must be 3 * num_heads * head_dim; got {qkv.shape[-1]}, "
            f"which is not divisible by 3 * num_heads = {3 * num_heads}"
        )
    scale = check_scale(scale)
    dropout_p = check_probability("dropout_p", dropout_p)
    backend = _backend_for_dropout("qkv_attention", backend, dropout_p)
    return dispatch.implementation("qkv_attention", backend, qkv.device)(qkv, num_heads, scale, dropout_p)


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
        dropout_p: attention-probability dropout (reference backend only).
        backend: 'auto' | 'triton' | 'cuda' | 'torch'; None = the process default.

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
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k's head dim must equal q's ({q.shape[-1]}), got k {tuple(k.shape)}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v must have as many tokens as k ({k.shape[-2]}), got v {tuple(v.shape)}")
    scale = check_scale(scale)
    dropout_p = check_probability("dropout_p", dropout_p)
    backend = _backend_for_dropout("attention", backend, dropout_p)
    return dispatch.implementation("attention", backend, q.device)(q, k, v, scale, dropout_p)


def _backend_for_dropout(op_name: str, backend: str | None, dropout_p: float) -> str | None:
    if dropout_p == 0.0:
        return backend
    resolved = dispatch.get_default_backend() if backend is None else backend
    if resolved in ("auto", "torch"):
        return "torch"
    raise ValueError(f"{op_name}: dropout_p > 0 is implemented only by the 'torch' backend, not {resolved!r}")


@dispatch.register("qkv_attention", "torch")
def _qkv_attention_torch(qkv, num_heads, scale, dropout_p):
    return reference.qkv_attention(qkv, num_heads, scale=scale, dropout_p=dropout_p)


@dispatch.register("attention", "torch")
def _attention_torch(q, k, v, scale, dropout_p):
    return reference.attention(q, k, v, scale=scale, dropout_p=dropout_p)
