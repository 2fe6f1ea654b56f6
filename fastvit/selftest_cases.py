"""What ``fastvit selftest`` checks: for every fused (op, backend), a list of :class:`Check` per dtype.

Each check runs the fused op forward **and** backward on one input and holds the output and every gradient to the
test suite's rule (``fastvit.accuracy``: error vs an fp64 run of the spec ``fastvit.reference`` at most 2× the
error PyTorch makes in the same dtype, plus :func:`~fastvit.accuracy.rounding_floor`). PyTorch's same-dtype
result comes from what the op's own tests compare with: SDPA for attention (the spec with TF32 matmuls when the
check runs TF32), the spec in the same dtype for the others. Triton outputs are allocated NaN-filled inside a NaN
guard band: an element a kernel does not write, or a store outside its output, fails the check.

The cases cover the kernels' paths: ViT token counts with ragged tails (1, 17, 197, 257; 577 in a full run on a
GPU), every supported head dim, prefix (class / register) tokens, strided, channels_last and expanded inputs,
uint8 images, residual on/off, TF32, autocast, deterministic mode (run twice: bitwise identical), and on a GPU
**every tile config the launchers may pick there**: every candidate of the attention autotuner
(``candidate_configs``, the list its prune step keeps) for each head dim and dtype, and every config of the patch
embedding's heuristic (``candidate_configs``), forced one at a time through the real launchers; on sm_90 GPUs also
the fused GEMM's persistent TMA forward (``hopper_path``: a fallback to the pointer kernel fails the check), its
configs swept in bfloat16. Under Triton's
interpreter (CPU) the launchers use one fixed config per shape, and bfloat16 is not covered there.
``quick=True`` (CI, compute-sanitizer) keeps one or two head dims and the small shapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence

import torch

from fastvit import accuracy, dispatch, ops, reference
from fastvit.ops.attention import attention_call
from fastvit.ops.ln_linear import GemmCall
from fastvit.ops.patch_embed import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PatchEmbedCall
from fastvit.ops.triton import attention as attention_triton
from fastvit.ops.triton import launch
from fastvit.ops.triton import linear as linear_triton
from fastvit.ops.triton import patch_embed as patch_embed_triton

ALL_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
GUARD = 4096  # NaN elements on each side of every Triton output


@dataclasses.dataclass(frozen=True)
class Outcome:
    """The result of one check: ``ratio`` = worst error / bound over its tensors (<= 1 passes; inf for a crash,
    a non-finite value, a stray store or a bitwise mismatch), ``detail`` names the worst tensor."""

    ratio: float
    detail: str

    @property
    def passed(self) -> bool:
        return self.ratio <= 1.0


@dataclasses.dataclass(frozen=True)
class Check:
    """One input of one fused (op, backend) in one dtype; ``run()`` computes and judges it.

    Attributes:
        configs: the kernel configs it forces, as 'kind=config' strings (what the selftest table counts).
    """

    op: str
    backend: str
    dtype: torch.dtype
    label: str
    run: Callable[[], Outcome]
    configs: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------
# Running one fused op against PyTorch and the spec


@contextlib.contextmanager
def poisoned_triton_outputs():
    """Every Triton launcher output is allocated NaN-filled inside a NaN guard band; yields a check that returns
    the name of a broken guard band (a store outside an output), or None."""
    real = launch.new_output
    bases = []

    def allocate(shape, dtype, device, memory_format=torch.contiguous_format):
        numel = math.prod(shape)
        poison = float("nan") if dtype.is_floating_point else 0  # integer outputs: written-or-not is not visible
        base = torch.full((numel + 2 * GUARD,), poison, dtype=dtype, device=device)
        bases.append((base, numel, tuple(shape)))
        view = base[GUARD : GUARD + numel]
        if memory_format == torch.channels_last and len(shape) == 4:
            batch, channels, height, width = shape
            return view.view(batch, height, width, channels).permute(0, 3, 1, 2)
        return view.view(shape)

    def stray_store() -> str | None:
        for base, numel, shape in bases:
            guards = torch.cat([base[:GUARD], base[GUARD + numel :]])
            intact = torch.isnan(guards).all() if base.is_floating_point() else (guards == 0).all()
            if not intact:
                return f"a store outside the {list(shape)} output's memory"
        return None

    launch.new_output = allocate
    try:
        yield stray_store
    finally:
        launch.new_output = real


@contextlib.contextmanager
def tf32(enabled: bool):
    """PyTorch's TF32 matmul switch (which the kernels follow for float32) set to ``enabled`` within the block."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


@contextlib.contextmanager
def deterministic(enabled: bool):
    """``fastvit.set_deterministic(enabled)`` within the block."""
    previous = dispatch._deterministic  # the fastvit switch alone (torch's own is left as it is)
    dispatch.set_deterministic(enabled)
    try:
        yield
    finally:
        dispatch.set_deterministic(previous)


def _forward_backward(fn: Callable, inputs: Sequence, grad_seed: int) -> list:
    """[output, gradient of every floating input (None for the others)] for a fixed random output gradient."""
    leaves = [t.detach().requires_grad_(True) if _differentiable(t) else t for t in inputs]
    out = fn(*leaves)
    wanted = [t for t in leaves if _differentiable(t)]
    gen = torch.Generator().manual_seed(grad_seed)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
    grads = iter(torch.autograd.grad(out, wanted, grad_out) if wanted else ())
    return [out.detach()] + [next(grads) if _differentiable(t) else None for t in leaves]


def _differentiable(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _cast(t, dtype: torch.dtype, device: torch.device):
    if not isinstance(t, torch.Tensor):
        return t
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)


@dataclasses.dataclass(frozen=True)
class OpCase:
    """One op call: ``fused``, ``peer`` (PyTorch in the same dtype) and ``spec`` (run in fp64) take the same
    arguments; ``make(gen)`` draws them (fp64 / uint8, CPU); ``layout(args)`` turns the cast arguments into the
    layouts under test (views: strided, channels_last, expanded); ``names`` label the output and the arguments."""

    fused: Callable
    peer: Callable
    spec: Callable
    make: Callable[[torch.Generator], list]
    names: tuple[str, ...]
    layout: Callable[[list], list] = lambda args: args
    fused_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext  # around fused and peer
    compute_dtype: torch.dtype | None = None  # the dtype the arguments are cast to (default: the check's)


def measure(case: OpCase, dtype: torch.dtype, device: torch.device, seed: int, repeat_bitwise: bool = False) -> Outcome:
    """Run ``case`` (fused, peer, spec; forward and backward) and judge every tensor by the accuracy rule.

    ``repeat_bitwise``: run the fused op a second time and require bit-identical outputs and gradients.
    """
    args64 = case.make(torch.Generator().manual_seed(seed))
    cast_dtype = case.compute_dtype or dtype
    args = case.layout([_cast(t, cast_dtype, device) for t in args64])
    with poisoned_triton_outputs() as stray_store:
        with case.fused_context():
            ours = _forward_backward(case.fused, args, seed + 1)
        stray = stray_store()
        if repeat_bitwise:
            with case.fused_context():
                again = _forward_backward(case.fused, args, seed + 1)
            stray = stray or stray_store()
    if stray is not None:
        return Outcome(math.inf, stray)
    with case.fused_context():
        peer = _forward_backward(case.peer, args, seed + 1)
    exact = _forward_backward(case.spec, case.layout([_cast(t, torch.float64, device) for t in args64]), seed + 1)
    worst = Outcome(0.0, "")
    for index, (name, mine, theirs, ref) in enumerate(zip(case.names, ours, peer, exact)):
        if ref is None:
            continue
        if mine is None or mine.shape != ref.shape or mine.dtype != theirs.dtype:
            got = None if mine is None else (tuple(mine.shape), mine.dtype)
            return Outcome(math.inf, f"{name}: got {got}, expected {tuple(ref.shape)} {theirs.dtype}")
        if repeat_bitwise and not torch.equal(mine, again[index]):
            return Outcome(math.inf, f"{name}: two deterministic runs differ")
        check = accuracy.check_within_torch_error(mine, theirs, ref, floor=accuracy.rounding_floor(ref, mine.dtype))
        if check.ratio > worst.ratio or not worst.detail:
            worst = Outcome(check.ratio, f"{name}: {check}")
    return worst


