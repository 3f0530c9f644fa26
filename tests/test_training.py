"""Training: regimes, batching, gradients, regularisation, skipping, early stopping, outputs."""

import dataclasses
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fnbackprop as fb
from fnbackprop import data as data_lib
from fnbackprop import training as T
from fnbackprop.diagnostics import delta_norm_sums, layer_grad_norms
from fnbackprop.training import CheckpointError, TrainConfig
from fnbackprop.training import config as C
from fnbackprop.training import prepare as P
from fnbackprop.training import step as S
from fnbackprop.training.sampling import shuffled_batches


def _subset(ds, n_train, n_test=None):
    n_test = n_test or len(ds.y_test)
    return dataclasses.replace(
        ds, x_train=ds.x_train[:n_train], y_train=ds.y_train[:n_train],
        x_test=ds.x_test[:n_test], y_test=ds.y_test[:n_test],
    )


@pytest.fixture(scope="module")
def xor():
    return data_lib.load_dataset("xor")


@pytest.fixture(scope="module")
def spirals():
    return data_lib.load_dataset("spirals")


TINY = dict(hidden=(8,), activation="tanh", init="xavier_normal", optimizer="adam", lr=1e-2,
            checkpoint_every=0)


def _initial_params(net, scheme, seed=0):
    """The parameters a float32 run with ``seed`` starts from."""
    return P._init_jit(P.run_keys(seed)[0], net, scheme, jnp.dtype("float32"))


def _flat(params):
    return np.concatenate([np.asarray(l).ravel() for l in jax.tree_util.tree_leaves(params)])


# --- configuration ----------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, needle", [
    ("lr", -1.0, "lr"), ("lr", float("nan"), "lr"), ("batch_size", 0, "batch_size"),
    ("batch_size", "half", "batch_size"), ("epochs", -3, "epochs"), ("dropout", 1.5, "dropout"),
    ("hidden", (64, 0), "hidden"), ("activation", "sigmod", "sigmod"),
    ("optimizer", "adamw", "adamw"), ("schedule", "linear", "linear"), ("dtype", "int8", "int8"),
    ("dataset", "mnist", "unknown dataset"), ("seed", -1, "seed"), ("l2", -0.1, "l2"),
    ("clip_norm", 0.0, "clip_norm"), ("keep_checkpoints", 0, "keep_checkpoints"),
    ("noise_multiplier", 1.0, "per_example_clip"), ("val_fraction", 1.0, "val_fraction"),
    ("gradient", "numeric", "numeric"), ("target", "y", "csv"),
])
def test_bad_config_values_raise_naming_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        TrainConfig(**{field: value})


def test_incompatible_settings_raise():
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(early_stopping=3, val_fraction=0.0)
    with pytest.raises(ValueError, match="dropout"):
        TrainConfig(per_example_clip=1.0, dropout=0.2)
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        T.train(dataset="xor", epochs=1, learning_rate=0.1)


@pytest.mark.parametrize("name", data_lib.DATASETS)
def test_default_config_fills_every_dataset_default(name):
    c = T.default_config(name)
    for f in C.DEFAULTED_FIELDS:
        assert getattr(c, f) is not None
    for k, v in T.DATASET_DEFAULTS[name].items():
        assert getattr(c, k) == v
    # A hand-built config keeps its own values; only None fields are filled.
    filled = C.fill_defaults(TrainConfig(dataset=name, lr=0.5))
    assert filled.lr == 0.5 and filled.hidden == c.hidden and filled.dropout == 0.0


def test_default_config_generic_file_and_unknown():
    assert T.default_config("my.csv").hidden == (64, 64)
    with pytest.raises(ValueError, match="unknown dataset"):
        T.default_config("nope")


