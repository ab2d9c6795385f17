"""FedProx on digits split into shards: 100 clients holding 2 classes each, 10 per round.

    fedjax-sim train --config configs/digits_fedprox.py --workdir runs/digits_fedprox

The MLP (200-200) with client SGD (lr 0.05, 1 local epoch, batch 10) and a proximal
term mu/2 ||w - w_global||^2 with mu = 1, FedProx's value for MNIST (Li et al. 2020).
Compare with configs/digits_scaffold.py (same split and budget) and benchmarks/scaffold_noniid.py.
Reaches test accuracy 0.919 after 200 rounds (seed 0).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.rounds = 200
    c.clients_per_round = 10
    c.eval_every = 20
    c.task = "classification"
    c.data = dict(source="digits", num_clients=100, partition="shards",
                  partition_args=dict(shards_per_client=2), client_test_fraction=0.2, seed=0)
    c.model = dict(name="mlp", num_outputs=None, args=dict(hidden=[200, 200], dense_impl="auto"))
    c.algorithm = dict(
        name="fedprox",
        client_optimizer=dict(name="sgd", learning_rate=0.05, args={}),
        mu=1.0,
        server_optimizer=dict(name="sgd", learning_rate=1.0, args={}),
        local_epochs=1,
        local_steps=None,
        batch_size=10,
        weighting="num_examples",)
    c.engine = dict(clients_per_chunk="auto", unroll="auto", rounds_per_call="auto", client_states="auto")
    # Saved to <workdir>/checkpoints; re-running the command on that workdir resumes.
    c.checkpoint = dict(every_rounds=None, every_seconds=60.0, max_to_keep=3)
    return ml_collections.ConfigDict(c)
