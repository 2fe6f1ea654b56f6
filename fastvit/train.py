"""``python -m fastvit train``: training, fine-tuning and transfer on one process or many (``torchrun``).

Everything standard comes from PyTorch or timm: timm's ``create_optimizer_v2`` (AdamW/SGD/LAMB, no
weight decay on norms, biases and ``model.no_weight_decay()``, layer-wise LR decay through
``model.group_matcher()``), timm's ``CosineLRScheduler`` (linear warm-up, cosine decay, per update),
timm's ``Mixup``/CutMix and ``SoftTargetCrossEntropy``, timm's ``ModelEmaV3``; PyTorch's autocast and
``GradScaler``, ``DistributedDataParallel``, FSDP2 (``fully_shard``) and ``DistributedSampler``.

Under ``torchrun`` each process trains on its shard of every global batch (NCCL on GPU, gloo on
CPU); rank 0 alone prints, writes metrics and checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset

import fastvit
from fastvit import checkpoint as ckpt
from fastvit import cli, convert
from fastvit.data import DataBundle, build_data
from fastvit.model import PRESET_DATA_CFGS, PRESETS, VisionTransformer, default_pretrained_cfg, list_models
from fastvit.packing import PackingCollate, parse_sizes

PROG = "python -m fastvit train"
DEFAULT_MODEL = "vit_digits_patch4_32"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
MODEL_EMA_DECAY = 0.9998  # timm's --model-ema-decay default
MAX_IMG_SIZE = 8192  # 262k tokens at patch 16: beyond any GPU's memory for one image
MAX_WORKERS = 256
MAX_SYNTHETIC = 10**8

# Numeric options and their valid ranges (NaN and +-inf are never valid); a value outside is a one-line error.
TRAIN_NUMBERS = {
    "img_size": cli.Range(1, MAX_IMG_SIZE),
    "shift": cli.NON_NEGATIVE,
    "workers": cli.Range(0, MAX_WORKERS),
    "synthetic_size": cli.Range(1, MAX_SYNTHETIC),
    "drop_path": cli.FRACTION,
    "epochs": cli.AT_LEAST_ONE,
    "batch_size": cli.AT_LEAST_ONE,
    "grad_accum": cli.AT_LEAST_ONE,
    "lr": cli.POSITIVE,
    "min_lr": cli.NON_NEGATIVE,
    "warmup_epochs": cli.NON_NEGATIVE,
    "weight_decay": cli.NON_NEGATIVE,
    "momentum": cli.FRACTION,
    "layer_decay": cli.Range(0, 1, low_open=True),
    "label_smoothing": cli.FRACTION,
    "mixup": cli.NON_NEGATIVE,
    "cutmix": cli.NON_NEGATIVE,
    "clip_grad": cli.NON_NEGATIVE,
    "ema": cli.Range(0, 1, low_open=True, high_open=True),
    "seed": cli.SEED,
    "max_steps": cli.AT_LEAST_ONE,
    "stop_after": cli.AT_LEAST_ONE,
}

# --resume: options that define the run (its data, split, architecture, optimizer state layout) cannot change;
# these belong to one invocation and are never taken from the resumed run; every other option is the run's own
# unless given again (then a warning says what changed).
FIXED_ON_RESUME = (
    "model",
    "data",
    "classes",
    "img_size",
    "synthetic_size",
    "seed",
    "init",
    "opt",
    "layer_decay",
    "freeze_backbone",
    "batch_size",
    "grad_accum",
    "fsdp",
)
PER_INVOCATION = ("resume", "output", "overwrite", "stop_after", "max_steps", "quiet")


# ------------------------------------------------------------------------------------------------
# Arguments


class _ModelEma(argparse.Action):
    """timm's ``--model-ema`` flag: EMA on, with timm's default decay unless a decay was given."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if getattr(namespace, self.dest, None) is None:
            setattr(namespace, self.dest, MODEL_EMA_DECAY)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` command's options (timm's spellings accepted as aliases where they mean the same); the
    defaults train the digits model to ~98% in about a minute on 2 CPU cores."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        "--data-dir",
        default="digits",
        help="'digits' (bundled), 'synthetic' (random images, for throughput), or an ImageFolder directory "
        "(DIR/train + DIR/val, or one folder split 80/20)",
    )
    data.add_argument("--classes", default=None, help="digits subset, e.g. '0-4' or '1,3,5' (labels renumbered from 0)")
    data.add_argument(
        "--img-size",
        type=int,
        default=None,
        help=f"input size in pixels, a multiple of the patch size, at most {MAX_IMG_SIZE} "
        "(default: the model's; a different size resamples --init's position embedding)",
    )
    data.add_argument(
        "--sizes",
        default=None,
        help="mixed-resolution training: each training image is resized to a size drawn from this list (sides, or "
        "HxW: '16,24,32' or '32x16,16x32'; multiples of the patch size) and each batch of mixed sizes runs packed "
        "in one sequence (model.forward_packed); evaluation stays at --img-size",
    )
    data.add_argument(
        "--shift", type=int, default=2, help="digits: random-translation augmentation in pixels (0 = off)"
    )
    data.add_argument(
        "-j", "--workers", type=int, default=0, help="DataLoader worker processes (0 = load in the main process)"
    )
    data.add_argument(
        "--synthetic-size", type=int, default=1024, help=f"synthetic: images per epoch (at most {MAX_SYNTHETIC:,})"
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=None,
        help=f"preset name (fastvit.list_models()); default: --init's architecture, else {DEFAULT_MODEL}",
    )
    model.add_argument(
        "--backend",
        default=None,
        choices=list(fastvit.dispatch.BACKENDS),
        help="fastvit backend (default: FASTVIT_BACKEND, else auto)",
    )
    model.add_argument("--drop-path", type=float, default=0.0, help="stochastic-depth rate, in [0, 1)")
    model.add_argument(
        "--init",
        "--initial-checkpoint",
        default=None,
        help="initial weights: a train --output folder, a checkpoint dir, .safetensors or .pth (timm, torchvision "
        "or Hugging Face names); builds their architecture unless --model is given; a head of another size is "
        "re-initialised, the position embedding resampled, RGB patch weights adapted to grey input",
    )
    model.add_argument("--freeze-backbone", action="store_true", help="train only the head (linear probe)")
    model.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute block activations in backward (less memory)"
    )
    model.add_argument("--compile", action="store_true", help="torch.compile the model")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=30, help="epochs of the schedule (warm-up + cosine)")
    optim.add_argument(
        "-b", "--batch-size", type=int, default=64, help="per-process batch size (global: x processes x --grad-accum)"
    )
    optim.add_argument(
        "--grad-accum", "--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer update"
    )
    optim.add_argument("--opt", default="adamw", choices=["adamw", "sgd", "lamb"], help="optimizer (timm's)")
    optim.add_argument("--lr", type=float, default=2e-3, help="peak learning rate, > 0 (the default suits digits)")
    optim.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the cosine, <= --lr")
    optim.add_argument(
        "--warmup-epochs",
        type=float,
        default=3.0,
        help="linear warm-up from 1%% of --lr, in epochs (fractions allowed; 0 = none)",
    )
    optim.add_argument(
        "--weight-decay", type=float, default=0.05, help="decoupled weight decay; not on norms, biases, pos/cls tokens"
    )
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, in [0, 1)")
    optim.add_argument(
        "--layer-decay", type=float, default=None, help="layer-wise LR decay in (0, 1], e.g. 0.75 for fine-tuning"
    )
    optim.add_argument("--label-smoothing", "--smoothing", type=float, default=0.1, help="label smoothing, in [0, 1)")
    optim.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    optim.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off)")
    optim.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0 = no clipping)")
    optim.add_argument(
        "--ema",
        "--model-ema-decay",
        type=float,
        default=None,
        metavar="DECAY",
        help="keep an exponential moving average of the weights with this decay in (0, 1), e.g. 0.999",
    )
    optim.add_argument(
        "--model-ema",
        nargs=0,
        action=_ModelEma,
        dest="ema",
        help=f"timm's spelling: --ema {MODEL_EMA_DECAY} (unless a decay is given)",
    )
    optim.add_argument("--amp", default="none", choices=list(AMP_DTYPES), help="autocast dtype")

    run = parser.add_argument_group("run")
    run.add_argument(
        "--output",
        default="runs/train",
        help="folder for checkpoint/, model_best.safetensors, args.yaml, metrics.json/.csv, curves.png "
        "(with --resume: the resumed run's folder)",
    )
    run.add_argument(
        "--overwrite", action="store_true", help="replace the run already in --output (else that is an error)"
    )
    run.add_argument(
        "--resume",
        default=None,
        help="continue a run (its --output folder or checkpoint dir) with its own options; options given again "
        "replace them (with a warning), --epochs extends the schedule",
    )
    run.add_argument("--seed", type=int, default=0, help="seed of the initial weights, data order and train/test split")
    run.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    run.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (under torchrun)")
    run.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer updates in all")
    run.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="EPOCHS",
        help="stop after this many epochs of the schedule (a time-boxed run to --resume later)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")


def _architecture(args: argparse.Namespace) -> tuple[str, dict]:
    """(name, constructor config) of the model a run starts from, when it can be known before loading weights:
    the --model preset, or the default one when neither --model nor --init is given ({} when --init decides)."""
    if args.model is not None:
        return args.model, preset_config(args.model)
    if args.init:
        return "", {}
    return DEFAULT_MODEL, preset_config(DEFAULT_MODEL)


def preset_config(name: str) -> dict:
    """A preset's constructor config; timm's Eva-class presets (EVA02, DINOv3, RoPE ViTs) say ``model_class='Eva'``
    (``convert.build_model`` builds them, checkpoints record it)."""
    from fastvit.eva import EVA_PRESETS

    return dict(PRESETS[name]) if name in PRESETS else {**EVA_PRESETS[name], "model_class": "Eva"}


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reject bad arguments up front with a one-line message (``parser.error`` exits with code 2)."""
    cli.check_numbers(parser, args, TRAIN_NUMBERS)
    if args.model is not None and args.model not in list_models():
        parser.error(f"--model {args.model!r} is not a preset; choose one of: {', '.join(list_models())}")
    if args.model is not None and args.model.startswith("naflexvit_"):
        parser.error(
            f"--model {args.model}: the training CLI does not train NaFlexViT models yet (build one with "
            "fastvit.create_model and train it in your own loop; --sizes trains any ViT preset on mixed sizes)"
        )
    if args.data not in ("digits", "synthetic") and not os.path.isdir(args.data):
        parser.error(f"--data {args.data!r} is not 'digits', 'synthetic' or an existing directory")
    name, config = _architecture(args)
    if config:
        patch = config.get("patch_size", 16)
        img_size = args.img_size if args.img_size is not None else config.get("img_size", 224)
        side = min(img_size) if isinstance(img_size, tuple) else img_size
        if any(size % patch for size in (img_size if isinstance(img_size, tuple) else (img_size,))):
            parser.error(f"--img-size {img_size} is not divisible by the patch size {patch} of {name}")
        if args.data == "digits" and side < 8:
            parser.error(f"--img-size must be >= 8 for digits, got {img_size}")
        if args.data == "digits" and args.shift >= side:
            parser.error(f"--shift must be smaller than the image ({side} px), got {args.shift}")
    if args.sizes is not None:
        _check_sizes(args, parser, config)
    if args.min_lr > args.lr:
        parser.error(f"--min-lr {args.min_lr} is above --lr {args.lr}: the cosine would raise the learning rate")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        parser.error(f"--mixup/--cutmix need an even --batch-size, got {args.batch_size}")
    if args.init and not args.resume and not os.path.exists(ckpt.with_crash_fallback(args.init)):
        parser.error(f"--init {args.init!r} does not exist")
    cli.check_device(parser, args.device)
    _check_output(args, parser)
    if args.warmup_epochs >= args.epochs:
        cli.warn(
            PROG,
            f"--warmup-epochs {args.warmup_epochs:g} >= --epochs {args.epochs}: the learning rate never reaches "
            f"--lr (warm-up is cut to end one update before the run does)",
        )


def _check_sizes(args: argparse.Namespace, parser: argparse.ArgumentParser, config: dict) -> None:
    """--sizes: valid sizes, multiples of the patch size (when the architecture is known here), and none of the
    options that packed training cannot take."""
    try:
        sizes = parse_sizes(args.sizes)
    except ValueError as exc:
        parser.error(f"--{exc}")
    too_large = [f"{h}x{w}" for h, w in sizes if max(h, w) > MAX_IMG_SIZE]
    if too_large:
        parser.error(f"--sizes {', '.join(too_large)} above {MAX_IMG_SIZE} pixels")
    if config:
        patch = config.get("patch_size", 16)
        bad = [f"{h}x{w}" for h, w in sizes if h % patch or w % patch]
        if bad:
            parser.error(f"--sizes {', '.join(bad)} not divisible by the patch size {patch}")
    refused = {
        "--mixup/--cutmix (they mix images of one size)": args.mixup > 0 or args.cutmix > 0,
        "--compile (every mix of sizes would compile anew)": args.compile,
    }
    for option, given in refused.items():
        if given:
            parser.error(f"--sizes cannot be combined with {option}")


def _check_output(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """--output must be a folder we may write a run into: not a file, and not holding another run unless
    --overwrite (a resumed run writes into its own folder)."""
    output = os.path.abspath(args.output)
    if os.path.exists(output) and not os.path.isdir(output):
        parser.error(f"--output {args.output!r} is a file, not a folder")
    resumed_from = _resumed_run_dir(args.resume) if args.resume else None
    if args.overwrite and resumed_from == output:
        parser.error("--overwrite would delete the run that --resume continues; leave out --overwrite")
    if args.overwrite and args.init:
        init = os.path.abspath(ckpt.with_crash_fallback(args.init))
        if init == output or init.startswith(output + os.sep):
            parser.error("--overwrite would delete the --init weights, which are in --output; choose another --output")
    if resumed_from != output and not args.overwrite and ckpt.holds_run(output):
        parser.error(
            f"--output {args.output!r} already holds a training run: --resume {args.output} continues it, "
            "--overwrite replaces it, or choose another --output"
        )


def _resumed_run_dir(resume: str) -> str | None:
    try:
        return ckpt.run_dir(ckpt.checkpoint_dir(resume))
    except FileNotFoundError:
        return None


def _saved_run_args(resume: str) -> tuple[dict, dict]:
    """(the resumed run's options, its checkpoint metadata): from the weights file's header, or from state.pt
    for checkpoints written before the options were kept in the metadata."""
    metadata = ckpt.read_metadata(resume)
    saved = metadata.get("args")
    if not isinstance(saved, dict):
        saved = ckpt.load_checkpoint(resume)["state"].get("args", {})
    return dict(saved), metadata


def merge_resumed_args(
    args: argparse.Namespace, given: set[str], parser: argparse.ArgumentParser
) -> argparse.Namespace:
    """--resume: the resumed run's options, replaced by those given now (a warning for each that changes; a
    one-line error for one in :data:`FIXED_ON_RESUME`), in the resumed run's folder unless --output is given."""
    if not os.path.exists(ckpt.with_crash_fallback(args.resume)):
        parser.error(f"--resume {args.resume!r} does not exist")
    with cli.errors_exit(parser, prefix=f"--resume {args.resume!r}: "):
        saved, metadata = _saved_run_args(args.resume)
    defaults = vars(parser.parse_args([]))
    merged = argparse.Namespace(**{**defaults, **{k: v for k, v in saved.items() if k in defaults}})
    config = metadata.get("config") if isinstance(metadata.get("config"), dict) else {}
    if saved.get("img_size") is None and "img_size" in config:  # runs saved before the effective size was kept
        merged.img_size = config["img_size"][0] if isinstance(config["img_size"], list) else config["img_size"]
    if isinstance(merged.img_size, list):  # (H, W) in JSON
        merged.img_size = tuple(merged.img_size)
    if saved.get("model") is None and isinstance(metadata.get("model"), str):
        merged.model = metadata["model"] or None
    for key in sorted(given - set(PER_INVOCATION)):
        new, old = getattr(args, key), getattr(merged, key, None)
        if new == old or (key in ("data", "init") and _same_path(new, old)):
            continue
        if key in FIXED_ON_RESUME:
            parser.error(
                f"--resume: --{key.replace('_', '-')} {new} differs from the resumed run's {old}; it cannot change "
                "within a run (start a new one, e.g. with --init from this one)"
            )
        cli.warn(PROG, f"--resume: --{key.replace('_', '-')} {new} replaces the resumed run's {old}")
        setattr(merged, key, new)
    for key in PER_INVOCATION:
        setattr(merged, key, getattr(args, key))
    if "output" not in given:
        merged.output = _resumed_run_dir(args.resume) or saved.get("output", args.output)
    return merged


def _same_path(a, b) -> bool:
    return isinstance(a, str) and isinstance(b, str) and os.path.abspath(a) == os.path.abspath(b)


def prepare_args(args: argparse.Namespace, given: set[str], parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Final options: --resume's merged in, then every check (one-line errors)."""
    if args.resume:
        args = merge_resumed_args(args, given, parser)
    check_args(args, parser)
    return args


def make_parser(prog: str = PROG) -> cli.Parser:
    parser = cli.Parser(prog=prog, description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    return parser


def default_args(**overrides) -> argparse.Namespace:
    """The ``train`` options as a Namespace: the defaults with ``overrides`` (for programmatic runs: demo,
    transfer), checked and, with ``resume=``, merged with the resumed run's as on the command line."""
    parser = make_parser()
    args = parser.parse_args([])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"unknown training option {key!r}")
        setattr(args, key, value)
    return prepare_args(args, set(overrides), parser)


# ------------------------------------------------------------------------------------------------
# Distributed set-up


@dataclasses.dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None) -> Distributed:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set); NCCL on GPU, gloo on CPU."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Distributed(device=torch.device("cuda" if use_cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"),
    )


# ------------------------------------------------------------------------------------------------
# Model


@dataclasses.dataclass
class StartingPoint:
    """What a run builds its model from: an architecture, its data config, and initial weights (if any)."""

    name: str  # preset name ("" for an architecture read off --init weights that no preset names)
    config: dict  # VisionTransformer arguments before adapting to the data
    data_config: dict  # pretrained_cfg entries of those weights (ImageFolder preprocessing follows them)
    init_state: dict | None = None  # --init weights (timm names)


def starting_point(args: argparse.Namespace, resumed: dict | None) -> StartingPoint:
    """The architecture: the resumed checkpoint's; the --model preset; --init's own (recorded in a fastvit
    checkpoint, else inferred from the weights); or the default preset."""
    if resumed is not None:
        metadata = resumed["metadata"]
        config = convert.config_from_json(metadata.get("config") or {})
        return StartingPoint(metadata.get("model") or "", config, convert.metadata_data_cfg(metadata))
    init_state, metadata = convert.load_any_weights(args.init) if args.init else (None, {})
    if args.model is not None or not args.init:
        name = args.model or DEFAULT_MODEL
        config = preset_config(name)
        data_config = {**default_pretrained_cfg(config.get("in_chans", 3)), **PRESET_DATA_CFGS.get(name, {})}
        if args.init:
            data_config.update(convert.metadata_data_cfg(metadata))
        return StartingPoint(name, config, data_config, init_state)
    if isinstance(metadata.get("config"), dict):
        config = convert.config_from_json(metadata["config"])
    else:
        config = convert.infer_config(init_state)
    name = metadata.get("model") if isinstance(metadata.get("model"), str) else ""  # "": no preset of that name
    data_config = {**default_pretrained_cfg(config.get("in_chans", 3)), **convert.metadata_data_cfg(metadata)}
    return StartingPoint(name, config, data_config, init_state)


def model_config(start: StartingPoint, args: argparse.Namespace, data: DataBundle) -> dict:
    """Constructor arguments: the starting architecture, adapted to the data (classes, channels, size) and options."""
    config = {k: v for k, v in start.config.items() if k not in ("backend", "weight_init")}
    return {
        **config,
        "img_size": data.img_size,
        "in_chans": data.in_chans,
        "num_classes": data.num_classes,
        "drop_path_rate": args.drop_path,
        **({"dynamic_img_size": True} if args.sizes is not None else {}),  # packed training: every size
    }


def load_init_weights(model: VisionTransformer, source, name: str = "--init") -> list[str]:
    """Initialise from a checkpoint for fine-tuning; returns what had to be adapted.

    The classifier is kept when its shape matches the new task, else re-initialised
    (``reset_classifier``); the position embedding is resampled to the new grid; patch-embedding
    weights for a different number of input channels are adapted as timm does (``adapt_input_conv``).

    Args:
        source: a path (any format ``fastvit.load_weights`` reads) or a timm-named state dict.
        name: how errors name the source.
    """
    state = dict(source) if isinstance(source, dict) else convert.load_any_weights(source)[0]
    notes = []
    expected = model.state_dict()
    head_keys = [k for k in ("head.weight", "head.bias") if k in state]
    if any(k not in expected or state[k].shape != expected[k].shape for k in head_keys):
        for key in head_keys:
            del state[key]
        for key in ("head.weight", "head.bias"):
            if key in expected:
                state[key] = expected[key]  # the fresh head from reset_classifier-style init
        notes.append(f"new head for {model.num_classes} classes")
    proj = state.get("patch_embed.proj.weight")
    if proj is not None and proj.shape[1] != model.in_chans:
        from timm.models import adapt_input_conv

        state["patch_embed.proj.weight"] = adapt_input_conv(model.in_chans, proj)
        notes.append(f"patch embedding adapted from {proj.shape[1]} to {model.in_chans} input channels")
    if "pos_embed" in state and model.pos_embed is not None and state["pos_embed"].shape != model.pos_embed.shape:
        notes.append(f"position embedding resampled to the {model.patch_embed.grid_size} grid")
    try:
        convert.load_weights(model, state)
    except convert.CheckpointMismatchError as exc:
        raise ValueError(
            f"{name} does not fit the model ({exc}); leave out --model to build the checkpoint's own architecture"
        ) from exc
    return notes


def freeze_backbone(model: VisionTransformer) -> None:
    """Linear probe: only the classifier (and an fc_norm after pooling) stays trainable."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(("head.", "fc_norm."))


def _apply_fsdp(model: nn.Module) -> nn.Module:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


# ------------------------------------------------------------------------------------------------
# Loop helpers


def _loaders(data: DataBundle, args, env: Distributed, drop_last: bool):
    sampler = DistributedSampler(
        data.train, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=args.seed, drop_last=drop_last
    )
    # --sizes: the collate resizes each image to a drawn size and returns a list (the batch augmentation runs there,
    # on the stacked batch, before resizing).
    collate = PackingCollate(parse_sizes(args.sizes), augment=data.batch_augment) if args.sizes is not None else None
    train = DataLoader(
        data.train,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        drop_last=drop_last,
        pin_memory=env.device.type == "cuda",
        collate_fn=collate,
    )
    # Evaluation: rank r takes images r, r+W, ...; shards are padded to equal length (FSDP needs every
    # rank to run the same forwards) and the padding is masked out of the counts in evaluate().
    shard = list(range(env.rank, len(data.test), env.world_size))
    per_rank = math.ceil(len(data.test) / env.world_size)
    test_shard = Subset(data.test, shard + shard[:1] * (per_rank - len(shard)))
    test = DataLoader(test_shard, batch_size=max(args.batch_size, 128), num_workers=args.workers)
    test.num_valid = len(shard)
    return sampler, train, test


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device, amp_dtype=None, env: Distributed | None = None
):
    """(mean loss, top-1, top-5) over ``loader``; with ``env`` the sums are all-reduced over ranks."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top1, top5, count
    num_valid = getattr(loader, "num_valid", float("inf"))  # set by _loaders on padded evaluation shards
    seen = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()
        valid = (torch.arange(len(y), device=device) + seen < num_valid).double()
        seen += len(y)
        topk = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = (topk == y[:, None]).double()
        totals += torch.stack(
            [
                (F.cross_entropy(logits, y, reduction="none").double() * valid).sum(),
                (hits[:, 0] * valid).sum(),
                (hits.amax(-1) * valid).sum(),
                valid.sum(),
            ]
        )
    if env is not None and env.enabled:
        dist.all_reduce(totals)
    model.train(was_training)
    count = max(totals[3].item(), 1.0)
    return totals[0].item() / count, totals[1].item() / count, totals[2].item() / count


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy (timm's mixup draws from it) and Python's random."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _gather_rng(env: Distributed) -> list:
    state = ckpt.rng_state()
    if not env.enabled:
        return [state]
    states = [None] * env.world_size
    dist.all_gather_object(states, state)
    return states


def _full_state_dicts(model: nn.Module, optimizer, fsdp: bool):
    if not fsdp:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_full_state_dicts(model: nn.Module, optimizer, model_state, optim_state, fsdp: bool) -> None:
    if not fsdp:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optim_state,
        options=StateDictOptions(full_state_dict=True),
    )


def write_metrics(output: str, history: list[dict]) -> None:
    """metrics.json, metrics.csv and curves.png in ``output`` (the plot is skipped, with a note, without matplotlib)."""
    with open(os.path.join(output, "metrics.json"), "w") as f:
        json.dump(history, f, indent=2)
    with open(os.path.join(output, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    try:
        plot_history(history, os.path.join(output, "curves.png"))
    except ImportError:
        print("curves.png skipped: matplotlib is not installed (pip install 'fastvit[demo]')")


def plot_history(history: list[dict], path: str, title: str = "") -> None:
    """PNG with the loss curves, the test accuracy and the learning rate per epoch (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(14, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * h["test_top1"] for h in history], color="C2", label="top-1")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="test accuracy", ylim=(0, 100))
    ax_acc.grid(alpha=0.3)
    ax_lr.plot(epochs, [h["lr"] for h in history], color="C3")
    ax_lr.set(xlabel="epoch", ylabel="learning rate", title="learning rate (end of epoch)")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_lr.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    """timm's optimizer factory: param groups without weight decay for 1-D params and ``no_weight_decay()``,
    and with ``lr_scale`` per block under ``--layer-decay`` (applied by the timm scheduler)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(
        model,
        opt=args.opt,
        lr=args.lr,
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        layer_decay=args.layer_decay,
    )


def make_scheduler(optimizer: torch.optim.Optimizer, args: argparse.Namespace, updates_per_epoch: int):
    """Linear warm-up from 1% of ``--lr`` over ``--warmup-epochs``, then cosine to ``--min-lr``, stepped per update."""
    from timm.scheduler import CosineLRScheduler

    total = args.epochs * updates_per_epoch
    warmup = min(int(args.warmup_epochs * updates_per_epoch), total - 1)
    # warmup_prefix: the cosine starts at the peak when the warm-up ends and reaches min_lr at the last update.
    return CosineLRScheduler(
        optimizer,
        t_initial=total - warmup,
        lr_min=args.min_lr,
        warmup_t=warmup,
        warmup_lr_init=args.lr * 0.01,
        warmup_prefix=True,
        t_in_epochs=False,
    )


# ------------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass
class TrainResult:
    model: VisionTransformer  # unwrapped (not DDP/compiled); under FSDP its parameters are sharded DTensors
    history: list[dict]
    config: dict
    data: DataBundle
    output: str
    seconds: float


def _check_finite(model: nn.Module, env: Distributed, epoch: int, lr: float) -> None:
    """``ValueError`` on every rank when any rank's weights hold NaN/Inf (the run diverged): stop before saving."""
    bad = any(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in model.parameters())
    flag = torch.tensor([float(bad)], device=env.device)
    if env.enabled:
        dist.all_reduce(flag)
    if flag.item():
        raise ValueError(
            f"training diverged in epoch {epoch}: the weights hold NaN/Inf (learning rate {lr:.3g}); lower --lr or "
            "--weight-decay, or keep --clip-grad on (the last checkpoint is the previous epoch's)"
        )


def run(args: argparse.Namespace) -> TrainResult:
    """Train as ``args`` says (see ``add_train_arguments``; use :func:`default_args` to build them); returns the
    model and per-epoch metrics."""
    env = setup_distributed(args.device)
    if args.fsdp and not env.enabled:
        raise ValueError("--fsdp shards across processes: launch with torchrun --nproc-per-node N")
    if args.fsdp and args.ema:
        raise ValueError("--ema is not supported with --fsdp (the EMA copy would hold unsharded weights)")
    output = args.output
    with contextlib.ExitStack() as stack:
        if env.is_main:
            os.makedirs(output, exist_ok=True)
            stack.enter_context(ckpt.OutputLock(output))  # one run per folder, held until the run ends
            if args.overwrite:
                ckpt.remove_run(output)
        return _train(args, env, output)


def _train(args: argparse.Namespace, env: Distributed, output: str) -> TrainResult:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.utils import ModelEmaV3
    from tqdm.auto import tqdm

    amp_dtype = AMP_DTYPES[args.amp]
    resumed = ckpt.load_checkpoint(args.resume) if args.resume else None
    start = starting_point(args, resumed)
    img_size = args.img_size if args.img_size is not None else start.config.get("img_size", 224)
    data = build_data(
        args.data,
        img_size,
        args.classes,
        seed=args.seed,
        shift=args.shift,
        synthetic_size=args.synthetic_size,
        # ImageFolder images are preprocessed as the starting weights expect; the digits bring their own statistics.
        data_config=None if args.data == "digits" else start.data_config,
    )
    config = model_config(start, args, data)

    seed_everything(args.seed)  # identical initial weights on every rank
    model = convert.build_model(config, backend=args.backend)
    notes = load_init_weights(model, start.init_state, f"--init {args.init}") if start.init_state else []
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        **{k: v for k, v in data.data_config.items() if k != "input_size"},
        "architecture": args.model or start.name or None,
        "label_names": list(data.classes),
    }
    if args.freeze_backbone:
        freeze_backbone(model)
    model.set_grad_checkpointing(args.grad_checkpointing)
    model.to(env.device)
    raw_model = model
    ema = ModelEmaV3(model, decay=args.ema) if args.ema else None

    if args.fsdp:
        model = _apply_fsdp(model)
    if args.compile:
        model = torch.compile(model)
    train_model = model
    if env.enabled and not args.fsdp:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.local_rank] if env.device.type == "cuda" else None
        )

    optimizer = make_optimizer(raw_model, args)
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            label_smoothing=args.label_smoothing,
            num_classes=data.num_classes,
        )
    criterion = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    sampler, train_loader, test_loader = _loaders(data, args, env, drop_last=mixup is not None)
    if len(train_loader) == 0:
        raise ValueError(f"the training set ({len(data.train)} images) is smaller than one batch ({args.batch_size})")
    scheduler = make_scheduler(optimizer, args, updates_per_epoch=math.ceil(len(train_loader) / args.grad_accum))
    scaler = torch.amp.GradScaler(env.device.type, enabled=args.amp == "fp16")

    start_epoch, num_updates, history = 0, 0, []
    if resumed is not None:
        state = resumed["state"]
        hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        _load_full_state_dicts(raw_model, optimizer, resumed["model"], state["optimizer"], args.fsdp)
        # The optimizer's state (moments) continues; its settings are this run's (a changed --weight-decay or
        # --lr applies), and the schedule is rebuilt from --epochs/--warmup-epochs/--lr, not restored: the
        # timm scheduler is a function of the update count, so an extended --epochs really trains.
        for group, settings in zip(optimizer.param_groups, hyperparameters):
            group.update(settings)
        scaler.load_state_dict(state["scaler"])
        if ema is not None:
            ema.module.load_state_dict(resumed["ema"] if resumed["ema"] is not None else raw_model.state_dict())
        start_epoch, num_updates, history = state["epoch"], state["num_updates"], list(state["history"])
        if len(state["rng"]) == env.world_size:
            ckpt.set_rng_state(state["rng"][env.rank])
        elif env.is_main:
            print(
                f"resume: checkpoint has RNG states for {len(state['rng'])} ranks, not {env.world_size}; "
                "data order is reproduced, augmentation randomness is not"
            )
        scheduler.step_update(num_updates)
    else:
        seed_everything(args.seed + env.rank)  # different augmentation streams per rank

    run_info = dict(model=args.model or start.name or None, img_size=img_size)
    if env.is_main:
        _write_args_yaml(output, args, run_info)
        trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in raw_model.parameters())
        size = f"{img_size}px" if isinstance(img_size, int) else "x".join(map(str, img_size)) + "px"
        if args.sizes is not None:
            size += f", training packed at sizes {args.sizes}"
        arch = run_info["model"] or f"the architecture of {args.init or args.resume}"
        print(
            f"fastvit train: {arch} on {data.name} ({len(data.train)} train / {len(data.test)} test, "
            f"{data.num_classes} classes, {size}), {total / 1e6:.2f}M params ({trainable / 1e6:.2f}M trainable), "
            f"{env.world_size} process(es) on {env.device.type}, global batch "
            f"{args.batch_size * env.world_size * args.grad_accum}, ops: "
            + ", ".join(f"{k}={v}" for k, v in raw_model.backend_plan(env.device).items())
        )
        for note in notes:
            print(f"init from {args.init}: {note}")
        if resumed is not None:
            print(f"resumed from {resumed['dir']} after epoch {start_epoch} ({num_updates} updates)")

    last_epoch = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    if env.is_main and start_epoch >= last_epoch:
        print(f"nothing to train: the run has done {start_epoch} of its {args.epochs} epochs")
    show_top5 = data.num_classes > 5  # with 5 classes or fewer top-5 is always 100%
    bar = tqdm(
        total=max(last_epoch - start_epoch, 0) * len(train_loader),
        disable=args.quiet or not env.is_main,
        unit="batch",
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    stop = False
    for epoch in range(start_epoch, last_epoch):
        sampler.set_epoch(epoch)
        train_model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        seen, epoch_start = 0, time.perf_counter()
        micro_batches = len(train_loader)
        for step, (x, y) in enumerate(train_loader):
            y = y.to(env.device, non_blocking=True)
            if args.sizes is not None:  # a list of images of different sizes: model(x) runs forward_packed
                x = [image.to(env.device, non_blocking=True) for image in x]
            else:
                x = x.to(env.device, non_blocking=True)
            if data.batch_augment is not None and args.sizes is None:
                x = data.batch_augment(x)
            if mixup is not None:
                x, y = mixup(x, y)
            group_start = (step // args.grad_accum) * args.grad_accum
            group_size = min(args.grad_accum, micro_batches - group_start)
            is_update = step - group_start == group_size - 1
            sync = contextlib.nullcontext()
            if not is_update and isinstance(train_model, nn.parallel.DistributedDataParallel):
                sync = train_model.no_sync()
            with sync:
                with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = criterion(train_model(x), y)
                scaler.scale(loss / group_size).backward()
            loss_sum += loss.detach().double() * len(x)
            seen += len(x)
            if is_update:
                if args.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                num_updates += 1
                scheduler.step_update(num_updates)
                if ema is not None:
                    ema.update(raw_model, step=num_updates)
            bar.update(1)
            if env.is_main and not args.quiet and step % 5 == 0:
                rate = seen * env.world_size / max(time.perf_counter() - epoch_start, 1e-9)
                bar.set_postfix(
                    epoch=epoch + 1,
                    loss=f"{loss.item():.3f}",
                    lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                    img_s=f"{rate:.0f}",
                )
            if args.max_steps is not None and num_updates >= args.max_steps:
                stop = True
                break
        epoch_seconds = time.perf_counter() - epoch_start
        if env.enabled:
            counts = torch.tensor([loss_sum.item(), float(seen)], dtype=torch.float64, device=env.device)
            dist.all_reduce(counts)
            loss_sum, seen = counts[0], int(counts[1].item())
        _check_finite(raw_model, env, epoch + 1, optimizer.param_groups[0]["lr"])
        test_loss, top1, top5 = evaluate(train_model, test_loader, env.device, amp_dtype, env)
        row = dict(
            epoch=epoch + 1,
            train_loss=float(loss_sum) / max(seen, 1),
            test_loss=test_loss,
            test_top1=top1,
            test_top5=top5,
            lr=optimizer.param_groups[0]["lr"],
            img_per_s=seen / epoch_seconds,
            epoch_seconds=epoch_seconds,
        )
        if ema is not None:
            row["ema_test_loss"], row["ema_test_top1"], row["ema_test_top5"] = evaluate(
                ema.module, test_loader, env.device, amp_dtype, env
            )
        history.append(row)
        _save(args, env, raw_model, optimizer, scheduler, scaler, ema, epoch + 1, num_updates, history, config, data)
        if env.is_main:
            top5_text = f", top-5 {100 * top5:.2f}%" if show_top5 else ""
            bar.write(
                f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.4f}, test loss {test_loss:.4f}, "
                f"top-1 {100 * top1:.2f}%{top5_text}, {row['img_per_s']:.0f} img/s"
            )
        if stop:
            break
    bar.close()
    seconds = time.perf_counter() - started
    if env.is_main and history:
        write_metrics(output, history)
    return TrainResult(model=raw_model, history=history, config=config, data=data, output=output, seconds=seconds)


def _saved_args(args: argparse.Namespace, run_info: dict) -> dict:
    """The options to keep with the run (what --resume restores), with the model and image size it really used."""
    return {**vars(args), **run_info}


def _write_args_yaml(output: str, args: argparse.Namespace, run_info: dict) -> None:
    """args.yaml, as timm's train.py writes it: every option of the run."""
    import yaml

    with open(os.path.join(output, "args.yaml"), "w") as f:
        yaml.safe_dump(_saved_args(args, run_info), f, default_flow_style=False)


BEST_FILE = "model_best.safetensors"


def _save(args, env, model, optimizer, scheduler, scaler, ema, epoch, num_updates, history, config, data) -> None:
    """The checkpoint after an epoch, and ``model_best.safetensors`` when the test top-1 improved (the EMA's
    when training with --ema, as timm's train.py: those weights and that metric)."""
    model_state, optim_state = _full_state_dicts(model, optimizer, args.fsdp)  # collective under FSDP
    rng = _gather_rng(env)  # collective when distributed
    if not env.is_main:
        return
    run_info = dict(model=model.pretrained_cfg["architecture"], img_size=data.img_size)
    state = dict(
        epoch=epoch,
        num_updates=num_updates,
        optimizer=optim_state,
        scheduler=scheduler.state_dict(),
        scaler=scaler.state_dict(),
        rng=rng,
        history=history,
        args=_saved_args(args, run_info),
    )
    cfg = model.pretrained_cfg
    metadata = dict(
        config=convert.config_to_json(config),
        pretrained_cfg={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        data=data.provenance,
        args=_saved_args(args, run_info),
        fastvit=fastvit.__version__,
        model=run_info["model"],
    )
    ema_state = ema.module.state_dict() if ema is not None else None
    ckpt.save_checkpoint(os.path.join(args.output, "checkpoint"), model_state, state, metadata, ema_state=ema_state)
    metric = "ema_test_top1" if ema is not None else "test_top1"
    if history[-1][metric] > max((h[metric] for h in history[:-1]), default=-1.0):
        best = dict(epoch=epoch, metric=metric, value=history[-1][metric])
        weights = ema_state if ema is not None else model_state
        ckpt.save_weights(os.path.join(args.output, BEST_FILE), weights, {**metadata, "best": best})


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    args = prepare_args(args, cli.given_options(parser, argv), parser)
    with cli.errors_exit(parser):
        result = run(args)
    if result.history and (not dist.is_initialized() or dist.get_rank() == 0):
        last = result.history[-1]
        print(
            f"done in {result.seconds:.1f} s: test top-1 {100 * last['test_top1']:.2f}%; "
            f"checkpoint {os.path.join(result.output, 'checkpoint')}, metrics in {result.output}"
        )
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
