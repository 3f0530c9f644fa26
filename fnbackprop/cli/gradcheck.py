"""``fnbackprop gradcheck``: the gradient check of a network built from flags, on random data.

The network is an MLP (``--sizes n_0,...,n_L``), or, with ``--input-shape L,C``, a network on
``(L, C)`` inputs: the ``--conv`` layers (SAME padding, the hidden activation), a Flatten, then
Dense layers of the ``--sizes`` widths (the output width last).
"""

from __future__ import annotations

import json
import os

from fnbackprop.cli.args import (
    Formatter,
    UsageError,
    parse_int_list,
    positive_float,
    positive_int,
    rate,
)

__all__ = ["add_parser", "parse_conv"]

_MLP_SIZES = "16,32,32,10"
_DENSE_AFTER_CONV = "10"


def add_parser(sub) -> None:
    from fnbackprop.activations import HIDDEN_ACTIVATIONS, OUTPUT_ACTIVATIONS
    from fnbackprop.network import INIT_SCHEMES, LOSSES

    p = sub.add_parser(
        "gradcheck",
        help="compare the hand-derived gradient with jax.grad and finite differences",
        description="Builds a network and a random batch from the flags, then compares the "
        "hand-derived gradient with jax.grad and central finite differences, per layer and "
        "parameter. Exit status 0 when every row passes, 1 otherwise. Finite differences "
        "whose step crosses a kink of relu/leaky_relu/elu are skipped and counted.",
        formatter_class=Formatter,
    )
    p.add_argument("--sizes", default=None,
                   help=f"layer widths: an MLP's, input first (default {_MLP_SIZES}); with "
                   "--input-shape, the Dense widths after the Flatten, output last (default "
                   f"{_DENSE_AFTER_CONV})")
    p.add_argument("--input-shape", default=None, metavar="L,C",
                   help="per-example input (length, channels): a network of --conv layers, a "
                   "Flatten and Dense layers of --sizes (default: an MLP)")
    p.add_argument("--conv", default=None, metavar="C:K[:S],...",
                   help="Conv1D layers (needs --input-shape): C channels, kernel K, stride S "
                   "(default 1), SAME padding, the --hidden activation; e.g. 8:5,8:5:2")
    p.add_argument("--hidden", default="tanh", choices=HIDDEN_ACTIVATIONS, help="hidden activation")
    p.add_argument("--output", default="softmax", choices=OUTPUT_ACTIVATIONS, help="output activation")
    p.add_argument("--loss", default="cross_entropy", choices=LOSSES, help="loss")
    p.add_argument("--init", default="xavier_normal", choices=INIT_SCHEMES, help="init scheme")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=32, help="batch size")
    p.add_argument("--dtype", default="float64", choices=("float32", "float64"), help="dtype")
    p.add_argument("--l1", type=positive_float("--l1", allow_zero=True), default=0.0, help="L1 strength")
    p.add_argument("--l2", type=positive_float("--l2", allow_zero=True), default=0.0, help="L2 strength")
    p.add_argument("--dropout", type=rate("--dropout"), default=0.0,
                   help="dropout rate in [0, 1) (hidden Dense layers)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed")
    p.add_argument("--max-fd", type=positive_int("--max-fd"), default=64,
                   help="finite differences for at most this many entries per parameter array")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="also write the report as JSON (a file in an existing folder)")
    p.set_defaults(func=_cmd_gradcheck)


def parse_conv(text: str) -> tuple[tuple[int, int, int], ...]:
    """Parses ``"8:5,8:5:2"`` into ``((8, 5, 1), (8, 5, 2))`` (channels, kernel, stride)."""
    out = []
    for item in str(text).split(","):
        parts = item.strip().split(":")
        if len(parts) not in (2, 3):
            raise UsageError(f"--conv: {item.strip()!r} in {text!r} must be C:K or C:K:S")
        values = []
        for part in parts:
            try:
                v = int(part)
            except ValueError:
                raise UsageError(f"--conv: {part!r} in {item.strip()!r} is not an integer "
                                 "(expected C:K or C:K:S)") from None
            if v < 1:
                raise UsageError(f"--conv: {v} in {item.strip()!r} must be ≥ 1")
            values.append(v)
        out.append(tuple(values) + (1,) * (3 - len(values)))
    return tuple(out)


def _check_json_path(path: str) -> None:
    if os.path.isdir(path):
        raise UsageError(f"--json {path!r} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--json {path!r}: folder {folder!r} does not exist")


def _build_network(args, fb):
    """The network of the flags, and its one-line description."""
    if args.input_shape is None:
        if args.conv is not None:
            raise UsageError("--conv needs --input-shape L,C")
        sizes = parse_int_list(_MLP_SIZES if args.sizes is None else args.sizes, "--sizes")
        if len(sizes) < 2:
            raise UsageError(f"--sizes needs at least 2 widths (input and output), got {args.sizes!r}")
        net = fb.MLP(sizes, args.hidden, args.output, args.loss)
        return net, f"MLP{sizes}"
    shape = parse_int_list(args.input_shape, "--input-shape")
    if len(shape) != 2:
        raise UsageError(f"--input-shape must be L,C (length, channels), got {args.input_shape!r}")
    convs = parse_conv(args.conv) if args.conv is not None else ()
    sizes = parse_int_list(_DENSE_AFTER_CONV if args.sizes is None else args.sizes, "--sizes")
    layers = tuple(fb.Conv1D(c, k, s, "SAME", args.hidden) for c, k, s in convs)
    layers += (fb.Flatten(),) + tuple(fb.Dense(n, args.hidden) for n in sizes[:-1])
    layers += (fb.Dense(sizes[-1], args.output),)
    net = fb.Network(shape, layers, args.loss)
    conv = " ".join(f"conv{c}:{k}:{s}" for c, k, s in convs)
    return net, f"input {shape[0]}x{shape[1]} {conv + ' ' if conv else ''}flatten dense{sizes}"


def _cmd_gradcheck(args) -> int:
    if args.json:
        _check_json_path(args.json)
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import fnbackprop as fb

    try:  # e.g. --loss cross_entropy with --output sigmoid
        net, described = _build_network(args, fb)
    except ValueError as e:
        raise UsageError(str(e)) from None
    key = jax.random.key(args.seed)
    k_init, k_x, k_y, k_drop, k_fd = jax.random.split(key, 5)
    dtype = jnp.dtype(args.dtype)
    params = fb.init(k_init, net, args.init, dtype=dtype)
    x = jax.random.normal(k_x, (args.batch_size, *net.input_shape), dtype)
    if net.loss == "cross_entropy":
        y = jax.random.randint(k_y, (args.batch_size,), 0, net.output_size)
    else:
        y = jax.random.uniform(k_y, (args.batch_size, net.output_size), dtype)
    report = fb.check_gradients(
        net, params, x, y, l1=args.l1, l2=args.l2, dropout=args.dropout,
        key=k_drop if args.dropout > 0 else None, max_fd_per_param=args.max_fd, fd_key=k_fd,
    )
    print(f"gradient check: {described} hidden={args.hidden} output={args.output} "
          f"loss={net.loss} init={args.init} B={args.batch_size}")
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0 if report.passed else 1
