"""Networks of layers: construction rules and their errors, parameters and initialisation, the
MLP as the dense case (the same numbers as before the layers existed), jit with a static
network, and bad inputs that used to raise JAX's own errors.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbackprop as fb

REFERENCE = Path(__file__).parent / "data" / "mlp_reference.json"

CNN = fb.Network(  # the MNIST-1D CNN of the issue
    input_shape=(40, 1),
    layers=(fb.Conv1D(channels=25, kernel=5, stride=1, padding="SAME", activation="relu"),
            fb.Conv1D(25, 5, stride=2, activation="relu"),
            fb.Conv1D(25, 5, stride=2, activation="relu"),
            fb.Flatten(),
            fb.Dense(10, activation="softmax")),
    loss="cross_entropy")


def raises(match: str):
    return pytest.raises(ValueError, match=re.escape(match))


# --- construction ------------------------------------------------------------------------------
def test_cnn_shapes_params_and_init_scheme_fans():
    assert CNN.shapes == ((40, 1), (40, 25), (20, 25), (10, 25), (250,), (10,))
    assert CNN.num_layers == 5 and CNN.param_layers == (0, 1, 2, 4) and CNN.output_size == 10
    params = fb.init(jax.random.key(0), CNN, "he_normal", dtype=jnp.float64)
    shapes = [jax.tree.map(jnp.shape, p) for p in params]
    assert shapes == [{"w": (5, 1, 25), "b": (25,)}, {"w": (5, 25, 25), "b": (25,)},
                      {"w": (5, 25, 25), "b": (25,)}, {}, {"w": (250, 10), "b": (10,)}]
    assert CNN.num_params == sum(v.size for v in jax.tree.leaves(params))
    # he_normal: std √(2/fan_in) with fan_in = kernel × in_channels for a convolution.
    wide = fb.Network((30, 40), (fb.Conv1D(100, 5), fb.Flatten(), fb.Dense(2, "softmax")))
    w = np.asarray(fb.init(jax.random.key(1), wide, "he_normal")[0]["w"])  # 20 000 draws
    assert w.std() == pytest.approx(math.sqrt(2 / (5 * 40)), rel=0.02)
    # xavier: √(2/(fan_in + fan_out)), fan_out = kernel × out_channels.
    w = np.asarray(fb.init(jax.random.key(1), wide, "xavier_normal")[0]["w"])
    assert w.std() == pytest.approx(math.sqrt(2 / (5 * 40 + 5 * 100)), rel=0.02)


def test_network_is_frozen_hashable_and_a_static_jit_argument():
    again = fb.Network([40, np.int64(1)], [fb.Conv1D(25, 5, activation="relu"),
                                          fb.Conv1D(25, 5, 2, activation="relu"),
                                          fb.Conv1D(25, 5, 2, "SAME", "relu"), fb.Flatten(),
                                          fb.Dense(10, "softmax")])
    assert again == CNN and hash(again) == hash(CNN) and again.input_shape == (40, 1)
    assert isinstance(again.layers, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        CNN.loss = "mse"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        CNN.layers[0].kernel = 3  # type: ignore[misc]
    params = fb.init(jax.random.key(0), CNN)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 40, 1)))
    y = jnp.array([1, 2, 3])
    chex.clear_trace_counter()
    grad = jax.jit(chex.assert_max_traces(fb.manual_grad, n=1), static_argnums=0)
    g1 = grad(CNN, params, x, y)
    g2 = grad(again, params, x + 1.0, y)  # an equal network, new values: no new trace
    assert not np.allclose(g1[0]["w"], g2[0]["w"])
    chex.assert_trees_all_close(g1, fb.manual_grad(CNN, params, x, y), rtol=1e-12)
    with pytest.raises(AssertionError):  # another network is a new trace
        grad(dataclasses.replace(CNN, loss="mse"), params, x, jnp.zeros((3, 10)))
    chex.clear_trace_counter()


@pytest.mark.parametrize(
    "kwargs,named",
    [
        ({"input_shape": (40,), "layers": (fb.Conv1D(4, 3), fb.Flatten(), fb.Dense(2, "softmax"))},
         "needs a (length, channels) input"),
        ({"layers": (fb.Flatten(), fb.Conv1D(4, 3), fb.Dense(2, "softmax"))},
         "a Conv1D cannot follow a Flatten or a Dense layer"),
        ({"layers": (fb.Conv1D(4, 3), fb.Dense(2, "softmax"))}, "put a Flatten() before it"),
        ({"layers": (fb.Conv1D(4, 3), fb.Flatten(), fb.Flatten(), fb.Dense(2, "softmax"))},
         "Flatten() needs a (length, channels) input"),
        ({"layers": (fb.Conv1D(4, 3), fb.Flatten())}, "the last layer must be Dense"),
        ({"layers": (fb.Conv1D(4, 41, padding="VALID"), fb.Flatten(), fb.Dense(2, "softmax"))},
         "kernel 41 is longer than its input of length 40"),
        ({"layers": (fb.Conv1D(4, 3, 2), fb.Conv1D(4, 21, padding="VALID"), fb.Flatten(),
                     fb.Dense(2, "softmax"))}, "layer 2: Conv1D"),
        ({"layers": (fb.Flatten(), fb.Dense(4, "softmax"), fb.Dense(2, "softmax"))},
         "layer 2 (Dense(units=4, activation='softmax')) is hidden"),
        ({"layers": (fb.Flatten(), fb.Dense(1, "softmax")), "loss": "mse"},
         "output='softmax' over a single output unit is constant"),
        ({"layers": (fb.Flatten(), fb.Dense(2, "sigmoid"))}, "needs output='softmax'"),
        ({"layers": ()}, "layers must not be empty"),
        ({"layers": (fb.Flatten(), "dense")}, "layer 2 must be a Dense, Conv1D or Flatten"),
        ({"input_shape": (40, 0)}, "input_shape must be (n_0,) or (length, channels)"),
        ({"input_shape": (40, 1, 1)}, "got (40, 1, 1)"),
        ({"input_shape": 40}, "got 40"),
        ({"loss": "hinge"}, "unknown loss 'hinge'; allowed: mse"),
    ],
)
def test_network_structure_errors(kwargs, named):
    base = {"input_shape": (40, 1), "layers": (fb.Flatten(), fb.Dense(2, "softmax")),
            "loss": "cross_entropy"}
    with raises(named):
        fb.Network(**{**base, **kwargs})


@pytest.mark.parametrize(
    "make,named",
    [
        (lambda: fb.Conv1D(0, 3), "Conv1D: channels must be an integer ≥ 1, got 0"),
        (lambda: fb.Conv1D(4, 2.5), "kernel must be an integer ≥ 1, got 2.5"),
        (lambda: fb.Conv1D(4, 3, stride=0), "stride must be an integer ≥ 1, got 0"),
        (lambda: fb.Conv1D(4, 3, stride=True), "got True"),
        (lambda: fb.Conv1D(4, 3, padding="same"), "unknown padding 'same'; allowed: SAME, VALID"),
        (lambda: fb.Conv1D(4, 3, activation="softmax"), "unknown activation 'softmax'"),
        (lambda: fb.Dense(0), "Dense: units must be an integer ≥ 1, got 0"),
        (lambda: fb.Dense(3, "swish"), "Dense: unknown activation 'swish'; allowed: sigmoid"),
    ],
)
def test_layer_errors(make, named):
    with raises(named):
        make()


def test_softmax_over_one_output_is_refused():
    with raises("output='softmax' over a single output unit is constant") as e:
        fb.MLP((4, 5, 1), output="softmax", loss="mse")
    assert "output='sigmoid' with loss='binary_cross_entropy'" in str(e.value)
    with raises("single output unit"):
        fb.MLP((4, 1))  # the defaults: softmax + cross-entropy
    fb.MLP((4, 1), output="sigmoid", loss="binary_cross_entropy")
    fb.MLP((4, 2), output="softmax", loss="mse")


# --- parameters and inputs -----------------------------------------------------------------------
def test_check_params_and_inputs_for_a_cnn():
    params = fb.init(jax.random.key(0), CNN)
    x = jnp.zeros((2, 40, 1))
    bad = list(params)
    bad[3] = {"w": jnp.zeros(1)}
    with raises("layer 4 (Flatten) has no parameters: its entry must be {}"):
        fb.forward(CNN, bad, x)
    bad = list(params)
    bad[1] = {"w": jnp.zeros((5, 25, 24)), "b": jnp.zeros(25)}
    with raises("layer 2 expects w (5, 25, 25) and b (25,), got w (5, 25, 24)"):
        fb.manual_grad(CNN, bad, x, jnp.zeros(2, int))
    with raises("x must have shape (B, 40, 1) with B ≥ 1, got (2, 40)"):
        fb.loss(CNN, params, x[:, :, 0], jnp.zeros(2, int))
    with raises("x must have shape (B, 40, 1)"):
        fb.per_example_grads(CNN, params, jnp.zeros((2, 39, 1)), jnp.zeros(2, int))


def test_string_labels_and_plain_int_keys_are_value_errors():
    net = fb.MLP((3, 4, 3))
    params = fb.init(jax.random.key(0), net)
    x = jnp.zeros((2, 3))
    for f in (fb.loss, fb.manual_grad, fb.backward, fb.per_example_grads):
        with raises("targets y must be numbers (integer labels or a float array), got dtype <U1"):
            f(net, params, x, np.array(["a", "b"]))
    with raises("x must be a numeric array of shape (B, 3), got dtype <U1"):
        fb.forward(net, params, np.array([["a", "b", "c"]]))
    with raises("key must be one PRNG key such as jax.random.key(seed), got 0"):
        fb.init(0, net)
    with raises("key must be one PRNG key"):
        fb.init(jax.random.split(jax.random.key(0), 2), net)
    with raises("key must be one PRNG key"):
        fb.manual_grad(net, params, x, jnp.array([0, 1]), dropout=0.5, key=1)
    with raises("key must be one PRNG key"):
        fb.clipped_grad(net, params, x, jnp.array([0, 1]), 1.0, noise_multiplier=1.0, key=7)
    fb.init(jax.random.PRNGKey(0), net)  # a raw uint32 key is still a key


def test_init_in_float32_does_not_warn():
    net = fb.MLP((3, 4, 3))
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("error")
        params = fb.init(jax.random.key(0), net)  # the default dtype was the cause: any scheme
        assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))
        fb.init(jax.random.key(0), CNN, "nielsen")


# --- the MLP is the dense case, with the numbers of before ---------------------------------------
def test_mlp_is_the_dense_special_case():
    net = fb.MLP((5, 7, 6, 3), "tanh", "softmax", "cross_entropy")
    assert net.input_shape == (5,)
    assert net.layers == (fb.Dense(7, "tanh"), fb.Dense(6, "tanh"), fb.Dense(3, "softmax"))
    same = fb.Network((5,), net.layers, "cross_entropy")
    assert same.shapes == net.shapes and same.num_params == net.num_params
    key = jax.random.key(0)
    p = fb.init(key, net)
    chex.assert_trees_all_equal(p, fb.init(key, same))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)))
    y = jnp.array([0, 2, 1, 1])

    @jax.jit(static_argnums=0)
    def both(net, p, x, y):
        return fb.manual_grad(net, p, x, y), fb.clipped_grad(net, p, x, y, 0.1)

    chex.assert_trees_all_equal(both(net, p, x, y), both(same, p, x, y))


EXACT_INITS = ("he_normal/float32", "nielsen/float64")


@pytest.mark.slow
def test_mlp_init_gives_the_numbers_of_before_the_layers_every_scheme():
    """Every scheme in both dtypes, jitted (one compile; XLA may fuse the scaling into the
    draw, an ulp); eagerly bit for bit in test_mlp_gives_the_numbers_of_before_the_layers."""
    ref = json.loads(REFERENCE.read_text())
    net = fb.MLP((5, 7, 6, 3), "tanh", "softmax", "cross_entropy")
    inits = jax.jit(lambda key: {
        name: fb.init(key, net, *name.split("/")) for name in ref["init"]})(jax.random.key(3))
    for name, want in ref["init"].items():
        dtype = name.split("/")[1]
        for g, w in zip(jax.tree.leaves(inits[name]), want, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w, dtype),
                                       rtol=4 * np.finfo(dtype).eps, err_msg=name)


def test_mlp_gives_the_numbers_of_before_the_layers():
    """Parameters and results equal those stored by tests/data/make_mlp_reference.py at commit
    4473bf7: the same keys, draws and arithmetic."""
    ref = json.loads(REFERENCE.read_text())
    net = fb.MLP((5, 7, 6, 3), "tanh", "softmax", "cross_entropy")
    for name in EXACT_INITS:
        got = jax.tree.leaves(fb.init(jax.random.key(3), net, *name.split("/")))
        for g, w in zip(got, ref["init"][name], strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w, name.split("/")[1]))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 5)))
    y = jnp.asarray([0, 2, 1, 1])
    p = fb.init(jax.random.key(3), net, "nielsen")

    @jax.jit
    def results(p, x, y):
        drop = dict(dropout=0.3, key=jax.random.key(1))
        noise = dict(noise_multiplier=1.0, key=jax.random.key(2))
        return {
            "forward": fb.forward(net, p, x),
            "loss": fb.loss(net, p, x, y, l1=0.01, l2=0.1),
            "loss_dropout": fb.loss(net, p, x, y, **drop),
            "manual_grad": fb.manual_grad(net, p, x, y, l1=0.01, l2=0.1),
            "manual_grad_dropout": fb.manual_grad(net, p, x, y, **drop),
            "per_example_grads": fb.per_example_grads(net, p, x, y),
            "per_example_grad_norms": fb.per_example_grad_norms(net, p, x, y, per_layer=True),
            "clipped_grad": fb.clipped_grad(net, p, x, y, 0.5),
            "clipped_grad_noise": fb.clipped_grad(net, p, x, y, 0.5, **noise),
            "clipped_grad_per_layer_noise": fb.clipped_grad(net, p, x, y, 0.5, per_layer=True,
                                                            **noise),
            "dropout_masks": fb.network.dropout_masks(net, jax.random.key(5), 0.4, 4, jnp.float64),
        }

    got = results(p, x, y)
    assert set(got) == set(ref["results"])
    for name, tree in got.items():
        for g, w in zip(jax.tree.leaves(tree), ref["results"][name], strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-13, atol=1e-15,
                                       err_msg=name)


# --- dropout on hidden Dense layers only ---------------------------------------------------------
def test_dropout_masks_only_for_hidden_dense_layers():
    net = fb.Network((12, 2), (fb.Conv1D(3, 3, activation="tanh"), fb.Flatten(),
                               fb.Dense(5, "relu"), fb.Dense(4, "relu"), fb.Dense(3, "softmax")))
    masks = fb.network.dropout_masks(net, jax.random.key(0), 0.5, 6, jnp.float64)
    assert masks[0] is None and masks[1] is None
    assert masks[2].shape == (6, 5) and masks[3].shape == (6, 4) and len(masks) == 4
    assert set(np.unique(np.asarray(masks[2]))) <= {0.0, 2.0}
    conv_only = fb.Network((12, 2), (fb.Conv1D(3, 3), fb.Flatten(), fb.Dense(3, "softmax")))
    assert fb.network.dropout_masks(conv_only, jax.random.key(0), 0.5, 6, jnp.float64) is None
