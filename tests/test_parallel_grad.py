"""The hand-derived gradient, sharded over 8 simulated CPU devices, equals one device (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fnbackprop as fb
from fnbackprop import parallel


def _problem(batch=16, sizes=(6, 12, 9, 4), hidden="tanh"):
    net = fb.MLP(sizes, hidden, "softmax", "cross_entropy")
    params = fb.init(jax.random.key(0), net, "xavier_normal", dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (batch, sizes[0]), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, sizes[-1])
    return net, params, x, y


def _assert_tree_close(a, b, rtol=1e-12):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=1e-15)


def test_eight_devices_available():
    assert jax.device_count() == 8


@pytest.mark.parametrize("n_devices", [2, 8])
def test_sharded_manual_grad_equals_single_device(n_devices):
    net, params, x, y = _problem()
    mesh = parallel.data_mesh(jax.devices()[:n_devices])
    xs, ys = parallel.shard_batch(mesh, x), parallel.shard_batch(mesh, y)
    assert len(xs.sharding.device_set) == n_devices
    g = parallel.sharded_grad(fb.manual_grad, mesh)(net, parallel.replicate(mesh, params), xs, ys)
    _assert_tree_close(g, fb.manual_grad(net, params, x, y))
    _assert_tree_close(g, fb.autodiff_grad(net, params, x, y), rtol=1e-10)


def test_pmap_manual_grad_pmean_equals_single_device():
    net, params, x, y = _problem(batch=24)
    d = 8
    f = parallel.pmap_grad(fb.manual_grad, net, l2=0.01)
    rep = parallel.stack_for_pmap(params, d)
    g = f(rep, x.reshape(d, -1, x.shape[1]), y.reshape(d, -1))
    g0 = jax.tree.map(lambda v: v[0], g)
    _assert_tree_close(g0, fb.manual_grad(net, params, x, y, l2=0.01))
    # every device holds the same all-reduced gradient
    for leaf in jax.tree.leaves(g):
        np.testing.assert_array_equal(np.asarray(leaf), np.broadcast_to(np.asarray(leaf[0]), leaf.shape))


def test_indivisible_batch_is_refused_naming_both_numbers():
    net, params, x, y = _problem(batch=10)
    mesh = parallel.data_mesh(jax.devices()[:8])
    with pytest.raises(ValueError, match=r"10.*8"):
        parallel.shard_batch(mesh, x)


@pytest.mark.parametrize("coordinator, n, i", [("localhost", 2, 0), ("h:1", 0, 0), ("h:1", 2, 2), ("h:99999", 1, 0)])
def test_initialize_distributed_rejects_bad_arguments(coordinator, n, i):
    with pytest.raises(ValueError):
        parallel.initialize_distributed(coordinator, n, i)
