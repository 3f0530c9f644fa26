"""Which examples each step of an epoch uses: shuffled batches, drawn on the host.

An epoch is a fixed number of steps of a fixed batch shape, so that one compiled epoch serves
every epoch: :class:`Batches` holds, for each step, ``B`` row indices into the training set and
a mask of the rows that are real. Only the last step of a shuffled epoch whose batch size does
not divide the training set has padding rows (they repeat real rows and are masked out, so
nothing is dropped and nothing counted twice). The orders are drawn with NumPy on the host,
from ``(seed, epoch)`` only, so a resumed run draws exactly what an uninterrupted one draws.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Batches", "epoch_permutation", "shuffled_batches", "batch_plan"]


class Batches(NamedTuple):
    """The steps of one epoch.

    Attributes:
      idx: ``(steps, B)`` int32 row indices into the training set.
      mask: ``(steps, B)`` bool, ``True`` for real rows; ``None`` when every row is real.
    """

    idx: np.ndarray
    mask: np.ndarray | None


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch ``epoch`` (0-based) of a run with ``seed`` visits ``n`` examples.

    ``numpy.random.default_rng(SeedSequence([seed, epoch])).permutation(n)`` as int32: a
    function of ``(seed, epoch)`` only, the same on every platform.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))
    return rng.permutation(n).astype(np.int32)


def batch_plan(n: int, batch: int) -> tuple[int, bool]:
    """``(steps, padded)`` of an epoch of ``n`` examples in batches of ``batch``: the number of
    steps, and whether the last one is padded (``batch`` does not divide ``n``)."""
    full, rem = divmod(n, batch)
    return full + (rem > 0), rem > 0


def shuffled_batches(seed: int, epoch: int, n: int, batch: int) -> Batches:
    """Every example exactly once, in the order of :func:`epoch_permutation`.

    ``batch ≥ n`` is one full batch in the stored order (full-batch gradient descent). When
    ``batch`` does not divide ``n``, the last step holds the ``n mod batch`` remaining examples
    and ``batch − n mod batch`` masked padding rows.
    """
    if batch >= n:
        return Batches(np.arange(n, dtype=np.int32)[None, :], None)
    steps, padded = batch_plan(n, batch)
    order = epoch_permutation(seed, epoch, n)
    if not padded:
        return Batches(order.reshape(steps, batch), None)
    pad = steps * batch - n
    idx = np.concatenate([order, order[:pad]]).reshape(steps, batch)
    mask = np.ones((steps, batch), bool)
    mask[-1, batch - pad:] = False
    return Batches(idx, mask)
