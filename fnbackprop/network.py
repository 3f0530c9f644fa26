"""Networks as sequences of layers: their description, parameters, initialisation and forward pass.

A network is an input shape, a sequence of layers (:mod:`fnbackprop.layers`) and a loss.
Parameters are a list with one dict per layer, in order: ``{"w": (n_{l-1}, n_l), "b": (n_l,)}``
for a :class:`~fnbackprop.Dense` layer, ``{"w": (k, c_in, c_out), "b": (c_out,)}`` for a
:class:`~fnbackprop.Conv1D`, ``{}`` for a :class:`~fnbackprop.Flatten`. Inputs are batches
``(B, *input_shape)``: ``(B, n_0)`` for flat inputs, ``(B, length, channels)`` for sequences.

A dense layer computes ``z^l = a^{l-1} @ w^l + b^l`` on a batch of row vectors ``a^{l-1}`` of
shape ``(B, n_{l-1})``. The textbook writes the same layer for one column vector as
``z_j = Σ_k w_jk a_k + b_j``: our ``w[k, j]`` is the textbook's ``w_jk`` (the weight from unit k of
layer l−1 to unit j of layer l), i.e. ``w`` here is the transpose of the textbook's matrix, so that a
batch multiplies from the left.

:class:`MLP` is the dense special case: it exposes the same ``input_shape``, ``layers`` and
``loss``, and every function below takes either.

Structural rules of a :class:`Network`: at least one layer; the last layer is
:class:`~fnbackprop.Dense`; a :class:`~fnbackprop.Conv1D` needs a ``(length, channels)`` input (so
it cannot follow a Flatten or a Dense layer); a Dense layer needs a flat input (put a Flatten
after the convolutions); a Flatten needs a ``(length, channels)`` input; hidden layers use
hidden activations (no softmax); the last layer's activation and the loss follow the head rules
(``cross_entropy`` needs softmax, ``binary_cross_entropy`` needs sigmoid, and softmax needs at
least two output units).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fnbackprop import checks
from fnbackprop.activations import (
    HIDDEN_ACTIVATIONS,
    OUTPUT_ACTIVATIONS,
    Activation,
    get_activation,
)
from fnbackprop.layers import LAYER_TYPES, Dense, Flatten, Layer

__all__ = [
    "MLP",
    "Network",
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
    "param_dtype",
]

Params = list[dict[str, jax.Array]]
"""One dict per layer: ``{"w", "b"}`` for Dense and Conv1D, ``{}`` for Flatten."""

LOSSES: tuple[str, ...] = ("mse", "cross_entropy", "binary_cross_entropy")
INIT_SCHEMES: tuple[str, ...] = (
    "xavier_normal", "xavier_uniform", "he_normal", "he_uniform", "lecun_normal", "nielsen",
    "normal", "zeros",
)
_HEAD_NEEDS = {"cross_entropy": "softmax", "binary_cross_entropy": "sigmoid"}


def _check_head(output: str, units: int, loss: str) -> None:
    """The head rules: the loss's required output activation; no softmax over one unit."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; allowed: {', '.join(LOSSES)}")
    need = _HEAD_NEEDS.get(loss)
    if need is not None and output != need:
        raise ValueError(f"loss {loss!r} needs output={need!r}, got output={output!r}")
    if output == "softmax" and units == 1:
        raise ValueError(
            "output='softmax' over a single output unit is constant (softmax of one number is "
            "1): use output='sigmoid' with loss='binary_cross_entropy' for two classes, or "
            "two output units with softmax"
        )


