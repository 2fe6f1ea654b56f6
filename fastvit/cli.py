"""What every ``python -m fastvit`` command shares: parsers that show their defaults and refuse abbreviations,
one-line errors with exit code 2, and one table-driven check of numeric options.

A bad argument prints ``prog: error: <what and why> (see prog --help)`` and exits with 2; an expected failure
while running (a bad checkpoint, a missing optional extra, a diverged run) prints ``prog: error: <one line>``
and exits with 2. ``FASTVIT_DEBUG=1`` re-raises those instead, with the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Iterator


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option's help where the default is a value (not None/False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with fastvit's conventions: no abbreviated long options (``--epoch`` is an
    error, not ``--epochs``), defaults in ``--help``, and errors as one line (no usage dump) and exit code 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse's hook for every parsing error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The ``dest`` names of the options ``argv`` sets explicitly (even to their default value)."""
    actions = [(action, action.default) for action in parser._actions if action.dest != "help"]
    for action, _ in actions:
        action.default = argparse.SUPPRESS  # an option not on the command line then leaves no attribute
    try:
        explicit = parser.parse_args(argv)
    finally:
        for action, default in actions:
            action.default = default
    return set(vars(explicit))


def is_main_process() -> bool:
    """Rank 0 under torchrun (or the only process): the one that prints warnings and notes."""
    return int(os.environ.get("RANK", "0")) == 0


def warn(prog: str, message: str) -> None:
    """A one-line warning on stderr, from the main process only."""
    if is_main_process():
        print(f"{prog}: warning: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# Numbers


@dataclasses.dataclass(frozen=True)
class Range:
    """Valid values of a numeric option: finite, within ``[low, high]`` (``low_open``/``high_open`` exclude
    the bound). ``None`` as an option's value means "not given" and is always valid."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {_num(self.high)}"
        return "a finite number"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


POSITIVE = Range(0, low_open=True)
AT_LEAST_ONE = Range(1)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1, high_open=True)  # [0, 1): dropout-like rates, label smoothing
SEED = Range(0, 2**32 - 1)  # numpy's and scikit-learn's seeds are 32-bit


def parse(parser: argparse.ArgumentParser, argv: list[str] | None, numbers: dict[str, Range]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, then the numeric options' ranges and ``--device`` (when the parser has one)."""
    args = parser.parse_args(argv)
    check_numbers(parser, args, numbers)
    if "device" in vars(args):
        check_device(parser, args.device)
    return args


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace, rules: dict[str, Range]) -> None:
    """``parser.error`` (one line, exit 2) for the first option in ``rules`` whose value is outside its range,
    NaN or infinite."""
    for dest, rule in rules.items():
        value = getattr(args, dest, None)
        if value is None or isinstance(value, bool):
            continue
        for number in value if isinstance(value, (list, tuple)) else (value,):  # (H, W) sizes of a resumed run
            if not rule.contains(number):
                flag = "--" + dest.replace("_", "-")
                parser.error(f"{flag} must be {rule.describe()}, got {number}")


# ------------------------------------------------------------------------------------------------
# Errors while running

# What a user can cause and fix: bad files and checkpoints, bad option combinations, missing optional extras,
# files in the way, and running out of memory. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    KeyError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    ImportError,
    MemoryError,
)


def one_line(exc: BaseException) -> str:
    """A one-line description of ``exc``: its message's first line; for an error re-raised from a DataLoader
    worker (whose message is a traceback), the original error's last line."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and type(exc).__str__ is KeyError.__str__:
        text = str(exc.args[0])  # KeyError's str() is the repr of its message
    else:
        text = str(exc)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if lines[0].startswith("Caught ") and " in DataLoader worker" in lines[0]:
        return lines[-1]
    return lines[0]


@contextlib.contextmanager
def errors_exit(
    parser: argparse.ArgumentParser, extra: tuple[type[BaseException], ...] = (), prefix: str = ""
) -> Iterator[None]:
    """Report :data:`USER_ERRORS` (and ``extra``) raised inside as one line (after ``prefix``) and exit code 2."""
    import torch

    try:
        yield
    except (*USER_ERRORS, torch.OutOfMemoryError, *extra) as exc:
        if os.environ.get("FASTVIT_DEBUG") == "1":
            raise
        parser.exit(2, f"{parser.prog}: error: {prefix}{one_line(exc)}\n")


def check_device(parser: argparse.ArgumentParser, device: str | None) -> None:
    """``--device``: 'cpu', 'cuda' or 'cuda:N', and a CUDA device must exist."""
    if device is None:
        return
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
        parser.error(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error(f"--device {device} was given but no CUDA device is available (use --device cpu)")
        if index and int(index) >= torch.cuda.device_count():
            parser.error(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s)")
