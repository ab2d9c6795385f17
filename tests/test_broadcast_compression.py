"""Server -> client compression (`algorithms.compressed_broadcast`): the broadcast quantizer
is unbiased within variance bounds, FedAvg rounds with a compressed broadcast equal a numpy
re-implementation (same random draws, scipy's Hadamard matrix), the bytes sent down match
a hand count, and bad arguments get one-line errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

import fedjax_sim as fs
from fedjax_sim.algorithms import RoundSums, compressed_broadcast
from fedjax_sim.algorithms.broadcast import compress, compressed_message
from fedjax_sim.data import FederatedData
from fedjax_sim.engine.contracts import Message
from fedjax_sim.errors import UserError
from fedjax_sim.models import logistic_regression

from helpers import logreg_grad, toy_clients

FEATURES, CLASSES, SIZES, LR, STEPS = 5, 3, [3, 6, 4, 8, 5, 7], 0.3, 2
ENTRIES = FEATURES * CLASSES + CLASSES  # 18: the logistic regression's bias and kernel


def _params(seed=0):
    rng = np.random.default_rng(seed)
    return {"bias": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
            "kernel": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}  # d = 29


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float64))
                           for x in jax.tree_util.tree_leaves(tree)])


def _broadcasts(alg, params, rounds):
    """Every round's broadcast (flattened) of `alg` over rounds that leave the model as it
    is (a zero aggregate under server SGD): only the compression's key moves on."""
    zero = jax.tree_util.tree_map(jnp.zeros_like, params)

    def step(state, _):
        sent = alg.broadcast(state)
        state = alg.server_update(state, zero, RoundSums(None, jnp.float32(1), 1))
        return state, jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(sent)])

    _, out = jax.jit(lambda s: jax.lax.scan(step, s, None, length=rounds))(alg.server_init(params))
    return np.asarray(out, np.float64)


# -- the quantizer ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 8])
def test_broadcast_is_unbiased_and_on_the_levels(bits):
    params, rounds = _params(bits), 4000
    alg = compressed_broadcast(fs.algorithms.fedavg(optax.sgd(1.0)), bits)
    q, x = _broadcasts(alg, params, rounds), _flat(params)
    lo, hi = x.min(), x.max()
    step = (hi - lo) / (2 ** bits - 1)
    t = (x - lo) / step
    below, frac = lo + np.floor(t) * step, t - np.floor(t)
    tol = 1e-5 * (hi - lo)
    # every round sends a level just below or just above each entry
    assert ((np.abs(q - below) <= tol) | (np.abs(q - below - step) <= tol)).all()
    # the mean of the rounds within 6 standard errors of the variance s^2 p (1 - p)
    std_err = np.sqrt(step ** 2 * frac * (1 - frac) / rounds)
    assert (np.abs(q.mean(0) - x) <= 6 * std_err + tol).all()
    assert not np.array_equal(q[0], q[1])  # each round draws afresh


@pytest.mark.parametrize("bits", [2, 6])
def test_rotated_broadcast_is_unbiased(bits):
    params, rounds = _params(10 + bits), 4000
    alg = compressed_broadcast(fs.algorithms.fedavg(optax.sgd(1.0)), bits, rotation="hadamard")
    q, x = _broadcasts(alg, params, rounds), _flat(params)
    # x^ = R^-1 Q(R x) with R orthogonal: Var x^_j = sum_k R_kj^2 Var Q_k <= s^2 / 4, and
    # the rotated range is at most 2 ||x||, so Var x^_j <= ||x||^2 / (2^k - 1)^2
    std_err = np.linalg.norm(x) / (2 ** bits - 1) / np.sqrt(rounds)
    assert (np.abs(q.mean(0) - x) <= 6 * std_err).all()
    # the rotation spreads the error: a round's broadcast is not on the unrotated levels
    assert np.abs(q[0] - x).max() > 1e-3 and not np.array_equal(q[0], q[1])


