"""DP-FTRL's privacy: a banded matrix-factorization mechanism under cyclic participation.

Over n rounds the server releases C x + σ Z (module doc of
`fedjax_sim.aggregators.matrix_factorization`), one Gaussian mechanism on C x. With every
client's update clipped to norm C_clip and each client taking part at most k times, at
least b rounds apart ((k, b)-participation: the cyclic groups of `ClientSampling`), adding
or removing one client moves C x by at most C_clip · sens(C; b, k), where sens is the
largest norm of a sum of k columns of C at least b apart
(`jax_privacy.matrix_factorization.toeplitz.minsep_sensitivity_squared`; √k when the
bands are at most b and the columns have unit norm). σ = z · C_clip, so after t rounds
(k_t = ⌈t / b⌉ participations at most) the release is a Gaussian mechanism with noise
multiplier z / sens(C[:t, :t]; b, k_t), and ε(δ) is that mechanism's (dp_accounting, RDP
or PLD). No sampling is assumed, so no amplification is claimed.

Two strategies: BandMF's banded Toeplitz C with unit-norm columns that minimizes the mean
error of the prefix sums (`toeplitz.optimize_banded_toeplitz`, Choquette-Choo et al. 2023,
McKenna 2024; one band is DP-SGD's C = I, independent noise every round), and tree
aggregation (Kairouz et al. 2021), whose C has a 0/1 row per dyadic block of rounds and
whose sensitivity `fedjax_sim.privacy.tree_aggregation` computes exactly.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from fedjax_sim.errors import UserError


def jax_privacy_toeplitz():
    """`jax_privacy.matrix_factorization.toeplitz`, or a one-line error saying how to get it."""
    try:
        from jax_privacy.matrix_factorization import toeplitz
    except ImportError:
        raise UserError("DP-FTRL (MatrixFactorizationDP) needs jax_privacy: "
                        "pip install 'fedjax_sim[dpftrl]'") from None
    return toeplitz


def check_amplified_bands(bands: int, separation: int) -> None:
    """Refuses cyclic Poisson sampling with more bands than the separation, where its
    amplification is not proven."""
    if bands > separation:
        raise UserError(f"privacy.participation='cyclic_poisson' needs bands <= "
                        f"min_separation, got bands={bands} > {separation}")


def check_min_separation(separation: int, num_clients: int, clients_per_round: int) -> None:
    """Refuses cyclic groups (num_clients // separation clients each) too small for a cohort."""
    if num_clients // separation < clients_per_round:
        raise UserError(f"privacy.min_separation={separation} splits the {num_clients} clients into "
                        f"groups of {num_clients // separation}, fewer than clients_per_round="
                        f"{clients_per_round}; lower min_separation to at most "
                        f"{num_clients // clients_per_round}")


@functools.lru_cache(maxsize=32)
def bandmf_coefficients(rounds: int, bands: int) -> tuple[float, ...]:
    """The `bands` coefficients (c₀ … c_{b−1}, unit norm) of the banded Toeplitz strategy for
    `rounds` rounds that minimizes the prefix sums' mean squared error."""
    if bands < 1 or rounds < 1:
        raise UserError(f"bands and rounds must be >= 1, got bands={bands}, rounds={rounds}")
    bands = min(bands, rounds)
    if bands == 1:
        return (1.0,)
    toeplitz = jax_privacy_toeplitz()
    coef = np.asarray(toeplitz.optimize_banded_toeplitz(n=rounds, bands=bands), np.float64)
    return tuple(float(c) for c in coef / np.linalg.norm(coef))


def sensitivity(coefficients, *, rounds: int, min_separation: int,
                max_participations: int | None = None) -> float:
    """sens(C; b, k) of the first `rounds` rounds of the banded Toeplitz strategy: the
    largest L2 norm of a sum of at most k columns (k: by default ⌈rounds / b⌉) at least
    b = `min_separation` apart (jax_privacy's minsep sensitivity)."""
    import jax.numpy as jnp

    toeplitz = jax_privacy_toeplitz()
    k = max_participations or math.ceil(rounds / min_separation)
    return math.sqrt(float(toeplitz.minsep_sensitivity_squared(
        jnp.asarray(coefficients, jnp.float32), min_sep=min_separation, max_participations=k,
        n=rounds)))


def gaussian_epsilon(noise_multiplier: float, delta: float, accountant: str = "pld") -> float:
    """ε(δ) of one Gaussian mechanism with this noise multiplier (std / sensitivity)."""
    if noise_multiplier <= 0:
        return math.inf
    return _gaussian_epsilon(round(float(noise_multiplier), 12), float(delta), accountant)


@functools.lru_cache(maxsize=1024)
def _gaussian_epsilon(noise_multiplier: float, delta: float, accountant: str) -> float:
    import dp_accounting
    from dp_accounting.pld import privacy_loss_distribution

    if accountant == "pld":  # pessimistic discretization at 1e-3, as the DP-FedAvg ledger's
        return float(privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=noise_multiplier, value_discretization_interval=1e-3,
        ).get_epsilon_for_delta(delta))
    acct = dp_accounting.rdp.RdpAccountant()
    return float(acct.compose(dp_accounting.GaussianDpEvent(noise_multiplier)).get_epsilon(delta))


