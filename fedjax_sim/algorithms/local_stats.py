"""FedBN's local statistics (Li et al. 2021, "FedBN: Federated Learning on Non-IID
Features via Local Batch Normalization"), as a wrapper around any algorithm.

`LocalStatistics(inner, initial)` runs `inner` unchanged, except that every client keeps
its own running statistics (the model's `stats`, BatchNorm's mean and variance) in its
client state: it starts its local training from them, updates them in its training
steps, and keeps the result; they never leave the client, so the server aggregates the
weights only. Each client's model is the global (or `inner`'s personal) parameters with
its own statistics, so evaluation is per client (`client_personal_*`); there is no global
model to test on a pooled test set.

FedBN also keeps BatchNorm's affine parameters (scale and bias) local; combine with a
personal split of those parameters for that (e.g. `fedper(..., head=<predicate>)`).
`simulate(batch_norm='local')` applies the wrapper.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedjax_sim.engine.contracts import STATS_KEY, Algorithm, ClientOutput, Problem
from fedjax_sim.trees import merge

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class LocalStatistics(Algorithm):
    """`inner` with each client's running statistics kept in its client state (FedBN).

    Its schedule and weighting (the declared fields) are the inner algorithm's."""

    inner: Algorithm
    initial: PyTree = dataclasses.field(repr=False)

    personalized = True
    global_model = False

    @classmethod
    def wrap(cls, inner: Algorithm, initial: PyTree) -> "LocalStatistics":
        local = inner.local_schedule
        return cls(inner, initial, batch_size=local.batch_size, local_epochs=local.local_epochs,
                   local_steps=local.local_steps, weighting=inner.weighting)

    @property
    def client_dp(self):
        return self.inner.client_dp

    def server_init(self, params):
        return self.inner.server_init(params)

    def client_state_init(self, params):
        return {"inner": self.inner.client_state_init(params), "stats": self.initial}

    def broadcast(self, server_state):
        return self.inner.broadcast(server_state)

    def downlink(self, broadcast):
        return self.inner.downlink(broadcast)

    def client_update(self, problem: Problem, broadcast, local, rng,
                      client_state=None) -> ClientOutput:
        if local.stats is None:
            raise ValueError("LocalStatistics needs the engine to carry running statistics "
                             "(RoundProgram(stats_mode='local'))")
        own = client_state["stats"]
        out = self.inner.client_update(problem, broadcast, local.with_stats(own), rng,
                                       client_state["inner"])
        return out._replace(client_state={"inner": out.client_state,
                                          "stats": out.metrics.get(STATS_KEY, own)})

    def server_update(self, server_state, aggregate, sums):
        return self.inner.server_update(server_state, aggregate, sums)

    def params(self, server_state):
        return self.inner.params(server_state)

    def personal_params(self, params, client_state):
        return self.inner.personal_params(params, client_state["inner"])

    def personal_model_state(self, model_state, client_state):
        return merge(self.inner.personal_model_state(model_state, client_state["inner"]),
                     client_state["stats"])
