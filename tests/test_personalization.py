"""Personalized algorithms (FedPer / FedRep, Ditto), per-client states (device- and
host-kept, checkpointed) and personalized evaluation, against plain-numpy references.

The references use the engine's pure functions only to rebuild each round's cohort and
each client's batch indices (`split_round_key`, `client_randomness`, `client_batches`);
all training and evaluation math is a numpy float64 two-layer MLP written out here.
"""

import functools
import shutil

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
from fedjax_sim.simulation.evaluation import FINETUNE_STREAM, FineTune

from helpers import softmax, toy_clients

FEATURES, CLASSES, HIDDEN = 4, 3, 5
INIT_STREAM = 0x1A17  # simulate() initialises the model from fold_in(root, 0x1A17)
ATOL = 1e-5
# Local steps in a rolled scan and one round per call: the cheapest programs to compile
# (test_engine checks that the engine's strategies agree).
FAST = fs.EngineOptions(unroll=1, rounds_per_call=1)

# FedPer runs without client_eval_data warn that nothing will be evaluated: intended here.
pytestmark = pytest.mark.filterwarnings("ignore:FedPer has no global model:UserWarning")


# -- data and model ------------------------------------------------------------------------

def _toy(sizes, seed=0):
    x, y, offsets = toy_clients(sizes, FEATURES, CLASSES, seed)
    return FederatedData({"x": x, "y": y}, offsets, tuple(f"c{i}" for i in range(len(sizes))))


def _model():
    return fs.models.mlp((FEATURES,), CLASSES, hidden=(HIDDEN,))


@functools.lru_cache(maxsize=None)
def _initial_params(seed):
    params, _ = _model().init(jax.random.fold_in(jax.random.key(seed), INIT_STREAM))
    return params


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _assert_trees_close(a, b, atol=1e-6, err_msg=""):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        np.testing.assert_allclose(u, v, atol=atol, rtol=0, err_msg=err_msg)


# -- a numpy float64 two-layer MLP (relu hidden layer, softmax cross-entropy) ---------------

BODY, HEAD = ("W1", "b1"), ("W2", "b2")


def _to_np(params):
    f = lambda a: np.asarray(a, np.float64).copy()
    return {"W1": f(params["hidden"][0]["kernel"]), "b1": f(params["hidden"][0]["bias"]),
            "W2": f(params["out"]["kernel"]), "b2": f(params["out"]["bias"])}


def _client_np(tree, i):
    """Client i's row of a per-client MLP parameter tree (Ditto's states)."""
    return _to_np(jax.tree_util.tree_map(lambda x: np.asarray(x)[i], tree))


def _logits(q, x):
    x = np.asarray(x, np.float64)
    a = x @ q["W1"] + q["b1"]
    h = np.maximum(a, 0.0)
    return a, h, h @ q["W2"] + q["b2"]


def _grads(q, x, y):
    """Gradient of the mean cross-entropy over the rows of x."""
    x = np.asarray(x, np.float64)
    a, h, z = _logits(q, x)
    d = softmax(z)
    d[np.arange(len(y)), y] -= 1.0
    d /= len(y)
    da = (d @ q["W2"].T) * (a > 0)
    return {"W1": x.T @ da, "b1": da.sum(0), "W2": h.T @ d, "b2": d.sum(0)}


def _sgd(q, x, y, batches, lr, keys=BODY + HEAD, anchor=None, lam=0.0):
    """Plain SGD on `keys` over the batches (row indices); with `anchor`, every gradient
    gets lam * (q - anchor) added (Ditto's pull)."""
    q = {k: v.copy() for k, v in q.items()}
    for rows in batches:
        g = _grads(q, x[rows], y[rows])
        for k in keys:
            pull = lam * (q[k] - anchor[k]) if anchor is not None else 0.0
            q[k] = q[k] - lr * (g[k] + pull)
    return q


def _evaluate(q, x, y):
    """(mean loss, accuracy) of the model on the rows given; NaN for no rows."""
    if len(y) == 0:
        return np.nan, np.nan
    _, _, z = _logits(q, x)
    p = softmax(z)
    loss = -np.log(p[np.arange(len(y)), y]).mean()
    return loss, (np.argmax(z, axis=1) == y).mean()


def _weighted_mean(models, weights, keys):
    w = np.asarray(weights, np.float64)
    return {k: sum(wi * m[k] for wi, m in zip(w, models)) / w.sum() for k in keys}


# -- the engine's cohorts and batch indices -------------------------------------------------

