"""Centralized and per-client evaluation against a plain numpy computation."""

import jax
import numpy as np

import fedjax_sim as fs
from fedjax_sim.simulation import CentralEvaluator, ClientEvaluator, summarize_clients

from helpers import softmax


def _setup(sizes=(7, 0, 23, 1, 300, 12)):
    rng = np.random.default_rng(0)
    n = sum(sizes)
    x = rng.normal(size=(n, 5)).astype(np.float32)
    y = rng.integers(0, 4, n).astype(np.int32)
    data = fs.data.FederatedData({"x": x, "y": y}, np.concatenate([[0], np.cumsum(sizes)]),
                                 tuple(f"c{i}" for i in range(len(sizes))))
    model = fs.models.logistic_regression((5,), 4)
    params, state = model.init(jax.random.key(0))
    k, b = np.asarray(params["dense"]["kernel"]), np.asarray(params["dense"]["bias"])
    return data, model, params, state, k, b


def _numpy_metrics(x, y, k, b):
    p = softmax(x.astype(np.float64) @ k + b)
    return -np.log(p[np.arange(len(y)), y]).mean(), (p.argmax(1) == y).mean()


def test_central_evaluation_equals_numpy_with_ragged_last_batch():
    data, model, params, state, k, b = _setup()
    x, y = data.features["x"], data.features["y"]
    metrics = CentralEvaluator(model, fs.models.classification(), {"x": x, "y": y},
                               batch_size=32)(params, state)  # 343 = 10 * 32 + 23
    loss, acc = _numpy_metrics(x, y, k, b)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], acc, rtol=1e-6)


def test_per_client_evaluation_equals_numpy_loop_and_skips_empty_clients():
    data, model, params, state, k, b = _setup()
    for chunk in (None, 4):
        per_client = ClientEvaluator(model, fs.models.classification(), data, batch_size=16,
                                     clients_per_chunk=chunk)(params, state)["test"]
        for i in range(data.num_clients):
            c = data.client(i)
            if len(c["y"]) == 0:
                assert per_client["count"][i] == 0 and np.isnan(per_client["accuracy"][i])
                continue
            loss, acc = _numpy_metrics(c["x"], c["y"], k, b)
            np.testing.assert_allclose(per_client["loss"][i], loss, rtol=1e-5)
            np.testing.assert_allclose(per_client["accuracy"][i], acc, rtol=1e-6)
    summary = summarize_clients(per_client, prefix="client_test_")
    live = per_client["accuracy"][per_client["count"] > 0]
    assert summary["client_test_count"] == 5
    np.testing.assert_allclose(summary["client_test_accuracy_mean"], live.mean())
    np.testing.assert_allclose(summary["client_test_accuracy_p10"], np.percentile(live, 10))
    np.testing.assert_allclose(summary["client_test_accuracy_min"], live.min())
