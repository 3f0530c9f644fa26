"""The user's own data files (.npz, .csv): reading, checking, the task guess, the labels."""

from __future__ import annotations

import csv
import errno
import io
import os
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterable
from typing import BinaryIO

import numpy as np

from fnbackprop.data.dataset import (
    MAX_CLASSES,
    TEST_FRACTION,
    DataError,
    Dataset,
    make_dataset,
    plain,
)
from fnbackprop.data.preprocessing import split_indices

Where = Callable[[str, int, "int | None"], str]
"""``where(array, row, col)``: how a message names a position, e.g. ``x[3, 1]`` or a csv line."""

REGRESSION_HINT = ("pass task='regression' (command line: --task regression) if the target is a "
                   "number to predict")
"""The advice given whenever a target cannot be class labels."""
_NUMBERS_HINT = ("x must hold numbers, y numbers too (class labels 0..K-1 or regression targets); "
                 "turn names into labels with np.unique(y, return_inverse=True)[1]")


def load_file(path: str, ext: str, *, seed: int, target: str | None,
              task: str | None) -> Dataset:
    """The user's ``.npz``/``.csv`` file as a :class:`Dataset` with a seeded stratified split.

    Args:
      path: the file.
      ext: ``".npz"`` or ``".csv"`` (lower case).
      seed: seed of the 80/20 train/test split.
      target: the ``.csv`` target column, ``None`` for the last one; must be ``None`` for .npz.
      task: ``"classification"``, ``"regression"``, or ``None`` to guess.
    """
    if ext == ".npz" and target is not None:
        raise DataError(f"{path}: target= only applies to .csv files")
    with _open_regular(path, ext) as fh:
        if ext == ".npz":
            x, y, image_shape = _read_npz(path, fh)
            where = _npz_where
        else:
            x, y, where = _read_csv(path, fh, target)
            image_shape = None
    n = x.shape[0]
    if n == 0:
        raise DataError(f"{path}: empty data: no examples")
    if x.shape[1] == 0:
        raise DataError(f"{path}: x has no features (0 columns)")
    _check_finite(path, "x", x, where)
    _check_finite(path, "y", y, where)
    if n < 2:
        raise DataError(f"{path}: only {n} example; need at least 2 for a train/test split")
    if len(np.unique(y)) < 2:
        raise DataError(
            f"{path}: the target has a single value {plain(y.flat[0])}: nothing to learn"
        )
    task = task or _guess_task(y)
    num_classes = None
    if task == "classification":
        y, num_classes = _class_labels(path, y, where)
    train_idx, test_idx = split_indices(y, n, TEST_FRACTION, seed,
                                        stratify=task == "classification")
    return make_dataset(path, task, x.astype(np.float32), y, train_idx, test_idx, num_classes,
                        "noise", image_shape)


