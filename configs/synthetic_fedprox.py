"""FedProx (mu = 1) on FedProx's Synthetic(1, 1): 30 devices, multinomial logistic regression.

    fedjax-sim train --config configs/synthetic_fedprox.py --workdir runs/synthetic_fedprox

The setting of Li et al. 2020: 10 devices per round, 20 local epochs of batch 10, client
SGD lr 0.01, 200 rounds, and mu = 1, the paper's value for this dataset. Each device
holds out 10% of its data. benchmarks/fedprox_synthetic.py compares it with FedAvg
(configs/synthetic_fedavg.py).
Reaches test accuracy 0.855 after 200 rounds (seed 0); FedAvg reaches 0.824.
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
        name="fedprox",
        client_optimizer=dict(name="sgd", learning_rate=0.01, args={}),
        mu=1.0,
        server_optimizer=dict(name="sgd", learning_rate=1.0, args={}),
        local_epochs=20,
        local_steps=None,
        batch_size=10,
        weighting="num_examples",)
    c.engine = dict(clients_per_chunk="auto", unroll="auto", rounds_per_call="auto", client_states="auto")
    # Saved to <workdir>/checkpoints; re-running the command on that workdir resumes.
    c.checkpoint = dict(every_rounds=None, every_seconds=60.0, max_to_keep=3)
    return ml_collections.ConfigDict(c)
