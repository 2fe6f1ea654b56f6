"""Several images' tokens in one sequence: the ``attn_mask`` forms that fastvit's blocks take.

A block's ``attn_mask`` (timm's keyword) is one of

- ``None``: every token attends to every token of its image;
- a ``[B, N]`` bool tensor, True = a real token (a key-padding mask, timm NaFlexViT's ``patch_valid`` with the
  prefix tokens prepended): padding keys get no attention; runs on ``ops.qkv_attention(key_padding_mask=)``;
- a ``PackedSequences``: the batch is ``[1, T, C]``, the tokens of several images back to back, and no token attends
  across an image boundary; runs on ``ops.varlen_qkv_attention`` (no padded work);
- any other tensor: an SDPA mask (timm's ``[B, 1, N, N]`` / ``[B, 1, 1, N]``, bool True = attend, or additive
  float), applied by ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F


class PackedSequences(NamedTuple):
    """B sequences packed back to back in one [1, T, C] token tensor (``flash_attn_varlen``'s bookkeeping).

    Attributes:
        cu_seqlens: [B + 1] int32 on the tokens' device, 0 first, non-decreasing, T last: sequence b is tokens
            ``cu_seqlens[b]:cu_seqlens[b + 1]``.
        max_seqlen: an int at least the longest sequence's length.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int

    @classmethod
    def from_lengths(cls, lengths: list[int] | tuple[int, ...], device: torch.device | str | None = None):
        """The packing of sequences of ``lengths`` tokens, in order."""
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths):
            raise ValueError(f"lengths must be non-negative ints, got {lengths!r}")
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
        return _PackingOfLengths.of(cu_seqlens, max(lengths, default=0), bounds[-1])

    @property
    def host_num_tokens(self) -> int | None:
        """T as a host int when the values are right by construction (``from_lengths``), else None: the attention
        then checks ``cu_seqlens`` on the device (one sync per call)."""
        return None

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    def sequence_ids(self, tokens: int) -> torch.Tensor:
        """[T] int64: the sequence each of the ``tokens`` packed tokens belongs to."""
        token = torch.arange(tokens, device=self.cu_seqlens.device)
        return torch.searchsorted(self.cu_seqlens[1:].long(), token, right=True)

    def dense_mask(self, tokens: int) -> torch.Tensor:
        """[1, 1, T, T] bool, True where query and key are in the same sequence: the SDPA form of the packing
        (O(T²) memory; used only where the varlen kernels do not apply)."""
        ids = self.sequence_ids(tokens)
        return (ids[:, None] == ids[None, :])[None, None]


def pick_token_budget(num_tokens: int, budgets: list[int] | tuple[int, ...]) -> int:
    """The smallest of ``budgets`` (token counts) that holds ``num_tokens``: the bucket a packed batch is padded to so
    that one CUDA graph per budget serves every batch (vLLM's token budgets).

    Raises:
        ValueError: when no budget holds ``num_tokens`` (the message names the largest), or ``budgets`` is empty.
    """
    if not budgets:
        raise ValueError("budgets must hold at least one token count")
    fitting = [budget for budget in budgets if budget >= num_tokens]
    if not fitting:
        raise ValueError(f"{num_tokens} packed tokens exceed the largest token budget ({max(budgets)})")
    return min(fitting)


def pad_packing(
    lengths: list[int] | tuple[int, ...], budget: int, max_sequences: int, device: torch.device | str | None = None
) -> PackedSequences:
    """A packing of sequences of ``lengths`` with fixed shapes for CUDA-graph replay: ``budget`` tokens, the
    ``budget - T`` padding tokens after the real ones as one dummy sequence (it attends only to itself, so the real
    sequences see no padding), then empty sequences up to ``max_sequences`` real ones: ``cu_seqlens`` is always
    [max_sequences + 2] and ``max_seqlen`` is ``budget``, whatever the lengths.

    Padding overhead: the GEMMs, norms and MLPs run ``budget / T`` times the tokens (below 2x when the budgets are
    powers of two), plus the dummy sequence's own attention, quadratic in ``budget - T``; ``max_seqlen = budget``
    adds idle attention programs that exit at once.

    Raises:
        ValueError: more than ``max_sequences`` sequences or more than ``budget`` tokens.
    """
    total = sum(lengths)
    if len(lengths) > max_sequences:
        raise ValueError(f"{len(lengths)} sequences exceed max_sequences={max_sequences}")
    if total > budget:
        raise ValueError(f"{total} tokens exceed the token budget {budget}")
    padded = [*lengths, budget - total] + [0] * (max_sequences - len(lengths))
    return _PackingOfLengths.of(PackedSequences.from_lengths(padded, device).cu_seqlens, budget, budget)


