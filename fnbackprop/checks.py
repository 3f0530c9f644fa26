"""Argument checks that are safe under ``jax.jit``: the one place for "is this value traced?".

A value is *concrete* when it is known on the host (a Python number, a NumPy or a committed JAX
array) and *traced* when it is a placeholder under ``jit``, ``vmap`` or ``grad``. A concrete bad
value raises ``ValueError`` naming it and what is allowed, before any work. A traced value
cannot be inspected on the host, so a scalar check returns the traced condition instead; the
function that uses the value then passes it to :func:`nan_unless` on a scalar (or array) that
every entry of its result goes through, which turns the result into NaN when the condition
fails. The rule for traced arguments throughout fnbackprop:
*an invalid traced argument makes the result NaN*: never a flipped, zeroed or unclipped one.

Shapes and dtypes are static even under ``jit``, so shape and dtype checks always raise.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "is_traced",
    "concrete",
    "concrete_scalar",
    "is_concrete_zero",
    "scalar_rule",
    "all_ok",
    "nan_unless",
    "check_key",
    "check_numeric",
    "POSITIVE",
    "NON_NEGATIVE_FINITE",
    "POSITIVE_FINITE",
]


def is_traced(v: Any) -> bool:
    """Whether ``v`` is a tracer (its value is unknown on the host: under jit, vmap or grad)."""
    return isinstance(v, jax.core.Tracer)


def concrete(v: Any) -> np.ndarray | None:
    """``v`` as a NumPy array, or ``None`` when it is traced."""
    return None if is_traced(v) else np.asarray(v)


def concrete_scalar(v: Any, name: str, allowed: str) -> float | None:
    """``float(v)`` for a concrete real scalar; ``None`` when ``v`` is a traced scalar.

    Raises:
      ValueError: ``v`` is not a real scalar (a string, ``None``, a complex number, an array of
        another shape), traced or not; the message names ``name``, ``v`` and ``allowed``.
    """
    if is_traced(v):
        if jnp.shape(v) != () or not _is_real_dtype(v.dtype):
            raise ValueError(f"{name} must be {allowed}, got a traced {v.dtype} of shape {v.shape}")
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Real, np.ndarray, jax.Array)):
        raise ValueError(f"{name} must be {allowed}, got {v!r}")
    arr = np.asarray(v)
    if arr.shape != () or not _is_real_dtype(arr.dtype):
        raise ValueError(f"{name} must be {allowed}, got {v!r}")
    return float(arr)


def _is_real_dtype(dtype) -> bool:
    return bool(np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)) and (
        not np.issubdtype(dtype, np.bool_)
    )


def is_concrete_zero(v: Any) -> bool:
    """Whether ``v`` is a concrete zero (so a term it multiplies can be left out)."""
    return not is_traced(v) and bool(np.all(np.asarray(v) == 0))


# Conditions for scalar_rule: written with comparisons only, so that each works on a Python
# float and on a traced array alike, and NaN fails every one of them.
POSITIVE: Callable[[Any], Any] = lambda v: v > 0  # noqa: E731 - inf allowed
POSITIVE_FINITE: Callable[[Any], Any] = lambda v: (v > 0) & (v < math.inf)  # noqa: E731
NON_NEGATIVE_FINITE: Callable[[Any], Any] = lambda v: (v >= 0) & (v < math.inf)  # noqa: E731


def scalar_rule(v: Any, name: str, allowed: str, ok: Callable[[Any], Any]) -> jax.Array | None:
    """Checks a scalar argument against ``ok``.

    Args:
      v: the value.
      name: its name, for the message.
      allowed: what is allowed, for the message (e.g. ``"a number > 0"``).
      ok: the condition, e.g. :data:`POSITIVE`.

    Returns:
      ``None`` for a concrete value (which passed); for a traced value the traced boolean
      ``ok(v)``, to be given to :func:`nan_unless`.

    Raises:
      ValueError: ``v`` is concrete and fails ``ok``, or is not a real scalar.
    """
    c = concrete_scalar(v, name, allowed)
    if c is None:
        return ok(v)
    if not ok(c):
        raise ValueError(f"{name} must be {allowed}, got {v!r}")
    return None


def all_ok(*conditions: jax.Array | None) -> jax.Array | None:
    """The conjunction of the traced conditions among ``conditions`` (``None`` if there are none)."""
    traced = [c for c in conditions if c is not None]
    if not traced:
        return None
    out = traced[0]
    for c in traced[1:]:
        out = out & c
    return out


def nan_unless(ok: jax.Array | None, value: Any) -> Any:
    """``value`` (a scalar or an array) when ``ok`` holds, else NaN; ``ok=None`` returns ``value``
    unchanged (no operation at all for concrete, checked arguments).

    Best applied to a scalar that every entry of a result goes through (a scale, a step size),
    so that an invalid traced argument reaches the whole result at the cost of one scalar op.
    ``jnp.where``, not a multiplication: it also overrides infinities and zeros.
    """
    if ok is None:
        return value
    return jnp.where(ok, value, jnp.nan)  # NaN is weakly typed: value's dtype is kept


def check_key(key: Any, name: str = "key") -> None:
    """Raises ``ValueError`` unless ``key`` is a PRNG key, traced or not.

    Accepted: a typed key (``jax.random.key(seed)``) or a raw ``uint32`` key of shape ``(2,)``
    (``jax.random.PRNGKey(seed)``), each one key (no batch of keys).
    """
    if isinstance(key, (jax.Array, jax.core.Tracer)):
        dtype = key.dtype
        if jnp.issubdtype(dtype, jax.dtypes.prng_key) and key.shape == ():
            return
        if dtype == jnp.uint32 and key.shape == (2,):
            return
    raise ValueError(
        f"{name} must be one PRNG key such as jax.random.key(seed), got {_short(key)}"
    )


def check_numeric(v: Any, name: str, allowed: str = "a numeric array") -> None:
    """Raises ``ValueError`` unless ``v`` has a boolean, integer or floating dtype.

    For example string labels (dtype ``<U1``) or an object array.
    """
    try:
        dtype = v.dtype if isinstance(v, (jax.Array, jax.core.Tracer)) else np.asarray(v).dtype
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {allowed}, got {_short(v)}") from None
    if not (np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.bool_)) or np.issubdtype(
        dtype, np.complexfloating
    ):
        raise ValueError(f"{name} must be {allowed}, got dtype {dtype}")


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else f"{type(v).__name__} {text[:60]}…"
