"""Experiment 5: regularisation on a small training set.

A net that can memorise a small subset of the digits / MNIST-1D data, trained with no regularisation, L2,
L1, dropout, early stopping, augmentation, and all of them together: train and test accuracy and
the generalisation gap (mean ± std over seeds), and first-layer weight histograms (L1 sparsity vs
L2 shrinkage).

Run: ``python experiments/regularization.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import numpy as np  # noqa: E402

fb = C.fb

NAME = "regularization"
TITLE = "regularisation on a small training set: L2, L1, dropout, early stopping, augmentation"

CONFIGS = {
    "smoke": dict(datasets=(("digits", 60),), hidden=(32,), epochs=3, seeds=1, l2=(0.1,), l1=(1e-4,), dropout=(0.5,),
                  patience=2, val_fraction=0.2, lr=1e-3, batch_size=32, only=("none", "L2 (0.1)", "all")),
    "quick": dict(datasets=(("digits", 200), ("mnist1d", 1000)), hidden=(256,), epochs=60, seeds=3, l2=(1e-3, 1e-2), l1=(1e-4, 1e-3),
                  dropout=(0.2, 0.5),
                  patience=10, val_fraction=0.2, lr=1e-3, batch_size=32),
    "full": dict(datasets=(("digits", 200), ("mnist1d", 1000)), hidden=(256, 256), epochs=200, seeds=10, l2=(1e-4, 1e-3, 1e-2),
                 l1=(1e-5, 1e-4, 1e-3), dropout=(0.2, 0.5), patience=20, val_fraction=0.2, lr=1e-3, batch_size=32),
}


def subset(ds, n: int, seed: int):
    """A stratified subset of n training examples (same classes in equal shares), test set kept."""
    rng = np.random.default_rng(seed)
    classes = np.unique(ds.y_train)
    per = n // len(classes)
    idx = np.concatenate([rng.choice(np.flatnonzero(ds.y_train == c), per, replace=False) for c in classes])
    rest = np.setdiff1d(np.arange(len(ds.y_train)), idx)
    extra = rng.choice(rest, n - len(idx), replace=False) if n > len(idx) else np.array([], int)
    idx = np.sort(np.concatenate([idx, extra]).astype(int))
    return dataclasses.replace(ds, x_train=np.asarray(ds.x_train[idx]), y_train=np.asarray(ds.y_train[idx]))


def _one_dataset(cfg: dict, out: Path, name: str, n_train: int):
    """Every variant on a subset of ``n_train`` examples of dataset ``name``."""
    full = fb.load_dataset(name)
    ds = subset(full, n_train, seed=0)
    variants = [("none", {})]
    variants += [(f"L2 ({v:g})", dict(l2=v)) for v in cfg["l2"]]
    variants += [(f"L1 ({v:g})", dict(l1=v)) for v in cfg["l1"]]
    variants += [(f"dropout ({v:g})", dict(dropout=v)) for v in cfg["dropout"]]
    variants += [
        (f"early stopping (patience {cfg['patience']})", dict(early_stopping=cfg["patience"],
                                                             val_fraction=cfg["val_fraction"])),
        ("augmentation", dict(augment=True)),
        ("all", dict(l2=cfg["l2"][0], l1=cfg["l1"][0], dropout=cfg["dropout"][-1], augment=True,
                     early_stopping=cfg["patience"], val_fraction=cfg["val_fraction"])),
    ]
    if cfg.get("only"):
        variants = [v for v in variants if v[0] in cfg["only"]]
    seeds = [cfg["seed"] + s for s in range(cfg["seeds"])]
    results, weights, curves = {}, {}, {}
    for label, kw in variants:
        recs = []
        for s in seeds:
            r = C.train(data=ds, hidden=tuple(cfg["hidden"]), activation="relu", init="he_normal",
                        optimizer="adam", lr=cfg["lr"], batch_size=cfg["batch_size"],
                        epochs=cfg["epochs"], seed=s, checkpoint_every=0, **kw)
            sm = r.summary
            recs.append(dict(train_acc=sm["final_train_accuracy"], test_acc=sm["test_accuracy"],
                             train_loss=sm["final_train_loss"], test_loss=sm["test_loss"],
                             epochs_run=sm["epochs_run"], best_epoch=sm["best_epoch"],
                             n_train=sm["n_train"], config=sm["config"]))
            if s == seeds[0]:
                weights[label] = np.asarray(r.params[0]["w"], np.float64).ravel()
                curves[label] = dict(train=C.hist(r.history, "train_accuracy").tolist(),
                                     test=C.hist(r.history, "test_accuracy").tolist())
        results[label] = recs
        ta = [x["train_acc"] for x in recs]
        te = [x["test_acc"] for x in recs]
        print(f"  {name} {label}: train {np.mean(ta):.3f} test {np.mean(te):.3f}", flush=True)

    rows = []
    summary = {}
    for label, recs in results.items():
        tr = np.array([x["train_acc"] for x in recs])
        te = np.array([x["test_acc"] for x in recs])
        gap = tr - te
        summary[label] = dict(train=tr.mean(), test=te.mean(), test_std=te.std(), gap=gap.mean(),
                              gap_std=gap.std())
        rows.append([label, C.pm(tr.mean(), tr.std()), C.pm(te.mean(), te.std()),
                     C.pm(gap.mean(), gap.std()),
                     f"{np.mean([x['epochs_run'] for x in recs]):.0f}", recs[0]["n_train"]])

    # weight statistics of the first layer
    w_stats = {label: dict(mean_abs=float(np.mean(np.abs(w))), rms=float(np.sqrt(np.mean(w**2))),
                           max_abs=float(np.max(np.abs(w))), below_1e3=float(np.mean(np.abs(w) < 1e-3)),
                           below_1e2=float(np.mean(np.abs(w) < 1e-2)))
               for label, w in weights.items()}
    w_rows = [[label] + list(st.values()) for label, st in w_stats.items()]

    fig, axes = C.figure(ncols=2, width=4.2, height=3.3)
    wmax = float(np.max([np.max(np.abs(w)) for w in weights.values()]))
    bins = np.linspace(-wmax, wmax, 121)
    hist_labels = [k for k in ("none", f"L2 ({cfg['l2'][-1]:g})", f"L1 ({cfg['l1'][-1]:g})", "all")
                   if k in weights][:3]
    for label in hist_labels:
        axes[0, 0].hist(np.clip(weights[label], bins[0], bins[-1]), bins=bins, histtype="step",
                        label=label, log=True)
    axes[0, 0].set_xlabel("first-layer weight w", fontsize=8)
    axes[0, 0].set_title(name, fontsize=9)
    axes[0, 0].set_ylabel("count (log)", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    lb = np.logspace(-7, 0, 71)
    for label in hist_labels:
        axes[0, 1].hist(np.clip(np.abs(weights[label]), lb[0], lb[-1]), bins=lb, histtype="step",
                        label=label)
    axes[0, 1].set_xscale("log")
    axes[0, 1].set_xlabel("|w| (first layer)", fontsize=8)
    axes[0, 1].set_ylabel("count", fontsize=8)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig_w = C.save_figure(fig, out, f"weight_histograms_{name}.png")

    fig, axes = C.figure(ncols=1, width=6.0, height=3.4)
    ax = axes[0, 0]
    labels = list(summary)
    pos = np.arange(len(labels))
    ax.bar(pos - 0.2, [summary[k]["train"] for k in labels], 0.4, label="train")
    ax.bar(pos + 0.2, [summary[k]["test"] for k in labels], 0.4,
           yerr=[summary[k]["test_std"] for k in labels], label="test")
    ax.set_xticks(pos, [k.replace(" (", "\n(") for k in labels], fontsize=6)
    lo = min(summary[k]["test"] for k in labels)
    ax.set_ylim(max(0.0, lo - 0.1), 1.01)
    ax.set_ylabel("accuracy", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title(f"{name}: {n_train} training examples", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig_acc = C.save_figure(fig, out, f"accuracy_{name}.png")

    # --- claims ---------------------------------------------------------------------------------
    none = summary.get("none")
    claims = [] if none is None else [C.Claim(
        f"{name}: without regularisation a big net memorises a small training set (train ≫ test)",
        "supported" if none["train"] > 0.95 and none["gap"] > 0.05 else "not supported",
        f"train {none['train']:.3f}, test {none['test']:.3f}, gap {none['gap']:.3f} (criterion: "
        f"train > 0.95 and gap > 0.05)")]
    for label in labels[1:] if none is not None else []:
        s = summary[label]
        # better test accuracy by more than the noise of the two means
        se = np.sqrt((s["test_std"] ** 2 + none["test_std"] ** 2) / len(seeds))
        d = s["test"] - none["test"]
        verdict = ("supported" if d > 2 * se and d > 0 else
                   "partly supported" if s["gap"] < none["gap"] and d > -2 * se else "not supported")
        claims.append(C.Claim(
            f"{name}: {label} improves test accuracy / narrows the gap",
            verdict,
            f"test {s['test']:.3f} vs {none['test']:.3f} (Δ {d:+.3f}, 2·s.e. {2 * se:.3f}); gap "
            f"{s['gap']:.3f} vs {none['gap']:.3f} (supported: Δ > 2 s.e.; partly: smaller gap, "
            f"test not worse by > 2 s.e.)"))
    k_l1 = f"L1 ({cfg['l1'][-1]:g})"
    k_l2 = f"L2 ({cfg['l2'][-1]:g})"
    if k_l1 in w_stats and k_l2 in w_stats and "none" in w_stats:
        w0, w1, w2 = w_stats["none"], w_stats[k_l1], w_stats[k_l2]
        claims.append(C.Claim(
            f"{name}: L1 drives many weights to (near) zero — sparsity; L2 shrinks all weights "
            "without zeroing them",
            "supported" if w1["below_1e2"] > 2 * w0["below_1e2"] and w2["rms"] < w0["rms"]
            and w2["below_1e2"] < w1["below_1e2"] else "not supported",
            f"fraction |w| < 0.01: none {w0['below_1e2']:.3f}, L2 {w2['below_1e2']:.3f}, L1 "
            f"{w1['below_1e2']:.3f}; rms w: none {w0['rms']:.3f}, L2 {w2['rms']:.3f}, L1 {w1['rms']:.3f}"))

    tables = [
        C.Table(f"{name}: accuracy with {n_train} training examples, mean ± std over {len(seeds)} "
                f"seeds (test set: {len(full.y_test)} examples)",
                ["variant", "train accuracy", "test accuracy", "gap (train − test)", "epochs run",
                 "examples trained on"], rows),
        C.Table(f"{name}: first-layer weights (first seed's run)",
                ["variant", "mean |w|", "rms w", "max |w|", "fraction |w| < 1e-3",
                 "fraction |w| < 1e-2"], w_rows),
    ]
    raw = {"runs": results, "summary": summary, "weight_stats": w_stats, "curves_seed0": curves,
           "n_train": n_train, "n_test": len(full.y_test), "augment_kind": full.augment_kind}
    figures = [(fig_acc, f"{name}: train and test accuracy per variant (error bars: std over seeds)"),
               (fig_w, f"{name}: first-layer weight histograms: {', '.join(hist_labels)}")]
    return tables, figures, claims, raw


def run(cfg: dict, out: Path) -> C.Report:
    tables, figures, claims, raw = [], [], [], {}
    for name, n_train in cfg["datasets"]:
        t, f, c, r = _one_dataset(cfg, out, name, n_train)
        tables += t
        figures += f
        claims += c
        raw[name] = r
    seeds = [cfg["seed"] + s for s in range(cfg["seeds"])]
    subsets = ", ".join(f"{n} examples of {name}" for name, n in cfg["datasets"])
    setup = f"""