# --- the step's gradient ----------------------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True])
def test_step_gradient_is_manual_grad_and_objective_is_loss(spirals, masked):
    net = fb.MLP((2, 6, 5, 2), "relu", "softmax", "cross_entropy")
    spec = S.StepSpec(net, S.OptimizerSpec("sgd", 0.1, "constant", 0), l1=1e-3, l2=1e-2,
                      dropout=0.3, batch=16)
    params = fb.init(jax.random.key(0), net, dtype=jnp.float64)
    x = jnp.asarray(spirals.x_train[:16], jnp.float64)
    y = jnp.asarray(spirals.y_train[:16])
    key = jax.random.key(7)
    mask = jnp.arange(16) < 16 if masked else None  # a mask of real rows changes nothing

    def step_gradient(p):
        loss_sum, g, dsum, n = S._data_gradient(spec)(p, x, y, mask, 16.0, key)
        return loss_sum / n + fb.losses.penalty(p, 1e-3, 1e-2), S._with_penalty(spec, p, g), dsum

    objective, g, dsum = jax.jit(step_gradient)(params)
    k_drop, _ = jax.random.split(key)
    kw = dict(l1=1e-3, l2=1e-2, dropout=0.3, key=k_drop)
    ref, ref_loss, deltas = jax.jit(lambda p: (
        fb.manual_grad(net, p, x, y, **kw), fb.loss(net, p, x, y, **kw),
        fb.backward(net, p, x, y, dropout=0.3, key=k_drop).delta))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(objective, ref_loss, rtol=1e-12)
    want = [np.sum(np.linalg.norm(np.asarray(d), axis=1)) for d in deltas]
    np.testing.assert_allclose(dsum, want, rtol=1e-12)


def test_diagnostics_helpers():
    g = [{"w": jnp.array([[3.0, 4.0]]), "b": jnp.zeros(2)},
         {"w": jnp.array([[1.0], [2.0]]), "b": jnp.zeros(1)}]
    np.testing.assert_allclose(layer_grad_norms(g), [5.0, math.sqrt(5.0)])
    d = (jnp.array([[3.0, 4.0], [0.0, 1.0]]), jnp.array([[2.0], [-2.0]]))
    np.testing.assert_allclose(delta_norm_sums(d), [6.0, 4.0])


# --- batching: every example once, loss over the true batch size -----------------------------
def _accumulate():
    """An optax transform that never moves the parameters and records the gradients it sees."""

    def init(params):
        z = jax.tree_util.tree_map(jnp.zeros_like, params)
        return (z, z, z, jnp.zeros((), jnp.int32))

    def update(g, state, params=None):
        total, last, first, count = state
        first = jax.tree_util.tree_map(lambda f, gi: jnp.where(count == 0, gi, f), first, g)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, g)
        return zeros, (jax.tree_util.tree_map(jnp.add, total, g), g, first, count + 1)

    return optax.GradientTransformation(init, update)


@pytest.mark.parametrize("batch_size", [1, 8, "full"])
def test_epoch_gradients_add_up_to_the_full_batch_gradient(spirals, batch_size):
    ds = _subset(spirals, 50)
    cfg = C.fill_defaults(TrainConfig(dataset="spirals", hidden=(5,), batch_size=batch_size,
                                       dtype="float64", l2=1e-2))
    prep = P.prepare(cfg, ds, jax.devices()[:1])
    tx = _accumulate()
    params = fb.init(jax.random.key(3), prep.net, dtype=jnp.float64)
    state = T.TrainState(params, tx.init(params), jax.random.key(4))
    x = jnp.asarray(prep.data.x_train, jnp.float64)
    y = jnp.asarray(prep.data.y_train)
    epoch = jax.jit(S.make_epoch(prep.spec, tx))
    out, stats = epoch(state, *shuffled_batches(5, 0, 50, prep.batch)[:2], x, y)
    total, last, first, count = out.opt_state
    n, b = 50, prep.batch
    nb, rem = divmod(n, b)
    assert int(count) == nb + (rem > 0) == int(stats.ok_steps)
    assert int(stats.examples) == n and int(stats.skipped) == 0
    # Σ_s B_s g_s = N g_full: B for the full batches, the remainder's size for the last step.
    summed = jax.tree_util.tree_map(
        lambda t, l: b * (t - l) + (rem if rem else b) * l, total, last)
    full = fb.manual_grad(prep.net, params, x, y, l2=1e-2)
    # Every step's gradient carries the penalty gradient l2·w once, so Σ_s B_s g_s also holds
    # N copies of it: the sum divided by N is the full-batch objective's gradient.
    for l in range(len(params)):
        for k in ("w", "b"):
            np.testing.assert_allclose(summed[l][k] / n, full[l][k], rtol=1e-11, atol=1e-14)
    # The epoch's permutation is a function of (seed, epoch): same epoch, same first batch;
    # the next epoch reshuffles (unless it is full batch).
    again, _ = epoch(state, *shuffled_batches(5, 0, 50, prep.batch)[:2], x, y)
    nxt, _ = epoch(state, *shuffled_batches(5, 1, 50, prep.batch)[:2], x, y)
    same = np.array_equal(_flat(again.opt_state[2]), _flat(first))
    differs = not np.array_equal(_flat(nxt.opt_state[2]), _flat(first))
    assert same
    assert differs == (batch_size != "full")


