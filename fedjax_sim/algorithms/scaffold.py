"""SCAFFOLD (Karimireddy et al. 2020): local steps corrected by control variates.

Server state: the model x and the server control variate c. Client i keeps its own
control variate c_i (client state, zero at first). A sampled client with K local steps
of SGD at learning rate eta_l runs

    y <- y - eta_l (g_i(y) - c_i + c)                 (K times, from y = x)
    c_i+ = c_i - c + (x - y) / (K eta_l)              (option II of the paper)

and sends Delta y_i = y - x and Delta c_i = c_i+ - c_i. The server updates

    x <- x + eta_g * mean_i Delta y_i                 (server SGD at the global step size)
    c <- c + (1/N) sum_{i in S} Delta c_i              (N = all clients, S = the cohort)

so c stays the mean of all N clients' variates under partial participation: clients not
sampled keep their c_i, and the server adds the cohort's changes scaled by 1/N. K is the
client's own number of real steps (clients with more data take more steps under
`local_epochs`). The mean over the cohort is uniform as in the paper (weighting='uniform'
is the default); weighting='num_examples' weights Delta y_i by n_i instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_sim.algorithms.blocks import server_step
from fedjax_sim.engine.contracts import Algorithm, ClientOutput, LocalSchedule, Problem, RoundSums
from fedjax_sim.errors import UserError

PyTree = Any


class ScaffoldState(NamedTuple):
    params: PyTree
    opt_state: PyTree
    control: PyTree  # c, the server control variate (float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Scaffold(Algorithm):
    learning_rate: float
    server_optimizer: optax.GradientTransformation
    weighting: str = dataclasses.field(default="uniform", kw_only=True)
    hyperparameters = ("learning_rate",)
    client_dp = ("each client also sends its control-variate change, which client-level DP "
                 "neither clips nor noises")

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise UserError(f"SCAFFOLD's client learning_rate must be a number > 0, got "
                            f"{self.learning_rate!r}")

    def server_init(self, params):
        return ScaffoldState(params, self.server_optimizer.init(params), _zeros(params))

    def client_state_init(self, params):
        return _zeros(params)

    def broadcast(self, server_state):
        return server_state.params, server_state.control

    def params(self, server_state):
        return server_state.params

    def client_update(self, problem: Problem, broadcast, local, rng, client_state=None) -> ClientOutput:
        x, c = broadcast
        c_i = client_state
        lr = self.learning_rate
        # The correction -c_i + c is the same at every step.
        correction = jax.tree_util.tree_map(lambda a, b: b - a, c_i, c)

        def step(y, batch, mask, key):
            grads, metrics = problem.gradient(y, batch, mask, key)
            y = jax.tree_util.tree_map(lambda p, g, k: p - lr * (g + k).astype(p.dtype),
                                       y, grads, correction)
            return y, metrics

        y, metrics = local.run(step, x, rng)
        k = jnp.maximum(local.real_steps(), 1).astype(jnp.float32)
        delta = jax.tree_util.tree_map(lambda a, b: a - b, x, y)  # x - y
        c_new = jax.tree_util.tree_map(
            lambda ci, cg, d: ci - cg + d.astype(jnp.float32) / (k * lr), c_i, c, delta)
        delta_c = jax.tree_util.tree_map(jnp.subtract, c_new, c_i)
        return ClientOutput(delta, metrics, client_state=c_new, extras=delta_c)

    def server_update(self, server_state, aggregate, sums: RoundSums):
        params, opt_state = server_step(self.server_optimizer, server_state.params,
                                        server_state.opt_state, aggregate)
        control = jax.tree_util.tree_map(lambda c, d: c + d / sums.population,
                                         server_state.control, sums.extras)
        return ScaffoldState(params, opt_state, control)


def _zeros(params):
    return jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


def scaffold(learning_rate: float, global_learning_rate: float = 1.0, *,
             server_optimizer: optax.GradientTransformation | None = None,
             local_epochs: int | None = 1, local_steps: int | None = None,
             batch_size: int | None = 10, weighting: str = "uniform") -> Scaffold:
    """SCAFFOLD with client SGD at `learning_rate` (eta_l) and the global step size
    `global_learning_rate` (eta_g; the server optimizer is SGD at eta_g unless
    `server_optimizer` is given)."""
    if server_optimizer is None and not (isinstance(global_learning_rate, (int, float))
                                         and global_learning_rate > 0):
        raise UserError(f"SCAFFOLD's global_learning_rate must be a number > 0, got "
                        f"{global_learning_rate!r}")
    return Scaffold(learning_rate, server_optimizer or optax.sgd(global_learning_rate),
                    **LocalSchedule.of(batch_size, local_epochs, local_steps)._asdict(),
                    weighting=weighting)
