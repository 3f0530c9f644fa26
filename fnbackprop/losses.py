"""Losses, each value rule beside its output-layer gradient rule, and the regularised loss.

All data losses are averaged over the batch B:

* ``mse``: ``1/(2B) Σ_i ‖y_i − a_i‖²``;
* ``cross_entropy`` (softmax head): ``−1/B Σ_i Σ_k y_ik log a_ik``, computed from the logits as
  ``−1/B Σ_i Σ_k y_ik (z_ik − logsumexp(z_i))``;
* ``binary_cross_entropy`` (sigmoid head): ``−1/B Σ_i Σ_k [y log a + (1−y) log(1−a)]``,
  computed from the logits as ``1/B Σ_i Σ_k [y softplus(−z) + (1−y) softplus(z)]``.

The output rule gives the per-example ``δ_i^L = ∂ℓ_i/∂z_i^L`` (without the 1/B); for the fused
heads it is ``a − y`` (cross-entropy: ``a Σ_k y_k − y``, which is ``a − y`` when the target row sums
to one), otherwise ``∂ℓ/∂a ⊙ f'(z^L)`` through the output activation's backward rule.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fnbackprop import checks
from fnbackprop.network import (
    AnyNet,
    Params,
    _forward_trace,
    check_inputs,
    check_params,
    dropout_masks,
    param_dtype,
)

__all__ = [
    "loss",
    "data_loss",
    "output_delta",
    "prepare_targets",
    "penalty",
    "penalty_grad",
    "per_example_loss",
    "check_regularisation",
]


def prepare_targets(
    net: AnyNet, y: jax.Array, batch: int, dtype: Any, *, checked: bool = False
) -> jax.Array:
    """Checks ``y`` and brings it to shape ``(B, n_L)`` and the parameters' dtype.

    Accepted targets:

    * ``cross_entropy``: one-hot / probability rows ``(B, K)`` or integer labels ``(B,)`` in
      ``[0, K)``;
    * ``mse`` and ``binary_cross_entropy``: ``(B, n_L)``, or ``(B,)`` when ``n_L == 1``.

    Traced labels cannot be range-checked on the host: a traced label outside ``[0, K)`` gets
    a row of NaN, so that example's loss and gradient are NaN (JAX's own convention for
    out-of-bounds gathers), never a silent zero. ``checked=True`` leaves that guard out, for
    labels already validated on the host (e.g. when a data set was loaded): inside a jitted
    training step the labels are then one-hot encoded with no checking op.

    Raises:
      ValueError: wrong shape, a non-numeric dtype (e.g. string labels), non-integer labels, or
        (when ``y`` is concrete) labels outside ``[0, K)``.
    """
    k = net.output_size
    checks.check_numeric(y, "targets y", "numbers (integer labels or a float array)")
    shape = jnp.shape(y)
    y_dtype = jnp.result_type(y)
    if net.loss == "cross_entropy" and len(shape) == 1:
        if shape[0] != batch:
            raise ValueError(f"labels y have length {shape[0]} but x has batch size {batch}")
        if not jnp.issubdtype(y_dtype, jnp.integer):
            raise ValueError(
                f"1-D cross-entropy targets must be integer labels in [0, {k}), got dtype {y_dtype}"
            )
        y_np = checks.concrete(y)
        if y_np is not None and y_np.size and (y_np.min() < 0 or y_np.max() >= k):
            bad = y_np[(y_np < 0) | (y_np >= k)][0]
            raise ValueError(f"label {bad} is out of range: labels must be in [0, {k})")
        one_hot = jax.nn.one_hot(y, k, dtype=dtype)
        if y_np is not None or checked:
            return one_hot
        valid = (y >= 0) & (y < k)
        return jnp.where(valid[:, None], one_hot, jnp.asarray(jnp.nan, dtype))
    if len(shape) == 1 and k == 1:
        y = jnp.reshape(y, (-1, 1))
        shape = jnp.shape(y)
    if shape != (batch, k):
        allowed = f"({batch}, {k})"
        if net.loss == "cross_entropy":
            allowed += f" or integer labels ({batch},)"
        elif k == 1:
            allowed += f" or ({batch},)"
        raise ValueError(f"targets y must have shape {allowed} for loss {net.loss!r}, got {shape}")
    return jnp.asarray(y, dtype)


# --- value rule ----------------------------------------------------- gradient rule ---------
def _mse(z, a, y):
    del z
    return 0.5 * jnp.sum((y - a) ** 2, axis=-1)


def _mse_grad_a(a, y):  # ∂ℓ/∂a = a − y
    return a - y


def _cross_entropy(z, a, y):
    del a
    log_a = z - jax.nn.logsumexp(z, axis=-1, keepdims=True)
    return -jnp.sum(y * log_a, axis=-1)


def _cross_entropy_delta(a, y):  # ∂ℓ/∂z = a Σ_k y_k − y
    return a * jnp.sum(y, axis=-1, keepdims=True) - y


def _binary_cross_entropy(z, a, y):
    del a
    return jnp.sum(y * jax.nn.softplus(-z) + (1 - y) * jax.nn.softplus(z), axis=-1)


def _binary_cross_entropy_delta(a, y):  # ∂ℓ/∂z = σ(z) − y
    return a - y


def per_example_loss(net: AnyNet, z: jax.Array, a: jax.Array, y: jax.Array) -> jax.Array:
    """ℓ_i for each example: ``(B,)``, from output logits ``z``, activations ``a``, targets ``y``."""
    if net.loss == "mse":
        return _mse(z, a, y)
    if net.loss == "cross_entropy":
        return _cross_entropy(z, a, y)
    return _binary_cross_entropy(z, a, y)


def output_delta(net: AnyNet, z: jax.Array, a: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example ``δ_i^L = ∂ℓ_i/∂z_i^L``, shape ``(B, n_L)``; the batch mean's δ^L is this / B."""
    if net.loss == "cross_entropy":
        return _cross_entropy_delta(a, y)
    if net.loss == "binary_cross_entropy":
        return _binary_cross_entropy_delta(a, y)
    return net.activation(net.num_layers).backward(z, a, _mse_grad_a(a, y))


