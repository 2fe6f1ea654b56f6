"""The Triton backend of ``qkv_attention``, ``varlen_qkv_attention`` and ``attention``: coverage, custom ops, autograd.

The kernels are ``fastvit/kernels/attention.py`` (FlashAttention-2 style); the launches (strides, grids, autotuning)
are ``fastvit/ops/triton/attention_launch.py``. This file: which calls they cover, autocast, the dispatch entries,
then the ``torch.library`` custom ops without a prologue (``fastvit::qkv_attention_fwd/bwd``,
``fastvit::varlen_qkv_attention_fwd/bwd``, ``fastvit::attention_fwd/bwd``) with fake impls and autograd, so
``torch.compile`` treats them as opaque nodes and traces through the backward. ``qkv_attention`` reads q/k/v straight
from the packed buffer and writes ``[B, N, C]``; its backward writes dq/dk/dv into one ``[B, N, 3*C]`` gradient.
``fastvit::varlen_qkv_attention_fwd/bwd`` run the same kernels with ``VARLEN=True`` on ``[T, 3*C]`` (the views are
[1, H, T, D], the grid covers max_seqlen rows per sequence), and a key-padding mask reaches them as ``KEY_MASK=True``
with a uint8 mask and each row's last kept key. With a prologue (qk-norm, RoPE) a call runs the ops of
``fastvit/ops/triton/attention_prologue.py``: the same kernels with the prologue switched on. The backward uses no
atomics; with ``fastvit.set_deterministic(True)`` the tile sizes are fixed per GPU (compute capability) instead of
autotuned, so results are bit-identical across processes too (autotuning may pick near-tied configs differently).
Under ``torch.autocast``, inputs are cast to the autocast dtype before the custom op runs (as autocast does
for matmuls).
"""

from __future__ import annotations

import torch

from fastvit import dispatch
from fastvit.ops.attention import AttentionCall, AttentionPrologue
from fastvit.ops.autograd import no_double_backward
from fastvit.ops.triton import attention_prologue  # noqa: F401  (registers the prologue ops called below)
from fastvit.ops.triton.attention_launch import (  # noqa: F401  (candidate_configs, forced_configs, _autotuned,
    # _block_d: selftest, tests)
    PackedLayout,
    PrologueArgs,
    Varlen,
    _attention_backward,
    _attention_forward,
    _autotuned,
    _block_d,
    _heads_view,
    _new_like,
    _packed_heads,
    _packed_qkv,
    _split_qkv,
    candidate_configs,
    forced_configs,
)
from fastvit.validation import autocast_dtype

# Every multiple of 8 in 32..128 (SigLIP's 72, 88, 104, 112 included): the kernels tile the head dim as in
# ``kernels.attention.head_dim_pieces``.
SUPPORTED_HEAD_DIMS = tuple(range(32, 129, 8))


def supports(call: AttentionCall) -> str | None:
    """Why the Triton kernels do not cover ``call`` (None: they do)."""
    if call.dropout:
        return "attention dropout (dropout_p > 0) is implemented only by the 'torch' backend"
    if call.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"the Triton kernels take head_dim in {SUPPORTED_HEAD_DIMS}, got head_dim={call.head_dim}"
    if call.v_head_dim != call.head_dim:
        return f"the Triton kernels need v's head dim to equal q's ({call.head_dim}), got {call.v_head_dim}"
    return dispatch.kernel_dtype_reason("triton", call.device, (call.dtype,))


def auto_skip(call: AttentionCall) -> str | None:
    """``auto`` leaves float32 without TF32 to SDPA: the kernels would multiply without tensor cores."""
    if call.dtype == torch.float32 and not call.allow_tf32 and call.device.type == "cuda":
        return "float32 without TF32 (torch.backends.cuda.matmul.allow_tf32 is off): no tensor cores in the kernels"
    return None


