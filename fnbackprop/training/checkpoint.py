"""Checkpoints of a run's typed state with orbax-checkpoint.

A checkpoint is one :class:`orbax.checkpoint.CheckpointManager` step with two items, written
together (orbax writes into a temporary folder and renames it when complete, so a process killed
mid-write leaves nothing that could be mistaken for a complete checkpoint):

* ``arrays``: every array leaf of the state's array fields (parameters, optimizer state, PRNG
  key data, ...), packed into one flat array per dtype: one file per dtype keeps a save cheap.
* ``meta``: JSON with the leaf layout, the state's other fields (epoch, counters, history, ...)
  and the caller's ``extra`` (the configuration and the data fingerprint).

The state is a ``NamedTuple`` whose class names its array fields in ``_array_fields``;
:meth:`CheckpointStore.restore` rebuilds the same type from a *template* (a fresh state of the
same configuration), checking every leaf's dtype and shape: optax states and typed PRNG keys come
back exactly, bit for bit. When the newest checkpoint cannot be read (truncated, half-deleted),
older ones are tried, and the unreadable ones are moved out of the way so that later saves work.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np

__all__ = ["CheckpointStore", "CheckpointError", "Restored", "Saver", "pack_leaves",
           "unpack_leaves"]


class CheckpointError(ValueError):
    """No usable checkpoint, or one that does not fit the current configuration."""


class Restored(NamedTuple):
    """What :meth:`CheckpointStore.restore` found.

    Attributes:
      state: the restored state (the template's type).
      extra: the ``extra`` dict saved with it.
      step: its step.
      unreadable: newer steps that could not be read (moved to ``<directory>-unreadable``).
    """

    state: Any
    extra: dict
    step: int
    unreadable: tuple[str, ...]


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
        groups.setdefault(arr.dtype.name, []).append(arr.reshape(-1))
        layout.append({"dtype": arr.dtype.name, "shape": list(arr.shape), "key_impl": impl})
    return {name: np.concatenate(parts) for name, parts in groups.items()}, layout


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


def _split(state: NamedTuple) -> tuple[dict, dict]:
    """``(array fields, other fields)`` of a state whose class lists ``_array_fields``."""
    names = type(state)._array_fields
    fields = state._asdict()
    return ({k: v for k, v in fields.items() if k in names},
            {k: v for k, v in fields.items() if k not in names})


def _rebuild(template: NamedTuple, arrays: dict, others: dict) -> NamedTuple:
    """The template's type with ``arrays`` and ``others`` (JSON lists back to tuples)."""
    kinds = template._asdict()
    others = {k: tuple(v) if isinstance(kinds[k], tuple) and isinstance(v, list) else v
              for k, v in others.items()}
    return type(template)(**arrays, **others)


class CheckpointStore:
    """Saves and restores run states in ``directory`` (one orbax step per save).

    Saves are synchronous, keep the newest ``keep`` checkpoints, and leftover temporary folders
    of interrupted saves are removed when the store is opened.

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
            self._mgr.reload()
            return sorted(self._mgr.all_steps())

    def save(self, step: int, state: NamedTuple, extra: dict) -> None:
        """Writes ``state`` (see the module docstring) and ``extra`` (JSON-ready) as ``step``."""
        from fnbackprop.training.outputs import json_ready

        arrays, others = _split(state)
        packed, layout = pack_leaves(arrays)
        ocp = self._ocp
        with _quiet():
            self._mgr.save(
                step,
                args=ocp.args.Composite(
                    arrays=ocp.args.PyTreeSave(packed),
                    meta=ocp.args.JsonSave(json_ready(
                        {"layout": layout, "state": others, "extra": extra})),
                ),
                force=True,
            )
            self._mgr.wait_until_finished()

    def _read(self, step: int, template: NamedTuple):
        ocp = self._ocp
        with _quiet():
            got = self._mgr.restore(step, args=ocp.args.Composite(
                arrays=ocp.args.PyTreeRestore(), meta=ocp.args.JsonRestore()))
        meta = got["meta"]
        arrays = unpack_leaves({k: np.asarray(v) for k, v in got["arrays"].items()},
                               meta["layout"], _split(template)[0])
        return _rebuild(template, arrays, meta["state"]), meta["extra"]

    def read_extra(self, step: int) -> dict | None:
        """The ``extra`` saved with ``step``, or ``None`` when its metadata cannot be read."""
        ocp = self._ocp
        try:
            with _quiet():
                got = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            return got["meta"]["extra"]
        except Exception:  # noqa: BLE001 - unreadable: the caller decides
            return None

    def restore(self, template: NamedTuple, accept=None) -> Restored:
        """Restores the newest checkpoint that can be read, into the type of ``template``.

        Newer checkpoints that cannot be read are moved to ``<directory>-unreadable/`` (kept for
        inspection, out of the way of later saves), but only once a readable one was found and
        accepted: ``accept(extra)`` may raise to refuse it, and then nothing is moved.

        Raises:
          CheckpointError: no checkpoint could be read, or one does not fit the template.
        """
        steps = list(reversed(self.steps()))
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        errors = []
        for s in steps:
            try:
                state, extra = self._read(s, template)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - an unreadable step: try the next older one
                errors.append((s, f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"))
                continue
            if accept is not None:
                accept(extra)
            moved = tuple(self._set_aside(bad) for bad, _ in errors)
            return Restored(state, extra, s, moved)
        detail = "; ".join(f"step {s}: {e}" for s, e in errors)
        raise CheckpointError(f"no readable checkpoint in {self.directory} ({detail})")

    def _set_aside(self, step: int) -> str:
        aside = f"{os.path.abspath(self.directory).rstrip(os.sep)}-unreadable"
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, str(step))
        if os.path.exists(target):
            shutil.rmtree(target)
        shutil.move(os.path.join(self.directory, str(step)), target)
        with _quiet():
            self._mgr.reload()
        return target

    def close(self) -> None:
        """Releases orbax's resources (call once; the store is unusable afterwards)."""
        with _quiet():
            self._mgr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Saver:
    """A :class:`CheckpointStore` whose saves run in order on one worker thread.

    Opening the store (importing orbax) and every save then overlap with the training and the
    final outputs; :meth:`wait` returns once everything submitted is on disk (and re-raises a
    save's error). With ``background=False`` (several processes, which orbax coordinates) every
    call runs at once on the calling thread.

    Args:
      directory: the checkpoint folder.
      keep: how many checkpoints to keep.
      background: open and save on the worker thread.
    """

    def __init__(self, directory: str, *, keep: int, background: bool = True):
        self._pool = (concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="checkpoint") if background else None)
        self._store = self._submit(CheckpointStore, directory, keep=keep)
        self._pending: list[concurrent.futures.Future] = []

    def _submit(self, fn, *args, **kwargs) -> concurrent.futures.Future:
        if self._pool is not None:
            return self._pool.submit(fn, *args, **kwargs)
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(fn(*args, **kwargs))
        return done

    @property
    def store(self) -> CheckpointStore:
        """The store (waits until it is open)."""
        return self._store.result()

    def save(self, step: int, state: NamedTuple, extra: dict) -> None:
        """Queues :meth:`CheckpointStore.save` after waiting for the previous save: at most one
        is in flight, so at most one extra state is held (its arrays are immutable: no copy)."""
        self.wait()
        self._pending.append(self._submit(lambda: self.store.save(step, state, extra)))

    def wait(self) -> None:
        """Waits for every queued save; raises the first one's error, if any."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def close(self) -> None:
        """Waits for the saves, then releases the store and the worker."""
        try:
            self.wait()
        finally:
            self.store.close()
            if self._pool is not None:
                self._pool.shutdown()
