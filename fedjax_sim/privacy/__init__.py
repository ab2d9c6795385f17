"""Differential privacy: what to protect, and how much it costs in ε.

Two levels, each a config passed to `simulate(..., privacy=...)` (or a config file's
`privacy` section):

- `ClientLevelDP` — DP-FedAvg (McMahan et al. 2018). Protects everything one client
  contributes: neighbouring datasets differ by adding or removing ONE CLIENT with all its
  examples (Poisson sampling), or by replacing one client (fixed-size sampling). Each
  client's update is clipped to norm C (fixed, or adaptive: Andrew et al. 2021), the sum
  gets N(0, (zC)²) noise, and the server divides by the expected cohort size.
- `ExampleLevelDP` — DP-SGD inside every client (Abadi et al. 2016). Protects one
  EXAMPLE of a client: neighbouring datasets differ by one example. Every local step
  Poisson-samples the client's examples, clips per-example gradients to C and adds
  N(0, (σC)²); ε is that of the client whose examples took the most steps so far.

What is NOT protected: the model's architecture and hyper-parameters, the number of
clients, each client's dataset size (used for DP-SGD's denominator), and anything a
client reveals outside training. The guarantee is about the released model (and every
intermediate global model), against an adversary who sees all of them.

Simulation is not deployment: noise here comes from JAX's counter-based PRNG and float32
arithmetic, which are fine for measuring utility and ε but are not a cryptographically
secure source of randomness, nor protected against floating-point side channels. A
deployment needs a secure noise source (and, usually, secure aggregation).

ε is computed by `dp_accounting` (`fedjax_sim.privacy.accounting`): after every round
in `metrics.jsonl`, with `target_epsilon` stopping training before it would be exceeded.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

from fedjax_sim.errors import UserError
from fedjax_sim.privacy.matrix_factorization import check_amplified_bands
from fedjax_sim.privacy.accounting import (Accountant, SampledGaussian, calibrate_noise,
                                           default_cap, epsilon)

ACCOUNTANTS = ("rdp", "pld")
CLIENT_SAMPLINGS = ("poisson", "fixed")


def _real(name, value, *, low=None, high=None, low_open=False, high_open=False,
          optional=False):
    if value is None and optional:
        return
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        allowed = " and ".join(x for x in (lo, hi) if x)
        raise UserError(f"{name} must be a number {allowed}, got {value!r}")


def _int(name, value, low, optional=False):
    if value is None and optional:
        return
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low):
        raise UserError(f"{name} must be an integer >= {low}, got {value!r}")


def _common(dp):
    _real("privacy.delta", dp.delta, low=0, high=1, low_open=True, high_open=True)
    if dp.accountant not in ACCOUNTANTS:
        raise UserError(f"privacy.accountant={dp.accountant!r} is not known; choose one of "
                        f"{list(ACCOUNTANTS)}")
    _real("privacy.target_epsilon", dp.target_epsilon, low=0, low_open=True, optional=True)


@dataclasses.dataclass(frozen=True)
class AdaptiveClipping:
    """Adaptive clip norm (Andrew et al. 2021): C moves geometrically toward the
    `target_quantile` of the update norms at `learning_rate`, from a count noised with
    std `count_stddev` (default: expected clients per round / 20)."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float | None = None

    def __post_init__(self):
        _real("privacy.adaptive_clipping.target_quantile", self.target_quantile, low=0, high=1,
              low_open=True, high_open=True)
        _real("privacy.adaptive_clipping.learning_rate", self.learning_rate, low=0, low_open=True)
        _real("privacy.adaptive_clipping.count_stddev", self.count_stddev, low=0, low_open=True,
              optional=True)


@dataclasses.dataclass(frozen=True)
class SecureAggregation:
    """Distributed DP (`ClientLevelDP(..., secure_aggregation=SecureAggregation(...))`): the
    clients add Skellam noise to integer-encoded updates and the server sees only their
    secure sum (fedjax_sim.aggregators.distributed_dp), so the server need not be trusted.

    modulus_bits: b, the secure sum works mod 2^b (2..32).
    dropout_rate: each client's chance to drop out after masking, per round.
    min_clients: t, the secure sum's threshold: fewer survivors fail the round, and each
      client adds 1/t of the noise (default ⌊2m/3⌋ + 1 of the m clients per round).
    scale: the encoding's scale s (default: the largest that keeps the sum in range).
    beta: conditional rounding's miss probability per attempt (Kairouz et al. 2021).
    """

    modulus_bits: int = 32
    dropout_rate: float = 0.0
    min_clients: int | None = None
    scale: float | None = None
    beta: float = math.exp(-0.5)

    def __post_init__(self):
        _int("privacy.secure_aggregation.modulus_bits", self.modulus_bits, 2)
        if self.modulus_bits > 32:
            raise UserError(f"privacy.secure_aggregation.modulus_bits must be an integer in "
                            f"[2, 32], got {self.modulus_bits!r}")
        _real("privacy.secure_aggregation.dropout_rate", self.dropout_rate, low=0, high=1,
              high_open=True)
        _int("privacy.secure_aggregation.min_clients", self.min_clients, 1, optional=True)
        _real("privacy.secure_aggregation.scale", self.scale, low=0, low_open=True,
              optional=True)
        _real("privacy.secure_aggregation.beta", self.beta, low=0, high=1, high_open=True)


