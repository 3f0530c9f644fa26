"""Privacy accounting for DP-SGD: ε from dp-accounting, σ for a target ε, δ, Poisson batch capacity.

DP-SGD here means: at each step, clip every example's gradient to L2 norm ``C``, sum the clipped
gradients of the batch, add ``N(0, σ²C² I)`` and divide by a constant (the expected batch size).
The guarantees below are (ε, δ)-differential privacy of the whole sequence of noisy sums, hence of
every intermediate and final model, with respect to one training example. They assume the noise
and the batch selection use randomness independent of the data, and real-valued Gaussian noise.

Which neighbouring datasets a guarantee covers is stated with it: add-or-remove-one (a dataset
and the same dataset with one example more or less), zero-out (one example replaced by a "zero"
example whose clipped gradient is 0; dp-accounting's ``REPLACE_SPECIAL``), replace-one (one
example replaced by any other). The training-set size N is treated as public, as it is whenever
the sampling rate is set to q = B/N.

``dp_accounting`` and ``scipy.stats`` are imported inside the functions that use them, so that
``import fnbackprop`` does not pay for them.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

__all__ = [
    "ACCOUNTANTS",
    "ADJACENCIES",
    "PUBLISHED_SETTINGS",
    "PoissonCapacity",
    "PublishedSetting",
    "RecomputedSetting",
    "default_delta",
    "delta_with_overflow",
    "epsilon",
    "epsilon_shuffled",
    "noise_multiplier_for",
    "poisson_batch_capacity",
    "published_settings",
]

ACCOUNTANTS: tuple[str, ...] = ("pld", "rdp")
"""Accountants of :func:`epsilon`, :func:`noise_multiplier_for` and :func:`epsilon_shuffled`."""

ADJACENCIES: tuple[str, ...] = ("zero_out", "replace_one")
"""Neighbouring relations of :func:`epsilon_shuffled`."""


# ---------------------------------------------------------------------------------------------
# Validation: every public function checks its arguments before any work.


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_noise_multiplier(noise_multiplier) -> float:
    s = noise_multiplier
    if not (_is_real(s) and math.isfinite(s) and s >= 0):
        raise ValueError(f"noise_multiplier must be a finite number ≥ 0, got {noise_multiplier!r}")
    return float(noise_multiplier)


def _check_sampling_rate(sampling_rate) -> float:
    if not (_is_real(sampling_rate) and 0 < sampling_rate <= 1):  # NaN fails both comparisons
        raise ValueError(f"sampling_rate must be a number in (0, 1], got {sampling_rate!r}")
    return float(sampling_rate)


def _check_count(name: str, value) -> int:
    if not (_is_int(value) and value >= 1):
        raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    return int(value)


def _check_delta(delta) -> float:
    if not (_is_real(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
    return float(delta)


def _check_positive(name: str, value) -> float:
    if not (_is_real(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_accountant(accountant) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; allowed: {', '.join(ACCOUNTANTS)}")
    return accountant


# ---------------------------------------------------------------------------------------------
# Poisson-sampled DP-SGD.


def _accountant_class(accountant: str):
    """dp-accounting's accountant class; constructed with its defaults (as jax_privacy does)."""
    import dp_accounting

    if accountant == "pld":
        return dp_accounting.pld.PLDAccountant
    return dp_accounting.rdp.RdpAccountant


def _dpsgd_event(noise_multiplier: float, sampling_rate: float, steps: int):
    import dp_accounting

    step = dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )
    return dp_accounting.SelfComposedDpEvent(step, steps)


def _epsilon(
    noise_multiplier: float, sampling_rate: float, steps: int, delta: float, accountant: str
) -> float:
    event = _dpsgd_event(noise_multiplier, sampling_rate, steps)
    return float(_accountant_class(accountant)().compose(event).get_epsilon(delta))


