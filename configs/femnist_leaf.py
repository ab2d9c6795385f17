"""FedAvg on FEMNIST from LEAF's JSON files: natural writers with their own test splits.

    fedjax-sim train --config configs/femnist_leaf.py --workdir runs/femnist_leaf

LEAF's FEMNIST (Caldas et al. 2018): each client is one writer, 62 classes, 28x28 images
stored as uint8 and scaled on device. 10 clients a round, 1 local epoch of batch 10,
client SGD at 0.06, server SGD at 1, 1,000 rounds; 10% of the writers are held out and
never trained on (`heldout_test_*`: how the model serves new writers), the others are
evaluated on their own test split (`client_test_*`).

Needs LEAF's preprocessed data: in LEAF's data/femnist, run e.g.
`./preprocess.sh -s niid --sf 0.05 -k 0 -t sample` and point data.train_path /
data.test_path at the data/train and data/test directories it writes (every .json file
in a directory is read; see docs/data.md, "Public and natural datasets").
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.rounds = 1000
    c.clients_per_round = 10
    c.eval_every = 50
    c.task = "classification"
    c.data = dict(source="leaf", dataset="femnist", train_path="data/femnist/data/train",
                  test_path="data/femnist/data/test", drop_empty=True, heldout_clients=0.1,
                  seed=0)
    c.model = dict(name="cnn", num_outputs=None, args={})
    c.algorithm = dict(
        name="fedavg",
        client_optimizer=dict(name="sgd", learning_rate=0.06, args={}),
        server_optimizer=dict(name="sgd", learning_rate=1.0, args={}),
        local_epochs=1, local_steps=None, batch_size=10, weighting="num_examples")
    c.engine = dict(clients_per_chunk="auto", unroll="auto", rounds_per_call="auto")
    c.checkpoint = dict(every_rounds=None, every_seconds=300.0, max_to_keep=3)
    return ml_collections.ConfigDict(c)