def _open_regular(path: str, ext: str) -> BinaryIO:
    """Open a regular file for reading; anything else is a :class:`DataError`, without blocking.

    ``O_NONBLOCK`` makes opening a FIFO return at once; ``fstat`` on the open descriptor then
    tells what was opened, so the check and the read concern the same file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        if os.path.islink(path):
            raise DataError(f"{path} is a broken symbolic link: its target "
                            f"{os.readlink(path)} does not exist") from None
        raise DataError(f"file not found: {path}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"{path} is a symbolic link loop (it never reaches a file), "
                            f"not a {ext} file") from None
        raise DataError(f"cannot open {path}: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DataError(f"{path} is {_file_kind(mode)}, not a regular {ext} file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)   # a regular file: read it the ordinary way
    return os.fdopen(fd, "rb")


def _file_kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def _oneline(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _some(values: Iterable, limit: int = 8) -> str:
    """``"3, 7, 9"``, or the first ``limit`` values and how many there are in all."""
    values = [plain(v) for v in values]
    if len(values) <= limit:
        return ", ".join(values)
    return f"{', '.join(values[:limit])}, … ({len(values)} in all)"


# ----------------------------------------------------------------------------------------------
# .npz


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")   # a zip archive's first bytes (members, or none)
_NPY_MAGIC = b"\x93NUMPY"


def _npz_where(array: str, row: int, col: int | None) -> str:
    return f"{array}[{row}]" if col is None else f"{array}[{row}, {col}]"


def _read_npz(path: str, fh: BinaryIO) -> tuple[np.ndarray, np.ndarray, tuple[int, ...] | None]:
    """``x`` ``(N, d)``, ``y`` ``(N,)`` and the image shape of an ``.npz`` (numeric, unpickled)."""
    _check_npz_magic(path, fh)
    try:
        with np.load(fh, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise DataError(
                    f"{path}: missing array(s) {', '.join(missing)}; the .npz must hold arrays x "
                    f"and y (found: {', '.join(f.files) or 'none'})"
                )
            x, y = _npz_array(path, f, "x"), _npz_array(path, f, "y")
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as exc:
        raise DataError(f"cannot read {path} as .npz: {_oneline(exc)}") from None
    for nm, a in (("x", x), ("y", y)):
        _check_numeric(path, nm, a)
    return _as_examples(path, x, y)


def _check_npz_magic(path: str, fh: BinaryIO) -> None:
    """Refuse, by its first bytes, a file that is not a zip archive (``np.load`` would unpickle)."""
    head = fh.read(len(_NPY_MAGIC))
    fh.seek(0)
    if head.startswith(_NPY_MAGIC):
        raise DataError(f"{path} is a single .npy array, not a .npz archive; save x and y "
                        "together with np.savez(path, x=x, y=y)")
    if not head.startswith(_ZIP_MAGIC):
        what = "it is empty" if not head else "it is not a zip archive"
        raise DataError(f"{path} is not a valid .npz (zip) file: {what}; save one with "
                        "np.savez(path, x=x, y=y)")


def _as_examples(path: str, x: np.ndarray, y: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, tuple[int, ...] | None]:
    """``x`` as ``(N, d)`` (``(N,)`` is one feature; ``(N, ...)`` is flattened, its trailing
    shape returned as the image shape) and ``y`` as ``(N,)``."""
    if x.ndim == 0 or y.ndim == 0:
        raise DataError(f"{path}: x and y must have a first (example) axis; got shapes "
                        f"{x.shape} and {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{path}: length mismatch: x has {x.shape[0]} rows but y has {y.shape[0]}")
    image_shape = None
    if x.ndim == 1:
        x = x.reshape(-1, 1)
    elif x.ndim > 2:
        image_shape = tuple(x.shape[1:])
        x = x.reshape(x.shape[0], -1)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    elif y.ndim != 1:
        raise DataError(f"{path}: y must have shape (N,) or (N, 1), got {y.shape}")
    return x, y, image_shape


def _npz_array(path: str, f, name: str) -> np.ndarray:
    """Array ``name`` of an open ``.npz``; an object (pickled) array is refused, never unpickled."""
    try:
        return f[name]
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise
        raise DataError(
            f"{path}: array {name} has dtype object (Python objects such as strings or mixed "
            "values), which is not loaded because unpickling can run code; store numbers: "
            + _NUMBERS_HINT) from None


def _check_numeric(path: str, name: str, a: np.ndarray) -> None:
    if a.dtype.kind in "biuf":
        return
    first = f" (first value {plain(a.flat[0])})" if a.size else ""
    raise DataError(f"{path}: array {name} has non-numeric dtype {a.dtype}{first}; "
                    + _NUMBERS_HINT)


# ----------------------------------------------------------------------------------------------
# .csv


def _read_csv(path: str, fh: BinaryIO, target: str | None
              ) -> tuple[np.ndarray, np.ndarray, Where]:
    """Features ``(N, d)`` float64, the target ``(N,)`` and a ``where`` naming lines and columns.

    The target is int64 when every target cell is an integer literal (so that messages show
    labels as written), else float64.
    """
    try:
        reader = csv.reader(io.TextIOWrapper(fh, encoding="utf-8-sig", newline=""))
        rows = [(reader.line_num, r) for r in reader if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path} as .csv: {_oneline(exc)}") from None
    if not rows:
        raise DataError(f"{path}: empty file: no header row and no data")
    header, t = _csv_header(path, *rows[0], target)
    data = rows[1:]
    if not data:
        raise DataError(f"{path}: empty data: a header but no rows")
    values = _csv_values(path, header, t, data)
    lines = [line for line, _ in data]
    features = [c for c in range(len(header)) if c != t]
    names = [header[c] for c in features]

    def where(array: str, row: int, col: int | None) -> str:
        column = header[t] if col is None else names[col]
        return f"line {lines[row]} (data row {row + 1}), column {column!r}"

    return values[:, features], _as_written(values[:, t], [cells[t] for _, cells in data]), where


def _csv_header(path: str, line: int, header: list[str], target: str | None
                ) -> tuple[list[str], int]:
    """The stripped column names and the index of the target column."""
    header = [h.strip() for h in header]
    if len(header) < 2:
        raise DataError(
            f"{path}: the header has {len(header)} column; need at least one feature and a target"
        )
    if all(_is_number(h) for h in header):
        raise DataError(f"{path}: line {line} looks like data, not a header row of column names")
    seen = set()
    for h in header:
        if h in seen:
            raise DataError(f"{path}: duplicate column name {h!r} in the header")
        seen.add(h)
    if target is None:
        return header, len(header) - 1
    if target not in header:
        raise DataError(f"{path}: no target column {target!r}; columns are {', '.join(header)}")
    return header, header.index(target)


def _csv_values(path: str, header: list[str], t: int, data: list[tuple[int, list[str]]]
                ) -> np.ndarray:
    """Every cell of the data rows as float64 ``(rows, columns)``; ``t`` is the target column."""
    values = np.empty((len(data), len(header)), np.float64)
    for r, (line, cells) in enumerate(data):
        if len(cells) != len(header):
            raise DataError(
                f"{path}: line {line} has {len(cells)} fields but the header has {len(header)}"
            )
        for c, cell in enumerate(cells):
            try:
                values[r, c] = float(cell)
            except ValueError:
                hint = "; the target must be numeric (class labels 0..K-1 or values)"
                raise DataError(
                    f"{path}: non-numeric value {cell.strip()!r} at line {line} "
                    f"(data row {r + 1}), column {header[c]!r}{hint if c == t else ''}"
                ) from None
    return values


def _as_written(parsed: np.ndarray, cells: list[str]) -> np.ndarray:
    """``parsed`` as int64 if every cell is an integer literal that fits, else as it is."""
    try:
        return np.array([int(c) for c in cells], np.int64)
    except (ValueError, OverflowError):
        return parsed


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Checks, the task guess, class labels


_F32_MAX = float(np.finfo(np.float32).max)


def _check_finite(path: str, nm: str, a: np.ndarray, where: Where) -> None:
    a64 = a.astype(np.float64) if a.dtype.kind == "f" else a
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a64)
        if bad.any():
            idx = np.argwhere(bad)[0]
            row, col = int(idx[0]), (int(idx[1]) if a.ndim == 2 else None)
            val = a64[tuple(idx)]
            raise DataError(f"{path}: {nm} has non-finite value {val} at {where(nm, row, col)}")
    big = np.abs(a64) > _F32_MAX
    if big.any():
        idx = np.argwhere(big)[0]
        row, col = int(idx[0]), (int(idx[1]) if a.ndim == 2 else None)
        raise DataError(
            f"{path}: {nm} value {a64[tuple(idx)]} at {where(nm, row, col)} overflows float32"
        )


def _guess_task(y: np.ndarray) -> str:
    """Classification for integer-valued ``y`` with few distinct values, else regression."""
    if y.dtype.kind == "b":
        return "classification"
    whole = y.dtype.kind in "iu" or bool(np.all(y == np.round(y)))
    if not whole:
        return "regression"
    n_distinct = len(np.unique(y))
    if n_distinct <= MAX_CLASSES and 2 * n_distinct <= len(y):
        return "classification"
    return "regression"


def _class_labels(path: str, y: np.ndarray, where: Where) -> tuple[np.ndarray, int]:
    """``y`` as int32 labels and ``K``; refuses any label set that is not exactly ``0..K-1``.

    ``K = max label + 1``. A class of ``0..K-1`` with no example is refused too: ``K`` is inferred
    from the labels, and a gap almost always means labels that are codes (``{3, 7, 9}``) or start
    at 1, which would silently add outputs that are never a right answer.
    """
    y64 = y.astype(np.float64)
    r = _first(y64 != np.round(y64))
    if r is not None:
        raise DataError(f"{path}: y value {plain(y[r])} at {where('y', r, None)} is not an integer "
                        f"class label; {REGRESSION_HINT}")
    r = _first(y64 < 0)
    if r is not None:
        raise DataError(f"{path}: negative class label {plain(y[r])} at {where('y', r, None)}; "
                        f"labels must be integers 0..K-1; {REGRESSION_HINT}")
    r = _first(y64 >= MAX_CLASSES)
    if r is not None:
        raise DataError(f"{path}: class label {plain(y[r])} at {where('y', r, None)} is out of "
                        f"range: labels must be integers 0..K-1 with K ≤ {MAX_CLASSES}; "
                        f"{REGRESSION_HINT}")
    labels = np.unique(y64).astype(np.int64)
    k = int(labels[-1]) + 1
    if len(labels) < k:
        unused = np.setdiff1d(np.arange(k), labels)
        one_based = " (labels counted from 1: y - 1)" if labels[0] == 1 and len(unused) == 1 else ""
        raise DataError(
            f"{path}: class labels {_some(labels)} are not 0..K-1: with K = max label + 1 = {k}, "
            f"{_plural(len(unused), 'class', 'classes')} {_some(unused)} would have no examples; "
            f"remap the labels to 0..{len(labels) - 1}, e.g. y = np.unique(y, "
            f"return_inverse=True)[1]{one_based}, or {REGRESSION_HINT}"
        )
    return y64.astype(np.int32), k


def _plural(n: int, one: str, many: str) -> str:
    return one if n == 1 else many


def _first(mask: np.ndarray) -> int | None:
    """Index of the first true entry of a 1-D mask, or ``None``."""
    rows = np.flatnonzero(mask)
    return int(rows[0]) if rows.size else None
