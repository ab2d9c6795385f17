"""Partitioners: split one centralised dataset into C simulated clients.

Every partitioner is a pure function with the same signature,

    fn(labels: np.ndarray, num_clients: int, *, seed: int, **params) -> list[np.ndarray],

returning C sorted int64 index arrays that together cover every example index
0..N-1 exactly once. Randomness comes only from `np.random.default_rng(seed)`, so the same
arguments always give the same partition.
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping

import numpy as np

from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.data.federated_data import _num_examples as _feature_count
from fedjax_sim.errors import UserError

Partitioner = Callable[..., list[np.ndarray]]


def _check_num_clients(num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise UserError(f"num_clients must be an int, got {num_clients!r}")
    if num_clients < 1:
        raise UserError(f"num_clients must be >= 1, got {num_clients}")


def _num_examples(labels: np.ndarray) -> int:
    labels = np.asarray(labels)
    if labels.ndim < 1:
        raise UserError("labels must have a leading example axis; pass an array of shape [N]")
    return labels.shape[0]


def _class_labels(labels: np.ndarray, partitioner: str) -> np.ndarray:
    """Labels as a 1-D array, accepting [N] or [N, 1]; label-based splits need one per row."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise UserError(
            f"the {partitioner!r} partitioner needs one class label per example (shape [N]), "
            f"got shape {labels.shape}; pass the label column")
    return labels


def _sorted_int64(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(p).astype(np.int64, copy=False) for p in parts]


def iid(labels: np.ndarray, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """IID split: a uniform random permutation of 0..N-1 cut into C near-equal parts.

    Client sizes are floor(N / C) or ceil(N / C) (`np.array_split`).
    """
    _check_num_clients(num_clients)
    n = _num_examples(labels)
    rng = np.random.default_rng(seed)
    return _sorted_int64(np.array_split(rng.permutation(n), num_clients))


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    *,
    seed: int,
    alpha: float,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Dirichlet label skew (Hsu et al. 2019), in its common per-class form.

    For every class k independently, draw client proportions p_k ~ Dir(alpha * 1_C),
    shuffle the n_k examples of class k, and give client i the slice

        [floor(n_k * P_k(i-1)), floor(n_k * P_k(i))),   P_k(i) = sum_{j <= i} p_k(j).

    Small alpha concentrates each class on few clients (strong skew); alpha -> infinity
    approaches an IID split. The whole draw is repeated until every client holds at least
    `min_size` examples.

    Args:
      labels: [N] class labels (any dtype; each distinct value is a class).
      num_clients: C >= 1.
      seed: seeds `np.random.default_rng`.
      alpha: Dirichlet concentration, > 0.
      min_size: smallest acceptable client size.
      max_tries: draws to attempt before giving up.
    """
    _check_num_clients(num_clients)
    labels = _class_labels(labels, "dirichlet")
    if not np.isfinite(alpha) or alpha <= 0:
        raise UserError(f"dirichlet alpha must be > 0, got {alpha}; e.g. use alpha=0.5")
    if min_size < 0 or max_tries < 1:
        raise UserError(
            f"dirichlet needs min_size >= 0 and max_tries >= 1, got {min_size} and {max_tries}")
    n = labels.shape[0]
    if n < num_clients * min_size:
        raise UserError(
            f"dirichlet cannot give {num_clients} clients >= {min_size} examples each from {n} "
            f"examples; lower min_size or num_clients")
    rng = np.random.default_rng(seed)
    class_rows = [np.flatnonzero(labels == k) for k in np.unique(labels)]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for rows in class_rows:
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(p)[:-1] * rows.size).astype(np.int64)
            for i, piece in enumerate(np.split(rng.permutation(rows), cuts)):
                parts[i].append(piece)
        result = [np.concatenate(p) if p else np.zeros(0, np.int64) for p in parts]
        if min(r.size for r in result) >= min_size:
            return _sorted_int64(result)
    raise UserError(
        f"dirichlet(alpha={alpha}) gave some client < {min_size} examples in all {max_tries} "
        f"draws; lower min_size or num_clients, or raise alpha")


def shards(
    labels: np.ndarray, num_clients: int, *, seed: int, shards_per_client: int = 2
) -> list[np.ndarray]:
    """Pathological non-IID split of McMahan et al. 2017.

    Sort the examples by label (ties in a seeded random order), cut the sorted list into
    S = C * shards_per_client contiguous shards of near-equal size (`np.array_split`), and
    give each client `shards_per_client` shards chosen uniformly without replacement. When
    each shard is no larger than the smallest class, a shard spans at most two labels, so a
    client sees at most 2 * shards_per_client labels (and exactly shards_per_client when
    the shard size divides every class size).
    """
    _check_num_clients(num_clients)
    labels = _class_labels(labels, "shards")
    if isinstance(shards_per_client, bool) or shards_per_client < 1:
        raise UserError(f"shards_per_client must be >= 1, got {shards_per_client}")
    n = labels.shape[0]
    num_shards = num_clients * shards_per_client
    if n < num_shards:
        raise UserError(
            f"shards needs at least {num_shards} examples (num_clients * shards_per_client), "
            f"got {n}; lower num_clients or shards_per_client")
    rng = np.random.default_rng(seed)
    # Shuffle first so the stable sort leaves examples of one class in random order.
    shuffled = rng.permutation(n)
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(by_label, num_shards)
    owner = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return _sorted_int64([np.concatenate([pieces[s] for s in row]) for row in owner])


def _proportional_sizes(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to `total`, proportional to `weights` (largest-remainder rounding).

    Each share is floor(total * w_i / sum w); the leftover units go one each to the largest
    fractional parts, ties to the lower index, so the result is deterministic.
    """
    exact = total * weights / weights.sum()
    sizes = np.floor(exact).astype(np.int64)
    leftover = total - int(sizes.sum())
    order = np.argsort(-(exact - sizes), kind="stable")
    sizes[order[:leftover]] += 1
    return sizes


def quantity_skew(
    labels: np.ndarray, num_clients: int, *, seed: int, sigma: float = 1.0, min_size: int = 1
) -> list[np.ndarray]:
    """Quantity skew: lognormal client sizes, examples assigned IID.

    Draw w_i ~ LogNormal(0, sigma) for every client and set

        n_i = min_size + round_i((N - C * min_size) * w_i / sum_j w_j),

    where the rounding is largest-remainder, so sum_i n_i = N exactly and n_i >= min_size.
    A uniform random permutation of 0..N-1 is then cut at those sizes. sigma = 0 gives
    near-equal sizes; larger sigma gives more unequal ones.
    """
    _check_num_clients(num_clients)
    if not np.isfinite(sigma) or sigma < 0:
        raise UserError(f"quantity_skew sigma must be >= 0, got {sigma}; e.g. use sigma=1.0")
    if min_size < 0:
        raise UserError(f"quantity_skew min_size must be >= 0, got {min_size}")
    n = _num_examples(labels)
    if n < num_clients * min_size:
        raise UserError(
            f"quantity_skew cannot give {num_clients} clients >= {min_size} examples each from "
            f"{n} examples; lower min_size or num_clients")
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, sigma, num_clients)
    sizes = min_size + _proportional_sizes(weights, n - num_clients * min_size)
    perm = rng.permutation(n)
    return _sorted_int64(np.split(perm, np.cumsum(sizes)[:-1]))