class _Layered:
    """What every network offers, derived from ``input_shape``, ``layers`` and ``loss``."""

    input_shape: tuple[int, ...]
    layers: tuple[Layer, ...]
    loss: str

    @functools.cached_property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-example shapes ``(input_shape, out_1, …, out_L)``: the input of layer l is entry
        l − 1, its output entry l."""
        shapes = [self.input_shape]
        for layer in self.layers:
            shapes.append(layer.output_shape(shapes[-1]))
        return tuple(shapes)

    @property
    def num_layers(self) -> int:
        """Number of layers L (Flatten included)."""
        return len(self.layers)

    @property
    def num_params(self) -> int:
        """Total number of weights and biases."""
        return sum(
            math.prod(s)
            for layer, shape in zip(self.layers, self.shapes)
            for s in layer.param_shapes(shape).values()
        )

    @property
    def output_size(self) -> int:
        """Width n_L of the output layer."""
        return self.layers[-1].units

    @property
    def param_layers(self) -> tuple[int, ...]:
        """0-based indices of the layers with parameters (every layer but Flatten)."""
        return tuple(i for i, layer in enumerate(self.layers) if not isinstance(layer, Flatten))

    def activation(self, layer: int) -> Activation | None:
        """The :class:`~fnbackprop.activations.Activation` of layer ``layer`` (1-based, 1..L);
        ``None`` for a Flatten."""
        name = self.layers[layer - 1].activation
        return None if name is None else get_activation(name)


@dataclasses.dataclass(frozen=True)
class MLP(_Layered):
    """A fully connected network: sizes, activations and loss. Frozen and hashable.

    Hashable so that it can be a static argument of ``jax.jit``
    (``jax.jit(fb.manual_grad, static_argnums=0)``). The same network as
    ``Network((n_0,), (Dense(n_1, hidden), …, Dense(n_L, output)), loss)``, with the same
    parameters.

    Attributes:
      sizes: layer widths ``(n_0, n_1, ..., n_L)``: input width first, output width last.
        At least two entries, all ≥ 1.
      hidden: activation of every hidden layer, one of
        :data:`fnbackprop.activations.HIDDEN_ACTIVATIONS`.
      output: activation of the output layer, one of
        :data:`fnbackprop.activations.OUTPUT_ACTIVATIONS`.
      loss: ``"mse"``, ``"cross_entropy"`` (needs ``output="softmax"``) or
        ``"binary_cross_entropy"`` (needs ``output="sigmoid"``). Softmax needs n_L ≥ 2.
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
        _check_head(self.output, self.sizes[-1], self.loss)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(n_0,)``."""
        return (self.sizes[0],)

    @functools.cached_property
    def layers(self) -> tuple[Dense, ...]:
        """``Dense(n_l, hidden)`` for l < L, then ``Dense(n_L, output)``."""
        hidden = tuple(Dense(n, self.hidden) for n in self.sizes[1:-1])
        return hidden + (Dense(self.sizes[-1], self.output),)


@dataclasses.dataclass(frozen=True)
class Network(_Layered):
    """A network of layers (Dense, Conv1D, Flatten) and a loss. Frozen, hashable, validated.

    Example (the MNIST-1D CNN)::

        net = fb.Network(
            input_shape=(40, 1),
            layers=(fb.Conv1D(25, 5, activation="relu"),
                    fb.Conv1D(25, 5, stride=2, activation="relu"),
                    fb.Conv1D(25, 5, stride=2, activation="relu"),
                    fb.Flatten(),
                    fb.Dense(10, activation="softmax")),
            loss="cross_entropy")

    Attributes:
      input_shape: per-example input shape: ``(n_0,)`` or ``(length, channels)``.
      layers: the layers, in order (see the module docstring for the structural rules).
      loss: as for :class:`MLP`.

    Raises:
      ValueError: a bad value, or a layer that does not fit its input (e.g. a VALID kernel
        longer than its input), naming the layer.
    """

    input_shape: tuple[int, ...]
    layers: tuple[Layer, ...]
    loss: str = "cross_entropy"

    def __post_init__(self):
        try:
            shape = tuple(self.input_shape)
        except TypeError:
            raise ValueError(
                f"input_shape must be (n_0,) or (length, channels), got {self.input_shape!r}"
            ) from None
        if len(shape) not in (1, 2) or any(
            isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1 for s in shape
        ):
            raise ValueError(
                f"input_shape must be (n_0,) or (length, channels) of integers ≥ 1, got "
                f"{self.input_shape!r}"
            )
        object.__setattr__(self, "input_shape", tuple(int(s) for s in shape))
        try:
            layers = tuple(self.layers)
        except TypeError:
            raise ValueError(f"layers must be a sequence of layers, got {self.layers!r}") from None
        if not layers:
            raise ValueError("layers must not be empty")
        for i, layer in enumerate(layers, start=1):
            if not isinstance(layer, LAYER_TYPES):
                raise ValueError(
                    f"layer {i} must be a Dense, Conv1D or Flatten, got {layer!r:.80}"
                )
        object.__setattr__(self, "layers", layers)
        self._check_structure()

    def _check_structure(self) -> None:
        *hidden, last = self.layers
        if not isinstance(last, Dense):
            raise ValueError(f"the last layer must be Dense, got {last!r}")
        for i, layer in enumerate(hidden, start=1):
            if isinstance(layer, Dense) and layer.activation not in HIDDEN_ACTIVATIONS:
                raise ValueError(
                    f"layer {i} ({layer!r}) is hidden: its activation must be one of "
                    f"{', '.join(HIDDEN_ACTIVATIONS)}"
                )
        shape = self.input_shape
        for i, layer in enumerate(self.layers, start=1):
            try:
                shape = layer.output_shape(shape)
            except ValueError as e:
                raise ValueError(f"layer {i}: {e}") from None
        _check_head(last.activation, last.units, self.loss)

    @property
    def output(self) -> str:
        """The output layer's activation."""
        return self.layers[-1].activation


