"""FedAdam on CIFAR-10 split over 500 clients by Dirichlet(0.1) label skew (TFDS).

    fedjax-sim train --config configs/cifar10_dirichlet.py --workdir runs/cifar10_dirichlet

The setup of Reddi et al. 2021 ("Adaptive Federated Optimization"): CIFAR-10's 50,000
training images partitioned into 500 clients with a Dirichlet(0.1) prior over labels,
10 clients a round, 1 local epoch of batch 20, client SGD at 10^-1.5, server Adam at
10^-2 with eps 10^-3, random crop (4 pixels of padding) and horizontal flips on device,
4,000 rounds; `test_*` is CIFAR-10's 10,000-image test split. The model is the paper's:
a ResNet-18 with GroupNorm (2 groups), here with the CIFAR stem (3x3 conv, no max-pool)
for 32x32 inputs (set model.name='cnn' for the small EMNIST CNN instead).

Needs the dataset: the first run downloads and prepares it through tensorflow-datasets
into data.data_dir (default ~/tensorflow_datasets; see docs/data.md, "Public and
natural datasets").
Images stay uint8 on the device (147 MiB for the training set) and are converted and
augmented inside each local step.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.rounds = 4000
    c.clients_per_round = 10
    c.eval_every = 100
    c.task = "classification"
    c.data = dict(source="tfds", name="cifar10", data_dir=None, download=True, label_key=None,
                  num_clients=500, partition="dirichlet", partition_args=dict(alpha=0.1),
                  client_test_fraction=0.0, heldout_clients=None, seed=0)
    c.preprocess = dict(scale=1 / 255, mean=(0.4914, 0.4822, 0.4465),
                        std=(0.2470, 0.2435, 0.2616), crop_padding=4, flip=True)
    c.model = dict(name="resnet18", num_outputs=None,
                   args=dict(norm="group", groups=2, stem="cifar"))
    c.algorithm = dict(
        name="fedavg",
        client_optimizer=dict(name="sgd", learning_rate=10 ** -1.5, args={}),
        server_optimizer=dict(name="adam", learning_rate=1e-2, args=dict(eps=1e-3)),
        local_epochs=1, local_steps=None, batch_size=20, weighting="num_examples")
    c.engine = dict(clients_per_chunk="auto", unroll="auto", rounds_per_call="auto",
                    data_placement="auto", device_data_budget=None)
    c.checkpoint = dict(every_rounds=None, every_seconds=300.0, max_to_keep=3)
    return ml_collections.ConfigDict(c)
