"""On-device augmentation of a training batch, applied inside the compiled step.

Label-preserving perturbations of standardised inputs: shifts plus noise for signals and images
(mnist1d, digits), Gaussian noise for tabular data. Pure and jit/scan-able: the step draws one
key per batch.
"""

from __future__ import annotations

import math
from types import MappingProxyType

import jax
import jax.numpy as jnp

from fnbackprop.data import AUGMENT_KINDS

__all__ = ["augment", "AUGMENT_KINDS", "NOISE_STD", "SHIFT_NOISE_STD", "MAX_SHIFT"]

NOISE_STD = 0.1
"""Standard deviation of the Gaussian noise of ``augment(kind="noise")`` (standardised units)."""
SHIFT_NOISE_STD = 0.05
"""Standard deviation of the Gaussian noise added after the shift of ``kind="shift_noise"``."""
MAX_SHIFT: MappingProxyType = MappingProxyType({1: 3, 2: 1})
"""Largest shift in positions per axis, by image rank: ±3 for 1-D signals, ±1 pixel for 2-D."""


def augment(key: jax.Array, x: jax.Array, kind: str,
            image_shape: tuple[int, ...] | None = None) -> jax.Array:
    """Randomly perturb a batch of (standardised) inputs; pure, jit- and scan-able.

    * ``"shift_noise"``: every example is shifted by its own random integer offset along each
      axis of ``image_shape`` (±1 pixel for 2-D images such as the 8x8 digits, ±3 positions for
      1-D signals such as mnist1d; see :data:`MAX_SHIFT`), filling the vacated border by
      repeating the edge value, then Gaussian noise of std :data:`SHIFT_NOISE_STD` is added.
    * ``"noise"``: Gaussian noise of std :data:`NOISE_STD` (0.1 standardised units).
    * ``"none"``: ``x`` unchanged.

    The inputs are meant to be standardised already (augmentation happens inside a training
    step). Shifting standardised pixels moves each value to a neighbour whose mean/std differ a
    little from its own; that is not the same as standardising a shifted raw image, but it is an
    equally valid small, label-preserving perturbation, which is all augmentation needs.

    Args:
      key: PRNG key; the same key gives the same output.
      x: ``(B, d)`` floating inputs.
      kind: one of :data:`AUGMENT_KINDS`.
      image_shape: shape of one example, ``prod(image_shape) == d``; needed for
        ``"shift_noise"`` (1 or 2 axes).

    Returns:
      ``(B, d)`` array of ``x``'s dtype.
    """
    if kind not in AUGMENT_KINDS:
        raise ValueError(f"augment kind must be one of {', '.join(AUGMENT_KINDS)}; got {kind!r}")
    if kind == "none":
        return x
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"augment expects a (B, d) batch, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"augment expects floating inputs, got dtype {x.dtype}")
    k_shift, k_noise = jax.random.split(key)
    if kind == "shift_noise":
        x = _shift(k_shift, x, image_shape)
        std = SHIFT_NOISE_STD
    else:
        std = NOISE_STD
    return x + std * jax.random.normal(k_noise, x.shape, x.dtype)


def _shift(key: jax.Array, x: jax.Array, image_shape) -> jax.Array:
    if image_shape is None:
        raise ValueError("augment kind 'shift_noise' needs image_shape, e.g. (8, 8) or (40,)")
    shape = tuple(int(s) for s in image_shape)
    if len(shape) not in MAX_SHIFT or any(s < 1 for s in shape):
        raise ValueError(f"image_shape must have 1 or 2 positive sizes, got {image_shape!r}")
    b, d = x.shape
    if math.prod(shape) != d:
        raise ValueError(
            f"image_shape {shape} has {math.prod(shape)} entries but x has {d} columns"
        )
    m = MAX_SHIFT[len(shape)]
    imgs = x.reshape((b,) + shape)
    padded = jnp.pad(imgs, [(0, 0)] + [(m, m)] * len(shape), mode="edge")
    shifts = jax.random.randint(key, (b, len(shape)), -m, m + 1)

    def one(img, s):
        # output[i] = input[i - s]: a slice of the padded image starting at m - s.
        return jax.lax.dynamic_slice(img, tuple(m - s[i] for i in range(len(shape))), shape)

    return jax.vmap(one)(padded, shifts).reshape(b, d)
