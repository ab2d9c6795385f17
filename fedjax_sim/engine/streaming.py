"""Training data bigger than the device's budget: kept on host, streamed per call.

By default the whole training set is placed on the device once and every round gathers
its batches from it. When it does not fit (or exceeds `engine.device_data_budget`),
`HostData` keeps it in host memory and, for each compiled call of `rounds_per_call`
rounds, sends the device only the examples of the clients those rounds sample. The
cohorts are known ahead: they depend only on the seed and the round, exactly as the round
program draws them (`RoundProgram.cohorts`).

A call's data is a `DeviceData` of fixed shape: a features buffer of `capacity` rows (the
total size of the `window * cohort` largest clients, so any window fits) holding the
sampled clients' rows packed one after another, the [C] offsets of those clients
re-pointed into the buffer (other clients' offsets are unused), and the true [C] sizes.
The [C] offsets stay on the device and each call rewrites only its own clients' entries,
so a call costs what its clients cost, whatever C is.
Every client's rows hold the same values at the same positions relative to its offset as
in the on-device layout, and a batch only ever reads its own client's rows
(engine.local), so results are identical to the on-device mode for the same seed.

Prefetching: while call k runs on the device, a background thread packs call k+1's
examples on the host and starts their transfer, so the device does not wait for the host
between calls. The next call's cohorts are drawn before call k is dispatched, while the
device is idle, so drawing them never queues behind the running call.
"""

from __future__ import annotations

import concurrent.futures
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.engine.round import DeviceData
from fedjax_sim.errors import UserError

DATA_PLACEMENTS = ("auto", "device", "host")
# With placement 'auto' and no explicit budget, the training data stays on an accelerator
# while it takes at most this fraction of its memory.
DEVICE_DATA_FRACTION = 0.5

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(value) -> int | None:
    """Bytes from an int or a string like '512MiB', '2 GB', '1.5GiB' (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if match and match.group(2).lower() in _UNITS and float(match.group(1)) > 0:
            return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    raise UserError(f"engine.device_data_budget must be a number of bytes > 0 or a size like "
                    f"'512MiB' or '2GB', got {value!r}")


def data_bytes(data) -> int:
    """Bytes of a FederatedData's feature arrays."""
    return int(sum(v.nbytes for v in data.features.values()))


def resolve_data_placement(placement: str, nbytes: int, budget: int | None,
                           device_limit: int | None) -> str:
    """'device' or 'host' for `nbytes` of training data.

    'auto': host when the data exceeds `budget`, or, without a budget, more than
    DEVICE_DATA_FRACTION of the accelerator's memory (`device_limit`; None on CPU, where
    host and device memory are the same, so the data stays 'on device').
    """
    if placement not in DATA_PLACEMENTS:
        raise UserError(f"engine.data_placement must be one of {list(DATA_PLACEMENTS)}, got "
                        f"{placement!r}")
    if placement != "auto":
        return placement
    if budget is None and device_limit is not None:
        budget = int(DEVICE_DATA_FRACTION * device_limit)
    return "host" if budget is not None and nbytes > budget else "device"


# The device buffers of packed [C] offsets: calls alternate between two (one is read by the
# running call while the next call's is written), the third serves packs that are used
# before the next pack is made (evaluation blocks).
CALL_SLOTS, DIRECT_SLOT = 2, 2


@functools.partial(jax.jit, donate_argnums=0)
def _write_offsets(offsets: jax.Array, ids: jax.Array, starts: jax.Array) -> jax.Array:
    """`offsets` with offsets[ids] = starts (ids past the end dropped), in place."""
    return offsets.at[ids].set(starts, mode="drop")


