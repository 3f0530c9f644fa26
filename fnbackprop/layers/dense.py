"""The dense layer, its backward rule beside its forward rule, and the rule ∂W = aᵀδ.

On a batch of row vectors ``a`` ``(B, n_in)``:

* forward: ``z = a W + b`` with ``W`` ``(n_in, n_out)`` (the transpose of the textbook's
  ``w_jk``, so that a batch multiplies from the left) and ``b`` ``(n_out,)``;
* backward, given ``δ = ∂L/∂z`` ``(B, n_out)``: ``∂L/∂a = δ Wᵀ``,
  ``∂L/∂W = aᵀ δ = Σ_i a_i δ_iᵀ`` (:func:`weight_grad`), ``∂L/∂b = Σ_i δ_i``;
* per example: ``∂ℓ_i/∂W = a_i δ_iᵀ``, an outer product with
  ``‖a_i δ_iᵀ‖_F² = ‖a_i‖² ‖δ_i‖²`` (:func:`weight_grad_norm_sq` with one position, T = 1).

:func:`weight_grad` is the only place where deltas become a weight gradient: the batch gradient,
the per-example gradients (the same function on a batch of one, under ``vmap``) and the clipped
sums (the same function on ``c ⊙ δ``) all call it, and a convolution calls it on its windows.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from fnbackprop.activations import OUTPUT_ACTIVATIONS

__all__ = ["Dense", "weight_grad", "per_example_weight_grads", "weight_grad_norm_sq",
           "view_norm_sq", "NORM_METHODS", "check_int"]

NORM_METHODS: tuple[str, ...] = ("ghost", "materialised")
"""How a per-example weight-gradient norm is computed (see :func:`weight_grad_norm_sq`)."""


def check_int(layer: str, field: str, v, minimum: int = 1) -> int:
    """``v`` as an ``int`` ≥ ``minimum``; ``ValueError`` naming the layer, the field and ``v``."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ValueError(f"{layer}: {field} must be an integer ≥ {minimum}, got {v!r}")
    return int(v)


def weight_grad(a: jax.Array, delta: jax.Array) -> jax.Array:
    """``aᵀ δ = Σ_n a_n δ_nᵀ``: the weight gradient of ``z = a W`` from ``a`` ``(N, p)`` and
    ``δ`` ``(N, d)``; ``(p, d)``. N runs over the examples (and, for a convolution, over the
    positions of every example)."""
    return a.T @ delta


def per_example_weight_grads(u: jax.Array, delta: jax.Array) -> jax.Array:
    """``G_i = Σ_t u_{i,t} δ_{i,t}ᵀ`` for every example: :func:`weight_grad` on each example
    alone, from ``u`` ``(B, T, p)`` and ``δ`` ``(B, T, d)``; ``(B, p, d)``."""
    return jax.vmap(weight_grad)(u, delta)


def weight_grad_norm_sq(
    u: jax.Array, delta: jax.Array, method: Literal["ghost", "materialised"] = "ghost"
) -> jax.Array:
    """Squared Frobenius norms ``‖G_i‖²`` of the per-example weight gradients
    ``G_i = Σ_t u_{i,t} δ_{i,t}ᵀ``, from inputs ``u`` ``(B, T, p)`` and deltas ``δ``
    ``(B, T, d)`` (T positions per example; a dense layer has T = 1).

    * ``"ghost"``: ``‖G_i‖² = Σ_{t,s} (u_{i,t}·u_{i,s}) (δ_{i,t}·δ_{i,s})``, the sum of the
      elementwise product of the two T × T Gram matrices, never forming ``G_i``; for T = 1 this
      is ``‖u_i‖² ‖δ_i‖²``.
    * ``"materialised"``: ``G_i`` from :func:`weight_grad` on example i alone (``vmap``), then
      its squared entries summed: p·d numbers per example instead of T².

    Returns:
      ``(B,)``.
    """
    if method not in NORM_METHODS:
        raise ValueError(f"unknown norm method {method!r}; allowed: {', '.join(NORM_METHODS)}")
    if method == "materialised":
        g = per_example_weight_grads(u, delta)
        return jnp.sum(g * g, axis=(1, 2))
    if u.shape[1] == 1:
        return jnp.sum(u * u, axis=(1, 2)) * jnp.sum(delta * delta, axis=(1, 2))
    gram_u = jnp.einsum("btp,bsp->bts", u, u)
    gram_d = jnp.einsum("btd,bsd->bts", delta, delta)
    return jnp.sum(gram_u * gram_d, axis=(1, 2))


