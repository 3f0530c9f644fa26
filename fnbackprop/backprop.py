"""The hand-derived backward pass (no JAX autodiff) and its autodiff reference.

With the forward trace ``z^l``, ``a^l`` (see :func:`fnbackprop.network.forward_trace`):

* ``δ^L = ∂L/∂a^L ⊙ f'(z^L)``, or ``a^L − y`` for the fused softmax + cross-entropy and
  sigmoid + binary cross-entropy heads;
* ``δ^l = (δ^{l+1} W^{l+1 ᵀ}) ⊙ m^l ⊙ f'(z^l)`` (``m^l``: the scaled dropout mask, if any);
* ``∂L/∂W^l = a^{l−1 ᵀ} δ^l`` (+ ``l1 sign(W) + l2 W``), ``∂L/∂b^l = Σ_batch δ^l``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnbackprop.losses import (
    check_regularisation,
    loss,
    output_delta,
    penalty_grad,
    prepare_targets,
)
from fnbackprop.network import (
    MLP,
    ForwardTrace,
    Params,
    check_inputs,
    check_params,
    dropout_masks,
    forward_trace,
)

__all__ = ["Backward", "backward", "manual_grad", "autodiff_grad", "grads_from_backward"]


class Backward(NamedTuple):
    """The forward trace and the per-example deltas of one backward pass.

    Attributes:
      trace: the :class:`~fnbackprop.network.ForwardTrace`.
      delta: per-example ``δ_i^l = ∂ℓ_i/∂z_i^l`` for l = 1..L, each ``(B, n_l)``. These are
        the deltas of the *summed* loss Σ_i ℓ_i; the batch mean's deltas are these / B.
    """

    trace: ForwardTrace
    delta: tuple[jax.Array, ...]


def backward(
    net: MLP,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    *,
    dropout: float = 0.0,
    key: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> Backward:
    """Forward pass, then the δ recursion from the output layer down to layer 1.

    Args:
      net: the network.
      params: its parameters.
      x: inputs ``(B, n_0)``.
      y: targets (see :func:`fnbackprop.losses.prepare_targets`).
      dropout: inverted-dropout rate of the hidden layers.
      key: PRNG key of the dropout masks.

    Returns:
      A :class:`Backward` with per-example deltas.
    """
    return _backward(net, params, x, y, dropout, key, mean=False, weights=weights)


def _backward(net, params, x, y, dropout, key, *, mean: bool, weights=None) -> Backward:
    """:func:`backward`; with ``mean=True`` the deltas of the batch mean (per-example / B).

    The recursion is linear in δ, so scaling δ^L by 1/B once scales every δ^l: cheaper than
    rescaling each layer's δ afterwards (an extra pass over a ``(B, n_l)`` array per layer,
    which ``jax.grad`` does not do either).
    """
    check_params(net, params)
    check_inputs(net, x)
    dtype = params[0]["w"].dtype
    y = prepare_targets(net, y, x.shape[0], dtype)  # checked before any work
    masks = dropout_masks(net, key, dropout, x.shape[0], dtype)
    trace = forward_trace(net, params, x, masks)
    delta = output_delta(net, trace.z[-1], trace.a[-1], y)
    if mean:
        delta = delta * jnp.asarray(1.0 / x.shape[0], dtype)
    if weights is not None:
        delta = delta * jnp.asarray(weights, dtype)[:, None]
    deltas = [delta]
    for l in range(net.num_layers - 1, 0, -1):  # hidden layers L-1 .. 1
        g = delta @ params[l]["w"].T  # ∂/∂a^l: (B, n_{l+1}) @ (n_{l+1}, n_l)
        if masks is not None:
            g = g * masks[l - 1]
        delta = net.activation(l).backward(trace.z[l - 1], trace.h[l - 1], g)
        deltas.append(delta)
    return Backward(trace, tuple(reversed(deltas)))


def manual_grad(
    net: MLP,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    *,
    l1: float = 0.0,
    l2: float = 0.0,
    dropout: float = 0.0,
    key: jax.Array | None = None,
) -> Params:
    """Gradient of :func:`fnbackprop.loss` with respect to ``params``, by the δ recursion.

    Same arguments as :func:`fnbackprop.loss`. Pure and jit-compatible
    (``jax.jit(manual_grad, static_argnums=0)``); uses no JAX autodiff.

    Returns:
      A pytree like ``params``: ``{"w": a^{l−1 ᵀ} δ^l / B + l1 sign(w) + l2 w, "b": Σ δ^l / B}``
      (the penalty term is left out when ``l1`` and ``l2`` are concrete zeros).
    """
    check_regularisation(l1, l2)
    bw = _backward(net, params, x, y, dropout, key, mean=True)  # δ of the batch mean
    return grads_from_backward(params, bw, l1=l1, l2=l2)


def grads_from_backward(
    params: Params, bw: Backward, *, scale: float | None = None, l1: float = 0.0, l2: float = 0.0
) -> Params:
    """The parameter gradient from a backward pass: ``∂W^l = a^{l−1 ᵀ} (s·δ^l) + l1 sign(W) + l2 W``,
    ``∂b^l = Σ_batch s·δ^l``.

    Args:
      params: the parameters (for the penalty term).
      bw: a :class:`Backward`.
      scale: ``s``; ``None`` for 1. With the per-example deltas of :func:`backward`, ``1/B``
        gives :func:`manual_grad` (e.g. for a training step that also needs those deltas).
      l1, l2: penalty strengths; the term is left out when both are concrete zeros.

    Returns:
      A pytree like ``params``.
    """
    penalised = not (_is_concrete_zero(l1) and _is_concrete_zero(l2))
    grads = []
    for p, a_prev, delta in zip(params, bw.trace.a[:-1], bw.delta):
        if scale is not None:
            delta = delta * jnp.asarray(scale, delta.dtype)
        dw = a_prev.T @ delta
        if penalised:
            dw = dw + penalty_grad(p["w"], l1, l2)
        grads.append({"w": dw, "b": jnp.sum(delta, axis=0)})
    return grads


def _is_concrete_zero(v) -> bool:
    """Whether ``v`` is a concrete (not traced) zero: its penalty term can be left out."""
    return not isinstance(v, jax.core.Tracer) and bool(np.all(np.asarray(v) == 0))


def autodiff_grad(
    net: MLP,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    *,
    l1: float = 0.0,
    l2: float = 0.0,
    dropout: float = 0.0,
    key: jax.Array | None = None,
) -> Params:
    """The reference: ``jax.grad`` of :func:`fnbackprop.loss` with respect to ``params``."""
    return jax.grad(
        lambda p: loss(net, p, x, y, l1=l1, l2=l2, dropout=dropout, key=key)
    )(params)
