"""Compressed FedAvg on digits: each client sends its top 10% of entries, 8-bit quantized,
with error feedback (configs/digits_fedavg.py otherwise).

    fedjax-sim train --config configs/digits_compressed.py --workdir runs/digits_compressed

Each client adds its residual (what it meant to send minus what it sent) to its update,
keeps the 10% of entries of largest magnitude, and quantizes those stochastically to 8
bits: 5,521 values of 8 bits plus as many 16-bit indices and 64 bits of range, 16,571
bytes a round instead of the 220,840 bytes of the float32 update (13x less); the metrics
log `uplink_bytes` per round and summary.json the run's total.
Reaches test accuracy 0.947 after 200 rounds (seed 0), in about 17 s on a 2-core CPU;
uncompressed, FedAvg reaches 0.950.
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
    # Applied in order to each client's update; error feedback keeps one residual per client.
    c.aggregator = dict(compression=[dict(name="top_k", fraction=0.1, error_feedback=True),
                                     dict(name="quantize", bits=8)])
    c.engine = dict(clients_per_chunk="auto", unroll="auto", rounds_per_call="auto")
    # Saved to <workdir>/checkpoints; re-running the command on that workdir resumes.
    c.checkpoint = dict(every_rounds=None, every_seconds=60.0, max_to_keep=3)
    return ml_collections.ConfigDict(c)
