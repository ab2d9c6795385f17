"""What a config can name: algorithms, data sources and privacy levels, one entry each.

The config schema (`fedjax_sim.cli.validate`), the experiment builder
(`fedjax_sim.cli.experiment`) and the error messages all read these tables, so adding an
algorithm or a data source is one entry here:

- `ALGORITHMS`: `algorithm.name` -> `AlgorithmEntry`. The `algorithm` section's keys are
  `name` plus the builder's parameters; the entry says which of them are optimizer
  sections (`{name, learning_rate, args}`, built with optax) and which of those a config
  may leave out.
- `DATA_SOURCES`: `data.source` -> `DataSource`. Its loader's keyword parameters are the
  `data` keys the source reads (besides `seed`); a partitioned source's loader returns
  centralised arrays that `data.partition` splits into clients, the others return clients.
- `PRIVACY_LEVELS`: `privacy.level` -> the `fedjax_sim.privacy` options dataclass whose
  fields are that level's keys (the client level builds the DP-FedAvg aggregator parts
  `clip` + `gaussian` itself; the config names no aggregator part directly).

Values are range-checked by rules keyed by parameter name (`fedjax_sim.cli.rules`); a test
checks that every parameter named here has one.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

from fedjax_sim import data as fdata
from fedjax_sim.algorithms import ditto, fedavg, fednova, fedper, fedprox, scaffold
from fedjax_sim.privacy import ClientLevelDP, ExampleLevelDP, MatrixFactorizationDP

__all__ = ["AlgorithmEntry", "DataSource", "ALGORITHMS", "DATA_SOURCES", "PRIVACY_LEVELS",
           "PARTITION_KEYS", "COMMON_DATA_KEYS", "all_data_keys", "client_dp_algorithms"]


@dataclasses.dataclass(frozen=True)
class AlgorithmEntry:
    """An algorithm a config can name.

    builder: returns the `Algorithm`; its parameters are the config section's keys.
    optimizers: the parameters that are optimizer sections.
    optional_optimizers: those a config may leave out or set to None (the builder's default).
    """

    builder: Callable
    optimizers: tuple[str, ...] = ("client_optimizer", "server_optimizer")
    optional_optimizers: tuple[str, ...] = ()

    @property
    def parameters(self) -> dict[str, inspect.Parameter]:
        return dict(inspect.signature(self.builder).parameters)

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys of its `algorithm` section."""
        return ("name", *self.parameters)

    @property
    def client_dp(self) -> str | None:
        """Why client-level DP does not protect what its clients send (None: it does);
        the `client_dp` of the class the builder returns."""
        returns = inspect.signature(self.builder).return_annotation
        if isinstance(returns, str):  # postponed annotations: the name in the builder's module
            returns = self.builder.__globals__.get(returns)
        return getattr(returns, "client_dp", None)


ALGORITHMS: dict[str, AlgorithmEntry] = {
    "fedavg": AlgorithmEntry(fedavg),
    "fedprox": AlgorithmEntry(fedprox),
    "scaffold": AlgorithmEntry(scaffold, ("server_optimizer",), ("server_optimizer",)),
    "fednova": AlgorithmEntry(fednova, ("server_optimizer",), ("server_optimizer",)),
    "fedper": AlgorithmEntry(fedper),
    "ditto": AlgorithmEntry(ditto, ("client_optimizer", "server_optimizer", "personal_optimizer"),
                            ("personal_optimizer",)),
}


def client_dp_algorithms() -> list[str]:
    """The algorithms whose clients send only their model update, so that client-level DP
    (clipping and noising the updates) protects all they send."""
    return [name for name, entry in ALGORITHMS.items() if entry.client_dp is None]


# -- data sources -------------------------------------------------------------------------
# The keys every source reads (build_data), and those of the sources split by a partitioner.
COMMON_DATA_KEYS = ("source", "heldout_clients", "seed")
PARTITION_KEYS = ("num_clients", "partition", "partition_args", "client_test_fraction")


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A data source a config can name.

    load: `load(seed=..., **keys)`; its other keyword parameters are the `data` keys the
      source reads (a parameter without a default is a key the config must set).
      Partitioned: returns (arrays, pooled test arrays, info), split into clients by
      `data.partition`. Otherwise: (training clients, their test splits or None, info).
    partitioned: whether `data.{num_clients, partition, partition_args,
      client_test_fraction}` split its examples into clients.
    datasets: the choices of its `data.dataset` key, if it has one.
    """

    load: Callable[..., tuple]
    partitioned: bool = False
    datasets: tuple[str, ...] = ()

    @property
    def arguments(self) -> dict[str, inspect.Parameter]:
        """The loader's parameters that are `data` keys, with their defaults."""
        return {n: p for n, p in inspect.signature(self.load).parameters.items() if n != "seed"}

    @property
    def keys(self) -> tuple[str, ...]:
        """Every `data` key the source reads."""
        own = (*self.arguments, *(PARTITION_KEYS if self.partitioned else ()))
        return ("source", *own, *COMMON_DATA_KEYS[1:])


def _digits(*, seed):
    train, test = fdata.load_digits(seed=seed)
    return train, test, {}


def _diabetes(*, seed):
    train, test, stats = fdata.load_diabetes(seed=seed)
    return train, test, {"target_stats": stats}


def _tfds(name, data_dir=None, download=True, label_key=None, *, seed):
    del seed  # TFDS splits are fixed
    return fdata.load_tfds(name, data_dir=data_dir, download=download, label_key=label_key)


def _synthetic(num_clients=30, alpha=1.0, beta=1.0, iid=False, *, seed):
    train, client_test, _ = fdata.synthetic(alpha, beta, num_clients=num_clients, seed=seed,
                                            iid=iid)
    return train, client_test, {}


def _files(loaders: dict[str, Callable], dataset, train_path, test_path=None, drop_empty=False,
           **options):
    """A file source's loader for `dataset`, given the options that loader takes."""
    loader = loaders[dataset]
    taken = inspect.signature(loader).parameters
    return loader(train_path, test_path, drop_empty=drop_empty,
                  **{k: v for k, v in options.items() if k in taken})


def _tff_h5(dataset, train_path, test_path=None, only_digits=False, label="label", seq_len=80,
            drop_empty=False, *, seed):
    del seed  # the files fix the clients and their splits
    loaders = {"emnist": fdata.tff_emnist, "shakespeare": fdata.tff_shakespeare,
               "cifar100": fdata.tff_cifar100}
    return _files(loaders, dataset, train_path, test_path, drop_empty, only_digits=only_digits,
                  label=label, seq_len=seq_len)


def _leaf(dataset, train_path, test_path=None, seq_len=80, drop_empty=False, *, seed):
    del seed
    loaders = {"femnist": fdata.leaf_femnist, "shakespeare": fdata.leaf_shakespeare}
    return _files(loaders, dataset, train_path, test_path, drop_empty, seq_len=seq_len)


DATA_SOURCES: dict[str, DataSource] = {
    "digits": DataSource(_digits, partitioned=True),
    "diabetes": DataSource(_diabetes, partitioned=True),
    "synthetic": DataSource(_synthetic),
    "tfds": DataSource(_tfds, partitioned=True),
    "tff_h5": DataSource(_tff_h5, datasets=("emnist", "shakespeare", "cifar100")),
    "leaf": DataSource(_leaf, datasets=("femnist", "shakespeare")),
}


def all_data_keys() -> tuple[str, ...]:
    """The keys of every source: what a `data` section may hold."""
    return tuple(sorted({k for source in DATA_SOURCES.values() for k in source.keys}))


# -- privacy ------------------------------------------------------------------------------
PRIVACY_LEVELS: dict[str, Any] = {"client": ClientLevelDP, "example": ExampleLevelDP,
                                  "dp_ftrl": MatrixFactorizationDP}
