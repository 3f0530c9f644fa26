"""Per-example gradients, norms and clipping (issue 3).

References are materialised per-example gradients from ``vmap(jax.grad)`` in float64; equality
is ``max |err| / max |ref|`` per array, ≤ 1e-10.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbackprop as fb
from fnbackprop.activations import HIDDEN_ACTIVATIONS

REL = 1e-10

# Jitted entry points (net and the mode flags static): one compile per configuration keeps the
# suite fast; validation of concrete arguments is tested eagerly below.
clipped_and_norms = jax.jit(fb.clipped_grad_and_norms, static_argnums=0, static_argnames="per_layer")


# The reference comparisons are many small programs: on CPU, compile them without LLVM's backend
# optimisations (half the compile time; the arithmetic is the same). Everything else compiles as
# users' code does.
FAST_COMPILE = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


@jax.jit(static_argnums=(0, 2), compiler_options=FAST_COMPILE)
def compare_many(nets, batches, last_alone=False):
    """For each (net, (params, x, y)): manual and vmap per-example grads [, autodiff on x[-1:]].

    Several configurations in one compile (compiling is what costs time in these tests).
    """
    out = []
    for net, (params, x, y) in zip(nets, batches):
        out.append((
            fb.per_example_grads(net, params, x, y, method="manual"),
            fb.per_example_grads(net, params, x, y, method="vmap"),
            fb.autodiff_grad(net, params, x[-1:], y[-1:]) if last_alone else None,
        ))
    return out


@jax.jit(static_argnums=0, compiler_options=FAST_COMPILE)
def everything(net, params, x, y):
    """Per-example grads both ways, batch gradients both ways, and norms, in one compile."""
    return {
        "manual": fb.per_example_grads(net, params, x, y),
        "vmap": fb.per_example_grads(net, params, x, y, method="vmap"),
        "manual_grad": fb.manual_grad(net, params, x, y),
        "autodiff_grad": fb.autodiff_grad(net, params, x, y),
        "norms": fb.per_example_grad_norms(net, params, x, y),
        "layer_norms": fb.per_example_grad_norms(net, params, x, y, per_layer=True),
    }


# (output activation, loss): every loss, the fused heads and a non-fused softmax.
HEADS = [
    ("identity", "mse"),
    ("sigmoid", "mse"),
    ("softmax", "mse"),
    ("softmax", "cross_entropy"),
    ("sigmoid", "binary_cross_entropy"),
]


def make(hidden="tanh", head=("softmax", "cross_entropy"), hidden_sizes=(5, 4), batch=6, seed=0,
         n_in=3, n_out=3, dtype=np.float64, labels=False):
    """A small network, parameters (with non-zero biases) and a batch.

    Drawn with NumPy: eager JAX would compile every random op anew for each shape.
    """
    output, loss = head
    net = fb.MLP((n_in, *hidden_sizes, n_out), hidden=hidden, output=output, loss=loss)
    rng = np.random.default_rng(seed)
    params = [
        {"w": jnp.asarray(rng.normal(size=(i, o)) / math.sqrt(i), dtype),
         "b": jnp.asarray(rng.normal(size=(o,)), dtype)}
        for i, o in zip(net.sizes[:-1], net.sizes[1:])
    ]
    x = jnp.asarray(rng.normal(size=(batch, n_in)), dtype)
    if loss == "cross_entropy":
        labels_ = rng.integers(0, n_out, size=batch)
        y = jnp.asarray(labels_) if labels else jnp.asarray(np.eye(n_out)[labels_], dtype)
    elif loss == "binary_cross_entropy":
        y = jnp.asarray(rng.integers(0, 2, size=(batch, n_out)), dtype)
    else:
        y = jnp.asarray(rng.uniform(size=(batch, n_out)), dtype)
    return net, params, x, y


def assert_close(got, ref, rel=REL):
    """Every leaf: ``max |got − ref| ≤ rel · max |ref|`` (with a floor for all-zero leaves)."""
    chex.assert_trees_all_equal_shapes(got, ref)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        g, r = np.asarray(g), np.asarray(r)
        assert np.all(np.isfinite(g)), "non-finite entries"
        scale = max(np.max(np.abs(r), initial=0.0), 1e-300)
        err = np.max(np.abs(g - r), initial=0.0)
        assert err <= rel * scale, f"relative error {err / scale:.3e} > {rel:.0e}"


def materialised_norms(g, per_layer=False):
    """Norms of materialised per-example gradients: (B,) or (B, L)."""
    cols = [
        np.sqrt(np.sum(np.asarray(p["w"]) ** 2, axis=(1, 2)) + np.sum(np.asarray(p["b"]) ** 2, axis=1))
        for p in g
    ]
    sq = np.stack(cols, axis=1)
    return sq if per_layer else np.sqrt(np.sum(sq**2, axis=1))


def reference_clip(g, clip_norm, per_layer=False):
    """Mean of clipped materialised per-example gradients (NumPy, float64)."""
    num_layers = len(g)
    norms = materialised_norms(g, per_layer)
    limit = clip_norm / math.sqrt(num_layers) if per_layer else clip_norm
    with np.errstate(divide="ignore"):
        c = np.minimum(1.0, limit / norms)  # limit / 0 = inf → 1
    out = []
    for l, p in enumerate(g):
        c_l = c[:, l] if per_layer else c
        out.append({k: np.tensordot(c_l, np.asarray(v), axes=1) / c_l.shape[0] for k, v in p.items()})
    return out


# --- manual per-example gradients == vmap(jax.grad) ------------------------------------------

DEPTHS_BATCHES = [((5, 4), 1), ((6,), 5), ((4, 5, 3), 3)]


@pytest.mark.parametrize("head", HEADS, ids=lambda h: f"{h[0]}-{h[1]}")
def test_manual_equals_vmap_every_activation(head):
    """Every hidden activation × this head; depth and batch size (incl. 1) cycle with the pair."""
    j = HEADS.index(head)
    cfgs = [
        make(hidden, head, *DEPTHS_BATCHES[(k + j) % 3], seed=10 * j + k)
        for k, hidden in enumerate(HIDDEN_ACTIVATIONS)
    ]
    results = compare_many(tuple(c[0] for c in cfgs), [c[1:] for c in cfgs])
    for (net, params, x, y), (manual, ref, _) in zip(cfgs, results):
        chex.assert_shape(manual[0]["w"], (x.shape[0], 3, net.sizes[1]))
        chex.assert_shape(manual[-1]["b"], (x.shape[0], 3))
        assert_close(manual, ref)


@pytest.mark.parametrize("hidden_sizes", [(), (4,), (5, 4), (4, 3, 5)], ids=lambda s: f"depth{len(s) + 1}")
def test_manual_equals_vmap_depths_batches(hidden_sizes):
    cfgs = [
        make("gelu", ("softmax", "cross_entropy"), hidden_sizes, batch, seed=batch, labels=True)
        for batch in (1, 2, 9)
    ]
    results = compare_many(tuple(c[0] for c in cfgs), [c[1:] for c in cfgs], True)
    for (net, params, x, y), (manual, ref, last_alone) in zip(cfgs, results):
        assert_close(manual, ref)
        # Entry i is the gradient on the batch of one x[i:i+1].
        assert_close(jax.tree.map(lambda v: v[-1], manual), last_alone)


@pytest.mark.parametrize("head", HEADS, ids=lambda h: f"{h[0]}-{h[1]}")
def test_mean_of_per_example_equals_batch_gradient(head):
    r = everything(*make("leaky_relu", head, (6, 5), batch=9, seed=5))
    mean = jax.tree.map(lambda v: jnp.mean(v, axis=0), r["manual"])
    assert_close(r["manual"], r["vmap"])
    assert_close(mean, r["manual_grad"])
    assert_close(mean, r["autodiff_grad"])


def test_float32_manual_close_to_vmap():
    net, params, x, y = make("relu", ("softmax", "cross_entropy"), (16, 16), 8, dtype=np.float32)
    ((manual, ref, _),) = compare_many((net,), [(params, x, y)])
    assert manual[0]["w"].dtype == jnp.float32
    assert_close(manual, ref, rel=1e-4)


def test_manual_path_uses_no_autodiff(monkeypatch):
    net, params, x, y = make()

    def forbidden(*args, **kwargs):
        raise AssertionError("autodiff called")

    for name in ("grad", "value_and_grad", "vjp", "jvp", "linearize"):
        monkeypatch.setattr(jax, name, forbidden)

    def trace(f, *args, **kw):
        return jax.make_jaxpr(lambda p, x, y: f(net, p, x, y, *args, **kw))(params, x, y)

    trace(fb.per_example_grads)
    trace(fb.per_example_grad_norms, per_layer=True)
    trace(fb.clipped_grad, 0.1, noise_multiplier=1.0, key=jax.random.key(0))
    with pytest.raises(AssertionError, match="autodiff called"):  # the reference does use it
        trace(fb.per_example_grads, method="vmap")


# --- norms -------------------------------------------------------------------------------------

@pytest.mark.parametrize("head", HEADS, ids=lambda h: f"{h[0]}-{h[1]}")
def test_norms_equal_norms_of_materialised_grads(head):
    r = everything(*make("leaky_relu", head, (6, 5), batch=9, seed=5))
    g, glob, layer = r["vmap"], r["norms"], r["layer_norms"]
    chex.assert_shape(glob, (9,))
    chex.assert_shape(layer, (9, 3))
    assert_close(glob, materialised_norms(g))
    assert_close(layer, materialised_norms(g, per_layer=True))
    assert_close(glob, np.sqrt(np.sum(np.asarray(layer) ** 2, axis=1)))


# --- clipping ----------------------------------------------------------------------------------

@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per_layer"])
@pytest.mark.parametrize("head", HEADS, ids=lambda h: f"{h[0]}-{h[1]}")
def test_clipped_equals_reference_clipping(head, per_layer):
    net, params, x, y = make("leaky_relu", head, (6, 5), batch=9, seed=5)
    r = everything(net, params, x, y)  # compiled already by the tests above
    g = r["vmap"]
    norms = materialised_norms(g, per_layer)
    num_layers = net.num_layers
    # A threshold that clips some examples (or layer parts) and leaves others alone.
    clip_norm = float(np.median(norms)) * (math.sqrt(num_layers) if per_layer else 1.0)
    limit = clip_norm / math.sqrt(num_layers) if per_layer else clip_norm
    assert 0 < np.mean(norms > limit) < 1
    got, got_norms = clipped_and_norms(net, params, x, y, clip_norm, per_layer=per_layer)
    ref = reference_clip(g, clip_norm, per_layer)
    assert_close(got, ref)
    assert_close(got_norms, norms)
    # Clipping changed the result: the test would see a missing clip.
    plain = r["manual_grad"]
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(plain)))


@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per_layer"])
def test_clipped_per_example_norms_are_bounded(per_layer):
    """Each clipped per-example gradient has norm ≤ C (per layer: ≤ C/√L per layer)."""
    net, params, x, y = make("sigmoid", ("softmax", "cross_entropy"), (6, 5, 4), batch=6, seed=6)
    clip_norm = 0.05
    for i in range(x.shape[0]):  # batch of one: the mean is that example's clipped gradient
        one, _ = clipped_and_norms(net, params, x[i : i + 1], y[i : i + 1], clip_norm, per_layer=per_layer)
        g = jax.tree.map(lambda v: v[None], one)
        n = materialised_norms(g, per_layer)
        bound = clip_norm / math.sqrt(net.num_layers) if per_layer else clip_norm
        assert np.all(n <= bound * (1 + 1e-12))
        assert np.sqrt(np.sum(n**2)) <= clip_norm * (1 + 1e-12)


@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per_layer"])
def test_infinite_clip_norm_is_plain_gradient(per_layer):
    net, params, x, y = make("relu", ("sigmoid", "binary_cross_entropy"), (6,), batch=5)

    @jax.jit
    def run(params, x, y, traced_inf):
        return [fb.manual_grad(net, params, x, y)] + [
            fb.clipped_grad(net, params, x, y, c, per_layer=per_layer)
            for c in (math.inf, np.inf, jnp.inf, 1e300, traced_inf)  # concrete ones are validated
        ]

    plain, *clipped = run(params, x, y, math.inf)
    for got in clipped:
        assert_close(got, plain, rel=1e-14)


def test_zero_norm_example_gives_no_nan():
    net, params, x, y = make("relu", ("identity", "mse"), (5,), batch=4)
    # Example 1 fits exactly, in any rounding: x = 0 and negative hidden biases make the hidden
    # layer 0, so the output is b², which is the target: every δ is exactly 0.
    params[0]["b"] = -jnp.abs(params[0]["b"]) - 0.1
    x = x.at[1].set(0.0)
    y = y.at[1].set(params[1]["b"])
    r = everything(net, params, x, y)
    norms = r["norms"]
    assert float(norms[1]) == 0.0 and np.all(np.asarray(norms)[[0, 2, 3]] > 0)
    assert np.all(np.asarray(r["layer_norms"])[1] == 0.0)
    g = r["vmap"]
    for per_layer in (False, True):
        clip_norm = float(np.min(np.asarray(norms)[[0, 2, 3]])) / 2
        got, _ = clipped_and_norms(net, params, x, y, clip_norm, per_layer=per_layer)
        assert_close(got, reference_clip(g, clip_norm, per_layer))
        got, _ = clipped_and_norms(net, params, x, y, math.inf, per_layer=per_layer)
        assert_close(got, r["manual_grad"])
    # Every example with zero gradient: a zero gradient, still no NaN.
    x0, y0 = jnp.zeros_like(x), jnp.broadcast_to(params[1]["b"][None, :], y.shape)
    for per_layer in (False, True):
        got, norms0 = clipped_and_norms(net, params, x0, y0, 1.0, per_layer=per_layer)
        chex.assert_trees_all_equal(got, jax.tree.map(jnp.zeros_like, params))
        assert np.all(np.asarray(norms0) == 0.0)


# --- noise -------------------------------------------------------------------------------------

def test_noise_statistics_and_reproducibility():
    net, params, x, y = make("tanh", ("softmax", "cross_entropy"), (6,), batch=4, seed=7)
    clip_norm, sigma, batch = 0.3, 1.5, x.shape[0]

    @jax.jit
    def run(keys):
        def noisy(key, per_layer):
            return fb.clipped_grad(net, params, x, y, clip_norm, per_layer=per_layer,
                                   noise_multiplier=sigma, key=key)

        return {
            "clean": fb.clipped_grad(net, params, x, y, clip_norm),
            "clean_per_layer": fb.clipped_grad(net, params, x, y, clip_norm, per_layer=True),
            "zero": fb.clipped_grad(net, params, x, y, clip_norm, noise_multiplier=0.0, key=keys[0]),
            "draws": jax.vmap(lambda k: noisy(k, False))(keys),
            "draws_per_layer": jax.vmap(lambda k: noisy(k, True))(keys),
        }

    keys = jax.random.split(jax.random.key(11), 2000)
    keys = keys.at[1].set(keys[0])
    r = run(keys)
    chex.assert_trees_all_equal(r["zero"], r["clean"])  # σ = 0: no noise, key ignored
    std = sigma * clip_norm / batch  # N(0, (σC)²) on the sum, divided by B
    for draws, clean in ((r["draws"], r["clean"]), (r["draws_per_layer"], r["clean_per_layer"])):
        noise = [np.asarray(d) - np.asarray(c)[None]
                 for d, c in zip(jax.tree.leaves(draws), jax.tree.leaves(clean))]
        pooled = np.concatenate([n.ravel() for n in noise])  # 2000 draws × 45 entries
        assert abs(np.mean(pooled)) < 5 * std / math.sqrt(pooled.size)
        assert abs(np.std(pooled) / std - 1) < 0.02
        for n in noise:  # every w and b gets noise of that size (≥ 6000 numbers each)
            assert abs(np.std(n) / std - 1) < 0.05
        # Leaves get independent noise.
        first = np.stack([n.reshape(n.shape[0], -1)[:, 0] for n in noise])  # (leaves, draws)
        assert np.max(np.abs(np.corrcoef(first) - np.eye(len(noise)))) < 0.15
    # Same key, same bits (keys[1] is keys[0]); another key, other bits; a rerun, the same bits.
    chex.assert_trees_all_equal(*[jax.tree.map(lambda v: v[i], r["draws"]) for i in (0, 1)])
    assert not np.array_equal(np.asarray(r["draws"][0]["w"][0]), np.asarray(r["draws"][0]["w"][2]))
    chex.assert_trees_all_equal(run(keys), r)


# --- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("clip_norm", [0.0, -1.0, math.nan, -math.inf, "big", None])
def test_bad_clip_norm_raises(clip_norm):
    net, params, x, y = make()
    with pytest.raises(ValueError, match="clip_norm"):
        fb.clipped_grad(net, params, x, y, clip_norm)
    with pytest.raises(ValueError, match="clip_norm"):
        fb.clipped_grad_and_norms(net, params, x, y, clip_norm, per_layer=True)


def test_other_bad_arguments_raise():
    net, params, x, y = make()
    with pytest.raises(ValueError, match="noise_multiplier=1.0 needs a PRNG key"):
        fb.clipped_grad(net, params, x, y, 1.0, noise_multiplier=1.0)
    for bad in (-0.5, math.inf, math.nan):
        with pytest.raises(ValueError, match="noise_multiplier"):
            fb.clipped_grad(net, params, x, y, 1.0, noise_multiplier=bad, key=jax.random.key(0))
    with pytest.raises(ValueError, match="unknown method 'autodiff'; allowed: manual, vmap"):
        fb.per_example_grads(net, params, x, y, method="autodiff")
    with pytest.raises(ValueError, match="per_layer"):
        fb.per_example_grad_norms(net, params, x, y, per_layer="yes")
    with pytest.raises(ValueError, match="x must have shape"):
        fb.clipped_grad(net, params, x[:, :2], y, 1.0)
    with pytest.raises(ValueError, match="targets y must have shape"):
        fb.per_example_grad_norms(net, params, x, y[:-1])
    with pytest.raises(ValueError, match="out of range"):
        fb.per_example_grads(net, params, x, jnp.full((x.shape[0],), 7), method="vmap")


# --- jit ---------------------------------------------------------------------------------------

def test_jit_traces_once():
    net, params, x, y = make("relu", ("softmax", "cross_entropy"), (6, 5), batch=5, labels=True)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, x, y, clip_norm, sigma, key):
        g, norms = fb.clipped_grad_and_norms(
            net, params, x, y, clip_norm, noise_multiplier=sigma, key=key
        )
        pe = fb.per_example_grads(net, params, x, y)
        return jax.tree.map(lambda p, d: p - 0.1 * d, params, g), norms, pe

    for seed in range(3):
        _, p2, x2, y2 = make("relu", ("softmax", "cross_entropy"), (6, 5), batch=5, seed=seed, labels=True)
        new, norms, pe = step(p2, x2, y2, 0.5 + seed, 0.0, jax.random.key(seed))
        # Traced clip_norm / noise_multiplier give the eager results.
        r = everything(net, p2, x2, y2)
        assert_close(norms, r["norms"])
        ref = reference_clip(r["vmap"], 0.5 + seed)
        assert_close(new, jax.tree.map(lambda p, d: p - 0.1 * d, p2, ref))
        assert_close(pe, r["manual"])
    step(params, x, y, jnp.inf, 1.0, jax.random.key(0))  # still no retrace


# --- memory ------------------------------------------------------------------------------------

def test_compiled_memory_of_clipping_is_that_of_a_plain_step():
    """XLA's compiled temp memory: clipped step ≈ plain step ≪ vmap(jax.grad) clipping step.

    784-512-512-10 at B=256 in float32 (the CPU benchmark size), compiled only, not run.
    """
    net = fb.MLP((784, 512, 512, 10))
    params = fb.init(jax.random.key(0), net, dtype=jnp.float32)
    x = jnp.zeros((256, 784), jnp.float32)
    y = jnp.zeros((256,), jnp.int32)
    sgd = lambda p, g: jax.tree.map(lambda a, b: a - 0.1 * b, p, g)

    def temp(step):
        return jax.jit(step).lower(params, x, y).compile().memory_analysis().temp_size_in_bytes

    def vmap_step(p, x, y):
        g = fb.per_example_grads(net, p, x, y, method="vmap")
        n = jnp.sqrt(sum(jnp.sum(l["w"] ** 2, axis=(1, 2)) + jnp.sum(l["b"] ** 2, axis=1) for l in g))
        c = jnp.minimum(1.0, 1.0 / n) / x.shape[0]
        return sgd(p, jax.tree.map(lambda t: jnp.tensordot(c, t, axes=1), g))

    baseline = temp(lambda p, x, y: sgd(p, fb.autodiff_grad(net, p, x, y)))  # plain jax.grad step
    clipped = temp(lambda p, x, y: sgd(p, fb.clipped_grad(net, p, x, y, 1.0)))
    per_layer = temp(lambda p, x, y: sgd(p, fb.clipped_grad(net, p, x, y, 1.0, per_layer=True)))
    vmap = temp(vmap_step)
    # Without a mask the input batch is not zeroed, so not copied (with one, it is: see
    # test_compiled_memory_of_clipping_inside_an_epoch for the private step's memory).
    slack = 64 * 1024
    assert clipped <= 1.1 * baseline + slack, (clipped, baseline)
    assert per_layer <= 1.1 * baseline + slack, (per_layer, baseline)
    # vmap materialises B × P floats: 256 × 669,706 × 4 bytes ≈ 686 MB.
    assert vmap >= 256 * net.num_params * 4
    assert vmap >= 50 * clipped, (vmap, clipped)


def test_compiled_memory_when_input_is_narrow():
    """The documented worst case: global clipping holds every δ at once (≤ plain + Σ_l B n_l
    floats); per-layer clipping does not wait for other layers and stays at a plain step's."""
    net = fb.MLP((256, 512, 512, 10))
    batch = 128
    params = fb.init(jax.random.key(0), net, dtype=jnp.float32)
    x = jnp.zeros((batch, 256), jnp.float32)
    y = jnp.zeros((batch,), jnp.int32)
    sgd = lambda p, g: jax.tree.map(lambda a, b: a - 0.1 * b, p, g)

    def temp(grad):
        step = lambda p, x, y: sgd(p, grad(p, x, y))
        return jax.jit(step).lower(params, x, y).compile().memory_analysis().temp_size_in_bytes

    plain = temp(lambda p, x, y: fb.manual_grad(net, p, x, y))
    clipped = temp(lambda p, x, y: fb.clipped_grad(net, p, x, y, 1.0))
    per_layer = temp(lambda p, x, y: fb.clipped_grad(net, p, x, y, 1.0, per_layer=True))
    deltas = batch * sum(net.sizes[1:]) * 4
    assert clipped <= plain + deltas + x.nbytes + 64 * 1024, (clipped, plain)
    assert per_layer <= 1.1 * plain + x.nbytes + 64 * 1024, (per_layer, plain)


