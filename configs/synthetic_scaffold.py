"""SCAFFOLD on FedProx's Synthetic(1, 1): 30 devices, multinomial logistic regression.

    fedjax-sim train --config configs/synthetic_scaffold.py --workdir runs/synthetic_scaffold

FedProx's setting (10 devices per round, 20 local epochs of batch 10, client SGD lr 0.01,
200 rounds) with SCAFFOLD's control variates (option II), global step size 1, uniform
average. Each device holds out 10% of its data.
Reaches test accuracy 0.893 after 200 rounds (seed 0).
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
        name="scaffold",
        learning_rate=0.01,
        global_learning_rate=1.0,
        server_optimizer=None,
        local_epochs=20,
        local_steps=None,
        batch_size=10,
        weighting="uniform",)
    c.engine = dict(clients_per_chunk="auto", unroll="auto", rounds_per_call="auto", client_states="auto")
    # Saved to <workdir>/checkpoints; re-running the command on that workdir resumes.
    c.checkpoint = dict(every_rounds=None, every_seconds=60.0, max_to_keep=3)
    return ml_collections.ConfigDict(c)
