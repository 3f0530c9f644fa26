"""Checkpoints of the full training state with orbax-checkpoint.

A checkpoint holds two items, written together by one :class:`orbax.checkpoint.CheckpointManager`
step (orbax writes the step into a temporary folder and renames it when complete, so a process
killed mid-write leaves no half checkpoint behind that could be mistaken for a complete one):

* ``arrays``: every array leaf of the state pytree (parameters, optimizer state, PRNG key data,
  early-stopping best parameters), packed into one flat array per dtype (``float32``,
  ``int32``, ``uint32``, ...). One array per dtype keeps a save at a few tens of milliseconds;
  per-leaf files cost orbax a few milliseconds each.
* ``meta``: JSON with the leaf layout (dtype and shape of each leaf in tree order) and anything
  the caller adds (epoch, early-stopping counters, metric history, configuration).

The tree structure itself is not stored: :meth:`CheckpointStore.restore` takes a *template*, a
freshly initialised state of the same configuration, and rebuilds the state with the template's
treedef after checking that every leaf's dtype and shape match. This restores optax states
(NamedTuples) and typed PRNG keys exactly, bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import jax
import numpy as np

__all__ = ["CheckpointStore", "CheckpointError", "pack_leaves", "unpack_leaves"]


class CheckpointError(ValueError):
    """No usable checkpoint, or one that does not fit the current configuration."""


@contextlib.contextmanager
def _quiet():
    """Silences orbax's absl logging and Python warnings for the duration of a call."""
    from absl import logging as absl_logging

    old = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        absl_logging.set_verbosity(old)


def _is_key(leaf) -> bool:
    return hasattr(leaf, "dtype") and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def pack_leaves(tree: Any) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Flattens a pytree of arrays into one flat NumPy array per dtype.

    Typed PRNG keys are stored as their raw key data (``jax.random.key_data``).

    Returns:
      ``(arrays, layout)``: ``arrays`` maps a dtype name to the concatenation of every leaf of
      that dtype (in tree order); ``layout`` lists ``{"dtype", "shape", "key_impl"}`` per leaf.
    """
    groups: dict[str, list[np.ndarray]] = {}
    layout = []
    for leaf in jax.tree_util.tree_leaves(tree):
        impl = None
        if _is_key(leaf):
            impl = str(jax.random.key_impl(leaf))
            leaf = jax.random.key_data(leaf)
        arr = np.asarray(leaf)
        name = arr.dtype.name
        groups.setdefault(name, []).append(arr.reshape(-1))
        layout.append({"dtype": name, "shape": list(arr.shape), "key_impl": impl})
    arrays = {name: np.concatenate(parts) for name, parts in groups.items()}
    return arrays, layout


def unpack_leaves(arrays: dict[str, np.ndarray], layout: list[dict], template: Any) -> Any:
    """Inverse of :func:`pack_leaves`, with the tree structure of ``template``.

    Raises:
      CheckpointError: the layout does not match the template's leaves.
    """
    leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(leaves) != len(layout):
        raise CheckpointError(
            f"checkpoint has {len(layout)} arrays but this configuration's state has {len(leaves)}"
        )
    offsets = {name: 0 for name in arrays}
    out = []
    for i, (leaf, spec) in enumerate(zip(leaves, layout)):
        want = jax.random.key_data(leaf) if _is_key(leaf) else leaf
        want_dtype, want_shape = np.dtype(want.dtype).name, list(np.shape(want))
        if spec["dtype"] != want_dtype or list(spec["shape"]) != want_shape:
            raise CheckpointError(
                f"checkpoint array {i} is {spec['dtype']}{spec['shape']} but this configuration "
                f"needs {want_dtype}{want_shape}"
            )
        size = int(np.prod(want_shape, dtype=np.int64))
        flat = np.asarray(arrays[spec["dtype"]])
        start = offsets[spec["dtype"]]
        if start + size > flat.size:
            raise CheckpointError("checkpoint arrays are shorter than their layout says")
        arr = flat[start:start + size].reshape(want_shape).copy()
        offsets[spec["dtype"]] = start + size
        if _is_key(leaf):
            out.append(jax.random.wrap_key_data(arr, impl=jax.random.key_impl(leaf)))
        else:
            out.append(jax.numpy.asarray(arr))
    return jax.tree_util.tree_unflatten(treedef, out)


class CheckpointStore:
    """Saves and restores training states in ``directory`` (one orbax step per epoch saved).

    Saves are synchronous (no background threads), keep the newest ``keep`` checkpoints, and
    leftover temporary folders of interrupted saves are removed when the store is opened.

    Args:
      directory: the checkpoint folder (created if missing).
      keep: how many checkpoints to keep (≥ 1).
    """

    def __init__(self, directory: str, *, keep: int):
        if keep < 1:
            raise ValueError(f"keep must be ≥ 1, got {keep}")
        with _quiet():
            import orbax.checkpoint as ocp

            self._ocp = ocp
            options = ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,
                save_root_metadata=False,
                create=True,
            )
            self._mgr = ocp.CheckpointManager(
                os.path.abspath(directory),
                options=options,
                item_handlers={
                    "arrays": ocp.PyTreeCheckpointHandler(use_ocdbt=False),
                    "meta": ocp.JsonCheckpointHandler(),
                },
            )
        self.directory = directory

    def steps(self) -> list[int]:
        """The complete checkpoints' steps, oldest first."""
        with _quiet():
            return sorted(self._mgr.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Writes ``state`` (a pytree of arrays) and ``meta`` (JSON-ready) as checkpoint ``step``."""
        arrays, layout = pack_leaves(state)
        ocp = self._ocp
        with _quiet():
            self._mgr.save(
                step,
                args=ocp.args.Composite(
                    arrays=ocp.args.PyTreeSave(arrays),
                    meta=ocp.args.JsonSave({"layout": layout, "user": meta}),
                ),
                force=True,
            )
            self._mgr.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        """The caller's ``meta`` of checkpoint ``step``."""
        ocp = self._ocp
        with _quiet():
            got = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return got["meta"]["user"]

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restores the newest complete checkpoint (or ``step``) into the structure of ``template``.

        If the newest checkpoint cannot be read, older ones are tried in turn.

        Returns:
          ``(state, meta, step)``.

        Raises:
          CheckpointError: no checkpoint could be restored, or the layout does not fit.
        """
        steps = [step] if step is not None else list(reversed(self.steps()))
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        ocp = self._ocp
        errors = []
        for s in steps:
            try:
                with _quiet():
                    got = self._mgr.restore(
                        s,
                        args=ocp.args.Composite(
                            arrays=ocp.args.PyTreeRestore(), meta=ocp.args.JsonRestore()
                        ),
                    )
                arrays = {k: np.asarray(v) for k, v in got["arrays"].items()}
                meta = got["meta"]
            except Exception as e:  # noqa: BLE001 - an unreadable step: try the next older one
                errors.append(f"step {s}: {type(e).__name__}: {e}")
                continue
            state = unpack_leaves(arrays, meta["layout"], template)
            return state, meta["user"], s
        raise CheckpointError(
            f"no readable checkpoint in {self.directory} ({'; '.join(errors)[:300]})"
        )

    def close(self) -> None:
        """Releases orbax's resources (call once; the store is unusable afterwards)."""
        with _quiet():
            self._mgr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
