"""Per-example gradients, norms and clipping for convolutional networks, and the clipping
contract the training step relies on: masks, ``normalize_by``, non-finite examples,
:func:`fnbackprop.clipped_grads_from_backward`, :func:`fnbackprop.per_example.add_noise` and
weighted backward passes.

References are materialised per-example gradients from ``vmap(jax.grad)`` in float64; equality
is ``max |err| / max |ref|`` per array, ≤ 1e-10.
"""

from __future__ import annotations

import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbackprop as fb
from fnbackprop.layers import weight_grad_norm_sq
from fnbackprop.per_example import add_noise

REL = 1e-10
FAST_COMPILE = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def conv_net(hidden="tanh", head=("softmax", "cross_entropy"), length=24):
    """Conv (materialised norms: T² large), conv (ghost norms), flatten, dense, dense."""
    output, loss = head
    return fb.Network((length, 2), (
        fb.Conv1D(4, 2, 1, "SAME", hidden),            # T = 24, p·d = 4·4: materialised
        fb.Conv1D(6, 5, 3, "VALID", hidden),           # T = 7, p·d = 20·6 > 2·49: ghost
        fb.Flatten(), fb.Dense(4, hidden), fb.Dense(3, output)), loss)


def make(net, batch=6, seed=0):
    """Parameters (non-zero biases) and a batch, drawn with NumPy."""
    rng = np.random.default_rng(seed)
    params = []
    for layer, shape in zip(net.layers, net.shapes):
        p_shapes = layer.param_shapes(shape)
        params.append({} if not p_shapes else {
            "w": jnp.asarray(rng.normal(size=p_shapes["w"]) / math.sqrt(layer.fans(shape)[0])),
            "b": jnp.asarray(0.3 * rng.normal(size=p_shapes["b"]))})
    x = jnp.asarray(rng.normal(size=(batch, *net.input_shape)))
    k = net.output_size
    if net.loss == "cross_entropy":
        y = jnp.asarray(rng.integers(0, k, size=batch))
    elif net.loss == "binary_cross_entropy":
        y = jnp.asarray(rng.integers(0, 2, size=(batch, k)).astype(float))
    else:
        y = jnp.asarray(rng.uniform(size=(batch, k)))
    return params, x, y


def assert_close(got, ref, rel=REL):
    chex.assert_trees_all_equal_shapes(got, ref)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        g, r = np.asarray(g), np.asarray(r)
        assert np.all(np.isfinite(g)), "non-finite entries"
        scale = max(np.max(np.abs(r), initial=0.0), 1e-300)
        err = np.max(np.abs(g - r), initial=0.0)
        assert err <= rel * scale, f"relative error {err / scale:.3e} > {rel:.0e}"


def norms_of(g, per_layer=False):
    """Norms of materialised per-example gradients: ``(B,)`` or ``(B, L_p)`` (NumPy)."""
    cols = [np.sqrt(sum(np.sum(np.asarray(v).reshape(v.shape[0], -1) ** 2, axis=1)
                        for v in p.values())) for p in g if p]
    sq = np.stack(cols, axis=1)
    return sq if per_layer else np.sqrt(np.sum(sq**2, axis=1))


def reference_clip(g, clip_norm, per_layer=False, mask=None, normalize_by=None):
    """``(1/n) Σ_{i kept} c_i g_i`` from materialised gradients: rows outside the mask and rows
    with a non-finite norm are left out, n defaults to the number of rows in the mask."""
    norms = norms_of(g, per_layer)
    batch = norms.shape[0]
    mask = np.ones(batch, bool) if mask is None else np.asarray(mask, bool)
    n = mask.sum() if normalize_by is None else normalize_by
    num_layers = norms.shape[1] if per_layer else 1
    limit = clip_norm / math.sqrt(num_layers) if per_layer else clip_norm
    keep = np.isfinite(norms) & (mask[:, None] if per_layer else mask)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(keep, np.minimum(1.0, limit / norms), 0.0)
    out, j = [], 0
    for p in g:
        if not p:
            out.append({})
            continue
        c_l = c[:, j] if per_layer else c
        k_l = keep[:, j] if per_layer else keep
        out.append({name: np.tensordot(c_l[k_l], np.asarray(v)[k_l], axes=1) / n
                    for name, v in p.items()})
        j += 1
    return out


