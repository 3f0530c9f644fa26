"""Per-example gradients, their norms, and per-example clipping at the cost of one plain step.

For a dense layer ``z_i = a_i^{l−1} W^l + b^l`` the gradient of example i's loss ``ℓ_i`` is an
outer product of two vectors the backward pass already holds (Goodfellow 2015):

* ``∂ℓ_i/∂W^l = a_i^{l−1} δ_i^{lᵀ}`` (shape ``(n_{l−1}, n_l)``) and ``∂ℓ_i/∂b^l = δ_i^l``,

with ``δ_i^l = ∂ℓ_i/∂z_i^l`` from :func:`fnbackprop.backward`. A convolution is a dense layer
applied to every window ``u_{i,t}``: ``G_i = ∂ℓ_i/∂W = Σ_t u_{i,t} δ_{i,t}ᵀ`` and
``∂ℓ_i/∂b = Σ_t δ_{i,t}``. Hence, without materialising any per-example gradient,

* ``‖G_i‖² = Σ_{t,s} (u_{i,t}·u_{i,s}) (δ_{i,t}·δ_{i,s})`` ("ghost" norms: two T × T Gram
  matrices), which for a dense layer (T = 1) is ``‖a_i^{l−1}‖² ‖δ_i^l‖²``; where ``G_i`` itself
  is smaller than the Gram matrices (``k·c_in·c_out ≤ 2T²``, Li et al. 2022) it is formed
  instead, per example: each layer's choice is static
  (:meth:`fnbackprop.Conv1D.norm_method`);

and a per-example weighted sum of the gradients is one weighted backward step per layer:
``Σ_i c_i ∂ℓ_i/∂W^l = a^{l−1 ᵀ} (c ⊙ δ^l)`` (for a convolution ``Uᵀ (c ⊙ δ)``), through the
same :func:`fnbackprop.layers.weight_grad` as the batch gradient (a layer that formed its
``G_i`` for the norms sums those instead: ``Σ_i c_i G_i``). :func:`per_example_grad_norms`
and :func:`clipped_grad` therefore use the memory of a plain step (the forward trace and the
deltas) instead of the ``B × P`` numbers of ``vmap(jax.grad)``, in one forward and one backward
pass.

Memory in detail: global clipping needs every layer's δ before any factor ``c_i`` is known, so
all deltas are alive at once, where a plain step can drop ``δ^{l+1}`` once ``δ^l`` is formed;
this can be one more ``(B, n)`` buffer than a plain step. Per-layer clipping waits for nothing.
Zeroing rows of the input batch itself (below, only under a mask) takes a copy of it when the
batch is an argument of the jitted step, and none inside a ``lax.scan`` over batches (as
``fb.train`` runs an epoch), where it happens in place. ``scripts/bench_per_example.py``
measures both.

Robustness (as jax_privacy's ``nan_safe``): an example whose gradient norm is not finite
contributes nothing (its factor is 0 and its rows of the deltas and of every layer's input are
zeroed with ``jnp.where``, so that ``NaN · 0`` cannot leak); its norm is still reported. Rows
outside a ``mask`` contribute nothing at all and report norm 0, whatever they hold. The one
exception: without a mask, the network's input ``x`` is taken as it is (zeroing it would cost a
copy of the batch), so a non-finite *input* row makes the first layer's weight gradient NaN —
loudly; data loaders refuse non-finite inputs, and a padded batch comes with its mask.

Per-example quantities concern the *data* loss of :func:`fnbackprop.loss` on one example (a batch
of one): there is no weight penalty and no dropout here.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from fnbackprop import checks
from fnbackprop.backprop import Backward, _backward, layer_grads
from fnbackprop.layers.dense import per_example_weight_grads
from fnbackprop.losses import loss, prepare_targets
from fnbackprop.network import AnyNet, Params, check_inputs, check_params, param_dtype

__all__ = [
    "PER_EXAMPLE_METHODS",
    "per_example_grads",
    "per_example_grad_norms",
    "clipped_grad",
    "clipped_grad_and_norms",
    "clipped_grads_from_backward",
    "add_noise",
]

PER_EXAMPLE_METHODS: tuple[str, ...] = ("manual", "vmap")
"""Methods of :func:`per_example_grads`."""


def _check_per_layer(per_layer) -> None:
    if not isinstance(per_layer, (bool, np.bool_)):
        raise ValueError(f"per_layer must be True or False, got {per_layer!r}")


def _check_batch(net: AnyNet, params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Validates everything and returns the targets as ``(B, n_L)`` in the params' dtype."""
    check_params(net, params)
    check_inputs(net, x)
    return prepare_targets(net, y, jnp.shape(x)[0], param_dtype(params))


