"""Experiment 7: the cost of per-example gradient clipping.

Time per step and compiled memory of a clipped mean gradient ``(1/B) Σ_i min(1, C/‖g_i‖) g_i``:

* ``plain``: ``fb.manual_grad`` (no clipping: the reference cost of a step);
* ``ours``: ``fb.clipped_grad`` (norms from ‖a_i‖·‖δ_i‖, one weighted matmul per layer; no
  per-example gradient is materialised);
* ``outer``: ``fb.per_example_grads(method="manual")`` (materialised outer products) + clip;
* ``vmap``: ``vmap(jax.grad)`` per-example gradients (``fb.per_example_grads(method="vmap")``) + clip,
  the usual JAX recipe;

across batch sizes and widths, with a check that all clipped results agree.

Run: ``python experiments/per_example_cost.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

fb = C.fb

NAME = "per_example_cost"
TITLE = "time and memory of per-example clipping: ours vs vmap(jax.grad)"

METHODS = ("plain", "ours", "outer", "vmap")

CONFIGS = {
    "smoke": dict(batch_sizes=(8, 32), widths=(16,), depth=2, n_in=64, n_out=10, clip=1.0,
                  max_materialised=2e7, repeats=2, min_time=0.005),
    "quick": dict(batch_sizes=(16, 64, 256, 1024), widths=(64, 256, 1024), depth=2, n_in=64,
                  n_out=10, clip=1.0, max_materialised=6e7, repeats=3, min_time=0.05),
    "full": dict(batch_sizes=(32, 128, 512, 2048, 8192), widths=(128, 512, 2048), depth=2, n_in=64,
                 n_out=10, clip=1.0, max_materialised=2e9, repeats=5, min_time=0.1),
}


def _clip_mean(g, clip):
    """Mean over the leading axis of per-example gradients clipped to global norm ``clip``."""
    sq = sum(jnp.sum(l.reshape(l.shape[0], -1) ** 2, axis=1) for l in jax.tree_util.tree_leaves(g))
    norms = jnp.sqrt(sq)
    over = norms > clip
    c = jnp.where(over, clip / jnp.where(over, norms, 1.0), 1.0)
    return jax.tree_util.tree_map(
        lambda l: jnp.tensordot(c, l, axes=(0, 0)) / l.shape[0], g)


def make_fn(method, net, clip):
    if method == "plain":
        return lambda p, x, y: fb.manual_grad(net, p, x, y)
    if method == "ours":
        return lambda p, x, y: fb.clipped_grad(net, p, x, y, clip)
    if method == "outer":
        return lambda p, x, y: _clip_mean(fb.per_example_grads(net, p, x, y, method="manual"), clip)
    return lambda p, x, y: _clip_mean(fb.per_example_grads(net, p, x, y, method="vmap"), clip)


def _max_rel(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return max(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v))) for u, v in zip(la, lb))


def run(cfg: dict, out: Path) -> C.Report:
    dtype = jnp.float32
    results = []
    key = jax.random.key(cfg["seed"])
    for width in cfg["widths"]:
        sizes = (cfg["n_in"],) + (width,) * cfg["depth"] + (cfg["n_out"],)
        net = fb.MLP(sizes, "relu", "softmax", "cross_entropy")
        params = fb.init(key, net, "he_normal", dtype=dtype)
        for b in cfg["batch_sizes"]:
            kx, ky = jax.random.split(jax.random.fold_in(key, b))
            x = jax.random.normal(kx, (b, sizes[0]), dtype)
            y = jax.random.randint(ky, (b,), 0, sizes[-1])
            ref = None
            norms = np.asarray(fb.per_example_grad_norms(net, params, x, y))
            clipped = float(np.mean(norms > cfg["clip"]))  # share of examples the clip changes
            for method in METHODS:
                rec = dict(width=width, batch=b, method=method, num_params=net.num_params,
                           clipped_fraction=clipped)
                materialised = b * net.num_params
                if method in ("outer", "vmap") and materialised > cfg["max_materialised"]:
                    rec.update(skipped=f"B·P = {materialised:.2e} > {cfg['max_materialised']:.0e}")
                    results.append(rec)
                    continue
                t0 = time.perf_counter()
                compiled = jax.jit(make_fn(method, net, cfg["clip"])).lower(params, x, y).compile()
                rec["compile_s"] = time.perf_counter() - t0
                mem = compiled.memory_analysis()
                rec["temp_bytes"] = int(getattr(mem, "temp_size_in_bytes", -1)) if mem is not None else -1
                rec["peak_bytes"] = int(getattr(mem, "peak_memory_in_bytes", -1)) if mem is not None else -1
                rec["time_s"] = C.time_fn(compiled, params, x, y, repeats=cfg["repeats"],
                                          min_time=cfg["min_time"])
                g = compiled(params, x, y)
                if method == "vmap":
                    ref = g
                rec["_g"] = g
                results.append(rec)
            # agreement of the clipped gradients (vs vmap when it ran, else vs ours)
            base = ref if ref is not None else next(r["_g"] for r in results
                                                   if r["width"] == width and r["batch"] == b and r["method"] == "ours")
            for r in results:
                if r["width"] == width and r["batch"] == b and "_g" in r and r["method"] != "plain":
                    r["rel_err_vs_ref"] = _max_rel(r["_g"], base)
                    r["ref"] = "vmap" if ref is not None else "ours"
            line = "  ".join(f"{r['method']} {r['time_s'] * 1e3:.2f} ms" for r in results
                             if r["width"] == width and r["batch"] == b and "time_s" in r)
            print(f"  width {width} B {b}: {line}", flush=True)
    for r in results:
        r.pop("_g", None)

    def get(width, b, method, k):
        r = next(r for r in results if r["width"] == width and r["batch"] == b and r["method"] == method)
        return r.get(k, float("nan"))

    rows = []
    for width in cfg["widths"]:
        for b in cfg["batch_sizes"]:
            t = {m: get(width, b, m, "time_s") for m in METHODS}
            mem = {m: get(width, b, m, "temp_bytes") for m in METHODS}
            rows.append([width, b, get(width, b, "plain", "num_params"),
                         get(width, b, "plain", "clipped_fraction")]
                        + [t[m] * 1e3 for m in METHODS]
                        + [t["ours"] / t["plain"], t["vmap"] / t["ours"]]
                        + [mem[m] / 2**20 for m in METHODS]
                        + [max(get(width, b, m, "rel_err_vs_ref") for m in ("ours", "outer"))
                           if np.isfinite(t["vmap"]) else float("nan")])

    fig, axes = C.figure(ncols=2, width=4.3, height=3.4)
    styles = {"plain": "k:", "ours": "o-", "outer": "s--", "vmap": "^-."}
    # the widest network with at least two vmap measurements (the materialising methods are
    # skipped where B·P is too large)
    n_vmap = {w: sum(np.isfinite(get(w, b, "vmap", "time_s")) for b in cfg["batch_sizes"]) for w in cfg["widths"]}
    wmax = max((w for w in cfg["widths"] if n_vmap[w] >= 2), default=cfg["widths"][0])
    for method in METHODS:
        bs = [b for b in cfg["batch_sizes"] if np.isfinite(get(wmax, b, method, "time_s"))]
        axes[0, 0].loglog(bs, [get(wmax, b, method, "time_s") * 1e3 for b in bs], styles[method],
                          label=method, markersize=4)
        axes[0, 1].loglog(bs, [max(get(wmax, b, method, "temp_bytes"), 1) / 2**20 for b in bs],
                          styles[method], label=method, markersize=4)
    axes[0, 0].set_xlabel("batch size", fontsize=8)
    axes[0, 0].set_ylabel(f"ms per step (width {wmax})", fontsize=8)
    axes[0, 1].set_xlabel("batch size", fontsize=8)
    axes[0, 1].set_ylabel("compiled temp memory (MiB)", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig_name = C.save_figure(fig, out, "cost_vs_batch.png")

    fig, axes = C.figure(ncols=1, width=4.6, height=3.4)
    ax = axes[0, 0]
    for width in cfg["widths"]:
        bs = cfg["batch_sizes"]
        ax.semilogx(bs, [get(width, b, "ours", "time_s") / get(width, b, "plain", "time_s") for b in bs],
                    "o-", label=f"ours / plain, width {width}", markersize=4)
        vb = [b for b in bs if np.isfinite(get(width, b, "vmap", "time_s"))]
        ax.semilogx(vb, [get(width, b, "vmap", "time_s") / get(width, b, "plain", "time_s") for b in vb],
                    "^--", label=f"vmap / plain, width {width}", markersize=4)
    ax.axhline(1, color="k", lw=0.6)
    ax.set_yscale("log")
    ax.set_xlabel("batch size", fontsize=8)
    ax.set_ylabel("time relative to a plain step", fontsize=8)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig_ratio = C.save_figure(fig, out, "overhead_vs_plain.png")

    # --- claims -------------------------------------------------------------------------------------
    headers = (["width", "B", "P", "share clipped"] + [f"{m} ms" for m in METHODS]
               + ["ours/plain", "vmap/ours"] + [f"{m} MiB" for m in METHODS]
               + ["max rel. diff. ours/outer vs vmap"])
    col = {h: np.array([r[headers.index(h)] for r in rows], float) for h in headers}
    ratios_plain = col["ours/plain"][np.isfinite(col["ours/plain"])].tolist()
    speedups = col["vmap/ours"][np.isfinite(col["vmap/ours"])].tolist()
    errs = [e for e in col[headers[-1]] if np.isfinite(e)]
    big = [v for b, v in zip(col["B"], col["vmap/ours"]) if b == cfg["batch_sizes"][-1] and np.isfinite(v)]
    mem_ratio = [v / max(o, 1e-9) for v, o in zip(col["vmap MiB"], col["ours MiB"])
                 if np.isfinite(v) and o > 0]
    claims = [
        C.Claim("Per-example clipping costs about one plain step with the ‖a_i‖·‖δ_i‖ trick",
                "supported" if max(ratios_plain) < 2.0 else
                "partly supported" if np.median(ratios_plain) < 2.0 else "not supported",
                f"ours / plain time: median {np.median(ratios_plain):.2f}, max {max(ratios_plain):.2f} "
                f"(criterion < 2 everywhere; partly: median < 2)"),
        C.Claim("…and is faster than vmap(jax.grad) clipping, increasingly so for large B·P",
                "supported" if speedups and np.median(speedups) > 1 and
                (not big or max(big) >= np.median(speedups)) else "not supported",
                (f"vmap / ours time: median {np.median(speedups):.1f}×, range "
                 f"{min(speedups):.1f}–{max(speedups):.1f}×; compiled temp memory vmap / ours up to "
                 f"{max(mem_ratio) if mem_ratio else float('nan'):.0f}×") if speedups else "no vmap runs"),
        C.Claim("All methods compute the same clipped gradient",
                "supported" if errs and max(errs) < 1e-4 else "not supported",
                f"max relative difference {max(errs) if errs else float('nan'):.1e} (float32; criterion 1e-4)"),
    ]
    setup = f"""
