"""Host side of the Triton attention kernels (``fastvit/kernels/attention.py``): [B, H, N, D] strided views of the
packed buffers, tile configurations and autotuning (per arch, deterministic mode's fixed first entry, the configs
``fastvit selftest`` forces), the launches of the forward and the two backward kernels with their prologue (qk-norm,
RoPE), variable-length and key-mask switches. The backend's coverage, custom ops and autograd are
``fastvit/ops/triton/attention.py``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from fastvit import dispatch
from fastvit.ops.triton import launch


class PrologueArgs(NamedTuple):
    """The prologue as the custom ops take it, in their schema's order (``_PROLOGUE``); a norm's kind is None (and
    its tensors None, its eps 0.0) where it is absent."""

    rope: torch.Tensor | None
    num_prefix_tokens: int
    rotate_half: bool
    q_norm: str | None
    q_weight: torch.Tensor | None
    q_bias: torch.Tensor | None
    q_eps: float
    k_norm: str | None
    k_weight: torch.Tensor | None
    k_bias: torch.Tensor | None
    k_eps: float

    def tensors(self) -> tuple:
        return self.rope, self.q_weight, self.q_bias, self.k_weight, self.k_bias

    def with_tensors(self, rope, q_weight, q_bias, k_weight, k_bias) -> PrologueArgs:
        return self._replace(rope=rope, q_weight=q_weight, q_bias=q_bias, k_weight=k_weight, k_bias=k_bias)


# ------------------------------------------------------------------------------------------------
# Launchers: every tensor reaches the kernels as a [B, H, N, D] strided view.


def _heads_view(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D] view (no copy)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, N, 3*C] (timm's [B, N, 3, H, D]) -> q, k, v as [B, H, N, D] views (no copy)."""
    parts = qkv.unflatten(-1, (3, num_heads, -1)).transpose(1, 3)  # [B, H, 3, N, D]
    return parts[:, :, 0], parts[:, :, 1], parts[:, :, 2]


def _block_d(head_dim: int) -> int:
    """``BLOCK_D`` of a head dim (the kernels' rule, ``kernels.attention.block_d``)."""
    return launch.kernels("attention").block_d(head_dim)


def _padded_block_d(constants: dict) -> int:
    """The padded tile width of a launch (its BLOCK_D; with head-dim pieces, the power of two their sum rounds up to):
    the width its configs are listed and checked for."""
    return _block_d(constants["BLOCK_D"] + constants.get("D1", 0) + constants.get("D2", 0))


def _head_dim_pieces(constants: dict, like: torch.Tensor) -> dict:
    """The head-dim tiling constants: {} for the plain padded tile (the launch and its compiled code as
    before pieces existed), else BLOCK_D, D1, D2 of ``kernels.attention.head_dim_pieces`` (head dims 40, 72, 88, 104,
    112) on ``like``'s device, for the forward, dQ and dK/dV kernels; the qk-norm/RoPE prologue keeps the padded
    tile."""
    if constants["ROPE"] != 0 or constants["Q_NORM"] != 0 or constants["K_NORM"] != 0:
        return {}
    arch = launch.gpu_arch(like) if launch.on_gpu(like) else None
    block_d, d1, d2 = launch.kernels("attention").head_dim_pieces(constants["HEAD_DIM"], arch)
    return {} if d1 == 0 else dict(BLOCK_D=block_d, D1=d1, D2=d2)


def _stride_align(*tensors: torch.Tensor) -> dict:
    """{'STRIDE_ALIGN': 8} when the head dim is an odd multiple of 8 (40, 56, ..., 120) and the batch, head and token
    strides of every tensor are multiples of 8, as the packed qkv, output and gradient buffers' always are: tells the
    compiler what Triton's divisible-by-16 specialisation cannot (``kernels.attention._aligned``). Else {} (the
    launch as without it)."""
    head_dim = tensors[0].shape[-1]
    if head_dim % 16 == 0 or head_dim % 8 != 0:
        return {}
    return dict(STRIDE_ALIGN=8) if all(s % 8 == 0 for t in tensors for s in t.stride()[:3]) else {}


_KERNELS = {"fwd": "attn_fwd_kernel", "dkdv": "attn_bwd_dkdv_kernel", "dq": "attn_bwd_dq_kernel"}