def _check(op, backend, dtype, label, case: OpCase, device, seed, configs=(), **options) -> Check:
    return Check(op, backend, dtype, label, lambda: measure(case, dtype, device, seed, **options), tuple(configs))


def covered_dtypes(op: str, backend: str, call_for: Callable[[torch.dtype], object]) -> list[torch.dtype]:
    """The dtypes ``backend`` covers for ``op`` (its ``supports`` predicate, through dispatch)."""
    return [d for d in ALL_DTYPES if dispatch.explain(op, backend, call_for(d))[0] == backend]


def _on_gpu(device: torch.device) -> bool:
    return launch.on_gpu(torch.empty(0, device=device))


def _randn(gen, *shape, scale=1.0, shift=0.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift


# ----------------------------------------------------------------------------------------------
# Attention (triton): qkv_attention and attention share the kernels


def _sdpa_qkv(qkv, num_heads, scale=None):
    return ops.qkv_attention(qkv, num_heads, scale, backend="torch")


def _qkv_case(batch, tokens, heads, head_dim, scale=None, spread=1.0, view=None, tf32_on=False) -> OpCase:
    """qkv_attention on a [B, N, 3·H·D] buffer (``view``: 'strided' = every other token of a wider buffer)."""
    width3 = 3 * heads * head_dim

    def make(gen):
        if view == "strided":  # token stride 2·(3C + 24), 8 columns in
            return [_randn(gen, batch, 2 * tokens, width3 + 24, scale=spread)]
        return [_randn(gen, batch, tokens, width3, scale=spread)]

    def layout(args):
        return [args[0][:, ::2, 8 : 8 + width3]] if view == "strided" else args

    peer = _sdpa_qkv
    if tf32_on:  # SDPA's fp32 kernels do not take TF32; the spec's matmuls do, as the kernels then
        peer = reference.qkv_attention
    return OpCase(
        fused=lambda qkv: ops.qkv_attention(qkv, heads, scale, backend="triton"),
        peer=lambda qkv: peer(qkv, heads, scale),
        spec=lambda qkv: reference.qkv_attention(qkv, heads, scale),
        make=make,
        layout=layout,
        names=("out", "grad qkv"),
        fused_context=(lambda: tf32(True)) if tf32_on else contextlib.nullcontext,
    )


def _key_padding_mask(tokens: int) -> torch.Tensor:
    """[3, N] bool, True = keep: trailing padding (NaFlex's), every key masked, holes across key blocks plus a masked
    tail."""
    keep = torch.ones(3, tokens, dtype=torch.bool)
    keep[0, tokens * 3 // 5 :] = False
    keep[1] = False
    keep[2, tokens // 4 : tokens // 2] = False
    keep[2, tokens * 4 // 5 :] = False
    return keep


def _masked_qkv_case(tokens, heads, head_dim) -> OpCase:
    """qkv_attention with a key-padding mask (``_key_padding_mask``) on qkv [3, N, 3·H·D]."""

    def make(gen):
        return [_randn(gen, 3, tokens, 3 * heads * head_dim), _key_padding_mask(tokens)]

    return OpCase(
        fused=lambda qkv, keep: ops.qkv_attention(qkv, heads, backend="triton", key_padding_mask=keep),
        peer=lambda qkv, keep: ops.qkv_attention(qkv, heads, backend="torch", key_padding_mask=keep),
        spec=lambda qkv, keep: reference.qkv_attention(qkv, heads, key_padding_mask=keep),
        make=make,
        names=("out", "grad qkv", "key_padding_mask"),
    )


def _attention_case(batch, heads, n_q, n_kv, head_dim, view=None) -> OpCase:
    """attention on [B, H, N, D] tensors; ``view``: 'strided' (token-major q, column-sliced k, transposed v) or
    'expanded' (k and v broadcast over the heads: stride 0)."""

    def make(gen):
        if view == "expanded":
            q = _randn(gen, batch, heads, n_q, head_dim)
            return [q, _randn(gen, batch, 1, n_kv, head_dim), _randn(gen, batch, 1, n_kv, head_dim)]
        if view == "strided":
            return [
                _randn(gen, batch, n_q, heads, head_dim),
                _randn(gen, batch, heads, n_kv, head_dim + 16),
                _randn(gen, batch, heads, head_dim, n_kv),
            ]
        return [_randn(gen, batch, heads, n, head_dim) for n in (n_q, n_kv, n_kv)]

    def layout(args):
        q, k, v = args
        if view == "expanded":
            return [q, k.expand(-1, heads, -1, -1), v.expand(-1, heads, -1, -1)]
        if view == "strided":
            return [q.transpose(1, 2), k[..., 8 : 8 + head_dim], v.transpose(-1, -2)]
        return args

    def spec(q, k, v):
        return reference.attention(q, k, v)

    return OpCase(
        fused=lambda q, k, v: ops.attention(q, k, v, backend="triton"),
        peer=lambda q, k, v: ops.attention(q, k, v, backend="torch"),
        spec=spec,
        make=make,
        layout=layout,
        names=("out", "grad q", "grad k", "grad v"),
    )


def _pool_attention_case(tokens, heads, head_dim) -> OpCase:
    """The attention-pooling head's attention: one query broadcast over a batch of 3 (stride 0), a LayerNorm k-norm
    inside the kernels, a key-padding mask (``_key_padding_mask``)."""

    def make(gen):
        k, v = (_randn(gen, 3, heads, tokens, head_dim) for _ in range(2))
        norm = [_randn(gen, head_dim, scale=0.5, shift=1.0), _randn(gen, head_dim, scale=0.5)]
        return [_randn(gen, 1, heads, 1, head_dim), k, v, _key_padding_mask(tokens), *norm]

    def layout(args):
        return [args[0].expand(3, -1, -1, -1), *args[1:]]

    def call(attention, **kw):
        return lambda q, k, v, keep, w, b: attention(
            q, k, v, k_norm=ops.QKNorm(w, b, 1e-6, "layer"), key_padding_mask=keep, **kw
        )

    def spec(q, k, v, keep, w, b):
        return reference.attention(q, reference.qk_norm(ops.QKNorm(w, b, 1e-6))(k), v, key_padding_mask=keep)

    return OpCase(
        fused=call(ops.attention, backend="triton"),
        peer=call(ops.attention, backend="torch"),
        spec=spec,
        make=make,
        layout=layout,
        names=("out", "grad q", "grad k", "grad v", "key_padding_mask", "grad k_norm weight", "grad k_norm bias"),
    )


def _config_text(configs: dict) -> tuple[str, ...]:
    return tuple(f"{kind}={config}" for kind, config in sorted(configs.items()))


def _forced(case: OpCase, force) -> OpCase:
    """``case`` with its runs, forward and backward, inside the ``force`` context (a forced kernel config: the
    backward kernels launch in ``torch.autograd.grad``, after the forward call returned, so the context must span
    both; the peer runs inside it too, untouched: forced configs steer only the Triton launchers)."""
    inner = case.fused_context

    @contextlib.contextmanager
    def both():
        with force(), inner():
            yield

    return dataclasses.replace(case, fused_context=both)


def attention_checks(op: str, device: torch.device, quick: bool) -> list[Check]:
    """Checks of the Triton attention kernels through ``op`` ('qkv_attention' or 'attention').

    qkv_attention: the config sweep (every autotuner candidate of every kernel, per head dim; IEEE and TF32 for
    float32), then token counts through the launcher's own choice (on a GPU: the autotuner), a strided view, a
    peaked softmax and deterministic mode. attention: unequal query/key lengths, strided and expanded inputs, the
    attention-pooling head's call (one broadcast query, qk-norm inside the kernels, a key-padding mask).
    """
    dtypes = covered_dtypes(op, "triton", lambda d: attention_call(device, d, 64))
    gpu = _on_gpu(device)
    if quick:  # CI (interpreter) and compute-sanitizer: small token counts
        head_dims, sweep_tokens = ((64, 72, 80) if gpu else (64,)), 33
        shapes, cross = [(2, 1), (1, 17)], [(7, 33, None), (33, 7, None), (20, 20, "strided"), (20, 13, "expanded")]
    else:
        head_dims, sweep_tokens = attention_triton.SUPPORTED_HEAD_DIMS, 197
        shapes = [(2, 1), (2, 17), (1, 197), (1, 257)] + ([(2, 577)] if gpu else [])
        cross = [(7, 197, None), (197, 7, None), (37, 37, "strided"), (50, 33, "expanded")]
    checks = []
    for dtype in dtypes:
        variants = [False, True] if gpu and dtype == torch.float32 else [False]  # fp32: IEEE and TF32 kernels
        seed = 0
        if op != "qkv_attention":
            for n_q, n_kv, view in cross:
                seed += 1
                label = f"N_q={n_q} N_kv={n_kv}" + (f" {view}" if view else "")
                case = _attention_case(1, 2, n_q, n_kv, 80 if view == "strided" else 64, view=view)
                checks.append(_check(op, "triton", dtype, label, case, device, seed))
            seed += 1
            case = _pool_attention_case(70 if quick else 729, 2, 64)
            checks.append(
                _check(op, "triton", dtype, "pooling head: one broadcast query, k-norm, mask", case, device, seed)
            )
            continue
        for head_dim in head_dims:
            for tf32_on in variants:
                for configs in _attention_config_sweep(device, dtype, head_dim):
                    seed += 1
                    case = _qkv_case(2, sweep_tokens, 2, head_dim, tf32_on=tf32_on)
                    label = f"B=2 N={sweep_tokens} H=2 D={head_dim}" + (" tf32" if tf32_on else "")
                    if configs:
                        case = _forced(case, lambda c=configs: attention_triton.forced_configs(c))
                        label += " " + " ".join(_config_text(configs))
                    checks.append(_check(op, "triton", dtype, label, case, device, seed, _config_text(configs)))
        for batch, tokens in shapes:
            seed += 1
            label = f"B={batch} N={tokens} H=2 D=64" + (" (autotuned)" if gpu else "")
            checks.append(_check(op, "triton", dtype, label, _qkv_case(batch, tokens, 2, 64), device, seed))
        seed += 1
        case = _qkv_case(2, 20 if quick else 50, 2, 48, scale=0.2, view="strided")
        checks.append(_check(op, "triton", dtype, "strided view of a wider buffer, D=48", case, device, seed))
        seed += 1
        case = _masked_qkv_case(70 if quick else 197, 2, 64)
        checks.append(_check(op, "triton", dtype, "key-padding mask", case, device, seed))
        if not quick:  # inputs x3: scores up to ~50, the running-max rescaling at work
            seed += 1
            case = _qkv_case(1, 70, 2, 96, spread=3.0)
            checks.append(_check(op, "triton", dtype, "peaked softmax, D=96", case, device, seed))
        seed += 1
        case = _qkv_case(2, 20 if quick else 65, 2, 64)
        checks.append(
            _deterministic_check(op, "triton", dtype, "deterministic mode, bitwise repeat", case, device, seed)
        )
    return checks


@dataclasses.dataclass(frozen=True)
class _Prologue:
    """The attention prologue a case runs: qk-norm of ``kind`` ('layer' | 'rms'; learned weights near 1 and, for
    'layer', biases: their gradients are checked too) then 2D RoPE in ``layout`` ('interleaved' | 'half'), each
    sequence's first ``prefix`` tokens unrotated."""

    prefix: int
    layout: str
    kind: str

    @property
    def names(self) -> tuple[str, ...]:
        """The gradients of the norm parameters ``draw`` returns, in order."""
        params = ("q_weight", "q_bias", "k_weight", "k_bias") if self.kind == "layer" else ("q_weight", "k_weight")
        return tuple(f"grad {name}" for name in params)

    def draw(self, gen: torch.Generator, head_dim: int) -> list[torch.Tensor]:
        """The q and k norms' parameters, [D] each (weights, then biases for 'layer')."""
        per_norm = 2 if self.kind == "layer" else 1
        return [_randn(gen, head_dim, scale=0.1, shift=1.0 if i % per_norm == 0 else 0.0) for i in range(2 * per_norm)]

    def table(self, grid: tuple[int, int], head_dim: int) -> torch.Tensor:
        """The model's RoPE table of ``grid`` in this layout: [h·w, 2·D] float32 (``fastvit.eva.rope_table``)."""
        from fastvit.eva import rope_table  # imported late: eva imports the model, which imports the ops

        return rope_table(grid, head_dim, rotate_half=self.layout == "half")

    def kwargs(self, rope: torch.Tensor, params: Sequence[torch.Tensor]) -> dict:
        """The prologue's keyword arguments to the attention op, with the norms built from ``params``."""
        per_norm = len(params) // 2
        norms = [
            ops.QKNorm(p[0], p[1] if self.kind == "layer" else None, 1e-6, self.kind)
            for p in (params[:per_norm], params[per_norm:])
        ]
        return dict(rope=rope, num_prefix_tokens=self.prefix, rope_layout=self.layout, q_norm=norms[0], k_norm=norms[1])


def _grid_of(patches: int) -> tuple[int, int]:
    """The squarest (h, w) grid of ``patches`` > 0 patches, h <= w."""
    rows = max(d for d in range(1, math.isqrt(patches) + 1) if patches % d == 0)
    return rows, patches // rows


def _varlen_rope_table(lengths: Sequence[int], prologue: _Prologue, head_dim: int) -> torch.Tensor:
    """The packed [T - prefix, 2·D] table of sequences of ``lengths``: each sequence of L > prefix tokens rotates its
    patches by the table of a ``_grid_of(L - prefix)`` grid, at rows cu_seqlens[b]..cu_seqlens[b + 1] - prefix;
    identity rows elsewhere. ``fastvit.packing.packed_rope_table``'s layout, placed by sequence start so that
    sequences shorter than the prefix (empty ones, a lone class token) fit too."""
    rows, prefix = sum(lengths) - prologue.prefix, prologue.prefix
    packed = torch.cat([torch.zeros(rows, head_dim), torch.ones(rows, head_dim)], dim=1)
    start = 0
    for length in lengths:
        if length > prefix:
            packed[start : start + length - prefix] = prologue.table(_grid_of(length - prefix), head_dim)
        start += length
    return packed


def _varlen_case(lengths: Sequence[int], heads: int, head_dim: int, prologue: _Prologue | None = None) -> OpCase:
    """varlen_qkv_attention on sequences of ``lengths`` packed into qkv [T, 3·H·D], with ``prologue`` when given
    (``_varlen_rope_table``); peer: the torch backend (one SDPA per sequence on CPU, padded masked SDPA on a GPU),
    spec: each sequence alone."""
    bounds = [0]
    for length in lengths:
        bounds.append(bounds[-1] + length)
    max_seqlen = max(lengths)

    def make(gen):
        norms = prologue.draw(gen, head_dim) if prologue else []
        return [_randn(gen, bounds[-1], 3 * heads * head_dim), torch.tensor(bounds, dtype=torch.int32), *norms]

    def call(attend, **backend):
        def run(qkv, cu, *params):
            rope = _varlen_rope_table(lengths, prologue, head_dim).to(qkv.device) if prologue else None
            return attend(qkv, cu, max_seqlen, heads, **(prologue.kwargs(rope, params) if prologue else {}), **backend)

        return run

    def spec(qkv, cu, _max_seqlen, num_heads, **prologue_kwargs):
        return reference.varlen_qkv_attention(qkv, cu, num_heads, **prologue_kwargs)

    return OpCase(
        fused=call(ops.varlen_qkv_attention, backend="triton"),
        peer=call(ops.varlen_qkv_attention, backend="torch"),
        spec=call(spec),
        make=make,
        names=("out", "grad qkv", "cu_seqlens", *(prologue.names if prologue else ())),
    )


def _qkv_attention_case(call: Callable, make: Callable, names: tuple[str, ...]) -> OpCase:
    """A qkv_attention case whose ``call(attend, **backend)`` builds the runner: the Triton kernels, the torch
    backend as the peer, the reference as the spec."""
    return OpCase(
        fused=call(ops.qkv_attention, backend="triton"),
        peer=call(ops.qkv_attention, backend="torch"),
        spec=call(reference.qkv_attention),
        make=make,
        names=names,
    )


def _prologue_qkv_case(
    grid: tuple[int, int], heads: int, head_dim: int, prologue: _Prologue, key_padding: bool = False
) -> OpCase:
    """qkv_attention with ``prologue`` (RoPE table of ``grid``, plus the prefix tokens) on qkv [B, N, 3·H·D]; with
    ``key_padding``, B = 3 under ``_key_padding_mask`` (padded NaFlex batches), else B = 2."""
    tokens, width3 = prologue.prefix + grid[0] * grid[1], 3 * heads * head_dim

    def make(gen):
        norms = prologue.draw(gen, head_dim)
        if key_padding:
            return [_randn(gen, 3, tokens, width3), _key_padding_mask(tokens), *norms]
        return [_randn(gen, 2, tokens, width3), *norms]

    def call(attend, **backend):
        def run(qkv, *rest):
            mask = {"key_padding_mask": rest[0]} if key_padding else {}
            params = rest[1:] if key_padding else rest
            rope = prologue.table(grid, head_dim).to(qkv.device)
            return attend(qkv, heads, **prologue.kwargs(rope, params), **mask, **backend)

        return run

    names = ("out", "grad qkv", *(("key_padding_mask",) if key_padding else ()), *prologue.names)
    return _qkv_attention_case(call, make, names)


def _learned_table_case(grid: tuple[int, int], heads: int, head_dim: int, prologue: _Prologue) -> OpCase:
    """qkv_attention in RoPE-Mixed's form on qkv [2, N, 3·H·D]: one RoPE table per head, an input whose gradient the
    backward kernels store (random angles per head, row and channel), with ``prologue``'s norms and prefix."""
    tokens, width3 = prologue.prefix + grid[0] * grid[1], 3 * heads * head_dim

    def make(gen):
        angles = torch.rand(heads, grid[0] * grid[1], head_dim, generator=gen, dtype=torch.float64) * 6.3
        table = torch.cat([angles.sin(), angles.cos()], dim=-1)
        return [_randn(gen, 2, tokens, width3), table, *prologue.draw(gen, head_dim)]

    def call(attend, **backend):
        def run(qkv, table, *params):
            return attend(qkv, heads, **prologue.kwargs(table, params), **backend)

        return run

    return _qkv_attention_case(call, make, ("out", "grad qkv", "grad per-head table", *prologue.names))


def prologue_attention_checks(device: torch.device, quick: bool) -> list[Check]:
    """Checks of the attention kernels' qk-norm + RoPE prologue (forward and backward, the norms' weight gradients
    included): both RoPE layouts and both norm kinds, prefix tokens (class + registers) left unrotated; then the
    prologue under a key-padding mask (padded NaFlex batches; one layout in quick mode); then RoPE-Mixed's learned
    per-head tables (the tables' gradient included)."""
    op = "qkv_attention"
    grid, prefix = ((5, 7), 1) if quick else ((14, 14), 5)
    prologues = [_Prologue(prefix, "interleaved", "layer"), _Prologue(prefix, "half", "rms")]
    masked = prologues[1:] if quick else prologues
    checks, seed = [], 1000
    for dtype in covered_dtypes(op, "triton", lambda d: attention_call(device, d, 64)):
        for prologue, key_padding in [(p, False) for p in prologues] + [(p, True) for p in masked]:
            seed += 1
            case = _prologue_qkv_case(grid, 2, 64, prologue, key_padding=key_padding)
            label = f"prologue {_prologue_text(prologue)}, grid {grid[0]}x{grid[1]}, D=64"
            checks.append(_check(op, "triton", dtype, label + (", key-padding mask" if key_padding else ""), case,
                                 device, seed))  # fmt: skip
        # on a GPU, every candidate config of prologue launches forced (rotate-half RoPE + RMSNorm q/k norms)
        forced = _forced_prologue_checks(
            op, dtype, f"prologue {_prologue_text(prologues[1])}, D=64",
            functools.partial(_prologue_qkv_case, grid, 2, 64, prologues[1]), device, seed,
        )  # fmt: skip
        checks, seed = checks + forced, seed + len(forced)
        seed += 1  # RoPE-Mixed: learned per-head tables, their gradient from the kernels
        case = _learned_table_case(grid, 2, 64, prologues[1])
        label = f"prologue {_prologue_text(prologues[1])}, learned per-head tables, grid {grid[0]}x{grid[1]}, D=64"
        checks.append(_check(op, "triton", dtype, label, case, device, seed))
    return checks


def _prologue_text(prologue: _Prologue) -> str:
    return f"{prologue.kind}-norm + RoPE {prologue.layout} + {prologue.prefix} prefix"


def qkv_attention_checks(op: str, device: torch.device, quick: bool) -> list[Check]:
    """``attention_checks`` and the prologue's."""
    return attention_checks(op, device, quick) + prologue_attention_checks(device, quick)


def varlen_attention_checks(op: str, device: torch.device, quick: bool) -> list[Check]:
    """Checks of the attention kernels' packed variable-length path (``varlen_qkv_attention``, VARLEN=True): empty,
    length-1 and multi-block sequences with ragged tails, per head dim; on a GPU every autotuner candidate forced.
    Then the qk-norm + RoPE prologue on packed sequences (the packed table, ``_varlen_rope_table``): both layouts and
    norm kinds (one in quick mode), the norms' weight gradients included."""
    dtypes = covered_dtypes(op, "triton", lambda d: attention_call(device, d, 64))
    gpu = _on_gpu(device)
    mixes = [(5, 0, 1, 70)] if quick else [(5, 0, 1, 70), (197, 50, 0, 257, 1) + ((577,) if gpu else ())]
    head_dims = (64, 72, 80) if gpu and quick else (64,) if quick else attention_triton.SUPPORTED_HEAD_DIMS
    # the qk-norm + RoPE prologue on packed sequences: a class token (length 1: it alone), 5 prefix tokens (longer
    # than the empty and length-1 sequences: those stay unrotated)
    prologues = [(mixes[0], _Prologue(1, "interleaved", "layer"))]
    if not quick:
        prologues += [(mixes[1], _Prologue(1, "interleaved", "layer")), (mixes[1], _Prologue(5, "half", "rms"))]
        prologues += [(mixes[0], _Prologue(5, "half", "rms"))]
    checks = []
    for dtype in dtypes:
        seed = 0
        for head_dim in head_dims:
            for configs in _attention_config_sweep(device, dtype, head_dim):
                seed += 1
                case, label = _varlen_case(mixes[0], 2, head_dim), f"lengths {mixes[0]} H=2 D={head_dim}"
                if configs:
                    case = _forced(case, lambda c=configs: attention_triton.forced_configs(c))
                    label += " " + " ".join(_config_text(configs))
                checks.append(_check(op, "triton", dtype, label, case, device, seed, _config_text(configs)))
            for lengths in mixes[1:]:
                seed += 1
                label = f"lengths {lengths} H=2 D={head_dim}" + (" (autotuned)" if gpu else "")
                checks.append(_check(op, "triton", dtype, label, _varlen_case(lengths, 2, head_dim), device, seed))
        for lengths, prologue in prologues:
            seed += 1
            label = f"lengths {lengths} H=2 D=64 prologue {_prologue_text(prologue)}"
            checks.append(_check(op, "triton", dtype, label, _varlen_case(lengths, 2, 64, prologue), device, seed))
        lengths, prologue = prologues[-1]  # on a GPU, every candidate config of the prologue launches forced
        forced = _forced_prologue_checks(
            op, dtype, f"lengths {lengths} H=2 D=64 prologue {_prologue_text(prologue)}",
            functools.partial(_varlen_case, lengths, 2, 64, prologue), device, seed,
        )  # fmt: skip
        checks, seed = checks + forced, seed + len(forced)
        seed += 1
        case = _varlen_case((20, 0, 45), 2, 64)
        checks.append(
            _deterministic_check(op, "triton", dtype, "deterministic mode, bitwise repeat", case, device, seed)
        )
    return checks


def _forced_prologue_checks(op, dtype, label: str, make_case: Callable[[], OpCase], device, seed: int) -> list[Check]:
    """One check of ``make_case()`` (a D = 64 case with a RoPE prologue) per config set of the prologue launches'
    sweep (``_attention_config_sweep``), each forced; none under the interpreter (no configs to force). Seeds follow
    ``seed``."""
    sweep = [c for c in _attention_config_sweep(device, dtype, 64, rope=True, prologue=True) if c]
    return [
        _check(
            op,
            "triton",
            dtype,
            f"{label} " + " ".join(_config_text(configs)),
            _forced(make_case(), lambda c=configs: attention_triton.forced_configs(c)),
            device,
            seed + i,
            _config_text(configs),
        )  # fmt: skip
        for i, configs in enumerate(sweep, 1)
    ]


def _attention_config_sweep(
    device: torch.device, dtype: torch.dtype, head_dim: int, rope: bool = False, prologue: bool = False
) -> list[dict]:
    """Forced (fwd, dkdv, dq) configs covering every candidate of each kernel on this GPU, the i-th check taking
    each kernel's i-th candidate (cycling through the shorter lists); ``[{}]`` under the interpreter. ``rope`` /
    ``prologue``: the candidates of launches with the RoPE / qk-norm prologue (their own lists on sm_90)."""
    like = torch.empty(0, device=device, dtype=dtype)
    if not launch.on_gpu(like):
        return [{}]
    arch, block_d = launch.gpu_arch(like), attention_triton._block_d(head_dim)
    candidates = {
        kind: attention_triton.candidate_configs(kind, arch, block_d, like.element_size(), rope, prologue)
        for kind in ("fwd", "dkdv", "dq")
    }
    count = max(len(c) for c in candidates.values())
    return [{kind: c[i % len(c)] for kind, c in candidates.items()} for i in range(count)]


def _deterministic_check(op, backend, dtype, label, case: OpCase, device, seed) -> Check:
    inner = case.fused_context

    @contextlib.contextmanager
    def context():
        with deterministic(True), inner():
            yield

    case = dataclasses.replace(case, fused_context=context)
    return _check(op, backend, dtype, label, case, device, seed, repeat_bitwise=True)


# ----------------------------------------------------------------------------------------------
# Patch embedding (triton): patch_embed and patch_embed_uint8


def _patch_params(gen, in_chans, patch, dim, num_patches, num_prefix, pos, bias=True):
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
    tokens = {"all": num_patches + num_prefix, "patch": num_patches}
    return [
        _randn(gen, dim, in_chans, patch_h, patch_w, scale=(in_chans * patch_h * patch_w) ** -0.5),
        _randn(gen, dim) if bias else None,
        _randn(gen, 1, tokens[pos], dim) if pos else None,
        _randn(gen, 1, num_prefix, dim) if num_prefix else None,
    ]


def _patch_case(
    batch, in_chans, height, width, patch, dim, num_prefix, pos, bias=True, layout="contiguous", norm=None
):  # fmt: skip
    """patch_embed on a float image; ``layout``: contiguous | channels_last | slice (every other column of a wider
    image) | expanded (one image broadcast over the batch: batch stride 0); ``norm``: 'rms' | 'layer' (with bias) for
    a norm of the patch tokens (AIMv2's ``embed_norm_layer``, eps 1e-5), None for none."""
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
    num_patches = (height // patch_h) * (width // patch_w)

    def make(gen):
        image_batch = 1 if layout == "expanded" else batch
        image_width = 2 * width if layout == "slice" else width
        x = _randn(gen, image_batch, in_chans, height, image_width)
        args = [x, *_patch_params(gen, in_chans, patch, dim, num_patches, num_prefix, pos, bias)]
        if norm is not None:
            args += [_randn(gen, dim, scale=0.2, shift=1.0), _randn(gen, dim, scale=0.2) if norm == "layer" else None]
        return args

    def arrange(args):
        x, *rest = args
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "slice":
            x = x[..., ::2]
        elif layout == "expanded":
            x = x.expand(batch, -1, -1, -1)
        return [x, *rest]

    names = ("tokens", "grad x", "grad weight", "grad bias", "grad pos_embed", "grad cls_token")
    if norm is None:
        fused, spec = functools.partial(ops.patch_embed, backend="triton"), reference.patch_embed
    else:

        def normed(fn, **kwargs):
            return lambda *a: fn(*a[:5], norm_weight=a[5], norm_bias=a[6], norm=norm, norm_eps=1e-5, **kwargs)

        fused, spec = normed(ops.patch_embed, backend="triton"), normed(reference.patch_embed)
        names += ("grad norm_weight", "grad norm_bias")
    return OpCase(fused=fused, peer=spec, spec=spec, make=make, layout=arrange, names=names)


def _uint8_case(batch, in_chans, height, width, patch, dim, num_prefix, pos, channels_last, mean, std):
    num_patches = (height // patch) * (width // patch)

    def make(gen):
        shape = (batch, height, width, in_chans) if channels_last else (batch, in_chans, height, width)
        images = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
        return [images, *_patch_params(gen, in_chans, patch, dim, num_patches, num_prefix, pos)]

    def spec(images, weight, *rest):  # normalise (fp32; fp64 for fp64), round to the GEMM dtype, the reference
        x = reference.normalize_uint8(images.permute(0, 3, 1, 2) if channels_last else images, mean, std, weight.dtype)
        return reference.patch_embed(x, weight, *rest)

    def fused(images, *params):
        return ops.patch_embed_uint8(images, *params, mean=mean, std=std, channels_last=channels_last, backend="triton")

    names = ("tokens", "images", "grad weight", "grad bias", "grad pos_embed", "grad cls_token")
    return OpCase(fused=fused, peer=spec, spec=spec, make=make, names=names)


def patch_embed_checks(op: str, device: torch.device, quick: bool) -> list[Check]:
    """Checks of the Triton patch-embedding kernels through ``op`` ('patch_embed' or 'patch_embed_uint8')."""
    dtypes = covered_dtypes(op, "triton", lambda d: PatchEmbedCall(device, (d,), None, 3, op == "patch_embed_uint8"))
    checks = []
    for dtype in dtypes:
        seed = 100
        if op == "patch_embed_uint8":
            uint8_cases = [
                ("rgb [B,H,W,C] imagenet, class token", 3, True, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, 1, "all"),
                ("gray [B,C,H,W] custom, 3 registers", 1, False, (0.5,), (0.25,), 3, "patch"),
            ]
            if not quick:
                uint8_cases.append(
                    ("rgba [B,C,H,W] custom", 4, False, (0.1, 0.2, 0.3, 0.4), (0.5, 0.6, 0.7, 0.8), 1, "all")
                )
            for label, chans, last, mean, std, prefix, pos in uint8_cases:
                seed += 1
                case = _uint8_case(2, chans, 16, 24, 4, 32, prefix, pos, last, mean, std)
                checks.append(_check(op, "triton", dtype, label, case, device, seed))
            continue
        gpu = _on_gpu(device)
        # ViT-like: K = 3·16·16 = 768 and D = 192 cross several tiles, 4·17 = 68 token rows cross a 64-row tile
        sweep_shape = (2, 3, 32, 32, 8, 64) if quick and not gpu else (4, 3, 64, 64, 16, 192)
        variants = [False, True] if gpu and dtype == torch.float32 else [False]
        like = torch.empty(0, device=device)
        fwd = patch_embed_triton.candidate_configs("fwd", like, dtype)
        bwd = patch_embed_triton.candidate_configs("bwd_input", like, dtype)
        for tf32_on in variants:
            for i in range(max(len(fwd), len(bwd))):
                # The i-th config of each heuristic kernel, and the dW reduction split 3 ways (atomics) on odd checks
                overrides = {"fwd": fwd[i % len(fwd)], "bwd_input": bwd[i % len(bwd)]}
                if i % 2:
                    overrides["bwd_weight"] = {"split": 3}
                overrides = {kind: entries for kind, entries in overrides.items() if entries}
                seed += 1
                case = _patch_case(*sweep_shape, 1, "all")
                if tf32_on:
                    case = dataclasses.replace(case, fused_context=lambda: tf32(True))
                batch, chans, height, width, patch, dim = sweep_shape
                label = f"B={batch} {chans}x{height}x{width} p{patch} D={dim} class+pos" + (" tf32" if tf32_on else "")
                configs = _config_text(overrides)
                if overrides:
                    case = _forced(case, lambda o=overrides: patch_embed_triton.forced_configs(o))
                    label += " " + " ".join(configs)
                checks.append(_check(op, "triton", dtype, label, case, device, seed, configs))
        shapes = [
            # The patch tokens' norm (two-pass full-row epilogue): RMSNorm (AIMv2), LayerNorm; D over several tiles
            ("rgb 16x24 p4 class+pos RMSNorm D=72", (2, 3, 16, 24, 4, 72, 1, "all"), "contiguous", "rms"),
            ("rgb 16x16 p4 3 registers LayerNorm D=72", (2, 3, 16, 16, 4, 72, 3, "patch"), "channels_last", "layer"),
            ("rgb 16x16 p4 class+pos", (2, 3, 16, 16, 4, 32, 1, "all"), "channels_last"),
            ("gray 16x24 p8 3 registers, pos on patches only", (2, 1, 16, 24, 8, 48, 3, "patch"), "contiguous"),
            ("rgb 16x24 p4 no prefix no pos", (2, 3, 16, 24, 4, 16, 0, None), "slice"),
            ("rgb 16x16 p4 class+pos", (3, 3, 16, 16, 4, 24, 1, "all"), "expanded"),
            ("2ch 16x16 rectangular p4x8 3 registers", (2, 2, 16, 16, (4, 8), 20, 3, "all"), "contiguous"),
        ]
        if not quick:
            shapes += [
                ("rgb 28x28 p14 (ViT-H patch) class+pos", (2, 3, 28, 28, 14, 40, 1, "all"), "contiguous"),
                ("rgba 8x16 p4 no bias", (1, 4, 8, 16, 4, 24, 1, "patch", False), "channels_last"),
                ("batch 17 8x8 p4 class+pos", (17, 3, 8, 8, 4, 16, 1, "all"), "contiguous"),
                ("rgb 28x28 p14 (AIMv2 patch) RMSNorm D=320", (2, 3, 28, 28, 14, 320, 0, "all"), "contiguous", "rms"),
            ]
        for label, shape, layout, *norm in shapes:
            seed += 1
            case = _patch_case(*shape, layout=layout, norm=norm[0] if norm else None)
            checks.append(_check(op, "triton", dtype, f"{label} {layout}", case, device, seed))
        if gpu and dtype != torch.float32:  # autocast: float32 image and parameters, the GEMM in ``dtype``
            seed += 1
            case = dataclasses.replace(
                _patch_case(2, 3, 32, 32, 16, 64, 1, "all"),
                fused_context=lambda d=dtype: torch.autocast(device.type, dtype=d),
                compute_dtype=torch.float32,
            )
            checks.append(_check(op, "triton", dtype, "autocast, float32 inputs", case, device, seed))
        seed += 1
        case = _forced(
            _patch_case(2, 3, 16, 24, 4, 40, 3, "all"),
            lambda: patch_embed_triton.forced_configs({"bwd_weight": {"split": 3}}),
        )
        label = "deterministic mode, dW split 3 ways, bitwise repeat"
        checks.append(_deterministic_check(op, "triton", dtype, label, case, device, seed))
    return checks


# ----------------------------------------------------------------------------------------------
# The extension (cuda): layer_norm, rms_norm, ln_mlp, linear_residual


def _layer_norm_case(rows, width, strided=False) -> OpCase:
    def make(gen):
        x = (
            _randn(gen, width, rows, scale=2.0, shift=0.5)
            if strided
            else _randn(gen, rows, width, scale=2.0, shift=0.5)
        )
        return [x, _randn(gen, width, scale=0.2, shift=1.0), _randn(gen, width, scale=0.2)]

    return OpCase(
        fused=lambda x, w, b: ops.layer_norm(x, w, b, 1e-6, backend="cuda"),
        peer=lambda x, w, b: reference.layer_norm(x, w, b, 1e-6),
        spec=lambda x, w, b: reference.layer_norm(x, w, b, 1e-6),
        make=make,
        layout=(lambda a: [a[0].t(), *a[1:]]) if strided else (lambda a: a),
        names=("out", "grad x", "grad weight", "grad bias"),
    )


def _ln_mlp_case(
    lead,
    width,
    hidden,
    approximate="none",
    residual=True,
    biases=True,
    strided=False,
    backend="cuda",
    act=None,
    norm="layer",
    layer_scale=False,
    hidden_norm=False,
) -> OpCase:
    """An ``ln_mlp`` case; ``act``/``norm``/``layer_scale``/``hidden_norm`` (a norm of kind ``norm`` over the hidden
    layer before fc2) pick a variant (swiglu: fc1 has 2·hidden rows)."""
    act = act or ("gelu_tanh" if approximate == "tanh" else "gelu")
    fc1_rows = 2 * hidden if act == "swiglu" else hidden
    extras = (("layer_scale",) if layer_scale else ()) + (
        ("hidden_norm_weight", "hidden_norm_bias") if hidden_norm else ()
    )  # the optional arguments after fc2_bias, by name

    def make(gen):
        x = _randn(gen, *lead, 2 * width if strided else width, scale=2.0, shift=0.5)
        args = [
            x,
            _randn(gen, width, scale=0.2, shift=1.0),
            _randn(gen, width, scale=0.2) if norm == "layer" else None,
            _randn(gen, fc1_rows, width, scale=width**-0.5),
            _randn(gen, fc1_rows, scale=0.2) if biases else None,
            _randn(gen, width, hidden, scale=hidden**-0.5),
            _randn(gen, width, scale=0.2) if biases else None,
        ]
        if layer_scale:
            args.append(_randn(gen, width, scale=0.2, shift=0.5))
        if hidden_norm:
            args += [
                _randn(gen, hidden, scale=0.2, shift=1.0),
                _randn(gen, hidden, scale=0.2) if norm == "layer" else None,
            ]
        return args

    def run(backend):
        def fn(*a):
            variant = dict(act=act, norm=norm, **dict(zip(extras, a[7:])))
            if backend == "spec":
                return reference.ln_mlp(*a[:7], 1e-6, residual=residual, **variant)
            return ops.ln_mlp(*a[:7], eps=1e-6, residual=residual, backend=backend, **variant)

        return fn

    names = ("out", "grad x", "grad ln_weight", "grad ln_bias", "grad fc1_weight", "grad fc1_bias", "grad fc2_weight")
    return OpCase(
        fused=run(backend),
        peer=run("spec"),
        spec=run("spec"),
        make=make,
        layout=(lambda a: [a[0][..., ::2], *a[1:]]) if strided else (lambda a: a),
        names=(*names, "grad fc2_bias", *(f"grad {name}" for name in extras)),
    )


def _rms_norm_case(rows, width) -> OpCase:
    def make(gen):
        return [_randn(gen, rows, width, scale=2.0, shift=0.5), _randn(gen, width, scale=0.2, shift=1.0)]

    return OpCase(
        fused=lambda x, w: ops.rms_norm(x, w, 1e-6, backend="cuda"),
        peer=lambda x, w: reference.rms_norm(x, w, 1e-6),
        spec=lambda x, w: reference.rms_norm(x, w, 1e-6),
        make=make,
        layout=lambda a: a,
        names=("out", "grad x", "grad weight"),
    )


def _linear_residual_case(lead, k, n, bias=True, strided=False, layer_scale=False) -> OpCase:
    """A ``linear_residual`` case; ``layer_scale``: a LayerScale gamma [n] too (folded into the weight by the op)."""

    def make(gen):
        extra = 2 if strided else 1
        args = [
            _randn(gen, *lead, extra * k),
            _randn(gen, n, k, scale=k**-0.5),
            _randn(gen, n, scale=0.2) if bias else None,
            _randn(gen, *lead, extra * n),
        ]
        return [*args, _randn(gen, n, scale=0.2, shift=0.5)] if layer_scale else args

    def arrange(args):
        x, w, b, r, *gamma = args
        return [x[..., ::2], w, b, r[..., ::2], *gamma] if strided else args

    def run(fn, **options):
        return lambda x, w, b, r, gamma=None: fn(x, w, b, r, **options, layer_scale=gamma)

    return OpCase(
        fused=run(ops.linear_residual, backend="cuda"),
        peer=run(reference.linear_residual),
        spec=run(reference.linear_residual),
        make=make,
        layout=arrange,
        names=(
            "out",
            "grad x",
            "grad weight",
            "grad bias",
            "grad residual",
            *(["grad layer_scale"] if layer_scale else []),
        ),
    )


def extension_checks(op: str, device: torch.device, quick: bool) -> list[Check]:
    """Checks of the extension's ops (CUDA kernels on a GPU, the C++ twin on CPU tensors)."""
    dtypes = covered_dtypes(op, "cuda", lambda d: dispatch.DeviceDtypeCall(device, d))
    gpu = device.type == "cuda"
    checks = []
    for dtype in dtypes:
        seed = 200
        if op == "layer_norm":
            cases = [("1x7", _layer_norm_case(1, 7)), ("394x192", _layer_norm_case(394, 192))]
            cases.append(("transposed 24x40 view", _layer_norm_case(24, 40, strided=True)))
            if not quick:
                cases += [("5x768", _layer_norm_case(5, 768)), ("3x1280", _layer_norm_case(3, 1280))]
            determinism = _layer_norm_case(197, 384)
        elif op == "rms_norm":
            cases = [("1x7", _rms_norm_case(1, 7)), ("394x192", _rms_norm_case(394, 192))]
            if not quick:
                cases += [("3x1280", _rms_norm_case(3, 1280))]
            determinism = _rms_norm_case(197, 384)
        elif op == "ln_mlp":
            cases = [
                ("1x1x7 -> 13", _ln_mlp_case((1, 1), 7, 13)),
                ("2x7x24 -> 96 tanh", _ln_mlp_case((2, 7), 24, 96, "tanh")),
                ("2x7x24 -> 40 no residual, no biases", _ln_mlp_case((2, 7), 24, 40, residual=False, biases=False)),
                ("2x17x48 strided x", _ln_mlp_case((2, 17), 48, 96, strided=True)),
                ("2x7x24 -> 40 quick_gelu", _ln_mlp_case((2, 7), 24, 40, act="quick_gelu")),
                ("2x7x24 -> 2x48 swiglu", _ln_mlp_case((2, 7), 24, 48, act="swiglu")),
                (
                    "2x7x24 -> 2x20 rms swiglu no biases",
                    _ln_mlp_case((2, 7), 24, 20, act="swiglu", norm="rms", biases=False),
                ),
                ("2x7x24 -> 96 tanh, layer scale", _ln_mlp_case((2, 7), 24, 96, "tanh", layer_scale=True)),
                ("2x7x24 -> 2x37 swiglu, sub-LN", _ln_mlp_case((2, 7), 24, 37, act="swiglu", hidden_norm=True)),
                (
                    "2x7x24 -> 40 rms, sub-RMSNorm, layer scale",
                    _ln_mlp_case((2, 7), 24, 40, norm="rms", hidden_norm=True, layer_scale=True),
                ),
            ]
            if not quick:
                cases += [
                    ("2x197x192 -> 768", _ln_mlp_case((2, 197), 192, 768)),
                    ("1x197x768 -> 3072 tanh", _ln_mlp_case((1, 197), 768, 3072, "tanh")),
                    (
                        "2x197x192 -> 2x512 swiglu, sub-LN",
                        _ln_mlp_case((2, 197), 192, 512, act="swiglu", hidden_norm=True),
                    ),
                ]
            determinism = _ln_mlp_case((2, 65), 64, 256)
        else:
            cases = [
                ("2x7x24 -> 40", _linear_residual_case((2, 7), 24, 40)),
                ("2x17x48 -> 48 no bias, strided", _linear_residual_case((2, 17), 48, 48, bias=False, strided=True)),
                ("2x7x24 -> 40 layer scale", _linear_residual_case((2, 7), 24, 40, layer_scale=True)),
            ]
            if not quick:
                cases += [
                    ("2x197x192 -> 192", _linear_residual_case((2, 197), 192, 192)),
                    ("1x197x768 -> 768", _linear_residual_case((1, 197), 768, 768)),
                ]
            determinism = _linear_residual_case((2, 65), 64, 64)
        if (
            gpu and dtype == torch.float32 and op not in ("layer_norm", "rms_norm")
        ):  # cuBLASLt in TF32 when PyTorch allows it
            tf32_case = dataclasses.replace(cases[1][1], fused_context=lambda: tf32(True))
            cases.append((cases[1][0] + " tf32", tf32_case))
        for label, case in cases:
            seed += 1
            checks.append(_check(op, "cuda", dtype, label, case, device, seed))
        seed += 1
        checks.append(
            _deterministic_check(op, "cuda", dtype, "deterministic mode, bitwise repeat", determinism, device, seed)
        )
    return checks


# ----------------------------------------------------------------------------------------------
# The Triton GEMMs with fused prologue/epilogue (triton): ln_linear, ln_mlp


def _ln_linear_case(
    lead, k, n, layer_norm=True, activation="gelu", residual=True, bias=True, strided=False, norm="layer", split_k=None,
    columns=None,
) -> OpCase:  # fmt: skip
    """An ``ln_linear`` case; ``norm`` 'layer' | 'rms' (no ln_bias); 'swiglu' doubles the weight's rows; ``split_k``
    forces that many slices of the weight gradient's M reduction; ``columns``: ``activation_columns``."""
    weight_rows = 2 * n if activation == "swiglu" else n

    def make(gen):
        extra = 2 if strided else 1
        return [
            _randn(gen, *lead, extra * k, scale=2.0, shift=0.5),
            _randn(gen, k, scale=0.2, shift=1.0) if layer_norm else None,
            _randn(gen, k, scale=0.2) if layer_norm and norm == "layer" else None,
            _randn(gen, weight_rows, k, scale=k**-0.5),
            _randn(gen, weight_rows, scale=0.2) if bias else None,
            _randn(gen, *lead, n) if residual else None,
        ]

    def run(backend):
        def fn(x, ln_w, ln_b, w, b, r):
            kwargs = dict(norm=norm, activation_columns=columns)
            if backend == "spec":
                return reference.ln_linear(x, ln_w, ln_b, w, b, 1e-6, activation, r, **kwargs)
            return ops.ln_linear(x, ln_w, ln_b, w, b, 1e-6, activation, r, backend=backend, **kwargs)

        return fn

    return OpCase(
        fused=run("triton"),
        peer=run("spec"),
        spec=run("spec"),
        make=make,
        layout=(lambda a: [a[0][..., ::2], *a[1:]]) if strided else (lambda a: a),
        names=("out", "grad x", "grad ln_weight", "grad ln_bias", "grad weight", "grad bias", "grad residual"),
        fused_context=(
            contextlib.nullcontext if split_k is None else functools.partial(linear_triton.forced_split_k, split_k)
        ),
    )


@contextlib.contextmanager
def _forced_gemm(configs: dict, split_k: int | None):
    """The Triton GEMMs with ``configs`` forced (see ``forced_configs``) and, unless None, ``split_k`` slices of the
    weight gradient's reduction."""
    split = contextlib.nullcontext() if split_k is None else linear_triton.forced_split_k(split_k)
    with linear_triton.forced_configs(configs), split:
        yield


def _on_hopper_path(case: OpCase) -> OpCase:
    """``case`` with its fused run inside ``hopper_path()`` (the persistent TMA forward); a forward that fell back to
    the pointer kernel, or none that ran the TMA kernel, fails the check with the recorded reason."""
    fused = case.fused

    def run(*args):
        with linear_triton.hopper_path() as path:
            result = fused(*args)
        if path.fallbacks or not path.launches:
            raise RuntimeError(f"the TMA forward did not run: {path.fallbacks or 'no forward launch'}")
        return result

    return dataclasses.replace(case, fused=run)


def _hopper_checks(op, device, dtype, arch, cases, config_cases, quick, seed) -> list[Check]:
    """sm_90 only: the TMA forward (``hopper_path``) on ``cases`` with the launcher's own configs and, in a full run in
    bfloat16 (the benchmarks' dtype; few compiles: the GPU round caps the selftest), each of its table's configs on
    ``config_cases`` (plain, SwiGLU: its own table)."""
    checks = []
    for label, case in cases:
        seed += 1
        checks.append(_check(op, "triton", dtype, f"TMA forward: {label}", _on_hopper_path(case), device, seed))
    if quick or dtype != torch.bfloat16:
        return checks
    for swiglu, case in zip((False, True), config_cases):
        for entry in linear_triton.candidate_configs("fwd_tma", arch, dtype.itemsize, swiglu):
            config = f"fwd_tma={entry}" + (" swiglu" if swiglu else "")
            forced = functools.partial(_forced_gemm, {"fwd_tma": entry}, None)
            forced_case = dataclasses.replace(_on_hopper_path(case), fused_context=forced)
            seed += 1
            label = f"TMA forward config {config}"
            checks.append(_check(op, "triton", dtype, label, forced_case, device, seed, (config,)))
    return checks


def gemm_checks(op: str, device: torch.device, quick: bool) -> list[Check]:
    """Checks of the Triton GEMMs; on a GPU also every config their autotuners may pick, one kernel kind at a time."""
    dtypes = covered_dtypes(op, "triton", lambda d: GemmCall(device, d, 64, 256, True))
    checks = []
    for dtype in dtypes:
        seed = 300
        if op == "ln_linear":
            cases = [
                ("2x7x24 -> 40 LN, gelu, residual", _ln_linear_case((2, 7), 24, 40)),
                ("1x17x48 -> 37 gelu_tanh, strided", _ln_linear_case((1, 17), 48, 37, activation="gelu_tanh",
                                                                     strided=True)),
                ("2x7x24 -> 40 no LN, no bias, no activation", _ln_linear_case((2, 7), 24, 40, False, "none",
                                                                               bias=False)),
                ("2x7x24 -> 20 RMSNorm, swiglu, residual", _ln_linear_case((2, 7), 24, 20, activation="swiglu",
                                                                            norm="rms")),
                ("1x50x40 -> 20 quick_gelu, dW split-K 3", _ln_linear_case((1, 50), 40, 20, activation="quick_gelu",
                                                                            split_k=3)),
                ("2x7x24 -> 56 gelu on 29 columns (parallel block in_proj)", _ln_linear_case((2, 7), 24, 56,
                                                                                 residual=False, columns=29)),
            ]  # fmt: skip
            config_case = _ln_linear_case((2, 197), 192, 576)
            swiglu_case = _ln_linear_case((2, 197), 192, 512, activation="swiglu", norm="rms")
        else:
            cases = [
                ("1x1x7 -> 13", _ln_mlp_case((1, 1), 7, 13, backend="triton")),
                ("2x7x24 -> 96 tanh", _ln_mlp_case((2, 7), 24, 96, "tanh", backend="triton")),
                ("2x7x24 -> 40 quick_gelu", _ln_mlp_case((2, 7), 24, 40, backend="triton", act="quick_gelu")),
                ("2x17x48 strided x, no biases", _ln_mlp_case((2, 17), 48, 96, biases=False, strided=True,
                                                              backend="triton")),
                ("2x7x24 -> 2x20 rms swiglu, sub-norm, layer scale", _ln_mlp_case((2, 7), 24, 20, backend="triton",
                    act="swiglu", norm="rms", hidden_norm=True, layer_scale=True)),
                ("2x7x24 -> 2x20 swiglu, sub-LN, no biases", _ln_mlp_case((2, 7), 24, 20, backend="triton",
                    act="swiglu", biases=False, hidden_norm=True)),
            ]  # fmt: skip
            config_case = _ln_mlp_case((2, 197), 192, 768, backend="triton")
            swiglu_case = _ln_mlp_case((2, 197), 192, 512, backend="triton", act="swiglu", hidden_norm=True)
        if not quick:
            cases.append(("2x197x192 -> 768 (576)", config_case))
        for label, case in cases:
            seed += 1
            checks.append(_check(op, "triton", dtype, label, case, device, seed))
        if _on_gpu(device):
            arch = launch.gpu_arch(torch.empty(0, device=device))
            for kind, swiglu in itertools.product(linear_triton.KINDS, (False, True)):  # SwiGLU: its own table
                for entry in linear_triton.candidate_configs(kind, arch, dtype.itemsize, swiglu):
                    for split_k in (None, 4) if kind == "weight" else (None,):  # the dW GEMM also split in 4
                        forced = functools.partial(_forced_gemm, {kind: entry}, split_k)
                        case = dataclasses.replace(swiglu_case if swiglu else config_case, fused_context=forced)
                        seed += 1
                        config = f"{kind}={entry}" + (" swiglu" if swiglu else "")
                        config += "" if split_k is None else f" split_k={split_k}"
                        checks.append(_check(op, "triton", dtype, f"config {config}", case, device, seed, (config,)))
            if op == "ln_linear" and arch // 10 == 9:  # the persistent TMA forward: Hopper only
                hopper_cases = [cases[0], cases[3]] + ([] if quick else [("2x197x192 -> 576", config_case)])
                hopper = _hopper_checks(op, device, dtype, arch, hopper_cases, (config_case, swiglu_case), quick, seed)
                checks += hopper
                seed += len(hopper)
        seed += 1
        checks.append(
            _deterministic_check(op, "triton", dtype, "deterministic mode, bitwise repeat", cases[1][1], device, seed)
        )
    return checks


CASE_BUILDERS: dict[tuple[str, str], Callable[[str, torch.device, bool], list[Check]]] = {
    ("qkv_attention", "triton"): qkv_attention_checks,
    ("attention", "triton"): attention_checks,
    ("varlen_qkv_attention", "triton"): varlen_attention_checks,
    ("patch_embed", "triton"): patch_embed_checks,
    ("patch_embed_uint8", "triton"): patch_embed_checks,
    ("layer_norm", "cuda"): extension_checks,
    ("rms_norm", "cuda"): extension_checks,
    ("ln_mlp", "cuda"): extension_checks,
    ("linear_residual", "cuda"): extension_checks,
    ("ln_linear", "triton"): gemm_checks,
    ("ln_mlp", "triton"): gemm_checks,
}


def build_checks(op: str, backend: str, device: torch.device, quick: bool) -> list[Check]:
    """Every check of ``backend``'s ``op`` on ``device``; KeyError when the selftest has no cases for it."""
    builder = CASE_BUILDERS.get((op, backend))
    if builder is None:
        raise KeyError(f"the selftest has no cases for {backend} {op}: add them to fastvit/selftest_cases.py")
    return builder(op, device, quick)