def test_other_leaves_pass_and_narrow_floats_keep_their_dtype():
    tree = {"count": jnp.arange(3, dtype=jnp.int32), "w": jnp.linspace(-1, 1, 7),
            "h": jnp.ones((2, 2), jnp.bfloat16)}
    out = compress(tree, 4, None, jax.random.key(0))
    np.testing.assert_array_equal(out["count"], tree["count"])
    assert out["h"].dtype == jnp.bfloat16 and out["w"].dtype == jnp.float32
    # the range spans w and h together: [-1, 1] in 15 steps, so every entry lands on a level
    levels = -1 + 2 / 15 * np.arange(16)
    for v in (out["w"], out["h"]):
        v = np.asarray(v, np.float64).ravel()
        assert (np.abs(v[:, None] - levels[None]).min(1) <= 1e-2).all()
    # 7 + 4 values of 4 bits, 64 bits of range, three int32 as they are
    assert compressed_message(tree, 4, None).bits == 11 * 4 + 64 + 3 * 32
    assert compressed_message(tree, 4, "hadamard").bits == 16 * 4 + 64 + 3 * 32


# -- rounds against numpy ---------------------------------------------------------------------
def _toy():
    x, y, offsets = toy_clients(SIZES, FEATURES, CLASSES, seed=3)
    return FederatedData({"x": x, "y": y}, offsets, tuple(f"c{i}" for i in range(len(SIZES))))


def _np_quantize(x, bits, u):
    levels = 2 ** bits - 1
    lo, hi = x.min(), x.max()
    step = (hi - lo) / levels
    t = (x - lo) / step
    low = np.floor(t)
    return lo + np.clip(low + (u < t - low), 0, levels) * step


def _np_received(w, bits, rotation, key):
    """The broadcast of w (flat, float64) as the round's key draws it: Q(w), or
    R^T Q(R w) with R = H diag(signs) / sqrt(d') from scipy's Hadamard matrix."""
    k_rotation, k_rounding = jax.random.split(jax.random.fold_in(key, 0))
    d = w.size
    n = d if rotation is None else 1 << (d - 1).bit_length()
    u = np.asarray(jax.random.uniform(k_rounding, (n,), jnp.float32), np.float64)
    if rotation is None:
        return _np_quantize(w, bits, u)
    signs = np.asarray(jax.random.rademacher(k_rotation, (n,), jnp.float32), np.float64)
    r = scipy.linalg.hadamard(n) * signs[None, :] / np.sqrt(n)
    return (r.T @ _np_quantize(r @ np.pad(w, (0, n - d)), bits, u))[:d]


def _np_rounds(data, model, rounds, bits, rotation, seed):
    """FedAvg (uniform weights, full-batch SGD, every client every round) whose clients
    start from the round's compressed broadcast; the server subtracts the mean delta from
    its exact model. Flat order: bias, then kernel (jax's order of the params)."""
    params, _ = model.init(jax.random.fold_in(jax.random.key(0), fs.simulation.INIT_STREAM))
    w = _flat(params["dense"])
    clients = [(data.features["x"][lo:hi], data.features["y"][lo:hi])
               for lo, hi in zip(data.offsets[:-1], data.offsets[1:])]
    key = jax.random.key(seed)
    for _ in range(rounds):
        start = w if bits is None else _np_received(w, bits, rotation, key)
        deltas = []
        for x, y in clients:
            b, k = start[:CLASSES], start[CLASSES:].reshape(FEATURES, CLASSES)
            for _ in range(STEPS):
                gk, gb = logreg_grad(k, b, x, y)
                k, b = k - LR * gk, b - LR * gb
            deltas.append(start - np.concatenate([b, k.ravel()]))
        w = w - np.mean(deltas, axis=0)
        key = jax.random.fold_in(key, 1)
    return w


