"""Differential privacy against independent references: numpy clipping, the noise std the
mechanism claims, a plain loop over examples for DP-SGD, binomial statistics for Poisson
sampling, the quantile adaptive clipping should find, and dp_accounting for ε."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import fedjax_sim as fs
from fedjax_sim.aggregators import dp as dp_parts
from fedjax_sim.algorithms import Problem
from fedjax_sim.data import FederatedData
from fedjax_sim.engine import client_batches, make_schedule
from fedjax_sim.engine.batching import poisson_sample
from fedjax_sim.models import classification, get_model, logistic_regression
from fedjax_sim.privacy import (Accountant, AdaptiveClipping, ClientLevelDP, ExampleLevelDP,
                                SampledGaussian)
from fedjax_sim.privacy.dp_sgd import ExampleNoise, private_gradient
from fedjax_sim.simulation.private import PrivatePlan

from helpers import toy_clients


def _toy(sizes, features=6, classes=3, seed=0):
    """Clients of the given sizes with linearly separable-ish labels."""
    x, y, offsets = toy_clients(sizes, features, classes, seed)
    return FederatedData({"x": x, "y": y}, offsets, tuple(f"c{i}" for i in range(len(sizes))))


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])


# -- clipping ---------------------------------------------------------------------------
def test_clip_bounds_norms_and_leaves_small_updates_unchanged():
    rng = np.random.default_rng(0)
    clip = fs.aggregators.clip(1.5)
    for scale in (0.1, 0.5, 1.0, 3.0):
        delta = {"a": rng.normal(size=(4, 5)).astype(np.float32) * scale,
                 "b": rng.normal(size=(7,)).astype(np.float32) * scale}
        out, report = clip.client(jax.tree_util.tree_map(jnp.asarray, delta), clip.init(None),
                                  jax.random.key(0))
        norm = np.linalg.norm(_flat(delta))
        expected = min(1.0, 1.5 / norm)  # numpy reference: one flat L2 norm over all leaves
        np.testing.assert_allclose(_flat(out), _flat(delta) * expected, rtol=1e-6)
        assert np.linalg.norm(_flat(out)) <= 1.5 * (1 + 1e-6)
        if norm <= 1.5:
            np.testing.assert_array_equal(_flat(out), _flat(delta))  # unchanged, bit for bit
        assert float(report["dp_clipped_fraction"]) == float(norm > 1.5)
        np.testing.assert_allclose(float(report["dp_update_norm"]), norm, rtol=1e-6)
    zero, _ = clip.client({"a": jnp.zeros(3)}, clip.init(None), jax.random.key(0))
    np.testing.assert_array_equal(zero["a"], 0.0)


# -- the noise the mechanism claims -----------------------------------------------------
def _zero_update_run(privacy, num_clients=40, clients_per_round=8, rounds=1):
    """A run whose clients send exactly zero updates (client learning rate 0), so the
    global model moves by the noise alone: aggregate = params_0 - params_1."""
    data = _toy([5] * num_clients, features=64, classes=10)
    model = get_model("mlp", (64,), 10, hidden=[128])  # 9,610 coordinates
    alg = fs.algorithms.fedavg(optax.sgd(0.0), local_steps=1, batch_size=5, weighting="uniform")
    p0, _ = model.init(jax.random.fold_in(jax.random.key(3), 0x1A17))
    result = fs.simulate(model, alg, data, rounds=rounds, clients_per_round=clients_per_round,
                         seed=3, progress=False, privacy=privacy)
    return _flat(p0) - _flat(result.params), result


@pytest.mark.parametrize("sampling,noise_cohort", [("fixed", None), ("poisson", None),
                                                   ("poisson", 1000)])
def test_gaussian_noise_has_the_claimed_std(sampling, noise_cohort):
    z, c, m = 1.3, 0.7, 8
    privacy = ClientLevelDP(z, 1e-4, clip_norm=c, sampling=sampling, noise_cohort_size=noise_cohort)
    aggregate, result = _zero_update_run(privacy, clients_per_round=m)
    # The denominator is the expected cohort (m), never the realised Poisson count; with a
    # noise cohort M the aggregate's noise is that of M clients.
    expected = z * c / (noise_cohort or m)
    assert abs(aggregate.std() / expected - 1) < 0.02
    assert abs(aggregate.mean()) < 4 * expected / math.sqrt(aggregate.size)
    np.testing.assert_allclose(result.history[0]["dp_noise_std"], expected, rtol=1e-6)
    assert result.history[0]["dp_clip_norm"] == pytest.approx(c)
    assert result.history[0]["dp_clipped_fraction"] == 0.0  # zero updates are never clipped


# -- Poisson sampling -------------------------------------------------------------------
def test_poisson_sample_is_binomial_and_truncates_to_a_uniform_subset():
    n, q, trials = 60, 0.25, 4000
    bits = jax.random.bits(jax.random.key(0), (trials, n), jnp.uint32)
    slots, mask = jax.vmap(lambda b: poisson_sample(b, q, jnp.int32(n), n))(bits)
    sizes = np.asarray(mask).sum(axis=1)
    # size ~ Binomial(n, q): mean and variance within 5 standard errors
    assert abs(sizes.mean() - n * q) < 5 * math.sqrt(n * q * (1 - q) / trials)
    assert abs(sizes.var() / (n * q * (1 - q)) - 1) < 0.12
    chosen = np.zeros(n)
    np.add.at(chosen, np.asarray(slots)[np.asarray(mask)], 1)
    assert np.all(np.abs(chosen / trials - q) < 5 * math.sqrt(q * (1 - q) / trials))
    # Only slots < valid count join.
    slots7, mask7 = poisson_sample(bits[0], 0.9, jnp.int32(7), n)
    assert set(np.asarray(slots7)[np.asarray(mask7)]) <= set(range(7))
    # Capped at 10: the kept ones are a uniformly random subset of those that joined.
    cap = 10
    kept = np.zeros(n)
    slots_c, mask_c = jax.vmap(lambda b: poisson_sample(b, 0.5, jnp.int32(n), cap))(bits)
    slots_c, mask_c = np.asarray(slots_c), np.asarray(mask_c)
    assert slots_c.shape == (trials, cap) and mask_c.all()  # 30 join on average, 10 kept
    np.add.at(kept, slots_c.ravel(), 1)
    p = cap / n
    assert np.all(np.abs(kept / trials - p) < 5 * math.sqrt(p * (1 - p) / trials))
    for row, joined in zip(slots_c[:50], np.asarray(bits[:50]) < int(0.5 * 2 ** 32)):
        assert joined[row].all() and len(set(row)) == cap


def test_poisson_client_sampling_in_rounds():
    data = _toy([4] * 50)
    model = logistic_regression((6,), 3)
    alg = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=4, weighting="uniform")
    privacy = ClientLevelDP(0.0, 1e-4, clip_norm=10.0)
    result = fs.simulate(model, alg, data, rounds=200, clients_per_round=10, seed=0,
                         progress=False, privacy=privacy, eval_every=200)
    sizes = np.array([h["cohort_size"] for h in result.history])
    q = 10 / 50
    assert abs(sizes.mean() - 10) < 5 * math.sqrt(50 * q * (1 - q) / 200)
    assert sizes.min() < 10 < sizes.max()  # the cohort size varies
    assert all(h["cohort_examples"] == 4 * s for h, s in zip(result.history, sizes))
    assert result.summary["privacy"]["cohort_slots"] < 50
    assert result.history[-1]["epsilon"] == math.inf  # z = 0: no privacy


def test_dp_round_without_noise_equals_clipped_mean_of_the_same_clients():
    """z = 0 and every client sampled: DP-FedAvg = sum of clipped updates / m, which with a
    clip no update reaches equals plain FedAvg with uniform weights."""
    data = _toy([6, 9, 4, 7])
    model = logistic_regression((6,), 3)
    alg = fs.algorithms.fedavg(optax.sgd(0.3), batch_size=3, weighting="uniform")
    kwargs = dict(rounds=3, clients_per_round=4, seed=1, progress=False)
    plain = fs.simulate(model, alg, data, **kwargs)
    private = fs.simulate(model, alg, data, privacy=ClientLevelDP(0.0, 1e-4, clip_norm=1e3,
                                                                  sampling="fixed"), **kwargs)
    np.testing.assert_allclose(_flat(private.params), _flat(plain.params), rtol=1e-5, atol=1e-6)
    # With a clip every update exceeds, each update is scaled to norm C: one round of
    # clip 1e-3 moves the model by at most C (the mean of vectors of norm C).
    tight = fs.simulate(model, alg, data, privacy=ClientLevelDP(0.0, 1e-4, clip_norm=1e-3,
                                                                sampling="fixed"),
                        **{**kwargs, "rounds": 1})
    p0, _ = model.init(jax.random.fold_in(jax.random.key(1), 0x1A17))
    assert np.linalg.norm(_flat(p0) - _flat(tight.params)) <= 1e-3 * (1 + 1e-5)
    assert tight.history[0]["dp_clipped_fraction"] == 1.0


# -- adaptive clipping ------------------------------------------------------------------
@pytest.mark.parametrize("quantile", [0.5, 0.8])
def test_adaptive_clip_converges_to_the_target_quantile(quantile):
    m, dim, rounds = 100, 3, 400
    part = dp_parts.adaptive_clip(expected_clients=m, initial_clip_norm=0.1,
                                  target_quantile=quantile)
    state = part.init(None)

    def one_round(state, key):
        k_norm, k_dir, k_noise = jax.random.split(key, 3)
        norms = jax.random.exponential(k_norm, (m,))  # update norms ~ Exp(1)
        dirs = jax.random.normal(k_dir, (m, dim))
        deltas = dirs / jnp.linalg.norm(dirs, axis=1, keepdims=True) * norms[:, None]
        _, reports = jax.vmap(lambda d: part.client({"w": d}, state, k_noise))(deltas)
        sums = {k: jnp.sum(v) for k, v in reports.items()}
        _, _, state, metrics = part.finalize({"w": jnp.zeros(dim)}, 0.0,
                                             {**sums, "clients": jnp.float32(m)}, state, k_noise)
        return state, metrics["dp_clip_norm"]

    _, clips = jax.lax.scan(one_round, state, jax.random.split(jax.random.key(0), rounds))
    settled = float(np.mean(np.asarray(clips)[-100:]))
    truth = -math.log(1 - quantile)  # the quantile of Exp(1)
    assert abs(settled / truth - 1) < 0.1, (settled, truth)


def test_noise_multiplier_split_for_adaptive_clipping():
    # z = 1, 20 expected clients: σ_b = 1, count multiplier 2σ_b = 2
    z_update = dp_parts.split_noise_multiplier(1.0, 1.0)
    assert z_update == pytest.approx((1 - 0.25) ** -0.5)
    assert z_update ** -2 + 2.0 ** -2 == pytest.approx(1.0)  # the two queries compose to z
    with pytest.raises(fs.UserError, match="count_stddev"):
        dp_parts.split_noise_multiplier(3.0, 1.0)
    with pytest.raises(fs.UserError, match="count_stddev"):
        PrivatePlan(
            ClientLevelDP(3.0, 1e-5, adaptive_clipping=AdaptiveClipping()),
            algorithm=fs.algorithms.fedavg(optax.sgd(0.1), weighting="uniform"), aggregator=None,
            num_clients=1000, clients_per_round=20, max_client_size=10, rounds=10)


# -- DP-SGD -----------------------------------------------------------------------------
def _problem_and_batch(batch_size=7, seed=0):
    model = get_model("mlp", (5,), 4, hidden=[8])
    params, state = model.init(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    batch = {"x": rng.normal(size=(batch_size, 5)).astype(np.float32) * 3,
             "y": rng.integers(0, 4, size=batch_size).astype(np.int32)}
    return Problem(model, classification(), state, "x"), params, batch


def test_dp_sgd_per_example_clipping_equals_a_loop_over_examples():
    problem, params, batch = _problem_and_batch()
    mask = np.array([1, 1, 0, 1, 1, 1, 0], bool)
    clip, q, n = 0.5, 0.25, 20
    grads, sums = jax.jit(lambda p, b, m: private_gradient(
        problem.loss, ExampleNoise(clip, 0.0, q), p, b, m, jax.random.key(1), jnp.int32(n)))(
        params, batch, jnp.asarray(mask))
    # Reference: one example at a time, numpy clipping, sum, / (q n).
    total = np.zeros_like(_flat(params))
    clipped = 0
    grad_one = jax.jit(jax.grad(lambda p, one: problem.loss(p, one, jnp.ones(1, bool),
                                                            jax.random.key(0))[0]))
    for j in np.flatnonzero(mask):
        g = _flat(grad_one(params, {k: v[j:j + 1] for k, v in batch.items()}))
        norm = np.linalg.norm(g)
        clipped += norm > clip
        total += g * min(1.0, clip / norm)
    np.testing.assert_allclose(_flat(grads), total / (q * n), atol=1e-5)
    assert float(sums["dp_clipped_fraction"]) == clipped and clipped > 0
    assert float(sums["count"]) == mask.sum()
    # In chunks over the leading real examples (sampled first, as Poisson batches are),
    # with noise: the same as the whole batch at once.
    order = np.argsort(~mask, kind="stable")
    batch, mask = {k: v[order] for k, v in batch.items()}, mask[order]
    results = [jax.jit(lambda p, b, m, c=chunk: private_gradient(
        problem.loss, ExampleNoise(clip, 1.3, q, chunk=c), p, b, m, jax.random.key(4),
        jnp.int32(n)))(params, batch, jnp.asarray(mask)) for chunk in (None, 2, 3)]
    for grads_c, sums_c in results[1:]:
        np.testing.assert_allclose(_flat(grads_c), _flat(results[0][0]), atol=1e-6)
        assert float(sums_c["loss"]) == pytest.approx(float(results[0][1]["loss"]), rel=1e-6)
        assert float(sums_c["dp_clipped_fraction"]) == clipped


def test_dp_sgd_noise_has_the_claimed_std():
    problem, params, batch = _problem_and_batch(batch_size=3)
    model = get_model("mlp", (5,), 4, hidden=[2000])  # 20,004 coordinates
    params, _ = model.init(jax.random.key(0))
    problem = problem._replace(model=model)
    sigma, clip, q, n = 1.7, 0.3, 0.1, 50
    empty = jnp.zeros(3, bool)  # no example: the gradient is the noise alone
    grads, _ = jax.jit(lambda p: private_gradient(
        problem.loss, ExampleNoise(clip, sigma, q), p, batch, empty, jax.random.key(5),
        jnp.int32(n)))(params)
    flat = _flat(grads)
    assert abs(flat.std() / (sigma * clip / (q * n)) - 1) < 0.02


def test_poisson_schedule_batches():
    schedule = make_schedule(40, batch_size=40, local_epochs=2, local_steps=None, sampling_rate=0.1)
    assert schedule.num_steps == 20  # ceil(E / q)
    n = 30
    bits = jax.random.bits(jax.random.key(2), (schedule.num_steps * 40,), jnp.uint32)
    idx, mask = map(np.asarray, client_batches(schedule, bits, jnp.int32(n), 40))
    assert idx.shape == mask.shape == (20, 40)
    assert (idx[mask] < n).all()
    assert abs(mask.sum() / 20 - 0.1 * n) < 5 * math.sqrt(n * 0.09 / 20)


def test_dp_sgd_run_reports_example_level_epsilon_and_stops_at_the_target():
    data = _toy([30, 20, 25, 40, 10, 35])
    model = logistic_regression((6,), 3)
    alg = fs.algorithms.fedavg(optax.sgd(0.5), local_steps=5)
    privacy = ExampleLevelDP(clip_norm=1.0, noise_multiplier=1.0, sampling_rate=0.2, delta=1e-5,
                             target_epsilon=8.0, max_batch_size=40)
    with pytest.warns(UserWarning, match="stopped after round"):
        result = fs.simulate(model, alg, data, rounds=40, clients_per_round=3, seed=0,
                             progress=False, privacy=privacy, eval_every=40)
    done = len(result.history)
    assert 1 <= done < 40 and "stopped" in result.summary
    # Reference: the participation counts from the cohorts, dp_accounting's RDP for the
    # busiest client's steps (cap 40 = the largest client: the slack is ~1e-29).
    counts = np.zeros(6, int)
    program_cohorts = _cohorts(data, alg, privacy, 3, done)
    import dp_accounting
    for r, cohort in enumerate(program_cohorts):
        counts[cohort] += 1
        acc = dp_accounting.rdp.RdpAccountant()
        acc.compose(dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.0)),
            int(counts.max()) * 5))
        assert result.history[r]["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    assert result.history[-1]["epsilon"] <= 8.0
    # Stopping was needed: one more participation of the busiest client exceeds the target.
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.2, dp_accounting.GaussianDpEvent(1.0)),
        (int(counts.max()) + 1) * 5))
    assert acc.get_epsilon(1e-5) > 8.0
    assert 0 <= result.history[-1]["train_dp_clipped_fraction"] <= 1


def _cohorts(data, alg, privacy, clients_per_round, rounds):
    """The rounds' cohorts as a plain draw: fixed-size sampling without replacement."""
    from fedjax_sim.engine.round import split_round_key
    root = jax.random.key(0)
    return [np.asarray(jax.random.choice(split_round_key(root, r)[0], data.num_clients,
                                         (clients_per_round,), replace=False))
            for r in range(rounds)]


