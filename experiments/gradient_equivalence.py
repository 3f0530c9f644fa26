"""Experiment 1: is the hand-derived backward pass the gradient?

Manual δ recursion (``fb.manual_grad``) vs ``jax.grad`` (``fb.autodiff_grad``) vs central finite
differences vs per-example gradients (``fb.per_example_grads``, outer products vs ``vmap(jax.grad)``),
for every hidden activation × output head × depth, in float64 and float32.

Run: ``python experiments/gradient_equivalence.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

fb = C.fb

NAME = "gradient_equivalence"
TITLE = "hand-derived backprop vs jax.grad vs finite differences vs per-example (vmap)"

HEADS = (  # (output activation, loss, output width)
    ("softmax", "cross_entropy", 5),
    ("sigmoid", "binary_cross_entropy", 3),
    ("identity", "mse", 2),
    ("sigmoid", "mse", 3),
)

CONFIGS = {
    "smoke": dict(activations=("sigmoid",), heads=2, depths=(2,), width=6, n_in=4,
                  batch=4, fd_per_array=4, jit=True),
    "quick": dict(activations=None, heads=4, depths=(1, 3), width=12, n_in=6, batch=8,
                  fd_per_array=8, jit=False),
    "full": dict(activations=None, heads=4, depths=(1, 2, 3, 5), width=16, n_in=8, batch=16,
                 fd_per_array=16, jit=False),
}


def _rel(err: np.ndarray, ref: np.ndarray) -> float:
    """max |err| / max |ref| (0 when both vanish)."""
    e = float(np.max(np.abs(err))) if err.size else 0.0
    s = float(np.max(np.abs(ref))) if ref.size else 0.0
    if s == 0:
        return 0.0 if e == 0 else float("inf")
    return e / s


def _per_array_rel(a_tree, ref_tree) -> float:
    """Largest per-array relative error (as fb.check_gradients defines it) over the pytree."""
    a_leaves = jax.tree_util.tree_leaves(a_tree)
    r_leaves = jax.tree_util.tree_leaves(ref_tree)
    return max(_rel(np.asarray(a, np.float64) - np.asarray(r, np.float64), np.asarray(r, np.float64))
               for a, r in zip(a_leaves, r_leaves))


def _fd_indices(params, per_array: int, rng) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Flat indices of a random subset of each array's entries, and each array's slice in it."""
    flat_sizes = []
    for p in params:  # ravel_pytree order: per layer, "b" then "w"
        for name in sorted(p):
            flat_sizes.append(int(np.prod(p[name].shape)))
    idx, spans, offset = [], [], 0
    for size in flat_sizes:
        k = min(per_array, size)
        pick = np.sort(rng.choice(size, k, replace=False)) + offset
        spans.append((len(idx), len(idx) + k))
        idx.extend(pick.tolist())
        offset += size
    return np.asarray(idx), spans


def _compute(net, params, x, y, idx, h):
    """Everything for one configuration: manual, jax.grad, per-example (both), FD at idx."""
    g_manual = fb.manual_grad(net, params, x, y)
    g_auto = fb.autodiff_grad(net, params, x, y)
    pe_manual = fb.per_example_grads(net, params, x, y, method="manual")
    pe_vmap = fb.per_example_grads(net, params, x, y, method="vmap")
    flat, unravel = ravel_pytree(params)
    loss_flat = lambda f: fb.loss(net, unravel(f), x, y)
    e = jnp.zeros((idx.shape[0], flat.shape[0]), flat.dtype).at[jnp.arange(idx.shape[0]), idx].set(h)
    fd = (jax.vmap(loss_flat)(flat[None, :] + e) - jax.vmap(loss_flat)(flat[None, :] - e)) / (2 * h)
    return g_manual, g_auto, pe_manual, pe_vmap, fd


_compute_jit = jax.jit(_compute, static_argnums=0)
# Compiling costs ~1 s per network on a 2-core CPU; run op by op (eager, same arithmetic), whose
# per-primitive compilations are cached across networks, when there are many networks.


