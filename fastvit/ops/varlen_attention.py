"""Self-attention within variable-length sequences packed back to back: ``fastvit.ops.varlen_qkv_attention``.

flash-attn's varlen form (``flash_attn_varlen_qkvpacked_func``): ``[T, 3*C]`` with ``cu_seqlens``, no padding.
Backends: ``torch`` (below: one SDPA per sequence on CPU eager, pad + key mask elsewhere) and ``triton`` (the
attention kernels with ``VARLEN=True``, ``fastvit/ops/triton/attention.py``). The spec is
``fastvit.reference.varlen_qkv_attention`` (each sequence alone).
"""

from __future__ import annotations

import torch

from fastvit import dispatch
from fastvit.ops.attention import (
    AttentionPrologue,
    QKNorm,
    _check_prologue,
    _check_qkv,
    _qkv_attention_torch,
    attention_call,
)
from fastvit.validation import check_scale


def varlen_qkv_attention(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    num_heads: int,
    scale: float | None = None,
    *,
    check_seqlens: bool = True,
    backend: str | None = None,
    rope: torch.Tensor | None = None,
    num_prefix_tokens: int = 0,
    rope_layout: str = "interleaved",
    q_norm: QKNorm | None = None,
    k_norm: QKNorm | None = None,
) -> torch.Tensor:
    """Self-attention within each of B variable-length sequences packed back to back (``flash_attn_varlen_qkvpacked``).

    No token attends across a sequence boundary; empty and length-1 sequences are allowed. Optionally qk-norm then
    RoPE are applied to q and k first, as ``qkv_attention``'s prologue (inside the Triton kernels), each sequence's
    first ``num_prefix_tokens`` tokens left unrotated.

    Args:
        qkv: [T, 3*C], every sequence's tokens in turn, each row the qkv Linear's output in timm's layout
            (``reshape(T, 3, H, D)``).
        cu_seqlens: [B + 1] int32 on qkv's device: sequence b is tokens ``cu_seqlens[b]:cu_seqlens[b + 1]``;
            ``cu_seqlens[0] == 0``, non-decreasing, ``cu_seqlens[-1] == T``.
        max_seqlen: an int at least the longest sequence's length (the kernels' grid covers max_seqlen tokens per
            sequence; a larger value costs idle programs, a smaller one leaves tokens unwritten).
        num_heads: H; C must be divisible by it.
        scale: softmax scale, default D**-0.5.
        check_seqlens: check cu_seqlens' values and max_seqlen against them. That reads cu_seqlens on the host (one
            device sync per call); pass False in code captured by CUDA graphs or timed per launch, with cu_seqlens
            built correctly: the kernels trust it, and bad values give wrong results or reads and writes outside
            qkv and out (keep the check on while developing). Under ``torch.compile`` the value checks are
            skipped (they would break the graph); the cheap ones (dtype, shape, device) always run.
        backend: 'auto' | 'triton' | 'torch'; None = the process default.
        rope: the packed [T - num_prefix_tokens, 2*D] cat(sin, cos) table (``fastvit.packing.packed_rope_table``):
            packed token g, if it is not among its sequence's first ``num_prefix_tokens``, is rotated by row
            g - num_prefix_tokens (so sequence b's own table is rows ``cu_seqlens[b]:cu_seqlens[b + 1] -
            num_prefix_tokens``; the rows at later sequences' prefix tokens are not read: ``packed_rope_table`` puts
            identity rows there); or one such table per head, [H, T - num_prefix_tokens, 2*D] (RoPE-Mixed). None: no
            RoPE. A table that requires grad gets its gradient (see ``qkv_attention``).
        num_prefix_tokens: the leading (class / register) tokens of every sequence, left unrotated; only with
            ``rope``.
        rope_layout, q_norm, k_norm: as ``qkv_attention``'s (the norms apply to every token).

    Returns:
        [T, C], heads concatenated, ready for the proj Linear.
    """
    head_dim = _check_qkv("qkv", qkv, 2, num_heads)
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be an int32 tensor (as flash-attn's), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0:
        raise ValueError(f"cu_seqlens must be 1-D with B + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != qkv.device:
        raise ValueError(f"cu_seqlens must be on qkv's device ({qkv.device}), got {cu_seqlens.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if not isinstance(check_seqlens, bool):
        raise TypeError(f"check_seqlens must be a bool, got {type(check_seqlens).__name__}")
    if check_seqlens and not torch.compiler.is_compiling():
        check_cu_seqlens(cu_seqlens, qkv.shape[0], max_seqlen)
    scale = check_scale(scale)
    tokens = qkv.shape[0]
    prologue = _check_prologue(
        qkv, tokens, head_dim, rope, num_prefix_tokens, rope_layout, q_norm, k_norm, num_heads=num_heads
    )
    parts = prologue.describe() if prologue is not None else ()
    call = attention_call(qkv.device, qkv.dtype, head_dim, prologue=parts)
    fn = dispatch.select("varlen_qkv_attention", backend, call)
    if prologue is None:
        return fn(qkv, cu_seqlens, max_seqlen, num_heads, scale)
    return fn(qkv, cu_seqlens, max_seqlen, num_heads, scale, prologue)


def check_cu_seqlens(cu_seqlens: torch.Tensor, tokens: int, max_seqlen: int) -> None:
    """ValueError unless ``cu_seqlens`` ([B + 1] ints) starts at 0, never decreases, ends at ``tokens`` and has no
    sequence longer than ``max_seqlen``. Reads four numbers back to the host: one device sync."""
    lengths = cu_seqlens.diff()
    if lengths.numel() == 0:
        lengths = cu_seqlens.new_zeros(1)
    first, shortest, last, longest = torch.stack([cu_seqlens[0], lengths.min(), cu_seqlens[-1], lengths.max()]).tolist()
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {first}")
    if shortest < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing (sequence lengths >= 0), got a length of {shortest}")
    if last != tokens:
        raise ValueError(f"cu_seqlens[-1] must equal qkv's token count T = {tokens}, got {last}")
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen ({max_seqlen}) is less than the longest sequence in cu_seqlens ({longest})")


@dispatch.register("varlen_qkv_attention", "torch")
def _varlen_qkv_attention_torch(qkv, cu_seqlens, max_seqlen, num_heads, scale, prologue=None):
    """One SDPA per sequence where reading cu_seqlens on the host is free (CPU tensors, eager): measured on CPU it
    ran 2.4-3.9x faster than padding (B=8 x 50-197 tokens, 32 x 16-257, 4 x 100-577; H=6-12, D=64). Elsewhere (CUDA
    tensors, torch.compile tracing) pad + mask: no host sync, so CUDA graphs can capture it and it traces whole.
    A RoPE prologue runs with each token's own row (``_token_rope_table``) and no prefix: per token, as the norms."""
    if prologue is not None and prologue.rope is not None:
        rope = _token_rope_table(prologue.rope, cu_seqlens, prologue.num_prefix_tokens, qkv.shape[0])
        prologue = prologue._replace(rope=rope, num_prefix_tokens=0)
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        return _varlen_per_sequence(qkv, cu_seqlens, num_heads, scale, prologue)
    return _varlen_padded(qkv, cu_seqlens, max_seqlen, num_heads, scale, prologue)


def _token_rope_table(rope, cu_seqlens, num_prefix_tokens, tokens):
    """The packed table [..., T - P, 2*D] (per head: [H, T - P, 2*D]) -> one row per packed token [..., T, 2*D]:
    token g's row g - P, identity (sin 0, cos 1) for each sequence's first P tokens, whatever the packed table holds
    there (on the device, no sync)."""
    half = rope.shape[-1] // 2
    identity = torch.cat([rope.new_zeros(half), rope.new_ones(half)])
    if rope.shape[-2] == 0:  # every token is a prefix token
        return identity.expand(*rope.shape[:-2], tokens, -1)
    token = torch.arange(tokens, device=rope.device)
    bounds = cu_seqlens.long()
    sequence = torch.searchsorted(bounds[1:], token, right=True)  # the sequence of each token
    rotated = (token - bounds[sequence]) >= num_prefix_tokens
    rows = rope[..., (token - num_prefix_tokens).clamp(min=0), :]
    return torch.where(rotated[:, None], rows, identity)


def _sequence_prologue(prologue: AttentionPrologue | None, start, end) -> AttentionPrologue | None:
    """The prologue of tokens start:end of a per-token prologue (a ``_token_rope_table`` table, no prefix)."""
    if prologue is None or prologue.rope is None:
        return prologue
    return prologue._replace(rope=prologue.rope[..., start:end, :])


def _varlen_per_sequence(qkv, cu_seqlens, num_heads, scale, prologue=None):
    bounds = cu_seqlens.tolist()
    parts = [
        _qkv_attention_torch(qkv[None, start:end], num_heads, scale, 0.0, _sequence_prologue(prologue, start, end))[0]
        for start, end in zip(bounds, bounds[1:])
    ]
    return torch.cat(parts) if parts else _no_tokens(qkv)


def _varlen_padded(qkv, cu_seqlens, max_seqlen, num_heads, scale, prologue=None):
    """Pad to [B, max_seqlen, 3*C] by a gather, SDPA with a key mask, gather the valid rows back; the shapes follow
    from B and max_seqlen alone."""
    tokens = qkv.shape[0]
    if tokens == 0:
        return _no_tokens(qkv)
    bounds = cu_seqlens.long()
    starts, lengths = bounds[:-1], bounds.diff()
    positions = torch.arange(max_seqlen, device=qkv.device)
    gather = (starts[:, None] + positions).clamp(max=tokens - 1)  # [B, L]; padding rows: any token
    padded = qkv[gather]  # [B, L, 3*C]
    if prologue is not None and prologue.rope is not None:  # per-token rows, gathered as the tokens: [B, 1|H, L, 2*D]
        rows = prologue.rope[..., gather, :]  # [B, L, 2*D], or [H, B, L, 2*D] per head
        prologue = prologue._replace(rope=rows[:, None] if rows.ndim == 3 else rows.transpose(0, 1))
    keep = positions < lengths[:, None]  # [B, L]; padding rows are dropped below and get no gradient
    out = _qkv_attention_torch(padded, num_heads, scale, 0.0, prologue, keep)  # [B, L, C]
    token = torch.arange(tokens, device=qkv.device)
    sequence = torch.searchsorted(bounds[1:], token, right=True)  # the sequence of each token
    return out[sequence, token - starts[sequence]]


def _no_tokens(qkv):
    """The [0, C] output of a packed batch without tokens, on qkv's autograd graph (its gradient is [0, 3*C])."""
    return qkv[:, : qkv.shape[-1] // 3].clone()
