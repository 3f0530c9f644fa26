"""Will the run fit? An estimate of its device memory, made before anything is allocated.

The estimate adds up, in the run's dtype, what the compiled programs hold at their peak: the
parameters with their gradient, update and optimizer slots; one step's forward trace and deltas
(from the shapes of :func:`fnbackprop.forward_trace`, traced with ``jax.eval_shape``, so nothing
is allocated); the data sets on the device; and the evaluation's forward pass over the largest
set at once. It is a lower bound on what XLA needs, so refusing above it never refuses a run that
would fit.
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fnbackprop.network import forward_trace, init

__all__ = ["MemoryEstimate", "estimate", "available_bytes", "check_fits", "OPTIMIZER_SLOTS"]

OPTIMIZER_SLOTS = {"sgd": 0, "momentum": 1, "nesterov": 1, "adam": 2, "rmsprop": 1}
"""Arrays of the parameters' size each optimiser keeps."""


class MemoryEstimate(NamedTuple):
    """Bytes of a run's peak memory by kind (see the module docstring)."""

    params: int
    step: int
    data: int
    evaluation: int

    @property
    def total(self) -> int:
        return self.params + self.step + self.data + self.evaluation


def _bytes(tree) -> int:
    return sum(math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
               for s in jax.tree_util.tree_leaves(tree))


def _trace_bytes(net: Any, params, rows: int, dtype) -> int:
    x = jax.ShapeDtypeStruct((rows, *net.input_shape), dtype)
    return _bytes(jax.eval_shape(lambda p, x_: forward_trace(net, p, x_), params, x))


def estimate(net: Any, dtype, *, batch: int, optimizer: str, set_rows: tuple[int, ...],
             features: int) -> MemoryEstimate:
    """The memory estimate of training ``net`` (see the module docstring).

    Args:
      net: the network.
      dtype: the floating dtype.
      batch: rows of one step.
      optimizer: the optimiser's name (its slots, :data:`OPTIMIZER_SLOTS`).
      set_rows: rows of every data set kept on the device (train, validation, test).
      features: input numbers per example.
    """
    params = jax.eval_shape(lambda k: init(k, net, "zeros", dtype), jax.random.key(0))
    p = _bytes(params)
    step = 2 * _trace_bytes(net, params, batch, dtype)  # the trace, and a delta per layer
    data = sum(set_rows) * (features + 1) * jnp.dtype(dtype).itemsize
    evaluation = _trace_bytes(net, params, max(set_rows), dtype)
    return MemoryEstimate((3 + OPTIMIZER_SLOTS.get(optimizer, 2)) * p, step, data, evaluation)


def available_bytes(device: jax.Device) -> int | None:
    """Memory the device can still allocate (``None`` when unknown).

    Accelerators report it through ``memory_stats()``; for the CPU it is the host's available
    memory (``MemAvailable`` of ``/proc/meminfo``, else the physical memory).
    """
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if device.platform != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gb(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def check_fits(est: MemoryEstimate, device: jax.Device) -> None:
    """Raises ``ValueError`` when ``est`` exceeds what ``device`` has available."""
    free = available_bytes(device)
    if free is None or est.total <= free:
        return
    raise ValueError(
        f"this run needs at least {_gb(est.total)} of memory (parameters and optimizer "
        f"{_gb(est.params)}, one step {_gb(est.step)}, data {_gb(est.data)}, evaluation "
        f"{_gb(est.evaluation)}) but {device.platform}:{device.id} has {_gb(free)} available; "
        "use narrower layers or a smaller batch size"
    )
