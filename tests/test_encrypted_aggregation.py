"""Homomorphically encrypted aggregation (fedjax_sim.aggregators.encrypted) against numpy.

CKKS: the decrypted sum of m clients' weighted updates is within 4 m N / 2^scale_bits of
numpy's float64 sum (the encryption noise, whose standard deviation is about
0.17 sqrt(m) N / 2^scale_bits), plus the float32 rounding of the result. BFV: the sum equals
numpy's integer sum of the same fixed-point quantization, bit for bit. End to end, FedSGD on
the diabetes MLP with encrypted aggregation: 3 rounds against numpy's gradient descent on
the pooled data (what FedSGD with every client and full batches computes); in the slow
tier, the config's 300 rounds against the plaintext run (CKKS) and against the same
quantization summed on the host without encryption (BFV, bit for bit), and a mesh of 2.
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("tenseal")

import fedjax_sim as fs  # noqa: E402
from fedjax_sim.aggregators.encrypted import (COSTS, _check, _Parties,  # noqa: E402
                                              batching_prime, encrypted_sum)
from fedjax_sim.engine.contracts import ROUND_FAILED, Cohort, Message  # noqa: E402
from fedjax_sim.errors import UserError  # noqa: E402
from fedjax_sim.models.tasks import regression  # noqa: E402

N = 8192


def _cohort(seed=0, scale=1.0):
    """5 slots (the fourth a padding slot holding values that must not count), leaves of
    3x4 and 5000 entries: 5013 values with the weight, two CKKS ciphertexts, one BFV."""
    rng = np.random.default_rng(seed)
    updates = {"a": rng.normal(scale=scale, size=(5, 3, 4)).astype(np.float32),
               "b": rng.normal(scale=scale, size=(5, 5000)).astype(np.float32)}
    weights = np.array([3.0, 1.0, 2.0, 0.0, 5.0], np.float32)
    live = np.array([True, True, True, False, True])
    return updates, weights, live


def _reduce(part, updates, weights, live):
    cohort = Cohort(updates, jnp.asarray(weights), jnp.asarray(live))
    return jax.jit(lambda c: part.reduce(c, (), jax.random.key(0)))(cohort)


def _float_sum(updates, weights, live):
    w = np.where(live, weights, 0).astype(np.float64)
    return {k: np.einsum("i,i...->...", w, v.astype(np.float64)) for k, v in updates.items()}


def _quantized_sum(updates, weights, live, f):
    """numpy: sum_i round(2^f w_i d_i) in int64 (the product in float64, where it is exact),
    divided by 2^f, in float32."""
    out = {}
    for k, v in updates.items():
        q = [np.rint(np.float64(weights[i]) * v[i].astype(np.float64) * 2.0 ** f).astype(np.int64)
             for i in np.flatnonzero(live)]
        out[k] = (np.sum(q, axis=0).astype(np.float64) / 2.0 ** f).astype(np.float32)
    return out


def _ciphertext_floor(data_primes: int) -> int:
    # a ciphertext is two polynomials of N coefficients, one 64-bit word per data prime
    return 2 * N * 8 * data_primes


def test_ckks_sum_within_noise_bound_of_numpy():
    updates, weights, live = _cohort()
    part = encrypted_sum("ckks")
    total, denominator, metrics = _reduce(part, updates, weights, live)
    reference = _float_sum(updates, weights, live)
    m = int(live.sum())
    bound = 4 * m * N / 2.0 ** 40
    for k, ref in reference.items():
        err = np.abs(np.asarray(total[k], np.float64) - ref)
        assert np.all(err <= bound + np.abs(ref) * 2.0 ** -24), (k, err.max())
    assert abs(float(denominator) - weights[live].sum()) <= bound
    assert not bool(metrics[ROUND_FAILED])
    # 5012 values + the weight in chunks of N/2 = 4096 slots; bytes as the engine counts them
    assert int(metrics["he_ciphertexts_per_client"]) == 2
    sent = part.uplink(Message(5012, 32), 5)
    assert sent.bytes == int(metrics["he_ciphertext_bytes_per_client"])
    # after a sparsifying part (100 of the entries, with indices) the update is still
    # encrypted dense, and counted so
    assert part.uplink(Message(100, 32, index_bits=13), 5) == sent
    assert 2 * _ciphertext_floor(1) < sent.bytes < 2 * _ciphertext_floor(1) + 1024
    for name in COSTS:
        assert float(metrics[name]) > 0, name


def test_bfv_sum_equals_quantized_integer_sum():
    updates, weights, live = _cohort(seed=1)
    for f in (24, 6):  # at 6 fraction bits the quantization shows: far from the float sum
        part = encrypted_sum("bfv", fraction_bits=f)
        total, denominator, metrics = _reduce(part, updates, weights, live)
        reference = _quantized_sum(updates, weights, live, f)
        for k, ref in reference.items():
            np.testing.assert_array_equal(np.asarray(total[k]), ref)
        assert float(denominator) == weights[live].sum()  # integer weights quantize exactly
        assert int(metrics["he_ciphertexts_per_client"]) == 1  # 5013 values in N = 8192 slots
        sent = part.uplink(Message(5012, 32), 5)
        assert sent.bytes == int(metrics["he_ciphertext_bytes_per_client"])
        assert _ciphertext_floor(2) < sent.bytes < _ciphertext_floor(2) + 1024
    gap = np.abs(np.asarray(total["b"], np.float64) - _float_sum(updates, weights, live)["b"])
    assert gap.max() > 2.0 ** -6  # 4 roundings of up to 2^-7 each


def test_padding_slots_send_nothing_and_the_server_cannot_decrypt(monkeypatch):
    updates, weights, live = _cohort(seed=2)
    sent = []
    encrypt = _Parties.encrypt
    monkeypatch.setattr(_Parties, "encrypt", lambda self, x: sent.append(x) or encrypt(self, x))
    part = encrypted_sum("ckks")
    _reduce(part, updates, weights, live)
    assert len(sent) == int(live.sum())

    import tenseal as ts
    parties = _Parties(ts, _check("ckks", N, None, None, None, None))
    secret, public = parties.contexts()
    assert secret.is_private() and not public.is_private()
    summed = parties.add([encrypt(parties, np.ones(10)), encrypt(parties, np.full(10, 2.0))])
    with pytest.raises(ValueError, match="secret"):
        ts.ckks_vector_from(public, summed[0]).decrypt()
    np.testing.assert_allclose(ts.ckks_vector_from(secret, summed[0]).decrypt(), 3.0, atol=1e-6)

    # a cohort of padding slots only: nothing sent, a zero sum of zero weight
    sent.clear()
    total, denominator, metrics = _reduce(part, updates, np.zeros(5, np.float32),
                                          np.zeros(5, bool))
    assert not sent and float(denominator) == 0.0
    assert all(float(np.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(total))


def test_a_sum_that_could_overflow_fails_the_round():
    # CKKS (60, 60) at scale 2^40: sums must stay below 2^18, each of 5 slots below 2^18 / 5
    updates, weights, live = _cohort(seed=3)
    updates["a"][0, 0, 0] = 1.01 * 2.0 ** 18 / 5 / weights[0]
    total, denominator, metrics = _reduce(encrypted_sum("ckks"), updates, weights, live)
    assert bool(metrics[ROUND_FAILED])
    updates["a"][0, 0, 0] = 0.99 * 2.0 ** 18 / 5 / weights[0]
    total, denominator, metrics = _reduce(encrypted_sum("ckks"), updates, weights, live)
    assert not bool(metrics[ROUND_FAILED])
    np.testing.assert_allclose(np.asarray(total["a"]), _float_sum(updates, weights, live)["a"],
                               rtol=1e-6, atol=1e-5)
    # BFV, t < 2^20 and 8 fraction bits: |round(256 w d)| < (t - 1) / 2 / 5 for each client
    t = batching_prime(20, N)
    limit = (t - 1) // 2 // 5
    updates, weights, live = _cohort(seed=3, scale=0.01)
    updates["a"][0, 0, 0] = limit / 256 / weights[0]
    part = encrypted_sum("bfv", fraction_bits=8, plain_modulus_bits=20)
    assert bool(_reduce(part, updates, weights, live)[2][ROUND_FAILED])
    updates["a"][0, 0, 0] = (limit - 1) / 256 / weights[0]
    total, _, metrics = _reduce(part, updates, weights, live)
    assert not bool(metrics[ROUND_FAILED])
    np.testing.assert_array_equal(np.asarray(total["a"]),
                                  _quantized_sum(updates, weights, live, 8)["a"])


def test_non_finite_updates_give_a_non_finite_sum():
    updates, weights, live = _cohort(seed=4)
    updates["b"][1, 7] = np.nan
    total, denominator, metrics = _reduce(encrypted_sum("bfv"), updates, weights, live)
    assert np.all(np.isnan(np.asarray(total["b"]))) and not bool(metrics[ROUND_FAILED])


def _is_prime_by_trial_division(n):
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


def test_batching_prime_is_the_largest_below_the_bound():
    for bits, degree in ((20, 8192), (24, 4096)):
        t = batching_prime(bits, degree)
        assert t < 2 ** bits and t % (2 * degree) == 1 and _is_prime_by_trial_division(t)
        assert not any(_is_prime_by_trial_division(c) for c in range(t + 2 * degree, 2 ** bits,
                                                                       2 * degree))


def test_bad_parameters_are_refused_in_one_line():
    cases = [
        (dict(scheme="paillier"), "'ckks' or 'bfv'"),
        (dict(scheme="bfv", scale_bits=30), "scale_bits is a parameter of scheme='ckks'"),
        (dict(scheme="ckks", fraction_bits=8), "fraction_bits is a parameter of scheme='bfv'"),
        (dict(poly_modulus_degree=5000), "poly_modulus_degree must be one of"),
        (dict(poly_modulus_degree=4096), "above the 109"),
        (dict(coeff_mod_bit_sizes=(60, 70)), "integers in \\[20, 60\\]"),
        (dict(coeff_mod_bit_sizes=(45, 60)), "lower scale_bits"),
        (dict(scheme="bfv", plain_modulus_bits=61), "plain_modulus_bits must be"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message) as info:
            encrypted_sum(**kwargs)
        assert "\n" not in str(info.value)
    # BFV's noise bound depends on the cohort: checked when the round is traced
    part = encrypted_sum("bfv", coeff_mod_bit_sizes=(60, 60), plain_modulus_bits=40)
    with pytest.raises(UserError, match="cannot hold the noise of 5 clients"):
        _reduce(part, *_cohort())


def test_a_multi_process_run_is_refused(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(UserError, match="multi-process") as info:
        _reduce(encrypted_sum("ckks"), *_cohort())
    assert "\n" not in str(info.value)


def test_missing_tenseal_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tenseal", None)  # `import tenseal` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'fedjax_sim\[he\]'") as info:
        encrypted_sum("ckks")
    assert "\n" not in str(info.value)


# -- end to end: FedSGD on the diabetes regression MLP (configs/diabetes_fedsgd.py) --------
def _diabetes():
    train, test, _ = fs.data.load_diabetes(seed=0)
    clients = fs.data.partition(train, train["y"], "iid", 10, seed=0)
    return clients, test, fs.models.get_model("mlp", (10,), 1, hidden=[10])


def _diabetes_fedsgd(aggregator, rounds, eval_every=None, initial_params=None,
                     engine=fs.EngineOptions()):
    clients, test, model = _diabetes()
    algorithm = fs.algorithms.fedavg(optax.sgd(1.0), optax.sgd(0.1, momentum=0.9),
                                     batch_size=None)
    return fs.simulate(model, algorithm, clients, task=regression(), rounds=rounds,
                       clients_per_round=10, eval_data=test if eval_every else None,
                       eval_every=eval_every or rounds, seed=0, aggregator=aggregator,
                       initial_params=initial_params, engine=engine, progress=False)


def _gradient_descent(params, x, y, rounds):
    """numpy, float64: FedSGD with every client, full batches and weights n_i averages the
    clients' gradients into the gradient of the mean squared error over all their examples;
    the server's SGD(0.1, momentum 0.9) then steps along it."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    trace = {k: np.zeros_like(v) for k, v in p.items()}
    for _ in range(rounds):
        pre = x @ p["w1"] + p["b1"]
        h = np.maximum(pre, 0.0)
        dz = 2.0 * (h @ p["w2"] + p["b2"] - y) / len(x)
        dh = (dz @ p["w2"].T) * (pre > 0)
        grads = {"w1": x.T @ dh, "b1": dh.sum(0), "w2": h.T @ dz, "b2": dz.sum(0)}
        for k in p:
            trace[k] = grads[k] + 0.9 * trace[k]
            p[k] = p[k] - 0.1 * trace[k]
    return p


