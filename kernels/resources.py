"""Static resource use of fastvit's GPU kernels: registers, spills and shared memory, without a GPU.

Triton kernels: each launch the launchers may make is compiled ahead of time for sm_90a and sm_80 with the
installed Triton and its bundled ptxas, specialised exactly as a launch specialises it (the JIT's own binder turns
example arguments into the signature, the divisible-by-16 attributes and the constant unit strides). ptxas -v
gives registers, stack frame and spill bytes per thread (and its performance warnings), Triton's metadata the
shared memory per block. Which configs are compiled:

- attention: ``kernels.attention.autotune_configs`` (the function the launcher's autotuner prune step returns)
  for bf16 and fp16 at head dims 64, 72 (head-dim pieces, STRIDE_ALIGN) and 128, on packed-qkv views ([B, N, 3, H,
  D] strides), with the head-dim pieces and stride alignment the launcher passes; and with the qk-norm / RoPE
  prologue (``PROLOGUE_CASES``: DINOv3, EVA02, RMSNorm at D = 64, LayerNorm at D = 128) at the launcher's prologue
  candidates, bf16 on sm_90a (``--all``: fp16 and sm_80 too);
- patch embedding: the tiles ``fastvit.ops.triton.patch_embed``'s launchers choose, recorded by running those launchers
  (kernel launches replaced by recorders) on ViT-B/16 shapes at batch 1 and 64, NCHW and channels_last, float
  and uint8 images; the normed forward (the patch tokens' RMSNorm, training and inference) at AIMv2-L/14's shapes;
- fused GEMM (``kernels/linear.py``): every config of its per-arch table (the autotuner's set) for the forward (and,
  for sm_90a, the persistent TMA forward of ``hopper_path``) and both backward GEMMs at ViT-B's fc1 (LayerNorm
  prologue, GELU) and fc2 (bias + residual), EVA02-B's fc1 (RMSNorm prologue, SwiGLU) and fc2 (sub-LN prologue,
  residual), a split-K weight gradient, the statistics kernel and the norm's backward (LayerNorm and RMSNorm).

``--all`` compiles the full matrix instead: every table entry (also those ``keep_config`` drops), head dims 32 to
128, fp32 too, and more model shapes and batch sizes for the patch embedding.

CUDA kernels of the extension: read from the built ``fastvit._C`` with cuobjdump (the register and stack counts
ptxas recorded in each arch's cubin of the fat binary).

A Triton launch passes when it spills nothing and its shared memory fits the arch's per-block limit; a CUDA kernel
when it has no stack frame and at most ``MAX_CUDA_REGISTERS`` registers.

    python -m fastvit.kernels.resources                          # the launchable set, both archs
    python -m fastvit.kernels.resources --arch sm_90a --all --out benchmarks/results/resources-sm90a.md

Exit status 1 when a launchable config or a CUDA kernel fails the check.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from unittest import mock

# Each target: (compute capability, SM count of the GPU it stands for). The SM count feeds the patch-embedding
# tile heuristic (row tiles grow once the grid fills the GPU).
ARCHS = {"sm_90a": (90, 132), "sm_80": (80, 108)}  # H100 SXM, A100
# A CUDA kernel may use at most this many registers per thread: 64 K registers per SM then hold 1024 threads, half
# the SM's thread slots, which is what these memory-bound kernels need to hide memory latency. The float64
# instantiations (the precision path, not a speed one) are exempt from the cap; they must not spill either.
MAX_CUDA_REGISTERS = 64
CI_HEAD_DIMS = (64, 72, 128)  # 72: SigLIP so400m, head-dim pieces and STRIDE_ALIGN
CI_DTYPES = ("bf16", "fp16")
# Launchable configs of these dtypes must not spill. fp32 launches (full-precision "ieee" dots on FMA units: an
# accuracy path, not a fast one) are compiled and reported, and must fit shared memory, but their spills are
# accepted: the attention kernels spill in fp32 at head dims >= 48 whatever the tile.
SPILL_FREE_DTYPES = CI_DTYPES
_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# ------------------------------------------------------------------------------------------------
# Launch descriptions (built in the calling process, compiled in worker processes)


@dataclasses.dataclass(frozen=True)
class Pointer:
    """A tensor argument as the JIT's binder sees it: its dtype and whether its address is 16-byte aligned."""

    dtype: object  # torch.dtype
    address: int = 0

    def data_ptr(self) -> int:
        return self.address


@dataclasses.dataclass(frozen=True)
class Launch:
    """One compile: a Triton kernel of ``fastvit.kernels.<module>``, example arguments, constexprs and options."""

    kernel: str  # row label, e.g. "attention.fwd"
    case: str  # what the launch covers, e.g. "D=64" or "channels_last"
    dtype: str  # "bf16", "fp16", "fp32"
    config: str  # the tile config, human-readable
    picked: bool  # the launcher may run it (False: listed by --all, dropped by keep_config)
    module: str
    function: str
    args: tuple
    kwargs: tuple  # sorted (name, value) pairs: constexprs, num_warps, num_stages

    def compile_key(self) -> tuple:
        """Launches with equal keys compile to the same kernel (Triton's specialisation rules, coarsely)."""
        return (self.module, self.function, tuple(_spec_class(a) for a in self.args), self.kwargs)


def _spec_class(arg: object) -> object:
    if isinstance(arg, Pointer):
        return ("ptr", str(arg.dtype), arg.address % 16 == 0)
    if isinstance(arg, bool) or not isinstance(arg, int):
        return type(arg).__name__
    return ("int", arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31)


def _as_arg(value: object) -> object:
    import torch

    if isinstance(value, torch.Tensor):
        return Pointer(value.dtype, value.data_ptr() if value.device.type != "meta" else 0)
    return value


@dataclasses.dataclass(frozen=True)
class Usage:
    """Resource use of one compiled kernel (per thread, except shared memory: per block)."""

    registers: int
    stack_bytes: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    notes: tuple[str, ...] = ()  # ptxas warnings / performance notes