def test_epoch_permutation_depends_on_seed_and_epoch_only():
    p = T.epoch_permutation(3, 7, 100)
    assert p.dtype == np.int32 and sorted(p.tolist()) == list(range(100))
    np.testing.assert_array_equal(p, T.epoch_permutation(3, 7, 100))
    assert not np.array_equal(p, T.epoch_permutation(3, 8, 100))
    assert not np.array_equal(p, T.epoch_permutation(4, 7, 100))


# --- regimes converge --------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size, epochs, steps", [(1, 2, 800), (24, 12, 34), ("full", 150, 1)])
def test_each_regime_converges_on_xor(xor, batch_size, epochs, steps):
    r = T.train(dataset="xor", data=xor, hidden=(16, 16), activation="tanh",
                init="xavier_normal", optimizer="adam", lr=1e-2 if batch_size != "full" else 3e-2,
                batch_size=batch_size, epochs=epochs, checkpoint_every=0)
    h = r.history
    assert len(h) == epochs and all(e["steps"] == steps for e in h)
    assert h[-1]["train_loss"] < 0.5 * math.log(2)  # from ≈ log 2 at the start
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert r.summary["test_accuracy"] >= 0.9
    assert r.summary["final_train_loss"] == h[-1]["train_loss"]


# --- equivalences and determinism --------------------------------------------------------------
def test_manual_and_autodiff_runs_give_the_same_parameters(spirals):
    kw = dict(dataset="spirals", data=_subset(spirals, 96), hidden=(8, 8), activation="tanh",
              init="xavier_normal", optimizer="adam", lr=1e-2, batch_size=16, epochs=3,
              l2=1e-3, dropout=0.1, dtype="float64", checkpoint_every=0)
    manual = T.train(gradient="manual", **kw)
    auto = T.train(gradient="autodiff", **kw)
    np.testing.assert_allclose(_flat(manual.params), _flat(auto.params), rtol=1e-9, atol=1e-12)
    assert manual.params[0]["w"].dtype == jnp.float64


def test_same_seed_same_bits_and_another_seed_differs(xor):
    kw = dict(dataset="xor", data=_subset(xor, 100), **TINY, batch_size=10, epochs=2,
              dropout=0.2, augment=True)
    a = T.train(seed=3, **kw)
    b = T.train(seed=3, **kw)
    c = T.train(seed=4, **kw)
    assert a.summary["params_sha256"] == b.summary["params_sha256"]
    assert a.summary["params_sha256"] == T.params_sha256(a.params)
    assert a.history == [dict(h, epoch_time_s=h2["epoch_time_s"])
                         for h, h2 in zip(b.history, a.history)]
    assert c.summary["params_sha256"] != a.summary["params_sha256"]


def test_per_example_clip_with_a_huge_norm_is_the_plain_gradient(spirals):
    kw = dict(dataset="spirals", data=_subset(spirals, 64), hidden=(6,), activation="tanh",
              init="xavier_normal", optimizer="sgd", lr=0.1, batch_size=16, epochs=2,
              l2=1e-2, dtype="float64", checkpoint_every=0)
    plain = T.train(**kw)
    clipped = T.train(per_example_clip=1e12, **kw)
    np.testing.assert_allclose(_flat(clipped.params), _flat(plain.params), rtol=1e-10)
    noisy = T.train(per_example_clip=0.1, noise_multiplier=1.0, **kw)
    assert np.all(np.isfinite(_flat(noisy.params)))
    assert not np.allclose(_flat(noisy.params), _flat(plain.params))


def test_clipping_transforms_bound_each_update(xor):
    kw = dict(dataset="xor", data=_subset(xor, 60), **{**TINY, "optimizer": "sgd", "lr": 1.0},
              batch_size=10, epochs=1)
    by_norm_run = T.train(clip_norm=1e-3, **kw)
    p0 = _flat(_initial_params(by_norm_run.net, TINY["init"]))
    by_norm = _flat(by_norm_run.params)
    by_value = _flat(T.train(clip_value=1e-4, **kw).params)
    # 6 steps, each moving the parameters by at most the clip (float32 rounding: + 1e-6).
    assert 0 < np.linalg.norm(by_norm - p0) <= 6 * 1e-3 + 1e-6
    assert 0 < np.max(np.abs(by_value - p0)) <= 6 * 1e-4 + 1e-6