@functools.lru_cache(maxsize=None)
def _cohort_fn(num_clients, m):
    """Round r's cohort, drawn as the engine draws it (jitted once: eager draws are slow)."""
    return jax.jit(lambda root, r: jax.random.choice(split_round_key(root, r)[0], num_clients,
                                                     (m,), replace=False))


def _cohort(num_clients, m, seed, r):
    return [int(c) for c in np.asarray(_cohort_fn(num_clients, m)(jax.random.key(seed),
                                                                  jnp.int32(r)))]


@functools.lru_cache(maxsize=None)
def _batches_fn(schedule, max_size):
    """(key, n) -> a client's ([S, B] local indices, [S, B] mask), as the engine makes them."""
    num_bits = bits_needed(schedule, max_size)

    @jax.jit
    def batches(key, n):
        return client_batches(schedule, jax.random.bits(key, (num_bits,), jnp.uint32), n,
                              max_size)

    @jax.jit
    def client(k_clients, cid, n):
        _, _, bits = client_randomness(k_clients, cid, num_bits)
        return client_batches(schedule, bits, n, max_size)

    return batches, client


def _real_steps(data, cid, idx, mask):
    """Global row indices of each step that holds a real example."""
    idx, mask = np.asarray(idx), np.asarray(mask)
    off = int(data.offsets[cid])
    return [off + idx[s][mask[s]] for s in range(len(idx)) if mask[s].any()]


def _round_batches(data, schedule, seed, r, m):
    """[(client id, n, [global row indices of each real step])] of round r's cohort."""
    _, k_clients, _ = split_round_key(jax.random.key(seed), r)
    client = _batches_fn(schedule, data.max_client_size)[1]
    out = []
    for cid in _cohort(data.num_clients, m, seed, r):
        n = int(data.client_sizes[cid])
        idx, mask = client(k_clients, jnp.int32(cid), jnp.int32(n))
        out.append((cid, n, _real_steps(data, cid, idx, mask)))
    return out


def _schedule(data, algorithm):
    return make_schedule(data.max_client_size, batch_size=algorithm.batch_size,
                         local_epochs=algorithm.local_epochs, local_steps=algorithm.local_steps)


# -- 1. FedPer / FedRep ---------------------------------------------------------------------

FEDPER_SIZES = [5, 12, 3, 9, 16, 7, 2]
FEDPER_CASES = {
    # name: (head_passes, local_epochs, seed); the seeds give cohorts with a client sampled
    # in both rounds and clients never sampled
    "fedper": (None, 2, 0),
    "fedrep": (2, 1, 2),
}
FEDPER_LR, FEDPER_M, FEDPER_ROUNDS = 0.2, 3, 2


@pytest.fixture(scope="module", params=sorted(FEDPER_CASES))
def fedper_run(request):
    head_passes, epochs, seed = FEDPER_CASES[request.param]
    data = _toy(FEDPER_SIZES)
    alg = fs.algorithms.fedper(optax.sgd(FEDPER_LR), "out", head_passes=head_passes,
                               local_epochs=epochs, batch_size=4)
    result = fs.simulate(_model(), alg, data, rounds=FEDPER_ROUNDS, clients_per_round=FEDPER_M,
                         seed=seed, engine=FAST, progress=False)
    return request.param, data, alg, seed, result


def _fedper_reference(data, alg, seed):
    """(server model, per-client heads, sampled clients) after the rounds, in numpy."""
    x, y = data.features["x"], data.features["y"]
    schedule = _schedule(data, alg)
    server = _to_np(_initial_params(seed))
    heads = [{k: server[k].copy() for k in HEAD} for _ in range(data.num_clients)]
    sampled = []
    for r in range(FEDPER_ROUNDS):
        bodies, weights = [], []
        for cid, n, batches in _round_batches(data, schedule, seed, r, FEDPER_M):
            q = {**{k: server[k] for k in BODY}, **heads[cid]}
            if alg.head_passes is None:  # FedPer: body and head together
                q = _sgd(q, x, y, batches, FEDPER_LR)
            else:  # FedRep: the head alone (k passes), then the body alone
                for _ in range(alg.head_passes):
                    q = _sgd(q, x, y, batches, FEDPER_LR, keys=HEAD)
                q = _sgd(q, x, y, batches, FEDPER_LR, keys=BODY)
            heads[cid] = {k: q[k] for k in HEAD}
            bodies.append(q)
            weights.append(n)
            sampled.append(cid)
        server = {**server, **_weighted_mean(bodies, weights, BODY)}
    return server, heads, sampled