def epsilon(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
) -> float:
    """ε of DP-SGD with Poisson sampling, as computed by dp-accounting.

    Each of ``steps`` steps puts every example in its batch independently with probability
    ``sampling_rate`` (q), and adds Gaussian noise of standard deviation σC to the sum of the
    clipped gradients. That is dp-accounting's
    ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)), steps)``, and the run is
    (ε, δ)-DP with the returned ε under add-or-remove-one adjacency, and equally under zero-out
    adjacency (the accountants treat the two alike for this event). The guarantee needs true
    Poisson batches: a batch that drops examples on overflow needs
    :func:`poisson_batch_capacity` and :func:`delta_with_overflow`; shuffled batches need
    :func:`epsilon_shuffled`.

    The accountants are dp-accounting's with its default settings, which are also those of
    ``jax_privacy.accounting`` and of TF Privacy's ``compute_dp_sgd_privacy_lib``, so the values
    agree with theirs:

    * ``"pld"``: ``PLDAccountant()``: the privacy loss distribution, discretised at interval
      1e-4 with pessimistic rounding. A numerically tight upper bound on the true ε.
    * ``"rdp"``: ``RdpAccountant()``: Rényi DP at dp-accounting's default orders, converted to
      (ε, δ) with the conversion of Canonne, Kamath & Steinke (2020). A valid upper bound, looser
      than ``"pld"``, much cheaper to compute.

    Args:
      noise_multiplier: σ, the noise standard deviation divided by the clipping norm C; ≥ 0.
      sampling_rate: q in (0, 1], the probability that an example is in a given batch
        (expected batch size / N).
      steps: the number of noisy steps, an integer ≥ 1.
      delta: δ in (0, 1).
      accountant: ``"pld"`` or ``"rdp"``.

    Returns:
      ε ≥ 0; ``inf`` when ``noise_multiplier`` is 0 (no privacy).

    Raises:
      ValueError: any argument outside the ranges above.
    """
    s = _check_noise_multiplier(noise_multiplier)
    q = _check_sampling_rate(sampling_rate)
    t = _check_count("steps", steps)
    d = _check_delta(delta)
    a = _check_accountant(accountant)
    if s == 0:
        return math.inf  # what both accountants give; nothing to compute
    return _epsilon(s, q, t, d, a)


def noise_multiplier_for(
    target_epsilon: float,
    sampling_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
    *,
    tolerance: float = 1e-6,
) -> float:
    """The smallest σ whose :func:`epsilon` is at most ``target_epsilon`` (up to ``tolerance``).

    The search is dp-accounting's ``calibrate_dp_mechanism`` with its default bracket (from
    [0, 1], widened upwards until it holds the target) and ``tol=tolerance``, as ``jax_privacy``
    calls it: Brent's method, then a bisection fallback that only returns a σ with ε ≤ target. ε decreases as σ grows, so the
    returned σ lies in [σ*, σ* + ``tolerance``], where σ* is the exact smallest σ meeting the
    target. Before returning, ε is evaluated once more at the returned σ, so the guarantee
    ``epsilon(σ, ...) ≤ target_epsilon`` holds for the value returned, not only for the search.

    Args:
      target_epsilon: the ε to meet, a finite number > 0.
      sampling_rate: q in (0, 1].
      steps: the number of noisy steps, an integer ≥ 1.
      delta: δ in (0, 1).
      accountant: ``"pld"`` or ``"rdp"`` (see :func:`epsilon`).
      tolerance: the absolute tolerance in σ, a finite number > 0; the default is
        dp-accounting's.

    Returns:
      σ > 0 with ``epsilon(σ, sampling_rate, steps, delta, accountant) ≤ target_epsilon``.

    Raises:
      ValueError: any argument outside the ranges above.
      RuntimeError: the search returned a σ that does not meet the target (a dp-accounting bug).
    """
    eps = _check_positive("target_epsilon", target_epsilon)
    q = _check_sampling_rate(sampling_rate)
    t = _check_count("steps", steps)
    d = _check_delta(delta)
    a = _check_accountant(accountant)
    tol = _check_positive("tolerance", tolerance)

    import dp_accounting

    sigma = float(
        dp_accounting.calibrate_dp_mechanism(
            _accountant_class(a),
            lambda s: _dpsgd_event(s, q, t),
            target_epsilon=eps,
            target_delta=d,
            tol=tol,
        )
    )
    achieved = _epsilon(sigma, q, t, d, a) if sigma > 0 else math.inf
    if not achieved <= eps:
        raise RuntimeError(
            f"calibration returned noise_multiplier={sigma}, whose ε = {achieved} exceeds "
            f"target_epsilon={eps}"
        )
    return sigma


# ---------------------------------------------------------------------------------------------
# Shuffled (or fixed-order) batches: no amplification by sampling.


