"""Experiment 2: full-batch gradient descent vs SGD (B = 1) vs mini-batches.

Same net, data and learning rate for every batch size: the variance of the gradient estimate
(exact, from per-example gradients, checked by sampling), examples/s, and the training loss
against epochs, updates and wall-clock time.

Run: ``python experiments/gd_sgd_minibatch.py [--quick] [--out DIR]``.
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

NAME = "gd_sgd_minibatch"
TITLE = "full batch vs SGD vs mini-batch: gradient noise, throughput, loss vs epochs and time"

CONFIGS = {
    "smoke": dict(hidden=(16,), batch_sizes=(8, "full"), var_batch_sizes=(1, 8, 64),
                  epochs=2, lrs=(0.05,), mc_batches=400, var_train_epochs=0, n_var=200),
    "quick": dict(hidden=(64,), batch_sizes=(1, 8, 32, 128, 512, "full"),
                  var_batch_sizes=(1, 2, 8, 32, 128, 512, 1024), epochs=10, lrs=(0.01, 0.05),
                  mc_batches=200, var_train_epochs=3, n_var=None),
    "full": dict(hidden=(64,), batch_sizes=(1, 8, 32, 128, 512, "full"),
                 var_batch_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), epochs=50,
                 lrs=(0.003, 0.01, 0.03, 0.1), mc_batches=1000, var_train_epochs=5, n_var=None),
}


def _flat_per_example(net, params, x, y):
    g = fb.per_example_grads(net, params, x, y, method="manual")
    return jnp.concatenate([jnp.concatenate([l["w"].reshape(x.shape[0], -1), l["b"]], axis=1) for l in g],
                           axis=1)


TIE = 1.2
"""Wall-clock margin: one kind of batch beats another only when the other takes at least this
factor longer (timings on a shared machine vary by tens of percent)."""


def batch_kind(b) -> str:
    """ "B=1", "full batch" or "mini-batch" for a batch size (an int, or "full")."""
    return "B=1" if str(b) == "1" else "full batch" if str(b) == "full" else "mini-batch"


def fastest_kind(times: dict) -> str:
    """Which kind of batch (:func:`batch_kind`) is fastest to the target: its name, "tie" (the
    best of another kind within :data:`TIE` of the winner) or "none reached it".

    Args:
      times: ``{batch size as text: seconds to the target (NaN: never)}``.
    """
    best = {}
    for b, t in times.items():
        if np.isfinite(t):
            best[batch_kind(b)] = min(t, best.get(batch_kind(b), np.inf))
    if not best:
        return "none reached it"
    order = sorted(best, key=best.get)
    if len(order) > 1 and best[order[1]] < TIE * best[order[0]]:
        return "tie"
    return order[0]


def variance_table(net, params, x, y, batch_sizes, mc_batches, seed):
    """Exact variance of the mini-batch mean gradient for each b, and a sampling check."""
    G = np.asarray(jax.jit(_flat_per_example, static_argnums=0)(net, params, x, y), np.float64)
    n = G.shape[0]
    g_bar = G.mean(axis=0)
    # check: the mean of the per-example gradients is the batch gradient
    g_full = fb.manual_grad(net, params, x, y)
    flat_full = np.concatenate([np.concatenate([np.asarray(l["w"]).ravel(), np.asarray(l["b"])])
                                for l in g_full])
    mean_err = float(np.max(np.abs(flat_full - g_bar)) / np.max(np.abs(g_bar)))
    s2 = float(np.mean(np.sum((G - g_bar[None, :]) ** 2, axis=1)))  # (1/N) Σ ‖g_i − ḡ‖²
    rng = np.random.default_rng(seed)
    rows = []
    for b in batch_sizes:
        if b > n:
            continue
        exact = s2 / b * (n - b) / (n - 1)
        with_repl = s2 / b
        # more draws for small b, whose squared deviations are heavy-tailed (a few examples with
        # large gradients dominate) and cheap to draw
        reps = mc_batches * max(1, 64 // b)
        mc = [np.sum((G[rng.choice(n, b, replace=False)].mean(axis=0) - g_bar) ** 2)
              for _ in range(reps)]
        mc_mean = float(np.mean(mc))
        mc_se = float(np.std(mc) / np.sqrt(len(mc)))
        rows.append(dict(b=b, draws=reps, exact=exact, with_replacement=with_repl, sampled=mc_mean,
                         sampled_se=mc_se, snr=float(np.sum(g_bar**2)) / exact if exact > 0 else float("inf")))
    return dict(n=n, s2=s2, grad_norm_sq=float(np.sum(g_bar**2)), mean_vs_batch_grad=mean_err,
                rows=rows)


def run(cfg: dict, out: Path) -> C.Report:
    data = C.load_digits()
    dtype = jnp.float32
    n_var = cfg["n_var"] or data.x_train.shape[0]
    x = jnp.asarray(data.x_train[:n_var], dtype)
    y = jnp.asarray(data.y_train[:n_var])
    hidden = tuple(cfg["hidden"])

    # --- 1. training with every batch size and learning rate ----------------------------------
    runs = {}  # (lr, batch) -> record
    for lr in cfg["lrs"]:
        for b in cfg["batch_sizes"]:
            r = C.train(dataset="digits", hidden=hidden, activation="relu", init="he_normal",
                        optimizer="sgd", lr=lr, batch_size=b, epochs=cfg["epochs"],
                        seed=cfg["seed"], checkpoint_every=0)
            et = C.hist(r.history, "epoch_time_s")
            rec = dict(
                lr=lr, batch_size=str(b), batch=r.summary["batch_size"],
                steps_per_epoch=r.summary["steps_per_epoch"],
                steps=[int(h["steps"]) for h in r.history],
                train_loss=C.hist(r.history, "train_loss"), test_loss=C.hist(r.history, "test_loss"),
                test_accuracy=C.hist(r.history, "test_accuracy"), epoch_time=et,
                steady_epoch_time=C.steady_epoch_time(et),
                compile_time=r.summary["compile_time_s"], n_train=r.summary["n_train"],
                diverged=bool(r.summary["diverged"]), config=r.summary["config"],
            )
            runs[(lr, str(b))] = rec
            print(f"  lr {lr} batch {b}: final train loss {rec['train_loss'][-1]:.4f}, "
                  f"{rec['steady_epoch_time'] * 1e3:.1f} ms/epoch (steady), first epoch "
                  f"{et[0] * 1e3:.1f} ms, compile {rec['compile_time']:.2f} s", flush=True)
    n_train = next(iter(runs.values()))["n_train"]
    params_net = fb.MLP((x.shape[1],) + hidden + (10,), "relu", "softmax", "cross_entropy")
    target = cfg.get("target_loss", 0.5)

    train_rows = []
    for (lr, b), rr in runs.items():
        hit = np.nonzero(rr["train_loss"] <= target)[0]
        rr["epochs_to_target"] = int(hit[0]) + 1 if hit.size else None
        # steady-state time: epochs needed × the median epoch after the first (compile and
        # first-call costs excluded); NaN: never reached
        rr["time_to_target"] = (rr["epochs_to_target"] * rr["steady_epoch_time"]
                                if hit.size else float("nan"))
        rr["examples_per_s"] = n_train / rr["steady_epoch_time"]
        tl = rr["train_loss"]
        rr["rises"] = int(np.sum(np.diff(tl) > 0)) if len(tl) > 1 else 0
        train_rows.append([lr, b, rr["steps_per_epoch"], int(np.sum(rr["steps"])), tl[-1],
                           rr["test_accuracy"][-1], rr["compile_time"], rr["epoch_time"][0] * 1e3,
                           rr["steady_epoch_time"] * 1e3,
                           "never" if rr["epochs_to_target"] is None else rr["epochs_to_target"],
                           rr["time_to_target"], rr["examples_per_s"], rr["rises"], rr["diverged"]])

    # --- 2. gradient step alone: examples/s ---------------------------------------------------
    step = jax.jit(lambda p, xb, yb: fb.manual_grad(params_net, p, xb, yb))
    p0 = fb.init(jax.random.key(cfg["seed"]), params_net, "he_normal", dtype=dtype)
    x_all = jnp.asarray(data.x_train, dtype)
    y_all = jnp.asarray(data.y_train)
    thr_rows = []
    for b in cfg["batch_sizes"]:
        bb = x_all.shape[0] if b == "full" else min(int(b), x_all.shape[0])
        t = C.time_fn(step, p0, x_all[:bb], y_all[:bb], repeats=5, min_time=0.05)
        thr_rows.append([b, bb, t * 1e6, bb / t])

    # --- 3. variance of the gradient estimate --------------------------------------------------
    variances = {}
    # at init
    variances["init"] = variance_table(params_net, p0, x, y, cfg["var_batch_sizes"],
                                       cfg["mc_batches"], cfg["seed"])
    # after a few epochs of mini-batch training
    if cfg["var_train_epochs"] > 0:
        r_tr = C.train(dataset="digits", hidden=hidden, activation="relu", init="he_normal",
                       optimizer="sgd", lr=min(cfg["lrs"]), batch_size=32,
                       epochs=cfg["var_train_epochs"], seed=cfg["seed"], checkpoint_every=0)
        variances["trained"] = variance_table(params_net, r_tr.params, x, y, cfg["var_batch_sizes"],
                                              cfg["mc_batches"], cfg["seed"] + 1)
    var_rows = []
    for when, vt in variances.items():
        for row in vt["rows"]:
            var_rows.append([when, row["b"], row["exact"], row["with_replacement"], row["sampled"],
                             row["sampled_se"], row["sampled"] / row["exact"] if row["exact"] else float("nan"),
                             row["snr"]])

    # --- figures ---------------------------------------------------------------------------------
    fig, axes = C.figure(ncols=3, nrows=len(cfg["lrs"]), width=3.7, height=3.0)
    for i, lr in enumerate(cfg["lrs"]):
        for b in cfg["batch_sizes"]:
            rr = runs[(lr, str(b))]
            tl = rr["train_loss"]
            ep = np.arange(1, len(tl) + 1)
            axes[i, 0].semilogy(ep, tl, "o-", markersize=3, label=f"B={b}")
            axes[i, 1].loglog(ep * rr["steps_per_epoch"], tl, "o-", markersize=3)
            axes[i, 2].semilogy(ep * rr["steady_epoch_time"], tl, "o-", markersize=3)
        axes[i, 0].set_ylabel(f"training loss (lr {lr})", fontsize=8)
        axes[i, 0].set_xlabel("epoch", fontsize=8)
        axes[i, 1].set_xlabel("parameter updates", fontsize=8)
        axes[i, 2].set_xlabel("training time (s): epochs × steady epoch time", fontsize=8)
        for ax in axes[i]:
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=6)
    fig_curves = C.save_figure(fig, out, "loss_curves.png")

    fig, axes = C.figure(ncols=2, width=3.9, height=3.2)
    for when, vt in variances.items():
        bs = np.array([r["b"] for r in vt["rows"]])
        axes[0, 0].loglog(bs, [r["exact"] for r in vt["rows"]], "-", label=f"formula ({when})")
        axes[0, 0].errorbar(bs, [r["sampled"] for r in vt["rows"]],
                            yerr=[2 * r["sampled_se"] for r in vt["rows"]], fmt="o", markersize=3,
                            label=f"sampled ({when})")
    axes[0, 0].set_xlabel("batch size b", fontsize=8)
    axes[0, 0].set_ylabel("E‖ĝ_b − ḡ‖²", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    bs = [r[1] for r in thr_rows]
    axes[0, 1].loglog(bs, [r[3] for r in thr_rows], "o-", label="gradient step alone")
    lr0 = cfg["lrs"][0]
    axes[0, 1].loglog([runs[(lr0, str(b))]["batch"] for b in cfg["batch_sizes"]],
                      [runs[(lr0, str(b))]["examples_per_s"] for b in cfg["batch_sizes"]], "s-",
                      label="fb.train epoch")
    axes[0, 1].set_xlabel("batch size", fontsize=8)
    axes[0, 1].set_ylabel("examples / s", fontsize=8)
    axes[0, 1].legend(fontsize=6)
    for ax in axes[0]:
        ax.grid(alpha=0.3)
    fig_var = C.save_figure(fig, out, "variance_throughput.png")

    # --- claims ---------------------------------------------------------------------------------
    all_rows = [r for vt in variances.values() for r in vt["rows"]]
    max_dev = max(abs(r["sampled"] / r["exact"] - 1) for r in all_rows if r["exact"] > 0)
    max_z = max(abs(r["sampled"] - r["exact"]) / r["sampled_se"] for r in all_rows if r["sampled_se"] > 0)
    thr = {str(r[0]): r[3] for r in thr_rows}
    bsz = [str(b) for b in cfg["batch_sizes"]]
    b1, bfull = bsz[0], bsz[-1]
    b_big = bsz[-2] if len(bsz) > 2 else bsz[-1]
    ex_s_train = {b: float(np.median([runs[(lr, b)]["examples_per_s"] for lr in cfg["lrs"]])) for b in bsz}
    per_epoch, per_time = [], []
    sgd_loss_better, sgd_acc_better = [], []
    for lr in cfg["lrs"]:
        r1, rf = runs[(lr, b1)], runs[(lr, bfull)]
        sgd_loss_better.append(bool(r1["train_loss"][-1] < rf["train_loss"][-1]))
        sgd_acc_better.append(bool(r1["test_accuracy"][-1] > rf["test_accuracy"][-1]))
        per_epoch.append(f"lr {lr}: B={b1} loss {r1['train_loss'][-1]:.3g} / acc "
                         f"{r1['test_accuracy'][-1]:.3f} (loss rose in {r1['rises']} epochs) vs full "
                         f"{rf['train_loss'][-1]:.3g} / {rf['test_accuracy'][-1]:.3f}")
        ttt = {b: runs[(lr, b)]["time_to_target"] for b in bsz}
        per_time.append((lr, fastest_kind(ttt), ttt))
    sgd_verdict = ("supported" if all(sgd_loss_better) and all(sgd_acc_better) else
                   "partly supported" if any(sgd_loss_better) or any(sgd_acc_better) else "not supported")
    kinds = [kind for _, kind, _ in per_time]
    claims = [
        C.Claim("The mini-batch gradient is an unbiased estimate whose variance falls as 1/b: "
                "E‖ĝ_b − ḡ‖² = (1/b)·(N−b)/(N−1)·(1/N)Σ‖g_i − ḡ‖² (sampling without replacement)",
                "supported" if max_z < 4 else "not supported",
                f"sampled mean within {max_z:.1f} standard errors of the formula for every b "
                f"(criterion < 4; {cfg['mc_batches']}·max(1, 64/b) sampled batches per b; largest relative "
                f"deviation {max_dev * 100:.0f}%); mean of per-example gradients = batch "
                f"gradient to {max(v['mean_vs_batch_grad'] for v in variances.values()):.1e}"),
        C.Claim("Batch training is more efficient per example (more examples/s)",
                "supported" if thr[b_big] > 5 * thr[b1] and ex_s_train[b_big] > 5 * ex_s_train[b1]
                else "not supported",
                f"gradient step alone: {thr[b1]:.0f} examples/s at B={b1} vs {thr[b_big]:.0f} at "
                f"B={b_big} ({thr[b_big] / thr[b1]:.0f}×); fb.train epochs: {ex_s_train[b1]:.0f} vs "
                f"{ex_s_train[b_big]:.0f} ({ex_s_train[b_big] / ex_s_train[b1]:.0f}×)"),
        C.Claim(f"SGD (B={b1}) is noisier but makes more updates: after the same number of epochs it "
                "is further along than full-batch descent",
                sgd_verdict, "; ".join(per_epoch) + f" (after {cfg['epochs']} epochs)"),
        C.Claim(f"Mini-batches are the practical compromise: fastest in wall-clock time to a "
                f"training loss of {target}",
                "supported" if all(k == "mini-batch" for k in kinds) else
                "partly supported" if any(k in ("mini-batch", "tie") for k in kinds) else "not supported",
                "; ".join(f"lr {lr}: {kind} (" + ", ".join(
                    f"B={b}: {'never' if not np.isfinite(t) else f'{t * 1e3:.1f} ms'}" for b, t in ttt.items()) + ")"
                    for lr, kind, ttt in per_time)
                + f" — steady-state times (compilation and first epoch excluded); a kind wins when "
                  f"the others are ≥ {TIE}× slower, else 'tie'"),
    ]

    setup = f"""
