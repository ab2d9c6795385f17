"""FedProx, SCAFFOLD and FedNova against independent plain-numpy references.

The cohort and each client's batch indices come from the engine's own pure functions
(`split_round_key`, `client_randomness`, `client_batches`); everything else -- the SGD
steps, proximal terms, momentum, control-variate corrections, normalisation, weighted
means and the server step -- is re-implemented here in float64 numpy. The toy problems
have partial participation (clients_per_round < number of clients) and clients of very
different sizes, so under `local_epochs` every client takes its own number of steps.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.data import FederatedData
from fedjax_sim.engine import client_batches, make_schedule
from fedjax_sim.engine.batching import bits_needed
from fedjax_sim.engine.round import client_randomness, split_round_key
from fedjax_sim.models import logistic_regression

from helpers import logreg_grad, toy_clients

FEATURES, CLASSES = 6, 3
ATOL = 1e-5
SIZES = [3, 14, 7, 1, 20, 5]  # very different client sizes (one shared schedule)
# One round per compiled call compiles ~40% faster than the fused multi-round loop (which
# test_engine checks gives the same rounds); client states still carry across calls.
ONE_ROUND_PER_CALL = fs.EngineOptions(rounds_per_call=1, unroll=1)


def _toy(sizes, seed=0):
    x, y, offsets = toy_clients(sizes, FEATURES, CLASSES, seed)
    return FederatedData({"x": x, "y": y}, offsets, tuple(f"c{i}" for i in range(len(sizes))))


def _init(model, seed):
    """The initial global parameters simulate() starts from, as float64 (kernel, bias)."""
    params, _ = model.init(jax.random.fold_in(jax.random.key(seed), 0x1A17))
    return (np.asarray(params["dense"]["kernel"], np.float64),
            np.asarray(params["dense"]["bias"], np.float64))


def _schedule(data, alg):
    return make_schedule(data.max_client_size, batch_size=alg.batch_size,
                         local_epochs=alg.local_epochs, local_steps=alg.local_steps)


@functools.lru_cache(maxsize=None)
def _draw_batches(schedule, num_clients, max_client_size):
    """Jitted: round r's [C, S, B] indices and masks of EVERY client, from the engine's pure
    functions (one compile per schedule instead of many eager ops)."""

    def draw(seed, r, sizes):
        _, k_clients, _ = split_round_key(jax.random.key(seed), r)

        def one(cid):
            _, _, bits = client_randomness(k_clients, cid, bits_needed(schedule, max_client_size))
            return client_batches(schedule, bits, sizes[cid], max_client_size)

        return jax.vmap(one)(jnp.arange(num_clients, dtype=jnp.int32))

    return jax.jit(draw)


def _cohort(seed, r, num_clients, m):
    k_sample, _, _ = split_round_key(jax.random.key(seed), r)
    return np.asarray(jax.random.choice(k_sample, num_clients, (m,), replace=False))


def _round_plan(data, schedule, seed, r, m):
    """Round r's cohort and, per cohort client, its real batches as global row indices
    (steps whose batch holds no real example are dropped: the engine skips them)."""
    draw = _draw_batches(schedule, data.num_clients, data.max_client_size)
    idx, mask = map(np.asarray, draw(seed, r, jnp.asarray(data.client_sizes, jnp.int32)))
    plan = []
    for cid in _cohort(seed, r, data.num_clients, m):
        cid = int(cid)
        off = int(data.offsets[cid])
        batches = [off + idx[cid, s][mask[cid, s]] for s in range(idx.shape[1])
                   if mask[cid, s].any()]
        assert batches and all(b.max() < data.offsets[cid + 1] for b in batches)
        plan.append((cid, int(data.client_sizes[cid]), batches))
    return plan


def _weights(plan, weighting):
    return np.asarray([n if weighting == "num_examples" else 1.0 for _, n, _ in plan], np.float64)


def _local_sgd(w, data, batches, lr, *, anchor=None, mu=0.0, momentum=0.0, correction=None):
    """Client SGD from w = (kernel, bias) over `batches`: heavy-ball momentum as optax's
    trace (m <- g + rho m; w <- w - lr m), proximal gradient g + mu (w - anchor), and a
    constant additive gradient correction (SCAFFOLD's c - c_i)."""
    x, y = data.features["x"], data.features["y"]
    w = [a.copy() for a in w]
    trace = [np.zeros_like(a) for a in w]
    for rows in batches:
        g = list(logreg_grad(w[0], w[1], x[rows], y[rows]))
        if mu:
            g = [gi + mu * (wi - ai) for gi, wi, ai in zip(g, w, anchor)]
        if correction is not None:
            g = [gi + ci for gi, ci in zip(g, correction)]
        trace = [gi + momentum * ti for gi, ti in zip(g, trace)]
        w = [wi - lr * ti for wi, ti in zip(w, trace)]
    return w


def _assert_params(result, expected, msg=""):
    np.testing.assert_allclose(result.params["dense"]["kernel"], expected[0], atol=ATOL,
                               err_msg=msg)
    np.testing.assert_allclose(result.params["dense"]["bias"], expected[1], atol=ATOL, err_msg=msg)


# -- FedProx ---------------------------------------------------------------------------

def _fedprox_reference(data, w, schedule, seed, rounds, m, lr, mu, weighting):
    for r in range(rounds):
        plan = _round_plan(data, schedule, seed, r, m)
        p = _weights(plan, weighting)
        new = [_local_sgd(w, data, batches, lr, anchor=w, mu=mu) for _, _, batches in plan]
        # server SGD(1): w <- w - sum p_i (w - w_i) / sum p_i = sum p_i w_i / sum p_i
        w = [sum(pi * wi[j] for pi, wi in zip(p, new)) / p.sum() for j in range(2)]
    return w


def test_fedprox_two_rounds_equal_numpy_reference():
    data = _toy(SIZES)
    lr, mu, m, seed, rounds = 0.3, 0.5, 4, 2, 2
    alg = fs.algorithms.fedprox(optax.sgd(lr), mu, local_epochs=2, batch_size=4)
    assert alg.proximal_mu == mu and alg.weighting == "num_examples"
    model = logistic_regression((FEATURES,), CLASSES)
    result = fs.simulate(model, alg, data, rounds=rounds, clients_per_round=m, seed=seed,
                         progress=False, engine=ONE_ROUND_PER_CALL)
    schedule = _schedule(data, alg)
    args = (data, _init(model, seed), schedule, seed, rounds, m, lr)
    _assert_params(result, _fedprox_reference(*args, mu, alg.weighting))
    # the proximal term is not a silent no-op: plain FedAvg ends elsewhere
    fedavg = _fedprox_reference(*args, 0.0, alg.weighting)
    assert np.abs(np.asarray(result.params["dense"]["kernel"]) - fedavg[0]).max() > 1e-3


# -- SCAFFOLD --------------------------------------------------------------------------

def _scaffold_reference(data, w, schedule, seed, rounds, m, lr, global_lr, weighting):
    """Option II SCAFFOLD in numpy: returns (x, c, c_table [N] of (kernel, bias), cohorts)."""
    zeros = lambda: [np.zeros_like(a) for a in w]  # noqa: E731
    x, c = [a.copy() for a in w], zeros()
    table = [zeros() for _ in range(data.num_clients)]
    cohorts = []
    for r in range(rounds):
        plan = _round_plan(data, schedule, seed, r, m)
        cohorts.append([cid for cid, _, _ in plan])
        p = _weights(plan, weighting)
        dys, dcs, updates = [], [], {}
        for cid, _, batches in plan:
            ci = table[cid]
            corr = [cg - cl for cg, cl in zip(c, ci)]  # y <- y - lr (g - c_i + c)
            y = _local_sgd(x, data, batches, lr, correction=corr)
            k = len(batches)  # the client's number of real steps
            ci_new = [cl - cg + (xa - ya) / (k * lr) for cl, cg, xa, ya in zip(ci, c, x, y)]
            dys.append([ya - xa for ya, xa in zip(y, x)])
            dcs.append([a - b for a, b in zip(ci_new, ci)])
            updates[cid] = ci_new
        mean_dy = [sum(pi * d[j] for pi, d in zip(p, dys)) / p.sum() for j in range(2)]
        x = [xa + global_lr * d for xa, d in zip(x, mean_dy)]
        c = [c[j] + sum(d[j] for d in dcs) / data.num_clients for j in range(2)]
        for cid, v in updates.items():
            table[cid] = v
    return x, c, table, cohorts


def test_scaffold_two_rounds_control_variates_and_global_step():
    # seed 0 samples {0, 4, 5} then {3, 4, 5}: clients 4 and 5 reuse their round-1 c_i in
    # round 2, and clients 1 and 2 are never sampled.
    data = _toy(SIZES)
    lr, global_lr, m, seed, rounds = 0.2, 0.7, 3, 0, 2
    alg = fs.algorithms.scaffold(lr, global_lr, local_epochs=2, batch_size=4)
    assert alg.weighting == "uniform"
    model = logistic_regression((FEATURES,), CLASSES)
    result = fs.simulate(model, alg, data, rounds=rounds, clients_per_round=m, seed=seed,
                         progress=False, engine=ONE_ROUND_PER_CALL)
    x, c, table, cohorts = _scaffold_reference(data, _init(model, seed), _schedule(data, alg),
                                               seed, rounds, m, lr, global_lr, alg.weighting)
    sampled = set(cohorts[0]) | set(cohorts[1])
    never = sorted(set(range(data.num_clients)) - sampled)
    assert set(cohorts[0]) & set(cohorts[1]) and never, cohorts  # the seed's premise
    schedule = _schedule(data, alg)
    steps = {len(b) for r in range(rounds) for _, _, b in _round_plan(data, schedule, seed, r, m)}
    assert len(steps) > 1, steps  # K differs between clients

    _assert_params(result, x)

    got_k = np.asarray(result.client_states["dense"]["kernel"])
    got_b = np.asarray(result.client_states["dense"]["bias"])
    assert got_k.shape == (data.num_clients, FEATURES, CLASSES)
    assert got_b.shape == (data.num_clients, CLASSES)
    for cid in range(data.num_clients):
        np.testing.assert_allclose(got_k[cid], table[cid][0], atol=ATOL, err_msg=f"c_{cid} kernel")
        np.testing.assert_allclose(got_b[cid], table[cid][1], atol=ATOL, err_msg=f"c_{cid} bias")
    for cid in never:
        assert not got_k[cid].any() and not got_b[cid].any(), cid  # exactly zero
    for cid in sampled:
        assert np.abs(got_k[cid]).max() > 1e-3, cid  # sampled clients really moved

    control = result.server_state.control
    np.testing.assert_allclose(control["dense"]["kernel"], c[0], atol=ATOL)
    np.testing.assert_allclose(control["dense"]["bias"], c[1], atol=ATOL)
    # invariant (c and all c_i start at 0): c = mean over ALL N clients of c_i
    np.testing.assert_allclose(control["dense"]["kernel"], got_k.mean(0), atol=1e-6)
    np.testing.assert_allclose(control["dense"]["bias"], got_b.mean(0), atol=1e-6)


# -- FedNova ---------------------------------------------------------------------------

def _a_norm(tau, lr, momentum, mu):
    """||a||_1 built from the coefficient vector a (not the closed form): for the update
    x - y_tau = lr sum_t a_t g_t, momentum gives a_t = sum_{k < tau-t} rho^k and the
    proximal term a_t = (1 - lr mu)^(tau-1-t)."""
    t = np.arange(tau)
    if momentum:
        a = np.array([sum(momentum ** k for k in range(tau - s)) for s in t])
    elif mu:
        a = (1 - lr * mu) ** (tau - 1 - t)
    else:
        a = np.ones(tau)
    return np.abs(a).sum()


def _fednova_reference(data, w, schedule, seed, rounds, m, lr, momentum, mu, weighting):
    x = [a.copy() for a in w]
    for r in range(rounds):
        plan = _round_plan(data, schedule, seed, r, m)
        p = _weights(plan, weighting)
        p = p / p.sum()
        ds, norms = [], []
        for _, _, batches in plan:
            y = _local_sgd(x, data, batches, lr, anchor=x, mu=mu, momentum=momentum)
            a = _a_norm(len(batches), lr, momentum, mu)
            ds.append([(xa - ya) / a for xa, ya in zip(x, y)])
            norms.append(a)
        tau_eff = float(np.dot(p, norms))
        x = [x[j] - tau_eff * sum(pi * d[j] for pi, d in zip(p, ds)) for j in range(2)]
    return x


@pytest.mark.parametrize("variant", [
    dict(momentum=0.0, proximal_mu=0.0, weighting="num_examples"),
    dict(momentum=0.9, proximal_mu=0.0, weighting="num_examples"),
    dict(momentum=0.0, proximal_mu=0.5, weighting="uniform"),
], ids=["sgd", "momentum", "proximal_uniform"])
def test_fednova_equals_numpy_reference(variant):
    data = _toy(SIZES)
    lr, m, seed, rounds = 0.1, 4, 1, 2
    alg = fs.algorithms.fednova(lr, local_epochs=2, batch_size=4, **variant)
    model = logistic_regression((FEATURES,), CLASSES)
    result = fs.simulate(model, alg, data, rounds=rounds, clients_per_round=m, seed=seed,
                         progress=False, engine=ONE_ROUND_PER_CALL)
    schedule = _schedule(data, alg)
    steps = {len(b) for r in range(rounds) for _, _, b in _round_plan(data, schedule, seed, r, m)}
    assert len(steps) > 1, steps  # clients really take different numbers of steps
    expected = _fednova_reference(data, _init(model, seed), schedule, seed, rounds, m, lr,
                                  variant["momentum"], variant["proximal_mu"], variant["weighting"])
    _assert_params(result, expected)


def test_fednova_equals_fedavg_when_clients_have_equal_sizes():
    data = _toy([8, 8, 8, 8, 8])
    lr, m, seed = 0.2, 3, 4
    model = logistic_regression((FEATURES,), CLASSES)
    kw = dict(local_epochs=2, batch_size=3)
    nova = fs.simulate(model, fs.algorithms.fednova(lr, momentum=0.5, **kw), data, rounds=2,
                       clients_per_round=m, seed=seed, progress=False,
                       engine=ONE_ROUND_PER_CALL)
    avg = fs.simulate(model, fs.algorithms.fedavg(optax.sgd(lr, momentum=0.5), **kw), data,
                      rounds=2, clients_per_round=m, seed=seed, progress=False,
                      engine=ONE_ROUND_PER_CALL)
    for a, b in zip(jax.tree_util.tree_leaves(nova.params), jax.tree_util.tree_leaves(avg.params)):
        np.testing.assert_allclose(a, b, atol=ATOL)
    p0 = _init(model, seed)
    assert not np.allclose(np.asarray(nova.params["dense"]["kernel"]), p0[0], atol=1e-3)


# -- errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("make, reason", [
    (lambda: fs.algorithms.scaffold(0.1), "Scaffold: each client also sends its control-variate"),
    (lambda: fs.algorithms.fednova(0.1, weighting="uniform"),
     "FedNova: each client also sends its number"),
], ids=["scaffold", "fednova"])
def test_client_level_dp_is_refused(make, reason):
    data = _toy([4, 5, 6, 7])
    model = logistic_regression((FEATURES,), CLASSES)
    dp = fs.privacy.ClientLevelDP(noise_multiplier=1.0, clip_norm=1.0, delta=1e-5)
    alg = make()
    assert alg.weighting == "uniform"  # refused for what the client sends, not the weighting
    with pytest.raises(fs.UserError, match="client-level DP does not apply to " + reason):
        fs.simulate(model, alg, data, rounds=1, clients_per_round=2, privacy=dp,
                    progress=False, engine=ONE_ROUND_PER_CALL)


@pytest.mark.parametrize("make, name", [
    (lambda: fs.algorithms.fedprox(optax.sgd(0.1), -0.1), "FedProx's mu"),
    (lambda: fs.algorithms.fednova(0.1, proximal_mu=-1.0), "proximal mu"),
    (lambda: fs.algorithms.fednova(0.1, momentum=1.0), "momentum"),
    (lambda: fs.algorithms.fednova(0.1, momentum=1.5), "momentum"),
    (lambda: fs.algorithms.fednova(0.1, momentum=-0.1), "momentum"),
    (lambda: fs.algorithms.fednova(0.1, momentum=0.5, proximal_mu=0.1), "momentum and proximal_mu"),
    (lambda: fs.algorithms.fednova(0.5, proximal_mu=2.0), r"learning_rate \* mu < 1"),
    (lambda: fs.algorithms.fednova(0.0), "learning_rate"),
    (lambda: fs.algorithms.fednova(-0.1), "learning_rate"),
    (lambda: fs.algorithms.scaffold(0.0), "learning_rate"),
    (lambda: fs.algorithms.scaffold(-1.0), "learning_rate"),
])
def test_bad_hyperparameters_raise_user_error_naming_them(make, name):
    with pytest.raises(fs.UserError, match=name):
        make()
