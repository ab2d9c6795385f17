"""FedAdagrad on digits (Reddi et al. 2021, adaptive federated optimization).

    fedjax-sim train --config configs/digits_fedadagrad.py --workdir runs/digits_fedadagrad

Client SGD (lr 0.1), server adagrad (lr 0.03, eps 1e-3 as in the paper) on the averaged
client delta as a pseudo-gradient. Same data and model as digits_fedavg.py.
Reaches test accuracy 0.942 after 200 rounds (seed 0), in about 13 s on a 2-core CPU.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.rounds = 200
    c.clients_per_round = 10
    c.eval_every = 20
    c.task = "classification"
    c.data = dict(source="digits", num_clients=100, partition="dirichlet",
                  partition_args=dict(alpha=0.5), client_test_fraction=0.2, seed=0)
    c.model = dict(name="mlp", num_outputs=None, args=dict(hidden=[200, 200]))
    c.algorithm = dict(
        name="fedavg",
        client_optimizer=dict(name="sgd", learning_rate=0.1, args={}),
        server_optimizer=dict(name="adagrad", learning_rate=0.03, args=dict(eps=1e-3, initial_accumulator_value=0.0)),
        local_epochs=1, local_steps=None, batch_size=10, weighting="num_examples")
    c.engine = dict(clients_per_chunk="auto", unroll="auto", rounds_per_call="auto")
    return ml_collections.ConfigDict(c)
