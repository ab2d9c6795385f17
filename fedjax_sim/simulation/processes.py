"""One run over several processes (hosts): starting them up, and what only one of them does.

Every process runs the same program on the same seed: the round program is one SPMD
program over the global mesh (engine.mesh), so each process computes the same metrics
and holds the same replicated server state. Process 0 writes the run directory
(metrics, summary, parameters, checkpoints); every process reads the checkpoints when a
run resumes. Decisions a process takes from its own clock (a checkpoint due after so many
seconds) are taken by process 0 and shared, so all processes enter the same collectives.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.errors import UserError

PyTree = Any


@dataclasses.dataclass(frozen=True)
class DistributedOptions:
    """How this process joins a multi-process run (`jax.distributed.initialize`).

    With every field None, JAX detects the cluster itself (SLURM, Open MPI, TPU pods,
    and other environments it knows). Elsewhere give all three: the coordinator's
    `host:port` (process 0's machine), the number of processes and this one's id.
    local_device_ids: which of this machine's accelerators this process uses (e.g. one
    process per GPU); None = all of them.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    def __post_init__(self):
        explicit = (self.coordinator_address, self.num_processes, self.process_id)
        if any(v is not None for v in explicit) and any(v is None for v in explicit):
            raise UserError("distributed: give coordinator_address, num_processes and "
                            "process_id together (or none of them, to let JAX detect SLURM, "
                            "Open MPI or a TPU pod)")
        if self.num_processes is not None and (not isinstance(self.num_processes, int)
                                               or self.num_processes < 1):
            raise UserError(f"distributed.num_processes must be an integer >= 1, got "
                            f"{self.num_processes!r}")
        if self.process_id is not None and not (
                isinstance(self.process_id, int) and 0 <= self.process_id < self.num_processes):
            raise UserError(f"distributed.process_id must be in [0, {self.num_processes}), got "
                            f"{self.process_id!r}")


def initialize(options: DistributedOptions = DistributedOptions()) -> None:
    """Joins the multi-process run: call once per process, before any other JAX work
    (`fs.distributed.initialize()` at the top of a script, or the CLI's --distributed /
    --coordinator flags)."""
    try:
        jax.distributed.initialize(
            coordinator_address=options.coordinator_address,
            num_processes=options.num_processes, process_id=options.process_id,
            local_device_ids=(list(options.local_device_ids)
                              if options.local_device_ids is not None else None))
    except (RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"could not join the multi-process run ({first}); start every process "
                        f"with the same coordinator address and process count and a distinct "
                        f"process id, before any other JAX call") from None


def count() -> int:
    return jax.process_count()


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def agree(value):
    """Process 0's `value` (a bool or an int), on every process (`value` itself where
    there is one process): for decisions taken from a process's own clock."""
    if count() == 1:
        return value
    from jax.experimental import multihost_utils

    return type(value)(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def local(tree: PyTree) -> PyTree:
    """`tree` with every array this process cannot read whole (split across processes)
    made whole on this process: replicated arrays as this process's copy, arrays split
    across processes gathered (a collective: every process must call it at the same
    point). Unchanged in a single process."""
    if count() == 1:
        return tree
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(one(jax.random.key_data(x)),
                                            impl=jax.random.key_impl(x))
        if x.is_fully_replicated:
            return x.addressable_data(0)
        return jnp.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree_util.tree_map(one, tree)
