"""Host-side helpers shared by the Triton backends' launchers (``fastvit/ops/triton/<op>.py``).

Importing this module never imports Triton: the kernels are imported on first launch, so fastvit imports
without Triton and ``fastvit.backends()`` says why the backend is off.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import torch

from fastvit import dispatch


def kernels(op_file: str):
    """The Triton kernel module ``fastvit.kernels.<op_file>`` (imported on first use: Triton is optional)."""
    return importlib.import_module(f"fastvit.kernels.{op_file}")


def new_output(shape, dtype: torch.dtype, device: torch.device, memory_format=torch.contiguous_format) -> torch.Tensor:
    """Allocate a kernel output, uninitialised (the kernels write every element).

    Every launcher allocates through this one function (looked up at call time), so tests can swap it for
    one that poisons the buffer and guards its ends, to catch missing or stray stores.
    """
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_pow2(n: int, lo: int, hi: int) -> int:
    """The power of two >= n, clamped to [lo, hi]."""
    return max(lo, min(hi, 1 << max(n - 1, 0).bit_length()))


def device_guard(tensor: torch.Tensor):
    """Launch on ``tensor``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def on_gpu(tensor: torch.Tensor) -> bool:
    """True when kernels compile for a GPU (False under Triton's interpreter)."""
    return tensor.device.type == "cuda" and not dispatch.triton_interpreter_enabled()


@functools.cache
def num_sms(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index or 0).multi_processor_count


def gpu_arch(tensor: torch.Tensor) -> int:
    """The compute capability of ``tensor``'s GPU as 10*major+minor (86 for sm_86): config tables are per generation,
    but shared memory per block differs within one (A100 163 KiB, RTX 30xx 99 KiB)."""
    major, minor = torch.cuda.get_device_capability(tensor.device)
    return 10 * major + minor


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for ``dtype`` operands: one policy for every fastvit GEMM.

    float32 operands multiply in full precision unless PyTorch's own matmuls may use TF32
    (``torch.backends.cuda.matmul.allow_tf32``, off by default), as ``torch.matmul`` and SDPA do; that keeps
    DESIGN's fp32 error rule (~1e-5 relative) by default. 16-bit operands ignore it.
    """
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@contextlib.contextmanager
def forced_configs(store: dict, kinds, configs: dict[str, tuple[int, ...]], fields: tuple[str, ...]):
    """Within the block, ``store`` (a launcher's forced-config table) also holds ``configs``: kernel kind -> a tuple
    of positive ints named ``fields``; checked first, restored after. Not thread-safe (process-wide)."""
    unknown = sorted(set(configs) - set(kinds))
    if unknown:
        raise ValueError(f"configs: unknown kernel kind(s) {unknown}; expected {sorted(kinds)}")
    for kind, entry in configs.items():
        if not (
            isinstance(entry, tuple) and len(entry) == len(fields) and all(isinstance(v, int) and v > 0 for v in entry)
        ):
            raise ValueError(f"configs[{kind!r}] must be ({', '.join(fields)}) positive ints, got {entry!r}")
    previous = dict(store)
    store.update(configs)
    try:
        yield
    finally:
        store.clear()
        store.update(previous)