AnyNet = MLP | Network


def _w_b(key, scheme, w_shape, n_in, n_out, dtype):
    """``(w, b)`` of one layer; ``n_in``, ``n_out``: its fan-in and fan-out."""
    kw, kb = jax.random.split(key)
    n_b = w_shape[-1]
    normal = lambda k, shape: jax.random.normal(k, shape, dtype)
    uniform = lambda k, shape, lim: jax.random.uniform(k, shape, dtype, -lim, lim)
    zeros_b = jnp.zeros((n_b,), dtype)
    if scheme == "xavier_normal":
        return normal(kw, w_shape) * math.sqrt(2.0 / (n_in + n_out)), zeros_b
    if scheme == "xavier_uniform":
        return uniform(kw, w_shape, math.sqrt(6.0 / (n_in + n_out))), zeros_b
    if scheme == "he_normal":
        return normal(kw, w_shape) * math.sqrt(2.0 / n_in), zeros_b
    if scheme == "he_uniform":
        return uniform(kw, w_shape, math.sqrt(6.0 / n_in)), zeros_b
    if scheme == "lecun_normal":
        return normal(kw, w_shape) * math.sqrt(1.0 / n_in), zeros_b
    if scheme == "nielsen":
        return normal(kw, w_shape) / math.sqrt(n_in), normal(kb, (n_b,))
    if scheme == "normal":
        return normal(kw, w_shape), normal(kb, (n_b,))
    return jnp.zeros(w_shape, dtype), zeros_b  # "zeros"


