"""The one entry point: :func:`load_dataset`, a bundled name or the user's file."""

from __future__ import annotations

import os

from fnbackprop.data.bundled import DATASET_INFO, DATASETS, load_bundled
from fnbackprop.data.dataset import TASKS, DataError, Dataset, check_seed
from fnbackprop.data.files import load_file


def load_dataset(name_or_path: str | os.PathLike, *, seed: int = 0, target: str | None = None,
                 task: str | None = None) -> Dataset:
    """Load a bundled dataset or the user's ``.npz``/``.csv`` file, raw, with its test split.

    Args:
      name_or_path: one of :data:`DATASETS`, or a path to a ``.npz`` file (arrays ``x``, ``y``)
        or a ``.csv`` file (header row, numeric cells).
      seed: seed of the 80/20 train/test split of a user file. Bundled datasets ignore it: their
        split is fixed so that test sets are comparable across runs.
      target: name of the ``.csv`` target column (default: the last column); only for ``.csv``.
      task: ``"classification"`` or ``"regression"`` to override the guess for a user file
        (see :mod:`fnbackprop.data`); ``None`` guesses.

    Returns:
      The unstandardised :class:`Dataset` (inputs ``(N, d)`` float32; labels ``(N,)`` int32 or
      targets ``(N, 1)`` float32).

    Raises:
      DataError: unknown name, missing/unreadable file, bad contents (one-line message).
      ValueError: a bad ``seed`` or ``task``.
    """
    check_seed(seed)
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)} or None; got {task!r}")
    try:
        name = os.fspath(name_or_path)
    except TypeError:
        raise DataError(f"dataset must be a name or a path, got {name_or_path!r}") from None
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    if name in DATASETS:
        if target is not None:
            raise DataError(f"target= only applies to .csv files, not the bundled dataset {name!r}")
        info = DATASET_INFO[name]
        if task is not None and task != info.task:
            raise DataError(f"{name} is a {info.task} dataset; task={task!r} does not apply")
        return load_bundled(name)
    ext = os.path.splitext(name)[1].lower()
    if ext in (".npz", ".csv"):
        return load_file(name, ext, seed=seed, target=target, task=task)
    if os.path.lexists(name):
        raise DataError(
            f"{name}: unsupported file type {ext or '(no extension)'!r}; use .npz "
            "(arrays x, y) or .csv (header row)"
        )
    raise DataError(
        f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or give a path to a "
        ".npz (arrays x, y) or .csv file"
    )
