"""What a run under differential privacy adds to `simulate()`: the DP aggregator or DP-SGD
gradient, Poisson sampling, and the accountant that reports ε and enforces a budget.

Client level (`ClientLevelDP`): one round is one application of a sampled Gaussian
mechanism on the clients, so ε after t rounds is `Accountant.epsilon(t)`, the same for
every run of the config and known before training.

Example level (`ExampleLevelDP`): one local step is one application on a client's
examples, and a client's examples are only touched in rounds the client takes part in.
ε after a round is that of the client with the most participations p: ε(p · S) for S
local steps per participation. Participation is counted on the host from the rounds'
cohorts (`RoundProgram.cohorts`), so a resumed run recounts it exactly.

Poisson samples are padded to a cap (static shapes). The accountant charges the rare
overflow to δ with a slack that grows like e^ε (`Accountant.epsilon`), so the default cap
is the smallest one whose slack stays under δ/10 for the whole run (and whose overflow
probability is at most 1e-12 per application); see `budget_cap`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings

import numpy as np

from fedjax_sim.aggregators import ROUND_FAILED, chain, clip, dp_fedavg
from fedjax_sim.aggregators.matrix_factorization import correlated_gaussian, tree_gaussian
from fedjax_sim.aggregators.distributed_dp import distributed_dp, skellam_setting
from fedjax_sim.engine.round import ClientSampling
from fedjax_sim.errors import UserError
from fedjax_sim.privacy import (Accountant, ClientLevelDP, ExampleLevelDP,
                                MatrixFactorizationDP, SampledGaussian, default_cap)
from fedjax_sim.privacy.matrix_factorization import (BandMFMechanism,
                                                     MatrixFactorizationAccountant, TreeMechanism,
                                                     bandmf_coefficients, check_amplified_bands,
                                                     check_min_separation)
from fedjax_sim.privacy.skellam import SampledSkellam
from fedjax_sim.privacy.dp_sgd import ExampleNoise, private_gradient
from fedjax_sim.registry import client_dp_algorithms


@contextlib.contextmanager
def _quiet_accounting():
    """dp_accounting logs a warning per RDP order it drops at low noise; the dropped
    orders only make ε larger, so these are not shown."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def budget_cap(population: int, sampling_rate: float, noise_multiplier: float, delta: float,
               applications: int, accountant: str) -> int:
    """The smallest cap M <= population on a Poisson sample of `population` records whose
    overflow costs at most δ/10 over `applications` applications:
    (1 + e^ε)·T·P(Binomial(N+1, q) > M) <= δ/10 with ε the uncapped ε(δ/2) after T, and
    P(...) <= 1e-12. Where no M < N does (ε in the hundreds), M = N."""
    base = min(default_cap(population, sampling_rate), population)
    if noise_multiplier == 0:  # no privacy to account for
        return base
    with warnings.catch_warnings(), _quiet_accounting():
        warnings.simplefilter("ignore")
        eps = Accountant(SampledGaussian(noise_multiplier, "poisson", population,
                                         sampling_rate=sampling_rate),
                         delta=delta / 2, accountant=accountant).epsilon(applications)
    if eps >= 700:
        return population
    from scipy import stats  # seconds to import: loaded where a cap is chosen

    budget = delta / 10 / applications / (1 + math.exp(eps))
    sf = lambda m: stats.binom.sf(m, population + 1, sampling_rate)  # noqa: E731
    if sf(base) <= budget:
        return base
    lo, hi = base, population  # sf(lo) > budget; take hi = N when nothing smaller fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if sf(mid) <= budget:
            hi = mid
        else:
            lo = mid
    return hi