def test_fedper_and_fedrep_equal_numpy_reference(fedper_run):
    name, data, alg, seed, result = fedper_run
    ref_server, ref_heads, sampled = _fedper_reference(data, alg, seed)
    # the cohorts make the test meaningful: partial participation, a client sampled twice
    assert len(sampled) != len(set(sampled)), name
    assert len(set(sampled)) < data.num_clients, name

    got = _to_np(result.params)
    init = _to_np(_initial_params(seed))
    for k in BODY:  # the body is the weighted mean of the cohort's trained bodies
        np.testing.assert_allclose(got[k], ref_server[k], atol=ATOL, err_msg=f"{name} {k}")
        assert not np.allclose(got[k], init[k])
    for k in HEAD:  # the server's head is never trained
        np.testing.assert_array_equal(got[k], init[k], err_msg=f"{name} {k}")

    # client states: the head leaves in flattening order (out/bias, out/kernel), axis 0 = client
    states = result.client_states
    assert isinstance(states, tuple) and len(states) == 2
    bias, kernel = map(np.asarray, states)
    assert bias.shape == (data.num_clients, CLASSES)
    assert kernel.shape == (data.num_clients, HIDDEN, CLASSES)
    for cid in range(data.num_clients):
        np.testing.assert_allclose(bias[cid], ref_heads[cid]["b2"], atol=ATOL,
                                   err_msg=f"{name} client {cid} bias")
        np.testing.assert_allclose(kernel[cid], ref_heads[cid]["W2"], atol=ATOL,
                                   err_msg=f"{name} client {cid} kernel")
        if cid not in sampled:
            np.testing.assert_array_equal(bias[cid], init["b2"])
            np.testing.assert_array_equal(kernel[cid], init["W2"])
        else:
            assert not np.allclose(kernel[cid], init["W2"])


# -- 2 and 5. Ditto, with personalized and fine-tuned per-client evaluation -----------------

DITTO_SIZES = [6, 14, 4, 10, 18, 1, 8, 12]  # the size-1 client has no held-out example
DITTO_LR, DITTO_LAM, DITTO_M, DITTO_ROUNDS, DITTO_SEED = 0.1, 0.5, 3, 2, 4
TUNE = FineTune(steps=3, learning_rate=0.1, batch_size=4)


@pytest.fixture(scope="module")
def ditto_run():
    train, test = _toy(DITTO_SIZES, seed=1).split(0.3, seed=0)
    alg = fs.algorithms.ditto(optax.sgd(DITTO_LR), lam=DITTO_LAM, batch_size=4)
    result = fs.simulate(_model(), alg, train, rounds=DITTO_ROUNDS, clients_per_round=DITTO_M,
                         seed=DITTO_SEED, client_eval_data=test, finetune=TUNE, engine=FAST,
                         progress=False)
    return train, test, alg, result


def _ditto_reference(data, alg):
    """(global model, personal models, sampled clients) after the rounds, in numpy."""
    x, y = data.features["x"], data.features["y"]
    schedule = _schedule(data, alg)
    w = _to_np(_initial_params(DITTO_SEED))
    personal = [{k: v.copy() for k, v in w.items()} for _ in range(data.num_clients)]
    sampled = []
    for r in range(DITTO_ROUNDS):
        models, weights = [], []
        for cid, n, batches in _round_batches(data, schedule, DITTO_SEED, r, DITTO_M):
            models.append(_sgd(w, x, y, batches, DITTO_LR))
            weights.append(n)
            # v <- v - lr (grad f_i(v) + lam (v - w_round_start)), same batches
            personal[cid] = _sgd(personal[cid], x, y, batches, DITTO_LR, anchor=w, lam=DITTO_LAM)
            sampled.append(cid)
        w = _weighted_mean(models, weights, BODY + HEAD)
    return w, personal, sampled


def test_ditto_global_is_fedavg_and_personal_models_follow_the_pull(ditto_run):
    train, _, alg, result = ditto_run
    ref_w, ref_personal, sampled = _ditto_reference(train, alg)
    assert len(sampled) != len(set(sampled)) and len(set(sampled)) < train.num_clients

    got = _to_np(result.params)
    for k in BODY + HEAD:
        np.testing.assert_allclose(got[k], ref_w[k], atol=ATOL, err_msg=k)
    init = _to_np(_initial_params(DITTO_SEED))
    for cid in range(train.num_clients):
        v = _client_np(result.client_states, cid)
        for k in BODY + HEAD:
            np.testing.assert_allclose(v[k], ref_personal[cid][k], atol=ATOL,
                                       err_msg=f"client {cid} {k}")
            if cid not in sampled:
                np.testing.assert_array_equal(v[k], init[k], err_msg=f"client {cid} {k}")
    # the personal models are not the global one (lam is finite)
    assert not np.allclose(_client_np(result.client_states, sampled[0])["W1"], got["W1"], atol=1e-4)


