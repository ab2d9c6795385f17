"""The execution engine: batch schedules, the local loop, cohort strategies, the round."""

from fedjax_sim.engine import hyperparams, program_cache
from fedjax_sim.engine.batching import Schedule, client_batches, make_schedule
from fedjax_sim.engine.cohort import map_clients
from fedjax_sim.engine.local import LocalData
from fedjax_sim.engine.round import DeviceData, RoundProgram, SimState

__all__ = ["Schedule", "make_schedule", "client_batches", "map_clients", "LocalData",
           "DeviceData", "RoundProgram", "SimState", "program_cache", "hyperparams"]