# --- non-finite steps and divergence -----------------------------------------------------------
def test_non_finite_steps_are_skipped_and_counted(xor):
    ds = _subset(xor, 40)
    cfg = C.fill_defaults(TrainConfig(dataset="xor", **TINY, batch_size=10))
    prep = P.prepare(cfg, ds, jax.devices()[:1])
    state = P.initial_state(prep)
    x = jnp.asarray(prep.data.x_train).at[7, 1].set(jnp.nan)
    y = jnp.asarray(prep.data.y_train)
    epoch = jax.jit(S.make_epoch(prep.spec))
    for e in range(2):
        state, stats = epoch(state, *shuffled_batches(0, e, 40, 10)[:2], x, y)
        assert int(stats.skipped) == 1 and int(stats.ok_steps) == 3
        assert int(stats.examples) == 30
        assert np.all(np.isfinite(_flat(state.params)))
    # Every step non-finite: everything skipped, nothing moves.
    before = _flat(state.params)
    state2, stats = epoch(state, *shuffled_batches(0, 2, 40, 10)[:2], jnp.full_like(x, jnp.nan), y)
    assert int(stats.skipped) == 4 and int(stats.ok_steps) == 0
    np.testing.assert_array_equal(_flat(state2.params), before)


def test_divergence_stops_and_keeps_the_last_good_parameters(xor, tmp_path):
    # ReLU layers and a huge step: after one update the activations overflow float32.
    kw = dict(dataset="xor", data=_subset(xor, 50),
              **{**TINY, "hidden": (8, 8), "activation": "relu", "init": "he_normal",
                 "optimizer": "sgd", "lr": 1e30, "checkpoint_every": 1}, batch_size=10, epochs=5)
    r = T.train(**kw, out=str(tmp_path / "run"))
    s, k = r.summary, r.summary["epochs_run"]
    assert s["diverged"] and f"diverged in epoch {k}" in s["stop_reason"] and k < 5
    assert r.history[-1]["diverged"] and s["best_epoch"] == k - 1
    assert np.all(np.isfinite(_flat(r.params)))
    # The parameters kept are those after epoch k − 1 (the initial ones if k = 1) ...
    if k > 1:
        good = T.train(**{**kw, "epochs": k - 1, "checkpoint_every": 0}).params
    else:
        good = _initial_params(r.net, "he_normal")
    np.testing.assert_array_equal(_flat(r.params), _flat(good))
    # ... and the diverged epoch was never checkpointed.
    steps = sorted(int(d) for d in os.listdir(tmp_path / "run" / "checkpoints"))
    assert steps == list(range(max(1, k - 3), k))


# --- regularisation and augmentation -----------------------------------------------------------
def test_l2_shrinks_weights_and_dropout_and_augment_change_training(xor):
    kw = dict(dataset="xor", data=_subset(xor, 100), **TINY, batch_size=10, epochs=3)
    base = T.train(**kw)
    l2 = T.train(l2=0.5, **kw)
    wnorm = lambda p: sum(float(jnp.sum(l["w"] ** 2)) for l in p)  # noqa: E731
    assert wnorm(l2.params) < wnorm(base.params)
    drop = T.train(dropout=0.3, **kw)
    aug = T.train(augment=True, **kw)
    shas = {base.summary["params_sha256"], drop.summary["params_sha256"],
            aug.summary["params_sha256"]}
    assert len(shas) == 3


def test_augment_runs_on_images(tmp_path):
    digits = _subset(data_lib.load_dataset("digits"), 200, 100)
    r = T.train(dataset="digits", data=digits, hidden=(16,), epochs=3, batch_size=50, lr=1e-2,
                augment=True, dropout=0.0, checkpoint_every=0)
    assert np.all(np.isfinite(_flat(r.params)))
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"]


@pytest.mark.parametrize("optimizer", T.OPTIMIZERS)
def test_every_optimizer_lowers_the_loss(xor, optimizer):
    lr = {"sgd": 0.5, "momentum": 0.1, "nesterov": 0.1, "adam": 1e-2, "rmsprop": 1e-2}[optimizer]
    r = T.train(dataset="xor", data=_subset(xor, 200), **{**TINY, "optimizer": optimizer,
                                                            "lr": lr}, batch_size=20, epochs=4)
    assert r.history[-1]["train_loss"] < r.history[0]["train_loss"] < math.log(2) + 0.1