@jax.jit(static_argnums=0, compiler_options=FAST_COMPILE)
def everything(net, params, x, y):
    return {
        "manual": fb.per_example_grads(net, params, x, y),
        "vmap": fb.per_example_grads(net, params, x, y, method="vmap"),
        "manual_grad": fb.manual_grad(net, params, x, y),
        "norms": fb.per_example_grad_norms(net, params, x, y),
        "layer_norms": fb.per_example_grad_norms(net, params, x, y, per_layer=True),
    }


clipped_and_norms = jax.jit(fb.clipped_grad_and_norms, static_argnums=0,
                            static_argnames=("per_layer", "normalize_by"),
                            compiler_options=FAST_COMPILE)


# --- per-example gradients and norms --------------------------------------------------------------
HEADS = [("identity", "mse"), ("softmax", "cross_entropy"), ("sigmoid", "binary_cross_entropy")]


@pytest.mark.parametrize("hidden,head", [("tanh", HEADS[1]), ("relu", HEADS[0]), ("gelu", HEADS[2])])
def test_conv_per_example_grads_and_norms_equal_vmap(hidden, head):
    net = conv_net(hidden, head)
    assert [net.layers[i].norm_method(net.shapes[i]) for i in (0, 1)] == ["materialised", "ghost"]
    params, x, y = make(net, batch=5, seed=len(hidden))
    r = everything(net, params, x, y)
    assert_close(r["manual"], r["vmap"])
    assert_close(jax.tree.map(lambda v: jnp.mean(v, axis=0), r["manual"]), r["manual_grad"])
    assert_close(r["norms"], norms_of(r["vmap"]))
    assert_close(r["layer_norms"], norms_of(r["vmap"], per_layer=True))
    chex.assert_shape(r["layer_norms"], (5, 4))  # one column per layer with parameters


def test_ghost_and_materialised_norms_agree():
    rng = np.random.default_rng(3)
    both = jax.jit(lambda u, d: [weight_grad_norm_sq(u, d, m) for m in ("ghost", "materialised")])
    for t, p, d in [(1, 5, 3), (7, 6, 4), (30, 2, 2)]:
        u, delta = (jnp.asarray(rng.normal(size=(4, t, n))) for n in (p, d))
        by_hand = [np.sum((np.asarray(u[i]).T @ np.asarray(delta[i])) ** 2) for i in range(4)]
        for got in both(u, delta):
            np.testing.assert_allclose(got, by_hand, rtol=1e-12)
    net = conv_net()
    params, x, y = make(net)

    @jax.jit
    def layer_norms(params, x, y):
        bw = fb.backward(net, params, x, y)
        return [[net.layers[i].norm_sq(bw.trace.a[i], bw.delta[i], m)
                 for m in ("ghost", "materialised")] for i in net.param_layers]

    for ghost, materialised in layer_norms(params, x, y):
        np.testing.assert_allclose(ghost, materialised, rtol=1e-12)


def test_norm_method_of_the_mnist1d_cnn():
    """Li et al.'s rule: ghost when 2T² < k·c_in·c_out; a dense layer is always ghost (T = 1)."""
    cnn = fb.Network((40, 1), (fb.Conv1D(25, 5, activation="relu"), fb.Conv1D(25, 5, 2, activation="relu"),
                               fb.Conv1D(25, 5, 2, activation="relu"), fb.Flatten(),
                               fb.Dense(10, "softmax")))
    methods = [cnn.layers[i].norm_method(cnn.shapes[i]) for i in cnn.param_layers]
    assert methods == ["materialised", "ghost", "ghost", "ghost"]  # 2·40² ≥ 5·1·25; 2·20² < 5·25·25


