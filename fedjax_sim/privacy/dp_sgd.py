"""Example-level DP-SGD inside each client (Abadi et al. 2016).

At every local step each of the client's n examples joins the batch independently with
probability q (the schedule's Poisson batches, engine.batching), and the step's gradient is

    g = ( Σ_{j ∈ batch} g_j · min(1, C / ‖g_j‖) + N(0, (σ·C)² I) ) / (q · n)

with per-example gradients g_j (a vmap over the batch inside the client's vmap), the
flat L2 norm over all parameters, and the expected batch size q·n as the denominator
(n, the client's dataset size, is treated as public, as in Opacus). Adding or removing one
example changes the noised sum by at most C, so each step is a Poisson-subsampled Gaussian
mechanism with noise multiplier σ for that client's data; the accountant composes the
steps a client has taken (`fedjax_sim.privacy.accounting`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any


class ExampleNoise(NamedTuple):
    """The static DP-SGD parameters a client's gradient uses."""

    clip_norm: float  # C, per example
    noise_multiplier: float  # σ
    sampling_rate: float  # q


def per_example_gradients(loss: Callable, params: PyTree, batch: dict, mask: jax.Array,
                          rng: jax.Array):
    """Gradients of `loss(params, batch, mask, rng) -> (mean loss, sums)` for each example
    of `batch` on its own (leading axis B), and each example's metric sums.

    Each example gets its own key (fold_in(rng, j)), so dropout differs between examples.
    A masked-out example has a zero gradient and zero sums.
    """
    size = mask.shape[0]

    def one(j):
        single = {k: jax.lax.dynamic_slice_in_dim(v, j, 1) for k, v in batch.items()}
        return jax.grad(loss, has_aux=True)(params, single, mask[j][None],
                                            jax.random.fold_in(rng, j))

    return jax.vmap(one)(jnp.arange(size))


def clipped_sum(grads: PyTree, mask: jax.Array, clip_norm: float):
    """Σ_j mask_j · g_j · min(1, C/‖g_j‖) over the leading axis, and how many real examples
    were clipped (‖g_j‖ > C)."""
    leaves = jax.tree_util.tree_leaves(grads)
    sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1)
             for x in leaves)
    norms = jnp.sqrt(sq)
    scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny))
    scale = jnp.where(mask, scale, 0.0)
    total = jax.tree_util.tree_map(
        lambda g: jnp.tensordot(scale.astype(g.dtype), g, axes=1), grads)
    return total, jnp.sum(jnp.where(mask, norms > clip_norm, False).astype(jnp.float32))


def private_gradient(loss: Callable, noise: ExampleNoise, params: PyTree, batch: dict,
                     mask: jax.Array, rng: jax.Array, num_examples: jax.Array):
    """One DP-SGD gradient (module doc) and the batch's metric sums, plus
    `dp_clipped_fraction`: the number of examples whose gradient was clipped (the engine
    divides metric sums by the example count)."""
    k_examples, k_noise = jax.random.split(rng)
    grads, sums = per_example_gradients(loss, params, batch, mask, k_examples)
    total, clipped = clipped_sum(grads, mask, noise.clip_norm)
    std = noise.noise_multiplier * noise.clip_norm
    leaves, treedef = jax.tree_util.tree_flatten(total)
    keys = jax.random.split(k_noise, len(leaves))
    denominator = noise.sampling_rate * jnp.maximum(num_examples, 1).astype(jnp.float32)
    noised = [(x + (std * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype))
              / denominator.astype(x.dtype) for x, k in zip(leaves, keys)]
    sums = jax.tree_util.tree_map(lambda s: jnp.sum(s, axis=0), sums)
    sums["dp_clipped_fraction"] = clipped
    return jax.tree_util.tree_unflatten(treedef, noised), sums
