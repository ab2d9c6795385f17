"""FedAvg and its FedOpt family (McMahan et al. 2017; Reddi et al. 2021).

Each sampled client starts from the global parameters w, runs its local schedule with the
client optimizer, and sends delta_i = w - w_i. The server forms the weighted mean
Delta = sum_i p_i delta_i / sum_i p_i (p_i = n_i, or 1 with weighting='uniform') and
treats it as a pseudo-gradient for the server optimizer:

    w <- w + server_optimizer.update(Delta)

With server SGD at learning rate 1 this is exactly FedAvg (w <- sum p_i w_i / sum p_i).
Other members are configurations, not new code:
- FedSGD: one full-batch local step (local_epochs=1, batch_size=None), client SGD.
- FedAvgM: server SGD with momentum.
- FedAdam / FedYogi / FedAdagrad: server adam / yogi / adagrad (Reddi et al. use
  eps=1e-3 and betas (0.9, 0.99)).
- FedProx (Li et al. 2020): `proximal_mu` = mu > 0 adds mu/2 ||w - w_global||^2 to every
  client's local objective, i.e. mu (w - w_global) to every local gradient (`fedprox`).
  The logged train loss is the data loss, without the proximal term.
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from fedjax_sim.algorithms.blocks import ServerOptimizer, local_training
from fedjax_sim.engine.contracts import ClientOutput, LocalSchedule, Problem, nonzero
from fedjax_sim.errors import UserError


@dataclasses.dataclass(frozen=True, eq=False)
class FedAvg(ServerOptimizer):
    client_optimizer: optax.GradientTransformation
    server_optimizer: optax.GradientTransformation
    proximal_mu: float = 0.0
    hyperparameters = ("proximal_mu",)

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.proximal_mu, (int, float)) and self.proximal_mu >= 0):
            raise UserError(f"FedProx's mu must be a number >= 0, got {self.proximal_mu!r}")

    def client_update(self, problem: Problem, broadcast, local, rng, client_state=None) -> ClientOutput:
        del client_state
        pull = (broadcast, self.proximal_mu) if nonzero(self.proximal_mu) else None
        params, metrics = local_training(problem, self.client_optimizer, local, rng, broadcast,
                                         pull=pull)
        delta = jax.tree_util.tree_map(lambda g, c: g - c, broadcast, params)
        return ClientOutput(delta, metrics)


def fedavg(client_optimizer: optax.GradientTransformation,
           server_optimizer: optax.GradientTransformation | None = None, *,
           local_epochs: int | None = 1, local_steps: int | None = None,
           batch_size: int | None = 10, weighting: str = "num_examples") -> FedAvg:
    """FedAvg with any optax optimizers; `server_optimizer` defaults to SGD(1.0)."""
    return FedAvg(client_optimizer, server_optimizer or optax.sgd(1.0),
                  **LocalSchedule.of(batch_size, local_epochs, local_steps)._asdict(),
                  weighting=weighting)


def fedprox(client_optimizer: optax.GradientTransformation, mu: float,
            server_optimizer: optax.GradientTransformation | None = None, *,
            local_epochs: int | None = 1, local_steps: int | None = None,
            batch_size: int | None = 10, weighting: str = "num_examples") -> FedAvg:
    """FedProx (Li et al. 2020): FedAvg whose clients minimise
    f_i(w) + mu/2 ||w - w_global||^2. mu=0 is FedAvg; the paper uses mu in {0.001, 0.01,
    0.1, 1} (1 on Synthetic(1,1))."""
    base = fedavg(client_optimizer, server_optimizer, local_epochs=local_epochs,
                  local_steps=local_steps, batch_size=batch_size, weighting=weighting)
    return dataclasses.replace(base, proximal_mu=mu)
