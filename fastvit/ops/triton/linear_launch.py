"""Host side of the fused-GEMM Triton kernels (``fastvit/kernels/linear.py``) behind ``ln_linear`` and ``ln_mlp``:
tile configurations and autotuning (per arch, the SwiGLU epilogue's own table, deterministic mode's fixed first
entry, the configs ``fastvit selftest`` forces), the row-statistics launch, the forward GEMM (and, inside
:func:`hopper_path`, its persistent TMA variant for Hopper where :func:`tma_forward_reason` allows it), split-K of
the weight gradient and the backward GEMMs with the norm's backward. The backend's coverage, custom ops and autograd are
``fastvit/ops/triton/linear.py`` (whose docstring gives the design: what is saved, what is recomputed, why).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import torch

from fastvit import dispatch
from fastvit.ops.triton import launch

ACTIVATION_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3, "swiglu": 4}  # kernels' ACT_* constants
NORM_CODES = {"none": 0, "layer": 1, "rms": 2}  # kernels/linear.py's NORM_* constants


def candidate_configs(kind: str, arch: int, elem_bytes: int, swiglu: bool = False) -> list[tuple[int, ...]]:
    """The (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) configs autotuning may pick for one kernel kind
    ('fwd' | 'input' | 'weight') on GPU generation ``arch`` (80 or 90) for operands of ``elem_bytes``; ``swiglu``:
    the SwiGLU epilogue's own table (two accumulators: smaller tiles)."""
    kernels = launch.kernels("linear")
    table = (kernels.CONFIGS_SWIGLU if swiglu else kernels.CONFIGS)[kind]
    return list(table["fp32"] if elem_bytes == 4 else table[arch])


def _triton_config(entry):
    import triton

    block_m, block_n, block_k, group_m, warps, stages = entry
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


_KERNELS = {
    "fwd": "linear_fwd_kernel",
    "input": "linear_bwd_input_kernel",
    "weight": "linear_bwd_weight_kernel",
    "fwd_tma": "linear_fwd_tma_kernel",  # the Hopper forward (hopper_path): sm_90 and fp32/interpreter tables only
}
KINDS = ("fwd", "input", "weight")  # the kinds every GPU generation runs (and has a table for)
TMA_KINDS = ("fwd_tma",)
_FORCED_CONFIGS: dict[str, tuple[int, ...]] = {}  # kernel kind -> config every launch must use


@contextlib.contextmanager
def forced_configs(configs: dict[str, tuple[int, ...]]):
    """Within the block, launch each kernel kind named in ``configs`` ('fwd' | 'input' | 'weight' | 'fwd_tma') with
    the given (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) instead of the autotuner's, deterministic or
    interpreter's.

    How ``fastvit selftest`` runs every config of :func:`candidate_configs` on a GPU, and how the tests run small
    tiles (several K steps, several programs) on small shapes. Not thread-safe (process-wide).
    """
    fields = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "warps", "stages")
    with launch.forced_configs(_FORCED_CONFIGS, _KERNELS, configs, fields):
        for kind, entry in configs.items():
            if any(block < 16 or block & (block - 1) for block in entry[:3]):
                raise ValueError(f"configs[{kind!r}]: block sizes must be powers of two >= 16 (tl.dot), got {entry!r}")
        yield


@functools.cache
def _autotuned(kind: str, arch: int, elem_bytes: int, rows_bucket: int, swiglu: bool):
    """The autotuned kernel of ``kind`` for one GPU generation, operand width and bucket of M (next power of two):
    the best tiles depend on how many output tiles fill the GPU, so a config tuned at batch 1 is not reused at 256."""
    import triton

    kernel = getattr(launch.kernels("linear"), _KERNELS[kind])
    configs = [_triton_config(e) for e in candidate_configs(kind, arch, elem_bytes, swiglu)]
    # Tensor dtypes join the key automatically (Triton appends every tensor argument's dtype).
    key = ["N", "K", "ACTIVATION", "INPUT_PRECISION"] + (["SPLIT_K"] if kind == "weight" else [])
    return triton.autotune(configs=configs, key=key)(kernel)


