"""Correlated noise across rounds: the noise of a matrix-factorization mechanism (DP-FTRL,
Kairouz et al. 2021; banded matrix factorization, BandMF, Choquette-Choo et al. 2023).

The server releases, over n rounds, x̂ = x + C⁻¹ Z · σ, where x_t is round t's sum of
clipped updates, Z has i.i.d. N(0, 1) rows (one per round, shaped like the update) and C
is the lower-triangular strategy matrix: equivalently C x̂ = C x + σ Z, a Gaussian
mechanism on C x. With C banded Toeplitz (b bands, coefficients c₀ … c_{b−1}), round t's
noise is the streaming recursion w_t = (Z_t − Σ_{j=1}^{b−1} c_j w_{t−j}) / c₀, which keeps
the last b − 1 noise vectors in the part's state. The strategy, its inverse as a
streaming matrix and the sensitivity come from `jax_privacy.matrix_factorization`;
`fedjax_sim.privacy.matrix_factorization` turns them into ε.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.errors import UserError
from fedjax_sim.privacy.noise import gaussian_like


class CorrelatedNoiseState(NamedTuple):
    noise_multiplier: jax.Array  # z (an input of the compiled program)
    buffers: Any  # the streaming inverse's state: the last b - 1 noise vectors


def correlated_gaussian(noise_multiplier: float, *, coefficients, expected_clients: float):
    """Adds std · (C⁻¹ Z)_t to round t's sum, with std = z · (the clip norm `clip` used
    this round) and C the banded Toeplitz strategy of `coefficients` (c₀ … c_{b−1}); then
    divides by `expected_clients` (m). Needs `clip()` before it in the chain. Reports
    `dp_noise_std`, the std per coordinate of Z's contribution to the aggregate (z·C/m)."""
    from fedjax_sim.aggregators import part
    from fedjax_sim.privacy.matrix_factorization import jax_privacy_toeplitz

    toeplitz = jax_privacy_toeplitz()
    coef = np.asarray(coefficients, np.float64)
    if coef.ndim != 1 or coef.size < 1 or not np.all(np.isfinite(coef)) or coef[0] <= 0:
        raise UserError(f"coefficients must be a 1-D array of finite numbers with c0 > 0, got "
                        f"{coefficients!r}")
    inverse = toeplitz.inverse_as_streaming_matrix(jnp.asarray(coef, jnp.float32))
    z = float(noise_multiplier)
    m = float(expected_clients)

    def init(params):
        shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), params)
        return CorrelatedNoiseState(jnp.float32(z), inverse.init_multiply(shapes))

    def finalize(total, denominator, reports, state, rng):
        del denominator
        if "dp_clip_norm" not in reports:
            raise UserError("correlated_gaussian() needs clip() before it in the chain (the "
                            "noise is scaled to the clip norm)")
        std = state.noise_multiplier * reports["dp_clip_norm"]
        fresh = gaussian_like(rng, jax.tree_util.tree_map(lambda t: t.astype(jnp.float32), total), 1.0)
        noise, buffers = inverse.multiply_next(fresh, state.buffers)
        noised = jax.tree_util.tree_map(lambda t, w: t + (std * w).astype(t.dtype), total, noise)
        return noised, jnp.float32(m), state._replace(buffers=buffers), {"dp_noise_std": std / m}

    return part(init=init, finalize=finalize,
                key=("dp.correlated_gaussian", tuple(coef.tolist()), m))


class TreeNoiseState(NamedTuple):
    noise_multiplier: jax.Array  # z (an input of the compiled program)
    key: jax.Array  # the root key of the node noises (the first round's key's data)
    rounds: jax.Array  # rounds aggregated so far (int32)


def _node_noise(key_data, level, index, like):
    """The N(0, 1) noise of tree node (level, index), shaped like `like`: the same every time
    it is drawn, from the root key alone."""
    key = jax.random.wrap_key_data(key_data)
    return gaussian_like(jax.random.fold_in(jax.random.fold_in(key, level), index), like, 1.0)


def tree_gaussian(noise_multiplier: float, *, expected_clients: float):
    """Tree aggregation (DP-FTRL, Kairouz et al. 2021): every complete dyadic block of rounds
    gets a node with N(0, σ²) noise, σ = z · (the clip norm `clip` used this round), and the
    sum of rounds 1 … t is read off the blocks of t's binary digits. Round t (X = t + 1 rounds
    done, i = the trailing zeros of X) therefore adds the difference of two such prefix
    noises: the node of the block that round X completes (level i) minus the nodes at
    levels 0 … i − 1 it replaces; i + 1 draws, about two per round on average, each drawn
    again from a root key kept in the state (no buffers). Divides by `expected_clients` (m).
    Needs `clip()` before it in the chain. Reports `dp_noise_std` (z·C/m, one node's std)."""
    from fedjax_sim.aggregators import part

    z = float(noise_multiplier)
    m = float(expected_clients)

    def init(params):
        del params
        shape = jax.random.key_data(jax.random.key(0)).shape  # the default key's data
        return TreeNoiseState(jnp.float32(z), jnp.zeros(shape, jnp.uint32), jnp.int32(0))

    def finalize(total, denominator, reports, state, rng):
        del denominator
        if "dp_clip_norm" not in reports:
            raise UserError("tree_gaussian() needs clip() before it in the chain (the noise "
                            "is scaled to the clip norm)")
        data = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
        root = jnp.where(state.rounds == 0, data.astype(jnp.uint32), state.key)
        like = jax.tree_util.tree_map(lambda t: jnp.zeros(t.shape, jnp.float32), total)
        done = state.rounds + 1  # X
        level = jnp.int32(jax.lax.population_count((done & -done) - 1))  # i = ctz(X)

        def removed(j, acc):  # level j's block [X - 2^{j+1}, X - 2^j), index X/2^j - 2
            node = _node_noise(root, j, (done >> j) - 2, like)
            return jax.tree_util.tree_map(jnp.subtract, acc, node)

        added = _node_noise(root, level, (done >> level) - 1, like)
        noise = jax.lax.fori_loop(0, level, removed, added)
        std = state.noise_multiplier * reports["dp_clip_norm"]
        noised = jax.tree_util.tree_map(lambda t, w: t + (std * w).astype(t.dtype), total, noise)
        return noised, jnp.float32(m), state._replace(key=root, rounds=done), {
            "dp_noise_std": std / m}

    return part(init=init, finalize=finalize, key=("dp.tree_gaussian", m))
