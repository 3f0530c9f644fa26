"""Under ``jax.jit`` a traced argument is never silently wrong: what would be a ``ValueError``
for a concrete value makes the result NaN (a traced label outside [0, K): that example's loss
and gradient). Each case of the user report (``jg = jax.jit(fb.clipped_grad,
static_argnums=0)`` with clip_norm −1, 0 or NaN; label 7 for 3 classes; a traced ``l2=-1``) and
the other traced arguments, and the same values concrete still raising.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbackprop as fb
from fnbackprop.losses import prepare_targets
from fnbackprop.per_example import add_noise

FAST_COMPILE = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
NET = fb.MLP((3, 4, 3), "tanh", "softmax", "cross_entropy")
CNN = fb.Network((8, 2), (fb.Conv1D(3, 3, 2, activation="relu"), fb.Flatten(),
                          fb.Dense(3, "softmax")), "cross_entropy")


def batch(net, seed=0):
    rng = np.random.default_rng(seed)
    params = jax.tree.map(jnp.asarray, fb.init(jax.random.key(seed), net, "nielsen"))
    return params, jnp.asarray(rng.normal(size=(4, *net.input_shape))), jnp.array([0, 2, 1, 1])


def all_nan(tree) -> bool:
    return all(bool(jnp.all(jnp.isnan(v))) for v in jax.tree.leaves(tree))


def all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(tree))


# --- the user report --------------------------------------------------------------------------------
@pytest.mark.parametrize("net", [NET, CNN], ids=["mlp", "cnn"])
def test_jitted_clipped_grad_with_an_invalid_clip_norm_is_nan(net):
    params, x, y = batch(net)
    jg = jax.jit(fb.clipped_grad, static_argnums=0, static_argnames="per_layer")
    assert all_finite(jg(net, params, x, y, 0.5))
    for bad in (-1.0, 0.0, math.nan):  # was: the negated gradient, zeros, the unclipped one
        assert all_nan(jg(net, params, x, y, bad)), bad
        assert all_nan(jg(net, params, x, y, bad, per_layer=True)), bad
        with pytest.raises(ValueError, match="clip_norm must be a number > 0"):
            fb.clipped_grad(net, params, x, y, bad)
    assert all_finite(jg(net, params, x, y, math.inf))  # inf: no clipping, allowed


@pytest.mark.parametrize("net", [NET, CNN], ids=["mlp", "cnn"])
def test_jitted_out_of_range_label_gives_nan_for_that_example(net):
    params, x, _ = batch(net)
    y = jnp.array([0, 7, 1, -1])  # 7 and −1 are out of range for 3 classes
    loss = jax.jit(fb.loss, static_argnums=0)(net, params, x, y)
    assert bool(jnp.isnan(loss))  # was: a finite loss, as if the label were absent
    assert all_nan(jax.jit(fb.manual_grad, static_argnums=0)(net, params, x, y))
    pe = jax.jit(fb.per_example_grads, static_argnums=0)(net, params, x, y)
    for i in (1, 3):  # NaN in examples 1 and 3 (everywhere in the output layer; below it, where
        # a relu unit is off XLA may turn NaN · 0 into 0), examples 0 and 2 exact
        assert all_nan(jax.tree.map(lambda v: v[i], pe[-1]))
        assert not all_finite(jax.tree.map(lambda v: v[i], pe))
    good = fb.per_example_grads(net, params, x[::2], y[::2])
    for v, w in zip(jax.tree.leaves(pe), jax.tree.leaves(good)):
        np.testing.assert_allclose(v[::2], w, rtol=1e-12)
    bw = jax.jit(fb.backward, static_argnums=0)(net, params, x, y)
    assert bool(jnp.all(jnp.isnan(bw.delta[-1][1]))) and bool(jnp.all(jnp.isfinite(bw.delta[-1][0])))
    for f in (fb.loss, fb.manual_grad, fb.backward):
        with pytest.raises(ValueError, match="label 7 is out of range: labels must be in \\[0, 3\\)"):
            f(net, params, x, y)


@pytest.mark.parametrize("kw", [{"l2": -1.0}, {"l1": math.nan}, {"l2": math.inf}, {"l1": -0.5}])
def test_jitted_invalid_penalty_strength_is_nan(kw):
    params, x, y = batch(CNN)
    (name, value), = kw.items()
    grad = jax.jit(lambda p, v: fb.manual_grad(CNN, p, x, y, **{name: v}))
    loss = jax.jit(lambda p, v: fb.loss(CNN, p, x, y, **{name: v}))
    assert all_finite(grad(params, 0.1)) and bool(jnp.isfinite(loss(params, 0.1)))
    assert all_nan(grad(params, value))  # every entry, biases too
    assert bool(jnp.isnan(loss(params, value)))
    assert all_nan(jax.jit(lambda w, v: fb.losses.penalty_grad(w, **{name: v}))(params[0]["w"], value))
    bw = fb.backward(CNN, params, x, y)
    assert all_nan(jax.jit(lambda v: fb.grads_from_backward(params, bw, net=CNN, **{name: v}))(value))
    with pytest.raises(ValueError, match=f"{name} must be a finite number ≥ 0"):
        fb.manual_grad(CNN, params, x, y, **kw)


# --- the other traced arguments --------------------------------------------------------------------
def test_jitted_invalid_noise_multiplier_normalize_by_and_mask_are_nan():
    params, x, y = batch(CNN)
    key = jax.random.key(0)
    run = jax.jit(lambda p, **kw: fb.clipped_grad(CNN, p, x, y, 0.5, **kw),
                  compiler_options=FAST_COMPILE)
    assert all_finite(run(params, noise_multiplier=1.0, key=key, normalize_by=3.0))
    for sigma in (-1.0, math.inf, math.nan):
        assert all_nan(run(params, noise_multiplier=sigma, key=key)), sigma
    for n in (0.0, -2.0, math.inf):
        assert all_nan(run(params, normalize_by=n)), n
    assert all_finite(run(params, mask=jnp.array([1, 0, 1, 1])))
    assert all_nan(run(params, mask=jnp.array([1, 2, 1, 1])))  # not 0/1
    grads = fb.clipped_grad(CNN, params, x, y, 0.5)
    noisy = jax.jit(lambda s, c, n: add_noise(grads, s, c, n, key))
    assert all_finite(noisy(1.0, 0.5, 4.0))
    for bad in ((-1.0, 0.5, 4.0), (1.0, -0.5, 4.0), (1.0, 0.5, 0.0)):
        assert all_nan(noisy(*bad)), bad


def test_jitted_invalid_dropout_rate_is_nan():
    net = fb.MLP((3, 5, 3), "relu", "softmax", "cross_entropy")
    params, x, y = batch(net)
    grad = jax.jit(lambda p, r: fb.manual_grad(net, p, x, y, dropout=r, key=jax.random.key(1)))
    assert all_finite(grad(params, 0.5))
    for rate in (-0.1, 1.0, 1.5, math.nan):  # were: masks of zeros, or scaled by the wrong 1/(1−p)
        assert not all_finite(grad(params, rate)), rate
        assert bool(jnp.isnan(jax.jit(lambda r: fb.loss(net, params, x, y, dropout=r,
                                                        key=jax.random.key(1)))(rate)))


def test_traced_shapes_and_dtypes_are_still_checked():
    params, x, y = batch(NET)
    with pytest.raises(ValueError, match="clip_norm must be a number > 0 .*shape \\(2,\\)"):
        jax.jit(lambda c: fb.clipped_grad(NET, params, x, y, c))(jnp.ones(2))
    with pytest.raises(ValueError, match="mask must be a \\(4,\\) array of booleans or 0/1"):
        jax.jit(lambda m: fb.clipped_grad(NET, params, x, y, 1.0, mask=m))(jnp.ones(3, bool))
    with pytest.raises(ValueError, match="integer labels in \\[0, 3\\)"):
        jax.jit(lambda y: fb.loss(NET, params, x, y))(y.astype(jnp.float32))


def test_checked_labels_are_one_hot_encoded_without_guard_ops():
    """For labels validated on the host, ``checked=True`` encodes traced labels with no checking
    op: the same program as ``jax.nn.one_hot`` alone."""
    labels = jnp.array([0, 2, 1])

    def eqns(f):
        return [e.primitive.name for e in jax.make_jaxpr(f)(labels).eqns]

    plain = eqns(lambda y: jax.nn.one_hot(y, 3, dtype=jnp.float64))
    assert eqns(lambda y: prepare_targets(NET, y, 3, jnp.float64, checked=True)) == plain
    guarded = jax.make_jaxpr(lambda y: prepare_targets(NET, y, 3, jnp.float64))(labels)
    assert len(guarded.eqns) > len(plain) and "select_n" in str(guarded)
    # Prepared (B, K) targets pass through backward as they are: no guard there either.
    params, x, _ = batch(NET)
    y_t = prepare_targets(NET, jnp.array([0, 2, 1, 1]), 4, jnp.float64, checked=True)
    np.testing.assert_array_equal(fb.backward(NET, params, x, y_t).delta[0],
                                  fb.backward(NET, params, x, jnp.array([0, 2, 1, 1])).delta[0])


def test_traced_arguments_keep_the_parameters_dtype():
    """The guards are weakly typed: traced float arguments leave float32 results float32."""
    net = fb.MLP((3, 4, 3), "relu", "softmax", "cross_entropy")
    params = fb.init(jax.random.key(0), net, dtype=jnp.float32)
    x, y = jnp.ones((2, 3), jnp.float32), jnp.array([0, 1])
    key = jax.random.key(0)
    results = jax.jit(lambda p, v: (
        fb.manual_grad(net, p, x, y, l1=v, l2=v, dropout=v, key=key),
        fb.clipped_grad(net, p, x, y, v, normalize_by=v, noise_multiplier=v, key=key),
        fb.loss(net, p, x, y, l2=v, dropout=v, key=key),
    ))(params, 0.5)
    assert {v.dtype for v in jax.tree.leaves(results)} == {jnp.dtype(jnp.float32)}