def candidate_configs(
    kind: str, arch: int, block_d: int, elem_bytes: int, rope: bool = False, prologue: bool = False
) -> list[tuple[int, int, int, int]]:
    """The (BLOCK_M, BLOCK_N, warps, stages) configs the autotuner may pick for one kernel, in table order.

    ``kind``: 'fwd' | 'dkdv' | 'dq'; ``arch``: compute capability 10*major+minor (e.g. 90). The one definition is
    ``kernels.attention.autotune_configs`` (the table entries of the arch's generation, BLOCK_D and dtype that fit
    the arch's shared memory; the fallback config when none does): the prune step, deterministic mode, the selftest
    and the static resource check (``python -m fastvit.kernels.resources``) all read it. ``rope``: the launch runs
    the RoPE prologue (shallower pipelines where the table's do not fit); ``prologue``: it runs the qk-norm and/or RoPE
    prologue (the prologue's own config lists where the arch has them).
    """
    return launch.kernels("attention").autotune_configs(kind, arch, block_d, elem_bytes, rope, prologue)


def _has_prologue(constants: dict) -> tuple[bool, bool]:
    """(RoPE, any prologue) of a launch's constants: what selects its candidate configs."""
    rope = constants.get("ROPE", 0) != 0
    return rope, rope or constants.get("Q_NORM", 0) != 0 or constants.get("K_NORM", 0) != 0


def _triton_config(entry):
    import triton

    block_m, block_n, warps, stages = entry
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


@functools.cache
def _autotuned(kind: str, arch: int, batch_heads_bucket: int, varlen: bool = False):
    """The autotuned wrapper of one kernel for one GPU (``arch``: 10*major+minor) and one bucket of B·H (next
    power of two).

    Autotuning times configs at the first call's shape; B·H changes which tiles fill the GPU, so a config
    tuned at batch 1 (an ``InferenceSession`` warm-up) is not reused at batch 256: one tuner per bucket.
    The prune step hands the autotuner exactly :func:`candidate_configs` for the call's dtype and padded BLOCK_D
    (a launch whose head dim runs in pieces gets the list of its padded tile: its shared memory is at most that).
    ``varlen``: the packed variable-length launches, keyed on ``max_seqlen`` instead of the packed token count
    (which changes with every batch of images while the longest sequence does not).
    """
    import triton

    kernels = launch.kernels("attention")
    configs = [_triton_config(e) for e in kernels.all_table_configs(kind, arch)]

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        block_d, elem_bytes = _padded_block_d(args), args["Q"].element_size()
        return [_triton_config(e) for e in candidate_configs(kind, arch, block_d, elem_bytes, *_has_prologue(args))]

    # Tensor dtypes join the key automatically (Triton appends every tensor argument's dtype).
    key = ["max_seqlen" if varlen else "N_Q", "N_KV", "HEAD_DIM", "INPUT_PRECISION", "ROPE", "Q_NORM", "K_NORM"]
    if varlen:
        key.remove("N_KV")
    kernel = getattr(kernels, _KERNELS[kind])
    return triton.autotune(configs=configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)


_FORCED_CONFIGS: dict[str, tuple[int, int, int, int]] = {}  # kernel kind -> config every launch must use


def forced_configs(configs: dict[str, tuple[int, int, int, int]]):
    """Within the block, launch each kernel kind named in ``configs`` ('fwd' | 'dkdv' | 'dq') with the given
    (BLOCK_M, BLOCK_N, warps, stages) instead of the autotuner's, the deterministic or the interpreter's choice.

    How ``fastvit selftest`` runs every config of :func:`candidate_configs` through the real launcher, so that no
    later autotuning can pick a config that was never checked on this GPU. Not thread-safe (process-wide).
    """
    return launch.forced_configs(_FORCED_CONFIGS, _KERNELS, configs, ("BLOCK_M", "BLOCK_N", "warps", "stages"))


