"""The Byzantine-robust rules (fedjax_sim.aggregators.robust) against plain-numpy
re-implementations: each reduce on random cohorts under jit (every slot live, and Poisson
cohorts whose last slots are padding), end to end through `simulate` (chunked and not) and
a Poisson round, their robustness to outliers, and their refusals."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.aggregators import chain, robust
from fedjax_sim.data import FederatedData
from fedjax_sim.engine.batching import make_schedule
from fedjax_sim.engine.contracts import Cohort
from fedjax_sim.engine.round import (ClientSampling, DeviceData, RoundProgram, sample_cohort,
                                     split_round_key)
from fedjax_sim.models import logistic_regression
from fedjax_sim.models.tasks import classification

from helpers import logreg_grad, toy_clients

SHAPES = {"w": (3, 4), "b": (5,)}  # two leaves of different shapes: 17 entries a client


# -- cohorts and numpy references ---------------------------------------------------------
def _cohort(m, n, seed=0, scale=1.0):
    """m slots, the first n live with random updates and weights in [1, 4); the padding
    slots (live False) hold zeros and weigh 0, as the engine makes them."""
    rng = np.random.default_rng(seed)
    live = np.arange(m) < n
    updates = {k: np.where(live.reshape((-1,) + (1,) * len(s)),
                           rng.normal(scale=scale, size=(m,) + s), 0).astype(np.float32)
               for k, s in SHAPES.items()}
    weights = np.where(live, rng.uniform(1, 4, size=m), 0).astype(np.float32)
    return updates, weights, live


def _flat(updates):
    """[clients, 17] float64: each client's leaves flattened in the tree's (sorted) order."""
    return np.concatenate([np.asarray(updates[k], np.float64).reshape(len(updates[k]), -1)
                           for k in sorted(updates)], axis=1)


def _params(center=None):
    return {k: np.zeros(s, np.float32) for k, s in SHAPES.items()} if center is None else center


def _reduce(part, updates, weights, live, state=None):
    """part.reduce under jit: (aggregate = total / denominator, flattened; denominator;
    metrics; total)."""
    state = part.init(_params()) if state is None else state
    cohort = Cohort(updates, jnp.asarray(weights), jnp.asarray(live))
    total, denominator, *more = jax.jit(
        lambda c, s: part.reduce(c, s, jax.random.key(0)))(cohort, state)
    denominator = float(denominator)
    aggregate = _flat({k: np.asarray(v)[None] for k, v in total.items()})[0]
    aggregate = aggregate / denominator if denominator else aggregate
    return aggregate, denominator, (more[0] if more else {}), total


def _check(part, reference, m, n, seed=0, rtol=1e-5, atol=1e-6):
    """The rule's aggregate equals the numpy reference on the live clients, and the
    denominator is their summed weight."""
    updates, weights, live = _cohort(m, n, seed)
    aggregate, denominator, metrics, _ = _reduce(part, updates, weights, live)
    x, w = _flat(updates)[live], weights[live].astype(np.float64)
    np.testing.assert_allclose(aggregate, reference(x, w), rtol=rtol, atol=atol)
    np.testing.assert_allclose(denominator, w.sum(), rtol=1e-6)
    return metrics


def np_trimmed_mean(x, beta):
    n = len(x)
    k = int(np.floor(beta * n))
    return np.sort(x, axis=0)[k:n - k].mean(axis=0)


def np_krum(x, f, s):
    n = len(x)
    neighbours = min(max(n - f - 2, 1), n - 1)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[:neighbours]))
    chosen = np.argsort(scores, kind="stable")[:s]
    return x[chosen].mean(axis=0)


def np_geometric_median(x, w, iterations, smoothing):
    v = (w[:, None] * x).sum(0) / w.sum()
    for _ in range(iterations):
        beta = np.array([wi / max(smoothing, np.linalg.norm(v - xi)) for xi, wi in zip(x, w)])
        v = (beta[:, None] * x).sum(0) / beta.sum()
    return v


def np_norm_bounding(x, w, bound):
    scaled = [xi * min(1.0, bound / np.linalg.norm(xi)) for xi in x]
    return sum(wi * si for wi, si in zip(w, scaled)) / w.sum()


def np_centered_clipping(x, w, v, tau, iterations):
    for _ in range(iterations):
        step = np.zeros_like(v)
        for xi, wi in zip(x, w):
            y = xi - v
            step += wi * y * min(1.0, tau / np.linalg.norm(y))
        v = v + step / w.sum()
    return v


# -- each rule, reduced directly ----------------------------------------------------------
@pytest.mark.parametrize("m,n", [(7, 7), (6, 6), (8, 5), (7, 4)])  # odd, even; with padding
def test_coordinate_median_matches_numpy(m, n):
    _check(robust.coordinate_median(), lambda x, w: np.median(x, axis=0), m, n, seed=n)


def test_median_keeps_each_leafs_dtype():
    updates, weights, live = _cohort(5, 4)
    updates["b"] = updates["b"].astype(jnp.bfloat16)
    *_, total = _reduce(robust.coordinate_median(), updates, weights, live)
    assert total["b"].dtype == jnp.bfloat16 and total["w"].dtype == jnp.float32


@pytest.mark.parametrize("m,n,beta,k", [(8, 8, 0.1, 0), (8, 8, 0.2, 1), (8, 8, 0.3, 2),
                                        (9, 6, 0.1, 0), (9, 6, 0.2, 1), (9, 6, 0.4, 2)])
def test_trimmed_mean_matches_numpy(m, n, beta, k):
    assert math.floor(beta * n) == k
    _check(robust.trimmed_mean(beta), lambda x, w: np_trimmed_mean(x, beta), m, n, seed=m + n)


@pytest.mark.parametrize("m,n", [(8, 8), (9, 6)])
@pytest.mark.parametrize("selected", [1, 3])
def test_krum_and_multi_krum_match_numpy(m, n, selected):
    metrics = _check(robust.krum(1, num_selected=selected), lambda x, w: np_krum(x, 1, selected),
                     m, n, seed=m)
    assert float(metrics["krum_selected"]) == selected


def test_krum_selects_at_most_the_live_clients():
    # 2 live clients of 6 slots, 3 to select: both are averaged, the padding is not
    metrics = _check(robust.krum(0, num_selected=3), lambda x, w: x.mean(axis=0), 6, 2)
    assert float(metrics["krum_selected"]) == 2
    # one live client: it is the aggregate
    _check(robust.krum(2), lambda x, w: x[0], 4, 1)


@pytest.mark.parametrize("m,n", [(6, 6), (8, 5)])
def test_geometric_median_matches_weiszfeld(m, n):
    _check(robust.geometric_median(iterations=4, smoothing=1e-6),
           lambda x, w: np_geometric_median(x, w, 4, 1e-6), m, n, seed=m)


@pytest.mark.parametrize("m,n", [(6, 6), (8, 5)])
def test_norm_bounding_clips_the_long_updates(m, n):
    updates, _, live = _cohort(m, n, seed=1)
    norms = np.linalg.norm(_flat(updates)[live], axis=1)
    bound = float(np.median(norms))  # about half of the clients are clipped
    metrics = _check(robust.norm_bounding(bound), lambda x, w: np_norm_bounding(x, w, bound),
                     m, n, seed=1)
    clipped = float(np.mean(norms > bound))
    assert 0 < clipped < 1
    np.testing.assert_allclose(float(metrics["robust_clipped_fraction"]), clipped)


@pytest.mark.parametrize("iterations", [1, 3])
def test_centered_clipping_over_two_rounds_carries_its_center(iterations):
    part = robust.centered_clipping(1.5, iterations=iterations)
    state = part.init(_params())
    v = np.zeros(17)
    for r, (m, n) in enumerate([(6, 6), (8, 5)]):
        updates, weights, live = _cohort(m, n, seed=10 + r, scale=1.0 + r)
        aggregate, denominator, metrics, total = _reduce(part, updates, weights, live, state)
        x, w = _flat(updates)[live], weights[live].astype(np.float64)
        expected = np_centered_clipping(x, w, v, 1.5, iterations)
        np.testing.assert_allclose(aggregate, expected, rtol=1e-5, atol=1e-6)
        assert 0 <= float(metrics["robust_clipped_fraction"]) <= 1
        # the finalizer keeps the aggregate as the next round's center
        _, _, state, _ = jax.jit(part.finalize)(total, jnp.float32(denominator), {}, state,
                                                jax.random.key(0))
        np.testing.assert_allclose(_flat({k: np.asarray(c)[None] for k, c in
                                          state.center.items()})[0], expected, rtol=1e-5,
                                   atol=1e-6)
        v = expected
    assert np.linalg.norm(v) > 0


def test_centered_clipping_keeps_its_center_after_a_round_without_weight():
    part = robust.centered_clipping(1.0)
    state = part.init(_params())._replace(center={k: jnp.ones(s) for k, s in SHAPES.items()})
    zero = {k: jnp.zeros(s) for k, s in SHAPES.items()}
    _, _, kept, _ = part.finalize(zero, jnp.float32(0), {}, state, jax.random.key(0))
    for k in SHAPES:
        np.testing.assert_array_equal(kept.center[k], 1.0)


def _rules():
    return [robust.coordinate_median(), robust.trimmed_mean(0.2), robust.krum(1, 2),
            robust.geometric_median(), robust.norm_bounding(1.0), robust.centered_clipping(1.0)]


@pytest.mark.parametrize("index", range(6))
def test_no_live_client_gives_zero_total_and_denominator(index):
    part = _rules()[index]
    updates, weights, live = _cohort(4, 0)
    _, denominator, metrics, total = _reduce(part, updates, weights, live)
    assert denominator == 0
    for leaf in total.values():
        assert np.all(np.asarray(leaf) == 0)
    assert all(np.isfinite(float(v)) for v in metrics.values())


def test_robust_rules_stay_near_the_honest_clients_and_the_mean_does_not():
    rng = np.random.default_rng(0)
    honest = 1.0 + 0.01 * rng.normal(size=(8, 17))
    x = np.concatenate([honest, np.full((2, 17), 100.0)])
    updates = {"b": x[:, :5].astype(np.float32), "w": x[:, 5:].reshape(10, 3, 4).astype(np.float32)}
    weights, live = np.ones(10, np.float32), np.ones(10, bool)
    target = honest.mean(axis=0)
    mean, *_ = _reduce(robust.trimmed_mean(0.0), updates, weights, live)  # beta 0: the mean
    assert np.abs(mean - target).max() > 10
    for part in [robust.coordinate_median(), robust.trimmed_mean(0.2), robust.krum(2),
                 robust.krum(2, num_selected=4), robust.geometric_median(iterations=10)]:
        aggregate, *_ = _reduce(part, updates, weights, live)
        assert np.abs(aggregate - target).max() < 0.05, part.key


# -- through simulate ---------------------------------------------------------------------
FEATURES, CLASSES, SIZES, LR, STEPS = 5, 3, [3, 6, 4, 8, 5, 7], 0.3, 2
ENTRIES = FEATURES * CLASSES + CLASSES


def _toy():
    x, y, offsets = toy_clients(SIZES, FEATURES, CLASSES, seed=3)
    return FederatedData({"x": x, "y": y}, offsets, tuple(f"c{i}" for i in range(len(SIZES))))


def _client_delta(data, w, cid):
    """The client's FedAvg delta w - w_i after STEPS full-batch SGD steps, flattened in the
    parameters' (sorted) order: bias, then kernel."""
    lo, hi = int(data.offsets[cid]), int(data.offsets[cid + 1])
    x, y = data.features["x"][lo:hi], data.features["y"][lo:hi]
    v = [a.copy() for a in w]
    for _ in range(STEPS):
        v = [vi - LR * g for vi, g in zip(v, logreg_grad(v[0], v[1], x, y))]
    return np.concatenate([(w[1] - v[1]).ravel(), (w[0] - v[0]).ravel()])


