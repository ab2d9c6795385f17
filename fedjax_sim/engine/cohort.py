"""Running one function over every client of a cohort, and summing what they send.

`map_clients(fn, per_client, clients_per_chunk)` evaluates `fn` on each client's slice of
`per_client` (arrays with a leading cohort axis) and returns the WEIGHTED SUM over clients
of what each sends, the sum of the weights, and the per-client stack of its outputs:

- `clients_per_chunk=None`: one `vmap` over the whole cohort;
- `clients_per_chunk=k`: a `lax.scan` over chunks of k clients, `vmap` inside a chunk,
  accumulating the sum; peak memory grows with k, not with the cohort size;
- `clients_per_chunk=1`: a `lax.map`-style scan over clients with no vmap at all (on
  XLA:CPU this avoids vmapped per-client convolution weights becoming grouped
  convolutions, which run slower than one client after another).

The sum is accumulated in float32 (or the summands' dtype if wider). All three give the
same result up to float round-off.

With `count` (a traced number of leading clients that are real, the rest padding, as in a
Poisson cohort padded to its cap), chunks are run by a while loop that stops after the
last chunk holding a real client, so a round costs what its real clients cost (rounded up
to a chunk), not what the cap would.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


def _acc_dtype(x: jax.Array):
    return jnp.promote_types(x.dtype, jnp.float32)


def _weighted_sum(weights: jax.Array, tree: PyTree) -> PyTree:
    """sum_c weights[c] * x[c] for every leaf, as one dot per leaf (a GEMV, not a reduce)."""
    return jax.tree_util.tree_map(
        lambda x: jnp.tensordot(weights.astype(_acc_dtype(x)), x.astype(_acc_dtype(x)), axes=1),
        tree)


def map_clients(fn: Callable[[PyTree], tuple[jax.Array, PyTree, PyTree]], per_client: PyTree,
                clients_per_chunk: int | None,
                count: jax.Array | None = None) -> tuple[PyTree, jax.Array, PyTree]:
    """Runs `fn` on every client; returns (sum_c w_c * x_c, sum_c w_c, stacked outputs).

    `fn(client) -> (w, x, out)`: a scalar weight, a pytree to be weighted and summed, and a
    pytree to be stacked over clients. Clients added to fill the last chunk are copies of
    the first client with weight 0 whose stacked output is dropped, so `fn` must return
    finite values for them (it does for any real client).

    `count`: only clients [0, count) are real; chunks past the last of them are skipped
    (their stacked outputs are zero, and they add nothing). Needs `clients_per_chunk`.
    """
    m = jax.tree_util.tree_leaves(per_client)[0].shape[0]
    if clients_per_chunk is None or clients_per_chunk >= m:
        w, x, stacked = jax.vmap(fn)(per_client)
        return _weighted_sum(w, x), jnp.sum(w.astype(jnp.float32)), stacked

    k = int(clients_per_chunk)
    num_chunks = -(-m // k)
    pad = num_chunks * k - m
    live = (jnp.arange(num_chunks * k) < m).reshape(num_chunks, k)

    def pad_and_chunk(x):
        if pad:
            x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad, *x.shape[1:]))])
        return x.reshape(num_chunks, k, *x.shape[1:])

    chunks = (jax.tree_util.tree_map(pad_and_chunk, per_client), live)
    x_shape = jax.eval_shape(
        lambda pc: fn(jax.tree_util.tree_map(lambda x: x[0], pc))[1], per_client)
    zeros = (jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, _acc_dtype(s)), x_shape),
             jnp.float32(0))

    if count is not None:
        return _map_leading_chunks(fn, chunks, zeros, x_shape, count, k, num_chunks, m)

    if k == 1:
        def body(acc, chunk):
            pc, alive = jax.tree_util.tree_map(lambda x: x[0], chunk)
            w, x, out = fn(pc)
            w = jnp.where(alive, w, 0).astype(jnp.float32)
            total = jax.tree_util.tree_map(lambda a, v: a + w * v.astype(a.dtype), acc[0], x)
            return (total, acc[1] + w), out
    else:
        def body(acc, chunk):
            pc, alive = chunk
            w, x, out = jax.vmap(fn)(pc)
            w = jnp.where(alive, w, 0).astype(jnp.float32)
            total = jax.tree_util.tree_map(jnp.add, acc[0], _weighted_sum(w, x))
            return (total, acc[1] + jnp.sum(w)), out

    (total, weight), stacked = jax.lax.scan(body, zeros, chunks)
    stacked = jax.tree_util.tree_map(
        lambda x: x.reshape(num_chunks * k, *x.shape[(1 if k == 1 else 2):])[:m], stacked)
    return total, weight, stacked


def _map_leading_chunks(fn, chunks, zeros, x_shape, count, k, num_chunks, m):
    """map_clients' chunked path as a while loop over the chunks that hold real clients."""
    del x_shape
    pc0, live0 = jax.tree_util.tree_map(lambda x: x[0], chunks)
    out_shape = jax.eval_shape(lambda pc: jax.vmap(fn)(pc)[2], pc0)
    outs = jax.tree_util.tree_map(lambda s: jnp.zeros((num_chunks, *s.shape), s.dtype), out_shape)
    needed = (jnp.minimum(count, m) + k - 1) // k

    def body(i, state):
        (total, weight), outs = state
        pc, alive = jax.tree_util.tree_map(lambda x: x[i], chunks)
        w, x, out = jax.vmap(fn)(pc)
        w = jnp.where(alive, w, 0).astype(jnp.float32)
        total = jax.tree_util.tree_map(jnp.add, total, _weighted_sum(w, x))
        outs = jax.tree_util.tree_map(lambda buf, o: buf.at[i].set(o), outs, out)
        return (total, weight + jnp.sum(w)), outs

    (total, weight), outs = jax.lax.fori_loop(0, needed, body, (zeros, outs))
    stacked = jax.tree_util.tree_map(lambda x: x.reshape(num_chunks * k, *x.shape[2:])[:m], outs)
    return total, weight, stacked
