#!/usr/bin/env python
"""Conv training step: hand-derived backward vs ``jax.grad`` of a ``lax.conv_general_dilated``
network, side by side in one run.

The network is the MNIST-1D CNN (input 40×1; Conv1D 25×5 relu; Conv1D 25×5 stride 2 relu;
Conv1D 25×5 stride 2 relu; Flatten; Dense 10 softmax; cross-entropy), float32, B=100 by default.
A step is the gradient and an Adam update (optax), jitted:

* ``manual``: :func:`fnbackprop.manual_grad` with the Conv1D implementation JAX's backend gets
  (``unfold`` on CPU: windows and matmuls; ``lax`` elsewhere: lax convolutions);
* ``manual_lax`` / ``manual_unfold``: the other implementation (``FNBACKPROP_CONV1D``), to show
  why each backend gets the one it gets;
* ``reference``: ``jax.grad`` of the same network written directly with
  ``lax.conv_general_dilated`` (the usual JAX recipe).

Two settings, each measured for every variant:

* ``call``: one jitted step per Python call (dispatch included);
* ``epoch``: ``--steps`` steps inside one jitted ``lax.scan`` over batches, as ``fb.train`` runs an
  epoch on device; reported per step.

Timing: compile and warm up every variant, then ``--reps`` rounds; each round times every
variant once (the order rotates), and the report is the median per step and the median of the
per-round ratios reference / variant (how many times faster than the reference). The gradients
of the variants are compared with the reference's first.

Goal: ``manual`` at least 2x faster than ``reference`` on CPU, and never slower on GPU.

Usage::

    python scripts/bench_conv.py                    # CPU defaults
    python scripts/bench_conv.py --batch 256 --json r.json --markdown r.md
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

import fnbackprop as fb  # noqa: E402
from _report import write_outputs  # noqa: E402
from fnbackprop.cli.args import positive_float, positive_int  # noqa: E402
from fnbackprop.layers import conv1d  # noqa: E402

LR = 1e-3


def mnist1d_cnn() -> fb.Network:
    return fb.Network(
        input_shape=(40, 1),
        layers=(fb.Conv1D(25, 5, 1, "SAME", "relu"), fb.Conv1D(25, 5, 2, "SAME", "relu"),
                fb.Conv1D(25, 5, 2, "SAME", "relu"), fb.Flatten(), fb.Dense(10, "softmax")),
        loss="cross_entropy")


def reference_loss(net: fb.Network, params, x, y):
    """The same network written with ``lax.conv_general_dilated``: the ``jax.grad`` reference."""
    a = x
    for layer, p in zip(net.layers, params):
        if isinstance(layer, fb.Conv1D):
            z = lax.conv_general_dilated(a, p["w"], (layer.stride,), layer.padding,
                                         dimension_numbers=("NWC", "WIO", "NWC"))
            a = jax.nn.relu(z + p["b"][None, None, :])
        elif isinstance(layer, fb.Flatten):
            a = a.reshape(a.shape[0], -1)
        else:
            logits = a @ p["w"] + p["b"][None, :]
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))


@contextlib.contextmanager
def conv_implementation(impl: str | None):
    """Sets ``FNBACKPROP_CONV1D`` while a variant is traced (``None``: the backend's default)."""
    old = os.environ.get("FNBACKPROP_CONV1D")
    if impl is not None:
        os.environ["FNBACKPROP_CONV1D"] = impl
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FNBACKPROP_CONV1D", None)
        else:
            os.environ["FNBACKPROP_CONV1D"] = old


def gradient_fns(net):
    """``name -> (implementation, grad(params, x, y))`` of every variant."""
    default = conv1d.implementation()
    other = "lax" if default == "unfold" else "unfold"
    manual = lambda p, x, y: fb.manual_grad(net, p, x, y)  # noqa: E731
    return {
        "reference": (None, jax.grad(lambda p, x, y: reference_loss(net, p, x, y))),
        "manual": (default, manual),
        f"manual_{other}": (other, manual),
    }


def compile_variants(net, params, xs, ys, grads):
    """Compiled ``call`` steps and ``epoch`` scans of every variant."""
    opt = optax.adam(LR)
    state = opt.init(params)
    compiled = {}
    for name, (impl, grad) in grads.items():

        def step(p, s, x, y, grad=grad):
            updates, s = opt.update(grad(p, x, y), s, p)
            return optax.apply_updates(p, updates), s

        def epoch(p, s, xs, ys, step=step):
            return lax.scan(lambda c, xy: (step(*c, *xy), None), (p, s), (xs, ys))[0]

        with conv_implementation(impl):
            compiled[name] = {
                "call": jax.jit(step).lower(params, state, xs[0], ys[0]).compile(),
                "epoch": jax.jit(epoch).lower(params, state, xs, ys).compile(),
            }
    return compiled, state


def check_gradients_agree(net, params, x, y, grads) -> dict[str, float]:
    """Max relative difference of each variant's gradient from the reference's."""
    out = {}
    ref = None
    for name, (impl, grad) in grads.items():
        with conv_implementation(impl):
            g = jax.jit(grad)(params, x, y)
        if ref is None:
            ref = g
        out[name] = max(float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))
                        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)))
    return out