def _plain_backward(net: AnyNet, params: Params, x: jax.Array, y: jax.Array) -> Backward:
    """Per-example deltas of the summed data loss (no dropout) on prepared targets."""
    return _backward(net, params, x, y, None, None)


def _norm_parts(net: AnyNet, bw: Backward, layers: tuple[int, ...]) -> list[jax.Array]:
    """Squared per-example gradient norms of the given layers (``w`` and ``b`` together), ``(B,)``
    each."""
    return [_per_example_parts(net.layers[i], net.shapes[i], bw.trace.a[i], bw.delta[i])[0]
            for i in layers]


def per_example_grads(
    net: AnyNet, params: Params, x: jax.Array, y: jax.Array, *, method: str = "manual"
) -> Params:
    """The gradient of the loss on each example alone (a batch of one), for every example.

    Entry i is ``jax.grad`` of ``fnbackprop.loss(net, ·, x[i:i+1], y[i:i+1])``; the mean over the
    batch axis equals :func:`fnbackprop.manual_grad` on the whole batch. This materialises
    ``B × P`` numbers (P = ``net.num_params``): to clip or measure norms use
    :func:`clipped_grad` / :func:`per_example_grad_norms`, which do not.

    Args:
      net: the network (static under ``jax.jit``).
      params: its parameters.
      x: inputs ``(B, *net.input_shape)``.
      y: targets (see :func:`fnbackprop.losses.prepare_targets`).
      method: ``"manual"``: each layer's batch-gradient function applied to every example alone
        (``vmap`` over the examples of the layer's ``grads``, e.g. ``a_i δ_iᵀ`` for a dense
        layer), on the deltas of the hand-derived backward pass (no autodiff); ``"vmap"``:
        ``jax.vmap`` of ``jax.grad`` (the usual JAX recipe, as a reference).

    Returns:
      A pytree like ``params`` with a leading batch axis, e.g. ``{"w": (B, n_{l−1}, n_l),
      "b": (B, n_l)}`` for a dense layer (``{}`` for a Flatten).

    Raises:
      ValueError: unknown ``method`` or inputs that do not fit ``net``.
    """
    if method not in PER_EXAMPLE_METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(PER_EXAMPLE_METHODS)}")
    y = _check_batch(net, params, x, y)
    if method == "vmap":

        def one(x_i, y_i):
            return jax.grad(lambda p: loss(net, p, x_i[None], y_i[None, :]))(params)

        return jax.vmap(one)(x, y)
    bw = _plain_backward(net, params, x, y)

    def alone(a_i, d_i):  # the batch gradient of a batch of one
        return layer_grads(net.layers, [v[None] for v in a_i], [v[None] for v in d_i])

    return jax.vmap(alone)(list(bw.trace.a[:-1]), list(bw.delta))


def per_example_grad_norms(
    net: AnyNet, params: Params, x: jax.Array, y: jax.Array, *, per_layer: bool = False
) -> jax.Array:
    """L2 norms of the per-example gradients, without materialising them.

    Dense layers: ``‖∂ℓ_i/∂W^l‖_F = ‖a_i^{l−1}‖ ‖δ_i^l‖`` and ``‖∂ℓ_i/∂b^l‖ = ‖δ_i^l‖``;
    convolutions: ghost or materialised norms (see the module docstring). One forward and
    backward pass plus little more.

    Args:
      net: the network (static under ``jax.jit``).
      params: its parameters.
      x: inputs ``(B, *net.input_shape)``.
      y: targets.
      per_layer: ``False``: the norm of the whole per-example gradient (all weights and biases);
        ``True``: one norm per layer with parameters, of that layer's ``w`` and ``b`` together.

    Returns:
      ``(B,)`` global norms, or ``(B, L_p)`` per-layer norms (column j is the j-th layer with
      parameters: every layer but Flatten). The global norm is the root of the sum of the
      squared per-layer norms.
    """
    _check_per_layer(per_layer)
    y = _check_batch(net, params, x, y)
    sq = jnp.stack(_norm_parts(net, _plain_backward(net, params, x, y), net.param_layers), axis=1)
    return jnp.sqrt(sq) if per_layer else jnp.sqrt(jnp.sum(sq, axis=1))


