"""The ``fnbackprop`` command line.

Every bad value ends with one line on stderr naming the problem and exit status 2, before any
work is done and without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser", "UsageError", "parse_int_list"]


class UsageError(Exception):
    """A bad command-line value: reported as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
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

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not 0.0 <= v < 1.0:
            raise argparse.ArgumentTypeError(f"{name} must be in [0, 1), got {text}")
        return v

    return parse


# --- gradcheck --------------------------------------------------------------------------------
def _add_gradcheck(sub) -> None:
    from fnbackprop.activations import HIDDEN_ACTIVATIONS, OUTPUT_ACTIVATIONS
    from fnbackprop.network import INIT_SCHEMES, LOSSES

    p = sub.add_parser(
        "gradcheck",
        help="compare the hand-derived gradient with jax.grad and finite differences",
        description="Builds a network and a random batch from the flags, then compares the "
        "hand-derived gradient with jax.grad and central finite differences, per layer and "
        "parameter. Exit status 0 when every row passes, 1 otherwise.",
        formatter_class=_Formatter,
    )
    p.add_argument("--sizes", default="16,32,32,10", help="layer widths, input first")
    p.add_argument("--hidden", default="tanh", choices=HIDDEN_ACTIVATIONS, help="hidden activation")
    p.add_argument("--output", default="softmax", choices=OUTPUT_ACTIVATIONS, help="output activation")
    p.add_argument("--loss", default="cross_entropy", choices=LOSSES, help="loss")
    p.add_argument("--init", default="xavier_normal", choices=INIT_SCHEMES, help="init scheme")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=32, help="batch size")
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"), help="dtype")
    p.add_argument("--l1", type=positive_float("--l1", allow_zero=True), default=0.0, help="L1 strength")
    p.add_argument("--l2", type=positive_float("--l2", allow_zero=True), default=0.0, help="L2 strength")
    p.add_argument("--dropout", type=rate("--dropout"), default=0.0, help="dropout rate in [0, 1)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed")
    p.add_argument("--max-fd", type=positive_int("--max-fd"), default=64,
                   help="finite differences for at most this many entries per parameter array")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the report as JSON")
    p.set_defaults(func=_cmd_gradcheck)


def _cmd_gradcheck(args) -> int:
    sizes = parse_int_list(args.sizes, "--sizes")
    if len(sizes) < 2:
        raise UsageError(f"--sizes needs at least 2 widths (input and output), got {args.sizes!r}")
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import fnbackprop as fb

    net = fb.MLP(sizes, args.hidden, args.output, args.loss)
    key = jax.random.key(args.seed)
    k_init, k_x, k_y, k_drop, k_fd = jax.random.split(key, 5)
    dtype = jnp.dtype(args.dtype)
    params = fb.init(k_init, net, args.init, dtype=dtype)
    x = jax.random.normal(k_x, (args.batch_size, sizes[0]), dtype)
    if net.loss == "cross_entropy":
        y = jax.random.randint(k_y, (args.batch_size,), 0, sizes[-1])
    else:
        y = jax.random.uniform(k_y, (args.batch_size, sizes[-1]), dtype)
    report = fb.check_gradients(
        net, params, x, y, l1=args.l1, l2=args.l2, dropout=args.dropout,
        key=k_drop if args.dropout > 0 else None, max_fd_per_param=args.max_fd, fd_key=k_fd,
    )
    print(f"gradient check: MLP{sizes} hidden={net.hidden} output={net.output} loss={net.loss} "
          f"init={args.init} B={args.batch_size}")
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0 if report.passed else 1


# --- entry point ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every sub-command."""
    parser = _Parser(
        prog="fnbackprop",
        description="Backpropagation as explicit pure functions in JAX.",
        formatter_class=_Formatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_gradcheck(sub)
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
