"""The Triton backend of ``qkv_attention``, ``varlen_qkv_attention`` and ``attention``: coverage, custom ops, autograd.

The kernels are ``fastvit/kernels/attention.py`` (FlashAttention-2 style); the launches (strides, grids, autotuning)
are ``fastvit/ops/triton/attention_launch.py``. This file: which calls they cover, autocast, then the ``torch.library``
custom ops (``fastvit::qkv_attention_fwd/bwd``, ``fastvit::attention_fwd/bwd``) with fake impls and
autograd, so ``torch.compile`` treats them as opaque nodes and traces through the backward.
``qkv_attention`` reads q/k/v straight from the packed buffer and writes ``[B, N, C]``; its backward
writes dq/dk/dv into one ``[B, N, 3*C]`` gradient. With a prologue (qk-norm, RoPE) it runs as
``fastvit::qkv_attention_prologue_fwd/bwd``: the same kernels with the prologue switched on, which also return the
norm weights' gradients (per-tile partials summed here, in a fixed order). ``fastvit::varlen_qkv_attention_fwd/bwd``
run the same kernels with ``VARLEN=True`` on ``[T, 3*C]`` (the views are [1, H, T, D], the grid covers max_seqlen
rows per sequence), and a key-padding mask reaches them as ``KEY_MASK=True`` with a uint8 mask and each row's last
kept key. The prologue ops take either as trailing arguments (``PackedLayout``): the packed form with the packed RoPE
table, or the key-padding mask. The backward uses no atomics; with ``fastvit.set_deterministic(True)`` the tile sizes
are fixed per GPU (compute capability) instead of autotuned, so results are bit-identical across processes too
(autotuning may pick near-tied configs differently).
Under ``torch.autocast``, inputs are cast to the autocast dtype before the custom op runs (as autocast does
for matmuls).
"""

from __future__ import annotations

import torch