# --- clipping ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per_layer"])
def test_conv_clipping_equals_reference(per_layer):
    net = conv_net("leaky_relu")
    params, x, y = make(net, batch=8, seed=4)
    g = everything(net, params, x, y)["vmap"]
    norms = norms_of(g, per_layer)
    clip_norm = float(np.median(norms)) * (2.0 if per_layer else 1.0)
    got, got_norms = clipped_and_norms(net, params, x, y, clip_norm, per_layer=per_layer)
    assert_close(got, reference_clip(g, clip_norm, per_layer))
    assert_close(got_norms, norms)
    limit = clip_norm / 2.0 if per_layer else clip_norm  # √L_p = 2
    assert 0 < np.mean(norms > limit) < 1  # some clipped, some not


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_masked_rows_contribute_nothing_even_when_nan(kind):
    net = conv_net() if kind == "conv" else fb.MLP((4, 6, 3), "relu", "softmax", "cross_entropy")
    params, x, y = make(net, batch=7, seed=8)
    mask = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    x_bad = x.at[1].set(jnp.nan).at[4].set(jnp.inf)  # garbage in the masked rows
    y_bad = y.at[1].set(10**6) if net.loss == "cross_entropy" else y
    keep = np.flatnonzero(mask)

    @jax.jit(compiler_options=FAST_COMPILE)
    def run(x_bad, y_bad, x, y):
        return [(fb.clipped_grad_and_norms(net, params, x_bad, y_bad, 0.5, per_layer=per_layer,
                                           mask=m),
                 fb.clipped_grad_and_norms(net, params, x, y, 0.5, per_layer=per_layer))
                for per_layer in (False, True)
                for m in (jnp.asarray(mask), jnp.asarray(mask.astype(np.int32)))]  # bool or 0/1

    for (got, norms), (want, want_norms) in run(x_bad, y_bad, x[keep], y[keep]):
        assert_close(got, want)
        np.testing.assert_array_equal(np.asarray(norms)[~mask], 0.0)
        np.testing.assert_allclose(np.asarray(norms)[mask], want_norms, rtol=1e-12)
    # normalize_by replaces the number of unmasked rows (5) as the denominator.
    got, _ = clipped_and_norms(net, params, x_bad, y_bad, 0.5, mask=jnp.asarray(mask), normalize_by=2.0)
    want, _ = clipped_and_norms(net, params, x[keep], y[keep], 0.5)
    assert_close(got, jax.tree.map(lambda v: v * 5 / 2, want))
    # Every row masked: a zero gradient, zero norms.
    got, norms = clipped_and_norms(net, params, x_bad, y_bad, 0.5, mask=jnp.zeros(7, bool))
    chex.assert_trees_all_equal(got, jax.tree.map(jnp.zeros_like, params))
    np.testing.assert_array_equal(norms, 0.0)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_a_non_finite_example_contributes_nothing_and_the_rest_is_exact(kind):
    net = conv_net() if kind == "conv" else fb.MLP((4, 6, 3), "tanh", "softmax", "cross_entropy")
    params, x, y = make(net, batch=6, seed=9)
    g = everything(net, params, x, y)["vmap"]
    keep = np.arange(6) != 2
    everyone = jnp.ones(6, bool)
    for bad_x in (jnp.nan, jnp.inf):
        x_bad = x.at[2].set(bad_x)
        for per_layer in (False, True):
            ref = reference_clip(g, 0.3, per_layer, mask=keep, normalize_by=6)
            # With a mask, every row that does not count is zeroed, the input's too: exact.
            got, norms = clipped_and_norms(net, params, x_bad, y, 0.3, per_layer=per_layer,
                                           mask=everyone)
            assert not np.all(np.isfinite(np.asarray(norms)[2]))  # the norm shows it
            assert np.all(np.isfinite(np.delete(np.asarray(norms), 2, axis=0)))
            assert_close(got, ref)
            # Without one the input itself is not copied: its non-finite row reaches the first
            # layer's weight gradient (loudly, as NaN); everything after it is exact.
            got, _ = clipped_and_norms(net, params, x_bad, y, 0.3, per_layer=per_layer)
            assert not np.all(np.isfinite(np.asarray(got[0]["w"])))
            assert_close([{"b": got[0]["b"]}] + got[1:], [{"b": ref[0]["b"]}] + ref[1:])


