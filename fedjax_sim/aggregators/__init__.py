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
client's update at once (a median, a trimmed mean: docs/aggregators.md shows one); `chain`
composes parts: client transforms apply in order, then the reduction (the streaming
weighted sum, or the chain's one reducing part), then the finalizers in order. The
differentially private parts (`clip`, `adaptive_clip`, `gaussian`, `dp_fedavg`) are in
`fedjax_sim.aggregators.dp`; the Byzantine-robust rules (`coordinate_median`,
`trimmed_mean`, `krum`, `geometric_median`, `norm_bounding`, `centered_clipping`), reducing
parts all, in `fedjax_sim.aggregators.robust`.

A part may also keep a state per client (`client_init`: error feedback's residual), which
the engine stores like an algorithm's client states, and say what its client transform
puts on the wire (`uplink`, a `Message`: values x bits, indices, side information), from
which every round logs `uplink_bytes` and `downlink_bytes`. A part that cannot complete a
round (a secure sum with too few survivors) returns the metric `ROUND_FAILED`: the round
then has no effect.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax

from fedjax_sim.engine.contracts import ROUND_FAILED, AggregatorPart, Cohort, Message
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
         finalize: Callable | None = None, reduce: Callable | None = None,
         client_init: Callable | None = None, uplink: Callable | None = None,
         key: Any = None) -> AggregatorPart:
    """Builds a part from whichever of its functions it needs (see AggregatorPart):
    `reduce(cohort, state, rng) -> (total, denominator[, metrics])` makes it see every
    client's update (`Cohort`) instead of the streaming weighted sum; `client_init(params)`
    gives it a state per client (its `client` then takes and returns that state);
    `uplink(message, cohort_slots) -> Message` says what its client transform sends;
    `key` (optional) names everything the functions bake into the compiled program, for
    the program cache (AggregatorPart.key)."""
    if client_init is not None and client is None:
        raise UserError("a part with client_init needs a client function "
                        "client(delta, state, rng, client_state) -> (delta, report, client_state)")
    return AggregatorPart(init or (lambda params: ()), client or _no_client,
                          finalize or _no_finalize, reduce, client_init, uplink, key)


# The modules whose reducing parts give the server only the sum of the updates.
_SUM_PARTS = {"fedjax_sim.aggregators.secure": "secure_sum",
              "fedjax_sim.aggregators.encrypted": "encrypted_sum"}
_ROBUST = "fedjax_sim.aggregators.robust"


def _reducer(p: AggregatorPart) -> tuple[str | None, str | None]:
    """What a reducing part is, for chain's messages: ('robust', the rule's name) for a rule
    of fedjax_sim.aggregators.robust (its key starts with 'robust.'), ('sum', 'secure_sum'
    or 'encrypted_sum'), or (None, None) for any other part."""
    key = p.key
    if isinstance(key, tuple) and key and isinstance(key[0], str) and key[0].startswith("robust."):
        return "robust", key[0][len("robust."):]
    fn = inspect.unwrap(p.reduce)  # through the chains that hold it
    module = getattr(fn, "__module__", None)
    if module == _ROBUST:
        return "robust", fn.__qualname__.split(".")[0]
    if module in _SUM_PARTS:
        return "sum", _SUM_PARTS[module]
    return None, None


def _refuse_robust_with_another_reduction(reducing: list[AggregatorPart]):
    """The clearer refusal of a chain with two reducing parts when one is a robust rule."""
    kinds = [_reducer(p) for p in reducing]
    robust = [name for kind, name in kinds if kind == "robust"]
    sums = [name for kind, name in kinds if kind == "sum"]
    if robust and sums:
        raise UserError(f"{robust[0]} needs every client's update but {sums[0]} gives the server "
                        f"only their sum; robust rules cannot run under secure or encrypted "
                        f"aggregation")
    if len(robust) > 1:
        raise UserError(f"a chain may hold one robust rule, got {' and '.join(robust)}; keep one "
                        f"of them")


def chain(*parts: AggregatorPart) -> AggregatorPart:
    """Composes parts: each client transform in order, then the reduction (the chain's
    reducing part, if any, else the streaming weighted sum), then each finalizer in order.
    Per-client states are a tuple over the parts (None for a part without one); what a
    client sends is each part's `uplink` applied in order. A chain holds at most one part
    that reduces the cohort itself, so a robust rule cannot be chained with a secure or
    encrypted sum."""
    if not parts:
        return weighted_mean()
    reducing = [i for i, p in enumerate(parts) if p.reduce is not None]
    if len(reducing) > 1:
        _refuse_robust_with_another_reduction([parts[i] for i in reducing])
        raise UserError(f"a chain may hold one part that reduces the cohort itself, got "
                        f"{len(reducing)} (parts {reducing}); keep one of them")
    stateful = any(p.client_init is not None for p in parts)

    def init(params):
        return tuple(p.init(params) for p in parts)

    def client(delta, state, rng, client_state=None):
        metrics, new_states = {}, []
        for i, (p, s) in enumerate(zip(parts, state)):
            key = jax.random.fold_in(rng, i)
            if p.client_init is None:
                delta, m = p.client(delta, s, key)
                new_states.append(None)
            else:
                delta, m, own = p.client(delta, s, key, client_state[i])
                new_states.append(own)
            metrics.update(m)
        return (delta, metrics, tuple(new_states)) if stateful else (delta, metrics)

    def client_init(params):
        return tuple(None if p.client_init is None else p.client_init(params) for p in parts)

    def finalize(total, denominator, reports, state, rng):
        new_state, metrics, seen = [], {}, dict(reports)
        for i, (p, s) in enumerate(zip(parts, state)):
            total, denominator, s, m = p.finalize(total, denominator, seen, s,
                                                  jax.random.fold_in(rng, i))
            new_state.append(s)
            metrics.update(m)
            seen.update(m)
        return total, denominator, tuple(new_state), metrics

    def uplink(message, cohort_slots):
        for p in parts:
            if p.uplink is not None:
                message = p.uplink(message, cohort_slots)
        return message

    reduce = None
    if reducing:
        i = reducing[0]

        def reduce(cohort, state, rng):
            return parts[i].reduce(cohort, state[i], jax.random.fold_in(rng, i))
        reduce.__wrapped__ = parts[i].reduce  # what reduces, for a chain holding this chain

    return AggregatorPart(init, client, finalize, reduce, client_init if stateful else None,
                          uplink if any(p.uplink is not None for p in parts) else None)


from fedjax_sim.aggregators.dp import adaptive_clip, clip, dp_fedavg, gaussian, global_norm  # noqa: E402
from fedjax_sim.aggregators.compression import quantize, random_k, sign, top_k  # noqa: E402
from fedjax_sim.aggregators.secure import integer_encode, secure_aggregation, secure_sum  # noqa: E402
from fedjax_sim.aggregators.encrypted import encrypted_sum  # noqa: E402
from fedjax_sim.aggregators.distributed_dp import distributed_dp, skellam_encode  # noqa: E402
from fedjax_sim.aggregators.matrix_factorization import correlated_gaussian, tree_gaussian  # noqa: E402
from fedjax_sim.aggregators.robust import (  # noqa: E402
    centered_clipping, coordinate_median, geometric_median, krum, norm_bounding, trimmed_mean)

__all__ = ["AggregatorPart", "Cohort", "Message", "ROUND_FAILED",
           "weighted_mean", "part", "chain", "clip", "adaptive_clip", "gaussian", "dp_fedavg",
           "global_norm", "quantize", "sign", "top_k", "random_k", "integer_encode", "secure_sum",
           "secure_aggregation", "encrypted_sum", "distributed_dp", "skellam_encode", "correlated_gaussian", "tree_gaussian",
           "coordinate_median", "trimmed_mean", "krum", "geometric_median", "norm_bounding",
           "centered_clipping"]
