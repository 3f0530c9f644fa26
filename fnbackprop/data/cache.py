"""The on-disk cache of generated arrays: its folder, its keys, atomic writes, checked reads."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

CACHE_FORMAT = 2
"""Version of the cache file layout; part of every key, so a new layout never reads old files."""


def cache_dir() -> str:
    """The folder of cached generated data (the mnist1d datasets).

    ``$FNBACKPROP_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/fnbackprop``, else
    ``~/.cache/fnbackprop``.
    """
    explicit = os.environ.get("FNBACKPROP_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fnbackprop")


def cache_key(recipe: Mapping[str, Any]) -> str:
    """16 hex digits of the SHA-256 of ``recipe`` (JSON, sorted keys) and :data:`CACHE_FORMAT`.

    ``recipe`` must name everything the cached arrays depend on (generator, arguments, version).
    """
    text = json.dumps({"recipe": dict(recipe), "format": CACHE_FORMAT}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_arrays(path: str, key: str, expected: Mapping[str, tuple[tuple[int, ...], np.dtype]]
                ) -> dict[str, np.ndarray] | None:
    """The arrays cached at ``path`` if it holds ``key`` and exactly the ``expected`` arrays.

    Args:
      path: the cache file (``.npz``).
      key: the :func:`cache_key` the file must hold.
      expected: array name → ``(shape, dtype)``.

    Returns:
      name → array, or ``None`` when the file is missing, damaged, stale or of another shape: the
      caller then regenerates.
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key:
                return None
            arrays = {name: np.array(f[name]) for name in expected}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
        return None
    return arrays if conforms(arrays, expected) else None


def conforms(arrays: Mapping[str, np.ndarray],
             expected: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> bool:
    """Whether ``arrays`` has exactly the ``expected`` names, shapes and dtypes."""
    return set(arrays) == set(expected) and all(
        arrays[n].shape == tuple(shape) and arrays[n].dtype == dtype
        for n, (shape, dtype) in expected.items())


def write_arrays(path: str, key: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` and ``key`` to ``path`` atomically (temporary file, then ``os.replace``).

    Readers see the old file or the whole new one, never a part. An unwritable folder is not an
    error: it only costs regeneration next time.
    """
    folder = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".fnbackprop-", suffix=".tmp", dir=folder)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.array(key), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)   # mkstemp makes it private; the cache holds public data
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