@dataclasses.dataclass(frozen=True)
class Dense:
    """A fully connected layer: ``z = a W + b``, then the activation. Frozen and hashable.

    Attributes:
      units: output width n_out ≥ 1.
      activation: one of :data:`fnbackprop.OUTPUT_ACTIVATIONS` (``"softmax"`` only as the last
        layer).

    Takes a flat ``(n_in,)`` input per example; after a :class:`~fnbackprop.Conv1D`, put a
    :class:`~fnbackprop.Flatten` first. Parameters: ``{"w": (n_in, n_out), "b": (n_out,)}``.
    """

    units: int
    activation: str = "identity"

    def __post_init__(self):
        object.__setattr__(self, "units", check_int("Dense", "units", self.units))
        if self.activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"Dense: unknown activation {self.activation!r}; allowed: "
                f"{', '.join(OUTPUT_ACTIVATIONS)}"
            )

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(units,)``; ``ValueError`` unless the input is flat ``(n_in,)``."""
        if len(input_shape) != 1:
            raise ValueError(
                f"Dense({self.units}) needs a flat (n_in,) input, got {input_shape}: put a "
                "Flatten() before it"
            )
        return (self.units,)

    def param_shapes(self, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {"w": (input_shape[0], self.units), "b": (self.units,)}

    def fans(self, input_shape: tuple[int, ...]) -> tuple[int, int]:
        """(fan-in, fan-out) for the initialisation schemes: ``(n_in, n_out)``."""
        return input_shape[0], self.units

    # --- forward rule -------------------------------------------------- backward rules ------
    def forward(self, p: dict[str, jax.Array], a: jax.Array) -> jax.Array:
        """``z = a W + b``: ``(B, n_in) -> (B, n_out)``."""
        return a @ p["w"] + p["b"][None, :]

    def input_grad(
        self, p: dict[str, jax.Array], delta: jax.Array, input_shape: tuple[int, ...]
    ) -> jax.Array:
        """``∂L/∂a = δ Wᵀ``: ``(B, n_out) -> (B, n_in)``."""
        del input_shape
        return delta @ p["w"].T

    def grads(self, a: jax.Array, delta: jax.Array) -> dict[str, jax.Array]:
        """``{"w": aᵀ δ, "b": Σ_i δ_i}``, summed over the batch."""
        return {"w": weight_grad(a, delta), "b": jnp.sum(delta, axis=0)}

    def dense_view(self, a: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(u, d)`` ``(B, 1, n_in)``, ``(B, 1, n_out)``: one position per example, so that
        ``∂ℓ_i/∂W = Σ_t u_{i,t} d_{i,t}ᵀ`` and ``∂ℓ_i/∂b = Σ_t d_{i,t}``."""
        return a[:, None, :], delta[:, None, :]

    def norm_method(self, input_shape: tuple[int, ...]) -> str:
        """``"ghost"``: ``‖a_i‖² ‖δ_i‖²`` is never more expensive than forming ``a_i δ_iᵀ``."""
        del input_shape
        return "ghost"

    def norm_sq(self, a: jax.Array, delta: jax.Array, method: str | None = None) -> jax.Array:
        """Per-example ``‖∂ℓ_i/∂W‖² + ‖∂ℓ_i/∂b‖² = (‖a_i‖² + 1) ‖δ_i‖²``: ``(B,)``."""
        return view_norm_sq(*self.dense_view(a, delta), method or "ghost")


def view_norm_sq(u: jax.Array, d: jax.Array, method: str) -> jax.Array:
    """Per-example ``‖G_i‖² + ‖Σ_t d_{i,t}‖²`` (weights and biases) from a layer's dense view
    ``(u, d)``: ``(B,)``."""
    d_b = jnp.sum(d, axis=1)  # ∂ℓ_i/∂b
    return weight_grad_norm_sq(u, d, method) + jnp.sum(d_b * d_b, axis=1)
