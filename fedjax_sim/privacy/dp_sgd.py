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

from fedjax_sim.privacy.noise import gaussian_like

PyTree = Any


class ExampleNoise(NamedTuple):
    """The static DP-SGD parameters a client's gradient uses.

    `chunk`: per-example gradients are computed `chunk` examples at a time, only for the
    chunks that hold sampled examples (a Poisson batch is padded to a cap about twice its
    expected size, and its sampled examples come first); None = the whole batch at once.
    """

    clip_norm: float  # C, per example
    noise_multiplier: float  # σ
    sampling_rate: float  # q
    chunk: int | None = None


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
    size = mask.shape[0]
    if noise.chunk is None or noise.chunk >= size:
        grads, sums = per_example_gradients(loss, params, batch, mask, k_examples)
        total, clipped = clipped_sum(grads, mask, noise.clip_norm)
        sums = jax.tree_util.tree_map(lambda s: jnp.sum(s, axis=0), sums)
    else:
        total, clipped, sums = _chunked_clipped_sum(loss, noise, params, batch, mask, k_examples)
    std = noise.noise_multiplier * noise.clip_norm
    denominator = noise.sampling_rate * jnp.maximum(num_examples, 1).astype(jnp.float32)
    if noise.noise_multiplier != 0:
        total = jax.tree_util.tree_map(jnp.add, total, gaussian_like(k_noise, total, std))
    sums["dp_clipped_fraction"] = clipped
    return jax.tree_util.tree_map(lambda x: x / denominator.astype(x.dtype), total), sums


def _chunked_clipped_sum(loss, noise: ExampleNoise, params, batch, mask, rng):
    """`clipped_sum` of the per-example gradients, `noise.chunk` examples at a time, over
    the leading chunks that hold real examples only (the batch's real examples come
    first). Example j keeps its key fold_in(rng, j), so the result equals the whole-batch
    computation."""
    k, size = noise.chunk, mask.shape[0]
    num_chunks = -(-size // k)
    pad = num_chunks * k - size
    if pad:
        batch = {n: jnp.concatenate([v, jnp.zeros((pad, *v.shape[1:]), v.dtype)])
                 for n, v in batch.items()}
        mask = jnp.concatenate([mask, jnp.zeros(pad, bool)])
    needed = (jnp.sum(mask.astype(jnp.int32)) + k - 1) // k

    def chunk_of(i):
        part = {n: jax.lax.dynamic_slice_in_dim(v, i * k, k) for n, v in batch.items()}
        part_mask = jax.lax.dynamic_slice_in_dim(mask, i * k, k)
        keys = jax.vmap(lambda j: jax.random.fold_in(rng, j))(i * k + jnp.arange(k))
        grads, sums = jax.vmap(lambda j: jax.grad(loss, has_aux=True)(
            params, {n: jax.lax.dynamic_slice_in_dim(v, j, 1) for n, v in part.items()},
            part_mask[j][None], keys[j]))(jnp.arange(k))
        total, clipped = clipped_sum(grads, part_mask, noise.clip_norm)
        return total, clipped, jax.tree_util.tree_map(lambda s: jnp.sum(s, axis=0), sums)

    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   jax.eval_shape(chunk_of, jnp.int32(0)))

    def body(i, acc):
        return jax.tree_util.tree_map(jnp.add, acc, chunk_of(i))

    return jax.lax.fori_loop(0, needed, body, zeros)
