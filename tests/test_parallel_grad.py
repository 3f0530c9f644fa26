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


def _summed_grad(net):
    """The gradient of the summed loss of the rows given: the devices' shares add up."""
    return lambda p, x, y: jax.tree.map(lambda g: g * x.shape[0], fb.manual_grad(net, p, x, y))


@pytest.mark.parametrize("n_devices", [2, 8])
def test_sharded_manual_grad_equals_single_device(n_devices):
    net, params, x, y = _problem()
    mesh = parallel.data_mesh(jax.devices()[:n_devices])
    f = jax.jit(parallel.sharded(lambda p, x, y: fb.manual_grad(net, p, x, y), mesh))
    g = f(parallel.replicate(mesh, params), x, y)
    assert len(jax.tree.leaves(g)[0].sharding.device_set) == n_devices
    _assert_tree_close(g, fb.manual_grad(net, params, x, y))
    _assert_tree_close(g, fb.autodiff_grad(net, params, x, y), rtol=1e-10)


def test_sharding_splits_a_batch_the_devices_do_not_divide():
    net, params, x, y = _problem(batch=10)
    mesh = parallel.data_mesh(jax.devices()[:8])
    f = jax.jit(parallel.sharded(lambda p, x, y: fb.manual_grad(net, p, x, y), mesh))
    # The whole batch is on every device (as the training set is); inside the jit each device
    # computes on its rows of the 10: XLA splits them unevenly.
    _assert_tree_close(f(*parallel.replicate(mesh, (params, x, y))),
                       fb.manual_grad(net, params, x, y))


def test_pmap_summed_gradients_equal_single_device():
    net, params, x, y = _problem(batch=24)
    d = 8
    f = jax.pmap(parallel.summed_over_devices(_summed_grad(net)),
                 axis_name=parallel.DATA_AXIS, in_axes=(None, 0, 0))
    g = f(params, x.reshape(d, -1, x.shape[1]), y.reshape(d, -1))
    mean = jax.tree.map(lambda v: v[0] / x.shape[0], g)  # Σ over the 24 rows → the batch mean
    _assert_tree_close(mean, fb.manual_grad(net, params, x, y))
    # every device holds the same all-reduced gradient
    for leaf in jax.tree.leaves(g):
        np.testing.assert_array_equal(np.asarray(leaf), np.broadcast_to(np.asarray(leaf[0]), leaf.shape))


def test_pmap_needs_a_divisible_batch_naming_both_numbers():
    with pytest.raises(ValueError, match=r"10.*8"):
        parallel.check_divisible(10, 8)


@pytest.mark.parametrize("coordinator, n, i", [("localhost", 2, 0), ("h:1", 0, 0), ("h:1", 2, 2), ("h:99999", 1, 0)])
def test_initialize_distributed_rejects_bad_arguments(coordinator, n, i):
    with pytest.raises(ValueError):
        parallel.initialize_distributed(coordinator, n, i)
