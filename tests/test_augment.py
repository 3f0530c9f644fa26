"""On-device augmentation (fnbackprop.training.augmentation): shapes, determinism, scale, shifts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fnbackprop.training import augmentation as A
from fnbackprop.training.augmentation import augment


def test_augment_none_is_identity():
    x = jnp.ones((3, 4), jnp.float32)
    assert augment(jax.random.key(0), x, "none", None) is x


@pytest.mark.parametrize("kind,shape,d", [("noise", None, 5), ("shift_noise", (8, 8), 64),
                                          ("shift_noise", (40,), 40)])
def test_augment_shape_dtype_determinism(kind, shape, d):
    x = jax.random.normal(jax.random.key(1), (16, d), jnp.float32)
    f = jax.jit(augment, static_argnums=(2, 3))
    a = f(jax.random.key(2), x, kind, shape)
    b = f(jax.random.key(2), x, kind, shape)
    c = f(jax.random.key(3), x, kind, shape)
    assert a.shape == x.shape and a.dtype == jnp.float32
    assert jnp.array_equal(a, b) and not jnp.array_equal(a, c) and not jnp.array_equal(a, x)


def test_augment_inside_scan_matches_eager_calls():
    x = jax.random.normal(jax.random.key(1), (4, 64), jnp.float32)
    keys = jax.random.split(jax.random.key(2), 3)
    _, ys = jax.jit(lambda ks: jax.lax.scan(
        lambda carry, k: (carry, augment(k, x, "shift_noise", (8, 8))), 0, ks))(keys)
    assert ys.shape == (3, 4, 64)
    np.testing.assert_allclose(ys[1], augment(keys[1], x, "shift_noise", (8, 8)), rtol=1e-6)


def test_augment_noise_has_the_documented_scale():
    x = jnp.zeros((2000, 50), jnp.float32)
    out = np.asarray(augment(jax.random.key(0), x, "noise", None))
    assert abs(out.std() - A.NOISE_STD) < 0.005 and abs(out.mean()) < 0.005


def _edge_shift(img, s):
    """Reference shift with edge padding, NumPy, one example."""
    m = max(abs(v) for v in s) + 1
    padded = np.pad(img, m, mode="edge")
    idx = tuple(slice(m - v, m - v + n) for v, n in zip(s, img.shape))
    return padded[idx]


@pytest.mark.parametrize("shape", [(8, 8), (40,)])
def test_augment_shift_moves_each_example_by_a_small_offset(shape):
    d = int(np.prod(shape))
    x = np.arange(32 * d, dtype=np.float32).reshape(32, d) * 10.0
    out = np.asarray(augment(jax.random.key(4), jnp.asarray(x), "shift_noise", shape))
    m = A.MAX_SHIFT[len(shape)]
    offsets = [(a, b) for a in range(-m, m + 1) for b in range(-m, m + 1)] if len(shape) == 2 \
        else [(a,) for a in range(-m, m + 1)]
    seen = set()
    for i in range(32):
        img = x[i].reshape(shape)
        errs = [np.abs(_edge_shift(img, s).ravel() - out[i]).max() for s in offsets]
        best = int(np.argmin(errs))
        assert errs[best] < 0.5, errs[best]  # = the shifted image plus small noise
        seen.add(offsets[best])
    assert len(seen) > 3  # offsets differ between examples


def test_augment_bad_arguments():
    x = jnp.ones((2, 64), jnp.float32)
    with pytest.raises(ValueError, match="augment kind"):
        augment(jax.random.key(0), x, "rotate", None)
    with pytest.raises(ValueError, match="image_shape"):
        augment(jax.random.key(0), x, "shift_noise", None)
    with pytest.raises(ValueError, match="63 entries"):
        augment(jax.random.key(0), x, "shift_noise", (7, 9))
    with pytest.raises(ValueError, match=r"\(B, d\)"):
        augment(jax.random.key(0), jnp.ones(3), "noise", None)
