"""Experiment 8: optimisers on the same task.

Plain SGD, momentum, Nesterov momentum, Adam and RMSprop (the ones the chapter names) training the
same network on the same data with ``fb.train``, each at the best learning rate of a small fixed
grid: training loss and test accuracy per epoch, mean ± std over seeds.

Run: ``python experiments/optimizers.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import numpy as np  # noqa: E402

fb = C.fb

NAME = "optimizers"
TITLE = "SGD vs momentum vs Nesterov vs Adam vs RMSprop on the same task"

LR_GRID = {  # three values a factor √10 apart (a pilot run found every optimum at the top of
    # a grid one step lower, so the grids reach one step higher)
    "sgd": (0.1, 0.3, 1.0),
    "momentum": (0.01, 0.03, 0.1),
    "nesterov": (0.01, 0.03, 0.1),
    "adam": (1e-3, 3e-3, 1e-2),
    "rmsprop": (1e-3, 3e-3, 1e-2),
}

CONFIGS = {
    "smoke": dict(optimizers=("sgd", "adam"), lr_grid={"sgd": (0.01, 0.1), "adam": (3e-3,)},
                  hidden=(32,), epochs=2, seeds=1, batch_size=32),
    "quick": dict(optimizers=tuple(LR_GRID), lr_grid=LR_GRID, hidden=(128, 128), epochs=15, seeds=3,
                  batch_size=32),
    "full": dict(optimizers=tuple(LR_GRID),
                 lr_grid={"sgd": (0.003, 0.01, 0.03, 0.1, 0.3), "momentum": (0.001, 0.003, 0.01, 0.03, 0.1),
                          "nesterov": (0.001, 0.003, 0.01, 0.03, 0.1),
                          "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), "rmsprop": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)},
                 hidden=(128, 128), epochs=50, seeds=5, batch_size=32),
}


def run(cfg: dict, out: Path) -> C.Report:
    seeds = [cfg["seed"] + s for s in range(cfg["seeds"])]
    runs = {}  # (opt, lr) -> list over seeds
    for opt in cfg["optimizers"]:
        for lr in cfg["lr_grid"][opt]:
            recs = []
            for s in seeds:
                r = C.train(dataset="digits", hidden=tuple(cfg["hidden"]), activation="relu",
                            init="he_normal", optimizer=opt, lr=lr, batch_size=cfg["batch_size"],
                            epochs=cfg["epochs"], seed=s, checkpoint_every=0)
                recs.append(dict(train_loss=C.hist(r.history, "train_loss"),
                                 test_accuracy=C.hist(r.history, "test_accuracy"),
                                 diverged=bool(r.summary["diverged"]),
                                 final_train_loss=r.summary["final_train_loss"],
                                 final_test_accuracy=r.summary["test_accuracy"],
                                 config=r.summary["config"]))
            runs[(opt, lr)] = recs
            fl = np.array([np.nan if x["final_train_loss"] is None else x["final_train_loss"] for x in recs])
            print(f"  {opt} lr {lr:g}: final train loss {np.nanmean(fl):.4g}", flush=True)

    def mean_final(recs, key):
        v = np.array([np.nan if x[key] is None else x[key] for x in recs], float)
        return float(np.mean(v)), float(np.std(v))

    def late_loss(recs):
        """Mean over seeds of the mean training loss of the last three epochs (less noisy than
        the last epoch alone)."""
        return float(np.mean([np.mean(x["train_loss"][-3:]) for x in recs]))

    grid_rows, best = [], {}
    for (opt, lr), recs in runs.items():
        l_m, l_s = mean_final(recs, "final_train_loss")
        a_m, a_s = mean_final(recs, "final_test_accuracy")
        score = late_loss(recs)
        grid_rows.append([opt, lr, score, l_m, l_s, a_m, a_s, sum(x["diverged"] for x in recs)])
        score = score if np.isfinite(score) else np.inf
        if opt not in best or score < best[opt][1]:
            best[opt] = (lr, score)

    def epochs_to(curve, target):
        hit = np.nonzero(curve <= target)[0]
        return int(hit[0]) + 1 if hit.size else None

    target = cfg.get("target_loss", 0.01)
    best_rows = []
    for opt, (lr, _) in best.items():
        recs = runs[(opt, lr)]
        l_m, l_s = mean_final(recs, "final_train_loss")
        a_m, a_s = mean_final(recs, "final_test_accuracy")
        e = [epochs_to(x["train_loss"], target) for x in recs]
        e_txt = ("never" if all(v is None for v in e) else
                 f"{np.mean([v for v in e if v is not None]):.1f}" + ("" if all(v is not None for v in e) else " (some never)"))
        best_rows.append([opt, lr, best[opt][1], f"{l_m:.2e} ± {l_s:.1e}", C.pm(a_m, a_s), e_txt])

    fig, axes = C.figure(ncols=2, width=4.3, height=3.3)
    for opt, (lr, _) in best.items():
        curves = np.stack([x["train_loss"] for x in runs[(opt, lr)]])
        accs = np.stack([x["test_accuracy"] for x in runs[(opt, lr)]])
        ep = np.arange(1, curves.shape[1] + 1)
        axes[0, 0].semilogy(ep, np.mean(curves, axis=0), "o-", markersize=3, label=f"{opt} (lr {lr:g})")
        axes[0, 1].plot(ep, np.mean(accs, axis=0), "o-", markersize=3, label=f"{opt} (lr {lr:g})")
    axes[0, 0].set_xlabel("epoch", fontsize=8)
    axes[0, 0].set_ylabel("training loss (mean over seeds)", fontsize=8)
    axes[0, 1].set_xlabel("epoch", fontsize=8)
    axes[0, 1].set_ylabel("test accuracy", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig_name = C.save_figure(fig, out, "optimizers.png")

    claims = []
    if "sgd" in best:
        sgd_loss = best["sgd"][1]
        for opt in [o for o in best if o != "sgd"]:
            loss = best[opt][1]
            claims.append(C.Claim(
                f"{opt} optimises faster than plain SGD (lower training loss after the same epochs, "
                f"each at its best grid learning rate)",
                "supported" if loss < 0.5 * sgd_loss else
                "partly supported" if loss < sgd_loss else "not supported",
                f"training loss over the last 3 of {cfg['epochs']} epochs {loss:.3g} "
                f"(lr {best[opt][0]:g}) vs SGD {sgd_loss:.3g} (lr {best['sgd'][0]:g}); supported: "
                f"< ½ of SGD's, partly: lower"))
    setup = f"""