def _cast_for_autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Inside ``torch.autocast``, cast float16/float32 inputs to the autocast dtype (as matmuls are)."""
    dtype = autocast_dtype(tensors[0].device)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t.dtype in (torch.float16, torch.float32) else t for t in tensors)


@dispatch.register("qkv_attention", "triton", supports=supports, auto_skip=auto_skip)
def qkv_attention(qkv, num_heads, scale, dropout_p, prologue: AttentionPrologue | None = None, key_padding_mask=None):
    (qkv,) = _cast_for_autocast(qkv)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    scale = head_dim**-0.5 if scale is None else scale
    if prologue is None:
        return torch.ops.fastvit.qkv_attention_fwd(qkv, num_heads, scale, key_padding_mask)[0]
    layout = PackedLayout(None, 0, key_padding_mask)
    return torch.ops.fastvit.qkv_attention_prologue_fwd(qkv, num_heads, scale, *_prologue_args(prologue), *layout)[0]


def _prologue_args(prologue: AttentionPrologue) -> PrologueArgs:
    norms = [(n.kind, n.weight, n.bias, n.eps) if n is not None else (None, None, None, 0.0) for n in prologue[3:]]
    return PrologueArgs(prologue.rope, prologue.num_prefix_tokens, prologue.rotate_half, *norms[0], *norms[1])


@dispatch.register("varlen_qkv_attention", "triton", supports=supports, auto_skip=auto_skip)
def varlen_qkv_attention(qkv, cu_seqlens, max_seqlen, num_heads, scale, prologue: AttentionPrologue | None = None):
    (qkv,) = _cast_for_autocast(qkv)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    scale = head_dim**-0.5 if scale is None else scale
    if prologue is None:
        return torch.ops.fastvit.varlen_qkv_attention_fwd(qkv, cu_seqlens, max_seqlen, num_heads, scale)[0]
    layout = PackedLayout(cu_seqlens, max_seqlen, None)
    return torch.ops.fastvit.qkv_attention_prologue_fwd(qkv, num_heads, scale, *_prologue_args(prologue), *layout)[0]


@dispatch.register("attention", "triton", supports=supports, auto_skip=auto_skip)
def attention(q, k, v, scale, dropout_p, prologue: AttentionPrologue | None = None, key_padding_mask=None):
    q, k, v = _cast_for_autocast(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if prologue is None:
        return torch.ops.fastvit.attention_fwd(q, k, v, scale, key_padding_mask)[0]
    return torch.ops.fastvit.attention_prologue_fwd(q, k, v, scale, *_prologue_args(prologue), key_padding_mask)[0]


# ------------------------------------------------------------------------------------------------
# Custom ops: fastvit::qkv_attention_fwd / _bwd on the packed buffer, fastvit::attention_fwd / _bwd on
# [B, H, N, D] tensors. The forward returns (out, lse); lse [B, H, N] fp32 is saved for the backward.


_QKV_FWD = "(Tensor qkv, int num_heads, float scale, Tensor? key_padding_mask=None) -> (Tensor, Tensor)"
_QKV_BWD = (
    "(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, float scale, "
    "Tensor? key_padding_mask=None) -> Tensor"
)
_FWD = "(Tensor q, Tensor k, Tensor v, float scale, Tensor? key_padding_mask=None) -> (Tensor, Tensor)"
_BWD = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, "
    "Tensor? key_padding_mask=None) -> (Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("fastvit::qkv_attention_fwd", mutates_args=(), schema=_QKV_FWD)
def _qkv_attention_fwd(qkv, num_heads, scale, key_padding_mask=None):
    batch, tokens, width3 = qkv.shape
    out = _new_like(qkv, (batch, tokens, width3 // 3))
    lse = _new_like(qkv, (batch, num_heads, tokens), torch.float32)
    _attention_forward(*_split_qkv(qkv, num_heads), _heads_view(out, num_heads), lse, scale, key_keep=key_padding_mask)
    return out, lse


@_qkv_attention_fwd.register_fake
def _(qkv, num_heads, scale, key_padding_mask=None):
    batch, tokens, width3 = qkv.shape
    return qkv.new_empty((batch, tokens, width3 // 3)), qkv.new_empty((batch, num_heads, tokens), dtype=torch.float32)


@torch.library.custom_op("fastvit::qkv_attention_bwd", mutates_args=(), schema=_QKV_BWD)
def _qkv_attention_bwd(grad_out, qkv, out, lse, num_heads, scale, key_padding_mask=None):
    grad_qkv = _new_like(qkv)
    _attention_backward(
        _heads_view(grad_out, num_heads),
        *_split_qkv(qkv, num_heads),
        _heads_view(out, num_heads),
        lse,
        *_split_qkv(grad_qkv, num_heads),
        scale,
        key_keep=key_padding_mask,
    )
    return grad_qkv


@_qkv_attention_bwd.register_fake
def _(grad_out, qkv, out, lse, num_heads, scale, key_padding_mask=None):
    return qkv.new_empty(qkv.shape)


def _qkv_attention_setup_context(ctx, inputs, output):
    qkv, num_heads, scale, key_padding_mask = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, key_padding_mask)
    ctx.num_heads, ctx.scale = num_heads, scale


@no_double_backward("qkv_attention")
def _qkv_attention_backward(ctx, grad_out, _grad_lse):
    qkv, out, lse, key_padding_mask = ctx.saved_tensors
    grad_qkv = torch.ops.fastvit.qkv_attention_bwd(grad_out, qkv, out, lse, ctx.num_heads, ctx.scale, key_padding_mask)
    return grad_qkv, None, None, None


_qkv_attention_fwd.register_autograd(_qkv_attention_backward, setup_context=_qkv_attention_setup_context)


# fastvit::varlen_qkv_attention_fwd / _bwd: packed sequences, qkv [T, 3*C] -> out [T, C] and lse [H, T] fp32.

_VARLEN_FWD = "(Tensor qkv, Tensor cu_seqlens, int max_seqlen, int num_heads, float scale) -> (Tensor, Tensor)"
_VARLEN_BWD = (
    "(Tensor grad_out, Tensor qkv, Tensor cu_seqlens, Tensor out, Tensor lse, int max_seqlen, int num_heads, "
    "float scale) -> Tensor"
)


@torch.library.custom_op("fastvit::varlen_qkv_attention_fwd", mutates_args=(), schema=_VARLEN_FWD)
def _varlen_qkv_attention_fwd(qkv, cu_seqlens, max_seqlen, num_heads, scale):
    tokens, width3 = qkv.shape
    out = _new_like(qkv, (tokens, width3 // 3))
    lse = _new_like(qkv, (num_heads, tokens), torch.float32)
    varlen = Varlen(cu_seqlens, max_seqlen)
    _attention_forward(
        *_packed_qkv(qkv, num_heads), _packed_heads(out, num_heads), lse.unsqueeze(0), scale, varlen=varlen
    )
    return out, lse


@_varlen_qkv_attention_fwd.register_fake
def _(qkv, cu_seqlens, max_seqlen, num_heads, scale):
    tokens, width3 = qkv.shape
    return qkv.new_empty((tokens, width3 // 3)), qkv.new_empty((num_heads, tokens), dtype=torch.float32)


@torch.library.custom_op("fastvit::varlen_qkv_attention_bwd", mutates_args=(), schema=_VARLEN_BWD)
def _varlen_qkv_attention_bwd(grad_out, qkv, cu_seqlens, out, lse, max_seqlen, num_heads, scale):
    grad_qkv = _new_like(qkv)
    _attention_backward(
        _packed_heads(grad_out, num_heads),
        *_packed_qkv(qkv, num_heads),
        _packed_heads(out, num_heads),
        lse.unsqueeze(0),
        *_packed_qkv(grad_qkv, num_heads),
        scale,
        varlen=Varlen(cu_seqlens, max_seqlen),
    )
    return grad_qkv


@_varlen_qkv_attention_bwd.register_fake
def _(grad_out, qkv, cu_seqlens, out, lse, max_seqlen, num_heads, scale):
    return qkv.new_empty(qkv.shape)


def _varlen_qkv_attention_setup_context(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, num_heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, cu_seqlens, out, lse)
    ctx.max_seqlen, ctx.num_heads, ctx.scale = max_seqlen, num_heads, scale


@no_double_backward("varlen_qkv_attention")
def _varlen_qkv_attention_backward(ctx, grad_out, _grad_lse):
    qkv, cu_seqlens, out, lse = ctx.saved_tensors
    grad_qkv = torch.ops.fastvit.varlen_qkv_attention_bwd(
        grad_out, qkv, cu_seqlens, out, lse, ctx.max_seqlen, ctx.num_heads, ctx.scale
    )
    return grad_qkv, None, None, None, None


_varlen_qkv_attention_fwd.register_autograd(
    _varlen_qkv_attention_backward, setup_context=_varlen_qkv_attention_setup_context
)


@torch.library.custom_op("fastvit::attention_fwd", mutates_args=(), schema=_FWD)
def _attention_fwd(q, k, v, scale, key_padding_mask=None):
    out = _new_like(q)
    lse = _new_like(q, tuple(q.shape[:-1]), torch.float32)
    _attention_forward(q, k, v, out, lse, scale, key_keep=key_padding_mask)
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, scale, key_padding_mask=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fastvit::attention_bwd", mutates_args=(), schema=_BWD)
def _attention_bwd(grad_out, q, k, v, out, lse, scale, key_padding_mask=None):
    dq, dk, dv = (_new_like(t) for t in (q, k, v))
    _attention_backward(grad_out, q, k, v, out, lse, dq, dk, dv, scale, key_keep=key_padding_mask)
    return dq, dk, dv


@_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, scale, key_padding_mask=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale, key_padding_mask = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.scale = scale


@no_double_backward("attention")
def _attention_backward_autograd(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    return (*torch.ops.fastvit.attention_bwd(grad_out, q, k, v, out, lse, ctx.scale, key_padding_mask), None, None)


_attention_fwd.register_autograd(_attention_backward_autograd, setup_context=_attention_setup_context)
