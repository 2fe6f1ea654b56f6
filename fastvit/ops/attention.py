"""Multi-head self-attention: ``fastvit.ops.attention`` and ``fastvit.ops.qkv_attention``.

``qkv_attention`` takes the packed ``[B, N, 3*C]`` output of the qkv Linear and returns
``[B, N, C]`` for the proj Linear; ``attention`` is the SDPA-shaped ``[B, H, N, D]`` variant.

Backends:
  ``torch``   the reference (``fastvit.reference``); every dtype, head dim and dropout.
  ``triton``  FlashAttention-2-style kernels (``fastvit.kernels.attention``): head dims
              32, 48, 64, 80, 96, 128; float16, bfloat16, float32 with fp32 softmax/accumulation
              (fp32 inputs: full-precision matmuls unless ``torch.backends.cuda.matmul.allow_tf32``;
              correct but slow on GPUs, no tensor cores). ``qkv_attention`` reads q/k/v straight
              from the packed buffer and writes ``[B, N, C]``; its backward writes dq/dk/dv into one
              ``[B, N, 3*C]`` gradient. The backward uses no atomics, so gradients are bit-identical
              run to run whether or not ``fastvit.set_deterministic`` is on.
Dropout on the attention probabilities is an option only the reference implements: ``auto`` picks
it whenever ``dropout_p > 0``, and likewise for inputs the Triton kernels do not cover (other head
dims, float64, v with another head dim than q).

The Triton path is registered as ``torch.library`` custom ops (``fastvit::qkv_attention_fwd/bwd``,
``fastvit::attention_fwd/bwd``) with fake impls and autograd, so ``torch.compile`` treats them as
opaque nodes and traces through the backward. This file holds the host side: validation, autocast,
allocation, strides, grids and autotuning. Under ``torch.autocast`` on CUDA, inputs are cast to the
autocast dtype before the custom op runs (as autocast does for matmuls).
"""

from __future__ import annotations

import contextlib
import functools

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
    backend = _backend_for_dropout("qkv_attention", backend, dropout_p)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    why = _uncovered_by_kernels(head_dim, head_dim, qkv.dtype)
    backend = dispatch.reference_for_uncovered_input("qkv_attention", backend, qkv.device, why)
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
    if q.shape[-1] == 0:
        raise ValueError(f"q's head dim must be >= 1, got q of shape {tuple(q.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k's head dim must equal q's ({q.shape[-1]}), got k {tuple(k.shape)}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v must have as many tokens as k ({k.shape[-2]}), got v {tuple(v.shape)}")
    scale = check_scale(scale)
    dropout_p = check_probability("dropout_p", dropout_p)
    backend = _backend_for_dropout("attention", backend, dropout_p)
    why = _uncovered_by_kernels(q.shape[-1], v.shape[-1], q.dtype)
    backend = dispatch.reference_for_uncovered_input("attention", backend, q.device, why)
    return dispatch.implementation("attention", backend, q.device)(q, k, v, scale, dropout_p)


def _backend_for_dropout(op_name: str, backend: str | None, dropout_p: float) -> str | None:
    if dropout_p == 0.0:
        return backend
    resolved = dispatch.get_default_backend() if backend is None else backend
    if resolved in ("auto", "torch"):
        return "torch"
    raise ValueError(f"{op_name}: dropout_p > 0 is implemented only by the 'torch' backend, not {resolved!r}")


def _uncovered_by_kernels(head_dim: int, v_head_dim: int, dtype: torch.dtype) -> str | None:
    """What the Triton kernels do not cover in this input (None: they cover it); ``auto`` then runs the
    reference, an explicit backend raises its own clear error."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {head_dim} (the Triton kernels take {SUPPORTED_HEAD_DIMS})"
    if v_head_dim != head_dim:
        return f"v's head dim {v_head_dim} differs from q's {head_dim}"
    if dtype not in TRITON_DTYPES:
        return f"{dtype} (the Triton kernels take float16, bfloat16, float32)"
    return None


@dispatch.register("qkv_attention", "torch")
def _qkv_attention_torch(qkv, num_heads, scale, dropout_p):
    return reference.qkv_attention(qkv, num_heads, scale=scale, dropout_p=dropout_p)


@dispatch.register("attention", "torch")
def _attention_torch(q, k, v, scale, dropout_p):
    return reference.attention(q, k, v, scale=scale, dropout_p=dropout_p)


# ------------------------------------------------------------------------------------------------
# Triton backend: validation and autocast, then the custom ops below.

SUPPORTED_HEAD_DIMS = (32, 48, 64, 80, 96, 128)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_triton_inputs(op_name: str, head_dim: int, **tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.dtype not in TRITON_DTYPES:
            raise TypeError(
                f"{op_name}: the 'triton' backend supports float16, bfloat16 and float32, got {name} of dtype "
                f"{tensor.dtype}; use backend='torch' for {tensor.dtype}"
            )
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"{op_name}: the 'triton' backend supports head_dim in {SUPPORTED_HEAD_DIMS}, got head_dim={head_dim}; "
            "use backend='torch' (or 'auto', which picks it) for other head dims"
        )


def _autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Inside ``torch.autocast`` on CUDA, cast float16/float32 inputs to the autocast dtype (as matmuls are)."""
    if tensors[0].device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return tensors
    dtype = torch.get_autocast_dtype("cuda")
    return tuple(t.to(dtype) if t.dtype in (torch.float16, torch.float32) else t for t in tensors)


