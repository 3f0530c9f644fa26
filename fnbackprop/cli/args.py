"""Argument types of the command line: each bad value becomes one line on stderr and exit 2."""

from __future__ import annotations

import argparse
import sys

__all__ = ["UsageError", "Parser", "Formatter", "parse_int_list", "positive_float",
           "positive_int", "rate", "probability"]


class UsageError(Exception):
    """A bad command-line value: reported as one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def parse_int_list(text: str, name: str, *, minimum: int = 1) -> tuple[int, ...]:
    """Parses ``"64,32"`` into ``(64, 32)``; raises :class:`UsageError` naming the bad item."""
    items = [t.strip() for t in str(text).split(",")]
    out = []
    for t in items:
        try:
            v = int(t)
        except ValueError:
            raise UsageError(
                f"{name}: {t!r} in {text!r} is not an integer (expected comma-separated integers)"
            ) from None
        if v < minimum:
            raise UsageError(f"{name}: {v} in {text!r} must be ≥ {minimum}")
        out.append(v)
    return tuple(out)


def positive_float(name: str, *, allow_zero: bool = False):
    """An argparse ``type`` for a finite float > 0 (or ≥ 0)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        ok = v >= 0 if allow_zero else v > 0
        if not ok or v != v or v == float("inf"):
            bound = "≥ 0" if allow_zero else "> 0"
            raise argparse.ArgumentTypeError(f"{name} must be a finite number {bound}, got {text}")
        return v

    return parse


def positive_int(name: str, *, allow_zero: bool = False):
    """An argparse ``type`` for an integer ≥ 1 (or ≥ 0)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < (0 if allow_zero else 1):
            raise argparse.ArgumentTypeError(
                f"{name} must be an integer ≥ {0 if allow_zero else 1}, got {v}"
            )
        return v

    return parse


def rate(name: str):
    """An argparse ``type`` for a rate in [0, 1)."""
    return _in_unit_interval(name, include_zero=True)


def probability(name: str):
    """An argparse ``type`` for a probability in (0, 1)."""
    return _in_unit_interval(name, include_zero=False)


def _in_unit_interval(name: str, *, include_zero: bool):
    interval = "[0, 1)" if include_zero else "(0, 1)"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (0.0 <= v < 1.0 if include_zero else 0.0 < v < 1.0):
            raise argparse.ArgumentTypeError(f"{name} must be in {interval}, got {text}")
        return v

    return parse