class BandMFMechanism:
    """The facts of a run's BandMF mechanism the ledger and the summary read."""

    strategy = "banded_toeplitz"

    def __init__(self, noise_multiplier: float, coefficients, min_separation: int, rounds: int,
                 group_sampling=None):
        """group_sampling: for cyclic Poisson sampling, the `SampledGaussian` of one round
        within a group (Poisson rate q over the group, noise multiplier z); None for cyclic
        cohorts of fixed size."""
        self.noise_multiplier = float(noise_multiplier)
        self.coefficients = tuple(coefficients)
        self.min_separation = int(min_separation)
        self.rounds = int(rounds)
        self.group_sampling = group_sampling
        self.sampling = "cyclic" if group_sampling is None else "cyclic_poisson"
        self.sampling_rate = None if group_sampling is None else group_sampling.sampling_rate

    def overflow_probability(self) -> float:
        return 0.0 if self.group_sampling is None else self.group_sampling.overflow_probability()

    def sensitivity(self, rounds: int) -> float:
        return sensitivity(self.coefficients, rounds=max(1, rounds),
                           min_separation=self.min_separation)

    def describe(self) -> dict:
        """What fixes the noise of the rounds to come: the strategy is built for the run's
        rounds, so a run resumed with other rounds would continue another mechanism."""
        return {"strategy": self.strategy, "rounds": self.rounds,
                "bands": len(self.coefficients), "min_separation": self.min_separation,
                "participation": self.sampling}


@functools.lru_cache(maxsize=8)
def tree_sensitivity(min_separation: int, max_participations: int | None = None):
    """The (cached) `TreeSensitivity` of this participation: its block tables serve every
    run and every round count."""
    from fedjax_sim.privacy.tree_aggregation import TreeSensitivity

    return TreeSensitivity(min_separation, max_participations)


class TreeMechanism:
    """Tree aggregation (Kairouz et al. 2021): the release of every complete dyadic block of
    rounds with N(0, (z·C)²) noise (`fedjax_sim.aggregators.matrix_factorization.
    tree_gaussian`); sens(t)² is the exact worst case over min-separation patterns
    (`fedjax_sim.privacy.tree_aggregation`). The tree grows with the rounds, so a run may
    resume with more rounds."""

    sampling = "cyclic"
    sampling_rate = None
    strategy = "tree"

    def __init__(self, noise_multiplier: float, min_separation: int, rounds: int):
        self.noise_multiplier = float(noise_multiplier)
        self.min_separation = int(min_separation)
        self.rounds = int(rounds)

    def overflow_probability(self) -> float:
        return 0.0

    def sensitivity(self, rounds: int) -> float:
        tree = tree_sensitivity(self.min_separation)
        tree.reserve(self.rounds)
        return math.sqrt(tree.squared(max(1, rounds)))

    def describe(self) -> dict:
        return {"strategy": self.strategy, "min_separation": self.min_separation}