@dispatch.register("qkv_attention", "triton")
def _qkv_attention_triton(qkv, num_heads, scale, dropout_p):
    (qkv,) = _autocast_inputs(qkv)
    head_dim = qkv.shape[-1] // (3 * num_heads)
    _check_triton_inputs("qkv_attention", head_dim, qkv=qkv)
    scale = head_dim**-0.5 if scale is None else scale
    return torch.ops.fastvit.qkv_attention_fwd(qkv, num_heads, scale)[0]


@dispatch.register("attention", "triton")
def _attention_triton(q, k, v, scale, dropout_p):
    q, k, v = _autocast_inputs(q, k, v)
    _check_triton_inputs("attention", q.shape[-1], q=q, k=k, v=v)
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"attention: the 'triton' backend needs v's head dim to equal q's ({q.shape[-1]}), got v "
            f"{tuple(v.shape)}; use backend='torch' for a different value head dim"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.fastvit.attention_fwd(q, k, v, scale)[0]


# ------------------------------------------------------------------------------------------------
# Launchers: every tensor reaches the kernels as a [B, H, N, D] strided view.


def _new_output(like: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Allocate a kernel output (uninitialised: the kernels write every element). Tests swap this hook
    for one that poisons the buffer and guards its ends, to catch missing or stray stores."""
    return like.new_empty(shape, dtype=dtype)


def _heads_view(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D] view (no copy)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, N, 3*C] (timm's [B, N, 3, H, D]) -> q, k, v as [B, H, N, D] views (no copy)."""
    parts = qkv.unflatten(-1, (3, num_heads, -1)).transpose(1, 3)  # [B, H, 3, N, D]
    return parts[:, :, 0], parts[:, :, 1], parts[:, :, 2]


def _block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: full-precision matmuls unless PyTorch's matmuls may use TF32 (``allow_tf32``), as SDPA."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # the default; ignored for fp16/bf16 operands


def _device_guard(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def _kernels():
    from fastvit.kernels import attention as attention_kernels  # imported on first use: triton is optional

    return attention_kernels


def _fixed_config(tensor: torch.Tensor) -> bool:
    """One config instead of autotuning: the interpreter (CPU tensors, or TRITON_INTERPRET=1)."""
    return tensor.device.type != "cuda" or dispatch.triton_interpreter_enabled()


@functools.cache
def _autotuned(kind: str, arch: int):
    """The autotuned wrapper of one kernel for one GPU (``arch``: compute capability 10*major+minor, e.g. 90).

    Its prune step hands the autotuner exactly ``kernels.autotune_configs`` of the call's dtype and BLOCK_D: the
    arch generation's table entries that fit the arch's shared memory (the set the static resource check covers).
    """
    import triton

    kernels = _kernels()
    kernel = {"fwd": kernels.attn_fwd_kernel, "dkdv": kernels.attn_bwd_dkdv_kernel, "dq": kernels.attn_bwd_dq_kernel}[
        kind
    ]

    def make(entry):
        block_m, block_n, warps, stages = entry
        return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        return [make(e) for e in kernels.autotune_configs(kind, arch, args["BLOCK_D"], args["Q"].element_size())]

    # Tensor dtypes join the key automatically (Triton appends every tensor argument's dtype).
    key = ["N_Q", "N_KV", "HEAD_DIM", "INPUT_PRECISION"]
    configs = [make(e) for e in kernels.all_table_configs(kind, arch)]
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)


def _launch(kind: str, kernel, num_blocks, like: torch.Tensor, args: tuple, constants: dict) -> None:
    """Run ``kernel`` on a 1-D grid of ``num_blocks(BLOCK_M, BLOCK_N) * B * H`` programs."""
    if _fixed_config(like):
        block_m, block_n, warps, stages = _kernels().INTERPRETER_CONFIGS[kind]
        grid = (num_blocks(block_m, block_n),)
        kernel[grid](*args, **constants, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
        return
    major, minor = torch.cuda.get_device_capability(like.device)
    arch = 10 * major + minor
    _autotuned(kind, arch)[lambda meta: (num_blocks(meta["BLOCK_M"], meta["BLOCK_N"]),)](*args, **constants)


def _attention_forward(q, k, v, out, lse, scale: float) -> None:
    """out = softmax(q kᵀ scale) v and lse = its row log-sum-exp. q, out: [B, H, N_Q, D]; k, v: [B, H, N_KV, D]
    (strided views); lse: [B, H, N_Q] fp32 contiguous."""
    batch, heads, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    if out.numel() == 0:
        return
    if n_kv == 0:  # softmax over no keys: the reference's empty matmul gives zeros
        out.zero_()
        lse.fill_(float("-inf"))
        return
    kernels = _kernels()
    constants = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), INPUT_PRECISION=_input_precision(q.dtype))
    args = (q, k, v, out, lse, scale, *q.stride(), *k.stride(), *v.stride(), *out.stride(), heads, n_q, n_kv)
    with _device_guard(q):
        _launch("fwd", kernels.attn_fwd_kernel, lambda bm, bn: _cdiv(n_q, bm) * batch * heads, q, args, constants)


