"""Weights in and out: timm, torchvision and Hugging Face ViT checkpoints to fastvit and back.

fastvit's state dict *is* timm's, so converting means renaming keys (and packing/unpacking q, k, v).
``load_weights`` accepts any of the three formats (auto-detected), from a state dict or a file
(``.safetensors``, or a torch checkpoint loaded with ``weights_only=True``), resamples the position
embedding to the model's patch grid, and checks every key and shape *before* touching the model, so
a mismatched checkpoint raises a clear error and never leaves a half-loaded model.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from functools import partial

import torch
import torch.nn as nn

from fastvit.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from fastvit.layers import (
    Block,
    GluMlp,
    LayerNorm,
    Mlp,
    ParallelScalingBlock,
    RmsNorm,
    SwiGLU,
    SwiGLUPacked,
    resample_abs_pos_embed,
)
from fastvit.model import (
    DATA_CFG_KEYS,
    VisionTransformer,
    act_layer_name,
    norm_layer_spec,
    resolve_act_layer,
    resolve_norm_layer,
)

StateDict = dict[str, torch.Tensor]

# embed_dim -> num_heads of the standard ViT sizes (Ti, S, B, L, H); anything else needs num_heads=.
_STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}
HF_LAYER_NORM_EPS = 1e-12  # transformers' ViTConfig default (google/vit-* checkpoints use it)

# ------------------------------------------------------------------------------------------------
# Files and formats


def load_state_dict_file(path: str | os.PathLike) -> StateDict:
    """Read a checkpoint file: safetensors, or a torch file (``weights_only=True``) possibly wrapped in
    ``{'model': ...}`` / ``{'state_dict': ...}`` / ``{'state_dict_ema': ...}``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from fastvit.checkpoint import read_weights

        return read_weights(path)[0]
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # PyTorch's message advises weights_only=False, which would run code from the file: never pass that on
        # (not even in the chained traceback); say what the file holds instead.
        text = str(exc)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise ValueError(
                f"{path} is not a weights-only checkpoint: besides tensors it holds pickled Python objects "
                f"({found.group(1)}), and fastvit never runs pickled code; save the state dict alone "
                "(torch.save(model.state_dict(), path)) or as safetensors"
            ) from None
        after = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else ""
        detail = next((line.strip() for line in after.splitlines() if line.strip()), "not a pickle")
        raise ValueError(f"{path} is not a readable torch checkpoint (unpickling failed: {detail})") from None
    except Exception as exc:  # truncated zip archives, other formats, ...
        first_line = (str(exc).strip().splitlines() or [""])[0]  # the full text stays in the chained exception
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {first_line})") from exc
    return unwrap_state_dict(obj, source=path)


def load_any_weights(path: str | os.PathLike) -> tuple[StateDict, dict]:
    """(timm-named state dict, metadata) from a fastvit checkpoint directory, a .safetensors file (with its
    metadata), or a torch file in any supported format. A torchvision or Hugging Face file without a data config
    gets its source's preprocessing (:data:`TORCHVISION_DATA_CFG`, :data:`HF_DATA_CFG`) as ``pretrained_cfg``."""
    from fastvit import checkpoint

    path = checkpoint.weights_file(os.fspath(path))  # a run folder, a checkpoint dir, or what a crash left
    if path.endswith(".safetensors"):
        state, metadata = checkpoint.read_weights(path)
    else:
        state, metadata = load_state_dict_file(path), {}
    source_cfg = {"torchvision": TORCHVISION_DATA_CFG, "hf": HF_DATA_CFG}.get(detect_format(state))
    if source_cfg is not None and not metadata_data_cfg(metadata):
        metadata = {**metadata, "pretrained_cfg": dict(source_cfg)}
    return to_timm_state_dict(state), metadata


def unwrap_state_dict(obj: object, source: str = "state_dict") -> StateDict:
    """Unwrap the usual training-checkpoint containers down to a flat {name: tensor} dict."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TypeError(f"{source}: expected a state dict (mapping of name -> tensor), got {type(obj).__name__}")
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    state = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{source}: entry {name!r} is a {type(value).__name__}, not a tensor")
        state[name[len("module.") :] if name.startswith("module.") else name] = value
    return state


def detect_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'timm' (also fastvit, and timm's NaFlexVit), 'torchvision' or 'hf', from characteristic key names."""
    keys = set(state_dict)
    if "patch_embed.proj.weight" in keys or "embeds.proj.weight" in keys:  # ViT / Eva, or NaFlexVit
        return "timm"
    if "conv_proj.weight" in keys and any(k.startswith("encoder.layers.") for k in keys):
        return "torchvision"
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return "hf"
    sample = ", ".join(sorted(keys)[:5])
    raise ValueError(
        "unrecognised checkpoint: expected a timm/fastvit ('patch_embed.proj.weight'), torchvision "
        f"('conv_proj.weight') or Hugging Face ViT ('embeddings.patch_embeddings...') state dict; "
        f"keys start with: {sample}"
    )


