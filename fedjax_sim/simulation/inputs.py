"""Checks of what `simulate()` is given, before anything is compiled: each mistake is one
`UserError` line naming the problem and the fix."""

from __future__ import annotations

import numpy as np

from fedjax_sim.errors import UserError

# What to say about the kinds of data a user may pass.
_FEDERATED_HINT = ("a FederatedData (e.g. fs.data.partition(arrays, labels, 'iid', num_clients, "
                   "seed=0) or FederatedData.from_client_column(...))")


def check_counts(rounds, clients_per_round, eval_every) -> None:
    for name, value in (("rounds", rounds), ("clients_per_round", clients_per_round),
                        ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UserError(f"{name} must be an integer >= 1, got {value!r}")


def is_federated(data) -> bool:
    return all(hasattr(data, a) for a in ("client_ids", "features", "offsets"))


def check_train_data(model, train_data, clients_per_round, task, input_key) -> None:
    if not is_federated(train_data):
        raise UserError(f"train_data must be {_FEDERATED_HINT}, got {type(train_data).__name__}")
    if clients_per_round > train_data.num_clients:
        raise UserError(f"clients_per_round={clients_per_round} exceeds the "
                        f"{train_data.num_clients} clients in the training data; lower "
                        f"clients_per_round or partition into more clients")
    empty = train_data.empty_clients()
    if empty:
        raise UserError(f"{len(empty)} training client(s) have no examples (e.g. {empty[0]!r}); "
                        f"drop them with data.drop_empty() or use a partitioner with min_size >= 1")
    _check_keys(train_data.features, "training data", task, input_key)
    x = train_data.features[input_key]
    if tuple(x.shape[1:]) != tuple(model.input_shape):
        raise UserError(f"model {model.name} expects inputs of shape {list(model.input_shape)} "
                        f"but the data's {input_key!r} examples are {list(x.shape[1:])}; build "
                        f"the model with input_shape={tuple(x.shape[1:])}")
    _check_finite(train_data.features, "training data", task, input_key, train_data)


def check_eval_data(eval_data, client_eval_data, task, input_key) -> None:
    """The pooled and per-client test sets: the features the model and task read, finite."""
    if eval_data is not None:
        if is_federated(eval_data) or not hasattr(eval_data, "keys"):
            raise UserError(f"eval_data must be a dict of arrays (the pooled test set), got "
                            f"{type(eval_data).__name__}; per-client test splits go to "
                            f"client_eval_data")
        _check_keys(eval_data, "eval_data", task, input_key)
        _check_finite(eval_data, "eval_data", task, input_key)
    if client_eval_data is not None:
        if not is_federated(client_eval_data):
            raise UserError(f"client_eval_data must be {_FEDERATED_HINT} of the clients' test "
                            f"splits (e.g. from clients.split(0.2, seed=0)), got "
                            f"{type(client_eval_data).__name__}")
        _check_keys(client_eval_data.features, "client_eval_data", task, input_key)
        _check_finite(client_eval_data.features, "client_eval_data", task, input_key,
                      client_eval_data)


def check_labels(task, output_shape, eval_data, client_eval_data, train_labels) -> None:
    """The task's output/label check on the training labels, then on every test set."""
    if task.check is None:
        return
    task.check(tuple(output_shape), np.asarray(train_labels))
    for name, features in (("eval_data", eval_data),
                           ("client_eval_data", getattr(client_eval_data, "features", None))):
        if features is None:
            continue
        try:
            task.check(tuple(output_shape), np.asarray(features[task.label_key]))
        except UserError as e:
            raise UserError(f"{name}: {e}") from None


def _check_keys(features, what, task, input_key) -> None:
    for key in (input_key, task.label_key):
        if key not in features:
            raise UserError(f"{what} has no feature {key!r} (it has {list(features)}); name the "
                            f"features 'x' and 'y' or set input_key / the task's label_key")


def _check_finite(features, what, task, input_key, federated=None) -> None:
    for key in (input_key, task.label_key):
        values = np.asarray(features[key])
        if not np.issubdtype(values.dtype, np.inexact) or _all_finite(values):
            continue
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            first = int(np.argmax(bad))
            where = f"example {first}"
            if federated is not None:
                client = int(np.searchsorted(np.asarray(federated.offsets), first, side="right")) - 1
                where = f"example {first} (client {federated.client_ids[client]!r})"
            raise UserError(f"{what}'s {key!r} holds NaN or Inf in {int(bad.sum())} example(s), "
                            f"first at {where}; clean or drop those examples before training")


def _all_finite(values: np.ndarray) -> bool:
    """np.isfinite(values).all(), a block of rows at a time: no temporary as large as the
    data, and no per-row reduction (which costs ~10x more) unless a value is bad."""
    rows = max(1, (1 << 22) // max(1, values[:1].size))
    return all(bool(np.isfinite(values[lo:lo + rows]).all()) for lo in range(0, len(values), rows))
