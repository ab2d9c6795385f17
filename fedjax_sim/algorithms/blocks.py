"""Building blocks for writing a federated algorithm (public; the shipped algorithms are
made of them).

- `local_training(problem, optimizer, local, rng, params)`: a client's local schedule
  with any optax optimizer, optionally with a proximal pull and a custom objective.
- `proximal(grads, params, anchor, mu)`: the gradient of mu/2 ||params - anchor||^2 added.
- `server_step(optimizer, params, opt_state, pseudo_gradient)`: one server optimizer step.
- `ServerOptimizer`: the FedOpt server role (Reddi et al. 2021) as a base class: the
  server state is (params, optimizer state), clients receive the params, and the
  round's aggregate is a pseudo-gradient for `server_optimizer`.

The contract an algorithm implements is `fedjax_sim.engine.contracts.Algorithm`;
docs/algorithms.md, "Writing your own algorithm", walks through one (FedDyn) built from
these.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax

from fedjax_sim.engine.contracts import STATS_KEY, Algorithm, Problem

PyTree = Any


class ServerState(NamedTuple):
    params: PyTree
    opt_state: PyTree


class ServerOptimizer(Algorithm):
    """The FedOpt server, for algorithms whose subclass declares a `server_optimizer`
    field (FedAvg, FedNova, Ditto): `server_init`, `broadcast`, `params` and a
    `server_update` that steps the optimizer along the aggregate."""

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


def local_training(problem: Problem, optimizer: optax.GradientTransformation, local, rng,
                   params: PyTree, *, pull: tuple[PyTree, float] | None = None,
                   full_params: Callable[[PyTree], PyTree] | None = None,
                   gradient_correction: Callable[[PyTree], PyTree] | None = None
                   ) -> tuple[PyTree, dict]:
    """Runs the client's local schedule (`local`, a ClientData) with `optimizer` (fresh
    state) from `params`; returns (trained params, metric sums over the steps).

    pull=(anchor, mu) adds mu (p - anchor) to every gradient (FedProx, Ditto).
    full_params(p) maps the trained part to the parameters the loss sees (FedRep trains the
    head or the body alone); by default the trained params are the model's.
    gradient_correction(p) is added to every gradient (a linear term in the local
    objective, e.g. FedDyn's -grad_i + ...).
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
        if gradient_correction is not None:
            grads = jax.tree_util.tree_map(lambda g, c: g + c.astype(g.dtype), grads,
                                           gradient_correction(p))
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


def add_sums(a: dict, b: dict) -> dict:
    """Metric sums of two local runs of one client added (the running statistics, where
    reported, are the later run's)."""
    out = {k: a[k] + b[k] for k in a if k in b and k != STATS_KEY}
    if STATS_KEY in b:
        out[STATS_KEY] = b[STATS_KEY]
    return out