Data: digits ({C.DIGITS_SOURCE}; `fb.train` standardises it). Network: `hidden={hidden}`, relu,
he_normal, softmax + cross-entropy; plain SGD (`optimizer="sgd"`) with the same constant learning
rate for every batch size (lr ∈ {list(cfg['lrs'])}, each a separate set of runs), {cfg['epochs']} epochs, seed {cfg['seed']}, float32, via
`fb.train(batch_size=B)` for B ∈ {list(cfg['batch_sizes'])} ("full": one step per epoch on all
{n_train} training examples). fb.train draws a fresh permutation every epoch and cuts it into
batches (sampling without replacement).

**How times are measured.** `fb.train` compiles its epoch ahead of time (`compile_time_s`,
reported apart) and times each epoch (`epoch_time_s`: the compiled `lax.scan` over the epoch's
steps plus drawing the epoch's permutation). The first epoch still pays first-call costs that
later epochs do not (compare the "first epoch" and "steady epoch" columns), so the *steady epoch
time* is the median of epochs 2…{cfg['epochs']}; examples/s = N / steady epoch time; "time to loss
{target}" = (first epoch whose end-of-epoch training loss ≤ {target}) × steady epoch time. The
"gradient step alone" table times `jit(fb.manual_grad)` after one untimed (compiling) call, median
of 5 samples. The machine is shared with other jobs, so times vary by tens of percent between runs.

**Variance of the gradient estimate.** With per-example gradients g_i (`fb.per_example_grads`,
N = {n_var} examples, all P = {params_net.num_params} parameters) and ḡ = mean_i g_i, the mean ĝ_b
of a batch of b examples drawn *without replacement* has
E‖ĝ_b − ḡ‖² = (1/b) · (N − b)/(N − 1) · (1/N) Σ_i ‖g_i − ḡ‖²
(the finite-population correction; with replacement it would be (1/b)·(1/N)Σ‖g_i − ḡ‖²). The
formula is exact given the g_i; "sampled" checks it with {cfg['mc_batches']}·max(1, 64/b) random
batches per b (± one standard error; more for small b, whose squared deviations are heavy-tailed). Measured at initialisation and after {cfg['var_train_epochs']} epochs of
SGD with B = 32. SNR = ‖ḡ‖² / E‖ĝ_b − ḡ‖².
"""
    tables = [
        C.Table("Training with each batch size (times: see \"How times are measured\")",
                ["lr", "B", "updates/epoch", "updates total", "final train loss",
                 "final test acc.", "compile (s)", "first epoch (ms)", "steady epoch (ms)",
                 f"epochs to loss {target}", f"time to loss {target} (s)",
                 "examples/s (fb.train)", "epochs where loss rose", "diverged"], train_rows),
        C.Table("Throughput of the gradient step alone (jit(fb.manual_grad), median)",
                ["batch", "B", "µs per step", "examples/s"], thr_rows),
        C.Table("Variance of the mini-batch gradient (exact formula vs sampled)",
                ["params", "b", "formula (without repl.)", "with repl. S/b", "sampled", "± s.e.",
                 "sampled / formula", "SNR ‖ḡ‖²/Var"], var_rows),
    ]
    raw = {"runs": {f"lr={lr}|B={b}": rr for (lr, b), rr in runs.items()}, "throughput": thr_rows,
           "variance": variances, "target_loss": target}
    return C.Report(setup=setup, tables=tables,
                    figures=[(fig_curves, "training loss vs epochs, updates and wall-clock time"),
                             (fig_var, "gradient variance vs batch size (line: formula, dots: sampled) "
                                       "and examples/s vs batch size")],
                    claims=claims, raw=raw)


def main(argv=None) -> int:
    return C.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