@pytest.mark.parametrize("rotation", [None, pytest.param("hadamard", marks=pytest.mark.slow)])
def test_fedavg_with_a_compressed_broadcast_equals_numpy(rotation):
    data, model = _toy(), logistic_regression((FEATURES,), CLASSES)
    inner = fs.algorithms.fedavg(optax.sgd(LR), local_epochs=None, local_steps=STEPS,
                                 batch_size=None, weighting="uniform")
    alg = compressed_broadcast(inner, 4, rotation=rotation, seed=7)
    result = fs.simulate(model, alg, data, rounds=3, clients_per_round=len(SIZES),
                         eval_every=100, progress=False)
    expected = _np_rounds(data, model, 3, 4, rotation, seed=7)
    np.testing.assert_allclose(_flat(result.params["dense"]), expected, atol=2e-5)
    # the compression matters: plain FedAvg ends elsewhere
    assert np.abs(_np_rounds(data, model, 3, None, None, 0) - expected).max() > 1e-3
    # down: 18 values (32 rotated) of 4 bits and 64 bits of range, for each of the 6 clients
    per_client = (ENTRIES * 4 + 64) / 8 if rotation is None else (32 * 4 + 64) / 8
    for row in result.history:
        assert row["downlink_bytes_per_client"] == per_client
        assert row["downlink_bytes"] == per_client * len(SIZES)
    assert result.summary["downlink_bytes_total"] == 3 * per_client * len(SIZES)


# -- bytes and delegation ---------------------------------------------------------------------
def _sent_down(alg, params):
    """The bytes `alg` sends each client, from the broadcast's shapes (traced, not run)."""
    return alg.downlink(jax.eval_shape(lambda p: alg.broadcast(alg.server_init(p)), params)).bytes


def test_downlink_counts_by_hand_and_is_unchanged_without_the_wrapper():
    params = {"dense": _params()}  # 29 float32 entries
    sgd = optax.sgd(0.1)
    plain = {"fedavg": fs.algorithms.fedavg(sgd), "fednova": fs.algorithms.fednova(0.1),
             "ditto": fs.algorithms.ditto(sgd), "fedper": fs.algorithms.fedper(sgd, "dense/bias"),
             "scaffold": fs.algorithms.scaffold(0.1)}
    for name, alg in plain.items():
        sent = 2 if name == "scaffold" else 1  # SCAFFOLD sends the model and its control variate
        assert _sent_down(alg, params) == sent * 29 * 4, name
        assert _sent_down(compressed_broadcast(alg, 8), params) == (sent * 29 * 8 + 64) / 8, name
        rotated = compressed_broadcast(alg, 3, rotation="hadamard")
        d_padded = 32 if sent == 1 else 64
        assert _sent_down(rotated, params) == (d_padded * 3 + 64) / 8, name
    # FedBN's wrapper sends what the algorithm it wraps sends
    inner = compressed_broadcast(plain["fedavg"], 8)
    assert _sent_down(fs.algorithms.LocalStatistics.wrap(inner, {}), params) == (29 * 8 + 64) / 8
    # a broadcast of mixed dtypes, as it is: each array at its width
    mixed = {"a": jnp.zeros(3, jnp.float32), "n": jnp.zeros(2, jnp.int8)}
    as_it_is = fs.algorithms.Algorithm.downlink(plain["fedavg"], mixed)
    assert as_it_is == Message(0, 0, 0, 3 * 32 + 2 * 8)


def test_the_wrapper_keeps_the_inner_algorithms_roles():
    ditto = fs.algorithms.ditto(optax.sgd(0.1), batch_size=5, weighting="uniform")
    alg = compressed_broadcast(ditto, 8)
    assert alg.personalized and alg.global_model and alg.client_dp is None
    assert alg.local_schedule == ditto.local_schedule and alg.weighting == "uniform"
    params = _params()
    state = alg.server_init(params)
    assert alg.params(state) is state.inner.params
    assert alg.personal_params(params, "own") == "own"  # Ditto's personal model: the state
    fedper = compressed_broadcast(fs.algorithms.fedper(optax.sgd(0.1), "bias"), 8)
    assert fedper.personalized and not fedper.global_model
    scaffold = compressed_broadcast(fs.algorithms.scaffold(0.1), 8)
    assert scaffold.client_dp == fs.algorithms.scaffold(0.1).client_dp
    assert scaffold.weighting == "uniform"


