"""The multilayer perceptron: its description, parameters, initialisation and forward pass.

Parameters are a list with one dict per layer, ``{"w": (n_{l-1}, n_l), "b": (n_l,)}``, and a
layer computes ``z^l = a^{l-1} @ w^l + b^l`` on a batch of row vectors ``a^{l-1}`` of shape
``(B, n_{l-1})``. The textbook writes the same layer for one column vector as
``z_j = Σ_k w_jk a_k + b_j``: our ``w[k, j]`` is the textbook's ``w_jk`` (the weight from unit k of
layer l−1 to unit j of layer l), i.e. ``w`` here is the transpose of the textbook's matrix, so that a
batch multiplies from the left.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnbackprop.activations import HIDDEN_ACTIVATIONS, OUTPUT_ACTIVATIONS, get_activation

__all__ = [
    "MLP",
    "Params",
    "LOSSES",
    "INIT_SCHEMES",
    "init",
    "forward",
    "ForwardTrace",
    "forward_trace",
    "dropout_masks",
    "check_params",
    "check_inputs",
]

Params = list[dict[str, jax.Array]]
"""One ``{"w": (n_in, n_out), "b": (n_out,)}`` dict per layer."""

LOSSES: tuple[str, ...] = ("mse", "cross_entropy", "binary_cross_entropy")
INIT_SCHEMES: tuple[str, ...] = (
    "xavier_normal", "xavier_uniform", "he_normal", "he_uniform", "lecun_normal", "nielsen",
    "normal", "zeros",
)
_HEAD_NEEDS = {"cross_entropy": "softmax", "binary_cross_entropy": "sigmoid"}


@dataclasses.dataclass(frozen=True)
class MLP:
    """A fully connected network: sizes, activations and loss. Frozen and hashable.

    Hashable so that it can be a static argument of ``jax.jit``
    (``jax.jit(fb.manual_grad, static_argnums=0)``).

    Attributes:
      sizes: layer widths ``(n_0, n_1, ..., n_L)``: input width first, output width last.
        At least two entries, all ≥ 1.
      hidden: activation of every hidden layer, one of
        :data:`fnbackprop.activations.HIDDEN_ACTIVATIONS`.
      output: activation of the output layer, one of
        :data:`fnbackprop.activations.OUTPUT_ACTIVATIONS`.
      loss: ``"mse"``, ``"cross_entropy"`` (needs ``output="softmax"``) or
        ``"binary_cross_entropy"`` (needs ``output="sigmoid"``).
    """

    sizes: tuple[int, ...]
    hidden: str = "relu"
    output: str = "softmax"
    loss: str = "cross_entropy"

    def __post_init__(self):
        try:
            sizes = tuple(self.sizes)
        except TypeError:
            raise ValueError(f"sizes must be a sequence of integers, got {self.sizes!r}") from None
        if len(sizes) < 2:
            raise ValueError(
                f"sizes needs at least 2 entries (input and output width), got {sizes!r}"
            )
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1:
                raise ValueError(f"every size must be an integer ≥ 1, got {s!r} in {sizes!r}")
        object.__setattr__(self, "sizes", tuple(int(s) for s in sizes))
        if self.hidden not in HIDDEN_ACTIVATIONS:
            raise ValueError(
                f"unknown hidden activation {self.hidden!r}; allowed: {', '.join(HIDDEN_ACTIVATIONS)}"
            )
        if self.output not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"unknown output activation {self.output!r}; allowed: {', '.join(OUTPUT_ACTIVATIONS)}"
            )
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; allowed: {', '.join(LOSSES)}")
        need = _HEAD_NEEDS.get(self.loss)
        if need is not None and self.output != need:
            raise ValueError(
                f"loss {self.loss!r} needs output={need!r}, got output={self.output!r}"
            )

    @property
    def num_layers(self) -> int:
        """Number of weight layers L."""
        return len(self.sizes) - 1

    @property
    def num_params(self) -> int:
        """Total number of weights and biases."""
        return sum((a + 1) * b for a, b in zip(self.sizes[:-1], self.sizes[1:]))

    def activation(self, layer: int):
        """The :class:`~fnbackprop.activations.Activation` of layer ``layer`` (1-based, 1..L)."""
        return get_activation(self.output if layer == self.num_layers else self.hidden)


def _w_b(key, scheme, n_in, n_out, dtype):
    kw, kb = jax.random.split(key)
    normal = lambda k, shape: jax.random.normal(k, shape, dtype)
    uniform = lambda k, shape, lim: jax.random.uniform(k, shape, dtype, -lim, lim)
    zeros_b = jnp.zeros((n_out,), dtype)
    if scheme == "xavier_normal":
        return normal(kw, (n_in, n_out)) * math.sqrt(2.0 / (n_in + n_out)), zeros_b
    if scheme == "xavier_uniform":
        return uniform(kw, (n_in, n_out), math.sqrt(6.0 / (n_in + n_out))), zeros_b
    if scheme == "he_normal":
        return normal(kw, (n_in, n_out)) * math.sqrt(2.0 / n_in), zeros_b
    if scheme == "he_uniform":
        return uniform(kw, (n_in, n_out), math.sqrt(6.0 / n_in)), zeros_b
    if scheme == "lecun_normal":
        return normal(kw, (n_in, n_out)) * math.sqrt(1.0 / n_in), zeros_b
    if scheme == "nielsen":
        return normal(kw, (n_in, n_out)) / math.sqrt(n_in), normal(kb, (n_out,))
    if scheme == "normal":
        return normal(kw, (n_in, n_out)), normal(kb, (n_out,))
    if scheme == "zeros":
        return jnp.zeros((n_in, n_out), dtype), zeros_b
    raise ValueError(f"unknown init scheme {scheme!r}; allowed: {', '.join(INIT_SCHEMES)}")


def init(key: jax.Array, net: MLP, scheme: str = "he_normal", dtype: Any = None) -> Params:
    """Draws initial parameters.

    Schemes (n_in, n_out: the layer's fan-in and fan-out; plain, untruncated distributions):

    * ``xavier_normal``: w ~ N(0, 2/(n_in+n_out)); ``xavier_uniform``: w ~ U(±√(6/(n_in+n_out))).
    * ``he_normal``: w ~ N(0, 2/n_in); ``he_uniform``: w ~ U(±√(6/n_in)).
    * ``lecun_normal``: w ~ N(0, 1/n_in).
    * ``nielsen``: w ~ N(0, 1/n_in), b ~ N(0, 1) (Nielsen's ``network2.py``).
    * ``normal``: w, b ~ N(0, 1) (the "large" initialisation that saturates sigmoid units).
    * ``zeros``: everything 0 (to show the symmetry problem).

    Biases are zero unless the scheme says otherwise.

    Args:
      key: a PRNG key.
      net: the network.
      scheme: one of :data:`INIT_SCHEMES`.
      dtype: a floating dtype; default JAX's default float (float64 under ``jax_enable_x64``).

    Returns:
      A list with one ``{"w": (n_{l-1}, n_l), "b": (n_l,)}`` dict per layer.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; allowed: {', '.join(INIT_SCHEMES)}")
    dtype = jnp.dtype(float) if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    keys = jax.random.split(key, net.num_layers)
    params = []
    for k, n_in, n_out in zip(keys, net.sizes[:-1], net.sizes[1:]):
        w, b = _w_b(k, scheme, n_in, n_out, dtype)
        params.append({"w": w, "b": b})
    return params


def check_params(net: MLP, params: Params) -> None:
    """Raises ``ValueError`` unless ``params`` has the layout and shapes that ``net`` needs."""
    if not isinstance(params, (list, tuple)) or len(params) != net.num_layers:
        n = len(params) if isinstance(params, (list, tuple)) else type(params).__name__
        raise ValueError(f"params must be a list of {net.num_layers} layer dicts, got {n}")
    for l, (p, n_in, n_out) in enumerate(zip(params, net.sizes[:-1], net.sizes[1:]), start=1):
        if not isinstance(p, dict) or set(p) != {"w", "b"}:
            raise ValueError(f"layer {l} params must be a dict with keys 'w' and 'b', got {p!r:.80}")
        if jnp.shape(p["w"]) != (n_in, n_out) or jnp.shape(p["b"]) != (n_out,):
            raise ValueError(
                f"layer {l} expects w {(n_in, n_out)} and b {(n_out,)}, "
                f"got w {jnp.shape(p['w'])} and b {jnp.shape(p['b'])}"
            )


def check_inputs(net: MLP, x: jax.Array) -> None:
    """Raises ``ValueError`` unless ``x`` is a ``(B, n_0)`` batch with B ≥ 1."""
    shape = jnp.shape(x)
    if len(shape) != 2 or shape[1] != net.sizes[0] or shape[0] < 1:
        raise ValueError(
            f"x must have shape (B, {net.sizes[0]}) with B ≥ 1, got {shape}"
        )


def _is_concrete(v) -> bool:
    return not isinstance(v, jax.core.Tracer)


def dropout_masks(
    net: MLP, key: jax.Array | None, rate: float, batch: int, dtype: Any
) -> tuple[jax.Array, ...] | None:
    """Inverted-dropout masks for the hidden layers, already scaled by 1/(1 − rate).

    Args:
      net: the network.
      key: PRNG key; required when ``rate > 0``.
      rate: probability of dropping a hidden unit, in [0, 1).
      batch: batch size B.
      dtype: dtype of the masks.

    Returns:
      ``None`` when there is no dropout, else one ``(B, n_l)`` mask per hidden layer l = 1..L−1,
      each entry 0 or 1/(1 − rate).

    Raises:
      ValueError: rate ∉ [0, 1), or rate > 0 without a key.
    """
    if _is_concrete(rate):
        rate_f = float(rate)
        if not (0.0 <= rate_f < 1.0):
            raise ValueError(f"dropout rate must be in [0, 1), got {rate_f}")
        if rate_f == 0.0:
            return None
        if key is None:
            raise ValueError(f"dropout={rate_f} needs a PRNG key (key=...)")
    elif key is None:
        raise ValueError("a traced dropout rate needs a PRNG key (key=...)")
    if net.num_layers < 2:
        return None
    keep = 1.0 - rate
    keys = jax.random.split(key, net.num_layers - 1)
    return tuple(
        jax.random.bernoulli(k, keep, (batch, n)).astype(dtype) / jnp.asarray(keep, dtype)
        for k, n in zip(keys, net.sizes[1:-1])
    )


class ForwardTrace(NamedTuple):
    """What the forward pass keeps for the backward pass.

    Attributes:
      z: pre-activations ``z^1 .. z^L``, each ``(B, n_l)``.
      h: activation outputs ``f(z^1) .. f(z^L)`` before dropout, each ``(B, n_l)``.
      a: ``a^0 = x``, then each layer's output as fed to the next layer (``h^l`` times the dropout
        mask for hidden layers), ``a^L = h^L``: L + 1 arrays of shape ``(B, n_l)``.
      masks: the dropout masks of the hidden layers (see :func:`dropout_masks`) or ``None``.
    """

    z: tuple[jax.Array, ...]
    h: tuple[jax.Array, ...]
    a: tuple[jax.Array, ...]
    masks: tuple[jax.Array, ...] | None


def forward_trace(
    net: MLP, params: Params, x: jax.Array, masks: tuple[jax.Array, ...] | None = None
) -> ForwardTrace:
    """Forward pass keeping every ``z^l`` and ``a^l`` (with dropout masks applied if given).

    Args:
      net: the network.
      params: its parameters.
      x: inputs ``(B, n_0)``.
      masks: optional dropout masks from :func:`dropout_masks`.

    Returns:
      A :class:`ForwardTrace`.
    """
    check_params(net, params)
    check_inputs(net, x)
    a = jnp.asarray(x, params[0]["w"].dtype)
    zs, hs, as_ = [], [], [a]
    for l, p in enumerate(params, start=1):
        z = a @ p["w"] + p["b"][None, :]
        h = net.activation(l).fn(z)
        a = h * masks[l - 1] if masks is not None and l < net.num_layers else h
        zs.append(z)
        hs.append(h)
        as_.append(a)
    return ForwardTrace(tuple(zs), tuple(hs), tuple(as_), masks)


def forward(net: MLP, params: Params, x: jax.Array) -> jax.Array:
    """Output activations ``a^L`` of shape ``(B, n_L)`` (inference: no dropout)."""
    return forward_trace(net, params, x).a[-1]
