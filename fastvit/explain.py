"""``python -m fastvit explain``: attention rollout over an image, as a PNG.

Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", 2020): average each
block's attention over heads, add the identity for the residual path, renormalise the rows, and
multiply the blocks' matrices; the class token's row over the patch tokens shows which patches the
prediction draws on. The attention weights come from ``fastvit.reference.attention_probs`` (fused
kernels never materialise them).
"""

from __future__ import annotations

import os

import torch

from fastvit import cli, reference
from fastvit.evaluate import DIGITS_INPUT, add_model_arguments, class_names, load_images, load_or_exit
from fastvit.model import VisionTransformer


@torch.no_grad()
def attention_rollout(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """Rollout of ``x`` [B, C, H, W] -> [B, grid_h, grid_w], each map summing to 1.

    The attention weights are those the model uses (after qk-norm and RoPE: ``attn.heads``). With attention pooling
    (``global_pool='map'``) the pooled query's attention over the tokens is the last step; else the class token's
    row, or without a class token the mean of the patch tokens' rows.
    """
    model.eval()
    tokens, block_args = model.embed_for_blocks(x)  # Eva: each block's RoPE table
    batch, num_tokens, _ = tokens.shape
    eye = torch.eye(num_tokens, dtype=torch.float32, device=x.device)
    rollout = eye.expand(batch, -1, -1)
    for block, extra in zip(model.blocks, block_args):
        attn = getattr(block, "attn", None)
        if attn is not None:
            q, k, _ = attn.heads(block.norm1(tokens), *extra)
        else:  # a ParallelScalingBlock: attention from the block input, beside the MLP
            attn = block
            q, k, _ = block.heads(tokens)
        weights = reference.attention_probs(q, k, attn.scale).float().mean(dim=1) + eye
        rollout = (weights / weights.sum(-1, keepdim=True)) @ rollout
        tokens = block(tokens, *extra)
    prefix = model.num_prefix_tokens
    pool = getattr(model, "attn_pool", None)
    if pool is not None:
        pooled_from = 0 if model.pool_include_prefix else prefix
        q, k, _ = pool.heads(model.norm(tokens)[:, pooled_from:])
        query = reference.attention_probs(q, k, pool.scale).float().mean(dim=1)[:, 0]  # [B, tokens pooled]
        rows = (query.unsqueeze(1) @ rollout[:, pooled_from:])[:, 0]
    else:
        rows = rollout[:, 0] if model.has_class_token else rollout[:, prefix:].mean(dim=1)
    patch_weights = rows[:, prefix:]
    patch_weights = patch_weights / patch_weights.sum(-1, keepdim=True)
    grid_h, grid_w = model.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
    return patch_weights.reshape(batch, grid_h, grid_w)


def make_parser() -> cli.Parser:
    parser = cli.Parser(
        prog="python -m fastvit explain", description="attention rollout PNG of an image", epilog=DIGITS_INPUT
    )
    parser.add_argument("image", help="an image file (PNG, JPEG, ...)")
    add_model_arguments(parser)
    parser.add_argument("--output", default=None, help="PNG path (default: <image>.rollout.png)")
    return parser


def explain_main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = cli.parse(parser, argv, {"num_heads": cli.AT_LEAST_ONE})
    if not os.path.isfile(args.image):
        parser.error(f"image not found: {args.image}")
    output = args.output or os.path.splitext(args.image)[0] + ".rollout.png"
    if os.path.isdir(output):
        parser.error(f"--output {output!r} is a directory; name a PNG file")
    model, _ = load_or_exit(parser, args.init, backend="torch", num_heads=args.num_heads)
    with cli.errors_exit(parser):
        x = load_images([args.image], model, parser.prog)
        heat = attention_rollout(model, x)[0]
        with torch.no_grad():
            logits = model(x)[0]
        if model.num_classes:
            probs = logits.softmax(-1)
            title = f"predicted {class_names(model)[int(probs.argmax())]} ({100 * probs.max().item():.1f}%)"
        else:
            title = "attention rollout (the model has no classifier head)"
        _plot(x[0], heat, title, output)
    print(f"{args.image}: {title}; attention rollout written to {output}")
    return 0


def _plot(image: torch.Tensor, heat: torch.Tensor, title: str, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the rollout PNG needs matplotlib: pip install 'fastvit[demo]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    shown = image.permute(1, 2, 0).float()
    shown = ((shown - shown.min()) / (shown.max() - shown.min() + 1e-12)).numpy()
    size = tuple(image.shape[-2:])
    overlay = F.interpolate(heat[None, None], size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    fig, axes = plt.subplots(1, 2, figsize=(8.8, 4))
    axes[0].imshow(shown.squeeze(-1), cmap="gray" if shown.shape[-1] == 1 else None)
    axes[0].set_title("input")
    axes[1].imshow(shown.squeeze(-1), cmap="gray" if shown.shape[-1] == 1 else None)
    heat_image = axes[1].imshow(overlay, cmap="jet", alpha=0.5)
    axes[1].set_title("attention rollout")
    for ax in axes:
        ax.axis("off")
    colorbar = fig.colorbar(heat_image, ax=axes[1], fraction=0.046, pad=0.04)
    colorbar.set_label("rollout weight (patch weights sum to 1)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
