"""Accounting for distributed DP with the Skellam mechanism (Agarwal, Kairouz & Liu 2021,
"The Skellam Mechanism for Differentially Private Federated Learning").

Under secure aggregation the server sees only the sum, so the noise must come from the
clients: each adds integer noise to its integer-encoded update, and the sum carries the
noise of all of them. Skellam noise Sk(μ) = Poisson(μ/2) − Poisson(μ/2) (variance μ) is
closed under addition, so n clients adding Sk(μ/n) give exactly Sk(μ) on the sum.

Sensitivities, in the integer units of the encoded update (clip norm c, scale s, dimension
d after padding for the rotation, conditional stochastic rounding with β):

    Δ₂ = min( s·c + √d,  √( s²c² + d/4 + √(2 ln(1/β)) · (s·c + √d/2) ) )
    Δ₁ = min( √d · Δ₂,  Δ₂² )           (|x| ≤ x² for integers)

(the first Δ₂ bound holds for any rounding; the second is what conditional rounding
enforces by rounding again until the norm is within it, Kairouz et al. 2021.)

RDP of one release (Agarwal et al. 2021, Theorem 3.5), for integer orders α > 1:

    ε(α) ≤ α Δ₂² / (2μ) + min( ((2α − 1) Δ₂² + 6 Δ₁) / (4μ²),  3 Δ₁ / (2μ) )

dp_accounting has no Skellam event, and its privacy-loss-distribution tools are
one-dimensional (a d-dimensional Skellam is not rotation invariant, so it does not reduce
to one dimension as the Gaussian does), so this closed form is computed here. Poisson
subsampling with rate q is accounted with the general upper bound of Zhu & Wang 2019
("Poisson Subsampled Rényi Differential Privacy", Theorem 6), valid for any mechanism at
integer orders:

    ε'(α) ≤ 1/(α−1) · log( (1−q)^{α−1} (αq − q + 1) + C(α,2) q² (1−q)^{α−2} e^{ε(2)}
                           + 3 Σ_{l=3}^{α} C(α,l) (1−q)^{α−l} q^l e^{(l−1) ε(l)} )

and the RDP curve is turned into (ε, δ) by dp_accounting's `compute_epsilon`. A fixed-size
cohort (replace-one neighbours) is accounted without amplification, with the sensitivities
doubled: an upper bound.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fedjax_sim.errors import UserError

# Integer RDP orders: every order up to 256, then a few larger ones for tiny ε.
ORDERS = np.array(list(range(2, 257)) + [320, 384, 512, 768, 1024], dtype=np.float64)


def rounded_l2_bound(scaled_norm: float, dim: int, beta: float) -> float:
    """Δ₂ of an integer vector from stochastic rounding of a vector of L2 norm `scaled_norm`
    (= s·c) in `dim` dimensions, conditioned (β > 0) on the second bound of the module doc."""
    loose = scaled_norm + math.sqrt(dim)
    if beta <= 0:
        return loose
    tight = scaled_norm ** 2 + dim / 4 + math.sqrt(2 * math.log(1 / beta)) * (
        scaled_norm + math.sqrt(dim) / 2)
    return min(loose, math.sqrt(tight))


def l1_bound(l2: float, dim: int) -> float:
    """Δ₁ of an integer vector of L2 norm at most `l2` in `dim` dimensions."""
    return min(math.sqrt(dim) * l2, l2 ** 2)


def skellam_rdp(orders: np.ndarray, l2: float, l1: float, variance: float) -> np.ndarray:
    """Agarwal et al.'s RDP bound of the Skellam mechanism at integer `orders` (module doc)."""
    a = np.asarray(orders, np.float64)
    mu = float(variance)
    return a * l2 ** 2 / (2 * mu) + np.minimum(((2 * a - 1) * l2 ** 2 + 6 * l1) / (4 * mu ** 2),
                                               3 * l1 / (2 * mu))


