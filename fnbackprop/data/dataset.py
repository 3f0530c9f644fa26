"""The :class:`Dataset` type, its error, its constants, and a content fingerprint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import NamedTuple

import numpy as np

TASKS: tuple[str, ...] = ("classification", "regression")
AUGMENT_KINDS: tuple[str, ...] = ("shift_noise", "noise", "none")
"""What :func:`fnbackprop.training.augmentation.augment` can do to a dataset's examples."""
TEST_FRACTION = 0.2
"""Fraction of the examples held out as the test set (all datasets except the mnist1d ones)."""
MAX_CLASSES = 100
"""Most distinct values an integer-valued target may have to be read as class labels."""
FINGERPRINT_FORMAT = "fnbackprop.data.fingerprint/1"
"""Tag hashed first by :func:`fingerprint`; a change of what is hashed changes the tag."""


class DataError(ValueError):
    """Bad data: a one-line message naming the file, row, column and value at fault."""


class DatasetInfo(NamedTuple):
    """Constant facts about a bundled dataset (see :data:`fnbackprop.data.DATASET_INFO`)."""

    task: str
    num_classes: int | None
    n_train: int
    n_test: int
    n_features: int
    augment_kind: str
    image_shape: tuple[int, ...] | None
    source: str


def plain(value) -> str:
    """A number as a user would write it: ``1``, ``1.0``, ``nan``, never ``np.float64(1.0)``."""
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value) if isinstance(value, (float, str, bytes)) else str(value)


def check_seed(seed) -> None:
    """Raise ``ValueError`` unless ``seed`` is an integer ≥ 0 (``bool`` is not one)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer ≥ 0, got {seed!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset with a fixed train/test split. Arrays are NumPy, read-only.

    A classification ``Dataset`` built directly may have classes without examples (the labels
    need only lie in ``0..num_classes-1``): its ``num_classes`` is stated, not inferred.
    :func:`fnbackprop.data.load_dataset` infers ``num_classes`` from a file's labels and therefore
    requires every class to occur.

    Attributes:
      name: the bundled name, or the file path.
      task: ``"classification"`` or ``"regression"``.
      x_train: ``(N, d)`` float32 inputs.
      y_train: ``(N,)`` int32 labels in ``0..num_classes-1``, or ``(N, 1)`` float32 targets.
      x_test: ``(M, d)`` float32.
      y_test: ``(M,)`` int32 or ``(M, 1)`` float32.
      num_classes: number of classes, ``None`` for regression.
      augment_kind: what augmentation does for this data: ``"shift_noise"`` (mnist1d, digits),
        ``"noise"`` (tabular data) or ``"none"``.
      image_shape: shape of one example before flattening, e.g. ``(8, 8)`` for digits and
        ``(40,)`` for mnist1d; ``None`` for tabular data.
    """

    name: str
    task: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None
    augment_kind: str
    image_shape: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise DataError(f"task must be one of {', '.join(TASKS)}; got {self.task!r}")
        if self.augment_kind not in AUGMENT_KINDS:
            raise DataError(
                f"augment_kind must be one of {', '.join(AUGMENT_KINDS)}; got {self.augment_kind!r}"
            )
        if self.task == "classification":
            if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 2:
                raise DataError("classification needs an integer num_classes ≥ 2, got "
                                f"{plain(self.num_classes)}")
        elif self.num_classes is not None:
            raise DataError(
                f"regression data must have num_classes=None, got {plain(self.num_classes)}"
            )
        d = None
        for part in ("train", "test"):
            x, y = getattr(self, f"x_{part}"), getattr(self, f"y_{part}")
            _check_xy_arrays(x, y, part, self.task, self.num_classes)
            if d is not None and x.shape[1] != d:
                raise DataError(f"x_train has {d} features but x_test has {x.shape[1]}")
            d = x.shape[1]
        if self.image_shape is not None:
            shape = tuple(int(s) for s in self.image_shape)
            if math.prod(shape) != d:
                raise DataError(f"image_shape {shape} has {math.prod(shape)} entries, not {d}")
            object.__setattr__(self, "image_shape", shape)

    @property
    def num_features(self) -> int:
        """Input width ``d``."""
        return int(self.x_train.shape[1])

    @property
    def num_outputs(self) -> int:
        """Output width of a network for this data: ``num_classes``, or 1 for regression."""
        return int(self.num_classes) if self.task == "classification" else 1


