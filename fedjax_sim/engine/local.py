"""One client's local training loop: gather a batch, take a step, skip padded steps.

The loop is a `lax.scan` over the schedule's steps, fully or partly unrolled (`unroll`).
Unrolling matters on XLA:CPU, where a convolution inside a while-loop body runs an order
of magnitude slower than the same convolution unrolled (benchmarks/README.md); on
accelerators a rolled scan compiles faster at the same speed.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_sim.algorithms.base import STATS_KEY

PyTree = Any
# step(carry, batch, example_mask [B], rng) -> (carry, metric_sums: dict of scalars)
StepFn = Callable[[PyTree, dict, jax.Array, jax.Array], tuple[PyTree, dict]]
# preprocess(batch, rng) -> batch: on-device conversion and augmentation (data.augment)
PreprocessFn = Callable[[dict, jax.Array], dict]
# A step's augmentation key: fold_in(step key, AUGMENT_STREAM); the step itself (dropout,
# DP noise) uses the step key, so the two streams are independent.
AUGMENT_STREAM = 0xA06


class LocalData:
    """What a client function sees of its own data inside the round's jit.

    Attributes:
      num_examples: the client's example count (a traced scalar).
      client_id: the client's index in the dataset (a traced scalar).
    """

    def __init__(self, data: dict, offset: jax.Array, idx: jax.Array, mask: jax.Array,
                 num_examples: jax.Array, client_id: jax.Array, unroll: int | bool,
                 live: jax.Array | None = None, preprocess: PreprocessFn | None = None,
                 stats=None):
        self._data, self._offset, self._idx, self._mask = data, offset, idx, mask
        self._preprocess = preprocess
        # The client's running statistics (algorithms.base.StatsCell), carried through
        # the steps where clients update them; None where they are fixed.
        self._stats = stats
        # Which steps run: by default those whose batch holds a real example; Poisson
        # (DP-SGD) schedules run every step of a non-empty client.
        self._live = jnp.any(mask, axis=1) if live is None else live
        self.num_examples = num_examples
        self.client_id = client_id
        self._unroll = unroll

    @property
    def num_steps(self) -> int:
        return self._idx.shape[0]

    def real_steps(self) -> jax.Array:
        """How many of the static steps run (by default: hold at least one real example)."""
        return jnp.sum(self._live).astype(jnp.int32)

    def run(self, step: StepFn, carry: PyTree, key: jax.Array) -> tuple[PyTree, dict]:
        """Runs `step` over the client's batches; returns the carry and summed metrics.

        A step that does not run (by default: whose batch holds no real example) leaves the
        carry exactly unchanged and adds nothing to the metrics.

        Where the client updates running statistics (a stats cell), they are carried too:
        each step's loss sees the statistics the previous step left, and the cell ends
        holding the last ones.
        """
        cell = self._stats
        if cell is not None:
            inner_step = step

            def step(carry, batch, mask, key):
                carry, stats = carry
                cell.value = stats
                new_carry, metrics = inner_step(carry, batch, mask, key)
                metrics = dict(metrics)
                stats = metrics.pop(STATS_KEY, stats)
                return (new_carry, stats), metrics

            carry = (carry, cell.value)

        def batch_of(s, step_key):
            # Padded slots read the client's first row, so a batch never touches another
            # client's examples (results do not depend on how the data is laid out).
            rows = self._offset + jnp.where(self._mask[s], self._idx[s], 0)
            batch = {k: jnp.take(v, rows, axis=0, mode="clip") for k, v in self._data.items()}
            if self._preprocess is not None:
                batch = self._preprocess(batch, jax.random.fold_in(step_key, AUGMENT_STREAM))
            return batch

        def body(state, s):
            carry, sums = state
            step_key = jax.random.fold_in(key, s)
            batch = batch_of(s, step_key)
            mask = self._mask[s]
            new_carry, metrics = step(carry, batch, mask, step_key)
            live = self._live[s]
            carry = jax.tree_util.tree_map(lambda a, b: jnp.where(live, a, b), new_carry, carry)
            sums = jax.tree_util.tree_map(lambda acc, m: acc + jnp.where(live, m, 0), sums, metrics)
            return (carry, sums), None

        # Metric structure from an abstract evaluation of one step.
        shapes = jax.eval_shape(lambda c: step(c, batch_of(0, key), self._mask[0], key)[1], carry)
        sums0 = jax.tree_util.tree_map(lambda sd: jnp.zeros(sd.shape, jnp.float32), shapes)
        steps = jnp.arange(self.num_steps)
        unroll = True if (self._unroll is True or self._unroll >= self.num_steps) else int(self._unroll)
        (carry, sums), _ = jax.lax.scan(body, (carry, sums0), steps, unroll=unroll)
        if cell is not None:
            carry, cell.value = carry
        return carry, sums
