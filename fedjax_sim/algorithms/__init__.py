"""Federated algorithms as client + server functions."""

from fedjax_sim.algorithms.base import Algorithm, ClientOutput, Problem
from fedjax_sim.algorithms.fedavg import FedAvg, ServerState, fedavg

__all__ = ["Algorithm", "ClientOutput", "Problem", "FedAvg", "ServerState", "fedavg"]
