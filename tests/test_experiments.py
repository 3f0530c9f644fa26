"""Smoke tests of the experiment scripts (experiments/*.py) at tiny size.

Each runs an experiment's ``main(["--smoke", "--out", tmp])`` in-process and checks a property of
its numbers that a real bug would break, preferably against an independent recomputation (the
library's ``jax.grad`` path, or plain NumPy). The smoke sizes mean little scientifically; the
published numbers come from ``python experiments/run_all.py --quick``. ``vanishing_gradients`` is
checked at its quick size by tests/test_experiments_results.py (which re-runs it against the
committed results), not here.
"""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


def _load(name: str):
    if str(EXPERIMENTS_DIR) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS_DIR))
    return importlib.import_module(name)


def _run(name: str, out: Path) -> dict:
    """Runs the smoke size as a script would (float64 off: tests/conftest.py turns it on), checks
    that the experiment left JAX's configuration as it found it and wrote every linked figure;
    returns results.json."""
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        assert _load(name).main(["--smoke", "--out", str(out)]) == 0
        assert not jax.config.jax_enable_x64, "the experiment switched float64 on for everyone"
    finally:
        jax.config.update("jax_enable_x64", x64)
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (out / "table.md").read_text())
    assert figures, "no figure linked from table.md"
    for f in figures:
        data = (out / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``smoke(name)``: the experiment's smoke-size results.json, run once per test module."""
    done = {}
    mp = pytest.MonkeyPatch()
    # the scripts turn on JAX's persistent compilation cache; keep the test process's untouched
    mp.setenv("FNBACKPROP_JAX_CACHE", "off")

    def get(name: str) -> dict:
        if name not in done:
            done[name] = _run(name, tmp_path_factory.mktemp(name))
        return done[name]

    yield get
    mp.undo()


def _num(v) -> float:
    return math.nan if v is None else float(v)


def _digits():
    return _load("_common").load_digits()


def test_gradient_equivalence(smoke):
    res = smoke("gradient_equivalence")
    cfg = _load("gradient_equivalence").CONFIGS["smoke"]
    assert len(res["results"]["rows"]) == len(cfg["activations"]) * cfg["heads"] * len(cfg["depths"])
    o = res["results"]["overall"]
    assert o["f64_manual_vs_autodiff"] < 1e-10
    assert o["f64_per_example_manual_vs_vmap"] < 1e-10
    assert o["f64_per_example_mean_vs_manual"] < 1e-10
    assert o["f64_vs_fd"] < 1e-5
    assert o["f32_manual_vs_f64_truth"] < 1e-4
    # float32 rounding must show: an error of exactly 0 means a gradient was compared with itself
    for k in ("f32_manual_vs_autodiff", "f32_manual_vs_f64_truth", "f32_per_example_manual_vs_vmap",
              "f32_vs_fd"):
        assert o[k] > 0, k


def test_gd_sgd_minibatch_variance_matches_the_formula(smoke):
    """The per-example gradient spread s² against an independent vmap(jax.grad) recomputation,
    the formula for every b, and the sampled batches within 4 standard errors of it."""
    import fnbackprop as fb

    res = smoke("gd_sgd_minibatch")
    cfg = _load("gd_sgd_minibatch").CONFIGS["smoke"]
    data = _digits()
    x = jnp.asarray(data.x_train[: cfg["n_var"]], jnp.float32)
    y = jnp.asarray(data.y_train[: cfg["n_var"]])
    net = fb.MLP((x.shape[1],) + tuple(cfg["hidden"]) + (10,), "relu", "softmax", "cross_entropy")
    params = fb.init(jax.random.key(0), net, "he_normal", dtype=jnp.float32)

    def one(p, xi, yi):
        return fb.loss(net, p, xi[None, :], yi[None])

    g = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, x, y)
    G = np.concatenate([np.asarray(leaf, np.float64).reshape(x.shape[0], -1)
                        for leaf in jax.tree_util.tree_leaves(g)], axis=1)
    n = G.shape[0]
    s2 = float(np.mean(np.sum((G - G.mean(axis=0)) ** 2, axis=1)))
    vt = res["results"]["variance"]["init"]
    assert vt["n"] == n
    assert vt["s2"] == pytest.approx(s2, rel=1e-4)
    assert [r["b"] for r in vt["rows"]] == [b for b in cfg["var_batch_sizes"] if b <= n]
    for r in vt["rows"]:
        b = r["b"]
        assert r["exact"] == pytest.approx(s2 / b * (n - b) / (n - 1), rel=1e-4)
        assert abs(r["sampled"] - r["exact"]) < 4 * r["sampled_se"], r


