"""Per-client batch schedules with static shapes.

Every client of a round runs the same number of local steps S with batches of the same
size B, fixed by dataset-wide maxima, so the cohort can be vmapped and a new cohort
never recompiles. A client's real work is described by masks: padded examples are
masked out of the loss, and a step with no real example is skipped entirely (its
optimizer update is not applied). The schedule holds row *indices* only; the examples
themselves are gathered inside the step loop.

Two ways to say how long a client trains:
- `local_epochs=E`: E passes over the client's own data, each a fresh shuffle cut into
  ceil(n/B) batches (the last one partial), like a shuffled DataLoader. Client i does
  E*ceil(n_i/B) real steps; S = E*ceil(n_max/B).
- `local_steps=S`: exactly S batches of B examples each, walking through the client's
  shuffled examples and wrapping around (each pass starts at a fresh random offset).
  With `batch_size=None` (full batch) each of the S steps takes all of the client's own
  examples, whatever the other clients' sizes.

A third kind, for DP-SGD, is Poisson sampling (`sampling_rate=q`): at every step each of
the client's examples joins the batch independently with probability q, and the batch is
capped at B examples (a uniformly random subset of those that joined is kept when more
join). S = local_steps, or ceil(E / q) for E expected epochs. Every step of such a
schedule is live, even one whose batch came out empty: DP-SGD's noise is added whatever
the batch holds.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_sim.errors import UserError


class Schedule(NamedTuple):
    """Static description of the local loop shared by every client of a run."""

    batch_size: int  # B
    num_steps: int  # S
    local_epochs: int | None
    local_steps: int | None
    sampling_rate: float | None = None  # Poisson sampling of examples (DP-SGD)
    full_batch: bool = False  # batch_size=None: a step takes all of the client's examples


def make_schedule(max_client_size: int, *, batch_size: int | None,
                  local_epochs: int | None, local_steps: int | None,
                  sampling_rate: float | None = None) -> Schedule:
    """Fixes B and S from the largest client. `batch_size=None` means full-batch.

    With `sampling_rate=q` (Poisson batches), `batch_size` is the cap on a batch (at most
    the largest client's size) and S = local_steps or ceil(local_epochs / q).
    """
    if (local_epochs is None) == (local_steps is None):
        raise UserError("set exactly one of local_epochs and local_steps "
                        f"(got local_epochs={local_epochs}, local_steps={local_steps})")
    if batch_size is not None and batch_size <= 0:
        raise UserError(f"batch_size must be a positive integer or None for full-batch, "
                        f"got {batch_size}")
    if local_epochs is not None and local_epochs <= 0:
        raise UserError(f"local_epochs must be >= 1, got {local_epochs}")
    if local_steps is not None and local_steps <= 0:
        raise UserError(f"local_steps must be >= 1, got {local_steps}")
    if max_client_size <= 0:
        raise UserError("every client has 0 examples; nothing to train on")
    b = max_client_size if batch_size is None else int(batch_size)
    if sampling_rate is not None:
        if not 0 < sampling_rate <= 1:
            raise UserError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
        steps = int(local_steps) if local_steps is not None else math.ceil(local_epochs / sampling_rate)
        return Schedule(min(b, max_client_size), steps, local_epochs, local_steps, float(sampling_rate))
    if local_epochs is not None:
        steps = local_epochs * math.ceil(max_client_size / b)
    else:
        steps = int(local_steps)
    return Schedule(b, steps, local_epochs, local_steps, full_batch=batch_size is None)


# Up to this many slots ranks are computed by counting comparisons (O(L^2) work in one
# fused elementwise loop), which on XLA:CPU is several times faster than its comparator sort; longer
# key vectors use argsort.
RANK_MAX_SLOTS = 128


def bits_needed(schedule: Schedule, max_client_size: int) -> int:
    """How many random uint32 words `client_batches` consumes for one client."""
    if schedule.sampling_rate is not None:
        return schedule.num_steps * max_client_size
    if schedule.local_epochs is not None:
        return schedule.num_steps * schedule.batch_size  # E epochs x slots per epoch
    return max_client_size + schedule.num_steps * schedule.batch_size


def _ranks(sort_keys: jax.Array) -> jax.Array:
    """Each element's position in the stable ascending order of `sort_keys` (uint32)."""
    length = sort_keys.shape[-1]
    pos = jnp.arange(length, dtype=jnp.int32)
    if length > RANK_MAX_SLOTS:
        order = jnp.argsort(sort_keys, stable=True).astype(jnp.int32)
        return jnp.zeros(length, jnp.int32).at[order].set(pos)
    # rank_i = #{j : k_j < k_i, or k_j == k_i and j < i}, accumulated one j at a time: an
    # unrolled chain of elementwise ops that XLA emits as one loop fusion. (A [L, L]
    # comparison matrix summed over an axis was 2-4x slower on XLA:CPU, which splits
    # reductions longer than 32 into a reduce-window and materialises the matrix.)
    rank = jnp.zeros(length, jnp.int32)
    for j in range(length):
        k_j = sort_keys[..., j:j + 1]
        rank = rank + ((k_j < sort_keys) | ((k_j == sort_keys) & (j < pos))).astype(jnp.int32)
    return rank


def _shuffle(bits: jax.Array, n: jax.Array, length: int) -> jax.Array:
    """A uniformly random permutation of [0, n) in the first n of `length` slots; slot
    s >= n holds s.

    The sort keys are 31 random bits for the n real slots and 2^31 + position for the
    rest, so padding ranks last, in order. The ranks of i.i.d. keys are the inverse of a
    uniformly random permutation, hence uniformly random themselves; using them directly
    saves the inversion.
    """
    pos = jnp.arange(length, dtype=jnp.uint32)
    keys = jnp.where(pos < n.astype(jnp.uint32), bits >> 1, jnp.uint32(1 << 31) + pos)
    return _ranks(keys)


def poisson_sample(bits: jax.Array, rate: float, n: jax.Array, cap: int,
                   compact: bool = False) -> tuple[jax.Array, jax.Array]:
    """Poisson sampling of slots [0, n) of `bits` ([L] random uint32), capped at `cap`.

    Slot j < n joins when bits[j] < floor(rate * 2^32), i.e. with probability at most
    `rate` (never above it, so an accountant told `rate` is never optimistic). Returns
    (slots [cap] int32, mask [cap] bool): the joined slots, and when more than `cap`
    joined, the `cap` of them with the smallest bits; those bits are i.i.d. uniform below
    the threshold, so this keeps a uniformly random subset. Unused entries are masked.
    With `compact` the joined slots always come first (in random order), even when no cap
    applies.
    """
    length = bits.shape[-1]
    pos = jnp.arange(length, dtype=jnp.int32)
    if rate >= 1:
        joined = pos < n
    else:
        joined = (bits < jnp.uint32(min(int(rate * 2.0 ** 32), 2 ** 32 - 1))) & (pos < n)
    if cap >= length and not compact:
        return pos, joined
    cap = min(cap, length)
    # Joined slots sort by 30 random bits, the rest after them by position.
    keys = jnp.where(joined, (bits >> 2).astype(jnp.int32), jnp.int32(1 << 30) + pos)
    neg, slots = jax.lax.top_k(-keys, cap)
    return slots.astype(jnp.int32), -neg < (1 << 30)


def client_batches(schedule: Schedule, bits: jax.Array, n: jax.Array,
                   max_client_size: int) -> tuple[jax.Array, jax.Array]:
    """Local row indices `[S, B]` (in [0, n)) and the example mask `[S, B]` of one client.

    `bits` are `bits_needed(...)` random uint32 words (see engine.round.client_randomness).
    """
    b, s = schedule.batch_size, schedule.num_steps
    if schedule.sampling_rate is not None:
        # Sampled examples first, so DP-SGD can skip the padding (privacy.dp_sgd).
        return jax.vmap(lambda w: poisson_sample(w, schedule.sampling_rate, n, b, compact=True))(
            bits.reshape(s, max_client_size))
    if schedule.local_epochs is not None:
        epochs = schedule.local_epochs
        per_epoch = s // epochs  # = ceil(n_max / B)
        slots = per_epoch * b
        perms = jax.vmap(lambda w: _shuffle(w, n, slots))(bits.reshape(epochs, slots))
        valid = jnp.arange(slots) < n  # same for every epoch
        idx = jnp.where(valid, perms, 0).reshape(s, b)
        mask = jnp.broadcast_to(valid, (epochs, slots)).reshape(s, b)
        return idx, mask
    if schedule.full_batch:  # every step: all of the client's n examples (B = n_max slots)
        valid = jnp.arange(b) < n
        return (jnp.broadcast_to(jnp.where(valid, jnp.arange(b), 0), (s, b)),
                jnp.broadcast_to(valid, (s, b)))
    # Fixed number of steps: position t of the stream is example perm[(t mod n + r_p) mod n]
    # on pass p = t // n, where r_p is a random rotation per pass.
    perm = _shuffle(bits[:max_client_size], n, max_client_size)
    t = jnp.arange(s * b, dtype=jnp.int32)
    n_safe = jnp.maximum(n, 1).astype(jnp.int32)
    passes = t // n_safe
    rot = (bits[max_client_size:] % n_safe.astype(jnp.uint32)).astype(jnp.int32)[passes]
    idx = perm[(t % n_safe + rot) % n_safe].reshape(s, b)
    mask = jnp.broadcast_to(n > 0, (s, b))
    return idx, mask
