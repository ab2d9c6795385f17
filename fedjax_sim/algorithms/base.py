"""The shape every federated algorithm has: a client function and a server function.

    server_init(params)                                       -> server_state
    client_state_init(params)                                 -> one client's state, or None
    broadcast(server_state)                                   -> what clients receive
    client_update(problem, broadcast, local, rng, client_state) -> ClientOutput
    server_update(server_state, aggregate, sums)              -> server_state

`problem` gives the model's masked loss; `local` (engine.local.LocalData) runs the
client's batch schedule. The engine vmaps `client_update` over the cohort, weights and
sums the deltas with the aggregator, and calls `server_update` once per round.

Stateful algorithms (SCAFFOLD's control variates, FedPer's personal heads, Ditto's
personal models) return a `client_state_init`; the engine keeps one row of it per client
of the whole population ([C, ...] arrays), gathers the cohort's rows inside the round's
program, hands each client its row and scatters the rows it returns back. Clients that
are not sampled keep their state unchanged.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.errors import UserError
from fedjax_sim.models.adapter import Model
from fedjax_sim.models.tasks import Task
from fedjax_sim.privacy.dp_sgd import ExampleNoise, private_gradient
from fedjax_sim.trees import merge

PyTree = Any


class ClientOutput(NamedTuple):
    """What one client returns.

    delta: what the aggregator weights and averages (for FedAvg w_global - w_client, a
      pseudo-gradient); metrics: sums over the client's real examples; client_state: the
      client's new state (stateful algorithms); extras: values summed WITHOUT weights over
      the round's clients and handed to `server_update` (e.g. SCAFFOLD's control-variate
      changes).
    """

    delta: PyTree
    metrics: dict
    client_state: PyTree = None
    extras: PyTree = None


class RoundSums(NamedTuple):
    """What `server_update` learns about the round besides the aggregate.

    extras: sum over the clients that took part of their `ClientOutput.extras`;
    clients: how many clients took part; population: how many clients the dataset has.
    """

    extras: PyTree
    clients: jax.Array
    population: int


class StatsCell:
    """The running statistics (BatchNorm's mean and variance) of the client being traced.

    Where clients update statistics (`simulate(batch_norm='averaged' | 'local')`), the
    engine gives each client a cell holding its starting statistics: `Problem.loss` reads
    them and reports the updated ones, and `LocalData.run` carries them from step to step
    and leaves the client's last statistics in the cell, whichever algorithm runs the steps
    (several `local.run` calls continue from one another). A cell lives only while one
    client's update is traced.
    """

    def __init__(self, value: PyTree):
        self.value = value


# The key under which `Problem.loss` reports updated statistics in its metric sums (taken
# out again by `LocalData.run`).
STATS_KEY = "_stats"


class Problem(NamedTuple):
    """The model and task bound together as a masked loss over a batch.

    With `example_noise` set, `gradient` is DP-SGD's clipped and noised gradient
    (privacy.dp_sgd); the engine sets `num_examples` to the client's dataset size. With
    `stats` (a StatsCell) the model's running statistics are the cell's, and the loss
    reports their training-mode update (see StatsCell).
    """

    model: Model
    task: Task
    model_state: PyTree
    input_key: str
    example_noise: ExampleNoise | None = None
    num_examples: jax.Array | None = None
    stats: StatsCell | None = None

    def loss(self, params: PyTree, batch: dict, mask: jax.Array, rng: jax.Array):
        """Mean per-example loss over the real examples of `batch`, and metric sums.

        Returns (loss, {"loss": sum, "count": n_real, <metric>: sum, ...}).
        """
        state = self.model_state
        if self.stats is not None:
            state = merge(state, self.stats.value)
        # Models that can leave padding slots out of batch statistics are told which they are.
        extra = {"batch_mask": mask} if self.model.takes_batch_mask else {}
        outputs, new_state = self.model.apply(params, state, batch[self.input_key],
                                              train=True, rng=rng, **extra)
        sums = self.task.masked_sums(outputs, batch[self.task.label_key], mask)
        if self.stats is not None:
            sums[STATS_KEY] = self.model.stats_of(new_state)
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


WEIGHTINGS = ("num_examples", "uniform")


def check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise UserError(f"weighting must be 'num_examples' or 'uniform', got {weighting!r}")


def local_schedule(local_epochs: int | None, local_steps: int | None) -> tuple[int | None, int | None]:
    """(local_epochs, local_steps) as the builders take them: local_steps given explicitly
    overrides the default local_epochs=1."""
    if local_steps is not None and local_epochs == 1:
        local_epochs = None
    return local_epochs, local_steps


class Algorithm:
    """Base class; subclasses implement the four functions (and the stateful ones).

    Class attributes the engine reads:
      weighting: 'num_examples' (w_i = n_i) or 'uniform' (w_i = 1).
      personalized: clients have personal models (`personal_params`), evaluated per client.
      global_model: the server holds a model that is meaningful on its own (FedPer's is not:
        its head is never trained), so the pooled test set evaluates it.
      client_dp: None if client-level DP (clipping and noising the deltas) protects
        everything the client sends, else why it does not.
    """

    weighting: str = "num_examples"
    personalized: bool = False
    global_model: bool = True
    client_dp: str | None = None

    def server_init(self, params: PyTree) -> PyTree:
        raise NotImplementedError

    def client_state_init(self, params: PyTree) -> PyTree:
        """One client's initial state (no client axis), or None for a stateless algorithm."""
        del params
        return None

    def broadcast(self, server_state: PyTree) -> PyTree:
        raise NotImplementedError

    def client_update(self, problem: Problem, broadcast: PyTree, local, rng: jax.Array,
                      client_state: PyTree = None) -> ClientOutput:
        raise NotImplementedError

    def server_update(self, server_state: PyTree, aggregate: PyTree, sums: RoundSums) -> PyTree:
        raise NotImplementedError

    def params(self, server_state: PyTree) -> PyTree:
        """The global model's parameters in `server_state`."""
        raise NotImplementedError

    def personal_params(self, params: PyTree, client_state: PyTree) -> PyTree:
        """A client's own model, from the global parameters and its state (personalized
        algorithms); by default the global model."""
        del client_state
        return params

    def personal_model_state(self, model_state: PyTree, client_state: PyTree) -> PyTree:
        """The model state a client's own model runs with (its own BatchNorm statistics
        under FedBN); by default the global one."""
        del client_state
        return model_state

    def client_weight(self, num_examples: jax.Array) -> jax.Array:
        if self.weighting == "num_examples":
            return num_examples.astype(jnp.float32)
        return jnp.where(num_examples > 0, 1.0, 0.0).astype(jnp.float32)
