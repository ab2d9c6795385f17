"""Federated datasets: storage, partitioners that simulate clients, loaders for public and
natural per-user datasets, and on-device preprocessing."""

from fedjax_sim.data import text
from fedjax_sim.data.augment import Preprocess
from fedjax_sim.data.describe import describe, format_description, plot_description
from fedjax_sim.data.federated_data import FederatedData
from fedjax_sim.data.partition import (
    PARTITIONERS,
    dirichlet,
    get_partitioner,
    iid,
    label_skew,
    partition,
    quantity_skew,
    shards,
)
from fedjax_sim.data.sources.builtin import load_diabetes, load_digits, synthetic
from fedjax_sim.data.sources.leaf import leaf_femnist, leaf_shakespeare, load_leaf
from fedjax_sim.data.sources.tfds import load_tfds, tfds
from fedjax_sim.data.sources.tff_h5 import (
    load_tff_h5,
    tff_cifar100,
    tff_emnist,
    tff_shakespeare,
)

__all__ = [
    "FederatedData",
    "PARTITIONERS",
    "Preprocess",
    "describe",
    "dirichlet",
    "format_description",
    "get_partitioner",
    "iid",
    "label_skew",
    "leaf_femnist",
    "leaf_shakespeare",
    "load_diabetes",
    "load_digits",
    "load_leaf",
    "load_tff_h5",
    "load_tfds",
    "partition",
    "plot_description",
    "quantity_skew",
    "shards",
    "synthetic",
    "text",
    "tff_cifar100",
    "tff_emnist",
    "tff_shakespeare",
    "tfds",
]
