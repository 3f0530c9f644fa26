"""The hand-derived backward pass (no JAX autodiff) and its autodiff reference.

With the forward trace ``z^l``, ``a^l`` (see :func:`fnbackprop.network.forward_trace`) and, for a
dense layer l, ``z^l = a^{l−1} W^l + b^l``:

* ``δ^L = ∂L/∂a^L ⊙ f'(z^L)``, or ``a^L − y`` for the fused softmax + cross-entropy and
  sigmoid + binary cross-entropy heads;
* ``δ^l = (δ^{l+1} W^{l+1 ᵀ}) ⊙ m^l ⊙ f'(z^l)`` (``m^l``: the scaled dropout mask, if any);
* ``∂L/∂W^l = a^{l−1 ᵀ} δ^l`` (+ ``l1 sign(W) + l2 W``), ``∂L/∂b^l = Σ_batch δ^l``.

Every layer type supplies the two layer-specific steps, beside its forward rule in
:mod:`fnbackprop.layers`: ``δ^{l+1} W^{l+1 ᵀ}`` becomes its ``input_grad`` (for a convolution
the transposed convolution of δ, for a Flatten a reshape) and ``a^{l−1 ᵀ} δ^l`` its ``grads``
(for a convolution ``Uᵀ δ`` over the windows U: the dense rule with the batch extended over
positions). A Flatten has no activation: its δ is the gradient with respect to its output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fnbackprop import checks
from fnbackprop.layers import Dense, Flatten, Layer
from fnbackprop.losses import (
    check_regularisation,
    loss,
    output_delta,
    penalty_grad,
    prepare_targets,
)
from fnbackprop.network import (
    AnyNet,
    ForwardTrace,
    Params,
    _forward_trace,
    check_inputs,
    check_params,
    dropout_masks,
    param_dtype,
)

__all__ = [
    "Backward",
    "backward",
    "manual_grad",
    "autodiff_grad",
    "grads_from_backward",
    "layer_grads",
]


class Backward(NamedTuple):
    """The forward trace and the deltas of one backward pass.

    Attributes:
      trace: the :class:`~fnbackprop.network.ForwardTrace`.
      delta: ``δ^l = ∂/∂z^l`` for l = 1..L, one per layer, each shaped like ``trace.z[l − 1]``
        (for a Flatten: the gradient with respect to its output). Without weights, the
        per-example ``δ_i^l = ∂ℓ_i/∂z_i^l`` of the *summed* loss Σ_i ℓ_i (the batch mean's
        deltas are these / B); with weights, those of Σ_i w_i ℓ_i.
    """

    trace: ForwardTrace
    delta: tuple[jax.Array, ...]


def backward(
    net: AnyNet,
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
      x: inputs ``(B, *net.input_shape)``.
      y: targets (see :func:`fnbackprop.losses.prepare_targets`; prepared ``(B, n_L)`` targets
        pass through unchanged, which is how a jitted step avoids the label guard).
      dropout: inverted-dropout rate of the hidden Dense layers.
      key: PRNG key of the dropout masks.
      weights: optional ``(B,)`` per-example weights w_i: the deltas are then those of
        Σ_i w_i ℓ_i (δ_i^L scaled by w_i once; the recursion is linear). A multiplication:
        a zero weight does not hide a non-finite example (see the ``mask`` of
        :func:`fnbackprop.clipped_grad` for that).

    Returns:
      A :class:`Backward`.

    Traced arguments: see :func:`fnbackprop.loss`.
    """
    check_params(net, params)
    check_inputs(net, x)
    batch = x.shape[0]
    if weights is not None:
        checks.check_numeric(weights, "weights", f"a ({batch},) array of numbers")
        if jnp.shape(weights) != (batch,):
            raise ValueError(f"weights must have shape ({batch},), got {jnp.shape(weights)}")
    dtype = param_dtype(params)
    y = prepare_targets(net, y, batch, dtype)  # checked before any work
    masks = dropout_masks(net, key, dropout, batch, dtype)
    scale = None if weights is None else jnp.asarray(weights, dtype)
    return _backward(net, params, x, y, masks, scale)


