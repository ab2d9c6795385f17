"""Client-level differential privacy as aggregator parts (DP-FedAvg, McMahan et al. 2018).

    clip(C):        Δ_i ← Δ_i · min(1, C / ‖Δ_i‖)          (inside the vmap; flat L2 norm
                                                            over every leaf of the update)
    gaussian(z, m): Σ_i Δ_i + N(0, (z·C)² I), then ÷ m      (once per round)

The sum is over the clients that took part, each with weight 1 (uniform weighting), and m
is the EXPECTED number of clients per round, a public constant. Dividing by the actual
count or weighting by example counts would make the denominator data-dependent and the
sensitivity of the sum unbounded, so `simulate(privacy=...)` refuses those.

Adding or removing one client changes the sum by at most C in L2 norm, so the noise has
multiplier z = std / sensitivity; the accountant in `fedjax_sim.privacy` turns (z,
sampling) into ε. `noise_cohort_size=M` scales the noise on the sum by m/M: the aggregate
then carries the noise a cohort of M clients would get (std z·C/M), so a small simulated
cohort behaves like a production-scale one (pfl-research does the same).

`adaptive_clip` (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping") moves C toward the γ-quantile of the update norms:

    b̄ = ( Σ_i (1[‖Δ_i‖ ≤ C] − ½) + N(0, σ_b²) ) / m + ½
    C ← C · exp(−η (b̄ − γ))

The count query has sensitivity ½, so its noise multiplier is 2σ_b; the two Gaussian
queries of a round compose to one with multiplier z when the update's multiplier is
z_Δ = (z⁻² − (2σ_b)⁻²)^(−½) (the split TensorFlow Federated uses); `dp_fedavg` computes it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.errors import UserError
from fedjax_sim.privacy.noise import gaussian_like

PyTree = Any


def global_norm(tree: PyTree) -> jax.Array:
    """The L2 norm of all leaves of `tree` flattened into one vector (in float32)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _scale_to_norm(delta: PyTree, norm: jax.Array, clip_norm: jax.Array) -> PyTree:
    # min(1, C/‖Δ‖) written so that a zero update (‖Δ‖ = 0) stays exactly zero.
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
    return jax.tree_util.tree_map(lambda x: (x * scale.astype(x.dtype)), delta)


