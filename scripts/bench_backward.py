#!/usr/bin/env python
"""Training-step time: hand-derived backward (``fb.manual_grad``) vs ``jax.grad``
(``fb.autodiff_grad``), side by side in one run.

A step is one jitted function: the gradient of the batch-mean loss, then the SGD update
``p ← p − lr · g``, with the parameters donated (or not, ``--no-donate``) — the same for both
paths, so the only difference is how the gradient is computed. Each repetition times ``--steps``
steps of each path back to back (the order alternates between repetitions), so slow drifts of
the machine hit both; the table reports the median over repetitions of the mean time per step,
their ratio manual / autodiff, and the median (with the interquartile range) of the per-repetition
ratios, which is the steadier figure on a shared machine. It also prints the ratios of flops and of
bytes accessed in XLA's cost model of the two compiled steps: the work each does, free of noise.

Goal (issue 2): ratio ≤ 1.02 at widths ≥ 512: it is the same arithmetic.

Examples::

    python scripts/bench_backward.py                    # the default sizes
    python scripts/bench_backward.py --quick            # small and fast (a smoke test)
    python scripts/bench_backward.py --sizes 784-512-512-10:256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_SIZES = "784-128-10:128,784-512-512-10:256,784-1024-1024-10:256"
QUICK_SIZES = "784-128-10:128,784-512-512-10:256"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def parse_sizes(text: str):
    """``"784-128-10:128,784-512-10:256"`` → ``[((784, 128, 10), 128), ...]``."""
    out = []
    for item in text.split(","):
        item = item.strip()
        widths, sep, batch = item.partition(":")
        try:
            sizes = tuple(int(w) for w in widths.split("-"))
            b = int(batch) if sep else 128
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--sizes: {item!r} is not WIDTH-WIDTH-...[:BATCH] (e.g. 784-512-10:256)"
            ) from None
        if len(sizes) < 2 or min(sizes) < 1 or b < 1:
            raise argparse.ArgumentTypeError(
                f"--sizes: {item!r} needs ≥ 2 widths ≥ 1 and a batch size ≥ 1"
            )
        out.append((sizes, b))
    return out


def _positive_int(name):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be ≥ 1, got {v}")
        return v

    return parse


def build_parser():
    p = _Parser(description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_sizes, default=None,
                   help=f"comma-separated WIDTHS:BATCH (default {DEFAULT_SIZES})")
    p.add_argument("--quick", action="store_true", help=f"fewer repetitions, sizes {QUICK_SIZES}")
    p.add_argument("--hidden", default="relu", help="hidden activation (default relu)")
    p.add_argument("--reps", type=_positive_int("--reps"), default=None,
                   help="repetitions per path (default 30, --quick 6)")
    p.add_argument("--steps", type=_positive_int("--steps"), default=None,
                   help="training steps per repetition (default 10, --quick 5)")
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate")
    p.add_argument("--no-donate", dest="donate", action="store_false",
                   help="do not donate the parameter buffers to the step")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON")
    return p


def make_step(fb, jax, net, grad_fn, lr, donate):
    def step(params, x, y):
        g = grad_fn(net, params, x, y)
        return jax.tree.map(lambda p, d: p - lr * d, params, g)

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def xla_cost(step, params, x, y) -> dict:
    """XLA's cost model of the compiled step: flops and bytes accessed (None if unavailable)."""
    try:
        ca = step.lower(params, x, y).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return {"flops": float(ca["flops"]), "bytes": float(ca["bytes accessed"])}
    except Exception:  # noqa: BLE001 - the cost model is optional and backend-dependent
        return {"flops": None, "bytes": None}


def time_steps(jax, step, params, x, y, steps):
    """Runs ``steps`` steps; returns (seconds per step, final params)."""
    jax.block_until_ready(params)
    t0 = time.perf_counter()
    for _ in range(steps):
        params = step(params, x, y)
    jax.block_until_ready(params)
    return (time.perf_counter() - t0) / steps, params