def _launch(kind: str, like: torch.Tensor, rows: int, num_programs, args: tuple, constants: dict, splits: int = 1):
    """Run kernel ``kind`` on a grid of ``num_programs(BLOCK_M, BLOCK_N, BLOCK_K)`` x ``splits`` programs: a config
    forced by :func:`forced_configs`, else the interpreter's fixed config, else the first table config in
    deterministic mode (no timing: every process picks the same tiles), else autotuned per bucket of ``rows``."""
    kernels = launch.kernels("linear")
    grid = lambda meta: (num_programs(meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]), splits)
    swiglu = constants["ACTIVATION"] == ACTIVATION_CODES["swiglu"]
    if kind in _FORCED_CONFIGS:
        entry = _FORCED_CONFIGS[kind]
    elif not launch.on_gpu(like):
        entry = kernels.INTERPRETER_CONFIG
    elif dispatch.deterministic_enabled():
        entry = candidate_configs(kind, launch.gpu_arch(like), like.element_size(), swiglu)[0]
    else:
        bucket = launch.next_pow2(rows, 1, 1 << 40)
        _autotuned(kind, launch.gpu_arch(like), like.element_size(), bucket, swiglu)[grid](*args, **constants)
        return
    config = _triton_config(entry)
    meta = config.kwargs
    getattr(kernels, _KERNELS[kind])[grid(meta)](
        *args, **constants, **meta, num_warps=config.num_warps, num_stages=config.num_stages
    )


# ------------------------------------------------------------------------------------------------
# The Hopper forward (linear_fwd_tma_kernel): persistent, A / W tiles through TMA descriptors. Off by default.


@dataclasses.dataclass
class HopperPath:
    """What the forward GEMMs launched inside one :func:`hopper_path` block did: ``launches`` ran the TMA kernel,
    ``fallbacks`` holds, for each of the others, why it ran the pointer kernel (:func:`tma_forward_reason`)."""

    launches: int = 0
    fallbacks: list[str] = dataclasses.field(default_factory=list)


_HOPPER_PATHS: list[HopperPath] = []  # the open hopper_path blocks, innermost last


@contextlib.contextmanager
def hopper_path():
    """Within the block, the forward GEMMs of ``ln_linear`` / ``ln_mlp`` (``triton`` backend) run the persistent TMA
    kernel (``linear_fwd_tma_kernel``) where :func:`tma_forward_reason` allows it, else the pointer kernel as before,
    the reason recorded in the yielded :class:`HopperPath`. Off by default: not yet measured on a GPU. The backward
    GEMMs are unchanged. Not thread-safe (process-wide)."""
    record = HopperPath()
    _HOPPER_PATHS.append(record)
    try:
        yield record
    finally:
        _HOPPER_PATHS.remove(record)


@functools.cache
def _tma_unavailable_in_triton() -> str | None:
    """Why the installed Triton cannot build device-side tensor descriptors (None: it can), by feature detection."""
    import triton
    import triton.language as tl

    if not hasattr(tl, "make_tensor_descriptor") or not hasattr(triton, "set_allocator"):
        return f"Triton {triton.__version__} has no tl.make_tensor_descriptor / triton.set_allocator (needs >= 3.4)"
    return None


_TMA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def tma_forward_reason(x: torch.Tensor, gate: torch.Tensor, value: torch.Tensor | None = None) -> str | None:
    """Why the TMA forward cannot run the GEMM of x [M, K] and the weight rows ``gate`` [N, K] (``value`` [N, K]:
    SwiGLU's value rows) as given (None: it can): a GPU other than sm_90 (9.x; the interpreter is allowed), a Triton
    without device-side descriptors, a dtype other than fp16 / bf16 / fp32, or an operand TMA cannot describe (last
    stride not 1, row stride 0, row stride or base address not a multiple of 16 bytes)."""
    if launch.on_gpu(x) and launch.gpu_arch(x) // 10 != 9:
        return f"the TMA forward is for sm_90 (Hopper); this GPU is sm_{launch.gpu_arch(x)}"
    reason = _tma_unavailable_in_triton()
    if reason is not None:
        return reason
    if x.dtype not in _TMA_DTYPES:
        return f"dtype {str(x.dtype).removeprefix('torch.')}: the TMA forward takes float16, bfloat16, float32"
    for name, t in (("x", x), ("weight", gate), ("value weight", value)):
        if t is None:
            continue
        if t.stride(1) != 1:
            return f"{name} {tuple(t.shape)} has last stride {t.stride(1)}: TMA needs unit-stride rows"
        if t.stride(0) == 0 and t.shape[0] > 1:
            return f"{name}'s rows are one row repeated (row stride 0): not a TMA layout"
        if t.stride(0) * t.element_size() % 16:
            return f"{name}'s row stride ({t.stride(0) * t.element_size()} bytes) is not a multiple of 16 bytes"
        if t.data_ptr() % 16:
            return f"{name}'s base address is not 16-byte aligned (offset {t.data_ptr() % 16} bytes)"
    return None


