"""Command line: ``python -m fastvit {demo,train,eval,predict,explain,transfer,selftest,info} [options]``.

Each command has its own ``--help``. Bad arguments print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = {
    "demo": "train the digits ViT, save it, print a throughput table",
    "train": "train / fine-tune / transfer (torchrun for several processes)",
    "eval": "top-1/top-5 and throughput of a checkpoint on a dataset",
    "predict": "top classes of image files",
    "explain": "attention-rollout PNG of an image",
    "transfer": "pre-train on digits 0-4, transfer to 5-9: probe vs fine-tune vs scratch",
    "selftest": "check every fused kernel on this GPU against the spec; record it so that 'auto' uses them",
    "info": "versions, devices and which fastvit backends can run here",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = argparse.ArgumentParser(prog="python -m fastvit", description=__doc__.split("\n\n")[0])
        parser.add_argument("command", choices=list(COMMANDS), help="; ".join(f"{k}: {v}" for k, v in COMMANDS.items()))
        parser.parse_args(argv[:1])  # prints usage / the unknown-command error (exit 2)
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from fastvit import demo

        parser = argparse.ArgumentParser(prog="python -m fastvit demo", description=COMMANDS["demo"])
        demo.add_arguments(parser)
        result = demo.run(parser.parse_args(rest))
        return 0 if result["test_accuracy"] >= demo.TARGET_ACCURACY else 1
    if command == "train":
        from fastvit.train import main as train_main

        return train_main(rest)
    if command == "eval":
        from fastvit.inference import eval_main

        return eval_main(rest)
    if command == "predict":
        from fastvit.inference import predict_main

        return predict_main(rest)
    if command == "explain":
        from fastvit.explain import explain_main

        return explain_main(rest)
    if command == "transfer":
        from fastvit.transfer import transfer_main

        return transfer_main(rest)
    if command == "selftest":
        from fastvit.selftest_runner import main as selftest_main

        return selftest_main(rest)
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
    from fastvit import verification

    print(verification.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
