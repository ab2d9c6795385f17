"""Held-out clients: set aside with FederatedData.holdout, never trained on, evaluated per
client with the global model (and after fine-tuning on their own training split)."""

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.errors import UserError


def _clients():
    train, _ = fs.data.load_digits(seed=0)
    return fs.data.partition(train, train["y"], "dirichlet", 30, seed=0, alpha=0.5)


def test_holdout_partitions_the_clients():
    clients = _clients()
    kept, held = clients.holdout(0.2, seed=1)
    assert held.num_clients == 6 and kept.num_clients == 24
    assert set(kept.client_ids) | set(held.client_ids) == set(clients.client_ids)
    assert not set(kept.client_ids) & set(held.client_ids)
    assert kept.num_examples + held.num_examples == clients.num_examples
    again, _ = clients.holdout(0.2, seed=1)
    assert again.client_ids == kept.client_ids  # seeded
    assert clients.holdout(3, seed=0)[1].num_clients == 3
    for bad in (0, 30, 1.5, "x"):
        with pytest.raises(UserError):
            clients.holdout(bad, seed=0)


def test_heldout_metrics_match_a_direct_evaluation():
    kept, held = _clients().holdout(5, seed=0)
    held_train, held_test = held.split(0.5, seed=0)
    model = fs.models.get_model("mlp", (8, 8, 1), 10, hidden=[16])
    res = fs.simulate(model, fs.algorithms.fedavg(optax.sgd(0.1), batch_size=10), kept,
                      rounds=4, clients_per_round=5, eval_every=4,
                      heldout_data=(held_train, held_test),
                      finetune=fs.FineTune(steps=3, batch_size=5), progress=False)
    final = res.summary["final"]
    # independent reference: the final model applied to each held-out client's test rows
    accs = []
    for i in range(held_test.num_clients):
        rows = held_test.client(i)
        if len(rows["y"]) == 0:
            continue
        logits, _ = model.apply(res.params, res.model_state, rows["x"], train=False)
        accs.append(np.mean(np.argmax(np.asarray(logits), -1) == rows["y"]))
    assert final["heldout_test_count"] == len(accs)
    np.testing.assert_allclose(final["heldout_test_accuracy_mean"], np.mean(accs), rtol=1e-6)
    assert "heldout_finetuned_accuracy_mean" in final


def test_heldout_clients_must_not_be_training_clients():
    clients = _clients()
    model = fs.models.get_model("mlp", (8, 8, 1), 10, hidden=[8])
    with pytest.raises(UserError, match="held-out client"):
        fs.simulate(model, fs.algorithms.fedavg(optax.sgd(0.1)), clients, rounds=1,
                    clients_per_round=2, heldout_data=clients.subset([0, 1]), progress=False)