class _PackingOfLengths(PackedSequences):
    """A ``PackedSequences`` built by ``from_lengths`` or ``pad_packing``: its ``cu_seqlens`` are right by
    construction and its token count is known on the host, so ``check_attn_mask`` checks it against the tokens
    without a device sync (and the attention skips its device check of ``cu_seqlens``). A copy made another way
    (``_replace``) has no host count and is checked on the device as any ``PackedSequences``."""

    host_num_tokens: int | None = None  # an instance attribute (this subclass has a __dict__), set by of()

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor, max_seqlen: int, num_tokens: int) -> _PackingOfLengths:
        packing = cls(cu_seqlens, max_seqlen)
        packing.host_num_tokens = num_tokens
        return packing


AttnMask = torch.Tensor | PackedSequences | None


def is_key_padding_mask(attn_mask: AttnMask) -> bool:
    """True for the [B, N] bool key-padding form."""
    return isinstance(attn_mask, torch.Tensor) and attn_mask.dtype == torch.bool and attn_mask.ndim == 2


def sdpa_mask(attn_mask: AttnMask, tokens: int) -> torch.Tensor | None:
    """``attn_mask`` as ``F.scaled_dot_product_attention``'s ``attn_mask`` for [B, H, N, D] q/k/v."""
    if attn_mask is None:
        return None
    if isinstance(attn_mask, PackedSequences):
        return attn_mask.dense_mask(tokens)
    if is_key_padding_mask(attn_mask):
        return attn_mask[:, None, None, :]
    return attn_mask


def check_attn_mask(attn_mask: object, x: torch.Tensor) -> None:
    """TypeError/ValueError unless ``attn_mask`` is one of the forms above and fits tokens ``x`` [B, N, C]."""
    if attn_mask is None:
        return
    if isinstance(attn_mask, PackedSequences):
        if x.ndim != 3 or x.shape[0] != 1:
            raise ValueError(
                f"attn_mask=PackedSequences needs the packed tokens as [1, T, C], got x of shape {tuple(x.shape)}"
            )
        if attn_mask.host_num_tokens is not None and attn_mask.host_num_tokens != x.shape[1]:
            raise ValueError(
                f"attn_mask=PackedSequences packs {attn_mask.host_num_tokens} tokens, x holds {x.shape[1]}"
            )
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor, a PackedSequences or None, got {type(attn_mask).__name__}")
    if is_key_padding_mask(attn_mask) and tuple(attn_mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"attn_mask as a key-padding mask must be [B, N] = {list(x.shape[:2])}, got {list(attn_mask.shape)}"
        )


