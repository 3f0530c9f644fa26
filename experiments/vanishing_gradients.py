"""Experiment 3: vanishing gradients in deep sigmoid nets (Nielsen, chapter 5).

Sigmoid nets with Nielsen's initialisation (w ~ N(0, 1/n_in), b ~ N(0, 1)) and his output head
(sigmoid units + cross-entropy, i.e. ``loss="binary_cross_entropy"`` on one-hot targets) on the
digits data: the gradient ``‖∂C/∂b^l‖ = ‖mean_i δ_i^l‖`` and the per-example ``‖δ_i^l‖`` of every
hidden layer, at initialisation (depth 2–6) and during training; the per-layer shrinkage factor
measured and predicted; ReLU + He and tanh + Xavier for comparison.

Run: ``python experiments/vanishing_gradients.py [--quick] [--out DIR]``.
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

NAME = "vanishing_gradients"
TITLE = "vanishing gradients in deep sigmoid nets, predicted and measured"

NIELSEN = [0.012, 0.060, 0.283]  # ‖∂C/∂b^l‖, [784, 30, 30, 30, 10], 1000 MNIST images, at init
VARIANTS = (  # (label, hidden activation, init scheme)
    ("sigmoid + nielsen", "sigmoid", "nielsen"),
    ("relu + he", "relu", "he_normal"),
    ("tanh + xavier", "tanh", "xavier_normal"),
)

CONFIGS = {
    "smoke": dict(depths=(3,), width=30, n_measure=100, seeds=2, train_depth=3, epochs=1,
                  batch_size=10, lr=0.1, train_subset=200),
    "quick": dict(depths=(2, 3, 4, 5, 6), width=30, n_measure=1000, seeds=10, train_depth=4,
                  epochs=30, batch_size=10, lr=0.1, train_subset=None),
    "full": dict(depths=(2, 3, 4, 5, 6), width=30, n_measure=1000, seeds=50, train_depth=4,
                 epochs=100, batch_size=10, lr=0.1, train_subset=None),
}


def make_net(n_in: int, depth: int, width: int, hidden: str) -> fb.MLP:
    return fb.MLP((n_in,) + (width,) * depth + (10,), hidden, "sigmoid", "binary_cross_entropy")


def _measure(net, params, x, y1h):
    """Per hidden layer: ‖mean_i δ_i‖ (= ‖∂C/∂b‖), mean_i ‖δ_i‖, rms f'(z), ‖W^{l+1}‖_F/√n_{l+1}."""
    bw = fb.backward(net, params, x, y1h)
    act = fb.ACTIVATIONS[net.hidden]
    L = net.num_layers
    bias_grad = jnp.stack([jnp.linalg.norm(jnp.mean(d, axis=0)) for d in bw.delta[: L - 1]])
    per_ex = jnp.stack([jnp.mean(jnp.linalg.norm(d, axis=1)) for d in bw.delta[: L - 1]])
    rms_fprime = jnp.stack([
        jnp.sqrt(jnp.mean(act.derivative(z, h) ** 2)) for z, h in zip(bw.trace.z[: L - 1], bw.trace.h[: L - 1])
    ])
    w_scale = jnp.stack([
        jnp.linalg.norm(params[l]["w"]) / jnp.sqrt(params[l]["w"].shape[1]) for l in range(1, L)
    ])
    out_bias_grad = jnp.linalg.norm(jnp.mean(bw.delta[-1], axis=0))
    return bias_grad, per_ex, rms_fprime, w_scale, out_bias_grad


def gaussian_prediction(n_layers: int, samples: int = 200_000, seed: int = 0) -> list[float]:
    """rms σ'(z^l) when z^l ~ N(0, 1 + E[a²]) layer by layer (Nielsen init, standardised inputs).

    With w ~ N(0, 1/n_in) and b ~ N(0, 1), z_j = Σ_k w_jk a_k + b_j has variance
    (1/n) Σ_k a_k² + 1: 2 for the first layer (standardised inputs, E x² = 1), then
    1 + E[σ(z)²] from the layer below. Monte-Carlo estimate of sqrt(E σ'(z)²) for each layer.
    """
    rng = np.random.default_rng(seed)
    var = 2.0
    out = []
    for _ in range(n_layers):
        z = rng.normal(0.0, np.sqrt(var), samples)
        s = 1 / (1 + np.exp(-z))
        out.append(float(np.sqrt(np.mean((s * (1 - s)) ** 2))))
        var = 1.0 + float(np.mean(s * s))
    return out