def test_an_example_that_overflows_inside_the_network_is_dropped_without_a_mask():
    net = fb.MLP((4, 6, 3), "relu", "softmax", "cross_entropy")
    params, x, y = make(net, batch=6, seed=9)
    x_big = x.at[2].set(1e300)  # finite, but its activations and norm overflow
    g = everything(net, params, x, y)["vmap"]
    got, norms = clipped_and_norms(net, params, x_big, y, 0.3)
    assert not np.isfinite(np.asarray(norms)[2])
    assert_close(got, reference_clip(g, 0.3, False, mask=np.arange(6) != 2, normalize_by=6))


def test_normalize_by_and_its_errors():
    net = conv_net()
    params, x, y = make(net)
    got, _ = clipped_and_norms(net, params, x, y, 0.4, normalize_by=10)
    want, _ = clipped_and_norms(net, params, x, y, 0.4)
    assert_close(got, jax.tree.map(lambda v: v * 6 / 10, want))
    for bad in (0, -1.0, math.inf, math.nan, "n"):
        with pytest.raises(ValueError, match="normalize_by must be a finite number > 0"):
            fb.clipped_grad(net, params, x, y, 0.4, normalize_by=bad)
    for bad, named in ((jnp.ones(5, bool), "shape (5,)"), (jnp.array([0, 1, 2, 1, 1, 1]), "value 2"),
                       (np.array(list("abcdef")), "dtype <U1")):
        with pytest.raises(ValueError, match=f"mask must be .*{re.escape(named)}"):
            fb.clipped_grad(net, params, x, y, 0.4, mask=bad)


# --- the pieces the training step uses ------------------------------------------------------------
def test_clipped_grads_from_backward_is_clipped_grad_and_norms():
    net = conv_net("relu")
    params, x, y = make(net, batch=5, seed=2)
    mask = jnp.array([True, True, False, True, True])
    kw = dict(noise_multiplier=0.7, key=jax.random.key(3), mask=mask, normalize_by=8.0)

    @jax.jit(compiler_options=FAST_COMPILE)
    def both(params, x, y):
        bw = fb.backward(net, params, x, y)
        return [(fb.clipped_grads_from_backward(net, params, bw, 0.2, per_layer=pl, **kw),
                 fb.clipped_grad_and_norms(net, params, x, y, 0.2, per_layer=pl, **kw))
                for pl in (False, True)]

    for from_bw, direct in both(params, x, y):
        chex.assert_trees_all_close(from_bw, direct, rtol=1e-14)
    with pytest.raises(ValueError, match="bw has 4 deltas but net has 5 layers"):
        bw = fb.backward(net, params, x, y)
        fb.clipped_grads_from_backward(net, params, bw._replace(delta=bw.delta[1:]), 0.2)


def test_add_noise_is_the_noise_of_clipped_grad():
    net = conv_net()
    params, x, y = make(net)
    key = jax.random.key(5)

    @jax.jit
    def draws(key):
        clean = fb.clipped_grad(net, params, x, y, 0.5, normalize_by=4.0)
        noisy = fb.clipped_grad(net, params, x, y, 0.5, normalize_by=4.0, noise_multiplier=1.5,
                                key=key)
        return clean, noisy, add_noise(jax.tree.map(jnp.zeros_like, clean), 1.5, 0.5, 4.0, key)

    clean, noisy, noise = draws(key)
    assert_close(jax.tree.map(jnp.subtract, noisy, clean), noise, rel=1e-12)
    assert noise[2] == {}
    with pytest.raises(ValueError, match="normalize_by must be a finite number > 0, got 0"):
        add_noise(clean, 1.0, 0.5, 0, key)