def _launch(
    kind: str, num_blocks, like: torch.Tensor, batch_heads: int, args: tuple, constants: dict, varlen: bool = False
) -> None:
    """Run one kernel on a 1-D grid of ``num_blocks(BLOCK_M, BLOCK_N)`` programs.

    A config forced by :func:`forced_configs` first; else under the interpreter one fixed config; in deterministic
    mode the first candidate config of this GPU (no timing, so every process picks the same tiles and
    sums in the same order); else autotuned.
    """
    kernels = launch.kernels("attention")
    kernel = getattr(kernels, _KERNELS[kind])
    if kind in _FORCED_CONFIGS:
        fixed = _FORCED_CONFIGS[kind]
    elif not launch.on_gpu(like):
        fixed = kernels.INTERPRETER_CONFIGS[kind]
    elif dispatch.deterministic_enabled():
        arch, (rope, prologue) = launch.gpu_arch(like), _has_prologue(constants)
        fixed = candidate_configs(kind, arch, _padded_block_d(constants), like.element_size(), rope, prologue)[0]
    else:
        bucket = launch.next_pow2(batch_heads, 1, 1 << 30)
        tuned = _autotuned(kind, launch.gpu_arch(like), bucket, varlen)
        tuned[lambda meta: (num_blocks(meta["BLOCK_M"], meta["BLOCK_N"]),)](*args, **constants)
        return
    block_m, block_n, warps, stages = fixed
    grid = (num_blocks(block_m, block_n),)
    kernel[grid](*args, **constants, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)


class Varlen(NamedTuple):
    """Packed variable-length sequences: the [1, H, T, D] views hold ``len(cu_seqlens) - 1`` sequences back to back."""

    cu_seqlens: torch.Tensor  # [B + 1] int32, on the tensors' device
    max_seqlen: int  # at least the longest sequence's length


def _grid_rows(varlen: Varlen | None, tokens: int) -> tuple[int, int]:
    """(sequences, rows per sequence the grid covers): (B, N) for [B, H, N, D] tensors, (B, max_seqlen) packed."""
    return (1, tokens) if varlen is None else (varlen.cu_seqlens.numel() - 1, varlen.max_seqlen)


def _constants(
    q: torch.Tensor, prologue: dict | None = None, varlen: Varlen | None = None, key_keep: torch.Tensor | None = None
) -> dict:
    """The kernels' keyword arguments: the tile constants, the prologue's (:func:`_prologue_kwargs`), and the
    trailing ones of packed sequences and of a key-padding mask (the plain path leaves those at their defaults,
    so it compiles as it did before they existed)."""
    head_dim = q.shape[-1]
    constants = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), INPUT_PRECISION=launch.input_precision(q.dtype))
    constants.update(prologue or dict(ROPE=0, Q_NORM=0, K_NORM=0))
    if varlen is not None:
        # The kernels index cu_seqlens as a contiguous array.
        constants.update(Cu_seqlens=varlen.cu_seqlens.contiguous(), max_seqlen=varlen.max_seqlen, VARLEN=True)
    if key_keep is not None:  # [B, N_KV] bool -> uint8 mask and each row's extent (1 + its last kept key, 0 if none)
        position = torch.arange(1, key_keep.shape[-1] + 1, dtype=torch.int32, device=key_keep.device)
        extent = (key_keep * position).amax(-1).to(torch.int32)
        constants.update(KeyKeep=key_keep.contiguous().view(torch.uint8), KeyExtent=extent, KEY_MASK=True)
    return constants


_NORM_CODES = {None: 0, "layer": 1, "rms": 2}  # kernels.attention's NORM_LAYER, NORM_RMS


def _prologue_kwargs(p: PrologueArgs) -> dict:
    """The kernels' prologue arguments. A LayerNorm without bias gets zeros."""
    kwargs = dict(ROPE=0 if p.rope is None else (2 if p.rotate_half else 1), Q_NORM=_NORM_CODES[p.q_norm])
    kwargs.update(K_NORM=_NORM_CODES[p.k_norm], NUM_PREFIX=p.num_prefix_tokens, q_eps=p.q_eps, k_eps=p.k_eps)
    if p.rope is not None:
        rope = p.rope.contiguous()
        per_head = rope.ndim == 3  # [H, N - T, 2·D]: RoPE-Mixed's tables
        kwargs.update(Rope=rope, stride_rope_n=rope.stride(-2), stride_rope_h=rope.stride(0) if per_head else 0)
    for prefix, kind, weight, bias in (("Q", p.q_norm, p.q_weight, p.q_bias), ("K", p.k_norm, p.k_weight, p.k_bias)):
        if kind == "layer" and bias is None:
            bias = torch.zeros_like(weight)
        # the kernels read the norm's weight and bias at unit stride (a strided or expanded view: a copy)
        weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
        kwargs.update({f"{prefix}W": weight, f"{prefix}B": bias})
    return kwargs


