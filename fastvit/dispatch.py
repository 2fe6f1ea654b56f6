"""Backend selection: which implementation of each fused op runs on which tensors.

Backends:
  ``'torch'``   the pure-PyTorch reference (``fastvit.reference``); always available.
  ``'triton'``  Triton kernels (``fastvit.kernels``) on CUDA tensors, or on CPU tensors when
                ``TRITON_INTERPRET=1`` (Triton's interpreter: how CI tests the kernels).
  ``'cuda'``    the compiled extension ``fastvit._C``: CUDA kernels on CUDA tensors, its C++
                CPU kernels on CPU tensors.
  ``'auto'``    per op and per call: the first fused implementation usable on the input's device
                (CUDA tensors only), else ``'torch'``. On CPU tensors ``auto`` is always ``'torch'``.

The process-wide default comes from the environment variable ``FASTVIT_BACKEND`` (default
``auto``) and can be changed with :func:`set_default_backend`. Asking explicitly for a backend that
cannot run here, or that does not implement an op, raises a ``RuntimeError``/``ValueError`` that
says why; there is no silent fallback.

Where ``auto`` runs the reference on CUDA tensors (no usable fused backend, or an input the kernels
do not cover), the ``"fastvit"`` logger says so at DEBUG level, e.g.
``logging.getLogger("fastvit").setLevel(logging.DEBUG)`` with a handler (``logging.basicConfig()``).
These messages are skipped while ``torch.compile`` traces (a logging call would break the graph).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
from collections.abc import Callable

import torch

logger = logging.getLogger("fastvit")

BACKENDS = ("auto", "triton", "cuda", "torch")
FUSED_BACKENDS = ("triton", "cuda")

# op name -> {backend name -> implementation}; filled by the modules in fastvit/ops/ at import.
_IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {}
_default_backend: str | None = None  # None: read FASTVIT_BACKEND on first use
_deterministic = False


def _check_backend_name(name: object, what: str) -> str:
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
    """Ask every fused kernel for bit-identical results run to run (no atomics in reductions).

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


