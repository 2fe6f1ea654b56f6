"""``fastvit.InferenceSession``: CUDA-graph inference with static buffers, for small batches and low latency.

At batch 1 a ViT-B forward is a few hundred kernel launches of a few microseconds each: CPU launch
overhead, not the GPU, sets the latency. Capturing the forward once as a CUDA graph and replaying it
removes that overhead. The session warms the model up first (Triton autotuning, cuBLAS handles and
workspaces happen there, never inside the capture), captures one graph per requested batch size, and
runs any other batch size eagerly (counted in ``fallback_calls``). Autocast to ``dtype`` happens
inside, so callers pass float32 images.

Device and stream rules (both needed for a correct graph, see ``_capture``):
- Warm-up, capture and replay run under ``torch.cuda.device(model's device)``. ``torch.cuda.graph``
  captures the *current device's* stream, while every fastvit launcher switches to its tensors' device
  and launches on that device's current stream: with a model on cuda:1 and cuda:0 current, the kernels
  would run eagerly on cuda:1 during "capture" and the graph would be empty (stale output on replay).
- One side stream per session serves every batch size: cuBLAS(Lt) keeps one workspace (up to 32 MiB)
  per stream, so a stream per batch size would hold one workspace per captured batch size.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from fastvit.packing import ImagePacking, PackedSequences, identity_rope_rows, pad_packing, pick_token_budget


class InferenceSession:
    """Run ``model`` for inference, replaying a captured CUDA graph per batch size on CUDA.

    Args:
        model: a fastvit (or any) image model; put in eval mode.
        batch_sizes: batch size(s) to capture graphs for.
        dtype: autocast dtype (torch.bfloat16, torch.float16) or torch.float32 for none.
        input_shape: (C, H, W) of one image; default from ``model.patch_embed`` / ``model.in_chans``.
        warmup: eager iterations before each capture.
        use_cuda_graphs: default True on CUDA; False runs eagerly (the only option on CPU).

    Raises:
        TypeError: ``model`` not an ``nn.Module``, ``dtype`` not one of the three, ``use_cuda_graphs`` not a bool
            or None.
        ValueError: ``batch_sizes`` not a positive int or a non-empty sequence of them (floats such as 2.0 and
            bools included), ``warmup`` not an int >= 1, ``input_shape`` not three positive ints, a model without
            parameters, or CUDA graphs asked for a model off CUDA. Each message names the argument.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_sizes: int | Sequence[int] = 1,
        dtype: torch.dtype = torch.bfloat16,
        input_shape: tuple[int, int, int] | None = None,
        warmup: int = 3,
        use_cuda_graphs: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
        sizes = _batch_sizes(batch_sizes)
        if not _is_positive_int(warmup):
            raise ValueError(
                f"warmup must be an int >= 1 (autotuning must finish before capture), got {_describe(warmup)}"
            )
        if input_shape is not None:
            input_shape = _input_shape(input_shape)
        if use_cuda_graphs is not None and not isinstance(use_cuda_graphs, bool):
            raise TypeError(
                f"use_cuda_graphs must be True, False or None (automatic), got {_describe(use_cuda_graphs)}"
            )
        parameter = next(iter(model.parameters()), None)
        if parameter is None:
            raise ValueError("model has no parameters: the session cannot tell its device")
        self.model = model.eval()
        self.device = parameter.device
        if use_cuda_graphs is None:
            use_cuda_graphs = self.device.type == "cuda"
        if use_cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {self.device}")
        self.use_cuda_graphs = use_cuda_graphs
        self.dtype = dtype
        self.input_shape = tuple(input_shape) if input_shape is not None else self._default_input_shape(model)
        self.warmup = int(warmup)
        self.fallback_calls = 0
        self.replays = 0
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._stream: torch.cuda.Stream | None = None  # the one warm-up and capture stream (CUDA graphs only)
        if use_cuda_graphs:
            with torch.cuda.device(self.device):
                self._stream = torch.cuda.Stream(device=self.device)
                for batch in sizes:
                    self._capture(batch)

    @staticmethod
    def _default_input_shape(model: nn.Module) -> tuple[int, int, int]:
        # The model's data config (fastvit.data.resolve_data_config): its channels and patch_embed.img_size, or
        # the input_size of its pretrained_cfg when it has no patch embedding to read them from.
        from fastvit.data import resolve_data_config

        has_size = hasattr(getattr(model, "patch_embed", None), "img_size")
        if not has_size and "input_size" not in (getattr(model, "pretrained_cfg", None) or {}):
            raise ValueError("pass input_shape=(C, H, W): the model has no patch_embed.img_size or data config")
        return tuple(resolve_data_config(model)["input_size"])

    @property
    def captured_batch_sizes(self) -> list[int]:
        return sorted(self._graphs)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.model(x)

    def _capture(self, batch: int) -> None:
        """Warm up, then capture one graph for ``batch`` images. Runs under ``torch.cuda.device(self.device)``."""
        static_input = torch.randn(batch, *self.input_shape, device=self.device)
        # Warm-up on the session's stream (the one the capture uses): per-stream state such as the cuBLAS(Lt)
        # workspace is created here, outside the capture.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream):
            for _ in range(self.warmup):
                self._forward(static_input)
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        # An explicit stream of the model's device: torch.cuda.graph's default capture stream is created once per
        # process on whichever device was current at its first use.
        with torch.cuda.graph(graph, stream=self._stream):
            static_output = self._forward(static_input)
        self._graphs[batch] = (graph, static_input, static_output)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            # A captured graph's copy_ would convert integer images silently (no /255, no normalisation).
            raise TypeError(
                f"x must be a floating-point image batch, got {x.dtype}; normalise integer images first "
                "(or use fastvit.ops.patch_embed_uint8)"
            )
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.input_shape))}], got {tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device}, the session's model on {self.device}")
        entry = self._graphs.get(x.shape[0])
        if entry is None:
            self.fallback_calls += 1
            return self._forward(x)
        graph, static_input, static_output = entry
        # Replay on the model's device: graph.replay() and the copies run on the *current* device's current stream.
        with torch.cuda.device(self.device):
            static_input.copy_(x)
            graph.replay()
            self.replays += 1
            return static_output.clone()  # the static buffer is overwritten by the next replay