def test_add_noise_statistics():
    """N(0, (σC/n)²) on every entry, independent between arrays; same key, same noise."""
    zeros = [{"w": jnp.zeros((5, 40, 50)), "b": jnp.zeros(2000)}, {},
             {"w": jnp.zeros((100, 30)), "b": jnp.zeros(3000)}]
    sigma, clip_norm, n = 2.0, 0.3, 6.0
    std = sigma * clip_norm / n
    draw = jax.jit(lambda k: add_noise(zeros, sigma, clip_norm, n, k))
    noise = draw(jax.random.key(1))
    leaves = [np.ravel(v) for v in jax.tree.leaves(noise)]  # 2000–10000 entries each
    pooled = np.concatenate(leaves)
    assert abs(np.mean(pooled)) < 5 * std / math.sqrt(pooled.size)
    assert abs(np.std(pooled) / std - 1) < 0.02
    for v in leaves:
        assert abs(np.std(v) / std - 1) < 0.05
    first = np.stack([v[:2000] for v in leaves])
    assert np.max(np.abs(np.corrcoef(first) - np.eye(4))) < 0.1
    chex.assert_trees_all_equal(noise, draw(jax.random.key(1)))
    assert not np.allclose(draw(jax.random.key(2))[0]["b"], noise[0]["b"])


def test_weighted_backward_is_the_gradient_of_the_weighted_sum():
    net = conv_net("softplus")
    params, x, y = make(net, batch=5, seed=6)
    w = jnp.array([0.5, 0.0, 2.0, -1.0, 0.25])

    @jax.jit
    def both(params, x, y, w):
        bw = fb.backward(net, params, x, y, weights=w)
        manual = fb.grads_from_backward(params, bw, net=net, l2=0.1)

        def weighted(p):
            tr = fb.forward_trace(net, p, x)
            y_t = fb.losses.prepare_targets(net, y, 5, x.dtype)
            return jnp.sum(w * fb.losses.per_example_loss(net, tr.z[-1], tr.a[-1], y_t)) + \
                fb.losses.penalty(p, 0.0, 0.1)

        return manual, jax.grad(weighted)(params), bw

    manual, ref, bw = both(params, x, y, w)
    assert_close(manual, ref)
    assert [d.shape for d in bw.delta] == [z.shape for z in bw.trace.z]
    assert bw.delta[2].shape == (5, net.shapes[3][0])  # Flatten: ∂/∂ its output
    with pytest.raises(ValueError, match="grads_from_backward needs net=... for a network with Conv1D"):
        fb.grads_from_backward(params, bw)
    with pytest.raises(ValueError, match=r"weights must have shape \(5,\), got \(4,\)"):
        fb.backward(net, params, x, y, weights=w[:4])


def test_compiled_memory_of_conv_clipping():
    """The MNIST-1D CNN at B=256, float32: the clipped step's compiled temp memory is within
    1.2x that of a plain jax.grad step (XLA's memory analysis; compiled, not run)."""
    net = fb.Network((40, 1), (fb.Conv1D(25, 5, activation="relu"), fb.Conv1D(25, 5, 2, activation="relu"),
                               fb.Conv1D(25, 5, 2, activation="relu"), fb.Flatten(),
                               fb.Dense(10, "softmax")))
    params = fb.init(jax.random.key(0), net, dtype=jnp.float32)
    x, y = jnp.zeros((256, 40, 1), jnp.float32), jnp.zeros((256,), jnp.int32)
    sgd = lambda p, g: jax.tree.map(lambda a, b: a - 0.1 * b, p, g)  # noqa: E731

    def temp(grad):
        step = lambda p, x, y: sgd(p, grad(p, x, y))  # noqa: E731
        return jax.jit(step).lower(params, x, y).compile().memory_analysis().temp_size_in_bytes

    plain = temp(lambda p, x, y: fb.autodiff_grad(net, p, x, y))
    clipped = temp(lambda p, x, y: fb.clipped_grad(net, p, x, y, 1.0))
    per_layer = temp(lambda p, x, y: fb.clipped_grad(net, p, x, y, 1.0, per_layer=True))
    assert clipped <= 1.2 * plain, (clipped, plain)
    assert per_layer <= 1.2 * plain, (per_layer, plain)
