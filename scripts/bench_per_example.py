#!/usr/bin/env python
"""Per-example clipping vs a plain step vs vmap(jax.grad) clipping: time and compiled memory.

Every variant is one jitted *step*: a gradient and the SGD update ``params − lr · grad``, on the
same float32 network and batch:

* ``plain``: ``jax.grad`` of :func:`fnbackprop.loss` (the baseline);
* ``manual``: :func:`fnbackprop.manual_grad` (the hand-derived δ recursion);
* ``clipped``: :func:`fnbackprop.clipped_grad` (per-example clipping from ‖a‖·‖δ‖, C = 1);
* ``clipped_layer``: the same with ``per_layer=True``;
* ``dp``: ``clipped`` plus DP-SGD noise (``noise_multiplier=1``, a fresh key per step);
* ``vmap``: the usual JAX recipe: ``vmap(jax.grad)`` materialises the B × P per-example
  gradients, then norms, clipping and the mean. Skipped where it cannot fit (the 4096-wide GPU
  preset: B × P × 4 bytes is printed instead).

With ``--conv`` the network's convolutions are fnbackprop's Conv1D (windows and matmuls on
CPU), which ``plain`` and ``vmap`` differentiate too; two more variants write the same network
with ``lax.conv_general_dilated``, as a JAX user would:

* ``plain_lax``: ``jax.grad`` of that network;
* ``vmap_lax``: ``vmap(jax.grad)`` clipping of that network.

Timing: compile and warm up every variant, then ``--reps`` rounds; each round times every
variant once (the order rotates between rounds), each sample running ``inner`` chained steps
(chosen so that a plain sample lasts ≥ ``--min-sample-ms``) and blocking at the end. Reported:
the median per step. Memory: ``temp_size_in_bytes`` of XLA's compiled memory analysis (buffers
other than arguments and outputs), no run needed, of the step alone and of an epoch (a
``lax.scan`` of the step over 4 batches, as ``fb.train`` runs it). A step alone takes x as an
argument, so per-example clipping pays for one zeroed copy of the batch (non-finite and masked
rows are zeroed with ``jnp.where``); inside an epoch that copy is made in place.

Goals (issue 3): clipped / plain ≤ 1.2 on CPU (≤ 1.10 on GPU); vmap / clipped ≥ 10 on CPU
(≥ 30 at B=1024, width 1024 on GPU); compiled temp memory clipped / plain ≤ 1.1.
``--conv`` (the MNIST-1D CNN at B=256): clipped / plain ≤ 1.3, vmap / clipped ≥ 5, compiled temp
memory clipped / plain ≤ 1.2 (step alone), each also against the lax variants.

Usage::

    python scripts/bench_per_example.py                      # CPU: 784-512-512-10, B=256
    python scripts/bench_per_example.py --conv               # the MNIST-1D CNN, B=256
    python scripts/bench_per_example.py --gpu --json r.json --markdown r.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fnbackprop as fb  # noqa: E402
from _report import write_outputs  # noqa: E402
from fnbackprop.cli.args import UsageError, parse_int_list, positive_float, positive_int  # noqa: E402

CPU_PRESET = [((784, 512, 512, 10), 256, True)]
CONV_PRESET = [("cnn", 256, True)]
GPU_PRESET = [
    ((784, 1024, 1024, 1024, 10), 256, True),
    ((784, 1024, 1024, 1024, 10), 1024, True),
    ((784, 4096, 4096, 4096, 10), 4096, False),
]
VARIANTS = ("plain", "manual", "clipped", "clipped_layer", "dp", "vmap")
CONV_VARIANTS = ("plain_lax", "vmap_lax")  # --conv: the same network written with lax convolutions
LR = 0.01
CLIP = 1.0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit status 2
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def mnist1d_cnn() -> fb.Network:
    """The MNIST-1D CNN: 40×1 input, three Conv1D 25×5 relu (strides 1, 2, 2), Flatten, Dense 10."""
    return fb.Network(
        (40, 1), (fb.Conv1D(25, 5, 1, "SAME", "relu"), fb.Conv1D(25, 5, 2, "SAME", "relu"),
                  fb.Conv1D(25, 5, 2, "SAME", "relu"), fb.Flatten(), fb.Dense(10, "softmax")),
        "cross_entropy")


def make_net(sizes):
    """``"cnn"``: :func:`mnist1d_cnn`; else an MLP of these widths."""
    if sizes == "cnn":
        return mnist1d_cnn()
    return fb.MLP(sizes, hidden="relu", output="softmax", loss="cross_entropy")


def build_steps(net) -> dict:
    """The jitted steps ``(params, key, x, y) -> (new params, next key)`` of every variant.

    Only ``dp`` uses the key (split inside the step, so no step pays for host-side key work).
    """

    def sgd(params, grads):
        return jax.tree.map(lambda p, g: p - LR * g, params, grads)

    def plain(params, key, x, y):
        return sgd(params, jax.grad(lambda p: fb.loss(net, p, x, y))(params)), key

    def manual(params, key, x, y):
        return sgd(params, fb.manual_grad(net, params, x, y)), key

    def clipped(params, key, x, y):
        return sgd(params, fb.clipped_grad(net, params, x, y, CLIP)), key

    def clipped_layer(params, key, x, y):
        return sgd(params, fb.clipped_grad(net, params, x, y, CLIP, per_layer=True)), key

    def dp(params, key, x, y):
        key, sub = jax.random.split(key)
        return sgd(params, fb.clipped_grad(net, params, x, y, CLIP, noise_multiplier=1.0, key=sub)), key

    def vmap(params, key, x, y):
        g = fb.per_example_grads(net, params, x, y, method="vmap")  # B × P numbers
        return sgd(params, _clipped_mean(g, x.shape[0])), key

    fns = dict(plain=plain, manual=manual, clipped=clipped, clipped_layer=clipped_layer, dp=dp, vmap=vmap)
    if isinstance(net, fb.Network):
        from bench_conv import (
            reference_loss,  # the network written with lax.conv_general_dilated
        )

        def plain_lax(params, key, x, y):
            return sgd(params, jax.grad(lambda p: reference_loss(net, p, x, y))(params)), key

        def vmap_lax(params, key, x, y):
            g = jax.vmap(lambda x_i, y_i: jax.grad(
                lambda p: reference_loss(net, p, x_i[None], y_i[None]))(params))(x, y)
            return sgd(params, _clipped_mean(g, x.shape[0])), key

        fns.update(plain_lax=plain_lax, vmap_lax=vmap_lax)
    return {k: jax.jit(v) for k, v in fns.items()}


def _clipped_mean(g, batch):
    """Clipping of materialised per-example gradients (the vmap variants): norms, factors, mean."""
    norms = jnp.sqrt(sum(jnp.sum(v.reshape(batch, -1) ** 2, axis=1) for v in jax.tree.leaves(g)))
    c = jnp.where(norms > CLIP, CLIP / jnp.where(norms > CLIP, norms, 1.0), 1.0) / batch
    return jax.tree.map(lambda t: jnp.tensordot(c, t, axes=1), g)


def epoch_temp(step, params, key, x, y, batches=4):
    """Compiled temp memory of a ``lax.scan`` of ``step`` over ``batches`` batches."""
    xs = jnp.broadcast_to(x, (batches,) + x.shape)
    ys = jnp.broadcast_to(y, (batches,) + y.shape)

    def epoch(p, k, xs, ys):
        return jax.lax.scan(lambda c, xy: (step(*c, *xy), None), (p, k), (xs, ys))[0]

    mem = jax.jit(epoch).lower(params, key, xs, ys).compile().memory_analysis()
    return int(mem.temp_size_in_bytes) if mem is not None else None


def bench_config(sizes, batch, with_vmap, reps, min_sample_ms, seed=0) -> dict:
    net = make_net(sizes)
    k_p, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    params = fb.init(k_p, net, dtype=jnp.float32)
    x = jax.random.normal(k_x, (batch, *net.input_shape), jnp.float32)
    y = jax.random.randint(k_y, (batch,), 0, net.output_size)
    key = jax.random.key(seed + 1)
    steps = build_steps(net)
    variants = [v for v in VARIANTS + (CONV_VARIANTS if sizes == "cnn" else ())
                if with_vmap or not v.startswith("vmap")]
    vmap_bytes = batch * net.num_params * 4

    temp, temp_epoch = {}, {}
    compiled = {}
    for v in variants:
        c = steps[v].lower(params, key, x, y).compile()
        compiled[v] = c
        mem = c.memory_analysis()
        temp[v] = int(mem.temp_size_in_bytes) if mem is not None else None
        if v in ("plain", "clipped", "clipped_layer"):
            temp_epoch[v] = epoch_temp(steps[v], params, key, x, y)

    def run(v, n):
        p, k = params, key
        for _ in range(n):
            p, k = compiled[v](p, k, x, y)
        jax.block_until_ready(p)

    # Warm up, then choose the number of chained steps per sample from each variant's time.
    inner = {}
    for v in variants:
        run(v, 2)
        t0 = time.perf_counter()
        run(v, 1)
        one = time.perf_counter() - t0
        inner[v] = max(1, math.ceil(min_sample_ms / 1e3 / max(one, 1e-7)))
    for v in variants:
        if v.startswith("vmap") and jax.default_backend() == "cpu":
            inner[v] = 1  # seconds per step on CPU: one step is a long enough sample
    samples = {v: [] for v in variants}
    for r in range(reps):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            t0 = time.perf_counter()
            run(v, inner[v])
            samples[v].append((time.perf_counter() - t0) / inner[v])
    ms = {v: 1e3 * statistics.median(s) for v, s in samples.items()}
    spread = {
        v: [1e3 * float(np.percentile(s, 25)), 1e3 * float(np.percentile(s, 75))]
        for v, s in samples.items()
    }

    def ratio(a, b, table):
        return table[a] / table[b] if table.get(a) and table.get(b) else None

    ratios = {
        "clipped/plain": ratio("clipped", "plain", ms),
        "clipped_layer/plain": ratio("clipped_layer", "plain", ms),
        "dp/plain": ratio("dp", "plain", ms),
        "manual/plain": ratio("manual", "plain", ms),
        "vmap/clipped": ratio("vmap", "clipped", ms),
        "clipped/plain_lax": ratio("clipped", "plain_lax", ms),
        "vmap_lax/clipped": ratio("vmap_lax", "clipped", ms),
        "mem clipped/plain_lax": ratio("clipped", "plain_lax", temp),
        "mem clipped/plain": ratio("clipped", "plain", temp),
        "mem clipped_layer/plain": ratio("clipped_layer", "plain", temp),
        "mem vmap/plain": ratio("vmap", "plain", temp),
        "mem epoch clipped/plain": ratio("clipped", "plain", temp_epoch),
        "mem epoch clipped_layer/plain": ratio("clipped_layer", "plain", temp_epoch),
    }
    return {
        "sizes": sizes if sizes == "cnn" else list(sizes),
        "net": _name(sizes),
        "batch": batch,
        "num_params": net.num_params,
        "ms_per_step": ms,
        "ms_iqr": spread,
        "steps_per_sample": inner,
        "reps": reps,
        "temp_bytes": temp,
        "temp_bytes_epoch": temp_epoch,
        "ratios": ratios,
        "vmap_skipped": None if with_vmap else (
            f"vmap(jax.grad) would materialise B × P = {batch} × {net.num_params:,} float32 = "
            f"{vmap_bytes / 1e9:.0f} GB of per-example gradients"
        ),
        "vmap_materialised_bytes": vmap_bytes,
    }


def _fmt(v, spec="{:.2f}"):
    return "—" if v is None else spec.format(v)


def _name(sizes) -> str:
    return "MNIST-1D CNN" if sizes == "cnn" else "-".join(map(str, sizes))


def goals(result: dict, gpu: bool) -> list[tuple[str, bool]]:
    """(description, met) for the issue's goals that this run measures."""
    out = []
    for c in result["configs"]:
        conv = c["sizes"] == "cnn"
        name = f"{c['net']} B={c['batch']}"
        r = c["ratios"]
        time_goal = 1.3 if conv else (1.10 if gpu else 1.2)
        if r["clipped/plain"] is not None:
            out.append((f"{name}: clipped/plain {r['clipped/plain']:.2f} ≤ {time_goal}",
                        r["clipped/plain"] <= time_goal))
        if r["clipped/plain_lax"] is not None:
            out.append((f"{name}: clipped/plain_lax {r['clipped/plain_lax']:.2f} ≤ {time_goal}",
                        r["clipped/plain_lax"] <= time_goal))
        if r["vmap_lax/clipped"] is not None:
            out.append((f"{name}: vmap_lax/clipped {r['vmap_lax/clipped']:.1f} ≥ 5",
                        r["vmap_lax/clipped"] >= 5))
        if r["vmap/clipped"] is not None:
            want = 5 if conv else (
                30 if (gpu and c["batch"] == 1024 and max(c["sizes"][1:-1]) == 1024) else 10)
            out.append((f"{name}: vmap/clipped {r['vmap/clipped']:.1f} ≥ {want}",
                        r["vmap/clipped"] >= want))
        mem_goal = 1.2 if conv else 1.1
        for key, where in (("mem clipped/plain", "step alone"), ("mem epoch clipped/plain", "epoch")):
            if r[key] is not None:
                out.append((f"{name}: temp memory clipped/plain ({where}) {r[key]:.3f} ≤ {mem_goal}",
                            r[key] <= mem_goal))
    return out


