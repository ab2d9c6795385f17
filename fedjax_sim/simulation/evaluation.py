"""Evaluation of a global model: on a pooled test set, and per client (vmapped).

Both are single jitted programs over data placed on device once. Per-client evaluation
runs every client at once (vmap, in chunks to bound memory), each client scanning over
its own batches with padded examples masked out, and reports the distribution of the
per-client metric: researchers care about the worst clients, not only the mean.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.engine.cohort import map_clients
from fedjax_sim.models.adapter import Model
from fedjax_sim.models.tasks import Task

PyTree = Any


def _masked_sums(model: Model, task: Task, input_key: str, params, model_state, batch, mask):
    outputs, _ = model.apply(params, model_state, batch[input_key], train=False)
    return task.masked_sums(outputs, batch[task.label_key], mask)


def _zero_sums(model: Model, task: Task, input_key: str, params, model_state, batch, mask):
    """Float32 zeros shaped like `_masked_sums(...)`, to start an accumulation."""
    shapes = jax.eval_shape(
        lambda: _masked_sums(model, task, input_key, params, model_state, batch, mask))
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)


class CentralEvaluator:
    """Loss and metrics of a model on one pooled dataset (dict of arrays)."""

    def __init__(self, model: Model, task: Task, data: dict, *, input_key: str = "x",
                 batch_size: int = 256):
        n = len(data[task.label_key])
        b = max(1, min(batch_size, n))
        num_batches = math.ceil(n / b)
        pad = num_batches * b - n
        self.num_examples = n
        self._batches = {
            k: jax.device_put(np.concatenate([v, np.repeat(v[:1], pad, 0)]).reshape(
                num_batches, b, *v.shape[1:])) for k, v in data.items()
            if k in (input_key, task.label_key)}
        self._mask = jax.device_put((np.arange(num_batches * b) < n).reshape(num_batches, b))

        def evaluate(params, model_state, batches, mask):
            def body(acc, xs):
                batch, m = xs
                sums = _masked_sums(model, task, input_key, params, model_state, batch, m)
                return jax.tree_util.tree_map(jnp.add, acc, sums), None

            zero = _zero_sums(model, task, input_key, params, model_state,
                              jax.tree_util.tree_map(lambda x: x[0], batches), mask[0])
            sums, _ = jax.lax.scan(body, zero, (batches, mask))
            count = jnp.maximum(sums.pop("count"), 1.0)
            return {k: v / count for k, v in sums.items()}

        self._evaluate = jax.jit(evaluate)

    def __call__(self, params, model_state) -> dict:
        return self._evaluate(params, model_state, self._batches, self._mask)


class ClientEvaluator:
    """Per-client loss and metrics of one model on every client of a FederatedData."""

    def __init__(self, model: Model, task: Task, data, *, input_key: str = "x",
                 batch_size: int = 256, clients_per_chunk: int | None = 64):
        self.client_ids = data.client_ids
        sizes = np.asarray(data.client_sizes)
        max_n = max(1, int(sizes.max()))
        b = max(1, min(batch_size, max_n))
        num_batches = math.ceil(max_n / b)
        keys = (input_key, task.label_key)
        features = {k: jax.device_put(data.features[k]) for k in keys}
        offsets = jnp.asarray(data.offsets[:-1], jnp.int32)
        sizes_d = jnp.asarray(sizes, jnp.int32)
        num_clients = len(sizes)

        def evaluate(params, model_state, features, offsets, sizes):
            def one_client(cid):
                def body(acc, j):
                    local = j * b + jnp.arange(b)
                    mask = local < sizes[cid]
                    rows = offsets[cid] + jnp.where(mask, local, 0)
                    batch = {k: v[rows] for k, v in features.items()}
                    sums = _masked_sums(model, task, input_key, params, model_state, batch, mask)
                    return jax.tree_util.tree_map(jnp.add, acc, sums), None

                zero = _zero_sums(model, task, input_key, params, model_state,
                                  {k: v[:b] for k, v in features.items()}, jnp.ones(b, bool))
                sums, _ = jax.lax.scan(body, zero, jnp.arange(num_batches))
                return jnp.float32(0), jnp.float32(0), sums

            _, _, sums = map_clients(one_client, jnp.arange(num_clients, dtype=jnp.int32),
                                     clients_per_chunk)
            return sums

        self._evaluate = jax.jit(lambda p, s: evaluate(p, s, features, offsets, sizes_d))

    def __call__(self, params, model_state) -> dict:
        """Per-client metrics `{name: [C]}` (NaN for clients with no examples) and `count`."""
        sums = jax.device_get(self._evaluate(params, model_state))
        count = sums.pop("count")
        with np.errstate(invalid="ignore", divide="ignore"):
            per_client = {k: np.where(count > 0, v / count, np.nan) for k, v in sums.items()}
        per_client["count"] = count
        return per_client


def summarize_clients(per_client: dict, prefix: str = "client_") -> dict:
    """Mean and percentiles (10, 50, 90) and min of each per-client metric, skipping empty clients."""
    live = per_client["count"] > 0
    out = {}
    for name, values in per_client.items():
        if name == "count" or not live.any():
            continue
        v = values[live]
        out[f"{prefix}{name}_mean"] = float(np.mean(v))
        out[f"{prefix}{name}_p10"] = float(np.percentile(v, 10))
        out[f"{prefix}{name}_p50"] = float(np.percentile(v, 50))
        out[f"{prefix}{name}_p90"] = float(np.percentile(v, 90))
        out[f"{prefix}{name}_min"] = float(np.min(v))
    out[f"{prefix}count"] = int(live.sum())
    return out
