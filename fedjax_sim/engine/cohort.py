"""Running one function over every client of a cohort, and summing what they send.

`map_clients(fn, per_client, clients_per_chunk)` evaluates `fn` on each client's slice of
`per_client` (arrays with a leading cohort axis) and returns the SUM over clients of the
first output and the per-client stack of the second:

- `clients_per_chunk=None`: one `vmap` over the whole cohort;
- `clients_per_chunk=k`: a `lax.scan` over chunks of k clients, `vmap` inside a chunk,
  accumulating the sum; peak memory grows with k, not with the cohort size;
- `clients_per_chunk=1`: a `lax.map`-style scan over clients with no vmap at all (on
  XLA:CPU this avoids vmapped per-client convolution weights becoming grouped
  convolutions, which run slower than one client after another).

The sum is accumulated in float32 (or the summands' dtype if wider). All three give the
same result up to float round-off.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


def _acc_dtype(x: jax.Array):
    return jnp.promote_types(x.dtype, jnp.float32)


def _sum0(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: jnp.sum(x.astype(_acc_dtype(x)), axis=0), tree)


def map_clients(fn: Callable[[PyTree], tuple[PyTree, PyTree]], per_client: PyTree,
                clients_per_chunk: int | None) -> tuple[PyTree, PyTree]:
    """Returns (sum over clients of fn(c)[0], stacked fn(c)[1]).

    Clients added to fill the last chunk are copies of the first client whose summed
    output is multiplied by 0 and whose stacked output is dropped, so `fn` must return
    finite values for them (it does for any real client).
    """
    m = jax.tree_util.tree_leaves(per_client)[0].shape[0]
    if clients_per_chunk is None or clients_per_chunk >= m:
        summed, stacked = jax.vmap(fn)(per_client)
        return _sum0(summed), stacked

    k = int(clients_per_chunk)
    num_chunks = -(-m // k)
    pad = num_chunks * k - m
    live = jnp.arange(num_chunks * k) < m

    def pad_and_chunk(x):
        if pad:
            x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad, *x.shape[1:]))])
        return x.reshape(num_chunks, k, *x.shape[1:])

    chunks = (jax.tree_util.tree_map(pad_and_chunk, per_client), live.reshape(num_chunks, k))
    summed_shape = jax.eval_shape(
        lambda pc: fn(jax.tree_util.tree_map(lambda x: x[0], pc))[0], per_client)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, _acc_dtype(s)), summed_shape)

    def masked(summand, alive):
        return jax.tree_util.tree_map(
            lambda x: jnp.where(alive.reshape(alive.shape + (1,) * (x.ndim - alive.ndim)),
                                x.astype(_acc_dtype(x)), 0), summand)

    if k == 1:
        def body(acc, chunk):
            pc, alive = jax.tree_util.tree_map(lambda x: x[0], chunk)
            summand, out = fn(pc)
            acc = jax.tree_util.tree_map(jnp.add, acc, masked(summand, alive))
            return acc, out
    else:
        def body(acc, chunk):
            pc, alive = chunk
            summand, out = jax.vmap(fn)(pc)
            acc = jax.tree_util.tree_map(jnp.add, acc, _sum0(masked(summand, alive)))
            return acc, out

    total, stacked = jax.lax.scan(body, zeros, chunks)
    stacked = jax.tree_util.tree_map(
        lambda x: x.reshape(num_chunks * k, *x.shape[(1 if k == 1 else 2):])[:m], stacked)
    return total, stacked