def _finetuned(data, q, row, seed):
    """Client `row`'s model after the evaluator's fine-tuning, by numpy SGD on the batch
    indices the evaluator draws (fold_in(fold_in(root, FINETUNE_STREAM), row))."""
    schedule = make_schedule(data.max_client_size, batch_size=TUNE.batch_size,
                             local_epochs=None, local_steps=TUNE.steps)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), FINETUNE_STREAM), row)
    k_bits, _ = jax.random.split(key)
    batches_of = _batches_fn(schedule, data.max_client_size)[0]
    idx, mask = batches_of(k_bits, jnp.int32(int(data.client_sizes[row])))
    batches = _real_steps(data, row, idx, mask)
    assert len(batches) == TUNE.steps
    return _sgd(q, data.features["x"], data.features["y"], batches, TUNE.learning_rate)


def test_personalized_and_finetuned_client_metrics_equal_numpy(ditto_run):
    train, test, _, result = ditto_run
    metrics = result.client_metrics
    assert metrics["client_ids"] == list(train.client_ids)
    assert set(metrics) == {"client_ids", "test", "personal", "finetuned"}
    w = _to_np(result.params)
    tx, ty = test.features["x"], test.features["y"]
    expected = {"test": [], "personal": [], "finetuned": []}
    for cid in range(test.num_clients):
        rows = slice(int(test.offsets[cid]), int(test.offsets[cid + 1]))
        v = _client_np(result.client_states, cid)
        expected["test"].append(_evaluate(w, tx[rows], ty[rows]))
        expected["personal"].append(_evaluate(v, tx[rows], ty[rows]))
        expected["finetuned"].append(_evaluate(_finetuned(train, v, cid, DITTO_SEED),
                                               tx[rows], ty[rows]))
    counts = np.asarray(test.client_sizes, np.float64)
    assert counts[5] == 0  # the size-1 client: metrics are NaN
    for name, values in expected.items():
        loss, acc = map(np.asarray, zip(*values))
        got = metrics[name]
        np.testing.assert_array_equal(got["count"], counts, err_msg=name)
        np.testing.assert_allclose(got["accuracy"], acc, atol=ATOL, err_msg=name)
        np.testing.assert_allclose(got["loss"], loss, atol=ATOL, err_msg=name)
        summary = result.summary["final"]
        np.testing.assert_allclose(summary[f"client_{name}_accuracy_mean"], np.nanmean(acc),
                                   atol=ATOL, err_msg=name)
        np.testing.assert_allclose(summary[f"client_{name}_loss_mean"], np.nanmean(loss),
                                   atol=ATOL, err_msg=name)
    assert "client_personal_accuracy_mean" in result.summary["final"]
    assert "client_finetuned_accuracy_mean" in result.summary["final"]
    assert result.history[-1]["client_personal_accuracy_mean"] == \
        result.summary["final"]["client_personal_accuracy_mean"]
    # fine-tuning actually changed the models
    assert not np.allclose(metrics["finetuned"]["loss"][:5], metrics["personal"]["loss"][:5])


# -- 3 and 4. host-kept vs device-kept client states; checkpoint/resume with client states ---

STATE_SIZES = [7, 3, 12, 5, 9, 4]
STATE_M, STATE_ROUNDS, STATE_PER_CALL, STATE_SEED, STATE_EVERY = 3, 8, 4, 1, 2
CHECKPOINTS = fs.CheckpointOptions(every_rounds=STATE_EVERY, every_seconds=None, max_to_keep=3)


def _scaffold_run(placement, **kwargs):
    data = _toy(STATE_SIZES, seed=2)
    return fs.simulate(_model(), fs.algorithms.scaffold(0.1, batch_size=4), data,
                       rounds=STATE_ROUNDS, clients_per_round=STATE_M, seed=STATE_SEED,
                       progress=False,
                       engine=fs.EngineOptions(unroll=1, rounds_per_call=STATE_PER_CALL,
                                               client_states=placement), **kwargs)


def _checkpoint_steps(workdir):
    return sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())


@pytest.fixture(scope="module")
def device_run():
    """Client states on device, 4 rounds per call, no checkpoints."""
    return _scaffold_run("device")


