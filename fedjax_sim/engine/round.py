"""A federated round as ONE compiled program, and several rounds fused into one call.

    round r:  key_r = fold_in(root, r)
              cohort = m clients sampled uniformly without replacement, or Poisson
                       sampling (each client joins with probability q) padded to m slots
              for each client i in the cohort (vmapped / chunked / mapped):
                  batches from fold_in(key_clients, client_id)
                  s_i = client_states[row(i)]                           (stateful algorithms)
                  delta_i, metrics_i, s_i', extras_i = algorithm.client_update(..., s_i)
                  d_i = aggregator.client(delta_i)
              total, denominator = sum_i w_i d_i, sum_i w_i         (float32, streaming)
                 or aggregator.reduce(Cohort(d [m, ...], w, live))  (a part that needs all)
              aggregate = aggregator.finalize(total, denominator) / denominator'
              server_state = algorithm.server_update(server_state, aggregate, sum_i extras_i)
              client_states[row(i)] = s_i'  for the cohort's clients

`RoundProgram.compile(...)` gives `run(state, ..., start, count)`, which runs `count`
consecutive rounds in one loop inside one compiled program, so there is no host
round-trip between them; it returns the stacked per-round metrics. A client's randomness
depends only on (root, round, client id), so results do not depend on how clients are
chunked or how rounds are fused. What `algorithm` and `aggregator` must provide is
engine.contracts.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from fedjax_sim.engine.batching import Schedule, bits_needed, client_batches, poisson_sample
from fedjax_sim.engine.cohort import map_clients
from fedjax_sim.engine.contracts import (ROUND_FAILED, STATS_KEY, AggregatorPart, Algorithm,
                                         Cohort, Message, Problem, RoundSums, UpdateAttack)
from fedjax_sim.errors import UserError
from fedjax_sim.engine import mesh as mesh_lib
from fedjax_sim.engine import program_cache
from fedjax_sim.engine.local import LocalData
from fedjax_sim.trees import merge

PyTree = Any


class ClientSampling(NamedTuple):
    """How a round's cohort is drawn.

    'fixed': `slots` clients uniformly without replacement. 'poisson': every client joins
    independently with probability `rate`; the joined clients fill the `slots` (a cap,
    chosen so that overflow is vanishingly rare; if more join, a uniformly random subset
    of `slots` of them is kept) and empty slots hold a client with weight 0 whose work is
    discarded, so shapes stay static. 'cyclic': the clients are split once into `groups`
    groups (`cyclic_groups`); round r draws `slots` clients uniformly without replacement
    from group r mod `groups`, so a client takes part at most once every `groups` rounds
    ((k, b)-participation with b = `groups`, as DP-FTRL's accounting assumes).
    'cyclic_poisson': the same groups, but every member of round r's group joins
    independently with probability `rate` into `slots` slots padded as for 'poisson'
    (cyclic Poisson sampling, amplified BandMF's).
    """

    kind: str  # 'fixed' | 'poisson' | 'cyclic' | 'cyclic_poisson'
    slots: int
    rate: float | None = None
    groups: int | None = None

    @property
    def padded(self) -> bool:
        """Whether the cohort's size varies (Poisson): its real clients fill the first
        slots and the rest are padding with weight 0."""
        return self.kind in ("poisson", "cyclic_poisson")


# The seed of the one split of the population into cyclic groups (a public fact of the run).
CYCLIC_GROUPS_SEED = 0xC7C1


@functools.lru_cache(maxsize=8)
def cyclic_groups(num_clients: int, groups: int) -> np.ndarray:
    """[groups, ceil(C / groups)] int32: the clients of each cyclic group (a seeded random
    split into groups whose sizes differ by at most one), padded with -1. Computed once
    per (C, groups), not at every trace of a round (a permutation of a million clients
    takes tens of ms); read-only."""
    order = np.random.default_rng(CYCLIC_GROUPS_SEED).permutation(num_clients)
    width = -(-num_clients // groups)
    table = np.full((groups, width), -1, np.int32)
    for g, members in enumerate(np.array_split(order, groups)):
        table[g, :len(members)] = members
    table.setflags(write=False)
    return table


class SimState(NamedTuple):
    """server: the algorithm's server state; aggregator: the aggregator's state; clients:
    per-client state of a stateful algorithm, every leaf with a leading axis over the
    population ([C, ...]), or over a table of rows (see `RoundProgram.compile`); None for a
    stateless algorithm. stats: the global model's running statistics (BatchNorm) where
    clients update them, else None."""

    server: PyTree
    aggregator: PyTree
    clients: PyTree = None
    stats: PyTree = None


class ClientTables(NamedTuple):
    """Per-client state where the aggregator keeps one too (error feedback's residuals):
    the algorithm's rows (None for a stateless algorithm) and the aggregator's, each with a
    leading axis over the same clients."""

    algorithm: PyTree
    aggregator: PyTree


def tree_bytes(tree: PyTree) -> int:
    """The bytes of every array of `tree` (shapes and dtypes only: works on tracers)."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(tree))


def tree_entries(tree: PyTree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


class DeviceData(NamedTuple):
    """A FederatedData's arrays on device: features [N, ...], offsets [C+1], sizes [C]."""

    features: dict
    offsets: jax.Array
    sizes: jax.Array

    @classmethod
    def from_federated(cls, data, device=None) -> "DeviceData":
        put = functools.partial(jax.device_put, device=device)
        return cls({k: put(v) for k, v in data.features.items()},
                   put(jnp.asarray(data.offsets[:-1], jnp.int32)),
                   put(jnp.asarray(data.client_sizes, jnp.int32)))


def _all_finite(tree: PyTree) -> jax.Array:
    """Whether every floating value of `tree` is finite (a bool scalar)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def divide(total: PyTree, denominator: jax.Array) -> PyTree:
    """The aggregate total / denominator; a zero denominator (no weight) gives zero."""
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jax.tree_util.tree_map(lambda x: x / safe, total)


# The key a reducing aggregator part gets: fold_in(the round's aggregator key, REDUCE_STREAM)
# (finalize gets the round's aggregator key itself).
REDUCE_STREAM = 0x5ED
# A malicious client's forgery uses fold_in(its aggregator key, ATTACK_STREAM); an attack on
# the whole cohort fold_in(the round's aggregator key, ATTACK_STREAM).
ATTACK_STREAM = 0xBAD


def split_round_key(root: jax.Array, r: jax.Array):
    """(sampling, clients, aggregator) keys of round r."""
    return jax.random.split(jax.random.fold_in(root, r), 3)


def client_randomness(clients_key: jax.Array, client_id: jax.Array, num_bits: int):
    """Client i's training key, aggregator key and `num_bits` shuffle words.

    Everything derives from fold_in(clients_key, client_id), so a client's randomness does
    not depend on its position in the cohort or on chunking. One `random.bits` call makes
    all of it: on XLA:CPU each PRNG call is a rolled loop with a fixed cost, so a round
    makes as few as it can.
    """
    key = jax.random.fold_in(clients_key, client_id)
    shape = jax.random.key_data(key).shape
    words = math.prod(shape)
    bits = jax.random.bits(key, (2 * words + num_bits,), jnp.uint32)
    impl = jax.random.key_impl(key)
    k_train = jax.random.wrap_key_data(bits[:words].reshape(shape), impl=impl)
    k_agg = jax.random.wrap_key_data(bits[words:2 * words].reshape(shape), impl=impl)
    return k_train, k_agg, bits[2 * words:]


# Up to this many clients a cohort is drawn by `random.choice` (a permutation of all of
# them); above it from draws with replacement, at a cost set by the cohort size only.
PERMUTATION_MAX_CLIENTS = 4096


def sample_cohort(key: jax.Array, num_clients: int, m: int) -> jax.Array:
    """m distinct client ids, every m-subset equally likely, in random order.

    Small populations use `jax.random.choice(..., replace=False)`, which permutes all N ids
    (O(N log N): 5 ms a round for N = 10,000 on a 2-core CPU, more than a small model's
    whole round); so do cohorts of more than half the population, where N log N is
    O(m log m). Otherwise the cohort is the first m distinct ids of a sequence of uniform
    draws with replacement (sequential sampling that skips repeats, which draws every
    m-subset with equal probability, in random order): `_draws_for_distinct` draws, enough
    to hold m distinct ids except with negligible probability (a fresh sequence is drawn
    then), found with one sort. O(m log m) whatever N is: 3 ms for m = 10,000 of a
    million on a 2-core CPU, where Floyd's algorithm (m sequential steps of m
    comparisons) took 60 ms.
    """
    if num_clients <= PERMUTATION_MAX_CLIENTS or 2 * m > num_clients:
        return jax.random.choice(key, num_clients, (m,), replace=False).astype(jnp.int32)
    draws = _draws_for_distinct(num_clients, m)

    def attempt(k):
        ids = jax.random.randint(k, (draws,), 0, num_clients, dtype=jnp.int32)
        order = jnp.argsort(ids, stable=True)  # equal ids stay in draw order
        ranked = ids[order]
        new = jnp.zeros(draws, bool).at[order].set(
            jnp.concatenate([jnp.ones(1, bool), ranked[1:] != ranked[:-1]]))
        slot = jnp.cumsum(new.astype(jnp.int32)) - 1  # rank among first occurrences
        slot = jnp.where(new & (slot < m), slot, m)
        return jnp.zeros(m, jnp.int32).at[slot].set(ids, mode="drop"), jnp.sum(new)

    def retry(carry):
        i, _, _ = carry
        return (i + 1, *attempt(jax.random.fold_in(key, i)))

    # Whether a sequence holds m distinct ids does not depend on which ids they are, so
    # drawing a fresh one until it does keeps every subset equally likely.
    return jax.lax.while_loop(lambda c: c[2] < m, retry, (jnp.int32(1), *attempt(key)))[1]


def poisson_cohort(key: jax.Array, num_clients: int, rate: float,
                   slots: int) -> tuple[jax.Array, jax.Array]:
    """Poisson sampling (every client joins with probability `rate`) into `slots` slots:
    ([slots] ids, [slots] live), the joined clients first; where more than `slots` join,
    a uniformly random `slots` of them.

    Up to PERMUTATION_MAX_CLIENTS clients (or when the slots are more than half of them, or
    above 2^24 clients, which a float32 count would round) one bit is drawn per client.
    Otherwise the same distribution is drawn at a cost set by the slots: the number who
    join is Binomial(N, rate), and given that number k, who joins is a uniform k-subset,
    so the first min(k, slots) of a uniformly ordered `slots`-subset (`sample_cohort`) are
    the kept clients. One bit per client cost 180-250 ms a round at N = 10^6 on a 2-core
    CPU (a top-k over the N bits); this costs 0.5-5 ms.
    """
    if (num_clients <= PERMUTATION_MAX_CLIENTS or 2 * slots > num_clients
            or num_clients > 2 ** 24):
        bits = jax.random.bits(key, (num_clients,), jnp.uint32)
        return poisson_sample(bits, rate, jnp.int32(num_clients), slots, compact=True)
    k_count, k_ids = jax.random.split(key)
    joined = jax.random.binomial(k_count, float(num_clients), rate)
    return sample_cohort(k_ids, num_clients, slots), jnp.arange(slots) < joined


def _draws_for_distinct(num_clients: int, m: int) -> int:
    """How many uniform draws from N ids hold m distinct ones except with probability
    ~1e-15: m plus the expected number of repeats r = D - N(1 - exp(-D/N)) among D draws,
    plus 8 standard deviations (the distinct count's variance is at most min(r, D - r))
    and 8; at most 2m + 64 (m <= N/2 needs ~1.4 m on average)."""
    draws = m
    for _ in range(100):
        repeats = draws + num_clients * math.expm1(-draws / num_clients)
        spread = math.sqrt(max(0.0, min(repeats, draws - repeats)))
        more = min(m + math.ceil(repeats + 8 * spread + 8), 2 * m + 64)
        if more <= draws:
            break
        draws = more
    return draws


# Above this many bytes, fused rounds draw their randomness round by round (see
# RoundProgram._hoist_draws).
HOISTED_DRAW_BYTES = 32 << 20


class RoundDraws(NamedTuple):
    """One round's randomness (or a stack of rounds', with a leading round axis).

    `clients` holds client_randomness(k_clients, cid) for every cohort client when it was
    drawn up front, as ([m] training keys, [m] aggregator keys, [m, words] shuffle words);
    when it is None each client draws its own inside the cohort map, so memory stays
    bounded by the chunk.
    """

    cohort: jax.Array  # [m] client ids
    live: jax.Array  # [m] bool: the slot holds a client of this round (Poisson padding: False)
    k_clients: jax.Array  # the round's client key
    k_agg: jax.Array  # the aggregator's round key
    clients: tuple | None = None


class RoundProgram:
    """Compiles and runs rounds of `algorithm` on one dataset with a fixed cohort size."""

    def __init__(self, algorithm: Algorithm, problem: Problem, aggregator: AggregatorPart,
                 schedule: Schedule, *, num_clients: int, max_client_size: int,
                 clients_per_round: int, clients_per_chunk: int | None, unroll: int | bool,
                 sampling: ClientSampling | None = None, preprocess=None,
                 stats_mode: str | None = None, mesh=None, attack: UpdateAttack | None = None,
                 malicious: np.ndarray | None = None):
        """`preprocess(batch, rng, train)` (data.augment.Preprocess) converts and augments
        each local batch on device; None feeds the stored features as they are.

        `stats_mode`: how clients' running statistics (the model's `stats`) evolve. None:
        they are fixed (part of the model state every client receives). 'averaged': every
        client starts from `SimState.stats` and updates them in its training steps; the
        new global statistics are their mean over the round's clients with the clients'
        aggregation weights. 'local': as 'averaged', but every client starts from and keeps
        its own (the algorithm, algorithms.LocalStatistics, holds them per client);
        `SimState.stats` stays as it is.

        `mesh`: a `jax.sharding.Mesh` (engine.mesh) to spread each cohort over, or None
        for one device.

        `malicious`: [num_clients] bool, the clients that are malicious (fixed for the run, a
        constant of the program; each round logs how many its cohort holds); `attack`: what
        they do to their updates (`UpdateAttack`), or None.
        """
        if stats_mode not in (None, "averaged", "local"):
            raise ValueError(f"stats_mode must be None, 'averaged' or 'local', got {stats_mode!r}")
        self.stats_mode = stats_mode
        self.algorithm, self.problem, self.aggregator = algorithm, problem, aggregator
        self.preprocess = preprocess
        self.schedule = schedule
        self.num_clients, self.max_client_size = num_clients, max_client_size
        self.sampling = sampling or ClientSampling("fixed", clients_per_round)
        self.clients_per_round = self.sampling.slots
        if self.sampling.kind == "cyclic" and num_clients // self.sampling.groups < self.sampling.slots:
            raise UserError(f"cyclic participation in {self.sampling.groups} groups of "
                            f"{num_clients} clients leaves {num_clients // self.sampling.groups} "
                            f"clients per group, fewer than the {self.sampling.slots} a round "
                            f"takes; lower privacy.min_separation or clients_per_round")
        self.clients_per_chunk, self.unroll = clients_per_chunk, unroll
        self.mesh = mesh
        self.attack, self.malicious = self._check_attack(attack, malicious, aggregator, num_clients)
        self._jit = jax.jit(self._run_rounds, static_argnames=("max_rounds",),
                            donate_argnames=("state",))

    @staticmethod
    def _check_attack(attack, malicious, aggregator, num_clients):
        if malicious is None:
            if attack is not None:
                raise ValueError("an attack needs the malicious mask")
            return None, None
        malicious = np.asarray(malicious, bool)
        if malicious.shape != (num_clients,):
            raise ValueError(f"malicious must be a [{num_clients}] bool mask, got shape "
                             f"{malicious.shape}")
        if attack is not None and attack.cohort is not None and aggregator.client_init is not None:
            raise UserError("an attack that forges updates from the whole cohort cannot run "
                            "with an aggregator part that keeps a state per client (error "
                            "feedback): drop error_feedback or choose a per-client attack")
        return attack, malicious

    def init(self, params: PyTree, client_states: str = "device", stats: PyTree = None) -> SimState:
        """The initial state; a stateful algorithm's client states are C copies of
        `client_state_init(params)`, as device arrays or (client_states='host') numpy.
        `stats`: the model's initial running statistics (kept where clients update them)."""
        state = SimState(self.algorithm.server_init(params), self.aggregator.init(params),
                         self.initial_client_states(params, host=client_states == "host"),
                         jax.tree_util.tree_map(jnp.array, stats)
                         if self.stats_mode is not None else None)
        return self.place(state, host_clients=client_states == "host")

    def place(self, state: SimState, host_clients: bool = False) -> SimState:
        """`state` on the mesh (server state replicated, client states split by client);
        unchanged without a mesh. Host-kept client states stay where they are."""
        if self.mesh is None:
            return state
        shardings = mesh_lib.state_shardings(self.mesh, state)
        if host_clients:
            shardings = shardings._replace(clients=None)
            clients, state = state.clients, state._replace(clients=None)
            return mesh_lib.put(state, shardings)._replace(clients=clients)
        return mesh_lib.put(state, shardings)

    def stacked_cohort_bytes(self, params: PyTree) -> int:
        """The bytes of the round's updates held at once where an aggregator part reduces the
        stacked cohort or an attack forges from it (cohort slots x the update), else 0."""
        if self.aggregator.reduce is None and (self.attack is None or self.attack.cohort is None):
            return 0
        return self.clients_per_round * tree_bytes(params)

    def one_client_state(self, params: PyTree) -> PyTree:
        """One client's state (no client axis): the algorithm's, or where the aggregator
        keeps a state per client, `ClientTables` of both; None when neither does."""
        own = self.algorithm.client_state_init(params)
        if self.aggregator.client_init is None:
            return own
        return ClientTables(own, self.aggregator.client_init(params))

    def algorithm_states(self, clients: PyTree) -> PyTree:
        """The algorithm's part of a client-state table (what personalized evaluation reads)."""
        return clients.algorithm if isinstance(clients, ClientTables) else clients

    def initial_client_states(self, params: PyTree, host: bool = False) -> PyTree:
        one = self.one_client_state(params)
        if one is None:
            return None
        if host:
            return jax.tree_util.tree_map(
                lambda x: np.repeat(np.asarray(x)[None], self.num_clients, axis=0), one)
        return jax.tree_util.tree_map(
            lambda x: jnp.repeat(jnp.asarray(x)[None], self.num_clients, axis=0), one)

    def compile(self, state: SimState, data: "DeviceData", model_state: PyTree,
                root: jax.Array, max_rounds: int, rows: jax.Array | None = None):
        """Compiles once; returns `run(state, data, model_state, root, start, count, rows)`.

        `run` executes rounds start .. start+count-1 (count <= max_rounds, not static, so
        any segment length reuses the same executable) and returns the new state and the
        metrics of those rounds, each stacked in a buffer of length max_rounds (entries
        past `count` are zero).

        Client states: with `rows=None`, `state.clients` holds one row per client (row =
        client id). Otherwise `state.clients` is a smaller table and `rows` ([C] int32) maps
        each client id to its row there (host-kept states: the table holds the rows of the
        clients these rounds sample, see engine.client_states).

        The executable comes from the process's program cache (engine.program_cache) where
        a program built alike was compiled before (`self.cache_hit` says which); the
        algorithm's runtime hyperparameters (`Algorithm.hyperparams`) are its inputs.
        """
        hyper = self.algorithm.hyperparams()
        args = (state, data, model_state, root, jnp.int32(0), jnp.int32(1), rows, hyper)

        def build():
            compiled = self._jit.lower(*args, max_rounds=max_rounds).compile()
            shardings = compiled.input_shardings[0]
            return compiled, shardings[:4] + shardings[6:7]

        (compiled, placements), self.cache_hit = program_cache.PROGRAMS.get_or_compile(
            self.program_key(args, max_rounds), build)

        def run(state, data, model_state, root, start, count, rows=None):
            if not 1 <= count <= max_rounds:
                raise ValueError(f"count must be in [1, {max_rounds}], got {count}")
            if self.mesh is not None:  # e.g. host-streamed tables, restored checkpoints
                state, data, model_state, root, rows = mesh_lib.put(
                    (state, data, model_state, root, rows), placements)
            return compiled(state, data, model_state, root, jnp.int32(start), jnp.int32(count),
                            rows, hyper)

        return run

    def compile_trials(self, states: SimState, data: "DeviceData", model_state: PyTree,
                       roots: jax.Array, hypers: dict, max_rounds: int,
                       stacked_model_state: bool = False, vmapped: bool = True):
        """`compile` for a sweep: T trials of this program in one, over a leading trial
        axis of `states` (every leaf [T, ...]), `roots` ([T] keys: each trial's seed) and
        `hypers` (the algorithm's runtime hyperparameters, every leaf [T]). The data is
        shared; the model state too, unless `stacked_model_state` (then it has the trial
        axis as well, e.g. each seed's dropout key). Returns `run(states, data,
        model_state, roots, start, count)` -> (new states, metrics [T, max_rounds, ...]).

        `vmapped`: the trials side by side (vmap), or one after another inside the
        program (`lax.map`: the same results, for steps too heavy to batch profitably).
        On a mesh (`self.mesh`) the trial axis is split over its devices instead of each
        cohort: device i runs trials i*T/d .. (i+1)*T/d - 1 with whole cohorts (T must be
        a multiple of the device count d; the caller pads).

        The trials must be programs built alike (the same `program_key` but for the
        values of their runtime inputs); the aggregator's state (e.g. a DP clip norm and
        noise multiplier) is part of each trial's state. Client states and the data stay
        on the device (no host streaming); `compile` has those."""
        mesh = self.mesh
        devices = 1 if mesh is None else mesh.size
        trials_count = jax.tree_util.tree_leaves(roots)[0].shape[0]
        if trials_count % devices:
            raise ValueError(f"{trials_count} trials do not split over {devices} devices")
        single = self
        if mesh is not None:  # every trial's cohort on one device, the trials split
            single = copy.copy(self)
            single.mesh = None
            split = NamedSharding(mesh, PartitionSpec(mesh_lib.CLIENTS))
            whole = mesh_lib.replicated(mesh)

            def place(states, data, model_state, roots):
                per_trial = lambda tree: jax.tree_util.tree_map(lambda _: split, tree)
                return mesh_lib.put(
                    (states, data, model_state, roots),
                    (per_trial(states), jax.tree_util.tree_map(lambda _: whole, data),
                     (per_trial if stacked_model_state else
                      lambda t: jax.tree_util.tree_map(lambda _: whole, t))(model_state),
                     split))

            states, data, model_state, roots = place(states, data, model_state, roots)
            hypers = mesh_lib.put(hypers, jax.tree_util.tree_map(lambda _: split, hypers))
        args = (states, data, model_state, roots, jnp.int32(0), jnp.int32(1), hypers)
        ms_axis = 0 if stacked_model_state else None

        def trials(states, data, model_state, roots, start, count, hypers):
            def one(s, m, r, h):
                return single._run_rounds(s, data, m, r, start, count, None, h,
                                          max_rounds=max_rounds)

            def group(states, model_state, roots, hypers):
                if vmapped:
                    return jax.vmap(one, in_axes=(0, ms_axis, 0, 0))(
                        states, model_state, roots, hypers)
                if stacked_model_state:
                    return jax.lax.map(lambda a: one(*a), (states, model_state, roots, hypers))
                return jax.lax.map(lambda a: one(a[0], model_state, a[1], a[2]),
                                   (states, roots, hypers))

            if devices == 1:
                return group(states, model_state, roots, hypers)
            # [T, ...] -> [d, T/d, ...]: the outer axis is split over the devices.
            fold = lambda tree: jax.tree_util.tree_map(
                lambda x: x.reshape((devices, -1) + x.shape[1:]), tree)
            unfold = lambda tree: jax.tree_util.tree_map(
                lambda x: x.reshape((-1,) + x.shape[2:]), tree)
            out = jax.vmap(group, in_axes=(0, ms_axis, 0, 0))(
                fold(states), fold(model_state) if stacked_model_state else model_state,
                fold(roots), fold(hypers))
            return unfold(out)

        def build():
            return jax.jit(trials, donate_argnums=(0,)).lower(*args).compile()

        key = ("trials", stacked_model_state, vmapped, devices,
               single.program_key(args, max_rounds), program_cache.structural_key(mesh))
        compiled, self.cache_hit = program_cache.PROGRAMS.get_or_compile(key, build)

        def run(states, data, model_state, roots, start, count):
            if not 1 <= count <= max_rounds:
                raise ValueError(f"count must be in [1, {max_rounds}], got {count}")
            if mesh is not None:  # e.g. restored from a checkpoint: on the host
                states, data, model_state, roots = place(states, data, model_state, roots)
            return compiled(states, data, model_state, roots, jnp.int32(start),
                            jnp.int32(count), hypers)

        run.compiled = compiled  # e.g. its memory_analysis()
        return run

    def program_key(self, args: tuple, max_rounds: int) -> tuple:
        """What the compiled program depends on (engine.program_cache): everything this
        program is built from except the algorithm's runtime hyperparameters, and the
        shapes, dtypes and placements of `args`."""
        algorithm = self.algorithm
        # The round replaces the problem's model state with the traced one it is called
        # with (`_round`), so only its shapes count, not its values (e.g. the seed's
        # dropout key).
        problem = self.problem._replace(
            model_state=program_cache.signature(self.problem.model_state))
        built = (problem, self.aggregator, self.preprocess, self.schedule,
                 self.num_clients, self.max_client_size, self.sampling, self.clients_per_chunk,
                 self.unroll, self.stats_mode, self.mesh, self.attack, self.malicious)
        return (type(self), program_cache.structural_key(algorithm, tuple(algorithm.hyperparams())),
                program_cache.structural_key(built), program_cache.signature(args), max_rounds,
                program_cache.environment())

    def _bound(self, hyper: dict) -> "RoundProgram":
        """This program with the algorithm's runtime hyperparameters set to `hyper`."""
        if not hyper:
            return self
        bound = copy.copy(self)
        bound.algorithm = self.algorithm.with_hyperparams(hyper)
        return bound

    # -- inside the jit ---------------------------------------------------------------
    def _run_rounds(self, state, data, model_state, root, start, count, rows, hyper, *,
                    max_rounds):
        return self._bound(hyper)._rounds(state, data, model_state, root, start, count, rows,
                                          max_rounds)

    def _rounds(self, state, data, model_state, root, start, count, rows, max_rounds):
        if self._hoist_draws(max_rounds):
            rounds = start + jnp.arange(max_rounds, dtype=jnp.int32)
            draws = jax.vmap(lambda r: self._draw_round(root, r, per_client=True))(rounds)
            drawn_for = lambda i: jax.tree_util.tree_map(lambda x: x[i], draws)
        else:
            drawn_for = lambda i: self._draw_round(root, start + i, per_client=False)
        shapes = jax.eval_shape(
            lambda s: self._round(s, data, model_state, drawn_for(0), rows)[1], state)
        buffer = jax.tree_util.tree_map(lambda sd: jnp.zeros((max_rounds, *sd.shape), sd.dtype), shapes)

        def one(i, carry):
            state, buffer = carry
            state, metrics = self._round(state, data, model_state, drawn_for(i), rows)
            buffer = jax.tree_util.tree_map(lambda b, m: b.at[i].set(m), buffer, metrics)
            return state, buffer

        if max_rounds == 1:
            state, buffer = one(0, (state, buffer))
        else:
            state, buffer = jax.lax.fori_loop(0, count, one, (state, buffer))
        if self.mesh is not None:  # the next call receives the state as it was placed
            state = jax.lax.with_sharding_constraint(
                state, mesh_lib.state_shardings(self.mesh, state))
            buffer = jax.lax.with_sharding_constraint(buffer, mesh_lib.replicated(self.mesh))
        return state, buffer

    def _draw_round(self, root, r, *, per_client: bool) -> RoundDraws:
        """Round r's cohort and keys, and with `per_client` every cohort client's draws."""
        k_sample, k_clients, k_agg = split_round_key(root, r)
        if self.sampling.kind == "poisson":
            cohort, live = poisson_cohort(k_sample, self.num_clients, self.sampling.rate,
                                          self.clients_per_round)
        elif self.sampling.kind in ("cyclic", "cyclic_poisson"):
            table = jnp.asarray(cyclic_groups(self.num_clients, self.sampling.groups))
            members = table[r % self.sampling.groups]
            joined = members >= 0
            if self.sampling.kind == "cyclic_poisson":  # each member joins w.p. rate
                joined &= jax.random.uniform(jax.random.fold_in(k_sample, 1),
                                             members.shape) < self.sampling.rate
            # a uniformly random order of the joined members, the others last
            keys = jnp.where(joined, jax.random.uniform(k_sample, members.shape), 2.0)
            order = jnp.argsort(keys)[:self.clients_per_round]
            cohort, live = jnp.maximum(members[order], 0), joined[order]
        else:
            cohort = sample_cohort(k_sample, self.num_clients, self.clients_per_round)
            live = jnp.ones(self.clients_per_round, bool)
        clients = jax.vmap(self._client_draws, in_axes=(None, 0))(k_clients, cohort) if per_client else None
        return RoundDraws(cohort, live, k_clients, k_agg, clients)

    def cohorts(self, root: jax.Array, start: int, count: int) -> tuple[jax.Array, jax.Array]:
        """The cohorts of rounds start .. start+count-1: ([count, m] ids, [count, m] live),
        exactly as the rounds draw them (for participation counts kept on the host)."""
        if not hasattr(self, "_cohorts_jit"):
            def draw(root, rounds):
                drawn = jax.vmap(lambda r: self._draw_round(root, r, per_client=False))(rounds)
                return drawn.cohort, drawn.live
            self._cohorts_jit = jax.jit(draw)
        return self._cohorts_jit(root, jnp.arange(start, start + count, dtype=jnp.int32))

    @property
    def _train_preprocess(self):
        if self.preprocess is None:
            return None
        return functools.partial(self.preprocess, train=True)

    def _client_draws(self, k_clients, cid):
        return client_randomness(k_clients, cid, bits_needed(self.schedule, self.max_client_size))

    def _poisson_chunk(self, devices: int = 1) -> int:
        """Chunk size for a Poisson cohort: a quarter of the expected cohort (of a
        device's share of it on a mesh), so the padding run beyond the real clients
        averages ~1/8 of it, or the engine's smaller chunk (e.g. 1 for heavy models on
        CPU)."""
        group = (self.num_clients if self.sampling.kind == "poisson"
                 else self.num_clients // self.sampling.groups)  # cyclic Poisson: one group
        expected = self.sampling.rate * group / devices
        k = max(1, math.ceil(expected / 4))
        if self.clients_per_chunk is not None:
            k = min(k, self.clients_per_chunk)
        return min(k, self.clients_per_round)

    def _hoist_draws(self, max_rounds: int) -> bool:
        """Whether a call draws the randomness of all its rounds up front, in one batch.

        On XLA:CPU every PRNG call is a rolled loop with a fixed cost of ~0.1 ms, and a
        round makes several; drawing all fused rounds at once pays that once per call. The
        values are those `_draw_round` gives round by round (threefry is exact under vmap),
        so only speed depends on this. Draws that would take more than HOISTED_DRAW_BYTES
        are made round by round inside the loop instead.
        """
        num_bits = bits_needed(self.schedule, self.max_client_size)
        # uint32 words per client: its shuffle words, plus at most 16 for its id and keys
        size = max_rounds * self.clients_per_round * (num_bits + 16) * 4
        return max_rounds > 1 and size <= HOISTED_DRAW_BYTES

    def _round(self, state: SimState, data: DeviceData, model_state, drawn: "RoundDraws",
               rows: jax.Array | None = None):
        algorithm, aggregator = self.algorithm, self.aggregator
        averaged = self.stats_mode == "averaged"
        attack = self.attack
        # An attacker that forges its update from the whole cohort's sees them stacked; the
        # aggregator's per-client transforms then run on the stacked (attacked) updates.
        forged = attack is not None and attack.cohort is not None
        # A part that reduces the cohort itself gets every client's update, stacked.
        stacked = aggregator.reduce is not None or forged
        if self.stats_mode is not None:
            model_state = merge(model_state, state.stats)
        problem = self.problem._replace(model_state=model_state)
        cohort = drawn.cohort
        broadcast = algorithm.broadcast(state.server)
        table = state.clients
        row_of = (lambda cid: cid) if rows is None else (lambda cid: rows[cid])
        own_state = aggregator.client_init is not None  # the aggregator keeps client rows
        sent = {}  # what a client sends, recorded when the client function is traced

        def client(per_client, data=data):
            cid, live, drawn_for_client, own = per_client
            k_train, k_agg_client, bits = (drawn_for_client if drawn_for_client is not None
                                           else self._client_draws(drawn.k_clients, cid))
            n = data.sizes[cid]
            idx, mask = client_batches(self.schedule, bits, n, self.max_client_size)
            steps_live = (jnp.broadcast_to(n > 0, (self.schedule.num_steps,))
                          if self.schedule.sampling_rate is not None else None)
            local = LocalData(data.features, data.offsets[cid], idx, mask, n, cid, self.unroll,
                              live=steps_live, preprocess=self._train_preprocess,
                              stats=state.stats if self.stats_mode is not None else None,
                              max_rows=self.max_client_size)
            # Without a mesh the client's state row is gathered here, inside the map, so
            # only a chunk's rows are materialised at a time.
            if own is None and table is not None:
                own = jax.tree_util.tree_map(lambda t: t[row_of(cid)], table)
            out = algorithm.client_update(
                problem._replace(num_examples=n), broadcast, local, k_train,
                own.algorithm if own_state else own)
            metrics = dict(out.metrics)
            client_stats = metrics.pop(STATS_KEY, local.stats)
            sent.update(delta=tree_entries(out.delta), extras=tree_bytes(out.extras),
                        stats=tree_bytes(client_stats) if averaged else 0)
            delta = self._attacked(out.delta, cid, k_agg_client)
            if forged:  # the aggregator's client transforms run after the cohort's attack
                report, new_row = {}, out.client_state
            elif own_state:
                delta, report, own_agg = aggregator.client(delta, state.aggregator,
                                                           k_agg_client, own.aggregator)
                new_row = ClientTables(out.client_state, own_agg)
            else:
                delta, report = aggregator.client(delta, state.aggregator, k_agg_client)
                new_row = out.client_state
            # A padding slot (Poisson sampling) weighs nothing and reports nothing.
            weight = jnp.where(live, algorithm.client_weight(n), 0.0)
            keep = lambda tree: jax.tree_util.tree_map(lambda v: jnp.where(live, v, 0), tree)
            # Summed with the weights: the update (unless a part reduces the stacked cohort)
            # and, where they are averaged, the client's running statistics (they bypass the
            # aggregator: no clipping, noise or compression).
            summed = (() if stacked else delta, client_stats if averaged else ())
            return weight, summed, (keep(metrics), keep(report), new_row, keep(out.extras),
                                    ((keep(delta), weight, k_agg_client) if forged else
                                     (keep(delta), weight) if stacked else ()))

        poisson = self.sampling.padded
        if self.mesh is not None:
            # On a mesh a device can read only its own rows of a split table: the cohort's
            # rows are gathered here and each device receives its clients' rows.
            own = (None if table is None else
                   jax.tree_util.tree_map(lambda t: t[row_of(cohort)], table))
            # Rows streamed to each device for its own clients (offsets [devices, C]) are
            # split across the devices; data placed whole is replicated.
            split = (data.features, data.offsets) if data.offsets.ndim == 2 else None

            def on_device(pc, alive, own_rows=None):
                local = data if own_rows is None else data._replace(
                    features=own_rows[0], offsets=own_rows[1][0])
                return client((pc[0], alive, pc[1], pc[2]), local)

            total, denominator, outs = mesh_lib.map_clients_on_mesh(
                self.mesh, on_device, (cohort, drawn.clients, own), drawn.live,
                self._poisson_chunk(self.mesh.size) if poisson else self.clients_per_chunk,
                leading_live=poisson, split=split)
        elif poisson:
            # The real clients fill the first slots: run only the chunks that hold them.
            total, denominator, outs = map_clients(
                client, (cohort, drawn.live, drawn.clients, None), self._poisson_chunk(),
                count=jnp.sum(drawn.live.astype(jnp.int32)))
        else:
            total, denominator, outs = map_clients(
                client, (cohort, drawn.live, drawn.clients, None), self.clients_per_chunk)
        train_sums, client_reports, new_rows, extras, cohort_updates = outs
        total, stats_total = total
        if forged:
            cohort_updates, client_reports, total = self._forge(
                cohort_updates, drawn, cohort, state.aggregator)
        new_stats = state.stats
        if averaged:
            new_stats = jax.tree_util.tree_map(
                lambda t, old: jnp.where(denominator > 0, t / jnp.maximum(denominator, 1e-30),
                                         old).astype(old.dtype), stats_total, state.stats)
        total, denominator, agg_state, agg_metrics, reports, num_live = self._aggregate(
            total, denominator, cohort_updates, client_reports, state.aggregator, drawn)
        sums = RoundSums(jax.tree_util.tree_map(lambda v: jnp.sum(v, axis=0), extras), num_live,
                         self.num_clients)
        server = algorithm.server_update(state.server, divide(total, denominator), sums)
        (server, agg_state, new_stats), written = self._unless_failed(
            agg_metrics, (server, agg_state, new_stats), state, drawn.live)
        table = self._scatter_rows(table, new_rows, cohort, written, row_of)
        metrics = self._round_metrics(train_sums, reports, agg_metrics, data, drawn, num_live)
        metrics.update(self._wire_metrics(sent, broadcast, num_live))
        if self.malicious is not None:
            metrics["malicious_clients"] = jnp.sum(
                jnp.asarray(self.malicious)[cohort] & drawn.live).astype(jnp.int32)
        # For the host's divergence guard (not logged): are the new global parameters finite?
        metrics["_params_finite"] = _all_finite(algorithm.params(server))
        return SimState(server, agg_state, table, new_stats), metrics

    def _aggregate(self, total, denominator, cohort_updates, client_reports, agg_state,
                   drawn: "RoundDraws"):
        """The reduction (a reducing part's over the stacked cohort, else the streamed sum
        as it is) and the finalizers: (total, denominator, the aggregator's new state, its
        metrics, the reports summed over the clients, the number of clients)."""
        reduced = {}
        if self.aggregator.reduce is not None:
            total, denominator, *more = self.aggregator.reduce(
                Cohort(cohort_updates[0], cohort_updates[1], drawn.live), agg_state,
                jax.random.fold_in(drawn.k_agg, REDUCE_STREAM))
            reduced = more[0] if more else {}
        num_live = jnp.sum(drawn.live.astype(jnp.float32))
        reports = {k: jnp.sum(v) for k, v in client_reports.items()}
        total, denominator, agg_state, agg_metrics = self.aggregator.finalize(
            total, denominator, {**reports, **reduced, "clients": num_live}, agg_state,
            drawn.k_agg)
        return total, denominator, agg_state, {**reduced, **agg_metrics}, reports, num_live

    def _attacked(self, delta: PyTree, cid: jax.Array, k_agg_client: jax.Array) -> PyTree:
        """A client's update as it sends it: the attack's forgery where the client is
        malicious and the attack changes updates one by one, else the one it computed."""
        if self.attack is None or self.attack.client is None:
            return delta
        bad = jnp.asarray(self.malicious)[cid]
        forged = self.attack.client(delta, jax.random.fold_in(k_agg_client, ATTACK_STREAM), cid)
        return jax.tree_util.tree_map(lambda f, d: jnp.where(bad, f.astype(d.dtype), d),
                                      forged, delta)

    def _forge(self, cohort_updates, drawn: "RoundDraws", cohort: jax.Array, agg_state):
        """The cohort's updates after an attack that forges from all of them, then the
        aggregator's per-client transforms: (what the reduction receives, the per-client
        reports, the weighted sum of the transformed updates or () for a reducing part)."""
        updates, weights, keys = cohort_updates
        live = drawn.live
        bad = jnp.asarray(self.malicious)[cohort] & live
        updates = self.attack.cohort(updates, weights, bad, live,
                                     jax.random.fold_in(drawn.k_agg, ATTACK_STREAM))
        sent, reports = jax.vmap(lambda d, k: self.aggregator.client(d, agg_state, k))(updates, keys)
        keep = lambda tree: jax.tree_util.tree_map(
            lambda v: jnp.where(live.reshape(-1, *[1] * (v.ndim - 1)), v, 0), tree)
        sent, reports = keep(sent), keep(reports)
        if self.aggregator.reduce is not None:
            return (sent, weights), reports, ()
        total = jax.tree_util.tree_map(
            lambda x: jnp.tensordot(weights, x.astype(jnp.float32), axes=1), sent)
        return (), reports, total

    @staticmethod
    def _unless_failed(agg_metrics: dict, new: tuple, state: SimState, live: jax.Array):
        """The round's new (server, aggregator, stats) states and which slots write their
        client rows back; where the aggregator reports ROUND_FAILED, the states before the
        round and no slot (the round has no effect). Logs round_failed as 0 or 1."""
        failed = agg_metrics.pop(ROUND_FAILED, None)
        if failed is None:
            return new, live
        agg_metrics[ROUND_FAILED] = failed.astype(jnp.int32)
        old = (state.server, state.aggregator, state.stats)
        kept = jax.tree_util.tree_map(lambda n, o: jnp.where(failed, o, n), new, old)
        return kept, live & ~failed

    def _wire_metrics(self, sent: dict, broadcast: PyTree, num_live: jax.Array) -> dict:
        """Bytes on the wire per client and in total this round: up, the update as the
        aggregator's parts encode it (`AggregatorPart.uplink`) plus what the algorithm sends
        unencoded (float32 extras, averaged running statistics); down, the broadcast as the
        algorithm sends it (`Algorithm.downlink`)."""
        message = Message(sent["delta"], 32)
        if self.aggregator.uplink is not None:
            message = self.aggregator.uplink(message, self.clients_per_round)
        up = float(message.bytes + sent["extras"] + sent["stats"])
        down = float(self.algorithm.downlink(broadcast).bytes)
        return {"uplink_bytes_per_client": jnp.float32(up), "uplink_bytes": up * num_live,
                "downlink_bytes_per_client": jnp.float32(down), "downlink_bytes": down * num_live}

    @staticmethod
    def _scatter_rows(table, new_rows, cohort, live, row_of):
        """The client-state table with the cohort's new rows written back; padding slots
        (Poisson) write nothing (their index is out of range and dropped), and a real cohort
        never repeats a client."""
        if table is None:
            return None
        size = jax.tree_util.tree_leaves(table)[0].shape[0]
        target = jnp.where(live, row_of(cohort), size)
        return jax.tree_util.tree_map(
            lambda t, new: t.at[target].set(new.astype(t.dtype), mode="drop"), table, new_rows)

    def _round_metrics(self, train_sums, reports, agg_metrics, data, drawn, num_live) -> dict:
        """Training metrics are means over every example processed by the cohort this round;
        the aggregator's per-client reports are means over the round's clients."""
        count = jnp.sum(train_sums["count"])
        metrics = {f"train_{k}": jnp.sum(v) / jnp.maximum(count, 1.0)
                   for k, v in train_sums.items() if k != "count"}
        metrics["cohort_examples"] = jnp.sum(jnp.where(drawn.live, data.sizes[drawn.cohort], 0))
        if self.sampling.padded:
            metrics["cohort_size"] = num_live.astype(jnp.int32)
        metrics.update({k: v / jnp.maximum(num_live, 1.0) for k, v in reports.items()
                        if not k.startswith("_")})
        metrics.update(agg_metrics)
        return metrics
