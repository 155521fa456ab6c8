"""Every `camtrap-edge` command's --help shows each option's default."""

from __future__ import annotations

import argparse

from edge.cli import build_parser


def test_every_edge_help_shows_its_defaults():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        text = " ".join(parser.format_help().split())
        for a in parser._actions:
            if a.option_strings and a.nargs != 0 and a.default not in (None, [], argparse.SUPPRESS):
                help_text = " ".join(parser._get_formatter()._expand_help(a).split())
                assert "default" in help_text and help_text in text, (name, a.dest)
    classify = " ".join(sub.choices["classify"].format_help().split())
    assert "images per inference batch (default: 4)" in classify