class HostData:
    """Streams the rows of a host-kept FederatedData to the device, a window at a time."""

    def __init__(self, data, window_clients: int | None = None):
        self.data = data
        self.num_clients = data.num_clients
        self._sizes = np.asarray(data.client_sizes, np.int64)
        self._offsets = np.asarray(data.offsets[:-1], np.int64)
        self._sorted = np.sort(self._sizes)[::-1]
        self.capacity = None
        if window_clients is not None:
            self.set_window(window_clients)
        self._device_sizes = jnp.asarray(self._sizes, jnp.int32)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fedjax-prefetch")
        self._pending: tuple[int, concurrent.futures.Future] | None = None
        self._offsets_on_device: list[jax.Array | None] = [None] * (CALL_SLOTS + 1)
        self.calls = self.prefetched = 0  # how many calls found their data already sent

    def capacity_for(self, clients: int) -> int:
        """Rows that any `clients` distinct clients fit in: the sizes of the largest ones."""
        return max(1, int(self._sorted[:clients].sum()))

    def set_window(self, clients: int) -> None:
        """Fixes the streamed buffer's size: any `clients` distinct clients fit."""
        self.capacity = self.capacity_for(clients)

    def row_bytes(self) -> int:
        """Bytes of one example (all features)."""
        return int(sum(v[:1].nbytes for v in self.data.features.values()))

    def template(self) -> DeviceData:
        """A DeviceData of the streamed shapes (for compiling)."""
        feats = {k: jnp.zeros((self.capacity, *v.shape[1:]), v.dtype)
                 for k, v in self.data.features.items()}
        return DeviceData(feats, jnp.zeros(self.num_clients, jnp.int32), self._device_sizes)

    def pack(self, ids: np.ndarray, capacity: int | None = None,
             slot: int = DIRECT_SLOT) -> DeviceData:
        """The rows of clients `ids` packed into a buffer of `capacity` rows (default: as
        many as those clients hold), on device; e.g. a call's cohorts, or a block of
        evaluation clients. The offsets are written into device buffer `slot`, which the
        DeviceData of the previous pack into that slot then no longer holds: by default
        (DIRECT_SLOT) use each packed DeviceData before packing the next."""
        ids = np.unique(np.asarray(ids, np.int64))
        capacity = self.capacity_for(len(ids)) if capacity is None else capacity
        feats, starts = self.gather_rows(ids, capacity)
        feats = {k: jax.device_put(v) for k, v in feats.items()}
        return DeviceData(feats, self._write_offsets(slot, ids, starts), self._device_sizes)

    def gather_rows(self, ids: np.ndarray, capacity: int) -> tuple[dict, np.ndarray]:
        """(features, starts): the rows of clients `ids` (sorted, distinct) packed one after
        another into host buffers of `capacity` rows, client ids[j]'s from starts[j]. Only
        those rows of the stored arrays are read (memory-mapped arrays load only them)."""
        sizes = self._sizes[ids]
        starts = np.zeros(len(ids), np.int64)
        np.cumsum(sizes[:-1], out=starts[1:])
        total = int(sizes.sum())
        if total > capacity:  # cannot happen for cohorts of at most window_clients clients
            raise ValueError(f"{total} rows do not fit a buffer of {capacity}")
        # Source row of each packed row: client j's rows shifted from its offset to its start.
        source = np.repeat(self._offsets[ids] - starts, sizes) + np.arange(total)
        feats = {}
        for k, v in self.data.features.items():
            buf = np.zeros((capacity, *v.shape[1:]), v.dtype)
            np.take(v, source, axis=0, out=buf[:total])
            feats[k] = buf
        return feats, starts

    def _write_offsets(self, slot: int, ids: np.ndarray, starts: np.ndarray) -> jax.Array:
        """Device buffer `slot` of [C] offsets with offsets[ids] = starts, rewritten in
        place; the entries of other clients are left from earlier packs (unused)."""
        offsets = self._offsets_on_device[slot]
        if offsets is None:
            offsets = jnp.zeros(self.num_clients, jnp.int32)
        width = 1 << max(0, len(ids) - 1).bit_length()  # few shapes: few compilations
        padded_ids = np.full(width, self.num_clients, np.int32)  # out of range: dropped
        padded_ids[:len(ids)] = ids
        padded_starts = np.zeros(width, np.int32)
        padded_starts[:len(ids)] = starts
        offsets = _write_offsets(offsets, jnp.asarray(padded_ids), jnp.asarray(padded_starts))
        self._offsets_on_device[slot] = offsets
        return offsets

    def _window(self, program, root, start: int, rounds: int) -> np.ndarray:
        """What rounds start .. start+rounds-1 train (their clients' ids), for `_send`."""
        cohorts, live = jax.device_get(program.cohorts(root, start, rounds))
        return np.asarray(cohorts)[np.asarray(live)]

    def _send(self, window, slot: int) -> DeviceData:
        """A call's data on device for `_window`'s result, its offsets in buffer `slot`."""
        return self.pack(window, self.capacity, slot)

    def stream(self, run, program, window: int):
        """Wraps a compiled `run(state, data, model_state, root, start, count)` (compiled
        with `template()` as its data) into one that ignores its `data` argument and feeds
        each call the rows its rounds sample, prefetching the next call's while it runs."""

        def run_streamed(state, data, model_state, root, start, count):
            del data
            self.calls += 1
            slot = self.calls % CALL_SLOTS  # the previous call's offsets are in the other
            pending, self._pending = self._pending, None
            arrays = pending[1].result() if pending is not None else None
            if pending is not None and pending[0] == start:
                self.prefetched += 1
            else:
                arrays = self._send(self._window(program, root, start, window), slot)
            # Draw the next window's cohorts now, while the device is idle, then pack and
            # send its rows in the background while this call runs.
            nxt = self._window(program, root, start + count, window)
            self._pending = (start + count, self._pool.submit(
                self._send, nxt, (self.calls + 1) % CALL_SLOTS))
            return run(state, arrays, model_state, root, start, count)

        return run_streamed

    def close(self) -> None:
        self._pending = None
        self._pool.shutdown(wait=True)


