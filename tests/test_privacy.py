"""Privacy accounting (fnbackprop.privacy) against dp-accounting, closed forms and scipy.

References: dp-accounting's accountants called directly on the same events (equality is exact:
the same computation), the closed-form δ(ε) of the Gaussian mechanism (Balle & Wang 2018) solved
with scipy, and scipy's exact binomial tails. The PLD accountant costs a fraction of a second per
call, so the settings here are small and the PLD calibration and published-settings checks are
marked ``slow``.
"""

from __future__ import annotations

import inspect
import math

import dp_accounting
import numpy as np
import pytest
from scipy import optimize, stats

import fnbackprop as fb

P = fb.privacy

# (σ, q, steps, δ): cheap for the PLD accountant (it costs the most at small σ), ε from 1 to 3.
SETTINGS = [(3.0, 0.1, 50, 1e-5), (5.0, 1.0, 10, 1e-6)]


def dpsgd_event(sigma, q, steps):
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )


def direct(event, delta, accountant, relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE):
    """dp-accounting called directly, default settings apart from the neighbouring relation."""
    pld, rdp = dp_accounting.pld.PLDAccountant, dp_accounting.rdp.RdpAccountant
    cls = pld if accountant == "pld" else rdp
    return cls(neighboring_relation=relation).compose(event).get_epsilon(delta)


def gaussian_epsilon_exact(sigma, delta):
    """ε of the Gaussian mechanism (sensitivity 1, noise σ) from Balle & Wang (2018), Thm 8."""

    def delta_of(eps):
        return stats.norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * stats.norm.cdf(
            -0.5 / sigma - eps * sigma
        )

    return optimize.brentq(lambda e: delta_of(e) - delta, 0.0, 500.0, xtol=1e-12)


# ---------------------------------------------------------------------------------------------
# ε of Poisson-sampled DP-SGD.


@pytest.mark.parametrize("accountant", P.ACCOUNTANTS)
@pytest.mark.parametrize("setting", SETTINGS)
def test_epsilon_is_dp_accounting(setting, accountant):
    sigma, q, steps, delta = setting
    want = direct(dpsgd_event(sigma, q, steps), delta, accountant)
    assert P.epsilon(sigma, q, steps, delta, accountant) == want


def test_epsilon_defaults_and_adjacency():
    assert inspect.signature(P.epsilon).parameters["accountant"].default == "pld"
    sigma, q, steps, delta = SETTINGS[0]
    event = dpsgd_event(sigma, q, steps)
    eps = {a: P.epsilon(sigma, q, steps, delta, a) for a in P.ACCOUNTANTS}
    assert 0 < eps["pld"] < eps["rdp"]  # PLD is the tighter of the two upper bounds
    # The docstring's claim: zero-out adjacency gives the same ε for this event.
    zero_out = dp_accounting.NeighboringRelation.REPLACE_SPECIAL
    assert direct(event, delta, "rdp", zero_out) == eps["rdp"]
    assert direct(event, delta, "pld", zero_out) == eps["pld"]


def test_epsilon_numpy_scalars():
    sigma, q, steps, delta = 1.1, 0.01, 100, 1e-5
    got = P.epsilon(np.float32(sigma), np.float64(q), np.int64(steps), delta, "rdp")
    assert got == direct(dpsgd_event(float(np.float32(sigma)), q, steps), delta, "rdp")
    assert type(got) is float


@pytest.mark.parametrize("accountant", P.ACCOUNTANTS)
def test_zero_noise_is_infinite(accountant):
    assert P.epsilon(0.0, 0.1, 10, 1e-5, accountant) == math.inf
    assert direct(dpsgd_event(0.0, 0.1, 10), 1e-5, accountant) == math.inf
    assert P.epsilon_shuffled(0.0, 3, 1e-5, accountant) == math.inf


@pytest.mark.parametrize("accountant", P.ACCOUNTANTS)
def test_epsilon_monotone(accountant):
    def eps(sigma=3.0, q=0.1, steps=50):
        return P.epsilon(sigma, q, steps, 1e-5, accountant)

    base = eps()
    assert eps(sigma=2.5) > base > eps(sigma=4.0) > 0
    assert 0 < eps(steps=10) < base < eps(steps=100)
    assert 0 < eps(q=0.05) < base < eps(q=0.2)


# ---------------------------------------------------------------------------------------------
# σ for a target ε.