@pytest.mark.parametrize("call, message", [
    (lambda a: compressed_broadcast(a, 0), "bits must be an integer from 1 to 16"),
    (lambda a: compressed_broadcast(a, 17), "bits must be an integer from 1 to 16"),
    (lambda a: compressed_broadcast(a, 8.0), "bits must be an integer from 1 to 16"),
    (lambda a: compressed_broadcast(a, True), "bits must be an integer from 1 to 16"),
    (lambda a: compressed_broadcast(a, 8, rotation="dct"), "rotation must be None or 'hadamard'"),
    (lambda a: compressed_broadcast(a, 8, seed="x"), "seed must be an integer"),
    (lambda a: compressed_broadcast(optax.sgd(0.1), 8), "wraps an algorithm"),
    (lambda a: dataclasses.replace(compressed_broadcast(a, 8), batch_size=3),
     "set batch_size, local_epochs, local_steps and weighting on it"),
])
def test_bad_arguments_get_one_line_errors(call, message):
    with pytest.raises(UserError, match=message) as info:
        call(fs.algorithms.fedavg(optax.sgd(0.1)))
    assert "\n" not in str(info.value)


# -- digits --------------------------------------------------------------------------------------
def _digits_run(algorithm, rounds=8):
    train, test = fs.data.load_digits()
    clients = fs.data.partition(train, train["y"], "dirichlet", 12, seed=0, alpha=1.0)
    model = fs.models.get_model("logistic_regression", (8, 8, 1), 10)  # 650 entries
    return fs.simulate(model, algorithm, clients, rounds=rounds, clients_per_round=6, seed=1,
                       eval_data=test, eval_every=rounds, progress=False)


@pytest.mark.slow  # three runs, each compiled (~9 s apiece on a 2-core CPU)
def test_8_bit_broadcast_stays_close_to_plain_fedavg():
    fedavg = fs.algorithms.fedavg(optax.sgd(0.3), batch_size=20)
    plain = _digits_run(fedavg)
    ref = _flat(plain.params)
    for rotation in (None, "hadamard"):
        run = _digits_run(compressed_broadcast(fedavg, 8, rotation=rotation))
        # 8 bits: each client starts within a level (range / 255) of the server's model
        assert np.linalg.norm(_flat(run.params) - ref) <= 0.02 * np.linalg.norm(ref)
        assert abs(run.history[-1]["test_accuracy"] - plain.history[-1]["test_accuracy"]) <= 0.02
        entries = 650 if rotation is None else 1024
        assert run.history[0]["downlink_bytes_per_client"] == (entries * 8 + 64) / 8
    assert plain.history[0]["downlink_bytes_per_client"] == 650 * 4


@pytest.mark.slow  # three runs, each compiled
def test_a_resumed_run_draws_the_same_broadcasts(tmp_path):
    # SCAFFOLD: the broadcast holds the model and the control variate, clients keep state
    data, model = _toy(), logistic_regression((FEATURES,), CLASSES)
    alg = compressed_broadcast(fs.algorithms.scaffold(LR, batch_size=None, local_epochs=None,
                                                      local_steps=STEPS), 3, rotation="hadamard")
    kw = dict(clients_per_round=3, eval_every=100, progress=False)
    straight = fs.simulate(model, alg, data, rounds=6, **kw)
    every = fs.CheckpointOptions(every_rounds=1)
    fs.simulate(model, alg, data, rounds=3, workdir=str(tmp_path), checkpoint=every, **kw)
    resumed = fs.simulate(model, alg, data, rounds=6, workdir=str(tmp_path), checkpoint=every, **kw)
    np.testing.assert_array_equal(_flat(resumed.params), _flat(straight.params))
    # 2 x 18 values padded to 64, of 3 bits, and 64 bits of range
    assert resumed.history[-1]["downlink_bytes_per_client"] == (64 * 3 + 64) / 8