def epsilon_shuffled(
    noise_multiplier: float,
    epochs: int,
    delta: float,
    accountant: str = "pld",
    *,
    adjacency: str = "zero_out",
) -> float:
    """ε that shuffled batches can honestly claim: one Gaussian mechanism per epoch, composed.

    With shuffled (or any fixed-order) batches every epoch splits the training set into disjoint
    batches, so an example is in at most one batch per epoch. Under zero-out adjacency the two
    neighbouring runs feed identical batches except that one, whose clipped sum moves by at most
    C in L2 norm: whatever the order, an epoch is at most a Gaussian mechanism of sensitivity C
    and noise σC on that example. ``epochs`` of them compose adaptively into dp-accounting's
    ``SelfComposedDpEvent(GaussianDpEvent(σ), epochs)``, the Gaussian mechanism with noise
    multiplier σ/√epochs, which is what is accounted here. Under replace-one adjacency the
    sensitivity is 2C and the same holds with σ/2 (``adjacency="replace_one"``). Under
    add-or-remove-one adjacency the argument fails, since adding an example shifts the partition
    and can change every batch of the epoch (``jax_privacy`` documents its equal-split batches as
    compatible with zero-out and replace-one adjacency only).

    No amplification by shuffling is claimed. A fixed order is exactly this Gaussian mechanism,
    and a random order is a mixture of fixed orders, so this ε is an upper bound for shuffling.
    Chua et al. (2024, "How Private are DP-SGD Implementations?", ICML) show shuffled batches can
    be far less private than the Poisson ε of :func:`epsilon` at q = B/N, so that number must
    not be reported for shuffled batches.

    Args:
      noise_multiplier: σ, the noise standard deviation divided by the clipping norm C; ≥ 0.
      epochs: the number of passes in which an example can be in a batch (a partial last pass
        counts as one), an integer ≥ 1.
      delta: δ in (0, 1).
      accountant: ``"pld"`` or ``"rdp"`` (see :func:`epsilon`).
      adjacency: ``"zero_out"`` or ``"replace_one"``.

    Returns:
      ε ≥ 0 under the chosen adjacency; ``inf`` when ``noise_multiplier`` is 0.

    Raises:
      ValueError: any argument outside the ranges above.
    """
    s = _check_noise_multiplier(noise_multiplier)
    e = _check_count("epochs", epochs)
    d = _check_delta(delta)
    a = _check_accountant(accountant)
    if adjacency not in ADJACENCIES:
        raise ValueError(f"unknown adjacency {adjacency!r}; allowed: {', '.join(ADJACENCIES)}")
    if s == 0:
        return math.inf

    import dp_accounting

    # dp-accounting's GaussianDpEvent is a sensitivity-1 query: fold the sensitivity into σ.
    sensitivity = 1.0 if adjacency == "zero_out" else 2.0
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(s / sensitivity), e)
    return float(_accountant_class(a)().compose(event).get_epsilon(d))


# ---------------------------------------------------------------------------------------------
# δ.

_DEFAULT_DELTA = 1e-5
_DEFAULT_DELTA_MAX_N = 10_000  # the largest N with 1e-5 ≤ 1/(10·N)


def default_delta(n: int) -> tuple[float, str]:
    """δ = min(1e-5, 1/(10·N)) for a training set of N examples, and which of the two it is.

    δ bounds the probability of a failure the ε statement does not cover: a mechanism that
    publishes each example with probability δ is (0, δ)-DP and reveals δ·N examples on average.
    δ must therefore be well below 1/N. The rule keeps the customary 1e-5 while it is at most
    1/(10·N), that is for N ≤ 10⁴, and otherwise uses 1/(10·N), so that this trivial mechanism
    would reveal at most a tenth of an example on average.

    Args:
      n: the training-set size N, an integer ≥ 1.

    Returns:
      ``(delta, reason)``, ``reason`` a short phrase for a summary, e.g. ``"1e-05 (default)"``
      or ``"1/(10·N) = 1.67e-06 because N = 60000 exceeds 10^4"``.

    Raises:
      ValueError: ``n`` is not an integer ≥ 1.
    """
    n = _check_count("n", n)
    if n <= _DEFAULT_DELTA_MAX_N:
        return _DEFAULT_DELTA, f"{_DEFAULT_DELTA:g} (default)"
    delta = 1 / (10 * n)
    return delta, f"1/(10·N) = {delta:.3g} because N = {n} exceeds 10^4"


# ---------------------------------------------------------------------------------------------
# Fixed-capacity Poisson batches.


class PoissonCapacity(NamedTuple):
    """A fixed batch capacity for Poisson sampling and the probability it is ever exceeded."""

    capacity: int
    """The smallest batch capacity whose overflow bound is within the requested bound."""
    overflow_probability: float
    """``steps · P[Binomial(N + 1, q) > capacity]``: bounds the probability that any batch of
    the run exceeds ``capacity``, for the training set and for each of its neighbours."""


def _overflow_bound(capacity: int, n_plus_one: int, q: float, steps: int) -> float:
    from scipy.stats import binom

    return steps * float(binom.sf(capacity, n_plus_one, q))


