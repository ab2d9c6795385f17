"""Federated algorithms as client + server functions.

The contract every algorithm implements (`Algorithm`, `ClientOutput`, `RoundSums`,
`Problem`, `LocalSchedule`) is `fedjax_sim.engine.contracts`; the building blocks for
writing one (`local_training`, `ServerOptimizer`, `server_step`, `proximal`) are
`fedjax_sim.algorithms.blocks`. Both are exported here. Wrappers run any algorithm with
one change: `LocalStatistics` (FedBN's local running statistics) and
`compressed_broadcast` (clients receive the broadcast quantized; server -> client
compression). `tunable(optax.adam, learning_rate=1e-3)` makes an optimizer whose float
hyperparameters are inputs of the compiled round program (runs that change only them
reuse it; fedjax_sim.engine.hyperparams).
"""

from fedjax_sim.algorithms.blocks import (ServerOptimizer, ServerState, add_sums, local_training,
                                          proximal, server_step)
from fedjax_sim.algorithms.broadcast import CompressedBroadcast, compressed_broadcast
from fedjax_sim.algorithms.fedavg import FedAvg, fedavg, fedprox
from fedjax_sim.algorithms.fednova import FedNova, fednova
from fedjax_sim.algorithms.local_stats import LocalStatistics
from fedjax_sim.algorithms.personalization import Ditto, FedPer, ditto, fedper
from fedjax_sim.algorithms.scaffold import Scaffold, ScaffoldState, scaffold
from fedjax_sim.engine.contracts import (STATS_KEY, WEIGHTINGS, Algorithm, ClientOutput,
                                         LocalSchedule, Problem, RoundSums, nonzero)
from fedjax_sim.engine.hyperparams import tunable

__all__ = ["Algorithm", "ClientOutput", "Problem", "RoundSums", "LocalSchedule", "STATS_KEY",
           "WEIGHTINGS", "ServerOptimizer", "ServerState", "local_training", "proximal",
           "server_step", "add_sums", "FedAvg", "fedavg", "fedprox", "FedNova", "fednova",
           "Scaffold", "ScaffoldState", "scaffold", "FedPer", "fedper", "Ditto", "ditto",
           "LocalStatistics", "CompressedBroadcast", "compressed_broadcast", "tunable", "nonzero"]
