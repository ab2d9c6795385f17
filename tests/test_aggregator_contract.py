"""The aggregator-part contract's per-client state, bytes on the wire and failed rounds,
checked through `simulate` against numpy re-implementations of the same rounds."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.aggregators import ROUND_FAILED, Message, chain, part
from fedjax_sim.data import FederatedData
from fedjax_sim.models import logistic_regression

from helpers import full_batch_fedavg, toy_clients

FEATURES, CLASSES, SIZES, LR, STEPS = 5, 3, [3, 6, 4, 8, 5, 7], 0.3, 2
ENTRIES = FEATURES * CLASSES + CLASSES  # the logistic regression's kernel and bias


def _toy():
    x, y, offsets = toy_clients(SIZES, FEATURES, CLASSES, seed=3)
    return FederatedData({"x": x, "y": y}, offsets, tuple(f"c{i}" for i in range(len(SIZES))))


def _run(aggregator, rounds, **kw):
    data, model = _toy(), logistic_regression((FEATURES,), CLASSES)
    alg = fs.algorithms.fedavg(optax.sgd(LR), local_epochs=None, local_steps=STEPS,
                               batch_size=None, weighting="uniform")
    # every client takes part in every round, so a client's state carries over
    return data, model, fs.simulate(model, alg, data, rounds=rounds, clients_per_round=len(SIZES),
                                    aggregator=aggregator, eval_every=100, progress=False, **kw)


def _numpy_rounds(data, model, rounds, send):
    """FedAvg (uniform weights, full-batch SGD) where client i sends send(i, delta_i)."""
    params, _ = model.init(jax.random.fold_in(jax.random.key(0), fs.simulation.INIT_STREAM))
    w = [params["dense"][k] for k in ("kernel", "bias")]
    clients = [(data.features["x"][lo:hi], data.features["y"][lo:hi])
               for lo, hi in zip(data.offsets[:-1], data.offsets[1:])]
    return full_batch_fedavg(w, clients, rounds, LR, STEPS, send)


def _half_with_residual():
    """Sends half of (delta + residual) and keeps the other half as the client's residual."""
    def client(delta, state, rng, residual):
        del state, rng
        carried = jax.tree_util.tree_map(jnp.add, delta, residual)
        half = jax.tree_util.tree_map(lambda v: v / 2, carried)
        return half, {}, half
    return part(client=client, client_init=lambda p: jax.tree_util.tree_map(jnp.zeros_like, p),
                uplink=lambda m, slots: m._replace(value_bits=16))


@pytest.mark.parametrize("placement", ["device", "host"])
def test_per_client_aggregator_state_matches_numpy(placement):
    data, model, result = _run(chain(fs.aggregators.clip(100.0), _half_with_residual()), 3,
                               engine=fs.EngineOptions(client_states=placement, rounds_per_call=3))
    residual = {}

    def send(cid, delta):
        carried = delta + residual.get(cid, 0.0)
        residual[cid] = carried / 2
        return carried / 2

    expected = _numpy_rounds(data, model, 3, send)
    np.testing.assert_allclose(result.params["dense"]["kernel"], expected[0], atol=2e-6)
    np.testing.assert_allclose(result.params["dense"]["bias"], expected[1], atol=2e-6)
    # 16 bits a value: half of the float32 update's 4 bytes per entry; down, float32 params
    row = result.history[-1]
    assert row["uplink_bytes_per_client"] == ENTRIES * 2
    assert row["uplink_bytes"] == ENTRIES * 2 * len(SIZES)
    assert row["downlink_bytes_per_client"] == ENTRIES * 4
    assert result.summary["uplink_bytes_total"] == 3 * ENTRIES * 2 * len(SIZES)
    assert result.summary["downlink_bytes_total"] == 3 * ENTRIES * 4 * len(SIZES)


def test_message_bits_count_values_indices_and_side_information():
    message = Message(entries=10, value_bits=4, index_bits=7, extra_bits=64)
    assert message.bits == 10 * (4 + 7) + 64 and message.bytes == 22  # 174 bits
    assert Message(3, 32).bytes == 12


def _fails_from_second_round():
    """A reducing part (the weighted sum) whose round fails once its counter reaches 1;
    the counter advances only in rounds that succeed."""
    def reduce(cohort, count, rng):
        del rng
        total = jax.tree_util.tree_map(lambda u: jnp.tensordot(cohort.weights, u, 1), cohort.updates)
        return total, jnp.sum(cohort.weights), {ROUND_FAILED: count >= 1, "_seen": count}

    def finalize(total, denominator, reports, count, rng):
        del reports, rng
        return total, denominator, count + 1, {}
    return part(init=lambda p: jnp.int32(0), reduce=reduce, finalize=finalize)


def test_a_failed_round_has_no_effect_and_warns():
    data, model, one = _run(chain(_fails_from_second_round(), _half_with_residual()), 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, three = _run(chain(_fails_from_second_round(), _half_with_residual()), 3,
                           engine=fs.EngineOptions(rounds_per_call=1))
    # rounds 2 and 3 failed: the model (and the residuals) stay those of round 1
    for k in ("kernel", "bias"):
        np.testing.assert_array_equal(three.params["dense"][k], one.params["dense"][k])
    assert [r[ROUND_FAILED] for r in three.history] == [0, 1, 1]
    assert three.summary["failed_rounds"] == [2, 3]
    failed = [str(w.message) for w in caught if "failed in aggregation" in str(w.message)]
    assert len(failed) == 2 and failed[0].startswith("round 2 failed")


@pytest.mark.slow  # the hand count itself is checked by test_compression.py's byte tests
def test_docs_compression_example_sends_what_a_hand_count_gives():
    from test_extending import docs_example

    result = docs_example("compressed")["result"]
    d = 64 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10  # the MLP 200-200's parameters
    k = -(-d // 10)  # top 10%, rounded up
    index_bits = (d - 1).bit_length()  # 16 bits name one of 55,210 positions
    expected = -(-(k * (8 + index_bits) + 64) // 8)  # k 8-bit values, k indices, min and max
    assert result.history[-1]["uplink_bytes_per_client"] == expected == 16_571
    assert result.history[-1]["downlink_bytes_per_client"] == 4 * d


@pytest.mark.slow
def test_with_client_level_dp_the_users_parts_run_before_clipping():
    """DP clips what the user's parts would send: a part that multiplies every update by
    1000 makes every client clipped, and the logged norm is the multiplied one."""
    def times_1000(delta, state, rng):
        del state, rng
        return jax.tree_util.tree_map(lambda v: v * 1000.0, delta), {}

    data, model = _toy(), logistic_regression((FEATURES,), CLASSES)
    alg = fs.algorithms.fedavg(optax.sgd(LR), local_epochs=None, local_steps=STEPS,
                               batch_size=None, weighting="uniform")
    plain = fs.simulate(model, alg, data, rounds=1, clients_per_round=3, progress=False,
                        eval_every=10, privacy=fs.privacy.ClientLevelDP(1.0, 1e-3, clip_norm=1e6))
    scaled = fs.simulate(model, alg, data, rounds=1, clients_per_round=3, progress=False,
                         eval_every=10, aggregator=part(client=times_1000),
                         privacy=fs.privacy.ClientLevelDP(1.0, 1e-3, clip_norm=1e6))
    np.testing.assert_allclose(scaled.history[0]["dp_update_norm"],
                               1000 * plain.history[0]["dp_update_norm"], rtol=1e-5)