def to_timm_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Any supported format -> timm/fastvit key names."""
    fmt = detect_format(state_dict)
    if fmt == "torchvision":
        return torchvision_to_timm(state_dict)
    if fmt == "hf":
        return hf_to_timm(state_dict)
    return dict(state_dict)


def _block_indices(state_dict: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in state_dict if (m := regex.match(k))})


def _take(state_dict: dict, key: str, source: str) -> torch.Tensor:
    if key not in state_dict:
        raise KeyError(f"{source} state dict is missing {key!r}")
    return state_dict.pop(key)


def _no_leftovers(remaining: Mapping, source: str) -> None:
    if remaining:
        raise KeyError(f"{source} state dict has keys fastvit cannot map: {', '.join(sorted(remaining)[:8])}")


# ------------------------------------------------------------------------------------------------
# torchvision (torchvision.models.vit_b_16 and friends)

_TV_BLOCK = {
    "ln_1": "norm1",
    "self_attention.in_proj": "attn.qkv",
    "self_attention.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.0": "mlp.fc1",
    "mlp.3": "mlp.fc2",
    # Old torchvision checkpoints name the MLP Linears linear_1/linear_2.
    "mlp.linear_1": "mlp.fc1",
    "mlp.linear_2": "mlp.fc2",
}


_TV_TOP = [  # (torchvision key, timm key, required) outside the blocks
    ("class_token", "cls_token", True),
    ("encoder.pos_embedding", "pos_embed", True),
    ("conv_proj.weight", "patch_embed.proj.weight", True),
    ("conv_proj.bias", "patch_embed.proj.bias", False),
    ("encoder.ln.weight", "norm.weight", True),
    ("encoder.ln.bias", "norm.bias", True),
    ("heads.head.weight", "head.weight", False),
    ("heads.head.bias", "head.bias", False),
]


def _torchvision_names(blocks: list[int]) -> list[tuple[str, str, bool]]:
    """(torchvision key, timm key, required) of every tensor of a torchvision ViT with these block indices."""
    names = list(_TV_TOP)
    for i in blocks:
        for tv_name, timm_name in _TV_BLOCK.items():
            sep = "_" if tv_name == "self_attention.in_proj" else "."  # the packed in_proj is a Parameter
            for param in ("weight", "bias"):
                names.append(
                    (
                        f"encoder.layers.encoder_layer_{i}.{tv_name}{sep}{param}",
                        f"blocks.{i}.{timm_name}.{param}",
                        False,
                    )
                )
    return names


def _rename(state_dict: Mapping[str, torch.Tensor], names: list[tuple[str, str, bool]], source: str) -> StateDict:
    """Move ``state_dict``'s tensors to new keys by ``(old, new, required)``; the first of two old names for one new
    one wins (the MLP Linears' old and new torchvision names); unmapped keys are an error."""
    src, out = dict(state_dict), {}
    for old, new, required in names:
        if old in src and new not in out:
            out[new] = src.pop(old)
        elif required:
            out[new] = _take(src, old, source)
    _no_leftovers(src, source)
    return out


def torchvision_to_timm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """torchvision ``VisionTransformer`` state dict -> timm/fastvit names."""
    if any(k.startswith("heads.pre_logits") for k in state_dict):
        raise ValueError("torchvision ViTs with a representation layer (heads.pre_logits) are not supported")
    blocks = _block_indices(state_dict, r"encoder\.layers\.encoder_layer_(\d+)\.")
    return _rename(state_dict, _torchvision_names(blocks), "torchvision")


def timm_to_torchvision(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """timm/fastvit state dict -> torchvision ``VisionTransformer`` names (standard ViT only)."""
    names = [
        (new, old, required)
        for old, new, required in _torchvision_names(_block_indices(state_dict, r"blocks\.(\d+)\."))
    ]
    return _rename(state_dict, names, "timm (for torchvision)")


# ------------------------------------------------------------------------------------------------
# Hugging Face transformers (ViTModel / ViTForImageClassification)
#
# Two key layouts exist: "legacy" (transformers < 5, and the checkpoint files on the Hub, e.g.
# google/vit-base-patch16-224) and "v5" (the module names of transformers >= 5, which renames
# legacy files on load). Both are read; timm_to_hf writes either.

_HF_NORMS = {"layernorm_before": "norm1", "layernorm_after": "norm2"}  # same in both layouts
_HF_LAYOUTS = {
    "legacy": dict(
        block="encoder.layer.{i}.",
        qkv=("attention.attention.query", "attention.attention.key", "attention.attention.value"),
        names={
            **_HF_NORMS,
            "attention.output.dense": "attn.proj",
            "intermediate.dense": "mlp.fc1",
            "output.dense": "mlp.fc2",
        },
    ),
    "v5": dict(
        block="layers.{i}.",
        qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        names={**_HF_NORMS, "attention.o_proj": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"},
    ),
}


def hf_to_timm(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Hugging Face ``ViTModel``/``ViTForImageClassification`` state dict (either layout) -> timm/fastvit names.

    The ``pooler`` (dense + tanh, unused by image classification) and ``mask_token`` have no timm
    counterpart and are dropped.
    """
    src = dict(state_dict)
    p = "vit." if "vit.embeddings.cls_token" in src else ""
    layout = _HF_LAYOUTS["legacy" if any(k.startswith(f"{p}encoder.layer.") for k in src) else "v5"]
    for key in [k for k in src if k.startswith(f"{p}pooler.") or k == f"{p}embeddings.mask_token"]:
        del src[key]
    out = {
        "cls_token": _take(src, f"{p}embeddings.cls_token", "Hugging Face"),
        "pos_embed": _take(src, f"{p}embeddings.position_embeddings", "Hugging Face"),
        "patch_embed.proj.weight": _take(src, f"{p}embeddings.patch_embeddings.projection.weight", "Hugging Face"),
    }
    if f"{p}embeddings.patch_embeddings.projection.bias" in src:
        out["patch_embed.proj.bias"] = src.pop(f"{p}embeddings.patch_embeddings.projection.bias")
    block_regex = re.escape(p + layout["block"]).replace(re.escape("{i}"), r"(\d+)")
    for i in _block_indices(src, block_regex):
        prefix = p + layout["block"].format(i=i)
        for param in ("weight", "bias"):
            parts = [f"{prefix}{name}.{param}" for name in layout["qkv"]]
            if all(k in src for k in parts):
                out[f"blocks.{i}.attn.qkv.{param}"] = torch.cat([src.pop(k) for k in parts], dim=0)
            for hf_name, timm_name in layout["names"].items():
                if f"{prefix}{hf_name}.{param}" in src:
                    out[f"blocks.{i}.{timm_name}.{param}"] = src.pop(f"{prefix}{hf_name}.{param}")
    out["norm.weight"] = _take(src, f"{p}layernorm.weight", "Hugging Face")
    out["norm.bias"] = _take(src, f"{p}layernorm.bias", "Hugging Face")
    for param in ("weight", "bias"):
        if f"classifier.{param}" in src:
            out[f"head.{param}"] = src.pop(f"classifier.{param}")
    _no_leftovers(src, "Hugging Face")
    return out


def timm_to_hf(state_dict: Mapping[str, torch.Tensor], layout: str = "legacy") -> StateDict:
    """timm/fastvit state dict -> Hugging Face names (``vit.``-prefixed with ``classifier`` when there is a head).

    ``layout``: 'legacy' (Hub checkpoint files, transformers < 5) or 'v5' (transformers >= 5 modules).
    """
    if layout not in _HF_LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(_HF_LAYOUTS)}, got {layout!r}")
    spec = _HF_LAYOUTS[layout]
    src = dict(state_dict)
    has_head = "head.weight" in src
    p = "vit." if has_head else ""
    out = {
        f"{p}embeddings.cls_token": _take(src, "cls_token", "timm"),
        f"{p}embeddings.position_embeddings": _take(src, "pos_embed", "timm"),
        f"{p}embeddings.patch_embeddings.projection.weight": _take(src, "patch_embed.proj.weight", "timm"),
    }
    if "patch_embed.proj.bias" in src:
        out[f"{p}embeddings.patch_embeddings.projection.bias"] = src.pop("patch_embed.proj.bias")
    for i in _block_indices(src, r"blocks\.(\d+)\."):
        prefix = p + spec["block"].format(i=i)
        for param in ("weight", "bias"):
            if f"blocks.{i}.attn.qkv.{param}" in src:
                for name, part in zip(spec["qkv"], src.pop(f"blocks.{i}.attn.qkv.{param}").chunk(3)):
                    out[f"{prefix}{name}.{param}"] = part
            for hf_name, timm_name in spec["names"].items():
                if f"blocks.{i}.{timm_name}.{param}" in src:
                    out[f"{prefix}{hf_name}.{param}"] = src.pop(f"blocks.{i}.{timm_name}.{param}")
    out[f"{p}layernorm.weight"] = _take(src, "norm.weight", "timm")
    out[f"{p}layernorm.bias"] = _take(src, "norm.bias", "timm")
    if has_head:
        out["classifier.weight"] = src.pop("head.weight")
        out["classifier.bias"] = _take(src, "head.bias", "timm")
    _no_leftovers(src, "timm (for Hugging Face)")
    return out


# ------------------------------------------------------------------------------------------------
# Architecture from weights


def infer_config(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None) -> dict:
    """``VisionTransformer`` arguments that reproduce the architecture of a timm-named state dict.

    Weights do not record the head count, the LayerNorm eps or the pooling: ``num_heads`` defaults to
    the standard ViT size for the width (Ti 3, S 6, B 12, L 16, H 16), eps to 1e-6 and pooling to
    'token' (or 'avg' with an fc_norm); override them as keyword arguments where they differ.
    """
    if "patch_embed.proj.weight" not in state_dict:
        raise KeyError("state dict has no 'patch_embed.proj.weight': not a timm/fastvit ViT")
    _reject_distilled("dist_token" in state_dict or "head_dist.weight" in state_dict)
    embed_dim, in_chans, patch_h, patch_w = state_dict["patch_embed.proj.weight"].shape
    depth = len(_block_indices(state_dict, r"blocks\.(\d+)\."))
    if num_heads is None:
        if embed_dim not in _STANDARD_HEADS:
            raise ValueError(
                f"cannot infer num_heads for embed_dim={embed_dim} (not a standard ViT width); pass num_heads="
            )
        num_heads = _STANDARD_HEADS[embed_dim]
    class_token = "cls_token" in state_dict
    reg_tokens = state_dict["reg_token"].shape[1] if "reg_token" in state_dict else 0
    num_prefix = int(class_token) + reg_tokens
    has_fc_norm = "fc_norm.weight" in state_dict
    config = dict(
        patch_size=(patch_h, patch_w) if patch_h != patch_w else patch_h,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        num_classes=state_dict["head.weight"].shape[0] if "head.weight" in state_dict else 0,
        class_token=class_token,
        reg_tokens=reg_tokens,
        global_pool="map"
        if "attn_pool.latent" in state_dict
        else "token"
        if class_token and not has_fc_norm
        else "avg",
        fc_norm=has_fc_norm,
        final_norm="norm.weight" in state_dict or has_fc_norm,
        pre_norm="norm_pre.weight" in state_dict,
    )
    if "patch_embed.norm.weight" in state_dict:
        norm = LayerNorm if "patch_embed.norm.bias" in state_dict else RmsNorm
        config["embed_norm_layer"] = partial(norm, eps=1e-6)
    if depth and "blocks.0.in_proj.weight" in state_dict:
        config.update(_infer_parallel_block_layers(state_dict, embed_dim))
    elif depth:
        config.update(_infer_block_layers(state_dict, embed_dim))
        config["qkv_bias"] = "blocks.0.attn.qkv.bias" in state_dict
        config["proj_bias"] = "blocks.0.attn.proj.bias" in state_dict
        if "blocks.0.ls1.gamma" in state_dict:
            config["init_values"] = 1e-5  # any non-zero value builds LayerScale; the weights set gamma
    if "pos_embed" not in state_dict:
        config["pos_embed"] = "none"
        return config
    num_pos = state_dict["pos_embed"].shape[1]
    side = math.isqrt(num_pos - num_prefix) if num_pos >= num_prefix else 0
    if side * side == num_pos - num_prefix and side > 0:
        config["no_embed_class"] = False
    elif math.isqrt(num_pos) ** 2 == num_pos:
        side = math.isqrt(num_pos)
        config["no_embed_class"] = True
    else:
        raise ValueError(f"pos_embed with {num_pos} tokens and {num_prefix} prefix tokens is not a square patch grid")
    config["img_size"] = (side * patch_h, side * patch_w)
    return config


def mlp_ratio_for(hidden: int, dim: int) -> float:
    """The ``mlp_ratio`` for which ``int(dim * mlp_ratio) == hidden`` (fastvit and timm size the MLP that way; a
    plain ``hidden / dim`` can land a rounding error below, e.g. SigLIP so400m's 4304 / 1152)."""
    ratio = hidden / dim
    while int(dim * ratio) < hidden:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def _infer_block_layers(state_dict: Mapping[str, torch.Tensor], embed_dim: int) -> dict:
    """The block knobs a timm-named state dict shows: MLP type and width, qk-norm, hidden-layer norm, RmsNorm."""
    config = {}
    if "blocks.0.mlp.fc1_g.weight" in state_dict:  # split SwiGLU
        hidden = state_dict["blocks.0.mlp.fc1_g.weight"].shape[0]
        config.update(mlp_layer=SwiGLU, act_layer=nn.SiLU)
    else:
        hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
        if state_dict["blocks.0.mlp.fc2.weight"].shape[1] * 2 == hidden:  # packed SwiGLU (DINOv2 giant)
            config.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    config["mlp_ratio"] = mlp_ratio_for(hidden, embed_dim)
    config["qk_norm"] = "blocks.0.attn.q_norm.weight" in state_dict
    config["scale_mlp_norm"] = "blocks.0.mlp.norm.weight" in state_dict
    if "blocks.0.norm1.weight" in state_dict and "blocks.0.norm1.bias" not in state_dict:
        config["norm_layer"] = partial(RmsNorm, eps=1e-6)
    return config


def _infer_parallel_block_layers(state_dict: Mapping[str, torch.Tensor], embed_dim: int) -> dict:
    """The knobs of timm ``ParallelScalingBlock``s (the ``_xp`` models) that a state dict shows."""
    fused_out = "blocks.0.out_proj.weight" in state_dict
    out_proj = "blocks.0.out_proj" if fused_out else "blocks.0.attn_out_proj"
    config = dict(
        block_fn=partial(ParallelScalingBlock, fuse_out_proj=True) if fused_out else ParallelScalingBlock,
        mlp_ratio=mlp_ratio_for(state_dict["blocks.0.in_proj.weight"].shape[0] - 3 * embed_dim, embed_dim),
        qk_norm="blocks.0.q_norm.weight" in state_dict,
        qkv_bias="blocks.0.in_proj.bias" in state_dict,
        proj_bias=f"{out_proj}.bias" in state_dict,
    )
    if "blocks.0.in_norm.bias" not in state_dict:
        config["norm_layer"] = partial(RmsNorm, eps=1e-6)
    if "blocks.0.ls.gamma" in state_dict:
        config["init_values"] = 1e-5  # any non-zero value builds LayerScale; the weights set gamma
    return config


def _reject_distilled(distilled: bool) -> None:
    if distilled:
        raise ValueError(
            "DeiT distilled models (a dist_token and a head_dist classifier) are not supported by fastvit; "
            "the non-distilled DeiT models (deit_*_patch16_224) are"
        )


class CheckpointMismatchError(KeyError, ValueError):
    """A checkpoint that does not fit the model: every missing, unexpected and mis-shaped key, in one error.

    Both a ``KeyError`` (missing / unexpected keys) and a ``ValueError`` (shapes), so code that catches either
    keeps working. ``missing``, ``unexpected`` and ``mismatched`` hold the problems as data.
    """

    SHOWN = 5  # names listed per kind of problem; all of them stay in the attributes

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str]) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys the model needs: {self._first(missing, ', ', 'missing')}")
        if unexpected:
            parts.append(
                f"{len(unexpected)} keys the model does not have: {self._first(unexpected, ', ', 'unexpected')}"
            )
        if mismatched:
            parts.append(
                f"{len(mismatched)} shapes do not match the model: {self._first(mismatched, '; ', 'mismatched')}"
            )
        super().__init__(
            "checkpoint does not match the model architecture (the model was left unchanged): " + "; ".join(parts)
        )

    def __str__(self) -> str:  # KeyError's own __str__ would print the message's repr
        return str(self.args[0])

    @classmethod
    def _first(cls, items: list[str], sep: str, attribute: str) -> str:
        if len(items) <= cls.SHOWN:
            return sep.join(items)
        return f"{sep.join(items[: cls.SHOWN])}{sep}... ({len(items) - cls.SHOWN} more in .{attribute})"


def _adapt_pos_embed(state_dict: StateDict, model: nn.Module) -> StateDict:
    """Resample the checkpoint's position embedding to the model's patch grid (e.g. 224 -> 384 px).

    A position embedding that cannot be resampled (other width or rank) is left as it is: ``load_weights``
    then reports its shape together with every other mismatch.
    """
    posemb = state_dict.get("pos_embed")
    model_posemb = getattr(model, "pos_embed", None)
    if posemb is None or model_posemb is None or posemb.shape == model_posemb.shape:
        return state_dict
    if not hasattr(model, "patch_embed") or not hasattr(model, "num_prefix_tokens"):
        return state_dict
    if posemb.dim() != 3 or posemb.shape[-1] != model_posemb.shape[-1] or posemb.shape[0] != 1:
        return state_dict
    num_prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    try:
        resampled = resample_abs_pos_embed(posemb, model.patch_embed.grid_size, num_prefix_tokens=num_prefix)
    except ValueError:  # not a square grid: reported as a shape mismatch
        return state_dict
    state_dict = dict(state_dict)
    state_dict["pos_embed"] = resampled
    return state_dict


def load_weights(model: nn.Module, source, strict: bool = True) -> nn.Module:
    """Load ``source`` (a state dict in any supported format, an ``nn.Module``, or a checkpoint path) into ``model``.

    The position embedding is resampled to the model's grid. Every key and shape is checked first, and all
    problems are reported together in one :class:`CheckpointMismatchError` (a ``KeyError`` and a
    ``ValueError``): missing keys, unexpected keys (only with ``strict=True``) and shape mismatches. On any
    error the model is left untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a fastvit/timm VisionTransformer (an nn.Module), got {type(model).__name__}")
    metadata = {}
    if isinstance(source, (str, os.PathLike)):
        state_dict, metadata = load_any_weights(source)
    else:
        state_dict = unwrap_state_dict(source)
    state_dict = _adapt_pos_embed(to_timm_state_dict(state_dict), model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected)) if strict else []
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched)
    model.load_state_dict({k: state_dict[k] for k in expected}, strict=True)
    data_cfg = metadata_data_cfg(metadata)
    if data_cfg and hasattr(model, "_pretrained_cfg"):  # a fastvit VisionTransformer or Eva
        model.pretrained_cfg = {**model.pretrained_cfg, **data_cfg}
    return model


def metadata_data_cfg(metadata: Mapping) -> dict:
    """The data config (and class names) a fastvit checkpoint's metadata holds, as ``pretrained_cfg`` entries."""
    cfg = metadata.get("pretrained_cfg")
    if isinstance(cfg, Mapping):
        return {k: cfg[k] for k in (*DATA_CFG_KEYS, "architecture", "tag") if cfg.get(k) is not None}
    if "mean" not in metadata:
        return {}
    # Written before checkpoints stored a data config: predict then squashed images to the input size.
    legacy = dict(mean=metadata["mean"], std=metadata["std"], interpolation="bilinear", crop_pct=1.0)
    legacy["crop_mode"] = "squash"
    if isinstance(metadata.get("classes"), list):
        legacy["label_names"] = metadata["classes"]
    return legacy


_MLP_LAYER_NAMES = {"mlp": Mlp, "swiglu_packed": SwiGLUPacked, "swiglu": SwiGLU, "glu": GluMlp}
_LAYER_KEYS = ("norm_layer", "act_layer", "embed_norm_layer", "mlp_layer")


def _mlp_layer_name(layer) -> str:
    for name, known in _MLP_LAYER_NAMES.items():
        if layer is known:
            return name
    raise ValueError(f"mlp_layer {layer!r} has no name in checkpoint metadata (Mlp, SwiGLUPacked, SwiGLU, GluMlp)")


_BLOCK_FNS = {
    "parallel_scaling": ParallelScalingBlock,
    "parallel_scaling_fused": partial(ParallelScalingBlock, fuse_out_proj=True),
}


def _block_fn_name(block_fn) -> str:
    """The metadata name of a ``block_fn`` other than ``Block`` (the ``_xp`` models' parallel block)."""
    base = block_fn.func if isinstance(block_fn, partial) else block_fn
    keywords = block_fn.keywords if isinstance(block_fn, partial) else {}
    if base is ParallelScalingBlock and keywords in ({}, {"fuse_out_proj": False}):
        return "parallel_scaling"
    if base is ParallelScalingBlock and keywords == {"fuse_out_proj": True}:
        return "parallel_scaling_fused"
    raise ValueError(f"block_fn {block_fn!r} cannot be written to checkpoint metadata (Block or ParallelScalingBlock)")


def config_to_json(config: Mapping) -> dict:
    """A ``VisionTransformer`` (or, with ``model_class='Eva'``, ``fastvit.Eva``) config as JSON values (tuples as
    lists, the norm, activation, MLP and block layers as names plus the norm eps), for checkpoint metadata;
    :func:`config_from_json` reverses it."""
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if k not in _LAYER_KEYS}
    out = {k: v for k, v in out.items() if not callable(v)}
    if config.get("block_fn") not in (None, Block):
        out["block_fn"] = _block_fn_name(config["block_fn"])
    if config.get("model_class") != "Eva":  # Eva has no act_layer (GELU, or SwiGLU by its flags)
        out["act_layer"] = act_layer_name(config.get("act_layer"))
    norm_kind, out["norm_eps"] = norm_layer_spec(config.get("norm_layer"))
    if norm_kind != "layernorm":
        out["norm_type"] = norm_kind
    if config.get("embed_norm_layer") is not None:
        out["embed_norm_type"], out["embed_norm_eps"] = norm_layer_spec(config["embed_norm_layer"])
    if config.get("mlp_layer") is not None:
        out["mlp_layer"] = _mlp_layer_name(config["mlp_layer"])
    return out


def config_from_json(config: Mapping) -> dict:
    """Constructor arguments from :func:`config_to_json`'s output (or older metadata without the layers)."""
    out = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    norm = {"layernorm": LayerNorm, "rmsnorm": RmsNorm}
    eps = out.pop("norm_eps", None)
    if eps is not None:
        out["norm_layer"] = partial(norm[out.pop("norm_type", "layernorm")], eps=eps)
    if "embed_norm_type" in out:
        out["embed_norm_layer"] = partial(norm[out.pop("embed_norm_type")], eps=out.pop("embed_norm_eps"))
    if "mlp_layer" in out:
        out["mlp_layer"] = _MLP_LAYER_NAMES[out["mlp_layer"]]
    if "block_fn" in out:
        out["block_fn"] = _BLOCK_FNS[out["block_fn"]]
    return out


def build_model(config: Mapping, **overrides) -> nn.Module:
    """The model a config describes (:func:`config_from_json`'s output, a preset's): ``fastvit.Eva`` when
    ``config['model_class'] == 'Eva'``, ``fastvit.NaFlexVit`` for 'NaFlexVit' (NaFlexVitCfg fields, ``in_chans``,
    ``num_classes``), else a ``VisionTransformer``; ``overrides`` win over the config."""
    config = {**config, **overrides}
    model_class = config.pop("model_class", "VisionTransformer")
    if model_class == "Eva":
        from fastvit.eva import Eva

        config.pop("weight_init", None)  # Eva has one init scheme (timm's); loaded weights replace it anyway
        return Eva(**config)
    if model_class == "NaFlexVit":
        from fastvit.naflex import NaFlexVit

        return NaFlexVit(**config)
    return VisionTransformer(**config)


# ------------------------------------------------------------------------------------------------
# Whole-model converters


# Preprocessing of the weights each source publishes, where the source model does not carry it: torchvision's
# ViT_*_Weights.IMAGENET1K_V1.transforms() (resize 256, crop 224, bilinear, ImageNet mean/std) and Hugging Face's
# ViTImageProcessor (resize straight to the input size, bilinear, mean/std 0.5).
TORCHVISION_DATA_CFG = dict(
    interpolation="bilinear",
    crop_pct=224 / 256,
    crop_mode="center",
    mean=IMAGENET_DEFAULT_MEAN,
    std=IMAGENET_DEFAULT_STD,
)
HF_DATA_CFG = dict(interpolation="bilinear", crop_pct=1.0, crop_mode="squash", mean=(0.5,) * 3, std=(0.5,) * 3)


def _build(state_dict: StateDict, config: dict, overrides: dict, data_cfg: Mapping | None = None) -> VisionTransformer:
    model = VisionTransformer(**{**config, **overrides, "weight_init": "skip"})
    model = load_weights(model, state_dict)
    if data_cfg:
        model.pretrained_cfg = {**model.pretrained_cfg, **data_cfg}
    return model


def _act_layer(act: nn.Module):
    """fastvit's activation factory for a timm MLP's activation module (``resolve_act_layer``: the one rule)."""
    return resolve_act_layer(act)


def _norm_layer(norm: nn.Module, what: str):
    """fastvit's norm factory (with its eps) for a timm norm module (``resolve_norm_layer``); ``what`` names it,
    except for the blocks' own norm, whose error is the constructor's word for word."""
    try:
        return resolve_norm_layer(norm)
    except ValueError as exc:
        if what.startswith("norm_layer"):
            raise
        raise ValueError(f"{what}: {exc}") from None


def _mlp_layer(mlp: nn.Module) -> dict:
    """fastvit's ``mlp_layer`` (and whether it has a hidden-layer norm) for a timm MLP module."""
    name = type(mlp).__name__
    if name == "Mlp" and isinstance(getattr(mlp, "fc1", None), nn.Linear):
        layer = Mlp
    elif name == "GluMlp" and isinstance(getattr(mlp, "fc1", None), nn.Linear):
        layer = partial(GluMlp, gate_last=mlp.gate_last)
        if not mlp.gate_last and isinstance(mlp.act, nn.SiLU):
            layer = SwiGLUPacked
    elif name == "SwiGLU":
        layer = SwiGLU
    else:
        raise ValueError(f"mlp_layer {name} is not supported by fastvit (Mlp, GluMlp/SwiGLUPacked, SwiGLU)")
    return {"mlp_layer": layer, "scale_mlp_norm": not isinstance(mlp.norm, nn.Identity)}


def _timm_data_cfg(model: nn.Module) -> dict:
    """The data config entries of a timm model's ``pretrained_cfg`` (empty when it has none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {k: cfg[k] for k in (*DATA_CFG_KEYS, "architecture", "tag") if cfg.get(k) is not None}


def timm_block_layers(block: nn.Module) -> dict:
    """Check that a timm ``Block`` is one fastvit's ``Block`` can stand in for; returns the fastvit ``Block`` /
    ``VisionTransformer`` arguments that rebuild it: ``norm_layer`` (LayerNorm or RmsNorm, with its eps),
    ``act_layer``, ``mlp_layer``, ``qk_norm``, ``scale_mlp_norm``.

    Used by ``from_timm`` (a new model) and ``fastvit.optimize`` (blocks swapped in place). Anything else (parallel
    blocks of the ``_xp`` models, a norm after attention, ...) is one ``ValueError`` naming timm's knob.
    """
    kind = type(block).__name__
    if kind == "ParallelScalingBlock":
        return _parallel_block_layers(block)
    if kind != "Block" or not hasattr(block, "attn") or not hasattr(block.attn, "qkv"):
        raise ValueError(
            f"block_fn={kind} is not supported by fastvit (timm's pre-norm Block and the _xp models' "
            "ParallelScalingBlock; ParallelThingsBlock, the parallel ViTs' block, is not)"
        )
    attn = block.attn
    if type(attn).__name__ != "Attention":
        raise ValueError(f"attn_layer={type(attn).__name__} is not supported by fastvit (timm's Attention only)")
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        raise ValueError("scale_attn_norm=True (a norm between attention and proj) is not supported by fastvit")
    if getattr(attn, "gate", None) is not None:
        raise ValueError("gated attention (attn.gate) is not supported by fastvit")
    if getattr(attn, "attn_dim", attn.qkv.in_features) != attn.qkv.in_features:
        raise ValueError("attn_head_dim that changes the attention width is not supported by fastvit")
    norm_layer = _norm_layer(block.norm1, "norm_layer (block.norm1)")
    return {
        "norm_layer": norm_layer,
        "act_layer": _act_layer(block.mlp.act),
        "qk_norm": _qk_norm(attn, norm_layer),
        **_mlp_layer(block.mlp),
    }


def _qk_norm(module: nn.Module, norm_layer) -> bool:
    """Whether ``module`` (a timm attention or parallel block) has qk-norm; it must use the blocks' norm_layer."""
    if isinstance(module.q_norm, nn.Identity):
        return False
    qk_layer = _norm_layer(module.q_norm, "the qk-norm (q_norm)")
    if qk_layer.func is not norm_layer.func or qk_layer.keywords != norm_layer.keywords:
        raise ValueError("qk_norm with a norm other than the blocks' norm_layer is not supported by fastvit")
    return True


def _parallel_block_layers(block: nn.Module) -> dict:
    """``timm_block_layers`` of a timm ``ParallelScalingBlock`` (the ``_xp`` models)."""
    norm_layer = _norm_layer(block.in_norm, "norm_layer (block.in_norm)")
    layers = {"block_fn": ParallelScalingBlock, "norm_layer": norm_layer, "act_layer": _act_layer(block.mlp_act)}
    if getattr(block, "out_proj", None) is not None:
        layers["block_fn"] = partial(ParallelScalingBlock, fuse_out_proj=True)
    return {**layers, "qk_norm": _qk_norm(block, norm_layer)}


def from_timm(model_or_state_dict, **overrides) -> VisionTransformer:
    """A fastvit ``VisionTransformer`` with the weights of a timm ViT (module or state dict).

    From a module, the whole configuration is read off it; from a state dict it is inferred
    (:func:`infer_config`) and ``overrides`` (e.g. ``num_heads=``, ``img_size=``, ``global_pool=``)
    fill in or change what weights cannot tell. A different ``img_size`` resamples the position
    embedding. The timm model's data config (``pretrained_cfg``: mean/std, crop, interpolation) comes along.
    Unsupported timm features (attention pooling, qk-norm, distillation tokens, other block types, non-GELU
    activations, non-LayerNorm norms) raise ``ValueError``.
    """
    if isinstance(model_or_state_dict, nn.Module) and type(model_or_state_dict).__name__ == "NaFlexVit":
        from fastvit.naflex import from_timm_naflex

        return from_timm_naflex(model_or_state_dict, **overrides)
    if isinstance(model_or_state_dict, nn.Module) and type(model_or_state_dict).__name__ == "Eva":
        from fastvit.eva import Eva

        config = _timm_eva_config(model_or_state_dict)
        eva = load_weights(Eva(**{**config, **overrides}), model_or_state_dict.state_dict())
        eva.pretrained_cfg = {**eva.pretrained_cfg, **_timm_data_cfg(model_or_state_dict)}
        return eva
    if isinstance(model_or_state_dict, nn.Module):
        model = model_or_state_dict
        return _build(model.state_dict(), _timm_module_config(model), overrides, _timm_data_cfg(model))
    state_dict = to_timm_state_dict(unwrap_state_dict(model_or_state_dict))
    if any(re.match(r"blocks\.\d+\.(gamma_1|attn\.q_bias|attn\.q_proj\.)", key) for key in state_dict):
        raise ValueError(
            "this is a state dict of timm's Eva class (gamma_1 / q_bias / q_proj keys): its RoPE settings are not in "
            "the weights; build fastvit.create_model(<timm name>) or fastvit.Eva(...) and fastvit.load_weights(model, "
            "state_dict), or pass the timm module to from_timm"
        )
    return _build(state_dict, infer_config(state_dict, overrides.get("num_heads")), overrides)


def _timm_module_config(model: nn.Module) -> dict:
    required = ("patch_embed", "blocks", "norm", "head", "global_pool", "num_prefix_tokens")
    if not all(hasattr(model, attr) for attr in required):
        raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    _reject_distilled(getattr(model, "dist_token", None) is not None)
    if type(model).__name__ != "VisionTransformer":
        raise ValueError(
            f"timm's {type(model).__name__} class is not supported by fastvit.from_timm (timm's VisionTransformer "
            "and Eva only)"
        )
    if len(model.blocks):
        layers = timm_block_layers(model.blocks[0])  # first: it names an unsupported block before anything reads it
        num_heads = getattr(model.blocks[0], "attn", model.blocks[0]).num_heads  # a parallel block holds it itself
    else:
        layers, num_heads = {}, 1
    config = infer_config(model.state_dict(), num_heads=num_heads)
    if len(model.blocks):
        config.update(layers)
        layer_scale = getattr(model.blocks[0], "ls1", getattr(model.blocks[0], "ls", None))
        if not isinstance(layer_scale, nn.Identity):
            config["init_values"] = float(layer_scale.init_values)
    embed_norm = getattr(model.patch_embed, "norm", nn.Identity())
    if not isinstance(embed_norm, nn.Identity):
        config["embed_norm_layer"] = _norm_layer(embed_norm, "embed_norm_layer (patch_embed.norm)")
    config.update(
        img_size=tuple(model.patch_embed.img_size),
        global_pool=model.global_pool,
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        no_embed_class=bool(getattr(model, "no_embed_class", False)),
        pool_include_prefix=bool(getattr(model, "pool_include_prefix", False)),
        dynamic_img_size=bool(getattr(model, "dynamic_img_size", False)),
    )
    attn_pool = getattr(model, "attn_pool", None)
    if attn_pool is not None:
        _check_attn_pool(attn_pool, config)
    return config


def _check_attn_pool(pool: nn.Module, config: dict) -> None:
    """A timm attention-pooling head must be the one fastvit's ``global_pool='map'`` builds (timm's ViT builds it
    from the model's heads, mlp_ratio, norm and activation: one latent, q projection, no pool pos-embed)."""
    if type(pool).__name__ != "AttentionPoolLatent":
        raise ValueError(f"global_pool={config['global_pool']!r} ({type(pool).__name__}) is not supported by fastvit")
    width = config["embed_dim"]
    expected = {
        "latent_len": (pool.latent_len, 1),
        "q_proj": (isinstance(pool.q, nn.Linear), True),
        "pos_embed": (pool.pos_embed is None, True),
        "pool_type": (pool.pool, "token"),
        "num_heads": (pool.num_heads, config["num_heads"]),
        "qk_norm": (isinstance(pool.q_norm, nn.Identity), True),
        "mlp hidden width": (
            pool.mlp.fc1.out_features if pool.mlp is not None else None,
            int(width * config.get("mlp_ratio", 4.0)),
        ),
    }
    for knob, (got, want) in expected.items():
        if got != want:
            raise ValueError(f"attention pooling with {knob}={got!r} is not supported by fastvit (global_pool='map')")
    if repr(_act_layer(pool.mlp.act)()) != repr(config.get("act_layer", nn.GELU)()):
        raise ValueError("attention pooling whose MLP activation differs from the blocks' is not supported by fastvit")


def _timm_eva_config(model: nn.Module) -> dict:
    """fastvit ``Eva`` arguments that rebuild a timm ``Eva`` (EVA02, DINOv3, PE, RoPE ViTs); one ``ValueError`` naming
    timm's knob for anything fastvit does not implement."""
    refused = {
        "use_post_norm (EvaBlockPostNorm)": any(type(b).__name__ != "EvaBlock" for b in model.blocks),
        "patch_drop_rate": getattr(model, "patch_drop", None) is not None,
        "embed norm": not isinstance(getattr(model.patch_embed, "norm", nn.Identity()), nn.Identity),
    }
    for knob, present in refused.items():
        if present:
            raise ValueError(f"timm Eva with {knob} is not supported by fastvit")
    dim = model.embed_dim
    config = dict(
        img_size=tuple(model.patch_embed.img_size),
        patch_size=tuple(model.patch_embed.patch_size),
        in_chans=model.patch_embed.proj.in_channels,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        embed_dim=dim,
        depth=len(model.blocks),
        class_token=model.cls_token is not None,
        num_reg_tokens=model.reg_token.shape[1] if model.reg_token is not None else 0,
        no_embed_class=bool(model.no_embed_class),
        use_abs_pos_emb=model.pos_embed is not None,
        use_pre_transformer_norm=not isinstance(model.norm_pre, nn.Identity),
        use_post_transformer_norm=not isinstance(model.norm, nn.Identity),
        use_fc_norm=not isinstance(model.fc_norm, nn.Identity),
        dynamic_img_size=bool(model.dynamic_img_size),
    )
    if len(model.blocks):
        config.update(_timm_eva_block_config(model.blocks[0], dim))
    config.update(_timm_rope_config(getattr(model, "rope", None)))
    pool = getattr(model, "attn_pool", None)
    if pool is not None:
        if type(pool).__name__ != "AttentionPoolLatent" or pool.latent_len != 1 or pool.pos_embed is not None:
            raise ValueError(f"timm Eva attention pooling {type(pool).__name__} of this kind is not supported")
        config.update(
            attn_pool_num_heads=pool.num_heads, attn_pool_mlp_ratio=mlp_ratio_for(pool.mlp.fc1.out_features, dim)
        )
    return config


def _timm_eva_block_config(block: nn.Module, dim: int) -> dict:
    attn, mlp = block.attn, block.mlp
    kind = type(attn).__name__
    if kind not in ("EvaAttention", "AttentionRope"):
        raise ValueError(f"timm Eva attention {kind} is not supported by fastvit")
    if getattr(attn, "gate", None) is not None:
        raise ValueError("timm Eva with gated_attn is not supported by fastvit")
    if getattr(attn, "num_kv_groups", 1) != 1:
        raise ValueError("timm Eva with num_kv_heads (grouped-query attention) is not supported by fastvit")
    if (block.gamma_1 is None) != (block.gamma_2 is None):
        raise ValueError("timm Eva with attn_only_layer_scale is not supported by fastvit")
    fused = attn.qkv is not None
    if kind == "EvaAttention":
        qkv_bias = attn.q_bias is not None if fused else attn.q_proj.bias is not None
    else:
        qkv_bias = (attn.qkv if fused else attn.q_proj).bias is not None
    config = dict(
        num_heads=attn.num_heads,
        qkv_bias=qkv_bias,
        qkv_fused=fused,
        attn_type="eva" if kind == "EvaAttention" else "rope",
        qk_norm=not isinstance(attn.q_norm, nn.Identity),
        scale_attn_inner=not isinstance(attn.norm, nn.Identity),
        init_values=block.init_values if block.gamma_1 is not None else None,
        norm_layer=_norm_layer(block.norm1, "norm_layer (block.norm1)"),
    )
    mlp_kind = type(mlp).__name__
    if mlp_kind == "Mlp":
        act = _act_layer(mlp.act)
        if repr(act()) != repr(nn.GELU()):
            raise ValueError(f"timm Eva MLP activation {type(mlp.act).__name__} is not supported (GELU only, as timm)")
        config.update(
            mlp_ratio=mlp_ratio_for(mlp.fc1.out_features, dim), scale_mlp=not isinstance(mlp.norm, nn.Identity)
        )
    elif mlp_kind == "SwiGLU":
        scale_mlp = not isinstance(mlp.norm, nn.Identity)
        config.update(
            mlp_ratio=mlp_ratio_for(mlp.fc1_g.out_features, dim), swiglu_mlp=True, scale_mlp=scale_mlp,
            swiglu_align_to=0 if scale_mlp else 1,  # 1: selects the split SwiGLU without changing its width
        )  # fmt: skip
    elif mlp_kind == "GluMlp" and not mlp.gate_last:
        config.update(mlp_ratio=mlp_ratio_for(mlp.fc1.out_features // 2, dim), swiglu_mlp=True)
    else:
        raise ValueError(f"timm Eva MLP {mlp_kind} is not supported by fastvit")
    return config


def _timm_rope_config(rope: nn.Module | None) -> dict:
    if rope is None:
        return dict(use_rot_pos_emb=False)
    kind = type(rope).__name__
    if getattr(rope, "aug_active", False):
        raise ValueError("timm RoPE coordinate augmentation (rope_shift/jitter/rescale_coords) is not supported")
    if kind == "RotaryEmbeddingCat":
        if rope.in_pixels or rope.grid_type != "index":
            raise ValueError("timm RoPE with in_pixels=True is not supported by fastvit")
        ref = rope.ref_feat_shape
        return dict(
            use_rot_pos_emb=True, rope_type="cat", rope_temperature=float(rope.temperature),
            rope_grid_offset=float(rope.grid_offset), rope_grid_indexing=rope.grid_indexing,
            rope_rotate_half=bool(rope.rotate_half), ref_feat_shape=tuple(ref) if ref is not None else None,
        )  # fmt: skip
    if kind == "RotaryEmbeddingDinoV3":
        if rope.min_period is not None or rope.normalize_coords != "separate":
            raise ValueError("timm DINOv3 RoPE with min/max periods or normalize_coords != 'separate' is not supported")
        return dict(
            use_rot_pos_emb=True, rope_type="dinov3", rope_temperature=float(rope.temperature),
            rope_grid_offset=float(rope.grid_offset), rope_grid_indexing=rope.grid_indexing,
            rope_rotate_half=bool(rope.rotate_half),
        )  # fmt: skip
    if kind == "RotaryEmbeddingMixed":
        return dict(
            use_rot_pos_emb=True,
            rope_type="mixed",
            rope_temperature=float(rope.temperature),
            rope_grid_indexing=rope.grid_indexing,
        )
    raise ValueError(f"timm RoPE {kind} (rope_type) is not supported by fastvit ('cat', 'dinov3' and 'mixed' only)")


def from_torchvision(model_or_state_dict, **overrides) -> VisionTransformer:
    """A fastvit ``VisionTransformer`` from a torchvision ViT (``torchvision.models.vit_b_16`` etc.).

    Its data config is torchvision's for the ImageNet weights (:data:`TORCHVISION_DATA_CFG`).
    """
    if isinstance(model_or_state_dict, nn.Module):
        tv = model_or_state_dict
        state_dict = torchvision_to_timm(tv.state_dict())
        config = infer_config(state_dict, num_heads=tv.encoder.layers[0].num_heads)
        config["img_size"] = tv.image_size
        config["norm_layer"] = partial(LayerNorm, eps=tv.encoder.ln.eps)
        return _build(state_dict, config, overrides, TORCHVISION_DATA_CFG)
    state_dict = torchvision_to_timm(unwrap_state_dict(model_or_state_dict))
    return _build(state_dict, infer_config(state_dict, overrides.get("num_heads")), overrides, TORCHVISION_DATA_CFG)


def from_hf(model_or_state_dict, **overrides) -> VisionTransformer:
    """A fastvit ``VisionTransformer`` from a Hugging Face ``ViTModel`` / ``ViTForImageClassification``.

    HF ViTs use LayerNorm eps 1e-12 (``config.layer_norm_eps``); it is read from a module and assumed
    for a bare state dict (override with ``norm_layer=partial(fastvit.layers.LayerNorm, eps=...)``). The data
    config is ``ViTImageProcessor``'s (:data:`HF_DATA_CFG`: mean/std 0.5, resized without cropping), with the
    classifier's ``id2label`` as ``label_names``.
    """
    if isinstance(model_or_state_dict, nn.Module):
        hf = model_or_state_dict
        cfg = hf.config
        state_dict = hf_to_timm(hf.state_dict())
        config = infer_config(state_dict, num_heads=cfg.num_attention_heads)
        # HF's names for the GELU forms, mapped to timm's; the model's one rule decides what is supported.
        act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(cfg.hidden_act, cfg.hidden_act)
        config.update(
            img_size=cfg.image_size,
            norm_layer=partial(LayerNorm, eps=cfg.layer_norm_eps),
            act_layer=act,
        )
        data_cfg = dict(HF_DATA_CFG)
        id2label = getattr(cfg, "id2label", None) or {}
        if config["num_classes"] and len(id2label) == config["num_classes"]:
            data_cfg["label_names"] = [str(id2label[i]) for i in range(len(id2label))]
        return _build(state_dict, config, overrides, data_cfg)
    state_dict = hf_to_timm(unwrap_state_dict(model_or_state_dict))
    config = infer_config(state_dict, overrides.get("num_heads"))
    config["norm_layer"] = partial(LayerNorm, eps=HF_LAYER_NORM_EPS)
    return _build(state_dict, config, overrides, HF_DATA_CFG)


# ------------------------------------------------------------------------------------------------
# Trained runs


def read_run(path: str | os.PathLike, backend: str | None = None, num_heads: int | None = None):
    """:func:`load_run`, also returning the checkpoint's metadata (training options, data provenance).

    Returns:
        (model in eval mode, metadata dict; empty for a file without metadata).
    """
    state, metadata = load_any_weights(path)
    config = metadata.get("config")
    config = config_from_json(config) if isinstance(config, Mapping) else infer_config(state, num_heads=num_heads)
    try:
        model = build_model(config, weight_init="skip", backend=backend)
    except TypeError as exc:  # a config key this fastvit does not know (metadata written by another version)
        raise ValueError(f"{os.fspath(path)}: the model config in its metadata is not valid here ({exc})") from exc
    model = load_weights(model, state)
    data_cfg = metadata_data_cfg(metadata)
    if data_cfg:
        model.pretrained_cfg = {**model.pretrained_cfg, **data_cfg}
    return model.eval(), metadata


def load_run(path: str | os.PathLike, backend: str | None = None, num_heads: int | None = None) -> VisionTransformer:
    """The model a training run saved (or any checkpoint holds), built and loaded, in eval mode.

    Args:
        path: a ``python -m fastvit train`` output folder, its ``checkpoint/``, ``model_best.safetensors``, or a
            timm / torchvision / Hugging Face weights file (architecture inferred, see :func:`infer_config`).
        backend: the model's backend.
        num_heads: for weights files of a non-standard width (fastvit checkpoints record it).

    Returns:
        the model; ``model.pretrained_cfg`` holds its data config (input size, interpolation, crop, mean/std, for
        :func:`fastvit.data.create_transform`) and ``label_names`` (the class names) where the checkpoint has them.
    """
    return read_run(path, backend, num_heads)[0]