class ImagePacking(NamedTuple):
    """Where each image's tokens lie in a packed [1, T, C] sequence: image b is ``lengths[b]`` tokens, its
    ``num_prefix_tokens`` prefix (class / register) tokens first, then its ``grids[b]`` = (h, w) patch grid in
    row-major order. Built from Python ints (``from_grids``): nothing is read back from the device.

    Attributes:
        sequences: the ``PackedSequences`` the blocks take as ``attn_mask``.
        grids: each image's patch grid (h, w).
        num_prefix_tokens: prefix tokens per image.
    """

    sequences: PackedSequences
    grids: tuple[tuple[int, int], ...]
    num_prefix_tokens: int

    @classmethod
    def from_grids(cls, grids, num_prefix_tokens: int, device: torch.device | str | None = None) -> ImagePacking:
        """The packing of images with these patch grids, in order, each with ``num_prefix_tokens`` prefix tokens."""
        grids = tuple((int(h), int(w)) for h, w in grids)
        lengths = [num_prefix_tokens + h * w for h, w in grids]
        return cls(PackedSequences.from_lengths(lengths, device), grids, num_prefix_tokens)

    @property
    def num_images(self) -> int:
        return len(self.grids)

    @property
    def lengths(self) -> list[int]:
        """Tokens per image (prefix + patches)."""
        return [self.num_prefix_tokens + h * w for h, w in self.grids]

    @property
    def starts(self) -> list[int]:
        """Index of each image's first token in the packed sequence."""
        return list(itertools.accumulate(self.lengths, initial=0))[:-1]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def split(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Packed tokens [1, T, ...] or [T, ...] -> each image's [N_b, ...] (views)."""
        return list((tokens[0] if tokens.ndim == 3 else tokens).split(self.lengths))

    def token_index(self, include_prefix: bool) -> tuple[torch.Tensor, list[int]]:
        """The packed positions of every image's patch tokens (with its prefix tokens if ``include_prefix``), image
        after image: [P] int64 on the packing's device, and how many belong to each image."""
        skip = 0 if include_prefix else self.num_prefix_tokens
        counts = [n - skip for n in self.lengths]
        index = torch.cat([torch.arange(start + skip, start + skip + n) for start, n in zip(self.starts, counts)])
        return index.to(self.sequences.cu_seqlens.device, non_blocking=True), counts


POOL_REDUCTIONS = {"avg": ("mean",), "max": ("max",), "avgmax": ("max", "mean")}


def segment_pool(tokens: torch.Tensor, packing: ImagePacking, pool_type: str, include_prefix: bool) -> torch.Tensor:
    """Per-image pooling of packed tokens, as ``VisionTransformer.pool`` does for one image.

    Args:
        tokens: [1, T, C] or [T, C] packed tokens.
        packing: where each image's tokens are.
        pool_type: 'token' (each image's first token), 'avg', 'max' or 'avgmax' (over each image's patch tokens, its
            prefix tokens too with ``include_prefix``: segment reductions, no loop over the images).
        include_prefix: pool over the prefix tokens as well.

    Returns:
        [B, C], one row per image.
    """
    tokens = tokens[0] if tokens.ndim == 3 else tokens
    if pool_type == "token":
        first = torch.tensor(packing.starts, device=tokens.device)
        return tokens.index_select(0, first)
    if pool_type not in POOL_REDUCTIONS:
        raise ValueError(f"pool_type must be 'token', 'avg', 'max' or 'avgmax', got {pool_type!r}")
    index, counts = packing.token_index(include_prefix)
    selected = tokens.index_select(0, index)
    lengths = torch.tensor(counts, device=tokens.device)
    pooled = [torch.segment_reduce(selected, reduce, lengths=lengths, axis=0) for reduce in POOL_REDUCTIONS[pool_type]]
    return pooled[0] if len(pooled) == 1 else 0.5 * (pooled[0] + pooled[1])  # avgmax: as timm's 0.5·(max + mean)


def padded_tokens(
    tokens: torch.Tensor, packing: ImagePacking, include_prefix: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed tokens -> one padded row per image and its key-padding mask: what a per-image attention over each
    image's tokens (the attention-pooling head) takes to run once for all images.

    Args:
        tokens: [1, T, C] or [T, C] packed tokens.
        packing: where each image's tokens are.
        include_prefix: keep each image's prefix tokens (else its patch tokens only).

    Returns:
        ``(padded, keep)``: [B, L, C] with image b's P_b tokens first in row b and zeros after them (L the largest
        P_b), and the [B, L] bool mask, True on the P_b real tokens. Differentiable in ``tokens``.
    """
    tokens = tokens[0] if tokens.ndim == 3 else tokens
    index, counts = packing.token_index(include_prefix)
    longest = max(counts, default=0)
    rows = torch.cat([torch.arange(b * longest, b * longest + n) for b, n in enumerate(counts)])
    rows = rows.to(tokens.device, non_blocking=True)
    padded = tokens.new_zeros(len(counts) * longest, tokens.shape[-1])
    padded = padded.index_copy(0, rows, tokens.index_select(0, index))
    keep = torch.arange(longest, device=tokens.device) < torch.tensor(counts, device=tokens.device)[:, None]
    return padded.view(len(counts), longest, tokens.shape[-1]), keep


def identity_rope_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """``rows`` rows that rotate by nothing (sin 0, cos 1), shaped as ``table`` [..., n, 2·D] but for n."""
    sin_cos_shape = (*table.shape[:-2], rows, table.shape[-1] // 2)
    return torch.cat([table.new_zeros(sin_cos_shape), table.new_ones(sin_cos_shape)], dim=-1)


def packed_rope_table(tables: list[torch.Tensor], num_prefix_tokens: int) -> torch.Tensor:
    """Each image's RoPE table -> the packed sequence's, as ``apply_rope`` reads it.

    ``apply_rope`` leaves a sequence's first ``num_prefix_tokens`` tokens unrotated and rotates every later one by
    its table row; in a packing those later tokens include the prefix tokens of images 1, 2, ..., which get identity
    rows (sin 0, cos 1) so that they stay unrotated too.

    Args:
        tables: per image b, its grid's table [..., h_b·w_b, 2·D] = cat(sin, cos) (leading dims: RoPE-Mixed's
            [depth, heads]).
        num_prefix_tokens: prefix tokens per image.

    Returns:
        [..., T - num_prefix_tokens, 2·D].
    """
    first = tables[0]
    identity = identity_rope_rows(first, num_prefix_tokens)
    parts = [first]
    for table in tables[1:]:
        parts += [identity, table] if num_prefix_tokens else [table]
    return torch.cat(parts, dim=-2)


# ------------------------------------------------------------------------------------------------
# Mixed-resolution batches for training


def parse_sizes(spec: str) -> list[tuple[int, int]]:
    """'16,24,32x16' -> [(16, 16), (24, 24), (32, 16)]: image sizes in pixels, a side or height x width each.

    Raises:
        ValueError: naming the entry that is not a positive int or HxW pair of them.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"sizes must be a comma-separated list like '16,24,32x16', got {spec!r}")
    sizes = []
    for entry in spec.split(","):
        parts = entry.strip().lower().split("x")
        if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"sizes: {entry.strip()!r} is not a size in pixels (a side like 24 or HxW like 32x16)")
        sizes.append((int(parts[0]), int(parts[-1])))
    return sizes