def _tma_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global scratch for the kernels' device-side tensor descriptors (``triton.set_allocator``), on the current
    device (the launcher's device guard)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _allocator_is_set(allocation) -> bool:
    """Whether Triton's allocator module ``allocation`` (``triton.runtime._allocation``) holds an allocator other than
    its ``NullAllocator``: in a ContextVar (Triton >= 3.5: per thread) or as a plain module global (Triton 3.4)."""
    current = getattr(allocation, "_allocator", None)
    null = getattr(allocation, "NullAllocator", None)
    if current is None or null is None:
        return False
    value = current.get() if isinstance(current, contextvars.ContextVar) else current
    return not isinstance(value, null)


def _ensure_tma_allocator() -> None:
    """Install :func:`_tma_scratch` as Triton's allocator unless one is set (ours, or the user's): once, the first
    time the TMA path runs. It stays installed (Triton has no way to scope it to a launch), so later Triton kernels
    that ask for global scratch get torch-allocated memory on the current device from it too."""
    import triton
    from triton.runtime import _allocation

    if not _allocator_is_set(_allocation):
        triton.set_allocator(_tma_scratch)


def _forward_kind(x: torch.Tensor, gate: torch.Tensor, value: torch.Tensor | None, tiles):
    """('fwd', grid size of the tiles) or, inside :func:`hopper_path` where :func:`tma_forward_reason` allows it,
    ('fwd_tma', the persistent grid: min(programs, tiles)); a fallback's reason is recorded."""
    if not _HOPPER_PATHS:
        return "fwd", tiles
    record = _HOPPER_PATHS[-1]
    reason = tma_forward_reason(x, gate, value)
    if reason is not None:
        record.fallbacks.append(reason)
        return "fwd", tiles
    record.launches += 1
    if launch.on_gpu(x):
        _ensure_tma_allocator()
        programs = launch.num_sms(x.device.index)
    else:
        programs = launch.kernels("linear").INTERPRETER_PERSISTENT_PROGRAMS
    return "fwd_tma", lambda bm, bn, bk: min(programs, tiles(bm, bn, bk))


# ------------------------------------------------------------------------------------------------
# Row statistics, the forward and backward GEMMs


def _stats_launch_meta(kernels) -> dict:
    return dict(BLOCK_M=kernels.STATS_BLOCK_M, BLOCK_K=kernels.STATS_BLOCK_K)


def _row_stats(x: torch.Tensor, eps: float, norm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (mean, rstd) of the rows of x [M, K] for the prologue ``norm`` (NORM_CODES): mean [M] for LayerNorm
    ([0] for RMSNorm, which has none), rstd [M]."""
    kernels = launch.kernels("linear")
    rows, width = x.shape
    mean = launch.new_output((rows if norm == NORM_CODES["layer"] else 0,), torch.float32, x.device)
    rstd = launch.new_output((rows,), torch.float32, x.device)
    if rows:
        grid = (launch.cdiv(rows, kernels.STATS_BLOCK_M),)
        mean_arg = mean if mean.numel() else rstd  # never written for RMSNorm
        kernels.norm_stats_kernel[grid](
            x, mean_arg, rstd, rows, width, *x.stride(), eps, NORM=norm, **_stats_launch_meta(kernels)
        )
    return mean, rstd


def _weight_halves(weight: torch.Tensor, weight_value: torch.Tensor | None, activation: int):
    """(gate-or-only rows [N, K], value rows [N, K]) of the GEMM's weight: SwiGLU's packed [2N, K] is cut into its
    halves (views, no copy), a separate ``weight_value`` is timm's split layout; both halves must share strides
    (the kernels take one pair), else both are made contiguous. Without SwiGLU the value half is the weight itself
    (never read)."""
    if activation != ACTIVATION_CODES["swiglu"]:
        return weight, weight
    if weight_value is None:
        gate, value = weight.chunk(2, dim=0)
    else:
        gate, value = weight, weight_value
    if gate.stride() != value.stride():
        gate, value = gate.contiguous(), value.contiguous()
    return gate, value


def _partial_activation(act_columns: int, out_features: int) -> dict:
    """The kernels' arguments when the activation covers only the first ``act_columns`` output columns ({} when it
    covers them all, ``act_columns`` -1 or N: the launch compiles as without the switch)."""
    if 0 <= act_columns < out_features:
        return dict(act_cols=act_columns, PARTIAL_ACT=True)
    return {}


def _forward(x, norm_weight, norm_bias, weight, bias, residual, eps, activation, save_pre_act, norm, weight_value,
             act_columns=-1):  # fmt: skip
    """out [M, N] = act(Norm(x) Wᵀ + b) + residual, and (mean, rstd, pre_act) for the backward (empty when unused).

    SwiGLU: ``weight`` [2N, K] packed (gate rows first) or the gate rows [N, K] with ``weight_value`` [N, K];
    ``bias`` [2N] (gate then value); pre_act [M, 2N] (gate then value). ``act_columns``: the activation applies to
    the output columns below it only (-1: all)."""
    rows, in_features = x.shape
    gate, value = _weight_halves(weight, weight_value, activation)
    out_features = gate.shape[0]
    pre_width = 2 * out_features if activation == ACTIVATION_CODES["swiglu"] else out_features
    out = launch.new_output((rows, out_features), x.dtype, x.device)
    pre_act = launch.new_output((rows, pre_width) if save_pre_act else (0,), x.dtype, x.device)
    norm = norm if norm_weight is not None else NORM_CODES["none"]
    has_norm = norm != NORM_CODES["none"]
    norm_weight, norm_bias, bias = (None if t is None else t.contiguous() for t in (norm_weight, norm_bias, bias))
    with launch.device_guard(x):
        if has_norm:
            mean, rstd = _row_stats(x, eps, norm)
        else:  # two tensors: a custom op's outputs must not alias one another
            mean, rstd = (x.new_empty(0, dtype=torch.float32) for _ in range(2))
        if out.numel() == 0:
            return out, mean, rstd, pre_act
        absent = out  # any tensor: a pointer the kernel never reads (its constexpr flag is off)
        residual_strides = residual.stride() if residual is not None else (0, 0)
        args = (
            x, gate, value, absent if bias is None else bias, absent if residual is None else residual, out,
            pre_act if save_pre_act else absent, mean if mean.numel() else absent, rstd if has_norm else absent,
            norm_weight if has_norm else absent, absent if norm_bias is None else norm_bias,
            rows, out_features, in_features, *x.stride(), *gate.stride(), *value.stride(), *residual_strides,
        )  # fmt: skip
        constants = dict(
            NORM=norm, HAS_NORM_BIAS=has_norm and norm_bias is not None, HAS_BIAS=bias is not None,
            ACTIVATION=activation, HAS_RESIDUAL=residual is not None, SAVE_PRE_ACT=save_pre_act,
            INPUT_PRECISION=launch.input_precision(x.dtype), **_partial_activation(act_columns, out_features),
        )  # fmt: skip
        tiles = lambda bm, bn, bk: launch.cdiv(rows, bm) * launch.cdiv(out_features, bn)
        swiglu = activation == ACTIVATION_CODES["swiglu"]
        kind, num_programs = _forward_kind(x, gate, value if swiglu else None, tiles)
        _launch(kind, x, rows, num_programs, args, constants)
    return out, mean, rstd, pre_act


_FORCED_SPLIT_K: list[int] = []  # a split every weight-gradient launch must use (forced_split_k)


@contextlib.contextmanager
def forced_split_k(split_k: int):
    """Within the block, run the weight-gradient GEMM with ``split_k`` slices of its M reduction instead of
    :func:`weight_split_k`'s choice (the tests run several slices on small shapes). Not thread-safe."""
    if not isinstance(split_k, int) or isinstance(split_k, bool) or split_k < 1:
        raise ValueError(f"split_k must be a positive int, got {split_k!r}")
    _FORCED_SPLIT_K.append(split_k)
    try:
        yield
    finally:
        _FORCED_SPLIT_K.pop()


def weight_split_k(rows: int, out_rows: int, in_features: int, like: torch.Tensor, swiglu: bool = False) -> int:
    """How many slices of the M (token) reduction the weight gradient runs in: 1 unless its [out_rows, K] output
    tiles (counted with the arch's first 'weight' config) leave the GPU's SMs idle, then enough slices to fill
    them, at most ``SPLIT_K_MAX`` and each of at least ``SPLIT_K_MIN_ROWS`` rows. Deterministic in the shape and
    the GPU (no timing), so deterministic mode keeps it; the slices are fp32 partials summed in a fixed order."""
    if _FORCED_SPLIT_K:
        return _FORCED_SPLIT_K[-1]
    if not launch.on_gpu(like):
        return 1
    kernels = launch.kernels("linear")
    _, block_n, block_k, *_ = candidate_configs("weight", launch.gpu_arch(like), like.element_size(), swiglu)[0]
    tiles = launch.cdiv(out_rows, block_n) * launch.cdiv(in_features, block_k)
    sms = launch.num_sms(like.device.index)
    if tiles >= sms:
        return 1
    return max(1, min(kernels.SPLIT_K_MAX, sms // tiles, rows // kernels.SPLIT_K_MIN_ROWS))


def norm_backward(grad_normed, x, norm_weight, mean, rstd, norm, has_norm_bias):
    """(dx [M, K] in x's dtype, d weight [K], d bias [K] or empty) of a norm over the rows of x [M, K] (strided) with
    weight ``norm_weight`` [K], from dÂ (strided: [M, K], or [G, M / G, K] whose rows, group by group, are x's) and
    the forward's fp32 ``mean`` [M] (LayerNorm; [0] for RMSNorm) and ``rstd`` [M]; ``norm``: NORM_CODES. The
    prologue's norm here, the patch embedding's norm too (its dÂ: the patch rows of the tokens' gradient, in place)."""
    kernels = launch.kernels("linear")
    rows, width = x.shape
    norm_weight = norm_weight.contiguous()  # the kernel reads it at unit stride
    grouped = grad_normed if grad_normed.dim() == 3 else grad_normed.unsqueeze(0)
    if grouped.shape[0] * grouped.shape[1] != rows or grouped.shape[2] != width:
        raise ValueError(f"grad_normed must hold x's {rows} rows of {width}, got shape {tuple(grad_normed.shape)}")
    grad_x = launch.new_output((rows, width), x.dtype, x.device)
    blocks = launch.cdiv(rows, kernels.STATS_BLOCK_M)
    partial_weight = launch.new_output((blocks, width), torch.float32, x.device)
    partial_bias = launch.new_output((blocks, width) if has_norm_bias else (0,), torch.float32, x.device)
    kernels.norm_bwd_kernel[(blocks,)](
        grad_normed, x, mean if mean.numel() else rstd, rstd, norm_weight, grad_x, partial_weight,
        partial_bias if has_norm_bias else partial_weight, rows, width, *x.stride(), grouped.shape[1],
        *grouped.stride(), NORM=norm, HAS_NORM_BIAS=has_norm_bias, **_stats_launch_meta(kernels),
    )  # fmt: skip
    grad_bias = partial_bias.sum(0).to(norm_weight.dtype) if has_norm_bias else norm_weight.new_empty(0)
    return grad_x, partial_weight.sum(0).to(norm_weight.dtype), grad_bias


def _backward(grad_out, x, norm_weight, norm_bias, mean, rstd, weight, pre_act, activation, has_bias, norm,
              weight_value, act_columns=-1):  # fmt: skip
    """(dx [M, K] in x's dtype (through the norm's backward with a prologue); dW [R, K] with R = N, or 2N for
    SwiGLU (gate rows then value rows, whatever the weight layout); db [R], or empty without a bias; the norm's
    d weight and d bias [K], or empty). ``act_columns``: the forward's."""
    rows, in_features = x.shape
    gate, value = _weight_halves(weight, weight_value, activation)
    out_features = gate.shape[0]
    weight_rows = 2 * out_features if activation == ACTIVATION_CODES["swiglu"] else out_features
    grad_out = grad_out.contiguous()
    norm = norm if norm_weight is not None else NORM_CODES["none"]
    has_norm, has_norm_bias = norm != NORM_CODES["none"], norm_weight is not None and norm_bias is not None
    empty = weight.new_empty(0)
    grad_norm_weight = torch.zeros_like(norm_weight) if has_norm else empty
    grad_norm_bias = torch.zeros_like(norm_bias) if has_norm_bias else weight.new_empty(0)
    grad_bias = launch.new_output((weight_rows,) if has_bias else (0,), weight.dtype, weight.device)
    if rows == 0:  # sums over no rows
        grad_bias.zero_()
        grad_weight = weight.new_zeros((weight_rows, in_features))
        return x.new_empty(x.shape), grad_weight, grad_bias, grad_norm_weight, grad_norm_bias
    norm_weight, norm_bias = (None if t is None else t.contiguous() for t in (norm_weight, norm_bias))  # [K]
    grad_a = launch.new_output((rows, in_features), x.dtype, x.device)
    z = pre_act if activation != ACTIVATION_CODES["none"] else grad_out  # never read without an activation
    precision = launch.input_precision(x.dtype)
    with launch.device_guard(x):
        args = (grad_out, z, gate, value, grad_a, rows, out_features, in_features, *gate.stride(), *value.stride())
        num_programs = lambda bm, bn, bk: launch.cdiv(rows, bm) * launch.cdiv(in_features, bk)
        partial = _partial_activation(act_columns, out_features)
        constants = dict(ACTIVATION=activation, INPUT_PRECISION=precision, **partial)
        _launch("input", x, rows, num_programs, args, constants)

        split_k = weight_split_k(rows, weight_rows, in_features, x, activation == ACTIVATION_CODES["swiglu"])
        if split_k == 1:  # written in place, in the weight's dtype
            grad_weight = launch.new_output((weight_rows, in_features), weight.dtype, weight.device)
            bias_partials = grad_bias
        else:  # fp32 partials, one slice of rows each, summed below in slice order
            grad_weight = launch.new_output((split_k, weight_rows, in_features), torch.float32, weight.device)
            bias_partials = launch.new_output((split_k, weight_rows) if has_bias else (0,), torch.float32, x.device)
        absent = grad_a  # a pointer the kernel never reads
        stats = (mean if mean.numel() else absent, rstd if has_norm else absent)
        ln = (*stats, norm_weight if has_norm else absent, norm_bias if has_norm_bias else absent)
        args = (grad_out, z, x, *ln, grad_weight, bias_partials if has_bias else absent, rows, out_features,
                in_features, *x.stride())  # fmt: skip
        tiles = lambda bm, bn, bk: launch.cdiv(out_features, bn) * launch.cdiv(in_features, bk)
        constants = dict(NORM=norm, HAS_NORM_BIAS=has_norm_bias, HAS_BIAS=has_bias, ACTIVATION=activation,
                         SPLIT_K=split_k, INPUT_PRECISION=precision, **partial)  # fmt: skip
        _launch("weight", x, rows, tiles, args, constants, splits=split_k)
        if split_k > 1:
            grad_weight = grad_weight.sum(0).to(weight.dtype)
            if has_bias:
                grad_bias = bias_partials.sum(0).to(weight.dtype)
        grad_x = grad_a
        if has_norm:
            grad_x, grad_norm_weight, grad_norm_bias = norm_backward(
                grad_a, x, norm_weight, mean, rstd, norm, has_norm_bias
            )
    return grad_x, grad_weight, grad_bias, grad_norm_weight, grad_norm_bias
