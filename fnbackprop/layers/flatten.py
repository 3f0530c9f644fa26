"""Flatten: ``(B, length, channels) -> (B, length·channels)``, row-major, and back.

Flatten has no parameters (``{}``) and no activation: its "pre-activation" z is its output, so
its delta ``∂L/∂z`` is the gradient with respect to its output, and the backward rule is the
reshape back to ``(B, length, channels)``.
"""

from __future__ import annotations

import dataclasses

import jax

__all__ = ["Flatten"]


@dataclasses.dataclass(frozen=True)
class Flatten:
    """Flattens a ``(length, channels)`` input row-major (position-major, channels fastest)."""

    activation = None  # not a field: Flatten applies no activation

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(length·channels,)``; ``ValueError`` unless the input is ``(length, channels)``."""
        if len(input_shape) != 2:
            raise ValueError(
                f"Flatten() needs a (length, channels) input, got {input_shape} (it is already flat)"
            )
        return (input_shape[0] * input_shape[1],)

    def param_shapes(self, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        del input_shape
        return {}

    def fans(self, input_shape: tuple[int, ...]) -> None:
        """No parameters, no fans."""
        del input_shape

    def forward(self, p: dict, a: jax.Array) -> jax.Array:
        """``(B, L, C) -> (B, L·C)``."""
        del p
        return a.reshape(a.shape[0], -1)

    def input_grad(self, p: dict, delta: jax.Array, input_shape: tuple[int, ...]) -> jax.Array:
        """``(B, L·C) -> (B, L, C)``."""
        del p
        return delta.reshape(delta.shape[0], *input_shape)

    def grads(self, a: jax.Array, delta: jax.Array) -> dict:
        del a, delta
        return {}