class MatrixFactorizationAccountant:
    """ε after t rounds of a matrix-factorization mechanism (BandMF or tree): the Gaussian
    mechanism with noise multiplier z / sens(t), computed once per t."""

    def __init__(self, mechanism, *, delta: float, accountant: str = "pld"):
        self.mechanism, self.delta, self.accountant = mechanism, float(delta), accountant
        self._by_rounds: dict[int, float] = {}
        self._amplified = None
        if getattr(mechanism, "group_sampling", None) is not None:
            from fedjax_sim.privacy.accounting import Accountant

            self._amplified = Accountant(mechanism.group_sampling, delta=delta,
                                         accountant=accountant)

    def sensitivity(self, rounds: int) -> float:
        return self.mechanism.sensitivity(rounds)

    def epsilon(self, rounds: int) -> float:
        """ε(δ) after `rounds` rounds. Under cyclic Poisson sampling (bands <= b, unit
        columns), Choquette-Choo et al. 2023 (Theorem 4) reduce the release to ⌈t/b⌉
        compositions of the Poisson-subsampled Gaussian of one group (rate q, noise
        multiplier z), as jax_privacy's DpsgdTrainingAccountant with cycle_length = b."""
        if rounds <= 0:
            return 0.0
        if rounds not in self._by_rounds:
            if self._amplified is not None:
                eps = self._amplified.epsilon(math.ceil(rounds / self.mechanism.min_separation))
            else:
                z = self.mechanism.noise_multiplier / self.sensitivity(rounds)
                eps = gaussian_epsilon(z, self.delta, self.accountant)
            self._by_rounds[rounds] = eps
        return self._by_rounds[rounds]

    def max_count(self, target_epsilon: float, limit: int) -> int:
        """The most rounds t <= limit with ε(t) <= target (ε grows with t; a t whose cohort
        cap no longer fits in δ counts as over)."""
        from fedjax_sim.privacy.accounting import max_count_within

        return max_count_within(self.epsilon, target_epsilon, limit)


def calibrate_noise_multiplier(target_epsilon: float, *, rounds: int, min_separation: int,
                               delta: float, bands: int | None = None,
                               accountant: str = "pld", strategy: str = "bandmf",
                               sampling_rate: float | None = None) -> float:
    """The smallest noise multiplier z (to 1e-4 relative) whose DP-FTRL run of `rounds`
    rounds with this participation and strategy ('bandmf' or 'tree') has ε(δ) <=
    `target_epsilon`; with `sampling_rate` q, under cyclic Poisson sampling (BandMF with
    bands <= min_separation; q = clients_per_round / (num_clients // min_separation))."""
    if not target_epsilon > 0:
        raise UserError(f"target_epsilon must be > 0, got {target_epsilon!r}")
    if sampling_rate is not None:
        from fedjax_sim.privacy.accounting import epsilon as sampled_epsilon

        count = math.ceil(rounds / min_separation)
        eps = lambda z: sampled_epsilon(z, rounds=count, delta=delta,  # noqa: E731
                                        sampling_rate=sampling_rate, accountant=accountant)
    else:
        if strategy == "tree":
            sens = TreeMechanism(1.0, min_separation, rounds).sensitivity(rounds)
        else:
            coef = bandmf_coefficients(rounds, min(bands or min_separation, rounds))
            sens = sensitivity(coef, rounds=rounds, min_separation=min_separation)
        eps = lambda z: gaussian_epsilon(z / sens, delta, accountant)  # noqa: E731
    lo, hi = 1e-3, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > 1e6:
            raise UserError(f"no noise multiplier reaches ε = {target_epsilon:g} at δ = {delta:g}")
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if eps(mid) > target_epsilon else (lo, mid)
    return hi
