"""Aggregators: per-client transform -> weighted sum -> finalize, composable like optax.

A round's aggregate is

    aggregate = finalize( sum_i w_i * T(delta_i) ) / denominator

where T runs once per client inside the vmap (clipping, quantization, ...) and finalize
runs once on the float32 sum (noise, ...). The default denominator is sum_i w_i, i.e. the
weighted mean; a part may replace it (a DP part divides by a fixed public count).

Besides the transformed delta, a client transform reports per-client scalars (e.g. whether
it clipped). The engine sums each report over the clients that took part in the round and
hands the sums to `finalize` in `reports`, with `reports["clients"]` = their number, and
logs each report's mean over those clients as a metric (names starting with `_` are not
logged). Within a `chain`, each finalizer also sees the metrics of the finalizers before
it in `reports` (so `gaussian` reads the clip norm that `clip` used this round).

An `AggregatorPart` (its contract: `fedjax_sim.engine.contracts`) is a triple of pure
functions with explicit state, plus an optional `reduce` for parts that need every
client's update at once (a median, a trimmed mean: the README shows one); `chain`
composes parts: client transforms apply in order, then the reduction (the streaming
weighted sum, or the chain's one reducing part), then the finalizers in order. The
differentially private parts (`clip`, `adaptive_clip`, `gaussian`, `dp_fedavg`) are in
`fedjax_sim.aggregators.dp`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from fedjax_sim.engine.contracts import AggregatorPart, Cohort
from fedjax_sim.errors import UserError

PyTree = Any


def _no_client(delta, state, rng):
    del state, rng
    return delta, {}


def _no_finalize(total, denominator, reports, state, rng):
    del reports, rng
    return total, denominator, state, {}


def weighted_mean() -> AggregatorPart:
    """The identity part: the aggregate is sum_i w_i delta_i / sum_i w_i (FedAvg)."""
    return AggregatorPart(lambda params: (), _no_client, _no_finalize)


def part(init: Callable | None = None, client: Callable | None = None,
         finalize: Callable | None = None, reduce: Callable | None = None) -> AggregatorPart:
    """Builds a part from whichever of its functions it needs (see AggregatorPart):
    `reduce(cohort, state, rng) -> (total, denominator)` makes it see every client's
    update (`Cohort`) instead of the streaming weighted sum."""
    return AggregatorPart(init or (lambda params: ()), client or _no_client,
                          finalize or _no_finalize, reduce)


def chain(*parts: AggregatorPart) -> AggregatorPart:
    """Composes parts: each client transform in order, then the reduction (the chain's
    reducing part, if any, else the streaming weighted sum), then each finalizer in order."""
    if not parts:
        return weighted_mean()
    reducing = [i for i, p in enumerate(parts) if p.reduce is not None]
    if len(reducing) > 1:
        raise UserError(f"a chain may hold one part that reduces the cohort itself, got "
                        f"{len(reducing)} (parts {reducing}); keep one of them")

    def init(params):
        return tuple(p.init(params) for p in parts)

    def client(delta, state, rng):
        metrics = {}
        for i, (p, s) in enumerate(zip(parts, state)):
            delta, m = p.client(delta, s, jax.random.fold_in(rng, i))
            metrics.update(m)
        return delta, metrics

    def finalize(total, denominator, reports, state, rng):
        new_state, metrics, seen = [], {}, dict(reports)
        for i, (p, s) in enumerate(zip(parts, state)):
            total, denominator, s, m = p.finalize(total, denominator, seen, s,
                                                  jax.random.fold_in(rng, i))
            new_state.append(s)
            metrics.update(m)
            seen.update(m)
        return total, denominator, tuple(new_state), metrics

    reduce = None
    if reducing:
        i = reducing[0]

        def reduce(cohort, state, rng):
            return parts[i].reduce(cohort, state[i], jax.random.fold_in(rng, i))

    return AggregatorPart(init, client, finalize, reduce)


from fedjax_sim.aggregators.dp import adaptive_clip, clip, dp_fedavg, gaussian, global_norm  # noqa: E402

__all__ = ["AggregatorPart", "Cohort", "weighted_mean", "part", "chain", "clip", "adaptive_clip",
           "gaussian", "dp_fedavg", "global_norm"]
