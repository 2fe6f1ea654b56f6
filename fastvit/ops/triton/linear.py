"""The Triton backend of ``ln_linear`` and ``ln_mlp``: fused-GEMM launchers, custom ops and autograd.

The kernels are ``fastvit/kernels/linear.py`` (a tiled GEMM with a LayerNorm / RMSNorm prologue and bias /
activation / residual epilogues, its two backward GEMMs and the norm's backward); this file is the host side:
coverage, autocast, allocation, grids, configs, split-K and autotuning, then the ``torch.library`` custom ops
``fastvit::ln_linear_fwd/bwd`` with fake impls and autograd. Nothing here needs the compiled extension.

Forward: row statistics (``norm_stats_kernel``, fp32 mean and rstd, or rstd alone for RMSNorm) when there is a
norm, then one GEMM. Training saves x, the statistics and, with an activation, the pre-activation z = Norm(x) Wᵀ + b
([M, 2N] gate and value for SwiGLU). Stored, not recomputed: recomputing it would cost a second forward GEMM
(2·M·N·K FLOPs; 4·M·N·K for SwiGLU's two halves) against M·N (2·M·N) elements written once and read twice by the
two backward GEMMs; the ``cuda`` backend of ``ln_mlp`` saves it too. Neither Norm(x) nor act(z) is saved.
Backward: dÂ = dz W and dW = dzᵀ Norm(x), db = Σ dz with dz = dout·act'(z) (SwiGLU: d gate and d value side by
side, so dW is [2N, K] in the packed layout, cut in halves for timm's split layout), the derivative applied to each
output-gradient tile as it is loaded and Norm(x) re-applied to each x tile, then the norm's backward (dx, and the
weight / bias gradients as per-16-row partials summed here). When the dW tiles are too few to fill the GPU the M
reduction is split (:func:`weight_split_k`) into fp32 partials summed here in slice order. No atomics: gradients
are bit-identical run to run; in deterministic mode the configs are fixed too.

``ln_mlp`` on this backend is two of these GEMMs: fc1 with the norm prologue and the activation epilogue, fc2 with
the hidden-layer norm (sub-LN) as its prologue and the bias and residual epilogue; the only intermediates in memory
are the statistics and the hidden activations. Every variant of ``ops.ln_mlp`` runs here.

``auto`` picks these kernels only where ``fastvit/gemm_choices.json`` says they won the benchmark (see
``fastvit.gemm_choices``); an explicit ``backend='triton'`` always runs them.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from fastvit import dispatch, gemm_choices
from fastvit.ops.autograd import no_double_backward
from fastvit.ops.ln_linear import GemmCall
from fastvit.ops.triton import launch
from fastvit.validation import cast_like_autocast_linear, centred_in_dtype

ACTIVATION_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2, "quick_gelu": 3, "swiglu": 4}  # kernels' ACT_* constants
NORM_CODES = {"none": 0, "layer": 1, "rms": 2}  # kernels/linear.py's NORM_* constants


def supports(call) -> str | None:
    """Why the Triton GEMMs do not cover ``call`` (None: they do). Every prologue, epilogue and backward is a
    Triton kernel (the norm's backward too): only the dtype rule remains."""
    return dispatch.kernel_dtype_reason("triton", call.device, (call.dtype,))


def measured_choice(op_name: str):
    """The ``measured`` predicate of ``op_name`` (see ``dispatch.Implementation``): ``auto`` leaves the call to
    cuBLAS(Lt) unless the choice table says Triton won. Device-level calls carry no shape: only ``'*'`` entries."""

    def measured(call) -> str | None:
        if call.device.type != "cuda":
            return None
        bucket, variant = None, gemm_choices.ANY_VARIANT
        if isinstance(call, GemmCall) or hasattr(call, "in_features"):  # GemmCall, or ln_mlp's MlpCall
            bucket = gemm_choices.shape_bucket(call.in_features, call.out_features)
        if hasattr(call, "act"):  # ln_mlp's MlpCall: its variant
            variant = gemm_choices.mlp_variant(call.norm, call.act, call.hidden_norm)
        if gemm_choices.preferred(op_name, bucket, call.dtype, call.device, variant) == "triton":
            return None
        at = f"{bucket or 'this shape'}" + ("" if variant == gemm_choices.ANY_VARIANT else f" ({variant})")
        return (
            f"no benchmark evidence that the Triton GEMMs beat cuBLAS(Lt) for {op_name} at {at}, "
            f"{'any dtype' if call.dtype is None else str(call.dtype).removeprefix('torch.')} on this GPU "
            "(fastvit/gemm_choices.json)"
        )

    return measured


@dispatch.register("ln_linear", "triton", supports=supports, measured=measured_choice("ln_linear"))
def ln_linear(x, ln_weight, ln_bias, weight, bias, eps, activation, residual, norm="layer"):
    residual_outside = None
    cast_x, ln_weight, ln_bias, weight, bias = cast_like_autocast_linear(
        x.device.type, x, ln_weight, ln_bias, weight, bias
    )
    if ln_weight is not None and norm == "layer" and cast_x.element_size() < x.element_size():
        cast_x = centred_in_dtype(x, cast_x.dtype)  # see centred_in_dtype: LayerNorm (not RMSNorm) is shift invariant
    x = cast_x
    if residual is not None and residual.dtype != x.dtype:  # under autocast: added as eager does (type promotion)
        residual_outside, residual = residual, None
    in_features = weight.shape[1]
    out_features = weight.shape[0] // 2 if activation == "swiglu" else weight.shape[0]
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, ln_weight, ln_bias, weight, bias, residual)
    )
    out = torch.ops.fastvit.ln_linear_fwd(
        x.reshape(-1, in_features),
        ln_weight,
        ln_bias,
        weight,
        bias,
        None if residual is None else residual.reshape(-1, out_features),
        eps,
        ACTIVATION_CODES[activation],
        save and activation != "none",
        NORM_CODES[norm],
    )[0].view(*x.shape[:-1], out_features)
    return out if residual_outside is None else residual_outside + out


