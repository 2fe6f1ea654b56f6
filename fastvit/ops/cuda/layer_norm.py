"""The ``cuda`` backends of ``layer_norm`` and ``rms_norm``: the extension op ``fastvit::layer_norm_fwd/bwd`` (RMSNorm
with ``rms=True``, bias None), fake impls, autograd.

``layer_norm_fwd`` returns (out, mean, rstd); the autograd registered here calls ``layer_norm_bwd`` on the
saved x, weight, mean and rstd (fp32 math, deterministic dweight/dbias reduction). The backward is not itself
differentiable: a double backward raises (see ``fastvit/ops/cuda/__init__.py``).
"""

from __future__ import annotations

import torch

from fastvit import dispatch
from fastvit.ops.cuda.extension import register_extension_op
from fastvit.validation import autocast_enabled


@dispatch.register("layer_norm", "cuda")  # every floating dtype (the kernels dispatch float64 too)
def layer_norm(x, weight, bias, eps, rms=False):
    if not autocast_enabled(x.device):
        return torch.ops.fastvit.layer_norm_fwd(x, weight, bias, eps, rms)[0]
    # Under autocast the parameters may be fp32 and x bf16/fp16 (one dtype per call for the kernels): compute in
    # fp32 and return what F.layer_norm returns there. CUDA autocast has layer_norm on its float32 list (fp32 out);
    # CPU autocast leaves it alone and F.layer_norm takes mixed dtypes, answering in x's dtype.
    out_dtype = torch.float32 if x.device.type == "cuda" and x.dtype != torch.float64 else x.dtype
    x, weight, bias = (t if t is None or t.dtype == torch.float64 else t.float() for t in (x, weight, bias))
    return torch.ops.fastvit.layer_norm_fwd(x, weight, bias, eps, rms)[0].to(out_dtype)


@dispatch.register("rms_norm", "cuda")
def rms_norm(x, weight, eps):
    return layer_norm(x, weight, None, eps, rms=True)


def _fake_forward(x, weight, bias, eps, rms=False):
    stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    stats = x.new_empty(x.shape[:-1], dtype=stats_dtype)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stats, torch.empty_like(stats)


def _fake_backward(grad_out, x, weight, mean, rstd, rms=False):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps, *rms = inputs
    _out, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias, ctx.rms = bias is not None, bool(rms and rms[0])


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.fastvit.layer_norm_bwd(grad_out, x, weight, mean, rstd, ctx.rms)
    return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None, None


register_extension_op(
    "layer_norm", fakes={"layer_norm_fwd": _fake_forward, "layer_norm_bwd": _fake_backward},
    backward=_backward, setup_context=_setup_context,
)  # fmt: skip
