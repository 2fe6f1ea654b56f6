"""Backend selection: which implementation of each op runs for a given call.

Backends:
  ``'torch'``   the fastest plain-PyTorch form of the op (``F.scaled_dot_product_attention``,
                ``F.layer_norm``, ``F.linear``, ``F.conv2d``); runs everywhere. It is not the spec:
                ``fastvit.reference`` is, and every backend, ``torch`` included, is tested against it.
  ``'triton'``  Triton kernels (``fastvit.kernels``) on CUDA tensors, or on CPU tensors when
                ``TRITON_INTERPRET=1`` (Triton's interpreter: how CI tests the kernels).
  ``'cuda'``    the compiled extension ``fastvit._C``: CUDA kernels on CUDA tensors, its C++
                CPU kernels on CPU tensors.
  ``'auto'``    per op and call signature: the first fused backend that can run on the input's
                device, covers the call and has evidence on this GPU, else ``'torch'``. On CPU tensors
                ``auto`` is ``'torch'``.

Each (op, backend) is registered once with :func:`register`, together with its ``supports`` predicate:
``supports(call) -> reason | None`` says why the backend does not cover a call (None: it does). ``call``
is the op's *call signature*, a small hashable tuple with everything the predicates read (device, compute
dtype, head dim, ...), never tensors. ``auto`` asks the predicates; an explicit backend raises the
predicate's reason; the fusion report asks :func:`explain`. One rule, one place.

Evidence: on CUDA tensors ``auto`` also asks the evidence check that ``fastvit.verification`` installs with
:func:`set_evidence` (a passing ``python -m fastvit selftest`` record for this kernel source, GPU and dtype);
an explicit backend never asks it. The check is a constant-result function for ``torch.compile``.

Selections are cached per (op, requested backend, call signature), so an op call costs one dict lookup
after the first call with a given signature (as timm's ``fused_attn`` flag, decided once). Anything that
changes a selection without changing the key (tests patching probes) calls :func:`clear_cache`.

The process-wide default comes from the environment variable ``FASTVIT_BACKEND`` (default ``auto``) and can
be changed with :func:`set_default_backend`. Asking explicitly for a backend that cannot run here, that does
not implement an op, or that does not cover a call raises an error that says why; nothing falls back
silently. Where ``auto`` runs ``torch`` on CUDA tensors, the ``"fastvit"`` logger says why at DEBUG level
(``logging.getLogger("fastvit").setLevel(logging.DEBUG)`` with a handler); the messages are skipped while
``torch.compile`` traces (a logging call would break the graph).

This module imports no op: the ops register themselves when ``fastvit.ops`` is imported, which
``import fastvit`` always does.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import torch

logger = logging.getLogger("fastvit")

BACKENDS = ("auto", "triton", "cuda", "torch")
FUSED_BACKENDS = ("triton", "cuda")  # auto's order of preference
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the fused kernels compute in

Supports = Callable[[Any], "str | None"]


class DtypeReason(str):
    """A ``supports`` reason about dtypes: an explicit backend raises ``TypeError`` for it (as PyTorch does for
    dtypes), ``ValueError`` for every other reason."""


class DeviceDtypeCall(NamedTuple):
    """The call signature of ops whose coverage depends on the device and the compute dtype only."""

    device: torch.device
    dtype: torch.dtype


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one op.

    Attributes:
        fn: the function the op layer calls (the op's own argument order).
        supports: ``supports(call) -> reason | None``; None covers every call the op layer accepts.
        auto_skip: ``auto_skip(call) -> reason | None``: covered, but ``auto`` should prefer ``torch``
            (e.g. fp32 attention without TF32, where the kernels have no tensor cores). An explicit
            backend ignores it.
        measured: ``measured(call) -> reason | None``: why benchmark evidence does not make ``auto`` pick this
            backend over the next one (``fastvit.gemm_choices``). Unlike ``auto_skip`` it is also asked for
            device-level calls (:func:`resolve`, where the call carries no shape), so it must accept any call.
            An explicit backend ignores it.
    """

    fn: Callable
    supports: Supports | None = None
    auto_skip: Supports | None = None
    measured: Supports | None = None