@dataclasses.dataclass(frozen=True)
class ClientLevelDP:
    """DP-FedAvg: clipped, noised client updates, with ε per round.

    noise_multiplier: z; the noise std on the sum of updates is z·C.
    delta: δ of the (ε, δ) guarantee; keep it well below 1/num_clients.
    clip_norm: C; with `adaptive_clipping` the initial C₀ (default 0.1).
    adaptive_clipping: None (fixed C) or `AdaptiveClipping(...)`.
    sampling: 'poisson' (each client joins a round with probability
      q = clients_per_round / num_clients; add/remove-one DP) or 'fixed' (exactly
      clients_per_round clients; replace-one DP, RDP accountant only).
    max_cohort_size: the cap the Poisson cohort is padded to (default: the smallest cap
      whose overflow probability is at most 1e-12 per round; overflow is charged to δ).
    noise_cohort_size: add the noise a cohort of this many clients would get (the
      aggregate's noise std is z·C / noise_cohort_size), to study production-scale DP
      with a small simulated cohort; ε is then that of a population with the same q.
    accountant: 'rdp' (default; quick) or 'pld' (tighter; tens of ms per round).
    target_epsilon: stop training before ε would exceed it.
    secure_aggregation: None (the server adds Gaussian noise: central DP) or
      `SecureAggregation(...)`: distributed DP, the clients add Skellam noise under a
      secure sum (fixed clipping, RDP accountant).
    """

    noise_multiplier: float
    delta: float
    clip_norm: float | None = None
    adaptive_clipping: AdaptiveClipping | None = None
    sampling: str = "poisson"
    max_cohort_size: int | None = None
    noise_cohort_size: int | None = None
    accountant: str = "rdp"
    target_epsilon: float | None = None
    secure_aggregation: SecureAggregation | None = None

    def __post_init__(self):
        _real("privacy.noise_multiplier", self.noise_multiplier, low=0)
        _common(self)
        self._check_secure_aggregation()
        if self.adaptive_clipping is None and self.clip_norm is None:
            raise UserError("privacy.clip_norm is required with fixed clipping; set it (e.g. 1.0) "
                            "or use adaptive_clipping")
        _real("privacy.clip_norm", self.clip_norm, low=0, low_open=True, optional=True)
        if self.adaptive_clipping is not None and not isinstance(self.adaptive_clipping,
                                                                 AdaptiveClipping):
            raise UserError(f"privacy.adaptive_clipping must be None or AdaptiveClipping(...), "
                            f"got {self.adaptive_clipping!r}")
        if self.sampling not in CLIENT_SAMPLINGS:
            raise UserError(f"privacy.sampling={self.sampling!r} is not known; choose one of "
                            f"{list(CLIENT_SAMPLINGS)}")
        _int("privacy.max_cohort_size", self.max_cohort_size, 1, optional=True)
        if self.max_cohort_size is not None and self.sampling != "poisson":
            raise UserError("privacy.max_cohort_size applies to Poisson sampling only; drop it or "
                            "set sampling='poisson'")
        _int("privacy.noise_cohort_size", self.noise_cohort_size, 1, optional=True)
        if self.sampling == "fixed" and self.accountant == "pld":
            raise UserError("the PLD accountant cannot account for fixed-size sampling without "
                            "replacement; use accountant='rdp' or sampling='poisson'")


    def _check_secure_aggregation(self):
        secure = self.secure_aggregation
        if secure is None:
            return
        if not isinstance(secure, SecureAggregation):
            raise UserError(f"privacy.secure_aggregation must be None or SecureAggregation(...), "
                            f"got {secure!r}")
        if self.adaptive_clipping is not None or self.clip_norm is None:
            raise UserError("privacy.secure_aggregation (distributed DP) needs a fixed clip_norm: "
                            "set clip_norm and drop adaptive_clipping")
        if self.noise_multiplier <= 0:
            raise UserError("privacy.secure_aggregation (distributed DP) needs a noise_multiplier "
                            "> 0")
        if self.accountant != "rdp":
            raise UserError("privacy.secure_aggregation (distributed DP, Skellam noise) is "
                            "accounted with RDP only; set accountant='rdp'")
        if self.noise_cohort_size is not None:
            raise UserError("privacy.noise_cohort_size does not apply with secure_aggregation: "
                            "the noise is the clients' own; drop it")