def bench_one(fb, jax, jnp, sizes, batch, args, reps, steps):
    net = fb.MLP(sizes, args.hidden, "softmax", "cross_entropy")
    key = jax.random.key(0)
    k_p, k_x, k_y = jax.random.split(key, 3)
    x = jax.random.normal(k_x, (batch, sizes[0]), jnp.float32)
    y = jax.random.randint(k_y, (batch,), 0, sizes[-1])
    steps_fn = {
        "manual": make_step(fb, jax, net, fb.manual_grad, args.lr, args.donate),
        "autodiff": make_step(fb, jax, net, fb.autodiff_grad, args.lr, args.donate),
    }
    params = {name: fb.init(k_p, net, "he_normal", dtype=jnp.float32) for name in steps_fn}
    # Same start, same arithmetic: one step of each agrees (a sanity check of the comparison).
    p0 = fb.init(k_p, net, "he_normal", dtype=jnp.float32)
    g_m, g_a = fb.manual_grad(net, p0, x, y), fb.autodiff_grad(net, p0, x, y)
    rel = max(
        float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))
        for a, b in zip(jax.tree.leaves(g_m), jax.tree.leaves(g_a))
    )
    cost = {name: xla_cost(step, params[name], x, y) for name, step in steps_fn.items()}
    for name, step in steps_fn.items():  # compile and warm up
        _, params[name] = time_steps(jax, step, params[name], x, y, 2)
    times = {name: [] for name in steps_fn}
    order = list(steps_fn)
    for r in range(reps):
        for name in order if r % 2 == 0 else order[::-1]:
            t, params[name] = time_steps(jax, steps_fn[name], params[name], x, y, steps)
            times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    # Each repetition's two timings are adjacent in time: their ratio cancels slow drifts of a
    # shared machine better than the ratio of the medians.
    paired = sorted(m / a for m, a in zip(times["manual"], times["autodiff"]))
    q = lambda f: paired[min(len(paired) - 1, int(f * len(paired)))]  # noqa: E731
    return {
        "sizes": list(sizes),
        "batch": batch,
        "manual_ms": 1e3 * med["manual"],
        "autodiff_ms": 1e3 * med["autodiff"],
        "ratio": med["manual"] / med["autodiff"],
        "paired_ratio_median": statistics.median(paired),
        "paired_ratio_iqr": [q(0.25), q(0.75)],
        "manual_ms_all": [1e3 * t for t in times["manual"]],
        "autodiff_ms_all": [1e3 * t for t in times["autodiff"]],
        "grad_rel_diff": rel,
        "xla_cost": cost,
        "flops_ratio": _ratio(cost["manual"]["flops"], cost["autodiff"]["flops"]),
        "bytes_ratio": _ratio(cost["manual"]["bytes"], cost["autodiff"]["bytes"]),
    }


def _ratio(a, b):
    return a / b if a is not None and b else None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    sizes = args.sizes or parse_sizes(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    reps = args.reps or (6 if args.quick else 30)
    steps = args.steps or (5 if args.quick else 10)

    import jax
    import jax.numpy as jnp

    import fnbackprop as fb

    try:
        fb.MLP((2, 2), args.hidden)
    except ValueError as e:
        sys.stderr.write(f"bench_backward.py: error: --hidden: {e}\n")
        return 2

    dev = jax.devices()[0]
    device = f"{dev.platform}: {getattr(dev, 'device_kind', '')}".strip()
    print(f"fnbackprop training-step benchmark: jax {jax.__version__}, {device}, "
          f"{platform.machine()} ({__import__('os').cpu_count()} CPUs); float32, "
          f"default matmul precision; hidden={args.hidden}, softmax + cross-entropy, SGD, "
          f"donate={args.donate}; median of {reps} reps × {steps} steps")
    head = (f"{'sizes':>22} {'B':>5} {'manual ms/step':>15} {'jax.grad ms/step':>17} "
            f"{'manual/grad':>12} {'paired ratio [IQR]':>26} {'flops ratio':>12} {'bytes ratio':>12}")
    print(head)
    print("-" * len(head))
    results = []
    for s, b in sizes:
        r = bench_one(fb, jax, jnp, s, b, args, reps, steps)
        results.append(r)
        lo, hi = r["paired_ratio_iqr"]
        paired = f"{r['paired_ratio_median']:.3f} [{lo:.3f}, {hi:.3f}]"
        fr = "n/a" if r["flops_ratio"] is None else f"{r['flops_ratio']:.4f}"
        br = "n/a" if r["bytes_ratio"] is None else f"{r['bytes_ratio']:.4f}"
        print(f"{'-'.join(map(str, s)):>22} {b:>5} {r['manual_ms']:>15.3f} {r['autodiff_ms']:>17.3f} "
              f"{r['ratio']:>12.3f} {paired:>26} {fr:>12} {br:>12}", flush=True)
    wide = [r for r in results if max(r["sizes"][1:-1] or [0]) >= 512]
    print("flops / bytes ratio: manual / jax.grad in XLA's cost model of the compiled step "
          "(the work each does, independent of timing noise)")
    if wide:
        worst = max(r["paired_ratio_median"] for r in wide)
        print(f"goal: manual/grad ≤ 1.02 at widths ≥ 512: worst paired median {worst:.3f} "
              f"({'met' if worst <= 1.02 else 'NOT met'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"jax": jax.__version__, "device": device, "cpus": __import__("os").cpu_count(),
                       "reps": reps, "steps": steps, "donate": args.donate, "results": results},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
