"""Experiment 9: an MLP vs a 1-D convolutional network on MNIST-1D.

The MNIST-1D default of before (a 512-512 ReLU MLP) and the default of now (a small 1-D conv net,
``fb.default_config("mnist1d")``), each trained with ``fb.train`` with its own recommended
settings on the same data: test accuracy (mean ± std over seeds), parameters, multiply-adds,
training time (steady state, compilation excluded) and the per-layer gradient flow recorded in
the history (weight-gradient norms and per-example δ norms): does the error signal reach the
conv net's first layer as well as it reaches the MLP's?

Run: ``python experiments/mlp_vs_cnn.py [--quick] [--out DIR]``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import numpy as np  # noqa: E402

fb = C.fb

NAME = "mlp_vs_cnn"
TITLE = "an MLP vs a 1-D conv net on MNIST-1D: accuracy, parameters, time, gradient flow"

MLP_BEFORE = dict(conv=(), hidden=(512, 512), activation="relu", init="he_normal",
                  optimizer="adam", lr=1e-3, schedule="constant", batch_size=100, epochs=60,
                  augment=True)
"""The MNIST-1D default before the conv net (``DATASET_DEFAULTS["mnist1d"]`` until then)."""

TIE = 1.2
"""Wall-clock margin: one network trains faster than the other only when the other takes at
least this factor longer (the machine is shared; timings vary by tens of percent)."""
VANISHED = 0.1
"""A layer's δ norm below this fraction of the output layer's counts as vanished."""

CONFIGS = {
    # epochs None: the network's own default (60 for the MLP, the conv default's for the CNN)
    "smoke": dict(seeds=1, mlp_epochs=2, cnn_epochs=2, n_train=400),
    "quick": dict(seeds=3, mlp_epochs=None, cnn_epochs=None, n_train=None),
    "full": dict(seeds=10, mlp_epochs=None, cnn_epochs=None, n_train=None),
}


def configs(cfg: dict, seed: int) -> dict[str, fb.TrainConfig]:
    """The two runs of one seed: ``{"MLP": ..., "CNN": ...}`` (nothing saved to disk)."""
    mlp = fb.TrainConfig(dataset="mnist1d", **MLP_BEFORE)
    cnn = fb.default_config("mnist1d")
    out = {}
    for name, c, epochs in (("MLP", mlp, cfg["mlp_epochs"]), ("CNN", cnn, cfg["cnn_epochs"])):
        out[name] = dataclasses.replace(c, seed=seed, checkpoint_every=0,
                                        epochs=epochs if epochs is not None else c.epochs)
    return out


def layer_names(net) -> list[str]:
    """One name per layer with parameters, e.g. ``conv1 (25×5, s1)`` or ``dense (10)``."""
    names = []
    for i in net.param_layers:
        layer = net.layers[i]
        if isinstance(layer, fb.Conv1D):
            names.append(f"conv{len(names) + 1} ({layer.channels}×{layer.kernel}, s{layer.stride})")
        else:
            names.append(f"dense{len(names) + 1} ({layer.units})")
    return names


def layer_params(net) -> list[int]:
    """Weights (no biases) per layer with parameters."""
    return [math.prod(net.layers[i].param_shapes(net.shapes[i])["w"]) for i in net.param_layers]


def macs_per_example(net) -> int:
    """Multiply-adds of one example's forward pass: ``T·k·c_in·c_out`` per convolution (T output
    positions), ``n_in·n_out`` per dense layer."""
    total = 0
    for i in net.param_layers:
        w = math.prod(net.layers[i].param_shapes(net.shapes[i])["w"])
        positions = net.shapes[i + 1][0] if isinstance(net.layers[i], fb.Conv1D) else 1
        total += positions * w
    return total


def _subset(ds: fb.Dataset, n: int | None) -> fb.Dataset:
    if n is None:
        return ds
    return dataclasses.replace(ds, x_train=np.asarray(ds.x_train[:n]),
                               y_train=np.asarray(ds.y_train[:n]))


def _one_run(config: fb.TrainConfig, data: fb.Dataset) -> dict:
    r = fb.train(config, data=data)
    sm, h = r.summary, r.history
    return dict(
        test_acc=sm["test_accuracy"], train_acc=sm["final_train_accuracy"],
        params=sm["num_params"], epochs=sm["epochs_run"], train_time_s=sm["train_time_s"],
        compile_time_s=sm["compile_time_s"],
        steady_epoch_s=C.steady_epoch_time([e["epoch_time_s"] for e in h]),
        test_curve=C.hist(h, "test_accuracy").tolist(),
        grad_norm=[[math.nan if v is None else v for v in e["grad_norm"]] for e in h],
        delta_norm=[[math.nan if v is None else v for v in e["delta_norm"]] for e in h],
        network=sm["network"], config=sm["config"], net=r.net)


def _gmean(v) -> float:
    v = np.asarray(v, np.float64)
    return float(np.exp(np.mean(np.log(v)))) if np.all(v > 0) else math.nan


def summarise(runs: list[dict]) -> dict:
    """Means over seeds; the δ-norm ratio of the first to the output layer per epoch and its
    smallest value over training; per-weight gradient rms per layer."""
    acc = np.array([r["test_acc"] for r in runs])
    net = runs[0]["net"]
    n_w = np.array(layer_params(net), np.float64)
    delta = np.array([r["delta_norm"] for r in runs], np.float64)  # (seeds, epochs, layers)
    grad = np.array([r["grad_norm"] for r in runs], np.float64)
    ratio = delta[:, :, 0] / delta[:, :, -1]  # (seeds, epochs)
    return dict(
        acc_mean=float(acc.mean()), acc_std=float(acc.std()), acc=acc.tolist(),
        params=runs[0]["params"], macs=macs_per_example(net), epochs=runs[0]["epochs"],
        train_time_s=float(np.median([r["train_time_s"] for r in runs])),
        compile_time_s=float(runs[0]["compile_time_s"]),
        steady_epoch_s=float(np.median([r["steady_epoch_s"] for r in runs])),
        layers=layer_names(net), layer_params=n_w.tolist(),
        delta_mean=np.mean(delta, axis=0).tolist(),          # (epochs, layers)
        grad_mean=np.mean(grad, axis=0).tolist(),
        grad_rms_mean=(np.mean(grad, axis=0) / np.sqrt(n_w)).tolist(),
        ratio_epoch1=float(np.mean(ratio[:, 0])), ratio_gmean=_gmean(ratio),
        ratio_min=float(np.min(ratio)), ratio_curve=np.mean(ratio, axis=0).tolist(),
        grad_rms_ratio=_gmean((grad[:, :, 0] / grad[:, :, -1]) * math.sqrt(n_w[-1] / n_w[0])),
        test_curve=np.mean([r["test_curve"] for r in runs], axis=0).tolist(),
        network=runs[0]["network"], config=runs[0]["config"])


def claims(s: dict, n_seeds: int) -> list[C.Claim]:
    mlp, cnn = s["MLP"], s["CNN"]
    d = cnn["acc_mean"] - mlp["acc_mean"]
    se = math.sqrt((cnn["acc_std"] ** 2 + mlp["acc_std"] ** 2) / n_seeds)
    fewer = cnn["params"] < mlp["params"]
    out = [C.Claim(
        "A conv net is more accurate than an MLP on MNIST-1D at fewer parameters (the MNIST-1D "
        "paper's claim)",
        "supported" if d > 2 * se and d > 0 and fewer else
        "partly supported" if d > 0 and fewer else "not supported",
        f"test accuracy CNN {pm_pct(cnn)} vs MLP {pm_pct(mlp)} (Δ {100 * d:+.1f} points, 2·s.e. "
        f"{200 * se:.1f}); {cnn['params']:,} vs {mlp['params']:,} parameters (supported: Δ > 2 "
        "s.e. and fewer parameters; partly: Δ > 0)")]
    slower = cnn["train_time_s"] / mlp["train_time_s"]
    per_epoch = cnn["steady_epoch_s"] / mlp["steady_epoch_s"]
    out.append(C.Claim(
        "Fewer parameters and multiply-adds make the conv net cheaper to train than the MLP",
        "supported" if TIE * cnn["train_time_s"] < mlp["train_time_s"] else
        "partly supported" if TIE * cnn["steady_epoch_s"] < mlp["steady_epoch_s"] else
        "not supported",
        f"training time CNN {cnn['train_time_s']:.1f} s ({cnn['epochs']} epochs) vs MLP "
        f"{mlp['train_time_s']:.1f} s ({mlp['epochs']} epochs), ×{slower:.2f}; per epoch ×"
        f"{per_epoch:.2f}; multiply-adds per example {cnn['macs']:,} vs {mlp['macs']:,} "
        f"(supported: whole training ≥ {TIE}× faster; partly: only per epoch)"))
    first_ok = cnn["ratio_min"] >= VANISHED
    as_well = cnn["ratio_gmean"] >= 0.5 * mlp["ratio_gmean"]
    out.append(C.Claim(
        "The error signal reaches the conv net's first layer without vanishing, as well as it "
        "reaches the MLP's",
        "supported" if first_ok and as_well else "partly supported" if first_ok or as_well
        else "not supported",
        f"‖δ¹‖/‖δᴸ‖ (first over output layer, mean per-example norms): CNN {cnn['ratio_gmean']:.2f} "
        f"(epoch 1 {cnn['ratio_epoch1']:.2f}, lowest {cnn['ratio_min']:.2f}), MLP "
        f"{mlp['ratio_gmean']:.2f} (epoch 1 {mlp['ratio_epoch1']:.2f}, lowest "
        f"{mlp['ratio_min']:.2f}); geometric means over epochs and seeds (supported: CNN never "
        f"below {VANISHED} and ≥ ½ the MLP's; partly: one of the two). Per-weight gradient rms, "
        f"first over output layer: CNN {cnn['grad_rms_ratio']:.2f}, MLP "
        f"{mlp['grad_rms_ratio']:.2f}"))
    return out


def pm_pct(s: dict) -> str:
    return f"{100 * s['acc_mean']:.1f} ± {100 * s['acc_std']:.1f} %"


def _per_layer_curves(ax, s: dict, field: str, colors: dict) -> None:
    """One line per (network, layer) of a per-epoch, per-layer reading, on a log scale."""
    for name, v in s.items():
        g = np.asarray(v[field])
        for l, label in enumerate(v["layers"]):
            ax.plot(np.arange(1, g.shape[0] + 1), g[:, l], color=colors[name],
                    alpha=0.35 + 0.65 * (l + 1) / len(v["layers"]),
                    ls="-" if l == 0 else "--" if l == len(v["layers"]) - 1 else ":",
                    label=f"{name} {label}")
    ax.set_yscale("log")


def _figure(s: dict, out: Path) -> str:
    fig, axes = C.figure(ncols=3, width=4.2, height=3.4)
    colors = {"MLP": "tab:blue", "CNN": "tab:red"}
    ax = axes[0, 0]
    for name, v in s.items():
        ax.plot(np.arange(1, len(v["test_curve"]) + 1), 100 * np.asarray(v["test_curve"]),
                color=colors[name], label=f"{name} ({v['params']:,} params)")
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel("test accuracy (%), mean over seeds", fontsize=8)
    lo = min(min(v["test_curve"][len(v["test_curve"]) // 4:]) for v in s.values())
    ax.set_ylim(max(0.0, 100 * lo - 5), 100)
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    _per_layer_curves(ax, s, "grad_rms_mean", colors)
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel("‖∂L/∂W^l‖_F / √(weights), per step", fontsize=8)
    ax.legend(fontsize=5.5, ncol=2)
    ax = axes[0, 2]
    _per_layer_curves(ax, s, "delta_mean", colors)
    ax.set_xlabel("epoch", fontsize=8)
    ax.set_ylabel("mean per-example ‖δ^l‖", fontsize=8)
    for a in axes[0]:
        a.grid(alpha=0.3)
        a.tick_params(labelsize=7)
    return C.save_figure(fig, out, "mlp_vs_cnn.png")


def run(cfg: dict, out: Path) -> C.Report:
    seeds = [cfg["seed"] + s for s in range(cfg["seeds"])]
    full = fb.load_dataset("mnist1d")
    data = _subset(full, cfg["n_train"])
    runs = {"MLP": [], "CNN": []}
    for seed in seeds:
        for name, config in configs(cfg, seed).items():
            rec = _one_run(config, data)
            runs[name].append(rec)
            print(f"  {name} seed {seed}: test {rec['test_acc']:.4f}, training "
                  f"{rec['train_time_s']:.1f} s, compile {rec['compile_time_s']:.1f} s", flush=True)
    s = {name: summarise(recs) for name, recs in runs.items()}
    fig = _figure(s, out)

    rows = [[name, ", ".join(v["layers"]), pm_pct(v), f"{v['params']:,}", f"{v['macs']:,}",
             v["epochs"], v["train_time_s"], v["steady_epoch_s"], v["compile_time_s"]]
            for name, v in s.items()]
    per_seed = [[name] + [f"{100 * a:.1f}" for a in v["acc"]] for name, v in s.items()]
    flow = []
    for name, v in s.items():
        d, g = np.asarray(v["delta_mean"]), np.asarray(v["grad_rms_mean"])
        for l, label in enumerate(v["layers"]):
            flow.append([name, label, int(v["layer_params"][l]), d[0, l], d[-1, l],
                         float(np.mean(d[:, l] / d[:, -1])), g[0, l], g[-1, l]])
    tables = [
        C.Table(f"Test accuracy (mean ± std over {len(seeds)} seeds, {len(full.y_test)} test "
                "examples), size and training time (median over seeds; steady epoch: median of "
                "epochs 2…; compilation apart)",
                ["network", "layers", "test accuracy", "parameters", "multiply-adds / example",
                 "epochs", "training time (s)", "steady epoch (s)", "compile (s)"], rows),
        C.Table("Test accuracy (%) per seed", ["network"] + [f"seed {x}" for x in seeds],
                per_seed, page=False),
        C.Table("Gradient flow per layer (means over seeds): mean per-example ‖δ^l‖ in the first "
                "and last epoch, its ratio to the output layer's (mean over epochs), and the "
                "per-weight gradient rms ‖∂L/∂W^l‖_F/√(weights) per step",
                ["network", "layer", "weights", "‖δ‖ epoch 1", "‖δ‖ last epoch",
                 "‖δ^l‖/‖δ^L‖", "grad rms epoch 1", "grad rms last epoch"], flow),
    ]
    c = s["CNN"]["config"]
    n_sub = "" if cfg["n_train"] is None else " (a subset)"
    setup = f"""
