"""Byzantine-robust aggregation rules as reducing aggregator parts.

Each rule replaces the weighted mean Σ_i w_i x_i / Σ_i w_i of the round's client updates
x_i by an estimate that a few arbitrary (Byzantine) updates cannot drag far. Over the n
live clients of the cohort (the padding slots of a Poisson cohort take no part):

    coordinate_median()        a_j = median_i x_ij, per coordinate j; for even n the mean
                               of the two middle values (Yin, Chen, Ramchandran, Bartlett
                               2018, "Byzantine-Robust Distributed Learning: Towards
                               Optimal Statistical Rates").
    trimmed_mean(β)            a_j = mean of x_ij over i after dropping the k = ⌊β·n⌋
                               largest and the k smallest values (Yin et al. 2018).
    krum(f, s=1)               score_i = Σ_{j ∈ N_i} ‖x_i − x_j‖², N_i the n − f − 2
                               (at least 1) live clients nearest to i; a = the mean of the
                               s clients with the lowest scores (Blanchard, El Mhamdi,
                               Guerraoui, Stainer 2017, "Machine Learning with
                               Adversaries: Byzantine Tolerant Gradient Descent"; s > 1 is
                               multi-Krum, El Mhamdi, Guerraoui, Rouault 2018, "The Hidden
                               Vulnerability of Distributed Learning in Byzantium").
    geometric_median(T, ν)     T smoothed Weiszfeld steps from the weighted mean:
                               v ← Σ_i β_i x_i / Σ_i β_i,  β_i = w_i / max(ν, ‖v − x_i‖)
                               (RFA: Pillutla, Kakade, Harchaoui 2022, "Robust Aggregation
                               for Federated Learning").
    norm_bounding(M)           a = Σ_i w_i x_i·min(1, M/‖x_i‖) / Σ_i w_i (Sun, Kairouz,
                               Suresh, McMahan 2019, "Can You Really Backdoor Federated
                               Learning?").
    centered_clipping(τ, L)    v ← v + Σ_i w_i clip_τ(x_i − v) / Σ_i w_i, L times, from v =
                               the previous round's aggregate (zero at first), where
                               clip_τ(y) = y·min(1, τ/‖y‖) (Karimireddy, He, Jaggi 2021,
                               "Learning from History for Byzantine Robust Optimization").

Norms and distances are L2 over the whole update (every leaf flattened together); the
median and the trimmed mean work coordinate by coordinate. Everything is computed in
float32 and cast back to each floating leaf's dtype.

Weights. The order-statistic rules (coordinate median, trimmed mean, Krum) ignore the
clients' weights: every live client counts once. Geometric median, norm bounding and
centered clipping use the weights w_i. Every rule returns total = a·Σ_i w_i and
denominator = Σ_i w_i (w_i over the live clients), so the aggregate is total /
denominator like the weighted sum's, and a finalizer that replaces the denominator (a DP
part dividing by the expected cohort) sees a sum-like total. A round without live clients
gives a zero total and denominator.

Memory. Every rule needs the whole cohort's updates at once (`AggregatorPart.reduce`):
cohort slots × parameters float32 values, where the streaming weighted sum holds a
chunk of clients; Krum also holds an m × m distance matrix (m = cohort slots), computed
from the Gram matrix of the flattened updates.

Secure and encrypted aggregation. These rules cannot run under secure or encrypted
aggregation: the server then sees only the sum of the updates, never one of them, and a
chain holds only one reducing part (`chain` says so when asked for both).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.aggregators.dp import _check_positive
from fedjax_sim.engine.contracts import Cohort
from fedjax_sim.errors import UserError

PyTree = Any

_TINY = float(jnp.finfo(jnp.float32).tiny)


# -- checks -------------------------------------------------------------------------------
def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


# -- shared pieces ------------------------------------------------------------------------
def _float32(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda u: u.astype(jnp.float32), tree)


def _rows(live: jax.Array, u: jax.Array) -> jax.Array:
    """`live` [m] shaped to broadcast against a leaf u [m, ...]."""
    return live.reshape((-1,) + (1,) * (u.ndim - 1))


def _live_count(cohort: Cohort) -> jax.Array:
    return jnp.sum(cohort.live.astype(jnp.int32))


def _live_weights(cohort: Cohort) -> jax.Array:
    return jnp.where(cohort.live, cohort.weights.astype(jnp.float32), 0.0)


def _combine(coefficients: jax.Array, tree: PyTree) -> PyTree:
    """Σ_i c_i x_i for every leaf x [m, ...] (float32)."""
    return jax.tree_util.tree_map(lambda u: jnp.tensordot(coefficients, u, axes=1), tree)


def _squared_norms(tree: PyTree) -> jax.Array:
    """‖x_i‖² over all leaves of each client's update, [m]."""
    return sum(jnp.sum(jnp.square(u), axis=tuple(range(1, u.ndim)))
               for u in jax.tree_util.tree_leaves(tree))


