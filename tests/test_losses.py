"""Loss values, penalties, activations, initialisation and dropout against numbers worked out
by hand or by an independent NumPy implementation (so that a wrong 1/B or 1/2, which gradient
agreement alone would not catch, fails here)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbackprop as fb
from fnbackprop.activations import ACTIVATIONS, LEAKY_RELU_SLOPE
from fnbackprop.losses import penalty, penalty_grad, per_example_loss
from fnbackprop.network import dropout_masks

LN2, LN3 = math.log(2.0), math.log(3.0)


def layer(w, b, dtype=jnp.float64):
    return {"w": jnp.asarray(w, dtype), "b": jnp.asarray(b, dtype)}


@functools.partial(jax.jit, static_argnums=0)
def evaluate(net, params, x, y):
    """Loss, manual and autodiff gradients and per-example deltas, compiled as one program
    (cheaper on CPU than compiling every primitive of an eager evaluation)."""
    return (
        fb.loss(net, params, x, y),
        fb.manual_grad(net, params, x, y),
        fb.autodiff_grad(net, params, x, y),
        fb.backward(net, params, x, y).delta,
    )


def assert_tree_allclose(got, want, rtol=1e-13, atol=1e-15):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)


# --- hand-computed losses and gradients -------------------------------------------------------
def test_mse_by_hand():
    # a = x + b = [[1.5, 1.5], [3.5, -1.5]], a − y = [[.5, .5], [.5, −.5]], Σ‖a − y‖² = 1,
    # L = 1/(2B) · 1 = 0.25 (a missing 1/2 or 1/B gives 0.5, a sum gives 1).
    net = fb.MLP((2, 2), output="identity", loss="mse")
    params = [layer([[1, 0], [0, 1]], [0.5, -0.5])]
    x = jnp.array([[1.0, 2.0], [3.0, -1.0]])
    y = jnp.array([[1.0, 1.0], [3.0, -1.0]])
    value, g_manual, g_auto, _ = evaluate(net, params, x, y)
    assert float(value) == pytest.approx(0.25, rel=1e-15)
    np.testing.assert_allclose(per_example_loss(net, x, x + params[0]["b"][None, :], y), [0.25, 0.25])
    # ∂L/∂b = Σ_i (a_i − y_i)/B = [0.5, 0]; ∂L/∂W = xᵀ (a − y)/B.
    want = [layer([[1.0, -0.5], [0.25, 0.75]], [0.5, 0.0])]
    assert_tree_allclose(g_manual, want)
    assert_tree_allclose(g_auto, want)


def test_two_layer_relu_mse_by_hand():
    # Example 1: x = 2: z¹ = [2, −1], a¹ = [2, 0], z² = 4.5, y = 4 → ‖·‖² = 0.25.
    # Example 2: x = −1: z¹ = [−1, 2], a¹ = [0, 2], z² = 6.5, y = 0 → ‖·‖² = 42.25.
    # L = (0.25 + 42.25) / (2 · 2) = 10.625.
    net = fb.MLP((1, 2, 1), hidden="relu", output="identity", loss="mse")
    params = [layer([[1, -1]], [0, 1]), layer([[2], [3]], [0.5])]
    x = jnp.array([[2.0], [-1.0]])
    y = jnp.array([[4.0], [0.0]])
    value, g_manual, g_auto, delta = evaluate(net, params, x, y)
    assert float(value) == pytest.approx(10.625, rel=1e-15)
    # δ² / B = [0.25, 3.25]; ∂b² = 3.5; ∂w² = a¹ᵀ δ²/B = [[0.5], [6.5]];
    # δ¹ / B = [[0.5, 0], [0, 9.75]]; ∂b¹ = [0.5, 9.75]; ∂w¹ = xᵀ δ¹/B = [[1, −9.75]].
    want = [layer([[1.0, -9.75]], [0.5, 9.75]), layer([[0.5], [6.5]], [3.5])]
    assert_tree_allclose(g_manual, want)
    assert_tree_allclose(g_auto, want)
    # Per-example deltas (not divided by B).
    np.testing.assert_allclose(delta[1], [[0.5], [6.5]])
    np.testing.assert_allclose(delta[0], [[1.0, 0.0], [0.0, 19.5]])
    # Targets of shape (B,) for a single output unit mean the same (and eager = jitted).
    assert float(fb.loss(net, params, x, y[:, 0])) == pytest.approx(10.625, rel=1e-15)


def test_cross_entropy_by_hand():
    # Row 1: softmax([0, ln 3]) = [1/4, 3/4]; row 2: softmax([ln 2, 0]) = [2/3, 1/3].
    # Labels [1, 1]: L = (ln(4/3) + ln 3) / 2 = ln 2.
    net = fb.MLP((2, 2), output="softmax", loss="cross_entropy")
    params = [layer(np.eye(2), [0, 0])]
    x = jnp.array([[0.0, LN3], [LN2, 0.0]])
    labels = jnp.array([1, 1])
    np.testing.assert_allclose(fb.forward(net, params, x), [[0.25, 0.75], [2 / 3, 1 / 3]], rtol=1e-15)
    value, g_manual, g_auto, _ = evaluate(net, params, x, labels)
    assert float(value) == pytest.approx(LN2, rel=1e-14)
    assert float(fb.loss(net, params, x, jnp.eye(2)[labels])) == pytest.approx(LN2, rel=1e-14)
    # δ/B = (a − y)/B = [[1/8, −1/8], [1/3, −1/3]]; ∂b = [11/24, −11/24];
    # ∂W = xᵀ δ/B = [[ln2/3, −ln2/3], [ln3/8, −ln3/8]].
    want = [layer([[LN2 / 3, -LN2 / 3], [LN3 / 8, -LN3 / 8]], [11 / 24, -11 / 24])]
    assert_tree_allclose(g_manual, want)
    assert_tree_allclose(g_auto, want)
    # Soft targets: −1/2 [½ ln ¼ + ½ ln ¾ + ln ⅔].
    y_soft = jnp.array([[0.5, 0.5], [1.0, 0.0]])
    want_soft = -0.5 * (0.5 * math.log(0.25) + 0.5 * math.log(0.75) + math.log(2 / 3))
    assert float(fb.loss(net, params, x, y_soft)) == pytest.approx(want_soft, rel=1e-14)


def test_binary_cross_entropy_by_hand():
    # Row 1: a = σ([0, ln 3]) = [1/2, 3/4], y = [1, 0]: ln 2 + ln 4 = 3 ln 2.
    # Row 2: a = σ([−ln 3, 0]) = [1/4, 1/2], y = [0, 1]: ln(4/3) + ln 2.
    # Averaged over the batch (B = 2), summed over the K = 2 outputs.
    net = fb.MLP((2, 2), output="sigmoid", loss="binary_cross_entropy")
    params = [layer(np.eye(2), [0, 0])]
    x = jnp.array([[0.0, LN3], [-LN3, 0.0]])
    y = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    want = (4 * LN2 + math.log(4 / 3)) / 2
    value, g_manual, g_auto, _ = evaluate(net, params, x, y)
    assert float(value) == pytest.approx(want, rel=1e-14)
    # ∂L/∂b = Σ_i (a_i − y_i) / B = ([−1/2, 3/4] + [1/4, −1/2]) / 2.
    np.testing.assert_allclose(g_manual[0]["b"], [-1 / 8, 1 / 8], rtol=1e-14)
    np.testing.assert_allclose(g_auto[0]["b"], [-1 / 8, 1 / 8], rtol=1e-14)


# --- an independent NumPy forward pass and loss for every activation and head --------------
_erf = np.vectorize(math.erf)
NP_ACT = {
    "sigmoid": lambda z: 1 / (1 + np.exp(-z)),
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0),
    "leaky_relu": lambda z: np.where(z >= 0, z, 0.01 * z),
    "elu": lambda z: np.where(z > 0, z, np.exp(z) - 1),
    "softplus": lambda z: np.log1p(np.exp(z)),
    "gelu": lambda z: 0.5 * z * (1 + _erf(z / math.sqrt(2))),
    "identity": lambda z: z,
    "softmax": lambda z: (e := np.exp(z - z.max(1, keepdims=True))) / e.sum(1, keepdims=True),
}


def np_forward(net, params, x):
    a = np.asarray(x)
    for l, p in enumerate(params, start=1):
        z = a @ np.asarray(p["w"]) + np.asarray(p["b"])
        a = NP_ACT[net.output if l == net.num_layers else net.hidden](z)
    return a


def np_loss(net, a, y):
    b = a.shape[0]
    if net.loss == "mse":
        return np.sum((y - a) ** 2) / (2 * b)
    if net.loss == "cross_entropy":
        return -np.sum(y * np.log(a)) / b
    return -np.sum(y * np.log(a) + (1 - y) * np.log(1 - a)) / b


@pytest.mark.parametrize("hidden", fb.HIDDEN_ACTIVATIONS)
def test_forward_and_loss_match_numpy(hidden):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 3)))
    heads = [(o, "mse") for o in ("identity", "tanh", "softmax")] + [
        ("softmax", "cross_entropy"), ("sigmoid", "binary_cross_entropy")]
    for output, loss_name in heads:
        net = fb.MLP((3, 4, 4, 3), hidden, output, loss_name)
        params = fb.init(jax.random.key(1), net, "nielsen")
        a = np_forward(net, params, x)
        np.testing.assert_allclose(fb.forward(net, params, x), a, rtol=1e-12, atol=1e-14)
        y = rng.uniform(0.1, 0.9, size=(5, 3))
        if loss_name == "cross_entropy":
            y = y / y.sum(1, keepdims=True)
        np.testing.assert_allclose(fb.loss(net, params, x, y), np_loss(net, a, y), rtol=1e-12)


def test_activation_values_and_derivatives_by_hand():
    z = jnp.array([[-1.0, 0.0, 2.0]])
    e1 = math.exp(-1)
    phi = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731 - Φ, the normal cdf
    pdf = lambda t: math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)  # noqa: E731 - φ
    want = {  # name: (f(z), f'(z))
        "sigmoid": ([1 / (1 + math.e), 0.5, 1 / (1 + math.exp(-2))],
                    [e1 / (1 + e1) ** 2, 0.25, math.exp(-2) / (1 + math.exp(-2)) ** 2]),
        "tanh": ([math.tanh(-1), 0.0, math.tanh(2)], [1 - math.tanh(1) ** 2, 1.0, 1 - math.tanh(2) ** 2]),
        "relu": ([0.0, 0.0, 2.0], [0.0, 0.0, 1.0]),
        "leaky_relu": ([-0.01, 0.0, 2.0], [0.01, 1.0, 1.0]),
        "elu": ([e1 - 1, 0.0, 2.0], [e1, 1.0, 1.0]),
        "softplus": ([math.log1p(e1), LN2, math.log1p(math.exp(2))],
                     [1 / (1 + math.e), 0.5, 1 / (1 + math.exp(-2))]),
        "gelu": ([-phi(-1), 0.0, 2 * phi(2)],
                 [phi(-1) - pdf(-1), 0.5, phi(2) + 2 * pdf(2)]),
        "identity": ([-1.0, 0.0, 2.0], [1.0, 1.0, 1.0]),
    }
    assert LEAKY_RELU_SLOPE == 0.01
    assert set(want) == set(fb.HIDDEN_ACTIVATIONS)
    for name, (f, df) in want.items():
        act = ACTIVATIONS[name]
        a = act.fn(z)
        np.testing.assert_allclose(a, [f], rtol=1e-14, atol=1e-16, err_msg=name)
        np.testing.assert_allclose(act.derivative(z, a), [df], rtol=1e-14, atol=1e-16, err_msg=name)
        g = jnp.array([[2.0, -3.0, 0.5]])
        np.testing.assert_allclose(
            act.backward(z, a, g), g * jnp.asarray([df]), rtol=1e-14, err_msg=name)


def test_softmax_backward_is_jacobian_product():
    z = jnp.array([[0.3, -1.2, 2.0]])
    a = ACTIVATIONS["softmax"].fn(z)
    g = jnp.array([[1.0, -2.0, 0.5]])
    s = np.asarray(a[0])
    jac = np.diag(s) - np.outer(s, s)
    got = ACTIVATIONS["softmax"].backward(z, a, g)[0]
    np.testing.assert_allclose(got, np.asarray(g[0]) @ jac, rtol=1e-14)


# --- numerical stability ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_cross_entropy_stable_for_huge_logits(dtype):
    # Logits [1000, 0] and [0, −1000], labels [1, 1]: each −log a = 1000 exactly; exp(1000)
    # overflows even in float64, so a naive log(softmax) would give inf.
    net = fb.MLP((2, 2), output="softmax", loss="cross_entropy")
    params = [layer(np.eye(2), [0, 0], dtype)]
    x = jnp.array([[1000.0, 0.0], [0.0, -1000.0]], dtype)
    labels = jnp.array([1, 1])
    value, g_manual, g_auto, _ = evaluate(net, params, x, labels)
    assert value.dtype == dtype
    assert float(value) == pytest.approx(1000.0, rel=1e-6)
    assert float(evaluate(net, params, x, jnp.array([0, 0]))[0]) == pytest.approx(0.0, abs=1e-6)
    for g in (g_manual, g_auto):
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(g))
    # δ = (a − y)/B = [[1, −1], [1, −1]]/2 (a saturates to one-hot [1, 0]).
    np.testing.assert_allclose(g_manual[0]["b"], [1.0, -1.0], rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_binary_cross_entropy_stable_for_huge_logits(dtype):
    net = fb.MLP((2, 2), output="sigmoid", loss="binary_cross_entropy")
    params = [layer(np.eye(2), [0, 0], dtype)]
    x = jnp.array([[1000.0, -1000.0], [1000.0, -1000.0]], dtype)
    # σ(1000) = 1 and σ(−1000) = 0 in floating point: a naive log(1 − a) / log(a) is −inf.
    # Each row of the wrong targets costs 1000 + 1000; the mean over B = 2 rows is 2000.
    wrong, g, g_auto, _ = evaluate(net, params, x, jnp.array([[0.0, 1.0], [0.0, 1.0]], dtype))
    assert float(wrong) == pytest.approx(2000.0, rel=1e-6)
    right = evaluate(net, params, x, jnp.array([[1.0, 0.0], [1.0, 0.0]], dtype))[0]
    assert float(right) == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(g[0]["b"], [1.0, -1.0], rtol=1e-6)
    for v in jax.tree.leaves((g, g_auto)):
        assert bool(jnp.all(jnp.isfinite(v)))


# --- penalties -------------------------------------------------------------------------------
def test_penalty_by_hand():
    # Σ|w| = 1 + 2 + 3 + 4 = 10, Σw² = 30: l1 = 0.1, l2 = 0.2 → 0.1·10 + 0.2/2·30 = 4;
    # the biases (5, 6, 7) are not penalised.
    net = fb.MLP((1, 2, 1), hidden="tanh", output="identity", loss="mse")
    params = [layer([[1, -2]], [5, 6]), layer([[3], [-4]], [7])]
    assert float(penalty(params, 0.1, 0.2)) == pytest.approx(4.0, rel=1e-15)
    assert float(penalty(params, 0.1, 0.0)) == pytest.approx(1.0, rel=1e-15)
    assert float(penalty(params, 0.0, 0.2)) == pytest.approx(3.0, rel=1e-15)
    assert float(penalty(params)) == 0.0
    x, y = jnp.array([[0.5], [-1.0]]), jnp.array([[1.0], [0.0]])
    plain = fb.loss(net, params, x, y)
    assert float(fb.loss(net, params, x, y, l1=0.1, l2=0.2) - plain) == pytest.approx(4.0, rel=1e-13)
    # Its gradient: l1 sign(w) + l2 w = 0.1 [1, −1] + 0.2 [1, −2] = [0.3, −0.5] on w¹.
    np.testing.assert_allclose(penalty_grad(params[0]["w"], 0.1, 0.2), [[0.3, -0.5]], rtol=1e-15)
    g_pen = fb.manual_grad(net, params, x, y, l1=0.1, l2=0.2)
    diff = jax.tree.map(lambda a, b: a - b, g_pen, fb.manual_grad(net, params, x, y))
    np.testing.assert_allclose(diff[0]["w"], [[0.3, -0.5]], rtol=1e-13)
    np.testing.assert_allclose(diff[1]["w"], [[0.1 + 0.6], [-0.1 - 0.8]], rtol=1e-13)
    np.testing.assert_array_equal(diff[0]["b"], [0.0, 0.0])
    np.testing.assert_array_equal(diff[1]["b"], [0.0])


# --- initialisation ---------------------------------------------------------------------------
_N_IN, _N_OUT = 500, 400
# scheme: (std of w, bound of |w| or None, std of b or 0)
_INIT_SPEC = {
    "xavier_normal": (math.sqrt(2 / (_N_IN + _N_OUT)), None, 0.0),
    "xavier_uniform": (math.sqrt(2 / (_N_IN + _N_OUT)), math.sqrt(6 / (_N_IN + _N_OUT)), 0.0),
    "he_normal": (math.sqrt(2 / _N_IN), None, 0.0),
    "he_uniform": (math.sqrt(2 / _N_IN), math.sqrt(6 / _N_IN), 0.0),
    "lecun_normal": (math.sqrt(1 / _N_IN), None, 0.0),
    "nielsen": (1 / math.sqrt(_N_IN), None, 1.0),
    "normal": (1.0, None, 1.0),
    "zeros": (0.0, None, 0.0),
}


def test_init_spec_covers_every_scheme():
    assert set(_INIT_SPEC) == set(fb.INIT_SCHEMES)


@pytest.mark.parametrize("scheme", list(_INIT_SPEC))
def test_init_statistics(scheme):
    std_w, bound, std_b = _INIT_SPEC[scheme]
    net = fb.MLP((_N_IN, _N_OUT, 3000))
    params = fb.init(jax.random.key(0), net, scheme)
    w, b = np.asarray(params[0]["w"]), np.asarray(params[0]["b"])
    assert w.shape == (_N_IN, _N_OUT) and b.shape == (_N_OUT,)
    assert w.dtype == np.float64  # the default float (x64 is on in the tests)
    if std_w == 0:
        assert not w.any() and not b.any()
        return
    # 200 000 draws: the sample std is within ~0.2 % of the true one (1 s.d.).
    assert w.std() == pytest.approx(std_w, rel=0.02), scheme
    assert abs(w.mean()) < 5 * std_w / math.sqrt(w.size)
    if bound is not None:
        assert np.abs(w).max() <= bound
        assert np.abs(w).max() > 0.99 * bound
    # The second layer has its own fan-in.
    w2, b2 = np.asarray(params[1]["w"]), np.asarray(params[1]["b"])
    std_w2 = _INIT_SPEC[scheme][0] if scheme == "normal" else None
    if scheme in ("he_normal", "lecun_normal", "nielsen"):
        std_w2 = (math.sqrt(2) if scheme == "he_normal" else 1.0) / math.sqrt(_N_OUT)
    if std_w2 is not None:
        assert w2.std() == pytest.approx(std_w2, rel=0.02), scheme
    if std_b == 0:
        assert not b.any() and not b2.any()
    else:
        # 3 400 bias draws in all: std within ~1.2 % (1 s.d.).
        both = np.concatenate([b, b2])
        assert both.std() == pytest.approx(std_b, rel=0.06), scheme
        assert abs(both.mean()) < 5 * std_b / math.sqrt(both.size)


def test_init_dtype_keys_and_layers():
    net = fb.MLP((3, 4, 4, 3), "tanh", "softmax")
    p32 = fb.init(jax.random.key(0), net, "nielsen", dtype=jnp.float32)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(p32))
    p64 = fb.init(jax.random.key(0), net, "nielsen", dtype="float64")
    assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(p64))
    shapes = [(p["w"].shape, p["b"].shape) for p in p64]
    assert shapes == [((3, 4), (4,)), ((4, 4), (4,)), ((4, 3), (3,))]
    again = fb.init(jax.random.key(0), net, "nielsen", dtype="float64")
    for a, b in zip(jax.tree.leaves(p64), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    other = fb.init(jax.random.key(1), net, "nielsen", dtype="float64")
    assert not np.allclose(p64[0]["w"], other[0]["w"])
    # Layers draw from different keys: the two (4,) N(0, 1) bias vectors differ.
    assert not np.allclose(p64[0]["b"], p64[1]["b"])


# --- dropout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_dropout_mask_semantics(rate):
    net = fb.MLP((3, 400, 300, 2))
    batch = 250
    masks = dropout_masks(net, jax.random.key(0), rate, batch, jnp.float64)
    assert len(masks) == 2
    assert [m.shape for m in masks] == [(batch, 400), (batch, 300)]
    for m in masks:
        m = np.asarray(m)
        values = np.unique(m)
        np.testing.assert_allclose(values, [0.0, 1 / (1 - rate)], rtol=1e-15)
        # 75 000+ entries: the dropped fraction is the rate, and the mask mean is 1 (inverted
        # dropout keeps the expected activation), each within 5 standard errors.
        n = m.size
        dropped = float(np.mean(m == 0))
        assert abs(dropped - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
        assert abs(m.mean() - 1) < 5 * math.sqrt(rate / (1 - rate) / n)
    # Different layers and different keys give different masks; the same key the same ones.
    assert not np.array_equal(masks[0][:, :300], masks[1])
    again = dropout_masks(net, jax.random.key(0), rate, batch, jnp.float64)
    np.testing.assert_array_equal(masks[0], again[0])
    other = dropout_masks(net, jax.random.key(1), rate, batch, jnp.float64)
    assert not np.array_equal(masks[0], other[0])


def test_dropout_applied_to_hidden_activations_only():
    net = fb.MLP((3, 4, 4, 3), "sigmoid", "softmax")
    params = fb.init(jax.random.key(0), net)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)))
    assert dropout_masks(net, None, 0.0, 5, jnp.float64) is None
    assert dropout_masks(fb.MLP((3, 3)), jax.random.key(0), 0.5, 5, jnp.float64) is None
    masks = dropout_masks(net, jax.random.key(3), 0.5, 5, jnp.float64)
    tr = fb.forward_trace(net, params, x, masks)
    for l in range(2):
        np.testing.assert_allclose(tr.a[l + 1], tr.h[l] * masks[l], rtol=1e-15)
    np.testing.assert_array_equal(tr.a[-1], tr.h[-1])
    # The loss with dropout is the loss of the masked forward pass.
    labels = jnp.array([0, 1, 2, 2, 0])
    want = -np.mean(np.log(np.asarray(tr.a[-1])[np.arange(5), np.asarray(labels)]))
    got = fb.loss(net, params, x, labels, dropout=0.5, key=jax.random.key(3))
    assert float(got) == pytest.approx(want, rel=1e-13)
    assert float(got) != pytest.approx(float(fb.loss(net, params, x, labels)), rel=1e-6)
