"""Federated algorithms as client + server functions."""

from fedjax_sim.algorithms.base import Algorithm, ClientOutput, Problem, RoundSums
from fedjax_sim.algorithms.fedavg import FedAvg, ServerState, fedavg, fedprox
from fedjax_sim.algorithms.fednova import FedNova, fednova
from fedjax_sim.algorithms.local_stats import LocalStatistics
from fedjax_sim.algorithms.personalization import Ditto, FedPer, ditto, fedper
from fedjax_sim.algorithms.scaffold import Scaffold, ScaffoldState, scaffold

__all__ = ["Algorithm", "ClientOutput", "Problem", "RoundSums", "FedAvg", "ServerState",
           "fedavg", "fedprox", "FedNova", "fednova", "Scaffold", "ScaffoldState", "scaffold",
           "FedPer", "fedper", "Ditto", "ditto", "LocalStatistics"]