Data: `fb.load_dataset("mnist1d")`, {len(data.y_train)} training examples{n_sub} and the fixed
{len(full.y_test)}-example test set, standardised by `fb.train`; seeds {seeds} (initialisation,
shuffling, augmentation), the same for both networks. Each network is trained with its own
recommended settings: the comparison is of the two defaults, not of architectures at an equal
budget.

* MLP (the mnist1d default before the conv net): hidden {MLP_BEFORE['hidden']}, relu,
  he_normal, Adam lr {MLP_BEFORE['lr']} (constant), batch {MLP_BEFORE['batch_size']},
  {s['MLP']['epochs']} epochs, augmentation (±3-position shifts + noise 0.05).
* CNN (`fb.default_config("mnist1d")`): conv {[tuple(v) for v in c['conv']]} ((channels,
  kernel, stride), SAME padding), then Flatten, hidden {tuple(c['hidden'])} and the softmax
  layer; {c['activation']}, {c['init']}, {c['optimizer']} lr {c['lr']} ({c['schedule']}
  schedule), batch {c['batch_size']}, {s['CNN']['epochs']} epochs, augmentation {c['augment']}.

Gradient flow from the training history, per layer with parameters: `grad_norm` (‖∂L/∂W^l‖_F of
the batch objective, mean over the epoch's steps) and `delta_norm` (the mean per-example ‖δ_i^l‖,
δ = ∂ℓ_i/∂z^l over every position and channel of a conv layer). Times: `fb.train`'s
`train_time_s` (the epochs' training steps, evaluation excluded; median over seeds) and
`compile_time_s` (the first seed's: later seeds reuse the compiled epoch), on a machine shared
with other jobs.
"""
    raw = {"summary": s, "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "net"}
                                      for r in v] for k, v in runs.items()},
           "n_train": len(data.y_train), "n_test": len(full.y_test), "mlp_before": MLP_BEFORE,
           "tie": TIE, "vanished": VANISHED}
    return C.Report(setup=setup, tables=tables, claims=claims(s, len(seeds)), raw=raw,
                    figures=[(fig, ("Left: test accuracy per epoch (mean over seeds). Middle: "
                                    "per-weight gradient rms per layer (solid: first layer, "
                                    "dashed: output layer). Right: mean per-example ‖δ^l‖ per "
                                    "layer."))])


def main(argv=None) -> int:
    return C.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
