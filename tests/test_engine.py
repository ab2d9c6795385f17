"""The engine against independent references: numpy SGD loops, numpy means, plain optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.data import FederatedData
from fedjax_sim.engine import client_batches, make_schedule, map_clients
from fedjax_sim.engine.batching import bits_needed
from fedjax_sim.engine.local import LocalData
from fedjax_sim.engine.round import client_randomness, split_round_key
from fedjax_sim.algorithms import Problem
from fedjax_sim.models import classification, logistic_regression

from helpers import logreg_sgd, toy_clients


def _toy(sizes, features=6, classes=3, seed=0):
    """Clients of the given sizes with linearly separable-ish labels."""
    x, y, offsets = toy_clients(sizes, features, classes, seed)
    return FederatedData({"x": x, "y": y}, offsets, tuple(f"c{i}" for i in range(len(sizes))))


def _reference_round(data, params, algorithm, schedule, root, r, m, lr):
    """One FedAvg round as a plain loop: same cohort and batch indices, numpy SGD on the
    real examples only, numpy weighted mean."""
    k_sample, k_clients, _ = split_round_key(root, r)
    cohort = np.asarray(jax.random.choice(k_sample, data.num_clients, (m,), replace=False))
    kernel = np.asarray(params["dense"]["kernel"], np.float64)
    bias = np.asarray(params["dense"]["bias"], np.float64)
    x, y = data.features["x"], data.features["y"]
    new_k, new_b, weights = [], [], []
    for cid in cohort:
        n = int(data.client_sizes[cid])
        _, _, bits = client_randomness(k_clients, jnp.int32(cid),
                                       bits_needed(schedule, data.max_client_size))
        idx, mask = map(np.asarray, client_batches(schedule, bits, jnp.int32(n),
                                                   data.max_client_size))
        off = data.offsets[cid]
        batches = [off + idx[s][mask[s]] for s in range(len(idx)) if mask[s].any()]
        k, b = logreg_sgd(kernel, bias, x, y, batches, lr)
        new_k.append(k)
        new_b.append(b)
        weights.append(n if algorithm.weighting == "num_examples" else 1)
    w = np.asarray(weights, np.float64)[:, None, None]
    return (np.sum(w * np.stack(new_k), 0) / w.sum(),
            np.sum(w[:, :, 0] * np.stack(new_b), 0) / w.sum())


@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
@pytest.mark.parametrize("mode", [dict(local_epochs=2), dict(local_steps=4)])
def test_vmapped_round_equals_plain_loop(weighting, mode):
    # Very different client sizes (3 .. 40): padded steps/examples must be exact no-ops.
    data = _toy([3, 40, 7, 12, 1, 25])
    lr = 0.3
    alg = fs.algorithms.fedavg(optax.sgd(lr), batch_size=5, weighting=weighting, **mode)
    model = logistic_regression((6,), 3)
    result = fs.simulate(model, alg, data, rounds=1, clients_per_round=4, seed=3,
                         progress=False)
    root = jax.random.key(3)
    params0, _ = model.init(jax.random.fold_in(root, 0x1A17))
    schedule = make_schedule(data.max_client_size, batch_size=5,
                             local_epochs=mode.get("local_epochs"),
                             local_steps=mode.get("local_steps"))
    ref_k, ref_b = _reference_round(data, params0, alg, schedule, root, 0, 4, lr)
    np.testing.assert_allclose(result.params["dense"]["kernel"], ref_k, atol=1e-5)
    np.testing.assert_allclose(result.params["dense"]["bias"], ref_b, atol=1e-5)


def test_strategies_agree_chunked_mapped_vmapped_scanned_unrolled():
    data = _toy([5, 9, 13, 2, 8, 30, 4, 11, 6, 17])
    alg = fs.algorithms.fedavg(optax.sgd(0.2), local_epochs=2, batch_size=4)
    model = fs.models.mlp((6,), 3, hidden=(8,))
    runs = {}
    for name, opts in {
        "vmap_unrolled": fs.EngineOptions(None, True, 3),
        "vmap_scan": fs.EngineOptions(None, 1, 3),
        "chunk3": fs.EngineOptions(3, 2, 1),
        "map": fs.EngineOptions(1, 1, 2),
    }.items():
        res = fs.simulate(model, alg, data, rounds=5, clients_per_round=7, seed=1,
                          engine=opts, progress=False)
        runs[name] = res
    ref = runs["vmap_unrolled"]
    for name, res in runs.items():
        for a, b in zip(jax.tree_util.tree_leaves(ref.params), jax.tree_util.tree_leaves(res.params)):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
        np.testing.assert_allclose([h["train_loss"] for h in ref.history],
                                   [h["train_loss"] for h in res.history], rtol=1e-5, err_msg=name)


def test_map_clients_sum_equals_numpy_weighted_sum():
    rng = np.random.default_rng(0)
    deltas = rng.normal(size=(11, 4, 3)).astype(np.float32)
    weights = rng.uniform(1, 50, size=11).astype(np.float32)

    def fn_j(i):
        return jnp.asarray(weights)[i], jnp.asarray(deltas)[i], {"i": i}

    expected = np.einsum("c,cij->ij", weights.astype(np.float64), deltas.astype(np.float64))
    for chunk in (None, 1, 4, 11):
        total, wsum, out = jax.jit(lambda ids: map_clients(fn_j, ids, chunk))(jnp.arange(11))
        np.testing.assert_allclose(total, expected, rtol=1e-5)
        np.testing.assert_allclose(wsum, weights.sum(), rtol=1e-6)
        np.testing.assert_array_equal(out["i"], np.arange(11))


def test_padding_is_an_exact_noop_for_a_small_client():
    """A 3-example client trained inside a dataset whose largest client has 300 examples
    gives the same delta as the same client in a dataset of its own size."""
    big = _toy([3, 300])
    alone = FederatedData({k: v[:3] for k, v in big.features.items()}, np.array([0, 3]), ("c0",))
    model = logistic_regression((6,), 3)
    params, mstate = model.init(jax.random.key(0))
    problem = Problem(model, classification(), mstate, "x")
    alg = fs.algorithms.fedavg(optax.sgd(0.5), local_epochs=3, batch_size=8)

    def delta(data):
        sched = make_schedule(data.max_client_size, batch_size=8, local_epochs=3, local_steps=None)
        key = jax.random.key(7)
        bits = jax.random.bits(key, (bits_needed(sched, data.max_client_size),), jnp.uint32)
        idx, mask = client_batches(sched, bits, jnp.int32(3), data.max_client_size)
        feats = {k: jnp.asarray(v) for k, v in data.features.items()}
        local = LocalData(feats, jnp.int32(0), idx, mask, jnp.int32(3), jnp.int32(0), 1)
        out = alg.client_update(problem, params, local, key)
        return out.delta, out.metrics, idx.shape[0]

    d_big, m_big, steps_big = delta(big)
    d_alone, m_alone, steps_alone = delta(alone)
    assert steps_big == 3 * 38 and steps_alone == 3  # 111 padded steps in the big dataset
    for a, b in zip(jax.tree_util.tree_leaves(d_big), jax.tree_util.tree_leaves(d_alone)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert float(m_big["count"]) == float(m_alone["count"]) == 9.0


def test_epoch_schedule_visits_every_example_once_per_epoch():
    sched = make_schedule(23, batch_size=5, local_epochs=3, local_steps=None)
    bits = jax.random.bits(jax.random.key(0), (bits_needed(sched, 23),), jnp.uint32)
    idx, mask = map(np.asarray, client_batches(sched, bits, jnp.int32(17), 23))
    per_epoch = sched.num_steps // 3
    for e in range(3):
        rows = idx[e * per_epoch:(e + 1) * per_epoch][mask[e * per_epoch:(e + 1) * per_epoch]]
        np.testing.assert_array_equal(np.sort(rows), np.arange(17))
    # ceil(17/5) = 4 real steps per epoch out of ceil(23/5) = 5
    assert mask.any(axis=1).sum() == 12


def test_fixed_steps_schedule_balances_examples():
    sched = make_schedule(50, batch_size=4, local_epochs=None, local_steps=10)
    bits = jax.random.bits(jax.random.key(1), (bits_needed(sched, 50),), jnp.uint32)
    idx, mask = map(np.asarray, client_batches(sched, bits, jnp.int32(8), 50))
    assert mask.all() and idx.shape == (10, 4)
    counts = np.bincount(idx.ravel(), minlength=8)
    assert counts.sum() == 40 and counts.min() == counts.max() == 5  # 5 full passes over 8


def test_fedavg_one_client_one_step_equals_plain_sgd():
    data = _toy([12])
    model = fs.models.mlp((6,), 3, hidden=(5,))
    alg = fs.algorithms.fedavg(optax.sgd(0.1), local_steps=1, batch_size=None)
    res = fs.simulate(model, alg, data, rounds=1, clients_per_round=1, seed=0, progress=False)
    params, mstate = model.init(jax.random.fold_in(jax.random.key(0), 0x1A17))

    def loss(p):
        out, _ = model.apply(p, mstate, data.features["x"])
        return optax.softmax_cross_entropy_with_integer_labels(out, data.features["y"]).mean()

    opt = optax.sgd(0.1)
    updates, _ = opt.update(jax.grad(loss)(params), opt.init(params), params)
    expected = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(res.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_server_optimizer_sees_mean_delta_as_pseudo_gradient():
    """FedAdam's server step equals optax.adam applied by hand to the FedAvg mean delta."""
    data = _toy([6, 9, 4])
    model = logistic_regression((6,), 3)
    plain = fs.simulate(model, fs.algorithms.fedavg(optax.sgd(0.2), batch_size=3), data,
                        rounds=1, clients_per_round=3, seed=0, progress=False)
    adam = optax.adam(0.05, eps=1e-3)
    fedadam = fs.simulate(model, fs.algorithms.fedavg(optax.sgd(0.2), adam, batch_size=3), data,
                          rounds=1, clients_per_round=3, seed=0, progress=False)
    p0, _ = model.init(jax.random.fold_in(jax.random.key(0), 0x1A17))
    mean_delta = jax.tree_util.tree_map(lambda a, b: a - b, p0, plain.params)
    updates, _ = adam.update(mean_delta, adam.init(p0), p0)
    expected = optax.apply_updates(p0, updates)
    for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(fedadam.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_same_seed_same_history_and_other_seed_differs():
    data = _toy([10, 20, 5, 8, 13])
    model = fs.models.mlp((6,), 3, hidden=(8,), dropout=0.2)
    alg = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=4)
    test = {k: v[:20] for k, v in data.features.items()}
    runs = [fs.simulate(model, alg, data, rounds=6, clients_per_round=3, seed=s, eval_data=test,
                        eval_every=3, progress=False) for s in (5, 5, 6)]
    assert runs[0].history == runs[1].history
    assert runs[0].history != runs[2].history


