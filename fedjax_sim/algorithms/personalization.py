"""Personalized federated learning: a model of its own for every client.

- `fedper` (Arivazhagan et al. 2019) / FedRep (Collins et al. 2021): the model is split
  into a shared body, averaged by the server as in FedAvg, and a personal head that never
  leaves the client (kept as client state, one per client of the population). FedPer
  trains body and head together; FedRep (`head_passes=k`) first trains the head alone for
  k passes of the local schedule with the body fixed, then the body alone for one pass
  with the new head fixed.
- `ditto` (Li et al. 2021): FedAvg for the global model w, plus a personal model v_i per
  client trained on the client's data with a pull toward w:
      v_i <- v_i - eta (grad f_i(v_i) + lambda (v_i - w))
  (lambda = 0: purely local models; large lambda: v_i -> w). Only w's update is sent.

Each client's model is `personal_params(global params, client state)`; simulate()'s
per-client evaluation reports it as `client_personal_*`. Clients never sampled keep their
initial state (FedPer: the initial head; Ditto: the initial model).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import optax

from fedjax_sim.algorithms.blocks import ServerOptimizer, add_sums, local_training, server_step
from fedjax_sim.engine.contracts import (STATS_KEY, Algorithm, ClientOutput, LocalSchedule, Problem,
                                         RoundSums)
from fedjax_sim.errors import UserError
from fedjax_sim.trees import path_names, under

PyTree = Any
HeadSelector = str | Sequence[str] | Callable[[str], bool]


class Split(NamedTuple):
    """A fixed partition of a parameter tree's leaves into body and head (tuples of leaves)."""

    treedef: Any
    is_head: tuple[bool, ...]

    @classmethod
    def of(cls, params: PyTree, head: HeadSelector) -> "Split":
        names = path_names(params)
        if callable(head):
            mask = tuple(bool(head(n)) for n in names)
        else:
            prefixes = (head,) if isinstance(head, str) else tuple(head)
            mask = tuple(any(under(n, p) for p in prefixes) for n in names)
        if not any(mask):
            raise UserError(f"the personal head {head!r} selects no parameter; the model's "
                            f"parameters are {names}")
        if all(mask):
            raise UserError(f"the personal head {head!r} selects every parameter, leaving no "
                            f"shared body; name only the last layer(s), e.g. 'out'")
        return cls(jax.tree_util.tree_structure(params), mask)

    def split(self, params: PyTree) -> tuple[tuple, tuple]:
        leaves = jax.tree_util.tree_leaves(params)
        return (tuple(x for x, h in zip(leaves, self.is_head) if not h),
                tuple(x for x, h in zip(leaves, self.is_head) if h))

    def merge(self, body: tuple, head: tuple) -> PyTree:
        body, head = iter(body), iter(head)
        return jax.tree_util.tree_unflatten(
            self.treedef, [next(head) if h else next(body) for h in self.is_head])


class FedPerState(NamedTuple):
    params: PyTree  # the full model: the shared body, and the initial head
    opt_state: PyTree  # the server optimizer's state over the body