@dataclasses.dataclass(frozen=True)
class Row:
    launch: Launch
    arch: str
    usage: Usage | None
    error: str | None = None

    @property
    def shared_limit(self) -> int:
        from fastvit.kernels.attention import shared_memory_limit

        return shared_memory_limit(ARCHS[self.arch][0])

    @property
    def spill(self) -> str | None:
        """What the kernel spills to local memory, or None."""
        usage = self.usage
        if usage is None or not (usage.spill_stores or usage.spill_loads or usage.stack_bytes):
            return None
        return f"spills {usage.spill_stores} B (stack {usage.stack_bytes} B, loads {usage.spill_loads} B)"

    @property
    def problems(self) -> list[str]:
        """Everything wrong with the compiled kernel (whether or not it fails the check: see ``failing``)."""
        if self.error is not None:
            return [f"compile error: {self.error}"]
        found = [self.spill] if self.spill else []
        if self.usage.shared_bytes > self.shared_limit:
            found.append(f"shared memory {self.usage.shared_bytes} B > {self.shared_limit} B")
        return found

    @property
    def failing(self) -> list[str]:
        """The problems that fail the check: those of a launchable config, except spills outside
        ``SPILL_FREE_DTYPES`` (fp32). Table entries the autotuner never gets on this arch fail nothing."""
        if not self.launch.picked:
            return []
        if self.launch.dtype in SPILL_FREE_DTYPES:
            return self.problems
        return [problem for problem in self.problems if problem != self.spill]


# ------------------------------------------------------------------------------------------------
# Attention launches: the packed-qkv views the launchers pass, configs from autotune_configs


def _attention_args(kind: str, dtype, head_dim: int, scale: float = 0.125) -> tuple:
    """Arguments of one attention kernel in the launcher's order, for qkv [B, N, 3*H*D] (timm's layout)."""
    import torch

    batch, tokens, heads = 2, 197, 12 if head_dim <= 64 else 8
    width = heads * head_dim
    qkv = torch.empty(batch, tokens, 3 * width, dtype=dtype, device="meta")
    q, k, v = qkv.unflatten(-1, (3, heads, head_dim)).transpose(1, 3).unbind(2)  # [B, H, N, D] views
    out = torch.empty(batch, tokens, width, dtype=dtype, device="meta").unflatten(-1, (heads, -1)).transpose(1, 2)
    lse = torch.empty(batch, heads, tokens, dtype=torch.float32, device="meta")
    if kind == "fwd":
        tensors = (q, k, v, out, lse, scale, *q.stride(), *k.stride(), *v.stride(), *out.stride())
        return tuple(map(_as_arg, (*tensors, heads, tokens, tokens)))
    grad_out, delta = out, lse  # same shapes and strides as the forward's out and lse
    if kind == "preprocess":
        return tuple(map(_as_arg, (out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, tokens)))
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    if kind == "dq":  # dq: a view of grad_qkv, strided as q
        tensors = (q, k, v, grad_out, lse, delta, q, scale, *strides, *q.stride())
    else:  # dkdv: dk, dv views of grad_qkv
        tensors = (q, k, v, grad_out, lse, delta, k, v, scale, *strides, *k.stride(), *v.stride())
    return tuple(map(_as_arg, (*tensors, heads, tokens, tokens)))


def _pieces(tables, head_dim: int, arch: int) -> dict:
    """BLOCK_D, D1, D2 of the forward, dQ and dK/dV kernels on ``arch`` where ``head_dim_pieces`` splits the head dim
    ({} for the padded tile)."""
    block_d, d1, d2 = tables.head_dim_pieces(head_dim, arch)
    return {} if d1 == 0 else dict(BLOCK_D=block_d, D1=d1, D2=d2)


def attention_launches(arch: int, full: bool) -> list[Launch]:
    """Attention launches on ``arch``: the autotuner's candidates (``full``: every table entry, all head dims)."""
    import torch
    from fastvit.kernels import attention as tables

    functions = {"fwd": "attn_fwd_kernel", "dkdv": "attn_bwd_dkdv_kernel", "dq": "attn_bwd_dq_kernel"}
    head_dims = tables.HEAD_DIMS if full else CI_HEAD_DIMS
    dtypes = ("bf16", "fp16", "fp32") if full else CI_DTYPES
    launches = []
    for dtype_name in dtypes:
        dtype = getattr(torch, _TORCH_DTYPES[dtype_name])
        elem_bytes = torch.empty(0, dtype=dtype).element_size()
        precision = "ieee" if dtype == torch.float32 else "tf32"  # the launcher's default (no allow_tf32)
        for head_dim in head_dims:
            block_d = tables.block_d(head_dim)
            constants = dict(HEAD_DIM=head_dim, BLOCK_D=block_d)
            align = dict(STRIDE_ALIGN=8) if head_dim % 16 else {}  # the launcher's for packed qkv (_stride_align)
            case = f"D={head_dim}"
            launches.append(
                Launch(
                    kernel="attention.preprocess",
                    case=case,
                    dtype=dtype_name,
                    config=f"BLOCK_M={tables.PREPROCESS_BLOCK_M}",
                    picked=True,
                    module="attention",
                    function="attn_bwd_preprocess_kernel",
                    args=_attention_args("preprocess", dtype, head_dim),
                    kwargs=tuple(sorted({**constants, "BLOCK_M": tables.PREPROCESS_BLOCK_M, **align}.items())),
                )
            )
            for kind, function in functions.items():
                picked = tables.autotune_configs(kind, arch, block_d, elem_bytes)
                candidates = picked
                if full:  # also the entries the autotuner never gets here (other BLOCK_D list, over the smem limit)
                    candidates = list(dict.fromkeys([*tables.dtype_table_configs(kind, arch, elem_bytes), *picked]))
                args = _attention_args(kind, dtype, head_dim)
                for block_m, block_n, warps, stages in candidates:
                    kwargs = {**constants, "INPUT_PRECISION": precision, "BLOCK_M": block_m, "BLOCK_N": block_n}
                    kwargs.update(_pieces(tables, head_dim, arch))  # the head-dim pieces, as the launcher passes them
                    kwargs.update(align)
                    kwargs.update(num_warps=warps, num_stages=stages)
                    launches.append(
                        Launch(
                            kernel=f"attention.{kind}",
                            case=case,
                            dtype=dtype_name,
                            config=str((block_m, block_n, warps, stages)),
                            picked=(block_m, block_n, warps, stages) in picked,
                            module="attention",
                            function=function,
                            args=args,
                            kwargs=tuple(sorted(kwargs.items())),
                        )
                    )
    return launches


# Prologue launches (qk-norm / RoPE inside the attention kernels, see kernels/attention.py ``_prologue``): the
# families' cases, the launcher's candidates for a prologue launch (``autotune_configs(..., rope=...)``), bf16 (--all:
# fp16 too), with the launcher's keyword arguments: a float32 cat(sin, cos) table [N - prefix, 2·D] shared by the
# heads (timm's), 5 prefix tokens (DINOv3: class + 4 registers), LayerNorm with bias, the norm-gradient partials.