_REGISTRY: dict[str, dict[str, Implementation]] = {}
# (op, requested backend, call, interpreter on) -> (backend name, why not fused or None)
_SELECTED: dict[tuple, tuple[str, str | None]] = {}
_default_backend: str | None = None  # None: read FASTVIT_BACKEND on first use
_deterministic = False
# (op, backend, call, warn) -> why auto must not pick the backend for lack of evidence, or None; see set_evidence
EvidenceCheck = Callable[[str, str, Any, bool], "str | None"]
_evidence_check: EvidenceCheck | None = None
_evidence_summary: Callable[[str, str], str] | None = None  # (op, backend) -> verification state, for backends()


def _check_backend_name(name: object, what: str) -> str:
    if name in BACKENDS:
        return name
    if not isinstance(name, str) or name.strip().lower() not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, BACKENDS))}, got {name!r}")
    return name.strip().lower()


def get_default_backend() -> str:
    """The backend used when an op or model is given ``backend=None``."""
    global _default_backend
    if _default_backend is None:
        _default_backend = _check_backend_name(os.environ.get("FASTVIT_BACKEND", "auto") or "auto", "FASTVIT_BACKEND")
    return _default_backend


def set_default_backend(name: str) -> None:
    """Set the process-wide default backend (overrides ``FASTVIT_BACKEND``)."""
    global _default_backend
    _default_backend = _check_backend_name(name, "backend")


def set_deterministic(enabled: bool = True) -> None:
    """Ask every fused kernel for bit-identical results run to run (no atomics in reductions, fixed tiles).

    Also on whenever ``torch.use_deterministic_algorithms(True)`` is: kernels check
    :func:`deterministic_enabled`, which honours both.
    """
    global _deterministic
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _deterministic = enabled


def deterministic_enabled() -> bool:
    """True when ``fastvit.set_deterministic(True)`` or ``torch.use_deterministic_algorithms(True)`` is in force."""
    return _deterministic or torch.are_deterministic_algorithms_enabled()