def _attention_forward(
    q, k, v, out, lse, scale: float, prologue: dict | None = None, varlen: Varlen | None = None, key_keep=None
) -> None:
    """out = softmax(q kᵀ scale) v and lse = its row log-sum-exp. q, out: [B, H, N_Q, D]; k, v: [B, H, N_KV, D]
    (strided views); lse: [B, H, N_Q] fp32 contiguous; ``prologue``: the kernels' prologue arguments
    (:func:`_prologue_kwargs`) or None. With ``varlen``: B = 1, N_Q = N_KV = T and lse is [H, T].
    ``key_keep``: [B, N_KV] bool key-padding mask (True = keep); rows without a kept key give 0 (lse +inf)."""
    batch, heads, n_q, _ = q.shape
    n_kv = k.shape[2]
    if out.numel() == 0:
        return
    if n_kv == 0:  # softmax over no keys: the spec's empty matmul gives zeros
        out.zero_()
        lse.fill_(float("-inf"))
        return
    sequences, rows = _grid_rows(varlen, n_q)
    args = (q, k, v, out, lse, scale, *q.stride(), *k.stride(), *v.stride(), *out.stride(), heads, n_q, n_kv)
    constants = _constants(q, prologue, varlen, key_keep)
    constants.update(_head_dim_pieces(constants, q))
    constants.update(_stride_align(q, k, v, out))
    with launch.device_guard(q):
        num_blocks = lambda bm, bn: launch.cdiv(rows, bm) * batch * sequences * heads  # one per query block
        _launch("fwd", num_blocks, q, batch * sequences * heads, args, constants, varlen is not None)


def _attention_backward(
    grad_out,
    q,
    k,
    v,
    out,
    lse,
    dq,
    dk,
    dv,
    scale: float,
    prologue: dict | None = None,
    q_norm_grad=None,
    k_norm_grad=None,
    varlen: Varlen | None = None,
    key_keep=None,
    q_rope_grad=None,
    k_rope_grad=None,
) -> None:
    """dq, dk, dv of ``_attention_forward`` (all [B, H, N, D] strided views), FlashAttention-2 recomputation. With a
    norm in ``prologue``: its per-slot weight/bias gradient partials into ``q_norm_grad`` / ``k_norm_grad``
    ([B·H, cdiv(N, kernels.NORM_GRAD_ROWS), 2, D] fp32, from :func:`_norm_grad_partials`). ``q_rope_grad`` /
    ``k_rope_grad``: the RoPE table's gradient through q / through k, [B, H, N - prefix, 2·D] fp32 (packed:
    [1, H, T - prefix, 2·D]), zeroed, or None (not wanted)."""
    batch, heads, n_q, head_dim = q.shape
    n_kv = k.shape[2]
    kernels = launch.kernels("attention")
    constants = _constants(q, prologue, varlen, key_keep)
    align = _stride_align(q, k, v, out, grad_out, dq, dk, dv)
    constants.update(align)
    pieces = _head_dim_pieces(constants, q)  # dQ and dK/dV; the preprocess keeps BLOCK_D
    sequences, rows = _grid_rows(varlen, n_q)
    batch_heads = batch * sequences * heads
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    with launch.device_guard(q):
        delta = torch.empty((batch, heads, n_q), dtype=torch.float32, device=q.device)
        if dq.numel() > 0:
            grid = (launch.cdiv(n_q, kernels.PREPROCESS_BLOCK_M) * batch * heads,)
            kernels.attn_bwd_preprocess_kernel[grid](
                out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, n_q,
                HEAD_DIM=head_dim, BLOCK_D=constants["BLOCK_D"], BLOCK_M=kernels.PREPROCESS_BLOCK_M, **align,
            )  # fmt: skip
            args = (q, k, v, grad_out, lse, delta, dq, scale, *strides, *dq.stride(), heads, n_q, n_kv)
            num_blocks = lambda bm, bn: launch.cdiv(rows, bm) * batch_heads  # one program per query block
            dq_constants = {**constants, **pieces, "NormGrad": q_norm_grad, **_rope_grad_kwargs(q_rope_grad)}
            _launch("dq", num_blocks, q, batch_heads, args, dq_constants, varlen is not None)
        if dk.numel() > 0:
            inputs = (q, k, v, grad_out, lse, delta, dk, dv, scale)
            args = (*inputs, *strides, *dk.stride(), *dv.stride(), heads, n_q, n_kv)
            key_rows = n_kv if varlen is None else rows
            num_blocks = lambda bm, bn: launch.cdiv(key_rows, bn) * batch_heads  # one program per key block
            dkdv_constants = {**constants, **pieces, "NormGrad": k_norm_grad, **_rope_grad_kwargs(k_rope_grad)}
            _launch("dkdv", num_blocks, q, batch_heads, args, dkdv_constants, varlen is not None)