def mlp_supports(call) -> str | None:
    """Why the two Triton GEMMs do not cover ``ln_mlp``'s ``call``: every variant (LayerNorm / RMSNorm prologue,
    GELU / GELU-tanh / QuickGELU / SwiGLU epilogue, a hidden norm as fc2's prologue), so the dtype rule only."""
    return supports(call)


@dispatch.register("ln_mlp", "triton", supports=mlp_supports, measured=measured_choice("ln_mlp"))
def ln_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, act, residual, norm, hidden_norm):
    """fc1 with the norm prologue and the activation epilogue (SwiGLU: gate and value tiles in one program), then
    fc2 with the hidden norm (if any) as its prologue and the bias + residual epilogue."""
    hidden = ln_linear(x, ln_weight, ln_bias, fc1_weight, fc1_bias, eps, act, None, norm)
    hidden_weight, hidden_bias, hidden_eps = hidden_norm if hidden_norm is not None else (None, None, eps)
    return ln_linear(
        hidden, hidden_weight, hidden_bias, fc2_weight, fc2_bias, hidden_eps, "none", x if residual else None, norm
    )


# ------------------------------------------------------------------------------------------------
# Configs and launches


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


_KERNELS = {"fwd": "linear_fwd_kernel", "input": "linear_bwd_input_kernel", "weight": "linear_bwd_weight_kernel"}
KINDS = tuple(_KERNELS)
_FORCED_CONFIGS: dict[str, tuple[int, ...]] = {}  # kernel kind -> config every launch must use