def poisson_subsampled_rdp(orders: np.ndarray, rate: float, rdp: np.ndarray) -> np.ndarray:
    """Zhu & Wang's upper bound on the RDP of a Poisson-subsampled mechanism (module doc),
    given the mechanism's RDP `rdp[i]` at integer order `orders[i]`; needs every integer
    order from 2 up to each order it bounds (other orders get the unamplified value).
    Never more than the unamplified curve."""
    from scipy import special  # seconds to import: loaded where the bound is computed

    orders = np.asarray(orders, np.float64)
    rdp = np.asarray(rdp, np.float64)
    q = float(rate)
    if q >= 1:
        return rdp.copy()
    at = {int(a): e for a, e in zip(orders, rdp)}
    out = rdp.copy()
    log_q, log_1q = math.log(q), math.log1p(-q)
    for i, a in enumerate(orders.astype(int)):
        if any(l not in at for l in range(2, a + 1)):
            continue
        l = np.arange(3, a + 1)
        eps_l = np.array([at[int(k)] for k in l])
        terms = [(a - 1) * log_1q + math.log(a * q - q + 1),
                 math.log(special.comb(a, 2)) + 2 * log_q + (a - 2) * log_1q + at[2]]
        if l.size:
            log_comb = special.gammaln(a + 1) - special.gammaln(l + 1) - special.gammaln(a - l + 1)
            terms.extend(math.log(3) + log_comb + l * log_q + (a - l) * log_1q + (l - 1) * eps_l)
        out[i] = min(rdp[i], special.logsumexp(terms) / (a - 1))
    return out


@dataclasses.dataclass(frozen=True)
class SampledSkellam:
    """One round of distributed DP with Skellam noise, in the encoded update's integer units.

    l2_sensitivity, l1_sensitivity: Δ₂ and Δ₁ of one client's encoded update.
    variance: μ, the Skellam noise variance per coordinate of the released SUM (the
      noise of the fewest clients a released sum can hold).
    sampling, sampling_rate, sample_size, population: as `SampledGaussian`'s ('poisson':
      add/remove-one, amplified by subsampling; 'fixed': replace-one, not amplified).
    """

    l2_sensitivity: float
    l1_sensitivity: float
    variance: float
    sampling: str
    population: int
    sampling_rate: float | None = None
    sample_size: int | None = None
    max_sample_size: int | None = None

    def __post_init__(self):
        for name in ("l2_sensitivity", "l1_sensitivity", "variance"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UserError(f"{name} must be a finite number > 0, got {value!r}")
        if self.sampling not in ("poisson", "fixed"):
            raise UserError(f"sampling must be 'poisson' or 'fixed', got {self.sampling!r}")
        if self.sampling == "poisson" and not (self.sampling_rate and 0 < self.sampling_rate <= 1):
            raise UserError("sampling='poisson' needs sampling_rate in (0, 1]")

    @property
    def sampled(self):
        """The same sampling as a `SampledGaussian` (its neighbouring relation, expected
        sample size and cap overflow are the sampling's, not the noise's)."""
        from fedjax_sim.privacy.accounting import SampledGaussian
        return SampledGaussian(self.noise_multiplier, self.sampling, self.population,
                               sampling_rate=self.sampling_rate, sample_size=self.sample_size,
                               max_sample_size=self.max_sample_size)

    @property
    def neighboring_relation(self):
        return self.sampled.neighboring_relation

    @property
    def expected_sample_size(self) -> float:
        return self.sampled.expected_sample_size

    def overflow_probability(self) -> float:
        return self.sampled.overflow_probability()

    @property
    def noise_multiplier(self) -> float:
        """The Gaussian-equivalent z = √μ / Δ₂ (the Skellam tends to that Gaussian)."""
        return math.sqrt(self.variance) / self.l2_sensitivity

    def rdp(self, orders: np.ndarray = ORDERS) -> tuple[np.ndarray, np.ndarray]:
        """(orders, RDP of one round at each order)."""
        if self.sampling == "fixed":  # replace-one: one client out and another in
            return orders, skellam_rdp(orders, 2 * self.l2_sensitivity,
                                       2 * self.l1_sensitivity, self.variance)
        base = skellam_rdp(orders, self.l2_sensitivity, self.l1_sensitivity, self.variance)
        return orders, poisson_subsampled_rdp(orders, self.sampling_rate, base)