def _apply(w, aggregate):
    bias = CLASSES
    return [w[0] - aggregate[bias:].reshape(w[0].shape), w[1] - aggregate[:bias]]


def _init(model, seed):
    params, _ = model.init(jax.random.fold_in(jax.random.key(seed), fs.simulation.INIT_STREAM))
    return [np.asarray(params["dense"][k], np.float64) for k in ("kernel", "bias")]


def _cohort_ids(seed, r, num_clients, m):
    k_sample, _, _ = split_round_key(jax.random.key(seed), r)
    return [int(c) for c in np.asarray(sample_cohort(k_sample, num_clients, m))]


END_TO_END = {
    "median": (lambda: robust.coordinate_median(), lambda x, state: np.median(x, axis=0)),
    "krum": (lambda: robust.krum(1, num_selected=2), lambda x, state: np_krum(x, 1, 2)),
    "centered_clipping": (lambda: robust.centered_clipping(0.05, iterations=2),
                          lambda x, state: np_centered_clipping(x, np.ones(len(x)), state,
                                                                0.05, 2)),
}


@pytest.mark.parametrize("rule,chunk", [("median", None), ("median", 2), ("krum", None),
                                        ("krum", 2), ("centered_clipping", None)])
def test_simulate_matches_numpy_rounds(rule, chunk):
    build, reference = END_TO_END[rule]
    data, model, seed, m, rounds = _toy(), logistic_regression((FEATURES,), CLASSES), 4, 5, 3
    alg = fs.algorithms.fedavg(optax.sgd(LR), local_epochs=None, local_steps=STEPS,
                               batch_size=None, weighting="uniform")
    result = fs.simulate(model, alg, data, rounds=rounds, clients_per_round=m, seed=seed,
                         aggregator=build(), eval_every=10, progress=False,
                         engine=fs.EngineOptions(clients_per_chunk=chunk, rounds_per_call=rounds))
    w, state = _init(model, seed), np.zeros(ENTRIES)
    for r in range(rounds):
        x = np.stack([_client_delta(data, w, c) for c in _cohort_ids(seed, r, data.num_clients, m)])
        aggregate = reference(x, state)
        assert not np.allclose(aggregate, x.mean(axis=0), atol=1e-4)  # not the plain mean
        w, state = _apply(w, aggregate), aggregate
    np.testing.assert_allclose(result.params["dense"]["kernel"], w[0], atol=2e-5)
    np.testing.assert_allclose(result.params["dense"]["bias"], w[1], atol=2e-5)


