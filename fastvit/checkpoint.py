"""Training checkpoints: safetensors weights + a small state file, written atomically, validated on load.

A checkpoint is a directory::

    model.safetensors   weights (timm/fastvit names); metadata holds the model config, the data config
                        (``pretrained_cfg``: preprocessing and class names), the data source and split, and the
                        run's options
    ema.safetensors     EMA weights, when training with --ema
    state.pt            optimizer, grad scaler, epoch, update count, metrics so far, and
                        the RNG states of every rank (torch, CUDA, numpy, Python), so --resume continues
                        bit-identically

It is written into ``<dir>.tmp`` and renamed into place (the previous one kept as ``<dir>.old`` until
the rename is done), so a crash mid-save leaves the last complete checkpoint; every loader looks in the
``.old`` copy when a crash came between the two renames (:func:`with_crash_fallback`). Loading reads and checks
every file before anything is applied: a truncated or corrupted file raises ``ValueError``, never a
half-loaded model. A run's output folder is locked while a run writes to it (:class:`OutputLock`).
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
    directory = os.path.abspath(directory)
    tmp, old = directory + ".tmp", directory + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _write_weights(os.path.join(tmp, MODEL_FILE), model_state, metadata)
    if ema_state is not None:
        _write_weights(os.path.join(tmp, EMA_FILE), ema_state, metadata)
    torch.save(state, os.path.join(tmp, STATE_FILE))
    if os.path.isdir(directory):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)


def with_crash_fallback(path: str) -> str:
    """``path``, or where a crash between the two renames of :func:`save_checkpoint` left it: when ``path`` or
    one of its parent folders does not exist but a ``.old`` copy of it does, the path through that copy."""
    path = os.path.normpath(path)
    if os.path.exists(path):
        return path
    head, tail = path, []
    while head and not os.path.exists(head):
        if os.path.exists(head + ".old"):
            return os.path.join(head + ".old", *reversed(tail))
        head, name = os.path.split(head)
        if not name:
            break
        tail.append(name)
    return path


def checkpoint_dir(path: str) -> str:
    """The checkpoint directory for ``path``: itself, ``path/checkpoint``, or the ``.old`` copy a crash left."""
    for candidate in (path, os.path.join(path, "checkpoint")):
        candidate = with_crash_fallback(candidate)
        if os.path.isfile(os.path.join(candidate, STATE_FILE)):
            return candidate
        if os.path.isfile(os.path.join(candidate + ".old", STATE_FILE)):
            return candidate + ".old"
    raise FileNotFoundError(
        f"no checkpoint at {path!r} (expected {STATE_FILE} and {MODEL_FILE} in it or in its checkpoint/)"
    )


def weights_file(path: str) -> str:
    """The weights file ``path`` names: a file itself, or a checkpoint directory's (or a run folder's)
    ``model.safetensors``, through the ``.old`` copy a crash may have left (``FileNotFoundError`` if none)."""
    resolved = with_crash_fallback(os.fspath(path))
    if os.path.isfile(resolved):
        return resolved
    if os.path.isdir(resolved):
        return os.path.join(checkpoint_dir(resolved), MODEL_FILE)
    raise FileNotFoundError(f"checkpoint not found: {path}")


def run_dir(checkpoint_directory: str) -> str | None:
    """The run's output folder of a checkpoint directory (``OUT/checkpoint`` or ``OUT/checkpoint.old``), or None
    for a checkpoint directory kept somewhere else."""
    directory = os.path.abspath(checkpoint_directory)
    if os.path.basename(directory) in ("checkpoint", "checkpoint.old"):
        return os.path.dirname(directory)
    return None


RUN_OUTPUTS = ("checkpoint", "checkpoint.old", "checkpoint.tmp", "model_best.safetensors", "metrics.json")


def holds_run(output: str) -> bool:
    """Whether ``output`` already holds the results of a training run (a checkpoint, metrics, best weights)."""
    return any(os.path.exists(os.path.join(output, name)) for name in RUN_OUTPUTS)


def remove_run(output: str) -> None:
    """Delete the files a training run writes into ``output`` (``--overwrite``), nothing else."""
    for name in (*RUN_OUTPUTS, "metrics.csv", "curves.png", "args.yaml"):
        target = os.path.join(output, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)


class OutputLock:
    """An exclusive lock on a run's output folder for as long as a training run writes to it.

    ``fcntl.flock`` on ``<output>/.lock``: the kernel drops it when the process ends, however it ends, so a
    crashed run never leaves a stale lock. A second run on the same folder fails at once with
    ``FileExistsError`` (two runs would otherwise share ``checkpoint.tmp``). Where ``fcntl`` does not exist
    (Windows) no lock is taken.
    """

    def __init__(self, output: str) -> None:
        self.path = os.path.join(output, ".lock")
        self._file = None

    def __enter__(self) -> OutputLock:
        try:
            import fcntl
        except ImportError:
            return self
        self._file = open(self.path, "a+")  # noqa: SIM115  (held open for the run)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            owner = self._file.read().strip() or "another process"
            self._file.close()
            self._file = None
            raise FileExistsError(
                f"{os.path.dirname(self.path)} is in use by another training run ({owner}); "
                "wait for it to finish or choose another --output"
            ) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()}")
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # closing releases the flock
            self._file = None


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
    return tensors, _decode_metadata(raw_meta)


def read_metadata(path: str) -> dict:
    """The decoded metadata of a weights file or checkpoint directory, reading only the file's header."""
    from safetensors import SafetensorError, safe_open

    path = weights_file(path)
    try:
        with safe_open(path, framework="pt") as f:
            raw_meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is truncated or corrupted ({exc})") from exc
    return _decode_metadata(raw_meta)


def _decode_metadata(raw_meta: dict) -> dict:
    metadata = {}
    for key, value in raw_meta.items():
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value
    return metadata


def _write_weights(path: str, model_state: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    meta = {key: json.dumps(value) for key, value in metadata.items()}
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, path, meta)


def save_weights(path: str, model_state: dict, metadata: dict) -> None:
    """One safetensors file with JSON-encoded ``metadata``, written to ``<path>.tmp`` and renamed into place."""
    _write_weights(path + ".tmp", model_state, metadata)
    os.replace(path + ".tmp", path)


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
