"""Data parallelism with JAX's own engines: ``jax.sharding`` and ``pmap``; hosts via ``jax.distributed``.

What is replicated and what is sharded:

* parameters, optimizer state and PRNG keys are **replicated** on every device;
* every global batch ``(B, ...)`` is **sharded** along its batch axis over the mesh axis
  :data:`DATA_AXIS`: device d of D holds rows ``[d·B/D, (d+1)·B/D)``. Across processes, process
  p holds the rows of its local devices and feeds only those (its share of the global batch).

The gradient of the batch-mean loss is the mean of the shard gradients, so

* with ``jax.sharding`` one ``jit`` of the unchanged single-device step is partitioned by XLA
  (the batch contraction ``a^{l−1 ᵀ} δ^l`` becomes a local matmul plus an all-reduce);
* with ``pmap`` each device runs :func:`fnbackprop.manual_grad` on its shard and
  ``lax.pmean`` averages the results.

Per-example clipping is exact under both: each example's norm involves only that example's
activations and deltas, which live on one device.

A global batch size that the device count does not divide is refused with a ``ValueError``
naming both numbers (no padding or masking across devices).
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
    "shard_batch",
    "replicate",
    "pmap_grad",
    "sharded_grad",
    "stack_for_pmap",
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


def batch_sharding(mesh: Mesh, axis: int = 0, ndim: int = 2) -> NamedSharding:
    """Sharding that splits array axis ``axis`` (of an ``ndim``-dim array) over the data axis."""
    spec = [None] * ndim
    spec[axis] = DATA_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that puts a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def check_divisible(batch_size: int, num_devices: int) -> None:
    """Raises ``ValueError`` unless ``num_devices`` divides ``batch_size``."""
    if num_devices < 1 or batch_size % num_devices:
        raise ValueError(
            f"global batch size {batch_size} is not divisible by the number of devices "
            f"{num_devices}; choose a batch size that is a multiple of {num_devices}"
        )


def shard_batch(mesh: Mesh, x: Any, axis: int = 0) -> jax.Array:
    """Puts a global batch on ``mesh``, split along ``axis``.

    ``x`` is the *global* array (every process passes the same global array, e.g. indexed from
    the same dataset with the same permutation); each process only transfers the rows of its own
    devices, so every process feeds its share of the batch.
    """
    x = np.asarray(x)
    check_divisible(x.shape[axis], mesh.devices.size)
    sharding = batch_sharding(mesh, axis, x.ndim)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def replicate(mesh: Mesh, tree: Any) -> Any:
    """Copies every leaf of ``tree`` to every device of ``mesh``."""
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


def sharded_grad(grad_fn: Callable, mesh: Mesh, *, static_argnums=(0,)) -> Callable:
    """``jax.jit`` of ``grad_fn(net, params, x, y, ...)`` with x, y sharded and params replicated.

    The returned function accepts ``(net, params, x, y, **kwargs)`` where ``x, y`` are already
    sharded (see :func:`shard_batch`) and ``params`` replicated (see :func:`replicate`); its
    output gradients are replicated.
    """
    out_sharding = replicated_sharding(mesh)
    return jax.jit(grad_fn, static_argnums=static_argnums, out_shardings=out_sharding)


def pmap_grad(grad_fn: Callable, net: Any, *, axis_name: str = DATA_AXIS,
              devices: Sequence[jax.Device] | None = None, **grad_kwargs) -> Callable:
    """A ``pmap``-ed gradient: per-device ``grad_fn`` on its shard, then ``lax.pmean``.

    Args:
      grad_fn: e.g. :func:`fnbackprop.manual_grad`; called as
        ``grad_fn(net, params, x_shard, y_shard, **grad_kwargs)``.
      net: the (static) network.
      axis_name: the pmap axis name.
      devices: the local devices to map over (default all local devices).
      grad_kwargs: static keywords for ``grad_fn`` (``l1``, ``l2``, ...).

    Returns:
      ``f(params, x, y)`` with ``x`` of shape ``(D, B/D, ...)``, ``params`` stacked with a
      leading device axis (see :func:`stack_for_pmap`); returns per-device copies of the mean
      gradient. Equal shard sizes make the mean of shard means the global mean.
    """

    def per_device(params, x, y):
        return jax.lax.pmean(grad_fn(net, params, x, y, **grad_kwargs), axis_name)

    return jax.pmap(per_device, axis_name=axis_name, devices=devices)


def stack_for_pmap(tree: Any, num_devices: int) -> Any:
    """Gives every leaf a leading axis of ``num_devices`` identical copies (pmap's replication)."""
    return jax.tree.map(lambda v: jnp.broadcast_to(v, (num_devices,) + jnp.shape(v)), tree)


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
