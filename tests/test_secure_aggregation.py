"""Secure aggregation (fedjax_sim.aggregators.secure) against independent references: the
field arithmetic and Shamir sharing against Python integers, the unmasked sum against
numpy's integer sum, a masked vector against the uniform distribution (chi-square),
stochastic rounding against its exact mean and variance, and overflow and failed rounds
against counts recomputed in numpy."""

import itertools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import fedjax_sim as fs
from fedjax_sim.aggregators import ROUND_FAILED, Message
from fedjax_sim.aggregators import secure as sa
from fedjax_sim.data import FederatedData
from fedjax_sim.engine.contracts import Cohort
from fedjax_sim.errors import UserError
from fedjax_sim.models import logistic_regression

from helpers import full_batch_fedavg, toy_clients

P = sa.FIELD_PRIME


def _lagrange_python(points, values, p=P):
    """f(0) from (x, f(x)) pairs by Lagrange interpolation over Python integers."""
    points, values, total = [int(x) for x in points], [int(y) for y in values], 0
    for j, (xj, yj) in enumerate(zip(points, values)):
        num = den = 1
        for k, xk in enumerate(points):
            if k != j:
                num, den = num * xk % p, den * (xk - xj) % p
        total += yj * num * pow(den, -1, p)
    return total % p


def _signed(values, bits):
    """Integers as the b-bit two's complement residues they wrap to."""
    v = np.asarray(values, np.int64) % (1 << bits)
    return np.where(v >= 1 << (bits - 1), v - (1 << bits), v)


