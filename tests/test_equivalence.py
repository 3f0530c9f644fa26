"""The hand-derived gradient equals ``jax.grad`` of the loss.

float64, relative error ≤ 1e-10, over every hidden activation × every valid head × depth 1–4 ×
batch 1 / odd / larger; hypothesis-generated architectures and data; regularisation; dropout
with a key; float32 at a looser tolerance; the batch-mean semantics of ``manual_grad`` and the
per-example semantics of :func:`fnbackprop.backward`; forward output shapes.

Speed: the matrix runs eagerly with a few fixed widths, so that JAX's per-primitive executable
cache is shared by the cases (a ``jax.jit`` per network and batch size costs more XLA compile
time on CPU than the eager evaluation); one-off shapes (hypothesis, float32) are jitted instead.
The default run takes a pairwise-covering subset of the full matrix; the rest is marked
``slow`` (``pytest -m slow tests/test_equivalence.py`` runs it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fnbackprop as fb

RTOL64 = 1e-10
RTOL32 = 1e-4
BATCHES = (1, 5, 16)  # one example, odd, larger
N_IN, WIDTH, N_OUT = 3, 4, 3

# (output activation, loss, kind of target)
HEADS = (
    ("softmax", "cross_entropy", "onehot"),
    ("softmax", "cross_entropy", "labels"),
    ("sigmoid", "binary_cross_entropy", "prob"),
    ("identity", "mse", "real"),
    ("softmax", "mse", "prob"),
    ("sigmoid", "mse", "prob"),
    ("tanh", "mse", "real"),
)
HEAD_IDS = [f"{o}-{l}-{k}" for o, l, k in HEADS]


def make_targets(rng: np.random.Generator, net: fb.MLP, kind: str, batch: int, dtype=np.float64):
    k = net.sizes[-1]
    if kind == "labels":
        return jnp.asarray(rng.integers(0, k, size=batch))
    if kind == "onehot":
        return jnp.asarray(np.eye(k, dtype=dtype)[rng.integers(0, k, size=batch)])
    if kind == "prob":  # probabilities in (0, 1); rows of a softmax target sum to one
        y = rng.uniform(0.05, 0.95, size=(batch, k))
        if net.output == "softmax":
            y = y / y.sum(axis=1, keepdims=True)
        return jnp.asarray(y.astype(dtype))
    return jnp.asarray(rng.normal(size=(batch, k)).astype(dtype))


def kind_for(net: fb.MLP) -> str:
    if net.loss == "cross_entropy":
        return "onehot"
    if net.loss == "binary_cross_entropy" or net.output in ("sigmoid", "softmax"):
        return "prob"
    return "real"


def make_batch(seed: int, net: fb.MLP, kind: str, batch: int, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, net.sizes[0])).astype(dtype))
    return x, make_targets(rng, net, kind, batch, dtype)


def assert_grads_close(g_manual, g_ref, rtol: float, what: str = "") -> None:
    """Per parameter array: max |manual − ref| ≤ rtol · max |ref|.

    The denominator has a floor of 1e-6 × the largest gradient entry of the whole network, so
    that an array whose exact gradient is zero (a dead ReLU layer) is compared with the
    gradient's overall scale rather than with rounding noise.
    """
    assert jax.tree.structure(g_manual) == jax.tree.structure(g_ref), what
    leaves_m = [np.asarray(v) for v in jax.tree.leaves(g_manual)]
    leaves_r = [np.asarray(v) for v in jax.tree.leaves(g_ref)]
    overall = max(float(np.max(np.abs(r))) for r in leaves_r)
    assert overall > 0, f"{what}: the reference gradient is identically zero"
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(g_ref)]
    for path, m, r in zip(paths, leaves_m, leaves_r):
        assert m.shape == r.shape and m.dtype == r.dtype, (what, path, m.shape, r.shape, m.dtype)
        assert np.all(np.isfinite(m)), (what, path)
        scale = max(float(np.max(np.abs(r))), 1e-6 * overall)
        err = float(np.max(np.abs(m - r)))
        assert err <= rtol * scale, f"{what} {path}: rel error {err / scale:.3e} > {rtol:g}"


def check_equal_to_autodiff(net, params, x, y, rtol=RTOL64, what="", jit=False, **kw):
    """Asserts manual_grad ≈ autodiff_grad; returns the manual gradient.

    ``jit=True`` compiles both gradients as one program: cheaper than eager evaluation for a
    one-off shape (eager evaluation compiles every primitive for every new shape).
    """
    if jit:
        both = lambda p, x, y: (  # noqa: E731
            fb.manual_grad(net, p, x, y, **kw), fb.autodiff_grad(net, p, x, y, **kw)
        )
        g_manual, g_auto = jax.jit(both)(params, x, y)
    else:
        g_manual = fb.manual_grad(net, params, x, y, **kw)
        g_auto = fb.autodiff_grad(net, params, x, y, **kw)
    assert_grads_close(g_manual, g_auto, rtol, what)
    return g_manual


def sizes_for(depth: int, n_in: int = N_IN, width: int = WIDTH, n_out: int = N_OUT):
    return (n_in,) + (width,) * (depth - 1) + (n_out,)


# --- the matrix -------------------------------------------------------------------------------
def _matrix_cases():
    """Every hidden activation × every head × depth 1–4 × batch 1 / odd / larger.

    Depth 1 has no hidden layer, so it runs once per head and batch size (21 cases). For depth
    2–4 the full product has 504 cases; each new (activation, depth, batch) combination costs
    ~0.2 s of CPU, mostly compiling primitives for new shapes, too slow for the default run.
    The fast subset keeps one (depth, batch) per (hidden, head) pair, rotated so that every
    pair of factors (hidden × head, hidden × depth, hidden × batch, head × depth, head × batch,
    depth × batch) occurs, and one batch size per head at depth 1; the other cases of the full
    product are marked ``slow``.
    """
    cases = []
    for i_head, head in enumerate(HEADS):
        for i_b, b in enumerate(BATCHES):
            fast = i_b == i_head % len(BATCHES)
            cases.append(
                pytest.param(
                    "relu", head, 1, b, id=f"{HEAD_IDS[i_head]}-d1-B{b}",
                    marks=() if fast else pytest.mark.slow,
                )
            )
    for i_hidden, hidden in enumerate(fb.HIDDEN_ACTIVATIONS):
        for i_head, head in enumerate(HEADS):
            fast_depth = 2 + (i_hidden + i_head) % 3
            fast_batch = BATCHES[(i_hidden + 2 * i_head) % 3]
            for depth in (2, 3, 4):
                for b in BATCHES:
                    fast = (depth, b) == (fast_depth, fast_batch)
                    cases.append(
                        pytest.param(
                            hidden, head, depth, b,
                            id=f"{hidden}-{HEAD_IDS[i_head]}-d{depth}-B{b}",
                            marks=() if fast else pytest.mark.slow,
                        )
                    )
    return cases


def test_matrix_fast_subset_covers_all_pairs():
    fast = [c.values for c in _matrix_cases() if not c.marks and c.values[2] > 1]
    hidden = {c[0] for c in fast}
    heads = {c[1] for c in fast}
    factors = (fb.HIDDEN_ACTIVATIONS, HEADS, (2, 3, 4), BATCHES)
    for i in range(4):
        for j in range(i + 1, 4):
            seen = {(c[i], c[j]) for c in fast}
            assert len(seen) == len(factors[i]) * len(factors[j]), (i, j)
    assert len(hidden) == 8 and len(heads) == len(HEADS)


@pytest.mark.parametrize("hidden,head,depth,batch", _matrix_cases())
def test_manual_equals_autodiff_matrix(hidden, head, depth, batch):
    output, loss_name, kind = head
    net = fb.MLP(sizes_for(depth), hidden, output, loss_name)
    params = fb.init(jax.random.key(depth), net, "xavier_normal")
    x, y = make_batch(100 * depth + batch, net, kind, batch)
    check_equal_to_autodiff(net, params, x, y, what=f"{net} B={batch}")


@pytest.mark.parametrize("output", fb.OUTPUT_ACTIVATIONS)
def test_mse_with_every_output_activation(output):
    net = fb.MLP(sizes_for(2), "tanh", output, "mse")
    params = fb.init(jax.random.key(3), net, "xavier_normal")
    x, y = make_batch(7, net, kind_for(net), 5)
    check_equal_to_autodiff(net, params, x, y, what=f"{net} B=5")


def test_single_output_unit_heads():
    """n_L = 1: sigmoid + BCE and identity + MSE, with (B, 1) and (B,) targets."""
    for output, loss_name in (("sigmoid", "binary_cross_entropy"), ("identity", "mse")):
        net = fb.MLP((N_IN, WIDTH, 1), "elu", output, loss_name)
        params = fb.init(jax.random.key(1), net, "xavier_normal")
        x, y = make_batch(2, net, "prob", 5)
        g2 = check_equal_to_autodiff(net, params, x, y, what=f"{net} y (B,1)", jit=True)
        g1 = check_equal_to_autodiff(net, params, x, y[:, 0], what=f"{net} y (B,)", jit=True)
        assert_grads_close(g1, g2, 1e-15, "(B,) vs (B, 1) targets")


def test_cross_entropy_labels_equal_one_hot():
    net = fb.MLP(sizes_for(3), "gelu", "softmax", "cross_entropy")
    params = fb.init(jax.random.key(0), net, "he_normal")
    x, labels = make_batch(5, net, "labels", 5)
    one_hot = jax.nn.one_hot(labels, N_OUT, dtype=jnp.float64)
    np.testing.assert_array_equal(
        fb.loss(net, params, x, labels), fb.loss(net, params, x, one_hot)
    )
    assert_grads_close(
        fb.manual_grad(net, params, x, labels), fb.manual_grad(net, params, x, one_hot), 1e-15
    )


def test_cross_entropy_soft_targets_rows_not_summing_to_one():
    """The fused CE delta is a Σ_k y_k − y: right even when target rows do not sum to one."""
    net = fb.MLP(sizes_for(2), "tanh", "softmax", "cross_entropy")
    params = fb.init(jax.random.key(0), net, "xavier_normal")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, N_IN)))
    y = jnp.asarray(rng.uniform(0, 2, size=(5, N_OUT)))
    check_equal_to_autodiff(net, params, x, y, what="unnormalised soft targets")


# --- hypothesis-generated architectures and data ---------------------------------------------
_VALID_HEADS = [(o, "mse") for o in fb.OUTPUT_ACTIVATIONS] + [
    ("softmax", "cross_entropy"),
    ("sigmoid", "binary_cross_entropy"),
]


@st.composite
def architectures(draw):
    depth = draw(st.integers(1, 4))
    sizes = tuple(draw(st.integers(1, 6)) for _ in range(depth + 1))
    hidden = draw(st.sampled_from(fb.HIDDEN_ACTIVATIONS))
    output, loss_name = draw(st.sampled_from(_VALID_HEADS))
    if output == "softmax" and sizes[-1] == 1:  # refused: softmax over one unit is constant
        sizes = sizes[:-1] + (2,)
    return fb.MLP(sizes, hidden, output, loss_name)


@settings(max_examples=4)
@given(
    net=architectures(),
    batch=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
    scheme=st.sampled_from(["xavier_normal", "he_uniform", "nielsen", "normal"]),
    labels=st.booleans(),
)
def test_manual_equals_autodiff_hypothesis(net, batch, seed, scheme, labels):
    params = fb.init(jax.random.key(seed), net, scheme)
    kind = "labels" if labels and net.loss == "cross_entropy" else kind_for(net)
    x, y = make_batch(seed, net, kind, batch)
    check_equal_to_autodiff(net, params, x, y, what=f"{net} B={batch} {scheme}", jit=True)


@settings(max_examples=3)
@given(
    net=architectures(),
    seed=st.integers(0, 2**31 - 1),
    l1=st.sampled_from([0.0, 1e-3, 0.3]),
    l2=st.sampled_from([0.0, 1e-2, 0.5]),
    rate=st.sampled_from([0.0, 0.2, 0.5]),
)
def test_manual_equals_autodiff_hypothesis_regularised(net, seed, l1, l2, rate):
    params = fb.init(jax.random.key(seed), net, "xavier_uniform")
    x, y = make_batch(seed, net, kind_for(net), 6)
    key = jax.random.key(seed + 1) if rate > 0 else None
    what = f"{net} l1={l1} l2={l2} p={rate}"
    # Closed over, the rate is static: the jitted manual path takes the same branch as eager.
    check_equal_to_autodiff(
        net, params, x, y, what=what, jit=True, l1=l1, l2=l2, dropout=rate, key=key
    )


# --- regularisation ---------------------------------------------------------------------------
@pytest.mark.parametrize("l1,l2", [(0.1, 0.0), (0.0, 0.3), (0.05, 0.2)])
def test_regularised_gradient(l1, l2):
    net = fb.MLP(sizes_for(3), "sigmoid", "softmax", "cross_entropy")
    params = fb.init(jax.random.key(1), net, "nielsen")
    x, y = make_batch(1, net, "labels", 5)
    g = check_equal_to_autodiff(net, params, x, y, what=f"l1={l1} l2={l2}", l1=l1, l2=l2)
    g0 = fb.manual_grad(net, params, x, y)
    for gl, g0l, p in zip(g, g0, params):
        # Exactly the penalty's gradient on the weights, nothing on the biases.
        want = l1 * np.sign(p["w"]) + l2 * p["w"]
        np.testing.assert_allclose(gl["w"] - g0l["w"], want, rtol=0, atol=1e-14)
        np.testing.assert_array_equal(gl["b"], g0l["b"])


# --- dropout ----------------------------------------------------------------------------------
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("hidden", ["relu", "tanh", "softplus"])
def test_dropout_manual_equals_autodiff_same_key(hidden, rate):
    net = fb.MLP(sizes_for(4), hidden, "softmax", "cross_entropy")
    params = fb.init(jax.random.key(2), net, "he_normal")
    x, y = make_batch(3, net, "labels", 16)
    key = jax.random.key(42)
    g = check_equal_to_autodiff(net, params, x, y, what=f"p={rate}", dropout=rate, key=key)
    g_plain = fb.manual_grad(net, params, x, y)
    differs = any(
        not np.allclose(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_plain))
    )
    assert differs, "dropout had no effect on the gradient"
    # Same key, same bits; another key, another gradient.
    g_again = fb.manual_grad(net, params, x, y, dropout=rate, key=jax.random.key(42))
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_again)):
        np.testing.assert_array_equal(a, b)
    g_other = fb.manual_grad(net, params, x, y, dropout=rate, key=jax.random.key(43))
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_other)))


def test_dropout_with_regularisation_and_mse():
    net = fb.MLP(sizes_for(3), "elu", "identity", "mse")
    params = fb.init(jax.random.key(5), net, "lecun_normal")
    x, y = make_batch(9, net, "real", 16)
    check_equal_to_autodiff(
        net, params, x, y, what="dropout+l1+l2", l1=0.01, l2=0.1, dropout=0.3, key=jax.random.key(0)
    )


def test_dropout_rate_zero_equals_no_dropout():
    net = fb.MLP(sizes_for(3), "relu", "softmax", "cross_entropy")
    params = fb.init(jax.random.key(0), net)
    x, y = make_batch(0, net, "labels", 5)
    g0 = fb.manual_grad(net, params, x, y)
    g1 = fb.manual_grad(net, params, x, y, dropout=0.0, key=jax.random.key(1))
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_array_equal(a, b)


# --- jitted ----------------------------------------------------------------------------------
def test_jitted_manual_equals_eager_and_autodiff():
    net = fb.MLP(sizes_for(3), "gelu", "softmax", "cross_entropy")
    params = fb.init(jax.random.key(0), net)
    x, y = make_batch(0, net, "labels", 5)
    key = jax.random.key(9)
    manual = jax.jit(
        lambda p, x, y, k: fb.manual_grad(net, p, x, y, l2=0.1, dropout=0.25, key=k)
    )
    auto = jax.jit(
        lambda p, x, y, k: fb.autodiff_grad(net, p, x, y, l2=0.1, dropout=0.25, key=k)
    )
    g_jit = manual(params, x, y, key)
    assert_grads_close(g_jit, auto(params, x, y, key), RTOL64, "jit manual vs jit autodiff")
    g_eager = fb.manual_grad(net, params, x, y, l2=0.1, dropout=0.25, key=key)
    assert_grads_close(g_jit, g_eager, RTOL64, "jit vs eager")


# --- float32 ----------------------------------------------------------------------------------
_HEADS32 = (HEADS[1], HEADS[2], HEADS[3], HEADS[4])


@pytest.mark.parametrize("head", _HEADS32, ids=[f"{o}-{l}-{k}" for o, l, k in _HEADS32])
def test_float32_manual_equals_autodiff(head):
    output, loss_name, kind = head
    net = fb.MLP(sizes_for(3), "tanh", output, loss_name)
    params = fb.init(jax.random.key(0), net, "xavier_normal", dtype=jnp.float32)
    x, y = make_batch(4, net, kind, 5, dtype=np.float32)
    g = check_equal_to_autodiff(net, params, x, y, rtol=RTOL32, what=f"float32 {net}", jit=True)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(g))
    # And float32 is close to the float64 gradient of the same (rounded) parameters.
    p64 = jax.tree.map(lambda v: v.astype(jnp.float64), params)
    x64 = x.astype(jnp.float64)
    y64 = y if kind == "labels" else y.astype(jnp.float64)
    g64 = fb.manual_grad(net, p64, x64, y64)
    assert_grads_close(g, jax.tree.map(lambda v: v.astype(jnp.float32), g64), RTOL32)


# --- batch-mean and per-example semantics ----------------------------------------------------
@pytest.mark.parametrize("head", HEADS[:4], ids=HEAD_IDS[:4])
def test_manual_grad_is_mean_of_single_example_grads(head):
    output, loss_name, kind = head
    net = fb.MLP(sizes_for(3), "softplus", output, loss_name)
    params = fb.init(jax.random.key(0), net)
    b = 5
    x, y = make_batch(1, net, kind, b)
    l1, l2 = 0.01, 0.1
    g = fb.manual_grad(net, params, x, y, l1=l1, l2=l2)
    singles = [fb.manual_grad(net, params, x[i:i + 1], y[i:i + 1]) for i in range(b)]
    mean = jax.tree.map(lambda *gs: sum(gs) / b, *singles)
    # The penalty's gradient is added once, not once per example.
    expected = [
        {"w": m["w"] + l1 * jnp.sign(p["w"]) + l2 * p["w"], "b": m["b"]}
        for m, p in zip(mean, params)
    ]
    assert_grads_close(g, expected, RTOL64, "batch mean")
    # The gradient of the batch mean, not of the sum: a batch of copies of one example has the
    # gradient of that example.
    rep = fb.manual_grad(net, params, jnp.repeat(x[:1], b, axis=0), jnp.repeat(y[:1], b, axis=0))
    assert_grads_close(rep, singles[0], RTOL64, "repeated example")


def test_backward_deltas_are_per_example():
    """δ_i^l of backward() = ∂ℓ_i/∂z_i^l: the bias gradient of example i alone."""
    net = fb.MLP(sizes_for(3), "tanh", "softmax", "cross_entropy")
    params = fb.init(jax.random.key(0), net)
    x, y = make_batch(3, net, "labels", 5)
    bw = fb.backward(net, params, x, y)
    assert len(bw.delta) == net.num_layers
    for l, d in enumerate(bw.delta):
        assert d.shape == (5, net.sizes[l + 1])
    for i in range(5):
        gi = fb.autodiff_grad(net, params, x[i:i + 1], y[i:i + 1])
        for l in range(net.num_layers):
            np.testing.assert_allclose(bw.delta[l][i], gi[l]["b"], rtol=1e-12, atol=1e-15)
    # ∂L/∂W^l = a^{l−1 ᵀ} δ^l / B with the trace's activations.
    g = fb.manual_grad(net, params, x, y)
    for l in range(net.num_layers):
        np.testing.assert_allclose(g[l]["w"], bw.trace.a[l].T @ bw.delta[l] / 5, rtol=1e-12)


# --- forward ----------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 4])
@pytest.mark.parametrize("output", ["softmax", "sigmoid"])
def test_forward_shapes(output, depth):
    sizes = sizes_for(depth)
    net = fb.MLP(sizes, "relu", output, "mse")
    params = fb.init(jax.random.key(0), net)
    for b in BATCHES:
        x = jnp.asarray(np.random.default_rng(b).normal(size=(b, N_IN)))
        a = fb.forward(net, params, x)
        assert a.shape == (b, 3) and a.dtype == jnp.float64
        tr = fb.forward_trace(net, params, x)
        assert len(tr.z) == len(tr.h) == depth and len(tr.a) == depth + 1
        assert [t.shape for t in tr.a] == [(b, n) for n in sizes]
        assert [t.shape for t in tr.z] == [(b, n) for n in sizes[1:]]
        np.testing.assert_array_equal(tr.a[-1], a)
        if output == "softmax":
            np.testing.assert_allclose(jnp.sum(a, axis=1), 1.0, rtol=1e-14)
        if output == "sigmoid":
            assert bool(jnp.all((a > 0) & (a < 1)))
    p32 = fb.init(jax.random.key(0), net, dtype=jnp.float32)
    assert fb.forward(net, p32, jnp.ones((2, N_IN))).dtype == jnp.float32


# --- the same work ----------------------------------------------------------------------------
@pytest.mark.parametrize("hidden,dropout", [("tanh", 0.0), ("relu", 0.3)])
def test_manual_does_no_more_work_than_autodiff(hidden, dropout):
    """XLA's cost model (not a timing) of the compiled gradients: the hand-derived path does
    not do more arithmetic or memory traffic than jax.grad. Rescaling every layer's δ by 1/B
    instead of δ^L once, or adding a zero penalty's gradient, shows up here as ≥ 5 % more."""
    net = fb.MLP((16, 64, 64, 4), hidden, "softmax", "cross_entropy")
    params = fb.init(jax.random.key(0), net, dtype=jnp.float32)
    x, y = jnp.ones((64, 16), jnp.float32), jnp.zeros((64,), jnp.int32)
    key = jax.random.key(1) if dropout else None
    cost = {}
    for name, grad in (("manual", fb.manual_grad), ("autodiff", fb.autodiff_grad)):
        compiled = jax.jit(lambda p, x, y, k: grad(net, p, x, y, dropout=dropout, key=k)).lower(
            params, x, y, key).compile()
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        if not ca or "flops" not in ca or "bytes accessed" not in ca:
            pytest.skip("no XLA cost analysis on this backend")
        cost[name] = (ca["flops"], ca["bytes accessed"])
    assert cost["manual"][0] <= 1.02 * cost["autodiff"][0], cost
    assert cost["manual"][1] <= 1.02 * cost["autodiff"][1], cost