def test_schedules_set_the_learning_rate(xor):
    kw = dict(dataset="xor", data=_subset(xor, 40), **{**TINY, "lr": 0.1}, batch_size=10,
              epochs=4)
    lrs = {s: [h["lr"] for h in T.train(schedule=s, **kw).history] for s in T.SCHEDULES}
    assert lrs["constant"] == [0.1] * 4
    total = 16
    np.testing.assert_allclose(lrs["cosine"],
                               [0.05 * (1 + math.cos(math.pi * 4 * e / total)) for e in range(4)],
                               rtol=1e-6)
    np.testing.assert_allclose(lrs["exponential"], [0.1 * 0.01 ** (4 * e / total) for e in range(4)],
                               rtol=1e-5)
    np.testing.assert_allclose(lrs["step"], [0.1, 0.1, 0.01, 0.001], rtol=1e-6)


# --- early stopping ----------------------------------------------------------------------------
def test_early_stopping_restores_the_best_parameters():
    r = T.train(dataset="breast_cancer", hidden=(128, 128), lr=1e-2, epochs=100,
                early_stopping=3, checkpoint_every=0)
    h, s = r.history, r.summary
    vals = [e["val_loss"] for e in h]
    best = int(np.argmin(vals)) + 1
    assert s["epochs_run"] < 100 and s["epochs_run"] == best + 3
    assert s["best_epoch"] == best and "early stopping" in s["stop_reason"]
    assert s["val_loss"] == h[best - 1]["val_loss"]  # the returned parameters are the best ones
    assert s["val_loss"] < h[-1]["val_loss"]
    assert s["n_val"] == round(0.1 * 455) and s["n_train"] == 455 - s["n_val"]


# --- outputs, checkpoints, resume --------------------------------------------------------------
SUMMARY_KEYS = {"test_accuracy", "test_loss", "final_train_loss", "epochs_run", "best_epoch",
                "train_time_s", "compile_time_s", "params_sha256", "devices", "config"}
HISTORY_KEYS = {"epoch", "train_loss", "test_loss", "test_accuracy", "grad_norm", "delta_norm",
                "skipped_steps", "lr", "epoch_time_s"}


def test_outputs_checkpoints_and_resume_equal_an_uninterrupted_run(xor, tmp_path):
    kw = dict(dataset="xor", data=_subset(xor, 100), **{**TINY, "checkpoint_every": 1},
              batch_size=16, epochs=5, keep_checkpoints=3, dropout=0.1)
    out = tmp_path / "run"
    r = T.train(out=str(out), **kw)
    assert SUMMARY_KEYS <= set(r.summary) and HISTORY_KEYS <= set(r.history[0])
    assert len(r.history[0]["grad_norm"]) == len(r.history[0]["delta_norm"]) == 2
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l) for l in lines] == r.history
    assert json.loads((out / "summary.json").read_text()) == r.summary
    want = C.make_config(None, {k: v for k, v in kw.items() if k != "data"}, None)
    assert r.summary["config"] == {**dataclasses.asdict(want), "hidden": [8], "conv": []}
    assert r.summary["config"] == want.to_dict()
    for png in ("curves.png", "gradient_flow.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(out / "checkpoints")) == ["3", "4", "5"]
    assert not [f for f in os.listdir(out) if ".tmp" in f]

    # Interrupt after epoch 3: drop the newer checkpoints and the final outputs, then resume.
    shutil.rmtree(out / "checkpoints" / "4")
    shutil.rmtree(out / "checkpoints" / "5")
    os.remove(out / "summary.json")
    resumed = T.train(out=str(out), resume=True, **kw)
    assert resumed.summary["resumed_from_epoch"] == 3
    assert resumed.summary["params_sha256"] == r.summary["params_sha256"]
    strip = lambda hs: [{k: v for k, v in h.items() if k != "epoch_time_s"} for h in hs]  # noqa
    assert strip(resumed.history) == strip(r.history)

    # A non-empty folder without resume, or a changed configuration, is refused untouched.
    before = sorted(os.listdir(out))
    with pytest.raises(ValueError, match="not empty"):
        T.train(out=str(out), **kw)
    with pytest.raises(CheckpointError, match="epochs: 5 → 6"):
        T.train(out=str(out), resume=True, **{**kw, "epochs": 6})
    assert sorted(os.listdir(out)) == before


def test_float64_needs_x64_and_check_first_batch(xor):
    report = T.check_first_batch(dataset="xor", data=_subset(xor, 64), **TINY, batch_size=16)
    assert report.passed
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match="jax_enable_x64"):
            T.train(dataset="xor", data=_subset(xor, 64), dtype="float64", epochs=1)