@contextlib.contextmanager
def forced_configs(configs: dict[str, tuple[int, ...]]):
    """Within the block, launch each kernel kind named in ``configs`` ('fwd' | 'input' | 'weight') with the given
    (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages) instead of the autotuner's, deterministic or interpreter's.

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


def _forward(x, norm_weight, norm_bias, weight, bias, residual, eps, activation, save_pre_act, norm, weight_value):
    """out [M, N] = act(Norm(x) Wᵀ + b) + residual, and (mean, rstd, pre_act) for the backward (empty when unused).

    SwiGLU: ``weight`` [2N, K] packed (gate rows first) or the gate rows [N, K] with ``weight_value`` [N, K];
    ``bias`` [2N] (gate then value); pre_act [M, 2N] (gate then value)."""
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
            INPUT_PRECISION=launch.input_precision(x.dtype),
        )  # fmt: skip
        num_programs = lambda bm, bn, bk: launch.cdiv(rows, bm) * launch.cdiv(out_features, bn)
        _launch("fwd", x, rows, num_programs, args, constants)
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


def _norm_backward(grad_normed, x, norm_weight, mean, rstd, norm, has_norm_bias):
    """(dx [M, K] in x's dtype, d weight [K], d bias [K] or empty) of the prologue's norm, from dÂ [M, K]."""
    kernels = launch.kernels("linear")
    rows, width = x.shape
    grad_x = launch.new_output((rows, width), x.dtype, x.device)
    blocks = launch.cdiv(rows, kernels.STATS_BLOCK_M)
    partial_weight = launch.new_output((blocks, width), torch.float32, x.device)
    partial_bias = launch.new_output((blocks, width) if has_norm_bias else (0,), torch.float32, x.device)
    kernels.norm_bwd_kernel[(blocks,)](
        grad_normed, x, mean if mean.numel() else rstd, rstd, norm_weight, grad_x, partial_weight,
        partial_bias if has_norm_bias else partial_weight, rows, width, *x.stride(), NORM=norm,
        HAS_NORM_BIAS=has_norm_bias, **_stats_launch_meta(kernels),
    )  # fmt: skip
    grad_bias = partial_bias.sum(0).to(norm_weight.dtype) if has_norm_bias else norm_weight.new_empty(0)
    return grad_x, partial_weight.sum(0).to(norm_weight.dtype), grad_bias


def _backward(grad_out, x, norm_weight, norm_bias, mean, rstd, weight, pre_act, activation, has_bias, norm,
              weight_value):  # fmt: skip
    """(dx [M, K] in x's dtype (through the norm's backward with a prologue); dW [R, K] with R = N, or 2N for
    SwiGLU (gate rows then value rows, whatever the weight layout); db [R], or empty without a bias; the norm's
    d weight and d bias [K], or empty)."""
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
        constants = dict(ACTIVATION=activation, INPUT_PRECISION=precision)
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
                         SPLIT_K=split_k, INPUT_PRECISION=precision)  # fmt: skip
        _launch("weight", x, rows, tiles, args, constants, splits=split_k)
        if split_k > 1:
            grad_weight = grad_weight.sum(0).to(weight.dtype)
            if has_bias:
                grad_bias = bias_partials.sum(0).to(weight.dtype)
        grad_x = grad_a
        if has_norm:
            grad_x, grad_norm_weight, grad_norm_bias = _norm_backward(
                grad_a, x, norm_weight, mean, rstd, norm, has_norm_bias
            )
    return grad_x, grad_weight, grad_bias, grad_norm_weight, grad_norm_bias


# ------------------------------------------------------------------------------------------------
# Custom ops: fastvit::ln_linear_fwd returns (out, mean, rstd, pre_act), the last three saved for the backward
# (empty when there is no norm / no LayerNorm mean / no activation or no backward to come). ``norm`` (NORM_CODES:
# 1 LayerNorm, 2 RMSNorm) is the prologue's kind when ``ln_weight`` is given; ``weight_value`` is SwiGLU's value
# half in timm's split layout (None: ``weight`` packs both halves). Both trail the schema with defaults.

_FWD = (
    "(Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor weight, Tensor? bias, Tensor? residual, float eps, "
    "int activation, bool save_pre_act, int norm=1, Tensor? weight_value=None) -> (Tensor, Tensor, Tensor, Tensor)"
)
_BWD = (
    "(Tensor grad_out, Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor mean, Tensor rstd, Tensor weight, "
    "Tensor pre_act, int activation, bool has_bias, int norm=1, Tensor? weight_value=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("fastvit::ln_linear_fwd", mutates_args=(), schema=_FWD)
def _ln_linear_fwd(x, ln_weight, ln_bias, weight, bias, residual, eps, activation, save_pre_act, norm=1,
                   weight_value=None):  # fmt: skip
    return _forward(x, ln_weight, ln_bias, weight, bias, residual, eps, activation, save_pre_act, norm, weight_value)


def _gate_rows(weight, weight_value, activation):
    """N: the GEMM's output width (half a packed SwiGLU weight's rows)."""
    packed = activation == ACTIVATION_CODES["swiglu"] and weight_value is None
    return weight.shape[0] // 2 if packed else weight.shape[0]


@_ln_linear_fwd.register_fake
def _(x, ln_weight, ln_bias, weight, bias, residual, eps, activation, save_pre_act, norm=1, weight_value=None):
    rows, out_features = x.shape[0], _gate_rows(weight, weight_value, activation)
    pre_width = 2 * out_features if activation == ACTIVATION_CODES["swiglu"] else out_features
    has_norm = ln_weight is not None
    return (
        x.new_empty((rows, out_features)),
        x.new_empty((rows,) if has_norm and norm == NORM_CODES["layer"] else (0,), dtype=torch.float32),
        x.new_empty((rows,) if has_norm else (0,), dtype=torch.float32),
        x.new_empty((rows, pre_width) if save_pre_act else (0,)),
    )


@torch.library.custom_op("fastvit::ln_linear_bwd", mutates_args=(), schema=_BWD)
def _ln_linear_bwd(grad_out, x, ln_weight, ln_bias, mean, rstd, weight, pre_act, activation, has_bias, norm=1,
                   weight_value=None):  # fmt: skip
    return _backward(
        grad_out, x, ln_weight, ln_bias, mean, rstd, weight, pre_act, activation, has_bias, norm, weight_value
    )


@_ln_linear_bwd.register_fake
def _(grad_out, x, ln_weight, ln_bias, mean, rstd, weight, pre_act, activation, has_bias, norm=1, weight_value=None):
    out_features = _gate_rows(weight, weight_value, activation)
    weight_rows = 2 * out_features if activation == ACTIVATION_CODES["swiglu"] else out_features
    empty = weight.new_empty(0)
    return (
        x.new_empty(x.shape),
        weight.new_empty((weight_rows, x.shape[1])),
        weight.new_empty((weight_rows,) if has_bias else (0,)),
        empty if ln_weight is None else ln_weight.new_empty(ln_weight.shape),
        empty.clone() if ln_bias is None or ln_weight is None else ln_bias.new_empty(ln_bias.shape),
    )


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, weight, bias, residual, _eps, activation, _save, norm, weight_value = inputs
    _out, mean, rstd, pre_act = output
    ctx.save_for_backward(x, ln_weight, ln_bias, mean, rstd, weight, pre_act, weight_value)
    ctx.activation, ctx.has_bias, ctx.has_residual, ctx.norm = activation, bias is not None, residual is not None, norm


@no_double_backward("ln_linear/ln_mlp")  # the GEMMs of both ops
def _ln_linear_backward(ctx, grad_out, _grad_mean, _grad_rstd, _grad_pre_act):
    x, ln_weight, ln_bias, mean, rstd, weight, pre_act, weight_value = ctx.saved_tensors
    if ctx.activation != ACTIVATION_CODES["none"] and pre_act.numel() == 0 and grad_out.numel() != 0:
        raise RuntimeError(
            "ln_linear: the forward ran without saving the pre-activation (no input required grad then); "
            "run it again with requires_grad set before calling backward"
        )
    grad_x, grad_weight, grad_bias, grad_ln_weight, grad_ln_bias = torch.ops.fastvit.ln_linear_bwd(
        grad_out, x, ln_weight, ln_bias, mean, rstd, weight, pre_act, ctx.activation, ctx.has_bias, ctx.norm,
        weight_value,
    )  # fmt: skip
    grad_weight_value = None
    if weight_value is not None:  # timm's split layout: the packed gradient's halves
        grad_weight, grad_weight_value = grad_weight.chunk(2, dim=0)
    return (
        grad_x,
        None if ln_weight is None else grad_ln_weight,
        None if ln_bias is None or ln_weight is None else grad_ln_bias,
        grad_weight,
        grad_bias if ctx.has_bias else None,
        grad_out if ctx.has_residual else None,
        None,
        None,
        None,
        None,
        grad_weight_value,
    )


_ln_linear_fwd.register_autograd(_ln_linear_backward, setup_context=_setup_context)