@pytest.mark.parametrize("rule", ["median", "krum"])
def test_a_poisson_round_leaves_the_padding_slots_out(rule):
    build, reference = END_TO_END[rule]
    data, model = _toy(), logistic_regression((FEATURES,), CLASSES)
    alg = fs.algorithms.fedavg(optax.sgd(LR), local_epochs=None, local_steps=STEPS,
                               batch_size=None, weighting="uniform")
    schedule = make_schedule(data.max_client_size, batch_size=None, local_epochs=None,
                             local_steps=STEPS)
    params, model_state = model.init(jax.random.key(0))
    problem = fs.algorithms.Problem(model, classification(), model_state, "x")
    program = RoundProgram(alg, problem, build(), schedule, num_clients=data.num_clients,
                           max_client_size=data.max_client_size, clients_per_round=len(SIZES),
                           clients_per_chunk=None, unroll=1,
                           sampling=ClientSampling("poisson", len(SIZES), 0.6))
    # A seed whose round-0 cohort has at least 4 clients and some padding slots.
    for seed in range(50):
        ids, live = map(np.asarray, program.cohorts(jax.random.key(seed), 0, 1))
        if 4 <= live.sum() < len(SIZES):
            break
    root = jax.random.key(seed)
    w = [np.asarray(params["dense"][k], np.float64) for k in ("kernel", "bias")]
    state = program.init(params)
    device_data = DeviceData.from_federated(data)
    run = program.compile(state, device_data, model_state, root, 1)
    state, _ = run(state, device_data, model_state, root, 0, 1)
    x = np.stack([_client_delta(data, w, int(c)) for c in ids[0][live[0]]])
    expected = _apply(w, reference(x, None))
    params = alg.params(state.server)
    np.testing.assert_allclose(params["dense"]["kernel"], expected[0], atol=2e-5)
    np.testing.assert_allclose(params["dense"]["bias"], expected[1], atol=2e-5)