def test_field_arithmetic_matches_python_integers():
    rng = np.random.default_rng(0)
    a = rng.integers(1, P, 200)
    e = rng.integers(0, 1 << 16, 200)
    np.testing.assert_array_equal(np.asarray(sa.powmod(jnp.uint32(a), jnp.uint32(e))),
                                  [pow(int(x), int(y), P) for x, y in zip(a, e)])
    inv = np.asarray(sa.inverse(jnp.uint32(a))).astype(np.int64)
    assert np.all(inv * a % P == 1)
    sk = jnp.uint32(rng.integers(1, P - 1, (2, 50)))
    pk = sa.public_key(sk)  # g^a then (g^b)^a == (g^a)^b: the key agreement is symmetric
    np.testing.assert_array_equal(np.asarray(sa.agree(sk[0], pk[1])),
                                  np.asarray(sa.agree(sk[1], pk[0])))
    assert pow(sa.GENERATOR, (P - 1) // 2, P) != 1  # g generates Z_p^* (its order is p - 1)
    for q in (2, 3, 5, 7, 13):
        assert (P - 1) % q == 0 and pow(sa.GENERATOR, (P - 1) // q, P) != 1


def test_shamir_reconstructs_from_any_t_shares_and_not_from_t_minus_one():
    n, t, secrets_n = 7, 4, 40
    rng = np.random.default_rng(1)
    secret = rng.integers(0, P, secrets_n)
    randomness = sa.field_elements(jax.random.bits(jax.random.key(1), (secrets_n, t - 1, 2),
                                                   jnp.uint32))
    coefficients = sa.shamir_polynomial(randomness, jnp.uint32(secret), t)
    xs = np.arange(1, n + 1)
    shares = np.asarray(sa.shamir_evaluate(coefficients, jnp.uint32(xs))).astype(np.int64)
    c = np.asarray(coefficients).astype(object)
    expected = [[sum(int(c[i, k]) * x ** k for k in range(t)) % P for x in xs]
                for i in range(secrets_n)]
    np.testing.assert_array_equal(shares, expected)
    reconstruct = jax.jit(sa.shamir_reconstruct)
    wrong = 0
    for size in (t, t - 1):
        for subset in itertools.combinations(range(n), size):
            idx = np.array(subset + (0,) * (t - size))  # padded to t points, unused
            use = np.arange(t) < size
            got = np.asarray(reconstruct(jnp.uint32(xs[idx]), jnp.uint32(shares[:, idx]),
                                         jnp.asarray(use)))
            reference = [_lagrange_python(xs[list(subset)], shares[i, list(subset)])
                         for i in range(secrets_n)]
            np.testing.assert_array_equal(got, reference)
            if size == t:
                np.testing.assert_array_equal(got, secret)
            else:
                wrong += np.sum(got != secret)
    # t - 1 shares of a random polynomial interpolate to a uniform value: it equals the
    # secret with probability 1/p (35 subsets x 40 secrets: expected 0.02 matches)
    assert wrong >= math.comb(n, t - 1) * secrets_n - 2


M, SIZE, T_MAX = 8, 40, 6


@jax.jit
def _protocol_16(values, live, survived, key, threshold, shares_used):
    return sa.secure_sum_protocol(values, live, survived, key, threshold, T_MAX, 16,
                                  shares_used=shares_used)


def test_unmasked_sum_equals_the_integer_sum_bit_for_bit():
    rng = np.random.default_rng(2)
    live = np.arange(M) < 7  # the last slot is padding
    for trial, drop in enumerate([[], [1], [0, 4], [6, 2, 3]]):
        values = rng.integers(-(1 << 20), 1 << 20, (M, SIZE)).astype(np.int32)  # wraps mod 2^16
        survived = live.copy()
        survived[drop] = False
        total, enough = _protocol_16(values, live, survived, jax.random.key(trial), 4, 4)
        expected = np.sum(values[survived].astype(np.int64), axis=0) % (1 << 16)
        np.testing.assert_array_equal(np.asarray(total), expected)
        assert bool(enough)
        # the masks cancel only because the server's reconstructions are right: from one
        # share too few, the recovered seeds are wrong and the sum is garbage
        bad, _ = _protocol_16(values, live, survived, jax.random.key(trial), 4, 3)
        assert np.mean(np.asarray(bad) == expected) < 0.1


def test_a_masked_vector_is_uniform():
    """Chi-square goodness of fit of one client's masked vector (b = 4 bits: 16 bins) at
    significance 0.001, for a constant input, with and without pairwise masks."""
    bits, size, m = 4, 8000, 5
    secrets = sa.round_secrets(jax.random.key(3), m, 3, 3)
    x = jnp.full((size,), 5, jnp.uint32)
    critical = stats.chi2.ppf(0.999, df=15)
    masked = jax.jit(sa.masked_input, static_argnums=4)
    for u, live in [(0, np.ones(m, bool)), (3, np.ones(m, bool)), (2, np.eye(m, dtype=bool)[2])]:
        y = np.asarray(masked(x, u, secrets, jnp.asarray(live), bits))
        assert y.max() < 16
        counts = np.bincount(y, minlength=16)
        chi2 = np.sum((counts - size / 16) ** 2 / (size / 16))
        assert chi2 < critical, (u, chi2, critical)
    assert not np.array_equal(np.asarray(masked(x, 0, secrets, jnp.ones(m, bool), bits)),
                              np.asarray(masked(x, 1, secrets, jnp.ones(m, bool), bits)))


def test_stochastic_rounding_is_unbiased_with_the_claimed_variance():
    n, d, draws, scale, clip = 6, 50, 4000, 10.0, 1e3
    rng = np.random.default_rng(4)
    deltas = rng.normal(size=(n, d)).astype(np.float32)
    encode = sa.integer_encode(clip, scale)

    @jax.jit
    def summed(key):
        keys = jax.random.split(key, n)
        q = jax.vmap(lambda x, k: encode.client({"w": x}, (), k)[0]["w"])(deltas, keys)
        return jnp.sum(q, axis=0)

    sums = np.stack([np.asarray(s) for s in jax.lax.map(summed, jax.random.split(
        jax.random.key(5), draws))]) / scale  # [draws, d]
    scaled = deltas.astype(np.float64) * np.float32(scale)
    frac = scaled - np.floor(scaled)
    exact_var = np.sum(frac * (1 - frac), axis=0) / scale ** 2  # per coordinate
    assert np.all(exact_var <= n / 4 / scale ** 2)
    error = sums - np.sum(deltas.astype(np.float64), axis=0)
    # unbiased: every coordinate's mean error within 5 standard errors
    assert np.all(np.abs(error.mean(axis=0)) <= 5 * np.sqrt(exact_var / draws) + 1e-6)
    # variance as claimed (chi-square bounds on the sample variance, per coordinate)
    ratio = error.var(axis=0, ddof=1) / np.maximum(exact_var, 1e-12)
    live = exact_var > 0.01 / scale ** 2
    assert np.all(np.abs(ratio[live] - 1) < 6 * np.sqrt(2 / (draws - 1)))


def test_encoding_clips_and_bounds_the_integers():
    encode = sa.integer_encode(2.0, 100.0)
    big = {"a": jnp.full((3,), 10.0), "b": jnp.full((2, 2), -10.0)}
    q, report = jax.jit(encode.client)(big, (), jax.random.key(0))
    norm = float(np.sqrt(3 * 100 + 4 * 100))
    assert q["a"].dtype == jnp.int32 and q["b"].shape == (2, 2)
    flat = np.concatenate([np.asarray(q["a"]), np.asarray(q["b"]).ravel()])
    assert np.all(np.abs(flat) <= sa.value_bound(2.0, 100.0))
    np.testing.assert_allclose(np.linalg.norm(flat / 100.0), 2.0, atol=0.02)
    assert float(report["encode_clipped_fraction"]) == 1.0
    assert float(report["encode_update_norm"]) == pytest.approx(norm, rel=1e-6)


def _cohort(values, weights, live):
    return Cohort({"v": jnp.asarray(values)}, jnp.asarray(weights, jnp.float32),
                  jnp.asarray(live))


def test_dropouts_failed_rounds_and_overflow_through_the_part():
    """Coordinate 0 of client i holds 2^i, so the sum names the survivors; the others are
    large enough that some coordinates wrap at 16 bits."""
    m, t = 10, 6
    part = sa.secure_sum(16, dropout_rate=0.5, threshold=t, on_overflow="wrap")
    reduce = jax.jit(lambda c, k: part.reduce(c, (), k))
    rng = np.random.default_rng(6)
    values = rng.integers(-6000, 6000, (m, 12)).astype(np.int32)
    values[:, 0] = 1 << np.arange(m)
    live = np.ones(m, bool)
    outcomes = set()
    for seed in range(12):
        total, denominator, metrics = reduce(_cohort(values, np.ones(m), live),
                                             jax.random.key(seed))
        survivors = int(metrics["secagg_survivors"])
        assert survivors + int(metrics["secagg_dropped"]) == m
        failed = bool(metrics[ROUND_FAILED])
        assert failed == (survivors < t) == bool(metrics["secagg_too_few_survivors"])
        outcomes.add(failed)
        if failed:
            continue
        kept = np.array([(int(total["v"][0]) >> i) & 1 for i in range(m)], bool)
        assert kept.sum() == survivors == float(denominator)
        exact = np.sum(values[kept].astype(np.int64), axis=0)
        np.testing.assert_array_equal(np.asarray(total["v"]), _signed(exact, 16))
        wrapped = (exact >= 1 << 15) | (exact < -(1 << 15))
        assert int(metrics["secagg_overflow_coordinates"]) == wrapped.sum()
        assert float(metrics["secagg_server_prg_expansions"]) == survivors * (1 + m - survivors)
        assert float(metrics["secagg_server_reconstructions"]) == m
    assert outcomes == {True, False}  # both kinds of round occurred


def test_an_overflowing_round_fails_and_weights_are_capped():
    part = sa.secure_sum(8, max_weight=3, on_overflow="fail")
    reduce = jax.jit(lambda c, k: part.reduce(c, (), k))
    values = np.array([[10, -10, 1], [10, -10, 1], [10, -10, 1], [0, 0, 1]], np.int32)
    weights = np.array([2.0, 5.0, 1.0, 0.0])  # capped at 3; the last slot is padding
    live = np.array([True, True, True, False])
    total, denominator, metrics = reduce(_cohort(values, weights, live), jax.random.key(0))
    # 2·10 + 3·10 + 1·10 = 60 fits in 8 bits (< 128); the weights sum to 6
    np.testing.assert_array_equal(np.asarray(total["v"]), [60, -60, 6])
    assert float(denominator) == 6 and int(metrics["secagg_capped_weights"]) == 1
    assert not bool(metrics[ROUND_FAILED])
    total, _, metrics = reduce(_cohort(values * 3, weights, live), jax.random.key(0))
    # 180 leaves [-128, 128): two coordinates wrap, and the round fails instead of applying them
    assert int(metrics["secagg_overflow_coordinates"]) == 2 and bool(metrics[ROUND_FAILED])
    np.testing.assert_array_equal(np.asarray(total["v"])[:2], _signed([180, -180], 8))


def test_wrapped_coordinates_are_exact_at_the_range_edges():
    for bits in (8, 16, 17, 24, 32):
        half = 1 << (bits - 1)
        wanted = np.array([half - 1, half, -half, -half - 1, 3 * half, -5 * half, 0], np.int64)
        # each sum split over three clients, every value within int32
        values = np.stack([wanted // 3, wanted // 3, wanted - 2 * (wanted // 3)])
        values = np.clip(values, -(1 << 31), (1 << 31) - 1).astype(np.int32)
        exact = values.astype(np.int64).sum(axis=0)
        got = np.asarray(sa.wrapped_coordinates(jnp.asarray(values), jnp.ones(3, bool), bits))
        np.testing.assert_array_equal(got, (exact >= half) | (exact < -half), err_msg=str(bits))


def test_overflow_known_before_running_is_a_user_error():
    with pytest.raises(UserError, match="raise modulus_bits to 15, lower scale to at most 203"):
        sa.secure_aggregation(1.0, cohort_size=10, modulus_bits=12, scale=1000.0)
    # accepted with on_overflow='fail'; the default scale always fits
    sa.secure_aggregation(1.0, cohort_size=10, modulus_bits=12, scale=1000.0, on_overflow="fail")
    s = sa.default_scale(1.0, 12, 10)
    assert 10 * sa.value_bound(1.0, s) <= 2 ** 11 - 1 < 10 * (sa.value_bound(1.0, s) + 2)
    # a round with more slots than the scale was chosen for is refused when it compiles
    part = sa.secure_aggregation(1.0, cohort_size=5, modulus_bits=12)
    cohort = _cohort(np.zeros((10, 3), np.int32), np.ones(10), np.ones(10, bool))
    with pytest.raises(UserError, match="pass cohort_size=10"):
        jax.eval_shape(lambda c: part.reduce(c, ((), ()), jax.random.key(0)), cohort)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "needs cohort_size"),
    (dict(cohort_size=10, modulus_bits=40), "modulus_bits must be an integer in \\[2, 32\\]"),
    (dict(cohort_size=10, dropout_rate=1.0), "dropout_rate must be a probability"),
    (dict(cohort_size=10, threshold=0), "threshold"),
    (dict(cohort_size=10, on_overflow="ignore"), "on_overflow must be"),
    (dict(cohort_size=10, max_weight=0), "max_weight must be an integer >= 1"),
    (dict(cohort_size=1000, modulus_bits=8), "raise modulus_bits to at least"),
    (dict(scale=2.0 ** 31), "leaves no room in int32"),
])
def test_bad_arguments_name_the_fix(kwargs, match):
    with pytest.raises(UserError, match=match):
        sa.secure_aggregation(1.0, **kwargs)


def test_float_updates_and_oversized_thresholds_are_refused_when_the_round_compiles():
    cohort = _cohort(np.zeros((4, 3), np.float32), np.ones(4), np.ones(4, bool))
    with pytest.raises(UserError, match="integer_encode"):
        jax.eval_shape(lambda c: sa.secure_sum(16).reduce(c, (), jax.random.key(0)), cohort)
    ints = _cohort(np.zeros((4, 3), np.int32), np.ones(4), np.ones(4, bool))
    with pytest.raises(UserError, match="threshold=5 exceeds the round's 4 cohort slots"):
        jax.eval_shape(lambda c: sa.secure_sum(16, threshold=5).reduce(c, (), jax.random.key(0)),
                       ints)


def test_uplink_counts_the_masked_vector_keys_and_shares():
    n, d, bits = 10, 650, 20
    message = sa.secure_aggregation(1.0, cohort_size=n, modulus_bits=bits).uplink(Message(d, 32), n)
    # d values and the weight at b bits; one public key, 2(n-1) shares, then n-1 shares
    assert message.bits == (d + 1) * bits + 64 * (1 + 2 * (n - 1) + (n - 1))
    assert message.bytes == math.ceil(message.bits / 8)


# -- through simulate ----------------------------------------------------------------------
FEATURES, CLASSES, SIZES = 5, 3, [3, 6, 4, 8, 5, 7]
ENTRIES = FEATURES * CLASSES + CLASSES  # the logistic regression's kernel and bias


def _toy_run(aggregator, rounds, **kw):
    x, y, offsets = toy_clients(SIZES, FEATURES, CLASSES, seed=3)
    data = FederatedData({"x": x, "y": y}, offsets, tuple(f"c{i}" for i in range(len(SIZES))))
    model = logistic_regression((FEATURES,), CLASSES)
    alg = fs.algorithms.fedavg(optax.sgd(0.3), local_epochs=None, local_steps=2,
                               batch_size=None, weighting="uniform")
    return model, fs.simulate(model, alg, data, rounds=rounds, clients_per_round=len(SIZES),
                              aggregator=aggregator, eval_every=100, progress=False, **kw), data


def _numpy_fedavg(data, model, rounds):
    """FedAvg (uniform weights, every client, 2 full-batch steps of lr 0.3) in numpy."""
    params, _ = model.init(jax.random.fold_in(jax.random.key(0), fs.simulation.INIT_STREAM))
    clients = [(data.features["x"][lo:hi], data.features["y"][lo:hi])
               for lo, hi in zip(data.offsets[:-1], data.offsets[1:])]
    return full_batch_fedavg([params["dense"][k] for k in ("kernel", "bias")], clients,
                             rounds, 0.3, 2)


def test_simulate_without_dropouts_is_fedavg_up_to_the_quantization():
    n = len(SIZES)
    secure = sa.secure_aggregation(100.0, cohort_size=n)  # no update is clipped
    model, result, data = _toy_run(secure, 3)
    expected = _numpy_fedavg(data, model, 3)
    # a round's mean is off by less than 1/s per coordinate (each client's rounding is):
    # three rounds, plus float32 rounding
    step = 1 / sa.default_scale(100.0, 32, n)
    got = [result.params["dense"]["kernel"], result.params["dense"]["bias"]]
    for got, want in zip(got, expected):
        np.testing.assert_allclose(np.asarray(got), want, atol=3 * step + 2e-6)
    row = result.history[-1]
    assert row["secagg_survivors"] == n and row["secagg_dropped"] == 0 and row[ROUND_FAILED] == 0
    expected_bits = (ENTRIES + 1) * 32 + sa.SECRET_BITS * (3 * n - 2)
    assert row["uplink_bytes_per_client"] == math.ceil(expected_bits / 8)
    assert row["secagg_uplink_bytes"] == n * expected_bits / 8
    assert row["uplink_bytes_per_client"] > 4 * ENTRIES  # more than the float32 update


@pytest.mark.slow  # the engine's handling of failed rounds: test_aggregator_contract.py
def test_simulate_rounds_without_enough_survivors_fail_and_warn():
    n, t = len(SIZES), 5
    secure = sa.secure_aggregation(100.0, cohort_size=n, dropout_rate=0.4, threshold=t)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, result, _ = _toy_run(secure, 6)
    failed = [r["round"] for r in result.history if r[ROUND_FAILED]]
    assert failed == [r["round"] for r in result.history if r["secagg_survivors"] < t]
    assert 0 < len(failed) < 6  # P(fewer than 5 of 6 survive) = 0.77: both kinds occur here
    assert sum("failed in aggregation" in str(w.message) for w in caught) == len(failed)
    for r in result.history:
        assert r["secagg_survivors"] + r["secagg_dropped"] == n
        work = r["secagg_survivors"] * (1 + r["secagg_dropped"])
        assert r["secagg_server_prg_expansions"] == (0 if r[ROUND_FAILED] else work)


@pytest.mark.slow
def test_digits_fedavg_with_secure_aggregation_and_dropouts_trains_like_plain_fedavg():
    train, test = fs.data.load_digits()
    clients = fs.data.partition(train, train["y"], "dirichlet", 50, seed=0, alpha=0.5)
    model = fs.models.logistic_regression((8, 8, 1), 10)
    alg = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=10, weighting="uniform")
    kw = dict(rounds=40, clients_per_round=10, eval_data=test, eval_every=40, progress=False)
    plain = fs.simulate(model, alg, clients, **kw)
    secure = fs.simulate(model, alg, clients, aggregator=sa.secure_aggregation(
        10.0, cohort_size=10, modulus_bits=24, dropout_rate=0.1), **kw)
    accuracy = [r.summary["final"]["test_accuracy"] for r in (plain, secure)]
    assert accuracy[1] >= 0.8 and abs(accuracy[0] - accuracy[1]) <= 0.03, accuracy
    dropped = sum(r["secagg_dropped"] for r in secure.history)
    assert 0.05 * 400 <= dropped <= 0.15 * 400  # 10% of 40 x 10 clients
    for r in secure.history:
        assert r["secagg_server_reconstructions"] == 10 and r["secagg_overflow_coordinates"] == 0
        assert r["secagg_uplink_bytes"] > 0 and r["secagg_client_prg_expansions"] == 10
