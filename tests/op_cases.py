"""One table of fastvit's public ops for the cross-cutting test suites: PyTorch's OpInfo idea.

Each :class:`OpCase` says, for one op of ``fastvit.ops``: the names of its tensor arguments, how to build inputs
(:meth:`OpCase.make`: small by default, the sizes Triton's interpreter runs in well under a second, N <= 257 and
B·H <= 4; awkward sizes by name in :attr:`OpCase.variants`), how to call it with a backend, its spec in
``fastvit.reference``, the backends implementing it (asked from ``fastvit.dispatch``), which of them can run here
and the dtypes each takes (asked from the registered ``supports`` predicates, never a copy of the rule). The error
rule the suites compare with lives here too: :func:`assert_matches_reference` (the flash-attention rule against the
fp64 reference, on the output and every gradient) and its floors.

Suites read it as::

    @pytest.mark.parametrize("op, backend", backend_params())
    def test_something(op, backend):
        case = OP_CASES[op]
        sample = case.make(torch.float16)  # or case.variant("N197-D80"), case.make(**case.empty), ...
        assert_matches_reference(case, sample, backend)

Inputs are drawn in fp64 from a seeded generator and then cast, so every dtype sees the same values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any
from unittest import mock

import pytest
import torch

from fastvit import dispatch, ops, reference
from fastvit.ops.patch_embed import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from utils import DEVICE, DTYPE_TOLS, assert_within_torch_error, backend_skip_reason

# The floating dtypes a backend may take; the order is the order of OpCase.dtypes (hypothesis samples from it).
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
REFERENCE = "reference"  # a pseudo-backend for OpCase.run: the spec in fastvit.reference


# ------------------------------------------------------------------------------------------------
# Samples: one set of inputs of an op


@dataclasses.dataclass(frozen=True)
class Sample:
    """The inputs of one op call.

    Attributes:
        tensors: the tensor arguments by name, in the op's order (None for an absent optional one).
        kwargs: the other arguments (``num_heads``, ``eps``, ``mean``...), passed by name.
    """

    tensors: dict[str, torch.Tensor | None]
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor | None:
        return self.tensors[name]

    @property
    def main(self) -> str:
        """The name of the first tensor argument (the activations or images)."""
        return next(iter(self.tensors))

    @property
    def args(self) -> list[torch.Tensor | None]:
        """The tensor arguments in the op's order (for positional calls of the ``torch.ops.fastvit`` ops)."""
        return list(self.tensors.values())

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the floating tensors."""
        return next(t.dtype for t in self.tensors.values() if t is not None and t.is_floating_point())

    def float_names(self) -> list[str]:
        """Names of the floating tensors present (those that get a gradient)."""
        return [n for n, t in self.tensors.items() if t is not None and t.is_floating_point()]

    def replace(self, **tensors: torch.Tensor | None) -> Sample:
        unknown = set(tensors) - set(self.tensors)
        if unknown:
            raise KeyError(f"no tensor argument named {sorted(unknown)}; arguments: {list(self.tensors)}")
        return Sample({**self.tensors, **tensors}, self.kwargs)

    def with_kwargs(self, **kwargs: Any) -> Sample:
        return Sample(self.tensors, {**self.kwargs, **kwargs})

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], floats_only: bool = True) -> Sample:
        """``fn`` applied to every floating tensor (to uint8 images too unless ``floats_only``; absent ones stay)."""
        return Sample(
            {
                n: fn(t) if t is not None and (t.is_floating_point() or not floats_only) else t
                for n, t in self.tensors.items()
            },
            self.kwargs,
        )

    def to(self, dtype: torch.dtype) -> Sample:
        return self.map(lambda t: t.to(dtype))

    def double(self) -> Sample:
        return self.to(torch.float64)


class _Draw:
    """fp64 normal draws (and uint8 images) from one seeded CPU generator, in call order."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64) * scale + offset

    def images(self, *shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, generator=self.gen, dtype=torch.uint8)


def randn(
    *shape: int, dtype=torch.float32, device=DEVICE, seed: int = 0, scale: float = 1.0, offset: float = 0.0
) -> torch.Tensor:
    """One fp64 normal draw from ``seed``, ``* scale + offset``, then cast: for a suite's op-specific tensor."""
    return _Draw(seed)(*shape, scale=scale, offset=offset).to(device, dtype)


def relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` as a view with other strides (never a copy's strides).

    ``"contiguous"``: ``t``; ``"slice"``: every other element along the last dim of a wider buffer, at an offset;
    ``"transposed"``: the first two dims swapped in memory; ``"channels_last"``: NHWC memory of a 4-D ``t``.
    """
    if layout == "contiguous":
        return t
    if layout == "slice":
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 3, dtype=t.dtype, device=t.device)
        wide[..., 3::2] = t
        return wide[..., 3::2]
    if layout == "transposed":
        return t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() >= 2 else t
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    raise ValueError(f"unknown layout {layout!r}")


# ------------------------------------------------------------------------------------------------
# Input builders: (draw, **shape options) -> (tensors by name, other arguments). The keyword defaults are the
# small default sample; OpCase reads them from the signature.


def _qkv_attention(draw: _Draw, *, batch=2, tokens=7, heads=2, head_dim=32):
    """qkv [B, N, 3·H·D]."""
    return {"qkv": draw(batch, tokens, 3 * heads * head_dim)}, {"num_heads": heads}


def _attention(draw: _Draw, *, batch=2, heads=2, q_tokens=7, kv_tokens=9, head_dim=32, v_head_dim=None):
    """q [B, H, N, D], k [B, H, M, D], v [B, H, M, Dv]."""
    return {
        "q": draw(batch, heads, q_tokens, head_dim),
        "k": draw(batch, heads, kv_tokens, head_dim),
        "v": draw(batch, heads, kv_tokens, head_dim if v_head_dim is None else v_head_dim),
    }, {}


def _patch_params(draw: _Draw, in_chans, patch, grid, dim, prefix, pos, bias) -> dict:
    """weight [D, Cin, PH, PW] (fan-in scaled), bias [D], pos_embed [1, T+N or N, D], cls_token [1, T, D]."""
    (patch_h, patch_w), (grid_h, grid_w) = patch, grid
    pos_tokens = {"all": grid_h * grid_w + prefix, "patch": grid_h * grid_w, None: 0}[pos]
    return {
        "weight": draw(dim, in_chans, patch_h, patch_w, scale=(in_chans * patch_h * patch_w) ** -0.5),
        "bias": draw(dim, scale=0.5) if bias else None,
        "pos_embed": draw(1, pos_tokens, dim, scale=0.5) if pos_tokens else None,
        "cls_token": draw(1, prefix, dim, scale=0.5) if prefix else None,
    }


def _patch_embed(
    draw: _Draw, *, batch=2, in_chans=3, patch=(4, 4), grid=(2, 3), dim=16, prefix=1, pos="all", bias=True,
    channels_last=False, norm=None, norm_bias=True,
):  # fmt: skip
    """x [B, Cin, GH·PH, GW·PW] (NHWC memory with ``channels_last``) and the projection parameters; ``pos``:
    'all' (T+N tokens), 'patch' (N) or None; ``norm``: 'layer' | 'rms' adds the patch tokens' norm (``norm_weight``,
    and ``norm_bias`` for a LayerNorm with ``norm_bias``; eps 1e-5 as AIMv2's), None: none (the default sample)."""
    x = draw(batch, in_chans, grid[0] * patch[0], grid[1] * patch[1])
    x = relayout(x, "channels_last" if channels_last else "contiguous")
    tensors = {"x": x, **_patch_params(draw, in_chans, patch, grid, dim, prefix, pos, bias)}
    if norm is None:
        return tensors, {}
    tensors["norm_weight"] = draw(dim, scale=0.2, offset=1.0)
    if norm == "layer" and norm_bias:
        tensors["norm_bias"] = draw(dim, scale=0.2)
    return tensors, {"norm": norm, "norm_eps": 1e-5}


def _patch_embed_uint8(
    draw: _Draw, *, batch=2, in_chans=3, patch=(4, 4), grid=(2, 3), dim=16, prefix=1, pos="all", bias=True,
    channels_last=True, mean=None, std=None,
):  # fmt: skip
    """uint8 images [B, H, W, C] (``channels_last``) or [B, C, H, W], the projection parameters, and ``mean``/``std``
    when given (else the op's ImageNet defaults)."""
    height, width = grid[0] * patch[0], grid[1] * patch[1]
    images = draw.images(batch, height, width, in_chans)
    if not channels_last:
        images = images.permute(0, 3, 1, 2).contiguous()
    kwargs = {"channels_last": channels_last}
    kwargs.update({k: v for k, v in (("mean", mean), ("std", std)) if v is not None})
    return {"images": images, **_patch_params(draw, in_chans, patch, grid, dim, prefix, pos, bias)}, kwargs


def _layer_norm(draw: _Draw, *, lead=(2, 5), width=24):
    """x [*lead, C] (mean 0.5, std 2), weight, bias [C]."""
    x = draw(*lead, width, scale=2.0, offset=0.5)
    return {"x": x, "weight": draw(width, scale=0.2, offset=1.0), "bias": draw(width, scale=0.2)}, {}


def _rms_norm(draw: _Draw, *, lead=(2, 5), width=24):
    """x [*lead, C] (mean 0.5, std 2), weight [C]."""
    return {"x": draw(*lead, width, scale=2.0, offset=0.5), "weight": draw(width, scale=0.2, offset=1.0)}, {}


def _ln_mlp(
    draw: _Draw, *, lead=(2, 5), width=24, hidden=40, fc1_bias=True, fc2_bias=True, act="gelu", norm="layer",
    ln_bias=True, hidden_norm=False, layer_scale=False,
):  # fmt: skip
    """x [*lead, C], LayerNorm weight/bias [C], fc1 [Hid, C] + [Hid], fc2 [C, Hid] + [C] (fan-in scaled).

    Variants: ``act`` (swiglu: fc1 [2·Hid, C]), ``norm`` ('rms': no ln_bias), ``ln_bias=False``, ``hidden_norm`` (a
    norm over Hid: ``hidden_norm_weight``/``_bias``), ``layer_scale`` (gamma [C]); the default sample has none.
    """
    fc1_rows = 2 * hidden if act == "swiglu" else hidden
    tensors = {
        "x": draw(*lead, width, scale=2.0, offset=0.5),
        "ln_weight": draw(width, scale=0.2, offset=1.0),
        "ln_bias": draw(width, scale=0.2) if ln_bias and norm == "layer" else None,
        "fc1_weight": draw(fc1_rows, width, scale=width**-0.5),
        "fc1_bias": draw(fc1_rows, scale=0.2) if fc1_bias else None,
        "fc2_weight": draw(width, hidden, scale=hidden**-0.5),
        "fc2_bias": draw(width, scale=0.2) if fc2_bias else None,
    }
    if hidden_norm:
        tensors["hidden_norm_weight"] = draw(hidden, scale=0.2, offset=1.0)
        tensors["hidden_norm_bias"] = draw(hidden, scale=0.2) if norm == "layer" else None
    if layer_scale:
        tensors["layer_scale"] = draw(width, scale=0.2, offset=0.5)
    kwargs = {}  # only what differs from the plain MLP, so the default sample is today's call
    if act != "gelu":
        kwargs["act"] = act
    if norm != "layer":
        kwargs["norm"] = norm
    return tensors, kwargs


def _linear_residual(draw: _Draw, *, lead=(2, 5), in_features=24, out_features=40, bias=True, layer_scale=False):
    """x [*lead, K], weight [N, K] (fan-in scaled), bias [N], residual [*lead, N] (mean 0.5, std 2); ``layer_scale``:
    a LayerScale gamma [N] too (keyword-only)."""
    tensors = {
        "x": draw(*lead, in_features),
        "weight": draw(out_features, in_features, scale=in_features**-0.5),
        "bias": draw(out_features, scale=0.2) if bias else None,
        "residual": draw(*lead, out_features, scale=2.0, offset=0.5),
    }
    if layer_scale:
        tensors["layer_scale"] = draw(out_features, scale=0.2, offset=0.5)
    return tensors, {}


def _ln_linear(
    draw: _Draw, *, lead=(2, 5), in_features=24, out_features=40, layer_norm=True, bias=True, residual=True,
    activation="gelu", norm="layer", ln_bias=True, activation_columns=None,
):  # fmt: skip
    """x [*lead, K] (mean 0.5, std 2), norm weight [K] or None, LayerNorm bias [K] or None, weight [N, K] ([2N, K]
    for 'swiglu'; fan-in scaled), bias [N] ([2N]) or None, residual [*lead, N] or None; ``activation``, ``norm``
    ('layer' | 'rms': no ln_bias) and ``activation_columns`` as the op's keywords."""
    weight_rows = 2 * out_features if activation == "swiglu" else out_features
    tensors = {
        "x": draw(*lead, in_features, scale=2.0, offset=0.5),
        "ln_weight": draw(in_features, scale=0.2, offset=1.0) if layer_norm else None,
        "ln_bias": draw(in_features, scale=0.2) if layer_norm and ln_bias and norm == "layer" else None,
        "weight": draw(weight_rows, in_features, scale=in_features**-0.5),
        "bias": draw(weight_rows, scale=0.2) if bias else None,
        "residual": draw(*lead, out_features) if residual else None,
    }
    kwargs = {"activation": activation}
    if norm != "layer":  # only what differs from the defaults, so the default sample is today's call
        kwargs["norm"] = norm
    if activation_columns is not None:
        kwargs["activation_columns"] = activation_columns
    return tensors, kwargs


def _patch_embed_uint8_reference(
    images, weight, bias, pos_embed=None, cls_token=None, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
    channels_last=True,
):  # fmt: skip
    """The spec of ``ops.patch_embed_uint8``: torchvision's Normalize, rounded to weight's dtype, then patch_embed."""
    nchw = images.permute(0, 3, 1, 2) if channels_last else images
    return reference.patch_embed(reference.normalize_uint8(nchw, mean, std, weight.dtype), weight, bias, pos_embed,
                                 cls_token)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# The table


class _Captured(Exception):
    pass


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity (functools.cache keys)
class OpCase:
    """One public op: how to build its inputs, call it, its reference and its backends.

    Attributes:
        name: the op's name in ``fastvit.ops`` and in ``fastvit.dispatch``.
        arg_names: its tensor arguments, in call order; the first is the main input. ``build`` may return more
            (keyword-only tensors of a variant, e.g. ln_mlp's ``layer_scale``): samples list them after these.
        build: ``build(draw, **shape) -> (tensors, kwargs)``; its keyword defaults are the default sample.
        reference_fn: the spec, called with the op's arguments by name.
        main_rank: the rank the main input must have; None for ``[..., C]`` (any rank >= 1).
        optional: the tensor arguments that may be None.
        empty: the shape options of an empty batch; by default ``batch=0`` for a fixed-rank main input (whose
            builder takes ``batch``), ``lead=(0, 5)`` for ``[..., C]`` (whose builder takes ``lead``).
        variants: awkward sizes by label: shape options for :meth:`make` (the project's ragged sizes: 1, 7, 50,
            197, 257, 577 tokens; odd widths; batch 1 and 3).
    """

    name: str
    arg_names: tuple[str, ...]
    build: Callable[..., tuple[dict, dict]]
    reference_fn: Callable[..., torch.Tensor]
    main_rank: int | None
    optional: tuple[str, ...] = ()
    empty: dict[str, Any] | None = None
    variants: dict[str, dict] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.empty is None:
            empty = dict(lead=(0, 5)) if self.main_rank is None else dict(batch=0)
            object.__setattr__(self, "empty", empty)  # frozen

    def __repr__(self) -> str:
        return f"OpCase({self.name!r})"

    @property
    def defaults(self) -> dict[str, Any]:
        """The shape options of the default sample."""
        params = inspect.signature(self.build).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def make(
        self,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = DEVICE,
        *,
        requires_grad: bool = False,
        seed: int = 0,
        **shape: Any,
    ) -> Sample:
        """Inputs for the shape options ``shape`` (see :attr:`defaults`), drawn in fp64 from ``seed``, floating
        tensors cast to ``dtype`` (uint8 images stay uint8), all on ``device``."""
        unknown = set(shape) - set(self.defaults)
        if unknown:
            raise TypeError(f"{self.name}: unknown shape options {sorted(unknown)}; known: {sorted(self.defaults)}")
        tensors, kwargs = self.build(_Draw(seed), **shape)
        made = {}
        # The op's tensor arguments, then any keyword-only ones a variant adds (ln_mlp's hidden_norm_weight...).
        for name in (*self.arg_names, *(n for n in tensors if n not in self.arg_names)):
            t = tensors[name]
            if t is not None:
                t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                t.requires_grad_(requires_grad and t.is_floating_point())
            made[name] = t
        return Sample(made, kwargs)

    def variant(self, label: str, **overrides: Any) -> Sample:
        """:meth:`make` with the shape options of the variant ``label`` (``overrides`` go to make)."""
        options = {**self.variants[label], **overrides}
        return self.make(**options)

    # -- calling

    def call(self, sample: Sample, backend: str | None) -> torch.Tensor:
        """``fastvit.ops.<name>`` on ``sample`` with ``backend`` (:data:`REFERENCE`: the spec)."""
        if backend == REFERENCE:
            return self.reference_fn(**sample.tensors, **sample.kwargs)
        return getattr(ops, self.name)(**sample.tensors, **sample.kwargs, backend=backend)

    def reference(self, sample: Sample) -> torch.Tensor:
        return self.call(sample, REFERENCE)

    def as_function(self, sample: Sample, backend: str | None) -> Callable[..., torch.Tensor]:
        """The op as a function of ``sample``'s tensor arguments, positionally (for gradcheck, torch.compile)."""
        names = list(sample.tensors)
        return lambda *tensors: self.call(Sample(dict(zip(names, tensors)), sample.kwargs), backend)

    def run(self, sample: Sample, backend: str | None, grad_seed: int = 1) -> list[torch.Tensor | None]:
        """``[output, gradient of every tensor argument]`` (None for absent and uint8 ones) for the fixed output
        gradient :func:`fixed_grad` ``(out, grad_seed)``. The inputs keep their strides (no copy)."""
        leaves = Sample(
            {
                n: None if t is None else t.detach().requires_grad_(t.is_floating_point())
                for n, t in sample.tensors.items()
            },
            sample.kwargs,
        )
        out = self.call(leaves, backend)
        wanted = [t for t in leaves.tensors.values() if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, fixed_grad(out, grad_seed)))
        return [out.detach()] + [next(grads) if t is not None and t.requires_grad else None for t in leaves.args]

    def labels(self, sample: Sample) -> list[str]:
        """Names of :meth:`run`'s entries: ``out``, ``grad <argument>``."""
        return ["out", *(f"grad {name}" for name in sample.tensors)]

    # -- backends

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends implementing the op (dispatch's registry), fused ones first."""
        return dispatch.implementations(self.name)

    @property
    def fused_backends(self) -> tuple[str, ...]:
        return tuple(b for b in self.backends if b != "torch")

    @property
    def runnable_backends(self) -> tuple[str, ...]:
        """The backends implementing the op that can run on DEVICE tensors in this process."""
        return tuple(b for b in self.backends if backend_skip_reason(b) is None)

    def signature(self, sample: Sample) -> Any:
        """The call signature the op itself builds for ``sample`` (what the ``supports`` predicates read): the op
        runs its checks and hands the signature to ``dispatch.select``, which is intercepted."""
        captured = []

        def capture(op_name, backend, call):
            captured.append(call)
            raise _Captured

        with mock.patch.object(dispatch, "select", capture), contextlib.suppress(_Captured):
            self.call(sample, "auto")
        if not captured:
            raise RuntimeError(f"{self.name} did not ask dispatch.select for a backend")
        return captured[0]

    def dtypes(self, backend: str, device: torch.device | str = DEVICE) -> tuple[torch.dtype, ...]:
        """The floating dtypes ``backend`` takes for this op on ``device`` (empty when it cannot run there), as its
        registered ``supports`` predicate answers for the default sample."""
        return _dtypes(self, backend, torch.device(device))


@functools.cache
def _dtypes(case: OpCase, backend: str, device: torch.device) -> tuple[torch.dtype, ...]:
    taken = []
    for dtype in FLOAT_DTYPES:
        chosen, _ = dispatch.explain(case.name, backend, case.signature(case.make(dtype=dtype, device=device)))
        if chosen == backend:
            taken.append(dtype)
    return tuple(taken)


# Ragged token counts (STYLE: 1, 7, 50, 197, 257, 577), reached through image sizes with 4x4 patches:
# tokens = prefix + (H/4)·(W/4). At 257 tokens and more, batch 1 (Triton's interpreter).
_PATCH_TOKENS = {1: ((1, 1), 0), 7: ((1, 7), 0), 50: ((7, 7), 1), 197: ((14, 14), 1), 257: ((16, 16), 1),
                 577: ((24, 24), 1)}  # fmt: skip


def _patch_variants(tokens: Iterable[int], layouts: Iterable[str] = ("",), **common) -> dict[str, dict]:
    """Variants by token count (and, for the float op, image memory format: '' or 'channels_last')."""
    return {
        f"N{n}{'-' + layout if layout else ''}": dict(
            grid=grid, prefix=prefix, batch=1 if n >= 257 else 2, **common, **({layout: True} if layout else {})
        )
        for n, (grid, prefix) in _PATCH_TOKENS.items()
        if n in tokens
        for layout in layouts
    }


_QKV_SIZES = [(n, d) for n in (1, 7, 50, 197, 257, 577) for d in (32, 128)] + [(n, 80) for n in (7, 197, 577)]

QKV_ATTENTION = OpCase(
    "qkv_attention",
    ("qkv",),
    _qkv_attention,
    reference.qkv_attention,
    main_rank=3,
    variants={
        # B·H <= 2 at 577 tokens (the interpreter)
        **{f"N{n}-D{d}": dict(batch=1, tokens=n, heads=2 if n <= 257 else 1, head_dim=d) for n, d in _QKV_SIZES},
        **{f"B{b}-N{n}": dict(batch=b, tokens=n) for b, n in ((3, 50), (3, 1), (1, 1))},
    },
)
ATTENTION = OpCase(
    "attention",
    ("q", "k", "v"),
    _attention,
    reference.attention,
    main_rank=4,
    variants={
        f"N{n}xM{m}": dict(batch=1, heads=1, q_tokens=n, kv_tokens=m, head_dim=64)
        for n, m in ((1, 577), (577, 1), (7, 257), (257, 50), (50, 197))
    },
)
PATCH_EMBED = OpCase(
    "patch_embed",
    ("x", "weight", "bias", "pos_embed", "cls_token"),
    _patch_embed,
    reference.patch_embed,
    optional=("bias", "pos_embed", "cls_token"),
    main_rank=4,
    variants={
        **_patch_variants(_PATCH_TOKENS, ("", "channels_last"), dim=24),  # D = 24: masked columns
        # The patch tokens' norm (AIMv2's RMSNorm; LayerNorm): D = 72, two ragged D tiles per row in the interpreter.
        "N50-rms": dict(grid=(7, 7), prefix=1, dim=72, norm="rms"),
        "N7-layer-channels_last": dict(grid=(1, 7), prefix=0, dim=72, norm="layer", channels_last=True),
    },
)
PATCH_EMBED_UINT8 = OpCase(
    "patch_embed_uint8",
    ("images", "weight", "bias", "pos_embed", "cls_token"),
    _patch_embed_uint8,
    _patch_embed_uint8_reference,
    optional=("bias", "pos_embed", "cls_token"),
    main_rank=4,
    variants=_patch_variants((1, 7, 197), dim=24, pos=None),
)
LAYER_NORM = OpCase(
    "layer_norm",
    ("x", "weight", "bias"),
    _layer_norm,
    reference.layer_norm,
    main_rank=None,
    variants={
        f"{rows}x{width}": dict(lead=(rows,), width=width)
        for rows in (1, 7, 50)
        for width in (1, 7, 50, 197, 257, 577, 768, 2048)
    },
)
RMS_NORM = OpCase(
    "rms_norm",
    ("x", "weight"),
    _rms_norm,
    reference.rms_norm,
    main_rank=None,
    variants={f"{rows}x{width}": dict(lead=(rows,), width=width) for rows in (1, 7, 50) for width in (1, 7, 257, 768)},
)
_WIDTH_HIDDEN = ((1, 1), (1, 5), (7, 1), (7, 29), (50, 197), (197, 50), (257, 577), (577, 257))


def _gemm_variants(in_name: str, out_name: str) -> dict[str, dict]:
    """The GEMM ops' variants: 1 or 7 rows times each (in, out) width pair of ``_WIDTH_HIDDEN``."""
    return {
        f"{rows}x{k}->{n}": dict(lead=(rows,), **{in_name: k, out_name: n}) for rows in (1, 7) for k, n in _WIDTH_HIDDEN
    }


LN_MLP = OpCase(
    "ln_mlp",
    ("x", "ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"),
    _ln_mlp,
    reference.ln_mlp,
    optional=("fc1_bias", "fc2_bias"),
    main_rank=None,
    variants=_gemm_variants("width", "hidden"),
)
LINEAR_RESIDUAL = OpCase(
    "linear_residual",
    ("x", "weight", "bias", "residual"),
    _linear_residual,
    reference.linear_residual,
    optional=("bias",),
    main_rank=None,
    variants=_gemm_variants("in_features", "out_features"),
)
LN_LINEAR = OpCase(
    "ln_linear",
    ("x", "ln_weight", "ln_bias", "weight", "bias", "residual"),
    _ln_linear,
    reference.ln_linear,
    optional=("ln_weight", "ln_bias", "bias", "residual"),
    main_rank=None,
    variants=_gemm_variants("in_features", "out_features"),
)

OP_CASES: dict[str, OpCase] = {
    case.name: case
    for case in (
        QKV_ATTENTION,
        ATTENTION,
        PATCH_EMBED,
        PATCH_EMBED_UINT8,
        LAYER_NORM,
        RMS_NORM,
        LN_MLP,
        LINEAR_RESIDUAL,
        LN_LINEAR,
    )
}


def backend_params(
    op_names: Iterable[str] | None = None,
    *,
    fused_only: bool = False,
    extra: Iterable[tuple] | Callable[[OpCase, str], Iterable[tuple]] = ((),),
) -> list:
    """``pytest.param(op, backend, *more)`` for every (op, backend implementing it) — fused backends only with
    ``fused_only`` — times every tuple ``more`` of ``extra`` (or of ``extra(case, backend)``); a backend that cannot
    run here is marked skip with the reason. Ids: ``op-backend[-more]``, dtypes without ``torch.``."""
    params = []
    for name in OP_CASES if op_names is None else op_names:
        case = OP_CASES[name]
        for backend in case.fused_backends if fused_only else case.backends:
            reason = backend_skip_reason(backend)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            for more in extra(case, backend) if callable(extra) else extra:
                ident = "-".join(_param_id(v) for v in (name, backend, *more))
                params.append(pytest.param(name, backend, *more, marks=marks, id=ident))
    return params


def _param_id(value: Any) -> str:
    return (
        str(value).removeprefix("torch.")
        if isinstance(value, torch.dtype)
        else f"{value:g}"
        if isinstance(value, float)
        else str(value)
    )


# ------------------------------------------------------------------------------------------------
# Error rules


def fixed_grad(out: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """The output gradient the suites use: an fp64 normal draw of ``out``'s shape from ``seed``, cast to ``out``."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        out.device, out.dtype
    )


@dataclasses.dataclass
class Comparison:
    """:meth:`OpCase.run` of one sample three ways: the backend, the reference in the sample's dtype, the reference
    in fp64 (the exact answer)."""

    labels: list[str]
    ours: list[torch.Tensor | None]
    same: list[torch.Tensor | None]
    exact: list[torch.Tensor | None]
    dtype: torch.dtype
    grad_out: torch.Tensor  # fp64

    @property
    def scale(self) -> float:
        """The largest magnitude of the exact output and gradients."""
        return max((t.abs().max().item() for t in self.exact if t is not None and t.numel()), default=0.0)


Floor = Callable[[Comparison, torch.Tensor], float]


def fp32_noise_floor(rel: float = 1e-6) -> Floor:
    """``rel`` x (1 + the case's largest exact value): fp32 cancellation noise where PyTorch happens to be exact
    (one key: softmax is 1, dq is exactly 0)."""
    return lambda cmp, exact: rel * (1.0 + cmp.scale)


def relative_floor(rel: float) -> Floor:
    """``rel`` x max(1, max|exact|) of each tensor."""
    return lambda cmp, exact: rel * max(exact.abs().max().item(), 1.0) if exact.numel() else 0.0


def rounding_floor(roundings: float = 2.0, per_grad_out: float = 0.0) -> Floor:
    """``roundings`` roundings of the dtype (plus 1e-6 fp32 noise) at the scale of the exact results, plus
    ``per_grad_out`` x max|grad_out| (a term of an error model proportional to the output gradient)."""

    def floor(cmp: Comparison, exact: torch.Tensor) -> float:
        rounding = (roundings * torch.finfo(cmp.dtype).eps + 1e-6) * (1.0 + cmp.scale)
        return rounding + per_grad_out * cmp.grad_out.abs().max().item()

    return floor


def compare(case: OpCase, sample: Sample, backend: str, grad_seed: int = 1) -> Comparison:
    """Run ``sample`` on ``backend``, on the reference in its dtype and on the reference in fp64."""
    exact = case.run(sample.double(), REFERENCE, grad_seed)
    return Comparison(
        labels=case.labels(sample),
        ours=case.run(sample, backend, grad_seed),
        same=case.run(sample, REFERENCE, grad_seed) if sample.dtype != torch.float64 else exact,
        exact=exact,
        dtype=sample.dtype,
        grad_out=fixed_grad(exact[0], grad_seed),
    )


def assert_matches_reference(
    case: OpCase, sample: Sample, backend: str, *, floor: Floor | None = None, name: str = "", grad_seed: int = 1
) -> Comparison:
    """``backend`` on ``sample`` against the fp64 reference, output and every gradient.

    Each result must have the exact result's shape and the same-dtype reference's dtype, be finite (an element a
    kernel failed to write stays NaN in the suites' poisoned allocations), and keep flash-attention's rule:
    ``max|ours - exact| <= 2 max|reference in the same dtype - exact| + floor`` (``floor`` defaults to
    :func:`fp32_noise_floor`). An fp64 sample is compared with ``DTYPE_TOLS[float64]`` instead.
    """
    floor = fp32_noise_floor() if floor is None else floor
    cmp = compare(case, sample, backend, grad_seed)
    title = f"{case.name} {backend} {name}".rstrip()
    for label, mine, theirs, ref in zip(cmp.labels, cmp.ours, cmp.same, cmp.exact):
        if ref is None:
            assert mine is None, f"{title} {label}: a gradient where the reference has none"
            continue
        assert mine.shape == ref.shape and mine.dtype == theirs.dtype, (title, label, mine.shape, mine.dtype)
        assert torch.isfinite(mine).all(), f"{title} {label}: non-finite (an element not written?)"
        if cmp.dtype == torch.float64:
            torch.testing.assert_close(mine, ref, **DTYPE_TOLS[torch.float64], msg=f"{title} {label}")
        else:
            assert_within_torch_error(f"{title} {label} {cmp.dtype}", mine, theirs, ref, floor=floor(cmp, ref))
    return cmp


def assert_compiles_with_backward(case: OpCase, sample: Sample, backend: str, compiler: str = "aot_eager") -> None:
    """``backend`` on ``sample`` under ``torch.compile(fullgraph=True, backend=compiler)``: the output and the gradient
    of every tensor present match the reference (the absent optional ones stay out of the traced signature)."""
    names = [n for n, t in sample.tensors.items() if t is not None]
    present = [sample.tensors[n] for n in names]

    def fn(*tensors):
        return case.call(sample.replace(**dict(zip(names, tensors))), backend)

    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    out, expected = compiled(*present), case.reference(sample)
    tols = DTYPE_TOLS[sample.dtype]
    torch.testing.assert_close(out, expected, **tols)
    grads = torch.autograd.grad(out.square().sum(), present)
    expected_grads = torch.autograd.grad(expected.square().sum(), present)
    for name, got, want in zip(names, grads, expected_grads):
        torch.testing.assert_close(got, want, **tols, msg=f"d{name}")


def assert_compiled_gradients_equal_eager(step, inputs, exact: bool = True) -> None:
    """``step(*inputs)`` -> a scalar loss: under ``torch.compile(fullgraph=True, backend='aot_eager')`` (a graph break
    or a custom op without its fake impl fails here) the gradient of every input equals eager's, bit for bit when
    ``exact`` (the same kernels run in both), else within the float32 tolerances."""
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager, fused = ([t.detach().clone().requires_grad_(True) for t in inputs] for _ in range(2))
    step(*eager).backward()
    compiled(*fused).backward()
    tols = dict(rtol=0, atol=0) if exact else {}
    for index, (a, b) in enumerate(zip(eager, fused)):
        torch.testing.assert_close(b.grad, a.grad, **tols, msg=lambda m, i=index: f"input {i}: {m}")


def assert_deterministic_runs_are_bit_identical(case: OpCase, sample: Sample, backend: str) -> None:
    """Two runs of ``backend`` on ``sample`` in fastvit's deterministic mode: the same output and gradients, bit for
    bit (the same ones absent)."""
    dispatch.set_deterministic(True)
    try:
        first, second = case.run(sample, backend), case.run(sample, backend)
    finally:
        dispatch.set_deterministic(False)
    for label, a, b in zip(case.labels(sample), first, second):
        assert (a is None and b is None) or torch.equal(a, b), f"{case.name} {backend} {label} differs run to run"
