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

An `AggregatorPart` is a triple of pure functions with explicit state, and `chain`
composes parts: client transforms apply in order, finalizers in order on the sum. The
differentially private parts (`clip`, `adaptive_clip`, `gaussian`, `dp_fedavg`) are in
`fedjax_sim.aggregators.dp`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class AggregatorPart(NamedTuple):
    """One stage of aggregation.

    init(params) -> state
    client(delta, state, rng) -> (delta, report: dict of per-client scalars)
    finalize(total, denominator, reports, state, rng) -> (total, denominator, state, metrics)
    """

    init: Callable[[PyTree], PyTree]
    client: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, dict]]
    finalize: Callable[[PyTree, jax.Array, PyTree, jax.Array], tuple[PyTree, jax.Array, PyTree, dict]]


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
         finalize: Callable | None = None) -> AggregatorPart:
    """Builds a part from whichever of the three functions it needs."""
    return AggregatorPart(init or (lambda params: ()), client or _no_client,
                          finalize or _no_finalize)


def chain(*parts: AggregatorPart) -> AggregatorPart:
    """Composes parts: each client transform in order, then each finalizer in order."""
    if not parts:
        return weighted_mean()

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

    return AggregatorPart(init, client, finalize)


def divide(total: PyTree, denominator: jax.Array) -> PyTree:
    """The final division; a zero denominator (no weight) gives a zero aggregate."""
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jax.tree_util.tree_map(lambda x: x / safe, total)


from fedjax_sim.aggregators.dp import adaptive_clip, clip, dp_fedavg, gaussian, global_norm  # noqa: E402

__all__ = ["AggregatorPart", "weighted_mean", "part", "chain", "divide", "clip", "adaptive_clip",
           "gaussian", "dp_fedavg", "global_norm"]