def _clip_factors(norms: jax.Array, limit) -> jax.Array:
    """``c = min(1, limit / norm)`` with ``c = 1`` for ``norm ≤ limit`` (so 0 and inf/inf are safe)."""
    limit = jnp.asarray(limit, norms.dtype)
    over = norms > limit
    return jnp.where(over, limit / jnp.where(over, norms, jnp.ones_like(norms)), jnp.ones_like(norms))


def _check_clipping(batch, clip_norm, per_layer, noise_multiplier, key, mask, normalize_by):
    """Validates the clipping arguments, before any work.

    Returns:
      ``(noisy, ok, mask)``: whether noise is added; the traced validity condition (``None``
      when every argument is concrete); the mask as a boolean ``(B,)`` array or ``None``.
    """
    ok_clip = checks.scalar_rule(clip_norm, "clip_norm", "a number > 0 (inf: no clipping)",
                                 checks.POSITIVE)
    _check_per_layer(per_layer)
    ok_noise = checks.scalar_rule(noise_multiplier, "noise_multiplier", "a finite number ≥ 0",
                                  checks.NON_NEGATIVE_FINITE)
    if ok_noise is None and float(noise_multiplier) == 0.0:
        noisy = False
    elif key is None:
        raise ValueError(
            f"noise_multiplier={noise_multiplier!r} needs a PRNG key (key=...)" if ok_noise is None
            else "a traced noise_multiplier needs a PRNG key (key=...)"
        )
    else:
        checks.check_key(key)
        noisy = True
    ok_norm = None
    if normalize_by is not None:
        ok_norm = checks.scalar_rule(normalize_by, "normalize_by", "a finite number > 0",
                                     checks.POSITIVE_FINITE)
    ok_mask = None
    if mask is not None:
        allowed = f"a ({batch},) array of booleans or 0/1"
        checks.check_numeric(mask, "mask", allowed)
        if jnp.shape(mask) != (batch,):
            raise ValueError(f"mask must be {allowed}, got shape {jnp.shape(mask)}")
        m = checks.concrete(mask)
        if m is not None and not np.all((m == 0) | (m == 1)):
            raise ValueError(f"mask must be {allowed}, got the value {m[(m != 0) & (m != 1)][0].item()!r}")
        if m is None and jnp.result_type(mask) != jnp.bool_:
            ok_mask = jnp.all((mask == 0) | (mask == 1))
        mask = jnp.asarray(mask) != 0
    return noisy, checks.all_ok(ok_clip, ok_noise, ok_norm, ok_mask), mask


def clipped_grads_from_backward(
    net: AnyNet,
    params: Params,
    bw: Backward,
    clip_norm: float,
    *,
    per_layer: bool = False,
    noise_multiplier: float = 0.0,
    key: jax.Array | None = None,
    mask: jax.Array | None = None,
    normalize_by: float | None = None,
) -> tuple[Params, jax.Array]:
    """The clipping maths of :func:`clipped_grad_and_norms` on an existing backward pass.

    For a training step that already ran :func:`fnbackprop.backward` (e.g. for its loss or its
    deltas): no second backward pass.

    Args:
      net, params: the network and its parameters.
      bw: the :class:`~fnbackprop.Backward` of the batch, without ``weights`` and without
        dropout (per-example deltas of the summed data loss).
      clip_norm, per_layer, noise_multiplier, key, mask, normalize_by: as for
        :func:`clipped_grad`.

    Returns:
      ``(grads, norms)`` as :func:`clipped_grad_and_norms`.
    """
    check_params(net, params)
    if len(bw.delta) != net.num_layers:
        raise ValueError(f"bw has {len(bw.delta)} deltas but net has {net.num_layers} layers")
    checked = _check_clipping(bw.delta[-1].shape[0], clip_norm, per_layer, noise_multiplier, key,
                              mask, normalize_by)
    return _clip(net, bw, clip_norm, per_layer, noise_multiplier, key, normalize_by, *checked)