def poisson_batch_capacity(
    n: int,
    expected_batch_size: float,
    steps: int,
    max_overflow_probability: float = 1e-12,
) -> PoissonCapacity:
    """The smallest fixed batch capacity that Poisson batches exceed with negligible probability.

    A compiled epoch needs a fixed batch shape, so Poisson batches (each of N examples kept
    independently with probability q = ``expected_batch_size`` / N) are padded to a capacity with
    a mask. The returned capacity is the smallest c with
    ``steps · P[Binomial(N + 1, q) > c] ≤ max_overflow_probability``, from exact binomial tails
    (``scipy.stats.binom.sf``) and a union bound over the steps. N + 1 covers the neighbouring
    datasets too: a batch size from N − 1, N or N + 1 examples is stochastically at most
    Binomial(N + 1, q).

    The overflow probability p enters the guarantee as follows. If a batch ever overflows and is
    truncated, the run differs from the Poisson run accounted by :func:`epsilon` only on an event
    of probability ≤ p, on the training set and on each neighbour. Then for every set S of
    outcomes, P[M'(D) ∈ S] ≤ P[M(D) ∈ S] + p ≤ e^ε P[M(D') ∈ S] + δ + p
    ≤ e^ε P[M'(D') ∈ S] + δ + (1 + e^ε) p, so an (ε, δ) Poisson guarantee becomes
    (ε, δ + (1 + e^ε) p) (:func:`delta_with_overflow`). The default bound p ≤ 1e-12 keeps
    (1 + e^ε) p below 1% of δ for δ = 1e-5 and ε ≤ 10, or δ = 1e-7 and ε ≤ 6, while a smaller p
    costs little: by a Chernoff bound the capacity exceeds B by about √(2 B log(steps / p)).
    A loop that processes an overflowing batch in full (e.g. in two passes) instead of
    truncating it keeps the (ε, δ) of :func:`epsilon` exactly, whatever the capacity.

    Args:
      n: the training-set size N, an integer ≥ 1.
      expected_batch_size: B = q·N, a number in (0, N].
      steps: the number of Poisson batches drawn, an integer ≥ 1.
      max_overflow_probability: the bound on p, a number in (0, 1).

    Returns:
      ``PoissonCapacity(capacity, overflow_probability)`` with
      ``overflow_probability ≤ max_overflow_probability`` and a capacity one smaller exceeding
      it.

    Raises:
      ValueError: any argument outside the ranges above.
    """
    n = _check_count("n", n)
    if not (_is_real(expected_batch_size) and 0 < expected_batch_size <= n):
        raise ValueError(
            f"expected_batch_size must be a number in (0, n={n}], got {expected_batch_size!r}"
        )
    t = _check_count("steps", steps)
    if not (_is_real(max_overflow_probability) and 0 < max_overflow_probability < 1):
        raise ValueError(
            f"max_overflow_probability must be a number in (0, 1), got {max_overflow_probability!r}"
        )
    q = float(expected_batch_size) / n
    p_max = float(max_overflow_probability)

    # The bound decreases with the capacity and is 0 at N + 1: bisect for its first c ≤ p_max.
    lo, hi = -1, n + 1  # bound(lo) > p_max (a batch always has > -1 examples), bound(hi) = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _overflow_bound(mid, n + 1, q, t) <= p_max:
            hi = mid
        else:
            lo = mid
    return PoissonCapacity(capacity=hi, overflow_probability=_overflow_bound(hi, n + 1, q, t))


def delta_with_overflow(delta: float, epsilon: float, overflow_probability: float) -> float:
    """δ + (1 + e^ε)·p: the δ of an (ε, δ) run whose batches overflow with probability ≤ p.

    See :func:`poisson_batch_capacity` for the argument.

    Args:
      delta: δ of the accounted (untruncated) run, in (0, 1).
      epsilon: its ε, a number ≥ 0 (``inf`` gives ``inf``).
      overflow_probability: p, a number in [0, 1].

    Returns:
      The δ of the run with truncation at the capacity (may exceed 1, i.e. no guarantee).

    Raises:
      ValueError: any argument outside the ranges above.
    """
    d = _check_delta(delta)
    if not (_is_real(epsilon) and epsilon >= 0):
        raise ValueError(f"epsilon must be a number ≥ 0, got {epsilon!r}")
    if not (_is_real(overflow_probability) and 0 <= overflow_probability <= 1):
        raise ValueError(
            f"overflow_probability must be a number in [0, 1], got {overflow_probability!r}"
        )
    p = float(overflow_probability)
    if p == 0:
        return d  # also for ε = inf, where (1 + e^ε)·0 is undefined
    try:
        return d + (1 + math.exp(epsilon)) * p
    except OverflowError:  # e^ε beyond the float range
        return math.inf