def resize_each(images: torch.Tensor, sizes: list[tuple[int, int]], mode: str = "bilinear") -> list[torch.Tensor]:
    """Images [B, C, H, W] -> a list of B images [C, h_b, w_b], image b resized to ``sizes[b]`` (one antialiased
    ``F.interpolate`` per distinct size; an image already at its size is kept as it is)."""
    if len(sizes) != images.shape[0]:
        raise ValueError(f"sizes: one size per image needed, got {len(sizes)} for {images.shape[0]} images")
    out: list[torch.Tensor | None] = [None] * len(sizes)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        by_size.setdefault(tuple(size), []).append(i)
    for size, indices in by_size.items():
        group = images[indices]
        if size != tuple(images.shape[-2:]):
            group = F.interpolate(group, size=size, mode=mode, antialias=mode in ("bilinear", "bicubic"))
        for i, image in zip(indices, group.unbind(0)):
            out[i] = image
    return out


class PackingCollate:
    """A DataLoader ``collate_fn`` for mixed-resolution training: (image, label) pairs of one size -> a list of
    images of sampled sizes and their labels, for ``model.forward_packed`` (or ``model(images)``).

    The pairs are stacked (``default_collate``), ``augment`` (a batch augmentation, e.g. the digits' random shift)
    runs on the stacked batch, then each image is resized to a size drawn uniformly from ``sizes`` (NaFlex/NaViT-style
    sampling per image), from the DataLoader's random stream (its workers are seeded per worker).

    Args:
        sizes: the (height, width) sizes to draw from (see ``parse_sizes``).
        augment: [B, C, H, W] -> [B, C, H, W], applied before resizing; None for none.
        mode: ``F.interpolate`` mode of the resizing.

    Returns (from a call):
        (list of B [C, h_b, w_b] tensors, labels [B]).
    """

    def __init__(self, sizes: list[tuple[int, int]], augment=None, mode: str = "bilinear") -> None:
        if not sizes:
            raise ValueError("sizes must hold at least one (height, width)")
        self.sizes = [tuple(size) for size in sizes]
        self.augment = augment
        self.mode = mode

    def __call__(self, batch: list) -> tuple[list[torch.Tensor], torch.Tensor]:
        from torch.utils.data import default_collate

        images, labels = default_collate(batch)
        if self.augment is not None:
            images = self.augment(images)
        picks = torch.randint(len(self.sizes), (images.shape[0],)).tolist()
        return resize_each(images, [self.sizes[i] for i in picks], self.mode), labels
