"""A federated dataset: every client's examples in one set of arrays, grouped by client.

All examples live in one dict of arrays with a shared leading axis N, with the rows of
each client contiguous. Client i owns rows `offsets[i]:offsets[i + 1]`, so with
`C` clients

    offsets = [0, n_0, n_0 + n_1, ..., n_0 + ... + n_{C-1} = N],

and `n_i = offsets[i + 1] - offsets[i]` is the size of client i. One flat layout (rather
than a list of per-client dicts) makes a client a pair of slice bounds, so selecting,
splitting and padding clients never walks Python objects per example.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Mapping, Sequence

import numpy as np

from fedjax_sim.errors import UserError


def _num_examples(features: Mapping[str, np.ndarray]) -> int:
    """Checks that `features` is a non-empty dict of arrays sharing a leading axis; returns it."""
    if not isinstance(features, Mapping) or not features:
        raise UserError(
            "federated data needs a non-empty dict of feature arrays; pass e.g. "
            "{'x': x, 'y': y}")
    sizes = {}
    for name, value in features.items():
        if not isinstance(name, str):
            raise UserError(f"feature name {name!r} is not a string; use string keys")
        if not isinstance(value, np.ndarray):
            raise UserError(
                f"feature {name!r} is a {type(value).__name__}, not a numpy array; convert "
                f"it with np.asarray")
        if value.ndim == 0:
            raise UserError(
                f"feature {name!r} is a scalar; every feature needs a leading example axis")
        sizes[name] = value.shape[0]
    if len(set(sizes.values())) != 1:
        raise UserError(
            f"features have different numbers of examples {sizes}; give every feature the "
            f"same leading dimension")
    return next(iter(sizes.values()))


def _as_index_array(indices: object, what: str) -> np.ndarray:
    """Converts a 1-D sequence of integer indices to int64, rejecting floats and bools."""
    array = np.asarray(indices)
    if array.size == 0:
        # np.asarray([]) is float64; an empty list still means "no indices".
        return np.zeros(0, np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise UserError(
            f"{what} must be a 1-D sequence of integers, got shape {array.shape} dtype "
            f"{array.dtype}; pass integer indices")
    return array.astype(np.int64, copy=False)


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedData:
    """Examples of C clients stored in one set of arrays, grouped by client.

    Attributes:
      features: name -> array; every array has the same leading axis N over all examples,
        with the rows of each client contiguous.
      offsets: int64 [C + 1]; `offsets[0] == 0`, `offsets[-1] == N`, non-decreasing.
        Client i owns rows `offsets[i]:offsets[i + 1]`.
      client_ids: C unique string ids, in client order.

    Equality is identity (`eq=False`): comparing arrays element-wise has no single truth
    value, so compare `features`/`offsets` explicitly when that is what is meant.
    """

    features: dict[str, np.ndarray]
    offsets: np.ndarray
    client_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        n = _num_examples(self.features)
        offsets = np.asarray(self.offsets)
        if offsets.ndim != 1 or offsets.size < 1 or not np.issubdtype(offsets.dtype, np.integer):
            raise UserError(
                f"offsets must be a 1-D integer array of length num_clients + 1, got shape "
                f"{offsets.shape} dtype {offsets.dtype}; build it as [0, *cumsum(client_sizes)]")
        if offsets[0] != 0 or offsets[-1] != n:
            raise UserError(
                f"offsets must start at 0 and end at the number of examples {n}, got "
                f"{int(offsets[0])}..{int(offsets[-1])}; build it as [0, *cumsum(client_sizes)]")
        if np.any(np.diff(offsets) < 0):
            raise UserError(
                "offsets must be non-decreasing (client sizes >= 0); build it as "
                "[0, *cumsum(client_sizes)]")
        ids = tuple(self.client_ids)
        if not all(isinstance(i, str) for i in ids):
            raise UserError("client_ids must be strings; convert them with str()")
        if len(ids) != offsets.size - 1:
            raise UserError(
                f"got {len(ids)} client_ids for {offsets.size - 1} clients (len(offsets) - 1); "
                f"give one id per client")
        if len(set(ids)) != len(ids):
            dupes = sorted(i for i, count in collections.Counter(ids).items() if count > 1)
            raise UserError(f"client ids are not unique (repeated: {dupes[:5]}); make them unique")
        # Normalise in place: the dataclass is frozen, but these are the same values in
        # their canonical types (int64 offsets, a tuple of ids, a plain dict).
        object.__setattr__(self, "features", dict(self.features))
        object.__setattr__(self, "offsets", offsets.astype(np.int64, copy=False))
        object.__setattr__(self, "client_ids", ids)

    # ---------------------------------------------------------------- properties

    @property
    def num_clients(self) -> int:
        """C, the number of clients."""
        return len(self.client_ids)

    @property
    def num_examples(self) -> int:
        """N, the number of examples over all clients."""
        return int(self.offsets[-1])

    @property
    def client_sizes(self) -> np.ndarray:
        """int64 [C]: `n_i = offsets[i + 1] - offsets[i]`."""
        return np.diff(self.offsets).astype(np.int64, copy=False)

    @property
    def max_client_size(self) -> int:
        """max_i n_i (0 when there are no clients)."""
        sizes = self.client_sizes
        return int(sizes.max()) if sizes.size else 0

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Feature names, in insertion order."""
        return tuple(self.features)

    # ---------------------------------------------------------------- access

    def client(self, i: int) -> dict[str, np.ndarray]:
        """Rows `offsets[i]:offsets[i + 1]` of every feature (views, not copies)."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise UserError(f"client index must be an int, got {type(i).__name__}; pass 0..C-1")
        if not 0 <= i < self.num_clients:
            raise UserError(
                f"client index {i} is out of range for {self.num_clients} clients; pass "
                f"0..{self.num_clients - 1}")
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return {name: value[lo:hi] for name, value in self.features.items()}

    def _client_rows(self, i: int) -> np.ndarray:
        return np.arange(self.offsets[i], self.offsets[i + 1], dtype=np.int64)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_client_column(
        cls, features: Mapping[str, np.ndarray], client_column: np.ndarray
    ) -> FederatedData:
        """The natural partition: groups rows by the client id in `client_column`.

        Clients are ordered by `np.unique` of the column in its own dtype (so integer ids
        sort numerically: 2 before 10); within a client the original row order is kept.
        Ids are stored as `str(id)` (bytes are decoded as UTF-8).

        Args:
          features: name -> array [N, ...].
          client_column: [N] client id of every row, any dtype.
        """
        n = _num_examples(features)
        column = np.asarray(client_column)
        if column.ndim != 1 or column.shape[0] != n:
            raise UserError(
                f"client_column must have shape [{n}] (one id per example), got "
                f"{column.shape}; pass the per-example client id array")
        unique, inverse = np.unique(column, return_inverse=True)
        inverse = inverse.reshape(-1)
        # A stable sort keeps each client's rows in their original order.
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=unique.size)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        ids = tuple(u.decode("utf-8") if isinstance(u, bytes) else str(u) for u in unique.tolist())
        return cls({k: v[order] for k, v in features.items()}, offsets, ids)

    @classmethod
    def from_partition(
        cls,
        features: Mapping[str, np.ndarray],
        index_lists: Sequence[Sequence[int] | np.ndarray],
        client_ids: Sequence[str] | None = None,
    ) -> FederatedData:
        """Client i gets rows `index_lists[i]` of `features`, in that order.

        The lists need not cover every example (a subset is fine), and an index may appear
        more than once (e.g. to oversample); each must lie in [0, N).

        Args:
          features: name -> array [N, ...].
          index_lists: C integer index arrays.
          client_ids: C unique strings; defaults to "0", ..., "C-1".
        """
        n = _num_examples(features)
        lists = [_as_index_array(idx, f"index_lists[{i}]") for i, idx in enumerate(index_lists)]
        for i, idx in enumerate(lists):
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise UserError(
                    f"index_lists[{i}] has indices outside [0, {n}) (min {int(idx.min())}, "
                    f"max {int(idx.max())}); pass row indices into the {n} examples")
        if client_ids is None:
            client_ids = tuple(str(i) for i in range(len(lists)))
        order = np.concatenate(lists) if lists else np.zeros(0, np.int64)
        sizes = np.array([idx.size for idx in lists], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return cls({k: v[order] for k, v in features.items()}, offsets, tuple(client_ids))

    # ---------------------------------------------------------------- derived datasets

    def split(self, test_fraction: float, seed: int) -> tuple[FederatedData, FederatedData]:
        """Per-client holdout: every client keeps its own test examples.

        Client i (n_i examples) shuffles its rows with a generator seeded by `seed` and
        sends the first t_i to test, where

            t_i = round(n_i * test_fraction)   (round half to even), then
            t_i = min(t_i, n_i - 1) if n_i >= 2,   t_i = 0 if n_i <= 1,

        so every non-empty client keeps at least one training example. Both parts keep
        the client ids and order (test may have empty clients) and, within a client, the
        original relative row order.

        Args:
          test_fraction: in [0, 1).
          seed: seeds `np.random.default_rng`; the same seed gives the same split.
        """
        if isinstance(test_fraction, bool) or not isinstance(
                test_fraction, (int, float, np.integer, np.floating)):
            raise UserError(f"test_fraction must be a number in [0, 1), got {test_fraction!r}")
        if not 0.0 <= float(test_fraction) < 1.0:
            raise UserError(f"test_fraction must be in [0, 1), got {test_fraction}; e.g. use 0.2")
        sizes = self.client_sizes
        test_counts = np.array([round(int(n) * float(test_fraction)) for n in sizes], np.int64)
        test_counts = np.where(sizes >= 2, np.minimum(test_counts, sizes - 1), 0)
        return self._split_with_counts(test_counts, seed)

    def _split_with_counts(
        self, test_counts: np.ndarray, seed: int
    ) -> tuple[FederatedData, FederatedData]:
        """Shuffles each client's rows; the first `test_counts[i]` go to test, the rest train."""
        rng = np.random.default_rng(seed)
        train_lists, test_lists = [], []
        for i in range(self.num_clients):
            # One permutation per client, empty ones included, so client i's split does not
            # depend on which other clients happen to be empty.
            rows = self._client_rows(i)[rng.permutation(int(self.client_sizes[i]))]
            t = int(test_counts[i])
            test_lists.append(np.sort(rows[:t]))
            train_lists.append(np.sort(rows[t:]))
        train = FederatedData.from_partition(self.features, train_lists, self.client_ids)
        test = FederatedData.from_partition(self.features, test_lists, self.client_ids)
        return train, test

    def save(self, directory: str) -> None:
        """Writes the data to `directory` as plain .npy files (one per feature, plus the
        offsets) and the client ids as JSON, for `FederatedData.load`."""
        os.makedirs(directory, exist_ok=True)
        for name, array in self.features.items():
            if not name.isidentifier():
                raise UserError(f"feature name {name!r} cannot name a file; rename it")
            np.save(os.path.join(directory, f"feature_{name}.npy"), np.asarray(array))
        np.save(os.path.join(directory, "offsets.npy"), self.offsets)
        with open(os.path.join(directory, "client_ids.json"), "w") as f:
            json.dump(list(self.client_ids), f)

    @classmethod
    def load(cls, directory: str, mmap: bool = True) -> FederatedData:
        """The data `save` wrote to `directory`. With `mmap` the features are memory-mapped:
        only the examples a run reads are loaded from disk (a multi-process run streaming
        its data from the host reads, in each process, the clients that process trains)."""
        names = sorted(f[len("feature_"):-len(".npy")] for f in os.listdir(directory)
                       if f.startswith("feature_") and f.endswith(".npy")) \
            if os.path.isdir(directory) else []
        if not names or not os.path.isfile(os.path.join(directory, "offsets.npy")):
            raise UserError(f"{directory} holds no saved FederatedData (feature_*.npy, offsets.npy, "
                            f"client_ids.json); write one with FederatedData.save")
        mode = "r" if mmap else None
        features = {n: np.load(os.path.join(directory, f"feature_{n}.npy"), mmap_mode=mode)
                    for n in names}
        with open(os.path.join(directory, "client_ids.json")) as f:
            ids = json.load(f)
        return cls(features, np.load(os.path.join(directory, "offsets.npy")), tuple(ids))

    def subset(self, client_indices: Sequence[int] | np.ndarray) -> FederatedData:
        """The clients at `client_indices`, in that order (each at most once)."""
        indices = _as_index_array(client_indices, "client_indices")
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_clients):
            raise UserError(
                f"client_indices must lie in [0, {self.num_clients}), got min "
                f"{int(indices.min())} max {int(indices.max())}; pass valid client positions")
        if np.unique(indices).size != indices.size:
            raise UserError("client_indices has repeated clients; pass each client at most once")
        return FederatedData.from_partition(
            self.features,
            [self._client_rows(int(i)) for i in indices],
            [self.client_ids[int(i)] for i in indices],
        )

    def holdout(self, clients: int | float, seed: int) -> tuple[FederatedData, FederatedData]:
        """(kept, held out): a uniformly random set of clients set aside, never trained on.

        `clients` is a count (int >= 1) or a fraction of the clients (float in (0, 1),
        rounded to the nearest count, at least 1). Both parts keep the clients' original
        order. Evaluating on held-out clients measures how a model serves clients that did
        not take part in training (the "participation gap" of Yuan et al. 2022).
        """
        c = self.num_clients
        if isinstance(clients, bool) or not isinstance(clients, (int, float, np.integer, np.floating)):
            raise UserError(f"holdout needs a client count or fraction, got {clients!r}")
        if isinstance(clients, (float, np.floating)) and not float(clients).is_integer():
            if not 0.0 < clients < 1.0:
                raise UserError(f"a held-out fraction must be in (0, 1), got {clients}")
            count = max(1, int(round(c * float(clients))))
        else:
            count = int(clients)
        if not 1 <= count < c:
            raise UserError(f"cannot hold out {count} of {c} clients; hold out at least 1 and "
                            f"keep at least 1 for training")
        held = np.sort(np.random.default_rng(seed).choice(c, count, replace=False))
        kept = np.setdiff1d(np.arange(c), held)
        return self.subset(kept), self.subset(held)

    def empty_clients(self) -> list[str]:
        """Ids of clients with n_i == 0."""
        return [self.client_ids[i] for i in np.flatnonzero(self.client_sizes == 0)]

    def drop_empty(self) -> FederatedData:
        """The clients with n_i > 0, in their original order."""
        return self.subset(np.flatnonzero(self.client_sizes > 0))

    # ---------------------------------------------------------------- statistics

    def label_histogram(self, label_key: str = "y", num_classes: int | None = None) -> np.ndarray:
        """int64 [C, K]: `h[i, k]` = number of examples of client i with label k.

        Labels must be non-negative integers of shape [N] or [N, 1]. K is `num_classes`, or
        max label + 1 when not given.
        """
        if label_key not in self.features:
            raise UserError(
                f"no feature {label_key!r} to count labels of; pick one of {list(self.features)}")
        labels = self.features[label_key]
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise UserError(
                f"feature {label_key!r} has shape {labels.shape} dtype {labels.dtype}; a label "
                f"histogram needs integer class labels of shape [N]")
        if labels.size and labels.min() < 0:
            raise UserError(f"feature {label_key!r} has negative labels; use labels 0..K-1")
        top = int(labels.max()) + 1 if labels.size else 0
        if num_classes is None:
            num_classes = top
        elif num_classes < top:
            raise UserError(
                f"labels go up to {top - 1} but num_classes={num_classes}; raise num_classes "
                f"to at least {top}")
        owner = np.repeat(np.arange(self.num_clients, dtype=np.int64), self.client_sizes)
        flat = np.bincount(owner * num_classes + labels, minlength=self.num_clients * num_classes)
        return flat.reshape(self.num_clients, num_classes).astype(np.int64, copy=False)

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{name}: {value.dtype}{list(value.shape[1:])}"
            for name, value in self.features.items())
        return (
            f"FederatedData(num_clients={self.num_clients}, num_examples={self.num_examples}, "
            f"features={{{shapes}}})")
