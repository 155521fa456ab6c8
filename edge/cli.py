"""`camtrap-edge`: the device commands. Each command lives in its own module, which
registers its sub-parser through ``add_cli(subparsers)``; heavy imports (onnxruntime, tensorrt)
happen inside the command functions so `--help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

log = logging.getLogger(__name__)

# module (under edge/) -> registers one or more commands
COMMAND_MODULES = ["classify", "selftest", "commands.messages", "daemon", "commands.records", "config", "demo"]


def number_in(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number from ``low`` to ``high``. Plain ``float`` takes 'nan' and
    'inf', and nan compares false with everything: ``selftest --tolerance nan`` passed any model,
    ``demo --interval inf`` crashed in time.sleep."""

    def number(text: str) -> float:
        x = float(text)
        if not low <= x <= high:  # false for nan too
            raise argparse.ArgumentTypeError(f"must be a number from {low:.10g} to {high:.10g}, got {text!r}")
        return x

    return number


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number of ``low`` or more (``classify --batch 0`` crashed in
    range(), -5 wrote an empty results file)."""

    def number(text: str) -> int:
        n = int(text)
        if n < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {n}")
        return n

    return number


class DefaultsFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (unless it says its default itself, or is a switch
    or an empty list). Used by both command lines (`camtrap-edge`, `camtrap-export`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and action.default not in (None, [], argparse.SUPPRESS)
                and action.nargs != 0 and "default" not in text):
            text += " (default: %(default)s)"
        return text


def use_defaults_formatter(sub: argparse._SubParsersAction) -> None:
    """One help style for every command: descriptions as written, defaults shown."""
    for cmd in sub.choices.values():
        cmd.formatter_class = DefaultsFormatter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="camtrap-edge", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"edge.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"edge.{name}":
                continue  # command not built yet
            raise
        mod.add_cli(sub)
    use_defaults_formatter(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, OSError, ImportError) as e:  # input errors: one clear line, no traceback
        # OSError: a path that is a folder, unreadable or unwritable (its message names the path);
        # ImportError: a backend whose modules this machine lacks (e.g. pycuda off a Jetson).
        log.debug("%s failed", args.command, exc_info=True)
        print(f"camtrap-edge {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
