"""Distributed DP (fedjax_sim.aggregators.distributed_dp): Skellam noise added by the
clients, summed under secure aggregation. Checked against numpy/statistical references:
the noise's variance, the rounding's norm bound, the decoded mean, and ε by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.aggregators import Cohort
from fedjax_sim.aggregators.distributed_dp import (conditional_round, distributed_dp,
                                                   skellam_noise, skellam_setting)
from fedjax_sim.errors import UserError
from fedjax_sim.privacy import Accountant, ClientLevelDP, SecureAggregation
from fedjax_sim.privacy.skellam import SampledSkellam


def test_skellam_noise_is_integer_centred_with_the_stated_variance():
    x = np.asarray(skellam_noise(jax.random.key(0), 50.0, (200_000,)))
    assert x.dtype == np.int32
    # mean 0 within 5 standard errors; the sample variance within 5 of its standard errors
    # (Var of the sample variance ≈ (μ4 - σ⁴)/n, μ4 = 3σ⁴ + σ² for Skellam)
    n, var = x.size, 50.0
    assert abs(x.mean()) < 5 * math.sqrt(var / n)
    assert abs(x.var() - var) < 5 * math.sqrt((2 * var ** 2 + var) / n)


def test_conditional_rounding_never_exceeds_its_bound():
    v = jax.random.normal(jax.random.key(1), (64, 256)) * 3.0
    norms = jnp.linalg.norm(v, axis=1)
    keys = jax.random.split(jax.random.key(2), 64)
    # a bound that one stochastic rounding often misses, and one no rounding can meet
    for bound in (norms.max() + 1.0, 0.5 * norms.min()):
        r = jax.vmap(conditional_round, in_axes=(0, 0, None))(v, keys, float(bound))
        assert np.all(np.abs(np.asarray(r) - np.asarray(v)) < 1.0)
        ok = np.linalg.norm(np.asarray(r, np.float64), axis=1) <= float(bound)
        fallback = np.all(np.asarray(r) == np.trunc(np.asarray(v)), axis=1)
        assert np.all(ok | fallback)  # within the bound, or rounded toward zero
        assert np.all(np.linalg.norm(np.asarray(r, np.float64), axis=1)
                      <= np.maximum(float(bound), np.asarray(norms, np.float64)))


def _run_round(aggregator, updates, key):
    """One round of the aggregator outside the engine, jitted: (aggregate, metrics)."""
    return jax.jit(lambda u, k: _round(aggregator, u, k))(updates, key)


def _round(aggregator, updates, key):
    m = updates.shape[0]
    params = {"w": jnp.zeros(updates.shape[1:])}
    state = aggregator.init(params)
    keys = jax.random.split(key, m + 2)
    sent, reports = jax.vmap(lambda u, k: aggregator.client({"w": u}, state, k))(updates, keys[:m])
    live = jnp.ones(m, bool)
    total, denom, metrics = aggregator.reduce(Cohort(sent, jnp.ones(m), live), state, keys[m])
    reports = {k: jnp.sum(v) for k, v in reports.items()}
    total, denom, _, more = aggregator.finalize(total, denom, {**reports, **metrics,
                                                               "clients": jnp.float32(m)},
                                                state, keys[m + 1])
    return total["w"] / denom, {**metrics, **more}


def test_the_secure_noised_sum_decodes_to_the_mean_with_the_noise_it_claims():
    m, d, c, z = 8, 4096, 1.0, 0.5
    setting = skellam_setting(z, clip_norm=c, entries=d, cohort_slots=m, min_clients=m)
    agg = distributed_dp(setting, clip_norm=c, expected_clients=m)
    updates = jax.random.normal(jax.random.key(3), (m, d)) * 0.01  # norms ≈ 0.64 < c
    mean, metrics = _run_round(agg, updates, jax.random.key(4))
    error = np.asarray(mean) - np.asarray(updates).mean(axis=0)
    # the noise: Sk(m·μ/t) on the sum of s-scaled, rotated updates, divided by s·m; rounding
    # adds variance <= 1/4 per client and coordinate
    claimed = float(metrics["dp_noise_std"])
    expected = math.sqrt(setting.variance) / (setting.scale * m)
    assert claimed == pytest.approx(expected, rel=1e-5)
    rounding = math.sqrt(m / 4) / (setting.scale * m)
    std = math.sqrt(claimed ** 2 + rounding ** 2)
    assert abs(error.mean()) < 5 * std / math.sqrt(d)
    assert abs(error.std() / std - 1) < 5 * math.sqrt(1 / (2 * d))
    assert float(metrics["round_failed"]) == 0 and float(metrics["secagg_survivors"]) == m


@pytest.mark.slow
def test_epsilon_of_a_distributed_dp_run_is_the_skellam_accountants():
    train, test = fs.data.load_digits()
    clients = fs.data.partition(train, train["y"], "iid", 40, seed=0)
    model = fs.models.get_model("mlp", (8, 8, 1), 10, hidden=[16])
    alg = fs.algorithms.fedavg(optax.sgd(0.1), weighting="uniform")
    secure = SecureAggregation(modulus_bits=32, dropout_rate=0.1, min_clients=4)
    dp = ClientLevelDP(noise_multiplier=1.0, delta=1e-4, clip_norm=1.0, secure_aggregation=secure)
    result = fs.simulate(model, alg, clients, rounds=3, clients_per_round=8, privacy=dp,
                         eval_data=test, eval_every=3, progress=False)
    entries = 64 * 16 + 16 + 16 * 10 + 10
    cap = result.summary["privacy"]["cohort_slots"]
    setting = skellam_setting(1.0, clip_norm=1.0, entries=entries, cohort_slots=cap,
                              min_clients=4)
    mech = SampledSkellam(setting.l2_sensitivity, setting.l1_sensitivity, setting.variance,
                          "poisson", 40, sampling_rate=0.2, max_sample_size=cap)
    assert result.history[-1]["epsilon"] == pytest.approx(Accountant(mech, delta=1e-4).epsilon(3))
    assert np.isfinite(result.history[-1]["test_accuracy"])
    assert "secagg_survivors" in result.history[-1] and "uplink_bytes" in result.history[-1]


def test_distributed_dp_refuses_what_it_cannot_account():
    secure = SecureAggregation()
    with pytest.raises(UserError, match="fixed clip_norm"):
        ClientLevelDP(noise_multiplier=1.0, delta=1e-5, clip_norm=None,
                      adaptive_clipping=fs.privacy.AdaptiveClipping(), secure_aggregation=secure)
    with pytest.raises(UserError, match="RDP only"):
        ClientLevelDP(noise_multiplier=1.0, delta=1e-5, clip_norm=1.0, accountant="pld",
                      secure_aggregation=secure)
    with pytest.raises(UserError, match="modulus_bits"):
        SecureAggregation(modulus_bits=40)
