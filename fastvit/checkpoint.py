"""Training checkpoints: safetensors weights + a small state file, written atomically, validated on load.

A checkpoint is a directory::

    model.safetensors   weights (timm/fastvit names); metadata holds the model config and preprocessing
    ema.safetensors     EMA weights, when training with --ema
    state.pt            optimizer, LR scheduler, grad scaler, epoch, update count, metrics so far, and
                        the RNG states of every rank (torch, CUDA, numpy, Python), so --resume continues
                        bit-identically

It is written into ``<dir>.tmp`` and renamed into place (the previous one kept as ``<dir>.old`` until
the rename is done), so a crash mid-save leaves the last complete checkpoint. Loading reads and checks
every file before anything is applied: a truncated or corrupted file raises ``ValueError``, never a
half-loaded model.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

MODEL_FILE, EMA_FILE, STATE_FILE = "model.safetensors", "ema.safetensors", "state.pt"


def rng_state() -> dict:
    """This process's RNG states (torch CPU, CUDA if present, numpy, Python), as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuples(value):
    # Python's random state must be nested tuples; a serialiser may hand back lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(
    directory: str, model_state: dict, state: dict, metadata: dict, ema_state: dict | None = None
) -> None:
    """Write a checkpoint directory atomically (see module doc). Only one process should call this."""
    from safetensors.torch import save_file

    directory = os.path.abspath(directory)
    tmp, old = directory + ".tmp", directory + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    meta = {key: json.dumps(value) for key, value in metadata.items()}
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, os.path.join(tmp, MODEL_FILE), meta)
    if ema_state is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, os.path.join(tmp, EMA_FILE), meta)
    torch.save(state, os.path.join(tmp, STATE_FILE))
    if os.path.isdir(directory):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(path: str) -> str:
    """The checkpoint directory for ``path``: itself, ``path/checkpoint``, or the ``.old`` copy a crash left."""
    for candidate in (path, os.path.join(path, "checkpoint")):
        if os.path.isfile(os.path.join(candidate, STATE_FILE)):
            return candidate
        if os.path.isfile(os.path.join(candidate + ".old", STATE_FILE)):
            return candidate + ".old"
    raise FileNotFoundError(
        f"no checkpoint at {path!r} (expected {STATE_FILE} and {MODEL_FILE} in it or in its checkpoint/)"
    )


def read_weights(path: str) -> tuple[dict, dict]:
    """(state dict, decoded metadata) of a safetensors file; ``ValueError`` if it is unreadable."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(path, framework="pt") as f:
            raw_meta = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is truncated or corrupted ({exc})") from exc
    metadata = {}
    for key, value in raw_meta.items():
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value
    return tensors, metadata


def load_checkpoint(path: str) -> dict:
    """Read and check a whole checkpoint: {'model', 'ema' (or None), 'metadata', 'state', 'dir'}."""
    directory = checkpoint_dir(path)
    model_state, metadata = read_weights(os.path.join(directory, MODEL_FILE))
    ema_path = os.path.join(directory, EMA_FILE)
    ema_state = read_weights(ema_path)[0] if os.path.exists(ema_path) else None
    state_path = os.path.join(directory, STATE_FILE)
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, unpickling errors, ...
        raise ValueError(f"{state_path} is truncated or corrupted ({type(exc).__name__}: {exc})") from exc
    for key in ("epoch", "num_updates", "optimizer", "scheduler", "rng", "history"):
        if key not in state:
            raise ValueError(f"{state_path} is not a fastvit training state (no {key!r})")
    return {"model": model_state, "ema": ema_state, "metadata": metadata, "state": state, "dir": directory}
