"""Which examples each step of an epoch uses: shuffled or Poisson batches, drawn on the host.

An epoch is a fixed number of steps of a fixed batch shape, so that one compiled epoch serves
every epoch: :class:`Batches` holds, for each step, ``B`` row indices into the training set and
a mask of the rows that are real. Only the last step of a shuffled epoch whose batch size does
not divide the training set has padding rows (they repeat real rows and are masked out, so
nothing is dropped and nothing counted twice); Poisson batches vary in size and are padded to a
fixed capacity. The draws are made with NumPy on the host,
from ``(seed, epoch)`` only, so a resumed run draws exactly what an uninterrupted one draws.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["Batches", "Batching", "batching", "epoch_batches", "epoch_permutation",
           "shuffled_batches", "poisson_batches", "batch_plan"]

_POISSON = 0x9015  # a third word for Poisson draws' seed sequence: independent of the orders


class Batches(NamedTuple):
    """The steps of one epoch.

    Attributes:
      idx: ``(steps, B)`` int32 row indices into the training set.
      mask: ``(steps, B)`` bool, ``True`` for real rows; ``None`` when every row is real.
      truncated: Poisson batches that exceeded the capacity (0 otherwise).
    """

    idx: np.ndarray
    mask: np.ndarray | None
    truncated: int = 0


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


def shuffled_batches(seed: int, epoch: int, n: int, batch: int, width: int | None = None
                     ) -> Batches:
    """Every example exactly once, in the order of :func:`epoch_permutation`.

    ``batch ≥ n`` is one full batch in the stored order (full-batch gradient descent). When
    ``batch`` does not divide ``n``, the last step holds the ``n mod batch`` remaining examples
    and masked padding rows; ``width > batch`` pads every step to ``width`` rows.
    """
    batch = min(batch, n)
    width = batch if width is None else width
    steps, _ = batch_plan(n, batch)
    order = np.arange(n, dtype=np.int32) if batch == n else epoch_permutation(seed, epoch, n)
    if steps * batch == n and width == batch:
        return Batches(order.reshape(steps, batch), None)
    idx = np.zeros((steps, width), np.int32)
    mask = np.zeros((steps, width), bool)
    for s in range(steps):
        rows = order[s * batch:(s + 1) * batch]
        idx[s, :len(rows)], mask[s, :len(rows)] = rows, True
    return Batches(idx, mask)


def poisson_batches(seed: int, epoch: int, n: int, expected: float, steps: int,
                    capacity: int) -> Batches:
    """Poisson batches: every step includes each of the ``n`` examples independently with
    probability ``q = expected / n``, padded (masked) to ``capacity`` rows.

    Drawn as the batch size ~ Binomial(n, q), then that many distinct examples uniformly: the
    same distribution as n independent coins. A batch larger than ``capacity`` keeps a uniformly
    random ``capacity`` of its examples; how many steps were truncated is returned in
    ``truncated`` (see :func:`fnbackprop.privacy.poisson_batch_capacity` for how rarely).
    The draws are a function of ``(seed, epoch)`` only.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), _POISSON]))
    sizes = rng.binomial(n, expected / n, size=steps)
    idx = np.zeros((steps, capacity), np.int32)
    mask = np.zeros((steps, capacity), bool)
    for s, size in enumerate(sizes):
        rows = rng.choice(n, size=size, replace=False)[:capacity]
        idx[s, :len(rows)] = rows
        mask[s, :len(rows)] = True
    return Batches(idx, mask, int(np.sum(sizes > capacity)))


class Batching(NamedTuple):
    """How a run batches its ``n`` training examples (fixed for the whole run).

    Attributes:
      n: training examples.
      batch: the batch size (Poisson: the expected one).
      rows: rows of every step's arrays (padding rows masked): the batch, or the Poisson
        capacity, rounded up to a multiple of what the devices and chunks need.
      steps: steps per epoch.
      poisson: Poisson batches (else shuffled).
      overflow_probability: Poisson: bound on the probability that any batch of the run exceeds
        ``rows`` (:func:`fnbackprop.privacy.poisson_batch_capacity`).
    """

    n: int
    batch: int
    rows: int
    steps: int
    poisson: bool
    overflow_probability: float = 0.0

    @property
    def masked(self) -> bool:
        """Whether some steps have padding rows."""
        return self.poisson or self.rows * self.steps != self.n


def batching(n: int, batch_size, *, poisson: bool, epochs: int, multiple: int = 1) -> Batching:
    """The batching of a run: ``batch_size`` an integer or ``"full"``; Poisson epochs have
    ``round(n / B)`` steps; ``multiple``: rows are rounded up to a multiple of it."""
    batch = n if batch_size == "full" else min(int(batch_size), n)
    if not poisson:
        steps, _ = batch_plan(n, batch)
        return Batching(n, batch, multiple * math.ceil(batch / multiple), steps, False)
    from fnbackprop import privacy

    steps = max(1, round(n / batch))
    cap = privacy.poisson_batch_capacity(n, batch, epochs * steps)
    return Batching(n, batch, multiple * math.ceil(cap.capacity / multiple), steps, True,
                    cap.overflow_probability)


def epoch_batches(plan: Batching, seed: int, epoch: int) -> Batches:
    """The batches of epoch ``epoch`` (0-based) of a run with ``seed``."""
    if plan.poisson:
        return poisson_batches(seed, epoch, plan.n, plan.batch, plan.steps, plan.rows)
    return shuffled_batches(seed, epoch, plan.n, plan.batch, plan.rows)
