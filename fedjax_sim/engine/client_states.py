"""Per-client state of a stateful algorithm: on device, or on host streamed per call.

A stateful algorithm (SCAFFOLD, FedPer, Ditto, ...) keeps one row of state per client of
the whole population: every leaf has a leading axis of C rows. Where the table fits in
device memory it stays there, and the round program gathers the cohort's rows and
scatters them back in place (the state is donated), so a round costs what its cohort
costs whatever C is.

Where it does not fit, `HostClientStates` keeps the table in host memory. Before each
compiled call it gathers the rows of every client the call's rounds will sample (the
cohorts are known in advance: they depend only on the seed and the round) into a small
device table of `rounds_per_call * clients_per_round` rows, with a [C] map from client id
to row; after the call it writes those rows back. A client sampled twice within one call
finds its own updated row, so results equal the on-device mode's exactly.

A call costs what its table costs, whatever C is: the row map stays on the device between
calls and each call writes only its own clients' entries (a call looks up no others), so
nothing of size C is built, sent or scanned per call.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

PLACEMENTS = ("auto", "device", "host")
# With placement 'auto' on an accelerator, client states stay on device while they take at
# most this fraction of its memory (the rest is for the model, the cohort and the data).
DEVICE_FRACTION = 0.25


def state_bytes(table: PyTree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(table)))


def device_memory_bytes(device=None) -> int | None:
    """The device's memory limit, where the backend reports one (not on CPU)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # not every backend implements memory_stats
        return None
    return stats.get("bytes_limit")


def resolve_placement(placement: str, one_client: PyTree, num_clients: int,
                      backend: str) -> str:
    """'device' or 'host' for a table of `num_clients` rows shaped like `one_client`."""
    if placement != "auto":
        return placement
    if backend == "cpu":
        return "device"  # host and device memory are the same memory
    limit = device_memory_bytes()
    need = num_clients * state_bytes(jax.tree_util.tree_map(np.asarray, one_client))
    return "device" if limit is None or need <= DEVICE_FRACTION * limit else "host"


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(rows: jax.Array, ids: jax.Array) -> jax.Array:
    """`rows` with rows[ids[j]] = j (ids past the end are dropped), updated in place."""
    return rows.at[ids].set(jnp.arange(ids.shape[0], dtype=jnp.int32), mode="drop")


class HostClientStates:
    """Streams the rows of host-kept client states through a device table per call."""

    def __init__(self, num_clients: int, table_rows: int):
        self.num_clients, self.table_rows = num_clients, table_rows
        self._rows = None  # the [C] row map on device, kept from call to call

    def template(self, host: PyTree) -> tuple[PyTree, jax.Array]:
        """A device table and row map of the right shapes (for compiling)."""
        table = jax.tree_util.tree_map(
            lambda x: jnp.zeros((self.table_rows, *x.shape[1:]), x.dtype), host)
        return table, jnp.zeros(self.num_clients, jnp.int32)

    def take(self, host: PyTree, cohorts: np.ndarray, live: np.ndarray):
        """(device table, [C] row map, ids): the rows of every live client in `cohorts`."""
        ids = np.unique(np.asarray(cohorts)[np.asarray(live)])
        assert len(ids) <= self.table_rows

        def gather(x):
            out = np.zeros((self.table_rows, *x.shape[1:]), x.dtype)
            out[:len(ids)] = x[ids]
            return jnp.asarray(out)

        return jax.tree_util.tree_map(gather, host), self._row_map(ids), ids

    def _row_map(self, ids: np.ndarray) -> jax.Array:
        """The device row map with `rows[ids[j]] = j`. Entries of clients outside `ids` are
        stale (rows of an earlier call), which is harmless: a call looks up only its own
        clients. Writing `table_rows` entries in place costs the same for any C."""
        if self._rows is None:
            self._rows = jnp.zeros(self.num_clients, jnp.int32)
        padded = np.full(self.table_rows, self.num_clients, np.int32)  # out of range: dropped
        padded[:len(ids)] = ids
        self._rows = _write_rows(self._rows, jnp.asarray(padded))
        return self._rows

    def stream(self, run, program):
        """Wraps a compiled `run(state, data, model_state, root, start, count, rows)` (from
        `RoundProgram.compile` with a table of `table_rows` rows) into one taking the
        host-kept states in `state.clients`: each call takes the rows its rounds sample to
        the device and writes them back afterwards."""
        def run_streamed(state, data, model_state, root, start, count):
            cohorts, live = jax.device_get(program.cohorts(root, start, count))
            table, rows, ids = self.take(state.clients, cohorts, live)
            new, metrics = run(state._replace(clients=table), data, model_state, root, start,
                               count, rows)
            return new._replace(clients=self.put(state.clients, new.clients, ids)), metrics

        return run_streamed

    @staticmethod
    def put(host: PyTree, table: PyTree, ids: np.ndarray) -> PyTree:
        """Writes the call's updated rows back into the host table (in place)."""
        def scatter(x, t):
            x[ids] = np.asarray(t[:len(ids)])
            return x

        return jax.tree_util.tree_map(scatter, host, jax.device_get(table))
