"""The Triton attention kernels with their prologue switched on: ``torch.library`` custom ops, fake impls, autograd.

The prologue applies qk-norm (LayerNorm / RMSNorm over the head dim) and RoPE to the q and k tiles as the kernels
load them (``fastvit/kernels/attention.py``); nothing normalised or rotated is written to memory. Two forms:
``fastvit::qkv_attention_prologue_fwd/bwd`` on the packed qkv buffer ``[B, N, 3*C]`` (optionally with a key-padding
mask) or on packed sequences ``[T, 3*C]`` (``cu_seqlens``), and ``fastvit::attention_prologue_fwd/bwd`` on
``[B, H, N, D]`` q/k/v with qk-norm only (the attention-pooling head: one query broadcast over the batch, its k-norm,
NaFlex's key-padding mask). Both backwards return the norm weights' gradients, summed here from per-slot partials in
a fixed order (deterministic); the qkv form also the gradient of a learned RoPE table (RoPE-Mixed's). The dispatch
entries that call these ops are ``fastvit/ops/triton/attention.py``'s.
"""

from __future__ import annotations

import torch

from fastvit.ops.autograd import no_double_backward
from fastvit.ops.triton.attention_launch import (
    PackedLayout,
    PrologueArgs,
    _as_batched,
    _attention_backward,
    _attention_forward,
    _heads_view,
    _new_like,
    _norm_grad_partials,
    _out_lse_shapes,
    _prologue_kwargs,
    _prologue_op_args,
    _split_qkv,
)

