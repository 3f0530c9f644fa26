"""Splits (the fixed train/test split, the seeded validation split) and standardisation."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from fnbackprop.data.dataset import DataError, Dataset, check_seed, frozen


def split_indices(y: np.ndarray | None, n: int, fraction: float, seed: int,
                  stratify: bool) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (kept, held-out) index arrays, both sorted.

    ``round(fraction * n)`` examples are held out (at least 1, at most ``n - 1``). With
    ``stratify`` every class contributes in proportion to its size (largest-remainder rounding),
    and a class never gives away its last example.
    """
    n_out = min(max(int(round(fraction * n)), 1), n - 1)
    rng = np.random.default_rng(seed)
    if not stratify:
        perm = rng.permutation(n)
        return np.sort(perm[n_out:]), np.sort(perm[:n_out])
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * (n_out / n)
    alloc = np.floor(quota).astype(np.int64)
    order = np.argsort(-(quota - alloc), kind="stable")
    alloc[order[: n_out - int(alloc.sum())]] += 1
    alloc = np.minimum(alloc, np.maximum(counts - 1, 0))
    held = []
    for c, k in zip(classes, alloc):
        members = np.flatnonzero(y == c)
        held.append(members[rng.permutation(len(members))[:k]])
    held = np.sort(np.concatenate(held))
    mask = np.ones(n, bool)
    mask[held] = False
    return np.flatnonzero(mask), held


def split_validation(ds: Dataset, val_fraction: float, seed: int
                     ) -> tuple[Dataset, tuple[np.ndarray, np.ndarray] | None]:
    """Carve a validation set out of the training set (the test set is untouched).

    The split is seeded by ``seed`` (the training seed) and stratified for classification;
    ``round(val_fraction * N)`` examples (at least 1) go to validation.

    Args:
      ds: the dataset.
      val_fraction: fraction of the training examples for validation, in ``[0, 1)``; 0 means no
        validation set.
      seed: split seed, an integer ≥ 0.

    Returns:
      ``(ds_without_val, (x_val, y_val))``, or ``(ds, None)`` when ``val_fraction == 0``.
      ``x_val`` is ``(V, d)`` float32, ``y_val`` is ``(V,)`` int32 or ``(V, 1)`` float32.
    """
    if (isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float))
            or not 0.0 <= val_fraction < 1.0):
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    check_seed(seed)
    if val_fraction == 0:
        return ds, None
    n = ds.x_train.shape[0]
    if n < 2:
        raise DataError(
            f"{ds.name}: {n} training example(s) cannot be split into training and validation"
        )
    keep, val = split_indices(ds.y_train, n, val_fraction, seed,
                              stratify=ds.task == "classification")
    rest = dataclasses.replace(ds, x_train=frozen(ds.x_train[keep]),
                               y_train=frozen(ds.y_train[keep]))
    return rest, (frozen(ds.x_train[val]), frozen(ds.y_train[val]))


class Standardization(NamedTuple):
    """Training statistics used by :func:`standardize`.

    Attributes:
      x_mean: ``(d,)`` float32 per-feature training mean.
      x_std: ``(d,)`` float32 per-feature training standard deviation, with 1 in place of 0 for
        constant features (which therefore become exactly 0).
      y_mean: ``(1,)`` float32 training target mean (regression), else ``None``.
      y_std: ``(1,)`` float32 training target standard deviation (regression), else ``None``.
    """

    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: np.ndarray | None
    y_std: np.ndarray | None


def _mean_std(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = a.astype(np.float64)
    mean = a.mean(axis=0)
    std = a.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return mean, std


def standardize(ds: Dataset, val: tuple[np.ndarray, np.ndarray] | None = None
                ) -> tuple[Dataset, tuple[np.ndarray, np.ndarray] | None, Standardization]:
    """Standardise inputs (and regression targets) with statistics of the training set only.

    ``x ← (x − mean_train) / std_train`` per feature, for train, validation and test alike;
    features constant on the training set get std 1 (they become 0, never NaN). Regression
    targets are standardised the same way with the training targets' mean and std, so the
    network fits ``(y − y_mean) / y_std``: losses are then in standardised units, while R² is the
    same on either scale (it is invariant under one affine map of targets and predictions); use
    :func:`unstandardize_targets` to get predictions back in the original units. Labels are
    left as they are.

    Args:
      ds: the dataset, e.g. from :func:`load_dataset` or :func:`split_validation`.
      val: optional ``(x_val, y_val)`` from :func:`split_validation`.

    Returns:
      ``(ds_standardised, val_standardised_or_None, stats)``; arrays are float32.
    """
    x_mean, x_std = _mean_std(ds.x_train)

    def fx(x):
        z = (x.astype(np.float64) - x_mean[None, :]) / x_std[None, :]
        return frozen(z.astype(np.float32))

    if ds.task == "regression":
        y_mean, y_std = _mean_std(ds.y_train)

        def fy(y):
            return frozen(((y.astype(np.float64) - y_mean[None, :]) / y_std[None, :])
                          .astype(np.float32))
        stats = Standardization(x_mean.astype(np.float32), x_std.astype(np.float32),
                                y_mean.astype(np.float32), y_std.astype(np.float32))
    else:
        def fy(y):
            return y
        stats = Standardization(x_mean.astype(np.float32), x_std.astype(np.float32), None, None)
    out = dataclasses.replace(ds, x_train=fx(ds.x_train), y_train=fy(ds.y_train),
                              x_test=fx(ds.x_test), y_test=fy(ds.y_test))
    if val is not None:
        x_val, y_val = val
        if x_val.ndim != 2 or x_val.shape[1] != ds.x_train.shape[1]:
            raise DataError(
                f"x_val has shape {x_val.shape}; expected (V, {ds.x_train.shape[1]})"
            )
        val = (fx(np.asarray(x_val)), fy(np.asarray(y_val)))
    return out, val, stats


def unstandardize_targets(y, stats: Standardization):
    """Map standardised regression targets or predictions ``(N, 1)`` back to original units."""
    if stats.y_mean is None:
        raise ValueError("these statistics are for classification data: no target scaling")
    return y * stats.y_std[None, :] + stats.y_mean[None, :]
