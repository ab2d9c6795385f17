"""FedAvg on digits under secure aggregation, 10% of the clients dropping out each round
(configs/digits_fedavg.py otherwise).

    fedjax-sim train --config configs/digits_secure_aggregation.py --workdir runs/digits_secagg

The server sees only the sum of the surviving clients' updates (Bonawitz et al. 2017,
simulated: clip to norm 5, scale and round to integers, pairwise and self masks mod 2^32,
Shamir shares of the seeds to unmask the survivors' sum); a round whose survivors are
fewer than the threshold (⌊2n/3⌋ + 1 of n: 7 of 10) fails and changes nothing, which
happens with probability P[more than 3 of 10 drop] = 1.3%. Weighted by example
counts capped at 64 (clients send w·x and w). The metrics log the survivors, the dropped
clients, the bytes each client sends (masked vector, keys, shares) and the server's work.
Reaches test accuracy 0.950 after 200 rounds (seed 0), in about 25 s on a 2-core CPU.
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
    c.model = dict(name="mlp", num_outputs=None, args=dict(hidden=[200, 200], dense_impl="auto"))
    c.algorithm = dict(
        name="fedavg",
        client_optimizer=dict(name="sgd", learning_rate=0.1, args={}),
        server_optimizer=dict(name="sgd", learning_rate=1.0, args={}),
        local_epochs=1, local_steps=None, batch_size=10, weighting="num_examples")
    # Every client's update is clipped to norm 5: FedAvg's updates here are far smaller.
    c.aggregator = dict(secure=dict(clip_norm=5.0, modulus_bits=32, dropout_rate=0.1,
                                    max_weight=64))
    c.engine = dict(clients_per_chunk="auto", unroll="auto", rounds_per_call="auto")
    # Saved to <workdir>/checkpoints; re-running the command on that workdir resumes.
    c.checkpoint = dict(every_rounds=None, every_seconds=60.0, max_to_keep=3)
    return ml_collections.ConfigDict(c)
