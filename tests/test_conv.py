"""Convolutional networks: Conv1D is lax's convolution, Flatten is row-major, and the
hand-derived gradient equals ``jax.grad`` over random conv networks, without autodiff.

float64, relative error ≤ 1e-10. Both implementations of Conv1D (``unfold``: windows and
matmuls, the CPU default; ``lax``: lax convolutions, elsewhere) are checked. Speed: each check
compiles many small configurations in one program (compiling is what costs time here), without
LLVM's backend optimisations on CPU. The default run takes a subset of the random networks that
covers every value of every factor; the rest is marked ``slow``.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fnbackprop as fb
from fnbackprop.layers import conv1d

RTOL64 = 1e-10
FAST_COMPILE = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
IMPLS = conv1d.IMPLEMENTATIONS
DIMS = ("NWC", "WIO", "NWC")


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch):
    """Each Conv1D implementation in turn (read when a function is traced: pass it on as a
    static argument so that every implementation gets its own trace)."""
    monkeypatch.setenv("FNBACKPROP_CONV1D", request.param)
    return request.param


def assert_close(got, ref, rtol=RTOL64, what=""):
    """Per leaf: ``max |got − ref| ≤ rtol · max |ref|``."""
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        g, r = np.asarray(g), np.asarray(r)
        assert g.shape == r.shape and g.dtype == r.dtype, (what, g.shape, r.shape)
        assert np.all(np.isfinite(g)), what
        scale = max(float(np.max(np.abs(r), initial=0.0)), 1e-300)
        err = float(np.max(np.abs(g - r), initial=0.0))
        assert err <= rtol * scale, f"{what}: relative error {err / scale:.2e} > {rtol:g}"


# --- Conv1D is lax.conv_general_dilated --------------------------------------------------------
def _layer_cases(lengths):
    cases = []
    for length, k, s, pad in itertools.product(lengths, range(1, 8), (1, 2, 3), conv1d.PADDINGS):
        if pad == "SAME" or k <= length:
            cases.append((length, k, s, pad))
    return cases


@jax.jit(static_argnums=(0, 1), compiler_options=FAST_COMPILE)
def _ours_and_lax(cases, impl, arrays):
    """Per case: (z, ∂/∂a, ∂/∂W) of Conv1D and of lax (through jax.vjp), for the given impl."""
    del impl  # a static argument: one trace per implementation
    out = []
    for (length, k, s, pad), (a, w, b, cot) in zip(cases, arrays):
        layer, p = fb.Conv1D(3, k, s, pad), {"w": w, "b": b}

        def ref_conv(a, w, s=s, pad=pad):
            return lax.conv_general_dilated(a, w, (s,), pad, dimension_numbers=DIMS)

        z_ref, vjp = jax.vjp(ref_conv, a, w)
        ga_ref, gw_ref = vjp(cot)
        ours = (layer.forward(p, a), layer.input_grad(p, cot, (length, 2)), layer.grads(a, cot))
        out.append((ours, (z_ref + b[None, None, :], ga_ref, {"w": gw_ref, "b": cot.sum((0, 1))})))
    return out


def _check_layer_cases(cases, impl):
    rng = np.random.default_rng(len(cases))
    arrays = []
    for length, k, s, pad in cases:
        t = conv1d.geometry(length, k, s, pad)[0]
        arrays.append(tuple(jnp.asarray(rng.normal(size=shape)) for shape in
                            ((2, length, 2), (k, 2, 3), (3,), (2, t, 3))))
    for case, (ours, ref) in zip(cases, _ours_and_lax(tuple(cases), impl, arrays)):
        assert ours[0].shape == ref[0].shape == (2, conv1d.geometry(*case)[0], 3), case
        assert_close(ours, ref, 1e-12, f"{impl} {case}")


def test_conv1d_equals_lax_every_kernel_stride_padding(impl):
    """Output length and alignment, input gradient and weight gradient, for kernels 1–7 (odd
    and even), strides 1–3 (also not dividing the length), SAME and VALID, odd and even length."""
    _check_layer_cases(_layer_cases((7, 8)), impl)


@pytest.mark.slow
def test_conv1d_equals_lax_more_lengths(impl):
    _check_layer_cases(_layer_cases((1, 2, 3, 4, 5, 6, 9, 10, 13, 16)), impl)


def test_geometry_matches_lax_padding():
    for length, k, s, pad in _layer_cases(range(1, 12)):
        t, lo, hi = conv1d.geometry(length, k, s, pad)
        want = lax.padtype_to_pads((length,), (k,), (s,), pad)[0]
        assert (lo, hi) == tuple(want), (length, k, s, pad)
        assert t == (length + lo + hi - k) // s + 1


def test_flatten_is_row_major():
    a = jnp.arange(2 * 3 * 4, dtype=jnp.float64).reshape(2, 3, 4)  # (B, length, channels)
    z = fb.Flatten().forward({}, a)
    assert z.shape == (2, 12)
    for i, t, c in itertools.product(range(2), range(3), range(4)):
        assert z[i, t * 4 + c] == a[i, t, c]  # position-major, channels fastest
    np.testing.assert_array_equal(fb.Flatten().input_grad({}, z, (3, 4)), a)
    # In a network: the Dense weight row t·C + c multiplies position t, channel c.
    net = fb.Network((3, 4), (fb.Flatten(), fb.Dense(1)), "mse")
    w = jnp.zeros((12, 1)).at[2 * 4 + 1, 0].set(1.0)
    np.testing.assert_array_equal(fb.forward(net, [{}, {"w": w, "b": jnp.zeros(1)}], a), a[:, 2, 1:2])


# --- random conv networks: manual equals jax.grad ------------------------------------------------
HEADS = (
    ("identity", "mse"), ("sigmoid", "mse"), ("tanh", "mse"), ("softmax", "mse"),
    ("softmax", "cross_entropy"), ("sigmoid", "binary_cross_entropy"),
)
FAST_CASES = 8  # every activation (8), head (6), kernel (7), stride (3), padding, depth, B = 1
CASES_PER_PROGRAM = 8
SLOW_CASES = 200


def random_case(i: int):
    """Network, parameters, batch and keywords of case i (seeded; factors rotate with i)."""
    rng = np.random.default_rng(1000 + i)
    hidden = fb.HIDDEN_ACTIVATIONS[i % 8]
    output, loss = HEADS[i % 6]
    kernel, stride, padding = 1 + i % 7, 1 + i % 3, conv1d.PADDINGS[i % 2]
    length = 2 * int(rng.integers(kernel // 2 + 3, 10)) + (i // 2) % 2  # odd and even
    channels = int(rng.integers(1, 4))
    layers = [fb.Conv1D(int(rng.integers(1, 4)), kernel, stride, padding, hidden)]
    shape = layers[0].output_shape((length, channels))
    for _ in range((i // 3) % 3):  # 1–3 conv layers
        k, s = int(rng.integers(1, 8)), int(rng.integers(1, 4))
        pad = "SAME" if k > shape[0] else conv1d.PADDINGS[int(rng.integers(0, 2))]
        layers.append(fb.Conv1D(int(rng.integers(1, 4)), k, s, pad, hidden))
        shape = layers[-1].output_shape(shape)
    layers.append(fb.Flatten())
    dropout = 0.3 if i % 4 == 3 else 0.0
    if dropout or rng.integers(0, 2):
        layers.append(fb.Dense(int(rng.integers(2, 5)), hidden))
    n_out = int(rng.integers(2, 4))
    layers.append(fb.Dense(n_out, output))
    net = fb.Network((length, channels), tuple(layers), loss)
    batch = (1, 2, 5)[i % 3]
    params = jax.tree.map(jnp.asarray, _numpy_params(net, rng))
    x = jnp.asarray(rng.normal(size=(batch, length, channels)))
    if loss == "cross_entropy":
        y = jnp.asarray(rng.integers(0, n_out, size=batch))
    else:
        y = rng.uniform(0.05, 0.95, size=(batch, n_out))
        y = jnp.asarray(y / y.sum(1, keepdims=True) if output == "softmax" else y)
    kw = {"l1": 0.01, "l2": 0.1} if i % 3 == 2 else {}
    if dropout:
        kw.update(dropout=dropout, key=jax.random.key(i))
    return net, (params, x, y), kw


def _numpy_params(net, rng):
    """N(0, 1/fan_in) weights and N(0, 0.1) biases, drawn with NumPy (no per-shape compiles)."""
    out = []
    for layer, shape in zip(net.layers, net.shapes):
        p_shapes = layer.param_shapes(shape)
        if not p_shapes:
            out.append({})
            continue
        fan_in = layer.fans(shape)[0]
        out.append({"w": rng.normal(size=p_shapes["w"]) / np.sqrt(fan_in),
                    "b": 0.1 * rng.normal(size=p_shapes["b"])})
    return out


@jax.jit(static_argnums=(0, 1, 2), compiler_options=FAST_COMPILE)
def _manual_and_autodiff(nets, kws, impl, batches, keys):
    """(manual_grad, autodiff_grad) of every case; the keywords other than the (array) key are
    static."""
    del impl  # static: one trace per implementation
    return [
        (fb.manual_grad(n, *b, key=k, **dict(kw)), fb.autodiff_grad(n, *b, key=k, **dict(kw)))
        for n, kw, b, k in zip(nets, kws, batches, keys)
    ]


def _check_cases(indices, impl="unfold"):
    cases = [random_case(i) for i in indices]
    nets = tuple(c[0] for c in cases)
    kws = tuple(tuple((k, v) for k, v in c[2].items() if k != "key") for c in cases)
    results = _manual_and_autodiff(nets, kws, impl, [c[1] for c in cases],
                                   [c[2].get("key") for c in cases])
    for i, net, (manual, auto) in zip(indices, nets, results):
        assert_close(manual, auto, RTOL64, f"case {i} {impl}: {net}")


def test_fast_cases_cover_every_factor():
    seen = {k: set() for k in ("hidden", "head", "kernel", "stride", "padding", "batch",
                               "parity", "depth", "dropout", "penalty")}
    for i in range(FAST_CASES):
        net, (_, x, _), kw = random_case(i)
        convs = [l for l in net.layers if isinstance(l, fb.Conv1D)]
        seen["hidden"].add(convs[0].activation)
        seen["head"].add((net.output, net.loss))
        seen["kernel"].add(convs[0].kernel)
        seen["stride"].add(convs[0].stride)
        seen["padding"].add(convs[0].padding)
        seen["batch"].add(x.shape[0])
        seen["parity"].add(x.shape[1] % 2)
        seen["depth"].add(len(convs))
        seen["dropout"].add("dropout" in kw)
        seen["penalty"].add("l1" in kw)
    assert seen["hidden"] == set(fb.HIDDEN_ACTIVATIONS) and seen["head"] == set(HEADS)
    assert seen["kernel"] == set(range(1, 8)) and seen["stride"] == {1, 2, 3}
    assert seen["padding"] == {"SAME", "VALID"} and seen["batch"] == {1, 2, 5}
    assert seen["parity"] == {0, 1} and seen["depth"] == {1, 2, 3}
    assert seen["dropout"] == seen["penalty"] == {False, True}


def _chunks(start, stop):
    return [tuple(range(i, min(i + CASES_PER_PROGRAM, stop)))
            for i in range(start, stop, CASES_PER_PROGRAM)]


@pytest.mark.parametrize("indices", _chunks(0, FAST_CASES), ids=lambda c: f"cases{c[0]}-{c[-1]}")
def test_manual_equals_autodiff_conv_networks(indices):
    _check_cases(indices)


@pytest.mark.slow
@pytest.mark.parametrize("indices", _chunks(FAST_CASES, SLOW_CASES), ids=lambda c: f"cases{c[0]}-{c[-1]}")
def test_manual_equals_autodiff_conv_networks_slow(indices):
    _check_cases(indices)


def test_manual_equals_autodiff_with_lax_convolutions(monkeypatch):
    monkeypatch.setenv("FNBACKPROP_CONV1D", "lax")
    _check_cases((0, 3, 5, 6), "lax")  # strides 1–3, both paddings, depth 1–3


@pytest.mark.slow
def test_manual_equals_autodiff_with_lax_convolutions_slow(monkeypatch):
    monkeypatch.setenv("FNBACKPROP_CONV1D", "lax")
    for indices in _chunks(0, 48):
        _check_cases(indices, "lax")


def test_float32_conv_network():
    net = fb.Network((20, 1), (fb.Conv1D(4, 5, activation="relu"), fb.Conv1D(4, 5, 2, activation="relu"),
                               fb.Flatten(), fb.Dense(10, "softmax")), "cross_entropy")
    params = fb.init(jax.random.key(0), net, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (8, 20, 1), jnp.float32)
    y = jnp.arange(8) % 10
    both = jax.jit(lambda p: (fb.manual_grad(net, p, x, y), fb.autodiff_grad(net, p, x, y)),
                   compiler_options=FAST_COMPILE)
    manual, auto = both(params)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(manual))
    assert_close(manual, auto, 1e-4, "float32")


# --- no autodiff in the hand-derived path ------------------------------------------------------
def test_manual_grad_runs_no_autodiff(monkeypatch, impl):
    net, (params, x, y), _ = random_case(7)

    def forbidden(*args, **kwargs):
        raise AssertionError("autodiff called")

    for name in ("grad", "value_and_grad", "vjp", "jvp", "linear_transpose", "linearize"):
        monkeypatch.setattr(jax, name, forbidden)
    fresh = jax.jit(compiler_options=FAST_COMPILE)(lambda p, x, y: (  # traced now, patched
        fb.manual_grad(net, p, x, y, l2=0.1, dropout=0.2, key=jax.random.key(0)),
        fb.per_example_grads(net, p, x, y),
        fb.clipped_grad(net, p, x, y, 0.5, per_layer=True, noise_multiplier=1.0,
                        key=jax.random.key(1)),
    ))
    jax.block_until_ready(fresh(params, x, y))
    with pytest.raises(AssertionError, match="autodiff called"):  # the probe does work
        jax.jit(lambda p: fb.autodiff_grad(net, p, x, y))(params)


# --- a wrong convolution backward is caught ------------------------------------------------------
class _UnflippedConv1D(fb.Conv1D):
    """Mutation: the transposed convolution with the kernel not flipped."""

    def input_grad(self, p, delta, input_shape):
        flipped = {"w": jnp.flip(p["w"], axis=0), "b": p["b"]}
        return super().input_grad(flipped, delta, input_shape)


class _UndilatedConv1D(fb.Conv1D):
    """Mutation: δ not dilated by the stride (the taps of consecutive outputs land next to each
    other instead of a stride apart)."""

    def input_grad(self, p, delta, input_shape):
        length, c_in = input_shape
        one = fb.Conv1D(self.channels, self.kernel, 1, "VALID")
        span = delta.shape[1] + self.kernel - 1
        g = one.input_grad(p, delta, (span, c_in))
        return jnp.pad(g, ((0, 0), (0, max(length - span, 0)), (0, 0)))[:, :length]


@pytest.mark.parametrize("mutant", [_UnflippedConv1D, _UndilatedConv1D])
def test_wrong_conv_backward_is_caught(mutant):
    net = fb.Network((16, 2), (fb.Conv1D(3, 3, 1, "SAME", "tanh"), fb.Conv1D(3, 4, 2, "SAME", "tanh"),
                               fb.Flatten(), fb.Dense(3, "softmax")), "cross_entropy")
    rng = np.random.default_rng(0)
    params = jax.tree.map(jnp.asarray, _numpy_params(net, rng))
    x, y = jnp.asarray(rng.normal(size=(4, 16, 2))), jnp.array([0, 1, 2, 1])

    def grad_fn(net, params, x, y, **kw):
        layers = tuple(mutant(*dataclasses_astuple(l)) if isinstance(l, fb.Conv1D) else l
                       for l in net.layers)
        return fb.manual_grad(fb.Network(net.input_shape, layers, net.loss), params, x, y, **kw)

    report = fb.check_gradients(net, params, x, y, grad_fn=grad_fn, max_fd_per_param=16)
    assert not report.passed
    # The mutation is in δ → ∂a: the layers below the second convolution fail, the rest pass.
    assert {(r.layer, r.param): r.passed for r in report.rows} == {
        (1, "w"): False, (1, "b"): False, (2, "w"): True, (2, "b"): True,
        (4, "w"): True, (4, "b"): True}


def dataclasses_astuple(layer):
    return (layer.channels, layer.kernel, layer.stride, layer.padding, layer.activation)
