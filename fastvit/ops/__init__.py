"""Fused ops of a ViT, each with a pure-PyTorch reference and per-call backend dispatch.

Every op accepts ``backend=`` ('auto' | 'triton' | 'cuda' | 'torch'); see ``fastvit.backends``.
"""

from fastvit.ops.attention import attention, qkv_attention
from fastvit.ops.layer_norm import layer_norm
from fastvit.ops.linear_residual import linear_residual
from fastvit.ops.ln_mlp import ln_mlp
from fastvit.ops.patch_embed import patch_embed, patch_embed_uint8

__all__ = [
    "attention",
    "qkv_attention",
    "layer_norm",
    "linear_residual",
    "ln_mlp",
    "patch_embed",
    "patch_embed_uint8",
]
