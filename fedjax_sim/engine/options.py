"""How a round executes: the engine options and the rules that turn 'auto' into choices.

`EngineOptions` is what a user may force; `resolve_engine` picks the rest from the backend
and the model (measurements behind the rules: benchmarks/README.md and PERF_NOTES).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from fedjax_sim.engine import program_cache
from fedjax_sim.engine.client_states import PLACEMENTS
from fedjax_sim.engine.streaming import DATA_PLACEMENTS, parse_bytes
from fedjax_sim.errors import UserError

# On CPU, local loops of at most this many steps are fully unrolled by default.
MAX_AUTO_UNROLL = 8
# On CPU, clients whose one local step costs more than this many FLOPs run one after
# another (clients_per_chunk=1) instead of vmapped: vmap pays off by sharing per-op
# overhead between clients with tiny steps (logistic regression: 5x), but for heavier
# steps it only multiplies memory traffic (EMNIST CNN, 100 clients: 18.6 s vs 11.4 s a
# round; MLP 200-200 at 3e6 FLOPs a step, 50 clients: 46 ms vs 19 ms). The crossover
# measured on MLPs lies between 2e5 (vmap faster) and 3e6 (one by one clearly faster).
CPU_VMAP_MAX_STEP_FLOPS = 1e6
# With rounds_per_call='auto', one call runs at most this many rounds, and about
# TARGET_SECONDS_PER_CALL of them (measured on the first call), so the progress bar and the
# log move at least every second or so whatever the model's size.
MAX_ROUNDS_PER_CALL = 50
TARGET_SECONDS_PER_CALL = 1.0


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """How a round executes. 'auto' picks by backend and model (benchmarks/README.md).

    clients_per_chunk: None = vmap the whole cohort; k = scan over chunks of k clients,
      vmap inside; 1 = one client after another (lax.map), no vmap.
    unroll: True = local steps fully unrolled; k = lax.scan unrolled k steps at a time.
    rounds_per_call: how many rounds one compiled call runs back to back; 'auto' adapts
      it to about TARGET_SECONDS_PER_CALL of work per call (no recompilation: the round
      count is a runtime argument).
    client_states: where a stateful algorithm's per-client states live: 'device', 'host'
      (streamed per call, engine.client_states), or 'auto' (device while they take at most
      a quarter of the accelerator's memory; always device on CPU).
    data_placement: where the training data lives: 'device' (placed once), 'host'
      (each call's cohort rows streamed to the device, the next call's prefetched while
      one runs; engine.streaming), or 'auto' (host when the data exceeds
      `device_data_budget`, or without one half of the accelerator's memory).
    device_data_budget: bytes of device memory the training data may take (an int or a
      size such as '2GiB'); with 'host' placement one call's streamed rows must fit it too
      (rounds_per_call is lowered until they do).
    mesh: how many devices share each cohort (engine.mesh): 'auto' = every device of
      every process when there is more than one, an integer d = the first d devices, None
      or 1 = one device. Each device trains its share of the cohort (chunked or vmapped
      as above) and the sums meet in one cross-device reduction.
    """

    clients_per_chunk: int | None | str = "auto"
    unroll: int | bool | str = "auto"
    rounds_per_call: int | str = "auto"
    client_states: str = "auto"
    data_placement: str = "auto"
    device_data_budget: int | str | None = None
    mesh: int | str | None = "auto"

    def __post_init__(self):
        if self.client_states not in PLACEMENTS:
            raise UserError(f"engine.client_states must be one of {list(PLACEMENTS)}, got "
                            f"{self.client_states!r}")
        if self.data_placement not in DATA_PLACEMENTS:
            raise UserError(f"engine.data_placement must be one of {list(DATA_PLACEMENTS)}, got "
                            f"{self.data_placement!r}")
        parse_bytes(self.device_data_budget)
        if not (self.mesh is None or self.mesh == "auto" or (
                isinstance(self.mesh, int) and not isinstance(self.mesh, bool) and self.mesh >= 1)):
            raise UserError(f"engine.mesh must be 'auto', None or a device count >= 1, got "
                            f"{self.mesh!r}")


def has_convolution(model, params, model_state, example_x) -> bool:
    """Whether the model's forward pass contains a convolution (checked on its jaxpr;
    remembered for the process, engine.program_cache)."""
    return program_cache.memoized(
        lambda: _has_convolution(model, params, model_state, example_x), "has_convolution",
        model, program_cache.signature((params, model_state, example_x)))


def _has_convolution(model, params, model_state, example_x) -> bool:
    closed = jax.make_jaxpr(lambda p: model.apply(p, model_state, example_x, train=False)[0])(params)

    def jaxprs_in(value):
        if hasattr(value, "eqns"):
            yield value
        elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
            yield value.jaxpr
        elif isinstance(value, (tuple, list)):
            for v in value:
                yield from jaxprs_in(v)

    def walk(jaxpr) -> bool:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                return True
            if any(walk(sub) for v in eqn.params.values() for sub in jaxprs_in(v)):
                return True
        return False

    return walk(closed.jaxpr)


def client_step_flops(problem, params, batch: dict) -> float:
    """FLOPs of one client's local step (loss + gradient), from XLA's cost analysis of the
    lowered program (nothing is compiled); NaN where the backend gives no estimate.
    Remembered for the process (engine.program_cache)."""
    # The model state's values (e.g. the seed's dropout key) leave the cost unchanged.
    shape_only = problem._replace(model_state=program_cache.signature(problem.model_state))
    return program_cache.memoized(lambda: _client_step_flops(problem, params, batch),
                                  "client_step_flops", shape_only,
                                  program_cache.signature((params, batch)))


def _client_step_flops(problem, params, batch: dict) -> float:
    mask = jnp.ones(len(batch[problem.task.label_key]), bool)
    grad = jax.grad(lambda p: problem.loss(p, batch, mask, jax.random.key(0))[0])
    try:
        cost = jax.jit(grad).lower(params).cost_analysis()
    except Exception:  # cost analysis is best-effort: some backends do not provide it
        return float("nan")
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def resolve_engine(options: EngineOptions, *, backend: str, conv: bool, num_steps: int,
                   clients_per_round: int, step_flops: float = 0.0) -> dict:
    """Turns 'auto' into concrete choices (measurements in benchmarks/README.md).

    Everywhere: vmap the cohort, local steps in a `lax.scan` (fully unrolled when there are
    at most MAX_AUTO_UNROLL steps on CPU, where unrolling saves per-step loop overhead at
    little compile cost), and up to MAX_ROUNDS_PER_CALL rounds fused per call (about a
    second's worth, see TARGET_SECONDS_PER_CALL). On CPU, clients with heavy local steps
    (`step_flops` > CPU_VMAP_MAX_STEP_FLOPS) run one after another instead of vmapped.
    The exception is an XLA convolution on CPU (`conv`: the zoo's models use im2col
    convolutions there, and `from_nnx` / `from_linen` models get them too, see
    models/substitute.py): inside any loop body it runs ~10x slower, so such a model gets
    no loop at all: the cohort vmapped whatever a step costs (a grouped convolution, ~2x
    faster than clients one after another), steps unrolled and one round per call.
    """
    chunk, unroll, per_call = options.clients_per_chunk, options.unroll, options.rounds_per_call
    cpu = backend == "cpu"
    if chunk == "auto":
        chunk = 1 if (cpu and not conv and step_flops > CPU_VMAP_MAX_STEP_FLOPS) else None
    if unroll == "auto":
        unroll = True if (cpu and (conv or num_steps <= MAX_AUTO_UNROLL)) else 1
    adaptive = per_call == "auto"
    if adaptive:
        per_call = 1 if (cpu and conv) else MAX_ROUNDS_PER_CALL
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise UserError(f"engine.clients_per_chunk must be 'auto', None or an integer >= 1, "
                        f"got {chunk!r}")
    if not (unroll is True or (isinstance(unroll, int) and not isinstance(unroll, bool) and unroll >= 1)):
        raise UserError(f"engine.unroll must be 'auto', True or an integer >= 1, got {unroll!r}")
    if isinstance(per_call, bool) or not isinstance(per_call, int) or per_call < 1:
        raise UserError(f"engine.rounds_per_call must be 'auto' or an integer >= 1, got {per_call!r}")
    if chunk is not None and chunk >= clients_per_round:
        chunk = None  # one chunk holding the whole cohort is plain vmap
    return {"clients_per_chunk": chunk, "unroll": unroll, "rounds_per_call": per_call,
            "adaptive_rounds_per_call": adaptive and per_call > 1}
