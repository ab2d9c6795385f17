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