@dataclasses.dataclass(frozen=True)
class MatrixFactorizationDP:
    """DP-FTRL: client-level DP without sampling, by a matrix-factorization mechanism.

    Every client's update is clipped to `clip_norm`; the server adds noise correlated
    across rounds (`fedjax_sim.aggregators.matrix_factorization`) and divides by
    clients_per_round. The clients are split once into `min_separation` groups and round t
    draws its cohort from group t mod min_separation, so a client takes part at most once
    every `min_separation` rounds; ε follows from the strategy's sensitivity under that
    participation (`fedjax_sim.privacy.matrix_factorization`).

    noise_multiplier: z; the noise on C x has std z · clip_norm per coordinate.
    clip_norm: C, each client's update clipped to this L2 norm.
    delta: δ of the (ε, δ) guarantee (add or remove one client).
    min_separation: b, rounds between two participations of a client (default:
      num_clients // clients_per_round, one pass over the clients per b rounds).
    participation: 'cyclic' (default): round t trains `clients_per_round` clients of group
      t mod b, no amplification claimed; 'cyclic_poisson': every client of group t mod b
      joins round t independently with probability clients_per_round / (num_clients // b)
      (amplified BandMF, Choquette-Choo et al. 2023; needs bands <= min_separation).
    max_cohort_size: participation='cyclic_poisson' only: slots for the sampled clients (default: the
      smallest cap whose overflow costs at most δ/10, as for DP-FedAvg).
    strategy: 'bandmf' (default): banded matrix factorization (Choquette-Choo et al. 2023),
      built for the run's rounds; 'tree': tree aggregation (Kairouz et al. 2021), the
      first DP-FTRL, noisier per ε than BandMF but independent of the number of rounds.
    bands: BandMF's bands (default: min(min_separation, rounds)); more bands than
      min_separation raise the sensitivity. 1 is DP-SGD's independent noise.
    accountant: 'pld' (default) or 'rdp'.
    target_epsilon: stop training before ε would exceed it.
    """

    noise_multiplier: float
    clip_norm: float
    delta: float
    min_separation: int | None = None
    bands: int | None = None
    accountant: str = "pld"
    target_epsilon: float | None = None
    strategy: str = "bandmf"
    participation: str = "cyclic"
    max_cohort_size: int | None = None

    def __post_init__(self):
        _real("privacy.noise_multiplier", self.noise_multiplier, low=0)
        _real("privacy.clip_norm", self.clip_norm, low=0, low_open=True)
        _int("privacy.min_separation", self.min_separation, 1, optional=True)
        _int("privacy.bands", self.bands, 1, optional=True)
        if self.strategy not in ("bandmf", "tree"):
            raise UserError(f"privacy.strategy must be 'bandmf' or 'tree', got {self.strategy!r}")
        if self.strategy == "tree" and self.bands is not None:
            raise UserError("privacy.bands applies to strategy='bandmf' only; drop it for the "
                            "tree")
        _int("privacy.max_cohort_size", self.max_cohort_size, 1, optional=True)
        if self.participation not in ("cyclic", "cyclic_poisson"):
            raise UserError(f"privacy.participation must be 'cyclic' or 'cyclic_poisson', got "
                            f"{self.participation!r}")
        if self.participation == "cyclic_poisson":
            if self.strategy != "bandmf":
                raise UserError("privacy.participation='cyclic_poisson' (amplification) is "
                                "proven for BandMF only; use strategy='bandmf' or "
                                "participation='cyclic'")
            if self.bands is not None and self.min_separation is not None:
                check_amplified_bands(self.bands, self.min_separation)
        elif self.max_cohort_size is not None:
            raise UserError("privacy.max_cohort_size applies to participation='cyclic_poisson' "
                            "only; cyclic cohorts have exactly clients_per_round clients")
        _common(self)


@dataclasses.dataclass(frozen=True)
class ExampleLevelDP:
    """DP-SGD in every client: Poisson batches, per-example clipping, Gaussian noise.

    clip_norm: C for each example's gradient.
    noise_multiplier: σ; each step's noise std on the gradient sum is σ·C.
    sampling_rate: q, the probability that an example joins a step's batch; a client
      takes `local_steps` steps, or ceil(local_epochs / q).
    delta: δ per client's data; keep it well below 1 / (examples per client).
    max_batch_size: the cap a step's batch is padded to (default: overflow probability at
      most 1e-12 per step, charged to δ).
    accountant, target_epsilon: as in `ClientLevelDP`; ε is the largest over clients.
    """

    clip_norm: float
    noise_multiplier: float
    sampling_rate: float
    delta: float
    max_batch_size: int | None = None
    accountant: str = "rdp"
    target_epsilon: float | None = None

    def __post_init__(self):
        _real("privacy.clip_norm", self.clip_norm, low=0, low_open=True)
        _real("privacy.noise_multiplier", self.noise_multiplier, low=0)
        _real("privacy.sampling_rate", self.sampling_rate, low=0, high=1, low_open=True)
        _int("privacy.max_batch_size", self.max_batch_size, 1, optional=True)
        _common(self)


__all__ = ["ClientLevelDP", "MatrixFactorizationDP", "ExampleLevelDP", "AdaptiveClipping", "SecureAggregation", "Accountant", "SampledGaussian",
           "epsilon", "calibrate_noise", "default_cap", "ACCOUNTANTS", "CLIENT_SAMPLINGS"]
