"""The privacy of a run with DP noise: its plan before training, its ε after every epoch.

:func:`plan` fixes, before the first step, everything the guarantee depends on: the sampling
(Poisson with rate q = B/N, or shuffled batches), the steps, δ (given, or
:func:`fnbackprop.privacy.default_delta`), σ (given, or the smallest σ reaching a target ε over
the whole run), and for Poisson batches the padded capacity and its overflow bound. The ε after
each epoch is then a function of the plan alone (:func:`epsilon_after`), computed with
dp-accounting (:mod:`fnbackprop.privacy`): exact for Poisson batches; for shuffled batches the
ε they can honestly claim, without amplification by sampling.

:func:`not_covered` lists what a run computes from the training data outside the guarantee.
"""

from __future__ import annotations

import concurrent.futures
from typing import NamedTuple

from fnbackprop import privacy

__all__ = ["PrivacyPlan", "EpsilonSchedule", "plan", "epsilon_after", "not_covered",
           "privacy_block"]


class PrivacyPlan(NamedTuple):
    """What a private run's guarantee depends on (all fixed before training).

    Attributes:
      noise_multiplier: σ.
      clip_norm: C.
      delta: δ, and ``delta_reason``: why this δ.
      accountant: ``"pld"`` or ``"rdp"``.
      sampling: ``"poisson"`` or ``"shuffle"``.
      sampling_rate: q = B/N (Poisson).
      expected_batch_size: B.
      steps_per_epoch: steps of one epoch.
      capacity: rows of a padded Poisson batch (``None`` for shuffled batches).
      overflow_probability: bound on the probability that any Poisson batch of the run exceeds
        ``capacity`` (then it is truncated; the guarantee becomes
        (ε, δ + (1 + e^ε)·p), see :func:`fnbackprop.privacy.delta_with_overflow`).
      adjacency: the neighbouring datasets the guarantee is for.
    """

    noise_multiplier: float
    clip_norm: float
    delta: float
    delta_reason: str
    accountant: str
    sampling: str
    sampling_rate: float
    expected_batch_size: int
    steps_per_epoch: int
    capacity: int | None
    overflow_probability: float
    adjacency: str


def plan(config, batching) -> PrivacyPlan:
    """The plan of a private run with ``config`` batched as ``batching``
    (:class:`fnbackprop.training.sampling.Batching`)."""
    n, batch = batching.n, batching.batch
    if config.delta is not None:
        delta, reason = float(config.delta), "given"
    else:
        delta, reason = privacy.default_delta(n)
    q = batch / n
    if config.target_epsilon is not None:
        sigma = privacy.noise_multiplier_for(config.target_epsilon, q,
                                             config.epochs * batching.steps, delta,
                                             config.accountant)
    else:
        sigma = float(config.noise_multiplier)
    return PrivacyPlan(sigma, float(config.per_example_clip), delta, reason, config.accountant,
                       "poisson" if batching.poisson else "shuffle", q, batch, batching.steps,
                       batching.rows if batching.poisson else None,
                       batching.overflow_probability,
                       "add or remove one example" if config.poisson
                       else "replace one example by a zero-gradient one (zero-out)")


def epsilon_after(p: PrivacyPlan, epochs: int) -> float:
    """ε spent after ``epochs`` epochs of the plan ``p`` (with its accountant, at its δ)."""
    if p.sampling == "poisson":
        return privacy.epsilon(p.noise_multiplier, p.sampling_rate, epochs * p.steps_per_epoch,
                               p.delta, p.accountant)
    return privacy.epsilon_shuffled(p.noise_multiplier, epochs, p.delta, p.accountant)


def not_covered(config, steps_logged: bool) -> list[str]:
    """What the run computes from the training data outside the guarantee."""
    out = ["standardisation statistics (per-feature mean and standard deviation of the "
           "training inputs)"]
    if config.early_stopping is not None:
        out.append("the early-stopping split and its validation losses (which epoch is kept)")
    if steps_logged:
        out += ["per-epoch training metrics (train_loss, train_accuracy, train_batch_loss)",
                "gradient and δ norm logs (grad_norm, delta_norm, gradient_flow.png)",
                "the first-batch gradient check (command line)", "curves.png's training curve"]
    return out


def privacy_block(p: PrivacyPlan, epsilon: float, steps: int, config, truncated: int) -> dict:
    """``summary.json``'s ``privacy``: the guarantee and what it does not cover."""
    return {
        "epsilon": epsilon,
        "delta": p.delta,
        "delta_reason": p.delta_reason,
        "accountant": p.accountant,
        "noise_multiplier": p.noise_multiplier,
        "clip_norm": p.clip_norm,
        "sampling": p.sampling,
        "sampling_rate": p.sampling_rate,
        "expected_batch_size": p.expected_batch_size,
        "steps": steps,
        "adjacency": p.adjacency,
        "capacity": p.capacity,
        "overflow_probability": p.overflow_probability,
        "truncated_batches": truncated,
        "target_epsilon": config.target_epsilon,
        "not_covered": not_covered(config, config.logs_training_data),
    }


class EpsilonSchedule:
    """The ε after every epoch of a plan, computed on a worker thread while the run trains
    (each value costs the accountant a fraction of a second; none depends on the training)."""

    def __init__(self, p: PrivacyPlan, epochs: int):
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                     thread_name_prefix="accounting")
        self._values: list[float] = []
        self._future = pool.submit(self._compute, p, epochs)
        pool.shutdown(wait=False)

    def _compute(self, p: PrivacyPlan, epochs: int) -> list[float]:
        for e in range(1, epochs + 1):
            self._values.append(epsilon_after(p, e))
        return self._values

    def get(self, epoch: int) -> float | None:
        """ε after ``epoch`` epochs if it is computed already, else ``None`` (no waiting)."""
        return self._values[epoch - 1] if epoch <= len(self._values) else None

    def result(self) -> list[float]:
        """Every epoch's ε (waits for the worker)."""
        return self._future.result()
