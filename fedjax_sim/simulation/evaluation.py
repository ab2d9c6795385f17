"""Evaluation of a global model: on a pooled test set, and per client (vmapped).

Both are single jitted programs over data placed on device once. Per-client evaluation
runs every client at once (vmap, in chunks to bound memory), each client scanning over
its own batches with padded examples masked out, and reports the distribution of the
per-client metric: researchers care about the worst clients, not only the mean.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_sim.algorithms.blocks import local_training
from fedjax_sim.engine import program_cache
from fedjax_sim.engine.contracts import Problem
from fedjax_sim.engine.batching import bits_needed, client_batches, make_schedule
from fedjax_sim.engine.cohort import map_clients
from fedjax_sim.engine.local import LocalData
from fedjax_sim.engine.round import DeviceData
from fedjax_sim.errors import UserError
from fedjax_sim.models.adapter import Model
from fedjax_sim.models.tasks import Task

PyTree = Any


def _masked_sums(model: Model, task: Task, input_key: str, params, model_state, batch, mask,
                 preprocess=None):
    if preprocess is not None:
        batch = preprocess(batch, None, train=False)
    outputs, _ = model.apply(params, model_state, batch[input_key], train=False)
    return task.masked_sums(outputs, batch[task.label_key], mask)


def _zero_sums(model: Model, task: Task, input_key: str, params, model_state, batch, mask,
               preprocess=None):
    """Float32 zeros shaped like `_masked_sums(...)`, to start an accumulation."""
    shapes = jax.eval_shape(
        lambda: _masked_sums(model, task, input_key, params, model_state, batch, mask, preprocess))
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)


class CentralEvaluator:
    """Loss and metrics of a model on one pooled dataset (dict of arrays); `preprocess`
    (data.augment.Preprocess) converts each batch on device."""

    def __init__(self, model: Model, task: Task, data: dict, *, input_key: str = "x",
                 batch_size: int = 256, preprocess=None):
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
                sums = _masked_sums(model, task, input_key, params, model_state, batch, m,
                                    preprocess)
                return jax.tree_util.tree_map(jnp.add, acc, sums), None

            zero = _zero_sums(model, task, input_key, params, model_state,
                              jax.tree_util.tree_map(lambda x: x[0], batches), mask[0],
                              preprocess)
            sums, _ = jax.lax.scan(body, zero, (batches, mask))
            count = jnp.maximum(sums.pop("count"), 1.0)
            return {k: v / count for k, v in sums.items()}

        self._evaluate = program_cache.jit(evaluate)

    def __call__(self, params, model_state) -> dict:
        return self._evaluate(params, model_state, self._batches, self._mask)


@dataclasses.dataclass(frozen=True)
class FineTune:
    """Personalized evaluation by local fine-tuning (e.g. Wang et al. 2019, pfl-research).

    Before each per-client evaluation, every evaluation client takes `steps` steps of
    `optimizer` (default SGD at `learning_rate`) on batches of `batch_size` examples of its
    OWN training split, starting from its model (the global model, or its personal model
    for personalized algorithms), and is evaluated again. Metrics before and after are
    reported side by side (`client_test_*` / `client_personal_*` and
    `client_finetuned_*`). The fine-tuned models are thrown away: training is unaffected.
    """

    steps: int = 5
    learning_rate: float = 0.01
    batch_size: int | None = 10
    optimizer: optax.GradientTransformation | None = None

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise UserError(f"FineTune.steps must be an integer >= 1, got {self.steps!r}")
        if not (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0):
            raise UserError(f"FineTune.learning_rate must be a number > 0, got {self.learning_rate!r}")
        if self.batch_size is not None and (isinstance(self.batch_size, bool) or not isinstance(
                self.batch_size, int) or self.batch_size < 1):
            raise UserError(f"FineTune.batch_size must be an integer >= 1 or None (full batch), "
                            f"got {self.batch_size!r}")

    def make_optimizer(self) -> optax.GradientTransformation:
        return self.optimizer or optax.sgd(self.learning_rate)


# Fine-tuning randomness: fold_in(fold_in(root, FINETUNE_STREAM), client id).
FINETUNE_STREAM = 0xF17E


class ClientEvaluator:
    """Per-client loss and metrics on every client of a FederatedData, in one program.

    For each evaluation client it reports (each a `{metric: [C]}` dict, see `__call__`):
      'test':      the global model (if the algorithm has one);
      'personal':  the client's personal model, `personalize(params, client_state)`,
                   run with `personal_state(model_state, client_state)` (its own
                   BatchNorm statistics under FedBN; by default the global state);
      'finetuned': that model after `finetune` steps on the client's own training rows.
    The clients run vmapped in chunks of `clients_per_chunk`. Fine-tuning reads the
    evaluation clients' rows of `train_data` (a FederatedData): from `train_arrays` (its
    `DeviceData`) when the caller has already placed it on device, or, with
    `train_stream` (engine.streaming.HostData: training data kept on host), block by block
    of clients, each block's training rows sent to the device for that block only.
    """

    def __init__(self, model: Model, task: Task, data, *, input_key: str = "x",
                 batch_size: int = 256, clients_per_chunk: int | None = 64,
                 global_model: bool = True, personalize=None, personal_state=None,
                 finetune: FineTune | None = None,
                 train_data=None, train_arrays=None, train_stream=None,
                 root: jax.Array | None = None, preprocess=None, block: int = 1024):
        self.client_ids = data.client_ids
        self.num_clients = data.num_clients
        self.personalized = personalize is not None
        self.block = block
        sizes = np.asarray(data.client_sizes)
        max_n = max(1, int(sizes.max()))
        b = max(1, min(batch_size, max_n))
        num_batches = math.ceil(max_n / b)
        keys = (input_key, task.label_key)
        features = {k: jax.device_put(data.features[k]) for k in keys}
        offsets = jnp.asarray(data.offsets[:-1], jnp.int32)
        sizes_d = jnp.asarray(sizes, jnp.int32)
        # Row of each evaluation client in the training data (and its client-state table).
        self.train_rows = np.arange(self.num_clients, dtype=np.int32)
        if train_data is not None and (self.personalized or finetune is not None):
            self.train_rows = _train_rows(data.client_ids, train_data.client_ids)
        tune = None
        self._train_arrays, self._train_stream = None, None
        if finetune is not None:
            if train_data is None:
                raise UserError("fine-tuning evaluation needs the training data of the "
                                "evaluation clients")
            tune = _fine_tuner(model, task, input_key, finetune, train_data.max_client_size,
                               root, preprocess)
            if train_stream is not None:
                self._train_stream = train_stream
            else:
                # The training data already placed for the rounds serves, not a second copy.
                self._train_arrays = (train_arrays if train_arrays is not None
                                      else DeviceData.from_federated(train_data))

        def sums_of(params, model_state, cid):
            def body(acc, j):
                local = j * b + jnp.arange(b)
                mask = local < sizes_d[cid]
                rows = offsets[cid] + jnp.where(mask, local, 0)
                batch = {k: v[rows] for k, v in features.items()}
                out = _masked_sums(model, task, input_key, params, model_state, batch, mask,
                                   preprocess)
                return jax.tree_util.tree_map(jnp.add, acc, out), None

            zero = _zero_sums(model, task, input_key, params, model_state,
                              {k: v[:b] for k, v in features.items()}, jnp.ones(b, bool),
                              preprocess)
            return jax.lax.scan(body, zero, jnp.arange(num_batches))[0]

        def evaluate(params, model_state, ids, train_rows, states, train_arrays):
            def one_client(per_client):
                cid, train_row, state = per_client
                out = {}
                if global_model:
                    out["test"] = sums_of(params, model_state, cid)
                own = personalize(params, state) if personalize is not None else params
                own_state = (personal_state(model_state, state)
                             if personalize is not None and personal_state is not None
                             else model_state)
                if personalize is not None:
                    out["personal"] = sums_of(own, own_state, cid)
                if tune is not None:
                    tuned = tune(own, own_state, train_row, train_arrays)
                    out["finetuned"] = sums_of(tuned, own_state, cid)
                return jnp.float32(0), jnp.float32(0), out

            _, _, sums = map_clients(one_client, (ids, train_rows, states), clients_per_chunk)
            return sums

        self._evaluate = program_cache.jit(evaluate)

    def __call__(self, params, model_state, client_states=None) -> dict:
        """Per-client metrics: {'test' | 'personal' | 'finetuned': {name: [C], 'count': [C]}}
        (NaN for clients with no examples).

        `client_states`: the algorithm's client-state table (rows indexed like the training
        clients), needed by personalized algorithms; device arrays, or numpy arrays kept on
        host (then streamed in blocks of clients).
        """
        ids = np.arange(self.num_clients, dtype=np.int32)
        host_states = self.personalized and _on_host(client_states)
        if host_states or self._train_stream is not None:
            sums = self._blocks(params, model_state, client_states)
        elif not self.personalized:
            sums = self._evaluate(params, model_state, ids, self.train_rows, None,
                                  self._train_arrays)
        else:
            states = jax.tree_util.tree_map(lambda t: t[self.train_rows], client_states)
            sums = self._evaluate(params, model_state, ids, self.train_rows, states,
                                  self._train_arrays)
        sums = jax.device_get(sums)
        out = {}
        for name, part in sums.items():
            count = part.pop("count")
            with np.errstate(invalid="ignore", divide="ignore"):
                per_client = {k: np.where(count > 0, v / count, np.nan) for k, v in part.items()}
            per_client["count"] = count
            out[name] = per_client
        return out

    def _blocks(self, params, model_state, client_states):
        """Evaluates blocks of `self.block` clients: each block takes its clients' rows of
        host-kept client states and, with streamed training data, their training rows."""
        parts = []
        block = min(self.block, self.num_clients)
        on_host = _on_host(client_states)
        for lo in range(0, self.num_clients, block):
            ids = np.arange(lo, lo + block, dtype=np.int32) % self.num_clients
            rows = self.train_rows[ids]
            states = None
            if self.personalized:
                states = jax.tree_util.tree_map(
                    lambda t: jnp.asarray(t[rows]) if on_host else t[rows], client_states)
            arrays = (self._train_stream.pack(rows) if self._train_stream is not None
                      else self._train_arrays)
            parts.append(jax.device_get(self._evaluate(params, model_state, ids, rows, states,
                                                       arrays)))
        joined = jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *parts)
        return jax.tree_util.tree_map(lambda x: x[:self.num_clients], joined)


def _on_host(tree) -> bool:
    leaves = jax.tree_util.tree_leaves(tree)
    return bool(leaves) and isinstance(leaves[0], np.ndarray)


def _train_rows(eval_ids, train_ids) -> np.ndarray:
    """Index in the training data of each evaluation client, matched by client id."""
    index = {cid: i for i, cid in enumerate(train_ids)}
    missing = [cid for cid in eval_ids if cid not in index]
    if missing:
        raise UserError(f"{len(missing)} per-client evaluation client(s) (e.g. {missing[0]!r}) "
                        f"are not among the training clients; personal models and fine-tuning "
                        f"need each evaluation client's own training split (split one "
                        f"FederatedData with .split())")
    return np.asarray([index[cid] for cid in eval_ids], np.int32)


def _fine_tuner(model: Model, task: Task, input_key: str, finetune: FineTune, max_size: int,
                root: jax.Array | None, preprocess=None):
    """tune(params, model_state, train_row, arrays) -> params after `finetune.steps` local
    steps on the client's rows of `arrays` (a DeviceData of the training data, or of the
    rows of a block of clients, indexed by training row either way)."""
    schedule = make_schedule(max_size, batch_size=finetune.batch_size, local_epochs=None,
                             local_steps=finetune.steps)
    stream = jax.random.fold_in(root if root is not None else jax.random.key(0), FINETUNE_STREAM)
    optimizer = finetune.make_optimizer()
    num_bits = bits_needed(schedule, max_size)
    train_preprocess = (None if preprocess is None
                        else lambda batch, rng: preprocess(batch, rng, train=True))

    def tune(params, model_state, row, arrays):
        features, offsets, sizes = arrays.features, arrays.offsets, arrays.sizes
        problem = Problem(model, task, model_state, input_key)
        key = jax.random.fold_in(stream, row)
        k_bits, k_train = jax.random.split(key)
        bits = jax.random.bits(k_bits, (num_bits,), jnp.uint32)
        idx, mask = client_batches(schedule, bits, sizes[row], max_size)
        local = LocalData(features, offsets[row], idx, mask, sizes[row], row, unroll=True,
                          preprocess=train_preprocess)
        return local_training(problem, optimizer, local, k_train, params)[0]

    return tune


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


class Evaluators(NamedTuple):
    """The evaluations a run makes every `eval_every` rounds: on the pooled test set
    (`test_*`), per training client (`client_*`), and per held-out client (`heldout_*`);
    each None where not asked for."""

    central: CentralEvaluator | None = None
    per_client: ClientEvaluator | None = None
    heldout: ClientEvaluator | None = None
    backdoor: CentralEvaluator | None = None  # accuracy on triggered test examples

    def __call__(self, params, model_state, client_states=None) -> tuple[dict, dict | None]:
        """(metrics row entries, the per-client metrics by client id, or None)."""
        out, clients = {}, None
        if self.central is not None:
            out.update({f"test_{k}": float(v) for k, v in
                        jax.device_get(self.central(params, model_state)).items()})
        if self.per_client is not None:
            parts = self.per_client(params, model_state, client_states)
            for name, values in parts.items():
                out.update(summarize_clients(values, prefix=f"client_{name}_"))
            clients = {"client_ids": [str(c) for c in self.per_client.client_ids],
                       **{name: {k: np.asarray(v).tolist() for k, v in values.items()}
                          for name, values in parts.items()}}
        if self.heldout is not None:
            for name, values in self.heldout(params, model_state).items():
                out.update(summarize_clients(values, prefix=f"heldout_{name}_"))
        if self.backdoor is not None:
            hit = jax.device_get(self.backdoor(params, model_state))
            out["backdoor_success"] = float(hit["accuracy"])
        return out, clients
