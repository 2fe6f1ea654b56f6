"""``fastvit.InferenceSession``: CUDA-graph inference with static buffers, for small batches and low latency.

At batch 1 a ViT-B forward is a few hundred kernel launches of a few microseconds each: CPU launch
overhead, not the GPU, sets the latency. Capturing the forward once as a CUDA graph and replaying it
removes that overhead. The session warms the model up first (Triton autotuning, cuBLAS handles and
workspaces happen there, never inside the capture), captures one graph per requested batch size, and
runs any other batch size eagerly (counted in ``fallback_calls``). Autocast to ``dtype`` happens
inside, so callers pass float32 images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn


class InferenceSession:
    """Run ``model`` for inference, replaying a captured CUDA graph per batch size on CUDA.

    Args:
        model: a fastvit (or any) image model; put in eval mode.
        batch_sizes: batch size(s) to capture graphs for.
        dtype: autocast dtype (torch.bfloat16, torch.float16) or torch.float32 for none.
        input_shape: (C, H, W) of one image; default from ``model.patch_embed`` / ``model.in_chans``.
        warmup: eager iterations before each capture.
        use_cuda_graphs: default True on CUDA; False runs eagerly (the only option on CPU).
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
        sizes = [batch_sizes] if isinstance(batch_sizes, int) else list(batch_sizes)
        if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
            raise ValueError(f"batch_sizes must be positive ints, got {batch_sizes!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1 (autotuning must finish before capture), got {warmup!r}")
        if input_shape is not None and (
            len(tuple(input_shape)) != 3
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in tuple(input_shape))
        ):
            raise ValueError(f"input_shape must be (C, H, W) of positive ints, got {input_shape!r}")
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
        self.warmup = warmup
        self.fallback_calls = 0
        self.replays = 0
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        if use_cuda_graphs:
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
        static_input = torch.randn(batch, *self.input_shape, device=self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._forward(static_input)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
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
        static_input.copy_(x)
        graph.replay()
        self.replays += 1
        return static_output.clone()  # the static buffer is overwritten by the next replay