def _targets(net, key, batch, dtype):
    if net.loss == "cross_entropy":
        return jax.random.randint(key, (batch,), 0, net.sizes[-1])
    if net.loss == "binary_cross_entropy":
        return jax.random.bernoulli(key, 0.5, (batch, net.sizes[-1])).astype(dtype)
    return jax.random.normal(key, (batch, net.sizes[-1]), dtype)


def check_one(act, head, depth, cfg, seed) -> dict:
    """All error measures for one activation × head × depth, float64 and float32."""
    out_act, loss_name, n_out = head
    sizes = (cfg["n_in"],) + (cfg["width"],) * depth + (n_out,)
    net = fb.MLP(sizes, act, out_act, loss_name)
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(f"{act}|{out_act}|{loss_name}|{depth}".encode()))
    k_p, k_x, k_y = jax.random.split(key, 3)
    p64 = fb.init(k_p, net, "xavier_normal", dtype=jnp.float64)
    x64 = jax.random.normal(k_x, (cfg["batch"], sizes[0]), jnp.float64)
    y64 = _targets(net, k_y, cfg["batch"], jnp.float64)
    rng = np.random.default_rng(seed)
    idx, spans = _fd_indices(p64, cfg["fd_per_array"], rng)
    row = {"activation": act, "output": out_act, "loss": loss_name, "depth": depth,
           "sizes": sizes}
    truth = None
    for dtype in (jnp.float64, jnp.float32):
        p = jax.tree_util.tree_map(lambda a: a.astype(dtype), p64)
        x = x64.astype(dtype)
        y = y64 if y64.dtype.kind in "iu" else y64.astype(dtype)
        flat = np.asarray(ravel_pytree(p)[0])
        h_scalar = float(np.finfo(np.dtype(dtype)).eps ** (1 / 3))
        h = jnp.asarray(h_scalar * np.maximum(1.0, np.abs(flat[idx])), dtype)
        compute = _compute_jit if cfg["jit"] else _compute
        gm, ga, pem, pev, fd = compute(net, p, x, y, jnp.asarray(idx), h)
        fm = np.asarray(ravel_pytree(gm)[0], np.float64)
        fa = np.asarray(ravel_pytree(ga)[0], np.float64)
        fd = np.asarray(fd, np.float64)
        # FD: per array, error over the checked entries / max |jax.grad| over the whole array.
        fa_tree = [np.asarray(l, np.float64).ravel() for l in ravel_leaves(ga)]
        rel_fd = 0.0
        for (s, e), ref in zip(spans, fa_tree):
            err = np.maximum(np.abs(fm[idx[s:e]] - fd[s:e]), np.abs(fa[idx[s:e]] - fd[s:e]))
            scale = max(float(np.max(np.abs(ref))), float(np.max(np.abs(fd[s:e]))))
            rel_fd = max(rel_fd, float(np.max(err)) / scale if scale > 0 else 0.0)
        tag = "f64" if dtype == jnp.float64 else "f32"
        row[f"{tag}_manual_vs_autodiff"] = _per_array_rel(gm, ga)
        row[f"{tag}_vs_fd"] = rel_fd
        row[f"{tag}_per_example_manual_vs_vmap"] = _per_array_rel(pem, pev)
        pe_mean = jax.tree_util.tree_map(lambda a: jnp.mean(a, axis=0), pem)
        row[f"{tag}_per_example_mean_vs_manual"] = _per_array_rel(pe_mean, gm)
        row[f"{tag}_finite"] = bool(np.all(np.isfinite(fm)))
        if dtype == jnp.float64:
            truth = ga
        else:
            row["f32_manual_vs_f64_truth"] = _per_array_rel(gm, truth)
            row["f32_autodiff_vs_f64_truth"] = _per_array_rel(ga, truth)
    return row


def ravel_leaves(tree):
    """Leaves in ravel_pytree order (per layer: b then w)."""
    return jax.tree_util.tree_leaves(tree)


