"""The host loop (`simulate`) and what it is made of: planning, calls of the compiled
rounds, evaluation, checkpoints and resuming, the run directory."""

from fedjax_sim.engine.options import EngineOptions, resolve_engine
from fedjax_sim.simulation.checkpoint import CheckpointOptions
from fedjax_sim.simulation.evaluation import (CentralEvaluator, ClientEvaluator, Evaluators,
                                              FineTune, summarize_clients)
from fedjax_sim.simulation.loop import simulate
from fedjax_sim.simulation.processes import DistributedOptions, initialize as initialize_distributed
from fedjax_sim.simulation.results import Result
from fedjax_sim.simulation.setup import BATCH_NORM_MODES, INIT_STREAM, RunRequest
from fedjax_sim.simulation.sweeps import SweepResult, Trial, sweep

__all__ = ["simulate", "Result", "RunRequest", "EngineOptions", "CheckpointOptions",
           "resolve_engine", "CentralEvaluator", "ClientEvaluator", "Evaluators", "FineTune",
           "summarize_clients", "BATCH_NORM_MODES", "INIT_STREAM", "DistributedOptions",
           "initialize_distributed", "sweep", "SweepResult", "Trial"]
