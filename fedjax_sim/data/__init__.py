"""Federated datasets: storage, partitioners that simulate clients, and offline sources."""

from fedjax_sim.data.builtin import load_diabetes, load_digits, synthetic
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

__all__ = [
    "FederatedData",
    "PARTITIONERS",
    "dirichlet",
    "get_partitioner",
    "iid",
    "label_skew",
    "load_diabetes",
    "load_digits",
    "partition",
    "quantity_skew",
    "shards",
    "synthetic",
]
