"""Compile once, run many: a second `simulate()` that changes only runtime hyperparameters
(an injected learning rate, FedProx's mu, the DP clip norm and noise multiplier, the seed)
neither traces nor compiles, and trains exactly as a program compiled for its own values
(a plain `optax.sgd(lr)`, whose learning rate is a constant of its program). Programs that
differ in what they bake in are not confused."""

import collections
import contextlib
import functools

import jax
import numpy as np
import optax
import pytest
from jax import monitoring

import fedjax_sim as fs
from fedjax_sim.data import FederatedData
from fedjax_sim.engine import hyperparams, program_cache
from fedjax_sim.engine.program_cache import structural_key
from fedjax_sim.models import get_model
from fedjax_sim.privacy import ClientLevelDP

from helpers import toy_clients

_EVENTS = collections.Counter()
_WATCHING = []


def _listener(event, duration, **kwargs):
    del duration, kwargs
    if _WATCHING:
        _EVENTS[event] += 1


monitoring.register_event_duration_secs_listener(_listener)


@contextlib.contextmanager
def _compiles():
    """Counts what JAX traces and compiles inside the block."""
    _EVENTS.clear()
    _WATCHING.append(True)
    try:
        yield _EVENTS
    finally:
        _WATCHING.pop()


TRACE = "/jax/core/compile/jaxpr_trace_duration"
COMPILE = "/jax/core/compile/backend_compile_duration"


@functools.lru_cache(maxsize=None)
def _model():
    return get_model("mlp", (6,), 3, hidden=[8])


@functools.lru_cache(maxsize=None)
def _data():
    x, y, offsets = toy_clients([12, 7, 20, 9, 15, 11], features=6, classes=3, seed=4)
    return FederatedData({"x": x, "y": y}, offsets, tuple(f"c{i}" for i in range(6)))


def _run(algorithm, seed=1, **kwargs):
    model = _model()
    x, y, _ = toy_clients([30], features=6, classes=3, seed=5)
    return fs.simulate(model, algorithm, _data(), rounds=3, clients_per_round=3, seed=seed,
                       eval_data={"x": x, "y": y}, eval_every=3, progress=False, **kwargs)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(v)) for v in jax.tree_util.tree_leaves(tree)])


def _sgd(lr):
    return fs.algorithms.tunable(optax.sgd, learning_rate=lr)


def test_changing_an_injected_learning_rate_neither_traces_nor_compiles():
    # optax.inject_hyperparams directly, or through fs.algorithms.tunable
    _run(fs.algorithms.fedavg(_sgd(0.3), optax.inject_hyperparams(optax.adam)(learning_rate=0.01)))
    with _compiles() as events:
        again = _run(fs.algorithms.fedavg(_sgd(0.1), optax.inject_hyperparams(optax.adam)(
            learning_rate=0.02)))
    assert events[TRACE] == 0 and events[COMPILE] == 0, dict(events)
    assert again.summary["engine"]["program_cache"] == "hit"
    # As compiled afresh for these values: the same numbers, bit for bit.
    program_cache.clear()
    fresh = _run(fs.algorithms.fedavg(_sgd(0.1), optax.inject_hyperparams(optax.adam)(
        learning_rate=0.02)))
    assert fresh.summary["engine"]["program_cache"] == "compiled"
    np.testing.assert_array_equal(_flat(again.params), _flat(fresh.params))
    assert again.history == fresh.history
    # The reference: optimizers whose values are constants of their program (XLA folds
    # constants, so the same up to float32 round-off).
    plain = _run(fs.algorithms.fedavg(optax.sgd(0.1), optax.adam(0.02)))
    np.testing.assert_allclose(_flat(again.params), _flat(plain.params), rtol=1e-5, atol=2e-6)


def test_changing_the_seed_neither_traces_nor_compiles():
    # The seed reaches the model's state too (the MLP's dropout key): that state is an
    # input of the round program, not a constant of it.
    _run(fs.algorithms.fedavg(_sgd(0.3)), seed=1)
    with _compiles() as events:
        again = _run(fs.algorithms.fedavg(_sgd(0.3)), seed=2)
    assert events[TRACE] == 0 and events[COMPILE] == 0, dict(events)
    assert again.summary["engine"]["program_cache"] == "hit"
    program_cache.clear()
    fresh = _run(fs.algorithms.fedavg(_sgd(0.3)), seed=2)
    np.testing.assert_array_equal(_flat(again.params), _flat(fresh.params))
    assert again.history == fresh.history


