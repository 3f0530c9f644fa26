"""The 1-D convolution, its backward rule beside its forward rule.

A convolution is a dense layer applied to every window. For one example with input ``a``
``(L, c_in)`` (channels last), kernel ``W`` ``(k, c_in, c_out)``, stride ``s`` and ``p_lo`` zeros
of padding on the left, output position t sees the window
``u_t = (a_{st−p_lo}, …, a_{st−p_lo+k−1})`` flattened to ``k·c_in`` numbers (zeros outside
``[0, L)``); with ``W_flat`` ``(k·c_in, c_out)`` the kernel flattened the same way:

* forward: ``z_t = u_t W_flat + b = Σ_j a_{st+j−p_lo} W_j + b`` (``W_j``: tap j,
  ``(c_in, c_out)``); on the batch, with the windows ``U`` ``(B, T, k·c_in)``: ``z = U W_flat + b``;
* backward, given ``δ = ∂L/∂z`` ``(B, T, c_out)``:

  - ``∂L/∂W_flat = Σ_{i,t} u_{i,t} δ_{i,t}ᵀ = Uᵀ δ``: the dense rule ``aᵀδ``
    (:func:`fnbackprop.layers.dense.weight_grad`) with the batch extended over the positions;
  - ``∂L/∂b = Σ_{i,t} δ_{i,t}``;
  - ``∂L/∂a_v = Σ_j δ̃_{v+p_lo−j} W_jᵀ``: the transposed convolution, i.e. the correlation of
    ``δ̃`` (δ dilated by the stride: ``δ̃_{st} = δ_t``, zeros between) with the flipped kernel
    ``W_{k−1−j}ᵀ``, padded so that the result has the input's length L;

* per example: ``G_i = ∂ℓ_i/∂W_flat = Σ_t u_{i,t} δ_{i,t}ᵀ``, with
  ``‖G_i‖² = Σ_{t,t'} (u_{i,t}·u_{i,t'}) (δ_{i,t}·δ_{i,t'})`` ("ghost": two T × T Gram
  matrices) or the norm of ``G_i`` itself (k·c_in·c_out numbers): :meth:`Conv1D.norm_method`
  picks the smaller, statically (Li et al. 2022); a dense layer is the case T = 1.

The output is exactly that of ``lax.conv_general_dilated(a, W, (s,), padding,
dimension_numbers=("NWC", "WIO", "NWC")) + b`` for ``padding="SAME"`` and ``"VALID"``.

Two implementations of the same sums, chosen by :func:`implementation` when a function is
traced:

* ``"unfold"`` (CPU): the windows as strided slices, then one matmul each for ``z``, ``∂W``
  (:func:`~fnbackprop.layers.dense.weight_grad` on the windows) and ``δ W_flatᵀ`` (every tap's
  contribution to the input gradient), whose taps are then dilated by the stride, shifted by j
  and summed (``lax.pad`` with interior padding): the transposed convolution, computed
  matmul-first. XLA's CPU convolutions, the weight-gradient one above all, are slow inside a
  ``lax.scan`` over batches (an epoch on device, as ``fb.train`` runs it); matmuls are not
  (``scripts/bench_conv.py`` measures both).
* ``"lax"`` (GPU, TPU): ``lax.conv_general_dilated`` for the forward rule, the transposed
  convolution (``lhs_dilation=s``) and the weight gradient (``rhs_dilation=s``, the batch as
  the contracted feature axis): the same convolutions ``jax.grad`` emits (cuDNN on GPU), so the
  hand-derived step does the same work as ``jax.grad`` there.

The environment variable ``FNBACKPROP_CONV1D=unfold|lax`` overrides the choice (for
benchmarks and tests); it is read when a function is traced, so a jitted function keeps the
implementation it was compiled with.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
from jax import lax

from fnbackprop.activations import HIDDEN_ACTIVATIONS
from fnbackprop.layers.dense import check_int, view_norm_sq, weight_grad

__all__ = ["Conv1D", "PADDINGS", "IMPLEMENTATIONS", "implementation", "geometry", "windows"]

PADDINGS: tuple[str, ...] = ("SAME", "VALID")
IMPLEMENTATIONS: tuple[str, ...] = ("unfold", "lax")
_ENV = "FNBACKPROP_CONV1D"
_DIMS = ("NWC", "WIO", "NWC")


def implementation() -> str:
    """``"unfold"`` on CPU, ``"lax"`` elsewhere, unless ``FNBACKPROP_CONV1D`` says otherwise."""
    env = os.environ.get(_ENV, "")
    if env in ("", "auto"):
        return "unfold" if jax.default_backend() == "cpu" else "lax"
    if env not in IMPLEMENTATIONS:
        raise ValueError(
            f"{_ENV}={env!r} is not allowed; allowed: auto, {', '.join(IMPLEMENTATIONS)}"
        )
    return env


def geometry(length: int, kernel: int, stride: int, padding: str) -> tuple[int, int, int]:
    """``(T, p_lo, p_hi)``: output length and the zeros padded left and right, as ``lax`` does.

    SAME: ``T = ⌈L/s⌉``, total padding ``max((T−1)s + k − L, 0)``, the smaller half on the left.
    VALID: ``T = ⌊(L−k)/s⌋ + 1``, no padding (positions after the last full window are unused).
    """
    if padding == "SAME":
        t = -(-length // stride)
        total = max((t - 1) * stride + kernel - length, 0)
        return t, total // 2, total - total // 2
    return (length - kernel) // stride + 1, 0, 0


def windows(a: jax.Array, kernel: int, stride: int, pad_lo: int, pad_hi: int, t: int) -> jax.Array:
    """The windows ``U`` ``(B, T, k·c_in)`` of ``a`` ``(B, L, c_in)``: entry ``[i, t, j·c_in + c]``
    is ``a[i, st + j − p_lo, c]`` (zero in the padding)."""
    ap = jnp.pad(a, ((0, 0), (pad_lo, pad_hi), (0, 0)))
    span = stride * (t - 1) + 1
    return jnp.concatenate([ap[:, j : j + span : stride, :] for j in range(kernel)], axis=2)


@dataclasses.dataclass(frozen=True)
class Conv1D:
    """A 1-D convolution over ``(length, channels)`` inputs, then the activation. Frozen, hashable.

    Attributes:
      channels: output channels c_out ≥ 1.
      kernel: kernel size k ≥ 1.
      stride: stride s ≥ 1.
      padding: ``"SAME"`` (output length ⌈L/s⌉) or ``"VALID"`` (only full windows).
      activation: one of :data:`fnbackprop.HIDDEN_ACTIVATIONS` (a convolution is never the last
        layer).

    Parameters: ``{"w": (k, c_in, c_out), "b": (c_out,)}``; fan-in ``k·c_in``, fan-out
    ``k·c_out``.
    """

    channels: int
    kernel: int
    stride: int = 1
    padding: str = "SAME"
    activation: str = "identity"

    def __post_init__(self):
        for field, minimum in (("channels", 1), ("kernel", 1), ("stride", 1)):
            object.__setattr__(self, field, check_int("Conv1D", field, getattr(self, field), minimum))
        if self.padding not in PADDINGS:
            raise ValueError(
                f"Conv1D: unknown padding {self.padding!r}; allowed: {', '.join(PADDINGS)}"
            )
        if self.activation not in HIDDEN_ACTIVATIONS:
            raise ValueError(
                f"Conv1D: unknown activation {self.activation!r}; allowed: "
                f"{', '.join(HIDDEN_ACTIVATIONS)}"
            )

    def _geometry(self, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
        return geometry(input_shape[0], self.kernel, self.stride, self.padding)

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """``(T, channels)``; ``ValueError`` unless the input is ``(length, channels)`` and, for
        VALID, at least one kernel long."""
        if len(input_shape) != 2:
            raise ValueError(
                f"{self} needs a (length, channels) input, got {input_shape}: a Conv1D cannot "
                "follow a Flatten or a Dense layer, and as the first layer it needs a "
                "2-D input_shape"
            )
        if self.padding == "VALID" and self.kernel > input_shape[0]:
            raise ValueError(
                f"{self}: kernel {self.kernel} is longer than its input of length "
                f"{input_shape[0]} (VALID padding needs kernel ≤ length; or use SAME)"
            )
        return self._geometry(input_shape)[0], self.channels

    def param_shapes(self, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        return {"w": (self.kernel, input_shape[1], self.channels), "b": (self.channels,)}

    def fans(self, input_shape: tuple[int, ...]) -> tuple[int, int]:
        """(fan-in, fan-out) for the initialisation schemes: ``(k·c_in, k·c_out)``."""
        return self.kernel * input_shape[1], self.kernel * self.channels

    def windows(self, a: jax.Array) -> jax.Array:
        """``U`` ``(B, T, k·c_in)`` of ``a`` ``(B, L, c_in)`` (see :func:`windows`)."""
        t, lo, hi = self._geometry(a.shape[1:])
        return windows(a, self.kernel, self.stride, lo, hi, t)

    # --- forward rule -------------------------------------------------- backward rules ------
    def forward(self, p: dict[str, jax.Array], a: jax.Array) -> jax.Array:
        """``z = U W_flat + b``: ``(B, L, c_in) -> (B, T, c_out)``."""
        b = p["b"][None, None, :]
        if implementation() == "lax":
            _, lo, hi = self._geometry(a.shape[1:])
            return lax.conv_general_dilated(a, p["w"], (self.stride,), [(lo, hi)],
                                            dimension_numbers=_DIMS) + b
        u = self.windows(a)
        batch, t, width = u.shape
        z = u.reshape(batch * t, width) @ p["w"].reshape(width, self.channels)
        return z.reshape(batch, t, self.channels) + b

    def input_grad(
        self, p: dict[str, jax.Array], delta: jax.Array, input_shape: tuple[int, ...]
    ) -> jax.Array:
        """``∂L/∂a``: the transposed convolution of ``δ`` ``(B, T, c_out)``; ``(B, L, c_in)``."""
        length, c_in = input_shape
        k, s = self.kernel, self.stride
        t, lo, hi = self._geometry(input_shape)
        span = s * (t - 1) + 1  # length of the dilated δ̃
        if implementation() == "lax":
            flipped = jnp.flip(p["w"], axis=0).transpose(0, 2, 1)  # W_{k−1−j}ᵀ: (k, c_out, c_in)
            pads = [(k - 1 - lo, length + lo - span)]
            return lax.conv_general_dilated(delta, flipped, (1,), pads, lhs_dilation=(s,),
                                            dimension_numbers=_DIMS)
        batch = delta.shape[0]
        taps = delta.reshape(batch * t, self.channels) @ p["w"].reshape(k * c_in, self.channels).T
        taps = taps.reshape(batch, t, k, c_in)  # taps[:, t, j] = δ_t W_jᵀ
        padded = length + lo + hi
        zero = jnp.zeros((), delta.dtype)
        total = sum(  # tap j of δ_t lands on padded position st + j: dilate by s, shift by j
            lax.pad(taps[:, :, j, :], zero, ((0, 0, 0), (j, padded - j - span, s - 1), (0, 0, 0)))
            for j in range(k)
        )
        return total[:, lo : lo + length, :]

    def grads(self, a: jax.Array, delta: jax.Array) -> dict[str, jax.Array]:
        """``{"w": Σ_{i,t} u_{i,t} δ_{i,t}ᵀ (k, c_in, c_out), "b": Σ_{i,t} δ_{i,t}}``."""
        k, c_in = self.kernel, a.shape[2]
        if implementation() == "lax":
            t, lo, hi = self._geometry(a.shape[1:])
            extra = a.shape[1] + lo + hi - self.stride * (t - 1) - k  # unused trailing positions
            dw = lax.conv_general_dilated(  # the batch is the contracted feature axis
                a, delta, (1,), [(lo, hi - extra)], rhs_dilation=(self.stride,),
                dimension_numbers=("CWN", "IWO", "NWC"),
            ).transpose(1, 0, 2)
        else:
            u = self.windows(a)
            n = u.shape[0] * u.shape[1]
            dw = weight_grad(u.reshape(n, k * c_in), delta.reshape(n, self.channels))
            dw = dw.reshape(k, c_in, self.channels)
        return {"w": dw, "b": jnp.sum(delta, axis=(0, 1))}

    def norm_method(self, input_shape: tuple[int, ...]) -> str:
        """``"ghost"`` when two T × T Gram matrices are smaller than one ``(k·c_in, c_out)``
        gradient (``2T² < k·c_in·c_out``), else ``"materialised"``."""
        t = self._geometry(input_shape)[0]
        return "ghost" if 2 * t * t < self.kernel * input_shape[1] * self.channels else "materialised"

    def dense_view(self, a: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(U, δ)``: the windows ``(B, T, k·c_in)`` and the deltas ``(B, T, c_out)``, so that
        ``∂ℓ_i/∂W_flat = Σ_t u_{i,t} δ_{i,t}ᵀ`` and ``∂ℓ_i/∂b = Σ_t δ_{i,t}``."""
        return self.windows(a), delta

    def norm_sq(self, a: jax.Array, delta: jax.Array, method: str | None = None) -> jax.Array:
        """Per-example ``‖∂ℓ_i/∂W‖² + ‖∂ℓ_i/∂b‖²``: ``(B,)``; ``method`` default
        :meth:`norm_method`."""
        return view_norm_sq(*self.dense_view(a, delta), method or self.norm_method(a.shape[1:]))
