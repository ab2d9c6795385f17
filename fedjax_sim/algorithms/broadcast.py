"""Compression of what the server sends down (server -> client), as a wrapper around any
algorithm: lossy compression of the broadcast model (Caldas et al. 2018, "Expanding the
Reach of Federated Learning by Reducing Client Resource Requirements").

`compressed_broadcast(algorithm, bits, rotation=None | "hadamard", seed=0)` runs
`algorithm` unchanged, except that what every client receives is its broadcast
compressed. The broadcast's floating-point leaves, flattened together into one float32
vector x in R^d (in `jax.tree_util` order), are quantized with the uplink's quantizer
(`fedjax_sim.aggregators.compression.stochastic_quantize`): 2^k levels evenly spread over
[min x, max x], s = (max x - min x) / (2^k - 1), each entry rounded up or down at random so
that

    E[Q(x)] = x,   Var Q(x)_j <= s^2 / 4.

With `rotation="hadamard"` x is first padded to d' (the next power of two) and rotated,
R x = H D x / sqrt(d') (Walsh-Hadamard times random signs; orthogonal), and the client
undoes the rotation: it receives x^ = R^-1 Q(R x), still unbiased, with a range that a
few large entries no longer stretch. Leaves of other dtypes (integer counters) are sent
as they are; a leaf narrower than float32 (bfloat16) receives x^ rounded to its dtype.

Every client of a round receives the same x^ (the server compresses once, as for one
broadcast). The quantizer's and the rotation's randomness are public: they come from a key
in the server state, which is (the wrapped algorithm's state, key) and advances every
round (`seed` picks round 0's key).

Clients train from what they received: FedAvg's client sends delta_i = x^ - w_i, and the
server applies the round's aggregate to its own exact model, w <- w - mean_i delta_i, as in
the paper. With server SGD at 1 this is w <- mean_i w_i + (w - x^): the broadcast's error
does not pile up in the server's model; it changes where the clients start. Algorithms
that broadcast more than the model send all of it through one quantizer with one range
(SCAFFOLD: the model and the server control variate).

On the wire (`downlink`): d values (d' rotated) of k bits plus 64 bits (the range, two
float32); the rotation's seed is public and costs nothing; leaves of other dtypes count at
their width. An 8-bit broadcast of a float32 model is a quarter of its bytes plus 8.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.aggregators.compression import (FLOAT_BITS, check_quantizer, flatten,
                                                padded_size, rotate, stochastic_quantize,
                                                unflatten, unrotate)
from fedjax_sim.engine.contracts import Algorithm, ClientOutput, Message, Problem, RoundSums
from fedjax_sim.errors import UserError

PyTree = Any


class BroadcastState(NamedTuple):
    inner: PyTree  # the wrapped algorithm's server state
    key: jax.Array  # uint32 key data of this round's compression (public)


def _is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def compress(tree: PyTree, bits: int, rotation: str | None, key: jax.Array) -> PyTree:
    """`tree` as a client receives it: its floating leaves flattened together into x and
    replaced by Q(x), or by R^-1 Q(R x) with `rotation="hadamard"` (module doc); other
    leaves unchanged. `key` (a typed key) draws the rotation's signs and the rounding."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    floating = [i for i, x in enumerate(leaves) if _is_float(x)]
    if not floating:
        return tree
    sent = [leaves[i] for i in floating]
    vector = flatten(sent)
    k_rotation, k_rounding = jax.random.split(key)
    if rotation is None:
        received = stochastic_quantize(vector, bits, k_rounding)
    else:
        rounded = stochastic_quantize(rotate(vector, k_rotation), bits, k_rounding)
        received = unrotate(rounded, k_rotation, vector.size)
    layout = (jax.tree_util.tree_structure(sent), tuple(tuple(jnp.shape(x)) for x in sent))
    for i, x in zip(floating, unflatten(received, layout)):
        leaves[i] = x.astype(leaves[i].dtype)
    return treedef.unflatten(leaves)


