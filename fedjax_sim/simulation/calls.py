"""The compiled round program, called a few rounds at a time.

`RoundCalls` compiles the plan's `RoundProgram` once for calls of up to `per_call` rounds
(the round count is a runtime argument: any shorter call reuses the executable), wires in
host-kept client states and host-streamed training data where the plan keeps them on the
host, and turns each call's stacked metrics into rows (with ε under differential
privacy). How many rounds a call runs adapts to about TARGET_SECONDS_PER_CALL of work,
and a call always ends at an evaluation or checkpoint round.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np

from fedjax_sim.engine.client_states import HostClientStates
from fedjax_sim.engine.options import TARGET_SECONDS_PER_CALL
from fedjax_sim.engine.streaming import parse_bytes
from fedjax_sim.errors import UserError
from fedjax_sim.simulation import processes


class RoundCalls:
    def __init__(self, plan, state, checkpoint_every: int | None):
        r = plan.request
        self.plan, self.program, self.root = plan, plan.program, plan.root
        self.eval_every, self.checkpoint_every = r.eval_every, checkpoint_every
        self.per_call = min(plan.engine["rounds_per_call"], r.eval_every, r.rounds,
                            checkpoint_every or r.rounds)
        self.data, streamer = plan.data, plan.streamer
        if streamer is not None:
            self.per_call = fit_stream_window(streamer, self.per_call, plan.slots,
                                              parse_bytes(r.engine.device_data_budget))
            streamer.set_window(self.per_call * plan.slots)
            self.data = streamer.template()
        start = time.perf_counter()
        if plan.client_states != "host":
            run = self.program.compile(state, self.data, plan.model_state, self.root, self.per_call)
        else:
            host_states = HostClientStates(plan.train_data.num_clients, self.per_call * plan.slots)
            table, rows = host_states.template(state.clients)
            run = host_states.stream(self.program.compile(
                state._replace(clients=table), self.data, plan.model_state, self.root,
                self.per_call, rows), self.program)
        if streamer is not None:
            run = streamer.stream(run, self.program, self.per_call)
        self._run = run
        self.compile_seconds = time.perf_counter() - start
        self.train_seconds = 0.0
        self.adaptive = plan.engine["adaptive_rounds_per_call"]
        self._target = 1 if self.adaptive else self.per_call  # the first call measures

    def next_count(self, done: int, end: int) -> tuple[int, bool]:
        """(how many rounds the next call runs, whether it is the run's last call); 0
        rounds where the example-level privacy budget allows none."""
        count = min(self._target, end - done, self.eval_every - done % self.eval_every)
        if self.checkpoint_every:
            count = min(count, self.checkpoint_every - done % self.checkpoint_every)
        last = done + count == end
        private = self.plan.private
        if private and private.level == "example":
            allowed = private.affordable(done, count)
            if allowed < count:
                count, last = allowed, True
        return count, last

    def run(self, state, model_state, done: int, count: int):
        """Runs rounds done+1 .. done+count; returns (new state, their metrics rows,
        whether each round's new global parameters are finite)."""
        start = time.perf_counter()
        state, metrics = self._run(state, self.data, model_state, self.root, done, count)
        metrics = jax.device_get(metrics)
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        if self.adaptive:
            per_round = max(seconds / count, 1e-9)
            self._target = processes.agree(
                int(min(self.per_call, max(1, TARGET_SECONDS_PER_CALL // per_round))))
        finite = np.asarray(metrics.pop("_params_finite"))
        rows = [{"round": done + i + 1, **{k: _scalar(v[i]) for k, v in metrics.items()}}
                for i in range(count)]
        private = self.plan.private
        if private:
            peaks = private.record(self.program, self.root, done, count)
            for row, eps in zip(rows, private.epsilon_rows(done + 1, count, peaks)):
                row["epsilon"] = eps
        return state, rows, finite

    def engine_summary(self) -> dict:
        streamer = self.plan.streamer
        return {**engine_summary(self.plan),
                **({"stream": {"rounds_per_call": self.per_call, "buffer_rows": streamer.capacity,
                               "calls": streamer.calls, "prefetched_calls": streamer.prefetched}}
                   if streamer is not None else {})}

    def close(self) -> None:
        if self.plan.streamer is not None:
            self.plan.streamer.close()


def engine_summary(plan) -> dict:
    """The summary's `engine`: the plan's choices, the backend and whether the round
    program came from the program cache."""
    return {**plan.engine, "backend": plan.backend,
            "program_cache": "hit" if plan.program.cache_hit else "compiled",
            "local_steps": plan.schedule.num_steps, "batch_size": plan.schedule.batch_size,
            "data_placement": plan.data_placement}


def first_divergence(rows, params_finite):
    """(index, what) of the first round whose loss or new global parameters are not finite."""
    for i, row in enumerate(rows):
        if not math.isfinite(row["train_loss"]):
            return i, f"train_loss is {row['train_loss']}"
        if not bool(params_finite[i]):
            return i, "the global parameters hold NaN or Inf"
    return None


def fit_stream_window(streamer, per_call: int, slots: int, budget: int | None) -> int:
    """The most rounds per call (at most `per_call`) whose streamed rows fit `budget`."""
    if budget is None:
        return per_call
    row = streamer.row_bytes()
    for rounds in range(per_call, 0, -1):
        if streamer.capacity_for(rounds * slots) * row <= budget:
            return rounds
    need = streamer.capacity_for(slots) * row
    raise UserError(f"one round's cohort needs {need / 2**20:.1f} MiB of training data on the "
                    f"device, more than engine.device_data_budget ({budget / 2**20:.1f} MiB); "
                    f"raise the budget or lower clients_per_round")


def _scalar(x):
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x.tolist()