def test_gd_sgd_minibatch_runs(smoke):
    """Steps per epoch from the data size; plain SGD with nothing switched on by defaults."""
    res = smoke("gd_sgd_minibatch")
    n_train = len(_digits().y_train)
    for rr in res["results"]["runs"].values():
        b = n_train if rr["batch_size"] == "full" else int(rr["batch_size"])
        assert rr["steps"] == [math.ceil(n_train / b)] * len(rr["train_loss"])
        assert np.all(np.isfinite([_num(v) for v in rr["train_loss"]]))
        c = rr["config"]
        assert c["dropout"] == 0 and c["l1"] == 0 and c["l2"] == 0 and not c["augment"]
        assert c["optimizer"] == "sgd" and c["activation"] == "relu"


def test_gd_sgd_minibatch_timing_rules():
    """Steady-state time ignores the first epoch; the wall-clock verdict needs a margin."""
    C = _load("_common")
    mod = _load("gd_sgd_minibatch")
    assert C.steady_epoch_time([0.5, 0.010, 0.012, 0.011]) == pytest.approx(0.011)
    assert math.isnan(C.steady_epoch_time([0.5]))
    nan = math.nan
    assert mod.fastest_kind({"1": 0.30, "8": 0.10, "full": nan}) == "mini-batch"
    assert mod.fastest_kind({"1": 0.10, "8": 0.30, "32": 0.5, "full": 2.0}) == "B=1"
    assert mod.fastest_kind({"1": 0.11, "8": 0.10, "full": nan}) == "tie"
    assert mod.fastest_kind({"1": nan, "full": 0.2}) == "full batch"
    assert mod.fastest_kind({"1": nan, "8": nan}) == "none reached it"


def test_exploding_gradients(smoke):
    import fnbackprop as fb

    res = smoke("exploding_gradients")
    cfg = _load("exploding_gradients").CONFIGS["smoke"]
    ai = res["results"]["at_init"]
    deep = max(cfg["depths"])
    normal = np.array([_num(v) for v in ai[f"normal|{deep}"]["total"]])
    xavier = np.array([_num(v) for v in ai[f"xavier_normal|{deep}"]["total"]])
    assert np.all(normal > 100 * xavier)
    assert _num(res["results"]["growth_per_layer"]) > 1.5
    # the recorded norm is the whole gradient's (weights and biases): recompute it with jax.grad
    data = _digits()
    x = jnp.asarray(data.x_train[: cfg["n_measure"]], jnp.float32)
    y = jnp.asarray(data.y_train[: cfg["n_measure"]])
    depth = min(cfg["depths"])
    net = fb.MLP((64,) + (cfg["width"],) * depth + (10,), "relu", "softmax", "cross_entropy")
    g = fb.autodiff_grad(net, fb.init(jax.random.key(0), net, "normal", dtype=jnp.float32), x, y)
    total = math.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2))
                          for a in jax.tree_util.tree_leaves(g)))
    assert _num(ai[f"normal|{depth}"]["total"][0]) == pytest.approx(total, rel=1e-4)
    tr = res["results"]["training"]
    clipped = next(v for k, v in tr.items() if "clip_norm" in k)
    assert clipped["config"]["clip_norm"] == cfg["clip_norm"] and clipped["config"]["init"] == "normal"
    assert not clipped["diverged"] and sum(clipped["skipped"]) == 0


def test_regularization_subset_is_stratified():
    import fnbackprop as fb

    mod = _load("regularization")
    ds = fb.load_dataset("digits")
    sub = mod.subset(ds, 60, seed=0)
    assert np.array_equal(np.bincount(sub.y_train, minlength=10), np.full(10, 6))
    rows = {r.tobytes() for r in ds.x_train}
    assert all(r.tobytes() in rows for r in sub.x_train)  # examples of the training part
    assert np.array_equal(mod.subset(ds, 60, seed=0).x_train, sub.x_train)
    assert np.array_equal(sub.x_test, ds.x_test)


