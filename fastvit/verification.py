"""Evidence that a fused kernel computes the right thing on this GPU, and the gate that makes ``auto`` follow it.

``python -m fastvit selftest`` (``fastvit.selftest``) checks every fused (op, backend) against the spec on the
present GPU and leaves one :class:`Record` per (op, backend, kernel-source hash, GPU compute capability, dtype,
torch major.minor, Triton major.minor) saying whether it passed. Records live in two files with one format:

- the user's cache, ``$FASTVIT_CACHE/verified.json`` (default ``~/.cache/fastvit/verified.json``), written by
  every selftest (atomically, under a lock, merged with what is there);
- the manifest shipped in the package, ``fastvit/verified.json``, written by the project's own GPU rounds
  (``selftest --write-manifest``) and committed.

On CUDA tensors ``auto`` picks a fused kernel only where a passing record matches this GPU's compute
capability, the call's compute dtype, the kernel's current source hash and the torch/Triton versions (the cache's
record wins over the manifest's for the same key); otherwise it runs the ``torch`` backend and warns once per
process (:class:`UnverifiedKernelWarning`) with the command that enables the kernel. A failing record makes
``auto`` avoid the kernel and say why. The kernel-source hash covers the kernel and launcher sources (for the
extension: a hash of ``csrc/`` compiled into ``fastvit._C``), so editing a kernel retires its old evidence. An
explicit backend never asks for evidence; ``FASTVIT_VERIFY=off`` turns the gate off. CPU tensors need none:
``auto`` runs the ``torch`` backend on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import pkgutil
import platform
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fastvit import dispatch

MANIFEST_PATH = Path(__file__).with_name("verified.json")
FORMAT_VERSION = 1
SELFTEST_COMMAND = "python -m fastvit selftest"
CHECKED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # the dtypes backends() and info report on

_OFF = ("off", "0", "false", "no")
_ON = ("on", "1", "true", "yes", "")


class UnverifiedKernelWarning(UserWarning):
    """``auto`` ran the ``torch`` backend on a GPU because a fused kernel has no passing selftest record there."""


def verification_enabled() -> bool:
    """False when ``FASTVIT_VERIFY=off`` (also 0/false/no): ``auto`` then takes fused kernels without evidence."""
    value = os.environ.get("FASTVIT_VERIFY", "on").strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return True
    raise ValueError(f"FASTVIT_VERIFY must be 'on' or 'off', got {os.environ['FASTVIT_VERIFY']!r}")


# ----------------------------------------------------------------------------------------------
# Records


@dataclasses.dataclass(frozen=True)
class Record:
    """One selftest verdict for one fused (op, backend) on one kind of GPU.

    Attributes:
        op, backend: the dispatch op name and the fused backend ('triton' | 'cuda').
        kernel_hash: :func:`kernel_hash` of the sources that ran.
        capability: the GPU's compute capability ('9.0'), or 'cpu' for a run on CPU tensors.
        dtype: the compute dtype ('bfloat16', 'float16', 'float32', ...).
        torch, triton: major.minor versions; ``triton`` is None for the 'cuda' backend (not involved).
        passed: every check of this (op, backend, dtype) passed.
        device_name, checks, configs, worst_ratio, detail, quick, date, fastvit: what ran, for people: the GPU's
            name, the number of checks and of distinct kernel configs, the worst error / bound, the first
            failure, whether it was a ``--quick`` run (its passes are not evidence), when, and which fastvit.
    """

    op: str
    backend: str
    kernel_hash: str
    capability: str
    dtype: str
    torch: str
    triton: str | None
    passed: bool
    device_name: str = ""
    checks: int = 0
    configs: int = 0
    worst_ratio: float = 0.0
    detail: str = ""
    quick: bool = False
    date: str = ""
    fastvit: str = ""

    def key(self) -> tuple:
        return (self.op, self.backend, self.kernel_hash, self.capability, self.dtype, self.torch, self.triton)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["worst_ratio"] == float("inf"):
            data["worst_ratio"] = "inf"  # JSON has no infinity
        return data

    @classmethod
    def from_json(cls, data: object) -> Record:
        """A record from its JSON form; ValueError naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"a record must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(
            n for n in ("op", "backend", "kernel_hash", "capability", "dtype", "torch", "passed") if n not in data
        )
        if missing:
            raise ValueError(f"record lacks {', '.join(missing)}: {data}")
        values = {k: v for k, v in data.items() if k in names}  # unknown fields: from a newer fastvit, ignored
        if values.get("worst_ratio") == "inf":
            values["worst_ratio"] = float("inf")
        for name in ("op", "backend", "kernel_hash", "capability", "dtype", "torch"):
            if not isinstance(values[name], str):
                raise ValueError(f"record field {name!r} must be a string, got {values[name]!r}")
        if not isinstance(values["passed"], bool):
            raise ValueError(f"record field 'passed' must be true or false, got {values['passed']!r}")
        values.setdefault("triton", None)
        return cls(**values)


