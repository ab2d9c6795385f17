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
from typing import Any, NamedTuple

import jax
import optax

from fedjax_sim.algorithms.base import (Algorithm, ClientOutput, Problem, check_weighting,
                                        local_schedule)
from fedjax_sim.errors import UserError

PyTree = Any


class ServerState(NamedTuple):
    params: PyTree
    opt_state: PyTree


class ServerOptimizer(Algorithm):
    """The FedOpt server (Reddi et al. 2021), shared by FedAvg, FedNova and Ditto: the
    server state is (params, optimizer state), clients receive the params, and the round's
    aggregate is a pseudo-gradient for `self.server_optimizer`."""

    server_optimizer: optax.GradientTransformation

    def server_init(self, params):
        return ServerState(params, self.server_optimizer.init(params))

    def broadcast(self, server_state):
        return server_state.params

    def params(self, server_state):
        return server_state.params

    def server_update(self, server_state, aggregate, sums=None):
        del sums
        return ServerState(*server_step(self.server_optimizer, server_state.params,
                                        server_state.opt_state, aggregate))


@dataclasses.dataclass(frozen=True, eq=False)
class FedAvg(ServerOptimizer):
    client_optimizer: optax.GradientTransformation
    server_optimizer: optax.GradientTransformation
    local_epochs: int | None = 1
    local_steps: int | None = None
    batch_size: int | None = 10
    weighting: str = "num_examples"
    proximal_mu: float = 0.0

    def __post_init__(self):
        check_weighting(self.weighting)
        if not (isinstance(self.proximal_mu, (int, float)) and self.proximal_mu >= 0):
            raise UserError(f"FedProx's mu must be a number >= 0, got {self.proximal_mu!r}")

    def client_update(self, problem: Problem, broadcast, local, rng, client_state=None) -> ClientOutput:
        del client_state
        pull = (broadcast, self.proximal_mu) if self.proximal_mu else None
        params, metrics = local_training(problem, self.client_optimizer, local, rng, broadcast,
                                         pull=pull)
        delta = jax.tree_util.tree_map(lambda g, c: g - c, broadcast, params)
        return ClientOutput(delta, metrics)


def local_training(problem: Problem, optimizer: optax.GradientTransformation, local, rng,
                   params: PyTree, *, pull: tuple[PyTree, float] | None = None,
                   full_params=None) -> tuple[PyTree, dict]:
    """Runs the client's local schedule with `optimizer` (fresh state) from `params`;
    returns (trained params, metric sums over the steps).

    pull=(anchor, mu) adds mu (p - anchor) to every gradient (FedProx, Ditto).
    full_params(p) maps the trained part to the parameters the loss sees (FedRep trains the
    head or the body alone); by default the trained params are the model's.
    """
    def step(carry, batch, mask, key):
        p, opt_state = carry
        if full_params is None:
            grads, metrics = problem.gradient(p, batch, mask, key)
        else:
            grads, metrics = jax.grad(lambda q: problem.loss(full_params(q), batch, mask, key),
                                      has_aux=True)(p)
        if pull is not None:
            grads = proximal(grads, p, pull[0], pull[1])
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), metrics

    (params, _), metrics = local.run(step, (params, optimizer.init(params)), rng)
    return params, metrics


def proximal(grads: PyTree, params: PyTree, anchor: PyTree, mu: float) -> PyTree:
    """grads + mu (params - anchor): the gradient of the loss plus mu/2 ||params - anchor||^2."""
    return jax.tree_util.tree_map(lambda g, p, a: g + mu * (p - a).astype(g.dtype),
                                  grads, params, anchor)


def server_step(optimizer: optax.GradientTransformation, params: PyTree, opt_state: PyTree,
                pseudo_gradient: PyTree) -> tuple[PyTree, PyTree]:
    """One server optimizer step along a pseudo-gradient: (new params, new opt_state)."""
    pseudo_gradient = jax.tree_util.tree_map(lambda a, p: a.astype(p.dtype), pseudo_gradient, params)
    updates, opt_state = optimizer.update(pseudo_gradient, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def fedavg(client_optimizer: optax.GradientTransformation,
           server_optimizer: optax.GradientTransformation | None = None, *,
           local_epochs: int | None = 1, local_steps: int | None = None,
           batch_size: int | None = 10, weighting: str = "num_examples") -> FedAvg:
    """FedAvg with any optax optimizers; `server_optimizer` defaults to SGD(1.0)."""
    local_epochs, local_steps = local_schedule(local_epochs, local_steps)
    return FedAvg(client_optimizer, server_optimizer or optax.sgd(1.0), local_epochs,
                  local_steps, batch_size, weighting)


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