# ---------------------------------------------------------------------------------------------
# Published settings, recomputed.


class PublishedSetting(NamedTuple):
    """A published DP-SGD setting with Poisson sampling and the ε its source reports."""

    source: str
    reference: str
    """Where the setting and ε are stated (URL, file and section)."""
    sampling_rate: float
    noise_multiplier: float
    epochs: float
    steps: int
    delta: float
    published_epsilon: float
    published_accounting: str
    """How the source computed its ε."""


_TF_TUTORIAL = (
    "https://github.com/tensorflow/privacy/blob/master/tutorials/README.md "
    "(tables 'Expected Output' and 'Select Parameters'; steps = ceil(epochs·N/B) as in "
    "tensorflow_privacy/privacy/analysis/compute_dp_sgd_privacy_lib.py)"
)
_OPACUS_MNIST = (
    "https://github.com/pytorch/opacus/blob/main/examples/mnist_README.md "
    "('Sample parameter sets'; examples/mnist.py: batch 240 of 60000, Poisson sample rate "
    "1/len(data_loader) = 1/250, 250 steps per epoch)"
)
_ABADI = (
    "Abadi et al. 2016, 'Deep Learning with Differential Privacy', CCS, "
    "https://arxiv.org/abs/1607.00133, section 3.1 (L = 0.01N, σ = 4, δ = 1e-5, T = 10000)"
)
_CLASSIC_RDP = "RDP (moments accountant), ε = min_α RDP(α) + log(1/δ)/(α − 1)"

PUBLISHED_SETTINGS: tuple[PublishedSetting, ...] = (
    PublishedSetting("TF Privacy MNIST tutorial (default)", _TF_TUTORIAL,
                     256 / 60000, 1.1, 60, 14063, 1e-5, 3.01, _CLASSIC_RDP),
    PublishedSetting("TF Privacy MNIST tutorial", _TF_TUTORIAL,
                     256 / 60000, 1.3, 15, 3516, 1e-5, 1.19, _CLASSIC_RDP),
    PublishedSetting("TF Privacy MNIST tutorial", _TF_TUTORIAL,
                     256 / 60000, 0.7, 45, 10547, 1e-5, 7.10, _CLASSIC_RDP),
    PublishedSetting("Opacus MNIST example", _OPACUS_MNIST,
                     240 / 60000, 1.1, 60, 15000, 1e-5, 2.91, _CLASSIC_RDP),
    PublishedSetting("Opacus MNIST example", _OPACUS_MNIST,
                     240 / 60000, 1.3, 15, 3750, 1e-5, 1.16, _CLASSIC_RDP),
    PublishedSetting("Opacus MNIST example", _OPACUS_MNIST,
                     240 / 60000, 0.7, 45, 11250, 1e-5, 6.86, _CLASSIC_RDP),
    PublishedSetting("Abadi et al. 2016", _ABADI,
                     0.01, 4.0, 100, 10000, 1e-5, 1.26, _CLASSIC_RDP),
)
"""Published settings (all with Poisson sampling) and the ε their sources report."""


class RecomputedSetting(NamedTuple):
    """A published setting with its ε recomputed by both accountants of :func:`epsilon`."""

    setting: PublishedSetting
    epsilon_rdp: float
    epsilon_pld: float


def published_settings() -> tuple[RecomputedSetting, ...]:
    """ε of every setting in :data:`PUBLISHED_SETTINGS`, recomputed with ``"rdp"`` and ``"pld"``.

    The sources computed ε with the moments accountant / RDP and the original RDP-to-(ε, δ)
    conversion. The recomputed values are lower and both remain valid upper bounds: ``"rdp"``
    uses the tighter conversion of Canonne, Kamath & Steinke (2020) on the same RDP curve, and
    ``"pld"`` bounds the hockey-stick divergence of the composed privacy loss directly, which is
    tighter still.

    Returns:
      One :class:`RecomputedSetting` per row of :data:`PUBLISHED_SETTINGS`, in order.
    """
    return tuple(
        RecomputedSetting(
            setting=s,
            epsilon_rdp=_epsilon(s.noise_multiplier, s.sampling_rate, s.steps, s.delta, "rdp"),
            epsilon_pld=_epsilon(s.noise_multiplier, s.sampling_rate, s.steps, s.delta, "pld"),
        )
        for s in PUBLISHED_SETTINGS
    )