def test_diabetes_fedsgd_encrypted_equals_gradient_descent():
    clients, _, model = _diabetes()
    params, _ = model.init(jax.random.key(0))
    rounds = 3
    result = _diabetes_fedsgd(encrypted_sum("ckks"), rounds, initial_params=params)
    flat = lambda q: {"w1": q["hidden"][0]["kernel"], "b1": q["hidden"][0]["bias"],
                      "w2": q["out"]["kernel"], "b2": q["out"]["bias"]}
    x = clients.features["x"].astype(np.float64)
    y = clients.features["y"].astype(np.float64)
    reference = _gradient_descent(flat(params), x, y, rounds)
    for k, v in flat(result.params).items():
        np.testing.assert_allclose(np.asarray(v, np.float64), reference[k], atol=2e-6, err_msg=k)
    last = result.history[-1]
    assert last["uplink_bytes_per_client"] == last["he_ciphertext_bytes_per_client"]
    assert last["he_ciphertexts_per_client"] == 1 and last[ROUND_FAILED] == 0


def _max_abs_difference(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def quantized_plaintext_sum(fraction_bits):
    """The plaintext reference of BFV: the same quantization, summed with numpy on the host."""
    def host(flat, weights, live):
        flat, weights, live = np.asarray(flat), np.asarray(weights), np.asarray(live)
        scale = 2.0 ** fraction_bits
        q = [np.rint(np.append(np.float64(weights[i]) * flat[i].astype(np.float64), weights[i])
                     * scale).astype(np.int64) for i in np.flatnonzero(live)]
        total = np.sum(q, axis=0).astype(np.float64) / scale
        return total[:-1].astype(np.float32), np.float32(total[-1])

    def reduce(cohort, state, rng):
        leaves, treedef = jax.tree_util.tree_flatten(cohort.updates)
        m = cohort.weights.shape[0]
        flat = jnp.concatenate([x.reshape(m, -1) for x in leaves], axis=1)
        total, denominator = jax.pure_callback(
            host, (jax.ShapeDtypeStruct(flat.shape[1:], jnp.float32),
                   jax.ShapeDtypeStruct((), jnp.float32)), flat, cohort.weights, cohort.live)
        sizes = np.cumsum([math.prod(x.shape[1:]) for x in leaves])[:-1]
        parts = jnp.split(total, sizes)
        return jax.tree_util.tree_unflatten(
            treedef, [p.reshape(x.shape[1:]) for p, x in zip(parts, leaves)]), denominator

    return fs.aggregators.part(reduce=reduce)


def _ckks_bound(rounds):
    # Each round's aggregate is off by at most the CKKS bound over the total weight (353
    # patients) plus one float32 rounding (the aggregate is below 1); the server's SGD with
    # momentum 0.9 and lr 0.1 moves the parameters by at most 1x the accumulated error.
    return rounds * (4 * 10 * N / 2.0 ** 40 / 353 + 2.0 ** -23)


@pytest.mark.slow
def test_diabetes_fedsgd_300_rounds_ckks_close_and_bfv_exact():
    rounds, f = 300, 24
    plain = _diabetes_fedsgd(None, rounds, eval_every=rounds)
    ckks = _diabetes_fedsgd(encrypted_sum("ckks"), rounds, eval_every=rounds)
    bfv = _diabetes_fedsgd(encrypted_sum("bfv", fraction_bits=f), rounds, eval_every=rounds)
    quantized = _diabetes_fedsgd(quantized_plaintext_sum(f), rounds, eval_every=rounds)
    assert _max_abs_difference(plain.params, ckks.params) <= _ckks_bound(rounds)
    for a, b in zip(jax.tree_util.tree_leaves(bfv.params),
                    jax.tree_util.tree_leaves(quantized.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [r["train_loss"] for r in bfv.history] == [r["train_loss"] for r in quantized.history]
    # the config's documented result: test MSE 0.545 after 300 rounds
    for result in (ckks, bfv):
        assert abs(result.history[-1]["test_mse"] - plain.history[-1]["test_mse"]) < 1e-4
        assert sum(r[ROUND_FAILED] for r in result.history) == 0


MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import jax, numpy as np
    import fedjax_sim as fs
    from fedjax_sim.aggregators.encrypted import encrypted_sum
    from test_encrypted_aggregation import _diabetes_fedsgd
    runs = {}
    for mesh in (None, 2):
        result = _diabetes_fedsgd(encrypted_sum("ckks"), 3, engine=fs.EngineOptions(mesh=mesh))
        runs[str(mesh)] = [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(result.params)]
        runs[str(mesh) + "_devices"] = result.summary["engine"]["mesh"]["devices"]
    print(json.dumps(runs))
""")


@pytest.mark.slow
def test_a_single_process_mesh_sums_on_the_host():
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "")
               + " --xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", MESH_SCRIPT, os.path.dirname(__file__)],
                         env=env, capture_output=True, text=True, check=True)
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    assert runs["None_devices"] == 1 and runs["2_devices"] == 2
    # both encrypted: each off the exact sum by the CKKS bound, and the float32 sums on the
    # devices are added in another order
    for a, b in zip(runs["None"], runs["2"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2 * _ckks_bound(3))
