"""``fastvit.optimize(model)``: swap a timm ViT's blocks and norms for fastvit's, in place, keeping its weights.

The Liger-Kernel style drop-in for code that builds models with timm: the model object, its class,
its ``state_dict`` keys and its ``nn.Parameter`` objects stay the same (an optimizer built before
``optimize`` keeps working); only the submodules that run the math change. Every ``blocks[i]``
becomes a ``fastvit.layers.Block`` (LayerNorm, qkv -> ``ops.qkv_attention`` on the packed buffer ->
proj and the residual add as one ``ops.linear_residual``, ``ops.ln_mlp``) and every LayerNorm outside
the blocks a ``fastvit.layers.LayerNorm``. The patch embedding stays timm's (under 1% of the FLOPs):
build with ``fastvit.from_timm`` to fuse it too.
"""

from __future__ import annotations

import torch.nn as nn

from fastvit import dispatch
from fastvit.convert import mlp_ratio_for, timm_block_layers
from fastvit.layers import Block, LayerNorm
from fastvit.model import OPS_USED, VisionTransformer


def optimize(model: nn.Module, backend: str | None = "auto") -> nn.Module:
    """Run ``model`` through fastvit's ops (see module doc); returns the same object.

    Args:
        model: a timm ``VisionTransformer`` (or a fastvit one: its backend is set, nothing else changes).
        backend: backend of the swapped modules ('auto' | 'triton' | 'cuda' | 'torch' | None = default).
    """
    from fastvit.eva import Eva
    from fastvit.naflex import NaFlexVit

    if isinstance(model, (VisionTransformer, Eva, NaFlexVit)):
        return model.set_backend(backend)
    if type(model).__name__ in ("Eva", "NaFlexVit"):
        raise TypeError(
            f"optimize swaps blocks of timm's VisionTransformer; for timm's {type(model).__name__} use "
            "fastvit.from_timm(model)"
        )
    if not (hasattr(model, "blocks") and hasattr(model, "patch_embed") and isinstance(model.blocks, nn.Sequential)):
        raise TypeError(f"optimize expects a timm VisionTransformer (or fastvit's), got {type(model).__name__}")
    if backend is not None:
        dispatch.check_backend_supports(backend, [op for op in OPS_USED if op != "patch_embed"])
    for index, block in enumerate(model.blocks):
        model.blocks[index] = _fastvit_block(block, backend)
    for name in ("norm_pre", "norm", "fc_norm"):
        module = getattr(model, name, None)
        if isinstance(module, nn.LayerNorm) and not isinstance(module, LayerNorm):
            setattr(model, name, _fastvit_layer_norm(module, backend))
    return model


def _share_parameters(source: nn.Module, target: nn.Module) -> None:
    """Make ``target``'s parameters *be* ``source``'s (same objects), name by name; the names must match."""
    source_names = dict(source.named_parameters())
    target_names = {name for name, _ in target.named_parameters()}
    if set(source_names) != target_names:
        raise ValueError(
            f"cannot convert {type(source).__name__}: parameters differ "
            f"(only in timm: {sorted(set(source_names) - target_names)}, only in fastvit: "
            f"{sorted(target_names - set(source_names))})"
        )
    for name, param in source_names.items():
        owner_path, _, leaf = name.rpartition(".")
        owner = target.get_submodule(owner_path) if owner_path else target
        setattr(owner, leaf, param)
    target.train(source.training)


def _fastvit_layer_norm(norm: nn.LayerNorm, backend: str | None) -> LayerNorm:
    if norm.weight is None or len(norm.normalized_shape) != 1:
        raise ValueError("only affine LayerNorms over the last dimension can be converted")
    new = LayerNorm(norm.normalized_shape[0], eps=norm.eps, device="meta")
    _share_parameters(norm, new)
    new.backend = backend
    return new


def _fastvit_block(block: nn.Module, backend: str | None) -> nn.Module:
    layers = timm_block_layers(block)
    if "block_fn" in layers:  # a ParallelScalingBlock (the _xp models)
        block_fn = layers.pop("block_fn")
        dim, hidden = block.in_proj.in_features, block.in_split[0]
        sizes = dict(dim=dim, num_heads=block.num_heads, mlp_ratio=mlp_ratio_for(hidden, dim))
        out_proj = block.out_proj if block.out_proj is not None else block.attn_out_proj
        biases = dict(qkv_bias=block.in_proj.bias is not None, proj_bias=out_proj.bias is not None)
        drops = dict(proj_drop=block.mlp_drop.p, attn_drop=block.attn_drop.p)
        layer_scale, drop_path = getattr(block.ls, "gamma", None), block.drop_path
    else:
        block_fn, attn, mlp = Block, block.attn, block.mlp
        dim = attn.qkv.in_features
        fc1 = mlp.fc1_g if hasattr(mlp, "fc1_g") else mlp.fc1
        sizes = dict(dim=dim, num_heads=attn.num_heads, mlp_ratio=mlp_ratio_for(fc1.out_features, dim))
        biases = dict(qkv_bias=attn.qkv.bias is not None, proj_bias=attn.proj.bias is not None)
        attn_drop = attn.attn_drop.p if isinstance(attn.attn_drop, nn.Dropout) else float(attn.attn_drop)
        drops = dict(proj_drop=attn.proj_drop.p, attn_drop=attn_drop)
        layer_scale, drop_path = getattr(block.ls1, "gamma", None), block.drop_path1
    new = block_fn(
        **sizes,
        **biases,
        **drops,
        init_values=1.0 if layer_scale is not None else None,  # gamma itself is shared below
        drop_path=getattr(drop_path, "drop_prob", 0.0),
        **layers,
        device="meta",
    )
    _share_parameters(block, new)
    for module in new.modules():
        if hasattr(module, "backend"):
            module.backend = backend
    return new
