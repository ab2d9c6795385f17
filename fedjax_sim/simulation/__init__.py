"""The host loop (`simulate`) and evaluation."""

from fedjax_sim.simulation.evaluation import (CentralEvaluator, ClientEvaluator, FineTune,
                                              summarize_clients)
from fedjax_sim.simulation.checkpoint import CheckpointOptions
from fedjax_sim.simulation.loop import EngineOptions, Result, resolve_engine, simulate

__all__ = ["simulate", "Result", "EngineOptions", "CheckpointOptions", "resolve_engine", "CentralEvaluator",
           "ClientEvaluator", "FineTune", "summarize_clients"]
