"""Private training: Poisson batches, masks, nan-safe steps, ε accounting, the CLI's DP flags."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbackprop as fb
from fnbackprop import cli
from fnbackprop import data as data_lib
from fnbackprop import privacy
from fnbackprop.training import config as C
from fnbackprop.training import prepare as P
from fnbackprop.training import step as S
from fnbackprop.training.sampling import batching, poisson_batches


@pytest.fixture(scope="module")
def digits():
    return data_lib.load_dataset("digits")


def _flat(params):
    return np.concatenate([np.asarray(l).ravel() for l in jax.tree_util.tree_leaves(params)])


# --- Poisson batches ---------------------------------------------------------------------------
def test_poisson_batch_sizes_and_inclusion_frequencies_follow_the_binomial():
    n, expected, steps, capacity = 1000, 100, 400, 160
    b = poisson_batches(3, 0, n, expected, steps, capacity)
    q = expected / n
    sizes = b.mask.sum(axis=1)
    # Batch sizes ~ Binomial(n, q): mean nq (s.e. √(nq(1−q)/steps)), variance nq(1−q).
    var = n * q * (1 - q)
    assert abs(sizes.mean() - n * q) < 4 * math.sqrt(var / steps)
    assert 0.75 * var < sizes.var() < 1.3 * var
    # Every example is included with probability q in each step, independently of the others.
    counts = np.bincount(b.idx[b.mask], minlength=n)
    freq = counts / steps
    assert abs(freq.mean() - q) < 0.005
    assert 0.8 < freq.var() / (q * (1 - q) / steps) < 1.2
    # No example twice in a batch; padding rows are masked; nothing was truncated.
    for row, m in zip(b.idx, b.mask):
        assert len(set(row[m].tolist())) == m.sum()
    assert b.truncated == 0 and b.idx.shape == (steps, capacity)


def test_poisson_batches_are_a_function_of_seed_and_epoch_and_truncate_at_capacity():
    a = poisson_batches(1, 4, 500, 50, 20, 80)
    np.testing.assert_array_equal(a.idx, poisson_batches(1, 4, 500, 50, 20, 80).idx)
    assert not np.array_equal(a.mask, poisson_batches(1, 5, 500, 50, 20, 80).mask)
    small = poisson_batches(1, 4, 500, 50, 20, 30)  # capacity below most batch sizes
    assert small.truncated > 0 and small.mask.all(axis=1).sum() >= small.truncated


def test_capacity_comes_from_the_accounting_and_is_rounded_for_the_devices():
    plan = batching(4000, 100, poisson=True, epochs=10, multiple=8)
    cap = privacy.poisson_batch_capacity(4000, 100, 10 * 40)
    assert plan.steps == 40 and plan.rows % 8 == 0 and cap.capacity <= plan.rows < cap.capacity + 8
    assert plan.overflow_probability == cap.overflow_probability and plan.masked


# --- the private step --------------------------------------------------------------------------
def _private_epoch(ds, **kw):
    cfg = C.make_config(None, dict(dataset="digits", hidden=(16,), epochs=1, batch_size=64,
                                   dropout=0.0, per_example_clip=1.0, noise_multiplier=0.5,
                                   checkpoint_every=0, dtype="float64", **kw), ds)
    prep = P.prepare(cfg, ds, jax.devices()[:1])
    state = P.initial_state(prep)
    x = jnp.asarray(prep.data.x_train, jnp.float64)
    y = jnp.asarray(prep.data.y_train)
    return prep, state, x, y, jax.jit(S.make_epoch(prep.spec))


def test_masked_rows_change_nothing_even_when_they_hold_nan(digits):
    prep, state, x, y, epoch = _private_epoch(digits)
    b = poisson_batches(0, 0, x.shape[0], prep.batch, prep.steps_per_epoch, prep.spec.batch)
    bad = 7
    x_bad = x.at[bad].set(jnp.nan)
    idx = np.where(b.mask, b.idx, bad)  # every padding row points at the NaN example ...
    keep = b.mask & (b.idx != bad)      # ... which is never a real row
    idx_clean = np.where(b.mask & (b.idx == bad), 0, idx)
    ref, _ = epoch(state, idx_clean, keep, x, y)
    got, stats = epoch(state, idx, keep, x_bad, y)
    np.testing.assert_array_equal(_flat(got.params), _flat(ref.params))
    assert int(stats.skipped) == 0


def test_a_nan_example_is_zeroed_and_no_step_is_skipped(digits):
    prep, state, x, y, epoch = _private_epoch(digits)
    b = poisson_batches(0, 0, x.shape[0], prep.batch, prep.steps_per_epoch, prep.spec.batch)
    bad = int(b.idx[0][b.mask[0]][0])  # a real row of the first step
    got, stats = epoch(state, b.idx, b.mask, x.at[bad].set(jnp.nan), y)
    assert int(stats.skipped) == 0 and int(stats.ok_steps) == prep.steps_per_epoch
    assert np.all(np.isfinite(_flat(got.params)))
    # The same as if that example had not been sampled (the denominator is the expected B).
    ref, _ = epoch(state, b.idx, b.mask & (b.idx != bad), x, y)
    np.testing.assert_allclose(_flat(got.params), _flat(ref.params), rtol=1e-12, atol=1e-15)


def test_physical_batches_give_the_same_step(digits):
    prep, state, x, y, epoch = _private_epoch(digits)
    chunked = _private_epoch(digits, physical_batch_size=16)
    b = poisson_batches(0, 0, x.shape[0], prep.batch, prep.steps_per_epoch, chunked[0].spec.batch)
    one, _ = epoch(state, b.idx, b.mask, x, y)
    many, _ = chunked[4](state, b.idx, b.mask, x, y)
    np.testing.assert_allclose(_flat(many.params), _flat(one.params), rtol=1e-10, atol=1e-13)


# --- accounting in a run ------------------------------------------------------------------------
KW = dict(dataset="digits", hidden=(16,), epochs=3, batch_size=64, dropout=0.0,
          per_example_clip=1.0, checkpoint_every=0)


def test_a_private_run_reports_the_epsilon_of_dp_accounting(digits):
    r = fb.train(data=digits, noise_multiplier=1.1, accountant="rdp", **KW)
    pv = r.summary["privacy"]
    n = r.summary["n_train"]
    q, steps = 64 / n, 3 * round(n / 64)
    assert pv["sampling"] == "poisson" and pv["steps"] == steps
    assert pv["sampling_rate"] == pytest.approx(q) and pv["delta"] == 1e-5
    eps = [h["epsilon"] for h in r.history]
    assert eps == [privacy.epsilon(1.1, q, e * steps // 3, 1e-5, "rdp") for e in (1, 2, 3)]
    assert pv["epsilon"] == eps[-1] and eps[0] < eps[1] < eps[2]
    # Metrics of the training data are off under DP, and say so when asked for.
    assert "train_loss" not in r.history[0] and "grad_norm" not in r.history[0]
    assert len(pv["not_covered"]) == 1 and "standardisation" in pv["not_covered"][0]
    logged = fb.train(data=digits, noise_multiplier=1.1, train_metrics=True, early_stopping=2,
                      **KW).summary["privacy"]["not_covered"]
    assert any("early-stopping" in t for t in logged) and any("grad_norm" in t for t in logged)


def test_target_epsilon_ends_at_or_below_the_target(digits):
    r = fb.train(data=digits, target_epsilon=2.0, accountant="rdp", **KW)
    pv = r.summary["privacy"]
    assert pv["epsilon"] <= 2.0 and pv["epsilon"] > 1.99
    assert pv["noise_multiplier"] == privacy.noise_multiplier_for(2.0, pv["sampling_rate"],
                                                                  pv["steps"], 1e-5, "rdp")


def test_shuffled_batches_report_the_epsilon_without_amplification(digits):
    r = fb.train(data=digits, noise_multiplier=1.1, sampling="shuffle", accountant="rdp", **KW)
    pv = r.summary["privacy"]
    assert pv["sampling"] == "shuffle" and "zero-out" in pv["adjacency"]
    assert pv["epsilon"] == privacy.epsilon_shuffled(1.1, 3, 1e-5, "rdp")


@pytest.mark.parametrize("fields, needle", [
    (dict(target_epsilon=2.0, noise_multiplier=1.0), "noise_multiplier"),
    (dict(target_epsilon=2.0, per_example_clip=None), "per_example_clip"),
    (dict(target_epsilon=-1.0), "target_epsilon"),
    (dict(delta=1.5), "delta"),
    (dict(accountant="gdp"), "gdp"),
    (dict(sampling="random"), "random"),
    (dict(physical_batch_size=0), "physical_batch_size"),
    (dict(physical_batch_size=8, per_example_clip=None), "per_example_clip"),
    (dict(target_epsilon=2.0, sampling="shuffle"), "Poisson"),
    (dict(noise_multiplier=1.0, batch_size="full"), "full"),
])
def test_bad_private_settings_are_refused(fields, needle):
    with pytest.raises(ValueError, match=needle):
        fb.TrainConfig(**{"per_example_clip": 1.0, **fields})


@pytest.mark.parametrize("argv, needle", [
    (["--per-example-clip", "1", "--target-epsilon", "2", "--noise-multiplier", "1"],
     "noise_multiplier"),
    (["--target-epsilon", "2"], "per_example_clip"),
    (["--per-example-clip", "1", "--delta", "2"], "--delta"),
    (["--per-example-clip", "1", "--accountant", "gdp"], "gdp"),
    (["--per-example-clip", "1", "--physical-batch-size", "0"], "--physical-batch-size"),
])
def test_bad_private_flags_are_one_line_exit_2(argv, needle, tmp_path, capsys):
    try:
        rc = cli.main(["train", "--dataset", "xor", *argv, "--out", str(tmp_path / "o")])
    except SystemExit as e:
        rc = int(e.code)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0]
    assert not (tmp_path / "o").exists()


def test_the_private_command_prints_epsilon_and_delta(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FNBACKPROP_COMPILE_CACHE", "0")
    out = tmp_path / "run"
    rc = cli.main(["train", "--dataset", "xor", "--hidden", "8", "--epochs", "2",
                   "--per-example-clip", "1", "--noise-multiplier", "1", "--accountant", "rdp",
                   "--quiet", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "privacy: (ε = " in text and "δ = 1e-05" in text
    assert "gradient check" not in text and not (out / "gradient_flow.png").exists()