def bench(net, batch, steps, reps, min_sample_ms, seed=0) -> dict:
    k_p, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    params = fb.init(k_p, net, "he_normal", dtype=jnp.float32)
    xs = jax.random.normal(k_x, (steps, batch, 40, 1), jnp.float32)
    ys = jax.random.randint(k_y, (steps, batch), 0, 10)
    grads = gradient_fns(net)
    agree = check_gradients_agree(net, params, xs[0], ys[0], grads)
    t0 = time.perf_counter()
    compiled, state = compile_variants(net, params, xs, ys, grads)
    compile_s = time.perf_counter() - t0

    def run(name, setting, n):
        p, s = params, state
        f = compiled[name][setting]
        for i in range(n):
            p, s = f(p, s, xs[i % steps], ys[i % steps]) if setting == "call" else f(p, s, xs, ys)
        jax.block_until_ready(p)

    names = list(grads)
    per_sample = {("call", v): 1 for v in names}
    for v in names:  # warm up; size the call samples
        for setting in ("call", "epoch"):
            run(v, setting, 2)
        t = time.perf_counter()
        run(v, "call", 3)
        one = (time.perf_counter() - t) / 3
        per_sample[("call", v)] = max(1, int(min_sample_ms / 1e3 / max(one, 1e-7)))
    samples = {(s, v): [] for s in ("call", "epoch") for v in names}
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for setting in ("call", "epoch"):
            for v in order:
                n = per_sample[("call", v)] if setting == "call" else 1
                t = time.perf_counter()
                run(v, setting, n)
                dt = time.perf_counter() - t
                samples[(setting, v)].append(dt / (n if setting == "call" else steps))
    result = {"batch": batch, "steps_per_epoch": steps, "reps": reps, "compile_s": compile_s,
              "grad_rel_diff_vs_reference": agree, "settings": {}}
    for setting in ("call", "epoch"):
        ms = {v: 1e3 * statistics.median(samples[(setting, v)]) for v in names}
        speedup = {v: statistics.median(r / m for r, m in zip(samples[(setting, "reference")],
                                                               samples[(setting, v)]))
                   for v in names if v != "reference"}
        result["settings"][setting] = {"ms_per_step": ms, "reference_over": speedup}
    return result


def markdown(result: dict) -> str:
    names = list(result["settings"]["call"]["ms_per_step"])
    lines = [
        f"Conv training step (MNIST-1D CNN, B={result['batch']}, float32, Adam) on "
        f"{result['device']} (JAX {result['jax']}, {result['cpu_count']} CPU cores); median of "
        f"{result['reps']} interleaved rounds; speed-up = reference time / variant time "
        "(median of per-round ratios).",
        "",
        "| setting | " + " | ".join(f"{n} ms" for n in names) + " | "
        + " | ".join(f"speed-up {n}" for n in names if n != "reference") + " |",
        "|---" * (2 * len(names)) + "|",
    ]
    for setting, s in result["settings"].items():
        label = "one step per call" if setting == "call" else (
            f"in an epoch (lax.scan of {result['steps_per_epoch']} steps)")
        lines.append(f"| {label} | " + " | ".join(f"{s['ms_per_step'][n]:.3f}" for n in names)
                     + " | " + " | ".join(f"**{s['reference_over'][n]:.2f}x**"
                                          for n in names if n != "reference") + " |")
    lines += ["", "Gradient vs reference (max relative difference): "
              + ", ".join(f"{k} {v:.1e}" for k, v in result["grad_rel_diff_vs_reference"].items()
                          if k != "reference")]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=positive_int("--batch"), default=100, help="batch size")
    p.add_argument("--steps", type=positive_int("--steps"), default=20,
                   help="steps per epoch in the lax.scan setting")
    p.add_argument("--reps", type=positive_int("--reps"), default=15, help="interleaved rounds")
    p.add_argument("--min-sample-ms", type=positive_float("--min-sample-ms"), default=50.0,
                   help="chain calls until a 'call' sample lasts this long")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    args = p.parse_args(argv)
    for path in (args.json, args.markdown):
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"folder of {path!r} does not exist")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dev = jax.devices()[0]
    result = bench(mnist1d_cnn(), args.batch, args.steps, args.reps, args.min_sample_ms)
    result.update(device=f"{dev.platform}: {dev.device_kind}", backend=jax.default_backend(),
                  jax=jax.__version__, python=platform.python_version(), cpu_count=os.cpu_count(),
                  default_implementation=conv1d.implementation())
    print(f"device {result['device']}, JAX {result['jax']}, {result['cpu_count']} CPU cores; "
          f"Conv1D implementation: {result['default_implementation']}")
    print(markdown(result))
    goal = result["settings"]["call"]["reference_over"]["manual"]
    epoch = result["settings"]["epoch"]["reference_over"]["manual"]
    want = 2.0 if result["backend"] == "cpu" else 1.0
    print(f"goal: manual ≥ {want:g}x the reference's speed: one step per call {goal:.2f}x "
          f"({'met' if goal >= want else 'NOT met'}), in an epoch {epoch:.2f}x "
          f"({'met' if epoch >= want else 'NOT met'})")
    write_outputs(args.json, args.markdown, result, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