def _distances(tree: PyTree, center: PyTree) -> jax.Array:
    """‖x_i − v‖ over all leaves, [m], for a center v shaped like one client's update."""
    diffs = jax.tree_util.tree_map(lambda u, v: u - v[None], tree, center)
    return jnp.sqrt(_squared_norms(diffs))


def _total(aggregate: PyTree, updates: PyTree, weight_sum: jax.Array):
    """(aggregate · Σ w_i in each floating leaf's dtype, Σ w_i): the reduce's result."""
    def leaf(a, u):
        t = a * weight_sum
        return t.astype(u.dtype) if jnp.issubdtype(u.dtype, jnp.floating) else t
    return jax.tree_util.tree_map(leaf, aggregate, updates), weight_sum


def _robust_part(name: str, reduce, key: tuple, init=None, finalize=None):
    from fedjax_sim.aggregators import part

    return part(init=init, reduce=reduce, finalize=finalize, key=(f"robust.{name}",) + key)


# -- coordinate-wise rules ----------------------------------------------------------------
def coordinate_median():
    """The coordinate-wise median of the live clients' updates, unweighted (Yin et al.
    2018); for an even number n of live clients, the mean of the two middle values (as
    `numpy.median`). See the module doc for memory and weights."""

    def reduce(cohort: Cohort, state, rng):
        del state, rng
        n = _live_count(cohort)
        lower, upper = jnp.maximum((n - 1) // 2, 0), jnp.maximum(n // 2, 0)

        def leaf(u):
            u = u.astype(jnp.float32)
            ranked = jnp.sort(jnp.where(_rows(cohort.live, u), u, jnp.inf), axis=0)  # padding last
            low = jax.lax.dynamic_index_in_dim(ranked, lower, axis=0, keepdims=False)
            high = jax.lax.dynamic_index_in_dim(ranked, upper, axis=0, keepdims=False)
            return jnp.where(n > 0, 0.5 * low + 0.5 * high, 0.0)

        aggregate = jax.tree_util.tree_map(leaf, cohort.updates)
        return _total(aggregate, cohort.updates, jnp.sum(_live_weights(cohort)))

    return _robust_part("coordinate_median", reduce, ())


def trimmed_mean(beta: float):
    """Per coordinate, the mean of the live clients' values after dropping the k = ⌊β·n⌋
    largest and the k smallest (Yin et al. 2018), unweighted; 0 <= beta < 0.5 (beta = 0 is
    the unweighted mean)."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 0.5:
        raise UserError(f"beta must be a number in [0, 0.5), got {beta!r}")
    beta = float(beta)

    def reduce(cohort: Cohort, state, rng):
        del state, rng
        m = cohort.live.shape[0]
        n = _live_count(cohort)
        # k = ⌊β·n⌋ for every possible n, computed here in float64 as Python does.
        k = jnp.asarray([math.floor(beta * i) for i in range(m + 1)], jnp.int32)[n]
        kept = jnp.maximum(n - 2 * k, 1).astype(jnp.float32)

        def leaf(u):
            u = u.astype(jnp.float32)
            live = _rows(cohort.live, u)
            ranked = jnp.sort(jnp.where(live, u, jnp.inf), axis=0)  # padding sorts last
            rank = jnp.arange(m).reshape(live.shape)
            inside = (rank >= k) & (rank < n - k)
            return jnp.sum(jnp.where(inside, ranked, 0.0), axis=0) / kept

        aggregate = jax.tree_util.tree_map(leaf, cohort.updates)
        return _total(aggregate, cohort.updates, jnp.sum(_live_weights(cohort)))

    return _robust_part("trimmed_mean", reduce, (beta,))


# -- Krum ---------------------------------------------------------------------------------
def krum(num_byzantine: int, num_selected: int = 1):
    """Krum (Blanchard et al. 2017) and, with `num_selected` > 1, multi-Krum (El Mhamdi
    et al. 2018): the unweighted mean of the `num_selected` live clients (fewer if fewer
    are live) whose summed squared distance to their n − f − 2 nearest live neighbours is
    lowest (f = `num_byzantine`; at least one neighbour, none for a lone client). The
    guarantee of the paper needs n > 2f + 2; smaller cohorts still run. Reports
    `krum_selected`, how many clients were averaged. Holds an m × m distance matrix."""
    f = _check_int("num_byzantine", num_byzantine, 0)
    s = _check_int("num_selected", num_selected, 1)

    def reduce(cohort: Cohort, state, rng):
        del state, rng
        live = cohort.live
        m = live.shape[0]
        n = _live_count(cohort)
        updates = _float32(cohort.updates)
        x = jnp.concatenate([u.reshape(m, -1) for u in jax.tree_util.tree_leaves(updates)],
                            axis=1)
        gram = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
        squared = jnp.diagonal(gram)
        d2 = jnp.maximum(squared[:, None] + squared[None, :] - 2.0 * gram, 0.0)
        others = live[:, None] & live[None, :] & ~jnp.eye(m, dtype=bool)
        nearest = jnp.sort(jnp.where(others, d2, jnp.inf), axis=1)
        neighbours = jnp.minimum(jnp.maximum(n - f - 2, 1), jnp.maximum(n - 1, 0))
        scores = jnp.sum(jnp.where(jnp.arange(m)[None, :] < neighbours, nearest, 0.0), axis=1)
        scores = jnp.where(live, scores, jnp.inf)
        take = min(s, m)
        best = jnp.argsort(scores, stable=True)[:take]
        chosen = jnp.zeros(m, jnp.float32).at[best].set(
            (jnp.arange(take) < n).astype(jnp.float32))
        selected = jnp.sum(chosen)
        aggregate = _combine(chosen / jnp.maximum(selected, 1.0), updates)
        total, denominator = _total(aggregate, cohort.updates, jnp.sum(_live_weights(cohort)))
        return total, denominator, {"krum_selected": selected}

    return _robust_part("krum", reduce, (f, s))


# -- weighted rules -----------------------------------------------------------------------
def geometric_median(iterations: int = 3, smoothing: float = 1e-6):
    """The geometric median of the live clients' updates, weighted by w_i, by `iterations`
    smoothed Weiszfeld steps from the weighted mean (RFA, Pillutla et al. 2022):
    v ← Σ_i β_i x_i / Σ_i β_i with β_i = w_i / max(smoothing, ‖v − x_i‖)."""
    steps = _check_int("iterations", iterations, 1)
    nu = _check_positive("smoothing", smoothing)

    def reduce(cohort: Cohort, state, rng):
        del state, rng
        updates = _float32(cohort.updates)
        w = _live_weights(cohort)
        weight_sum = jnp.sum(w)

        def mean(coefficients, fallback):
            total = jnp.sum(coefficients)
            safe = jnp.where(total > 0, total, 1.0)
            return jax.tree_util.tree_map(lambda a, b: jnp.where(total > 0, a / safe, b),
                                          _combine(coefficients, updates), fallback)

        zeros = jax.tree_util.tree_map(lambda u: jnp.zeros(u.shape[1:], u.dtype), updates)

        def weiszfeld(_, v):
            return mean(w / jnp.maximum(nu, _distances(updates, v)), v)

        v = jax.lax.fori_loop(0, steps, weiszfeld, mean(w, zeros))
        return _total(v, cohort.updates, weight_sum)

    return _robust_part("geometric_median", reduce, (steps, nu))


class NormBoundingState(NamedTuple):
    max_norm: jax.Array  # M (an input of the compiled program, not a constant in it)


def norm_bounding(max_norm: float):
    """The weighted mean of the live clients' updates, each scaled by the server to L2
    norm at most `max_norm` (Sun et al. 2019). Reports `robust_clipped_fraction`, the
    fraction of live clients whose update was scaled down. M is kept in the part's state
    (`NormBoundingState`): runs that differ only in M reuse one compiled program."""
    bound = _check_positive("max_norm", max_norm)

    def init(params):
        del params
        return NormBoundingState(jnp.float32(bound))

    def reduce(cohort: Cohort, state, rng):
        del rng
        updates = _float32(cohort.updates)
        w = _live_weights(cohort)
        norms = jnp.sqrt(_squared_norms(updates))
        scale = jnp.minimum(1.0, state.max_norm / jnp.maximum(norms, _TINY))
        total = _combine(w * scale, updates)
        total = jax.tree_util.tree_map(
            lambda t, u: t.astype(u.dtype) if jnp.issubdtype(u.dtype, jnp.floating) else t,
            total, cohort.updates)
        clipped = jnp.sum((cohort.live & (norms > state.max_norm)).astype(jnp.float32))
        fraction = clipped / jnp.maximum(_live_count(cohort), 1).astype(jnp.float32)
        return total, jnp.sum(w), {"robust_clipped_fraction": fraction}

    return _robust_part("norm_bounding", reduce, (), init=init)


class CenteredClippingState(NamedTuple):
    center: PyTree  # v: the previous round's aggregate, float32, shaped like the params
    tau: jax.Array  # τ (an input of the compiled program, not a constant in it)


def centered_clipping(tau: float, iterations: int = 1):
    """Centered clipping (Karimireddy et al. 2021): from v = the previous round's
    aggregate (zeros at first), `iterations` times v ← v + Σ_i w_i clip_τ(x_i − v) / Σ_i w_i,
    clip_τ(y) = y·min(1, τ/‖y‖); the aggregate is the last v, which the finalizer keeps in
    the part's state (`CenteredClippingState`) for the next round (a round without weight
    keeps the old one). The state is shaped like the model's parameters, so the
    algorithm's update must be too (FedAvg's is; FedPer's, only the body, is not). Reports
    `robust_clipped_fraction`, the fraction of live clients clipped in the last step."""
    bound = _check_positive("tau", tau)
    steps = _check_int("iterations", iterations, 1)

    def init(params):
        center = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
        return CenteredClippingState(center, jnp.float32(bound))

    def reduce(cohort: Cohort, state, rng):
        del rng
        updates = _float32(cohort.updates)
        shapes = jax.tree_util.tree_map(lambda u: u.shape[1:], updates)
        centers = jax.tree_util.tree_map(jnp.shape, state.center)
        if jax.tree_util.tree_structure(updates) != jax.tree_util.tree_structure(state.center) \
                or shapes != centers:
            raise UserError("centered_clipping keeps the last aggregate shaped like the model's "
                            "parameters, but this algorithm's updates are shaped otherwise; use "
                            "it with an algorithm whose update is shaped like the parameters "
                            "(e.g. fedavg)")
        live = cohort.live
        w = _live_weights(cohort)
        weight_sum = jnp.sum(w)
        safe = jnp.where(weight_sum > 0, weight_sum, 1.0)

        def step(_, carry):
            v, _ = carry
            diffs = jax.tree_util.tree_map(lambda u, c: u - c[None], updates, v)
            norms = jnp.sqrt(_squared_norms(diffs))
            scale = jnp.minimum(1.0, state.tau / jnp.maximum(norms, _TINY))
            moved = _combine(w * scale, diffs)
            new = jax.tree_util.tree_map(
                lambda c, d: jnp.where(weight_sum > 0, c + d / safe, c), v, moved)
            clipped = jnp.sum((live & (norms > state.tau)).astype(jnp.float32))
            return new, clipped

        v, clipped = jax.lax.fori_loop(0, steps, step, (state.center, jnp.float32(0)))
        fraction = clipped / jnp.maximum(_live_count(cohort), 1).astype(jnp.float32)
        total, denominator = _total(v, cohort.updates, weight_sum)
        return total, denominator, {"robust_clipped_fraction": fraction}

    def finalize(total, denominator, reports, state, rng):
        del reports, rng
        ok = denominator > 0
        safe = jnp.where(ok, denominator, 1.0)
        center = jax.tree_util.tree_map(
            lambda t, c: jnp.where(ok, t.astype(jnp.float32) / safe, c), total, state.center)
        return total, denominator, state._replace(center=center), {}

    return _robust_part("centered_clipping", reduce, (steps,), init=init, finalize=finalize)
