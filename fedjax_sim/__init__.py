"""fedjax_sim: a vectorised federated-learning simulator in JAX.

    import optax, fedjax_sim as fs
    train, test = fs.data.load_digits()
    clients = fs.data.partition(train, train["y"], "dirichlet", 100, seed=0, alpha=0.5)
    model = fs.models.get_model("mlp", (8, 8, 1), 10)
    result = fs.simulate(model, fs.algorithms.fedavg(optax.sgd(0.1)), clients,
                         rounds=100, clients_per_round=10, eval_data=test)
"""

from fedjax_sim.engine.compilation_cache import compilation_cache, configure_default

configure_default()  # JAX's persistent compilation cache (engine/compilation_cache.py)

from fedjax_sim import aggregators, algorithms, attacks, data, engine, models, privacy  # noqa: E402
from fedjax_sim.errors import UserError
from fedjax_sim.simulation import (CheckpointOptions, DistributedOptions, EngineOptions, FineTune,
                                   Result, initialize_distributed, simulate, sweep)
from fedjax_sim.simulation.audit import audit

privacy.audit = audit  # also fs.privacy.audit, beside the mechanisms it checks
from fedjax_sim.simulation.checkpoint import load_params
from fedjax_sim.simulation.plots import plot
from fedjax_sim import tracking

__version__ = "0.1.0"
__all__ = ["compilation_cache", "simulate", "sweep", "audit", "Result", "EngineOptions", "CheckpointOptions", "FineTune", "load_params", "UserError", "data", "models",
           "algorithms", "aggregators", "attacks", "engine", "privacy", "DistributedOptions",
           "initialize_distributed", "plot", "tracking"]