# -- refusals -----------------------------------------------------------------------------
@pytest.mark.parametrize("build,name,value", [
    (lambda: robust.trimmed_mean(0.5), "beta", "0.5"),
    (lambda: robust.trimmed_mean(-0.1), "beta", "-0.1"),
    (lambda: robust.trimmed_mean("0.1"), "beta", "'0.1'"),
    (lambda: robust.krum(-1), "num_byzantine", "-1"),
    (lambda: robust.krum(1.5), "num_byzantine", "1.5"),
    (lambda: robust.krum(1, num_selected=0), "num_selected", "0"),
    (lambda: robust.geometric_median(iterations=0), "iterations", "0"),
    (lambda: robust.geometric_median(smoothing=0.0), "smoothing", "0.0"),
    (lambda: robust.norm_bounding(0), "max_norm", "0"),
    (lambda: robust.norm_bounding(-2.0), "max_norm", "-2.0"),
    (lambda: robust.centered_clipping(0.0), "tau", "0.0"),
    (lambda: robust.centered_clipping(1.0, iterations=0), "iterations", "0"),
])
def test_bad_arguments_are_refused_in_one_line(build, name, value):
    with pytest.raises(fs.UserError) as caught:
        build()
    message = str(caught.value)
    assert "\n" not in message and message.startswith(name) and message.endswith(value)
    assert ">" in message or "[" in message  # the valid range