@dataclasses.dataclass(frozen=True)
class PrologueCase:
    """One prologue variant: ``rope`` (kernels/attention.py ROPE_*: 0 none, 1 interleaved, 2 rotate-half), ``norm``
    (NORM_*: 0 none, 1 LayerNorm, 2 RMSNorm) on q and k alike, packed variable-length sequences or not."""

    label: str
    head_dim: int
    rope: int = 0
    norm: int = 0
    varlen: bool = False


PROLOGUE_CASES = (
    PrologueCase("D=64 rope-half+LN", 64, rope=2, norm=1),  # DINOv3-B/16
    PrologueCase("D=64 rope-half+LN varlen", 64, rope=2, norm=1, varlen=True),  # DINOv3 NaFlex-style packing
    PrologueCase("D=64 rope-interleaved", 64, rope=1),  # EVA02-B/14
    PrologueCase("D=64 RMSNorm", 64, norm=2),
    PrologueCase("D=128 LN", 128, norm=1),  # qk-norm at AIMv2-L's head dim
)
PROLOGUE_ARCHS = ("sm_90a",)  # the CI check's archs for prologue launches (--all: every arch)


def _prologue_kwargs(case: PrologueCase, kind: str, dtype) -> dict:
    """The prologue (and varlen) keyword arguments the launcher passes for ``case`` to kernel ``kind``."""
    import torch

    meta = lambda *shape, dt=dtype: _as_arg(torch.empty(*shape, dtype=dt, device="meta"))
    d = case.head_dim
    kwargs = dict(ROPE=case.rope, Q_NORM=case.norm, K_NORM=case.norm, NUM_PREFIX=5, q_eps=1e-6, k_eps=1e-6)
    if case.rope:
        kwargs.update(Rope=meta(192, 2 * d, dt=torch.float32), stride_rope_n=2 * d, stride_rope_h=0)
    if case.norm:
        kwargs.update(QW=meta(d), QB=meta(d), KW=meta(d), KB=meta(d))
        if kind != "fwd":
            kwargs.update(NormGrad=meta(24, 13, 2, d, dt=torch.float32))
    if case.varlen:
        kwargs.update(Cu_seqlens=meta(3, dt=torch.int32), max_seqlen=197, VARLEN=True)
    return kwargs


