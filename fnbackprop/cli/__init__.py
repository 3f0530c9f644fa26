"""The ``fnbackprop`` command line: ``gradcheck`` and ``train``.

Exit status: 0 done; 1 the check failed (gradcheck) or training diverged (train); 2 bad input:
one line on stderr naming the problem, before any work and without a traceback (also a run that
does not fit in memory); 3 an unexpected internal error (with its traceback); 130/143 interrupted
by SIGINT/SIGTERM. Warnings are one line each on stderr.
"""

from __future__ import annotations

import argparse
import functools
import sys
import traceback
import warnings
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


INTERNAL_ERROR = 3
"""Exit status of an unexpected error (never 1, which means "failed check" or "diverged")."""


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    with warnings.catch_warnings():
        warnings.showwarning = functools.partial(_one_line_warning, args.command)
        try:
            return int(args.func(args) or 0)
        except UsageError as e:
            sys.stderr.write(f"fnbackprop {args.command}: error: {e}\n")
            return 2
        except KeyboardInterrupt:
            sys.stderr.write("fnbackprop: interrupted\n")
            return 130
        except Exception as e:  # noqa: BLE001 - the last resort: classify, never exit 1
            if "RESOURCE_EXHAUSTED" in str(e):
                first = next((l for l in str(e).splitlines() if "RESOURCE_EXHAUSTED" in l), "")
                sys.stderr.write(f"fnbackprop {args.command}: error: out of memory "
                                 f"({' '.join(first.split())[:200]}); use a smaller network or "
                                 "batch size\n")
                return 2
            traceback.print_exc()
            sys.stderr.write(f"fnbackprop {args.command}: internal error "
                             f"(exit status {INTERNAL_ERROR}); please report it with the "
                             "traceback above\n")
            return INTERNAL_ERROR


def _one_line_warning(command, message, category, filename, lineno, file=None, line=None):
    text = " ".join(str(message).split())
    sys.stderr.write(f"fnbackprop {command}: warning: {text}\n")