def check_regularisation(l1, l2) -> jax.Array | None:
    """Checks the penalty strengths: each must be a finite number ≥ 0.

    Returns:
      ``None`` when both are concrete (and valid); else the traced condition that both are
      valid, for :func:`fnbackprop.checks.nan_unless`.

    Raises:
      ValueError: a concrete ``l1`` or ``l2`` that is negative, not finite or not a number.
    """
    allowed = "a finite number ≥ 0"
    return checks.all_ok(
        checks.scalar_rule(l1, "l1", allowed, checks.NON_NEGATIVE_FINITE),
        checks.scalar_rule(l2, "l2", allowed, checks.NON_NEGATIVE_FINITE),
    )


def _strengths(l1, l2):
    """``(l1, l2)`` checked; traced invalid ones replaced by NaN (so every use is NaN)."""
    ok = check_regularisation(l1, l2)
    if ok is None:
        return l1, l2
    return jnp.where(ok, l1, jnp.nan), jnp.where(ok, l2, jnp.nan)


def penalty(params: Params, l1: float = 0.0, l2: float = 0.0) -> jax.Array:
    """``l1 Σ|w| + (l2/2) Σ w²`` over the weights of every layer (biases are not penalised).

    Traced arguments: a negative or non-finite ``l1`` or ``l2`` gives NaN.
    """
    l1, l2 = _strengths(l1, l2)
    total = jnp.zeros((), param_dtype(params))
    for p in params:
        if p:
            w = p["w"]
            total = total + l1 * jnp.sum(jnp.abs(w)) + 0.5 * l2 * jnp.sum(w * w)
    return total


def penalty_grad(w: jax.Array, l1: float = 0.0, l2: float = 0.0) -> jax.Array:
    """Gradient of the penalty with respect to one weight array: ``l1 sign(w) + l2 w``.

    Traced arguments: a negative or non-finite ``l1`` or ``l2`` makes every entry NaN.
    """
    l1, l2 = _strengths(l1, l2)
    return l1 * jnp.sign(w) + l2 * w


def data_loss(net: AnyNet, params: Params, x: jax.Array, y: jax.Array, masks=None) -> jax.Array:
    """Batch-mean data loss (no penalty) with optional dropout masks."""
    check_params(net, params)
    check_inputs(net, x)
    y = prepare_targets(net, y, x.shape[0], param_dtype(params))  # checked before any work
    return _data_loss(net, params, x, y, masks)


def _data_loss(net: AnyNet, params: Params, x: jax.Array, y: jax.Array, masks) -> jax.Array:
    """:func:`data_loss` on prepared targets ``(B, n_L)``, without the checks."""
    return _objective(net, params, x, y, masks)[0]


def _objective(net: AnyNet, params: Params, x, y, masks, l1=0.0, l2=0.0):
    """``(batch-mean data loss + penalty, forward trace)`` on prepared targets, unchecked."""
    trace = _forward_trace(net, params, x, masks)
    value = jnp.mean(per_example_loss(net, trace.z[-1], trace.a[-1], y))
    if not (checks.is_concrete_zero(l1) and checks.is_concrete_zero(l2)):
        value = value + penalty(params, l1, l2)
    return value, trace


def loss(
    net: AnyNet,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    *,
    l1: float = 0.0,
    l2: float = 0.0,
    dropout: float = 0.0,
    key: jax.Array | None = None,
) -> jax.Array:
    """The training objective: batch-mean data loss plus the weight penalty.

    Args:
      net: the network.
      params: its parameters.
      x: inputs ``(B, *net.input_shape)``.
      y: targets, see :func:`prepare_targets`.
      l1: L1 strength: adds ``l1 Σ|w|`` (every weight array; biases are not penalised).
      l2: L2 strength: adds ``(l2/2) Σ w²``.
      dropout: inverted-dropout rate on every hidden Dense layer's activations, in [0, 1).
      key: PRNG key for the dropout masks (required when ``dropout > 0``).

    Returns:
      A scalar.

    Traced arguments: a negative or non-finite ``l1``/``l2``, or a dropout rate outside
    [0, 1), gives NaN; a traced label outside [0, K) gives NaN (see :func:`prepare_targets`).
    """
    check_regularisation(l1, l2)
    check_params(net, params)
    check_inputs(net, x)
    dtype = param_dtype(params)
    y = prepare_targets(net, y, x.shape[0], dtype)
    masks = dropout_masks(net, key, dropout, x.shape[0], dtype)
    return _objective(net, params, x, y, masks, l1, l2)[0]