def _is_positive_int(value: object) -> bool:
    """An integer >= 1 (Python or NumPy); ``True`` is not a count."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _batch_sizes(batch_sizes: object, name: str = "batch_sizes") -> list[int]:
    """``batch_sizes`` as a non-empty list of ints >= 1, or a ValueError naming the offending entry."""
    rule = f"{name} must be positive ints (one int or a sequence of them)"
    if _is_positive_int(batch_sizes):
        return [int(batch_sizes)]
    if isinstance(batch_sizes, (str, bytes, numbers.Number, torch.Tensor)) or not isinstance(batch_sizes, Iterable):
        raise ValueError(f"{rule}, got {_describe(batch_sizes)}")
    sizes = list(batch_sizes)
    if not sizes:
        raise ValueError(f"{rule}, got an empty {type(batch_sizes).__name__}")
    for index, size in enumerate(sizes):
        if not _is_positive_int(size):
            raise ValueError(f"{rule}, got {name}[{index}] = {_describe(size)}")
    return [int(size) for size in sizes]


def _input_shape(input_shape: object) -> tuple[int, int, int]:
    """``input_shape`` as (C, H, W) ints >= 1, or a ValueError naming it."""
    rule = "input_shape must be (C, H, W) of positive ints"
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Iterable):
        raise ValueError(f"{rule}, got {_describe(input_shape)}")
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(_is_positive_int(size) for size in shape):
        raise ValueError(f"{rule}, got {input_shape!r}")
    return tuple(int(size) for size in shape)


_Table = torch.Tensor | None  # a packed RoPE table, None for a model without RoPE


class PackedInferenceSession:
    """Inference on lists of images of different sizes (``model.forward_packed``), replaying one CUDA graph per token
    budget on CUDA.

    A batch's packed token count T is bucketed to the smallest of ``token_budgets`` that holds it
    (``fastvit.packing.pick_token_budget``) and padded to it (``pad_packing``: the padding as one dummy sequence, then
    empty ones up to ``max_images``), so every batch of one budget has the same shapes: the blocks and the final norm,
    almost all of the work, replay the budget's graph on a static [1, budget, D] buffer and a static
    ``cu_seqlens`` [max_images + 2]. RoPE models (``fastvit.Eva`` with ``rope_config``) get a third static input, the
    packed RoPE table [budget - num_prefix_tokens, 2·D] (``model.packed_block_args``: each image's grid table, identity
    rows at later images' prefix tokens and at the padding), which the blocks' varlen attention applies in its
    prologue. The patch embedding (one call per distinct size), the RoPE tables and the per-image pooling and head run
    eagerly. Padding overhead: the blocks run ``budget / T`` times the tokens (under 2x with power-of-two
    budgets), plus the dummy sequence's attention.

    Args:
        model: a ``VisionTransformer`` or an ``Eva`` (RoPE included; RoPE-Mixed's per-head tables are built per
            batch without a gradient, [depth, heads, budget - num_prefix_tokens, 2·D]) built with
            ``dynamic_img_size=True``; put in eval mode.
        token_budgets: the budgets (token counts) to capture graphs for; a batch above the largest is an error.
        max_images: the most images one batch may hold.
        dtype: autocast dtype (torch.bfloat16, torch.float16) or torch.float32 for none.
        warmup: eager iterations before each capture.
        use_cuda_graphs: default True on CUDA; False (the only option on CPU) runs the same padded blocks eagerly.

    Raises:
        TypeError / ValueError: bad arguments, each message naming it.
    """

    def __init__(
        self,
        model: nn.Module,
        token_budgets: int | Sequence[int],
        max_images: int = 64,
        dtype: torch.dtype = torch.bfloat16,
        warmup: int = 3,
        use_cuda_graphs: bool | None = None,
    ) -> None:
        if not hasattr(model, "forward_packed"):
            raise TypeError(f"model must be a fastvit VisionTransformer or Eva, got {type(model).__name__}")
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise TypeError(f"dtype must be torch.bfloat16, torch.float16 or torch.float32, got {dtype}")
        budgets = _batch_sizes(token_budgets, "token_budgets")
        if min(budgets) <= model.num_prefix_tokens:
            raise ValueError(
                f"token_budgets must each exceed num_prefix_tokens={model.num_prefix_tokens} (one image's prefix and a "
                f"patch), got {min(budgets)}"
            )
        if not _is_positive_int(max_images):
            raise ValueError(f"max_images must be an int >= 1, got {_describe(max_images)}")
        if not _is_positive_int(warmup):
            raise ValueError(f"warmup must be an int >= 1, got {_describe(warmup)}")
        if use_cuda_graphs is not None and not isinstance(use_cuda_graphs, bool):
            raise TypeError(f"use_cuda_graphs must be True, False or None, got {_describe(use_cuda_graphs)}")
        self.model = model.eval()
        self.device = next(model.parameters()).device
        use_cuda_graphs = self.device.type == "cuda" if use_cuda_graphs is None else use_cuda_graphs
        if use_cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {self.device}")
        self.token_budgets = sorted(set(budgets))
        self.max_images = int(max_images)
        self.dtype = dtype
        self.warmup = int(warmup)
        self.use_cuda_graphs = use_cuda_graphs
        self.replays = 0
        self.padding_tokens = 0  # padding run so far, for the overhead: padding_tokens / (padding + real tokens)
        self.tokens = 0
        # per budget: graph, static tokens, cu_seqlens, RoPE table (None without RoPE), output
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, _Table, torch.Tensor]] = {}
        if use_cuda_graphs:
            with torch.cuda.device(self.device):
                self._stream = torch.cuda.Stream(device=self.device)
                for budget in self.token_budgets:
                    self._capture(budget)

    @property
    def padding_overhead(self) -> float:
        """The fraction of the tokens run so far that were budget padding."""
        total = self.tokens + self.padding_tokens
        return self.padding_tokens / total if total else 0.0

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def _blocks(self, x: torch.Tensor, attn_mask, rope: torch.Tensor | None) -> torch.Tensor:
        """The blocks and the final norm on the padded [1, budget, D] tokens (``rope``: their packed table, or
        RoPE-Mixed's per-block tables)."""
        per_block = rope is not None and self._per_block_rope
        for index, block in enumerate(self.model.blocks):
            block_args = () if rope is None else (rope[index] if per_block else rope,)
            x = self.model._run_block(block, x, *block_args, attn_mask=attn_mask)
        return self.model.norm(x)

    @property
    def _per_block_rope(self) -> bool:
        return getattr(getattr(self.model, "rope", None), "mixed", False)

    def _rope(self, packing: ImagePacking) -> torch.Tensor | None:
        """The packed RoPE table of ``packing``'s images [T - num_prefix_tokens, 2·D] (RoPE-Mixed: every block's
        per-head tables [depth, heads, T - num_prefix_tokens, 2·D], built without a gradient: the kernels' prologue);
        None without RoPE."""
        with torch.no_grad():
            block_args = self.model.packed_block_args(packing, self.device)
            if self._per_block_rope:
                return torch.stack([args[0] for args in block_args])
            first = next(iter(block_args))
        return first[0] if first else None

    def _padded_rope(self, rope: torch.Tensor | None, budget: int) -> torch.Tensor | None:
        """``rope`` [..., T - prefix, 2·D] followed by identity rows (sin 0, cos 1) up to [..., budget - prefix, 2·D]:
        the padding sequence's tokens, never read by a real image."""
        if rope is None:
            return None
        padding = budget - self.model.num_prefix_tokens - rope.shape[-2]
        return torch.cat([rope, identity_rope_rows(rope, padding)], dim=-2)

    def _embed_dtype(self) -> torch.dtype:
        """The dtype of the embedded tokens (the residual stream) under the session's autocast."""
        probe = torch.zeros(self.model.in_chans, *self.model.patch_embed.patch_size, device=self.device)
        packing = ImagePacking.from_grids([(1, 1)], self.model.num_prefix_tokens, self.device)
        with torch.no_grad(), self._autocast():
            return self.model.embed_packed([probe], packing).dtype

    def _capture(self, budget: int) -> None:
        """Warm up, then capture the blocks for ``budget`` tokens. Runs under ``torch.cuda.device(self.device)``."""
        static_x = torch.randn(1, budget, self.model.embed_dim, device=self.device, dtype=self._embed_dtype())
        packing = PackedSequences.from_lengths([budget] + [0] * self.max_images, device=self.device)
        static_cu = packing.cu_seqlens
        probe = self._rope(ImagePacking.from_grids([(1, 1)], self.model.num_prefix_tokens, self.device))
        static_rope = self._padded_rope(None if probe is None else probe[..., :0, :], budget)  # identity rows
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._stream), torch.no_grad(), self._autocast():
            for _ in range(self.warmup):
                self._blocks(static_x, packing, static_rope)
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._stream), torch.no_grad(), self._autocast():
            static_out = self._blocks(static_x, packing, static_rope)
        self._graphs[budget] = (graph, static_x, static_cu, static_rope, static_out)

    def __call__(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Images [C, H_b, W_b] (as ``model.forward_packed``, on the model's device) -> logits [B, num_classes]."""
        model = self.model
        grids = model.check_packed_images(images)
        if len(images) > self.max_images:
            raise ValueError(f"images: {len(images)} images exceed the session's max_images={self.max_images}")
        if images[0].device != self.device:
            raise ValueError(f"images are on {images[0].device}, the session's model on {self.device}")
        packing = ImagePacking.from_grids(grids, model.num_prefix_tokens, self.device)
        tokens = packing.num_tokens
        budget = pick_token_budget(tokens, self.token_budgets)
        self.tokens += tokens
        self.padding_tokens += budget - tokens
        with torch.no_grad(), self._autocast():
            x = model.embed_packed(images, packing)
            rope = self._padded_rope(self._rope(packing), budget)
            if self.use_cuda_graphs:
                graph, static_x, static_cu, static_rope, static_out = self._graphs[budget]
                with torch.cuda.device(self.device):
                    static_x[:, :tokens].copy_(x)
                    static_x[:, tokens:].zero_()
                    static_cu.copy_(pad_packing(packing.lengths, budget, self.max_images).cu_seqlens)
                    if rope is not None:
                        static_rope.copy_(rope)
                    graph.replay()
                    self.replays += 1
                    out = static_out[:, :tokens].clone()  # the static buffer is overwritten by the next replay
            else:
                padded = torch.cat([x, x.new_zeros(1, budget - tokens, x.shape[-1])], dim=1)
                out = self._blocks(padded, pad_packing(packing.lengths, budget, self.max_images, self.device), rope)
                out = out[:, :tokens]
            return model.forward_head_packed(out, packing)
