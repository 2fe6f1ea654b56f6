"""Measured choices of ``auto`` between GEMM implementations: (op, shape bucket, dtype, GPU arch) -> backend.

Where two fused implementations of a Linear-based op compete (the Triton GEMMs with fused prologue/epilogue of
``fastvit/ops/triton/linear.py`` against cuBLASLt + pointwise kernels, or cuBLAS through ``torch``), the winner is
decided by benchmark evidence, not by hope: a small table shipped in the package, ``fastvit/gemm_choices.json``,
filled by GPU rounds from ``benchmarks/test_bench_ln_mlp.py``. An entry::

    {"op": "ln_mlp", "bucket": "768x3072", "dtype": "bfloat16", "capability": "9.0", "backend": "triton",
     "evidence": "benchmarks/results/h100-....json: 1.12x cuda fwd+bwd"}

``bucket`` is :func:`shape_bucket` of the GEMM's (in_features, out_features) (for ``ln_mlp``: (C, hidden)), or
``"*"`` for every shape. An entry may also name the MLP ``variant`` it was measured on (:func:`mlp_variant`, e.g.
``"rms/swiglu/hidden_norm"``: the SwiGLU epilogue and the extra norm change which backend wins); without one it
holds for every variant, and a variant's own entry comes first. With no entry for a call, ``auto`` does not pick
the Triton GEMMs (it keeps cuBLASLt where the extension covers the call, else ``torch``); an explicit
``backend='triton'`` always runs them. Selftest evidence (``fastvit/verification.py``) is asked as well: a choice
never enables an unverified kernel.

The Triton GEMMs' Hopper forward (persistent, TMA descriptors: ``linear_fwd_tma_kernel``) is not a choice here: it is
off by default, switched on only inside ``fastvit.ops.triton.linear.hopper_path()`` (sm_90; it falls back to the
pointer kernel, saying why, where TMA cannot run), and has not been measured on a GPU yet (the benchmarks' ``fastvit
triton tma`` candidate).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from fastvit.verification import _constant_result as constant_result

CHOICES_PATH = Path(__file__).with_name("gemm_choices.json")
FORMAT_VERSION = 1
ANY_BUCKET = "*"
ANY_VARIANT = "*"


def shape_bucket(in_features: int, out_features: int) -> str:
    """The table's name for a GEMM shape: ``'{in_features}x{out_features}'`` (the token count is not bucketed: it
    changes with the batch, and a per-batch choice would recompile ``torch.compile`` graphs)."""
    return f"{in_features}x{out_features}"


def mlp_variant(norm: str, act: str, hidden_norm: bool) -> str:
    """The table's name for an ``ln_mlp`` variant: ``'{norm}/{act}'``, plus ``'/hidden_norm'`` with a hidden-layer
    norm (the plain ViT MLP is ``'layer/gelu'``)."""
    return f"{norm}/{act}" + ("/hidden_norm" if hidden_norm else "")


def capability(device: torch.device) -> str:
    """``'major.minor'`` of ``device``'s GPU."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


@functools.cache
def table(path: Path = CHOICES_PATH) -> dict[tuple[str, str, str, str, str], str]:
    """The entries of ``path`` keyed by (op, bucket, dtype name, capability, variant; ``'*'`` when the entry names
    none); a malformed file raises ValueError."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION or not isinstance(data.get("choices"), list):
        raise ValueError(f"{path}: expected {{'format': {FORMAT_VERSION}, 'choices': [...]}}")
    choices = {}
    for entry in data["choices"]:
        try:
            key = (entry["op"], entry["bucket"], entry["dtype"], entry["capability"], entry.get("variant", ANY_VARIANT))
            choices[key] = entry["backend"]
        except (KeyError, TypeError) as exc:
            needs = "op, bucket, dtype, capability, backend"
            raise ValueError(f"{path}: malformed entry {entry!r} (needs {needs})") from exc
    return choices


@constant_result  # torch.compile bakes the answer in (it reads a file), as it does the evidence gate's
def preferred(
    op_name: str, bucket: str | None, dtype: torch.dtype, device: torch.device, variant: str = ANY_VARIANT
) -> str | None:
    """The backend the table chose for the call (an exact bucket before ``'*'``, then the variant's own entry before
    one for every variant), or None without evidence."""
    if device.type != "cuda":
        return None
    choices = table()
    if not choices:
        return None
    dtype_name = str(dtype).removeprefix("torch.")
    arch = capability(device)
    for bucket_key in (bucket, ANY_BUCKET):
        for variant_key in dict.fromkeys((variant, ANY_VARIANT)):
            key = (op_name, bucket_key, dtype_name, arch, variant_key)
            if bucket_key is not None and key in choices:
                return choices[key]
    return None
