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
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import optax

from fedjax_sim.algorithms.base import Algorithm, ClientOutput, Problem
from fedjax_sim.errors import UserError

PyTree = Any


class ServerState(NamedTuple):
    params: PyTree
    opt_state: PyTree


@dataclasses.dataclass(frozen=True, eq=False)
class FedAvg(Algorithm):
    client_optimizer: optax.GradientTransformation
    server_optimizer: optax.GradientTransformation
    local_epochs: int | None = 1
    local_steps: int | None = None
    batch_size: int | None = 10
    weighting: str = "num_examples"

    def __post_init__(self):
        if self.weighting not in ("num_examples", "uniform"):
            raise UserError(f"weighting must be 'num_examples' or 'uniform', got {self.weighting!r}")

    def server_init(self, params):
        return ServerState(params, self.server_optimizer.init(params))

    def broadcast(self, server_state):
        return server_state.params

    def params(self, server_state):
        return server_state.params

    def client_update(self, problem: Problem, broadcast, local, rng) -> ClientOutput:
        opt = self.client_optimizer

        def step(carry, batch, mask, key):
            params, opt_state = carry
            grads, metrics = problem.gradient(params, batch, mask, key)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), metrics

        (params, _), metrics = local.run(step, (broadcast, opt.init(broadcast)), rng)
        delta = jax.tree_util.tree_map(lambda g, c: g - c, broadcast, params)
        return ClientOutput(delta, metrics)

    def server_update(self, server_state, aggregate):
        params, opt_state = server_state
        aggregate = jax.tree_util.tree_map(lambda a, p: a.astype(p.dtype), aggregate, params)
        updates, opt_state = self.server_optimizer.update(aggregate, opt_state, params)
        return ServerState(optax.apply_updates(params, updates), opt_state)


def fedavg(client_optimizer: optax.GradientTransformation,
           server_optimizer: optax.GradientTransformation | None = None, *,
           local_epochs: int | None = 1, local_steps: int | None = None,
           batch_size: int | None = 10, weighting: str = "num_examples") -> FedAvg:
    """FedAvg with any optax optimizers; `server_optimizer` defaults to SGD(1.0)."""
    if local_steps is not None and local_epochs == 1:
        local_epochs = None  # local_steps given explicitly overrides the default
    return FedAvg(client_optimizer, server_optimizer or optax.sgd(1.0), local_epochs,
                  local_steps, batch_size, weighting)
