"""Fused ops of a ViT. Each op is one file here (public function, argument checks, call signature, the
``torch`` backend), with its fused backends in ``fastvit/ops/triton/`` and ``fastvit/ops/cuda/``, one file per
op, and its spec in ``fastvit/reference.py``.

Every op accepts ``backend=`` ('auto' or one of the backends implementing it); see ``fastvit.backends``.
"""

from fastvit.ops import cuda, triton  # noqa: E402,F401,I001  (the fused backends register themselves)
from fastvit.ops.attention import QKNorm, attention, qkv_attention
from fastvit.ops.layer_norm import layer_norm, rms_norm
from fastvit.ops.linear_residual import linear_residual
from fastvit.ops.ln_linear import ln_linear
from fastvit.ops.ln_mlp import ln_mlp
from fastvit.ops.varlen_attention import varlen_qkv_attention
from fastvit.ops.patch_embed import patch_embed, patch_embed_uint8

__all__ = [
    "attention",
    "qkv_attention",
    "QKNorm",
    "layer_norm",
    "linear_residual",
    "ln_linear",
    "ln_mlp",
    "rms_norm",
    "patch_embed",
    "patch_embed_uint8",
    "varlen_qkv_attention",
]
