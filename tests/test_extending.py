"""Extending fedjax_sim with public names only: the trimmed-mean aggregator part of
docs/aggregators.md and the FedDyn algorithm of docs/algorithms.md, each run from the
page's own code block and checked against a plain-numpy (float64) re-implementation.

Local training uses full-batch steps (`batch_size=None, local_steps=S`: every step takes
all of a client's examples), so the numpy reference needs no shuffling; the cohorts come
from the engine's pure sampling functions.
"""

import os
import re

import jax
import numpy as np
import optax
import pytest
from scipy import stats

import fedjax_sim as fs
from fedjax_sim.data import FederatedData
from fedjax_sim.engine.batching import make_schedule
from fedjax_sim.engine.round import ClientSampling, DeviceData, RoundProgram, sample_cohort, split_round_key
from fedjax_sim.models import logistic_regression
from fedjax_sim.models.tasks import classification

from helpers import logreg_grad, toy_clients

FEATURES, CLASSES = 5, 3
SIZES = [3, 6, 4, 8, 5, 7]
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")


def docs_example(name: str) -> dict:
    """The namespace left by running the code block marked `<!-- example: name -->` in one
    of the documentation pages (docs/*.md)."""
    found = []
    for page in sorted(os.listdir(DOCS)):
        if page.endswith(".md"):
            text = open(os.path.join(DOCS, page)).read()
            found += [(page, m) for m in re.finditer(
                rf"<!-- example: {name} -->\n```python\n(.*?)```", text, re.S)]
    assert len(found) == 1, f"docs/*.md should hold one example block {name!r}, found {len(found)}"
    page, match = found[0]
    namespace: dict = {}
    exec(compile(match.group(1), f"docs/{page}[{name}]", "exec"), namespace)
    return namespace


def _toy():
    x, y, offsets = toy_clients(SIZES, FEATURES, CLASSES, seed=3)
    return FederatedData({"x": x, "y": y}, offsets, tuple(f"c{i}" for i in range(len(SIZES))))


def _init(model, seed):
    params, _ = model.init(jax.random.fold_in(jax.random.key(seed), fs.simulation.INIT_STREAM))
    return [np.asarray(params["dense"][k], np.float64) for k in ("kernel", "bias")]


def _client_rows(data, cid):
    lo, hi = int(data.offsets[cid]), int(data.offsets[cid + 1])
    return data.features["x"][lo:hi], data.features["y"][lo:hi]


def _full_batch_sgd(w, x, y, lr, steps, extra_grad=lambda w: [0.0, 0.0]):
    w = [a.copy() for a in w]
    for _ in range(steps):
        g = [gi + ei for gi, ei in zip(logreg_grad(w[0], w[1], x, y), extra_grad(w))]
        w = [wi - lr * gi for wi, gi in zip(w, g)]
    return w


def _cohort(seed, r, num_clients, m):
    k_sample, _, _ = split_round_key(jax.random.key(seed), r)
    return [int(c) for c in np.asarray(sample_cohort(k_sample, num_clients, m))]


def _assert_params(params, expected):
    np.testing.assert_allclose(params["dense"]["kernel"], expected[0], atol=2e-5)
    np.testing.assert_allclose(params["dense"]["bias"], expected[1], atol=2e-5)


# -- trimmed mean -------------------------------------------------------------------------
LR, STEPS, TRIM = 0.3, 2, 0.2


def _fedavg_deltas(data, w, cohort):
    """Each cohort client's FedAvg delta w - w_i (full-batch SGD), flattened to a row."""
    rows = []
    for cid in cohort:
        w_i = _full_batch_sgd(w, *_client_rows(data, cid), LR, STEPS)
        rows.append(np.concatenate([(a - b).ravel() for a, b in zip(w, w_i)]))
    return np.stack(rows)


def _apply_flat(w, aggregate):
    k = w[0].size
    return [w[0] - aggregate[:k].reshape(w[0].shape), w[1] - aggregate[k:]]


@pytest.mark.parametrize("chunk", [None, 2])
def test_trimmed_mean_part_matches_scipy(chunk):
    trimmed_mean = docs_example("trimmed_mean")["trimmed_mean"]
    data, model, seed, m = _toy(), logistic_regression((FEATURES,), CLASSES), 4, 5
    alg = fs.algorithms.fedavg(optax.sgd(LR), local_epochs=None, local_steps=STEPS,
                               batch_size=None, weighting="uniform")
    result = fs.simulate(model, alg, data, rounds=2, clients_per_round=m, seed=seed,
                         aggregator=trimmed_mean(TRIM), eval_every=10, progress=False,
                         engine=fs.EngineOptions(clients_per_chunk=chunk, rounds_per_call=2))
    w = _init(model, seed)
    for r in range(2):
        deltas = _fedavg_deltas(data, w, _cohort(seed, r, data.num_clients, m))
        # k = floor(0.2 * 5) = 1 trimmed at each end: not the plain mean
        assert not np.allclose(stats.trim_mean(deltas, TRIM, axis=0), deltas.mean(axis=0))
        w = _apply_flat(w, stats.trim_mean(deltas, TRIM, axis=0))
    _assert_params(result.params, w)


