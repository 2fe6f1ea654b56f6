"""Compare two benchmark runs of the same device: which benchmarks got slower or faster.

    python -m benchmarks.compare BASELINE.json NEW.json [--threshold 0.05] [--fail-on-regression]

Runs from different devices (or a GPU run against a CPU smoke run) are refused: their times say
nothing about each other. A benchmark is a regression when NEW's median is more than ``threshold``
slower than BASELINE's.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.report import load


def compare(old: dict, new: dict, threshold: float) -> tuple[list[str], int]:
    old_by_name = {b["fullname"]: b for b in old["benchmarks"] if b.get("stats")}
    new_by_name = {b["fullname"]: b for b in new["benchmarks"] if b.get("stats")}
    lines = ["| benchmark | baseline ms | new ms | new/baseline | |", "|---|---|---|---|---|"]
    regressions = 0
    for name in sorted(set(old_by_name) & set(new_by_name)):
        before, after = old_by_name[name]["stats"]["median"], new_by_name[name]["stats"]["median"]
        ratio = after / before
        flag = ""
        if ratio > 1 + threshold:
            flag, regressions = "REGRESSION", regressions + 1
        elif ratio < 1 - threshold:
            flag = "faster"
        lines.append(f"| {name.split('::')[-1]} | {1e3 * before:.3f} | {1e3 * after:.3f} | {ratio:.3f} | {flag} |")
    only_old = sorted(set(old_by_name) - set(new_by_name))
    only_new = sorted(set(new_by_name) - set(old_by_name))
    if only_old:
        lines.append(f"\nonly in the baseline: {', '.join(n.split('::')[-1] for n in only_old)}")
    if only_new:
        lines.append(f"\nonly in the new run: {', '.join(n.split('::')[-1] for n in only_new)}")
    return lines, regressions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline")
    parser.add_argument("new")
    parser.add_argument("--threshold", type=float, default=0.05, help="relative slowdown that counts (default 5%%)")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 when anything regressed")
    args = parser.parse_args(argv)
    try:
        old, new = load(args.baseline), load(args.new)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    old_device, new_device = old["machine_info"].get("device"), new["machine_info"].get("device")
    if old_device != new_device or old["machine_info"].get("smoke_mode") != new["machine_info"].get("smoke_mode"):
        parser.error(f"refusing to compare runs from different devices: {old_device!r} vs {new_device!r}")
    lines, regressions = compare(old, new, args.threshold)
    print(f"{args.baseline} -> {args.new} on {new_device} (threshold {100 * args.threshold:.0f}%)\n")
    print("\n".join(lines))
    print(f"\n{regressions} regression(s)")
    return 1 if regressions and args.fail_on_regression else 0


if __name__ == "__main__":
    sys.exit(main())