def run(cfg: dict, out: Path) -> C.Report:
    with jax.enable_x64(True):  # float64 rows need it (float32 rows are explicit); scoped, so
        return _run(cfg, out)   # that a caller's JAX configuration is left as it was


def _run(cfg: dict, out: Path) -> C.Report:
    acts = cfg["activations"] or fb.HIDDEN_ACTIVATIONS
    heads = HEADS[: cfg["heads"]]
    rows = []
    for act in acts:
        for head in heads:
            for depth in cfg["depths"]:
                r = check_one(act, head, depth, cfg, cfg["seed"])
                rows.append(r)
                print(f"  {act:>10} {head[0]}+{head[1]:<20} depth {depth}: "
                      f"f64 manual/grad {r['f64_manual_vs_autodiff']:.1e} "
                      f"fd {r['f64_vs_fd']:.1e}  f32 manual/grad {r['f32_manual_vs_autodiff']:.1e}",
                      flush=True)

    cols = [
        ("f64_manual_vs_autodiff", "f64 manual vs jax.grad"),
        ("f64_vs_fd", "f64 vs FD"),
        ("f64_per_example_manual_vs_vmap", "f64 per-ex. manual vs vmap"),
        ("f64_per_example_mean_vs_manual", "f64 mean(per-ex.) vs manual"),
        ("f32_manual_vs_autodiff", "f32 manual vs jax.grad"),
        ("f32_vs_fd", "f32 vs FD"),
        ("f32_per_example_manual_vs_vmap", "f32 per-ex. manual vs vmap"),
        ("f32_manual_vs_f64_truth", "f32 manual vs f64 truth"),
        ("f32_autodiff_vs_f64_truth", "f32 jax.grad vs f64 truth"),
    ]

    def summary(group_key, label, page):
        groups = {}
        for r in rows:
            groups.setdefault(r[group_key] if group_key != "head" else f"{r['output']}+{r['loss']}", []).append(r)
        return C.Table(
            f"Max relative error by {label} (max over the other factors)",
            [label] + [c[1] for c in cols],
            [[g] + [max(r[c[0]] for r in rs) for c in cols] for g, rs in groups.items()],
            page=page,
        )

    overall = {c[0]: max(r[c[0]] for r in rows) for c in cols}
    tables = [
        C.Table("Overall maximum relative error over all configurations", ["measure", "max rel. error"],
                [[label, overall[k]] for k, label in cols]),
        summary("activation", "activation", page=True),
        summary("head", "head", page=False),
        summary("depth", "hidden layers", page=False),
        C.Table("Every configuration",
                ["activation", "head", "hidden layers"] + [c[1] for c in cols],
                [[r["activation"], f"{r['output']}+{r['loss']}", r["depth"]] + [r[c[0]] for c in cols]
                 for r in rows], page=False),
    ]

    # Figure: log10 error of manual vs jax.grad, f64 and f32, activation × head (max over depth).
    fig, axes = C.figure(ncols=2, width=4.6, height=3.8)
    head_names = [f"{h[0]}+{h[1]}" for h in heads]
    for ax, key, title in ((axes[0, 0], "f64_manual_vs_autodiff", "float64"),
                           (axes[0, 1], "f32_manual_vs_autodiff", "float32")):
        m = np.zeros((len(acts), len(heads)))
        for i, a in enumerate(acts):
            for j, hn in enumerate(head_names):
                vals = [r[key] for r in rows if r["activation"] == a and f"{r['output']}+{r['loss']}" == hn]
                m[i, j] = np.log10(max(max(vals), 1e-20))
        im = ax.imshow(m, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(heads)), [h.replace("+", "\n") for h in head_names], fontsize=6)
        ax.set_yticks(range(len(acts)), acts, fontsize=7)
        ax.set_title(f"log10 rel. error manual vs jax.grad ({title})", fontsize=8)
        fig.colorbar(im, ax=ax)
    fig_name = C.save_figure(fig, out, "errors_heatmap.png")

    tol64 = 1e-10
    ok64 = overall["f64_manual_vs_autodiff"] <= tol64
    fd_ok = overall["f64_vs_fd"] <= 1e-5
    pe_ok = overall["f64_per_example_manual_vs_vmap"] <= tol64 and overall["f64_per_example_mean_vs_manual"] <= tol64
    f32_same = overall["f32_manual_vs_f64_truth"] <= 10 * max(overall["f32_autodiff_vs_f64_truth"], 1e-7)
    claims = [
        C.Claim("Backprop (the δ recursion) computes the gradient: equals jax.grad to rounding",
                "supported" if ok64 else "not supported",
                f"float64 max rel. error {overall['f64_manual_vs_autodiff']:.1e} (tolerance {tol64:g}) "
                f"over {len(rows)} configurations"),
        C.Claim("…and equals finite differences (the definition of the derivative)",
                "supported" if fd_ok else "not supported",
                f"float64 max rel. error vs central differences {overall['f64_vs_fd']:.1e} "
                f"(FD truncation/rounding ≈ eps^(2/3) ≈ 4e-11 × curvature; tolerance 1e-5)"),
        C.Claim("Per-example gradients are the outer products a_i^(l-1) δ_i^l (= vmap(jax.grad)), "
                "and their mean is the batch gradient",
                "supported" if pe_ok else "not supported",
                f"float64 max rel. error {overall['f64_per_example_manual_vs_vmap']:.1e} (per-example), "
                f"{overall['f64_per_example_mean_vs_manual']:.1e} (mean)"),
        C.Claim("In float32 the manual gradient is as accurate as jax.grad",
                "supported" if f32_same else "not supported",
                f"vs the float64 gradient: manual {overall['f32_manual_vs_f64_truth']:.1e}, "
                f"jax.grad {overall['f32_autodiff_vs_f64_truth']:.1e}"),
    ]
    setup = f"""
Networks `fb.MLP((n_in,) + (width,)*depth + (n_out,), hidden, output, loss)` with
n_in = {cfg['n_in']}, width = {cfg['width']}, depth ∈ {list(cfg['depths'])} hidden layers,
hidden activation ∈ {list(acts)}, heads (output + loss) ∈ {head_names}; parameters from
`fb.init(key, net, "xavier_normal")` in float64 (cast to float32 for the float32 rows), inputs
x ~ N(0, 1) of batch {cfg['batch']}, random labels / 0-1 targets / normal targets. Seed {cfg['seed']}.

* *manual vs jax.grad*: `fb.manual_grad` vs `fb.autodiff_grad`; relative error of an array =
  max |difference| / max |jax.grad entry| (as `fb.check_gradients` defines it), maximum over arrays.
* *vs FD*: central differences of `fb.loss` with step eps^(1/3)·max(1, |θ|) at
  {cfg['fd_per_array']} random entries per array; the larger of the manual and jax.grad errors.
* *per-ex. manual vs vmap*: `fb.per_example_grads(method="manual")` (outer products
  a_i δ_iᵀ) vs `method="vmap"` (`vmap(jax.grad)`), all B per-example gradients.
* *mean(per-ex.) vs manual*: the batch mean of the per-example gradients vs `fb.manual_grad`.
* Computed {"under `jax.jit`" if cfg['jit'] else "op by op (eager; same arithmetic as under jit, compiles faster for many small networks)"}.
* *f32 … vs f64 truth*: the float32 gradients against the float64 jax.grad on the same parameters.
"""
    return C.Report(
        setup=setup, tables=tables,
        figures=[(fig_name, "log10 of the max relative error, manual vs jax.grad, per activation and head")],
        claims=claims, raw={"rows": rows, "overall": overall},
        notes=["float32 vs FD errors of ~1e-3–1e-2 are the finite-difference formula's own error in "
               "float32 (step ≈ 5e-3), not an error of either gradient: compare the "
               "'vs f64 truth' columns."],
    )


def main(argv=None) -> int:
    return C.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