def _backward(net: AnyNet, params: Params, x, y, masks, scale) -> Backward:
    """:func:`backward` on prepared targets, without the checks.

    ``scale``: ``None``, a scalar or ``(B,)`` factors of δ^L. The recursion is linear in δ, so
    scaling δ^L once scales every δ^l: cheaper than rescaling each layer's δ afterwards (an
    extra pass over every delta, which ``jax.grad`` does not do either).
    """
    trace = _forward_trace(net, params, x, masks)
    delta = output_delta(net, trace.z[-1], trace.a[-1], y)
    if scale is not None:
        delta = delta * (scale[:, None] if jnp.ndim(scale) == 1 else scale)
    deltas = [delta]
    for l in range(net.num_layers - 1, 0, -1):  # layers L-1 .. 1 (1-based)
        g = net.layers[l].input_grad(params[l], delta, net.shapes[l])  # ∂/∂a^l
        mask = masks[l - 1] if masks is not None else None
        if mask is not None:
            g = g * mask
        act = net.activation(l)
        delta = g if act is None else act.backward(trace.z[l - 1], trace.h[l - 1], g)
        deltas.append(delta)
    return Backward(trace, tuple(reversed(deltas)))


def manual_grad(
    net: AnyNet,
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

    Traced arguments: a negative or non-finite ``l1``/``l2`` or a dropout rate outside [0, 1)
    makes every entry NaN; a traced label outside [0, K) makes the gradient NaN.
    """
    check_regularisation(l1, l2)
    check_params(net, params)
    check_inputs(net, x)
    batch = x.shape[0]
    dtype = param_dtype(params)
    y = prepare_targets(net, y, batch, dtype)
    masks = dropout_masks(net, key, dropout, batch, dtype)
    bw = _backward(net, params, x, y, masks, jnp.asarray(1.0 / batch, dtype))  # δ of the mean
    return grads_from_backward(params, bw, l1=l1, l2=l2, net=net)


def layer_grads(layers: Sequence[Layer], inputs, deltas) -> Params:
    """Each layer's parameter gradient summed over the batch, from its inputs ``a^{l−1}`` and
    deltas ``δ^l`` (``{}`` for a Flatten): the one place where deltas become gradients (every
    layer's ``grads`` goes through :func:`fnbackprop.layers.weight_grad`)."""
    return [layer.grads(a, d) for layer, a, d in zip(layers, inputs, deltas)]


def _dense_layers(params: Params) -> tuple[Layer, ...]:
    """The layers of an all-dense network (Flatten allowed), read off its parameters."""
    layers = []
    for l, p in enumerate(params, start=1):
        if p and jnp.ndim(p["w"]) != 2:
            raise ValueError(
                f"layer {l} has a {jnp.ndim(p['w'])}-D weight: grads_from_backward needs "
                "net=... for a network with Conv1D layers"
            )
        layers.append(Dense(p["b"].shape[0]) if p else Flatten())
    return tuple(layers)


def grads_from_backward(
    params: Params,
    bw: Backward,
    *,
    scale: float | None = None,
    l1: float = 0.0,
    l2: float = 0.0,
    net: AnyNet | None = None,
) -> Params:
    """The parameter gradient from a backward pass: ``∂W^l = a^{l−1 ᵀ} (s·δ^l) + l1 sign(W) + l2 W``,
    ``∂b^l = Σ_batch s·δ^l`` (for a convolution ∂W sums over positions too; ``{}`` for a Flatten).

    Args:
      params: the parameters (for the penalty term).
      bw: a :class:`Backward`.
      scale: ``s``; ``None`` for 1. With the per-example deltas of :func:`backward`, ``1/B``
        gives :func:`manual_grad` (e.g. for a training step that also needs those deltas).
      l1, l2: penalty strengths; the term is left out when both are concrete zeros.
      net: the network; needed for any network with a layer other than Dense (without it the
        layers are taken to be dense).

    Returns:
      A pytree like ``params``.

    Traced arguments: a negative or non-finite ``l1``/``l2`` makes every entry NaN.
    """
    ok = check_regularisation(l1, l2)
    penalised = not (checks.is_concrete_zero(l1) and checks.is_concrete_zero(l2))
    deltas = bw.delta
    if scale is not None:
        deltas = [d * jnp.asarray(scale, d.dtype) for d in deltas]
    layers = net.layers if net is not None else _dense_layers(params)
    grads = layer_grads(layers, bw.trace.a[:-1], deltas)
    if penalised:
        grads = [{"w": g["w"] + penalty_grad(p["w"], l1, l2), "b": g["b"]} if p else g
                 for g, p in zip(grads, params)]
    if ok is not None:  # traced strengths: invalid ones made penalty_grad NaN; the biases too
        nan_unless_ok = checks.nan_unless(ok, 0.0)
        grads = [{"w": g["w"], "b": g["b"] + nan_unless_ok} if g else g for g in grads]
    return grads


def autodiff_grad(
    net: AnyNet,
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