def _check_positive(name: str, value, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise UserError(f"{name} must be a number {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


class ClipState(NamedTuple):
    clip_norm: jax.Array  # C (an input of the compiled program, not a constant in it)


def clip(clip_norm: float):
    """Scales each client's update to L2 norm at most `clip_norm` (C > 0).

    Reports per client `dp_clipped_fraction` (1 if ‖Δ‖ > C: its mean over the cohort is the
    fraction clipped) and `dp_update_norm` (‖Δ‖ before clipping); the finalizer reports
    the round's `dp_clip_norm`. C is kept in the part's state (`ClipState`), so runs that
    differ only in C reuse one compiled program.
    """
    from fedjax_sim.aggregators import part

    c = _check_positive("clip_norm", clip_norm)

    def init(params):
        del params
        return ClipState(jnp.float32(c))

    def client(delta, state, rng):
        del rng
        norm = global_norm(delta)
        return _scale_to_norm(delta, norm, state.clip_norm), {
            "dp_clipped_fraction": (norm > state.clip_norm).astype(jnp.float32),
            "dp_update_norm": norm}

    def finalize(total, denominator, reports, state, rng):
        del reports, rng
        return total, denominator, state, {"dp_clip_norm": state.clip_norm}

    return part(init=init, client=client, finalize=finalize, key=("dp.clip",))


class AdaptiveClipState(NamedTuple):
    clip_norm: jax.Array  # C used by the next round


def adaptive_clip(*, expected_clients: float, initial_clip_norm: float = 0.1,
                  target_quantile: float = 0.5, learning_rate: float = 0.2,
                  count_stddev: float | None = None):
    """Clipping whose norm C follows the `target_quantile` of the clients' update norms.

    Geometric update from a noised count of unclipped clients (module doc); defaults are
    the paper's: γ = 0.5, η = 0.2, C₀ = 0.1, σ_b = expected_clients / 20. Reports what
    `clip` reports, plus `dp_unclipped_estimate` (b̄, the noised fraction unclipped).
    """
    from fedjax_sim.aggregators import part

    c0 = _check_positive("initial_clip_norm", initial_clip_norm)
    m = _check_positive("expected_clients", expected_clients)
    if not (isinstance(target_quantile, (int, float)) and 0 < target_quantile < 1):
        raise UserError(f"target_quantile must be in (0, 1), got {target_quantile!r}")
    eta = _check_positive("learning_rate (adaptive clipping)", learning_rate)
    sigma_b = m / 20.0 if count_stddev is None else _check_positive(
        "count_stddev", count_stddev, allow_zero=True)

    def init(params):
        del params
        return AdaptiveClipState(jnp.float32(c0))

    def client(delta, state, rng):
        del rng
        norm = global_norm(delta)
        c = state.clip_norm
        return _scale_to_norm(delta, norm, c), {
            "dp_clipped_fraction": (norm > c).astype(jnp.float32), "dp_update_norm": norm,
            "_unclipped": (norm <= c).astype(jnp.float32)}

    def finalize(total, denominator, reports, state, rng):
        # Σ (b_i − ½) has sensitivity ½ under adding or removing one client.
        noised = reports["_unclipped"] - 0.5 * reports["clients"] \
            + sigma_b * jax.random.normal(rng, (), jnp.float32)
        estimate = noised / m + 0.5
        new_clip = state.clip_norm * jnp.exp(-eta * (estimate - target_quantile))
        return total, denominator, AdaptiveClipState(new_clip), {
            "dp_clip_norm": state.clip_norm, "dp_unclipped_estimate": estimate}

    return part(init=init, client=client, finalize=finalize,
                key=("dp.adaptive_clip", m, float(target_quantile), eta, sigma_b))


class GaussianState(NamedTuple):
    noise_multiplier: jax.Array  # z (an input of the compiled program)


def gaussian(noise_multiplier: float, *, expected_clients: float,
             noise_cohort_size: int | None = None):
    """Adds N(0, (z·C)²) to every coordinate of the sum, then divides by `expected_clients`.

    C is the clip norm the preceding `clip`/`adaptive_clip` part used this round. With
    `noise_cohort_size=M` the noise std on the sum is z·C·m/M (module doc). Reports
    `dp_noise_std`, the noise std per coordinate of the aggregate (z·C/M or z·C/m). z is
    kept in the part's state (`GaussianState`): runs that differ only in a nonzero z reuse
    one compiled program.
    """
    from fedjax_sim.aggregators import part

    z = _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    m = _check_positive("expected_clients", expected_clients)
    scale = 1.0
    if noise_cohort_size is not None:
        if isinstance(noise_cohort_size, bool) or not isinstance(noise_cohort_size, int) \
                or noise_cohort_size < 1:
            raise UserError(f"noise_cohort_size must be an integer >= 1, got {noise_cohort_size!r}")
        scale = m / noise_cohort_size

    def init(params):
        del params
        return GaussianState(jnp.float32(z))

    def finalize(total, denominator, reports, state, rng):
        del denominator
        if "dp_clip_norm" not in reports:
            raise UserError("gaussian() needs clip() or adaptive_clip() before it in the chain "
                            "(the noise is scaled to the clip norm)")
        std = state.noise_multiplier * scale * reports["dp_clip_norm"]
        if z == 0:  # nothing to draw (clipping only)
            return total, jnp.float32(m), state, {"dp_noise_std": std / m}
        noised = jax.tree_util.tree_map(jnp.add, total, gaussian_like(rng, total, std))
        return noised, jnp.float32(m), state, {"dp_noise_std": std / m}

    return part(init=init, finalize=finalize, key=("dp.gaussian", z == 0, m, scale))


def count_noise_stddev(expected_clients: float, count_stddev: float | None = None,
                       noise_cohort_size: int | None = None) -> tuple[float, float]:
    """(σ_b, σ_b as the accountant sees it) for adaptive clipping's clipped count: σ_b
    defaults to expected_clients / 20; with `noise_cohort_size` the count is noised as a
    cohort of that many clients would noise it, σ_b · noise_cohort_size / expected_clients."""
    sigma_b = expected_clients / 20.0 if count_stddev is None else float(count_stddev)
    if noise_cohort_size is None:
        return sigma_b, sigma_b
    return sigma_b, sigma_b * noise_cohort_size / expected_clients


def split_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The update's noise multiplier z_Δ = (z⁻² − (2σ_b)⁻²)^(−½) when the clipped count uses
    noise σ_b, so that both queries together have multiplier z (Andrew et al. 2021)."""
    z = float(noise_multiplier)
    if z == 0:
        return 0.0
    if count_stddev <= 0 or 2 * count_stddev <= z:
        raise UserError(f"adaptive clipping cannot split noise_multiplier={z:g} with a count noise "
                        f"std of {count_stddev:g}: it needs 2·count_stddev > noise_multiplier; raise "
                        f"count_stddev (or the expected clients per round) or lower the noise "
                        f"multiplier")
    return (z ** -2 - (2 * count_stddev) ** -2) ** -0.5


def dp_fedavg(noise_multiplier: float, *, expected_clients: float, clip_norm: float | None = None,
              adaptive: bool = False, target_quantile: float = 0.5, learning_rate: float = 0.2,
              count_stddev: float | None = None, noise_cohort_size: int | None = None):
    """The DP-FedAvg aggregator: `chain(clip(C), gaussian(z))`, or with `adaptive=True`
    `chain(adaptive_clip(C₀ = clip_norm or 0.1, ...), gaussian(z_Δ))` where the total noise
    multiplier z is split between the clipped count and the update (module doc).

    `noise_multiplier` is the z the accountant sees in both cases.
    """
    from fedjax_sim.aggregators import chain

    z = _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    m = _check_positive("expected_clients", expected_clients)
    if not adaptive:
        if clip_norm is None:
            raise UserError("clip_norm is required for fixed clipping (or use adaptive clipping)")
        return chain(clip(clip_norm), gaussian(z, expected_clients=m,
                                               noise_cohort_size=noise_cohort_size))
    sigma_b, sigma_b_effective = count_noise_stddev(m, count_stddev, noise_cohort_size)
    z_update = split_noise_multiplier(z, sigma_b_effective)
    return chain(adaptive_clip(expected_clients=m, initial_clip_norm=0.1 if clip_norm is None else clip_norm,
                               target_quantile=target_quantile, learning_rate=learning_rate,
                               count_stddev=sigma_b),
                 gaussian(z_update, expected_clients=m, noise_cohort_size=noise_cohort_size))