def test_noise_multiplier_for_is_calibrate_dp_mechanism():
    target, q, steps, delta = 1.0, 0.01, 100, 1e-5
    want = dp_accounting.calibrate_dp_mechanism(
        dp_accounting.rdp.RdpAccountant,
        lambda s: dpsgd_event(s, q, steps),
        target_epsilon=target,
        target_delta=delta,
    )
    assert P.noise_multiplier_for(target, q, steps, delta, "rdp") == want


def _round_trip(accountant, target, q, steps, delta, tol):
    sigma = P.noise_multiplier_for(target, q, steps, delta, accountant, tolerance=tol)
    assert P.epsilon(sigma, q, steps, delta, accountant) <= target
    assert P.epsilon(sigma - tol, q, steps, delta, accountant) > target  # smallest, up to tol
    return sigma


@pytest.mark.parametrize("target", [0.5, 2.0])
def test_noise_multiplier_for_round_trip_rdp(target):
    _round_trip("rdp", target, 0.01, 100, 1e-5, tol=1e-3)


@pytest.mark.slow
def test_noise_multiplier_for_round_trip_pld():
    sigma_pld = _round_trip("pld", 2.0, 0.1, 50, 1e-5, tol=1e-3)
    sigma_rdp = _round_trip("rdp", 2.0, 0.1, 50, 1e-5, tol=1e-3)
    assert sigma_pld < sigma_rdp  # the tighter accountant needs less noise


def test_noise_multiplier_for_rechecks_the_result(monkeypatch):
    # A search returning a σ that misses the target must not be passed on.
    monkeypatch.setattr(dp_accounting, "calibrate_dp_mechanism", lambda *a, **k: 0.5)
    with pytest.raises(RuntimeError, match="exceeds target_epsilon"):
        P.noise_multiplier_for(1.0, 0.01, 100, 1e-5, "rdp")


def test_noise_multiplier_for_validates_before_searching(monkeypatch):
    def search(*args, **kwargs):
        raise AssertionError("searched with a bad argument")

    monkeypatch.setattr(dp_accounting, "calibrate_dp_mechanism", search)
    with pytest.raises(ValueError, match="tolerance"):
        P.noise_multiplier_for(1.0, 0.01, 100, 1e-5, "rdp", tolerance=0.0)


# ---------------------------------------------------------------------------------------------
# Shuffled batches.


@pytest.mark.parametrize("accountant", P.ACCOUNTANTS)
def test_epsilon_shuffled_is_composed_gaussian(accountant):
    sigma, epochs, delta = 3.0, 4, 1e-5
    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), epochs)
    got = P.epsilon_shuffled(sigma, epochs, delta, accountant)
    zero_out = dp_accounting.NeighboringRelation.REPLACE_SPECIAL
    assert got == direct(event, delta, accountant, zero_out)
    # Replace-one doubles the sensitivity: the same as zero-out at σ/2.
    assert P.epsilon_shuffled(2 * sigma, epochs, delta, accountant, adjacency="replace_one") == got
    # E Gaussian mechanisms compose exactly into one with σ/√E; PLD is an upper bound, tight to
    # far below its 1e-4 discretisation here, RDP a looser one.
    exact = gaussian_epsilon_exact(sigma / math.sqrt(epochs), delta)
    if accountant == "pld":
        assert exact - 1e-9 <= got <= exact + 1e-4
    else:
        assert exact < got


def test_shuffled_claims_no_amplification():
    # MNIST-like: N = 60000, B = 256, 10 epochs. Without amplification ε is far larger.
    sigma, n, b, epochs, delta = 1.1, 60000, 256, 10, 1e-5
    poisson = P.epsilon(sigma, b / n, math.ceil(epochs * n / b), delta, "rdp")
    shuffled = P.epsilon_shuffled(sigma, epochs, delta, "rdp")
    assert shuffled > 5 * poisson


# ---------------------------------------------------------------------------------------------
# δ.


@pytest.mark.parametrize(
    "n, delta, reason",
    [
        (1, 1e-5, "1e-05 (default)"),
        (10_000, 1e-5, "1e-05 (default)"),  # 1/(10·N) = 1e-5: the boundary keeps the default
        (10_001, 1 / 100_010, "1/(10·N) = 1e-05 because N = 10001 exceeds 10^4"),
        (60_000, 1 / 600_000, "1/(10·N) = 1.67e-06 because N = 60000 exceeds 10^4"),
        (10**9, 1e-10, "1/(10·N) = 1e-10 because N = 1000000000 exceeds 10^4"),
    ],
)
def test_default_delta(n, delta, reason):
    got, why = P.default_delta(n)
    assert got == delta and why == reason
    assert got == min(1e-5, 1 / (10 * n))


