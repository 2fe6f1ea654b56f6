"""``python -m fastvit transfer``: pre-train on digits 0–4, transfer to 5–9, compare three ways of doing it.

1. pre-train the digits ViT on 0–4;
2. linear probe on 5–9: the pre-trained backbone frozen, only a new head trained;
3. full fine-tune on 5–9 from the pre-trained weights, with layer-wise LR decay;
4. the same model trained on 5–9 from scratch, for as many epochs as 2 and 3.

Each step is an ordinary ``python -m fastvit train`` run (the README lists the equivalent commands);
the table at the end compares their test accuracy on 5–9.
"""

from __future__ import annotations

import os

from fastvit import cli, train


def make_parser() -> cli.Parser:
    parser = cli.Parser(prog="python -m fastvit transfer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/transfer", help="folder of the four runs (replaced on each run)")
    parser.add_argument("--pretrain-epochs", type=int, default=60, help="epochs of the pre-training on 0-4")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of each transfer run")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (weights, data order, split)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def transfer_main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = cli.parse(parser, argv, {"pretrain_epochs": cli.AT_LEAST_ONE, "epochs": cli.AT_LEAST_ONE, "seed": cli.SEED})
    common = dict(seed=args.seed, quiet=args.quiet, overwrite=True)  # the folder holds the last transfer
    pretrain_dir = os.path.join(args.output, "pretrain_0-4")
    runs = [
        ("pre-train on 0-4", "-", dict(classes="0-4", epochs=args.pretrain_epochs, output=pretrain_dir)),
        (
            "linear probe",
            "0-4 weights, frozen",
            dict(
                classes="5-9",
                epochs=args.epochs,
                init=pretrain_dir,
                freeze_backbone=True,
                lr=1e-2,
                warmup_epochs=1,
                output=os.path.join(args.output, "linear_probe"),
            ),
        ),
        (
            "full fine-tune",
            "0-4 weights",
            dict(
                classes="5-9",
                epochs=args.epochs,
                init=pretrain_dir,
                lr=1e-3,
                layer_decay=0.75,
                warmup_epochs=1,
                output=os.path.join(args.output, "fine_tune"),
            ),
        ),
        (
            "from scratch",
            "random",
            dict(classes="5-9", epochs=args.epochs, output=os.path.join(args.output, "scratch")),
        ),
    ]
    rows = []
    for name, init, options in runs:
        print(f"\n== {name} ==")
        with cli.errors_exit(parser):
            result = train.run(train.default_args(**common, **options))
        trainable = sum(p.numel() for p in result.model.parameters() if p.requires_grad)
        best = max(h["test_top1"] for h in result.history)
        rows.append(
            (
                name,
                init,
                options["classes"],
                options["epochs"],
                trainable,
                result.history[-1]["test_top1"],
                best,
                result.seconds,
            )
        )
    lines = [
        "",
        "Transfer from digits 0-4 to 5-9 (test accuracy on the held-out 20% of the named digits):",
        "",
        "| run | init | digits | epochs | trainable params | final top-1 | best top-1 | time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, init, classes, epochs, trainable, final, best, seconds in rows:
        lines.append(
            f"| {name} | {init} | {classes} | {epochs} | {trainable:,} | {100 * final:.1f}% | "
            f"{100 * best:.1f}% | {seconds:.0f} s |"
        )
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.output, "transfer.md"), "w") as f:
        f.write(table.lstrip() + "\n")
    return 0
