"""``python -m fastvit eval`` and ``python -m fastvit predict``: a trained model on a dataset or on image files."""

from __future__ import annotations

import argparse
import os
import time

import torch

from fastvit import convert
from fastvit.data import IMAGENET_MEAN, IMAGENET_STD, build_data
from fastvit.model import VisionTransformer


def load_model(path: str, backend: str | None = None, num_heads: int | None = None):
    """A model and its metadata from a fastvit checkpoint (dir or .safetensors) or a timm/torchvision/HF file.

    Returns:
        (model in eval mode, metadata dict with 'classes', 'mean', 'std' where known).
    """
    state, metadata = convert.load_any_weights(path)
    config = metadata.get("config")
    if isinstance(config, dict):
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    else:
        config = convert.infer_config(state, num_heads=num_heads)
    config = {**config, "weight_init": "skip", "backend": backend}
    try:
        model = VisionTransformer(**config)
    except TypeError as exc:  # a config key this fastvit does not know (metadata written by another version)
        raise ValueError(f"{path}: the model config in its metadata is not valid here ({exc})") from exc
    model = convert.load_weights(model, state).eval()
    in_chans = model.in_chans
    metadata.setdefault("classes", [str(i) for i in range(model.num_classes)])
    metadata.setdefault("mean", list(IMAGENET_MEAN[:in_chans]) if in_chans == 3 else [0.5] * in_chans)
    metadata.setdefault("std", list(IMAGENET_STD[:in_chans]) if in_chans == 3 else [0.5] * in_chans)
    return model, metadata


def _load_or_exit(parser: argparse.ArgumentParser, path: str, backend: str | None = None, num_heads: int | None = None):
    """``load_model``, with a bad checkpoint reported as one line and exit code 2 (as bad arguments are)."""
    try:
        return load_model(path, backend, num_heads)
    except (ValueError, TypeError, KeyError, FileNotFoundError) as exc:
        if os.environ.get("FASTVIT_DEBUG") == "1":
            raise
        parser.exit(2, f"{parser.prog}: error: --init {path!r}: {exc}\n")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--init", required=True, help="checkpoint: fastvit dir/.safetensors, or timm/torchvision/HF file"
    )
    parser.add_argument("--data", default="digits", help="'digits', 'synthetic' or an ImageFolder directory")
    parser.add_argument("--classes", default=None, help="digits subset the model was trained on, e.g. '5-9'")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--amp", default="none", choices=["bf16", "fp16", "none"])
    parser.add_argument(
        "--num-heads", type=int, default=None, help="for checkpoints whose width is not a standard ViT's"
    )
    parser.add_argument("--seed", type=int, default=0, help="digits: the seed of the train/test split")


def eval_main(argv: list[str] | None = None) -> int:
    from fastvit.train import evaluate

    parser = argparse.ArgumentParser(prog="python -m fastvit eval", description="top-1/top-5 and throughput")
    add_eval_arguments(parser)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not os.path.exists(args.init):
        parser.error(f"--init {args.init!r} does not exist")
    if args.data not in ("digits", "synthetic") and not os.path.isdir(args.data):
        parser.error(f"--data {args.data!r} is not 'digits', 'synthetic' or an existing directory")
    model, _ = _load_or_exit(parser, args.init, args.backend, args.num_heads)
    device = torch.device(args.device)
    model.to(device)
    data = build_data(args.data, model.patch_embed.img_size[0], args.classes, seed=args.seed, shift=0)
    if data.num_classes != model.num_classes or data.in_chans != model.in_chans:
        parser.error(
            f"the model has {model.num_classes} classes and {model.in_chans} channels, {data.name} has "
            f"{data.num_classes} and {data.in_chans}"
        )
    loader = torch.utils.data.DataLoader(data.test, batch_size=args.batch_size)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    evaluate(model, [next(iter(loader))], device, amp)  # warm-up: allocations, autotuning
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss, top1, top5 = evaluate(model, loader, device, amp)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(
        f"{args.init} on {data.name} test ({len(data.test)} images): top-1 {100 * top1:.2f}%, top-5 {100 * top5:.2f}%, "
        f"loss {loss:.4f}; {len(data.test) / seconds:.0f} img/s on {device.type} (batch {args.batch_size}, "
        f"including data loading)"
    )
    return 0


def load_images(paths: list[str], img_size: int, in_chans: int, mean: list[float], std: list[float]) -> torch.Tensor:
    """Image files -> a normalised [B, in_chans, img_size, img_size] batch (resize to a square, pixels / 255)."""
    from PIL import Image

    batch = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("L" if in_chans == 1 else "RGB").resize((img_size, img_size), Image.BILINEAR)
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        pixels = pixels.view(img_size, img_size, in_chans).permute(2, 0, 1).float() / 255.0
        batch.append((pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    return torch.stack(batch)


def predict_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvit predict", description="top classes of image files")
    parser.add_argument("images", nargs="+")
    parser.add_argument(
        "--init", required=True, help="checkpoint: fastvit dir/.safetensors, or timm/torchvision/HF file"
    )
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--num-heads", type=int, default=None)
    args = parser.parse_args(argv)
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        parser.error(f"image not found: {', '.join(missing)}")
    if not os.path.exists(args.init):
        parser.error(f"--init {args.init!r} does not exist")
    model, meta = _load_or_exit(parser, args.init, num_heads=args.num_heads)
    x = load_images(args.images, model.patch_embed.img_size[0], model.in_chans, meta["mean"], meta["std"])
    with torch.no_grad():
        probs = model(x).softmax(-1)
    top = probs.topk(min(args.topk, probs.shape[-1]), dim=-1)
    for path, values, indices in zip(args.images, top.values, top.indices):
        ranked = ", ".join(f"{meta['classes'][i]} ({100 * p:.1f}%)" for p, i in zip(values.tolist(), indices.tolist()))
        print(f"{path}: {ranked}")
    return 0