def _clip(net, bw, clip_norm, per_layer, noise_multiplier, key, normalize_by, noisy, ok, mask):
    """Clipping and noise; the arguments are already validated (``ok``: the traced ones)."""
    grads, norms, inv_n = _clipped(net, bw, clip_norm, per_layer, mask, normalize_by, ok)
    if noisy:
        std = jnp.asarray(noise_multiplier, inv_n.dtype) * jnp.asarray(clip_norm, inv_n.dtype) * inv_n
        grads = _noise(grads, std, key)
    return grads, norms


def _inverse_count(batch: int, mask, normalize_by, dtype) -> jax.Array:
    """``1/n``: n = ``normalize_by``, else the number of unmasked rows (at least 1)."""
    if normalize_by is not None:
        return 1 / jnp.asarray(normalize_by, dtype)
    if mask is None:
        return jnp.asarray(1.0 / batch, dtype)
    return 1 / jnp.maximum(jnp.sum(mask), 1).astype(dtype)


def _per_example_parts(layer, shape, a: jax.Array, delta: jax.Array):
    """A layer's squared per-example norms ``(B,)`` and what its clipped sum needs.

    Ghost layers keep ``(a, δ)``: the sum is one weighted backward step through the layer's
    batch gradient. Materialised layers keep the per-example gradients they formed for the norm:
    the sum is a weighted sum of those, and δ and the windows are free as soon as the norms are.
    """
    if layer.norm_method(shape) == "materialised":
        u, d = layer.dense_view(a, delta)
        g_w, g_b = per_example_weight_grads(u, d), jnp.sum(d, axis=1)  # (B, p, c), (B, c)
        sq = jnp.sum(g_w * g_w, axis=(1, 2)) + jnp.sum(g_b * g_b, axis=1)
        return sq, ("materialised", g_w, g_b)
    return layer.norm_sq(a, delta, "ghost"), ("ghost", a, delta)


def _weighted_sum(layer, w_shape, parts, factors: jax.Array, keep: jax.Array,
                  zero_inputs: bool = True) -> dict:
    """``Σ_i factors_i ∂ℓ_i/∂θ`` over the kept rows (``keep``: ``(B,)`` booleans).

    Rows not kept are replaced by zeros with ``jnp.where`` (in the layer's inputs too, unless
    ``zero_inputs`` is false, so that a non-finite input cannot give ``NaN · 0``).
    """
    kind, x1, x2 = parts

    def kept(v):
        return jnp.where(keep.reshape(keep.shape + (1,) * (v.ndim - 1)), v, 0)

    u = kept(x1) if zero_inputs else x1
    if kind == "materialised":
        f = kept(factors)
        return {"w": jnp.tensordot(f, u, axes=1).reshape(w_shape),
                "b": jnp.tensordot(f, kept(x2), axes=1)}
    return layer.grads(u, kept(x2 * factors.reshape(factors.shape + (1,) * (x2.ndim - 1))))


def _clipped(net: AnyNet, bw: Backward, clip_norm, per_layer: bool, mask, normalize_by, ok):
    """Clipped mean gradient (no noise), the norms, and 1/n; arguments already validated.

    An invalid traced argument (``ok`` false) makes 1/n NaN, and with it every factor c_i / n
    and the noise's standard deviation: the whole result is NaN at the cost of one scalar op.
    """
    inputs, deltas = bw.trace.a[:-1], bw.delta
    layers = net.param_layers
    inv_n = _inverse_count(deltas[-1].shape[0], mask, normalize_by, deltas[-1].dtype)
    inv_n = checks.nan_unless(ok, inv_n)
    grads = [{} for _ in net.layers]
    w_shape = {i: net.layers[i].param_shapes(net.shapes[i])["w"] for i in layers}
    if per_layer:
        # Layer by layer: layer l's factors need only its own norms, so no layer waits on another.
        limit = clip_norm / math.sqrt(len(layers))
        cols = []
        for i in layers:
            sq, parts = _per_example_parts(net.layers[i], net.shapes[i], inputs[i], deltas[i])
            norm = jnp.sqrt(sq)  # (B,)
            keep = jnp.isfinite(norm) if mask is None else mask & jnp.isfinite(norm)
            grads[i] = _weighted_sum(net.layers[i], w_shape[i], parts,
                                     _clip_factors(norm, limit) * inv_n, keep,
                                     zero_inputs=i > 0 or mask is not None)
            cols.append(norm)
        norms = jnp.stack(cols, axis=1)  # (B, L_p)
    else:
        sq, parts = {}, {}
        for i in layers:
            sq[i], parts[i] = _per_example_parts(net.layers[i], net.shapes[i], inputs[i], deltas[i])
        norms = jnp.sqrt(sum(sq.values()))  # (B,)
        keep = jnp.isfinite(norms) if mask is None else mask & jnp.isfinite(norms)
        factors = _clip_factors(norms, clip_norm) * inv_n  # c_i / n
        for i in reversed(layers):  # the last layers first: their buffers are freed sooner
            grads[i] = _weighted_sum(net.layers[i], w_shape[i], parts[i], factors, keep,
                                     zero_inputs=i > 0 or mask is not None)
    if mask is not None:
        norms = jnp.where(mask.reshape(mask.shape + (1,) * (norms.ndim - 1)), norms, 0)
    return grads, norms, inv_n