def _sgd_epoch_fn(net, lr, batch_size):
    grad = lambda p, xb, yb: fb.manual_grad(net, p, xb, yb)

    @jax.jit
    def epoch(params, x, y, key):
        n = (x.shape[0] // batch_size) * batch_size
        perm = jax.random.permutation(key, x.shape[0])[:n]
        xb = x[perm].reshape(-1, batch_size, x.shape[1])
        yb = y[perm].reshape(-1, batch_size, y.shape[1])

        def step(p, b):
            g = grad(p, b[0], b[1])
            return jax.tree_util.tree_map(lambda w, gw: w - lr * gw, p, g), None

        params, _ = jax.lax.scan(step, params, (xb, yb))
        return params

    return epoch


def run(cfg: dict, out: Path) -> C.Report:
    data = C.load_digits()
    dtype = jnp.float32
    x_all = jnp.asarray(data.x_train, dtype)
    y_all = jax.nn.one_hot(jnp.asarray(data.y_train), 10, dtype=dtype)
    n_measure = min(cfg["n_measure"], x_all.shape[0])
    x_m, y_m = x_all[:n_measure], y_all[:n_measure]
    n_in = x_all.shape[1]
    width = cfg["width"]
    seeds = [cfg["seed"] + s for s in range(cfg["seeds"])]

    # --- 1. at initialisation ------------------------------------------------------------------
    at_init = {}  # (variant, depth) -> dict of per-seed arrays
    measure_fns = {}  # (hidden, depth) -> jitted measurement (reused during training)

    def measure_fn(hidden, depth):
        if (hidden, depth) not in measure_fns:
            net = make_net(n_in, depth, width, hidden)
            measure_fns[(hidden, depth)] = jax.jit(lambda p, net=net: _measure(net, p, x_m, y_m))
        return measure_fns[(hidden, depth)]

    for label, hidden, scheme in VARIANTS:
        for depth in cfg["depths"]:
            net = make_net(n_in, depth, width, hidden)
            meas = measure_fn(hidden, depth)
            recs = [meas(fb.init(jax.random.key(s), net, scheme, dtype=dtype)) for s in seeds]
            bias_grad, per_ex, rms_fp, w_scale, out_bg = (np.stack([np.asarray(r[i]) for r in recs])
                                                           for i in range(5))
            at_init[(label, depth)] = dict(
                bias_grad=bias_grad, per_example=per_ex, rms_fprime=rms_fp, w_scale=w_scale,
                out_bias_grad=out_bg,
            )

    def ratios(arr):  # (seeds, hidden layers) -> per-seed ratios layer l / layer l+1
        return arr[:, :-1] / arr[:, 1:]

    def gmean(a, axis=None):
        return np.exp(np.mean(np.log(a), axis=axis))

    gauss = gaussian_prediction(max(cfg["depths"]), seed=cfg["seed"])
    tables, raw_init = [], {}
    rows_factor = []
    for (label, depth), rec in at_init.items():
        r_bias = gmean(ratios(rec["bias_grad"]))
        r_pe = gmean(ratios(rec["per_example"]))
        # prediction for ‖δ^l‖/‖δ^{l+1}‖: rms f'(z^l) · ‖W^{l+1}‖_F/√n_{l+1}, layers 1..depth-1
        pred = gmean(rec["rms_fprime"][:, :-1] * rec["w_scale"][:, :-1])
        bound = 0.25 * gmean(rec["w_scale"][:, :-1]) if label.startswith("sigmoid") else float("nan")
        g_pred = float(np.exp(np.mean(np.log(gauss[: depth - 1])))) if label.startswith("sigmoid") else float("nan")
        first_last = gmean(rec["bias_grad"][:, 0] / rec["bias_grad"][:, -1])
        rows_factor.append([label, depth, r_bias, r_pe, pred, g_pred, bound, first_last])
        raw_init[f"{label}|{depth}"] = {
            k: v.tolist() for k, v in rec.items()
        } | {"factor_bias_grad": float(r_bias), "factor_per_example": float(r_pe),
             "predicted_factor": float(pred), "gaussian_predicted_factor": g_pred,
             "bound_factor": float(bound), "first_over_last": float(first_last)}

    sig3 = at_init.get(("sigmoid + nielsen", 3))
    if sig3 is not None:
        mean3 = np.mean(sig3["bias_grad"], axis=0)
        std3 = np.std(sig3["bias_grad"], axis=0)
        tables.append(C.Table(
            f"‖∂C/∂b^l‖ at initialisation, sigmoid net [{n_in}, 30, 30, 30, 10], {n_measure} training "
            f"examples, mean ± std over {len(seeds)} inits, vs Nielsen's MNIST [784, 30, 30, 30, 10]",
            ["", "hidden layer 1", "hidden layer 2", "hidden layer 3", "ratio 1/2", "ratio 2/3"],
            [["ours (digits)"] + [C.pm(m, s, 4) for m, s in zip(mean3, std3)]
             + [C.fmt(gmean(sig3["bias_grad"][:, 0] / sig3["bias_grad"][:, 1])),
                C.fmt(gmean(sig3["bias_grad"][:, 1] / sig3["bias_grad"][:, 2]))],
             ["Nielsen (MNIST)"] + [str(v) for v in NIELSEN]
             + [C.fmt(NIELSEN[0] / NIELSEN[1]), C.fmt(NIELSEN[1] / NIELSEN[2])]],
        ))
    tables.append(C.Table(
        "Per-layer shrinkage factor at initialisation (geometric mean over seeds and layer pairs "
        "of ‖·^l‖/‖·^{l+1}‖, hidden layers) and its predictions",
        ["variant", "hidden layers", "measured ‖∂C/∂b‖ ratio", "measured mean ‖δ_i‖ ratio",
         "predicted: rms f'(z^l)·‖W^{l+1}‖_F/√n", "predicted: Gaussian z", "bound ¼·‖W‖_F/√n",
         "‖∂C/∂b^1‖ / ‖∂C/∂b^last‖"],
        rows_factor,
    ))
    # per-layer table, every variant and depth (means over seeds)
    maxd = max(cfg["depths"])
    tables.append(C.Table(
        "‖∂C/∂b^l‖ per hidden layer at initialisation (mean over seeds; layer 1 = nearest the input)",
        ["variant", "hidden layers"] + [f"l={i}" for i in range(1, maxd + 1)],
        [[label, depth] + [float(v) for v in np.mean(rec["bias_grad"], axis=0)] + [""] * (maxd - depth)
         for (label, depth), rec in at_init.items()],
        page=False,
    ))

    fig, axes = C.figure(ncols=len(VARIANTS), width=3.6, height=3.2)
    for ax, (label, _, _) in zip(axes[0], VARIANTS):
        for depth in cfg["depths"]:
            m = gmean(at_init[(label, depth)]["bias_grad"], axis=0)
            ax.semilogy(range(1, depth + 1), m, "o-", label=f"{depth} hidden")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("hidden layer l (1 = input side)", fontsize=8)
        ax.set_ylim(1e-5, 10)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("‖∂C/∂b^l‖ at init", fontsize=8)
    axes[0, 0].legend(fontsize=7)
    fig_init = C.save_figure(fig, out, "init_per_layer.png")

    # --- 2. during training --------------------------------------------------------------------
    x_tr = x_all if cfg["train_subset"] is None else x_all[: cfg["train_subset"]]
    y_tr = y_all if cfg["train_subset"] is None else y_all[: cfg["train_subset"]]
    x_te = jnp.asarray(data.x_test, dtype)
    y_te = jnp.asarray(data.y_test)
    depth = cfg["train_depth"]
    train_curves = {}
    for label, hidden, scheme in VARIANTS:
        net = make_net(n_in, depth, width, hidden)
        params = fb.init(jax.random.key(cfg["seed"]), net, scheme, dtype=dtype)
        meas_all = measure_fn(hidden, depth)
        meas = lambda p, meas_all=meas_all: meas_all(p)[0]  # noqa: E731
        epoch = _sgd_epoch_fn(net, cfg["lr"], cfg["batch_size"])
        hist = [np.asarray(meas(params))]
        key = jax.random.key(cfg["seed"] + 1000)
        for e in range(cfg["epochs"]):
            key, sub = jax.random.split(key)
            params = epoch(params, x_tr, y_tr, sub)
            hist.append(np.asarray(meas(params)))
        acc = float(jnp.mean(jnp.argmax(fb.forward(net, params, x_te), axis=1) == y_te))
        train_curves[label] = dict(bias_grad=np.stack(hist), test_accuracy=acc)

    fig, axes = C.figure(ncols=len(VARIANTS), width=3.6, height=3.2)
    for ax, (label, _, _) in zip(axes[0], VARIANTS):
        h = train_curves[label]["bias_grad"]
        for l in range(h.shape[1]):
            ax.semilogy(range(h.shape[0]), h[:, l], label=f"hidden layer {l + 1}")
        ax.set_title(f"{label} (test acc {train_curves[label]['test_accuracy']:.2f})", fontsize=8)
        ax.set_xlabel("epoch", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("‖∂C/∂b^l‖ (speed of learning)", fontsize=8)
    axes[0, 0].legend(fontsize=6)
    fig_train = C.save_figure(fig, out, "training_per_layer.png")

    train_rows = []
    for label, tc in train_curves.items():
        h = tc["bias_grad"]
        r0 = h[0, 0] / h[0, -1]
        r_end = gmean(h[1:, 0] / h[1:, -1]) if h.shape[0] > 1 else float("nan")
        train_rows.append([label, depth, r0, r_end, tc["test_accuracy"]])
    tables.append(C.Table(
        f"During training (SGD, lr {cfg['lr']}, batch {cfg['batch_size']}, {cfg['epochs']} epochs, "
        f"{depth} hidden layers): first over last hidden layer ‖∂C/∂b‖",
        ["variant", "hidden layers", "at init", "geo. mean over epochs 1..E", "test accuracy"],
        train_rows,
    ))

    # --- claims ---------------------------------------------------------------------------------
    sig_rows = [r for r in rows_factor if r[0] == "sigmoid + nielsen" and r[1] >= 3]
    sig_factor = gmean(np.array([r[2] for r in sig_rows])) if sig_rows else float("nan")
    sig_pred = gmean(np.array([r[4] for r in sig_rows])) if sig_rows else float("nan")
    nielsen_factor = float(np.sqrt(NIELSEN[0] / NIELSEN[2]))
    claims = [
        C.Claim("In a deep sigmoid net with Nielsen's init, each earlier hidden layer's gradient is "
                "≈ 5× smaller (Nielsen: [0.012, 0.060, 0.283], factor ≈ 0.21 per layer)",
                "supported" if 0.1 <= sig_factor <= 0.35 else "not supported",
                f"measured factor {sig_factor:.3f} per layer (geometric mean, depths ≥ 3, "
                f"criterion 0.1–0.35); Nielsen's {nielsen_factor:.3f}"),
        C.Claim("The factor is predicted by σ' ≤ ¼ and the weight scale: "
                "‖δ^l‖/‖δ^{l+1}‖ ≈ rms σ'(z^l) · ‖W^{l+1}‖_F/√n_{l+1} ≤ ¼ · ‖W‖_F/√n",
                "supported" if abs(np.log(sig_pred / sig_factor)) < np.log(1.5) else "not supported",
                f"predicted {sig_pred:.3f} vs measured {sig_factor:.3f} (criterion: within 1.5×); "
                f"Gaussian-z prediction {gmean(np.array(gauss[:2])):.3f}"),
    ]
    for label in ("relu + he", "tanh + xavier"):
        rs = [r for r in rows_factor if r[0] == label and r[1] >= 3]
        f_b = gmean(np.array([r[2] for r in rs])) if rs else float("nan")
        f_d = gmean(np.array([r[3] for r in rs])) if rs else float("nan")
        lo, hi = min(f_b, f_d), max(f_b, f_d)
        verdict = ("supported" if 0.8 <= lo and hi <= 1.25 else
                   "partly supported" if 0.5 <= lo and hi <= 2.0 else "not supported")
        claims.append(C.Claim(
            f"{label} removes the shrinkage (factor ≈ 1 per layer instead of ≈ 0.2)",
            verdict,
            f"measured factor per layer: ‖∂C/∂b‖ {f_b:.3f}, mean ‖δ_i‖ {f_d:.3f} (supported if both "
            f"within 0.8–1.25, partly if within 0.5–2)"))
    sig_tc = train_curves["sigmoid + nielsen"]["bias_grad"]
    persist = gmean(sig_tc[1:, 0] / sig_tc[1:, -1]) if sig_tc.shape[0] > 1 else float("nan")
    claims.append(C.Claim(
        "The early layers keep learning much more slowly during training",
        "supported" if persist < 0.2 else "not supported",
        f"sigmoid net, {depth} hidden layers: first/last hidden ‖∂C/∂b‖ = {sig_tc[0, 0] / sig_tc[0, -1]:.3f} "
        f"at init, {persist:.3f} averaged over training (criterion < 0.2)"))

    setup = f"""
Data: digits ({C.DIGITS_SOURCE}), standardised with training statistics; gradients measured on the
first {n_measure} training examples (Nielsen used 1000 MNIST images). Networks
`fb.MLP((64,) + (30,)*depth + (10,), hidden, "sigmoid", "binary_cross_entropy")` (sigmoid output
units with the cross-entropy cost, Nielsen's `network2.py`) with one-hot targets, depth ∈
{list(cfg['depths'])} hidden layers; variants {[v[0] for v in VARIANTS]} (`fb.init` schemes
nielsen: w ~ N(0, 1/n_in), b ~ N(0, 1); he_normal; xavier_normal). float32, {len(seeds)} init seeds
({seeds[0]}…{seeds[-1]}). `fb.backward` gives the per-example δ_i^l; Nielsen's quantity is
‖∂C/∂b^l‖ = ‖mean_i δ_i^l‖.

**Prediction.** δ^l = (δ^{{l+1}} W^{{l+1}}ᵀ) ⊙ σ'(z^l). For a δ^{{l+1}} in a random direction,
E‖δ^{{l+1}} W^{{l+1}}ᵀ‖² = ‖W^{{l+1}}‖_F²/n_{{l+1}} · ‖δ^{{l+1}}‖², and multiplying by σ'(z^l) element-wise scales the
squared norm by the mean of σ'(z^l)². Hence ‖δ^l‖/‖δ^{{l+1}}‖ ≈ rms σ'(z^l) · ‖W^{{l+1}}‖_F/√n_{{l+1}}. With
w ~ N(0, 1/n_l), ‖W‖_F/√n_{{l+1}} ≈ 1, so the factor is rms σ'(z) ≤ max σ' = ¼: at least 4× per layer.
The "Gaussian z" column evaluates rms σ'(z) for z ~ N(0, 1 + E σ(z_below)²) (the variance that
Nielsen's init gives) without looking at the network; the other column uses the measured z and W.
ReLU + He: rms relu'(z) = 1/√2 and ‖W‖_F/√n = √2 ⇒ factor ≈ 1; tanh + Xavier: tanh' ≈ 1 near 0 and
‖W‖_F/√n ≈ 1 ⇒ factor slightly below 1.

**Training.** {cfg['epochs']} epochs of plain SGD (lr {cfg['lr']}, batch {cfg['batch_size']}) with
`fb.manual_grad` on {int(x_tr.shape[0])} training examples, {depth} hidden layers, each variant
from seed {cfg['seed']}; ‖∂C/∂b^l‖ on the measurement examples after every epoch.
"""
    return C.Report(
        setup=setup, tables=tables,
        figures=[(fig_init, "‖∂C/∂b^l‖ per hidden layer at initialisation (geometric mean over seeds)"),
                 (fig_train, "‖∂C/∂b^l‖ per hidden layer during training (Nielsen's 'speed of learning')")],
        claims=claims,
        raw={"at_init": raw_init, "nielsen": NIELSEN, "gaussian_prediction": gauss,
             "training": {k: {"bias_grad": v["bias_grad"].tolist(), "test_accuracy": v["test_accuracy"]}
                          for k, v in train_curves.items()},
             "n_measure": n_measure, "seeds": seeds},
    )


def main(argv=None) -> int:
    return C.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    raise SystemExit(main())
