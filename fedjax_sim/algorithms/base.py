"""The shape every federated algorithm has: a client function and a server function.

    server_init(params)                                  -> server_state
    broadcast(server_state)                              -> what clients receive
    client_update(problem, broadcast, local, rng)        -> ClientOutput
    server_update(server_state, aggregate)               -> server_state

`problem` gives the model's masked loss; `local` (engine.local.LocalData) runs the
client's batch schedule. The engine vmaps `client_update` over the cohort, weights and
sums the deltas with the aggregator, and calls `server_update` once per round.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.models.adapter import Model
from fedjax_sim.models.tasks import Task
from fedjax_sim.privacy.dp_sgd import ExampleNoise, private_gradient

PyTree = Any


class ClientOutput(NamedTuple):
    """delta = w_global - w_client (a pseudo-gradient); metrics are sums over real examples."""

    delta: PyTree
    metrics: dict


class Problem(NamedTuple):
    """The model and task bound together as a masked loss over a batch.

    With `example_noise` set, `gradient` is DP-SGD's clipped and noised gradient
    (privacy.dp_sgd); the engine sets `num_examples` to the client's dataset size.
    """

    model: Model
    task: Task
    model_state: PyTree
    input_key: str
    example_noise: ExampleNoise | None = None
    num_examples: jax.Array | None = None

    def loss(self, params: PyTree, batch: dict, mask: jax.Array, rng: jax.Array):
        """Mean per-example loss over the real examples of `batch`, and metric sums.

        Returns (loss, {"loss": sum, "count": n_real, <metric>: sum, ...}).
        """
        outputs, _ = self.model.apply(params, self.model_state, batch[self.input_key],
                                      train=True, rng=rng)
        sums = self.task.masked_sums(outputs, batch[self.task.label_key], mask)
        return sums["loss"] / jnp.maximum(sums["count"], 1.0), sums

    def gradient(self, params: PyTree, batch: dict, mask: jax.Array, rng: jax.Array):
        """(gradient of the mean loss, metric sums): what a client step descends along.

        Under example-level DP this is the DP-SGD gradient, which also sums
        `dp_clipped_fraction` (examples clipped).
        """
        if self.example_noise is None:
            return jax.grad(self.loss, has_aux=True)(params, batch, mask, rng)
        return private_gradient(self.loss, self.example_noise, params, batch, mask, rng,
                                self.num_examples)


class Algorithm:
    """Base class; subclasses implement the four functions."""

    weighting: str = "num_examples"

    def server_init(self, params: PyTree) -> PyTree:
        raise NotImplementedError

    def broadcast(self, server_state: PyTree) -> PyTree:
        raise NotImplementedError

    def client_update(self, problem: Problem, broadcast: PyTree, local, rng: jax.Array) -> ClientOutput:
        raise NotImplementedError

    def server_update(self, server_state: PyTree, aggregate: PyTree) -> PyTree:
        raise NotImplementedError

    def params(self, server_state: PyTree) -> PyTree:
        """The global model's parameters in `server_state`."""
        raise NotImplementedError

    def client_weight(self, num_examples: jax.Array) -> jax.Array:
        if self.weighting == "num_examples":
            return num_examples.astype(jnp.float32)
        return jnp.where(num_examples > 0, 1.0, 0.0).astype(jnp.float32)