PARTITIONERS: dict[str, Partitioner] = {
    "iid": iid,
    "dirichlet": dirichlet,
    "shards": shards,
    "quantity_skew": quantity_skew,
}


def get_partitioner(name: str) -> Partitioner:
    """The partitioner registered as `name` in `PARTITIONERS`."""
    if name not in PARTITIONERS:
        raise UserError(f"unknown partitioner {name!r}; pick one of {sorted(PARTITIONERS)}")
    return PARTITIONERS[name]


def partition(
    features: Mapping[str, np.ndarray],
    labels: np.ndarray,
    name: str,
    num_clients: int,
    *,
    seed: int,
    **params: object,
) -> FederatedData:
    """Partitions centralised `features` into `num_clients` clients with partitioner `name`.

    Args:
      features: name -> array [N, ...].
      labels: [N] labels the partitioner splits on (e.g. `features['y']`).
      name: a key of `PARTITIONERS`.
      num_clients: 1 <= C <= N.
      seed: seeds the partitioner.
      **params: the partitioner's own parameters (e.g. `alpha` for 'dirichlet').
    """
    fn = get_partitioner(name)
    _check_num_clients(num_clients)
    n = _num_examples(labels)
    num_features = _feature_count(features)
    if num_features != n:
        raise UserError(
            f"labels have {n} examples but features have {num_features}; pass labels and "
            f"features with the same leading dimension")
    if num_clients > n:
        raise UserError(
            f"num_clients={num_clients} exceeds the {n} examples; use at most {n} clients")
    try:
        # Bind before calling, so a misspelt or missing keyword reads as a config mistake
        # while a TypeError raised inside the partitioner still surfaces as a bug.
        inspect.signature(fn).bind(labels, num_clients, seed=seed, **params)
    except TypeError as e:
        raise UserError(f"bad parameters {sorted(params)} for partitioner {name!r}: {e}") from e
    return FederatedData.from_partition(features, fn(labels, num_clients, seed=seed, **params))


def label_skew(histogram: np.ndarray) -> float:
    """Size-weighted mean total-variation distance from the global label distribution.

    For a histogram h [C, K] (h[i, k] = examples of client i with label k), with client
    sizes n_i = sum_k h[i, k], N = sum_i n_i, client distributions p_i = h[i] / n_i and the
    global distribution g = sum_i h[i] / N,

        skew = sum_i (n_i / N) * TV(p_i, g),   TV(p, q) = 1/2 * sum_k |p_k - q_k|.

    It lies in [0, 1]: 0 when every client has the global label mix (IID), approaching 1
    when every client holds a single label out of many. Empty clients carry weight 0.
    """
    h = np.asarray(histogram, dtype=np.float64)
    if h.ndim != 2:
        raise UserError(
            f"label_skew needs a [num_clients, num_classes] histogram, got shape {h.shape}; "
            f"use FederatedData.label_histogram()")
    if np.any(h < 0) or not np.all(np.isfinite(h)):
        raise UserError("label_skew histogram has negative or non-finite counts; pass counts")
    sizes = h.sum(axis=1)
    total = sizes.sum()
    if total <= 0:
        raise UserError("label_skew histogram is all zeros; it needs at least one example")
    global_dist = h.sum(axis=0) / total
    client_dist = h / np.maximum(sizes, 1.0)[:, None]
    tv = 0.5 * np.abs(client_dist - global_dist).sum(axis=1)
    # Empty clients have client_dist = 0, hence tv = 0.5, but weight 0 cancels it.
    return float(np.sum(sizes / total * tv))
