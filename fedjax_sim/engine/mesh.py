"""A cohort spread over a mesh of devices: each device trains its share of the clients.

With a mesh of d devices (one axis, CLIENTS), a round's m cohort slots are padded to a
multiple of d with empty slots (weight 0, nothing reported, nothing written back: the
same mechanism as Poisson padding) and dealt out round-robin: device j trains slots
j, j+d, j+2d, ... . Dealing them out rather than cutting the cohort into blocks keeps a
Poisson cohort, whose real clients fill the first slots, balanced across devices.

Inside `jax.shard_map` every device runs `cohort.map_clients` on its share exactly as a
single device runs a whole cohort (vmapped, chunked or one client at a time), and the
weighted sums become one cross-device `psum`. The server state, the model state and the
training data placed on device are replicated; per-client state tables are sharded by
client (their rows split across devices) where the row count divides evenly, else
replicated. Everything a client sees and draws depends only on (seed, round, client id),
so a run gives the same numbers on any number of devices up to the order of the float
additions in the sums (within a device, then across devices).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_sim.engine.cohort import map_clients
from fedjax_sim.errors import UserError

PyTree = Any
CLIENTS = "clients"


def resolve_mesh(spec) -> Mesh | None:
    """The mesh for `engine.mesh`: None or 1 (one device, no mesh), 'auto' (every device
    of every process when there is more than one), or a device count d (the first d)."""
    if spec is None:
        return None
    devices = jax.devices()
    if spec == "auto":
        count = len(devices)
        if count == 1:
            return None
    elif isinstance(spec, int) and not isinstance(spec, bool) and spec >= 1:
        count = spec
        if count > len(devices):
            raise UserError(f"engine.mesh asks for {count} devices but only {len(devices)} are "
                            f"visible ({devices[0].platform}); lower engine.mesh or use 'auto'")
        if count == 1 and jax.process_count() == 1:
            return None
    else:
        raise UserError(f"engine.mesh must be 'auto', None or a device count >= 1, got {spec!r}")
    if jax.process_count() > 1 and count != len(devices):
        raise UserError(f"a run over {jax.process_count()} processes uses every device of every "
                        f"process ({len(devices)}); set engine.mesh to 'auto' or {len(devices)}")
    return Mesh(np.asarray(devices[:count]), (CLIENTS,),
                axis_types=(jax.sharding.AxisType.Auto,))


def describe(mesh: Mesh | None) -> dict:
    """The mesh as the run summary reports it."""
    if mesh is None:
        return {"devices": 1, "processes": 1}
    return {"devices": int(mesh.size), "processes": jax.process_count(),
            "platform": mesh.devices.flat[0].platform}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def row_sharding(mesh: Mesh, rows: int) -> NamedSharding:
    """Client-state tables: rows split across devices where they divide evenly."""
    return NamedSharding(mesh, P(CLIENTS) if rows % mesh.size == 0 else P())


def state_shardings(mesh: Mesh, state) -> PyTree:
    """Shardings for a SimState: everything replicated except the client-state table."""
    rep = replicated(mesh)
    clients = None
    if state.clients is not None:
        clients = jax.tree_util.tree_map(lambda x: row_sharding(mesh, x.shape[0]), state.clients)
    return type(state)(jax.tree_util.tree_map(lambda _: rep, state.server),
                       jax.tree_util.tree_map(lambda _: rep, state.aggregator), clients,
                       jax.tree_util.tree_map(lambda _: rep, state.stats))


def deal(m: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, inverse) of m slots padded to a multiple of d and dealt to d devices
    round-robin: `padded[order]` puts device j's slots j, j+d, ... in its block."""
    padded = -(-m // d) * d
    order = np.arange(padded).reshape(padded // d, d).T.reshape(-1)
    return order, np.argsort(order)


def map_clients_on_mesh(mesh: Mesh, fn: Callable, per_client: PyTree, live: jax.Array,
                        clients_per_chunk: int | None, leading_live: bool = False,
                        split: PyTree = None):
    """`cohort.map_clients` with the cohort spread over `mesh`; same returns.

    `per_client` holds the cohort's per-client inputs (leading axis m) and `live` ([m]
    bool) which slots hold a client; `fn(per_client_slice, live_slot)` is called for the
    m real slots and for the padding slots (as a copy of slot 0 with live False, whose
    weight fn must make 0). `leading_live`: within each device's share the live slots
    come first (a compact Poisson cohort), so each device skips the chunks past its last
    live client. `split`: arrays whose leading axis is split across the devices (e.g. the
    training rows streamed to each device for its own clients); fn then takes a third
    argument, this device's part of them.
    """
    m = live.shape[0]
    d = mesh.size
    order, inverse = deal(m, d)
    pad = len(order) - m

    def arrange(x, fill=None):
        if pad:
            extra = (jnp.broadcast_to(x[:1], (pad, *x.shape[1:])) if fill is None
                     else jnp.full((pad, *x.shape[1:]), fill, x.dtype))
            x = jnp.concatenate([x, extra])
        return x[order]

    arranged = (jax.tree_util.tree_map(arrange, per_client), arrange(live, False))
    share = len(order) // d
    chunk = None if clients_per_chunk is None or clients_per_chunk >= share else clients_per_chunk

    def on_device(args, own):
        pc, alive = args
        count = jnp.sum(alive.astype(jnp.int32)) if (leading_live and chunk is not None) else None
        call = (lambda a: fn(*a)) if split is None else (lambda a: fn(*a, own))
        total, weight, stacked = map_clients(call, (pc, alive), chunk, count=count)
        return jax.lax.psum((total, weight), CLIENTS), stacked

    (total, weight), stacked = jax.shard_map(
        on_device, mesh=mesh, in_specs=(P(CLIENTS), P(CLIENTS)), out_specs=(P(), P(CLIENTS)),
        check_vma=False)(arranged, split)
    stacked = jax.tree_util.tree_map(lambda x: x[inverse][:m], stacked)
    return total, weight, stacked


def put(tree: PyTree, shardings: PyTree) -> PyTree:
    """`tree` placed with `shardings` (a matching tree; None leaves nothing to do).

    In a single process this is `jax.device_put`. Across processes every process holds
    the same host value (the seed and the program are the same everywhere), and each
    places the pieces its own devices hold."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if sharding is None:
            return x
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x if x.sharding.is_equivalent_to(sharding, x.ndim) else jax.device_put(x, sharding)
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = one(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(one, tree, shardings)
