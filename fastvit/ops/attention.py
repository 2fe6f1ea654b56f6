"""Multi-head self-attention: ``fastvit.ops.attention``, ``fastvit.ops.qkv_attention`` (and the helpers
``fastvit.ops.varlen_attention`` builds ``varlen_qkv_attention`` on).

``qkv_attention`` takes the packed ``[B, N, 3*C]`` output of the qkv Linear and returns
``[B, N, C]`` for the proj Linear (optionally with a ``[B, N]`` key-padding mask, NaFlex's padded layout);
``attention`` is the SDPA-shaped ``[B, H, N, D]`` variant; ``varlen_qkv_attention`` takes the sequences of
several images packed back to back, ``[T, 3*C]`` with ``cu_seqlens`` (flash-attn's varlen form), no padding.
``qkv_attention`` optionally applies a *prologue* to q and k first, in timm's order: qk-norm (``QKNorm``:
LayerNorm or RMSNorm over the head dim) then 2D RoPE (a cat(sin, cos) table, ``fastvit.eva.rope_table``'s
format; the leading prefix tokens unrotated). The Triton kernels apply it to the q/k tiles as they load them.

Backends:
  ``torch``   ``F.scaled_dot_product_attention`` on strided q/k/v views (timm's own path); every dtype,
              head dim and dropout.
  ``triton``  FlashAttention-2-style kernels (``fastvit/ops/triton/attention.py``): head dims 32, 48, 64,
              80, 96, 128, v's head dim equal to q's, float16/bfloat16/float32, no dropout; the prologue
              inside the kernels. ``auto`` leaves float32 without TF32 to ``torch`` (the kernels then have no
              tensor cores).
The spec both are tested against is ``fastvit.reference.attention`` (``fastvit.reference.qk_norm_attention``
with a prologue, ``reference.varlen_qkv_attention`` for the packed form: each sequence alone).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastvit import dispatch
from fastvit.reference import apply_rope  # the spec's form is the fast one too (three elementwise passes)
from fastvit.validation import (
    autocast_dtype,
    check_eps,
    check_positive_int,
    check_probability,
    check_same_device,
    check_same_dtype,
    check_scale,
    check_tensor,
)

ROPE_LAYOUTS = ("interleaved", "half")  # channel pairs (2i, 2i+1) (EVA02) or (i, i + D/2) (DINOv3, timm RoPE ViTs)
NORM_KINDS = ("layer", "rms")


class QKNorm(NamedTuple):
    """The norm ``qkv_attention`` applies to each head vector of q or of k (timm's ``attn.q_norm`` / ``k_norm``).

    Attributes:
        weight: [D].
        bias: [D] for a LayerNorm with bias, else None (always None for RMSNorm).
        eps: added to the variance (to the mean square for RMSNorm).
        kind: 'layer' (LayerNorm) or 'rms' (RMSNorm).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    eps: float = 1e-6
    kind: str = "layer"


class AttentionPrologue(NamedTuple):
    """What ``qkv_attention`` applies to q and k before the attention (checked): norms, then RoPE."""

    rope: torch.Tensor | None  # [N - num_prefix_tokens, 2*D] cat(sin, cos), or [H, N - num_prefix_tokens, 2*D]
    num_prefix_tokens: int
    rotate_half: bool
    q_norm: QKNorm | None
    k_norm: QKNorm | None

    def describe(self) -> tuple[str, ...]:
        """The prologue's parts as the call signature records them, e.g. ('rope:half', 'q_norm:rms')."""
        parts = [f"rope:{'half' if self.rotate_half else 'interleaved'}"] if self.rope is not None else []
        parts += [f"{name}:{norm.kind}" for name, norm in (("q_norm", self.q_norm), ("k_norm", self.k_norm)) if norm]
        return tuple(parts)


class AttentionCall(NamedTuple):
    """What a backend's ``supports`` may read about an attention call (see ``fastvit.dispatch``)."""

    device: torch.device
    dtype: torch.dtype  # the dtype the kernels compute in: the input's, or the autocast dtype
    head_dim: int
    v_head_dim: int
    dropout: bool
    allow_tf32: bool  # torch.backends.cuda.matmul.allow_tf32, read for float32 only
    prologue: tuple[str, ...] = ()  # the prologue parts (AttentionPrologue.describe), () for none
    masked: bool = False  # qkv_attention with a key-padding mask


def attention_call(
    device: torch.device,
    dtype: torch.dtype,
    head_dim: int,
    v_head_dim: int | None = None,
    dropout: bool = False,
    prologue: tuple[str, ...] = (),
    masked: bool = False,
) -> AttentionCall:
    """The call signature of an attention on ``device`` with inputs of ``dtype`` (autocast applied here)."""
    amp = autocast_dtype(device)
    if amp is not None and dtype in (torch.float16, torch.float32):
        dtype = amp
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    v_head_dim = head_dim if v_head_dim is None else v_head_dim
    return AttentionCall(device, dtype, head_dim, v_head_dim, dropout, tf32, prologue, masked)


def qkv_attention(
    qkv: torch.Tensor,
    num_heads: int,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
    *,
    rope: torch.Tensor | None = None,
    num_prefix_tokens: int = 0,
    rope_layout: str = "interleaved",
    q_norm: QKNorm | None = None,
    k_norm: QKNorm | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention on a packed qkv buffer, optionally with qk-norm then RoPE applied to q and k first.

    Args:
        qkv: [B, N, 3*C], the qkv Linear's output in timm's layout (``reshape(B, N, 3, H, D)``).
        num_heads: H; C must be divisible by it.
        scale: softmax scale, default D**-0.5.
        dropout_p: attention-probability dropout (``torch`` backend only).
        backend: 'auto' | 'triton' | 'torch' (the backends implementing it); None = the process default.
        rope: [N - T, 2*D] floating table cat(sin, cos) (``fastvit.eva.rope_table``), T = ``num_prefix_tokens``:
            token T + i of q and k is rotated by row i, ``x*cos + rot(x)*sin`` per channel; or [H, N - T, 2*D], one
            table per head (RoPE-Mixed's, ``fastvit.eva.mixed_rope_tables``); None: no RoPE. A table that requires grad
            (a learned one, e.g. RoPE-Mixed's) gets its gradient from the kernels too.
        num_prefix_tokens: T, the leading (class / register) tokens left unrotated; only with ``rope``.
        rope_layout: how ``rot`` pairs the channels: 'interleaved' (2i, 2i+1) -> (-x[2i+1], x[2i]) (EVA02) or
            'half' (i, i + D/2) -> (-x[i + D/2], x[i]) (DINOv3, timm's RoPE ViTs). D must be even.
        q_norm: the norm of each q head vector ([D] weights), applied before RoPE; None: none.
        k_norm: the same for k.
        key_padding_mask: [B, N] bool on qkv's device, True = the key takes part (the convention of timm
            NaFlexViT's ``patch_valid`` and of SDPA's boolean ``attn_mask``); the padded NaFlex layout. Masked keys
            get attention weight 0 (every query row, padding rows included, attends to the kept keys). A batch entry
            whose keys are all masked gives output 0 and gradient 0 (the spec, ``fastvit.reference``; PyTorch
            2.14's SDPA gives 0 there too on CPU, older versions and some CUDA kernels NaN). The Triton kernels skip
            the key blocks after each entry's last kept key (NaFlex pads at the end).

    Returns:
        [B, N, C], heads concatenated.
    """
    head_dim = _check_qkv("qkv", qkv, 3, num_heads)
    scale = check_scale(scale)
    dropout_p = check_probability("dropout_p", dropout_p)
    prologue = _check_prologue(
        qkv, qkv.shape[1], head_dim, rope, num_prefix_tokens, rope_layout, q_norm, k_norm, num_heads=num_heads
    )
    masked = key_padding_mask is not None
    if masked:
        _check_key_padding_mask(key_padding_mask, qkv, qkv.shape[:2], "qkv's batch and tokens")
    parts = prologue.describe() if prologue is not None else ()
    call = attention_call(qkv.device, qkv.dtype, head_dim, dropout=dropout_p > 0.0, prologue=parts, masked=masked)
    fn = dispatch.select("qkv_attention", backend, call)
    if not masked:
        return fn(qkv, num_heads, scale, dropout_p, prologue)
    return fn(qkv, num_heads, scale, dropout_p, prologue, key_padding_mask)


def _check_key_padding_mask(mask: object, like: torch.Tensor, shape: tuple[int, int], what: str) -> None:
    """A [B, N_keys] bool mask on ``like``'s device; ``what`` names where B and N_keys come from."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = keep the key), got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"key_padding_mask must be [B, N] = {list(shape)} ({what}), got {list(mask.shape)}")
    if mask.device != like.device:
        raise ValueError(f"key_padding_mask must be on the inputs' device ({like.device}), got {mask.device}")


def _check_qkv(name: str, qkv: object, ndim: int, num_heads: int) -> int:
    """Check a packed qkv buffer (``ndim`` dimensions, last one 3 * num_heads * head_dim); returns head_dim."""
    check_tensor(name, qkv, ndim=ndim)
    check_positive_int("num_heads", num_heads)
    if qkv.shape[-1] == 0:
        raise ValueError(
            f"{name}'s last dimension must be 3 * num_heads * head_dim with head_dim >= 1, got {name} of shape "
            f"{tuple(qkv.shape)}"
        )
    if qkv.shape[-1] % (3 * num_heads) != 0:
        raise ValueError(
            f"{name}'s last dimension must be 3 * num_heads * head_dim; got {qkv.shape[-1]}, "
            f"which is not divisible by 3 * num_heads = {3 * num_heads}"
        )
    return qkv.shape[-1] // (3 * num_heads)


def _check_prologue(
    qkv, tokens, head_dim, rope, num_prefix_tokens, rope_layout, q_norm, k_norm, num_heads=None
) -> AttentionPrologue | None:
    """The checked prologue of a ``qkv_attention`` call on ``tokens`` tokens per sequence (``varlen_qkv_attention``:
    the packed token count T); None when it has none (today's plain attention). With ``num_heads`` a table per head
    ([num_heads, N - T, 2*D]) is accepted too."""
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int):
        raise TypeError(f"num_prefix_tokens must be an int, got {type(num_prefix_tokens).__name__}")
    if rope_layout not in ROPE_LAYOUTS:
        raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {rope_layout!r}")
    if rope is None:
        if num_prefix_tokens != 0:
            raise ValueError(f"num_prefix_tokens ({num_prefix_tokens}) only applies with a rope table; rope is None")
    else:
        per_head = num_heads is not None and isinstance(rope, torch.Tensor) and rope.ndim == 3
        check_tensor("rope", rope, ndim=3 if per_head else 2)
        check_same_device(qkv=qkv, rope=rope)
        if head_dim % 2 != 0:
            raise ValueError(f"RoPE rotates channel pairs: the head dim must be even, got head_dim={head_dim}")
        if not 0 <= num_prefix_tokens <= tokens:
            raise ValueError(f"num_prefix_tokens must be in [0, N={tokens}], got {num_prefix_tokens}")
        expected = (tokens - num_prefix_tokens, 2 * head_dim)
        if per_head:
            expected = (num_heads, *expected)
        if tuple(rope.shape) != expected:
            what = "[N - num_prefix_tokens, 2 * head_dim]"
            what = f"[num_heads, {what[1:]}" if per_head else what
            raise ValueError(
                f"rope must be the cat(sin, cos) table {what} = {list(expected)} (N={tokens}, "
                f"num_prefix_tokens={num_prefix_tokens}, head_dim={head_dim}), got {list(rope.shape)}"
            )
    for name, norm in (("q_norm", q_norm), ("k_norm", k_norm)):
        if norm is not None:
            _check_qk_norm(name, norm, head_dim, qkv=qkv)
    if rope is None and q_norm is None and k_norm is None:
        return None
    return AttentionPrologue(rope, num_prefix_tokens, rope_layout == "half", q_norm, k_norm)


def _check_qk_norm(name: str, norm: object, head_dim: int, **like: torch.Tensor) -> None:
    """A ``QKNorm`` over ``head_dim`` channels on the device of ``like`` (the named input it normalises)."""
    if not isinstance(norm, QKNorm):
        raise TypeError(f"{name} must be a fastvit.ops.QKNorm(weight, bias, eps, kind) or None, got {type(norm)}")
    if norm.kind not in NORM_KINDS:
        raise ValueError(f"{name}.kind must be one of {NORM_KINDS}, got {norm.kind!r}")
    try:
        check_eps(norm.eps)
    except ValueError:
        raise ValueError(f"{name}.eps must be a positive finite number, got {norm.eps!r}") from None
    for part in ("weight", "bias"):
        tensor = getattr(norm, part)
        if tensor is None:
            if part == "weight":
                raise TypeError(f"{name}.weight must be a [head_dim={head_dim}] tensor, got None")
            continue
        if norm.kind == "rms" and part == "bias":
            raise ValueError(f"{name}.bias must be None for kind='rms' (RMSNorm has no bias)")
        check_tensor(f"{name}.{part}", tensor, ndim=1)
        if tuple(tensor.shape) != (head_dim,):
            raise ValueError(f"{name}.{part} must have shape [head_dim={head_dim}], got {list(tensor.shape)}")
        check_same_device(**like, **{f"{name}.{part}": tensor})


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
    *,
    q_norm: QKNorm | None = None,
    k_norm: QKNorm | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v, as ``F.scaled_dot_product_attention``; optionally qk-norm first and a key-padding mask.

    Args:
        q: [B, H, N, D]; k: [B, H, M, D]; v: [B, H, M, Dv]. Strided views are read in place (a broadcast q, e.g. one
            learned query expanded over the batch with stride 0, included).
        scale: softmax scale, default D**-0.5.
        dropout_p: attention-probability dropout (``torch`` backend only).
        backend: 'auto' | 'triton' | 'torch' (the backends implementing it); None = the process default.
        q_norm: the norm of each q head vector ([D] weights, ``QKNorm``), applied inside the Triton kernels as they
            load q (as ``qkv_attention``'s prologue); None: none. The attention-pooling head's k-norm runs here.
        k_norm: the same for k.
        key_padding_mask: [B, M] bool on q's device, True = the key takes part (see ``qkv_attention``; a batch entry
            without a kept key gives output 0 and gradient 0).

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
    for name, norm, tensor in (("q_norm", q_norm, q), ("k_norm", k_norm, k)):
        if norm is not None:
            _check_qk_norm(name, norm, q.shape[-1], **{name[0]: tensor})
    prologue = None if q_norm is None and k_norm is None else AttentionPrologue(None, 0, False, q_norm, k_norm)
    masked = key_padding_mask is not None
    if masked:
        _check_key_padding_mask(key_padding_mask, q, (q.shape[0], k.shape[-2]), "q's batch, k's tokens")
    parts = prologue.describe() if prologue is not None else ()
    call = attention_call(
        q.device, q.dtype, q.shape[-1], v.shape[-1], dropout=dropout_p > 0.0, prologue=parts, masked=masked
    )
    fn = dispatch.select("attention", backend, call)
    if prologue is None and not masked:
        return fn(q, k, v, scale, dropout_p)
    return fn(q, k, v, scale, dropout_p, prologue, key_padding_mask)


# ------------------------------------------------------------------------------------------------
# The torch backend: SDPA on strided views, as timm's Attention (fused_attn=True).


@dispatch.register("qkv_attention", "torch")
def _qkv_attention_torch(qkv, num_heads, scale, dropout_p, prologue=None, key_padding_mask=None):
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D] views
    return _attention_torch(q, k, v, scale, dropout_p, prologue, key_padding_mask).transpose(1, 2).flatten(2)


def _prologue_torch(x: torch.Tensor, norm: QKNorm | None, prologue: AttentionPrologue) -> torch.Tensor:
    """x [B, H, N, D] -> rope(norm(x)), computed in float32 (or float64) as the kernels do: one rounding, by the
    caller."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    if norm is not None:
        weight, bias = norm.weight.to(dtype), None if norm.bias is None else norm.bias.to(dtype)
        if norm.kind == "layer":
            x = F.layer_norm(x, x.shape[-1:], weight, bias, norm.eps)
        else:
            x = F.rms_norm(x, x.shape[-1:], weight, norm.eps)
    if prologue.rope is not None:
        x = apply_rope(x, prologue.rope.to(dtype), prologue.num_prefix_tokens, prologue.rotate_half)
    return x


@dispatch.register("attention", "torch")
def _attention_torch(q, k, v, scale, dropout_p, prologue=None, key_padding_mask=None):
    if prologue is not None:
        q, k = (
            _prologue_torch(x, norm, prologue).to(v.dtype) for x, norm in ((q, prologue.q_norm), (k, prologue.k_norm))
        )
    if key_padding_mask is None:
        return _sdpa(q, k, v, scale, dropout_p)
    # An entry without any kept key attends to every key (finite everywhere, whatever SDPA kernel runs: fully
    # masked rows are NaN in some) and is then zeroed, as the spec; its gradient is 0 through the product.
    any_kept = key_padding_mask.any(-1)[:, None, None, None]  # [B, 1, 1, 1]
    keep = key_padding_mask[:, None, None, :] | ~any_kept  # [B, 1, 1, M]
    return _sdpa(q, k, v, scale, dropout_p, keep) * any_kept


def _sdpa(q, k, v, scale, dropout_p, attn_mask=None):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