def compressed_message(tree: PyTree, bits: int, rotation: str | None) -> Message:
    """What `compress` puts on the wire for a broadcast shaped like `tree`: d (or d') values
    of `bits` bits, 64 bits of range, and the other leaves at their width."""
    leaves = jax.tree_util.tree_leaves(tree)
    d = sum(math.prod(x.shape) for x in leaves if _is_float(x))
    rest = sum(8 * math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
               for x in leaves if not _is_float(x))
    if d == 0:
        return Message(0, 0, extra_bits=rest)
    return Message(padded_size(d) if rotation else d, bits, 0, 2 * FLOAT_BITS + rest)


def _check(inner, bits, rotation, seed) -> None:
    if not isinstance(inner, Algorithm):
        raise UserError(f"compressed_broadcast wraps an algorithm (fedjax_sim.algorithms, e.g. "
                        f"fedavg(optax.sgd(0.1))), got {type(inner).__name__}")
    check_quantizer("compressed_broadcast", bits, rotation, seed,
                    "compressed_broadcast(algorithm, 8)")


@dataclasses.dataclass(frozen=True, eq=False)
class CompressedBroadcast(Algorithm):
    """`inner` whose clients receive its broadcast compressed (module doc).

    Its schedule and weighting (the declared fields) are the inner algorithm's; everything
    but the broadcast, the server state's key and `downlink` is the inner algorithm's."""

    inner: Algorithm
    bits: int
    rotation: str | None = None
    seed: int = 0

    @classmethod
    def wrap(cls, inner: Algorithm, bits: int, *, rotation: str | None = None,
             seed: int = 0) -> "CompressedBroadcast":
        _check(inner, bits, rotation, seed)
        local = inner.local_schedule
        return cls(inner, bits, rotation, seed, batch_size=local.batch_size,
                   local_epochs=local.local_epochs, local_steps=local.local_steps,
                   weighting=inner.weighting)

    def __post_init__(self):
        super().__post_init__()
        _check(self.inner, self.bits, self.rotation, self.seed)
        inner = self.inner
        if (self.local_schedule, self.weighting) != (inner.local_schedule, inner.weighting):
            raise UserError("compressed_broadcast's schedule and weighting are the wrapped "
                            "algorithm's: set batch_size, local_epochs, local_steps and "
                            "weighting on it, then wrap it with compressed_broadcast(...)")

    @property
    def personalized(self):
        return self.inner.personalized

    @property
    def global_model(self):
        return self.inner.global_model

    @property
    def client_dp(self):
        return self.inner.client_dp

    def server_init(self, params):
        key = jax.random.key_data(jax.random.key(self.seed))
        return BroadcastState(self.inner.server_init(params), key)

    def client_state_init(self, params):
        return self.inner.client_state_init(params)

    def broadcast(self, server_state):
        key = jax.random.fold_in(jax.random.wrap_key_data(server_state.key), 0)
        return compress(self.inner.broadcast(server_state.inner), self.bits, self.rotation, key)

    def downlink(self, broadcast) -> Message:
        return compressed_message(broadcast, self.bits, self.rotation)

    def client_update(self, problem: Problem, broadcast, local, rng,
                      client_state=None) -> ClientOutput:
        return self.inner.client_update(problem, broadcast, local, rng, client_state)

    def server_update(self, server_state, aggregate, sums: RoundSums):
        # the next round's compression: a fresh public key
        key = jax.random.fold_in(jax.random.wrap_key_data(server_state.key), 1)
        return BroadcastState(self.inner.server_update(server_state.inner, aggregate, sums),
                              jax.random.key_data(key))

    def params(self, server_state):
        return self.inner.params(server_state.inner)

    def personal_params(self, params, client_state):
        return self.inner.personal_params(params, client_state)

    def personal_model_state(self, model_state, client_state):
        return self.inner.personal_model_state(model_state, client_state)

    def client_weight(self, num_examples):
        return self.inner.client_weight(num_examples)


def compressed_broadcast(algorithm: Algorithm, bits: int, *, rotation: str | None = None,
                         seed: int = 0) -> CompressedBroadcast:
    """`algorithm` whose clients receive its broadcast quantized to `bits` bits (1 to 16)
    between its min and max, unbiased, optionally after a randomized Hadamard rotation
    (`rotation="hadamard"`) that the client undoes (module doc). `seed` picks round 0's
    compression; later rounds' follow from it. Sends d x bits + 64 bits a client (d' x bits
    + 64 rotated)."""
    return CompressedBroadcast.wrap(algorithm, bits, rotation=rotation, seed=seed)