def _noise(grads: Params, std: jax.Array, key: jax.Array) -> Params:
    """Adds ``N(0, std²)`` to every entry; layer l draws ``w`` and ``b`` from keys 2l and 2l + 1
    of ``jax.random.split(key, 2L)``."""
    keys = jax.random.split(key, 2 * len(grads))
    return [
        {
            "w": g["w"] + std * jax.random.normal(keys[2 * l], g["w"].shape, g["w"].dtype),
            "b": g["b"] + std * jax.random.normal(keys[2 * l + 1], g["b"].shape, g["b"].dtype),
        } if g else g
        for l, g in enumerate(grads)
    ]


def add_noise(
    grads: Params, noise_multiplier: float, clip_norm: float, normalize_by: float, key: jax.Array
) -> Params:
    """The DP-SGD noise on a mean of clipped gradients: ``N(0, (σ C / n)²)`` on every entry.

    For a step that accumulates clipped sums over several chunks of a batch (each from
    :func:`clipped_grads_from_backward` without noise) and draws the noise once.

    Args:
      grads: a gradient pytree like the parameters (one dict per layer, ``{}`` for a Flatten).
      noise_multiplier: σ ≥ 0.
      clip_norm: C > 0.
      normalize_by: n > 0, the denominator of the mean.
      key: PRNG key; layer l draws its ``w`` and ``b`` noise from keys 2l and 2l + 1 of
        ``jax.random.split(key, 2L)`` (as :func:`clipped_grad` does).

    Returns:
      A pytree like ``grads``.

    Traced arguments: an invalid σ, C or n makes every entry NaN.
    """
    ok = checks.all_ok(
        checks.scalar_rule(noise_multiplier, "noise_multiplier", "a finite number ≥ 0",
                           checks.NON_NEGATIVE_FINITE),
        checks.scalar_rule(clip_norm, "clip_norm", "a number > 0", checks.POSITIVE),
        checks.scalar_rule(normalize_by, "normalize_by", "a finite number > 0",
                           checks.POSITIVE_FINITE),
    )
    checks.check_key(key)
    dtype = next(g["w"].dtype for g in grads if g)
    std = jnp.asarray(noise_multiplier, dtype) * jnp.asarray(clip_norm, dtype) / jnp.asarray(
        normalize_by, dtype)
    return _noise(grads, checks.nan_unless(ok, std), key)


def clipped_grad_and_norms(
    net: AnyNet,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    clip_norm: float,
    *,
    per_layer: bool = False,
    noise_multiplier: float = 0.0,
    key: jax.Array | None = None,
    mask: jax.Array | None = None,
    normalize_by: float | None = None,
) -> tuple[Params, jax.Array]:
    """:func:`clipped_grad` and the per-example norms before clipping, from the same pass.

    Same arguments as :func:`clipped_grad`: validation, :func:`fnbackprop.backward`, then
    :func:`clipped_grads_from_backward`. The norms come for free (they are needed to clip): use
    them for diagnostics such as the fraction of clipped examples or gradient-flow monitoring.

    Returns:
      ``(grads, norms)``: the clipped (and possibly noised) mean gradient, a pytree like
      ``params``, and the unclipped per-example norms: ``(B,)`` when ``per_layer`` is ``False``,
      ``(B, L_p)`` when it is ``True`` (as :func:`per_example_grad_norms` returns them). Masked
      rows report 0; a non-finite norm is reported as it is.
    """
    check_params(net, params)
    check_inputs(net, x)
    checked = _check_clipping(x.shape[0], clip_norm, per_layer, noise_multiplier, key, mask,
                              normalize_by)
    y = prepare_targets(net, y, x.shape[0], param_dtype(params))
    bw = _plain_backward(net, params, x, y)
    return _clip(net, bw, clip_norm, per_layer, noise_multiplier, key, normalize_by, *checked)