def init(key: jax.Array, net: AnyNet, scheme: str = "he_normal", dtype: Any = None) -> Params:
    """Draws initial parameters.

    Schemes (n_in, n_out: the layer's fan-in and fan-out; plain, untruncated distributions):

    * ``xavier_normal``: w ~ N(0, 2/(n_in+n_out)); ``xavier_uniform``: w ~ U(±√(6/(n_in+n_out))).
    * ``he_normal``: w ~ N(0, 2/n_in); ``he_uniform``: w ~ U(±√(6/n_in)).
    * ``lecun_normal``: w ~ N(0, 1/n_in).
    * ``nielsen``: w ~ N(0, 1/n_in), b ~ N(0, 1) (Nielsen's ``network2.py``).
    * ``normal``: w, b ~ N(0, 1) (the "large" initialisation that saturates sigmoid units).
    * ``zeros``: everything 0 (to show the symmetry problem).

    Dense: n_in, n_out are the widths; Conv1D: ``n_in = k·c_in``, ``n_out = k·c_out`` (each
    output sees k·c_in inputs). Biases are zero unless the scheme says otherwise. Layer l draws
    from the l-th of ``jax.random.split(key, L)``.

    Args:
      key: a PRNG key (``jax.random.key(seed)``).
      net: the network.
      scheme: one of :data:`INIT_SCHEMES`.
      dtype: a floating dtype; default JAX's default float (float64 under ``jax_enable_x64``,
        else float32).

    Returns:
      A list with one dict per layer: ``{"w", "b"}``, or ``{}`` for a Flatten.
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; allowed: {', '.join(INIT_SCHEMES)}")
    dtype = jax.dtypes.canonicalize_dtype(float) if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    checks.check_key(key)
    keys = jax.random.split(key, net.num_layers)
    params = []
    for k, layer, shape in zip(keys, net.layers, net.shapes):
        p_shapes = layer.param_shapes(shape)
        if not p_shapes:
            params.append({})
            continue
        w, b = _w_b(k, scheme, p_shapes["w"], *layer.fans(shape), dtype)
        params.append({"w": w, "b": b})
    return params


def param_dtype(params: Params) -> jnp.dtype:
    """The dtype of the parameters (that of the first weight array)."""
    return next(p["w"].dtype for p in params if p)


def check_params(net: AnyNet, params: Params) -> None:
    """Raises ``ValueError`` unless ``params`` has the layout and shapes that ``net`` needs."""
    if not isinstance(params, (list, tuple)) or len(params) != net.num_layers:
        n = len(params) if isinstance(params, (list, tuple)) else type(params).__name__
        raise ValueError(f"params must be a list of {net.num_layers} layer dicts, got {n}")
    for l, (p, layer, shape) in enumerate(zip(params, net.layers, net.shapes), start=1):
        want = layer.param_shapes(shape)
        if not want:
            if not isinstance(p, dict) or p:
                raise ValueError(f"layer {l} (Flatten) has no parameters: its entry must be {{}}, "
                                 f"got {p!r:.80}")
            continue
        if not isinstance(p, dict) or set(p) != {"w", "b"}:
            raise ValueError(f"layer {l} params must be a dict with keys 'w' and 'b', got {p!r:.80}")
        if jnp.shape(p["w"]) != want["w"] or jnp.shape(p["b"]) != want["b"]:
            raise ValueError(
                f"layer {l} expects w {want['w']} and b {want['b']}, "
                f"got w {jnp.shape(p['w'])} and b {jnp.shape(p['b'])}"
            )


def check_inputs(net: AnyNet, x: jax.Array) -> None:
    """Raises ``ValueError`` unless ``x`` is a numeric ``(B, *input_shape)`` batch with B ≥ 1."""
    want = f"(B, {', '.join(map(str, net.input_shape))})"
    checks.check_numeric(x, "x", f"a numeric array of shape {want}")
    shape = jnp.shape(x)
    if len(shape) != 1 + len(net.input_shape) or shape[1:] != net.input_shape or shape[0] < 1:
        raise ValueError(f"x must have shape {want} with B ≥ 1, got {shape}")


def dropout_masks(
    net: AnyNet, key: jax.Array | None, rate: float, batch: int, dtype: Any
) -> tuple[jax.Array | None, ...] | None:
    """Inverted-dropout masks for the hidden Dense layers, already scaled by 1/(1 − rate).

    Args:
      net: the network.
      key: PRNG key; required when ``rate > 0``.
      rate: probability of dropping a hidden unit, in [0, 1). Traced: a rate outside [0, 1)
        (or NaN) makes every mask NaN.
      batch: batch size B.
      dtype: dtype of the masks.

    Returns:
      ``None`` when there is no dropout (rate 0 or no hidden Dense layer), else one entry per
      hidden layer l = 1..L−1: a ``(B, n_l)`` mask for a Dense layer (each entry 0 or
      1/(1 − rate)), ``None`` for a Conv1D or Flatten (no dropout there). Layer l draws from
      the l-th of ``jax.random.split(key, L − 1)``.

    Raises:
      ValueError: rate ∉ [0, 1), or rate > 0 without a key.
    """
    ok = checks.scalar_rule(rate, "dropout rate", "in [0, 1)", lambda r: (r >= 0) & (r < 1))
    if ok is None:
        if float(rate) == 0.0:
            return None
        if key is None:
            raise ValueError(f"dropout={float(rate)} needs a PRNG key (key=...)")
    elif key is None:
        raise ValueError("a traced dropout rate needs a PRNG key (key=...)")
    checks.check_key(key)
    hidden = [isinstance(layer, Dense) for layer in net.layers[:-1]]
    if not any(hidden):
        return None
    keep = 1.0 - rate
    keys = jax.random.split(key, net.num_layers - 1)
    return tuple(
        checks.nan_unless(ok, jax.random.bernoulli(k, keep, (batch, *shape)).astype(dtype)
                          / jnp.asarray(keep, dtype)) if dense else None
        for k, dense, shape in zip(keys, hidden, net.shapes[1:-1])
    )


class ForwardTrace(NamedTuple):
    """What the forward pass keeps for the backward pass.

    Attributes:
      z: pre-activations ``z^1 .. z^L``, one per layer: ``(B, n_l)`` for Dense, ``(B, T, c)``
        for Conv1D, the flattened output ``(B, L·c)`` for Flatten.
      h: activation outputs ``f(z^1) .. f(z^L)`` before dropout (``z`` for a Flatten).
      a: ``a^0 = x``, then each layer's output as fed to the next layer (``h^l`` times the dropout
        mask for hidden Dense layers), ``a^L = h^L``: L + 1 arrays of shapes
        ``(B, *net.shapes[l])``.
      masks: the dropout masks (see :func:`dropout_masks`) or ``None``.
    """

    z: tuple[jax.Array, ...]
    h: tuple[jax.Array, ...]
    a: tuple[jax.Array, ...]
    masks: tuple[jax.Array | None, ...] | None


def forward_trace(
    net: AnyNet, params: Params, x: jax.Array, masks: tuple[jax.Array | None, ...] | None = None
) -> ForwardTrace:
    """Forward pass keeping every ``z^l`` and ``a^l`` (with dropout masks applied if given).

    Args:
      net: the network.
      params: its parameters.
      x: inputs ``(B, *net.input_shape)``.
      masks: optional dropout masks from :func:`dropout_masks`.

    Returns:
      A :class:`ForwardTrace`.
    """
    check_params(net, params)
    check_inputs(net, x)
    return _forward_trace(net, params, x, masks)


def _forward_trace(net: AnyNet, params: Params, x: jax.Array, masks) -> ForwardTrace:
    """:func:`forward_trace` without the checks: the maths only."""
    a = jnp.asarray(x, param_dtype(params))
    zs, hs, as_ = [], [], [a]
    for l, (layer, p) in enumerate(zip(net.layers, params), start=1):
        z = layer.forward(p, a)
        act = net.activation(l)
        h = z if act is None else act.fn(z)
        mask = masks[l - 1] if masks is not None and l < net.num_layers else None
        a = h if mask is None else h * mask
        zs.append(z)
        hs.append(h)
        as_.append(a)
    return ForwardTrace(tuple(zs), tuple(hs), tuple(as_), masks)


def forward(net: AnyNet, params: Params, x: jax.Array) -> jax.Array:
    """Output activations ``a^L`` of shape ``(B, n_L)`` (inference: no dropout)."""
    check_params(net, params)
    check_inputs(net, x)
    return _forward_trace(net, params, x, None).a[-1]
