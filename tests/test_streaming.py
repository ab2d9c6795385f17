"""Training data kept on host and streamed per call (engine.streaming) gives exactly the
results of the on-device mode."""

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.engine.streaming import HostData, parse_bytes, resolve_data_placement
from fedjax_sim.errors import UserError


def _data():
    train, test = fs.data.load_digits(seed=0)
    clients = fs.data.partition(train, train["y"], "dirichlet", 40, seed=0, alpha=0.5)
    return clients.split(0.2, seed=0)


def _run(train, client_test, placement, algo=None, finetune=True, **engine):
    model = fs.models.get_model("mlp", (8, 8, 1), 10, hidden=[16])
    algo = algo or fs.algorithms.fedavg(optax.sgd(0.1), batch_size=10)
    return fs.simulate(
        model, algo, train, rounds=5, clients_per_round=5, eval_every=3,
        client_eval_data=client_test if finetune else None,
        finetune=fs.FineTune(steps=2, batch_size=5) if finetune else None,
        engine=fs.EngineOptions(data_placement=placement, rounds_per_call=2, **engine),
        progress=False)


def _same(a, b):
    assert [r.keys() for r in a.history] == [r.keys() for r in b.history]
    for ra, rb in zip(a.history, b.history):
        assert ra == rb  # bit-identical metrics, round by round
    for u, v in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_streamed_equals_on_device():
    train, client_test = _data()
    on_device = _run(train, client_test, "device")
    streamed = _run(train, client_test, "host")
    assert on_device.summary["engine"]["data_placement"] == "device"
    assert streamed.summary["engine"]["data_placement"] == "host"
    _same(on_device, streamed)
    # per-client fine-tuned metrics (fine-tuning reads streamed blocks of training rows)
    for name in ("test", "finetuned"):
        np.testing.assert_array_equal(np.asarray(on_device.client_metrics[name]["accuracy"]),
                                      np.asarray(streamed.client_metrics[name]["accuracy"]))


@pytest.mark.slow
def test_streamed_stateful_with_host_client_states():
    """Both the data and SCAFFOLD's control variates on host: still identical."""
    train, client_test = _data()
    algo = fs.algorithms.scaffold(0.05, batch_size=10)
    a = _run(train, client_test, "device", algo=algo, finetune=False, client_states="device")
    b = _run(train, client_test, "host", algo=algo, finetune=False, client_states="host")
    _same(a, b)


def test_budget_selects_host_and_limits_the_window():
    train, client_test = _data()
    nbytes = sum(v.nbytes for v in train.features.values())
    assert resolve_data_placement("auto", nbytes, nbytes - 1, None) == "host"
    assert resolve_data_placement("auto", nbytes, nbytes, None) == "device"
    assert resolve_data_placement("auto", nbytes, None, None) == "device"  # CPU, no budget
    res = _run(train, client_test, "auto", finetune=False, device_data_budget=nbytes // 4)
    assert res.summary["engine"]["data_placement"] == "host"
    assert res.summary["engine"]["rounds_per_call"] >= 1
    with pytest.raises(UserError, match="device_data_budget"):
        _run(train, client_test, "host", device_data_budget=100)


def test_pack_keeps_each_clients_rows():
    """The packed buffer holds exactly each sampled client's rows at its new offset."""
    train, _ = _data()
    host = HostData(train, window_clients=6)
    ids = np.array([3, 17, 3, 0, 39])
    packed = host.pack(ids, host.capacity)
    x = np.asarray(packed.features["x"])
    offsets, sizes = np.asarray(packed.offsets), np.asarray(packed.sizes)
    assert x.shape[0] == host.capacity == np.sort(train.client_sizes)[::-1][:6].sum()
    for cid in np.unique(ids):
        lo, hi = train.offsets[cid], train.offsets[cid + 1]
        np.testing.assert_array_equal(x[offsets[cid]:offsets[cid] + sizes[cid]],
                                      train.features["x"][lo:hi])


def test_parse_bytes():
    assert parse_bytes("512MiB") == 512 * 2 ** 20
    assert parse_bytes("2GB") == 2 * 10 ** 9
    assert parse_bytes(1000) == 1000
    assert parse_bytes(None) is None
    with pytest.raises(UserError, match="device_data_budget"):
        parse_bytes("lots")
    with pytest.raises(UserError, match="data_placement"):
        fs.EngineOptions(data_placement="disk")