class MeshHostData(HostData):
    """HostData for a cohort spread over a mesh (engine.mesh): each device receives the
    rows of the clients it trains in the call, and nothing else.

    A call's data is split across the devices: features [devices * capacity, ...] (device
    j's block holds its clients' rows) and offsets [devices, C] (row j: where device j's
    clients start in its block), with the [C] sizes replicated. `capacity` fits the
    largest clients a device can be dealt in a window (its share of the slots, every
    round). In a multi-process run each process gathers and sends only the rows of its
    own devices' clients, so a process reads no other clients' examples (with memory-mapped
    features: loads no others from disk).
    """

    def __init__(self, data, mesh, slots: int):
        super().__init__(data)
        from fedjax_sim.engine.mesh import CLIENTS, deal, put, replicated

        self.mesh, self.slots = mesh, slots
        self._order = deal(slots, mesh.size)[0]
        self.share = len(self._order) // mesh.size
        self._split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(CLIENTS))
        me = jax.process_index()
        self._mine = [(j, device) for j, device in enumerate(mesh.devices.flat)
                      if device.process_index == me]
        self._sizes_on_mesh = put(jnp.asarray(self._sizes, jnp.int32), replicated(mesh))

    def set_window(self, clients: int) -> None:
        """Fixes each device's buffer: any share of `clients` cohort slots fits."""
        self.capacity = self.capacity_for(-(-clients // self.slots) * self.share)

    def template(self) -> DeviceData:
        empty = np.zeros(0, np.int64)
        return self._assemble([self.gather_rows(empty, self.capacity) + (empty,)
                               for _ in self._mine])

    def layout(self, program, root, start: int, rounds: int) -> list[np.ndarray]:
        """The ids of the clients each of this process's devices trains in rounds
        start .. start+rounds-1 (the cohorts dealt out as the round program deals them)."""
        cohorts, live = (np.asarray(x) for x in jax.device_get(program.cohorts(root, start, rounds)))
        pad = len(self._order) - cohorts.shape[1]
        cohorts = np.pad(cohorts, ((0, 0), (0, pad)))[:, self._order]
        live = np.pad(live, ((0, 0), (0, pad)))[:, self._order]
        shape = (rounds, self.mesh.size, self.share)
        cohorts, live = cohorts.reshape(shape), live.reshape(shape)
        return [np.unique(cohorts[:, j][live[:, j]]) for j, _ in self._mine]

    def pack_devices(self, layout: list[np.ndarray]) -> DeviceData:
        return self._assemble([self.gather_rows(ids, self.capacity) + (ids,) for ids in layout])

    def _assemble(self, parts) -> DeviceData:
        """One DeviceData split across the mesh from this process's devices' parts
        ((features, starts, ids) each)."""
        d, local = self.mesh.size, [device for _, device in self._mine]
        feats = {}
        for k, v in self.data.features.items():
            feats[k] = jax.make_array_from_single_device_arrays(
                (d * self.capacity, *v.shape[1:]), self._split,
                [jax.device_put(p[0][k], device) for p, device in zip(parts, local)])
        rows = []
        for (_, starts, ids), device in zip(parts, local):
            offsets = np.zeros((1, self.num_clients), np.int32)
            offsets[0, ids] = starts
            rows.append(jax.device_put(offsets, device))
        offsets = jax.make_array_from_single_device_arrays((d, self.num_clients), self._split, rows)
        return DeviceData(feats, offsets, self._sizes_on_mesh)

    # HostData.stream, each device receiving its own clients' rows (every call builds
    # fresh arrays: no offset buffers are reused, so `slot` plays no part).
    _window = layout

    def _send(self, window, slot: int) -> DeviceData:
        return self.pack_devices(window)