def test_the_builders_are_public():
    for name in ("coordinate_median", "trimmed_mean", "krum", "geometric_median",
                 "norm_bounding", "centered_clipping"):
        assert getattr(fs.aggregators, name) is getattr(robust, name)
        assert name in fs.aggregators.__all__


def test_a_robust_rule_under_secure_aggregation_is_refused_clearly():
    A = fs.aggregators
    with pytest.raises(fs.UserError, match="coordinate_median needs every client's update but "
                                           "secure_sum gives the server only their sum; robust "
                                           "rules cannot run under secure or encrypted"):
        chain(A.coordinate_median(), A.secure_sum())
    # also inside chains: secure_aggregation is chain(integer_encode, secure_sum)
    with pytest.raises(fs.UserError, match="^krum needs every client's update but secure_sum"):
        chain(chain(A.krum(1)), A.secure_aggregation(1.0, cohort_size=4))
    with pytest.raises(fs.UserError, match="one robust rule, got trimmed_mean and krum"):
        chain(A.trimmed_mean(0.1), A.krum(1))


def test_centered_clipping_refuses_updates_shaped_unlike_the_params():
    part = robust.centered_clipping(1.0)
    state = part.init({"other": np.zeros(3, np.float32)})
    updates, weights, live = _cohort(4, 4)
    with pytest.raises(fs.UserError, match="shaped like the model's parameters"):
        part.reduce(Cohort(updates, jnp.asarray(weights), jnp.asarray(live)), state,
                    jax.random.key(0))