@pytest.fixture(scope="module")
def host_run(tmp_path_factory):
    """Client states on host, checkpointed every 2 rounds (so calls of 2 rounds)."""
    workdir = tmp_path_factory.mktemp("host_states")
    return workdir, _scaffold_run("host", workdir=str(workdir), checkpoint=CHECKPOINTS)


def test_host_kept_client_states_equal_device_kept(device_run, host_run):
    _, host = host_run
    # Within every call (4 rounds on device, 2 on host: the checkpoint cadence cuts calls)
    # some client is sampled twice, so the streamed table must hand it its own updated row.
    cohorts = [_cohort(len(STATE_SIZES), STATE_M, STATE_SEED, r) for r in range(STATE_ROUNDS)]
    for per_call in (STATE_PER_CALL, STATE_EVERY):
        for start in range(0, STATE_ROUNDS, per_call):
            ids = [c for cohort in cohorts[start:start + per_call] for c in cohort]
            assert len(ids) > len(set(ids)), (per_call, start)
    assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(host.client_states))
    assert not any(isinstance(x, np.ndarray)
                   for x in jax.tree_util.tree_leaves(device_run.client_states))
    _assert_trees_close(device_run.params, host.params)
    _assert_trees_close(device_run.server_state, host.server_state)
    _assert_trees_close(device_run.client_states, host.client_states)
    assert [h["train_loss"] for h in host.history] == \
        pytest.approx([h["train_loss"] for h in device_run.history], rel=1e-6)
    # the control variates moved exactly for the clients sampled at least once
    sampled = {c for cohort in cohorts for c in cohort}
    assert len(sampled) == len(STATE_SIZES)  # 8 rounds of 3 out of 6: everyone took part
    kernels = np.asarray(device_run.client_states["out"]["kernel"])
    assert all(np.any(kernels[cid] != 0) for cid in range(len(STATE_SIZES)))


def test_checkpoint_resume_with_client_states_equals_uninterrupted_run(device_run, host_run):
    workdir, full = host_run
    assert _checkpoint_steps(workdir) == [4, 6, 8]
    # Stopped after round 4: the run is left as a process killed right after its round-4
    # checkpoint landed would leave it (later checkpoints never written).
    for step in (6, 8):
        shutil.rmtree(workdir / "checkpoints" / str(step))
    assert _checkpoint_steps(workdir) == [4]
    resumed = _scaffold_run("host", workdir=str(workdir), checkpoint=CHECKPOINTS)
    assert resumed.summary["resumed_from_round"] == 4
    assert [h["round"] for h in resumed.history] == list(range(1, STATE_ROUNDS + 1))
    assert resumed.history == full.history
    assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(resumed.client_states))
    _assert_trees_close(full.params, resumed.params, atol=0)
    _assert_trees_close(full.server_state, resumed.server_state, atol=0)
    _assert_trees_close(full.client_states, resumed.client_states, atol=0)
    _assert_trees_close(device_run.params, resumed.params)
    _assert_trees_close(device_run.client_states, resumed.client_states)
    assert _checkpoint_steps(workdir) == [4, 6, 8]


# -- 6. errors ------------------------------------------------------------------------------

def test_head_selecting_nothing_or_everything_is_a_user_error():
    data = _toy([4, 6, 5])
    names = ["hidden/0/bias", "hidden/0/kernel", "out/bias", "out/kernel"]
    with pytest.raises(fs.UserError, match="selects no parameter") as e:
        fs.simulate(_model(), fs.algorithms.fedper(optax.sgd(0.1), "head"), data, rounds=1,
                    clients_per_round=2, progress=False)
    assert "'head'" in str(e.value)
    for name in names:
        assert name in str(e.value)
    params = _initial_params(0)
    for everything in (("hidden", "out"), lambda name: True):
        alg = fs.algorithms.fedper(optax.sgd(0.1), everything)
        for init in (alg.server_init, alg.client_state_init):
            with pytest.raises(fs.UserError, match="selects every parameter"):
                init(params)


def test_finetuning_clients_that_are_not_training_clients_is_a_user_error():
    data = _toy([4, 6, 5])
    x, y, offsets = toy_clients([3, 3], FEATURES, CLASSES, seed=5)
    strangers = FederatedData({"x": x, "y": y}, offsets, ("c0", "zz"))
    with pytest.raises(fs.UserError, match="not among the training clients") as e:
        fs.simulate(_model(), fs.algorithms.fedavg(optax.sgd(0.1)), data, rounds=1,
                    clients_per_round=2, client_eval_data=strangers, finetune=TUNE,
                    progress=False)
    assert "'zz'" in str(e.value)