def _distributed(privacy, gaussian: SampledGaussian, entries: int | None, clients_per_round: int):
    """(the Skellam mechanism, the aggregator) of distributed DP: the sampling of the
    Gaussian mechanism it replaces, the noise and sensitivities of the encoded updates."""
    secure = privacy.secure_aggregation
    if entries is None:
        raise UserError("distributed DP needs the update's size (update_entries)")
    slots = gaussian.max_sample_size or gaussian.sample_size
    setting = skellam_setting(
        privacy.noise_multiplier, clip_norm=privacy.clip_norm, entries=entries,
        cohort_slots=min(slots, gaussian.population),
        min_clients=secure.min_clients or math.ceil(clients_per_round / 2),
        modulus_bits=secure.modulus_bits, scale=secure.scale, beta=secure.beta)
    mechanism = SampledSkellam(setting.l2_sensitivity, setting.l1_sensitivity, setting.variance,
                               gaussian.sampling, gaussian.population,
                               sampling_rate=gaussian.sampling_rate,
                               sample_size=gaussian.sample_size,
                               max_sample_size=gaussian.max_sample_size)
    return mechanism, distributed_dp(setting, clip_norm=privacy.clip_norm,
                                     expected_clients=float(clients_per_round),
                                     modulus_bits=secure.modulus_bits,
                                     dropout_rate=secure.dropout_rate)


def _check_client_level(aggregator, algorithm) -> None:
    """What every client-level mechanism (DP-FedAvg, DP-FTRL) needs of the run."""
    if aggregator is not None and aggregator.reduce is not None:
        raise UserError(
            "client-level DP cannot follow an aggregator part that reduces the cohort "
            "itself (a robust rule, secure or encrypted aggregation): its output can move "
            "by more than the clip norm when one client joins or leaves, so the noise "
            "would not give the reported epsilon; DP's clipping already bounds each "
            "client's influence; for DP with secure aggregation use "
            "privacy.secure_aggregation; to measure a robust rule between clipping and "
            "noise without a privacy claim, pass aggregator=chain(clip(C), <rule>, "
            "gaussian(z, expected_clients=m)) and no privacy")
    if getattr(algorithm, "client_dp", None):
        raise UserError(f"client-level DP does not apply to {type(algorithm).__name__}: "
                        f"{algorithm.client_dp}; use {', '.join(client_dp_algorithms())} "
                        f"(fedjax_sim.algorithms; config: algorithm.name), or "
                        f"example-level DP (DP-SGD)")
    if getattr(algorithm, "weighting", None) != "uniform":
        raise UserError("client-level DP needs algorithm weighting='uniform': weighting "
                        "by example counts makes one client's influence on the aggregate, "
                        "and so the noise it needs, depend on its data; set "
                        "weighting='uniform' (config: algorithm.weighting)")