def cache_path() -> Path:
    """The user's record file: ``$FASTVIT_CACHE/verified.json``, else ``~/.cache/fastvit/verified.json``."""
    root = os.environ.get("FASTVIT_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "fastvit"
    return base / "verified.json"


_corrupt_warned: set[str] = set()


def read_records(path: Path) -> list[Record]:
    """The records in ``path``; none if it does not exist. A corrupt file counts as empty and warns once."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    except OSError as exc:
        _warn_corrupt(path, f"cannot be read ({exc})")
        return []
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise ValueError("expected an object with a 'records' list")
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {data.get('format')!r}, this fastvit reads format {FORMAT_VERSION}")
        return [Record.from_json(item) for item in data["records"]]
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        _warn_corrupt(path, str(exc))
        return []


def _warn_corrupt(path: Path, why: str) -> None:
    if str(path) not in _corrupt_warned:
        _corrupt_warned.add(str(path))
        warnings.warn(
            f"fastvit: ignoring the verification records in {path}: {why}; `{SELFTEST_COMMAND}` rewrites it",
            UnverifiedKernelWarning,
            stacklevel=3,
        )


def merge(old: Iterable[Record], new: Iterable[Record]) -> list[Record]:
    """``old`` updated by ``new``: a new record replaces the one with the same key, except that a ``--quick``
    pass never replaces a full run's record (a quick failure does: failures are evidence too)."""
    merged = {r.key(): r for r in old}
    for record in new:
        current = merged.get(record.key())
        if current is not None and record.quick and record.passed and not current.quick:
            continue
        merged[record.key()] = record
    return sorted(merged.values(), key=lambda r: (r.op, r.backend, r.capability, r.dtype, r.torch, r.kernel_hash))


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path``'s sibling ``.lock`` file (POSIX ``flock``; no lock where there is none)."""
    try:
        import fcntl
    except ImportError:  # Windows: the write below is still atomic, concurrent merges may lose a record
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def write_records(path: Path, records: Iterable[Record], keep: Any = None) -> list[Record]:
    """Merge ``records`` into the file ``path`` (see :func:`merge`) and return what it then holds.

    Atomic and safe against concurrent writers: read-merge-write under an exclusive lock, the new content written
    to a temporary file in the same folder and renamed over ``path``, so a reader sees the old or the new file,
    never a part. ``keep(record) -> bool`` drops the existing records it rejects (stale evidence). Clears the
    in-process view of the evidence (:func:`reload`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        existing = [r for r in read_records(path) if keep is None or keep(r)]
        merged = merge(existing, records)
        text = json.dumps({"format": FORMAT_VERSION, "records": [r.to_json() for r in merged]}, indent=1) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    reload()
    return merged


# ----------------------------------------------------------------------------------------------
# What the records are keyed on: the kernel sources, the versions, the GPU


def _major_minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def torch_version() -> str:
    return _major_minor(torch.__version__)


_triton_version: list[str | None] = []


def triton_version() -> str | None:
    """Triton's major.minor, or None when it is not installed (read from its metadata: no import)."""
    if not _triton_version:
        version = None
        for dist in ("triton", "pytorch-triton"):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                version = importlib.metadata.version(dist)
                break
        if version is None:
            with contextlib.suppress(Exception):
                version = importlib.import_module("triton").__version__
        _triton_version.append(None if version is None else _major_minor(version))
    return _triton_version[0]


def backend_versions(backend: str) -> tuple[str, str | None]:
    """(torch, triton) major.minor as a record of ``backend`` stores them (Triton only matters to 'triton')."""
    return torch_version(), triton_version() if backend == "triton" else None


def kernel_sources(op_name: str, backend: str) -> tuple[str, ...]:
    """The modules whose source defines what ``backend`` runs for ``op_name``: its registered launcher module and
    the launcher's own helper modules beside it (``<name>_*``, e.g. ``patch_embed_configs``: the tile heuristic),
    the launch helpers and, for Triton, the kernel file of the same name (one file per op at each layer)."""
    module = dispatch.implementation(op_name, backend).fn.__module__  # e.g. fastvit.ops.triton.attention
    package, name = module.rsplit(".", 1)
    helpers = sorted(
        f"{package}.{info.name}"
        for info in pkgutil.iter_modules(importlib.import_module(package).__path__)
        if info.name.startswith(name + "_")
    )
    if backend == "triton":
        return (module, *helpers, "fastvit.ops.triton.launch", f"fastvit.kernels.{name}")
    return (module, *helpers, "fastvit.ops.cuda.extension")


def extension_source_hash() -> str:
    """The hash of ``csrc/`` that setup.py compiled into ``fastvit._C`` ('unbuilt' without the extension)."""
    if not dispatch.extension_available():
        return "unbuilt"
    extension = importlib.import_module("fastvit._C")
    source_hash = getattr(extension, "source_hash", None)
    return source_hash() if source_hash is not None else "unknown"  # an extension built before the hash existed


_hashes: dict[tuple[str, str], str] = {}


def kernel_hash(op_name: str, backend: str) -> str:
    """A short hash of the sources of ``backend``'s ``op_name`` (see :func:`kernel_sources`), computed once."""
    key = (op_name, backend)
    if key not in _hashes:
        digest = hashlib.sha256()
        for module in kernel_sources(op_name, backend):
            spec = importlib.util.find_spec(module)
            if spec is None or spec.origin is None:
                raise RuntimeError(f"cannot find the source of {module} (needed for {backend} {op_name}'s hash)")
            digest.update(module.encode() + b"\0" + Path(spec.origin).read_bytes().replace(b"\r\n", b"\n") + b"\0")
        if backend == "cuda":
            digest.update(b"csrc\0" + extension_source_hash().encode())
        _hashes[key] = digest.hexdigest()[:16]
    return _hashes[key]


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    capability: str  # '9.0', or 'cpu'
    name: str


_device_facts: dict[tuple[str, int | None], DeviceFacts] = {}


def device_facts(device: torch.device) -> DeviceFacts:
    """The compute capability and name of ``device`` (CPU: capability 'cpu')."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device.type, device.index)
    if key not in _device_facts:
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            facts = DeviceFacts(f"{major}.{minor}", torch.cuda.get_device_name(device))
        else:
            facts = DeviceFacts(device.type, platform.processor() or platform.machine() or device.type)
        _device_facts[key] = facts
    return _device_facts[key]


def new_record(op_name: str, backend: str, device: torch.device, dtype: torch.dtype, passed: bool, **info) -> Record:
    """A record of a check run now, here, on the current sources (``info``: Record's descriptive fields)."""
    facts = device_facts(device)
    torch_mm, triton_mm = backend_versions(backend)
    fastvit_version = importlib.import_module("fastvit").__version__
    return Record(
        op_name, backend, kernel_hash(op_name, backend), facts.capability, _dtype_name(dtype), torch_mm, triton_mm,
        passed, device_name=facts.name, date=datetime.date.today().isoformat(), fastvit=fastvit_version, **info,
    )  # fmt: skip


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ----------------------------------------------------------------------------------------------
# Looking evidence up


@dataclasses.dataclass(frozen=True)
class Evidence:
    """What the records say about one (op, backend, device, dtype).

    Attributes:
        state: 'verified' | 'failed' | 'unverified' | 'quick-only' | 'off' (FASTVIT_VERIFY=off) | 'not needed'
            (not a CUDA device).
        reason: why ``auto`` may not pick the kernel (None when it may).
        record: the matching record, if any; ``source``: 'manifest' or 'cache'.
    """

    state: str
    reason: str | None
    record: Record | None = None
    source: str | None = None

    def __str__(self) -> str:
        if self.state == "verified":
            r = self.record
            return f"verified ({self.source}: {r.device_name or 'sm ' + r.capability}, {r.date}, {r.checks} checks)"
        if self.state == "off":
            return "not checked (FASTVIT_VERIFY=off)"
        if self.state == "not needed":
            return "no evidence needed (auto runs the torch backend on CPU tensors)"
        return f"{self.state}: {self.reason}"


_records: dict[str, dict[tuple, Record]] = {}  # 'manifest' / 'cache' -> {key: record}
_evidence: dict[tuple, Evidence] = {}


def reload() -> None:
    """Forget the loaded records and every cached selection (after the record files changed)."""
    _records.clear()
    _evidence.clear()
    dispatch.clear_cache()


def _sources() -> dict[str, dict[tuple, Record]]:
    if not _records:
        _records["manifest"] = {r.key(): r for r in read_records(MANIFEST_PATH)}
        _records["cache"] = {r.key(): r for r in read_records(cache_path())}
    return _records


def lookup(op_name: str, backend: str, device: torch.device, dtype: torch.dtype) -> Evidence:
    """The evidence for ``backend``'s ``op_name`` computing in ``dtype`` on ``device`` (cached until :func:`reload`)."""
    device = torch.device(device)
    if device.type != "cuda":
        return Evidence("not needed", None)
    if not verification_enabled():
        return Evidence("off", None)
    facts = device_facts(device)
    key = (op_name, backend, facts.capability, dtype)
    if key not in _evidence:
        _evidence[key] = _find(op_name, backend, facts, dtype)
    return _evidence[key]


def _find(op_name: str, backend: str, facts: DeviceFacts, dtype: torch.dtype) -> Evidence:
    torch_mm, triton_mm = backend_versions(backend)
    current = kernel_hash(op_name, backend)
    key = (op_name, backend, current, facts.capability, _dtype_name(dtype), torch_mm, triton_mm)
    what = (
        f"{backend} {op_name} in {_dtype_name(dtype)} on this GPU ({facts.name}, compute capability {facts.capability})"
    )
    sources = _sources()
    for source in ("cache", "manifest"):  # the user's own run wins
        record = sources[source].get(key)
        if record is None:
            continue
        if not record.passed:
            why = f"the selftest FAILED for {what} ({source}, {record.date}: {record.detail or 'see its report'})"
            return Evidence("failed", f"{why}; auto avoids this kernel", record, source)
        if record.quick:
            why = f"only a `{SELFTEST_COMMAND} --quick` passed for {what}; run the full `{SELFTEST_COMMAND}`"
            return Evidence("quick-only", why, record, source)
        return Evidence("verified", None, record, source)
    return Evidence("unverified", _missing_reason(what, key, sources))


def _missing_reason(what: str, key: tuple, sources: dict[str, dict[tuple, Record]]) -> str:
    """Why no record matches, naming the nearest miss (a changed kernel, other versions) when there is one."""
    op_name, backend, current, capability, dtype, torch_mm, triton_mm = key
    near = [
        r for records in sources.values() for r in records.values()
        if (r.op, r.backend, r.capability, r.dtype) == (op_name, backend, capability, dtype)
    ]  # fmt: skip
    if any(r.kernel_hash != current for r in near) and not any(r.kernel_hash == current for r in near):
        detail = f"its records are for other kernel sources (the kernel changed since; now {current})"
    elif near:
        seen = sorted({f"torch {r.torch}" + (f", triton {r.triton}" if r.triton else "") for r in near})
        now = f"torch {torch_mm}" + (f", triton {triton_mm}" if triton_mm else "")
        detail = f"its records are for {'; '.join(seen)}, this is {now}"
    else:
        detail = f"no selftest record for kernel source {current}"
    return f"{what} is not verified: {detail}; run `{SELFTEST_COMMAND}` to check it and enable it"


def compute_dtype(call: Any) -> torch.dtype | None:
    """The dtype a call signature computes in: its ``dtype``, or a patch embedding's GEMM dtype (the autocast
    dtype, else its tensors' one dtype); None when the call does not say (a device-level question)."""
    dtype = getattr(call, "dtype", None)
    if dtype is None and getattr(call, "dtypes", None):
        dtype = call.autocast_dtype or call.dtypes[0]
    return dtype


def evidence_reason(op_name: str, backend: str, call: Any, warn: bool) -> str | None:
    """The check dispatch's ``auto`` asks (see :func:`fastvit.dispatch.set_evidence`): why ``backend`` may not run
    ``call`` for lack of evidence, or None. Warns (once) when ``warn`` and the answer sends a CUDA call to torch."""
    dtype = compute_dtype(call)
    if call.device.type != "cuda" or dtype is None:
        return None
    return _gate(op_name, backend, call.device, dtype, warn)


def _constant_result(fn):
    """``torch.compile`` calls ``fn`` while tracing and bakes its answer in (it reads files, which Dynamo cannot
    trace); the answer changes only with the records, and dispatch re-selects after :func:`reload`."""
    marker = getattr(torch.compiler, "assume_constant_result", None)
    return fn if marker is None else marker(fn)


@_constant_result
def _gate(op_name: str, backend: str, device: torch.device, dtype: torch.dtype, warn: bool) -> str | None:
    evidence = lookup(op_name, backend, device, dtype)
    if evidence.reason is not None and warn:
        _warn_once(op_name, backend, dtype, evidence)
    return evidence.reason


_warned: set[tuple] = set()


def _warn_once(op_name: str, backend: str, dtype: torch.dtype, evidence: Evidence) -> None:
    """One warning per process for unverified kernels (naming the command that enables them); one per
    (op, backend, dtype) for a failed one."""
    key = ("failed", op_name, backend, dtype) if evidence.state == "failed" else ("unverified",)
    if key in _warned:
        return
    _warned.add(key)
    if evidence.state == "failed":
        message = f"fastvit: backend='auto' runs the torch backend for {op_name}: {evidence.reason}"
    else:
        message = (
            f"fastvit: backend='auto' runs the torch backend for {op_name} (and any other fused op without "
            f"evidence on this GPU): {evidence.reason}. FASTVIT_VERIFY=off uses the fused kernels unchecked. "
            "(This warning is shown once per process.)"
        )
    warnings.warn(message, UnverifiedKernelWarning, stacklevel=2)


def summary(op_name: str, backend: str, device: torch.device | str = "cuda") -> str:
    """One line of the evidence for ``backend``'s ``op_name`` on ``device`` over :data:`CHECKED_DTYPES`."""
    by_state: dict[str, list[str]] = {}
    for dtype in CHECKED_DTYPES:
        evidence = lookup(op_name, backend, torch.device(device), dtype)
        if evidence.state in ("off", "not needed"):
            return str(evidence)
        label = evidence.state + (f" ({evidence.source})" if evidence.source else "")
        by_state.setdefault(label, []).append(_dtype_name(dtype))
    text = "; ".join(f"{state}: {', '.join(dtypes)}" for state, dtypes in by_state.items())
    if any(state.startswith(("unverified", "quick-only")) for state in by_state):
        text += f" (run `{SELFTEST_COMMAND}`)"
    return text


dispatch.set_evidence(evidence_reason, summary)


def describe() -> str:
    """The verification settings and record files, for ``python -m fastvit info``."""
    enabled = verification_enabled()
    lines = [
        f"verification: FASTVIT_VERIFY={'on' if enabled else 'off'}"
        + (
            " (backend='auto' runs a fused kernel on a GPU only where a passing selftest record matches it)"
            if enabled
            else " (backend='auto' runs the fused kernels without evidence)"
        )
    ]
    for label, path in (("shipped manifest", MANIFEST_PATH), ("user cache", cache_path())):
        count = f"{len(read_records(path))} records" if path.exists() else "absent"
        lines.append(f"  {label + ':':<18}{path} ({count})")
    if not torch.cuda.is_available():
        lines.append("  no GPU here: auto runs the torch backend on CPU tensors, which needs no evidence")
    else:
        facts = device_facts(torch.device("cuda"))
        lines.append(
            f"  this GPU: {facts.name}, compute capability {facts.capability}, torch {torch_version()}, "
            f"triton {triton_version()}; per-op state under 'backends' above; `{SELFTEST_COMMAND}` checks them"
        )
    return "\n".join(lines)


def evidence_state(op_name: str, backend: str | None, device: torch.device | str, dtype: torch.dtype) -> str:
    """The verification state behind an op's backend choice, for ``backend_plan()`` and ``fusion_report()``:
    what the records say about the fused backend ``auto`` would try first for ``op_name`` on ``device`` in
    ``dtype`` ('' when evidence plays no part: the torch backend, or no fused backend can run there)."""
    device = torch.device(device)
    requested = dispatch.get_default_backend() if backend is None else backend
    if requested == "torch" or device.type != "cuda":
        return ""
    if requested != "auto":
        return f"explicit backend {requested!r}: runs without evidence"
    for name in dispatch.implementations(op_name):
        if name != "torch" and dispatch.backend_unusable_reason(name, device) is None:
            return f"{name}: {lookup(op_name, name, device, dtype)}"
    return ""
