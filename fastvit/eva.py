"""fastvit's ``Eva``: timm's ``Eva`` class (EVA02, DINOv3, Perception Encoder, the RoPE ViTs), same arguments, same
state_dict, with 2D rotary position embeddings.

Reference: Fang et al., "EVA-02: A Visual Representation for Neon Genesis" (arXiv:2303.11331); Siméoni et al.,
"DINOv3" (arXiv:2508.10104); Heo et al., "Rotary Position Embedding for Vision Transformer" (arXiv:2403.13298). The
module layout, argument names, defaults and the RoPE tables follow ``timm.models.eva.Eva`` and
``timm.layers.pos_embed_sincos`` (``RotaryEmbeddingCat``, ``RotaryEmbeddingDinoV3``) so that
``load_state_dict(timm_model.state_dict(), strict=True)`` works both ways and the outputs match.

The 'cat' and 'dinov3' RoPE tables hold no parameters (timm's buffers are non-persistent): they are a function of the
patch grid, built in float32 (a few hundred sin/cos values; cached per grid size). RoPE-Mixed (``rope_type='mixed'``,
the ``vit_*_rope_mixed_*`` models) learns its frequencies (``rope.freqs``) and rebuilds its per-block tables each
forward: one table per head, the attention kernel's prologue (which also gives the tables their gradient).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.nn as nn

from fastvit.layers import (
    AttentionPoolLatent,
    EvaBlock,
    LayerNorm,
    PatchEmbed,
    to_2tuple,
)
from fastvit.model import (
    GLOBAL_POOLS,
    VisionTransformer,
    _check_config,
    _init_module,
    default_pretrained_cfg,
    resolve_norm_layer,
)
from fastvit.packing import AttnMask, ImagePacking, packed_rope_table

ROPE_TYPES = ("cat", "dinov3", "mixed")


def _axes(sizes, grid_indexing: str) -> list:
    """A grid's (H, W) in the order its coordinate channels take: 'xy' swaps them (timm's ``_build_grid``)."""
    return list(sizes)[::-1] if grid_indexing == "xy" else list(sizes)


def _grid_points(coords: list[torch.Tensor], grid_indexing: str) -> torch.Tensor:
    """[H·W, 2] points of the grid spanned by two per-axis coordinate vectors (tokens in row-major patch order)."""
    return torch.stack(torch.meshgrid(coords, indexing=grid_indexing), dim=-1).reshape(-1, 2)


def rope_table(
    grid: tuple[int, int],
    head_dim: int,
    rope_type: str = "cat",
    temperature: float = 10000.0,
    grid_offset: float = 0.0,
    grid_indexing: str = "ij",
    ref_feat_shape: tuple[int, int] | None = None,
    rotate_half: bool = False,
) -> torch.Tensor:
    """The 2D RoPE table of a patch grid: cat(sin, cos) of each token's angles, [H·W, 2·head_dim], float32.

    Each head's D channels are D/2 rotation pairs: D/4 frequencies for the row coordinate and D/4 for the column
    (``grid_indexing='xy'`` swaps them). The pairs are laid out interleaved (f0, f0, f1, f1, ...) or, with
    ``rotate_half``, as two halves (f0, f1, ..., f0, f1, ...), matching ``fastvit.reference.apply_rope``.

    ``rope_type='cat'`` (EVA02, PE, RoPE ViTs; timm's ``RotaryEmbeddingCat`` with ``in_pixels=False``): coordinates
    are patch indices (+ ``grid_offset``), rescaled to ``ref_feat_shape`` (the pretraining grid) when given;
    frequencies ``temperature ** (-i / (D/4))``. ``rope_type='dinov3'`` (timm's ``RotaryEmbeddingDinoV3``): patch
    centres normalised to [-1, 1] per axis, angles ``2π · coord / period`` with periods
    ``temperature ** (2i / (D/2))``.
    """
    num_bands = head_dim // 4
    shape = _axes(grid, grid_indexing)
    ref = _axes(ref_feat_shape, grid_indexing) if ref_feat_shape is not None else None
    if rope_type == "cat":
        coords = [torch.arange(size, dtype=torch.int64).to(torch.float32) + grid_offset for size in shape]
        if ref is not None:
            coords = [c / size * r for c, size, r in zip(coords, shape, ref)]
        exponent = torch.arange(0, num_bands, 1, dtype=torch.int64).to(torch.float32) / num_bands
        angles = _grid_points(coords, grid_indexing).unsqueeze(-1) * (1.0 / (temperature**exponent))
    elif rope_type == "dinov3":
        coords = [(torch.arange(0.5, size, dtype=torch.float32) + grid_offset) / float(size) for size in shape]
        periods = temperature ** (2.0 * torch.arange(num_bands, dtype=torch.float32) / (head_dim // 2))
        angles = 2 * math.pi * (2.0 * _grid_points(coords, grid_indexing) - 1.0).unsqueeze(-1) / periods
    else:
        raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    angles = angles.flatten(-2)  # [H·W, D/2]
    sin, cos = angles.sin(), angles.cos()
    if rotate_half:
        sin, cos = torch.cat([sin, sin], dim=-1), torch.cat([cos, cos], dim=-1)
    else:
        sin, cos = sin.repeat_interleave(2, -1), cos.repeat_interleave(2, -1)
    return torch.cat([sin, cos], dim=-1)


def init_mixed_rope_freqs(head_dim: int, depth: int, num_heads: int, temperature: float = 10.0) -> torch.Tensor:
    """RoPE-Mixed's initial frequencies [2, depth, heads, D/2] (row and column axes): the D/4 magnitudes
    ``temperature ** (-4i / D)`` turned by one random angle per block and head, and by that angle + 90°."""
    magnitude = 1.0 / temperature ** (torch.arange(0, head_dim, 4, dtype=torch.float32) / head_dim)
    angle = torch.rand(depth, num_heads, 1) * 2 * math.pi
    turned = torch.cat([angle, angle + math.pi / 2], dim=-1).repeat_interleave(head_dim // 4, dim=-1)
    magnitude = magnitude.repeat(2)
    return torch.stack([magnitude * turned.cos(), magnitude * turned.sin()])


def mixed_rope_tables(freqs: torch.Tensor, grid: tuple[int, int], grid_indexing: str = "xy") -> torch.Tensor:
    """RoPE-Mixed tables (timm's ``RotaryEmbeddingMixed``): cat(sin, cos) [depth, heads, H·W, 2·D] of the angles
    ``x · fx + y · fy`` per block and head, from the learned ``freqs`` [2, depth, heads, D/2]; float32, with grads.
    The pairs are interleaved whatever ``rope_rotate_half`` says (as timm's tables)."""
    axes = [torch.arange(size, dtype=torch.int64).to(torch.float32) for size in _axes(grid, grid_indexing)]
    coords = _grid_points(axes, grid_indexing).to(freqs.device)
    freqs = freqs.float()
    angles = coords[:, 0, None] * freqs[0].unsqueeze(-2) + coords[:, 1, None] * freqs[1].unsqueeze(-2)
    return torch.cat([angles.sin().repeat_interleave(2, -1), angles.cos().repeat_interleave(2, -1)], dim=-1)


class RotaryEmbedding2d(nn.Module):
    """The model's 2D RoPE (timm's ``Eva.rope``): ``rope(grid, device)`` gives the table(s) of a patch grid, or None
    without RoPE. 'cat' / 'dinov3': one [H·W, 2·D] table, no parameters (cached per grid). 'mixed' (RoPE-Mixed): the
    learned ``freqs`` [2, depth, heads, D/2] (timm's key ``rope.freqs``) give one table per block and head,
    [depth, heads, H·W, 2·D], rebuilt each call (they carry the gradient of the frequencies)."""

    def __init__(self, config: dict | None, head_dim: int, depth: int, num_heads: int, device=None) -> None:
        super().__init__()
        self.config, self.head_dim = config, head_dim
        self.mixed = config is not None and config["rope_type"] == "mixed"
        if self.mixed:
            freqs = init_mixed_rope_freqs(head_dim, depth, num_heads, config["temperature"])
            self.freqs = nn.Parameter(freqs.to(device))
        self._cache: dict[tuple, torch.Tensor] = {}

    def forward(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        if self.config is None:
            return None
        if self.mixed:
            return mixed_rope_tables(self.freqs, tuple(grid), self.config["grid_indexing"])
        if torch.compiler.is_compiling():  # traced into the graph (constant-folded): no cache mutation
            return rope_table(tuple(grid), self.head_dim, **self.config).to(device)
        key = (tuple(grid), device)
        if key not in self._cache:
            self._cache[key] = rope_table(tuple(grid), self.head_dim, **self.config).to(device)
        return self._cache[key]


class Eva(nn.Module):
    """timm's ``Eva`` vision transformer (abs. and/or 2D rotary position embedding), running through ``fastvit.ops``.

    Arguments are timm's (``timm.models.eva.Eva``) for what fastvit implements; others are refused with a
    ``ValueError`` naming them (MRoPE, ``attn_type='rope'`` grouped-query attention, post-norm blocks,
    gated attention, patch dropout, RoPE coordinate augmentation).

    Args:
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio: as ``VisionTransformer``.
        global_pool: '' | 'avg' | 'avgmax' | 'max' | 'token' | 'map' (default 'avg', as timm's Eva).
        qkv_bias: q and v biases (k has none). qkv_fused: one ``qkv`` Linear (else ``q_proj``/``k_proj``/``v_proj``).
        qk_norm: norm q and k per head. attn_type: 'eva' (q/v biases, none on k) | 'rope' (plain Linear biases: the
            RoPE ViTs and PE). swiglu_mlp, swiglu_align_to, scale_mlp: the MLP (SwiGLU, its hidden width
            alignment, a sub-LN before fc2). scale_attn_inner: a norm before the attention's proj.
        init_values: LayerScale (``gamma_1``/``gamma_2``) init; None = off.
        class_token, num_reg_tokens, no_embed_class, use_abs_pos_emb: prefix tokens and learned position embedding.
        use_rot_pos_emb, rope_type ('cat' | 'dinov3' | 'mixed'), rope_grid_offset, rope_grid_indexing ('ij' | 'xy'),
            rope_temperature, rope_rotate_half, ref_feat_shape: 2D RoPE (see :func:`rope_table`).
        use_pre_transformer_norm: norm after the embedding (and no patch-projection bias).
        use_post_transformer_norm, use_fc_norm: final norm before / after pooling (None: timm's defaults).
        attn_pool_num_heads, attn_pool_mlp_ratio: the 'map' head (default: the model's).
        dynamic_img_size: accept any image size divisible by the patch (abs. embedding resampled, RoPE rebuilt).
        head_init_scale: scale of the head's init.
        norm_layer: norm class or name (default ``LayerNorm`` eps 1e-6).
        backend: 'auto' | 'triton' | 'cuda' | 'torch' or {op: backend}, as ``VisionTransformer.set_backend``.
    """

    def __init__(
        self,
        # image and width
        img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16, in_chans: int = 3,
        num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
        # attention and MLP
        qkv_bias: bool = True, qkv_fused: bool = True, qk_norm: bool = False, mlp_ratio: float = 4.0,
        swiglu_mlp: bool = False, swiglu_align_to: int = 0, scale_mlp: bool = False, scale_attn_inner: bool = False,
        attn_type: str = "eva",
        # regularisation
        drop_rate: float = 0.0, pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[..., nn.Module] | str | None = None, init_values: float | None = None,
        # tokens and position
        class_token: bool = True, num_reg_tokens: int = 0, no_embed_class: bool = False, use_abs_pos_emb: bool = True,
        use_rot_pos_emb: bool = False, rope_type: str = "cat", rope_grid_offset: float = 0.0,
        rope_grid_indexing: str = "ij", rope_temperature: float = 10000.0, rope_rotate_half: bool = False,
        # norms and head
        use_pre_transformer_norm: bool = False, use_post_transformer_norm: bool | None = None,
        use_fc_norm: bool | None = None, attn_pool_num_heads: int | None = None,
        attn_pool_mlp_ratio: float | None = None, dynamic_img_size: bool = False,
        ref_feat_shape: int | tuple[int, int] | None = None, head_init_scale: float = 0.001,
        backend: str | dict[str, str] | None = None, device=None, dtype=None,
    ) -> None:  # fmt: skip
        super().__init__()
        _check_config(
            num_classes=num_classes, global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, class_token=class_token, pos_embed="learn", reg_tokens=num_reg_tokens,
            in_chans=in_chans, weight_init="",
            rates=dict(drop_rate=drop_rate, pos_drop_rate=pos_drop_rate, proj_drop_rate=proj_drop_rate,
                       attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate),
        )  # fmt: skip
        if use_rot_pos_emb and rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type must be one of {ROPE_TYPES} (fastvit), got {rope_type!r}")
        if rope_grid_indexing not in ("ij", "xy"):
            raise ValueError(f"rope_grid_indexing must be 'ij' or 'xy', got {rope_grid_indexing!r}")
        if use_rot_pos_emb and (embed_dim // num_heads) % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {embed_dim // num_heads}")
        dd = {"device": device, "dtype": dtype}
        norm_layer = resolve_norm_layer(norm_layer)
        fc_norm = global_pool == "avg" if use_fc_norm is None else use_fc_norm
        post_norm = not fc_norm if use_post_transformer_norm is None else use_post_transformer_norm

        VisionTransformer._set_layout(
            self, num_classes, in_chans, global_pool, embed_dim, class_token, num_reg_tokens, no_embed_class, False,
            dynamic_img_size,
        )  # fmt: skip

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            bias=not use_pre_transformer_norm, strict_img_size=not dynamic_img_size, **dd,
        )  # fmt: skip
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, num_reg_tokens, embed_dim, **dd)) if num_reg_tokens else None
        num_pos = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dim, **dd)) if use_abs_pos_emb else None
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        self.rope_config = (
            dict(
                rope_type=rope_type,
                temperature=rope_temperature,
                grid_offset=rope_grid_offset,
                grid_indexing=rope_grid_indexing,
                rotate_half=rope_rotate_half,
                ref_feat_shape=to_2tuple(ref_feat_shape, "ref_feat_shape") if ref_feat_shape is not None else None,
            )  # fmt: skip
            if use_rot_pos_emb
            else None
        )
        head_dim = embed_dim // num_heads
        self.rope = RotaryEmbedding2d(self.rope_config, head_dim, depth, num_heads, device=device)
        self.norm_pre = norm_layer(embed_dim, **dd) if use_pre_transformer_norm else nn.Identity()
        drop_path_rates = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        block_args = dict(
            dim=embed_dim, num_heads=num_heads, qkv_bias=qkv_bias, qkv_fused=qkv_fused, mlp_ratio=mlp_ratio,
            swiglu_mlp=swiglu_mlp, swiglu_align_to=swiglu_align_to, scale_mlp=scale_mlp,
            scale_attn_inner=scale_attn_inner, num_prefix_tokens=self.num_prefix_tokens, rotate_half=rope_rotate_half,
            qk_norm=qk_norm, attn_type=attn_type, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
            init_values=init_values, norm_layer=norm_layer, **dd,
        )  # fmt: skip
        self.blocks = nn.ModuleList(EvaBlock(drop_path=rate, **block_args) for rate in drop_path_rates)
        self.norm = norm_layer(embed_dim, **dd) if post_norm else nn.Identity()
        self.attn_pool = (
            AttentionPoolLatent(
                embed_dim,
                num_heads=attn_pool_num_heads or num_heads,
                mlp_ratio=attn_pool_mlp_ratio or mlp_ratio,
                norm_layer=norm_layer,
                act_layer=nn.GELU,
                **dd,
            )  # fmt: skip
            if global_pool == "map"
            else None
        )
        self.fc_norm = norm_layer(embed_dim, **dd) if fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head_init_scale = head_init_scale
        self._pretrained_cfg = default_pretrained_cfg(in_chans)
        self.init_weights()
        self.set_backend(backend)

    # What works as in VisionTransformer (same attribute names, same op modules) is VisionTransformer's code.
    set_backend = VisionTransformer.set_backend
    backend_plan = VisionTransformer.backend_plan
    _prefix_tokens = VisionTransformer._prefix_tokens
    _pos_embed_for = VisionTransformer._pos_embed_for
    no_weight_decay = VisionTransformer.no_weight_decay
    group_matcher = VisionTransformer.group_matcher
    pretrained_cfg = VisionTransformer.pretrained_cfg
    default_cfg = VisionTransformer.default_cfg
    get_classifier = VisionTransformer.get_classifier
    set_grad_checkpointing = VisionTransformer.set_grad_checkpointing
    set_input_size = VisionTransformer.set_input_size  # resamples pos_embed; the RoPE table follows the grid
    _run_block = VisionTransformer._run_block
    forward_intermediates = VisionTransformer.forward_intermediates
    _blocks_taking = VisionTransformer._blocks_taking
    check_packed_images = VisionTransformer.check_packed_images
    _check_packed_training = VisionTransformer._check_packed_training
    embed_packed = VisionTransformer.embed_packed
    forward_features_packed = VisionTransformer.forward_features_packed
    pool_packed = VisionTransformer.pool_packed
    forward_head_packed = VisionTransformer.forward_head_packed
    forward_packed = VisionTransformer.forward_packed

    def init_weights(self) -> None:
        """timm's Eva init: trunc-normal(0.02) Linears and embeddings, zero biases, the head scaled down."""
        for param in (self.pos_embed, self.cls_token, self.reg_token):
            if param is not None:
                nn.init.trunc_normal_(param, std=0.02)
        for name, module in self.named_modules():
            _init_module(module, name, "", 0.0)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(self.head_init_scale)
                self.head.bias.mul_(self.head_init_scale)
        if self.attn_pool is not None:
            self.attn_pool.reset_parameters()

    def fusion_report(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        """Per block: the MLP half fused (``ops.ln_mlp``) or why not; the attention is one ``ops.qkv_attention`` with
        qk-norm and RoPE as its prologue where the structure allows (proj and the residual add after it). See
        ``VisionTransformer.fusion_report``."""
        from fastvit.fusion import FusionReport, embed_fusion, eva_block_fusion, pool_fusion

        device = torch.device(device)
        report = FusionReport()
        report.embed = embed_fusion(self.patch_embed, device, dtype)
        rope = self.rope_config is not None
        for block in self.blocks:
            block_dtype = block.norm1.weight.dtype if dtype is None else dtype
            report.append(eva_block_fusion(block, device, block_dtype, rope=rope))
        if self.attn_pool is not None:
            report.pool = pool_fusion(
                self.attn_pool, device, self.attn_pool.kv.weight.dtype if dtype is None else dtype
            )
        return report

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh ``num_classes``-way Linear (0 = no head), optionally changing pooling."""
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS or (global_pool == "map" and self.attn_pool is None):
                raise ValueError(f"global_pool must be one of {GLOBAL_POOLS} ('map' only if built with it)")
            if global_pool != "map":
                self.attn_pool = None
            self.global_pool = global_pool
        VisionTransformer.reset_classifier(self, num_classes)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image [B, C, H, W] -> tokens [B, T+N, D] and the RoPE table(s) of its grid (see ``RotaryEmbedding2d``)."""
        self.patch_embed.check_input(x)
        height, width = x.shape[-2:]
        tokens = self.patch_embed(x, self._pos_embed_for(height, width), self._prefix_tokens())
        grid = self.patch_embed.dynamic_feat_size((height, width))
        rope = self.rope(grid, x.device)
        return self.norm_pre(self.pos_drop(tokens)), rope  # rope stays float32, as timm's

    def embed_for_blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, Iterable[tuple]]:
        """Tokens and each block's RoPE table (RoPE-Mixed: the block's own, [heads, H·W, 2·D])."""
        tokens, rope = self.embed(x)
        if self.rope.mixed:
            return tokens, [(table,) for table in rope.unbind(0)]
        return tokens, itertools.repeat((rope,))

    def forward_features(self, x: torch.Tensor, attn_mask: AttnMask = None) -> torch.Tensor:
        """Image [B, C, H, W] -> normalised tokens [B, T+N, D]; ``attn_mask``: see ``fastvit.packing``."""
        x, block_args = self.embed_for_blocks(x)
        for block, args in zip(self.blocks, block_args):
            x = self._run_block(block, x, *args, attn_mask=attn_mask)
        return self.norm(x)

    def packed_block_args(self, packing: ImagePacking, device: torch.device) -> Iterable[tuple]:
        """Per block, the packed sequence's RoPE table: each image's grid table, identity rows at later images'
        prefix tokens (``fastvit.packing.packed_rope_table``). The blocks take it as ``ops.varlen_qkv_attention``'s
        RoPE prologue (no [T, T] mask), RoPE-Mixed's per-block, per-head tables ([heads, T - prefix, 2·D]) too."""
        if self.rope_config is None:
            return itertools.repeat(())
        tables = {grid: self.rope(grid, device) for grid in set(packing.grids)}  # one table per distinct grid
        rope = packed_rope_table([tables[grid] for grid in packing.grids], self.num_prefix_tokens)
        if self.rope.mixed:
            return [(table,) for table in rope.unbind(0)]
        return itertools.repeat((rope,))

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        if self.attn_pool is not None:
            return self.attn_pool(x)
        return VisionTransformer.pool(self, x, pool_type)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        # Eva's own code object, not VisionTransformer.forward's: torch.compile counts recompilations per code object,
        # and one shared by every model class in a process reaches its recompile limit sooner.
        if isinstance(x, (list, tuple)):
            return self.forward_packed(x)
        return self.forward_head(self.forward_features(x))


# The headline models of the families on timm's Eva class (architectures of timm's presets of the same names).
EVA_PRESETS: dict[str, dict] = {
    "eva02_base_patch14_448": dict(
        img_size=448, patch_size=14, embed_dim=768, depth=12, num_heads=12, qkv_fused=False, mlp_ratio=4 * 2 / 3,
        swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16), num_classes=1000,
    ),
    "vit_base_patch16_dinov3": dict(
        img_size=256, patch_size=16, dynamic_img_size=True, embed_dim=768, depth=12, num_heads=12, qkv_bias=False,
        init_values=1e-5,
        rope_type="dinov3", rope_temperature=100, rope_rotate_half=True, use_rot_pos_emb=True, use_abs_pos_emb=False,
        num_reg_tokens=4, use_fc_norm=False, norm_layer=partial(LayerNorm, eps=1e-5), num_classes=0,
    ),
    "vit_base_patch16_rope_224": dict(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, use_fc_norm=False, qkv_bias=True,
        init_values=1e-5, class_token=True, global_pool="token", use_abs_pos_emb=False, use_rot_pos_emb=True,
        rope_grid_indexing="xy", rope_temperature=100.0, attn_type="rope", num_classes=1000,
    ),
}  # fmt: skip
