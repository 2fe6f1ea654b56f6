"""Command line: ``python -m fastvit {demo,info}``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastvit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from fastvit import demo

    demo_parser = commands.add_parser("demo", help="train a small ViT on the bundled digits and time it")
    demo.add_arguments(demo_parser)
    commands.add_parser("info", help="versions, devices and which fastvit backends can run here")

    args = parser.parse_args(argv)
    if args.command == "demo":
        result = demo.run(args)
        return 0 if result["test_accuracy"] >= demo.TARGET_ACCURACY else 1
    return info()


def info() -> int:
    import platform

    import torch

    import fastvit

    print(f"fastvit {fastvit.__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    if torch.cuda.is_available():
        print(f"CUDA device: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    else:
        print("CUDA device: none")
    print(f"default backend: {fastvit.get_default_backend()} (FASTVIT_BACKEND)")
    for report in fastvit.backends().values():
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