Networks `fb.MLP(({cfg['n_in']},) + (width,)*{cfg['depth']} + ({cfg['n_out']},), "relu", "softmax",
"cross_entropy")`, width ∈ {list(cfg['widths'])}, he_normal, float32, random inputs x ~ N(0, 1) and
labels, batch B ∈ {list(cfg['batch_sizes'])}, clipping norm C = {cfg['clip']}. Each method is
`jax.jit(...).lower(...).compile()`d ahead of time (compilation is not timed); time = median
over {cfg['repeats']} samples of the compiled call (`block_until_ready`; each sample loops for at
least {cfg['min_time']} s) after one untimed call; "share clipped" = fraction of the batch whose
per-example gradient norm exceeds C (`fb.per_example_grad_norms`), i.e. where clipping changes
anything; memory = XLA's `memory_analysis()` temp buffer size of the compiled
program (scratch space beyond inputs and outputs). Methods: plain = `fb.manual_grad` (unclipped, the
cost of an ordinary step); ours = `fb.clipped_grad`; outer = materialised
`fb.per_example_grads(method="manual")` then clip; vmap = `fb.per_example_grads(method="vmap")`
(`vmap(jax.grad)`) then clip. The materialising methods are skipped where B·P > {cfg['max_materialised']:.0e}
numbers.
"""
    tables = [C.Table(
        "Time per step (ms), overheads, compiled temp memory (MiB)",
        headers, rows)]
    return C.Report(setup=setup, tables=tables,
                    figures=[(fig_name, f"time and compiled memory vs batch size (width {wmax})"),
                             (fig_ratio, "time of clipped steps relative to a plain step")],
                    claims=claims, raw={"results": results})


def main(argv=None) -> int:
    return C.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
