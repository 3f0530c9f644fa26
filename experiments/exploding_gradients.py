"""Experiment 4: exploding gradients with large initialisation, and three fixes.

Deep ReLU nets with ``fb.init(..., "normal")`` (w, b ~ N(0, 1)): per-layer gradient norms at
initialisation growing with depth until float32 overflows; then training with ``fb.train``:
the plain run, global-norm clipping (``clip_norm``), value clipping (``clip_value``) and Xavier
initialisation — loss curves, gradient norms, skipped (non-finite) steps.

Run: ``python experiments/exploding_gradients.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

fb = C.fb

NAME = "exploding_gradients"
TITLE = "exploding gradients with large init in deep nets; clipping and Xavier init as fixes"

INIT_SCHEMES = ("normal", "xavier_normal", "he_normal")

CONFIGS = {
    "smoke": dict(width=16, depths=(2, 8), n_measure=32, seeds=1, train_depth=4, epochs=2,
                  lr=0.01, clip_norm=1.0, clip_value=0.1, activation="relu",
                  variants=("clip_norm",), train_seeds=1),
    "quick": dict(width=64, depths=(1, 2, 4, 8, 16, 24, 32, 48, 64), n_measure=256, seeds=3,
                  train_depth=8, epochs=15, lr=0.01, clip_norm=1.0, clip_value=0.1,
                  activation="relu", train_seeds=3),
    "full": dict(width=128, depths=(1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80), n_measure=1000,
                 seeds=10, train_depth=10, epochs=60, lr=0.01, clip_norm=1.0, clip_value=0.1,
                 activation="relu", train_seeds=5),
}


def _grad_and_forward(net, params, x, y):
    """The gradient (float32), the loss, max |logit| and whether any z^l is non-finite."""
    g = fb.manual_grad(net, params, x, y)
    zs = fb.forward_trace(net, params, x).z
    forward_nonfinite = jnp.any(jnp.stack([jnp.any(~jnp.isfinite(z)) for z in zs]))
    return g, fb.loss(net, params, x, y), jnp.max(jnp.abs(zs[-1])), forward_nonfinite


def layer_norms(g) -> tuple[np.ndarray, bool]:
    """Per-layer ‖(∂L/∂W^l, ∂L/∂b^l)‖ computed in float64 on the host (so that squaring entries
    of ~1e20 does not overflow), and whether any gradient entry is itself non-finite."""
    norms, nonfinite = [], False
    for gl in g:
        w = np.asarray(gl["w"], np.float64)
        b = np.asarray(gl["b"], np.float64)
        nonfinite |= not (np.all(np.isfinite(w)) and np.all(np.isfinite(b)))
        norms.append(float(np.sqrt(np.sum(w * w) + np.sum(b * b))))
    return np.asarray(norms), bool(nonfinite)


def run(cfg: dict, out: Path) -> C.Report:
    data = C.load_digits()
    dtype = jnp.float32
    x = jnp.asarray(data.x_train[: cfg["n_measure"]], dtype)
    y = jnp.asarray(data.y_train[: cfg["n_measure"]])
    act = cfg["activation"]
    width = cfg["width"]
    seeds = [cfg["seed"] + s for s in range(cfg["seeds"])]

    # --- 1. at initialisation: gradient norm vs depth (float32) --------------------------------
    at_init = {}
    for scheme in INIT_SCHEMES:
        for depth in cfg["depths"]:
            net = fb.MLP((x.shape[1],) + (width,) * depth + (10,), act, "softmax", "cross_entropy")
            f = jax.jit(lambda p, net=net: _grad_and_forward(net, p, x, y))
            recs = [f(fb.init(jax.random.key(s), net, scheme, dtype=dtype)) for s in seeds]
            norms = [layer_norms(r[0]) for r in recs]
            per_layer = np.stack([n for n, _ in norms])
            with np.errstate(over="ignore", invalid="ignore"):
                total = np.sqrt(np.sum(per_layer**2, axis=1))
            at_init[(scheme, depth)] = dict(
                per_layer=per_layer, total=total,
                loss=np.array([float(r[1]) for r in recs]),
                max_logit=np.array([float(r[2]) for r in recs]),
                nonfinite=int(sum(bad for _, bad in norms)),
                forward_nonfinite=int(sum(bool(r[3]) for r in recs)),
            )

    def gm(v):
        v = np.asarray(v, np.float64)
        if not np.all(np.isfinite(v)):
            return float("nan") if np.any(np.isnan(v)) else float("inf")
        return float(np.exp(np.mean(np.log(np.maximum(v, 1e-300)))))

    init_rows = []
    for depth in cfg["depths"]:
        row = [depth]
        for scheme in INIT_SCHEMES:
            rec = at_init[(scheme, depth)]
            row += [gm(rec["total"]), gm(rec["max_logit"]),
                    f"{rec['forward_nonfinite']}/{len(seeds)}", f"{rec['nonfinite']}/{len(seeds)}"]
        init_rows.append(row)
    # growth factor per layer for "normal": slope of log ‖∇‖ vs depth over finite points
    finite_d = [d for d in cfg["depths"] if np.isfinite(gm(at_init[("normal", d)]["total"]))]
    growth = (float(np.exp(np.polyfit(finite_d, np.log([gm(at_init[("normal", d)]["total"]) for d in finite_d]), 1)[0]))
              if len(finite_d) >= 2 else float("nan"))
    first_overflow = next((d for d in cfg["depths"] if at_init[("normal", d)]["nonfinite"] > 0), None)
    first_fwd_overflow = next((d for d in cfg["depths"] if at_init[("normal", d)]["forward_nonfinite"] > 0), None)

    fig, axes = C.figure(ncols=2, width=4.2, height=3.3)
    for scheme, style in zip(INIT_SCHEMES, ("o-", "s--", "^:")):
        tot = [gm(at_init[(scheme, d)]["total"]) for d in cfg["depths"]]
        axes[0, 0].semilogy(cfg["depths"], np.where(np.isfinite(tot), tot, np.nan), style, label=scheme,
                            markersize=4)
    axes[0, 0].axhline(np.finfo(np.float32).max, color="r", lw=0.8, ls="--")
    axes[0, 0].text(cfg["depths"][0], np.finfo(np.float32).max / 1e6, "float32 max", color="r", fontsize=7)
    axes[0, 0].set_xlabel("hidden layers", fontsize=8)
    axes[0, 0].set_ylabel("‖∂L/∂θ‖ at init (missing: inf/NaN)", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    d_show = cfg["train_depth"] if cfg["train_depth"] in cfg["depths"] else cfg["depths"][-1]
    for scheme, style in zip(INIT_SCHEMES, ("o-", "s--", "^:")):
        pl = at_init[(scheme, d_show)]["per_layer"]
        with np.errstate(divide="ignore"):
            axes[0, 1].semilogy(range(1, pl.shape[1] + 1), np.exp(np.mean(np.log(pl), axis=0)), style,
                                label=scheme, markersize=4)
    axes[0, 1].set_xlabel(f"layer l ({d_show} hidden layers)", fontsize=8)
    axes[0, 1].set_ylabel("‖∂L/∂(W^l, b^l)‖ at init", fontsize=8)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig_init = C.save_figure(fig, out, "grad_norm_vs_depth.png")

    # --- 2. training: the plain run and three fixes ----------------------------------------------
    hidden = (width,) * cfg["train_depth"]
    variants = [
        ("normal init, no fix", dict(init="normal")),
        (f"normal init + clip_norm={cfg['clip_norm']}", dict(init="normal", clip_norm=cfg["clip_norm"])),
        (f"normal init + clip_value={cfg['clip_value']}", dict(init="normal", clip_value=cfg["clip_value"])),
        ("xavier_normal init, no clipping", dict(init="xavier_normal")),
        ("he_normal init, no clipping", dict(init="he_normal")),
    ]
    keys = ("none", "clip_norm", "clip_value", "xavier", "he")
    wanted = cfg.get("variants", keys)
    variants = [v for k, v in zip(keys, variants) if k in wanted]
    runs = {}
    n_seeds = cfg.get("train_seeds", 1)
    for label, kw in variants:
        per_seed = []
        for s in range(n_seeds):
            r = C.train(dataset="digits", hidden=hidden, activation=act, optimizer="sgd",
                        lr=cfg["lr"], batch_size=32, epochs=cfg["epochs"], seed=cfg["seed"] + s,
                        checkpoint_every=0, **kw)
            gn = [h.get("grad_norm") for h in r.history]
            per_seed.append(dict(
                train_loss=C.hist(r.history, "train_loss"),
                train_batch_loss=C.hist(r.history, "train_batch_loss"),
                test_accuracy=C.hist(r.history, "test_accuracy"),
                skipped=[int(h.get("skipped_steps", 0)) for h in r.history],
                steps=[int(h.get("steps", 0)) for h in r.history],
                grad_norm=[[np.nan if v is None else v for v in g] if g is not None else None
                           for g in gn],
                diverged=bool(r.summary["diverged"]), stop_reason=r.summary["stop_reason"],
                final_test_accuracy=r.summary["test_accuracy"],
                final_train_loss=r.summary["final_train_loss"],
                epochs_run=r.summary["epochs_run"], config=r.summary["config"],
            ))
            print(f"  {label} seed {cfg['seed'] + s}: diverged={per_seed[-1]['diverged']} "
                  f"final test acc {per_seed[-1]['final_test_accuracy']}", flush=True)
        # the first seed's curves, and every seed's outcome
        runs[label] = dict(per_seed[0], seeds=[
            {k: ps[k] for k in ("final_train_loss", "final_test_accuracy", "diverged", "epochs_run")}
            | {"skipped": sum(ps["skipped"])} for ps in per_seed])

    train_rows = []
    for label, rr in runs.items():
        gn0 = rr["grad_norm"][0]
        # NaN: fb.train logged a non-finite norm (e.g. ‖∂L/∂W‖ overflowing float32)
        g_first = float(np.sqrt(np.sum(np.square(np.asarray(gn0, np.float64))))) if gn0 else float("nan")
        sd = rr["seeds"]
        acc = np.array([np.nan if x["final_test_accuracy"] is None else x["final_test_accuracy"] for x in sd])
        fl = np.array([np.nan if x["final_train_loss"] is None else x["final_train_loss"] for x in sd])
        rr["mean_test_accuracy"] = float(np.mean(acc))
        rr["all_finite"] = not any(x["diverged"] for x in sd) and sum(x["skipped"] for x in sd) == 0
        train_rows.append([label, rr["train_loss"][0], float(np.exp(np.mean(np.log(fl)))),
                           C.pm(float(np.mean(acc)), float(np.std(acc))),
                           sum(x["skipped"] for x in sd), g_first,
                           f"{sum(x['diverged'] for x in sd)}/{len(sd)}"])

    fig, axes = C.figure(ncols=2, width=4.2, height=3.3)
    for label, rr in runs.items():
        ep = np.arange(1, len(rr["train_loss"]) + 1)
        axes[0, 0].semilogy(ep, rr["train_batch_loss"], "o-", markersize=3, label=label)
        axes[0, 1].plot(ep, rr["test_accuracy"], "o-", markersize=3, label=label)
    axes[0, 0].set_xlabel("epoch", fontsize=8)
    axes[0, 0].set_ylabel("mean training loss over the epoch's steps", fontsize=8)
    axes[0, 1].set_xlabel("epoch", fontsize=8)
    axes[0, 1].set_ylabel("test accuracy", fontsize=8)
    axes[0, 1].legend(fontsize=6)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig_train = C.save_figure(fig, out, "training_curves.png")

    # --- claims -----------------------------------------------------------------------------------
    base = runs.get("normal init, no fix")
    fixes = {label: runs[label] for label, _ in variants if label != "normal init, no fix"}
    xav_growth = [gm(at_init[("xavier_normal", d)]["total"]) for d in cfg["depths"]]
    he_growth = [gm(at_init[("he_normal", d)]["total"]) for d in cfg["depths"]]
    n_deep = gm(at_init[("normal", cfg["depths"][-1])]["total"])
    claims = [
        C.Claim("With large (N(0, 1)) weights the gradient grows exponentially with depth, up to "
                "overflow (inf/NaN in float32)",
                "supported" if growth > 2 and (first_overflow is not None or first_fwd_overflow is not None
                                               or not np.isfinite(n_deep))
                else "partly supported" if growth > 2 else "not supported",
                f"‖∂L/∂θ‖ grows ×{growth:.2f} per layer (fit over finite depths); first inf/NaN in "
                f"the forward pass at depth {first_fwd_overflow}, in the gradient at depth "
                f"{first_overflow}; Xavier/He stay within "
                f"{min(xav_growth + he_growth):.2g}–{max(xav_growth + he_growth):.2g}"),
    ]
    if base is not None:
        n_div = sum(x["diverged"] for x in base["seeds"])
        n_skip = sum(x["skipped"] for x in base["seeds"])
        claims.append(C.Claim(
            "Unfixed, training blows up (non-finite steps / divergence) or does not learn",
            "supported" if (n_div > 0 or n_skip > 0 or base["mean_test_accuracy"] < 0.5) else "not supported",
            f"{cfg['train_depth']} hidden layers, {n_seeds} seed(s): {n_div} diverged, {n_skip} skipped "
            f"steps, mean test accuracy {base['mean_test_accuracy']:.3f}; first seed: "
            f"{base['stop_reason']}"))
    base_acc = base["mean_test_accuracy"] if base is not None else 0.0
    for label, rr in fixes.items():
        ok = rr["all_finite"]
        acc = rr["mean_test_accuracy"]
        verdict = ("supported" if ok and acc >= 0.8 else
                   "partly supported" if ok and acc > base_acc + 0.05 else
                   "not supported")
        claims.append(C.Claim(
            f"Fix: {label} keeps training finite and makes the net learn",
            verdict,
            f"all steps finite: {ok}; mean test accuracy {acc:.3f} over {n_seeds} seed(s) vs "
            f"{base_acc:.3f} unfixed (supported: finite and ≥ 0.8; partly: finite and better than "
            f"unfixed by > 0.05)"))

    setup = f"""