def _check_xy_arrays(x, y, part: str, task: str, num_classes) -> None:
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise DataError(f"x_{part} and y_{part} must be NumPy arrays")
    if x.ndim != 2 or x.dtype != np.float32:
        raise DataError(f"x_{part} must be a (N, d) float32 array, got {x.shape} {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise DataError(f"x_{part} is empty: shape {x.shape}")
    if task == "classification":
        if y.shape != (x.shape[0],) or y.dtype != np.int32:
            raise DataError(
                f"y_{part} must be ({x.shape[0]},) int32 labels, got {y.shape} {y.dtype}"
            )
        if y.min() < 0 or y.max() >= num_classes:
            bad = int(np.flatnonzero((y < 0) | (y >= num_classes))[0])
            raise DataError(
                f"y_{part}[{bad}] = {int(y[bad])} is out of range: labels must be in "
                f"0..{num_classes - 1}"
            )
    elif y.shape != (x.shape[0], 1) or y.dtype != np.float32:
        raise DataError(
            f"y_{part} must be ({x.shape[0]}, 1) float32 targets, got {y.shape} {y.dtype}"
        )


def frozen(a: np.ndarray) -> np.ndarray:
    """A C-contiguous, read-only view or copy of ``a``."""
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def make_dataset(name: str, task: str, x, y, train_idx, test_idx, num_classes: int | None,
                 augment_kind: str, image_shape: tuple[int, ...] | None = None) -> Dataset:
    """A :class:`Dataset` from all examples ``x`` ``(N, d)``, ``y`` ``(N,)`` and a split.

    Inputs become float32; labels int32, or regression targets ``(N, 1)`` float32.
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.int32) if task == "classification" else np.asarray(y, np.float32)
    if task == "regression":
        y = y.reshape(-1, 1)
    return Dataset(
        name=name, task=task,
        x_train=frozen(x[train_idx]), y_train=frozen(y[train_idx]),
        x_test=frozen(x[test_idx]), y_test=frozen(y[test_idx]),
        num_classes=num_classes, augment_kind=augment_kind, image_shape=image_shape,
    )


def fingerprint(ds: Dataset) -> str:
    """A content hash of the data a training run uses, to notice that a data file changed.

    The SHA-256 of a header (format tag; ``task``, ``num_classes``, ``augment_kind``,
    ``image_shape``; the dtype, byte order and shape of each array) followed by the raw bytes of
    ``x_train``, ``y_train``, ``x_test``, ``y_test`` in that order, each hashed once. It is
    computed from the loaded arrays, not from the file: the same numbers give the same
    fingerprint whatever the file's format, path or name (``ds.name`` is not hashed), while any
    changed value, label, row order, dtype or shape gives another.

    Args:
      ds: the dataset, as loaded (before standardisation, which depends on the split).

    Returns:
      64 lowercase hexadecimal characters.
    """
    if not isinstance(ds, Dataset):
        raise TypeError(f"fingerprint needs a fnbackprop.data.Dataset, got {type(ds).__name__}")
    fields = ("x_train", "y_train", "x_test", "y_test")
    arrays = [np.ascontiguousarray(getattr(ds, f)) for f in fields]
    header = {
        "format": FINGERPRINT_FORMAT, "task": ds.task,
        "num_classes": None if ds.num_classes is None else int(ds.num_classes),
        "augment_kind": ds.augment_kind,
        "image_shape": None if ds.image_shape is None else list(ds.image_shape),
        "arrays": [[f, a.dtype.str, list(a.shape)] for f, a in zip(fields, arrays)],
    }
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for a in arrays:
        h.update(a)
    return h.hexdigest()
