"""FedAvg on federated EMNIST from TensorFlow Federated's HDF5 files: 3,400 natural writers.

    fedjax-sim train --config configs/emnist_tff.py --workdir runs/emnist_tff

Each client is one writer of EMNIST (62 classes: digits, upper and lower case letters),
with the per-writer train/test split of the files; `test_*` pools every writer's test
examples and `client_test_*` is the per-writer distribution. The EMNIST CNN of Reddi et
al. 2021, 10 clients a round, 1 local epoch of batch 20, client SGD at 0.1, server SGD
at 1 (plain FedAvg), 1,500 rounds. Pixels are stored as uint8 and scaled on device.

Needs the files fed_emnist_train.h5 and fed_emnist_test.h5 (TFF's
`tff.simulation.datasets.emnist.load_data(only_digits=False)` downloads them into
~/.keras/datasets; see docs/data.md, "Public and natural datasets"). Set data.train_path /
data.test_path to where they are, and data.only_digits=True for the 10-class version.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.rounds = 1500
    c.clients_per_round = 10
    c.eval_every = 50
    c.task = "classification"
    c.data = dict(source="tff_h5", dataset="emnist", train_path="data/fed_emnist_train.h5",
                  test_path="data/fed_emnist_test.h5", only_digits=False, drop_empty=False,
                  heldout_clients=None, seed=0)
    c.model = dict(name="cnn", num_outputs=None, args={})
    c.algorithm = dict(
        name="fedavg",
        client_optimizer=dict(name="sgd", learning_rate=0.1, args={}),
        server_optimizer=dict(name="sgd", learning_rate=1.0, args={}),
        local_epochs=1, local_steps=None, batch_size=20, weighting="num_examples")
    c.engine = dict(clients_per_chunk="auto", unroll="auto", rounds_per_call="auto")
    c.checkpoint = dict(every_rounds=None, every_seconds=300.0, max_to_keep=3)
    return ml_collections.ConfigDict(c)