def _matrix_factorization(privacy, aggregator, num_clients: int, clients_per_round: int,
                          rounds: int):
    """(the mechanism, the cyclic sampling, the aggregator) of DP-FTRL (BandMF or tree)."""
    separation = privacy.min_separation or max(1, num_clients // clients_per_round)
    check_min_separation(separation, num_clients, clients_per_round)
    m = float(clients_per_round)
    z = privacy.noise_multiplier
    sampling = ClientSampling("cyclic", clients_per_round, groups=separation)
    if privacy.strategy == "tree":
        mechanism = TreeMechanism(z, separation, rounds)
        noise = tree_gaussian(z, expected_clients=m)
    else:
        bands = min(privacy.bands or separation, rounds)
        coefficients = bandmf_coefficients(rounds, bands)
        group = None
        if privacy.participation == "cyclic_poisson":
            check_amplified_bands(bands, separation)
            # every member of the round's group joins w.p. q; q·(N // b) = m expected
            q, largest = clients_per_round / (num_clients // separation), -(-num_clients // separation)
            slots = min(privacy.max_cohort_size or budget_cap(
                largest, q, z, privacy.delta, -(-rounds // separation), privacy.accountant),
                largest)
            group = SampledGaussian(z, "poisson", largest, sampling_rate=q, max_sample_size=slots)
            sampling = ClientSampling("cyclic_poisson", slots, q, groups=separation)
        mechanism = BandMFMechanism(z, coefficients, separation, rounds, group_sampling=group)
        noise = correlated_gaussian(z, coefficients=coefficients, expected_clients=m)
    private_part = chain(clip(privacy.clip_norm), noise)
    return mechanism, sampling, (private_part if aggregator is None
                                 else chain(aggregator, private_part))


class PrivatePlan:
    """Builds the private parts of a run and keeps its privacy ledger.

    Attributes:
      aggregator: the DP aggregator (client level) or None.
      sampling: the engine's client sampling (Poisson for client level) or None.
      schedule_args: extra `make_schedule` arguments (DP-SGD's Poisson batches) or {}.
      example_noise: DP-SGD's parameters for `Problem`, or None.
      accountant: the `Accountant` of one application.
    """

    def __init__(self, privacy, *, algorithm, aggregator, num_clients: int,
                 clients_per_round: int, max_client_size: int, rounds: int,
                 update_entries: int | None = None):
        self.privacy = privacy
        self.num_clients = num_clients
        self.aggregator, self.sampling, self.schedule_args, self.example_noise = None, None, {}, None
        self.steps_per_round = 1
        if isinstance(privacy, MatrixFactorizationDP):
            self.level = "client"
            _check_client_level(aggregator, algorithm)
            mechanism, self.sampling, self.aggregator = _matrix_factorization(
                privacy, aggregator, num_clients, clients_per_round, rounds)
        elif isinstance(privacy, ClientLevelDP):
            self.level = "client"
            _check_client_level(aggregator, algorithm)
            z = privacy.noise_multiplier
            if privacy.sampling == "poisson":
                q = clients_per_round / num_clients
                slots = min(privacy.max_cohort_size or budget_cap(
                    num_clients, q, z, privacy.delta, rounds, privacy.accountant), num_clients)
                mechanism = SampledGaussian(z, "poisson", num_clients, sampling_rate=q,
                                            max_sample_size=slots)
                self.sampling = ClientSampling("poisson", slots, q)
            else:
                mechanism = SampledGaussian(z, "fixed", num_clients, sample_size=clients_per_round)
            if privacy.secure_aggregation is not None:
                mechanism, private_part = _distributed(privacy, mechanism, update_entries,
                                                       clients_per_round)
            else:
                adaptive = privacy.adaptive_clipping
                private_part = dp_fedavg(
                    z, expected_clients=float(clients_per_round), clip_norm=privacy.clip_norm,
                    adaptive=adaptive is not None,
                    target_quantile=adaptive.target_quantile if adaptive else 0.5,
                    learning_rate=adaptive.learning_rate if adaptive else 0.2,
                    count_stddev=adaptive.count_stddev if adaptive else None,
                    noise_cohort_size=privacy.noise_cohort_size)
            # A user's parts (compression) run first: DP clips what they would send.
            self.aggregator = private_part if aggregator is None else chain(aggregator, private_part)
        elif isinstance(privacy, ExampleLevelDP):
            self.level = "example"
            q = privacy.sampling_rate
            local = algorithm.local_schedule
            steps = local.local_steps or math.ceil(local.local_epochs / q)
            # Worst case: a client in every round, taking all its steps each time.
            cap = min(privacy.max_batch_size or budget_cap(
                max_client_size, q, privacy.noise_multiplier, privacy.delta,
                rounds * steps, privacy.accountant), max_client_size)
            mechanism = SampledGaussian(privacy.noise_multiplier, "poisson", max_client_size,
                                        sampling_rate=q, max_sample_size=cap)
            self.schedule_args = {"batch_size": cap, "sampling_rate": q}
            # Per-example gradients in chunks of a quarter of the largest client's expected
            # batch: only the chunks holding sampled examples run (on CPU, simulate() uses
            # chunks of one example, measured fastest there).
            self.example_noise = ExampleNoise(float(privacy.clip_norm),
                                              float(privacy.noise_multiplier), float(q),
                                              chunk=max(1, math.ceil(q * max_client_size / 4)))
        else:
            raise UserError(f"privacy must be ClientLevelDP(...), ExampleLevelDP(...) or None, got "
                            f"{type(privacy).__name__}")
        self.mechanism = mechanism
        with _quiet_accounting():
            self.accountant = (MatrixFactorizationAccountant if isinstance(
                privacy, MatrixFactorizationDP) else Accountant)(
                    mechanism, delta=privacy.delta, accountant=privacy.accountant)
        self.participation = np.zeros(num_clients, np.int64)
        self._peak = 0  # participation.max(), kept up to date (counts only grow)
        self._warned_unbounded = False

    def example_gradient(self, backend: str):
        """DP-SGD's gradient rule for `Problem.example_gradient` (example level), or None.

        On XLA:CPU the per-example gradients run one example at a time: that beats any vmap
        over examples there, by 1.7x (EMNIST CNN) to 15x (MLP, vmapped clients) in
        benchmarks/README.md."""
        if self.example_noise is None:
            return None
        noise = self.example_noise._replace(chunk=1) if backend == "cpu" else self.example_noise

        def gradient(loss, params, batch, mask, rng, num_examples):
            return private_gradient(loss, noise, params, batch, mask, rng, num_examples)

        return gradient

    def set_steps_per_round(self, steps: int) -> None:
        """Local steps per participation (example level; fixed by the schedule)."""
        if self.level == "example":
            self.steps_per_round = int(steps)

    # -- the ledger -----------------------------------------------------------------------
    def _applications(self, rounds_done: int, max_participation: int) -> int:
        return rounds_done if self.level == "client" else max_participation * self.steps_per_round

    def _epsilon(self, applications: int) -> float:
        """ε after `applications`; inf (with one warning) where the cap's overflow slack
        cannot be certified within δ (only at absurd ε, hundreds, or a cap set too small)."""
        try:
            with _quiet_accounting():
                return self.accountant.epsilon(applications)
        except UserError as e:
            if not self._warned_unbounded:
                self._warned_unbounded = True
                warnings.warn(f"ε is reported as inf: {e}", stacklevel=4)
            return math.inf

    def check_budget(self, rounds: int) -> None:
        """Refuses up front a target ε that one round already exceeds, and a cap set too
        small for the run's δ."""
        target = self.privacy.target_epsilon
        user_cap = getattr(self.privacy, "max_cohort_size", None) or getattr(
            self.privacy, "max_batch_size", None)
        if user_cap:
            with _quiet_accounting():  # raises if the cap's overflow does not fit in δ
                self.accountant.epsilon(self._applications(1, 1) if target is not None
                                        else self._applications(rounds, rounds))
        first = self._epsilon(self._applications(1, 1))
        if target is not None and first > target:
            raise UserError(f"privacy.target_epsilon={target:g} is already exceeded by one round "
                            f"(ε = {first:.3g} at δ = {self.privacy.delta:g}); raise target_epsilon "
                            f"or the noise multiplier")

    def recount(self, program, root, done: int) -> None:
        """Participation counts of rounds [0, done) (example level), e.g. on resume."""
        self.participation[:] = 0
        self._peak = 0
        step = 4096
        for start in range(0, done, step):
            self.record(program, root, start, min(step, done - start))

    def record(self, program, root, start: int, count: int) -> list[int]:
        """Counts the participations of rounds start .. start+count-1; returns the largest
        participation count after each of those rounds. A round costs what its cohort
        costs: counts only grow, so the largest is the old one or one of the cohort's."""
        if self.level == "client":
            return []
        import jax
        ids, live = jax.device_get(program.cohorts(root, start, count))
        peaks = []
        for r in range(count):
            taken = ids[r][live[r]]
            np.add.at(self.participation, taken, 1)
            if taken.size:
                self._peak = max(self._peak, int(self.participation[taken].max()))
            peaks.append(self._peak)
        return peaks

    def epsilon_rows(self, first_round: int, count: int, peaks: list[int]) -> list[float]:
        """ε after each of rounds first_round .. first_round+count-1 (1-based round numbers;
        `peaks` from `record` at the example level)."""
        if self.level == "client":
            return [self._epsilon(first_round + i) for i in range(count)]
        return [self._epsilon(p * self.steps_per_round) for p in peaks]

    def epsilon_after(self, rounds_done: int) -> float:
        """ε after `rounds_done` rounds (client level) or at the current participation counts."""
        return self._epsilon(self._applications(rounds_done, self._peak))

    def affordable(self, done: int, count: int) -> int:
        """How many of the next `count` rounds fit in target_epsilon (all when none is set).

        Client level: ε(done + k) <= target. Example level, where the next cohorts are not
        known yet: even a client that takes part in all k rounds stays within the target.
        """
        target = self.privacy.target_epsilon
        if target is None:
            return count
        if self.level == "client":
            return max(0, min(count, self.accountant.max_count(target, done + count) - done))
        steps = self.steps_per_round
        peak = self._peak
        allowed = self.accountant.max_count(target, (peak + count) * steps) // steps - peak
        return max(0, min(count, allowed))

    def stop_message(self, done: int) -> str:
        eps = self.epsilon_after(done)
        return (f"stopped after round {done}: another round would take ε past "
                f"privacy.target_epsilon={self.privacy.target_epsilon:g} (ε = {eps:.4g} at "
                f"δ = {self.privacy.delta:g}); raise target_epsilon or the noise multiplier to "
                f"train longer")

    def summary(self, done: int) -> dict:
        out = {"level": self.level, "noise_multiplier": self.privacy.noise_multiplier,
               "delta": self.privacy.delta, "accountant": self.privacy.accountant,
               "epsilon": _finite_or_none(self.epsilon_after(done)),
               "target_epsilon": self.privacy.target_epsilon,
               "sampling": self.mechanism.sampling,
               "sampling_rate": self.mechanism.sampling_rate,
               "overflow_probability": self.mechanism.overflow_probability()}
        if self.level == "client":
            out["cohort_slots"] = self.sampling.slots if self.sampling else None
            if isinstance(self.mechanism, SampledSkellam):  # distributed DP
                m = self.mechanism
                out["distributed"] = {"mechanism": "skellam", "l2_sensitivity": m.l2_sensitivity,
                                      "l1_sensitivity": m.l1_sensitivity,
                                      "sum_noise_variance": m.variance}
            if isinstance(self.mechanism, (BandMFMechanism, TreeMechanism)):  # DP-FTRL
                m = self.mechanism
                out["matrix_factorization"] = {
                    **m.describe(),
                    "max_participations": math.ceil(done / m.min_separation) if done else 0,
                    "sensitivity": self.accountant.sensitivity(max(done, 1))}
                out["matrix_factorization"].pop("rounds", None)
        else:
            out.update(max_batch_size=self.schedule_args["batch_size"],
                       local_steps=self.steps_per_round,
                       max_participation=self._peak)
        return out


def _finite_or_none(x: float):
    return x if math.isfinite(x) else None


def warn_stop(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def warn_failed_rounds(rows: list[dict]) -> None:
    """One warning line per round the aggregator could not complete (it had no effect)."""
    for row in rows:
        if row.get(ROUND_FAILED):
            warnings.warn(f"round {row['round']} failed in aggregation and had no effect (the "
                          f"model and every state are those of the round before){_why(row)}",
                          stacklevel=3)


def _why(row: dict) -> str:
    if row.get("secagg_too_few_survivors"):
        return (f": {int(row['secagg_survivors'])} clients survived, fewer than the secure "
                f"sum's threshold {int(row['secagg_threshold'])}; lower the dropout rate or "
                f"the threshold")
    if row.get("secagg_overflow_coordinates"):
        return (f": the secure sum left the modulus' range in "
                f"{int(row['secagg_overflow_coordinates'])} coordinates; raise modulus_bits or "
                f"lower the scale")
    return ""