def test_trimmed_mean_part_ignores_poisson_padding_slots():
    trimmed_mean = docs_example("trimmed_mean")["trimmed_mean"]
    data, model = _toy(), logistic_regression((FEATURES,), CLASSES)
    alg = fs.algorithms.fedavg(optax.sgd(LR), local_epochs=None, local_steps=STEPS,
                               batch_size=None, weighting="uniform")
    schedule = make_schedule(data.max_client_size, batch_size=None, local_epochs=None,
                             local_steps=STEPS)
    params, model_state = model.init(jax.random.key(0))
    problem = fs.algorithms.Problem(model, classification(), model_state, "x")
    program = RoundProgram(alg, problem, trimmed_mean(TRIM), schedule,
                           num_clients=data.num_clients, max_client_size=data.max_client_size,
                           clients_per_round=len(SIZES), clients_per_chunk=None, unroll=1,
                           sampling=ClientSampling("poisson", len(SIZES), 0.6))
    # A seed whose round-0 cohort has at least 3 clients and some padding slots.
    for seed in range(50):
        ids, live = map(np.asarray, program.cohorts(jax.random.key(seed), 0, 1))
        if 3 <= live.sum() < len(SIZES):
            break
    root = jax.random.key(seed)
    w = [np.asarray(params["dense"][k], np.float64) for k in ("kernel", "bias")]
    state = program.init(params)
    device_data = DeviceData.from_federated(data)
    run = program.compile(state, device_data, model_state, root, 1)
    state, _ = run(state, device_data, model_state, root, 0, 1)
    deltas = _fedavg_deltas(data, w, [int(c) for c in ids[0][live[0]]])
    _assert_params(alg.params(state.server), _apply_flat(w, stats.trim_mean(deltas, TRIM, axis=0)))


def test_a_chain_holds_one_reducing_part():
    trimmed_mean = docs_example("trimmed_mean")["trimmed_mean"]
    with pytest.raises(fs.UserError, match="one part that reduces"):
        fs.aggregators.chain(trimmed_mean(0.1), trimmed_mean(0.2))


# -- FedDyn -------------------------------------------------------------------------------
def test_docs_feddyn_matches_numpy_with_partial_participation():
    FedDyn = docs_example("feddyn")["FedDyn"]
    data, model, seed, m, rounds = _toy(), logistic_regression((FEATURES,), CLASSES), 1, 3, 3
    lr, alpha, steps = 0.2, 0.5, 3
    alg = FedDyn(learning_rate=lr, alpha=alpha, batch_size=None, local_epochs=None,
                 local_steps=steps)
    result = fs.simulate(model, alg, data, rounds=rounds, clients_per_round=m, seed=seed,
                         eval_every=10, progress=False, engine=fs.EngineOptions(rounds_per_call=1))

    theta = _init(model, seed)
    h = [np.zeros_like(a) for a in theta]
    g = {cid: [np.zeros_like(a) for a in theta] for cid in range(data.num_clients)}
    for r in range(rounds):
        moved = []
        for cid in _cohort(seed, r, data.num_clients, m):
            # grad of L_i(w) - <g_i, w> + alpha/2 ||w - theta||^2
            extra = lambda w, cid=cid: [alpha * (wi - ti) - gi for wi, ti, gi in zip(w, theta, g[cid])]
            w_i = _full_batch_sgd(theta, *_client_rows(data, cid), lr, steps, extra)
            d = [wi - ti for wi, ti in zip(w_i, theta)]
            g[cid] = [gi - alpha * di for gi, di in zip(g[cid], d)]
            moved.append(d)
        total = [sum(d[j] for d in moved) for j in range(2)]
        h = [hj - alpha / data.num_clients * tj for hj, tj in zip(h, total)]
        theta = [tj + sj / m - hj / alpha for tj, sj, hj in zip(theta, total, h)]
    _assert_params(result.params, theta)
    assert float(np.abs(result.client_states["dense"]["kernel"]).sum()) > 0  # the g_i moved
