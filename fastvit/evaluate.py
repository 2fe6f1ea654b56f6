"""``python -m fastvit eval`` and ``python -m fastvit predict``: a trained model on a dataset or on image files.

Both preprocess images as the model's data config says (``model.pretrained_cfg``, stored in fastvit
checkpoints; see :func:`fastvit.data.create_transform`), so ``eval`` and ``predict`` treat an image the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from fastvit import cli
from fastvit.checkpoint import with_crash_fallback
from fastvit.convert import read_run
from fastvit.data import build_data, channel_conversion, create_transform, read_image
from fastvit.dispatch import BACKENDS
from fastvit.model import VisionTransformer

INIT_HELP = (
    "the model: a train run's --output folder, its checkpoint/ or model_best.safetensors, or a timm / "
    "torchvision / Hugging Face weights file (.safetensors or .pth)"
)
DIGITS_INPUT = (
    "The digits model (vit_digits_patch4_32) expects a light digit on a dark background, as scikit-learn's digits; "
    "images are converted to the model's channels (with a warning) and resized as its data config says."
)


def load_or_exit(parser: argparse.ArgumentParser, path: str, backend: str | None = None, num_heads=None):
    """``read_run``, with a missing or bad checkpoint reported as one line and exit code 2 (as bad arguments are)."""
    if not os.path.exists(with_crash_fallback(path)):
        parser.error(f"--init {path!r} does not exist")
    with cli.errors_exit(parser, extra=(TypeError,), prefix=f"--init {path!r}: "):
        return read_run(path, backend, num_heads)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", "--initial-checkpoint", required=True, help=INIT_HELP)
    parser.add_argument(
        "--num-heads", type=int, default=None, help="attention heads, for weights files of a non-standard width"
    )


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--data",
        "--data-dir",
        default=None,
        help="'digits', 'synthetic' or an ImageFolder directory (default: the data the model was trained on)",
    )
    parser.add_argument(
        "--classes", default=None, help="digits subset, e.g. '5-9' (default: the subset the model was trained on)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the train/test split (default: the training run's, so its test set holds no training image)",
    )
    parser.add_argument("-b", "--batch-size", type=int, default=256, help="images per forward")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    parser.add_argument("--backend", default=None, choices=list(BACKENDS), help="fastvit backend")
    parser.add_argument("--amp", default="none", choices=["bf16", "fp16", "none"], help="autocast dtype")


EVAL_NUMBERS = {"batch_size": cli.Range(1, 2**20), "num_heads": cli.AT_LEAST_ONE, "seed": cli.SEED}


def _same_source(recorded: str, source: str) -> bool:
    if recorded in ("digits", "synthetic") or source in ("digits", "synthetic"):
        return recorded == source
    return os.path.abspath(recorded) == os.path.abspath(source)


def resolve_eval_data(parser: argparse.ArgumentParser, args: argparse.Namespace, metadata: dict) -> tuple:
    """(source, classes, seed) to evaluate on: the training run's unless given; the run's split is kept whenever
    the same data is named (another split would put training images into the test set)."""
    recorded = metadata.get("data") if isinstance(metadata.get("data"), dict) else None
    source = args.data if args.data is not None else (recorded or {}).get("source", "digits")
    if recorded is None or not _same_source(recorded.get("source", ""), source):
        return source, args.classes, 0 if args.seed is None else args.seed
    classes = args.classes if args.classes is not None else recorded.get("classes")
    seed = recorded.get("split_seed")
    if (args.classes is not None and args.classes != recorded.get("classes")) or (
        args.seed is not None and seed is not None and args.seed != seed
    ):
        trained_on = f"{recorded['source']}" + (f" classes {recorded['classes']}" if recorded.get("classes") else "")
        parser.error(
            f"the model was trained on {trained_on} with split seed {seed}; a different --seed or --classes makes "
            "another train/test split, whose test set holds training images: leave them out to use the run's split"
        )
    if source not in ("digits", "synthetic") and not os.path.isdir(source):
        parser.error(f"the run's data folder {source!r} does not exist any more: pass --data")
    return source, classes, 0 if seed is None else seed


def make_eval_parser() -> cli.Parser:
    parser = cli.Parser(prog="python -m fastvit eval", description="top-1 (and top-5) accuracy and throughput")
    add_eval_arguments(parser)
    return parser


def eval_main(argv: list[str] | None = None) -> int:
    from fastvit.train import evaluate

    parser = make_eval_parser()
    args = cli.parse(parser, argv, EVAL_NUMBERS)
    if args.data is not None and args.data not in ("digits", "synthetic") and not os.path.isdir(args.data):
        parser.error(f"--data {args.data!r} is not 'digits', 'synthetic' or an existing directory")
    model, metadata = load_or_exit(parser, args.init, args.backend, args.num_heads)
    source, classes, seed = resolve_eval_data(parser, args, metadata)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with cli.errors_exit(parser):
        model.to(device)
        data = build_data(
            source, tuple(model.patch_embed.img_size), classes, seed=seed, shift=0, data_config=model.pretrained_cfg
        )
    if data.num_classes != model.num_classes or data.in_chans != model.in_chans:
        parser.error(
            f"the model has {model.num_classes} classes and {model.in_chans} channels, {data.name} has "
            f"{data.num_classes} and {data.in_chans}"
        )
    loader = torch.utils.data.DataLoader(data.test, batch_size=args.batch_size)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    with cli.errors_exit(parser):
        evaluate(model, [next(iter(loader))], device, amp)  # warm-up: allocations, autotuning
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, top1, top5 = evaluate(model, loader, device, amp)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    top5_text = f", top-5 {100 * top5:.2f}%" if model.num_classes > 5 else ""
    print(
        f"{args.init} on {data.name} test ({len(data.test)} images, split seed {seed}): top-1 {100 * top1:.2f}%"
        f"{top5_text}, loss {loss:.4f}; {len(data.test) / seconds:.0f} img/s on {device.type} "
        f"(batch {args.batch_size}, including data loading)"
    )
    return 0


def load_images(paths: list[str], model: VisionTransformer, prog: str) -> torch.Tensor:
    """Image files -> the model's input batch ``[B, C, H, W]``, preprocessed as its data config says; a note on
    stderr for every image whose colour had to be converted (RGB to grey or back)."""
    transform = create_transform(model)
    batch = []
    for path in paths:
        image = read_image(path)
        note = channel_conversion(image.mode, model.in_chans)
        if note is not None:
            print(f"{prog}: warning: {path}: {note}", file=sys.stderr)
            image = image.convert("L" if model.in_chans == 1 else "RGB")
        batch.append(transform(image))
    return torch.stack(batch)


def class_names(model: VisionTransformer) -> list[str]:
    return model.pretrained_cfg.get("label_names") or [str(i) for i in range(model.num_classes)]


def make_predict_parser() -> cli.Parser:
    parser = cli.Parser(prog="python -m fastvit predict", description="top classes of image files", epilog=DIGITS_INPUT)
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    add_model_arguments(parser)
    parser.add_argument("--topk", type=int, default=3, help="classes to show per image (at most the class count)")
    return parser


def predict_main(argv: list[str] | None = None) -> int:
    parser = make_predict_parser()
    args = cli.parse(parser, argv, {"topk": cli.AT_LEAST_ONE, "num_heads": cli.AT_LEAST_ONE})
    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        parser.error(f"image not found: {', '.join(missing)}")
    model, _ = load_or_exit(parser, args.init, num_heads=args.num_heads)
    if model.num_classes == 0:
        parser.error(f"--init {args.init!r} has no classifier head (num_classes=0): nothing to predict")
    with cli.errors_exit(parser):
        x = load_images(args.images, model, parser.prog)
    with torch.no_grad():
        probs = model(x).softmax(-1)
    names = class_names(model)
    top = probs.topk(min(args.topk, probs.shape[-1]), dim=-1)
    for path, values, indices in zip(args.images, top.values, top.indices):
        ranked = ", ".join(f"{names[i]} ({100 * p:.1f}%)" for p, i in zip(values.tolist(), indices.tolist()))
        print(f"{path}: {ranked}")
    return 0