def test_regularization(smoke):
    res = smoke("regularization")
    cfg = _load("regularization").CONFIGS["smoke"]
    r = res["results"]["digits"]
    w = r["weight_stats"]
    l2 = f"L2 ({cfg['l2'][0]:g})"
    # same seed, same batches: only the penalty differs, and it pulls the weights towards 0
    assert w[l2]["rms"] < w["none"]["rms"]
    assert r["runs"][l2][0]["config"]["l2"] == cfg["l2"][0] and r["runs"]["none"][0]["config"]["l2"] == 0
    c = r["runs"]["all"][0]["config"]
    assert c["l1"] > 0 and c["l2"] > 0 and c["dropout"] > 0 and c["augment"] and c["early_stopping"]
    # early stopping trains on the subset minus the validation part
    assert r["runs"]["all"][0]["n_train"] < r["n_train"] == r["runs"]["none"][0]["n_train"]


def test_initialization(smoke):
    res = smoke("initialization")
    flow = res["results"]["flow"]
    zeros = np.array(flow["relu|zeros"]["grad_w"])
    assert np.all(zeros[:, :-1] == 0)  # no gradient reaches a hidden layer from zero weights
    he = np.array(flow["relu|he_normal"]["grad_w"])
    assert np.all(np.isfinite(he)) and np.all(he > 0)
    # zero weights: every logit is 0, so the loss is exactly log(10)
    assert np.mean(flow["relu|zeros"]["loss"]) == pytest.approx(math.log(10), rel=1e-6)


def test_per_example_cost(smoke):
    res = smoke("per_example_cost")
    rows = [r for r in res["results"]["results"] if "time_s" in r]
    assert {r["method"] for r in rows} == {"plain", "ours", "outer", "vmap"}
    for r in rows:
        assert r["clipped_fraction"] > 0  # clipping changes something, so agreement means something
        if r["method"] in ("ours", "outer"):
            assert r["ref"] == "vmap" and r["rel_err_vs_ref"] < 1e-4
    # ours never materialises B × P numbers: far less scratch memory than vmap
    for b in {r["batch"] for r in rows}:
        by = {r["method"]: r for r in rows if r["batch"] == b}
        assert by["ours"]["temp_bytes"] < by["vmap"]["temp_bytes"]


def test_optimizers(smoke):
    """The best learning rate is the one an independent recomputation picks: the lowest mean
    training loss over the last three epochs and the seeds."""
    res = smoke("optimizers")
    runs = res["results"]["runs"]
    late = {}
    for key, recs in runs.items():
        opt, lr = key.split("|")
        curves = np.array([[_num(v) for v in r["train_loss"]] for r in recs])
        assert np.all(np.isfinite(curves))
        assert np.all(curves[:, -1] < curves[:, 0])  # every run learns
        late.setdefault(opt, {})[float(lr)] = float(np.mean(curves[:, -3:]))
    assert any(len(v) > 1 for v in late.values())  # a real choice is made
    for opt, by_lr in late.items():
        assert res["results"]["best_lr"][opt] == min(by_lr, key=by_lr.get)


def test_private_training(smoke):
    """Each private run reports dp-accounting's ε for its own σ, q and steps (recomputed here),
    ε falls as σ grows, the run without noise has no privacy block, and the published table
    holds fb.privacy's settings with PLD < RDP < published."""
    import fnbackprop as fb

    res = smoke("private_training")
    mod = _load("private_training")
    cfg = mod.CONFIGS["smoke"]
    r = res["results"]
    n, setup = r["n_train"], cfg["setup"]
    eps_by_sigma = {}
    for label, recs in r["runs"].items():
        for rec in recs:
            p = rec.get("privacy")
            if label == mod.levels(cfg)[-1].label:  # no noise: no guarantee, nothing accounted
                assert p is None and rec["config"]["per_example_clip"] == setup["per_example_clip"]
                continue
            assert p["sampling"] == "poisson" and p["delta"] == mod.DELTA
            assert p["sampling_rate"] == pytest.approx(setup["batch_size"] / n, rel=1e-12)
            assert p["steps"] == setup["epochs"] * round(n / setup["batch_size"])
            assert p["truncated_batches"] == 0
            assert rec["config"]["noise_multiplier"] == p["noise_multiplier"]
            expected = fb.privacy.epsilon(p["noise_multiplier"], p["sampling_rate"], p["steps"],
                                          p["delta"])
            assert p["epsilon"] == pytest.approx(expected, rel=1e-9)
            assert rec["epsilon_curve"][-1] == pytest.approx(expected, rel=1e-9)
            assert np.all(np.diff(rec["epsilon_curve"]) > 0)  # privacy is spent every epoch
            assert rec["epsilon_rdp"] > p["epsilon"]
            eps_by_sigma[p["noise_multiplier"]] = p["epsilon"]
    sigmas = sorted(eps_by_sigma)
    assert sigmas == sorted(cfg["sigmas"]) and len(sigmas) >= 2
    assert all(eps_by_sigma[a] > eps_by_sigma[b] for a, b in zip(sigmas, sigmas[1:]))
    assert {c["claim"].split(":")[0]: c["verdict"] for c in res["claims"]}[
        "Poisson accounting"] == "supported"
    pub = r["published"]
    assert [(q["source"], q["noise_multiplier"], q["steps"]) for q in pub] == [
        (s.source, s.noise_multiplier, s.steps) for s in fb.privacy.PUBLISHED_SETTINGS]
    first = fb.privacy.PUBLISHED_SETTINGS[0]
    for acc in ("rdp", "pld"):
        assert pub[0][f"epsilon_{acc}"] == pytest.approx(fb.privacy.epsilon(
            first.noise_multiplier, first.sampling_rate, first.steps, first.delta, acc), rel=1e-9)
    assert all(q["epsilon_pld"] < q["epsilon_rdp"] < q["published_epsilon"] for q in pub)


