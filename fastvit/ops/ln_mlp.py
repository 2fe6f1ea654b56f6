"""The MLP half of a ViT block: ``fastvit.ops.ln_mlp`` = ``x + fc2(gelu(fc1(LayerNorm(x))))``.

Backends:
  ``torch``  the reference (``fastvit.reference.ln_mlp``), autograd by PyTorch.
  ``cuda``   the compiled extension's fused op ``torch.ops.fastvit.ln_mlp_fwd`` / ``ln_mlp_bwd``
             (csrc/ln_mlp): on CUDA tensors a LayerNorm kernel, the fc1 GEMM with a bias (and, for
             ``approximate='tanh'``, GELU) cuBLASLt epilogue, an exact-GELU kernel, and the fc2 GEMM
             with bias and the residual add in its epilogue; the backward fuses dGELU and the bias
             gradients into the GEMMs where cuBLASLt can. On CPU tensors its C++ implementation.
             It saves x, the LN statistics and the fc1 pre-activation (not LN(x) nor GELU's output,
             which the backward recomputes): about half the activation memory of eager PyTorch.

Autocast: custom ops are not cast by ``torch.autocast``, so the ``cuda`` backend does what autocast
does for the Linear layers it replaces: inside an autocast region it runs the fused op in the
autocast dtype (x and the parameters are cast, differentiably, so fp32 master weights get fp32
gradients) and adds the residual outside the op in x's own dtype, as eager autocast would
(fp32 + bf16 -> fp32). Outside autocast every tensor must share one dtype (TypeError otherwise).
Deterministic mode (``fastvit.set_deterministic`` / ``torch.use_deterministic_algorithms``) makes the
backward bit-identical run to run.
"""

from __future__ import annotations

import torch

from fastvit import dispatch, reference
from fastvit.ops._validate import (
    cast_like_autocast_linear,
    check_same_device,
    check_same_dtype,
    check_same_dtype_outside_autocast,
    check_shape,
    check_tensor,
)

GELU_APPROXIMATIONS = ("none", "tanh")