def register(op_name: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator used by ``fastvit/ops/*.py`` to declare that ``backend`` implements ``op_name``."""
    _check_backend_name(backend, "backend")
    if backend == "auto":
        raise ValueError("'auto' is a selection rule, not an implementation")

    def decorator(fn: Callable) -> Callable:
        _IMPLEMENTATIONS.setdefault(op_name, {})[backend] = fn
        return fn

    return decorator


def implementations(op_name: str) -> tuple[str, ...]:
    """The backends that implement ``op_name``, in ``auto``'s order of preference."""
    impls = _IMPLEMENTATIONS.get(op_name)
    if impls is None:
        raise KeyError(f"unknown op {op_name!r}; known ops: {', '.join(sorted(_IMPLEMENTATIONS))}")
    return tuple(b for b in (*FUSED_BACKENDS, "torch") if b in impls)


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


def debug_enabled() -> bool:
    """True when the ``"fastvit"`` logger takes DEBUG messages and torch.compile is not tracing.

    Guard every debug message of code that ``torch.compile(fullgraph=True)`` may trace with it
    (``if dispatch.debug_enabled(): dispatch.logger.debug(...)``): the tracer sees
    ``torch.compiler.is_compiling()`` as True and drops the branch, where a logging call would break the
    graph. Building the message inside the branch also keeps it free when debugging is off.
    """
    return not torch.compiler.is_compiling() and logger.isEnabledFor(logging.DEBUG)


def _auto_reference_reason(op_name: str, device: torch.device) -> str:
    """Why ``auto`` runs the reference for ``op_name`` on ``device``."""
    fused = [b for b in implementations(op_name) if b != "torch"]
    if not fused:
        return f"no fused implementation of {op_name}"
    if device.type != "cuda":
        return f"'auto' runs the reference on {device.type} tensors"
    return "; ".join(f"{b}: {backend_unusable_reason(b, device)}" for b in fused)


def resolve(op_name: str, backend: str | None, device: torch.device) -> str:
    """The backend that runs ``op_name`` for a tensor on ``device`` when ``backend`` is asked for."""
    backend = get_default_backend() if backend is None else _check_backend_name(backend, "backend")
    available = implementations(op_name)
    if backend == "auto":
        if device.type == "cuda":
            for candidate in available:
                if candidate != "torch" and backend_unusable_reason(candidate, device) is None:
                    return candidate
            if debug_enabled():
                logger.debug(
                    "%s: 'auto' runs the reference on CUDA tensors (%s)",
                    op_name,
                    _auto_reference_reason(op_name, device),
                )
        return "torch"
    if backend not in available:
        raise ValueError(
            f"{op_name}: the {backend!r} backend does not implement this op; implemented by: "
            f"{', '.join(available)} (use backend='auto' to pick the best one per device)"
        )
    reason = backend_unusable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{op_name}: backend {backend!r} cannot run on {device.type} tensors here: {reason}")
    return backend


def reference_for_uncovered_input(
    op_name: str, backend: str | None, device: torch.device, why: str | None
) -> str | None:
    """The backend an op layer passes on when its fused kernels may not cover an input.

    ``why`` says what the kernels do not cover (None: they cover this input). Then ``auto`` (given, or
    the process default) becomes ``'torch'``, with a DEBUG message on the ``"fastvit"`` logger for CUDA
    tensors; any other backend is returned unchanged, so an explicit fused backend raises its own clear
    error.
    """
    if why is None:
        return backend
    requested = get_default_backend() if backend is None else backend
    if not isinstance(requested, str) or requested.strip().lower() != "auto":
        return backend
    if device.type == "cuda" and debug_enabled():
        logger.debug("%s: 'auto' runs the reference for this input: %s", op_name, why)
    return "torch"


def fused_status(op_name: str, backend: str | None, device: torch.device) -> tuple[str, str | None]:
    """``(backend that runs op_name on device, why that is not a fused kernel)``; the reason is None when it is.

    An explicit backend that cannot run on ``device`` gives ``('unusable', why)`` instead of raising.
    """
    try:
        resolved = resolve(op_name, backend, device)
    except (RuntimeError, ValueError) as exc:
        return "unusable", str(exc)
    if resolved != "torch":
        return resolved, None
    requested = get_default_backend() if backend is None else _check_backend_name(backend, "backend")
    if requested == "torch":
        return "torch", "backend 'torch' was asked for"
    return "torch", _auto_reference_reason(op_name, device)


def implementation(op_name: str, backend: str | None, device: torch.device) -> Callable:
    """The function that implements ``op_name`` on ``device`` under ``backend``."""
    return _IMPLEMENTATIONS[op_name][resolve(op_name, backend, device)]


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
            f"where they exist, the reference elsewhere) or backend='torch'"
        )


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    """Whether a backend can run here, why (not), and which ops it implements."""

    name: str
    available: bool
    reason: str
    ops: tuple[str, ...]

    def __str__(self) -> str:
        mark = "yes" if self.available else "no "
        ops = ", ".join(self.ops) if self.ops else "(no ops yet)"
        return f"{self.name:<7} {mark}  {self.reason}\n          ops: {ops}"


def backends() -> dict[str, BackendInfo]:
    """Report every backend: usable here or not (and why), and the ops it implements.

    "Usable" means usable on at least one device of this machine: CUDA tensors if a GPU is present,
    otherwise CPU tensors (the C++ CPU kernels; Triton only under ``TRITON_INTERPRET=1``).
    """
    import fastvit.ops  # noqa: F401  (registers every op's implementations)

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    report = {}
    for name in ("torch", *FUSED_BACKENDS):
        ops = tuple(op for op in sorted(_IMPLEMENTATIONS) if name in _IMPLEMENTATIONS[op])
        if name == "torch":
            report[name] = BackendInfo(name, True, "pure-PyTorch reference (fastvit.reference)", ops)
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
        report[name] = BackendInfo(name, reason is None, f"{detail}; {where}" if ok else detail, ops)
    return report