from fastvit import dispatch
from fastvit.ops.attention import AttentionCall, AttentionPrologue
from fastvit.ops.autograd import no_double_backward
from fastvit.ops.triton.attention_launch import (  # noqa: F401  (candidate_configs, forced_configs: selftest, tests)
    PackedLayout,
    PrologueArgs,
    Varlen,
    _as_batched,
    _attention_backward,
    _attention_forward,
    _autotuned,
    _block_d,
    _heads_view,
    _new_like,
    _norm_grad_partials,
    _out_lse_shapes,
    _packed_heads,
    _packed_qkv,
    _prologue_kwargs,
    _prologue_op_args,
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
def attention(q, k, v, scale, dropout_p):
    q, k, v = _cast_for_autocast(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.fastvit.attention_fwd(q, k, v, scale)[0]


# ------------------------------------------------------------------------------------------------
# Custom ops: fastvit::qkv_attention_fwd / _bwd on the packed buffer, fastvit::attention_fwd / _bwd on
# [B, H, N, D] tensors. The forward returns (out, lse); lse [B, H, N] fp32 is saved for the backward.


_QKV_FWD = "(Tensor qkv, int num_heads, float scale, Tensor? key_padding_mask=None) -> (Tensor, Tensor)"
_QKV_BWD = (
    "(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, float scale, "
    "Tensor? key_padding_mask=None) -> Tensor"
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
_FWD = "(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)"
_BWD = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor)"
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


# The prologue variant: the same kernels with qk-norm / RoPE switched on, on [B, N, 3*C] (optionally with a key-padding
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


def _norm_grad_shape(kind, qkv, num_heads) -> tuple[int, int]:
    return (2 if kind is not None else 0, qkv.shape[-1] // (3 * num_heads))


@torch.library.custom_op("fastvit::qkv_attention_prologue_bwd", mutates_args=(), schema=_QKV_PROLOGUE_BWD)
def _qkv_attention_prologue_bwd(grad_out, qkv, out, lse, num_heads, scale, *args, rope_grad=False):
    prologue, layout = _prologue_op_args(args)
    batched = _as_batched(qkv)
    batch, tokens, _ = batched.shape
    head_dim = qkv.shape[-1] // (3 * num_heads)
    grad_qkv = _new_like(qkv)
    # Packed: one partial-buffer row per (sequence, head), max_seqlen rows each (zeroed: the rows past a sequence's
    # end, and every row of an empty sequence, are written by no program).
    sequences, rows = (batch, tokens) if layout.varlen is None else (len(layout.cu_seqlens) - 1, layout.max_seqlen)
    partials = {
        name: _norm_grad_partials(sequences * num_heads, rows, head_dim, qkv.device, zeroed=layout.varlen is not None)
        if kind is not None
        else None
        for name, kind in (("q", prologue.q_norm), ("k", prologue.k_norm))
    }
    table_grads = [None, None]  # through q, through k: [B, H, rows, 2*D] each (packed: B = 1), every row one program's
    if rope_grad and prologue.rope is not None:
        shape = (batch, num_heads, prologue.rope.shape[-2], prologue.rope.shape[-1])
        table_grads = [torch.zeros(shape, dtype=torch.float32, device=qkv.device) for _ in range(2)]
    _attention_backward(
        _heads_view(_as_batched(grad_out), num_heads),
        *_split_qkv(batched, num_heads),
        _heads_view(_as_batched(out), num_heads),
        lse.view(-1, *lse.shape[-2:]),
        *_split_qkv(_as_batched(grad_qkv), num_heads),
        scale,
        _prologue_kwargs(prologue),
        partials["q"],
        partials["k"],
        layout.varlen,
        layout.key_padding_mask,
        *table_grads,
    )
    norm_grads = (
        p.sum(dim=(0, 1)) if p is not None else qkv.new_zeros((0, head_dim), dtype=torch.float32)
        for p in partials.values()
    )
    table_grad = qkv.new_zeros(0, dtype=torch.float32)
    if table_grads[0] is not None:
        table_grad = (table_grads[0] + table_grads[1]).sum(0)  # [H, rows, 2*D]
        table_grad = table_grad if prologue.rope.dim() == 3 else table_grad.sum(0)  # a table shared by the heads
    return grad_qkv, *norm_grads, table_grad


@_qkv_attention_prologue_bwd.register_fake
def _(grad_out, qkv, out, lse, num_heads, scale, *args, rope_grad=False):
    prologue, _ = _prologue_op_args(args)
    q_shape, k_shape = (_norm_grad_shape(kind, qkv, num_heads) for kind in (prologue.q_norm, prologue.k_norm))
    table_shape = prologue.rope.shape if rope_grad and prologue.rope is not None else (0,)
    return (
        qkv.new_empty(qkv.shape),
        qkv.new_empty(q_shape, dtype=torch.float32),
        qkv.new_empty(k_shape, dtype=torch.float32),
        qkv.new_empty(table_shape, dtype=torch.float32),
    )


def _qkv_attention_prologue_setup_context(ctx, inputs, output):
    qkv, num_heads, scale, *args = inputs
    out, lse = output
    prologue, layout = _prologue_op_args(args)
    ctx.save_for_backward(qkv, out, lse, *prologue.tensors(), layout.cu_seqlens, layout.key_padding_mask)
    ctx.num_heads, ctx.scale, ctx.max_seqlen = num_heads, scale, layout.max_seqlen
    ctx.prologue = prologue.with_tensors(None, None, None, None, None)  # the tensors go through save_for_backward
    ctx.num_inputs = len(inputs)


@no_double_backward("qkv_attention")
def _qkv_attention_prologue_backward(ctx, grad_out, _grad_lse):
    qkv, out, lse, *tensors, cu_seqlens, key_padding_mask = ctx.saved_tensors
    prologue = ctx.prologue.with_tensors(*tensors)
    layout = PackedLayout(cu_seqlens, ctx.max_seqlen, key_padding_mask)
    wants_table_grad = prologue.rope is not None and ctx.needs_input_grad[3]
    grad_qkv, q_grads, k_grads, table_grad = torch.ops.fastvit.qkv_attention_prologue_bwd(
        grad_out, qkv, out, lse, ctx.num_heads, ctx.scale, *prologue, *layout, rope_grad=wants_table_grad
    )
    grads = []
    for norm_grads, weight, bias in (
        (q_grads, prologue.q_weight, prologue.q_bias),
        (k_grads, prologue.k_weight, prologue.k_bias),
    ):
        grads.append(None if weight is None else norm_grads[0].to(weight.dtype))
        grads.append(None if bias is None else norm_grads[1].to(bias.dtype))
    q_weight_grad, q_bias_grad, k_weight_grad, k_bias_grad = grads
    table_grad = table_grad.to(prologue.rope.dtype) if wants_table_grad else None  # a learned table only
    # Gradients for (qkv, num_heads, scale, rope, num_prefix_tokens, rotate_half, q_norm, q_weight, q_bias, q_eps,
    # k_norm, k_weight, k_bias, k_eps, then the layout's arguments the caller passed): none for the layout.
    grads = (grad_qkv, None, None, table_grad, None, None, None, q_weight_grad, q_bias_grad, None, None,
             k_weight_grad, k_bias_grad, None)  # fmt: skip
    return grads + (None,) * (ctx.num_inputs - len(grads))


_qkv_attention_prologue_fwd.register_autograd(
    _qkv_attention_prologue_backward, setup_context=_qkv_attention_prologue_setup_context
)


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
def _attention_fwd(q, k, v, scale):
    out = _new_like(q)
    lse = _new_like(q, tuple(q.shape[:-1]), torch.float32)
    _attention_forward(q, k, v, out, lse, scale)
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("fastvit::attention_bwd", mutates_args=(), schema=_BWD)
def _attention_bwd(grad_out, q, k, v, out, lse, scale):
    dq, dk, dv = (_new_like(t) for t in (q, k, v))
    _attention_backward(grad_out, q, k, v, out, lse, dq, dk, dv, scale)
    return dq, dk, dv


@_attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


@no_double_backward("attention")
def _attention_backward_autograd(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return (*torch.ops.fastvit.attention_bwd(grad_out, q, k, v, out, lse, ctx.scale), None)


_attention_fwd.register_autograd(_attention_backward_autograd, setup_context=_attention_setup_context)
