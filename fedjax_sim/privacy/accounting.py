"""Privacy accounting for sampled Gaussian mechanisms: ε(δ) after T applications.

One round of DP-FedAvg (or one step of DP-SGD) samples records, sums their updates clipped
to L2 norm C and adds N(0, (z·C)² I). With z = noise std / C, the two sampling schemes are

    poisson: each of the N records joins independently with probability q. Neighbouring
             datasets differ by adding or removing one record, which moves the sum by at
             most C, so the Gaussian has multiplier z:
                 PoissonSampledDpEvent(q, GaussianDpEvent(z))
    fixed:   a uniformly random subset of exactly m of the N records, without replacement.
             The sample size is public, so neighbours REPLACE one record; that moves the
             sum by up to 2C (one clipped update out, another in), and the multiplier
             relative to the sensitivity is z/2:
                 SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))

ε is always computed by `dp_accounting`, never by hand: the RDP accountant (Mironov et al.
2019 for Poisson, Wang et al. 2019 for sampling without replacement; an upper bound,
quick) or the PLD accountant (Doroshenko et al. 2022; tighter, slower, Poisson only).

A Poisson sample can be truncated to a cap M so array shapes stay static; `Accountant`
charges the truncation to δ (see `Accountant.epsilon`), and `default_cap` picks an M whose
overflow probability is negligible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import numbers
import typing
import warnings

import numpy as np

from fedjax_sim.errors import UserError
from fedjax_sim.privacy.skellam import SampledSkellam

# dp_accounting (and the scipy it loads) takes seconds to import, longer than the rest of
# the package: it is imported where ε is computed, not when fedjax_sim is.
if typing.TYPE_CHECKING:
    import dp_accounting


def __getattr__(name: str):
    if name == "NeighboringRelation":  # dp_accounting's, loaded on first use
        import dp_accounting

        return dp_accounting.NeighboringRelation
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Stand-in for "population not given" in the convenience functions: without a cap the
# Poisson event does not depend on N. `Accountant` skips the δ ≥ 1/N check for it.
_UNKNOWN_POPULATION = 2**62

_SAMPLINGS = ("poisson", "fixed")
_ACCOUNTANTS = ("rdp", "pld")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_rate(name: str, value) -> float:
    if not (_is_real(value) and 0 < value <= 1):
        raise UserError(f"{name} must be a probability in (0, 1], got {value!r}")
    return float(value)


def warn_delta(delta: float, population: int) -> None:
    """Warns when δ ≥ 1/N: a mechanism that publishes one random record outright is
    (0, 1/N)-DP, so such a δ promises nothing."""
    if delta >= 1.0 / population:
        warnings.warn(f"delta = {delta:g} >= 1/N = 1/{population}: this δ permits releasing a "
                      f"record outright; use δ ≪ 1/N, e.g. 1/N^1.1 = {population ** -1.1:.2g}",
                      stacklevel=3)


@dataclasses.dataclass(frozen=True)
class SampledGaussian:
    """One application (a round, or a local DP-SGD step) of a subsampled Gaussian mechanism.

    noise_multiplier: z = noise std / clip norm C (z >= 0; z = 0 means no privacy).
    sampling: "poisson" (each record joins with probability `sampling_rate`; add/remove-one
        neighbours) or "fixed" (`sample_size` of `population` records without replacement;
        replace-one neighbours, since the sample size is public).
    population: N, the number of records (clients for client-level DP, examples for
        example-level DP).
    max_sample_size: Poisson only: the joined records are cut down to this many (a random
        subset is kept) so shapes stay static; None = no cap.
    """

    noise_multiplier: float
    sampling: str
    population: int
    sampling_rate: float | None = None
    sample_size: int | None = None
    max_sample_size: int | None = None

    def __post_init__(self):
        z = self.noise_multiplier
        if not (_is_real(z) and math.isfinite(z) and z >= 0):
            raise UserError(f"noise_multiplier must be a finite number >= 0 (noise std / clip "
                            f"norm), got {z!r}")
        object.__setattr__(self, "noise_multiplier", float(z))
        if self.sampling not in _SAMPLINGS:
            raise UserError(f"sampling must be 'poisson' or 'fixed', got {self.sampling!r}")
        if not (_is_int(self.population) and self.population >= 1):
            raise UserError(f"population must be an integer >= 1 (the number of records), "
                            f"got {self.population!r}")
        if self.sampling == "poisson":
            if self.sampling_rate is None:
                raise UserError("sampling='poisson' needs sampling_rate (the probability that a "
                                "record joins)")
            object.__setattr__(self, "sampling_rate",
                               _check_rate("sampling_rate", self.sampling_rate))
            if self.sample_size is not None:
                raise UserError("sample_size is for sampling='fixed'; with sampling='poisson' "
                                "give only sampling_rate")
            if self.max_sample_size is not None and not (
                    _is_int(self.max_sample_size) and self.max_sample_size >= 1):
                raise UserError(f"max_sample_size must be an integer >= 1 or None (no cap), "
                                f"got {self.max_sample_size!r}")
        else:
            m = self.sample_size
            if not (_is_int(m) and 1 <= m <= self.population):
                raise UserError(f"sampling='fixed' needs sample_size an integer in [1, population "
                                f"= {self.population}], got {m!r}")
            if self.sampling_rate is not None:
                raise UserError("sampling_rate is for sampling='poisson'; with sampling='fixed' "
                                "give only sample_size")
            if self.max_sample_size is not None:
                raise UserError("max_sample_size applies only to sampling='poisson'; a fixed-size "
                                "sample already has exactly sample_size records")

    def event(self) -> dp_accounting.DpEvent:
        """The dp_accounting event of one application.

        poisson: PoissonSampledDpEvent(q, GaussianDpEvent(z)). The cap is not part of the
            event; `Accountant` adds its cost to δ (see `overflow_probability`).
        fixed: SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2)): under
            replace-one the sum of updates clipped to C has L2 sensitivity 2C, and
            dp_accounting's noise multiplier is noise std / sensitivity = zC / 2C.
        """
        import dp_accounting

        z = self.noise_multiplier
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(self.sampling_rate,
                                                       dp_accounting.GaussianDpEvent(z))
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.population, self.sample_size, dp_accounting.GaussianDpEvent(z / 2))

    @property
    def neighboring_relation(self) -> dp_accounting.NeighboringRelation:
        from dp_accounting import NeighboringRelation

        if self.sampling == "poisson":
            return NeighboringRelation.ADD_OR_REMOVE_ONE
        return NeighboringRelation.REPLACE_ONE

    @property
    def expected_sample_size(self) -> float:
        """q·N for Poisson sampling (before any cap), m for fixed-size sampling."""
        if self.sampling == "poisson":
            return self.sampling_rate * self.population
        return self.sample_size

    def overflow_probability(self) -> float:
        """P(one application's Poisson sample has more than `max_sample_size` records).

        Computed for N + 1 records, the larger of two add/remove neighbours, which bounds
        it for both: P(Binomial(N + 1, q) > M). 0 without a cap or with fixed sampling.

        Also 0 for a cap M >= N: on the N records simulated the cap never binds, so every
        release is distributed exactly as the uncapped mechanism's, whose guarantee it
        then has (DP is a property of the map from datasets to output distributions, and
        that map is the uncapped one; its value on a neighbour with N + 1 records never
        has to be computed here).
        """
        if self.sampling != "poisson" or self.max_sample_size is None \
                or self.max_sample_size >= self.population:
            return 0.0
        from scipy import stats

        return float(stats.binom.sf(self.max_sample_size, self.population + 1,
                                    self.sampling_rate))


def default_cap(population: int, sampling_rate: float, overflow: float = 1e-12) -> int:
    """The smallest cap M >= 1 with P(Binomial(population + 1, q) > M) <= `overflow`.

    Like `SampledGaussian.overflow_probability`, this counts population + 1 records (the
    larger neighbour), so M is at most population + 1, where the overflow is exactly 0
    (e.g. for q = 1). The real dataset has `population` records, so its samples never
    exceed min(M, population) and arrays need no more slots than that; M itself is what
    the accounting uses.
    """
    if not (_is_int(population) and population >= 1):
        raise UserError(f"population must be an integer >= 1, got {population!r}")
    q = _check_rate("sampling_rate", sampling_rate)
    if not (_is_real(overflow) and 0 < overflow < 1):
        raise UserError(f"overflow must be a probability in (0, 1), got {overflow!r}")
    from scipy import stats

    n = population + 1
    sf = lambda m: stats.binom.sf(m, n, q)  # noqa: E731
    cap = int(min(max(stats.binom.isf(overflow, n, q), 0), n))
    # isf works in floating point; step to the exact smallest M.
    while cap > 0 and sf(cap - 1) <= overflow:
        cap -= 1
    while sf(cap) > overflow:
        cap += 1
    return max(cap, 1)


@contextlib.contextmanager
def quiet_rdp_warnings():
    """Hides dp_accounting's warnings that a fractional RDP order's series did not converge
    (small orders at small noise multipliers): the order is left out of the minimum over
    orders, which keeps ε a valid upper bound, and the warning repeats for every curve built
    (every round's, every noise multiplier a calibration tries)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(level)


class Accountant:
    """ε(δ) of `count` applications of `mechanism`, computed by dp_accounting.

    accountant="rdp": the RDP curve of one application is computed once, so ε after any
    count costs one scan over the orders (cheap enough to call after every round).
    accountant="pld": tighter; the one-application privacy loss distribution (discretized
    at `pld_discretization`) is built once and self-composed per count (cached). Poisson
    sampling only: dp_accounting has no PLD for sampling without replacement.
    """

    def __init__(self, mechanism: SampledGaussian | SampledSkellam, *, delta: float,
                 accountant: str = "rdp", pld_discretization: float = 1e-3):
        if not isinstance(mechanism, (SampledGaussian, SampledSkellam)):
            raise UserError(f"mechanism must be a SampledGaussian or a SampledSkellam, got "
                            f"{type(mechanism).__name__}")
        if isinstance(mechanism, SampledSkellam) and accountant != "rdp":
            raise UserError("the Skellam mechanism (distributed DP) is accounted with RDP only; "
                            "use accountant='rdp'")
        if not (_is_real(delta) and 0 < delta < 1):
            raise UserError(f"delta must be in (0, 1), typically ≪ 1/N, got {delta!r}")
        if accountant not in _ACCOUNTANTS:
            raise UserError(f"accountant must be 'rdp' or 'pld', got {accountant!r}")
        if not (_is_real(pld_discretization) and 0 < pld_discretization < 1):
            raise UserError(f"pld_discretization must be in (0, 1), e.g. 1e-3 or 1e-4, got "
                            f"{pld_discretization!r}")
        if accountant == "pld" and mechanism.sampling == "fixed":
            raise UserError("the PLD accountant cannot handle fixed-size sampling without "
                            "replacement: use accountant='rdp' or poisson sampling")
        if mechanism.population != _UNKNOWN_POPULATION:
            warn_delta(delta, mechanism.population)
        self.mechanism = mechanism
        self.delta = float(delta)
        self.accountant = accountant
        self.pld_discretization = float(pld_discretization)
        self._overflow = mechanism.overflow_probability()
        self._rdp_curve = None
        if mechanism.noise_multiplier == 0:
            self._uncapped = lambda count, delta: math.inf
        elif accountant == "rdp":
            self._uncapped = self._rdp_epsilon
            self._rdp_curve = self._one_step_rdp()
            if self._rdp_curve is None:
                self._rdp_epsilon_composed = functools.lru_cache(maxsize=256)(
                    self._rdp_epsilon_composed_uncached)
        else:
            from dp_accounting.pld import privacy_loss_distribution

            self._uncapped = self._pld_epsilon
            self._one_step_pld = privacy_loss_distribution.from_gaussian_mechanism(
                standard_deviation=mechanism.noise_multiplier,
                sampling_prob=mechanism.sampling_rate,
                value_discretization_interval=self.pld_discretization,
                neighboring_relation=mechanism.neighboring_relation)
            self._composed_pld = functools.lru_cache(maxsize=8)(self._one_step_pld.self_compose)

    def _fresh_rdp(self) -> dp_accounting.rdp.RdpAccountant:
        import dp_accounting

        return dp_accounting.rdp.RdpAccountant(
            neighboring_relation=self.mechanism.neighboring_relation)

    def _one_step_rdp(self) -> tuple[np.ndarray, np.ndarray] | None:
        if isinstance(self.mechanism, SampledSkellam):
            return self.mechanism.rdp()
        # RDP adds up under composition: T applications have T times one application's
        # curve, the same sum RdpAccountant forms. Read the curve from the accountant's
        # state; if a future dp_accounting renames it, fall back to composing per count.
        acc = self._fresh_rdp()
        with quiet_rdp_warnings():
            acc.compose(self.mechanism.event())
        if not (hasattr(acc, "_orders") and hasattr(acc, "_rdp")):
            return None
        return np.array(acc._orders, dtype=np.float64), np.array(acc._rdp, dtype=np.float64)

    def _rdp_epsilon(self, count: int, delta: float) -> float:
        if self._rdp_curve is None:
            return self._rdp_epsilon_composed(count, delta)
        from dp_accounting.rdp import rdp_privacy_accountant

        orders, rdp = self._rdp_curve
        return float(rdp_privacy_accountant.compute_epsilon(orders, count * rdp, delta)[0])

    def _rdp_epsilon_composed_uncached(self, count: int, delta: float) -> float:
        import dp_accounting

        acc = self._fresh_rdp()
        with quiet_rdp_warnings():
            acc.compose(dp_accounting.SelfComposedDpEvent(self.mechanism.event(), count))
        return float(acc.get_epsilon(delta))

    def _pld_epsilon(self, count: int, delta: float) -> float:
        return float(self._composed_pld(count).get_epsilon_for_delta(delta))

    def epsilon(self, count: int) -> float:
        """ε at `self.delta` after `count` applications (0 for count = 0; inf if z = 0).

        With a cap M (Poisson only), the capped mechanism M' and the uncapped M, run on
        the same random draws, differ only when some application's sample overflows the
        cap, so on any dataset TV(M'(D), M(D)) <= t·p over t applications, p =
        `overflow_probability()`. If M is (ε, δ₀)-DP then for every event S

            P[M'(D) ∈ S] <= P[M(D) ∈ S] + t·p <= e^ε P[M(D') ∈ S] + δ₀ + t·p
                         <= e^ε P[M'(D') ∈ S] + δ₀ + (1 + e^ε)·t·p,

        i.e. M' is (ε, δ₀ + (1 + e^ε)·t·p)-DP. To report ε at the total δ, take
        s = (1 + e^{ε(δ/2)})·t·p, require s <= δ/2, and report ε(δ − s): as δ − s >= δ/2,
        ε(δ − s) <= ε(δ/2), so the total δ − s + (1 + e^{ε(δ−s)})·t·p <= δ. Here ε(·) is
        the uncapped mechanism's ε after t applications. Raises UserError when s > δ/2
        (the cap is too small for this δ and count).
        """
        if not (_is_int(count) and count >= 0):
            raise UserError(f"count must be an integer >= 0 (applications so far), got {count!r}")
        count = int(count)
        if count == 0:
            return 0.0
        if self._overflow == 0:
            return self._uncapped(count, self.delta)
        eps_half = self._uncapped(count, self.delta / 2)
        if math.isinf(eps_half):
            return math.inf
        # e^ε overflows a float past ε ≈ 709; the slack is then unbounded anyway.
        slack = (1 + math.exp(eps_half)) * count * self._overflow if eps_half < 700 else math.inf
        if slack > self.delta / 2:
            raise UserError(
                f"max_sample_size = {self.mechanism.max_sample_size} is too small for delta = "
                f"{self.delta:g} after {count} application(s) (overflow probability "
                f"{self._overflow:.3g} each): raise the cap (max_cohort_size), e.g. to "
                f"default_cap(N, q) = {default_cap(self.mechanism.population, self.mechanism.sampling_rate)}")
        return self._uncapped(count, self.delta - slack)

    def max_count(self, target_epsilon: float, limit: int) -> int:
        """The largest t in [0, limit] with epsilon(t) <= target_epsilon.

        ε is nondecreasing in t, so this is a binary search. A count at which the cap's
        slack no longer fits in δ counts as over the target.
        """
        return max_count_within(self.epsilon, target_epsilon, limit)


def max_count_within(epsilon, target_epsilon: float, limit: int) -> int:
    """The largest t in [0, limit] with epsilon(t) <= target_epsilon, for a nondecreasing
    `epsilon` with epsilon(0) = 0 (a binary search); a t at which `epsilon` raises
    UserError (a cohort cap whose slack no longer fits in δ) counts as over the target."""
    if not (_is_real(target_epsilon) and target_epsilon >= 0):
        raise UserError(f"target_epsilon must be a number >= 0, got {target_epsilon!r}")
    if not (_is_int(limit) and limit >= 0):
        raise UserError(f"limit must be an integer >= 0, got {limit!r}")

    def within(t: int) -> bool:
        try:
            return epsilon(t) <= target_epsilon
        except UserError:
            return False

    if within(limit):
        return int(limit)
    lo, hi = 0, int(limit)  # within(lo) holds (ε(0) = 0), within(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if within(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _mechanism(noise_multiplier, sampling, sampling_rate, population, sample_size,
               max_sample_size=None) -> SampledGaussian:
    if population is None:
        if sampling == "fixed":
            raise UserError("sampling='fixed' needs population (the number of records the "
                            "sample_size records are drawn from)")
        if max_sample_size is not None:
            raise UserError("max_sample_size needs population (the overflow probability "
                            "depends on it)")
        population = _UNKNOWN_POPULATION
    return SampledGaussian(noise_multiplier=noise_multiplier, sampling=sampling,
                           population=population, sampling_rate=sampling_rate,
                           sample_size=sample_size, max_sample_size=max_sample_size)


def _check_rounds(rounds) -> int:
    if not (_is_int(rounds) and rounds >= 0):
        raise UserError(f"rounds must be an integer >= 0, got {rounds!r}")
    return int(rounds)


def epsilon(noise_multiplier: float, *, rounds: int, delta: float,
            sampling_rate: float | None = None, population: int | None = None,
            sample_size: int | None = None, sampling: str = "poisson", accountant: str = "rdp",
            max_sample_size: int | None = None, pld_discretization: float = 1e-3) -> float:
    """ε at `delta` after `rounds` applications of a sampled Gaussian mechanism.

    Poisson sampling needs only `sampling_rate`: without a cap the event does not involve
    N, so `population` may be left out; given, it enables the δ ≥ 1/N warning and is
    required for `max_sample_size`. Fixed-size sampling needs `sample_size` and
    `population`.
    """
    rounds = _check_rounds(rounds)
    mechanism = _mechanism(noise_multiplier, sampling, sampling_rate, population, sample_size,
                           max_sample_size)
    return Accountant(mechanism, delta=delta, accountant=accountant,
                      pld_discretization=pld_discretization).epsilon(rounds)


def calibrate_noise(target_epsilon: float, *, rounds: int, delta: float,
                    sampling_rate: float | None = None, population: int | None = None,
                    sample_size: int | None = None, sampling: str = "poisson",
                    accountant: str = "rdp", tolerance: float = 1e-3,
                    pld_discretization: float = 1e-3) -> float:
    """The smallest noise multiplier z whose ε after `rounds` is <= `target_epsilon`.

    dp_accounting's `calibrate_dp_mechanism` (Brent's method over z, ε decreasing in z)
    returns a z within `tolerance` of the optimum that always meets the target. Arguments
    as for `epsilon`, without a cap: check a capped mechanism with `Accountant`.
    """
    if not (_is_real(target_epsilon) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise UserError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    rounds = _check_rounds(rounds)
    if rounds == 0:
        raise UserError("rounds must be >= 1 to calibrate noise (0 rounds spend no privacy)")
    if not (_is_real(tolerance) and tolerance > 0):
        raise UserError(f"tolerance must be a number > 0, got {tolerance!r}")
    import dp_accounting

    base = _mechanism(1.0, sampling, sampling_rate, population, sample_size)
    # Validates delta, accountant and the PLD/fixed combination, and warns on δ >= 1/N.
    Accountant(base, delta=delta, accountant=accountant, pld_discretization=pld_discretization)

    def make_event(z: float) -> dp_accounting.DpEvent:
        if z <= 0:  # no noise: ε = inf (dp_accounting's without-replacement RDP divides by z)
            return dp_accounting.NonPrivateDpEvent()
        return dp_accounting.SelfComposedDpEvent(
            dataclasses.replace(base, noise_multiplier=float(z)).event(), rounds)

    def make_accountant() -> dp_accounting.PrivacyAccountant:
        if accountant == "rdp":
            return dp_accounting.rdp.RdpAccountant(neighboring_relation=base.neighboring_relation)
        return dp_accounting.pld.PLDAccountant(neighboring_relation=base.neighboring_relation,
                                               value_discretization_interval=pld_discretization)

    try:
        with quiet_rdp_warnings():
            z = dp_accounting.calibrate_dp_mechanism(
                make_accountant, make_event, target_epsilon=float(target_epsilon),
                target_delta=float(delta),
                bracket_interval=dp_accounting.LowerEndpointAndGuess(0.0, 1.0),
                tol=float(tolerance))
    except dp_accounting.mechanism_calibration.NoBracketIntervalFoundError as e:
        raise UserError(f"no noise multiplier up to 2^30 reaches target_epsilon = "
                        f"{target_epsilon:g} at delta = {delta:g}: raise target_epsilon or "
                        f"delta") from e
    return float(z)