@pytest.mark.slow
def test_fedprox_mu_and_dp_clip_and_noise_are_runtime_inputs():
    def private(clip, noise):
        return ClientLevelDP(noise_multiplier=noise, clip_norm=clip, delta=1e-3)

    def fedprox(mu):
        return fs.algorithms.fedprox(_sgd(0.2), mu, weighting="uniform")

    _run(fedprox(0.5), privacy=private(1.0, 0.5))
    with _compiles() as events:
        again = _run(fedprox(0.05), privacy=private(0.3, 1.5))
    assert events[TRACE] == 0 and events[COMPILE] == 0, dict(events)
    assert again.history[-1]["dp_clip_norm"] == pytest.approx(0.3)
    assert again.history[-1]["dp_noise_std"] == pytest.approx(1.5 * 0.3 / 3)
    program_cache.clear()
    fresh = _run(fedprox(0.05), privacy=private(0.3, 1.5))
    np.testing.assert_array_equal(_flat(again.params), _flat(fresh.params))
    plain = _run(fs.algorithms.fedprox(optax.sgd(0.2), 0.05, weighting="uniform"),
                 privacy=private(0.3, 1.5))
    np.testing.assert_allclose(_flat(again.params), _flat(plain.params), rtol=1e-5, atol=2e-6)


@pytest.mark.slow
def test_what_a_program_bakes_in_is_part_of_its_key():
    _run(fs.algorithms.fedavg(optax.sgd(0.1)))
    first = _run(fs.algorithms.fedavg(optax.sgd(0.1)))
    assert first.summary["engine"]["program_cache"] == "hit"  # the same constants
    # A constant learning rate, a local schedule, FedProx's mu switched on: new programs.
    for algorithm in (fs.algorithms.fedavg(optax.sgd(0.2)),
                      fs.algorithms.fedavg(optax.sgd(0.1), batch_size=5),
                      fs.algorithms.fedprox(optax.sgd(0.1), 0.1)):
        assert _run(algorithm).summary["engine"]["program_cache"] == "compiled"


def test_structural_key_follows_closures_and_leaves_out_only_declared_runtime_fields():
    def make(scale):
        return lambda x: x * scale

    assert structural_key(make(2.0)) == structural_key(make(2.0))
    assert structural_key(make(2.0)) != structural_key(make(3.0))
    assert structural_key(optax.adam(1e-3)) == structural_key(optax.adam(1e-3))
    assert structural_key(optax.adam(1e-3)) != structural_key(optax.adam(2e-3))
    assert structural_key(np.arange(4.0)) != structural_key(np.arange(4.0) + 1)
    # An injected optimizer's values are left out only where its owner declares them.
    a = fs.algorithms.fedavg(_sgd(0.1))
    b = fs.algorithms.fedavg(_sgd(0.7))
    assert structural_key(a) != structural_key(b)
    assert structural_key(a, tuple(a.hyperparams())) == structural_key(b, tuple(b.hyperparams()))
    assert structural_key(_sgd(0.1)) != structural_key(_sgd(0.7))
    # An object it cannot see into is keyed by identity.
    class Opaque:
        __slots__ = ()

        def __call__(self):
            return 1

    assert structural_key(Opaque()) != structural_key(Opaque())


def test_injected_optimizer_rebuilt_from_values_updates_like_the_original():
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=0.05, b1=0.8)
    assert set(hyperparams.values(tx)) == {"learning_rate", "b1", "b2", "eps", "eps_root"}
    rebuilt = hyperparams.with_values(tx, {**hyperparams.values(tx), "learning_rate": 0.01})
    reference = optax.adam(0.01, b1=0.8)
    params = {"w": np.linspace(-1, 1, 5).astype(np.float32)}
    grads = {"w": np.array([0.3, -0.2, 0.1, 0.0, 0.5], np.float32)}
    s1, s2 = rebuilt.init(params), reference.init(params)
    for _ in range(3):
        u1, s1 = rebuilt.update(grads, s1, params)
        u2, s2 = reference.update(grads, s2, params)
        np.testing.assert_allclose(u1["w"], u2["w"], rtol=2e-5)
    assert hyperparams.injected(optax.sgd(0.1)) is None


FRESH_PROCESS = r"""
import json, sys
import numpy as np
from fedjax_sim.cli.config import load_config
from fedjax_sim.cli.experiment import run
config = load_config(sys.argv[1], {"rounds": "3", "eval_every": "3",
                                   "algorithm.client_optimizer.learning_rate": "0.05"})
result = run(config, None, progress=False)
flat = np.concatenate([np.ravel(np.asarray(v)) for v in __import__("jax").tree_util.tree_leaves(result.params)])
print(json.dumps({"history": result.history, "params": flat.tolist()}))
"""


@pytest.mark.slow
def test_a_config_with_a_changed_learning_rate_equals_a_fresh_process(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from fedjax_sim.cli.config import load_config
    from fedjax_sim.cli.experiment import run

    config = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "digits_fedavg.py")
    runs = []
    for lr in ("0.1", "0.05"):
        overrides = {"rounds": "3", "eval_every": "3",
                     "algorithm.client_optimizer.learning_rate": lr}
        with _compiles() as events:
            runs.append(run(load_config(config, overrides), None, progress=False))
    assert events[COMPILE] == 0 and runs[1].summary["engine"]["program_cache"] == "hit"
    env = dict(os.environ, FEDJAX_SIM_COMPILATION_CACHE="0")
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, config], env=env, check=True,
                          capture_output=True, text=True)
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    np.testing.assert_array_equal(_flat(runs[1].params), np.asarray(fresh["params"], np.float32))
    assert json.loads(json.dumps(runs[1].history)) == fresh["history"]
