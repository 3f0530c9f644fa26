"""``fnbackprop gradcheck``: the gradient check of a network built from flags, on random data."""

from __future__ import annotations

import json

from fnbackprop.cli.args import Formatter, UsageError, parse_int_list, positive_float, positive_int, rate

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    from fnbackprop.activations import HIDDEN_ACTIVATIONS, OUTPUT_ACTIVATIONS
    from fnbackprop.network import INIT_SCHEMES, LOSSES

    p = sub.add_parser(
        "gradcheck",
        help="compare the hand-derived gradient with jax.grad and finite differences",
        description="Builds a network and a random batch from the flags, then compares the "
        "hand-derived gradient with jax.grad and central finite differences, per layer and "
        "parameter. Exit status 0 when every row passes, 1 otherwise.",
        formatter_class=Formatter,
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

    try:  # e.g. --loss cross_entropy with --output sigmoid
        net = fb.MLP(sizes, args.hidden, args.output, args.loss)
    except ValueError as e:
        raise UsageError(str(e)) from None
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