def clipped_grad(
    net: AnyNet,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    clip_norm: float,
    *,
    per_layer: bool = False,
    noise_multiplier: float = 0.0,
    key: jax.Array | None = None,
    mask: jax.Array | None = None,
    normalize_by: float | None = None,
) -> Params:
    """Mean over the batch of the per-example gradients, each clipped to norm ``clip_norm``.

    ``(1/n) Σ_i c_i g_i`` with ``g_i`` the gradient of example i's loss and
    ``c_i = min(1, C/‖g_i‖)``, computed without materialising any ``g_i``: the norms come from
    the backward pass (see :func:`per_example_grad_norms`), then each layer is one weighted
    backward step, e.g. ``∂W^l = a^{l−1 ᵀ} (c ⊙ δ^l) / n`` and ``∂b^l = Σ_i c_i δ_i^l / n`` for a
    dense layer. Memory is that of a plain step. Pure and jit-compatible with ``net`` static
    (and ``per_layer``).

    * An example with a zero gradient gets ``c_i = 1`` (no NaN); ``clip_norm=inf`` gives the
      plain gradient :func:`fnbackprop.manual_grad`.
    * An example whose gradient norm is not finite gets ``c_i = 0``: it contributes nothing
      (its rows are zeroed with ``jnp.where``) and the rest is exact. Without a ``mask`` the
      input ``x`` itself is not zeroed (that would copy the batch): a non-finite row of ``x``
      makes the first layer's weight gradient NaN.
    * ``per_layer=True``: each parametrised layer's part ``(∂ℓ_i/∂W^l, ∂ℓ_i/∂b^l)`` is clipped
      on its own to ``C/√L_p`` (L_p: the number of layers with parameters), with
      ``c_i^l = min(1, (C/√L_p)/‖g_i^l‖)``. The clipped per-example gradient then still has
      total norm ≤ C, so the same noise calibration holds. A non-finite part contributes
      nothing to its layer.
    * ``noise_multiplier = σ > 0`` (DP-SGD): Gaussian noise ``N(0, (σC)²)`` is added to every entry
      of every ``w`` and ``b`` of the *sum* of the clipped gradients before dividing by n, i.e.
      noise of standard deviation ``σC/n`` on the returned mean. No privacy accounting is done.

    Args:
      net: the network (static under ``jax.jit``).
      params: its parameters.
      x: inputs ``(B, *net.input_shape)``.
      y: targets.
      clip_norm: the clipping threshold C > 0; ``inf`` disables clipping.
      per_layer: clip each layer's part to ``C/√L_p`` instead of the whole gradient to C.
      noise_multiplier: σ ≥ 0.
      key: PRNG key for the noise; required when ``noise_multiplier > 0``.
      mask: optional ``(B,)`` booleans or 0/1: rows with 0 contribute nothing (not to the
        gradient, not to the norms, which report 0 for them), even if they hold NaN (e.g. the
        padding of a last, short batch).
      normalize_by: n, the denominator of the mean; default the number of unmasked rows (B
        without a mask; at least 1). DP-SGD with Poisson sampling uses the expected batch size.

    Returns:
      A pytree like ``params``.

    Raises:
      ValueError: ``clip_norm`` ≤ 0 or NaN, ``noise_multiplier`` < 0 or non-finite, noise without
        a key, ``normalize_by`` ≤ 0 or non-finite, a mask that is not ``(B,)`` booleans or 0/1,
        or inputs that do not fit ``net``.

    Traced arguments: an invalid traced ``clip_norm``, ``noise_multiplier``, ``normalize_by`` or
    mask value makes every entry of the gradient NaN (never a flipped, zeroed or unclipped
    gradient); a traced label outside [0, K) makes that example's norm NaN, so it is dropped
    as any non-finite example (visible in the norms of :func:`clipped_grad_and_norms`).
    """
    grads, _ = clipped_grad_and_norms(
        net, params, x, y, clip_norm, per_layer=per_layer, noise_multiplier=noise_multiplier,
        key=key, mask=mask, normalize_by=normalize_by,
    )
    return grads
