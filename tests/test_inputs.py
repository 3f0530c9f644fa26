"""Every bad input raises a clear ``ValueError`` that names the bad value and what is allowed."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbackprop as fb

NET = fb.MLP((3, 4, 3), "tanh", "softmax", "cross_entropy")
B = 5


@pytest.fixture(scope="module")
def params():
    return fb.init(jax.random.key(0), NET, "xavier_normal")


@pytest.fixture(scope="module")
def x():
    return jnp.asarray(np.random.default_rng(0).normal(size=(B, 3)))


LABELS = jnp.array([0, 1, 2, 2, 1])


def _check_gradients(net, params, x, y, **kw):
    return fb.check_gradients(net, params, x, y, **kw)


# Every public function that takes (net, params, x, y, **kw).
FUNCTIONS = {
    "loss": fb.loss,
    "manual_grad": fb.manual_grad,
    "autodiff_grad": fb.autodiff_grad,
    "check_gradients": _check_gradients,
}
BACKWARD_KW = ("dropout", "key")  # fb.backward takes no l1 / l2


def raises(match: str):
    return pytest.raises(ValueError, match=re.escape(match))


# --- MLP -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sizes,named",
    [
        ((3,), "(3,)"),
        ((), "()"),
        ((3, 0, 2), "0"),
        ((3, -4, 2), "-4"),
        ((3, 2.5, 2), "2.5"),
        ((3, "4", 2), "'4'"),
        ((3, True), "True"),
        ((3, None), "None"),
        (5, "5"),
        (None, "None"),
    ],
)
def test_mlp_bad_sizes(sizes, named):
    with pytest.raises(ValueError, match="size") as e:
        fb.MLP(sizes)
    assert named in str(e.value)


@pytest.mark.parametrize(
    "kw,named",
    [
        ({"hidden": "swish"}, "'swish'"),
        ({"hidden": "softmax"}, "'softmax'"),  # an output activation only
        ({"hidden": None}, "None"),
        ({"output": "logistic"}, "'logistic'"),
        ({"loss": "hinge"}, "'hinge'"),
        ({"loss": "cross_entropy", "output": "sigmoid"}, "'sigmoid'"),
        ({"loss": "cross_entropy", "output": "identity"}, "'identity'"),
        ({"loss": "binary_cross_entropy", "output": "softmax"}, "'softmax'"),
        ({"loss": "binary_cross_entropy", "output": "tanh"}, "'tanh'"),
    ],
)
def test_mlp_bad_names(kw, named):
    kw = {"hidden": "relu", "output": "softmax", "loss": "mse", **kw}
    with pytest.raises(ValueError) as e:
        fb.MLP((3, 2), **kw)
    msg = str(e.value)
    assert named in msg
    if "loss" in kw and kw["loss"] in ("cross_entropy", "binary_cross_entropy"):
        assert ("'softmax'" if kw["loss"] == "cross_entropy" else "'sigmoid'") in msg
    elif "hidden" in kw and kw["hidden"] != "relu":
        assert "allowed" in msg and "relu" in msg and "gelu" in msg
    elif kw["output"] != "softmax":
        assert "allowed" in msg and "softmax" in msg
    else:
        assert "allowed" in msg and "binary_cross_entropy" in msg


def test_mlp_valid_combinations_accepted():
    for hidden in fb.HIDDEN_ACTIVATIONS:
        for output in fb.OUTPUT_ACTIVATIONS:
            fb.MLP((2, 2), hidden, output, "mse")
    fb.MLP((2, 2), output="softmax", loss="cross_entropy")
    fb.MLP((2, 2), output="sigmoid", loss="binary_cross_entropy")


def test_mlp_hashable_frozen_and_a_static_jit_argument(params, x):
    a = fb.MLP([3, np.int64(4), 3], "tanh", "softmax", "cross_entropy")
    assert a.sizes == (3, 4, 3) and all(type(s) is int for s in a.sizes)
    assert a == NET and hash(a) == hash(NET)
    assert {a: 1}[NET] == 1
    assert fb.MLP((3, 4, 3), "relu") != NET
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.hidden = "relu"  # type: ignore[misc]
    assert NET.num_layers == 2 and NET.num_params == (3 + 1) * 4 + (4 + 1) * 3
    traces = []

    def grad(net, p, x, y):
        traces.append(net)
        return fb.manual_grad(net, p, x, y)

    jgrad = jax.jit(grad, static_argnums=0)
    g1 = jgrad(NET, params, x, LABELS)
    g2 = jgrad(a, params, x, LABELS)  # equal and equal hash: the cached trace is reused
    assert len(traces) == 1
    for u, v in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_array_equal(u, v)
    jgrad(fb.MLP((3, 4, 3), "relu", "softmax", "cross_entropy"), params, x, LABELS)
    assert len(traces) == 2


# --- init ------------------------------------------------------------------------------------
def test_init_bad_scheme_and_dtype():
    with raises("'glorot'") as e:
        fb.init(jax.random.key(0), NET, "glorot")
    assert "he_normal" in str(e.value) and "nielsen" in str(e.value)
    with raises("int32"):
        fb.init(jax.random.key(0), NET, "he_normal", dtype=jnp.int32)


# --- params, x, y ----------------------------------------------------------------------------
def _bad_params(params):
    w0, b0 = params[0]["w"], params[0]["b"]
    return {
        "one layer missing": ([params[0]], "2 layer dicts, got 1"),
        "a dict": ({"w": w0, "b": b0}, "got dict"),
        "w transposed": ([{"w": w0.T, "b": b0}, params[1]], "(4, 3)"),
        "b wrong": ([{"w": w0, "b": b0[:3]}, params[1]], "(3,)"),
        "key missing": ([{"w": w0}, params[1]], "'w' and 'b'"),
        "extra key": ([{"w": w0, "b": b0, "c": b0}, params[1]], "'w' and 'b'"),
    }


@pytest.mark.parametrize("fn", list(FUNCTIONS), ids=list(FUNCTIONS))
@pytest.mark.parametrize("case", list(_bad_params([{"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}] * 2)))
def test_bad_params(params, x, fn, case):
    bad, named = _bad_params(params)[case]
    with raises(named):
        FUNCTIONS[fn](NET, bad, x, LABELS)
    if fn == "loss":
        with raises(named):
            fb.forward(NET, bad, x)
        with raises(named):
            fb.backward(NET, bad, x, LABELS)


@pytest.mark.parametrize("fn", list(FUNCTIONS), ids=list(FUNCTIONS))
@pytest.mark.parametrize(
    "shape", [(B,), (B, 4), (B, 2), (0, 3), (B, 3, 1), (3,)], ids=lambda s: "x" + "x".join(map(str, s))
)
def test_bad_x_shape(params, fn, shape):
    bad = jnp.zeros(shape)
    with raises(str(shape)) as e:
        FUNCTIONS[fn](NET, params, bad, LABELS[: shape[0]] if shape else LABELS)
    assert "(B, 3)" in str(e.value)
    if fn == "loss":
        with raises(str(shape)):
            fb.forward(NET, params, bad)


@pytest.mark.parametrize("fn", list(FUNCTIONS), ids=list(FUNCTIONS))
@pytest.mark.parametrize(
    "net_kw,y,named",
    [
        ({}, jnp.zeros((B, 4)), "(5, 4)"),  # one-hot with the wrong K
        ({}, jnp.zeros((B + 1, 3)), "(6, 3)"),
        ({}, jnp.zeros((B, 3, 1)), "(5, 3, 1)"),
        ({}, jnp.array([0, 1, 2]), "length 3"),  # labels of another batch size
        ({"output": "identity", "loss": "mse"}, jnp.zeros((B, 2)), "(5, 2)"),
        ({"output": "identity", "loss": "mse"}, jnp.zeros((B,)), "(5,)"),  # (B,) needs K = 1
        ({"output": "sigmoid", "loss": "binary_cross_entropy"}, jnp.zeros((B,)), "(5,)"),
        ({"output": "sigmoid", "loss": "binary_cross_entropy"}, jnp.zeros((3, 3)), "(3, 3)"),
    ],
    ids=["ce-K", "ce-B", "ce-3d", "labels-B", "mse-K", "mse-1d", "bce-1d", "bce-B"],
)
def test_bad_y_shape(params, x, fn, net_kw, y, named):
    net = dataclasses.replace(NET, **net_kw)
    with raises(named) as e:
        FUNCTIONS[fn](net, params, x, y)
    allowed = "batch size 5" if named.startswith("length") else "(5, 3)"
    assert allowed in str(e.value)


@pytest.mark.parametrize("fn", list(FUNCTIONS) + ["backward"], ids=list(FUNCTIONS) + ["backward"])
@pytest.mark.parametrize("bad_label", [-1, 3, 100])
def test_labels_out_of_range(params, x, fn, bad_label):
    y = LABELS.at[2].set(bad_label)
    f = fb.backward if fn == "backward" else FUNCTIONS[fn]
    with raises(f"label {bad_label} is out of range") as e:
        f(NET, params, x, y)
    assert "[0, 3)" in str(e.value)


@pytest.mark.parametrize("fn", list(FUNCTIONS), ids=list(FUNCTIONS))
def test_float_labels_for_cross_entropy(params, x, fn):
    with raises("float") as e:
        FUNCTIONS[fn](NET, params, x, LABELS.astype(jnp.float32))
    assert "integer labels in [0, 3)" in str(e.value)


def test_label_range_check_does_not_break_jit(params, x):
    # Traced labels cannot be checked; a jitted call still works for valid labels.
    g = jax.jit(lambda p, y: fb.manual_grad(NET, p, x, y))(params, LABELS)
    for u, v in zip(jax.tree.leaves(g), jax.tree.leaves(fb.manual_grad(NET, params, x, LABELS))):
        np.testing.assert_allclose(u, v, rtol=1e-12)


# --- dropout and regularisation ---------------------------------------------------------------
@pytest.mark.parametrize("fn", list(FUNCTIONS) + ["backward"], ids=list(FUNCTIONS) + ["backward"])
@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_dropout_rate(params, x, fn, rate):
    f = fb.backward if fn == "backward" else FUNCTIONS[fn]
    with raises(f"got {rate}") as e:
        f(NET, params, x, LABELS, dropout=rate, key=jax.random.key(0))
    assert "[0, 1)" in str(e.value)


@pytest.mark.parametrize("fn", list(FUNCTIONS) + ["backward"], ids=list(FUNCTIONS) + ["backward"])
def test_dropout_without_key(params, x, fn):
    f = fb.backward if fn == "backward" else FUNCTIONS[fn]
    with raises("dropout=0.5 needs a PRNG key"):
        f(NET, params, x, LABELS, dropout=0.5)


@pytest.mark.parametrize("fn", list(FUNCTIONS), ids=list(FUNCTIONS))
@pytest.mark.parametrize(
    "kw,named",
    [
        ({"l1": -0.1}, "l1"),
        ({"l2": -1.0}, "l2"),
        ({"l2": float("nan")}, "l2"),
        ({"l1": float("inf")}, "l1"),
    ],
    ids=["l1-neg", "l2-neg", "l2-nan", "l1-inf"],
)
def test_bad_regularisation(params, x, fn, kw, named):
    (value,) = kw.values()
    with raises(f"{named} must be a finite number ≥ 0, got {value!r}"):
        FUNCTIONS[fn](NET, params, x, LABELS, **kw)


def test_check_gradients_bad_max_fd(params, x):
    with raises("max_fd_per_param must be ≥ 1, got 0"):
        fb.check_gradients(NET, params, x, LABELS, max_fd_per_param=0)