def _attention_backward(grad_out, q, k, v, out, lse, dq, dk, dv, scale: float) -> None:
    """dq, dk, dv of ``_attention_forward`` (all [B, H, N, D] strided views), FlashAttention-2 recomputation."""
    batch, heads, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    kernels = _kernels()
    constants = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), INPUT_PRECISION=_input_precision(q.dtype))
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    with _device_guard(q):
        delta = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
        if dq.numel() > 0:
            grid = (_cdiv(n_q, kernels.PREPROCESS_BLOCK_M) * batch * heads,)
            kernels.attn_bwd_preprocess_kernel[grid](
                out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, n_q,
                HEAD_DIM=head_dim, BLOCK_D=constants["BLOCK_D"], BLOCK_M=kernels.PREPROCESS_BLOCK_M,
            )  # fmt: skip
            args = (q, k, v, grad_out, lse, delta, dq, scale, *strides, *dq.stride(), heads, n_q, n_kv)
            num_blocks = lambda bm, bn: _cdiv(n_q, bm) * batch * heads  # one program per query block
            _launch("dq", kernels.attn_bwd_dq_kernel, num_blocks, q, args, constants)
        if dk.numel() > 0:
            inputs = (q, k, v, grad_out, lse, delta, dk, dv, scale)
            args = (*inputs, *strides, *dk.stride(), *dv.stride(), heads, n_q, n_kv)
            num_blocks = lambda bm, bn: _cdiv(n_kv, bn) * batch * heads  # one program per key block
            _launch("dkdv", kernels.attn_bwd_dkdv_kernel, num_blocks, q, args, constants)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# ------------------------------------------------------------------------------------------------
# Custom ops: fastvit::qkv_attention_fwd / _bwd on the packed buffer, fastvit::attention_fwd / _bwd on
# [B, H, N, D] tensors. The forward returns (out, lse); lse [B, H, N] fp32 is saved for the backward.


@torch.library.custom_op(
    "fastvit::qkv_attention_fwd", mutates_args=(), schema="(Tensor qkv, int num_heads, float scale) -> (Tensor, Tensor)"
)
def _qkv_attention_fwd(qkv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, tokens, width3 = qkv.shape
    out = _new_output(qkv, (batch, tokens, width3 // 3))
    lse = _new_output(qkv, (batch, num_heads, tokens), torch.float32)
    _attention_forward(*_split_qkv(qkv, num_heads), _heads_view(out, num_heads), lse, scale)
    return out, lse


@_qkv_attention_fwd.register_fake
def _(qkv, num_heads, scale):
    batch, tokens, width3 = qkv.shape
    return qkv.new_empty((batch, tokens, width3 // 3)), qkv.new_empty((batch, num_heads, tokens), dtype=torch.float32)


@torch.library.custom_op(
    "fastvit::qkv_attention_bwd",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, float scale) -> Tensor",
)
def _qkv_attention_bwd(grad_out, qkv, out, lse, num_heads, scale):
    grad_qkv = _new_output(qkv, tuple(qkv.shape))
    _attention_backward(
        _heads_view(grad_out, num_heads),
        *_split_qkv(qkv, num_heads),
        _heads_view(out, num_heads),
        lse,
        *_split_qkv(grad_qkv, num_heads),
        scale,
    )
    return grad_qkv


@_qkv_attention_bwd.register_fake
def _(grad_out, qkv, out, lse, num_heads, scale):
    return qkv.new_empty(qkv.shape)


def _qkv_attention_setup_context(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads, ctx.scale = num_heads, scale


def _qkv_attention_backward(ctx, grad_out, _grad_lse):
    qkv, out, lse = ctx.saved_tensors
    return torch.ops.fastvit.qkv_attention_bwd(grad_out, qkv, out, lse, ctx.num_heads, ctx.scale), None, None


_qkv_attention_fwd.register_autograd(_qkv_attention_backward, setup_context=_qkv_attention_setup_context)


@torch.library.custom_op(
    "fastvit::attention_fwd", mutates_args=(), schema="(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)"
)
def _attention_fwd(q, k, v, scale):
    out = _new_output(q, tuple(q.shape))
    lse = _new_output(q, tuple(q.shape[:-1]), torch.float32)
    _attention_forward(q, k, v, out, lse, scale)
    return out, lse


@_attention_fwd.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op(
    "fastvit::attention_bwd",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) "
    "-> (Tensor, Tensor, Tensor)",
)
def _attention_bwd(grad_out, q, k, v, out, lse, scale):
    dq, dk, dv = (_new_output(t, tuple(t.shape)) for t in (q, k, v))
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


def _attention_backward_autograd(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    return (*torch.ops.fastvit.attention_bwd(grad_out, q, k, v, out, lse, ctx.scale), None)


_attention_fwd.register_autograd(_attention_backward_autograd, setup_context=_attention_setup_context)
