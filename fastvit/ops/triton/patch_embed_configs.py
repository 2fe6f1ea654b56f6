"""Tile sizes of the Triton patch-embedding kernels: a fixed heuristic per kernel kind (no autotuning: nothing is
benchmarked on the first call, so a warm-up call is all CUDA-graph capture needs), the configs ``fastvit selftest``
forces through the launchers, and the overrides tests use (tiny tiles, splits)."""

from __future__ import annotations

import contextlib

import torch

from fastvit.ops.triton import launch

CONFIG_OVERRIDES: dict[str, dict] = {}  # kernel kind -> config entries to replace (tests: tiny tiles, splits)
GEMM_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
CONFIG_KINDS = ("fwd", "fwd_norm", "bwd_input", "bwd_weight", "colsum")


@contextlib.contextmanager
def forced_configs(overrides: dict[str, dict]):
    """Within the block, replace config entries per kernel kind (see :data:`CONFIG_KINDS`), as
    ``CONFIG_OVERRIDES`` does: how ``fastvit selftest`` runs every config of :func:`candidate_configs` through the
    real launchers. Restores the previous overrides on exit. Not thread-safe (process-wide)."""
    unknown = sorted(set(overrides) - set(CONFIG_KINDS))
    if unknown:
        raise ValueError(f"overrides: unknown kernel kind(s) {unknown}; expected {list(CONFIG_KINDS)}")
    previous = {kind: dict(entries) for kind, entries in CONFIG_OVERRIDES.items()}
    for kind, entries in overrides.items():
        CONFIG_OVERRIDES[kind] = {**CONFIG_OVERRIDES.get(kind, {}), **entries}
    try:
        yield
    finally:
        CONFIG_OVERRIDES.clear()
        CONFIG_OVERRIDES.update(previous)


def candidate_configs(kind: str, like: torch.Tensor, gemm_dtype: torch.dtype) -> list[dict]:
    """Every tile config the heuristic of the ``fwd`` / ``bwd_input`` kernel can pick on ``like``'s GPU in
    ``gemm_dtype``, whatever the shapes and image layout: the heuristic evaluated on one representative of each of
    its branches (rows below/above the one-wave threshold; each power-of-two clamp of the columns and of the
    reduction; wide or narrow patch gathers, see :func:`is_narrow_gather`). Under the interpreter ``[{}]``: nothing to
    force, the launcher's own choice for the shapes at hand runs.
    """
    if kind not in ("fwd", "bwd_input"):
        raise ValueError(f"kind must be 'fwd' or 'bwd_input' (the heuristic's kernels), got {kind!r}")
    if not launch.on_gpu(like):
        return [{}]
    one_wave = 128 * launch.num_sms(like.device.index)  # rows at which 128-row tiles fill the GPU even at 1 column
    configs = {}
    for narrow_gather in (False, True):
        for rows in (1, one_wave):
            for cols in (1, 17, 33, 65):  # -> 16, 32, 64, 128 columns
                for red in (1, 17, 33, 65):  # -> 16, 32, 64 (32 for fp32)
                    config = heuristic_config(kind, like, gemm_dtype, rows, cols, red, narrow_gather)
                    configs[tuple(sorted(config.items()))] = config
    return list(configs.values())


def tile_config(
    kind: str, tensor: torch.Tensor, gemm_dtype: torch.dtype, rows: int, cols: int, red: int, narrow_gather: bool
) -> dict:
    """Tile sizes of one kernel: ``rows`` × ``cols`` outputs reduced over ``red`` (see each launcher)."""
    config = heuristic_config(kind, tensor, gemm_dtype, rows, cols, red, narrow_gather)
    config.update(CONFIG_OVERRIDES.get(kind, {}))
    return config


def heuristic_config(
    kind: str, tensor: torch.Tensor, gemm_dtype: torch.dtype, rows: int, cols: int, red: int, narrow_gather: bool
) -> dict:
    """The ``fwd`` / ``fwd_norm`` / ``bwd_input`` (``kind``) tiles for ``rows`` × ``cols`` outputs reduced over
    ``red``, on ``tensor``'s device; ``narrow_gather``: :func:`is_narrow_gather` of the image."""
    narrow = gemm_dtype != torch.float32
    if not launch.on_gpu(tensor):  # Triton's interpreter: large tiles mean fewer (slow, Python-level) programs
        config = dict(
            BLOCK_R=launch.next_pow2(rows, 16, 64),
            BLOCK_C=launch.next_pow2(cols, 16, 64),
            BLOCK_RED=launch.next_pow2(red, 16, 64),
        )
        config.update(num_warps=4, num_stages=1)
    elif kind == "fwd_norm":
        # One program per row block walks all of D (the norm's full-row epilogue): 64-row blocks (half the plain
        # forward's at large batches: more programs), its 128-wide D tiles, 8 warps; narrow gathers (ViT-*/14: AIMv2)
        # with 32-wide K tiles. Spill-free on sm_80 and sm_90a at AIMv2-L (and a ViT-B/16 shape), RMSNorm and
        # LayerNorm, every batch (python -m fastvit.kernels.resources --all; 32-row blocks spilled up to 16 B with
        # LayerNorm on sm_80, 4 warps up to 8 B).
        config = dict(
            BLOCK_R=64,
            BLOCK_C=launch.next_pow2(cols, 16, 128),
            BLOCK_RED=launch.next_pow2(red, 16, 64 if narrow and not narrow_gather else 32),
            num_warps=8,
            num_stages=3,
        )
    else:
        num_sms = launch.num_sms(tensor.device.index)
        block_c = launch.next_pow2(cols, 16, 128)
        block_r = 128 if launch.cdiv(rows, 128) * launch.cdiv(cols, block_c) >= num_sms else 64
        block_red = launch.next_pow2(red, 16, 64 if narrow else 32)
        warps = 8 if block_r * block_c >= 128 * 128 else 4
        if narrow_gather:
            # Narrow gathers hold more in registers: 8 warps, a 32-wide K tile for the forward at 128 rows and at
            # most 64 K columns for dX keep them spill-free on sm_80 and sm_90 with Triton 3.6 and 3.8 (4 warps
            # spilled up to 436 B; python -m fastvit.kernels.resources).
            warps = 8
            if kind == "fwd" and block_r == 128:
                block_red = min(block_red, 32)
            elif kind == "bwd_input":  # its columns are K
                block_c = min(block_c, 64)
        config = dict(BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_RED=block_red, num_warps=warps, num_stages=3)
    return config


def is_narrow_gather(x: torch.Tensor, patch_w: int) -> bool:
    """Patches are gathered with narrow loads held in registers (no 16-byte vectors, no async copies): channel-innermost
    images, or patch rows not a multiple of 8 pixels wide (ViT-*/14). Such kernels need more warps not to spill."""
    return channels_inner(x) or patch_w % 8 != 0


def channels_inner(x: torch.Tensor) -> bool:
    """Order K channel-innermost when the channel stride is the smallest (channels_last memory)."""
    return x.shape[1] > 1 and x.stride(1) < x.stride(3)
