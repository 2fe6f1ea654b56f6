"""``python -m fastvit demo``: train a small ViT on the bundled digits, save it, and time it against the reference.

Steps: train ``vit_digits_patch4_32`` (4 blocks, D=64, 4×4 patches) on scikit-learn's digits (8×8,
upsampled to 32×32) with the ``train`` command's defaults (AdamW, warm-up + cosine, label smoothing,
tqdm progress), report test accuracy, save a safetensors checkpoint, metrics and a PNG of the curves,
then print a side-by-side throughput table of fastvit and the reference implementations measured in
the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

import fastvit
from fastvit import cli, dispatch, train
from fastvit.data import DIGITS_NUM_CLASSES
from fastvit.model import OPS_USED, PRESETS, VisionTransformer

DEMO_PRESET = "vit_digits_patch4_32"
DEMO_MODEL = PRESETS[DEMO_PRESET]
TARGET_ACCURACY = 0.95


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=30, help="training epochs")
    parser.add_argument("-b", "--batch-size", type=int, default=64, help="batch size")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, data order and train/test split")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument(
        "--backend",
        default=None,
        choices=list(dispatch.BACKENDS),
        help="fastvit backend of the trained model (default: FASTVIT_BACKEND, else auto)",
    )
    parser.add_argument(
        "--output", default="runs/demo", help="folder for the checkpoint, metrics and plot (replaced on each run)"
    )
    parser.add_argument("--no-bench", action="store_true", help="skip the throughput table")
    parser.add_argument(
        "--bench-seconds", type=float, default=1.0, help="minimum timed seconds per measurement, in (0, 600]"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


DEMO_NUMBERS = {
    "epochs": cli.AT_LEAST_ONE,
    "batch_size": cli.AT_LEAST_ONE,
    "lr": cli.POSITIVE,
    "seed": cli.SEED,
    "bench_seconds": cli.Range(0, 600, low_open=True),
}


def make_parser() -> cli.Parser:
    parser = cli.Parser(prog="python -m fastvit demo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser


def demo_main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = cli.parse(parser, argv, DEMO_NUMBERS)
    with cli.errors_exit(parser):
        result = run(args)
    return 0 if result["test_accuracy"] >= TARGET_ACCURACY else 1


def run(args: argparse.Namespace) -> dict:
    """Train on the digits with the ``train`` command's engine, check the checkpoint, time the candidates."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(
        f"fastvit demo: {DEMO_PRESET} on the bundled digits (8x8 upsampled to 32x32, 4x4 patches: 64 tokens + "
        "class token); AdamW, warm-up + cosine, label smoothing"
    )
    options = dict(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=str(device),
        backend=args.backend,
        output=args.output,
        overwrite=True,  # the demo's folder holds the last demo
        quiet=args.quiet,
        model=DEMO_PRESET,
    )
    result = train.run(train.default_args(**options))
    model, last = result.model, result.history[-1]
    test_acc = last["test_top1"]
    verdict = "reached" if test_acc >= TARGET_ACCURACY else "MISSED"
    print(
        f"trained {args.epochs} epochs in {result.seconds:.1f} s: test accuracy {100 * test_acc:.1f}% "
        f"({verdict} the {100 * TARGET_ACCURACY:.0f}% target), test loss {last['test_loss']:.3f}"
    )

    reloaded = fastvit.load_run(args.output).to(device)
    test_loader = torch.utils.data.DataLoader(result.data.test, batch_size=256)
    reloaded_acc = train.evaluate(reloaded, test_loader, device)[1]
    if abs(reloaded_acc - test_acc) > 1e-9:
        raise RuntimeError(f"reloaded checkpoint scores {reloaded_acc:.4f}, the trained model {test_acc:.4f}")
    saved = [os.path.join(args.output, "checkpoint", "model.safetensors")]
    saved += [
        os.path.join(args.output, name) for name in ("curves.png",) if os.path.exists(os.path.join(args.output, name))
    ]
    print(f"saved {', '.join(saved)} and the metrics; fastvit.load_run({args.output!r}) reloads it (same accuracy)")
    summary = dict(
        test_accuracy=test_acc,
        test_loss=last["test_loss"],
        train_seconds=result.seconds,
        model=DEMO_MODEL,
        device=str(device),
    )
    if not args.no_bench:
        test_images = torch.stack([result.data.test[i][0] for i in range(64)])
        rows = throughput_table(model, test_images, device, min_run_time=args.bench_seconds)
        summary["throughput"] = rows
        print(format_throughput(rows, device))
    with open(os.path.join(args.output, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _plan_text(model: VisionTransformer, device: torch.device) -> str:
    return ", ".join(f"{op}={backend}" for op, backend in model.backend_plan(device).items())


def _candidates(model: VisionTransformer, device: torch.device) -> list[tuple[str, torch.nn.Module, str]]:
    """(name, module, note) for every implementation that can run on ``device``, same weights."""
    state = model.state_dict()
    out = []
    try:
        import timm.models.vision_transformer as timm_vit

        timm_model = timm_vit.VisionTransformer(**DEMO_MODEL).to(device)
        timm_model.load_state_dict(state)
        out.append(("timm eager", timm_model, f"timm {__import__('timm').__version__}"))
    except ImportError:
        pass
    reference = VisionTransformer(**DEMO_MODEL, backend="torch", weight_init="skip").to(device)
    reference.load_state_dict(state)
    out.append(("fastvit reference", reference, "backend='torch': the pure-PyTorch spec"))
    fused = VisionTransformer(**DEMO_MODEL, backend="auto", weight_init="skip").to(device)
    fused.load_state_dict(state)
    out.append(("fastvit auto", fused, _plan_text(fused, device)))
    for name in dispatch.FUSED_BACKENDS:  # a backend that covers every op runs the whole model
        try:
            dispatch.check_backend_supports(name, OPS_USED)
            all_fused = VisionTransformer(**DEMO_MODEL, backend=name, weight_init="skip").to(device)
            all_fused.backend_plan(device)
        except (ValueError, RuntimeError):
            continue
        all_fused.load_state_dict(state)
        out.append((f"fastvit {name}", all_fused, f"backend={name!r} for every op"))
    return out


def throughput_table(
    model: VisionTransformer,
    images: torch.Tensor,
    device: torch.device,
    min_run_time: float = 1.0,
    batch_size: int = 64,
) -> list[dict]:
    """Inference and training-step images/s of each candidate, timed in this process (median of blocks).

    Each candidate's logits are checked against the reference before it is timed: a fast but wrong
    candidate raises instead of appearing in the table.
    """
    benchmark = _import_torch_benchmark()
    x = images[:batch_size].to(device)
    labels = torch.randint(0, DIGITS_NUM_CLASSES, (batch_size,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    rows = []
    reference_logits = None
    for name, module, note in _candidates(model, device):
        module.eval()
        with torch.no_grad(), autocast:
            logits = module(x).float()
        if reference_logits is None:
            reference_logits = logits
        tolerance = 5e-2 if device.type == "cuda" else 1e-4  # bf16 autocast on GPU, fp32 on CPU
        error = (logits - reference_logits).abs().max().item()
        if error > tolerance:
            raise RuntimeError(f"{name}: logits differ from {rows[0]['name'] if rows else name} by {error:.3g}")

        def infer(module=module):
            with torch.no_grad(), autocast:
                module(x)

        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

        def train_step(module=module, optimizer=optimizer):
            module.train()
            with autocast:
                loss = torch.nn.functional.cross_entropy(module(x), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        results = {}
        for what, fn in (("infer", infer), ("train", train_step)):
            fn()  # warm-up (allocations, cuBLAS handles, autotuning)
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            results[what] = batch_size / timer.blocked_autorange(min_run_time=min_run_time).median
        rows.append(
            dict(name=name, note=note, infer_img_s=results["infer"], train_img_s=results["train"], max_logit_diff=error)
        )
    base = rows[0]
    for row in rows:
        row["infer_vs_first"] = row["infer_img_s"] / base["infer_img_s"]
        row["train_vs_first"] = row["train_img_s"] / base["train_img_s"]
    return rows


def _import_torch_benchmark():
    # torch.utils.benchmark imports torch.utils.cpp_extension, which logs a warning about CUDA_HOME
    # on machines without a GPU; it says nothing about timing, so keep it out of the demo's output.
    import logging

    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import benchmark
    finally:
        logger.setLevel(level)
    return benchmark


def format_throughput(rows: list[dict], device: torch.device) -> str:
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, bf16 autocast"
    else:
        where = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), fp32"
    lines = [
        "",
        f"Throughput, demo ViT (batch 64, 65 tokens, D=64) on {where}; torch {torch.__version__}.",
        "Median of timed blocks; speedups relative to the first row, all measured in this run.",
        "",
        f"| {'implementation':<18} | {'inference img/s':>15} | {'x':>5} | {'train step img/s':>16} | {'x':>5} | ops |",
        f"|{'-' * 20}|{'-' * 17}|{'-' * 7}|{'-' * 18}|{'-' * 7}|-----|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']:<18} | {r['infer_img_s']:>15,.0f} | {r['infer_vs_first']:>5.2f} | "
            f"{r['train_img_s']:>16,.0f} | {r['train_vs_first']:>5.2f} | {r['note']} |"
        )
    lines += ["", *closing_text(rows, device)]
    return "\n".join(lines)


def _ratio_text(ratio: float) -> str:
    if abs(ratio - 1) < 0.05:
        return f"about as fast as ({ratio:.2f}x)"
    return f"{ratio:.2f}x as fast as" if ratio > 1 else f"slower than ({ratio:.2f}x)"


def closing_text(rows: list[dict], device: torch.device) -> list[str]:
    """What the table shows, in words generated from its own numbers (so the text cannot contradict it)."""
    by_name = {row["name"]: row for row in rows}
    lines = []
    timm_row, reference = by_name.get("timm eager"), by_name.get("fastvit reference")
    if timm_row is not None and reference is not None:
        infer = reference["infer_img_s"] / timm_row["infer_img_s"]
        step = reference["train_img_s"] / timm_row["train_img_s"]
        lines.append(
            f"Measured here: the fastvit reference is {_ratio_text(infer)} timm eager at inference and "
            f"{_ratio_text(step)} it per training step."
        )
    if device.type != "cuda":
        lines.append(
            "No GPU here: fused Triton/CUDA kernels need CUDA tensors, so 'fastvit auto' runs the same PyTorch "
            "reference code as 'fastvit reference' for every op on CPU; differences between those two rows are "
            "timing noise, not a speedup."
        )
    return lines
