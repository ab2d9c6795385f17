"""Distributed differential privacy: Skellam noise added by the clients, summed under
secure aggregation (Agarwal, Kairouz & Liu 2021, "The Skellam Mechanism for
Differentially Private Federated Learning"; Kairouz, Liu & Steinke 2021, "The Distributed
Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation").

Central DP-FedAvg trusts the server to add the noise. Where the server is not trusted,
each client adds its share of the noise to an integer encoding of its update, and secure
aggregation (fedjax_sim.aggregators.secure) shows the server only the noised sum:

    client i:  x_i = clip(Δ_i, c)                         (flat, L2 norm <= c)
               r_i = round_β( s · R x_i )                 (R: randomized Hadamard rotation,
                                                           public per round; conditional
                                                           stochastic rounding, below)
               y_i = r_i + Sk(μ / t)                      (Skellam noise, integer)
    server:    Σ_{survivors} y_i  mod 2^b                 (secure_sum: masks, dropouts)
               aggregate = R⁻¹ ( Σ y_i / s ) / m          (m = expected clients, public)

Skellam noise is closed under addition, so any t survivors' shares add up to Sk(≥ μ);
the secure sum fails (the round has no effect) with fewer than t survivors, so a
released sum always carries at least variance μ = (z·Δ₂)² per coordinate, z being the
noise multiplier the accountant reports, and Δ₂ the encoded update's L2 sensitivity.

The rotation spreads each update's norm over all coordinates, so a coordinate of the sum
stays far from the modulus' edge; conditional rounding (Kairouz et al.) rounds again, up to
MAX_ROUNDINGS times, until ‖r_i‖ is within the tighter norm bound of
`fedjax_sim.privacy.skellam.rounded_l2_bound` (with β, the chance that one rounding misses
it), and rounds toward zero if every attempt missed (which never increases the norm), so
Δ₂ holds always, not just with high probability. ε comes from
`fedjax_sim.privacy.skellam` (Agarwal et al.'s RDP bound for Skellam, Poisson subsampling).

What it protects: each client's update from the server (secure aggregation), and the
released sum and models from anyone (DP, with the accountant's ε) — without trusting the
server to add noise. What it does not: a client that skips its noise lowers the sum's noise
(the guarantee assumes at least t honest clients add theirs); the noise shares here come
from JAX's PRNG, not a cryptographic source.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.aggregators.compression import (Rotated, RotationState, _layout, flatten,
                                                layout_entries, padded_size, rotate, unflatten,
                                                unrotate)
from fedjax_sim.aggregators.dp import _scale_to_norm, global_norm
from fedjax_sim.aggregators.secure import secure_sum, stochastic_round
from fedjax_sim.errors import UserError
from fedjax_sim.privacy.skellam import l1_bound, rounded_l2_bound

# Attempts of conditional rounding before rounding toward zero (each misses with prob. <= β).
MAX_ROUNDINGS = 64
# The largest mean of one Poisson draw: jax.random.poisson works in float32 and its
# variance is off by 2% at a mean of 10^6 (measured: 0.999 of the mean at 10^5, 1.02 at
# 10^6, 1.6 at 6.4·10^7). Larger noise is a sum of several Skellam draws (exact: Skellam
# is closed under addition).
MAX_POISSON_MEAN = 2.0 ** 17
# Standard deviations of a coordinate of the sum that the default scale keeps inside the
# modulus' signed range (a Gaussian tail of ~1e-9 per coordinate at 6).
RANGE_STDS = 6.0


class SkellamSetting(NamedTuple):
    """Everything a distributed-DP round needs, fixed before it runs.

    scale: s; dim: d' (the update's entries padded to a power of two for the rotation);
    l2_sensitivity, l1_sensitivity: Δ₂, Δ₁ of one encoded update (integer units);
    min_clients: t, the fewest survivors a released sum holds; client_variance: μ / t,
    each client's Skellam variance; variance: μ = (z·Δ₂)², the least the sum carries.
    """

    scale: float
    dim: int
    l2_sensitivity: float
    l1_sensitivity: float
    min_clients: int
    client_variance: float
    variance: float


def skellam_setting(noise_multiplier: float, *, clip_norm: float, entries: int,
                    cohort_slots: int, min_clients: int, modulus_bits: int = 32,
                    scale: float | None = None, beta: float = math.exp(-0.5)) -> SkellamSetting:
    """The setting for an update of `entries` values clipped to `clip_norm`, `cohort_slots`
    clients at most per round, at least `min_clients` of them in a released sum.

    scale=None: the largest s for which a coordinate of the sum of `cohort_slots` encoded,
    noised updates stays within RANGE_STDS standard deviations of the signed
    `modulus_bits` range (each rotated coordinate of s·x_i has std ≈ s·c/√d', the noise
    std ≈ z·s·c·√(slots/t)).
    """
    z, c = float(noise_multiplier), float(clip_norm)
    if not (z > 0 and math.isfinite(z)):
        raise UserError(f"distributed DP needs a noise_multiplier > 0, got {noise_multiplier!r}")
    if not isinstance(min_clients, int) or not 1 <= min_clients <= cohort_slots:
        raise UserError(f"min_clients must be an integer in [1, {cohort_slots}] (the clients per "
                        f"round), got {min_clients!r}")
    if not 0 <= beta < 1:
        raise UserError(f"beta (the conditional rounding's miss probability) must be in [0, 1), "
                        f"got {beta!r}")
    dim = padded_size(entries)
    half = 2.0 ** (modulus_bits - 1) - 1
    if scale is None:
        spread = c * math.sqrt(cohort_slots / dim + z * z * cohort_slots / min_clients)
        scale = (half / RANGE_STDS - cohort_slots) / spread
        if scale <= 0 or scale * c < 1:
            raise UserError(f"modulus_bits={modulus_bits} is too small for {cohort_slots} clients "
                            f"with noise multiplier {z:g}: raise modulus_bits (e.g. to 32)")
    # Encoded values stay far inside int32. A client's noise takes one Poisson draw per
    # coordinate and sign where (z·s·c)²/(2t) <= MAX_POISSON_MEAN; s is lowered toward that
    # (fewer draws) but kept at s·c >= 8·√d', where rounding adds at most ~1/128 to Δ₂.
    one_draw = math.sqrt(2 * MAX_POISSON_MEAN * min_clients) / (z * c)
    scale = float(min(scale, 2.0 ** 29 / c, max(one_draw, 8 * math.sqrt(dim) / c)))
    l2 = rounded_l2_bound(scale * c, dim, beta)
    variance = (z * l2) ** 2
    return SkellamSetting(scale, dim, l2, l1_bound(l2, dim), min_clients,
                          variance / min_clients, variance)


def conditional_round(v: jax.Array, key: jax.Array, bound: float) -> jax.Array:
    """Stochastic rounding of v (unbiased per attempt), repeated until ‖r‖ <= bound, at most
    MAX_ROUNDINGS times; then toward zero (‖trunc v‖ <= ‖v‖). int32."""
    limit = jnp.float32(bound) ** 2 * (1 - 1e-6)  # float32 sums: stay strictly inside

    def attempt(i):
        r = stochastic_round(v, jax.random.fold_in(key, i))
        return r, jnp.sum(jnp.square(r.astype(jnp.float32))) <= limit

    def again(carry):
        i, _, _ = carry
        return (i + 1, *attempt(i))

    r0, ok0 = attempt(0)
    _, r, ok = jax.lax.while_loop(lambda c: (~c[2]) & (c[0] < MAX_ROUNDINGS), again,
                                  (jnp.int32(1), r0, ok0))
    return jnp.where(ok, r, jnp.trunc(v).astype(jnp.int32))


def skellam_noise(key: jax.Array, variance: float, shape) -> jax.Array:
    """Sk(variance) = Poisson(variance/2) − Poisson(variance/2), int32, per entry: the sum of
    k independent Sk(variance/k), k the fewest draws of mean <= MAX_POISSON_MEAN."""
    k = max(1, math.ceil(variance / 2 / MAX_POISSON_MEAN))
    lam = jnp.float32(variance / 2 / k)
    draws = jax.random.poisson(key, lam, (2, k, *shape), jnp.int32)
    return jnp.sum(draws[0] - draws[1], axis=0)


def skellam_encode(clip_norm: float, setting: SkellamSetting, *, expected_clients: float,
                   seed: int = 0):
    """The clients' half of distributed DP (module doc): clip, rotate, scale, round, add
    Skellam noise; its finalizer unscales and unrotates the (secure) sum and divides by
    `expected_clients`. Reports `dp_clipped_fraction`, `dp_update_norm`, and the round's
    `dp_noise_std` (the noise std per coordinate of the aggregate, from the survivors)."""
    from fedjax_sim.aggregators import part

    c, s = float(clip_norm), setting.scale

    def init(params):
        del params
        return RotationState(jax.random.key_data(jax.random.key(seed)))

    def client(delta, state, rng):
        vector = flatten(delta)
        norm = global_norm(delta)
        clipped = _scale_to_norm(vector, norm, jnp.float32(c))
        rotated = rotate(clipped, jax.random.wrap_key_data(state.key)) * jnp.float32(s)
        k_round, k_noise = jax.random.split(rng)
        encoded = conditional_round(rotated, k_round, setting.l2_sensitivity)
        noised = encoded + skellam_noise(k_noise, setting.client_variance, encoded.shape)
        return Rotated(noised, _layout(delta)), {
            "dp_clipped_fraction": (norm > c).astype(jnp.float32), "dp_update_norm": norm}

    def finalize(total, denominator, reports, state, rng):
        del denominator
        vector = unrotate(total.vector.astype(jnp.float32) / jnp.float32(s),
                          jax.random.wrap_key_data(state.key), layout_entries(total.layout))
        survivors = reports.get("secagg_survivors", jnp.float32(setting.min_clients))
        std = jnp.sqrt(survivors * setting.client_variance) / (s * expected_clients)
        next_key = jax.random.key_data(jax.random.fold_in(rng, 1))
        return (unflatten(vector, total.layout), jnp.float32(expected_clients),
                RotationState(next_key), {"dp_noise_std": std, "dp_clip_norm": jnp.float32(c)})

    return part(init=init, client=client, finalize=finalize)


def distributed_dp(setting: SkellamSetting, *, clip_norm: float, expected_clients: float,
                   modulus_bits: int = 32, dropout_rate: float = 0.0, seed: int = 0):
    """Distributed DP-FedAvg: `chain(skellam_encode(...), secure_sum(...))` (module doc),
    the secure sum failing a round with fewer than `setting.min_clients` survivors and
    any round whose sum left the modulus' range."""
    from fedjax_sim.aggregators import chain

    return chain(skellam_encode(clip_norm, setting, expected_clients=expected_clients, seed=seed),
                 secure_sum(modulus_bits, dropout_rate=dropout_rate,
                            threshold=setting.min_clients, on_overflow="fail"))
