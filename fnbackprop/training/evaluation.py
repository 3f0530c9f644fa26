"""Evaluation of a network on whole data sets: the data loss and accuracy (or R²)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from fnbackprop.losses import per_example_loss, prepare_targets
from fnbackprop.network import Params, forward_trace

__all__ = ["evaluate", "compile_evaluate"]


def evaluate(net: Any, task: str, params: Params, sets) -> tuple:
    """``((loss, metric), ...)`` of ``params`` on each ``(x, y)`` of ``sets`` (``x`` flat,
    ``(N, features)``, reshaped to the network's input shape).

    ``loss``: the mean data loss (no penalty, no dropout); ``metric``: accuracy for
    classification, ``R² = 1 − Σ(y − a)² / Σ(y − ȳ)²`` for regression.
    """

    def one(x, y):
        out = forward_trace(net, params, x.reshape((x.shape[0], *net.input_shape)))
        a = out.a[-1]
        y_t = prepare_targets(net, y, x.shape[0], a.dtype)
        loss = jnp.mean(per_example_loss(net, out.z[-1], a, y_t))
        if task == "classification":
            return loss, jnp.mean((jnp.argmax(a, axis=1) == y).astype(a.dtype))
        residual = jnp.sum((y_t - a) ** 2)
        total = jnp.sum((y_t - jnp.mean(y_t, axis=0)[None, :]) ** 2)
        return loss, 1.0 - residual / total

    return tuple(one(x, y) for x, y in sets)


@functools.partial(jax.jit, static_argnames=("net", "task"))
def _evaluate_jit(params, sets, *, net, task):
    return evaluate(net, task, params, sets)


def compile_evaluate(net: Any, task: str, params: Params, sets):
    """:func:`evaluate` compiled ahead of time for these shapes: ``f(params, sets)``."""
    return _evaluate_jit.lower(params, sets, net=net, task=task).compile()
