"""FedNova (Wang et al. 2020): normalised averaging for clients with different local work.

With plain FedAvg, a client that takes more local steps moves further and pulls the
average toward its own optimum (objective inconsistency). FedNova divides each client's
change by the size of its local work and rescales the average by the cohort's effective
number of steps. Client i runs tau_i local steps of SGD (learning rate eta, momentum rho,
optional proximal mu) from x and sends the normalised direction

    d_i = (x - y_i) / ||a_i||_1

where a_i is the vector of weights the local updates put on each step's gradient:
    SGD:                 ||a_i||_1 = tau_i
    momentum rho:        ||a_i||_1 = (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)
    proximal mu (rho=0): ||a_i||_1 = (1 - (1 - eta mu)^tau_i) / (eta mu)
The server forms p_i-weighted means (p_i = n_i by default, as in the paper) and steps

    x <- x - tau_eff * sum_i p_i d_i,    tau_eff = sum_i p_i ||a_i||_1

through the server optimizer (SGD at 1 gives exactly this). When every client takes the
same number of steps FedNova equals FedAvg. tau_i is each client's own count of real
steps: under `local_epochs`, a client with more data takes more steps and is normalised.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.blocks import ServerOptimizer, local_training
from fedjax_sim.engine.contracts import ClientOutput, LocalSchedule, Problem, RoundSums, nonzero
from fedjax_sim.errors import UserError

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class FedNova(ServerOptimizer):
    learning_rate: float
    server_optimizer: optax.GradientTransformation
    momentum: float = 0.0
    proximal_mu: float = 0.0
    hyperparameters = ("learning_rate", "proximal_mu")
    client_dp = "each client also sends its number of local steps, which client-level DP does not protect"

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise UserError(f"FedNova's learning_rate must be a number > 0, got {self.learning_rate!r}")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise UserError(f"FedNova's momentum must be in [0, 1), got {self.momentum!r}")
        if not (isinstance(self.proximal_mu, (int, float)) and self.proximal_mu >= 0):
            raise UserError(f"FedNova's proximal mu must be >= 0, got {self.proximal_mu!r}")
        if self.momentum and self.proximal_mu:
            raise UserError("FedNova with both momentum and a proximal term is not supported; "
                            "set one of momentum and proximal_mu to 0")
        if self.proximal_mu and self.learning_rate * self.proximal_mu >= 1:
            raise UserError(f"FedNova's proximal term needs learning_rate * mu < 1, got "
                            f"{self.learning_rate * self.proximal_mu}")

    def local_work(self, tau: jax.Array) -> jax.Array:
        """||a||_1 for a client that took `tau` local steps."""
        tau = tau.astype(jnp.float32)
        rho, mu, lr = self.momentum, self.proximal_mu, self.learning_rate
        if rho:
            return (tau - rho * (1 - rho ** tau) / (1 - rho)) / (1 - rho)
        if nonzero(mu):
            return (1 - (1 - lr * mu) ** tau) / (lr * mu)
        return tau

    def client_update(self, problem: Problem, broadcast, local, rng, client_state=None) -> ClientOutput:
        del client_state
        opt = optax.sgd(self.learning_rate, momentum=self.momentum or None)
        pull = (broadcast, self.proximal_mu) if nonzero(self.proximal_mu) else None
        params, metrics = local_training(problem, opt, local, rng, broadcast, pull=pull)
        work = jnp.maximum(self.local_work(local.real_steps()), 1e-12)
        direction = jax.tree_util.tree_map(lambda g, c: (g - c) / work.astype(g.dtype),
                                           broadcast, params)
        # tau_eff = sum p_i ||a_i|| / sum p_i, summed with the aggregation weights p_i.
        w = self.client_weight(local.num_examples)
        return ClientOutput(direction, metrics, extras={"work": w * work, "weight": w})

    def server_update(self, server_state, aggregate, sums: RoundSums):
        tau_eff = sums.extras["work"] / jnp.maximum(sums.extras["weight"], 1e-12)
        step = jax.tree_util.tree_map(lambda d: d * tau_eff.astype(d.dtype), aggregate)
        return super().server_update(server_state, step)


def fednova(learning_rate: float, server_optimizer: optax.GradientTransformation | None = None, *,
            momentum: float = 0.0, proximal_mu: float = 0.0, local_epochs: int | None = 1,
            local_steps: int | None = None, batch_size: int | None = 10,
            weighting: str = "num_examples") -> FedNova:
    """FedNova with client SGD (learning rate, optional momentum or proximal mu); the
    server optimizer defaults to SGD(1.0), which is the paper's update."""
    return FedNova(learning_rate, server_optimizer or optax.sgd(1.0), momentum, proximal_mu,
                   **LocalSchedule.of(batch_size, local_epochs, local_steps)._asdict(),
                   weighting=weighting)