def markdown(result: dict) -> str:
    lines = [
        f"Per-example clipping benchmark on {result['device']} (JAX {result['jax']}, "
        f"{result['cpu_count']} CPU cores; float32, relu/softmax/cross-entropy, SGD step; "
        f"median of {result['configs'][0]['reps']} interleaved rounds).",
        "",
        "| net | B | plain ms | clipped ms | clipped / plain | per-layer / plain | DP (noise) / plain "
        "| vmap ms | vmap / clipped | temp MB plain | temp clipped / plain | temp vmap / plain "
        "| epoch temp clipped / plain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["configs"]:
        ms, r, t = c["ms_per_step"], c["ratios"], c["temp_bytes"]
        vmap_ms = _fmt(ms.get("vmap"), "{:.1f}") if c["vmap_skipped"] is None else "skipped"
        mem_vmap = (_fmt(r["mem vmap/plain"], "{:.0f}x") if c["vmap_skipped"] is None
                    else f"(needs {c['vmap_materialised_bytes'] / 1e9:.0f} GB)")
        lines.append(
            f"| {c['net']} | {c['batch']} | {ms['plain']:.2f} | "
            f"{ms['clipped']:.2f} | **{_fmt(r['clipped/plain'])}** | {_fmt(r['clipped_layer/plain'])} | "
            f"{_fmt(r['dp/plain'])} | {vmap_ms} | **{_fmt(r['vmap/clipped'], '{:.1f}x')}** | "
            f"{_fmt(t['plain'] and t['plain'] / 1e6, '{:.1f}')} | {_fmt(r['mem clipped/plain'], '{:.3f}')} | "
            f"{mem_vmap} | {_fmt(r['mem epoch clipped/plain'], '{:.3f}')} |"
        )
    skipped = [c["vmap_skipped"] for c in result["configs"] if c["vmap_skipped"]]
    for s in skipped:
        lines += ["", f"vmap skipped: {s}; ours ran (the clipped column)."]
    lines += ["", "Goals:"] + [f"- [{'x' if ok else ' '}] {d}" for d, ok in result["goals"]]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true",
                   help="GPU preset: 784-1024x3-10 at B=256 and 1024, 784-4096x3-10 at B=4096 (no vmap)")
    p.add_argument("--conv", action="store_true",
                   help="the MNIST-1D CNN (40x1, 3 Conv1D 25x5 relu, Dense 10) at B=256 (--batch "
                   "for others); with --gpu: after the GPU preset")
    p.add_argument("--sizes", help="one network instead of the preset, e.g. 784,512,512,10")
    p.add_argument("--batch", help="batch sizes for --sizes, comma-separated (default 256)")
    p.add_argument("--no-vmap", action="store_true", help="skip the vmap(jax.grad) variant")
    p.add_argument("--reps", type=positive_int("--reps"), default=None,
                   help="interleaved rounds (default 15 on CPU, 30 with --gpu)")
    p.add_argument("--min-sample-ms", type=positive_float("--min-sample-ms"), default=None,
                   help="chain steps until a sample lasts this long (default 50 CPU, 20 GPU)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    args = p.parse_args(argv)
    try:
        if args.conv and args.sizes is not None:
            raise UsageError("--conv and --sizes are exclusive")
        if args.conv and args.gpu:  # the GPU preset, then the CNN
            if args.batch is not None:
                raise UsageError("--batch with --gpu --conv: give --conv alone")
            args.configs = [(s, b, v and not args.no_vmap) for s, b, v in GPU_PRESET + CONV_PRESET]
        elif args.conv:
            batches = parse_int_list(args.batch or "256", "--batch")
            args.configs = [("cnn", b, not args.no_vmap) for b in batches]
        elif args.sizes is not None:
            sizes = parse_int_list(args.sizes, "--sizes")
            if len(sizes) < 2:
                raise UsageError(f"--sizes needs at least 2 widths, got {args.sizes!r}")
            batches = parse_int_list(args.batch or "256", "--batch")
            args.configs = [(sizes, b, not args.no_vmap) for b in batches]
        else:
            if args.batch is not None:
                raise UsageError("--batch needs --sizes or --conv")
            preset = GPU_PRESET if args.gpu else CPU_PRESET
            args.configs = [(s, b, v and not args.no_vmap) for s, b, v in preset]
    except UsageError as e:
        p.error(str(e))
    for path in (args.json, args.markdown):
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"folder of {path!r} does not exist")
    args.reps = args.reps or (30 if args.gpu else 15)
    args.min_sample_ms = args.min_sample_ms or (20.0 if args.gpu else 50.0)
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    dev = jax.devices()[0]
    result = {
        "device": f"{dev.platform}: {dev.device_kind}",
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "configs": [],
    }
    print(f"device {result['device']}, JAX {result['jax']}, {result['cpu_count']} CPU cores", flush=True)
    for sizes, batch, with_vmap in args.configs:
        print(f"\n{_name(sizes)}  B={batch}", flush=True)
        c = bench_config(sizes, batch, with_vmap, args.reps, args.min_sample_ms)
        result["configs"].append(c)
        for v, t in c["ms_per_step"].items():
            lo, hi = c["ms_iqr"][v]
            mem = c["temp_bytes"][v]
            print(f"  {v:14s} {t:10.3f} ms/step  (IQR {lo:.3f}–{hi:.3f}, {c['steps_per_sample'][v]} steps/sample)"
                  f"  temp {mem / 1e6 if mem is not None else float('nan'):9.2f} MB")
        if c["vmap_skipped"]:
            print(f"  vmap           skipped: {c['vmap_skipped']}")
        for k, r in c["ratios"].items():
            if r is not None:
                print(f"  {k:26s} {r:8.3f}")
        result["goals"] = goals(result, jax.default_backend() == "gpu")
        write(args, result)  # after every configuration: a time limit keeps what finished
    print("\ngoals:")
    for d, ok in result["goals"]:
        print(f"  [{'met ' if ok else 'MISS'}] {d}")
    return 0


def write(args, result: dict) -> None:
    write_outputs(args.json, args.markdown, result, markdown)


if __name__ == "__main__":
    raise SystemExit(main())
