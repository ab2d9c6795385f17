"""Distributed DP's Skellam accounting (fedjax_sim.privacy.skellam) against independent
references: the exact Rényi divergence of a one-dimensional Skellam (scipy's pmf),
dp_accounting's exact subsampled-Gaussian RDP, and hand-computed sensitivity bounds."""

import math

import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import special, stats

from fedjax_sim.errors import UserError
from fedjax_sim.privacy import Accountant, SampledGaussian
from fedjax_sim.privacy.skellam import (SampledSkellam, l1_bound, poisson_subsampled_rdp,
                                        rounded_l2_bound, skellam_rdp)


def _skellam_renyi(mu: float, shift: int, order: int) -> float:
    """D_order( Sk(mu) + shift || Sk(mu) ) summed over the pmf's support, in one dimension."""
    half = int(mu + 20 * math.sqrt(mu) + 50)
    k = np.arange(-half, half + 1)
    p = stats.skellam.logpmf(k - shift, mu / 2, mu / 2)
    q = stats.skellam.logpmf(k, mu / 2, mu / 2)
    ok = np.isfinite(p) & np.isfinite(q)
    return special.logsumexp(order * p[ok] + (1 - order) * q[ok]) / (order - 1)


@pytest.mark.parametrize("mu,shift", [(4.0, 1), (25.0, 2), (1000.0, 10)])
def test_skellam_rdp_bounds_the_exact_divergence_and_tends_to_the_gaussian(mu, shift):
    orders = np.array([2, 5, 10, 50])
    bound = skellam_rdp(orders, shift, shift, mu)
    exact = np.array([_skellam_renyi(mu, shift, int(a)) for a in orders])
    assert np.all(bound >= exact - 1e-9)
    gaussian = orders * shift ** 2 / (2 * mu)
    # the bound exceeds the Gaussian's α Δ²/(2μ) by terms of order 1/μ²
    assert np.all(bound >= gaussian)
    if mu >= 1000:
        np.testing.assert_allclose(bound, gaussian, rtol=0.01)


@pytest.mark.parametrize("q,z", [(0.01, 1.0), (0.1, 1.2)])
def test_general_poisson_subsampling_bound_is_above_dp_accountings_exact_gaussian(q, z):
    orders = np.arange(2, 129, dtype=np.float64)
    unamplified = orders / (2 * z * z)
    ours = poisson_subsampled_rdp(orders, q, unamplified)
    exact = rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(q, z, orders)
    assert np.all(ours >= exact * (1 - 1e-9)) and np.all(ours <= unamplified)
    eps = lambda rdp: rdp_privacy_accountant.compute_epsilon(orders, 100 * rdp, 1e-5)[0]
    # a valid upper bound for any mechanism, within 30% of the Gaussian-specific one here
    assert eps(exact) <= eps(ours) <= 1.3 * eps(exact)


def test_sensitivity_bounds_by_hand():
    # s·c = 10 in d = 16: loose 10 + 4 = 14; conditional (β = e^-0.5):
    # sqrt(100 + 4 + 1·(10 + 2)) = sqrt(116)
    assert rounded_l2_bound(10.0, 16, 0.0) == 14.0
    assert rounded_l2_bound(10.0, 16, math.exp(-0.5)) == pytest.approx(math.sqrt(116))
    assert l1_bound(3.0, 16) == 9.0 and l1_bound(30.0, 16) == 120.0


def test_stochastic_rounding_stays_within_the_loose_bound():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x = rng.normal(size=64)
        x *= 7.0 / np.linalg.norm(x)
        rounded = np.floor(x) + (rng.random(64) < x - np.floor(x))
        assert np.linalg.norm(rounded) <= rounded_l2_bound(7.0, 64, 0.0)


def test_accountant_with_skellam_approaches_the_gaussian_at_large_variance():
    l2, z, q, n = 1000.0, 1.0, 0.01, 10_000
    skellam = SampledSkellam(l2, l1_bound(l2, 4096), (z * l2) ** 2, "poisson", n, sampling_rate=q)
    gaussian = SampledGaussian(z, "poisson", n, sampling_rate=q)
    eps_s = Accountant(skellam, delta=1e-6).epsilon(100)
    eps_g = Accountant(gaussian, delta=1e-6).epsilon(100)
    assert eps_g <= eps_s <= 1.3 * eps_g
    assert skellam.noise_multiplier == pytest.approx(z)
    # fixed-size sampling: replace-one neighbours, no amplification: far larger
    fixed = SampledSkellam(l2, l1_bound(l2, 4096), (z * l2) ** 2, "fixed", n, sample_size=100)
    assert Accountant(fixed, delta=1e-6).epsilon(100) > 10 * eps_s


def test_skellam_is_accounted_with_rdp_only():
    mech = SampledSkellam(10.0, 30.0, 400.0, "poisson", 100, sampling_rate=0.1)
    with pytest.raises(UserError, match="RDP only"):
        Accountant(mech, delta=1e-5, accountant="pld")
