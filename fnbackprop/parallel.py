"""Data parallelism with JAX's own engines: ``jax.sharding`` and ``pmap``; hosts via ``jax.distributed``.

What is replicated and what is sharded:

* parameters, optimizer state and PRNG keys are **replicated** on every device;
* every global batch ``(B, ...)`` is **sharded** along its batch axis over the mesh axis
  :data:`DATA_AXIS`. Across processes, each process feeds the rows of its own devices.

The batch gradient is a sum over examples, so a gradient computed on shards only needs the
shards' sums added up. One path per mode, each a transformation of a function whose outputs are
sums over the batch rows it is given (the training step and the tests use these same two):

* :func:`sharded` (``jax.sharding``): inside one ``jit``, the batch arguments are constrained to
  be split over the mesh and XLA partitions the unchanged computation (the batch contraction
  ``a^{l−1 ᵀ} δ^l`` becomes a local matmul plus an all-reduce). Any batch size: one the device
  count does not divide is split unevenly by XLA, exactly.
* :func:`summed_over_devices` (``pmap``): each device runs the function on its own shard and
  ``lax.psum`` adds the results. The shards must have equal sizes (see :func:`check_divisible`).

Per-example clipping is exact under both: each example's norm involves only that example's
activations and deltas, which live on one device.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA_AXIS",
    "PARALLEL_MODES",
    "data_mesh",
    "batch_sharding",
    "replicated_sharding",
    "check_divisible",
    "replicate",
    "sharded",
    "summed_over_devices",
    "initialize_distributed",
]

DATA_AXIS = "data"
PARALLEL_MODES: tuple[str, ...] = ("sharding", "pmap")


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh (axis :data:`DATA_AXIS`) over ``devices`` (default: every global device)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding that splits the leading (batch) axis of an ``ndim``-dim array over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS, *([None] * (ndim - 1))))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that puts a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def check_divisible(batch_size: int, num_devices: int) -> None:
    """Raises ``ValueError`` unless ``num_devices`` divides ``batch_size`` (pmap's shards)."""
    if num_devices < 1 or batch_size % num_devices:
        raise ValueError(
            f"global batch size {batch_size} is not divisible by the number of devices "
            f"{num_devices}; choose a batch size that is a multiple of {num_devices}"
        )


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Copies every leaf of ``tree`` to every device of ``mesh`` (also across processes)."""
    sharding = replicated_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(v):
        if jnp.issubdtype(jnp.result_type(v), jax.dtypes.prng_key):  # typed PRNG keys
            return jax.random.wrap_key_data(one(jax.random.key_data(v)),
                                            impl=jax.random.key_impl(v))
        host = np.asarray(v)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(one, tree)


def sharded(fn: Callable, mesh: Mesh, *, batch_argnums: Sequence[int] = (1, 2)) -> Callable:
    """``fn`` with its batch arguments split over ``mesh`` and its outputs replicated.

    For use inside ``jax.jit``: the arguments at ``batch_argnums`` (every leaf, along its leading
    axis) are constrained to :func:`batch_sharding`, the outputs to :func:`replicated_sharding`;
    XLA partitions ``fn`` accordingly and adds the collectives. The result equals ``fn`` on one
    device.
    """

    def wrapped(*args, **kwargs):
        args = list(args)
        for i in batch_argnums:
            args[i] = jax.tree.map(
                lambda v: jax.lax.with_sharding_constraint(v, batch_sharding(mesh, v.ndim)),
                args[i])
        out = fn(*args, **kwargs)
        return jax.lax.with_sharding_constraint(out, replicated_sharding(mesh))

    return wrapped


def summed_over_devices(fn: Callable, axis_name: str = DATA_AXIS) -> Callable:
    """``lax.psum`` of ``fn``'s outputs over the pmap axis ``axis_name``.

    For use inside ``jax.pmap(..., axis_name=axis_name)`` where each device holds its own shard
    of the batch: when ``fn`` returns sums over the rows it is given (e.g. the gradient of
    ``Σ_i w_i ℓ_i``), the result is the sum over the whole global batch, on every device.
    """

    def wrapped(*args, **kwargs):
        return jax.lax.psum(fn(*args, **kwargs), axis_name)

    return wrapped


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """Joins a multi-process run through ``jax.distributed.initialize``.

    On CPU the collectives go through gloo (``jax_cpu_collectives_implementation``). Call this
    before any other JAX work.

    Args:
      coordinator: ``HOST:PORT`` of process 0.
      num_processes: total number of processes (≥ 1).
      process_id: this process's index in ``[0, num_processes)``.

    Raises:
      ValueError: malformed arguments.
    """
    host, sep, port = str(coordinator).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
    if num_processes < 1:
        raise ValueError(f"num_processes must be ≥ 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    platforms = os.environ.get("JAX_PLATFORMS", "") or jax.config.jax_platforms or ""
    if platforms in ("", "cpu") or "cpu" in platforms.split(","):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