def ln_mlp(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    eps: float = 1e-6,
    approximate: str = "none",
    residual: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm -> Linear -> GELU -> Linear (+ residual).

    Args:
        x: [..., C] tokens.
        ln_weight, ln_bias: [C] LayerNorm affine parameters.
        fc1_weight: [Hid, C]; fc1_bias: [Hid] or None.
        fc2_weight: [C, Hid]; fc2_bias: [C] or None.
        eps: LayerNorm epsilon (1e-6 for timm ViTs, 1e-5 for CLIP).
        approximate: GELU form, 'none' (exact erf, timm's default) or 'tanh'.
        residual: add ``x`` to the output.
        backend: 'auto' | 'triton' | 'cuda' | 'torch'; None = the process default.

    Returns:
        [..., C].
    """
    check_tensor("x", x, min_ndim=1)
    width = x.shape[-1]
    if width == 0:
        raise ValueError(f"x's last dimension (the width C) must be >= 1, got x of shape {tuple(x.shape)}")
    check_tensor("ln_weight", ln_weight, ndim=1)
    check_tensor("ln_bias", ln_bias, ndim=1)
    check_shape("ln_weight", ln_weight, (width,), "the last dimension of x")
    check_shape("ln_bias", ln_bias, (width,), "the last dimension of x")
    check_tensor("fc1_weight", fc1_weight, ndim=2)
    hidden = fc1_weight.shape[0]
    if hidden == 0:
        raise ValueError(
            f"fc1_weight must have at least one output feature (hidden >= 1), got {tuple(fc1_weight.shape)}"
        )
    check_shape("fc1_weight", fc1_weight, (hidden, width), "[hidden, C]")
    check_tensor("fc2_weight", fc2_weight, ndim=2)
    check_shape("fc2_weight", fc2_weight, (width, hidden), "[C, hidden] with hidden = fc1_weight.shape[0]")
    if fc1_bias is not None:
        check_tensor("fc1_bias", fc1_bias, ndim=1)
        check_shape("fc1_bias", fc1_bias, (hidden,), "[hidden]")
    if fc2_bias is not None:
        check_tensor("fc2_bias", fc2_bias, ndim=1)
        check_shape("fc2_bias", fc2_bias, (width,), "[C]")
    if approximate not in GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {GELU_APPROXIMATIONS}, got {approximate!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < float("inf"):  # NaN fails too
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {type(residual).__name__}")
    tensors = dict(
        x=x,
        ln_weight=ln_weight,
        ln_bias=ln_bias,
        fc1_weight=fc1_weight,
        fc1_bias=fc1_bias,
        fc2_weight=fc2_weight,
        fc2_bias=fc2_bias,
    )
    check_same_device(**tensors)
    check_same_dtype_outside_autocast(x.device, **tensors)
    backend = dispatch.reference_for_uncovered_input("ln_mlp", backend, x.device, _uncovered_by_kernels(x))
    impl = dispatch.implementation("ln_mlp", backend, x.device)
    return impl(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, float(eps), approximate, residual)


CUDA_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the C++ CPU path also takes float64


def _uncovered_by_kernels(x: torch.Tensor) -> str | None:
    """What the CUDA kernels do not cover in this input (float64 CUDA tensors; autocast leaves float64 as it
    is), or None; ``auto`` then runs the reference, an explicit backend raises its own clear error."""
    if x.device.type == "cuda" and x.dtype not in CUDA_KERNEL_DTYPES:
        return f"x is {x.dtype} (the CUDA kernels take float16, bfloat16, float32)"
    return None


@dispatch.register("ln_mlp", "torch")
def _ln_mlp_torch(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, approximate, residual):
    return reference.ln_mlp(
        x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, approximate, residual
    )


@dispatch.register("ln_mlp", "cuda")
def _ln_mlp_extension(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, approximate, residual):
    params = (ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    residual_outside = None
    cast_x, *params = cast_like_autocast_linear(x.device.type, x, *params)
    if residual and cast_x.dtype != x.dtype:  # as eager autocast: the residual added in x's dtype
        residual_outside, residual = x, False
    x = cast_x
    ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias = params
    check_same_dtype(
        x=x,
        ln_weight=ln_weight,
        ln_bias=ln_bias,
        fc1_weight=fc1_weight,
        fc1_bias=fc1_bias,
        fc2_weight=fc2_weight,
        fc2_bias=fc2_bias,
    )
    # The fc1 pre-activation is kept only when a backward can follow (not under no_grad/inference).
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))
    out = torch.ops.fastvit.ln_mlp_fwd(
        x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, approximate, residual, save
    )[0]
    return out if residual_outside is None else residual_outside + out


def _register_extension_ops() -> None:
    """Fake (meta) impls and autograd for the C++ ops, so torch.compile and backward see through them."""

    @torch.library.register_fake("fastvit::ln_mlp_fwd")
    def _(
        x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, approximate, residual, save_for_backward
    ):
        stats_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        mean = x.new_empty(x.shape[:-1], dtype=stats_dtype)
        pre_act = x.new_empty((*x.shape[:-1], fc1_weight.shape[0]) if save_for_backward else (0,))
        return x.new_empty(x.shape), mean, torch.empty_like(mean), pre_act

    @torch.library.register_fake("fastvit::ln_mlp_bwd")
    def _(grad_out, x, ln_weight, ln_bias, mean, rstd, fc1_weight, pre_act, fc2_weight, *flags, **named_flags):
        # flags: approximate, residual, deterministic (no effect on shapes)
        return (
            x.new_empty(x.shape),
            ln_weight.new_empty(ln_weight.shape),
            ln_weight.new_empty(ln_weight.shape),
            fc1_weight.new_empty(fc1_weight.shape),
            fc1_weight.new_empty(fc1_weight.shape[:1]),
            fc2_weight.new_empty(fc2_weight.shape),
            fc2_weight.new_empty(fc2_weight.shape[:1]),
        )

    def setup_context(ctx, inputs, output):
        x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, _eps, approximate, residual, _save = inputs
        _out, mean, rstd, pre_act = output
        ctx.save_for_backward(x, ln_weight, ln_bias, mean, rstd, fc1_weight, pre_act, fc2_weight)
        ctx.approximate, ctx.residual = approximate, residual
        ctx.has_fc1_bias, ctx.has_fc2_bias = fc1_bias is not None, fc2_bias is not None

    def backward(ctx, grad_out, _grad_mean, _grad_rstd, _grad_pre_act):
        x, ln_weight, ln_bias, mean, rstd, fc1_weight, pre_act, fc2_weight = ctx.saved_tensors
        grad_x, grad_lnw, grad_lnb, grad_w1, grad_b1, grad_w2, grad_b2 = torch.ops.fastvit.ln_mlp_bwd(
            grad_out,
            x,
            ln_weight,
            ln_bias,
            mean,
            rstd,
            fc1_weight,
            pre_act,
            fc2_weight,
            ctx.approximate,
            ctx.residual,
            dispatch.deterministic_enabled(),
        )
        return (
            grad_x,
            grad_lnw,
            grad_lnb,
            grad_w1,
            grad_b1 if ctx.has_fc1_bias else None,
            grad_w2,
            grad_b2 if ctx.has_fc2_bias else None,
            None,
            None,
            None,
            None,
        )

    torch.library.register_autograd("fastvit::ln_mlp_fwd", backward, setup_context=setup_context)


if dispatch.backend_unusable_reason("cuda", torch.device("cpu")) is None:
    _register_extension_ops()
