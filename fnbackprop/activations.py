"""Activation functions, each forward rule beside its backward rule.

Every activation is an :class:`Activation` with

* ``fn(z) -> a``: the forward rule, applied to pre-activations ``z`` of shape ``(B, n)``;
* ``backward(z, a, g) -> delta``: the vector-Jacobian product ``g · ∂a/∂z`` for an upstream
  gradient ``g = ∂L/∂a`` of shape ``(B, n)``. For element-wise activations this is
  ``g ⊙ f'(z)`` (the ⊙ f'(z^l) of the δ recursion); softmax couples the units of a row and uses
  its Jacobian ``diag(a) − a aᵀ``.

No JAX autodiff is used here: every derivative is written out by hand.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import MappingProxyType
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import erf

__all__ = [
    "Activation",
    "ACTIVATIONS",
    "HIDDEN_ACTIVATIONS",
    "OUTPUT_ACTIVATIONS",
    "get_activation",
    "LEAKY_RELU_SLOPE",
    "KINKED_ACTIVATIONS",
]

LEAKY_RELU_SLOPE = 0.01


class Activation(NamedTuple):
    """A forward rule and its hand-derived backward rule.

    Attributes:
      name: the name used in :class:`fnbackprop.MLP`.
      fn: ``z (B, n) -> a (B, n)``.
      backward: ``(z, a, g) -> delta``, all ``(B, n)``: ``delta = g · ∂a/∂z``.
      derivative: ``(z, a) -> f'(z)`` for element-wise activations, ``None`` for softmax.
    """

    name: str
    fn: Callable[[jax.Array], jax.Array]
    backward: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
    derivative: Callable[[jax.Array, jax.Array], jax.Array] | None


def _elementwise(name: str, fn, derivative) -> Activation:
    """Builds an element-wise activation whose backward rule is ``g ⊙ f'(z)``."""
    return Activation(name, fn, lambda z, a, g: g * derivative(z, a), derivative)


# --- forward rule ------------------------------------------------------ derivative f'(z) -----
def _sigmoid(z):
    return jax.nn.sigmoid(z)


def _d_sigmoid(z, a):  # σ'(z) = σ(z)(1 − σ(z))
    del z
    return a * (1 - a)


def _tanh(z):
    return jnp.tanh(z)


def _d_tanh(z, a):  # tanh'(z) = 1 − tanh²(z)
    del z
    return 1 - a * a


def _relu(z):
    return jax.nn.relu(z)  # max(z, 0); propagates NaN (a where(z > 0, ...) would hide overflow)


def _d_relu(z, a):  # 1 for z > 0, else 0 (0 at the kink)
    del a
    return (z > 0).astype(z.dtype)


def _leaky_relu(z):
    return jnp.where(z >= 0, z, LEAKY_RELU_SLOPE * z)


def _d_leaky_relu(z, a):  # 1 for z ≥ 0, else the slope
    del a
    return jnp.where(z >= 0, jnp.ones_like(z), jnp.full_like(z, LEAKY_RELU_SLOPE))


def _elu(z):
    # expm1 of where(z > 0, 0, z), not of minimum(z, 0): no overflow in the branch not taken,
    # and jax.grad's derivative at z = 0 is 1 (minimum's would split the tie: 1/2).
    return jnp.where(z > 0, z, jnp.expm1(jnp.where(z > 0, jnp.zeros_like(z), z)))


def _d_elu(z, a):  # 1 for z > 0, else e^z = a + 1
    return jnp.where(z > 0, jnp.ones_like(z), a + 1)


def _softplus(z):
    return jnp.logaddexp(z, jnp.zeros_like(z))


def _d_softplus(z, a):  # softplus'(z) = σ(z)
    del a
    return jax.nn.sigmoid(z)


_INV_SQRT2 = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)


def _gelu(z):
    """Exact (erf) GELU: z Φ(z)."""
    return z * 0.5 * (1 + erf(z * _INV_SQRT2))


def _d_gelu(z, a):  # Φ(z) + z φ(z)
    del a
    return 0.5 * (1 + erf(z * _INV_SQRT2)) + z * _INV_SQRT_2PI * jnp.exp(-0.5 * z * z)


def _identity(z):
    return z


def _d_identity(z, a):
    del a
    return jnp.ones_like(z)


def _softmax(z):
    return jax.nn.softmax(z, axis=-1)


def _softmax_backward(z, a, g):  # g (diag(a) − a aᵀ) = a ⊙ (g − Σ_k g_k a_k)
    del z
    return a * (g - jnp.sum(g * a, axis=-1, keepdims=True))


ACTIVATIONS: MappingProxyType[str, Activation] = MappingProxyType(
    {
        "sigmoid": _elementwise("sigmoid", _sigmoid, _d_sigmoid),
        "tanh": _elementwise("tanh", _tanh, _d_tanh),
        "relu": _elementwise("relu", _relu, _d_relu),
        "leaky_relu": _elementwise("leaky_relu", _leaky_relu, _d_leaky_relu),
        "elu": _elementwise("elu", _elu, _d_elu),
        "softplus": _elementwise("softplus", _softplus, _d_softplus),
        "gelu": _elementwise("gelu", _gelu, _d_gelu),
        "identity": _elementwise("identity", _identity, _d_identity),
        "softmax": Activation("softmax", _softmax, _softmax_backward, None),
    }
)
"""Every activation by name (read-only)."""

HIDDEN_ACTIVATIONS: tuple[str, ...] = (
    "sigmoid", "tanh", "relu", "leaky_relu", "elu", "softplus", "gelu", "identity",
)
OUTPUT_ACTIVATIONS: tuple[str, ...] = HIDDEN_ACTIVATIONS + ("softmax",)
KINKED_ACTIVATIONS: tuple[str, ...] = ("relu", "leaky_relu", "elu")
"""Activations that are not smooth at z = 0 (relu and leaky_relu: f' jumps; elu: f'' jumps), where
a finite difference across 0 does not estimate the derivative."""


def get_activation(name: str) -> Activation:
    """Returns the activation called ``name``.

    Raises:
      ValueError: ``name`` is not one of :data:`OUTPUT_ACTIVATIONS`.
    """
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {name!r}; allowed: {', '.join(OUTPUT_ACTIVATIONS)}"
        ) from None