Data: stratified subsets ({subsets}; `fb.load_dataset(name)`, subset seed 0, the same for every
run), passed as `fb.train(data=…)`; each dataset's full fixed test set. fb.train standardises with
the subset's statistics.
Network: `hidden={tuple(cfg['hidden'])}`, relu, he_normal, softmax + cross-entropy; Adam lr
{cfg['lr']}, batch {cfg['batch_size']}, {cfg['epochs']} epochs, float32, seeds {seeds} (init,
shuffling, dropout and augmentation; mean ± std over seeds).
Variants (fb.train settings): L2 `l2` ∈ {list(cfg['l2'])} (adds (l2/2)Σw², coupled into Adam's
gradient), L1 `l1` ∈ {list(cfg['l1'])} (adds l1·Σ|w|, subgradient sign(w)), `dropout` ∈
{list(cfg['dropout'])} (hidden units), `early_stopping={cfg['patience']}` with
`val_fraction={cfg['val_fraction']}` (so it trains on {1 - cfg['val_fraction']:.0%} of the subset and
returns the best-validation-loss epoch's parameters), `augment=True` (digits: random ±1-pixel
shifts + noise; mnist1d: random ±3-position shifts + noise), and all five together ("all":
l2={cfg['l2'][0]:g}, l1={cfg['l1'][0]:g}, dropout={cfg['dropout'][-1]:g}, augmentation, early
stopping). Train accuracy is on the examples trained on. The strengths are a grid fixed in advance
(every value is reported), not tuned.
"""
    return C.Report(setup=setup, tables=tables, figures=figures, claims=claims, raw=raw)


def main(argv=None) -> int:
    return C.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