def attention_prologue_launches(arch: int, full: bool) -> list[Launch]:
    """The attention kernels with the prologue at :data:`PROLOGUE_CASES`, for every config the launcher's autotuner
    gets for such a launch."""
    import torch
    from fastvit.kernels import attention as tables

    functions = {"fwd": "attn_fwd_kernel", "dkdv": "attn_bwd_dkdv_kernel", "dq": "attn_bwd_dq_kernel"}
    launches = []
    for dtype_name in CI_DTYPES if full else ("bf16",):
        dtype = getattr(torch, _TORCH_DTYPES[dtype_name])
        for case in PROLOGUE_CASES:
            block_d = tables.block_d(case.head_dim)
            for kind, function in functions.items():
                picked = tables.autotune_configs(kind, arch, block_d, 2, rope=case.rope != 0, prologue=True)
                args = _attention_args(kind, dtype, case.head_dim)
                for block_m, block_n, warps, stages in picked:
                    kwargs = dict(HEAD_DIM=case.head_dim, BLOCK_D=block_d, INPUT_PRECISION="tf32")
                    kwargs.update(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
                    kwargs.update(_prologue_kwargs(case, kind, dtype))
                    launches.append(
                        Launch(f"attention.{kind}", case.label, dtype_name, str((block_m, block_n, warps, stages)),
                               True, "attention", function, args, tuple(sorted(kwargs.items())))
                    )  # fmt: skip
    return launches


# ------------------------------------------------------------------------------------------------
# Fused-GEMM launches (kernels/linear.py): every table config of the arch at the shapes and prologue/epilogue flags
# of the MLP families (ViT-B: LayerNorm prologue + GELU, bias + residual; EVA02-B: RMSNorm prologue + SwiGLU, a
# sub-LN prologue on fc2), forward and both backward GEMMs, a split-K weight gradient, the statistics kernel and the
# norm's backward, with the launcher's argument order.


@dataclasses.dataclass(frozen=True)
class LinearCase:
    """One fused-GEMM shape with its flags: ``norm`` (kernels/linear.py NORM_*: 0 none, 1 LayerNorm, 2 RMSNorm),
    ``activation`` (ACT_*: 0 none, 1 GELU, 4 SwiGLU), a residual, the rows (tokens), the weight gradient's split and
    ``act_columns`` (> 0: the activation on the output columns below it only, ``PARTIAL_ACT``)."""

    label: str
    in_features: int
    out_features: int
    norm: int = 0
    norm_bias: bool = False
    activation: int = 0
    residual: bool = False
    rows: int = 64 * 197
    split_k: int = 1
    kinds: tuple[str, ...] = ("fwd", "input", "weight")
    act_columns: int = 0


LINEAR_CASES = (
    LinearCase("ViT-B fc1 (LN, GELU)", 768, 3072, norm=1, norm_bias=True, activation=1),
    LinearCase("ViT-B fc2 (residual)", 3072, 768, residual=True),
    LinearCase("EVA02-B fc1 (RMSNorm, SwiGLU)", 768, 2048, norm=2, activation=4, rows=64 * 257),
    LinearCase("EVA02-B fc2 (sub-LN, residual)", 2048, 768, norm=1, norm_bias=True, residual=True, rows=64 * 257),
    LinearCase("ViT-B qkv batch 2 (LN, split-K 3)", 768, 2304, norm=1, norm_bias=True, rows=2 * 197, split_k=3,
               kinds=("weight",)),
    LinearCase("ViT-B xp in_proj (LN, GELU on the 3072 MLP columns of 5376)", 768, 5376, norm=1, norm_bias=True,
               activation=1, act_columns=3072),
)  # fmt: skip


def _linear_args(kind: str, dtype, case: LinearCase) -> tuple[tuple, dict]:
    """(arguments, flag constexprs) of one fused-GEMM kernel as ``fastvit.ops.triton.linear_launch`` launches it."""
    import torch

    rows, k, n = case.rows, case.in_features, case.out_features
    swiglu = case.activation == 4
    meta = lambda *shape, dt=dtype: torch.empty(*shape, dtype=dt, device="meta")
    x, weight, out = meta(rows, k), meta(n, k), meta(rows, n)  # weight: SwiGLU's gate and value halves alike
    pre_act = meta(rows, 2 * n if swiglu else n)
    stats, norm_param = meta(rows, dt=torch.float32), meta(k)
    norm_flags = dict(NORM=case.norm, HAS_NORM_BIAS=case.norm_bias, ACTIVATION=case.activation)
    partial_act = dict(act_cols=case.act_columns, PARTIAL_ACT=True) if case.act_columns else {}
    norm_flags.update(partial_act)
    if kind == "fwd":
        tensors = (x, weight, weight, out[0], out, out, pre_act, stats, stats, norm_param, norm_param, rows, n, k,
                   *x.stride(), *weight.stride(), *weight.stride(), *out.stride())  # fmt: skip
        flags = dict(norm_flags, HAS_BIAS=True, HAS_RESIDUAL=case.residual, SAVE_PRE_ACT=case.activation != 0)
        return tuple(map(_as_arg, tensors)), flags
    if kind == "input":
        tensors = (out, pre_act, weight, weight, x, rows, n, k, *weight.stride(), *weight.stride())
        return tuple(map(_as_arg, tensors)), dict(ACTIVATION=case.activation, **partial_act)
    weight_rows = 2 * n if swiglu else n
    partial = torch.float32 if case.split_k > 1 else dtype
    grad_weight, grad_bias = meta(case.split_k, weight_rows, k, dt=partial), meta(case.split_k, weight_rows, dt=partial)
    tensors = (out, pre_act, x, stats, stats, norm_param, norm_param, grad_weight, grad_bias, rows, n, k, *x.stride())
    return tuple(map(_as_arg, tensors)), dict(norm_flags, HAS_BIAS=True, SPLIT_K=case.split_k)


def _norm_launches(dtype_name: str, dtype, tables) -> list[Launch]:
    """The statistics kernel and the norm's backward at C = 768, LayerNorm (with bias) and RMSNorm."""
    import torch

    x = torch.empty(197, 768, dtype=dtype, device="meta")
    stats = torch.empty(197, dtype=torch.float32, device="meta")
    weight = torch.empty(768, dtype=dtype, device="meta")
    partial = torch.empty(13, 768, dtype=torch.float32, device="meta")
    blocks = dict(BLOCK_M=tables.STATS_BLOCK_M, BLOCK_K=tables.STATS_BLOCK_K)
    launches = []
    for norm, name in ((1, "LN"), (2, "RMSNorm")):
        stats_args = tuple(map(_as_arg, (x, stats, stats, 197, 768, 768, 1, 1e-6)))
        bwd_args = tuple(
            map(_as_arg, (x, x, stats, stats, weight, x, partial, partial, 197, 768, 768, 1, 197, 197 * 768, 768, 1))
        )
        for kernel, function, args, flags in (
            ("linear.stats", "norm_stats_kernel", stats_args, dict(NORM=norm)),
            ("linear.norm_bwd", "norm_bwd_kernel", bwd_args, dict(NORM=norm, HAS_NORM_BIAS=norm == 1)),
        ):
            launches.append(
                Launch(kernel, f"C=768 {name}", dtype_name, str(tuple(blocks.values())), True, "linear", function,
                       args, tuple(sorted({**blocks, **flags}.items())))
            )  # fmt: skip
    return launches


def linear_launches(arch: int, full: bool) -> list[Launch]:
    """Fused-GEMM launches on ``arch``: every config of the launcher's table for the dtype (the autotuner's set; the
    SwiGLU table for SwiGLU) at each of :data:`LINEAR_CASES`, and the norm kernels."""
    import torch
    from fastvit.kernels import linear as tables

    functions = {"fwd": "linear_fwd_kernel", "input": "linear_bwd_input_kernel", "weight": "linear_bwd_weight_kernel"}
    if arch == 90:  # the persistent TMA forward (hopper_path) runs on Hopper only
        functions["fwd_tma"] = "linear_fwd_tma_kernel"
    dtypes = ("bf16", "fp16", "fp32") if full else CI_DTYPES
    launches = []
    for dtype_name in dtypes:
        dtype = getattr(torch, _TORCH_DTYPES[dtype_name])
        precision = "ieee" if dtype == torch.float32 else "tf32"  # the launcher's default (no allow_tf32)
        launches += _norm_launches(dtype_name, dtype, tables)
        for kind, function in functions.items():
            for case in LINEAR_CASES:
                if kind.removesuffix("_tma") not in case.kinds:
                    continue
                configs = tables.CONFIGS_SWIGLU if case.activation == 4 else tables.CONFIGS
                table = configs[kind]["fp32" if dtype == torch.float32 else arch]
                args, flags = _linear_args(kind.removesuffix("_tma"), dtype, case)  # the TMA forward: fwd's arguments
                for block_m, block_n, block_k, group_m, warps, stages in table:
                    kwargs = {**flags, "INPUT_PRECISION": precision, "BLOCK_M": block_m, "BLOCK_N": block_n}
                    kwargs.update(BLOCK_K=block_k, GROUP_M=group_m, num_warps=warps, num_stages=stages)
                    launches.append(
                        Launch(
                            kernel=f"linear.{kind}",
                            case=case.label,
                            dtype=dtype_name,
                            config=str((block_m, block_n, block_k, group_m, warps, stages)),
                            picked=True,
                            module="linear",
                            function=function,
                            args=args,
                            kwargs=tuple(sorted(kwargs.items())),
                        )
                    )
    return launches


# ------------------------------------------------------------------------------------------------
# Patch-embedding launches: recorded from the launchers in fastvit/ops/triton/patch_embed.py


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the launch instead of running."""

    def __init__(self, function: str, sink: list):
        self.function, self.sink = function, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.function, args, kwargs))


# (name, embed dim, patch, image size): the presets whose shapes the patch-embedding check covers.
_PATCH_MODELS_CI = (("ViT-B/16", 768, 16, 224),)
_PATCH_MODELS_FULL = (
    ("ViT-S/16", 384, 16, 224),
    ("ViT-B/16", 768, 16, 224),
    ("ViT-B/32", 768, 32, 224),
    ("ViT-L/16", 1024, 16, 224),
    ("ViT-H/14", 1280, 14, 224),
)
# The normed forward (``patch_embed_norm_fwd_kernel``): AIMv2-L/14 (RMSNorm; --all: LayerNorm too), no prefix token.
_PATCH_NORM_MODELS = (("AIMv2-L/14", 1024, 14, 224),)


def patch_embed_launches(arch: int, num_sms: int, full: bool) -> list[Launch]:
    """The launches ``fastvit.ops.triton.patch_embed`` makes on a GPU of ``num_sms`` SMs, for ViT shapes.

    The launchers run on meta tensors with their kernels replaced by recorders and ``launch.on_gpu`` forced true, so
    the tiles, warps, stages and arguments are the launchers' own choice.
    """
    import importlib

    import torch

    launchers = importlib.import_module("fastvit.ops.triton.patch_embed")
    launch_helpers = importlib.import_module("fastvit.ops.triton.launch")

    sink: list = []
    names = ("patch_embed_fwd_kernel", "patch_embed_bwd_input_kernel", "patch_embed_bwd_weight_kernel")
    recorders = dataclasses.make_dataclass("Kernels", [])()
    for name in (*names, "patch_embed_bwd_colsum_kernel", "patch_embed_norm_fwd_kernel"):
        setattr(recorders, name, _Recorder(name, sink))
    models = _PATCH_MODELS_FULL if full else _PATCH_MODELS_CI
    dtypes = ("bf16", "fp16", "fp32") if full else CI_DTYPES
    batches = (1, 8, 64, 256) if full else (1, 64)
    launches = []
    patches = (
        mock.patch.object(launchers, "_kernels", lambda: recorders),
        mock.patch.object(launch_helpers, "on_gpu", lambda tensor: True),
        mock.patch.object(launch_helpers, "num_sms", lambda index: num_sms),
    )
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        for model, dim, patch, size in models:
            for dtype_name in dtypes:
                dtype = getattr(torch, _TORCH_DTYPES[dtype_name])
                weight = torch.empty(dim, 3, patch, patch, dtype=dtype, device="meta")
                bias = torch.empty(dim, dtype=dtype, device="meta")
                tokens = (size // patch) ** 2 + 1
                pos, cls = (torch.empty(1, n, dim, dtype=dtype, device="meta") for n in (tokens, 1))
                for batch in batches:
                    grad = torch.empty(batch, tokens, dim, dtype=dtype, device="meta")
                    nchw = torch.empty(batch, 3, size, size, dtype=dtype, device="meta")
                    # uint8 images as decoders give them ([B, H, W, C] -> a channels_last view); --all: also NCHW
                    # and the weight gradient (patch_embed_uint8 in training).
                    images = torch.empty(batch, size, size, 3, dtype=torch.uint8, device="meta").permute(0, 3, 1, 2)
                    scale, shift = [1 / (255 * 0.226)] * 3, [-0.45 / 0.226] * 3
                    calls = []
                    for layout, x in (("NCHW", nchw), ("channels_last", nchw.to(memory_format=torch.channels_last))):
                        calls += [
                            (layout, launchers._forward, (x, weight, bias, pos, cls, None, None)),
                            (layout, launchers._backward_input, (grad, x, weight)),
                            (layout, launchers._backward_weight, (grad, x, weight, None, None)),
                            (layout, launchers._backward_colsum, (grad,)),
                        ]
                    for layout, x in (("uint8 NHWC", images), ("uint8 NCHW", images.contiguous()))[: 2 if full else 1]:
                        calls.append((layout, launchers._forward, (x, weight, bias, pos, cls, scale, shift)))
                        if full:
                            calls.append((layout, launchers._backward_weight, (grad, x, weight, scale, shift)))
                    for layout, launcher, args in calls:
                        launcher(*args)  # records its launches in `sink`
                        launches += _drain(sink, f"{model} B={batch} {layout}", dtype_name)
        launches += _patch_embed_norm_launches(launchers, sink, dtypes, batches, full)
    return launches


def _patch_embed_norm_launches(launchers, sink: list, dtypes, batches, full: bool) -> list[Launch]:
    """The normed forward's launches at :data:`_PATCH_NORM_MODELS`' shapes, training (z and statistics saved) and
    inference (z kept in the output rows), NCHW and channels_last images."""
    import importlib

    import torch

    codes = importlib.import_module("fastvit.ops.triton.linear_launch").NORM_CODES
    launches = []
    for model, dim, patch, size in _PATCH_NORM_MODELS:
        for dtype_name in dtypes:
            dtype = getattr(torch, _TORCH_DTYPES[dtype_name])
            weight = torch.empty(dim, 3, patch, patch, dtype=dtype, device="meta")
            bias, norm_weight, norm_bias = (torch.empty(dim, dtype=dtype, device="meta") for _ in range(3))
            pos = torch.empty(1, (size // patch) ** 2, dim, dtype=dtype, device="meta")
            for batch in batches:
                nchw = torch.empty(batch, 3, size, size, dtype=dtype, device="meta")
                for layout, x in (("NCHW", nchw), ("channels_last", nchw.to(memory_format=torch.channels_last))):
                    for kind in ("rms", "layer") if full else ("rms",):
                        for save in (True, False):
                            launchers._forward_norm(
                                x, weight, bias, pos, None, None, None, norm_weight,
                                norm_bias if kind == "layer" else None, 1e-5, codes[kind], save,
                            )  # fmt: skip
                            case = f"{model} B={batch} {layout} {kind} {'training' if save else 'inference'}"
                            launches += _drain(sink, case, dtype_name)
    return launches


def _drain(sink: list, case: str, dtype: str) -> list[Launch]:
    """The recorded launches as ``Launch`` rows (and an empty sink)."""
    launches = []
    for function, args, kwargs in sink:
        options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}
        tiles = {k: v for k, v in kwargs.items() if k.startswith("BLOCK_")}
        config = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in tiles.items())
        config += "".join(f" {'w' if k == 'num_warps' else 's'}{v}" for k, v in options.items())
        kind = function.removeprefix("patch_embed_").removesuffix("_kernel")
        launches.append(
            Launch(
                kernel=f"patch_embed.{kind}",
                case=case,
                dtype=dtype,
                config=config,
                picked=True,
                module="patch_embed",
                function=function,
                args=tuple(map(_as_arg, args)),
                kwargs=tuple(sorted(kwargs.items())),
            )
        )
    sink.clear()
    return launches


# ------------------------------------------------------------------------------------------------
# Compiling (worker processes: Triton's JIT must not be in interpreter mode there)


def _worker_environment(cache_dir: str) -> dict[str, str]:
    return {
        "TRITON_INTERPRET": "0",  # compiled-mode JIT functions (the tests' parent process runs the interpreter)
        "TRITON_CACHE_DIR": cache_dir,  # a fresh cache: every kernel really goes through ptxas
        "TRITON_DUMP_PTXAS_LOG": "1",  # Triton prints ptxas -v's report on stdout
    }


def _init_worker(cache_dir: str) -> None:
    # Also set in the environment the workers are spawned with (see compile_rows); here again for a pool whose
    # processes were started otherwise.
    os.environ.update(_worker_environment(cache_dir))


def unsupported_reason() -> str | None:
    """Why this process cannot compile kernels ahead of time (None when it can): no Triton, no bundled ptxas, or a
    Triton whose JIT lacks the launch-path helpers ``compile_launch`` reuses (present in Triton 3.6 and 3.8)."""
    try:
        import triton
        from triton.runtime import jit
    except ImportError as exc:
        return f"Triton is not importable ({exc})"
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "ptxas")):
        return f"this Triton {triton.__version__} install has no bundled ptxas ({bin_dir})"
    if not hasattr(jit, "create_function_from_signature") or not hasattr(jit.JITFunction, "_pack_args"):
        return f"Triton {triton.__version__} has no JIT binder / _pack_args (used to specialise like a launch)"
    return None


def compile_launch(launch: Launch, arch: int) -> Usage:
    """Compile ``launch`` for compute capability ``arch`` (no GPU needed) and read its resource use."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(importlib.import_module(f"fastvit.kernels.{launch.module}"), launch.function)
    if not hasattr(fn, "params"):
        raise RuntimeError(f"{launch.function} is not a compiled-mode JIT function (TRITON_INTERPRET=1 at import?)")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    # The launch path of JITFunction.run, up to the compile: bind, specialise, pack.
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    usage = parse_ptxas_log(log.getvalue())
    if usage is None:  # no log (e.g. a Triton that does not print it): the counts recorded in the cubin
        usage = _cubin_usage(kernel.asm["cubin"])
    return dataclasses.replace(usage, shared_bytes=kernel.metadata.shared)


_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> Usage | None:
    """Registers, stack and spills of the (single) entry function in a ``ptxas -v`` report; None without one."""
    stack, registers = _STACK.search(log), _REGISTERS.search(log)
    if stack is None or registers is None:
        return None
    notes = [  # ptxas warnings and performance notes such as "(C7515) Potential Performance Loss: ..."
        re.sub(r"^ptxas\s+\w+\s*:\s*", "", line.strip())
        for line in log.splitlines()
        if "warning" in line.lower() or "Performance Loss" in line
    ]
    stack_bytes, stores, loads = (int(g) for g in stack.groups())
    return Usage(int(registers.group(1)), stack_bytes, stores, loads, 0, tuple(dict.fromkeys(notes)))


def _cubin_usage(cubin: bytes) -> Usage:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        kernels = parse_cuobjdump(_run_cuobjdump(handle.name))
    (_arch, _name, usage), *_ = kernels
    return usage


# ------------------------------------------------------------------------------------------------
# CUDA kernels of the extension: cuobjdump on the built fastvit._C


def find_cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, else the one Triton bundles; None when neither exists."""
    candidates = [shutil.which("cuobjdump")]
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            candidates.append(os.path.join(root, "bin", "cuobjdump"))
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _run_cuobjdump(path: str) -> str:
    tool = find_cuobjdump()
    if tool is None:
        raise RuntimeError("no cuobjdump (CUDA toolkit or Triton's bundled one) to read the compiled kernels")
    return subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout


_CUOBJDUMP_ARCH = re.compile(r"^arch = (sm_\w+)")
_CUOBJDUMP_FUNCTION = re.compile(r"^\s*Function ([^:\s]+):")
_CUOBJDUMP_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def parse_cuobjdump(text: str) -> list[tuple[str, str, Usage]]:
    """(arch, mangled function name, usage) for every kernel in ``cuobjdump --dump-resource-usage`` output.

    cuobjdump reports the stack frame and local memory, not ptxas's spill counts: a spill needs a stack frame,
    so ``spill_stores`` is reported as the larger of the two (0 means no spill).
    """
    kernels, arch, function = [], None, None
    for line in text.splitlines():
        if match := _CUOBJDUMP_ARCH.match(line.strip()):
            arch = match.group(1)
        elif match := _CUOBJDUMP_FUNCTION.match(line):
            function = match.group(1)
        elif function is not None and (match := _CUOBJDUMP_USAGE.search(line)):
            registers, stack, shared, local = (int(g) for g in match.groups())
            kernels.append((arch, function, Usage(registers, stack, max(stack, local), 0, shared)))
            function = None
    return kernels


def _demangle(names: Sequence[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return list(names)
    result = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    demangled = result.stdout.splitlines()
    return demangled if result.returncode == 0 and len(demangled) == len(names) else list(names)


def _short_kernel_name(demangled: str) -> str:
    """``void fastvit::(anonymous namespace)::layer_norm_fwd_kernel<c10::BFloat16, float, 8>(...)`` ->
    ``layer_norm_fwd_kernel<bf16, float, 8>``."""
    name = demangled.removeprefix("void ").replace("(anonymous namespace)::", "")
    depth = 0
    for i, char in enumerate(name):  # cut the parameter list: the first '(' outside the template arguments
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == "(" and depth == 0:
            name = name[:i]
            break
    for long, short in (("fastvit::", ""), ("c10::BFloat16", "bf16"), ("c10::Half", "fp16")):
        name = name.replace(long, short)
    return name


@dataclasses.dataclass(frozen=True)
class CudaRow:
    arch: str
    kernel: str
    usage: Usage

    @property
    def problems(self) -> list[str]:
        found = []
        if self.usage.stack_bytes or self.usage.spill_stores:
            found.append(f"stack frame {self.usage.stack_bytes} B / local {self.usage.spill_stores} B (spills)")
        if self.usage.registers > MAX_CUDA_REGISTERS and "<double" not in self.kernel:
            found.append(f"{self.usage.registers} registers > {MAX_CUDA_REGISTERS}")
        return found


def extension_library() -> str | None:
    """Path of the built ``fastvit._C`` (None when it is not built)."""
    import importlib.util

    spec = importlib.util.find_spec("fastvit._C")
    return None if spec is None else spec.origin


def cuda_kernel_rows(library: str, archs: Iterable[str]) -> list[CudaRow]:
    """Resource use of every CUDA kernel in ``library`` for the given archs ("sm_90a", "sm_80")."""
    kernels = parse_cuobjdump(_run_cuobjdump(library))
    names = _demangle([name for _, name, _ in kernels])
    wanted = {arch.removesuffix("a") for arch in archs}
    rows = [
        CudaRow(arch, _short_kernel_name(name), usage)
        for (arch, _, usage), name in zip(kernels, names)
        if arch.removesuffix("a") in wanted
    ]
    return sorted(rows, key=lambda r: (r.arch, r.kernel))


# ------------------------------------------------------------------------------------------------
# The check


def triton_launches(arch_name: str, full: bool) -> list[Launch]:
    arch, num_sms = ARCHS[arch_name]
    prologue = attention_prologue_launches(arch, full) if full or arch_name in PROLOGUE_ARCHS else []
    return (
        attention_launches(arch, full) + prologue + patch_embed_launches(arch, num_sms, full)
        + linear_launches(arch, full)
    )  # fmt: skip


def compile_rows(
    launches_by_arch: dict[str, list[Launch]], jobs: int | None = None, progress: Callable[[str], None] | None = None
) -> list[Row]:
    """Compile every distinct launch for its arch in ``jobs`` worker processes (default: one per CPU)."""
    unique: dict[tuple, tuple[str, Launch]] = {}
    for arch_name, launches in launches_by_arch.items():
        for launch in launches:
            key = (arch_name, launch.compile_key())
            if key in unique:  # the same compiled kernel serves several cases: one row naming them all
                first = unique[key][1]
                cases = list(dict.fromkeys([*first.case.split(", "), launch.case]))
                launch = dataclasses.replace(first, case=", ".join(cases), picked=first.picked or launch.picked)
            unique[key] = (arch_name, launch)
    rows: dict[tuple, Row] = {}
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(unique) or 1))
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fastvit-resources-") as cache_dir:
        context = multiprocessing.get_context("spawn")
        # Spawned workers inherit this environment from their first instruction: Triton must never be imported there
        # with TRITON_INTERPRET=1 (the test suite's setting), which would leave triton.language's helpers in
        # interpreter form and break compiled-mode kernels (an AssertionError in Triton's gluon import, 3.8).
        environment = mock.patch.dict(os.environ, _worker_environment(cache_dir))
        with environment, concurrent.futures.ProcessPoolExecutor(jobs, context, _init_worker, (cache_dir,)) as pool:
            futures = {
                pool.submit(compile_launch, launch, ARCHS[arch_name][0]): key
                for key, (arch_name, launch) in unique.items()
            }
            for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
                key = futures[future]
                arch_name, launch = unique[key]
                try:
                    rows[key] = Row(launch, arch_name, future.result())
                except concurrent.futures.process.BrokenProcessPool:
                    raise  # a worker died (out of memory, or a script without a __main__ guard under spawn)
                except Exception as exc:  # a compile failure is a result (reported and failed), not a crash
                    rows[key] = Row(
                        launch, arch_name, None, f"{type(exc).__name__}: {next(iter(str(exc).splitlines()), '')}"
                    )
                if progress:
                    elapsed = time.monotonic() - start
                    progress(f"[{done}/{len(unique)} {elapsed:.0f}s] {arch_name} {launch.kernel} {launch.config}")
    ordered = [rows[key] for key in unique]
    return sorted(ordered, key=lambda r: (r.arch, r.launch.kernel, r.launch.dtype, r.launch.case, not r.launch.picked))


def failures(rows: Sequence[Row], cuda_rows: Sequence[CudaRow] = ()) -> list[str]:
    """One line per launchable Triton config or CUDA kernel that spills or overflows shared memory."""
    lines = []
    for row in rows:
        lines += [f"{row.arch} {row.launch.kernel} {row.launch.case} {row.launch.dtype} {row.launch.config}: {p}"
                  for p in row.failing]  # fmt: skip
    for row in cuda_rows:
        lines += [f"{row.arch} {row.kernel}: {p}" for p in row.problems]
    return lines


# ------------------------------------------------------------------------------------------------
# Output


def _versions() -> str:
    import torch
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version

    try:
        ptxas = get_ptxas_version()
        ptxas = ptxas.decode() if isinstance(ptxas, bytes) else str(ptxas)
        ptxas = re.search(r"V(\d+\.\d+\.\d+)", ptxas).group(1) if "V" in ptxas else ptxas.strip()
    except Exception:  # the version is informative only
        ptxas = "unknown"
    return f"Triton {triton.__version__} (ptxas {ptxas}), torch {torch.__version__}, Python {platform.python_version()}"


def _verdict(problems: list[str], failing: list[str], picked: bool = True) -> str:
    if failing:
        return "FAIL: " + "; ".join(failing)
    if not picked:
        return "not launched: " + "; ".join(problems) if problems else "ok (not launched)"
    return "fp32, accepted: " + "; ".join(problems) if problems else "ok"


def _triton_table(rows: Sequence[Row]) -> list[list[str]]:
    table = [["kernel", "case", "dtype", "arch", "config", "regs", "spill B", "stack B", "smem B", "limit B", "verdict",
              "ptxas notes"]]  # fmt: skip
    for row in rows:
        usage = row.usage
        cells = [row.launch.kernel, row.launch.case, row.launch.dtype, row.arch, row.launch.config]
        if usage is None:
            cells += ["-"] * 5
        else:
            cells += [str(usage.registers), str(usage.spill_stores), str(usage.stack_bytes), str(usage.shared_bytes)]
            cells.append(str(row.shared_limit))
        verdict = _verdict(row.problems, row.failing, row.launch.picked)
        table.append([*cells, verdict, "; ".join(usage.notes) if usage else ""])
    return table


def _cuda_table(rows: Sequence[CudaRow]) -> list[list[str]]:
    table = [["kernel", "arch", "regs", "stack B", "local B", "static smem B", "verdict"]]
    for row in rows:
        usage = row.usage
        cells = [row.kernel, row.arch, str(usage.registers), str(usage.stack_bytes), str(usage.spill_stores)]
        table.append([*cells, str(usage.shared_bytes), _verdict(row.problems, row.problems)])
    return table


def _markdown(table: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")

    lines = ["| " + " | ".join(map(cell, table[0])) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in table[1:]]
    return "\n".join(lines)


def _plain(table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


def summary(rows: Sequence[Row], cuda_rows: Sequence[CudaRow]) -> list[str]:
    """Headline numbers per arch: launchable 16-bit configs (failures, worst registers / spill / shared memory), the
    fp32 accuracy path's spills, the table entries never launched, the CUDA kernels."""
    lines = []
    for arch in dict.fromkeys([r.arch for r in rows] + [r.arch for r in cuda_rows]):
        of_arch = [r for r in rows if r.arch == arch]
        checked = [r for r in of_arch if r.launch.picked and r.launch.dtype in SPILL_FREE_DTYPES]
        fp32 = [r for r in of_arch if r.launch.picked and r.launch.dtype not in SPILL_FREE_DTYPES]
        dropped = [r for r in of_arch if not r.launch.picked]
        compiled = [r for r in checked if r.usage is not None]
        if checked:
            line = (
                f"{arch}: {len(checked)} launchable {'/'.join(SPILL_FREE_DTYPES)} Triton configs, "
                f"{sum(bool(r.failing) for r in checked)} failing"
            )
            if compiled:
                worst = max(compiled, key=lambda r: r.usage.registers)
                line += (
                    f"; most registers {worst.usage.registers} ({worst.launch.kernel} {worst.launch.case} "
                    f"{worst.launch.config}); largest spill {max(r.usage.spill_stores for r in compiled)} B; largest "
                    f"shared memory {max(r.usage.shared_bytes for r in compiled)} B of {compiled[0].shared_limit} B"
                )
            lines.append(line)
        if fp32:
            spilling = [r for r in fp32 if r.spill]
            lines.append(
                f"{arch}: {len(fp32)} launchable fp32 Triton configs (the accuracy path: spills reported, not "
                f"failed), {sum(bool(r.failing) for r in fp32)} failing, {len(spilling)} spill"
                + (f" (largest {max(r.usage.spill_stores for r in spilling)} B)" if spilling else "")
            )
        if dropped:
            lines.append(
                f"{arch}: {len(dropped)} table entries never launched on this arch (dropped by `keep_config`, in "
                f"another BLOCK_D list, or the fallback, used only when no entry fits), listed for reference: "
                f"{sum(bool(r.problems) for r in dropped)} of them spill or overflow, none counts as failing"
            )
        cuda = [r for r in cuda_rows if r.arch.removesuffix("a") == arch.removesuffix("a")]
        if cuda:
            lines.append(
                f"{arch}: {len(cuda)} CUDA kernels, {sum(bool(r.problems) for r in cuda)} failing; most registers "
                f"{max(r.usage.registers for r in cuda)}; largest stack frame "
                f"{max(r.usage.stack_bytes for r in cuda)} B"
            )
    return lines


def render(rows: Sequence[Row], cuda_rows: Sequence[CudaRow], cuda_note: str | None, markdown: bool) -> str:
    fmt = _markdown if markdown else _plain
    parts = []
    if markdown:
        parts += [
            "# fastvit kernel resources (static, ahead-of-time compile)",
            "",
            f"Generated by `python -m fastvit.kernels.resources {' '.join(sys.argv[1:])}` with {_versions()}.",
            "Registers, stack frame and spill bytes are per thread (ptxas -v), shared memory per block (Triton's "
            "metadata) against the arch's per-block limit. A launchable bf16/fp16 config passes with no spill and "
            "shared memory within the limit (verdict *FAIL* otherwise); a launchable fp32 config (the accuracy path: "
            "full-precision dots on FMA units) must fit shared memory, its spills are reported (*fp32, accepted*); "
            "rows marked *not launched* are table entries the autotuner never gets on this arch (dropped by "
            "`keep_config`, in another BLOCK_D list, or the fallback, used only when no entry fits) and fail nothing.",
            "",
        ]
    parts += ["## Summary" if markdown else "Summary:", "", *[f"- {line}" for line in summary(rows, cuda_rows)], ""]
    if rows:
        parts += ["## Triton kernels" if markdown else "Triton kernels:", "", fmt(_triton_table(rows)), ""]
    parts += ["## CUDA kernels (fastvit._C)" if markdown else "CUDA kernels (fastvit._C):", ""]
    parts += [cuda_note, ""] if cuda_note else [fmt(_cuda_table(cuda_rows)), ""]
    return "\n".join(parts)


def cuda_rows_or_reason(archs: Sequence[str]) -> tuple[list[CudaRow], str | None]:
    """The extension's CUDA kernels, or why there are none to read."""
    library = extension_library()
    if library is None:
        return [], "fastvit._C is not built (FASTVIT_NO_EXT=1?): no CUDA kernels to read."
    if find_cuobjdump() is None:
        return [], "no cuobjdump (CUDA toolkit or Triton's bundled one): CUDA kernels not read."
    rows = cuda_kernel_rows(library, archs)
    if not rows:
        return [], f"{os.path.basename(library)} holds no CUDA kernels for {', '.join(archs)} (built without nvcc?)."
    return rows, None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvit.kernels.resources", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=list(ARCHS), help="targets to compile for")
    parser.add_argument("--all", action="store_true", help="every table entry, head dim, dtype and model shape")
    parser.add_argument("--out", type=Path, help="also write the table as markdown to this file")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default: one per CPU)")
    parser.add_argument(
        "--kernel", default="", help="only Triton kernels whose name starts with this (e.g. patch_embed)"
    )
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton kernels")
    parser.add_argument("--no-cuda", action="store_true", help="skip the extension's CUDA kernels")
    args = parser.parse_args(argv)

    rows: list[Row] = []
    if not args.no_triton and (reason := unsupported_reason()) is not None:
        parser.error(f"cannot compile the Triton kernels here: {reason} (use --no-triton)")
    if not args.no_triton:
        launches = {
            arch: [launch for launch in triton_launches(arch, args.all) if launch.kernel.startswith(args.kernel)]
            for arch in args.arch
        }
        rows = compile_rows(launches, args.jobs, progress=lambda line: print(line, file=sys.stderr, flush=True))
    cuda_rows, cuda_note = ([], "skipped (--no-cuda)") if args.no_cuda else cuda_rows_or_reason(args.arch)
    print(render(rows, cuda_rows, cuda_note, markdown=False))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(rows, cuda_rows, cuda_note, markdown=True))
        print(f"wrote {args.out}", file=sys.stderr)
    problems = failures(rows, cuda_rows)
    for line in problems:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