Data: digits ({C.DIGITS_SOURCE}), standardised with training statistics. Networks `fb.MLP((64,) + ({width},)*depth + (10,),
"{act}", "softmax", "cross_entropy")`, float32.

**At initialisation**: depth ∈ {list(cfg['depths'])} hidden layers, schemes {list(INIT_SCHEMES)}
(normal: w, b ~ N(0, 1)), {len(seeds)} seeds; ‖∂L/∂θ‖ = norm of the whole gradient
(`fb.manual_grad`, batch of {int(x.shape[0])} training examples), geometric mean over seeds;
"max |logit|" shows the forward pass growing too. Norms are computed in float64 from the float32
gradient (so that squaring entries of 1e20 does not itself overflow); "inf/NaN" columns count seeds
whose float32 pre-activations z^l (forward) or gradient entries are non-finite. Expected growth with N(0, 1) weights and ReLU:
each layer multiplies the backward signal by about ‖W‖_F/√n · rms relu'(z) = √n · (1/√2) =
{np.sqrt(width / 2):.1f} (width {width}).

**Training**: `fb.train(dataset="digits", hidden={hidden}, activation="{act}", optimizer="sgd",
lr={cfg['lr']}, batch_size=32, epochs={cfg['epochs']})`, seeds {cfg['seed']}…{cfg['seed'] + n_seeds - 1}, with
(a) init="normal"; (b) + `clip_norm={cfg['clip_norm']}` (optax.clip_by_global_norm); (c) +
`clip_value={cfg['clip_value']}` (optax.clip, element-wise); (d) init="xavier_normal", no clipping;
(e) init="he_normal" (the scale matched to ReLU), no clipping.
fb.train skips a step whose loss or gradient is non-finite ("skipped steps") and stops a run whose
epoch-end training loss is non-finite ("diverged"), keeping the last good parameters.
"""
    tables = [
        C.Table("Gradient norm at initialisation vs depth (geometric mean over seeds)",
                ["hidden layers"] + [f"{s}: {k}" for s in INIT_SCHEMES
                                     for k in ("‖∂L/∂θ‖", "max |logit|", "inf/NaN in forward",
                                               "inf/NaN in gradient")], init_rows),
        C.Table(f"Training, {cfg['train_depth']} hidden layers of {width}, {n_seeds} seed(s)",
                ["variant", "train loss after epoch 1 (first seed)", "final train loss (geo. mean)",
                 "test accuracy (mean ± std)", "skipped steps (all seeds)",
                 "‖∂L/∂W‖ in epoch 1, first seed (mean over ok steps; NaN: non-finite)",
                 "diverged runs"],
                train_rows),
    ]
    raw = {"at_init": {f"{s}|{d}": v for (s, d), v in at_init.items()}, "growth_per_layer": growth,
           "first_overflow_depth": first_overflow, "first_forward_overflow_depth": first_fwd_overflow,
           "training": runs}
    return C.Report(setup=setup, tables=tables,
                    figures=[(fig_init, "gradient norm at initialisation vs depth, and per layer"),
                             (fig_train, "training curves (first seed): unfixed vs clip_norm vs clip_value vs Xavier vs He")],
                    claims=claims, raw=raw)


def main(argv=None) -> int:
    return C.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
