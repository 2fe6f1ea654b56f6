"""Command line: ``python -m fastvit {demo,train,eval,predict,explain,transfer,selftest,info} [options]``
(or ``fastvit ...``).

Each command has its own ``--help`` (with every option's default). A bad argument prints one line and exits
with code 2, as does an expected failure (a bad checkpoint or image, a missing optional extra).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fastvit import cli

COMMANDS = {
    "demo": "train the digits ViT, save it, print a throughput table",
    "train": "train / fine-tune / transfer (torchrun for several processes)",
    "eval": "top-1 accuracy and throughput of a checkpoint on a dataset",
    "predict": "top classes of image files",
    "explain": "attention-rollout PNG of an image",
    "transfer": "pre-train on digits 0-4, transfer to 5-9: probe vs fine-tune vs scratch",
    "selftest": "check every fused kernel on this GPU against the spec; record it so that 'auto' uses them",
    "info": "versions, devices and which fastvit backends can run here",
}
ENTRY_POINTS = {  # command -> (module, its main function)
    "demo": ("fastvit.demo", "demo_main"),
    "train": ("fastvit.train", "main"),
    "eval": ("fastvit.evaluate", "eval_main"),
    "predict": ("fastvit.evaluate", "predict_main"),
    "explain": ("fastvit.explain", "explain_main"),
    "transfer": ("fastvit.transfer", "transfer_main"),
    "selftest": ("fastvit.selftest_runner", "main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        parser = cli.Parser(
            prog="python -m fastvit",
            description=__doc__.split("\n\n")[0],
            epilog="commands:\n" + "\n".join(f"  {k:<9} {v}" for k, v in COMMANDS.items()),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument(
            "command", choices=list(COMMANDS), help="see the list below; COMMAND --help for its options"
        )
        parser.parse_args(argv[:1])  # prints the help, or the missing / unknown command as one line (exit 2)
    command, rest = argv[0], argv[1:]
    if command == "info":
        return info(rest)
    module, function = ENTRY_POINTS[command]  # imported on use: `info` and `--help` stay fast
    return getattr(importlib.import_module(module), function)(rest)


def make_info_parser() -> cli.Parser:
    return cli.Parser(prog="python -m fastvit info", description=COMMANDS["info"])


def info(argv: list[str] | None = None) -> int:
    import os
    import platform

    parser = make_info_parser()
    parser.parse_args(argv)

    import torch

    import fastvit

    print(f"fastvit {fastvit.__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    if torch.cuda.is_available():
        print(f"CUDA device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        print("CUDA device: none")
    source = "from FASTVIT_BACKEND" if os.environ.get("FASTVIT_BACKEND") else "built-in; set FASTVIT_BACKEND to change"
    with cli.errors_exit(parser):  # a bad FASTVIT_BACKEND value
        default = fastvit.get_default_backend()
    print(f"default backend: {default} ({source})")
    for report in fastvit.backends().values():
        print(report)
    from fastvit import verification

    print(verification.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
