"""The ``fnbackprop`` command line: ``gradcheck`` and ``train``.

Every bad value ends with one line on stderr naming the problem and exit status 2, before any
work is done and without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fnbackprop.cli import gradcheck as _gradcheck
from fnbackprop.cli import train as _train
from fnbackprop.cli.args import Formatter, Parser, UsageError, parse_int_list
from fnbackprop.cli.train import TRAIN_FIELDS

__all__ = ["main", "build_parser", "UsageError", "parse_int_list", "TRAIN_FIELDS"]


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command."""
    parser = Parser(
        prog="fnbackprop",
        description="Backpropagation as explicit pure functions in JAX.",
        formatter_class=Formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    _gradcheck.add_parser(sub)
    _train.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        sys.stderr.write(f"fnbackprop {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("fnbackprop: interrupted\n")
        return 130
