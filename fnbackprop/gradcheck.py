"""Gradient checking: hand-derived gradient vs ``jax.grad`` vs central finite differences."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fnbackprop.backprop import autodiff_grad, manual_grad
from fnbackprop.losses import check_regularisation, loss, prepare_targets
from fnbackprop.network import MLP, Params, check_inputs, check_params

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
    entries (all, or a random subset for large arrays).
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

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return {
            "passed": self.passed,
            "dtype": self.dtype,
            "tol_autodiff": self.tol_autodiff,
            "tol_fd": self.tol_fd,
            "fd_step": self.fd_step,
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }

    def __str__(self) -> str:
        head = (
            f"{'layer':>5} {'param':>5} {'shape':>12} {'abs(manual-grad)':>17} "
            f"{'rel(manual-grad)':>17} {'abs(vs FD)':>11} {'rel(vs FD)':>11} {'FD n':>6}  ok"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.layer:>5} {r.param:>5} {str(r.shape):>12} {r.abs_autodiff:>17.3e} "
                f"{r.rel_autodiff:>17.3e} {r.abs_fd:>11.3e} {r.rel_fd:>11.3e} {r.fd_checked:>6}  "
                f"{'yes' if r.passed else 'NO'}"
            )
        lines.append(
            f"dtype {self.dtype}; tolerances: manual vs jax.grad rel ≤ {self.tol_autodiff:g}, "
            f"vs finite differences (step {self.fd_step:.1e}) rel ≤ {self.tol_fd:g}; "
            f"{'PASSED' if self.passed else 'FAILED'}"
        )
        return "\n".join(lines)


def _rel(err: float, ref_scale: float) -> float:
    return err / ref_scale if ref_scale > 0 else (0.0 if err == 0 else float("inf"))


def check_gradients(
    net: MLP,
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
      fd_key: PRNG key of that subset (default ``jax.random.key(0)``).
      tol_autodiff, tol_fd: relative tolerances; default :func:`default_tolerances` of the
        parameters' dtype.

    Returns:
      A :class:`GradCheckReport` with one row per layer and parameter.
    """
    if max_fd_per_param < 1:
        raise ValueError(f"max_fd_per_param must be ≥ 1, got {max_fd_per_param}")
    # Bad inputs raise their ValueError here, before any work (and before params[0] is read).
    check_regularisation(l1, l2)
    check_params(net, params)
    check_inputs(net, x)
    prepare_targets(net, y, x.shape[0], params[0]["w"].dtype)
    grad_fn = manual_grad if grad_fn is None else grad_fn
    kw = dict(l1=l1, l2=l2, dropout=dropout, key=key)
    dtype = jnp.dtype(params[0]["w"].dtype)
    tols = default_tolerances(dtype)
    tol_autodiff = tols["autodiff"] if tol_autodiff is None else tol_autodiff
    tol_fd = tols["fd"] if tol_fd is None else tol_fd

    # Jitted: one compile each instead of compiling every primitive eagerly (several times
    # faster cold). The keywords are closed over, so they stay concrete; y was checked above.
    g_manual = jax.jit(lambda p, x, y: grad_fn(net, p, x, y, **kw))(params, x, y)
    g_auto = jax.jit(lambda p, x, y: autodiff_grad(net, p, x, y, **kw))(params, x, y)

    flat, unravel = ravel_pytree(params)
    loss_flat = jax.jit(lambda f: loss(net, unravel(f), x, y, **kw))
    step = float(np.finfo(dtype).eps ** (1 / 3))

    # Choose which flat entries get finite differences, per parameter array.
    leaves_with_path = []
    fd_key = jax.random.key(0) if fd_key is None else fd_key
    for l, p in enumerate(params, start=1):
        for name in ("w", "b"):
            size = int(np.prod(p[name].shape))
            fd_key, sub = jax.random.split(fd_key)
            if size <= max_fd_per_param:
                idx = np.arange(size)
            else:
                idx = np.sort(np.asarray(jax.random.choice(sub, size, (max_fd_per_param,), replace=False)))
            leaves_with_path.append((l, name, p[name].shape, idx))
    # ravel_pytree flattens dicts in sorted-key order: "b" before "w" within a layer.
    flat_offsets = {}
    pos = 0
    for l, p in enumerate(params, start=1):
        for name in sorted(p):
            flat_offsets[(l, name)] = pos
            pos += int(np.prod(p[name].shape))
    all_idx = np.concatenate(
        [flat_offsets[(l, n)] + idx for l, n, _, idx in leaves_with_path]
    )

    h_all = step * np.maximum(1.0, np.abs(np.asarray(flat)[all_idx]))

    def central(i, h):
        e = jnp.zeros_like(flat).at[i].set(h)
        return (loss_flat(flat + e) - loss_flat(flat - e)) / (2 * h)

    fd_vals = np.asarray(
        jax.lax.map(lambda ih: central(ih[0], ih[1]),
                    (jnp.asarray(all_idx), jnp.asarray(h_all, dtype)), batch_size=64)
    )

    rows = []
    k = 0
    for l, name, shape, idx in leaves_with_path:
        m = np.asarray(g_manual[l - 1][name]).reshape(-1)
        a = np.asarray(g_auto[l - 1][name]).reshape(-1)
        fd = fd_vals[k:k + len(idx)]
        k += len(idx)
        scale = float(np.max(np.abs(a))) if a.size else 0.0
        abs_ad = float(np.max(np.abs(m - a))) if a.size else 0.0
        abs_fd = float(max(np.max(np.abs(m[idx] - fd)), np.max(np.abs(a[idx] - fd)))) if idx.size else 0.0
        fd_scale = max(scale, float(np.max(np.abs(fd))) if fd.size else 0.0)
        rel_ad = _rel(abs_ad, scale)
        rel_fd = _rel(abs_fd, fd_scale)
        ok = bool(np.all(np.isfinite(m))) and rel_ad <= tol_autodiff and rel_fd <= tol_fd
        rows.append(GradCheckRow(l, name, tuple(shape), abs_ad, rel_ad, abs_fd, rel_fd, len(idx), ok))
    return GradCheckReport(tuple(rows), str(dtype), tol_autodiff, tol_fd, step)
