"""The device's commands that are not a module's own job: argparse, file and ledger I/O and
printing, over pure modules that stay importable without side effects (``edge.messages``,
``edge.records``). Each module registers its sub-parsers through ``add_cli(subparsers)``
(edge/cli.py lists them)."""