def _rope_grad_kwargs(rope_grad: torch.Tensor | None) -> dict:
    """The backward kernels' arguments of the RoPE table's gradient buffer (none when it is not wanted)."""
    if rope_grad is None:
        return {}
    stride_b, stride_h, stride_n, _ = rope_grad.stride()
    return dict(RopeGrad=rope_grad, stride_rg_b=stride_b, stride_rg_h=stride_h, stride_rg_n=stride_n, ROPE_GRAD=True)


def _norm_grad_partials(batch_heads: int, tokens: int, head_dim: int, device, zeroed: bool = False) -> torch.Tensor:
    """The buffer [B·H, cdiv(tokens, NORM_GRAD_ROWS), 2, D] fp32 the backward kernels write a norm's weight/bias
    gradient partials into: every slot written (the plain layout), or ``zeroed`` first (packed sequences: B·H per
    (sequence, head), ``tokens`` = max_seqlen, and no program writes the slots past a sequence's end)."""
    slots = launch.cdiv(tokens, launch.kernels("attention").NORM_GRAD_ROWS.value)
    new = torch.zeros if zeroed else torch.empty
    return new((batch_heads, slots, 2, head_dim), dtype=torch.float32, device=device)


def _new_like(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    return launch.new_output(tuple(t.shape) if shape is None else shape, dtype or t.dtype, t.device)


# ------------------------------------------------------------------------------------------------
# The custom ops' views and arguments


class PackedLayout(NamedTuple):
    """The prologue ops' trailing arguments (``_LAYOUT``): packed sequences (``cu_seqlens`` not None: qkv is [T, 3*C])
    or a [B, N] key-padding mask, or neither."""

    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int = 0
    key_padding_mask: torch.Tensor | None = None

    @property
    def varlen(self) -> Varlen | None:
        return None if self.cu_seqlens is None else Varlen(self.cu_seqlens, self.max_seqlen)


def _prologue_op_args(args: tuple, key_padding_mask_only: bool = False) -> tuple[PrologueArgs, PackedLayout]:
    """A prologue op's arguments after (qkv, num_heads, scale) (or the backward's leading ones): the prologue and
    the layout (its defaults where the caller left them out). ``key_padding_mask_only``: the [B, H, N, D] form's
    ops, whose only trailing argument is the mask."""
    count = len(PrologueArgs._fields)
    layout = PackedLayout(None, 0, *args[count:]) if key_padding_mask_only else PackedLayout(*args[count:])
    return PrologueArgs(*args[:count]), layout


def _as_batched(x: torch.Tensor) -> torch.Tensor:
    """[T, ...] packed -> [1, T, ...] (a view); [B, N, ...] as it is."""
    return x if x.dim() == 3 else x.unsqueeze(0)


def _out_lse_shapes(qkv, num_heads) -> tuple[tuple, tuple]:
    """Shapes of out and lse: ([B, N, C], [B, H, N]), or packed ([T, C], [H, T])."""
    *rows, width3 = qkv.shape
    return (*rows, width3 // 3), (*rows[:-1], num_heads, rows[-1])


def _packed_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[T, H*D] -> [1, H, T, D] view (no copy)."""
    return _heads_view(x.unsqueeze(0), num_heads)


def _packed_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[T, 3*C] -> q, k, v as [1, H, T, D] views (no copy)."""
    return _split_qkv(qkv.unsqueeze(0), num_heads)