# -- accounting in runs and bad input ---------------------------------------------------
def test_client_level_epsilon_per_round_and_target_stop():
    data = _toy([4] * 200)
    model = logistic_regression((6,), 3)
    alg = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=4, weighting="uniform")
    privacy = ClientLevelDP(1.1, 1e-5, clip_norm=1.0, target_epsilon=2.0)
    with pytest.warns(UserWarning, match="stopped after round"):
        result = fs.simulate(model, alg, data, rounds=500, clients_per_round=4, seed=0,
                             progress=False, privacy=privacy, eval_every=100,
                             eval_data=dict(data.features))
    done = len(result.history)
    slots = result.summary["privacy"]["cohort_slots"]
    reference = Accountant(SampledGaussian(1.1, "poisson", 200, sampling_rate=0.02,
                                           max_sample_size=slots), delta=1e-5)
    eps = [h["epsilon"] for h in result.history]
    assert eps == sorted(eps) and eps[-1] <= 2.0
    for r in (0, done // 2, done - 1):
        assert eps[r] == pytest.approx(reference.epsilon(r + 1), rel=1e-6)
    assert reference.epsilon(done + 1) > 2.0  # the next round would have exceeded it
    assert "test_accuracy" in result.history[-1]  # the last round before the stop is evaluated
    assert result.summary["privacy"]["epsilon"] == pytest.approx(eps[-1])


def test_bad_privacy_input_gives_clear_errors():
    with pytest.raises(fs.UserError, match="clip_norm"):
        ClientLevelDP(1.0, 1e-5, clip_norm=0.0)
    with pytest.raises(fs.UserError, match="noise_multiplier"):
        ClientLevelDP(-0.1, 1e-5, clip_norm=1.0)
    with pytest.raises(fs.UserError, match="sampling_rate"):
        ExampleLevelDP(1.0, 1.0, 1.5, 1e-5)
    with pytest.raises(fs.UserError, match="sampling_rate"):
        ExampleLevelDP(1.0, 1.0, 0.0, 1e-5)
    with pytest.raises(fs.UserError, match="delta"):
        ClientLevelDP(1.0, 0.0, clip_norm=1.0)
    with pytest.raises(fs.UserError, match="PLD"):
        ClientLevelDP(1.0, 1e-5, clip_norm=1.0, sampling="fixed", accountant="pld")
    data = _toy([4] * 20)
    model = logistic_regression((6,), 3)
    weighted = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=4)
    with pytest.raises(fs.UserError, match="weighting='uniform'"):
        fs.simulate(model, weighted, data, rounds=1, clients_per_round=4, progress=False,
                    privacy=ClientLevelDP(1.0, 1e-3, clip_norm=1.0))
    uniform = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=4, weighting="uniform")
    with pytest.raises(fs.UserError, match="reduces the cohort itself"):
        fs.simulate(model, uniform, data, rounds=1, clients_per_round=4, progress=False,
                    aggregator=fs.aggregators.secure_aggregation(1.0, cohort_size=4),
                    privacy=ClientLevelDP(1.0, 1e-3, clip_norm=1.0))
    with pytest.raises(fs.UserError, match="already exceeded by one round"):
        fs.simulate(model, uniform, data, rounds=5, clients_per_round=4, progress=False,
                    privacy=ClientLevelDP(0.5, 1e-3, clip_norm=1.0, target_epsilon=0.1))
    with pytest.warns(UserWarning, match="1/N"):
        PrivatePlan(ClientLevelDP(1.0, 0.1, clip_norm=1.0), algorithm=uniform, aggregator=None,
                    num_clients=20, clients_per_round=4, max_client_size=4, rounds=5)
    with pytest.raises(fs.UserError, match="too small"):
        fs.simulate(model, uniform, data, rounds=5, clients_per_round=4, progress=False,
                    privacy=ClientLevelDP(1.0, 1e-3, clip_norm=1.0, max_cohort_size=5))


def test_poisson_rounds_do_not_depend_on_chunking():
    """A Poisson cohort runs only the chunks holding its real clients; the result equals
    running every slot (one client at a time vs chunks of a quarter cohort)."""
    data = _toy([5, 8, 3, 6, 7, 4, 9, 5, 6, 2, 8, 4] * 3)
    model = logistic_regression((6,), 3)
    alg = fs.algorithms.fedavg(optax.sgd(0.2), batch_size=3, weighting="uniform")
    privacy = ClientLevelDP(0.7, 1e-3, clip_norm=0.5)
    runs = [fs.simulate(model, alg, data, rounds=4, clients_per_round=4, seed=2, progress=False,
                        privacy=privacy, engine=fs.EngineOptions(clients_per_chunk=chunk))
            for chunk in (None, 1)]
    assert [h["cohort_size"] for h in runs[0].history] == [h["cohort_size"] for h in runs[1].history]
    np.testing.assert_allclose(_flat(runs[0].params), _flat(runs[1].params), rtol=1e-5, atol=1e-6)
    for a, b in zip(runs[0].history, runs[1].history):
        assert a["dp_clipped_fraction"] == pytest.approx(b["dp_clipped_fraction"])
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
