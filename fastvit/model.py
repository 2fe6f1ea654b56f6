"""fastvit's VisionTransformer: timm's ViT classifier, same arguments, same state_dict, fused ops inside.

Reference: Dosovitskiy et al., "An Image is Worth 16x16 Words" (arXiv:2010.11929); the module
layout, argument names and defaults follow ``timm.models.vision_transformer.VisionTransformer``
so that ``load_state_dict(timm_model.state_dict(), strict=True)`` works both ways.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from fastvit import dispatch
from fastvit.fusion import (
    BackendPlan,
    FusionReport,
    HalfFusion,
    block_fusion,
    embed_fusion,
    parallel_block_fusion,
    pool_fusion,
)
from fastvit.layers import (
    AttentionPoolLatent,
    Block,
    LayerNorm,
    Mlp,
    ParallelScalingBlock,
    PatchDropout,
    PatchEmbed,
    QuickGELU,
    RmsNorm,
    SwiGLU,
    SwiGLUPacked,
    resample_abs_pos_embed,
)
from fastvit.packing import AttnMask, ImagePacking, padded_tokens, segment_pool
from fastvit.validation import check_positive_int
from fastvit.verification import evidence_state

GLOBAL_POOLS = ("", "avg", "avgmax", "max", "token", "map")
WEIGHT_INITS = ("", "jax", "jax_nlhb", "moco", "reset", "skip")
OPS_USED = ["patch_embed", "layer_norm", "rms_norm", "ln_linear", "qkv_attention", "linear_residual", "ln_mlp"]


class VisionTransformer(nn.Module):
    """Vision Transformer classifier, timm-compatible, running its blocks through ``fastvit.ops``.

    Args:
        img_size: Input image size (int or (H, W)).
        patch_size: Patch size (int or (P, P)).
        in_chans: Number of image channels.
        num_classes: Classifier outputs; 0 for no head (features only).
        global_pool: '' | 'avg' | 'avgmax' | 'max' | 'token' (class token) | 'map' (attention pooling with a
            learned latent query, ``attn_pool``: SigLIP).
        embed_dim: Token width D.
        depth: Number of blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden width / D.
        qkv_bias: Bias in the qkv Linear.
        qk_norm: Normalise q and k per head with ``norm_layer`` (keys ``attn.q_norm``, ``attn.k_norm``).
        scale_mlp_norm: A ``norm_layer`` on the MLP's hidden layer (key ``mlp.norm``).
        proj_bias: Bias in the attention proj and the MLP Linears.
        init_values: LayerScale init value (LayerScale off when None/0).
        class_token: Prepend a learnable class token.
        pos_embed: 'learn' (learned absolute position embedding) or 'none'.
        no_embed_class: Position embedding covers the patch tokens only (DeiT-III, big_vision).
        reg_tokens: Number of register tokens.
        pre_norm: LayerNorm after the embedding (CLIP); also drops the patch-projection bias.
        final_norm: LayerNorm after the blocks.
        fc_norm: Norm after pooling instead of before; None = on for 'avg'/'avgmax'/'max' pooling.
        pool_include_prefix: Average/max pooling includes the prefix tokens.
        dynamic_img_size: Accept any image size divisible by the patch (position embedding resampled).
        drop_rate: Head dropout.
        pos_drop_rate: Dropout after adding the position embedding.
        patch_drop_rate: Fraction of patch tokens dropped while training.
        proj_drop_rate: Dropout after attention proj and in the MLP.
        attn_drop_rate: Attention-probability dropout.
        drop_path_rate: Stochastic depth, rising linearly to this rate over the blocks.
        weight_init: '' (timm) | 'jax' | 'jax_nlhb' | 'moco' | 'reset' | 'skip'.
        fix_init: Scale proj/fc2 weights by 1/sqrt(2·(layer+1)).
        embed_norm_layer: Norm after the patch projection (key ``patch_embed.norm``; AIMv2's RmsNorm). A plain
            LayerNorm / RmsNorm with a weight is part of the one ``ops.patch_embed`` call (the kernel's full-row
            epilogue); any other norm module runs between the Conv2d and the prefix tokens / position embedding.
        norm_layer: Norm layer: a LayerNorm or RmsNorm class or ``partial`` (eps read from it), an instance, or timm's
            name ('layernorm', 'rmsnorm'); default ``fastvit.layers.LayerNorm`` with eps 1e-6 (CLIP: 1e-5). See
            :func:`resolve_norm_layer`.
        act_layer: MLP activation: GELU (exact erf, the default, or tanh), QuickGELU or SiLU, as a class, ``partial``,
            instance or timm's name ('gelu', 'gelu_tanh', 'quick_gelu', 'silu'). See :func:`resolve_act_layer`.
        block_fn: Block class.
        mlp_layer: MLP class: ``Mlp``, ``SwiGLUPacked`` (DINOv2 giant; mlp_ratio counts both halves, as timm),
            ``SwiGLU``, ``GluMlp`` (``fastvit.layers``).
        backend: 'auto' | 'triton' | 'cuda' | 'torch'; None = the process default (FASTVIT_BACKEND).
        device, dtype: Where and in which dtype to create parameters.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        scale_mlp_norm: bool = False,
        proj_bias: bool = True,
        init_values: float | None = None,
        class_token: bool = True,
        pos_embed: str = "learn",
        no_embed_class: bool = False,
        reg_tokens: int = 0,
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: bool | None = None,
        pool_include_prefix: bool = False,
        dynamic_img_size: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        patch_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        weight_init: str = "",
        fix_init: bool = False,
        embed_norm_layer: Callable[..., nn.Module] | str | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
        act_layer: Callable[[], nn.Module] | None = None,
        block_fn: Callable[..., nn.Module] = Block,
        mlp_layer: Callable[..., nn.Module] = Mlp,
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_config(
            num_classes=num_classes,
            global_pool=global_pool,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            class_token=class_token,
            pos_embed=pos_embed,
            reg_tokens=reg_tokens,
            in_chans=in_chans,
            weight_init=weight_init,
            rates=dict(
                drop_rate=drop_rate,
                pos_drop_rate=pos_drop_rate,
                patch_drop_rate=patch_drop_rate,
                proj_drop_rate=proj_drop_rate,
                attn_drop_rate=attn_drop_rate,
                drop_path_rate=drop_path_rate,
            ),
        )
        dd = {"device": device, "dtype": dtype}
        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm
        norm_layer = resolve_norm_layer(norm_layer)
        act_layer = resolve_act_layer(act_layer)

        self._set_layout(
            num_classes, in_chans, global_pool, embed_dim, class_token, reg_tokens, no_embed_class,
            pool_include_prefix, dynamic_img_size,
        )  # fmt: skip

        self.patch_embed = PatchEmbed(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            bias=not pre_norm,
            strict_img_size=not dynamic_img_size,
            norm_layer=resolve_norm_layer(embed_norm_layer) if embed_norm_layer is not None else None,
            **dd,
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, **dd)) if class_token else None
        self.reg_token = nn.Parameter(torch.empty(1, reg_tokens, embed_dim, **dd)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = None if pos_embed in ("none", "") else nn.Parameter(torch.empty(1, embed_len, embed_dim, **dd))
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        self.patch_drop = (
            PatchDropout(patch_drop_rate, num_prefix_tokens=self.num_prefix_tokens)
            if patch_drop_rate > 0
            else nn.Identity()
        )
        self.norm_pre = norm_layer(embed_dim, **dd) if pre_norm else nn.Identity()

        drop_path_rates = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.Sequential(
            *[
                block_fn(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    proj_bias=proj_bias,
                    init_values=init_values,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=drop_path_rates[i],
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                    mlp_layer=mlp_layer,
                    qk_norm=qk_norm,
                    scale_mlp_norm=scale_mlp_norm,
                    **dd,
                )
                for i in range(depth)
            ]
        )
        self.norm = norm_layer(embed_dim, **dd) if final_norm and not use_fc_norm else nn.Identity()
        self.attn_pool = (
            AttentionPoolLatent(
                embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, norm_layer=norm_layer, act_layer=act_layer, **dd
            )
            if global_pool == "map"
            else None
        )
        self.fc_norm = norm_layer(embed_dim, **dd) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

        self._pretrained_cfg = default_pretrained_cfg(in_chans)
        self.weight_init_mode = "reset" if weight_init == "skip" else weight_init
        self.fix_init = fix_init
        if weight_init != "skip":
            self.init_weights()
        self.set_backend(backend)

    # ------------------------------------------------------------------------------------------
    # Backends

    def _set_layout(
        self, num_classes: int, in_chans: int, global_pool: str, embed_dim: int, class_token: bool, reg_tokens: int,
        no_embed_class: bool, pool_include_prefix: bool, dynamic_img_size: bool,
    ) -> None:  # fmt: skip
        """The attributes timm's models carry about classes, widths, prefix tokens and sizes (``fastvit.Eva`` too)."""
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class
        self.pool_include_prefix = pool_include_prefix
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

    def set_backend(self, backend: str | dict[str, str] | None) -> VisionTransformer:
        """Choose where this model's ops run: one backend for all, or one per op.

        Args:
            backend: 'auto' | 'triton' | 'cuda' | 'torch' | None (the process default), or a dict
                {op name: backend} over ``OPS_USED`` (ops not named use the default), e.g.
                ``{'qkv_attention': 'triton', 'ln_mlp': 'cuda'}``. An explicit fused backend must
                implement the ops it is given (checked here); 'auto' takes the fused kernel for each
                op where one exists for the input's device, else the reference.
        """
        if isinstance(backend, dict):
            unknown = sorted(set(backend) - set(OPS_USED))
            if unknown:
                raise ValueError(f"backend: unknown op(s) {unknown}; the model's ops are {OPS_USED}")
            for op, name in backend.items():
                dispatch.check_backend_supports(name, [op])
            per_op = dict(backend)
        else:
            dispatch.check_backend_supports(backend, OPS_USED)
            per_op = dict.fromkeys(OPS_USED, backend)
        self.backend = backend
        for module in self.modules():
            if module is not self and hasattr(module, "op_name"):
                module.backend = per_op.get(module.op_name)
        return self

    def backend_plan(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> BackendPlan:
        """Which backend each op resolves to for inputs on ``device`` computing in ``dtype`` (raises if one cannot
        run there).

        Args:
            device: where the inputs will be.
            dtype: the activations' dtype (default: the parameters'; pass the autocast dtype under autocast). On a
                GPU ``auto`` takes a fused kernel only where the selftest evidence covers this dtype.

        Returns:
            {op name: backend} (a dict), whose ``evidence`` attribute gives the verification state per op.
        """
        device = torch.device(device)
        if dtype is None:
            dtype = next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)
        per_op = self.backend if isinstance(self.backend, dict) else dict.fromkeys(OPS_USED, self.backend)
        backends = {op: dispatch.resolve(op, per_op.get(op), device, dtype) for op in OPS_USED}
        return BackendPlan(backends, {op: evidence_state(op, per_op.get(op), device, dtype) for op in OPS_USED})

    def fusion_report(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> FusionReport:
        """Per block, whether its attention and MLP halves run fused for inputs on ``device``, and why not; the same
        for the patch embedding (``report.embed``: one ``ops.patch_embed`` call, its norm included) and the ``map``
        pooling head (``report.pool``).

        A half is fused when its residual add happens inside its last op (``linear_residual`` /
        ``ln_mlp``) and each of its ops runs a fused kernel. Depends on the current train/eval mode
        (dropout and drop-path only act while training) and on each op's backend. Never raises. It describes calls
        without ``attn_mask``: under a mask that no attention op takes (a dense mask, a packing with attention
        dropout) that attention runs on SDPA.

        Args:
            device: where the inputs will be.
            dtype: the activations' dtype (default: the parameters'; pass the autocast dtype under autocast).

        Returns:
            a list (one entry per block) of {'attn': HalfFusion, 'mlp': HalfFusion}; ``str()`` of it is a
            readable table.
        """
        device = torch.device(device)
        report = FusionReport()
        embed = getattr(self, "patch_embed", None)  # NaFlexVit's embedding is ``embeds``: not reported
        if embed is not None:
            report.embed = embed_fusion(embed, device, dtype)
        for block in self.blocks:
            if isinstance(block, Block):
                report.append(block_fusion(block, device, block.attn.qkv.weight.dtype if dtype is None else dtype))
            elif isinstance(block, ParallelScalingBlock):
                report.append(
                    parallel_block_fusion(block, device, block.in_proj.weight.dtype if dtype is None else dtype)
                )
            else:
                why = (f"{type(block).__name__} is not a fastvit Block",)
                report.append({half: HalfFusion(False, {}, why) for half in ("attn", "mlp")})
        if self.attn_pool is not None:
            pool_dtype = self.attn_pool.kv.weight.dtype if dtype is None else dtype
            report.pool = pool_fusion(self.attn_pool, device, pool_dtype)
        return report

    # ------------------------------------------------------------------------------------------
    # Initialisation (timm's schemes)

    def init_weights(self, mode: str = "") -> None:
        mode = mode or self.weight_init_mode
        if mode not in WEIGHT_INITS or mode == "skip":
            raise ValueError(f"init mode must be one of {WEIGHT_INITS[:-1]}, got {mode!r}")
        head_bias = -math.log(self.num_classes) if "nlhb" in mode and self.num_classes > 0 else 0.0
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for name, module in self.named_modules():
            _init_module(module, name, mode, head_bias)
        if self.fix_init:
            with torch.no_grad():
                for layer_id, block in enumerate(self.blocks):
                    scale = math.sqrt(2.0 * (layer_id + 1))
                    if isinstance(block, Block):
                        out_projs = (block.attn.proj, block.mlp.fc2)
                    else:  # a ParallelScalingBlock: its one or two out projections
                        out_projs = [
                            m for m in (block.attn_out_proj, block.mlp_out_proj, block.out_proj) if m is not None
                        ]
                    for linear in out_projs:
                        linear.weight.div_(scale)

    # ------------------------------------------------------------------------------------------
    # timm API

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh ``num_classes``-way Linear (0 = no head), optionally changing pooling."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
            if global_pool == "token" and not self.has_class_token:
                raise ValueError("global_pool='token' needs the class token (model built with class_token=False)")
            if global_pool == "map" and self.attn_pool is None:
                raise ValueError("global_pool='map' cannot be added by reset_classifier; build the model with it")
            if global_pool != "map":
                self.attn_pool = None  # as timm: leaving attention pooling drops the pool
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = next(self.parameters())
        self.head = (
            nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            if num_classes > 0
            else nn.Identity()
        )
        self.head.train(self.training)

    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Change the input resolution, resampling the position embedding to the new patch grid."""
        prev_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size)
        if self.pos_embed is not None and self.patch_embed.grid_size != prev_grid:
            num_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            resampled = resample_abs_pos_embed(
                self.pos_embed.detach(), self.patch_embed.grid_size, prev_grid, num_prefix_tokens=num_prefix
            )
            self.pos_embed = nn.Parameter(resampled, requires_grad=self.pos_embed.requires_grad)

    @property
    def pretrained_cfg(self) -> dict:
        """The data config that goes with these weights, in timm's form (what ``timm.data.resolve_model_data_config``
        and :func:`fastvit.data.create_transform` read): ``input_size`` (C, H, W), ``interpolation``,
        ``crop_pct``, ``crop_mode``, ``mean``, ``std``, plus ``num_classes``, ``label_names`` (when known),
        ``architecture``, ``tag``, ``first_conv``, ``classifier``.

        ``input_size``, ``fixed_input_size`` and ``num_classes`` always describe the model as it is now
        (after ``set_input_size``/``reset_classifier``); the rest travels with the weights: converters copy it
        from the source model, checkpoints store it, loaders restore it. Assign a dict to replace it (checked).
        """
        cfg = self._pretrained_cfg
        cfg["input_size"] = (self.in_chans, *self.patch_embed.img_size)
        cfg["fixed_input_size"] = not self.dynamic_img_size
        cfg["num_classes"] = self.num_classes
        if cfg.get("label_names") is not None and len(cfg["label_names"]) != self.num_classes:
            cfg["label_names"] = None  # names of another head (reset_classifier) describe nothing here
        return cfg

    @pretrained_cfg.setter
    def pretrained_cfg(self, cfg: dict) -> None:
        self._pretrained_cfg = check_pretrained_cfg(cfg, self.in_chans)

    default_cfg = pretrained_cfg  # timm's older name for the same dict

    # ------------------------------------------------------------------------------------------
    # Forward

    def _prefix_tokens(self) -> torch.Tensor | None:
        if self.cls_token is not None and self.reg_token is not None:
            return torch.cat([self.cls_token, self.reg_token], dim=1)
        return self.cls_token if self.cls_token is not None else self.reg_token

    def _pos_embed_for(self, height: int, width: int) -> torch.Tensor | None:
        if self.pos_embed is None or not self.dynamic_img_size:
            return self.pos_embed
        grid = self.patch_embed.dynamic_feat_size((height, width))
        num_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        return resample_abs_pos_embed(self.pos_embed, grid, self.patch_embed.grid_size, num_prefix_tokens=num_prefix)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Image [B, C, H, W] -> tokens [B, T+N, D] (patches, position embedding, prefix tokens)."""
        self.patch_embed.check_input(x)
        x = self.patch_embed(x, self._pos_embed_for(x.shape[-2], x.shape[-1]), self._prefix_tokens())
        x = self.pos_drop(x)
        x = self.patch_drop(x)
        return self.norm_pre(x)

    def embed_for_blocks(self, x: torch.Tensor) -> tuple[torch.Tensor, Iterable[tuple]]:
        """Image [B, C, H, W] -> tokens [B, T+N, D] and, per block, the extra arguments it takes (none here;
        ``fastvit.Eva``: its RoPE table)."""
        return self.embed(x), itertools.repeat(())

    def _run_block(self, block: nn.Module, x: torch.Tensor, *block_args, attn_mask: AttnMask = None) -> torch.Tensor:
        kwargs = {} if attn_mask is None else {"attn_mask": attn_mask}
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, *block_args, use_reentrant=False, **kwargs)
        return block(x, *block_args, **kwargs)

    def forward_features(self, x: torch.Tensor, attn_mask: AttnMask = None) -> torch.Tensor:
        """Image [B, C, H, W] -> normalised tokens [B, T+N, D]. ``attn_mask`` (timm's keyword, given to every block):
        see ``fastvit.packing``."""
        x = self.embed(x)
        for block in self.blocks:
            x = self._run_block(block, x, attn_mask=attn_mask)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        if self.attn_pool is not None:
            return self.attn_pool(x if self.pool_include_prefix else x[:, self.num_prefix_tokens :])
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type:
            return x
        if pool_type == "token":
            return x[:, 0]
        x = x if self.pool_include_prefix else x[:, self.num_prefix_tokens :]
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))  # avgmax

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc_norm(self.pool(x))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Image batch [B, C, H, W] -> logits [B, num_classes]; a list of [C, H_b, W_b] images of different sizes is
        ``forward_packed(x)``."""
        if isinstance(x, (list, tuple)):
            return self.forward_packed(x)
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------------------------------
    # Packed mode: images of different sizes in one sequence

    def check_packed_images(self, images: object) -> list[tuple[int, int]]:
        """TypeError/ValueError (naming the image's index) unless ``images`` is a non-empty list of float
        [in_chans, H, W] tensors on one device, in one dtype, each H, W a multiple of the patch size (the model's own
        size only, unless built with ``dynamic_img_size=True``). Returns each image's patch grid (h, w)."""
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images must be a list of [C, H, W] image tensors, got {type(images).__name__}")
        if not images:
            raise ValueError("images must hold at least one [C, H, W] image, got an empty list")
        in_chans = getattr(self.patch_embed.proj, "in_channels", self.in_chans)
        patch = self.patch_embed.patch_size
        grids = []
        for i, image in enumerate(images):
            if not isinstance(image, torch.Tensor):
                raise TypeError(f"images[{i}] must be a torch.Tensor [C, H, W], got {type(image).__name__}")
            if image.ndim != 3:
                raise ValueError(f"images[{i}] must be one [C, H, W] image, got shape {tuple(image.shape)}")
            if not image.is_floating_point():
                raise TypeError(f"images[{i}] must be a floating-point image, got {image.dtype}")
            if image.shape[0] != in_chans:
                raise ValueError(
                    f"images[{i}] must have {in_chans} channels (in_chans), got shape {tuple(image.shape)}"
                )
            if image.device != images[0].device or image.dtype != images[0].dtype:
                raise ValueError(
                    f"images[{i}] is {image.dtype} on {image.device}, images[0] {images[0].dtype} on "
                    f"{images[0].device}: the images of one call share a device and a dtype"
                )
            height, width = image.shape[1:]
            if height < patch[0] or width < patch[1] or height % patch[0] or width % patch[1]:
                raise ValueError(
                    f"images[{i}] is {height}x{width} pixels: each side must be a positive multiple of the patch "
                    f"size {patch[0]}x{patch[1]}"
                )
            if not self.dynamic_img_size and (height, width) != tuple(self.patch_embed.img_size):
                raise ValueError(
                    f"images[{i}] is {height}x{width} pixels but the model takes {self.patch_embed.img_size[0]}x"
                    f"{self.patch_embed.img_size[1]} only; build it with dynamic_img_size=True for other sizes"
                )
            grids.append(self.patch_embed.dynamic_feat_size((height, width)))
        return grids

    def _check_packed_training(self) -> None:
        """Patch dropout keeps a number of tokens per batch row; on a packed sequence (one batch row) it would mix
        the images' token counts, so packed training refuses it. (Stochastic depth acts per packed image:
        ``DropPath`` under ``attn_mask=PackedSequences``.)"""
        if self.training and isinstance(getattr(self, "patch_drop", None), PatchDropout):
            raise NotImplementedError("packed mode does not support patch dropout while training (patch_drop_rate > 0)")

    def embed_packed(self, images: list[torch.Tensor], packing: ImagePacking) -> torch.Tensor:
        """Images [C, H_b, W_b] -> packed tokens [1, T, D]: each image's prefix tokens, then its patches with the
        position embedding resampled to its grid (one ``patch_embed`` call and one resampling per distinct size)."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(tuple(image.shape[1:]), []).append(i)
        prefix = self._prefix_tokens()
        per_image: list[torch.Tensor | None] = [None] * len(images)
        for (height, width), indices in by_size.items():
            tokens = self.patch_embed(
                torch.stack([images[i] for i in indices]), self._pos_embed_for(height, width), prefix
            )
            for i, image_tokens in zip(indices, tokens.unbind(0)):
                per_image[i] = image_tokens
        return self.norm_pre(self.pos_drop(torch.cat(per_image)[None]))

    def packed_block_args(self, packing: ImagePacking, device: torch.device) -> Iterable[tuple]:
        """Per block, the extra arguments it takes on a packed sequence (none here; ``fastvit.Eva``: RoPE)."""
        return itertools.repeat(())

    def forward_features_packed(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, ImagePacking]:
        """Images [C, H_b, W_b] of different sizes -> normalised packed tokens [1, T, D] and where each image's tokens
        are (``ImagePacking``; ``packing.split(tokens)`` gives each image's [N_b, D]).

        All images' tokens run through the blocks as one sequence with ``attn_mask=PackedSequences``: no token
        attends across an image boundary and no padded work is done. Each image's tokens equal those of
        ``forward_features(image[None])`` (``dynamic_img_size=True``). While training, stochastic depth drops whole
        images (as batched); patch dropout raises ``NotImplementedError`` (it acts per batch row).
        """
        grids = self.check_packed_images(images)
        self._check_packed_training()
        packing = ImagePacking.from_grids(grids, self.num_prefix_tokens, images[0].device)
        x = self.embed_packed(images, packing)
        for block, args in zip(self.blocks, self.packed_block_args(packing, x.device)):
            x = self._run_block(block, x, *args, attn_mask=packing.sequences)
        return self.norm(x), packing

    def pool_packed(self, x: torch.Tensor, packing: ImagePacking, pool_type: str | None = None) -> torch.Tensor:
        """Packed tokens [1, T, D] -> one pooled row per image [B, D], as ``pool`` on each image alone: segment
        reductions over each image's tokens; attention pooling ('map') is one call for all images, each image's
        tokens padded to the longest and its key-padding mask inside the attention (``packing.padded_tokens``)."""
        if self.attn_pool is not None:
            padded, keep = padded_tokens(x, packing, self.pool_include_prefix)
            return self.attn_pool(padded, attn_mask=keep)
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type:
            raise ValueError("pool_packed needs a pooling type; global_pool='' keeps every token (packing.split)")
        return segment_pool(x, packing, pool_type, self.pool_include_prefix)

    def forward_head_packed(
        self, x: torch.Tensor, packing: ImagePacking, pre_logits: bool = False
    ) -> torch.Tensor | list[torch.Tensor]:
        """Packed tokens [1, T, D] -> per image logits [B, num_classes] (pre-logits [B, D] with ``pre_logits``);
        without pooling (global_pool='') each image's per-token outputs, a list of [N_b, ...]."""
        if self.attn_pool is None and not self.global_pool:
            return packing.split(self.forward_head(x, pre_logits))
        x = self.head_drop(self.fc_norm(self.pool_packed(x, packing)))
        return x if pre_logits else self.head(x)

    def forward_packed(self, images: list[torch.Tensor], pre_logits: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Images of different sizes in one forward: a list of [C, H_b, W_b] tensors (H_b, W_b multiples of the patch
        size; the model built with ``dynamic_img_size=True``) -> logits [B, num_classes] (pre-logits [B, D] with
        ``pre_logits``), row b equal to ``forward(images[b][None])``. See ``forward_features_packed``."""
        x, packing = self.forward_features_packed(images)
        return self.forward_head_packed(x, packing, pre_logits)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ):
        """Features after selected blocks, as timm's ``forward_intermediates``.

        Args:
            indices: last ``n`` blocks if int, these block indices if a list, all if None.
            return_prefix_tokens: return (spatial, prefix) pairs.
            norm: apply the final norm to each intermediate.
            stop_early: skip the blocks after the last requested one.
            output_fmt: 'NCHW' (spatial maps) or 'NLC' (token sequences).
            intermediates_only: return only the intermediates.
        """
        check_output_fmt(output_fmt)
        take = _take_indices(len(self.blocks), indices)
        height, width = self.patch_embed.check_input(x).shape[-2:]
        x, block_args = self.embed_for_blocks(x)
        x, intermediates = self._blocks_taking(x, block_args, take, norm, stop_early)
        grid = self.patch_embed.dynamic_feat_size((height, width)) if output_fmt == "NCHW" else None
        spatial, prefix = split_intermediates(intermediates, self.num_prefix_tokens, grid)
        if return_prefix_tokens and self.num_prefix_tokens:
            spatial = list(zip(spatial, prefix))
        if intermediates_only:
            return spatial
        return self.norm(x), spatial

    def _blocks_taking(
        self, x: torch.Tensor, block_args, take: list[int], norm: bool, stop_early: bool, attn_mask: AttnMask = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Tokens through the blocks (up to the last of ``take`` with ``stop_early``) -> the last tokens and those
        after each block in ``take`` (final-normed with ``norm``)."""
        blocks = self.blocks[: max(take) + 1] if stop_early else self.blocks
        intermediates = []
        for i, (block, args) in enumerate(zip(blocks, block_args)):
            x = self._run_block(block, x, *args, attn_mask=attn_mask)
            if i in take:
                intermediates.append(self.norm(x) if norm else x)
        return x, intermediates


ViT = VisionTransformer

# Architectures of timm's presets of the same names (timm.models.vision_transformer), plus one of ours. The families'
# presets take timm's default image size and head (num_classes=0: a feature extractor) from its pretrained configs.
# What the presets of one family share (SigLIP so400m v1/v2, OpenAI CLIP, DINOv2).
_SIGLIP_SO400M = dict(
    embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, class_token=False, global_pool="map", num_classes=0
)
_CLIP = dict(pre_norm=True, norm_layer=partial(LayerNorm, eps=1e-5))
_DINOV2 = dict(img_size=518, patch_size=14, init_values=1e-5, num_classes=0)
PRESETS: dict[str, dict] = {
    "vit_tiny_patch16_224": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch32_224": dict(patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # The modern families (timm's names and architectures; img_size as timm's pretrained configs).
    "vit_base_patch16_siglip_224": dict(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, class_token=False, global_pool="map", num_classes=0
    ),
    "vit_so400m_patch14_siglip_384": dict(_SIGLIP_SO400M, img_size=384, patch_size=14),
    "vit_so400m_patch16_siglip_256": dict(_SIGLIP_SO400M, img_size=256, patch_size=16, act_layer="gelu_tanh"),  # v2
    "vit_large_patch14_clip_336": dict(_CLIP, img_size=336, patch_size=14, embed_dim=1024, depth=24, num_heads=16),
    "vit_base_patch32_clip_quickgelu_224": dict(
        _CLIP, patch_size=32, embed_dim=768, depth=12, num_heads=12, act_layer="quick_gelu", num_classes=512
    ),
    "vit_base_patch14_dinov2": dict(_DINOV2, embed_dim=768, depth=12, num_heads=12),
    "vit_giant_patch14_dinov2": dict(
        _DINOV2, embed_dim=1536, depth=40, num_heads=24, mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer="silu"
    ),
    "aimv2_large_patch14_224": dict(
        patch_size=14, embed_dim=1024, depth=24, num_heads=8, class_token=False, fc_norm=False, mlp_ratio=2.75,
        global_pool="avg", qkv_bias=False, proj_bias=False, act_layer="silu", norm_layer=partial(RmsNorm, eps=1e-5),
        embed_norm_layer=partial(RmsNorm, eps=1e-5), mlp_layer=SwiGLU, num_classes=0,
    ),
    # fastvit's own: sized for the bundled 8x8 digits upsampled to 32x32 (the demo and train defaults).
    "vit_digits_patch4_32": dict(
        img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0
    ),
}  # fmt: skip
# Data config of a fresh preset (before weights bring their own): timm's for its ViTs (bicubic, crop 0.9,
# mean/std 0.5: timm.models.vision_transformer's default cfg); the digits model sees its 8x8 images
# upsampled bilinearly and never cropped.
_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
_OPENAI_CLIP = dict(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
PRESET_DATA_CFGS: dict[str, dict] = {
    "vit_digits_patch4_32": dict(interpolation="bilinear", crop_pct=1.0, crop_mode="squash"),
    # the families' (timm's default pretrained cfgs of these names)
    "vit_large_patch14_clip_336": dict(crop_pct=1.0, crop_mode="squash"),
    "vit_base_patch32_clip_quickgelu_224": dict(_OPENAI_CLIP),
    "vit_base_patch14_dinov2": dict(_IMAGENET, crop_pct=1.0),
    "vit_giant_patch14_dinov2": dict(_IMAGENET, crop_pct=1.0),
    "aimv2_large_patch14_224": dict(_OPENAI_CLIP, crop_pct=1.0),
    "eva02_base_patch14_448": dict(_OPENAI_CLIP, crop_pct=1.0, crop_mode="squash"),
    "vit_base_patch16_dinov3": dict(_IMAGENET, crop_pct=1.0),
    "vit_base_patch16_rope_224": dict(_IMAGENET),
}
DATA_CFG_KEYS = ("interpolation", "crop_pct", "crop_mode", "mean", "std", "label_names")  # what travels with weights
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")


def default_pretrained_cfg(in_chans: int = 3) -> dict:
    """The ``pretrained_cfg`` of a model without weights of its own: timm's ViT defaults."""
    return dict(
        architecture=None,
        tag=None,
        interpolation="bicubic",
        crop_pct=0.9,
        crop_mode="center",
        mean=(0.5,) * in_chans,
        std=(0.5,) * in_chans,
        label_names=None,
        first_conv="patch_embed.proj",
        classifier="head",
    )


def check_pretrained_cfg(cfg, in_chans: int) -> dict:
    """A checked copy of a data config for an ``in_chans``-channel model (``ValueError`` naming the bad key).

    ``mean``/``std`` of one value apply to every channel; a 3-channel mean/std on a 1-channel model (RGB weights
    adapted to grey images, as timm's ``adapt_input_conv``) is averaged over the channels.
    """
    from collections.abc import Mapping, Sequence

    if not isinstance(cfg, Mapping):
        raise TypeError(f"pretrained_cfg must be a dict, got {type(cfg).__name__}")
    out = {**default_pretrained_cfg(in_chans), **cfg}
    for key in ("mean", "std"):
        values = out[key]
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            values = (values,)
        if not isinstance(values, Sequence) or isinstance(values, str) or not values:
            raise ValueError(f"pretrained_cfg[{key!r}] must be a sequence of numbers, got {values!r}")
        values = tuple(float(v) for v in values)
        if len(values) == 1:
            values = values * in_chans
        elif len(values) == 3 and in_chans == 1:
            values = (sum(values) / 3,)
        if len(values) != in_chans or not all(math.isfinite(v) for v in values):
            raise ValueError(f"pretrained_cfg[{key!r}] must hold {in_chans} finite numbers, got {out[key]!r}")
        if key == "std" and not all(v > 0 for v in values):
            raise ValueError(f"pretrained_cfg['std'] must be positive, got {out[key]!r}")
        out[key] = values
    crop_pct = out["crop_pct"]
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
        raise ValueError(f"pretrained_cfg['crop_pct'] must be in (0, 1], got {crop_pct!r}")
    if out["interpolation"] not in INTERPOLATIONS:
        raise ValueError(
            f"pretrained_cfg['interpolation'] must be one of {INTERPOLATIONS}, got {out['interpolation']!r}"
        )
    if out["crop_mode"] not in CROP_MODES:
        raise ValueError(f"pretrained_cfg['crop_mode'] must be one of {CROP_MODES}, got {out['crop_mode']!r}")
    names = out.get("label_names")
    if names is not None:
        if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"pretrained_cfg['label_names'] must be a list of strings, got {names!r}")
        out["label_names"] = list(names)
    return out


def list_models(
    filter: str | list[str] = "", pretrained: bool = False, exclude_filters: str | list[str] = ""
) -> list[str]:
    """Names :func:`create_model` accepts, as timm's ``list_models``.

    Args:
        filter: shell-style pattern(s), e.g. ``'vit_s*'`` or ``['*patch16*', '*digits*']``.
        pretrained: list timm's pretrained tags of fastvit's architectures instead
            (``'vit_base_patch16_224.augreg_in21k'``): weights fastvit can load once timm has them
            (fastvit downloads nothing: ``fastvit.from_timm(timm.create_model(name, pretrained=True))``).
        exclude_filters: shell-style pattern(s) of names to leave out.
    """
    import fnmatch

    from fastvit.eva import EVA_PRESETS
    from fastvit.naflex import NAFLEX_PRESETS

    all_presets = {**PRESETS, **EVA_PRESETS, **NAFLEX_PRESETS}
    if pretrained:
        import timm

        names = [n for n in timm.list_pretrained() if n.partition(".")[0] in all_presets]
    else:
        names = list(all_presets)
    patterns = [filter] if isinstance(filter, str) else list(filter)
    excluded = [exclude_filters] if isinstance(exclude_filters, str) else list(exclude_filters)
    if any(p for p in patterns):
        names = [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns if p)]
    names = [n for n in names if not any(fnmatch.fnmatch(n, p) for p in excluded if p)]
    return sorted(names)


def _tag_cfg(name: str) -> dict:
    """timm's pretrained_cfg for ``architecture.tag`` (``ValueError`` when timm has no such tag)."""
    from timm.models import get_pretrained_cfg

    arch, _, tag = name.partition(".")
    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:  # timm's answer for an unknown tag or an architecture it does not have
        cfg = None
    if cfg is None:
        known = [n.partition(".")[2] for n in list_models(f"{arch}.*", pretrained=True)]
        raise ValueError(f"unknown pretrained tag {tag!r} for {arch}; timm knows: {', '.join(known) or 'none'}")
    return cfg.to_dict()


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    pretrained_cfg_overlay: dict | None = None,
    **kwargs,
) -> nn.Module:
    """Build a preset by timm's name (a pretrained tag too: ``'vit_base_patch16_224.augreg_in21k'``).

    Args:
        name: a name from :func:`list_models`, optionally with one of timm's pretrained tags: the tag's data
            config (mean/std, crop, interpolation) and class count become the model's defaults.
        pretrained: not supported (fastvit downloads no weights): pass ``checkpoint_path`` or use
            ``fastvit.from_timm(timm.create_model(name, pretrained=True))``.
        checkpoint_path: weights to load (any format :func:`fastvit.load_weights` reads, a training run's
            folder included); a fastvit checkpoint also brings its data config and class names.
        pretrained_cfg_overlay: entries that replace the model's ``pretrained_cfg`` ones (as timm's).
        kwargs: any constructor argument, e.g. ``num_classes=10`` or ``depth=2``.
    """
    from fastvit.eva import EVA_PRESETS, Eva
    from fastvit.naflex import NAFLEX_PRESETS, create_naflexvit

    arch, _, tag = name.partition(".")
    if arch not in PRESETS and arch not in EVA_PRESETS and arch not in NAFLEX_PRESETS:
        import difflib

        close = difflib.get_close_matches(arch, [*PRESETS, *EVA_PRESETS, *NAFLEX_PRESETS], n=1)
        hint = f" (closest: {close[0]!r})" if close else ""
        raise KeyError(f"unknown model {name!r}; available: {', '.join(list_models())}{hint}")
    if pretrained:
        raise ValueError(
            "pretrained=True is not supported: fastvit downloads no weights; pass checkpoint_path=, load a "
            "checkpoint with fastvit.load_weights(model, path) or convert a timm model with fastvit.from_timm(model)"
        )
    cfg = {**PRESET_DATA_CFGS.get(arch, {}), "architecture": arch, "tag": tag or None}
    defaults = {}
    if tag:
        tag_cfg = _tag_cfg(name)
        cfg.update({key: tag_cfg[key] for key in DATA_CFG_KEYS if tag_cfg.get(key) is not None})
        defaults["num_classes"] = tag_cfg.get("num_classes", 1000)
        if tag_cfg.get("input_size"):
            defaults["img_size"] = tuple(tag_cfg["input_size"][1:])
    if arch in EVA_PRESETS:  # timm's Eva class (RoPE): fastvit.eva.Eva
        model = Eva(**{**EVA_PRESETS[arch], **defaults, **kwargs})
    elif arch in NAFLEX_PRESETS:  # timm's NaFlexVit class: fastvit.naflex.NaFlexVit
        model = create_naflexvit(arch, **{**defaults, **kwargs})
    else:
        model = VisionTransformer(**{**PRESETS[arch], **defaults, **kwargs})
    model.pretrained_cfg = {**model.pretrained_cfg, **cfg, **(pretrained_cfg_overlay or {})}
    if checkpoint_path is not None:
        from fastvit.convert import load_weights  # convert builds on this module

        load_weights(model, checkpoint_path)
    return model


def _make_preset(name: str) -> Callable[..., VisionTransformer]:
    def preset(pretrained: bool = False, **kwargs) -> VisionTransformer:
        return create_model(name, pretrained=pretrained, **kwargs)

    args = ", ".join(f"{k}={v}" for k, v in PRESETS[name].items())
    preset.__name__ = preset.__qualname__ = name
    preset.__doc__ = f"{name}: VisionTransformer({args}); kwargs override any argument."
    return preset


vit_tiny_patch16_224 = _make_preset("vit_tiny_patch16_224")
vit_small_patch16_224 = _make_preset("vit_small_patch16_224")
vit_base_patch16_224 = _make_preset("vit_base_patch16_224")
vit_base_patch32_224 = _make_preset("vit_base_patch32_224")
vit_large_patch16_224 = _make_preset("vit_large_patch16_224")
vit_huge_patch14_224 = _make_preset("vit_huge_patch14_224")
vit_digits_patch4_32 = _make_preset("vit_digits_patch4_32")
vit_base_patch16_siglip_224 = _make_preset("vit_base_patch16_siglip_224")
vit_so400m_patch14_siglip_384 = _make_preset("vit_so400m_patch14_siglip_384")
vit_so400m_patch16_siglip_256 = _make_preset("vit_so400m_patch16_siglip_256")
vit_large_patch14_clip_336 = _make_preset("vit_large_patch14_clip_336")
vit_base_patch32_clip_quickgelu_224 = _make_preset("vit_base_patch32_clip_quickgelu_224")
vit_base_patch14_dinov2 = _make_preset("vit_base_patch14_dinov2")
vit_giant_patch14_dinov2 = _make_preset("vit_giant_patch14_dinov2")
aimv2_large_patch14_224 = _make_preset("aimv2_large_patch14_224")


def check_output_fmt(output_fmt: str) -> None:
    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")


def split_intermediates(
    intermediates: list[torch.Tensor], num_prefix_tokens: int, grid: tuple[int, int] | None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Tokens [B, T+N, D] after blocks -> their spatial parts ([B, N, D], or [B, D, h, w] maps for a ``grid``) and
    their prefix tokens [B, T, D]."""
    prefix = [y[:, :num_prefix_tokens] for y in intermediates]
    spatial = [y[:, num_prefix_tokens:] for y in intermediates]
    if grid is not None:
        spatial = [y.reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous() for y in spatial]
    return spatial, prefix


def _take_indices(depth: int, indices: int | list[int] | tuple[int, ...] | None) -> list[int]:
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"indices: asked for the last {indices} blocks of a {depth}-block model")
        return list(range(depth - indices, depth))
    take = [i + depth if i < 0 else i for i in indices]
    bad = [i for i in take if not 0 <= i < depth]
    if bad or not take:
        raise ValueError(f"indices must name blocks in [-{depth}, {depth}), got {list(indices)}")
    return take


def _init_module(module: nn.Module, name: str, mode: str, head_bias: float) -> None:
    """One module of timm's ViT init schemes ('' timm, 'jax*', 'moco', 'reset')."""
    if mode == "reset":
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        return
    if isinstance(module, nn.Linear):
        if mode.startswith("jax"):
            if name.startswith("head"):
                nn.init.zeros_(module.weight)
                nn.init.constant_(module.bias, head_bias)
                return
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                if "mlp" in name:
                    nn.init.normal_(module.bias, std=1e-6)
                else:
                    nn.init.zeros_(module.bias)
            return
        if mode == "moco" and "qkv" in name:
            bound = math.sqrt(6.0 / float(module.weight.shape[0] // 3 + module.weight.shape[1]))
            nn.init.uniform_(module.weight, -bound, bound)
        elif mode == "moco":
            nn.init.xavier_uniform_(module.weight)
        else:
            nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d) and mode.startswith("jax"):
        # LeCun normal, truncated at 2 sigma (std corrected for the truncation), as big_vision.
        fan_in = module.weight[0].numel()
        std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
        nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# timm's names (timm.layers.get_act_layer / get_norm_layer) of the layers fastvit builds.
_ACT_NAMES = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "silu": "silu", "swish": "silu"}
_NORM_NAMES = {"layernorm": "layernorm", "rmsnorm": "rmsnorm"}
_TIMM_ACTS = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "SiLU": "silu", "Swish": "silu"}


def _act_kind(module: nn.Module) -> str | None:
    """'gelu' / 'gelu_tanh' / 'quick_gelu' / 'silu' for torch's, timm's and fastvit's activation modules of those
    kinds (exact classes, no subclasses), None for anything else."""
    if type(module) is nn.GELU:
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if type(module) is nn.SiLU:
        return "silu"
    if type(module) is QuickGELU:
        return "quick_gelu"
    if type(module).__module__.startswith("timm."):
        return _TIMM_ACTS.get(type(module).__name__)
    return None


def _probe(layer, name: str, *args) -> nn.Module:
    """An instance of a layer given as a class or ``partial`` (or the instance itself), to read its settings."""
    if isinstance(layer, nn.Module):
        return layer
    if not callable(layer):
        raise TypeError(f"{name} must be a layer class, a partial of one, an instance or a name, got {layer!r}")
    try:
        module = layer(*args)
    except TypeError as exc:
        raise ValueError(f"{name}={layer!r} cannot be built as timm builds it ({exc})") from exc
    if not isinstance(module, nn.Module):
        raise ValueError(f"{name}={layer!r} builds a {type(module).__name__}, not an nn.Module")
    return module


def resolve_act_layer(act_layer=None) -> Callable[[], nn.Module]:
    """The one rule for the MLP activation, applied by ``VisionTransformer(act_layer=...)``, ``from_timm`` and
    ``optimize``: GELU (exact or tanh), QuickGELU (OpenAI CLIP) or SiLU (SwiGLU MLPs), given as timm takes it (a
    class, a ``partial``, a name: 'gelu', 'gelu_tanh', 'quick_gelu', 'silu') or as the instance of a model being
    converted. Anything else raises ``ValueError``.

    Returns:
        a factory of ``nn.GELU(approximate=...)``, ``fastvit.layers.QuickGELU`` or ``nn.SiLU`` (exact GELU for
        ``None``, the default).
    """
    if act_layer is None:
        return partial(nn.GELU, approximate="none")
    if isinstance(act_layer, str):
        kind, what = _ACT_NAMES.get(act_layer.lower()), repr(act_layer)
    else:
        module = _probe(act_layer, "act_layer")
        kind, what = _act_kind(module), type(module).__name__
    if kind is None:
        raise ValueError(
            f"act_layer {what} is not supported by fastvit: the MLP activation must be GELU (exact or tanh), "
            "QuickGELU or SiLU (nn.GELU, nn.GELU(approximate='tanh'), 'gelu', 'gelu_tanh', 'quick_gelu', 'silu')"
        )
    if kind in ("gelu", "gelu_tanh"):
        return partial(nn.GELU, approximate="tanh" if kind == "gelu_tanh" else "none")
    return QuickGELU if kind == "quick_gelu" else nn.SiLU


def act_layer_name(act_layer) -> str:
    """timm's name of an activation fastvit builds ('gelu', 'gelu_tanh', 'quick_gelu', 'silu')."""
    return _act_kind(resolve_act_layer(act_layer)())


def resolve_norm_layer(norm_layer=None) -> Callable[..., nn.Module]:
    """The one rule for the norm layers, applied by ``VisionTransformer(norm_layer=...)``, ``from_timm`` and
    ``optimize``: an affine LayerNorm (with bias) or an affine RmsNorm over the last dimension, given as a class or
    ``partial`` (its eps is read from an instance), timm's name ('layernorm', 'rmsnorm': eps 1e-6, as timm's), or an
    instance.

    Returns:
        a factory of ``fastvit.layers.LayerNorm(dim, eps=...)`` or ``fastvit.layers.RmsNorm(dim, eps=...)`` (a
        LayerNorm with eps 1e-6 for ``None``, the default).
    """
    if norm_layer is None:
        return partial(LayerNorm, eps=1e-6)
    if isinstance(norm_layer, str):
        kind = _NORM_NAMES.get(norm_layer.lower().replace("_", ""))
        if kind is None:
            raise ValueError(
                f"norm_layer {norm_layer!r} is not supported by fastvit (LayerNorm or RmsNorm: 'layernorm', 'rmsnorm')"
            )
        return partial(LayerNorm if kind == "layernorm" else RmsNorm, eps=1e-6)
    module = _probe(norm_layer, "norm_layer", 8)
    shape = tuple(getattr(module, "normalized_shape", ()))
    if type(module).__name__ == "RmsNorm" and getattr(module, "weight", None) is not None and len(shape) == 1:
        return partial(RmsNorm, eps=module.eps)
    if isinstance(module, nn.LayerNorm) and len(shape) == 1 and module.weight is not None and module.bias is not None:
        return partial(LayerNorm, eps=module.eps)
    raise ValueError(
        f"norm_layer {type(module).__name__} is not supported by fastvit (an affine LayerNorm with bias, or an "
        "affine RmsNorm)"
    )


def norm_layer_spec(norm_layer) -> tuple[str, float]:
    """('layernorm' | 'rmsnorm', eps) of a norm layer fastvit builds."""
    factory = resolve_norm_layer(norm_layer)
    return ("rmsnorm" if factory.func is RmsNorm else "layernorm"), factory.keywords["eps"]


def _check_config(
    *,
    num_classes,
    global_pool,
    embed_dim,
    depth,
    num_heads,
    mlp_ratio,
    class_token,
    pos_embed,
    reg_tokens,
    in_chans,
    weight_init,
    rates,
) -> None:
    for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("in_chans", in_chans)):
        check_positive_int(name, value)
    for name, value in (("depth", depth), ("num_classes", num_classes), ("reg_tokens", reg_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if embed_dim % num_heads != 0:
        raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not 0 < mlp_ratio < float("inf"):
        raise ValueError(f"mlp_ratio must be a positive finite number, got {mlp_ratio!r}")  # NaN fails too
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(
            f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r} (patch-representation refinement 'prr' "
            "is not supported by fastvit)"
        )
    if global_pool == "token" and not class_token:
        raise ValueError("global_pool='token' needs the class token; use class_token=True or global_pool='avg'")
    if pos_embed not in ("learn", "none", ""):
        raise ValueError(f"pos_embed must be 'learn' or 'none', got {pos_embed!r}")
    if weight_init not in WEIGHT_INITS:
        raise ValueError(f"weight_init must be one of {WEIGHT_INITS}, got {weight_init!r}")
    for name, value in rates.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")


__all__ = [
    "VisionTransformer",
    "ViT",
    "PRESETS",
    "create_model",
    "list_models",
    "resolve_act_layer",
    "resolve_norm_layer",
    *PRESETS,
]