def register(
    op_name: str,
    backend: str,
    *,
    supports: Supports | None = None,
    auto_skip: Supports | None = None,
    measured: Supports | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator: ``backend`` implements ``op_name`` for the calls ``supports`` accepts (see ``Implementation``)."""
    _check_backend_name(backend, "backend")
    if backend == "auto":
        raise ValueError("'auto' is a selection rule, not an implementation")

    def decorator(fn: Callable) -> Callable:
        _REGISTRY.setdefault(op_name, {})[backend] = Implementation(fn, supports, auto_skip, measured)
        clear_cache()
        return fn

    return decorator


def implementation(op_name: str, backend: str) -> Implementation:
    """The registered implementation of ``op_name`` by ``backend`` (KeyError when there is none)."""
    impl = _REGISTRY.get(op_name, {}).get(backend)
    if impl is None:
        raise KeyError(f"no {backend!r} implementation of {op_name!r} is registered")
    return impl


def fused_implementations() -> list[tuple[str, str]]:
    """Every registered (op, fused backend) pair, ops sorted, backends in ``auto``'s order."""
    return [(op, b) for op in sorted(_REGISTRY) for b in FUSED_BACKENDS if b in _REGISTRY[op]]


def implementations(op_name: str) -> tuple[str, ...]:
    """The backends that implement ``op_name``, in ``auto``'s order of preference."""
    impls = _REGISTRY.get(op_name)
    if impls is None:
        raise KeyError(f"unknown op {op_name!r}; known ops: {', '.join(sorted(_REGISTRY))}")
    return tuple(b for b in (*FUSED_BACKENDS, "torch") if b in impls)


def clear_cache() -> None:
    """Forget every cached selection (after changing what a probe, predicate or the evidence would answer)."""
    _SELECTED.clear()


def set_evidence(check: EvidenceCheck | None, summary: Callable[[str, str], str] | None = None) -> None:
    """Install the evidence gate of ``auto`` (``fastvit.verification`` does, on import); None removes it.

    Args:
        check: ``check(op, backend, call, warn) -> reason | None``, asked by ``auto`` on CUDA tensors after the
            backend's ``supports``/``auto_skip``: None lets ``auto`` pick the backend. ``warn`` is True when an
            op is about to run (``select``), False for reports (``explain``, ``resolve``).
        summary: ``summary(op, backend) -> str``, the verification state shown by :func:`backends`.
    """
    global _evidence_check, _evidence_summary
    _evidence_check, _evidence_summary = check, summary
    clear_cache()


# ----------------------------------------------------------------------------------------------
# What can run here. Probed once (imports are slow); plain module globals so that torch.compile
# traces the dispatch as constant Python.

_probe: dict[str, tuple[bool, str]] = {}
_extension_module = None


def _probe_triton() -> tuple[bool, str]:
    try:
        triton = importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising something else
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    try:
        importlib.import_module("fastvit.kernels")  # the kernels themselves must import, not only triton
    except Exception as exc:
        return False, f"the Triton kernels (fastvit.kernels) are not importable ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


def _probe_extension() -> tuple[bool, str]:
    global _extension_module
    if os.environ.get("FASTVIT_NO_EXT", "0") == "1":
        return False, "FASTVIT_NO_EXT=1: the extension is disabled"
    try:
        _extension_module = importlib.import_module("fastvit._C")
    except ImportError as exc:
        return False, (
            f"fastvit._C is not built ({exc}); reinstall with `pip install --no-build-isolation -e .` "
            "(needs a C++ compiler; nvcc for the CUDA kernels)"
        )
    if _extension_module.built_with_cuda():
        return True, f"fastvit._C with CUDA kernels (cuBLASLt {_extension_module.cublaslt_version()})"
    return True, "fastvit._C with C++ CPU kernels only (built without nvcc)"


def _status(name: str) -> tuple[bool, str]:
    if name not in _probe:
        _probe[name] = _probe_triton() if name == "triton" else _probe_extension()
    return _probe[name]


def extension_available() -> bool:
    """True when ``fastvit._C`` imports (its ops are then registered with torch.library)."""
    return _status("cuda")[0]


def triton_interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def extension_built_with_cuda() -> bool:
    return _status("cuda")[0] and _extension_module is not None and bool(_extension_module.built_with_cuda())


def backend_unusable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device``, or None when it can."""
    if backend == "torch":
        return None
    ok, why = _status(backend)
    if not ok:
        return why
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if backend == "cuda" and not extension_built_with_cuda():
            return "fastvit._C was built without CUDA kernels (nvcc was not found at build time)"
        return None
    if device.type == "cpu":
        if backend == "triton" and not triton_interpreter_enabled():
            return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1 (Triton's interpreter)"
        return None
    return f"device type {device.type!r} is not supported (CUDA or CPU tensors only)"


def kernel_dtype_reason(backend: str, device: torch.device, dtypes: tuple[torch.dtype, ...]) -> str | None:
    """The dtype rule shared by the fused kernels: why they do not compute in ``dtypes`` on ``device``, or None.

    CUDA kernels and Triton take float16, bfloat16 and float32. Triton's CPU interpreter computes bfloat16
    ``tl.dot`` wrongly (upstream triton#11584), so bfloat16 is refused there rather than answered. The
    extension's C++ CPU twin also takes float64.
    """
    if backend == "cuda" and device.type == "cpu":
        return None
    bad = sorted({str(d).removeprefix("torch.") for d in dtypes if d not in KERNEL_DTYPES})
    if bad:
        return DtypeReason(f"{', '.join(bad)} (the {backend!r} kernels take float16, bfloat16 and float32)")
    if backend == "triton" and device.type == "cpu" and torch.bfloat16 in dtypes:
        return DtypeReason(
            "bfloat16 under Triton's CPU interpreter (its bf16 tl.dot is broken, triton#11584; bf16 runs on a GPU)"
        )
    return None


def debug_enabled() -> bool:
    """True when the ``"fastvit"`` logger takes DEBUG messages and torch.compile is not tracing.

    Guard every debug message of code that ``torch.compile(fullgraph=True)`` may trace with it
    (``if dispatch.debug_enabled(): dispatch.logger.debug(...)``): the tracer sees
    ``torch.compiler.is_compiling()`` as True and drops the branch, where a logging call would break the
    graph. Building the message inside the branch also keeps it free when debugging is off.
    """
    return not torch.compiler.is_compiling() and logger.isEnabledFor(logging.DEBUG)


# ----------------------------------------------------------------------------------------------
# Selection


def _choose(
    op_name: str, requested: str, call: Hashable, coverage: bool = True, warn: bool = False
) -> tuple[str, str | None]:
    """(backend that runs the call, why it is not a fused kernel or None); raises for an explicit backend
    that is missing, unusable here, or does not cover the call. ``coverage=False`` asks about the device only
    (the ``supports``/``auto_skip`` predicates are not asked; the evidence check still is, and answers for
    calls that carry a dtype). ``warn``: passed to the evidence check (True when the op is about to run)."""
    impls = _REGISTRY.get(op_name)
    if impls is None:
        raise KeyError(f"unknown op {op_name!r}; known ops: {', '.join(sorted(_REGISTRY))}")
    device = call.device
    if requested == "auto":
        if device.type != "cuda":
            return "torch", f"'auto' runs the torch backend on {device.type} tensors"
        reasons = []
        for name in FUSED_BACKENDS:
            impl = impls.get(name)
            if impl is None:
                continue
            why = backend_unusable_reason(name, device)
            if why is None and coverage and impl.supports is not None:
                why = impl.supports(call)
            if why is None and coverage and impl.auto_skip is not None:
                why = impl.auto_skip(call)
            if why is None and impl.measured is not None:
                why = impl.measured(call)
            if why is None and _evidence_check is not None:
                why = _evidence_check(op_name, name, call, warn)
            if why is None:
                return name, None
            reasons.append(f"{name}: {why}")
        return "torch", "; ".join(reasons) or f"no fused implementation of {op_name}"
    if requested not in impls:
        raise ValueError(
            f"{op_name}: the {requested!r} backend does not implement this op; implemented by: "
            f"{', '.join(implementations(op_name))} (use backend='auto' to pick the best one per call)"
        )
    why = backend_unusable_reason(requested, device)
    if why is not None:
        raise RuntimeError(f"{op_name}: backend {requested!r} cannot run on {device.type} tensors here: {why}")
    impl = impls[requested]
    why = impl.supports(call) if coverage and impl.supports is not None else None
    if why is not None:
        error = TypeError if isinstance(why, DtypeReason) else ValueError
        raise error(
            f"{op_name}: the {requested!r} backend does not cover this input: {why}; use backend='torch' (or "
            "'auto', which picks it for such inputs)"
        )
    return requested, None if requested != "torch" else "backend 'torch' was asked for"


def select(op_name: str, backend: str | None, call: Hashable) -> Callable:
    """The function that runs ``op_name`` for ``call`` (the op's call signature) under ``backend``.

    Cached per (op, requested backend, call); an explicit backend that cannot run the call raises each time.
    """
    return _REGISTRY[op_name][selected(op_name, backend, call)].fn


def selected(op_name: str, backend: str | None, call: Hashable) -> str:
    """The name of the backend that :func:`select` runs ``call`` on (the same cache), for callers that choose
    between an op and another composition (a module calling ``ops.ln_linear`` only where it runs fused)."""
    requested = get_default_backend() if backend is None else _check_backend_name(backend, "backend")
    key = (op_name, requested, call, triton_interpreter_enabled())
    chosen = _SELECTED.get(key)
    if chosen is None:
        chosen = _choose(op_name, requested, call, warn=True)
        if not torch.compiler.is_compiling():
            _SELECTED[key] = chosen
    name, why = chosen
    if why is not None and call.device.type == "cuda" and requested == "auto" and debug_enabled():
        logger.debug("%s: 'auto' runs the torch backend on CUDA tensors (%s)", op_name, why)
    return name


def explain(op_name: str, backend: str | None, call: Hashable) -> tuple[str, str | None]:
    """``(backend that would run the call, why that is not a fused kernel)``; never raises.

    An explicit backend that cannot run the call gives ``('unusable', why)``.
    """
    try:
        requested = get_default_backend() if backend is None else _check_backend_name(backend, "backend")
        return _choose(op_name, requested, call)
    except (RuntimeError, TypeError, ValueError) as exc:
        return "unusable", str(exc)


def resolve(op_name: str, backend: str | None, device: torch.device | str, dtype: torch.dtype | None = None) -> str:
    """The backend ``op_name`` runs on tensors of ``device`` for calls every backend covers.

    A device-level answer (which backend is usable and preferred; given ``dtype``, ``auto`` also asks the
    evidence for that dtype); per-call coverage (head dim, dropout) is :func:`explain`'s, for a call signature.
    """
    device = torch.device(device)
    requested = get_default_backend() if backend is None else _check_backend_name(backend, "backend")
    return _choose(op_name, requested, DeviceOnlyCall(device, dtype), coverage=False)[0]


class DeviceOnlyCall(NamedTuple):
    """The call signature :func:`resolve` asks about: a device, and the compute dtype when it is known."""

    device: torch.device
    dtype: torch.dtype | None = None


def check_backend_supports(backend: str | None, op_names: list[str]) -> None:
    """Fail early (at model construction) when an explicit backend lacks one of ``op_names``."""
    if backend is None:
        return
    backend = _check_backend_name(backend, "backend")
    if backend in ("auto", "torch"):
        return
    missing = [op for op in op_names if backend not in implementations(op)]
    if missing:
        raise ValueError(
            f"backend {backend!r} does not implement {', '.join(missing)}; use backend='auto' (fused kernels "
            f"where they exist, the torch backend elsewhere) or backend='torch'"
        )


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can run here, why (not), and which ops it implements."""

    name: str
    available: bool
    reason: str
    ops: tuple[str, ...]
    verification: dict[str, str] = dataclasses.field(default_factory=dict)  # op -> evidence on this GPU

    def __str__(self) -> str:
        mark = "yes" if self.available else "no "
        ops = ", ".join(self.ops) if self.ops else "(no ops yet)"
        lines = [f"{self.name:<7} {mark}  {self.reason}", f"          ops: {ops}"]
        lines += [f"          {op}: {state}" for op, state in self.verification.items()]
        return "\n".join(lines)


def backends() -> dict[str, BackendInfo]:
    """Report every backend: usable here or not (and why), and the ops it implements.

    "Usable" means usable on at least one device of this machine: CUDA tensors if a GPU is present,
    otherwise CPU tensors (the C++ CPU kernels; Triton only under ``TRITON_INTERPRET=1``).
    """
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    report = {}
    for name in ("torch", *FUSED_BACKENDS):
        ops = tuple(op for op in sorted(_REGISTRY) if name in _REGISTRY[op])
        if name == "torch":
            report[name] = BackendInfo(name, True, "plain PyTorch (SDPA, F.layer_norm, F.linear, conv2d)", ops)
            continue
        ok, detail = _status(name)
        reason = backend_unusable_reason(name, device)
        if device.type == "cuda":
            where = "runs on CUDA tensors" if reason is None else reason
        elif name == "cuda":
            where = "no GPU here: its C++ CPU kernels run on CPU tensors" if reason is None else reason
        else:
            where = (
                "no GPU here: running on CPU tensors through Triton's interpreter"
                if reason is None
                else (f"no GPU here; {reason}")
            )
        verification = {}
        if _evidence_summary is not None and reason is None and device.type == "cuda":
            verification = {op: _evidence_summary(op, name) for op in ops}
        report[name] = BackendInfo(name, reason is None, f"{detail}; {where}" if ok else detail, ops, verification)
    return report