def test_rounds_per_call_does_not_change_results():
    data = _toy([10, 20, 5, 8, 13])
    model = logistic_regression((6,), 3)
    alg = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=4)
    a = fs.simulate(model, alg, data, rounds=7, clients_per_round=2, seed=0, progress=False,
                    engine=fs.EngineOptions(rounds_per_call=1))
    b = fs.simulate(model, alg, data, rounds=7, clients_per_round=2, seed=0, progress=False,
                    engine=fs.EngineOptions(rounds_per_call=4))
    assert [h["train_loss"] for h in a.history] == pytest.approx([h["train_loss"] for h in b.history], rel=1e-6)


def test_hoisted_draws_equal_round_by_round_draws(monkeypatch):
    """Fused rounds draw their randomness up front unless it exceeds HOISTED_DRAW_BYTES;
    both ways give the same rounds (same cohorts, same shuffles), also when chunked."""
    import fedjax_sim.engine.round as round_module

    data = _toy([10, 20, 5, 8, 13])
    model = logistic_regression((6,), 3)
    alg = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=4)
    runs = []
    for budget in (round_module.HOISTED_DRAW_BYTES, 0):
        monkeypatch.setattr(round_module, "HOISTED_DRAW_BYTES", budget)
        for chunk in (None, 1):
            runs.append(fs.simulate(model, alg, data, rounds=9, clients_per_round=3, seed=2,
                                    progress=False,
                                    engine=fs.EngineOptions(rounds_per_call=4, clients_per_chunk=chunk)))
    ref = [h["train_loss"] for h in runs[0].history]
    for run in runs[1:]:
        assert [h["train_loss"] for h in run.history] == pytest.approx(ref, rel=1e-6)
        assert [h["cohort_examples"] for h in run.history] == [h["cohort_examples"] for h in runs[0].history]
        for a, b in zip(jax.tree_util.tree_leaves(run.params), jax.tree_util.tree_leaves(runs[0].params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chain_of_aggregator_parts_equals_parts_applied_by_hand():
    data = _toy([6, 9, 4, 7])
    model = logistic_regression((6,), 3)
    alg = fs.algorithms.fedavg(optax.sgd(0.2), batch_size=3, weighting="uniform")
    halve = fs.aggregators.part(client=lambda d, s, r: (jax.tree_util.tree_map(lambda x: 0.5 * x, d), {}))
    shift = fs.aggregators.part(finalize=lambda t, den, reports, s, r: (
        jax.tree_util.tree_map(lambda x: x + den * 0.01, t), den, s, {"shifted": jnp.float32(1)}))
    plain = fs.simulate(model, alg, data, rounds=1, clients_per_round=4, seed=0, progress=False)
    chained = fs.simulate(model, alg, data, rounds=1, clients_per_round=4, seed=0, progress=False,
                          aggregator=fs.aggregators.chain(halve, shift))
    p0, _ = model.init(jax.random.fold_in(jax.random.key(0), 0x1A17))
    # aggregate = (sum 0.5 * delta_i + 4 * 0.01) / 4 = 0.5 * mean_delta + 0.01
    for a, b, c in zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(plain.params),
                       jax.tree_util.tree_leaves(chained.params)):
        np.testing.assert_allclose(c, a - (0.5 * (a - b) + 0.01), atol=1e-6)
    assert chained.history[0]["shifted"] == 1.0


def test_shuffle_is_a_uniform_permutation_for_rank_and_sort_paths():
    """Both rank algorithms give permutations of the real slots, uniform over positions
    (chi-square bound), with padding last; and both equal numpy's stable ranks."""
    from fedjax_sim.engine.batching import RANK_MAX_SLOTS, _ranks, _shuffle

    n, trials = 9, 4000
    for length in (12, RANK_MAX_SLOTS + 5):
        bits = jax.random.bits(jax.random.key(length), (trials, length), jnp.uint32)
        perms = np.asarray(jax.vmap(lambda b: _shuffle(b, jnp.int32(n), length))(bits))
        assert (np.sort(perms[:, :n], axis=1) == np.arange(n)).all()
        assert (perms[:, n:] == np.arange(n, length)).all()
        counts = np.zeros((n, n))
        for row in perms[:, :n]:
            counts[np.arange(n), row] += 1
        expected = trials / n
        chi2 = ((counts - expected) ** 2 / expected).sum()
        dof = (n - 1) ** 2
        assert chi2 < dof + 5 * np.sqrt(2 * dof), chi2  # 5 sigma: fails on a biased shuffle
    for length in (40, RANK_MAX_SLOTS + 5):
        keys = np.asarray(jax.random.bits(jax.random.key(0), (length,), jnp.uint32)) % 7  # ties
        np.testing.assert_array_equal(np.asarray(_ranks(jnp.asarray(keys))),
                                      np.argsort(np.argsort(keys, kind="stable"), kind="stable"))


def test_large_population_cohorts_are_uniform_distinct_subsets(monkeypatch):
    """Floyd's algorithm (used above PERMUTATION_MAX_CLIENTS clients) draws every m-subset
    with equal probability: a chi-square test over the 20 subsets of 3 out of 6, and
    distinct in-range ids for a population of 20,000."""
    from collections import Counter

    from fedjax_sim.engine import round as round_module

    big = np.asarray(jax.jit(lambda k: round_module.sample_cohort(k, 20000, 64))(jax.random.key(3)))
    assert len(set(big.tolist())) == 64 and big.min() >= 0 and big.max() < 20000
    monkeypatch.setattr(round_module, "PERMUTATION_MAX_CLIENTS", 0)
    draws = 60000
    out = np.asarray(jax.jit(jax.vmap(lambda k: round_module.sample_cohort(k, 6, 3)))(
        jax.random.split(jax.random.key(0), draws)))
    assert all(len(set(row)) == 3 for row in out.tolist())
    counts = np.asarray(list(Counter(tuple(sorted(r)) for r in out.tolist()).values()))
    assert len(counts) == 20
    expected = draws / 20
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    assert chi2 < 43.8  # the 0.999 quantile of chi-square with 19 degrees of freedom