# ---------------------------------------------------------------------------------------------
# Capacity of Poisson batches.


@pytest.mark.parametrize(
    "n, b, steps, p_max",
    [
        (60_000, 256, 14_063, 1e-12),  # TF Privacy's MNIST setting
        (1_000, 32, 3_000, None),  # the default bound
        (4_000, 128, 300, 1e-6),
        (50, 50, 7, 0.5),  # q = 1: every batch of the N + 1 neighbour is full
    ],
)
def test_poisson_batch_capacity(n, b, steps, p_max):
    kwargs = {} if p_max is None else {"max_overflow_probability": p_max}
    p_max = 1e-12 if p_max is None else p_max
    cap, p = P.poisson_batch_capacity(n, b, steps, **kwargs)
    q = b / n

    def tail(c):
        return steps * stats.binom.sf(c, n + 1, q)

    assert isinstance(cap, int) and b <= cap <= n + 1
    assert p == pytest.approx(tail(cap), rel=1e-12, abs=0)
    assert p <= p_max < tail(cap - 1)


def test_poisson_batch_capacity_known_value():
    # q = 1: Binomial(N + 1, 1) = N + 1 always, so the capacity must hold the neighbour's batch.
    assert P.poisson_batch_capacity(50, 50, 7, 0.5) == (51, 0.0)


def test_delta_with_overflow():
    assert P.delta_with_overflow(1e-5, 2.0, 1e-12) == pytest.approx(1e-5 + (1 + math.e**2) * 1e-12)
    assert P.delta_with_overflow(1e-5, math.inf, 0.0) == 1e-5
    assert P.delta_with_overflow(1e-5, math.inf, 1e-12) == math.inf
    assert P.delta_with_overflow(1e-5, 1e4, 1e-12) == math.inf  # e^ε overflows a float


# ---------------------------------------------------------------------------------------------
# Bad values: a ValueError naming the argument and the value, before any work.

GOOD = {
    # "rdp" keeps the valid calls cheap; BAD replaces it when it tests the accountant.
    "epsilon": (
        P.epsilon,
        {"noise_multiplier": 1.0, "sampling_rate": 0.01, "steps": 10, "delta": 1e-5,
         "accountant": "rdp"},
    ),
    "noise_multiplier_for": (
        P.noise_multiplier_for,
        {"target_epsilon": 1.0, "sampling_rate": 0.01, "steps": 10, "delta": 1e-5,
         "accountant": "rdp"},
    ),
    "epsilon_shuffled": (
        P.epsilon_shuffled,
        {"noise_multiplier": 1.0, "epochs": 2, "delta": 1e-5, "accountant": "rdp"},
    ),
    "default_delta": (P.default_delta, {"n": 100}),
    "poisson_batch_capacity": (
        P.poisson_batch_capacity,
        {"n": 100, "expected_batch_size": 10, "steps": 5},
    ),
    "delta_with_overflow": (
        P.delta_with_overflow,
        {"delta": 1e-5, "epsilon": 1.0, "overflow_probability": 1e-12},
    ),
}

NAN, INF = float("nan"), float("inf")
BAD = [
    ("epsilon", "noise_multiplier", [-0.1, NAN, INF, "1.0", None, True]),
    ("epsilon", "sampling_rate", [0, 0.0, -0.5, 1.5, NAN, INF, "0.1"]),
    ("epsilon", "steps", [0, -3, 2.5, 10.0, True, NAN, "10"]),
    ("epsilon", "delta", [0, 0.0, 1, 1.0, -1e-5, NAN, INF]),
    ("epsilon", "accountant", ["moments", "PLD", None]),
    ("noise_multiplier_for", "target_epsilon", [0, 0.0, -1.0, NAN, INF, "1"]),
    ("noise_multiplier_for", "sampling_rate", [0.0, 2.0]),
    ("noise_multiplier_for", "steps", [0, 1.5]),
    ("noise_multiplier_for", "delta", [0.0, 1.0]),
    ("noise_multiplier_for", "accountant", ["prv"]),
    ("noise_multiplier_for", "tolerance", [0.0, -1e-3, NAN, INF]),
    ("epsilon_shuffled", "noise_multiplier", [-1.0, NAN]),
    ("epsilon_shuffled", "epochs", [0, 1.5, -2]),
    ("epsilon_shuffled", "delta", [0.0, 1.0]),
    ("epsilon_shuffled", "accountant", ["exact"]),
    ("epsilon_shuffled", "adjacency", ["add_or_remove", "replace"]),
    ("default_delta", "n", [0, -5, 1.5, 100.0, True, None]),
    ("poisson_batch_capacity", "n", [0, 2.5]),
    ("poisson_batch_capacity", "expected_batch_size", [0, -1, 101, NAN, INF]),
    ("poisson_batch_capacity", "steps", [0, 3.0]),
    ("poisson_batch_capacity", "max_overflow_probability", [0.0, 1.0, -1e-9, NAN]),
    ("delta_with_overflow", "delta", [0.0, 1.0]),
    ("delta_with_overflow", "epsilon", [-1.0, NAN]),
    ("delta_with_overflow", "overflow_probability", [-1e-9, 1.5, NAN]),
]