def test_compiled_memory_of_clipping_inside_an_epoch():
    """As fb.train runs it (a lax.scan over batches): clipping needs no copy of the batch, and
    its temp memory stays within that of a plain jax.grad epoch plus the deltas' share."""
    net = fb.MLP((784, 512, 512, 10))
    params = fb.init(jax.random.key(0), net, dtype=jnp.float32)
    xs = jnp.zeros((4, 256, 784), jnp.float32)
    ys = jnp.zeros((4, 256), jnp.int32)
    sgd = lambda p, g: jax.tree.map(lambda a, b: a - 0.1 * b, p, g)

    def temp(grad):
        def epoch(p, xs, ys):
            return jax.lax.scan(lambda p, xy: (sgd(p, grad(p, *xy)), None), p, (xs, ys))[0]

        return jax.jit(epoch).lower(params, xs, ys).compile().memory_analysis().temp_size_in_bytes

    plain = temp(lambda p, x, y: fb.autodiff_grad(net, p, x, y))
    clipped = temp(lambda p, x, y: fb.clipped_grad(net, p, x, y, 1.0))
    per_layer = temp(lambda p, x, y: fb.clipped_grad(net, p, x, y, 1.0, per_layer=True))
    assert clipped <= 1.2 * plain, (clipped, plain)
    assert per_layer <= 1.05 * plain, (per_layer, plain)
