"""What the engine runs: the specification of an algorithm and of an aggregator part.

Algorithms (`fedjax_sim.algorithms`) and aggregators (`fedjax_sim.aggregators`) implement
these contracts and import this module; the engine imports nothing above itself.

One round, as the engine executes it (engine.round; m = cohort slots, C = population):

    server_state                                   the algorithm's, one per run
    b = algorithm.broadcast(server_state)          what every client receives
    for each cohort slot i (vmapped, chunked or one by one):
        s_i = client_states[id_i]                  (stateful algorithms: one row per client)
        out_i = algorithm.client_update(problem, b, local_i, rng_i, s_i)   -> ClientOutput
        d_i, report_i = aggregator.client(out_i.delta, agg_state, rng'_i)  (per client)
        w_i = algorithm.client_weight(n_i)   (0 for a padding slot of a Poisson cohort)
    reduction, one of:
        streaming (default):  total = sum_i w_i d_i,  denominator = sum_i w_i   (float32,
                              memory proportional to a chunk of clients)
        stacked:              total, denominator = part.reduce(Cohort(d [m, ...], w [m],
                              live [m]), agg_state, rng)   (a part that needs every client)
    total, denominator, agg_state, metrics = aggregator.finalize(total, denominator,
                                                 sums of reports, agg_state, rng)
    (a metric ROUND_FAILED that is true: the round has no effect, states stay as they were)
    server_state = algorithm.server_update(server_state, total / denominator,
                                           RoundSums(sum_i out_i.extras, clients, C))
    client_states[id_i] = out_i.client_state

Inside `client_update`, `local_i` (`ClientData`) runs the client's batch schedule; each
step computes its gradient with `problem.gradient` (or `problem.loss`). Every function
here is traced inside one `jax.jit`: it must be pure (no Python side effects, no state
written during tracing) and keep static shapes.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, ClassVar, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from fedjax_sim.engine import hyperparams as hyper_lib
from fedjax_sim.errors import UserError
from fedjax_sim.models.adapter import Model
from fedjax_sim.models.tasks import Task
from fedjax_sim.trees import merge

PyTree = Any

# Where clients update the model's running statistics (BatchNorm's mean and variance),
# each local step's batch carries the statistics the step starts from under this key, and
# `Problem.loss` reports the updated ones in its metric sums under the same key.
# `ClientData.run` threads them from step to step and returns the last ones in its sums.
STATS_KEY = "_stats"


# -- algorithms -------------------------------------------------------------------------
def nonzero(value) -> bool:
    """Whether a number that may switch a term off is on: True for a traced value (an
    algorithm's runtime hyperparameters are nonzero, see `Algorithm.hyperparams`)."""
    return isinstance(value, jax.core.Tracer) or bool(value)


class ClientOutput(NamedTuple):
    """What one client returns from `client_update`.

    delta: what the aggregator weights and averages (FedAvg: w_global - w_client, a
      pseudo-gradient); a pytree, the same structure for every client.
    metrics: sums over the client's real examples ({"loss": ..., "count": ..., ...}, as
      `ClientData.run` returns them); logged as round means.
    client_state: the client's new state (stateful algorithms; None otherwise).
    extras: values summed WITHOUT weights over the round's clients and handed to
      `server_update` in `RoundSums.extras` (e.g. SCAFFOLD's control-variate changes).
    """

    delta: PyTree
    metrics: dict
    client_state: PyTree = None
    extras: PyTree = None


class RoundSums(NamedTuple):
    """What `server_update` learns about the round besides the aggregate.

    extras: sum over the clients that took part of their `ClientOutput.extras`;
    clients: how many clients took part; population: how many clients the dataset has.
    """

    extras: PyTree
    clients: jax.Array
    population: int


class LocalSchedule(NamedTuple):
    """How long a client trains in a round (engine.batching.make_schedule).

    local_epochs=E: E shuffled passes over the client's data in batches of batch_size;
    local_steps=S: exactly S batches. Exactly one of them is set. batch_size=None: a batch
    is the client's whole data (full batch).
    """

    batch_size: int | None
    local_epochs: int | None
    local_steps: int | None

    @classmethod
    def of(cls, batch_size, local_epochs, local_steps) -> "LocalSchedule":
        """The schedule as builders take it: `local_steps` given explicitly overrides the
        default `local_epochs=1`."""
        if local_steps is not None and local_epochs == 1:
            local_epochs = None
        return cls(batch_size, local_epochs, local_steps)


WEIGHTINGS = ("num_examples", "uniform")


class ClientData(Protocol):
    """What `client_update` sees of its client's data inside the round's jit
    (engine.local.LocalData implements it).

    num_examples: the client's example count n_i (a traced int32 scalar).
    client_id: the client's index in the dataset (a traced int32 scalar).
    num_steps: the static number of steps S of the schedule.
    real_steps(): how many of the S steps run (hold a real example).
    run(step, carry, key) -> (carry, sums): runs
        step(carry, batch, mask [B], key) -> (carry, metric sums)
      over the client's batches (`batch`: dict of [B, ...] arrays; `mask`: which of the B
      slots are real examples). A step that does not run leaves the carry unchanged and
      adds nothing to the sums. Where clients update running statistics, `sums` also
      holds the last ones under STATS_KEY.
    """

    num_examples: jax.Array
    client_id: jax.Array
    num_steps: int

    def real_steps(self) -> jax.Array: ...

    def run(self, step: Callable, carry: PyTree, key: jax.Array) -> tuple[PyTree, dict]: ...


class Problem(NamedTuple):
    """The model and task bound together as a masked loss over a batch.

    `example_gradient(loss, params, batch, mask, rng, num_examples) -> (grads, sums)`
    replaces the plain gradient, e.g. DP-SGD's clipped and noised one
    (fedjax_sim.privacy.dp_sgd); the engine sets `num_examples` to the client's size.
    """

    model: Model
    task: Task
    model_state: PyTree
    input_key: str
    example_gradient: Callable | None = None
    num_examples: jax.Array | None = None

    def loss(self, params: PyTree, batch: dict, mask: jax.Array, rng: jax.Array):
        """Mean per-example loss over the real examples of `batch`, and metric sums.

        Returns (loss, {"loss": sum, "count": n_real, <metric>: sum, ...}). Where the batch
        carries running statistics (STATS_KEY), the model runs with them and the sums
        report their training-mode update under STATS_KEY.
        """
        state = self.model_state
        stats = batch.get(STATS_KEY)
        if stats is not None:
            state = merge(state, stats)
        # Models that can leave padding slots out of batch statistics are told which they are.
        extra = {"batch_mask": mask} if self.model.takes_batch_mask else {}
        outputs, new_state = self.model.apply(params, state, batch[self.input_key],
                                              train=True, rng=rng, **extra)
        sums = self.task.masked_sums(outputs, batch[self.task.label_key], mask)
        if stats is not None:
            sums[STATS_KEY] = self.model.stats_of(new_state)
        return sums["loss"] / jnp.maximum(sums["count"], 1.0), sums

    def gradient(self, params: PyTree, batch: dict, mask: jax.Array, rng: jax.Array):
        """(gradient of the mean loss, metric sums): what a client step descends along."""
        if self.example_gradient is None:
            return jax.grad(self.loss, has_aux=True)(params, batch, mask, rng)
        return self.example_gradient(self.loss, params, batch, mask, rng, self.num_examples)


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Algorithm:
    """Base class of a federated algorithm: subclasses implement the functions below.

    Declared fields (keyword-only; every algorithm has them):
      batch_size, local_epochs, local_steps: the local schedule (`LocalSchedule`).
      weighting: 'num_examples' (w_i = n_i) or 'uniform' (w_i = 1).
    Class attributes the engine and the host loop read:
      personalized: clients have personal models (`personal_params`), evaluated per client.
      global_model: the server holds a model that is meaningful on its own (FedPer's is not:
        its head is never trained), so the pooled test set evaluates it.
      client_dp: None if client-level DP (clipping and noising the deltas) protects
        everything the client sends, else why it does not.
    """

    batch_size: int | None = 10
    local_epochs: int | None = 1
    local_steps: int | None = None
    weighting: str = "num_examples"

    personalized: ClassVar[bool] = False
    global_model: ClassVar[bool] = True
    client_dp: ClassVar[str | None] = None
    # Number fields whose values are inputs of the compiled round program, not constants
    # in it (see `hyperparams`).
    hyperparameters: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise UserError(f"weighting must be 'num_examples' or 'uniform', got {self.weighting!r}")

    def hyperparams(self) -> dict:
        """The values the round program takes as inputs (engine.hyperparams), by field:
        the numeric hyperparameters of every optimizer field made with
        `optax.inject_hyperparams`, and each nonzero number named in `hyperparameters`
        (zero keeps a program of its own: it may switch a term off). Changing only these
        between runs reuses the compiled program."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            injected = hyper_lib.values(value)
            if injected:
                out[field.name] = injected
            elif (field.name in self.hyperparameters and isinstance(value, (int, float))
                  and not isinstance(value, bool) and value != 0):
                out[field.name] = jnp.float32(value)
        return out

    def with_hyperparams(self, values: dict) -> "Algorithm":
        """A copy of this algorithm with the fields of `hyperparams()` set to `values`
        (traced arrays inside the round program); construction checks do not run again."""
        new = copy.copy(self)
        for name, value in values.items():
            current = getattr(self, name)
            object.__setattr__(new, name, hyper_lib.with_values(current, value)
                               if isinstance(value, dict) else value)
        return new

    @property
    def local_schedule(self) -> LocalSchedule:
        return LocalSchedule(self.batch_size, self.local_epochs, self.local_steps)

    def server_init(self, params: PyTree) -> PyTree:
        """The server state from the initial global parameters."""
        raise NotImplementedError

    def client_state_init(self, params: PyTree) -> PyTree:
        """One client's initial state (no client axis), or None for a stateless algorithm."""
        del params
        return None

    def broadcast(self, server_state: PyTree) -> PyTree:
        """What every client of the round receives."""
        raise NotImplementedError

    def client_update(self, problem: Problem, broadcast: PyTree, local: ClientData,
                      rng: jax.Array, client_state: PyTree = None) -> ClientOutput:
        """One client's round (traced once, run for every cohort slot under vmap)."""
        raise NotImplementedError

    def server_update(self, server_state: PyTree, aggregate: PyTree, sums: RoundSums) -> PyTree:
        """The new server state from the aggregate (shaped like the deltas)."""
        raise NotImplementedError

    def params(self, server_state: PyTree) -> PyTree:
        """The global model's parameters in `server_state`."""
        raise NotImplementedError

    def personal_params(self, params: PyTree, client_state: PyTree) -> PyTree:
        """A client's own model, from the global parameters and its state (personalized
        algorithms); by default the global model."""
        del client_state
        return params

    def personal_model_state(self, model_state: PyTree, client_state: PyTree) -> PyTree:
        """The model state a client's own model runs with (its own BatchNorm statistics
        under FedBN); by default the global one."""
        del client_state
        return model_state

    def client_weight(self, num_examples: jax.Array) -> jax.Array:
        """w_i, the client's aggregation weight (float32)."""
        if self.weighting == "num_examples":
            return num_examples.astype(jnp.float32)
        return jnp.where(num_examples > 0, 1.0, 0.0).astype(jnp.float32)

    def downlink(self, broadcast: PyTree) -> "Message":
        """What the server sends each client of a round, as counted on the wire, given
        `broadcast` as `broadcast()` returns it (shapes and dtypes only: it may be a tracer).
        By default every array as it is: its entries at its dtype's width."""
        sizes = [(math.prod(x.shape), 8 * jnp.dtype(x.dtype).itemsize)
                 for x in jax.tree_util.tree_leaves(broadcast)]
        widths = {width for _, width in sizes}
        if len(widths) == 1:  # one dtype width (a float32 model): entries x that width
            return Message(sum(n for n, _ in sizes), widths.pop())
        return Message(0, 0, extra_bits=sum(n * width for n, width in sizes))


# -- aggregators ------------------------------------------------------------------------
class Cohort(NamedTuple):
    """The round's clients' updates, stacked, for a part that reduces them itself.

    updates: the transformed deltas, every leaf [m, ...] (m = cohort slots); padding slots
      (a Poisson cohort below its cap) hold zeros.
    weights: [m] float32 aggregation weights w_i, 0 for padding slots.
    live: [m] bool, whether the slot holds a client of this round.
    """

    updates: PyTree
    weights: jax.Array
    live: jax.Array


class UpdateAttack(NamedTuple):
    """What malicious clients do to the update they send (`fedjax_sim.attacks` builds them;
    which clients are malicious is fixed for a run and given to the engine with it).

    client(delta, rng, client_id) -> delta: a malicious client's update from the honest one
        it computed, inside the vmap (sign flipping, scaling, noise; a privacy audit's
        canary, whose crafted update depends on its id); None: unchanged.
    cohort(updates, weights, malicious, live, rng) -> updates: the cohort's updates, every
        leaf [m, ...], with the malicious slots' replaced, for an attacker that knows the
        whole cohort ("a little is enough", inner-product manipulation, model
        replacement's boost). `malicious` and `live` are [m] bool, `weights` [m] float32
        (0 for padding slots). None: no such stage. With one, the engine stacks the
        cohort's updates (memory: m x parameters) and runs the aggregator's per-client
        transforms (clipping, compression) after the attack, as a server receiving them
        would.
    key: None, or a hashable naming every value the functions bake into the compiled
        program (see `AggregatorPart.key`).

    An attack acts on what a client sends: the aggregator's per-client transforms apply to
    a malicious update as to any other.
    """

    client: Callable[[PyTree, jax.Array, jax.Array], PyTree] | None = None
    cohort: Callable[..., PyTree] | None = None
    key: Any = None

    def __program_key__(self):
        return ("key", self.key) if self.key is not None else (self.client, self.cohort)


# A metric an aggregator part returns (from `reduce` or `finalize`, a bool scalar): true when
# the round failed (e.g. too few clients of a secure aggregation survived to unmask the sum).
# The engine then keeps the server state, the aggregator state and every client state as
# they were before the round, and logs `round_failed` = 1.
ROUND_FAILED = "round_failed"


class Message(NamedTuple):
    """What one client sends up in a round, as counted on the wire.

    entries: values sent; value_bits: bits per value (32 for float32); index_bits: bits per
    value naming its position (sparse formats); extra_bits: side information per message
    (scales, norms, seeds, keys, secret shares).
    """

    entries: int
    value_bits: int
    index_bits: int = 0
    extra_bits: int = 0

    @property
    def bits(self) -> int:
        return self.entries * (self.value_bits + self.index_bits) + self.extra_bits

    @property
    def bytes(self) -> int:
        return math.ceil(self.bits / 8)


class AggregatorPart(NamedTuple):
    """One stage of aggregation (fedjax_sim.aggregators composes them with `chain`).

    init(params) -> state
    client(delta, state, rng) -> (delta, report: dict of per-client scalars)
        runs per client inside the vmap; the engine sums each report over the clients
        that took part and logs its mean (names starting with '_' are not logged). With
        `client_init` set, the part keeps a state per client and
        client(delta, state, rng, client_state) -> (delta, report, client_state).
    finalize(total, denominator, reports, state, rng) -> (total, denominator, state, metrics)
        runs once on the reduced update; the aggregate is total / denominator.
    reduce(cohort: Cohort, state, rng) -> (total, denominator) or (total, denominator, metrics)
        None: the engine's streaming weighted sum (total = sum_i w_i d_i, denominator =
        sum_i w_i; memory proportional to the chunk). A part with `reduce` receives every
        client's update at once instead (memory proportional to the cohort), e.g. a
        median, a trimmed mean or a secure sum. Its metrics (scalars) are logged and seen
        by the finalizers in `reports`. A chain holds at most one such part.
    client_init(params) -> one client's state (no client axis), or None: a part without
        per-client state. The engine keeps one row per client of the population (on
        device, on the host, or split across a mesh, like an algorithm's client states),
        hands each client of a round its row and writes back the new one.
    uplink(message: Message, cohort_slots: int) -> Message, or None (unchanged): what the
        part's client transform makes a client send, given what it would send without
        the part. The engine starts from Message(entries in the delta, 32) and applies
        the chain's parts in order; `cohort_slots` is the round's number of cohort slots.
    key: None, or a hashable naming everything the part's functions bake into the
        compiled program (see `__program_key__`).
    """

    init: Callable[[PyTree], PyTree]
    client: Callable[..., tuple]
    finalize: Callable[..., tuple[PyTree, jax.Array, PyTree, dict]]
    reduce: Callable[[Cohort, PyTree, jax.Array], tuple] | None = None
    client_init: Callable[[PyTree], PyTree] | None = None
    uplink: Callable[[Message, int], Message] | None = None
    key: Any = None

    def __program_key__(self):
        """What of this part fixes the compiled program (engine.program_cache): `key`, a
        hashable that the part's builder gives when every value it does not keep in its
        state is in it, else the part's functions (keyed by their code and closures)."""
        return ("key", self.key) if self.key is not None else tuple(self[:6])