Data: digits (`fb.load_dataset("digits")` via `fb.train`, standardised). Network
`hidden={tuple(cfg['hidden'])}`, relu, he_normal, softmax + cross-entropy, batch {cfg['batch_size']},
{cfg['epochs']} epochs, float32, seeds {seeds}. `fb.train(optimizer=…, lr=…)` with optax's sgd,
sgd(momentum=0.9), sgd(momentum=0.9, nesterov=True), adam and rmsprop (default β's/decay), constant
learning rate. Note that heavy-ball momentum 0.9 with lr η takes steps of about η/(1 − 0.9) = 10η
once the velocity has built up, so momentum at 0.03 and SGD at 0.3 have the same long-run step. Learning-rate grid per optimiser (fixed in advance): {dict(cfg['lr_grid'])}; the
"best" learning rate is the one with the lowest training loss averaged over the last three epochs
and the seeds (this compares optimisation speed, so the choice uses the training loss, not the test
set). Epochs to loss
{target}: first epoch whose end-of-epoch training loss ≤ {target}.
"""
    tables = [
        C.Table("Each optimiser at its best learning rate (mean ± std over seeds)",
                ["optimizer", "lr", "train loss, last 3 epochs", "final train loss",
                 "final test accuracy", f"epochs to loss {target}"],
                best_rows),
        C.Table("Every learning rate of the grid",
                ["optimizer", "lr", "train loss, last 3 epochs", "final train loss", "± std",
                 "test accuracy", "± std", "diverged runs"],
                grid_rows, page=False),
    ]
    notes = []
    for opt, (lr, _) in best.items():
        grid = cfg["lr_grid"][opt]
        if len(grid) > 1 and lr in (min(grid), max(grid)):
            notes.append(f"{opt}: the best learning rate {lr:g} is at the edge of its grid {list(grid)}; "
                         "a value beyond it might be better.")
    raw = {"runs": {f"{o}|{lr}": recs for (o, lr), recs in runs.items()},
           "best_lr": {o: v[0] for o, v in best.items()}}
    return C.Report(setup=setup, tables=tables,
                    figures=[(fig_name, "training loss and test accuracy per epoch, each optimiser at its best lr")],
                    claims=claims, raw=raw, notes=notes)


def main(argv=None) -> int:
    return C.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
