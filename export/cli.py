"""`camtrap-export`: the workstation commands. Each command lives in its own module, which
registers its sub-parser through ``add_cli(subparsers)``; heavy imports (torch, ultralytics)
happen inside the command functions so `--help` stays instant."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from edge.cli import use_defaults_formatter

log = logging.getLogger(__name__)

# module (under export/) -> registers one or more commands
COMMAND_MODULES = ["synth", "datasets", "train", "grouping", "experts", "pipeline", "bundle", "backbone", "evaluate",
                   "calibrate", "release", "update"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="camtrap-export", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"export.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"export.{name}":
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
        print(f"camtrap-export {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
