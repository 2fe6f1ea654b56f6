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
from fastvit.data import DataBundle, build_data
from fastvit.model import PRESETS, VisionTransformer

DEFAULT_MODEL = "vit_digits_patch4_32"
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


# ------------------------------------------------------------------------------------------------
# Arguments


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` command's options; the defaults train the digits model to ~98-99% in under a minute."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", default="digits", help="'digits' (bundled, default), 'synthetic', or an ImageFolder dir"
    )
    data.add_argument("--classes", default=None, help="digits subset, e.g. '0-4' (labels renumbered from 0)")
    data.add_argument("--img-size", type=int, default=None, help="input size (default: the model preset's)")
    data.add_argument("--shift", type=int, default=2, help="digits: random-translation augmentation in pixels")
    data.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    data.add_argument("--synthetic-size", type=int, default=1024, help="synthetic: images per epoch")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, help=f"preset name (default {DEFAULT_MODEL})")
    model.add_argument(
        "--backend", default=None, help="fastvit backend: auto|triton|cuda|torch (default FASTVIT_BACKEND)"
    )
    model.add_argument("--drop-path", type=float, default=0.0, help="stochastic-depth rate")
    model.add_argument(
        "--init",
        default=None,
        help="initial weights: fastvit checkpoint dir, .safetensors or .pth "
        "(timm, torchvision or Hugging Face names); head and position embedding are adapted",
    )
    model.add_argument("--freeze-backbone", action="store_true", help="train only the head (linear probe)")
    model.add_argument("--grad-checkpointing", action="store_true")
    model.add_argument("--compile", action="store_true", help="torch.compile the model")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=30)
    optim.add_argument("--batch-size", type=int, default=64, help="per-process batch size")
    optim.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    optim.add_argument("--opt", default="adamw", choices=["adamw", "sgd", "lamb"])
    optim.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default tuned for digits)")
    optim.add_argument("--min-lr", type=float, default=0.0)
    optim.add_argument("--warmup-epochs", type=float, default=3.0)
    optim.add_argument(
        "--weight-decay", type=float, default=0.05, help="not applied to norms, biases, pos/cls embeddings"
    )
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    optim.add_argument("--layer-decay", type=float, default=None, help="layer-wise LR decay, e.g. 0.75 for fine-tuning")
    optim.add_argument("--label-smoothing", type=float, default=0.1)
    optim.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0 = off)")
    optim.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0 = off)")
    optim.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0 = off)")
    optim.add_argument(
        "--ema", type=float, default=None, metavar="DECAY", help="keep an EMA of the weights, e.g. 0.999"
    )
    optim.add_argument("--amp", default="none", choices=list(AMP_DTYPES), help="autocast dtype")

    run = parser.add_argument_group("run")
    run.add_argument("--output", default="runs/train", help="checkpoint/, metrics.json, metrics.csv, curves.png")
    run.add_argument("--resume", default=None, help="continue from a checkpoint (dir, or an output dir)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    run.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (under torchrun)")
    run.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer updates")
    run.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="EPOCHS",
        help="stop after this many epochs of the schedule (a time-boxed run to --resume later)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reject bad arguments up front with a one-line message (``parser.error`` exits with code 2)."""
    if args.model not in PRESETS:
        parser.error(f"--model {args.model!r} is not a preset; choose one of: {', '.join(sorted(PRESETS))}")
    for name in ("epochs", "batch_size", "grad_accum"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.data not in ("digits", "synthetic") and not os.path.isdir(args.data):
        parser.error(f"--data {args.data!r} is not 'digits', 'synthetic' or an existing directory")
    patch = PRESETS[args.model].get("patch_size", 16)
    img_size = args.img_size or PRESETS[args.model].get("img_size", 224)
    if img_size % patch:
        parser.error(f"--img-size {img_size} is not divisible by the patch size {patch} of {args.model}")
    if args.data == "digits" and img_size < 8:
        parser.error(f"--img-size must be >= 8 for digits, got {img_size}")
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if args.layer_decay is not None and not 0 < args.layer_decay <= 1:
        parser.error(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        parser.error(f"--mixup/--cutmix need an even --batch-size, got {args.batch_size}")
    if args.ema is not None and not 0 < args.ema < 1:
        parser.error(f"--ema must be in (0, 1), got {args.ema}")
    if not 0 <= args.drop_path < 1:
        parser.error(f"--drop-path must be in [0, 1), got {args.drop_path}")
    if args.init and not os.path.exists(args.init):
        parser.error(f"--init {args.init!r} does not exist")
    if args.resume and not os.path.exists(args.resume):
        parser.error(f"--resume {args.resume!r} does not exist")
    if args.backend is not None and args.backend not in fastvit.dispatch.BACKENDS:
        parser.error(f"--backend must be one of {', '.join(fastvit.dispatch.BACKENDS)}, got {args.backend!r}")
    if args.device is not None and args.device.split(":")[0] not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda was given but no CUDA device is available")


def default_args(**overrides) -> argparse.Namespace:
    """The ``train`` defaults as a Namespace, with ``overrides`` (for programmatic runs: demo, transfer)."""
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"unknown training option {key!r}")
        setattr(args, key, value)
    check_args(args, parser)
    return args


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


def model_config(args: argparse.Namespace, data: DataBundle) -> dict:
    """Constructor arguments: the preset, adapted to the data (classes, channels, size) and the options."""
    return {
        **PRESETS[args.model],
        "img_size": data.img_size,
        "in_chans": data.in_chans,
        "num_classes": data.num_classes,
        "drop_path_rate": args.drop_path,
    }


def _json_safe(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not callable(v)}


def load_init_weights(model: VisionTransformer, path: str) -> list[str]:
    """Initialise from a checkpoint for fine-tuning; returns what had to be adapted.

    The classifier is kept when its shape matches the new task, else re-initialised
    (``reset_classifier``); the position embedding is resampled to the new grid; patch-embedding
    weights for a different number of input channels are adapted as timm does (``adapt_input_conv``).
    """
    from fastvit import convert

    state = convert.load_any_weights(path)[0]
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
    convert.load_weights(model, state)
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
    train = DataLoader(
        data.train,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=args.workers,
        drop_last=drop_last,
        pin_memory=env.device.type == "cuda",
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
    """metrics.json, metrics.csv and curves.png in ``output``."""
    with open(os.path.join(output, "metrics.json"), "w") as f:
        json.dump(history, f, indent=2)
    with open(os.path.join(output, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    plot_history(history, os.path.join(output, "curves.png"))


def plot_history(history: list[dict], path: str, title: str = "") -> None:
    """PNG with the loss curves and the test accuracy per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax_loss.plot(epochs, [h["test_loss"] for h in history], label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * h["test_top1"] for h in history], color="C2", label="top-1")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="test accuracy", ylim=(0, 100))
    ax_acc.grid(alpha=0.3)
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


def run(args: argparse.Namespace) -> TrainResult:
    """Train as ``args`` says; returns the model and per-epoch metrics (see ``add_train_arguments``)."""
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy
    from timm.utils import ModelEmaV3
    from tqdm.auto import tqdm

    env = setup_distributed(args.device)
    if args.fsdp and not env.enabled:
        raise ValueError("--fsdp shards across processes: launch with torchrun --nproc-per-node N")
    if args.fsdp and args.ema:
        raise ValueError("--ema is not supported with --fsdp (the EMA copy would hold unsharded weights)")
    amp_dtype = AMP_DTYPES[args.amp]
    img_size = args.img_size or PRESETS[args.model].get("img_size", 224)
    data = build_data(
        args.data, img_size, args.classes, seed=args.seed, shift=args.shift, synthetic_size=args.synthetic_size
    )
    config = model_config(args, data)

    seed_everything(args.seed)  # identical initial weights on every rank
    model = VisionTransformer(**config, backend=args.backend)
    notes = load_init_weights(model, args.init) if args.init else []
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
    if args.resume:
        loaded = ckpt.load_checkpoint(args.resume)
        state = loaded["state"]
        _load_full_state_dicts(raw_model, optimizer, loaded["model"], state["optimizer"], args.fsdp)
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and loaded["ema"] is not None:
            ema.module.load_state_dict(loaded["ema"])
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

    output = args.output
    if env.is_main:
        os.makedirs(output, exist_ok=True)
        trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in raw_model.parameters())
        print(
            f"fastvit train: {args.model} on {data.name} ({len(data.train)} train / {len(data.test)} test, "
            f"{data.num_classes} classes, {img_size}px), {total / 1e6:.2f}M params ({trainable / 1e6:.2f}M trainable), "
            f"{env.world_size} process(es) on {env.device.type}, global batch "
            f"{args.batch_size * env.world_size * args.grad_accum}, ops: "
            + ", ".join(f"{k}={v}" for k, v in raw_model.backend_plan(env.device).items())
        )
        for note in notes:
            print(f"init from {args.init}: {note}")

    last_epoch = args.epochs if args.stop_after is None else min(args.epochs, args.stop_after)
    bar = tqdm(
        total=(last_epoch - start_epoch) * len(train_loader),
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
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            if data.batch_augment is not None:
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
                if args.clip_grad:
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
            bar.write(
                f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.4f}, test loss {test_loss:.4f}, "
                f"top-1 {100 * top1:.2f}%, top-5 {100 * top5:.2f}%, {row['img_per_s']:.0f} img/s"
            )
        if stop:
            break
    bar.close()
    seconds = time.perf_counter() - started
    if env.is_main and history:
        write_metrics(output, history)
    return TrainResult(model=raw_model, history=history, config=config, data=data, output=output, seconds=seconds)


def _save(args, env, model, optimizer, scheduler, scaler, ema, epoch, num_updates, history, config, data) -> None:
    model_state, optim_state = _full_state_dicts(model, optimizer, args.fsdp)  # collective under FSDP
    rng = _gather_rng(env)  # collective when distributed
    if not env.is_main:
        return
    state = dict(
        epoch=epoch,
        num_updates=num_updates,
        optimizer=optim_state,
        scheduler=scheduler.state_dict(),
        scaler=scaler.state_dict(),
        rng=rng,
        history=history,
        args=vars(args),
    )
    metadata = dict(
        config=_json_safe(config),
        classes=data.classes,
        mean=data.mean,
        std=data.std,
        fastvit=fastvit.__version__,
        model=args.model,
    )
    ckpt.save_checkpoint(
        os.path.join(args.output, "checkpoint"),
        model_state,
        state,
        metadata,
        ema_state=ema.module.state_dict() if ema is not None else None,
    )


def main(argv: list[str] | None = None, prog: str = "python -m fastvit train") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_train_arguments(parser)
    args = parser.parse_args(argv)
    check_args(args, parser)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:  # bad data, checkpoint or option combination
        if os.environ.get("FASTVIT_DEBUG") == "1":
            raise
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    if result.history and (not dist.is_initialized() or dist.get_rank() == 0):
        last = result.history[-1]
        print(
            f"done in {result.seconds:.1f} s: test top-1 {100 * last['test_top1']:.2f}%; "
            f"checkpoint {os.path.join(args.output, 'checkpoint')}, metrics in {args.output}"
        )
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