@pytest.mark.parametrize(
    "func, arg, value",
    [(f, a, v) for f, a, vs in BAD for v in vs],
    ids=lambda x: repr(x) if not callable(x) else x.__name__,
)
def test_bad_values_raise_naming_them(func, arg, value):
    fn, kwargs = GOOD[func]
    with pytest.raises(ValueError) as info:
        fn(**{**kwargs, arg: value})
    message = str(info.value)
    assert arg in message and repr(value) in message


@pytest.mark.parametrize("func", sorted(GOOD))
def test_good_values_pass(func):
    fn, kwargs = GOOD[func]
    fn(**kwargs)  # the arguments BAD perturbs one at a time are valid as given


# ---------------------------------------------------------------------------------------------
# Published settings.

# The RDP orders of TF Privacy's MNIST tutorial and Opacus's RDP accountant (DEFAULT_ALPHAS).
PUBLISHED_ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))


def classic_rdp_epsilon(setting: P.PublishedSetting) -> float:
    """min over orders of RDP(α) + log(1/δ)/(α − 1), the conversion the sources used.

    dp-accounting exposes its RDP curve only through the improved conversion
    ε_α = RDP(α) + log(1 − 1/α) − log(δα)/(α − 1), one order at a time; undo it per order.
    """
    event = dpsgd_event(setting.noise_multiplier, setting.sampling_rate, setting.steps)
    eps = []
    for a in PUBLISHED_ORDERS:
        accountant = dp_accounting.rdp.RdpAccountant(orders=[a]).compose(event)
        improved = accountant.get_epsilon(setting.delta)
        assert improved > 0  # not clamped at 0, so the inversion below is exact
        eps.append(improved - math.log1p(-1 / a) + math.log(a) / (a - 1))
    return min(eps)


def test_published_settings_table():
    for s in P.PUBLISHED_SETTINGS:
        assert s.steps == math.ceil(s.epochs / s.sampling_rate - 1e-9)
        assert s.reference and s.published_accounting and s.delta == 1e-5


def _epsilon_of(s: P.PublishedSetting, accountant: str) -> float:
    return P.epsilon(s.noise_multiplier, s.sampling_rate, s.steps, s.delta, accountant)


@pytest.mark.parametrize(
    "setting", P.PUBLISHED_SETTINGS, ids=lambda s: f"{s.source} σ={s.noise_multiplier}"
)
def test_published_epsilon_reproduced(setting):
    # Tolerance: none beyond the sources' rounding. Their accounting on these settings (q, σ,
    # steps, δ) gives the printed two decimals exactly, which checks the table's transcription.
    assert round(classic_rdp_epsilon(setting), 2) == setting.published_epsilon
    # Today's accounting is lower and still a valid bound: the RDP curve is the same, only its
    # conversion to (ε, δ) is tighter (Canonne, Kamath & Steinke 2020). At the optimal orders here
    # (α ≈ 4 to 20) that conversion subtracts between 10% and 30% of ε, hence the 0.7.
    rdp = _epsilon_of(setting, "rdp")
    assert 0.7 * setting.published_epsilon < rdp < setting.published_epsilon


@pytest.mark.slow
def test_published_settings_recomputed():
    rows = P.published_settings()
    assert [r.setting for r in rows] == list(P.PUBLISHED_SETTINGS)
    for r in rows:
        s = r.setting
        assert r.epsilon_rdp == _epsilon_of(s, "rdp")
        # PLD bounds the composed privacy loss directly, tighter than any RDP conversion.
        assert 0.7 * s.published_epsilon < r.epsilon_pld < r.epsilon_rdp
