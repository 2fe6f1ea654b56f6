"""fastvit's ``NaFlexVit``: timm's NaFlex Vision Transformer (``timm.models.naflexvit``, SigLIP-2 NaFlex), same
configuration, same module names and state-dict keys, its blocks on fastvit's fused ops.

Reference: Dehghani et al., "Patch n' Pack: NaViT" (arXiv:2307.06304); Tschannen et al., "SigLIP 2" (arXiv:2502.14786).

Each image keeps its own aspect ratio and resolution: the input is timm's NaFlex dict ``{'patches': [B, N, P·P·C],
'patch_coord': [B, N, 2] (row, column of each patch), 'patch_valid': [B, N] bool}`` (what timm's NaFlex collator
builds), or a plain [B, C, H, W] image batch. The padding convention is timm's: sample b's patches come first, in
row-major order of its (h_b, w_b) grid, and the rest of its N slots are padding (``patch_valid`` False, any pixels,
coordinates (0, 0) as the collator writes them: the grid is max(patch_coord) + 1 over all N slots, as in timm).
The learned position embedding [1, H0, W0, D] is resampled per sample to (h_b, w_b) (``F.interpolate`` with the
model's mode, ``align_corners`` and antialias; square max(h, w) then cropped with ``pos_embed_ar_preserving``) and
added by sequence position, exactly as timm's ``NaFlexEmbeds``.

``patch_valid`` with the prefix tokens prepended is the [B, T+N] key-padding ``attn_mask`` of every block
(``fastvit.packing``: ``ops.qkv_attention(key_padding_mask=)``, fused kernels skip masked key blocks). timm's default
mask is symmetric (a padding query sees nothing); ours masks keys only (a padding query still attends to the valid
keys). The outputs at valid tokens are the same: a valid query's softmax runs over the same valid keys under both
masks (masked scores get weight exactly 0), and the values it mixes are those of valid tokens, which by induction
over the blocks never read a padding token. Padding tokens' outputs differ and are never used: pooling masks them
('avg' / 'max' / 'avgmax' over valid patches, 'map' with the same key-padding mask, 'token' reads the class token).

What is not implemented raises ``ValueError`` naming timm's knob: RoPE / EVA attention (``rope_type``,
``attn_type``), SwiGLU, grouped KV heads, gated attention, conv patch embedding, patch-size interpolation, patch
dropout, factorized position embeddings sampled by ``grid_sample``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvit import ops
from fastvit.layers import AttentionPoolLatent, Block, Mlp, ParallelScalingBlock, to_2tuple
from fastvit.model import (
    _OPENAI_CLIP,
    VisionTransformer,
    _check_config,
    _take_indices,
    check_output_fmt,
    default_pretrained_cfg,
    resolve_act_layer,
    resolve_norm_layer,
    split_intermediates,
)
from fastvit.packing import AttnMask

POS_EMBEDS = ("learned", "factorized", "none", "")


@dataclass
class NaFlexVitCfg:
    """timm's ``NaFlexVitCfg``: the same fields and defaults (``timm.models.naflexvit.NaFlexVitCfg``), so a timm
    config or its keyword arguments build the same model. Fields fastvit does not implement must keep their
    defaults (``NaFlexVit`` raises ``ValueError`` naming them). ``norm_layer`` / ``act_layer`` / ``embed_norm_layer``
    take timm's names or layer classes (``resolve_norm_layer`` / ``resolve_act_layer``); ``block_fn`` None (timm's
    ``Block``), ``'ParallelScalingBlock'`` or a fastvit block class."""

    patch_size: int | tuple[int, int] = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    scale_mlp_norm: bool = False
    num_kv_heads: Any = None
    qkv_bias: bool = True
    qk_norm: bool = False
    proj_bias: bool = True
    attn_drop_rate: float = 0.0
    scale_attn_inner_norm: bool = False
    use_key_only_attn_mask: bool = False  # fastvit always masks keys only (same outputs at valid tokens)
    init_values: float | None = None
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    patch_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    class_token: bool = False
    reg_tokens: int = 0
    pos_embed: str = "learned"
    pos_embed_grid_size: tuple[int, int] | None = (16, 16)
    pos_embed_interp_mode: str = "bicubic"
    pos_embed_ar_preserving: bool = False
    pos_embed_antialias: bool = True
    pos_embed_align_corners: bool = False
    pos_embed_use_grid_sample: bool = False
    rope_type: str = ""
    rope_temperature: float = 10000.0
    rope_ref_feat_shape: tuple[int, int] | None = None
    rope_grid_offset: float = 0.0
    rope_grid_indexing: str = "ij"
    rope_rotate_half: bool = False
    rope_shift_coords: float | None = None
    rope_jitter_coords: float | None = None
    rope_rescale_coords: float | None = None
    rope_mrope_section: tuple[int, int, int] | None = None
    dynamic_img_pad: bool = False
    patchify_channels_last: bool = True
    pre_norm: bool = False
    final_norm: bool = True
    fc_norm: bool | None = None
    global_pool: str = "map"
    pool_include_prefix: bool = False
    attn_pool_num_heads: int | None = None
    attn_pool_mlp_ratio: float | None = None
    weight_init: str = ""
    fix_init: bool = True
    embed_proj_type: str = "linear"
    input_norm_layer: Any = None  # declared by timm's config, not used by timm's NaFlexVit: ignored here too
    embed_norm_layer: Any = None
    norm_layer: Any = None
    act_layer: Any = None
    block_fn: Any = None
    mlp_layer: Any = None
    attn_layer: Any = None
    attn_type: str = "standard"
    attn_gated: bool = False
    swiglu_mlp: bool = False
    swiglu_align_to: int = 0
    qkv_fused: bool = True
    attn_only_layer_scale: bool = False
    enable_patch_interpolator: bool = False


# Fields whose non-default values need parts fastvit's NaFlexVit does not have.
_UNSUPPORTED = {
    "num_kv_heads": "grouped KV heads",
    "scale_attn_inner_norm": "a norm inside attention",
    "patch_drop_rate": "patch dropout",
    "rope_type": "RoPE: per-sample RoPE grids of NaFlex batches are not ported (fastvit.Eva takes one grid a batch)",
    "attn_layer": "another attention layer",
    "attn_type": "EVA / RoPE attention",
    "attn_gated": "gated attention",
    "swiglu_mlp": "the SwiGLU MLP of timm's EvaBlock",
    "qkv_fused": "unfused q/k/v projections",
    "attn_only_layer_scale": "attention-only LayerScale",
    "enable_patch_interpolator": "patch-size interpolation (FlexiViT)",
    "embed_proj_type": "a Conv2d patch embedding",
}
_DEFAULTS = NaFlexVitCfg()


def _check_naflex_cfg(cfg: NaFlexVitCfg) -> None:
    for name, what in _UNSUPPORTED.items():
        if getattr(cfg, name) != getattr(_DEFAULTS, name) and not (name == "rope_type" and cfg.rope_type == "none"):
            raise ValueError(f"{name}={getattr(cfg, name)!r} ({what}) is not supported by fastvit's NaFlexVit")
    if cfg.pos_embed not in POS_EMBEDS:
        raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {cfg.pos_embed!r}")
    if cfg.pos_embed == "factorized" and cfg.pos_embed_use_grid_sample:
        raise ValueError("pos_embed='factorized' with pos_embed_use_grid_sample=True is not supported by fastvit")
    if cfg.pos_embed in ("learned", "factorized") and cfg.pos_embed_grid_size is None:
        raise ValueError("pos_embed_grid_size must be given for a learned or factorized position embedding")


def _block_fn(block_fn) -> Callable[..., nn.Module]:
    if block_fn is None or block_fn == "Block":
        return Block
    if block_fn == "ParallelScalingBlock":
        return ParallelScalingBlock
    if callable(block_fn) and not isinstance(block_fn, str):
        return block_fn
    raise ValueError(f"block_fn must be None, 'Block', 'ParallelScalingBlock' or a block class, got {block_fn!r}")


class NaFlexEmbeds(nn.Module):
    """timm's ``NaFlexEmbeds`` (linear patch projection): keys ``proj.*`` (a Linear over the P·P·C flattened patch,
    channels fastest with ``channels_last``), ``norm``, ``cls_token``, ``reg_token``, ``pos_embed`` [1, H0, W0, D]
    or ``pos_embed_y`` [1, H0, D] / ``pos_embed_x`` [1, W0, D] (factorized).

    An image batch runs as one ``ops.patch_embed`` call (the Linear weight viewed as the equivalent Conv2d weight;
    position embedding and prefix tokens in the same op) while ``norm`` is an Identity.
    """

    op_name = "patch_embed"

    def __init__(self, cfg: NaFlexVitCfg, in_chans: int, norm_layer, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.patch_size = to_2tuple(cfg.patch_size, "patch_size")
        self.in_chans, self.embed_dim = in_chans, cfg.embed_dim
        self.num_prefix_tokens = (1 if cfg.class_token else 0) + cfg.reg_tokens
        self.channels_last = cfg.patchify_channels_last
        self.dynamic_img_pad = cfg.dynamic_img_pad
        self.pos_embed_type = cfg.pos_embed if cfg.pos_embed in ("learned", "factorized") else "none"
        self.interp_mode = cfg.pos_embed_interp_mode
        self.ar_preserving = cfg.pos_embed_ar_preserving
        self.antialias = cfg.pos_embed_antialias
        self.align_corners = cfg.pos_embed_align_corners
        self.use_grid_sample = cfg.pos_embed_use_grid_sample
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.embed_dim, **dd)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.empty(1, cfg.reg_tokens, cfg.embed_dim, **dd)) if cfg.reg_tokens else None
        self.patch_dim = self.patch_size[0] * self.patch_size[1] * in_chans
        self.proj = nn.Linear(self.patch_dim, cfg.embed_dim, bias=not cfg.pre_norm, **dd)
        self.norm = norm_layer(cfg.embed_dim, **dd) if norm_layer is not None else nn.Identity()
        self.pos_embed = self.pos_embed_y = self.pos_embed_x = None
        if self.pos_embed_type == "learned":
            self.pos_embed = nn.Parameter(torch.empty(1, *cfg.pos_embed_grid_size, cfg.embed_dim, **dd))
        elif self.pos_embed_type == "factorized":
            grid_h, grid_w = cfg.pos_embed_grid_size
            self.pos_embed_y = nn.Parameter(torch.empty(1, grid_h, cfg.embed_dim, **dd))
            self.pos_embed_x = nn.Parameter(torch.empty(1, grid_w, cfg.embed_dim, **dd))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        self.backend: str | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's init: position embeddings normal(0.02), class / register tokens normal(1e-6)."""
        for param, std in ((self.cls_token, 1e-6), (self.reg_token, 1e-6), (self.pos_embed, 0.02)):
            if param is not None:
                nn.init.normal_(param, std=std)
        for param in (self.pos_embed_y, self.pos_embed_x):
            if param is not None:
                nn.init.normal_(param, std=0.02)

    def prefix_tokens(self) -> torch.Tensor | None:
        """[1, T, D]: the class token, then the register tokens (or None)."""
        tokens = [t for t in (self.cls_token, self.reg_token) if t is not None]
        return torch.cat(tokens, dim=1) if len(tokens) > 1 else (tokens[0] if tokens else None)

    def grid_pos_embed(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """The position embedding of an (h, w) patch grid, [1, h·w, D] in row-major order (float32 when resampled),
        as timm's ``_apply_learned_pos_embed`` / ``_apply_factorized_pos_embed`` (and their NaFlex per-size
        versions, which resample the same way)."""
        height, width = grid
        if self.pos_embed_type == "learned":
            orig = tuple(self.pos_embed.shape[1:3])
            if orig == (height, width):
                return self.pos_embed.reshape(1, height * width, -1)
            size = (max(grid),) * 2 if self.ar_preserving else (height, width)
            table = F.interpolate(
                self.pos_embed.permute(0, 3, 1, 2).float(),
                size=size,
                mode=self.interp_mode,
                align_corners=self.align_corners,
                antialias=self.antialias,
            )
            return table[:, :, :height, :width].flatten(2).transpose(1, 2)
        if self.pos_embed_type == "factorized":
            lengths = (max(grid),) * 2 if self.ar_preserving else (height, width)
            pe_y = self._resample_1d(self.pos_embed_y, lengths[0])[:, :height]
            pe_x = self._resample_1d(self.pos_embed_x, lengths[1])[:, :width]
            return (pe_y.unsqueeze(2) + pe_x.unsqueeze(1)).flatten(1, 2)
        return None

    @staticmethod
    def _resample_1d(table: torch.Tensor, length: int) -> torch.Tensor:
        """A [1, L, D] factorized table at ``length`` positions (linear, as timm's ``_interp1d``)."""
        if table.shape[1] == length:
            return table
        return F.interpolate(table.permute(0, 2, 1).float(), size=length, mode="linear", align_corners=False).permute(
            0, 2, 1
        )

    def naflex_pos_embed(self, patch_coord: torch.Tensor, tokens: int, dtype: torch.dtype) -> torch.Tensor:
        """[B, N, D] position embedding of a NaFlex batch: sample b's grid (h_b, w_b) = max(patch_coord) + 1; its
        resampled table fills the first min(N, h_b·w_b) slots (timm adds it by sequence position, not by coordinate:
        patches in row-major order, padding last), zeros after. With ``pos_embed_use_grid_sample``: the table sampled
        at each patch's coordinate (timm's ``_apply_learned_naflex_pos_embed_grid_sample``)."""
        if self.use_grid_sample:
            return self._grid_sample_pos_embed(patch_coord).to(dtype)
        grids = [(int(h) + 1, int(w) + 1) for h, w in patch_coord.amax(dim=1).tolist()]
        tables = {grid: self.grid_pos_embed(grid).to(dtype) for grid in dict.fromkeys(grids)}
        rows = []
        for grid in grids:
            table = tables[grid][0, :tokens]
            rows.append(F.pad(table, (0, 0, 0, tokens - table.shape[0])))
        return torch.stack(rows)

    def _grid_sample_pos_embed(self, patch_coord: torch.Tensor) -> torch.Tensor:
        shapes = patch_coord.amax(dim=1) + 1  # [B, 2]
        if self.ar_preserving:
            shapes = shapes.amax(dim=1, keepdim=True).expand_as(shapes)
        coord = patch_coord.to(torch.float32)
        if self.align_corners:
            grid = 2.0 * coord / (shapes[:, None, :] - 1).clamp(min=1) - 1.0
        else:
            grid = (2.0 * coord + 1.0) / shapes[:, None, :] - 1.0
        table = self.pos_embed.permute(0, 3, 1, 2).expand(patch_coord.shape[0], -1, -1, -1).float()
        sampled = F.grid_sample(
            table,
            grid.flip(-1).unsqueeze(2),  # grid_sample takes (x, y)
            mode=self.interp_mode,
            align_corners=self.align_corners,
            padding_mode="border",
        )  # [B, D, N, 1]
        return sampled.squeeze(-1).transpose(1, 2)

    def conv_weight(self) -> torch.Tensor:
        """``proj.weight`` [D, P·P·C] as the Conv2d weight [D, C, P, P] of the same projection (a view)."""
        ph, pw = self.patch_size
        if self.channels_last:
            return self.proj.weight.unflatten(1, (ph, pw, self.in_chans)).permute(0, 3, 1, 2)
        return self.proj.weight.unflatten(1, (self.in_chans, ph, pw))

    def check_image(self, x: object) -> tuple[int, int]:
        """Validate an image batch [B, C, H, W]; returns its (padded, with ``dynamic_img_pad``) patch grid."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"x must be a torch.Tensor image batch [B, C, H, W] or a NaFlex dict, got {type(x).__name__}"
            )
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"x must be an image batch [B, {self.in_chans}, H, W], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point image batch, got {x.dtype}")
        (ph, pw), (height, width) = self.patch_size, x.shape[-2:]
        if self.dynamic_img_pad:
            return math.ceil(height / ph), math.ceil(width / pw)
        if height % ph or width % pw or height < ph or width < pw:
            raise ValueError(
                f"image size {height}x{width} must be a non-zero multiple of the patch size {ph}x{pw} (or build the "
                "model with dynamic_img_pad=True)"
            )
        return height // ph, width // pw

    def forward_image(self, x: torch.Tensor) -> torch.Tensor:
        """Image [B, C, H, W] -> tokens [B, T+N, D] (timm's ``batch_patchify`` then the NaFlex embedding)."""
        grid = self.check_image(x)
        ph, pw = self.patch_size
        x = F.pad(x, (0, grid[1] * pw - x.shape[-1], 0, grid[0] * ph - x.shape[-2]))  # no-op unless dynamic_img_pad
        pos_embed = self.grid_pos_embed(grid)
        pos_embed = None if pos_embed is None else pos_embed.to(x.dtype)
        if isinstance(self.norm, nn.Identity):
            tokens = ops.patch_embed(
                x, self.conv_weight(), self.proj.bias, pos_embed, self.prefix_tokens(), backend=self.backend
            )
            return self.pos_drop(tokens)
        tokens = self.norm(F.conv2d(x, self.conv_weight(), self.proj.bias, stride=self.patch_size).flatten(2).mT)
        return self._finish(tokens if pos_embed is None else tokens + pos_embed)

    def forward_patches(self, patches: torch.Tensor, patch_coord: torch.Tensor) -> torch.Tensor:
        """NaFlex patches [B, N, P·P·C] (or [B, N, P, P, C]) and their coordinates [B, N, 2] -> [B, T+N, D]."""
        tokens = self.norm(self.proj(patches.flatten(2)))
        if self.pos_embed_type != "none":
            tokens = tokens + self.naflex_pos_embed(patch_coord, tokens.shape[1], tokens.dtype)
        return self._finish(tokens)

    def _finish(self, tokens: torch.Tensor) -> torch.Tensor:
        prefix = self.prefix_tokens()
        if prefix is not None:
            tokens = torch.cat([prefix.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return self.pos_drop(tokens)


def check_naflex_inputs(
    patches: object, patch_coord: object, patch_valid: object, patch_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TypeError/ValueError unless ``patches`` [B, N, patch_dim] (float), ``patch_coord`` [B, N, 2] (integer) and
    ``patch_valid`` [B, N] (bool) fit together; returns them with ``patches`` flattened to [B, N, patch_dim]."""
    for name, value in (("patches", patches), ("patch_coord", patch_coord), ("patch_valid", patch_valid)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"NaFlex input {name!r} must be a torch.Tensor, got {type(value).__name__}")
    if not patches.is_floating_point():
        raise TypeError(f"patches must be floating point, got {patches.dtype}")
    if patches.ndim not in (3, 5) or math.prod(patches.shape[2:]) != patch_dim:
        raise ValueError(
            f"patches must be [B, N, {patch_dim}] (P·P·C for the model's patch size and channels), got shape "
            f"{tuple(patches.shape)}"
        )
    batch_tokens = tuple(patches.shape[:2])
    if patch_coord.dtype.is_floating_point or patch_coord.dtype == torch.bool:
        raise TypeError(f"patch_coord must be an integer tensor, got {patch_coord.dtype}")
    if tuple(patch_coord.shape) != (*batch_tokens, 2):
        raise ValueError(f"patch_coord must be [B, N, 2] = {[*batch_tokens, 2]}, got {list(patch_coord.shape)}")
    if patch_valid.dtype != torch.bool:
        raise TypeError(f"patch_valid must be a bool tensor (True = a real patch), got {patch_valid.dtype}")
    if tuple(patch_valid.shape) != batch_tokens:
        raise ValueError(f"patch_valid must be [B, N] = {list(batch_tokens)}, got {list(patch_valid.shape)}")
    return patches.flatten(2), patch_coord, patch_valid


class NaFlexVit(nn.Module):
    """timm's ``NaFlexVit`` on fastvit's layers: ``NaFlexVit(cfg=None, in_chans=3, num_classes=1000, img_size=None,
    **cfg_fields)`` as timm's, plus ``backend`` (see ``VisionTransformer.set_backend``).

    Keys as timm's: ``embeds.*`` (``NaFlexEmbeds``), ``norm_pre``, ``blocks.i.*`` (fastvit ``Block`` /
    ``ParallelScalingBlock``), ``norm``, ``attn_pool.*`` ('map'), ``fc_norm``, ``head``. ``forward`` takes a NaFlex
    dict {'patches', 'patch_coord', 'patch_valid'} or an image batch [B, C, H, W] and returns [B, num_classes].
    """

    def __init__(
        self,
        cfg: NaFlexVitCfg | None = None,
        in_chans: int = 3,
        num_classes: int = 1000,
        img_size: int | tuple[int, int] | None = None,
        backend: str | None = None,
        device=None,
        dtype=None,
        **kwargs,
    ) -> None:
        super().__init__()
        cfg = cfg or NaFlexVitCfg()
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(NaFlexVitCfg)})
        if unknown:
            raise TypeError(f"NaFlexVit() got unexpected keyword argument(s): {unknown}")
        cfg = dataclasses.replace(cfg, **kwargs)
        if img_size is not None and "pos_embed_grid_size" not in kwargs and cfg.pos_embed_grid_size is None:
            size, patch = to_2tuple(img_size, "img_size"), to_2tuple(cfg.patch_size, "patch_size")
            cfg = dataclasses.replace(cfg, pos_embed_grid_size=(size[0] // patch[0], size[1] // patch[1]))
        _check_config(
            num_classes=num_classes,
            global_pool=cfg.global_pool,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_ratio,
            class_token=cfg.class_token,
            pos_embed="learn",  # checked by _check_naflex_cfg
            reg_tokens=cfg.reg_tokens,
            in_chans=in_chans,
            weight_init=cfg.weight_init,
            rates={
                name: getattr(cfg, name)
                for name in ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")
            },
        )
        _check_naflex_cfg(cfg)
        dd = {"device": device, "dtype": dtype}
        norm_layer = resolve_norm_layer(cfg.norm_layer)
        act_layer = resolve_act_layer(cfg.act_layer)
        embed_norm = resolve_norm_layer(cfg.embed_norm_layer) if cfg.embed_norm_layer is not None else None
        use_fc_norm = cfg.global_pool == "avg" if cfg.fc_norm is None else cfg.fc_norm

        self.cfg = cfg
        self.num_classes, self.in_chans, self.global_pool = num_classes, in_chans, cfg.global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = cfg.embed_dim
        self.num_prefix_tokens = (1 if cfg.class_token else 0) + cfg.reg_tokens
        self.num_reg_tokens, self.has_class_token = cfg.reg_tokens, cfg.class_token
        self.pool_include_prefix = cfg.pool_include_prefix
        self.grad_checkpointing = False
        self.img_size = to_2tuple(img_size, "img_size") if img_size is not None else None

        self.embeds = NaFlexEmbeds(cfg, in_chans, embed_norm, **dd)
        self.norm_pre = norm_layer(cfg.embed_dim, **dd) if cfg.pre_norm else nn.Identity()
        drop_path_rates = [x.item() for x in torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu")]
        block_fn = _block_fn(cfg.block_fn)
        self.blocks = nn.Sequential(
            *[
                block_fn(
                    dim=cfg.embed_dim,
                    num_heads=cfg.num_heads,
                    mlp_ratio=cfg.mlp_ratio,
                    qkv_bias=cfg.qkv_bias,
                    qk_norm=cfg.qk_norm,
                    proj_bias=cfg.proj_bias,
                    init_values=cfg.init_values,
                    proj_drop=cfg.proj_drop_rate,
                    attn_drop=cfg.attn_drop_rate,
                    drop_path=drop_path_rates[i],
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                    mlp_layer=cfg.mlp_layer or Mlp,
                    scale_mlp_norm=cfg.scale_mlp_norm,
                    **dd,
                )
                for i in range(cfg.depth)
            ]
        )
        self.norm = norm_layer(cfg.embed_dim, **dd) if cfg.final_norm and not use_fc_norm else nn.Identity()
        self.attn_pool = (
            AttentionPoolLatent(
                cfg.embed_dim,
                num_heads=cfg.attn_pool_num_heads or cfg.num_heads,
                mlp_ratio=cfg.attn_pool_mlp_ratio or cfg.mlp_ratio,
                norm_layer=norm_layer,
                act_layer=act_layer,
                **dd,
            )
            if cfg.global_pool == "map"
            else None
        )
        self.fc_norm = norm_layer(cfg.embed_dim, **dd) if cfg.final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self._pretrained_cfg = default_pretrained_cfg(in_chans)
        self.weight_init_mode, self.fix_init = cfg.weight_init, cfg.fix_init
        self.init_weights()
        self.set_backend(backend)

    # What works as in VisionTransformer (same attribute names, same op modules) is VisionTransformer's code.
    set_backend = VisionTransformer.set_backend
    backend_plan = VisionTransformer.backend_plan
    fusion_report = VisionTransformer.fusion_report
    init_weights = VisionTransformer.init_weights  # through the cls_token / reg_token / pos_embed properties below
    set_grad_checkpointing = VisionTransformer.set_grad_checkpointing
    get_classifier = VisionTransformer.get_classifier
    reset_classifier = VisionTransformer.reset_classifier
    _run_block = VisionTransformer._run_block
    _blocks_taking = VisionTransformer._blocks_taking

    # The embedding's parameters under VisionTransformer's names, for the methods shared above.
    cls_token = property(lambda self: self.embeds.cls_token)
    reg_token = property(lambda self: self.embeds.reg_token)
    pos_embed = property(lambda self: self.embeds.pos_embed)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"embeds.pos_embed", "embeds.cls_token", "embeds.reg_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^embeds", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def get_patch_size(self) -> tuple[int, int]:
        return self.embeds.patch_size

    @property
    def pretrained_cfg(self) -> dict:
        """The data config in timm's form (see ``VisionTransformer.pretrained_cfg``); any input size is accepted,
        ``input_size`` is the position-embedding grid's (or ``img_size``)."""
        cfg = self._pretrained_cfg
        grid = self.cfg.pos_embed_grid_size or (14, 14)
        size = self.img_size or tuple(g * p for g, p in zip(grid, self.embeds.patch_size))
        cfg.update(input_size=(self.in_chans, *size), fixed_input_size=False, num_classes=self.num_classes)
        return cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict) -> None:
        VisionTransformer.pretrained_cfg.fset(self, cfg)

    default_cfg = pretrained_cfg

    # ------------------------------------------------------------------------------------------
    # Forward

    def embed(
        self, x: torch.Tensor, patch_coord: torch.Tensor | None = None, patch_valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image [B, C, H, W], or NaFlex patches with ``patch_coord`` and ``patch_valid`` -> tokens [B, T+N, D] and
        the blocks' [B, T+N] key-padding mask (None for an image batch)."""
        if patch_coord is None:
            if patch_valid is not None:
                raise ValueError("patch_valid was given without patch_coord; NaFlex input needs both")
            return self.norm_pre(self.embeds.forward_image(x)), None
        if patch_valid is None:
            raise ValueError("patch_coord was given without patch_valid; NaFlex input needs both")
        patches, patch_coord, patch_valid = check_naflex_inputs(x, patch_coord, patch_valid, self.embeds.patch_dim)
        tokens = self.embeds.forward_patches(patches, patch_coord)
        mask = F.pad(patch_valid, (self.num_prefix_tokens, 0), value=True)  # prefix tokens are always valid
        return self.norm_pre(tokens), mask

    def embed_for_blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, Iterable[tuple]]:
        """Image [B, C, H, W] -> tokens and, per block, its extra arguments (none)."""
        return self.embed(x)[0], itertools.repeat(())

    def forward_features(
        self,
        patches: torch.Tensor,
        patch_coord: torch.Tensor | None = None,
        patch_valid: torch.Tensor | None = None,
        attn_mask: AttnMask = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """As timm's: an image batch -> normalised tokens [B, T+N, D]; NaFlex patches (with ``patch_coord``,
        ``patch_valid``) -> {'patches': tokens [B, T+N, D], 'patch_valid': [B, N]}. ``attn_mask`` replaces the
        key-padding mask built from ``patch_valid`` (any form in ``fastvit.packing``)."""
        x, mask = self.embed(patches, patch_coord, patch_valid)
        mask = mask if attn_mask is None else attn_mask
        for block in self.blocks:
            x = self._run_block(block, x, attn_mask=mask)
        x = self.norm(x)
        return x if patch_coord is None else {"patches": x, "patch_valid": patch_valid}

    def forward_intermediates(
        self,
        x: torch.Tensor | dict[str, torch.Tensor],
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        patch_coord: torch.Tensor | None = None,
        patch_valid: torch.Tensor | None = None,
        attn_mask: AttnMask = None,
    ):
        """Features after selected blocks, as timm's ``NaFlexVit.forward_intermediates``.

        Args:
            x: an image batch [B, C, H, W], NaFlex patches [B, N, P·P·C] (with ``patch_coord`` / ``patch_valid``) or
                timm's NaFlex dict (its entries win over the arguments).
            indices: last ``n`` blocks if int, these block indices if a list, all if None.
            return_prefix_tokens: return (spatial, prefix) pairs (``output_dict``: 'image_intermediates_prefix').
            norm: apply the final norm to each intermediate.
            stop_early: skip the blocks after the last requested one.
            output_fmt: 'NCHW' (spatial maps: image batches only, NaFlex samples have their own grids) or 'NLC'.
            intermediates_only: return only the intermediates.
            output_dict: return {'image_intermediates', 'image_intermediates_prefix' (with return_prefix_tokens),
                'patch_valid' (NaFlex input), 'image_features' (unless intermediates_only)}.
            attn_mask: replaces the key-padding mask built from ``patch_valid`` (see ``fastvit.packing``).

        Returns:
            (final normalised tokens, intermediates), the intermediates alone, or the dict above.
        """
        check_output_fmt(output_fmt)
        if isinstance(x, dict):
            patch_coord, patch_valid, attn_mask, x = self._naflex_dict(x, patch_coord, patch_valid, attn_mask)
        take = _take_indices(len(self.blocks), indices)
        grid = None
        if patch_coord is None and output_fmt == "NCHW":
            grid = self.embeds.check_image(x)
        elif output_fmt == "NCHW":
            raise ValueError(
                'output_fmt="NCHW" needs an image batch: NaFlex samples have their own grids, use "NLC" (each '
                "sample's tokens lie at its patch_coord)"
            )
        x, mask = self.embed(x, patch_coord, patch_valid)
        mask = mask if attn_mask is None else attn_mask
        x, intermediates = self._blocks_taking(x, itertools.repeat(()), take, norm, stop_early, attn_mask=mask)
        spatial, prefix = split_intermediates(intermediates, self.num_prefix_tokens, grid)
        if output_dict:
            result = {"image_intermediates": spatial}
            if return_prefix_tokens and self.num_prefix_tokens:
                result["image_intermediates_prefix"] = prefix
            if patch_valid is not None:
                result["patch_valid"] = patch_valid
            if not intermediates_only:
                result["image_features"] = self.norm(x)
            return result
        if return_prefix_tokens and self.num_prefix_tokens:
            spatial = list(zip(spatial, prefix))
        return spatial if intermediates_only else (self.norm(x), spatial)

    @staticmethod
    def _naflex_dict(x: dict, patch_coord, patch_valid, attn_mask):
        """timm's NaFlex dict -> (patch_coord, patch_valid, attn_mask, patches): its entries win over the arguments."""
        if "patches" not in x:
            raise ValueError(f"a NaFlex dict input needs 'patches', got keys {sorted(x)}")
        patch_coord = x.get("patch_coord", patch_coord)
        patch_valid = x.get("patch_valid", patch_valid)
        if patch_coord is None or patch_valid is None:
            raise ValueError("a NaFlex dict input needs 'patch_coord' and 'patch_valid'")
        return patch_coord, patch_valid, x.get("attn_mask", attn_mask), x["patches"]

    def pool(
        self, x: torch.Tensor, pool_type: str | None = None, patch_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tokens [B, T+N, D] -> [B, D], the padding patches (``patch_valid`` False) left out as timm's
        ``global_pool_naflex`` and ``_pool``."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if patch_valid is None or (self.attn_pool is None and pool_type not in ("avg", "max", "avgmax")):
            return VisionTransformer.pool(self, x, pool_type)  # no padding, or 'token' / '' (read no padding)
        valid = F.pad(patch_valid, (self.num_prefix_tokens, 0), value=True)
        if not self.pool_include_prefix:
            x, valid = x[:, self.num_prefix_tokens :], valid[:, self.num_prefix_tokens :]
        if self.attn_pool is not None:
            return self.attn_pool(x, attn_mask=valid)
        weights = valid.to(x.dtype).unsqueeze(-1)
        mean = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        if pool_type == "avg":
            return mean
        maximum = x.masked_fill(~valid.unsqueeze(-1), torch.finfo(x.dtype).min).amax(dim=1)
        return maximum if pool_type == "max" else 0.5 * (mean + maximum)

    def forward_head(
        self, patches: torch.Tensor, pre_logits: bool = False, patch_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(patches, patch_valid=patch_valid)))
        return x if pre_logits else self.head(x)

    def forward(
        self,
        x: torch.Tensor | dict[str, torch.Tensor],
        patch_coord: torch.Tensor | None = None,
        patch_valid: torch.Tensor | None = None,
        attn_mask: AttnMask = None,
    ) -> torch.Tensor:
        """x: an image batch [B, C, H, W], NaFlex patches [B, N, P·P·C] with ``patch_coord`` and ``patch_valid``, or
        timm's NaFlex dict (its entries win over the arguments) -> [B, num_classes]."""
        if isinstance(x, dict):
            patch_coord, patch_valid, attn_mask, x = self._naflex_dict(x, patch_coord, patch_valid, attn_mask)
        features = self.forward_features(x, patch_coord, patch_valid, attn_mask)
        if isinstance(features, dict):
            return self.forward_head(**features)
        return self.forward_head(features)


# Architectures of timm's registered naflexvit_* models (timm.models.naflexvit); NaFlexVitCfg fields.
_RADIO = dict(
    patch_size=16,
    class_token=True,
    global_pool="token",
    final_norm=False,
    pos_embed_grid_size=(128, 128),
    pos_embed_interp_mode="bilinear",
    pos_embed_ar_preserving=True,
    pos_embed_antialias=False,
)
_SO150M2 = dict(
    patch_size=16,
    embed_dim=832,
    depth=21,
    num_heads=13,
    mlp_ratio=34 / 13,
    init_values=1e-5,
    qkv_bias=False,
    reg_tokens=1,
)
_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
NAFLEX_PRESETS: dict[str, dict] = {
    "naflexvit_base_patch16_gap": dict(**_BASE, init_values=1e-5, global_pool="avg", reg_tokens=4, fc_norm=True),
    "naflexvit_base_patch16_par_gap": dict(
        **_BASE, init_values=1e-5, pos_embed_ar_preserving=True, global_pool="avg", reg_tokens=4, fc_norm=True
    ),
    "naflexvit_base_patch16_parfac_gap": dict(
        **_BASE, init_values=1e-5, pos_embed_ar_preserving=True, pos_embed="factorized", global_pool="avg",
        reg_tokens=4, fc_norm=True,
    ),
    "naflexvit_base_patch16_map": dict(**_BASE, init_values=1e-5, global_pool="map", reg_tokens=1),
    "naflexvit_so150m2_patch16_reg1_gap": dict(**_SO150M2, global_pool="avg", fc_norm=True),
    "naflexvit_so150m2_patch16_reg1_map": dict(**_SO150M2, global_pool="map"),
    "naflexvit_base_patch16_siglip": dict(
        **_BASE, act_layer="gelu_tanh", global_pool="map", pos_embed_interp_mode="bilinear"
    ),
    "naflexvit_so400m_patch16_siglip": dict(
        patch_size=16, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, act_layer="gelu_tanh",
        global_pool="map", pos_embed_interp_mode="bilinear",
    ),
    "naflexvit_base_patch16_radio_v3": dict(
        **_RADIO, embed_dim=768, depth=12, num_heads=12, init_values=1e-5, reg_tokens=7, pos_embed_align_corners=True
    ),
    "naflexvit_large_patch16_radio_v3": dict(
        **_RADIO, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5, reg_tokens=7
    ),
    "naflexvit_huge_patch16_radio_v3": dict(
        **_RADIO, embed_dim=1280, depth=32, num_heads=16, reg_tokens=7, pos_embed_align_corners=True
    ),
    "naflexvit_giant_patch16_radio_v3": dict(**_RADIO, embed_dim=1536, depth=40, num_heads=24, reg_tokens=7),
    "naflexvit_so400m_patch16_radio_v4": dict(
        **_RADIO, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=4304 / 1152, reg_tokens=9
    ),
    "naflexvit_huge_patch16_radio_v4": dict(**_RADIO, embed_dim=1280, depth=32, num_heads=16, reg_tokens=9),
}  # fmt: skip


# What timm's pretrained configs give each preset beyond the architecture: the head (SigLIP and RADIO towers are feature
# extractors), the nominal input size and the normalisation (crop_pct 1.0 for all).
_SIGLIP_DATA = dict(img_size=384, mean=(0.5,) * 3, std=(0.5,) * 3)
_RADIO_DATA = dict(num_classes=0, img_size=512, mean=_OPENAI_CLIP["mean"], std=_OPENAI_CLIP["std"])


def _preset_data(name: str) -> dict:
    if "radio" in name:
        return _RADIO_DATA
    return {**_SIGLIP_DATA, "num_classes": 0} if name.endswith("siglip") else _SIGLIP_DATA


def create_naflexvit(name: str, **kwargs) -> NaFlexVit:
    """The preset ``name`` of ``NAFLEX_PRESETS``; ``kwargs``: NaFlexVitCfg fields or constructor arguments."""
    cfg_names = {f.name for f in dataclasses.fields(NaFlexVitCfg)}
    cfg_kwargs = {**NAFLEX_PRESETS[name], **{k: v for k, v in kwargs.items() if k in cfg_names}}
    data = _preset_data(name)
    args = {"num_classes": data.get("num_classes", 1000), "img_size": data["img_size"]}
    args.update({k: v for k, v in kwargs.items() if k not in cfg_names})
    model = NaFlexVit(NaFlexVitCfg(**cfg_kwargs), **args)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": data["mean"], "std": data["std"], "crop_pct": 1.0}
    return model


# ------------------------------------------------------------------------------------------------
# From timm


def timm_naflex_config(model: nn.Module) -> dict:
    """``NaFlexVit`` arguments (NaFlexVitCfg fields, ``in_chans``, ``num_classes``) that rebuild a timm ``NaFlexVit``,
    read off the module; one ``ValueError`` naming timm's knob for anything fastvit does not implement."""
    from fastvit.convert import _check_attn_pool, _norm_layer, mlp_ratio_for, timm_block_layers

    embeds = model.embeds
    refused = {
        "rope (rope_type)": getattr(model, "rope", None) is not None,
        "patch dropout (patch_drop_rate)": getattr(model, "patch_drop", None) is not None,
        "a Conv2d patch embedding (embed_proj_type='conv')": not embeds.is_linear,
        "patch-size interpolation (enable_patch_interpolator)": embeds.patch_interpolator is not None,
        "an input norm (norm_input)": embeds.norm_input is not None,
        "EVA blocks (attn_type / swiglu_mlp / num_kv_heads / attn_gated)": any(
            type(b).__name__ == "EvaBlock" for b in model.blocks
        ),
    }
    for knob, present in refused.items():
        if present:
            raise ValueError(f"timm NaFlexVit with {knob} is not supported by fastvit")
    dim = model.embed_dim
    config: dict = dict(
        in_chans=embeds.in_chans,
        num_classes=model.num_classes if isinstance(model.head, nn.Linear) else 0,
        patch_size=tuple(embeds.patch_size),
        embed_dim=dim,
        depth=len(model.blocks),
        class_token=embeds.cls_token is not None,
        reg_tokens=embeds.num_reg_tokens,
        pos_embed=embeds.pos_embed_type,
        pos_embed_interp_mode=embeds.pos_embed_interp_mode,
        pos_embed_ar_preserving=embeds.pos_embed_ar_preserving,
        pos_embed_antialias=embeds.pos_embed_antialias,
        pos_embed_align_corners=embeds.pos_embed_align_corners,
        pos_embed_use_grid_sample=embeds.pos_embed_use_grid_sample,
        dynamic_img_pad=embeds.dynamic_img_pad,
        patchify_channels_last=embeds.channels_last,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        global_pool=model.global_pool,
        pool_include_prefix=model.pool_include_prefix,
    )
    if embeds.pos_embed is not None:
        config["pos_embed_grid_size"] = tuple(embeds.pos_embed.shape[1:3])
    elif embeds.pos_embed_y is not None:
        config["pos_embed_grid_size"] = (embeds.pos_embed_y.shape[1], embeds.pos_embed_x.shape[1])
    if not isinstance(embeds.norm, nn.Identity):
        config["embed_norm_layer"] = _norm_layer(embeds.norm, "embed_norm_layer (embeds.norm)")
    if len(model.blocks):
        block = model.blocks[0]
        config.update(timm_block_layers(block))
        if hasattr(block, "attn"):  # timm's Block
            heads, qkv, proj, hidden = block.attn.num_heads, block.attn.qkv, block.attn.proj, block.mlp.fc1.out_features
        else:  # a ParallelScalingBlock: one in_proj (MLP hidden, q, k, v) and one or two out projections
            heads, qkv, hidden = block.num_heads, block.in_proj, block.in_split[0]
            proj = block.out_proj if block.out_proj is not None else block.attn_out_proj
        config.update(
            num_heads=heads,
            mlp_ratio=mlp_ratio_for(hidden, dim),
            qkv_bias=qkv.bias is not None,
            proj_bias=proj.bias is not None,
        )
        layer_scale = getattr(block, "ls1", getattr(block, "ls", None))
        if not isinstance(layer_scale, nn.Identity):
            config["init_values"] = float(layer_scale.init_values)
    if model.attn_pool is not None:
        pool = model.attn_pool
        config["attn_pool_num_heads"] = pool.num_heads
        config["attn_pool_mlp_ratio"] = mlp_ratio_for(pool.mlp.fc1.out_features, dim)
        _check_attn_pool(
            pool,
            dict(
                config,
                num_heads=pool.num_heads,
                mlp_ratio=config["attn_pool_mlp_ratio"],
                act_layer=config.get("act_layer", nn.GELU),
            ),
        )
    return config


def from_timm_naflex(model: nn.Module, **overrides) -> NaFlexVit:
    """A fastvit ``NaFlexVit`` with a timm ``NaFlexVit``'s configuration and weights (``strict`` load)."""
    from fastvit.convert import _timm_data_cfg, load_weights

    ours = NaFlexVit(**{**timm_naflex_config(model), **overrides})
    load_weights(ours, model.state_dict())
    ours.pretrained_cfg = {**ours.pretrained_cfg, **_timm_data_cfg(model)}
    return ours


__all__ = ["NaFlexVit", "NaFlexVitCfg", "NaFlexEmbeds", "NAFLEX_PRESETS", "create_naflexvit", "from_timm_naflex"]
