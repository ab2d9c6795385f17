"""The run directory: `config.json`, `metrics.jsonl`, `summary.json`, `params.npz` and
`client_metrics.json`, each written whole or not at all, and the description of a run
that identifies it on resume.

`metrics.jsonl` is strict JSON, one object per round: a metric that is NaN or infinite
(a diverged round) is written as `null`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Sequence

import numpy as np

from fedjax_sim.errors import UserError
from fedjax_sim.simulation.checkpoint import checksum, export_params

CONFIG, METRICS, SUMMARY, PARAMS, CLIENT_METRICS = (
    "config.json", "metrics.jsonl", "summary.json", "params.npz", "client_metrics.json")


def json_safe(value):
    """`value` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def metrics_line(row: dict) -> str:
    return json.dumps(json_safe(row), allow_nan=False) + "\n"


def atomic_write(path: str, text: str) -> None:
    """Writes `path` whole or not at all (a crash leaves the previous file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def make_directory(path: str, what: str) -> None:
    """Creates `path` (and its parents); a one-line UserError naming `what` where it cannot."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {what} {path} ({e.strerror}); choose a writable "
                        f"path") from None


class RunDirectory:
    """The files of one run in `workdir` (created if needed).

    `writer=False` (every process but the first of a multi-process run): the directory
    is read (checkpoints, a finished run's summary) but never written."""

    def __init__(self, workdir: str, writer: bool = True):
        self.writer = writer
        if os.path.exists(workdir) and not os.path.isdir(workdir):
            raise UserError(f"workdir {workdir} exists and is not a directory; choose another path")
        make_directory(workdir, "workdir")
        self.workdir = workdir
        self.checkpoints = os.path.join(workdir, "checkpoints")

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    def write_json(self, name: str, value) -> None:
        if not self.writer:
            return
        atomic_write(self.path(name), json.dumps(json_safe(value), indent=2, default=str))

    def read_json(self, name: str):
        if not os.path.isfile(self.path(name)):
            return None
        with open(self.path(name)) as f:
            return json.load(f)

    def rewrite_metrics(self, rows: list[dict]) -> None:
        if not self.writer:
            return
        atomic_write(self.path(METRICS), "".join(metrics_line(row) for row in rows))

    def export_params(self, params) -> None:
        if not self.writer:
            return
        export_params(params, self.path(PARAMS))


class MetricsLog:
    """Appends rows to the in-memory history, to `metrics.jsonl` and to callbacks (each
    called with every row, in order).

    The file restarts from `history` (what a checkpoint recorded: rows logged after it are
    redone by the resumed run)."""

    def __init__(self, history: list[dict], files: RunDirectory | None,
                 callbacks: Sequence[Callable[[dict], None]] = ()):
        self.history, self._callbacks = history, list(callbacks)
        self._writer = None
        if files is not None and files.writer:
            files.rewrite_metrics(history)
            self._writer = open(files.path(METRICS), "a")

    def log(self, rows: list[dict]) -> None:
        for row in rows:
            self.history.append(row)
            if self._writer:
                self._writer.write(metrics_line(row))
            for callback in self._callbacks:
                callback(row)
        if self._writer:
            self._writer.flush()

    def close(self) -> None:
        if self._writer:
            self._writer.close()


def optimizer_fingerprint(optimizer) -> dict | None:
    """What an optax optimizer does, as JSON: its first update of a fixed probe tree
    (`first_update`, readable: plain SGD gives -lr times the probe gradient) and a digest
    of its updates over three steps (`steps`). Two optimizers that agree made the same
    steps there, so a changed learning rate, momentum or schedule shows (the
    hyperparameters themselves are hidden in closures). None where the optimizer cannot
    run on the probe."""
    import jax.numpy as jnp
    import optax

    params = {"w": jnp.asarray([0.3, -1.2, 2.0, 0.05], jnp.float32)}
    try:
        state = optimizer.init(params)
        steps = []
        for t in range(3):
            grads = {"w": jnp.asarray([0.5, -0.25, 1.0, 2.0], jnp.float32) * (t + 1)}
            updates, state = optimizer.update(grads, state, params)
            params = optax.apply_updates(params, updates)
            steps.append(np.asarray(updates["w"], np.float64))
    except Exception:  # e.g. a transformation that needs the model's own tree structure
        return None
    first = [float(f"{x:.6g}") for x in steps[0]]
    return {"first_update": first, "steps": checksum({"steps": np.stack(steps).round(7)})}


def describe(value, depth=0):
    """A JSON description of an algorithm/aggregator object: its class and simple fields.
    Functions are described by type only; an optax optimizer by its type and
    `optimizer_fingerprint`."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if hasattr(value, "init") and hasattr(value, "update") and callable(value.update):
        return {"class": type(value).__name__, **(optimizer_fingerprint(value) or {})}
    if depth > 4:
        return type(value).__name__
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"class": type(value).__name__,
                **{f.name: describe(getattr(value, f.name), depth + 1)
                   for f in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return [describe(v, depth + 1) for v in value]
    return type(value).__name__


def data_digest(data) -> str | None:
    if data is None:
        return None
    if hasattr(data, "features"):
        return checksum({"features": dict(data.features), "offsets": np.asarray(data.offsets)})
    return checksum(dict(data))


def describe_run(*, model, algorithm, train_data, task, aggregator, clients_per_round,
                 eval_every, seed, engine, input_key, eval_data, client_eval_data,
                 privacy=None, batch_norm=None, initial_params=None, attack=None) -> dict:
    """What identifies a run of `simulate()` when no config is given: checked on resume.

    Optimizer hyperparameters live inside optax closures: an optimizer is described by
    what it does on a probe (`optimizer_fingerprint`), so a changed learning rate is seen.
    Pass `config=` (any JSON-like dict of your hyperparameters) to have them named.
    """
    return {
        "clients_per_round": clients_per_round, "eval_every": eval_every, "seed": seed,
        "model": model.name, "task": task.name, "input_key": input_key,
        "algorithm": describe(algorithm), "aggregator": describe(aggregator),
        "engine": describe(engine),
        "data": {"num_clients": train_data.num_clients, "num_examples": train_data.num_examples,
                 "digest": data_digest(train_data)},
        "eval_data": data_digest(eval_data), "client_eval_data": data_digest(client_eval_data),
        "privacy": describe(privacy),
        **({"batch_norm": batch_norm} if batch_norm is not None else {}),
        **({"initial_params": checksum(initial_params)} if initial_params is not None else {}),
        **({"attack": attack.describe()} if attack is not None else {}),
    }