_PROLOGUE = (
    "Tensor? rope, int num_prefix_tokens, bool rotate_half, str? q_norm, Tensor? q_weight, Tensor? q_bias, "
    "float q_eps, str? k_norm, Tensor? k_weight, Tensor? k_bias, float k_eps"
)
# The prologue ops also take the packed form (qkv [T, 3*C], out [T, C], lse [H, T] with cu_seqlens) and the
# key-padding mask, as trailing arguments (PackedLayout).
_LAYOUT = "Tensor? cu_seqlens=None, int max_seqlen=0, Tensor? key_padding_mask=None"
_QKV_PROLOGUE_FWD = f"(Tensor qkv, int num_heads, float scale, {_PROLOGUE}, {_LAYOUT}) -> (Tensor, Tensor)"
_QKV_PROLOGUE_BWD = (
    f"(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, float scale, {_PROLOGUE}, {_LAYOUT}, *, "
    "bool rope_grad=False) -> (Tensor, Tensor, Tensor, Tensor)"
)
# With qk-norm (the attention-pooling head's k-norm): the backward also returns the q and k norm gradients, as the
# qkv prologue op's. RoPE is not taken on this form (rope None).
_PROLOGUE_FWD = (
    f"(Tensor q, Tensor k, Tensor v, float scale, {_PROLOGUE}, Tensor? key_padding_mask=None) -> (Tensor, Tensor)"
)
_PROLOGUE_BWD = (
    f"(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale, {_PROLOGUE}, "
    "Tensor? key_padding_mask=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


# ------------------------------------------------------------------------------------------------
# The qkv form: the same kernels with qk-norm / RoPE switched on, on [B, N, 3*C] (optionally with a key-padding
# mask) or on packed sequences [T, 3*C] (cu_seqlens; out [T, C], lse [H, T]). The backward also returns the q and k
# norm gradients as [2, D] fp32 (weight row, bias row; [0, D] without that norm) and, with rope_grad (a learned table,
# e.g. RoPE-Mixed's), the table's gradient in the table's shape, fp32 ([0] without).


@torch.library.custom_op("fastvit::qkv_attention_prologue_fwd", mutates_args=(), schema=_QKV_PROLOGUE_FWD)
def _qkv_attention_prologue_fwd(qkv, num_heads, scale, *args):
    prologue, layout = _prologue_op_args(args)
    out_shape, lse_shape = _out_lse_shapes(qkv, num_heads)
    out, lse = _new_like(qkv, out_shape), _new_like(qkv, lse_shape, torch.float32)
    _attention_forward(
        *_split_qkv(_as_batched(qkv), num_heads), _heads_view(_as_batched(out), num_heads),
        lse.view(-1, *lse.shape[-2:]), scale, _prologue_kwargs(prologue), layout.varlen, layout.key_padding_mask,
    )  # fmt: skip
    return out, lse


@_qkv_attention_prologue_fwd.register_fake
def _(qkv, num_heads, scale, *args):
    out_shape, lse_shape = _out_lse_shapes(qkv, num_heads)
    return qkv.new_empty(out_shape), qkv.new_empty(lse_shape, dtype=torch.float32)


def _norm_grad_shape(kind, head_dim: int) -> tuple[int, int]:
    return (2 if kind is not None else 0, head_dim)


@torch.library.custom_op("fastvit::qkv_attention_prologue_bwd", mutates_args=(), schema=_QKV_PROLOGUE_BWD)
def _qkv_attention_prologue_bwd(grad_out, qkv, out, lse, num_heads, scale, *args, rope_grad=False):
    prologue, layout = _prologue_op_args(args)
    grad_qkv = _new_like(qkv)
    grads = _prologue_backward(
        _heads_view(_as_batched(grad_out), num_heads),
        *_split_qkv(_as_batched(qkv), num_heads),
        _heads_view(_as_batched(out), num_heads),
        lse.view(-1, *lse.shape[-2:]),
        *_split_qkv(_as_batched(grad_qkv), num_heads),
        scale=scale,
        prologue=prologue,
        layout=layout,
        rope_grad=rope_grad,
    )
    return grad_qkv, *grads


def _prologue_backward(grad_out, q, k, v, out, lse, dq, dk, dv, *, scale, prologue, layout, rope_grad=False):
    """The backward kernels with the prologue on [B, H, N, D] views (lse [B, H, N]); returns the q and k norms'
    gradients ([2, D] fp32: weight row, bias row; [0, D] without that norm) and, with ``rope_grad``, the RoPE table's
    in the table's shape, fp32 ([0] without)."""
    batch, heads, n_q, head_dim = q.shape
    # Packed: one partial-buffer row per (sequence, head), max_seqlen rows each (zeroed: the rows past a sequence's
    # end, and every row of an empty sequence, are written by no program).
    packed = layout.varlen is not None
    sequences, q_rows, k_rows = (
        (len(layout.cu_seqlens) - 1, *[layout.max_seqlen] * 2) if packed else (batch, n_q, k.shape[2])
    )
    partials = [
        _norm_grad_partials(sequences * heads, rows, head_dim, q.device, zeroed=packed) if kind is not None else None
        for kind, rows in ((prologue.q_norm, q_rows), (prologue.k_norm, k_rows))
    ]
    table_grads = [None, None]  # through q, through k: [B, H, rows, 2*D] each (packed: B = 1), every row one program's
    if rope_grad and prologue.rope is not None:
        shape = (batch, heads, prologue.rope.shape[-2], prologue.rope.shape[-1])
        table_grads = [torch.zeros(shape, dtype=torch.float32, device=q.device) for _ in range(2)]
    _attention_backward(
        grad_out, q, k, v, out, lse, dq, dk, dv, scale, _prologue_kwargs(prologue), *partials, layout.varlen,
        layout.key_padding_mask, *table_grads,
    )  # fmt: skip
    norm_grads = (
        p.sum(dim=(0, 1)) if p is not None else q.new_zeros((0, head_dim), dtype=torch.float32) for p in partials
    )
    table_grad = q.new_zeros(0, dtype=torch.float32)
    if table_grads[0] is not None:
        table_grad = (table_grads[0] + table_grads[1]).sum(0)  # [H, rows, 2*D]
        table_grad = table_grad if prologue.rope.dim() == 3 else table_grad.sum(0)  # a table shared by the heads
    return (*norm_grads, table_grad)


@_qkv_attention_prologue_bwd.register_fake
def _(grad_out, qkv, out, lse, num_heads, scale, *args, rope_grad=False):
    prologue, _ = _prologue_op_args(args)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    q_shape, k_shape = (_norm_grad_shape(kind, head_dim) for kind in (prologue.q_norm, prologue.k_norm))
    table_shape = prologue.rope.shape if rope_grad and prologue.rope is not None else (0,)
    return (
        qkv.new_empty(qkv.shape),
        qkv.new_empty(q_shape, dtype=torch.float32),
        qkv.new_empty(k_shape, dtype=torch.float32),
        qkv.new_empty(table_shape, dtype=torch.float32),
    )


def _save_prologue(ctx, tensors: tuple, prologue: PrologueArgs, layout: PackedLayout) -> None:
    """Save a prologue op's tensors for the backward (see :func:`_saved_prologue`)."""
    ctx.save_for_backward(*tensors, *prologue.tensors(), layout.cu_seqlens, layout.key_padding_mask)
    ctx.prologue = prologue.with_tensors(None, None, None, None, None)  # the tensors go through save_for_backward
    ctx.max_seqlen = layout.max_seqlen


def _saved_prologue(ctx) -> tuple[tuple, PrologueArgs, PackedLayout]:
    """The tensors, prologue and layout :func:`_save_prologue` saved."""
    *tensors, rope, q_weight, q_bias, k_weight, k_bias, cu_seqlens, key_padding_mask = ctx.saved_tensors
    prologue = ctx.prologue.with_tensors(rope, q_weight, q_bias, k_weight, k_bias)
    return tuple(tensors), prologue, PackedLayout(cu_seqlens, ctx.max_seqlen, key_padding_mask)


def _prologue_input_grads(prologue: PrologueArgs, q_grads, k_grads, table_grad) -> PrologueArgs:
    """The gradients of a prologue op's ``_PROLOGUE`` inputs, in their order: the table's (``table_grad`` None: not
    wanted) and the norm weights' and biases' (``q_grads`` / ``k_grads``: the backward op's [2, D] fp32 outputs)."""
    grads = []
    for norm_grads, weight, bias in (
        (q_grads, prologue.q_weight, prologue.q_bias),
        (k_grads, prologue.k_weight, prologue.k_bias),
    ):
        grads.append(None if weight is None else norm_grads[0].to(weight.dtype))
        grads.append(None if bias is None else norm_grads[1].to(bias.dtype))
    table_grad = None if table_grad is None else table_grad.to(prologue.rope.dtype)
    return PrologueArgs(table_grad, None, None, None, *grads[:2], None, None, *grads[2:], None)


def _qkv_attention_prologue_setup_context(ctx, inputs, output):
    qkv, num_heads, scale, *args = inputs
    prologue, layout = _prologue_op_args(args)
    _save_prologue(ctx, (qkv, *output), prologue, layout)
    ctx.num_heads, ctx.scale = num_heads, scale
    ctx.num_inputs = len(inputs)


@no_double_backward("qkv_attention")
def _qkv_attention_prologue_backward(ctx, grad_out, _grad_lse):
    (qkv, out, lse), prologue, layout = _saved_prologue(ctx)
    wants_table_grad = prologue.rope is not None and ctx.needs_input_grad[3]  # a learned table only
    grad_qkv, q_grads, k_grads, table_grad = torch.ops.fastvit.qkv_attention_prologue_bwd(
        grad_out, qkv, out, lse, ctx.num_heads, ctx.scale, *prologue, *layout, rope_grad=wants_table_grad
    )
    grads = _prologue_input_grads(prologue, q_grads, k_grads, table_grad if wants_table_grad else None)
    # (qkv, num_heads, scale, the prologue, then the layout's arguments the caller passed: no gradient)
    grads = (grad_qkv, None, None, *grads)
    return grads + (None,) * (ctx.num_inputs - len(grads))


_qkv_attention_prologue_fwd.register_autograd(
    _qkv_attention_prologue_backward, setup_context=_qkv_attention_prologue_setup_context
)


# ------------------------------------------------------------------------------------------------
# fastvit::attention_prologue_fwd / _bwd: [B, H, N, D] q/k/v with qk-norm (the prologue without RoPE) and an optional
# key-padding mask; q may have fewer rows than k (the attention-pooling head's one query).


@torch.library.custom_op("fastvit::attention_prologue_fwd", mutates_args=(), schema=_PROLOGUE_FWD)
def _attention_prologue_fwd(q, k, v, scale, *args):
    prologue, layout = _prologue_op_args(args, key_padding_mask_only=True)
    out = _new_like(q)
    lse = _new_like(q, tuple(q.shape[:-1]), torch.float32)
    _attention_forward(q, k, v, out, lse, scale, _prologue_kwargs(prologue), key_keep=layout.key_padding_mask)
    return out, lse


@_attention_prologue_fwd.register_fake
def _(q, k, v, scale, *args):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fastvit::attention_prologue_bwd", mutates_args=(), schema=_PROLOGUE_BWD)
def _attention_prologue_bwd(grad_out, q, k, v, out, lse, scale, *args):
    prologue, layout = _prologue_op_args(args, key_padding_mask_only=True)
    dq, dk, dv = (_new_like(t) for t in (q, k, v))
    q_grads, k_grads, _ = _prologue_backward(
        grad_out, q, k, v, out, lse, dq, dk, dv, scale=scale, prologue=prologue, layout=layout
    )
    return dq, dk, dv, q_grads, k_grads


@_attention_prologue_bwd.register_fake
def _(grad_out, q, k, v, out, lse, scale, *args):
    prologue, _ = _prologue_op_args(args, key_padding_mask_only=True)
    q_shape, k_shape = (_norm_grad_shape(kind, q.shape[-1]) for kind in (prologue.q_norm, prologue.k_norm))
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        q.new_empty(q_shape, dtype=torch.float32),
        q.new_empty(k_shape, dtype=torch.float32),
    )


def _attention_prologue_setup_context(ctx, inputs, output):
    q, k, v, scale, *args = inputs
    prologue, layout = _prologue_op_args(args, key_padding_mask_only=True)
    _save_prologue(ctx, (q, k, v, *output), prologue, layout)
    ctx.scale = scale


@no_double_backward("attention")
def _attention_prologue_backward(ctx, grad_out, _grad_lse):
    (q, k, v, out, lse), prologue, layout = _saved_prologue(ctx)
    dq, dk, dv, q_grads, k_grads = torch.ops.fastvit.attention_prologue_bwd(
        grad_out, q, k, v, out, lse, ctx.scale, *prologue, layout.key_padding_mask
    )
    # (q, k, v, scale, the prologue, key_padding_mask)
    return dq, dk, dv, None, *_prologue_input_grads(prologue, q_grads, k_grads, None), None


_attention_prologue_fwd.register_autograd(_attention_prologue_backward, setup_context=_attention_prologue_setup_context)