@dataclasses.dataclass(frozen=True, eq=False)
class FedPer(Algorithm):
    client_optimizer: optax.GradientTransformation
    server_optimizer: optax.GradientTransformation
    head: HeadSelector = "out"
    head_passes: int | None = None
    personalized = True
    global_model = False

    def __post_init__(self):
        super().__post_init__()
        if self.head_passes is not None and (isinstance(self.head_passes, bool) or not isinstance(
                self.head_passes, int) or self.head_passes < 1):
            raise UserError(f"head_passes must be an integer >= 1 (FedRep) or None (FedPer), "
                            f"got {self.head_passes!r}")

    def _split(self, params) -> Split:
        return Split.of(params, self.head)

    def server_init(self, params):
        body, _ = self._split(params).split(params)
        return FedPerState(params, self.server_optimizer.init(body))

    def client_state_init(self, params):
        return self._split(params).split(params)[1]

    def broadcast(self, server_state):
        return server_state.params

    def params(self, server_state):
        return server_state.params

    def personal_params(self, params, client_state):
        split = self._split(params)
        return split.merge(split.split(params)[0], client_state)

    def client_update(self, problem: Problem, broadcast, local, rng, client_state=None) -> ClientOutput:
        split = self._split(broadcast)
        body, _ = split.split(broadcast)
        head = client_state
        opt = self.client_optimizer
        if self.head_passes is None:  # FedPer: body and head together
            params, metrics = local_training(problem, opt, local, rng, split.merge(body, head))
            new_body, new_head = split.split(params)
        else:  # FedRep: the head with the body fixed, then the body with the new head fixed
            new_head, metrics = head, None
            for k in range(self.head_passes):
                new_head, m = local_training(problem, opt, local, jax.random.fold_in(rng, k),
                                             new_head, full_params=lambda h: split.merge(body, h))
                metrics = m if metrics is None else add_sums(metrics, m)
                local = local.after(m)  # the next pass continues from these statistics
            fixed_head = new_head
            new_body, m = local_training(problem, opt, local, jax.random.fold_in(rng, self.head_passes),
                                         body, full_params=lambda b: split.merge(b, fixed_head))
            metrics = add_sums(metrics, m)
        delta = tuple(g - n for g, n in zip(body, new_body))
        return ClientOutput(delta, metrics, client_state=tuple(new_head))

    def server_update(self, server_state, aggregate, sums: RoundSums):
        del sums
        split = self._split(server_state.params)
        body, head = split.split(server_state.params)
        body, opt_state = server_step(self.server_optimizer, body, server_state.opt_state,
                                      tuple(aggregate))
        return FedPerState(split.merge(body, head), opt_state)


def fedper(client_optimizer: optax.GradientTransformation, head: HeadSelector = "out",
           server_optimizer: optax.GradientTransformation | None = None, *,
           head_passes: int | None = None, local_epochs: int | None = 1,
           local_steps: int | None = None, batch_size: int | None = 10,
           weighting: str = "num_examples") -> FedPer:
    """FedPer (head_passes=None) or FedRep (head_passes=k). `head` names the personal
    parameters: a path prefix ('out' is the zoo models' output layer), several, or a
    predicate on 'layer/param' names."""
    return FedPer(client_optimizer, server_optimizer or optax.sgd(1.0), head, head_passes,
                  **LocalSchedule.of(batch_size, local_epochs, local_steps)._asdict(),
                  weighting=weighting)


@dataclasses.dataclass(frozen=True, eq=False)
class Ditto(ServerOptimizer):
    client_optimizer: optax.GradientTransformation
    server_optimizer: optax.GradientTransformation
    lam: float = 0.1
    personal_optimizer: optax.GradientTransformation | None = None
    personalized = True
    hyperparameters = ("lam",)

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.lam, (int, float)) and self.lam >= 0):
            raise UserError(f"Ditto's lambda must be a number >= 0, got {self.lam!r}")

    def client_state_init(self, params):
        return params

    def personal_params(self, params, client_state):
        return client_state

    def client_update(self, problem: Problem, broadcast, local, rng, client_state=None) -> ClientOutput:
        k_global, k_personal = jax.random.split(rng)
        w, metrics = local_training(problem, self.client_optimizer, local, k_global, broadcast)
        personal = self.personal_optimizer or self.client_optimizer
        # The personal model's steps continue from the running statistics the global
        # model's steps ended with, and the client reports the last ones.
        v, personal_sums = local_training(problem, personal, local.after(metrics), k_personal,
                                          client_state, pull=(broadcast, self.lam))
        if STATS_KEY in personal_sums:
            metrics = {**metrics, STATS_KEY: personal_sums[STATS_KEY]}
        delta = jax.tree_util.tree_map(lambda g, c: g - c, broadcast, w)
        return ClientOutput(delta, metrics, client_state=v)


def ditto(client_optimizer: optax.GradientTransformation, lam: float = 0.1,
          server_optimizer: optax.GradientTransformation | None = None, *,
          personal_optimizer: optax.GradientTransformation | None = None,
          local_epochs: int | None = 1, local_steps: int | None = None,
          batch_size: int | None = 10, weighting: str = "num_examples") -> Ditto:
    """Ditto with regularisation strength `lam` (lambda); the personal models train with
    `personal_optimizer` (default: the client optimizer) over the same local schedule."""
    return Ditto(client_optimizer, server_optimizer or optax.sgd(1.0), lam, personal_optimizer,
                 **LocalSchedule.of(batch_size, local_epochs, local_steps)._asdict(),
                 weighting=weighting)
