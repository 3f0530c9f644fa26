"""Gradient checking: hand-derived gradient vs ``jax.grad`` vs central finite differences.

Central differences estimate a derivative only where the loss is smooth between θ − h and θ + h.
Where an entry's ±h step moves some pre-activation of a relu, leaky_relu or elu layer across 0
(a kink), the difference quotient mixes two slopes: such entries are skipped and counted
(``fd_kinks``) rather than compared, so a correct gradient does not fail on them. The comparison
with ``jax.grad`` covers every entry regardless, so a wrong gradient still fails.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fnbackprop.activations import KINKED_ACTIVATIONS
from fnbackprop.backprop import autodiff_grad, manual_grad
from fnbackprop.losses import _objective, check_regularisation, prepare_targets
from fnbackprop.network import (
    AnyNet,
    Params,
    check_inputs,
    check_params,
    dropout_masks,
    param_dtype,
)

__all__ = ["GradCheckRow", "GradCheckReport", "check_gradients", "default_tolerances"]


def default_tolerances(dtype: Any) -> dict[str, float]:
    """Relative tolerances for a dtype.

    ``autodiff``: manual vs ``jax.grad`` (the same arithmetic in another order: a few ulps);
    ``fd``: both vs central differences, whose truncation and rounding error is about
    ``eps^(2/3)`` of the gradient's scale.
    """
    if jnp.dtype(dtype) == jnp.float64:
        return {"autodiff": 1e-10, "fd": 1e-5}
    return {"autodiff": 1e-4, "fd": 1e-2}


@dataclasses.dataclass(frozen=True)
class GradCheckRow:
    """The comparison for one parameter array (layer ``layer``, ``"w"`` or ``"b"``).

    Errors are maxima over the array's entries; a relative error is the max absolute error
    divided by the largest ``|reference|`` entry of the array (so an all-small array cannot
    hide behind a tiny denominator). The finite-difference columns cover ``fd_checked``
    entries (all, or a random subset for large arrays); ``fd_kinks`` further entries of that
    subset were skipped because their ±h step crosses a kink.
    """

    layer: int
    param: str
    shape: tuple[int, ...]
    abs_autodiff: float
    rel_autodiff: float
    abs_fd: float
    rel_fd: float
    fd_checked: int
    passed: bool
    fd_kinks: int = 0


@dataclasses.dataclass(frozen=True)
class GradCheckReport:
    """Result of :func:`check_gradients`; ``str(report)`` is a table."""

    rows: tuple[GradCheckRow, ...]
    dtype: str
    tol_autodiff: float
    tol_fd: float
    fd_step: float

    @property
    def passed(self) -> bool:
        """Whether every row passed."""
        return all(r.passed for r in self.rows)

    @property
    def max_rel_autodiff(self) -> float:
        return max(r.rel_autodiff for r in self.rows)

    @property
    def max_rel_fd(self) -> float:
        return max(r.rel_fd for r in self.rows)

    @property
    def fd_kinks(self) -> int:
        """Finite differences skipped because the step crosses a kink, over all rows."""
        return sum(r.fd_kinks for r in self.rows)

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {
            "passed": self.passed,
            "dtype": self.dtype,
            "tol_autodiff": self.tol_autodiff,
            "tol_fd": self.tol_fd,
            "fd_step": self.fd_step,
            "fd_kinks": self.fd_kinks,
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }

    def __str__(self) -> str:
        head = (
            f"{'layer':>5} {'param':>5} {'shape':>12} {'abs(manual-grad)':>17} "
            f"{'rel(manual-grad)':>17} {'abs(vs FD)':>11} {'rel(vs FD)':>11} {'FD n':>6} "
            f"{'kinks':>5}  ok"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.layer:>5} {r.param:>5} {str(r.shape):>12} {r.abs_autodiff:>17.3e} "
                f"{r.rel_autodiff:>17.3e} {r.abs_fd:>11.3e} {r.rel_fd:>11.3e} {r.fd_checked:>6} "
                f"{r.fd_kinks:>5}  {'yes' if r.passed else 'NO'}"
            )
        kinks = (f"; {self.fd_kinks} finite differences skipped: the ±h step crosses a kink "
                 "(relu/leaky_relu/elu at 0)" if self.fd_kinks else "")
        lines.append(
            f"dtype {self.dtype}; tolerances: manual vs jax.grad rel ≤ {self.tol_autodiff:g}, "
            f"vs finite differences (step {self.fd_step:.1e}) rel ≤ {self.tol_fd:g}{kinks}; "
            f"{'PASSED' if self.passed else 'FAILED'}"
        )
        return "\n".join(lines)


def _rel(err: float, ref_scale: float) -> float:
    return err / ref_scale if ref_scale > 0 else (0.0 if err == 0 else float("inf"))


def _fd_subset(params: Params, max_fd_per_param: int, fd_key) -> list:
    """``(layer, name, shape, flat offset, entry indices)`` of the entries to difference.

    ``ravel_pytree`` flattens each layer's dict in sorted-key order: ``"b"`` before ``"w"``.
    """
    out, pos = [], 0
    for l, p in enumerate(params, start=1):
        offsets = {}
        for name in sorted(p):
            offsets[name] = pos
            pos += int(np.prod(p[name].shape))
        for name in ("w", "b") if p else ():
            size = int(np.prod(p[name].shape))
            fd_key, sub = jax.random.split(fd_key)
            if size <= max_fd_per_param:
                idx = np.arange(size)
            else:
                idx = np.sort(np.asarray(jax.random.choice(sub, size, (max_fd_per_param,), replace=False)))
            out.append((l, name, p[name].shape, offsets[name], idx))
    return out


def check_gradients(
    net: AnyNet,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    *,
    l1: float = 0.0,
    l2: float = 0.0,
    dropout: float = 0.0,
    key: jax.Array | None = None,
    grad_fn: Callable[..., Params] | None = None,
    max_fd_per_param: int = 64,
    fd_key: jax.Array | None = None,
    tol_autodiff: float | None = None,
    tol_fd: float | None = None,
) -> GradCheckReport:
    """Compares the hand-derived gradient with ``jax.grad`` and with central differences.

    Args:
      net, params, x, y, l1, l2, dropout, key: as for :func:`fnbackprop.loss`.
      grad_fn: the gradient to check, called like :func:`fnbackprop.manual_grad` (the default).
      max_fd_per_param: finite differences for at most this many entries of each parameter
        array (a random subset drawn with ``fd_key``; all entries when the array is smaller).
        Entries whose ±h step crosses a kink are skipped and counted in ``fd_kinks``.
      fd_key: PRNG key of that subset (default ``jax.random.key(0)``).
      tol_autodiff, tol_fd: relative tolerances; default :func:`default_tolerances` of the
        parameters' dtype.

    Returns:
      A :class:`GradCheckReport` with one row per parameter array (layers without parameters,
      such as Flatten, have none; ``layer`` is the 1-based index in ``net.layers``).
    """
    if max_fd_per_param < 1:
        raise ValueError(f"max_fd_per_param must be ≥ 1, got {max_fd_per_param}")
    # Bad inputs raise their ValueError here, before any work.
    check_regularisation(l1, l2)
    check_params(net, params)
    check_inputs(net, x)
    dtype = jnp.dtype(param_dtype(params))
    y_t = prepare_targets(net, y, x.shape[0], dtype)
    masks = dropout_masks(net, key, dropout, x.shape[0], dtype)  # the masks loss() draws
    grad_fn = manual_grad if grad_fn is None else grad_fn
    kw = dict(l1=l1, l2=l2, dropout=dropout, key=key)
    tols = default_tolerances(dtype)
    tol_autodiff = tols["autodiff"] if tol_autodiff is None else tol_autodiff
    tol_fd = tols["fd"] if tol_fd is None else tol_fd

    flat, unravel = ravel_pytree(params)
    kinked = [l for l, layer in enumerate(net.layers) if layer.activation in KINKED_ACTIVATIONS]

    def value_and_signs(f):
        value, trace = _objective(net, unravel(f), x, y_t, masks, l1, l2)
        return value, [jnp.sign(trace.z[l]) for l in kinked]

    # Jitted: one compile instead of one per primitive and shape when run eagerly. The keywords
    # are closed over, so they stay concrete; y was checked above.
    g_manual, g_auto, (_, signs0) = jax.jit(lambda p, f, x, y: (
        grad_fn(net, p, x, y, **kw), autodiff_grad(net, p, x, y, **kw), value_and_signs(f),
    ))(params, flat, x, y)

    def central(i, h):
        e = jnp.zeros_like(flat).at[i].set(h)
        (up, s_up), (down, s_down) = value_and_signs(flat + e), value_and_signs(flat - e)
        crossed = jnp.zeros((), bool)
        for s0, s1, s2 in zip(signs0, s_up, s_down):
            crossed = crossed | jnp.any(s1 != s0) | jnp.any(s2 != s0)
        return (up - down) / (2 * h), crossed

    step = float(np.finfo(dtype).eps ** (1 / 3))
    subset = _fd_subset(params, max_fd_per_param, jax.random.key(0) if fd_key is None else fd_key)
    all_idx = np.concatenate([off + idx for *_, off, idx in subset])
    h_all = step * np.maximum(1.0, np.abs(np.asarray(flat)[all_idx]))
    fd_vals, crossed = jax.lax.map(
        lambda ih: central(ih[0], ih[1]), (jnp.asarray(all_idx), jnp.asarray(h_all, dtype)),
        batch_size=64,
    )
    fd_vals, crossed = np.asarray(fd_vals), np.asarray(crossed)

    rows = []
    k = 0
    for l, name, shape, _, idx in subset:
        m = np.asarray(g_manual[l - 1][name]).reshape(-1)
        a = np.asarray(g_auto[l - 1][name]).reshape(-1)
        smooth = ~crossed[k:k + len(idx)]
        fd, idx_fd = fd_vals[k:k + len(idx)][smooth], idx[smooth]
        k += len(idx)
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        abs_ad = float(np.max(np.abs(m - a))) if a.size else 0.0
        abs_fd = (float(max(np.max(np.abs(m[idx_fd] - fd)), np.max(np.abs(a[idx_fd] - fd))))
                  if idx_fd.size else 0.0)
        fd_scale = max(scale, float(np.max(np.abs(fd))) if fd.size else 0.0)
        rel_ad = _rel(abs_ad, scale)
        rel_fd = _rel(abs_fd, fd_scale)
        ok = bool(np.all(np.isfinite(m))) and rel_ad <= tol_autodiff and rel_fd <= tol_fd
        rows.append(GradCheckRow(l, name, tuple(shape), abs_ad, rel_ad, abs_fd, rel_fd,
                                 int(idx_fd.size), ok, int(len(idx) - idx_fd.size)))
    return GradCheckReport(tuple(rows), str(dtype), tol_autodiff, tol_fd, step)