def test_cli_errors_are_one_line(tmp_path, capsys):
    mod = _load("optimizers")
    with pytest.raises(SystemExit) as e:
        mod.main(["--quick", "--smoke"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not allowed with argument" in err
    run_all = _load("run_all")
    assert run_all.main(["--only", "nonsense", "--out", str(tmp_path)]) == 2
    assert "unknown experiment" in capsys.readouterr().err


def test_mlp_vs_cnn(smoke):
    """The two networks are the defaults they claim to be; parameters and multiply-adds match a
    count by hand from the configurations; every layer's gradient and δ norms are recorded, finite
    and non-zero; the δ ratios and the accuracy claim follow from the raw runs."""
    import fnbackprop as fb

    res = smoke("mlp_vs_cnn")
    mod = _load("mlp_vs_cnn")
    cfg = mod.CONFIGS["smoke"]
    s, runs = res["results"]["summary"], res["results"]["runs"]
    mlp_c, cnn_c = s["MLP"]["config"], s["CNN"]["config"]
    assert mlp_c["conv"] == [] and mlp_c["hidden"] == [512, 512] and mlp_c["lr"] == 1e-3
    want = fb.default_config("mnist1d")
    assert cnn_c["conv"] == [list(c) for c in want.conv] and len(want.conv) > 0
    assert cnn_c["hidden"] == list(want.hidden) and cnn_c["lr"] == want.lr
    assert cnn_c["schedule"] == want.schedule and cnn_c["augment"] == want.augment
    assert mlp_c["epochs"] == cnn_c["epochs"] == cfg["mlp_epochs"] == cfg["cnn_epochs"]

    def count(conv, hidden, length=40, c_in=1):
        params = macs = 0
        for c, k, stride in conv:
            length = -(-length // stride)  # SAME padding
            params += k * c_in * c + c
            macs += length * k * c_in * c
            c_in = c
        n = length * c_in
        for h in (*hidden, 10):
            params, macs, n = params + n * h + h, macs + n * h, h
        return params, macs

    for name, c in (("MLP", mlp_c), ("CNN", cnn_c)):
        p, m = count(c["conv"], c["hidden"])
        assert s[name]["params"] == p and s[name]["macs"] == m, name
        layers = len(c["conv"]) + len(c["hidden"]) + 1
        assert len(s[name]["layers"]) == layers
        for r in runs[name]:
            g, d = np.array(r["grad_norm"], float), np.array(r["delta_norm"], float)
            assert g.shape == d.shape == (cfg["cnn_epochs"], layers)
            assert np.all(np.isfinite(g)) and np.all(g > 0) and np.all(d > 0)
        d = np.array([r["delta_norm"] for r in runs[name]], float)
        assert s[name]["ratio_min"] == pytest.approx(float(np.min(d[:, :, 0] / d[:, :, -1])))
        acc = [r["test_acc"] for r in runs[name]]
        assert s[name]["acc_mean"] == pytest.approx(float(np.mean(acc)))
    assert s["CNN"]["params"] < s["MLP"]["params"]
    first = res["claims"][0]
    if s["CNN"]["acc_mean"] <= s["MLP"]["acc_mean"]:
        assert first["verdict"] == "not supported"
