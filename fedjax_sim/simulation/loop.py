"""The host loop: compile once, run rounds in fused calls, evaluate, log.

`simulate()` is the Python API. It checks its inputs before anything is compiled, places
the training data on device once, and runs the rounds between two evaluations as a few
calls of one compiled program (`rounds_per_call` rounds each, no host work in between).
The only host synchronisation is fetching the metrics it logs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.aggregators import AggregatorPart, weighted_mean
from fedjax_sim.algorithms.base import Algorithm, Problem
from fedjax_sim.algorithms.local_stats import LocalStatistics
from fedjax_sim.engine.batching import make_schedule
from fedjax_sim.engine.client_states import (PLACEMENTS, HostClientStates, device_memory_bytes,
                                             resolve_placement)
from fedjax_sim.engine.round import DeviceData, RoundProgram
from fedjax_sim.engine.streaming import (DATA_PLACEMENTS, HostData, data_bytes, parse_bytes,
                                         resolve_data_placement)
from fedjax_sim.data.augment import Preprocess, default_preprocess
from fedjax_sim.errors import UserError
from fedjax_sim.models.adapter import Model
from fedjax_sim.models.tasks import Task, classification
from fedjax_sim.simulation.checkpoint import (CheckpointOptions, RunCheckpoints, checksum,
                                              config_differences, export_params, from_host,
                                              to_host, tree_spec)
from fedjax_sim.simulation.evaluation import (CentralEvaluator, ClientEvaluator, FineTune,
                                              summarize_clients)
from fedjax_sim.simulation.private import PrivatePlan, warn_stop
from fedjax_sim.trees import merge, path_names, under

PyTree = Any
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
    """

    clients_per_chunk: int | None | str = "auto"
    unroll: int | bool | str = "auto"
    rounds_per_call: int | str = "auto"
    client_states: str = "auto"
    data_placement: str = "auto"
    device_data_budget: int | str | None = None

    def __post_init__(self):
        if self.client_states not in PLACEMENTS:
            raise UserError(f"engine.client_states must be one of {list(PLACEMENTS)}, got "
                            f"{self.client_states!r}")
        if self.data_placement not in DATA_PLACEMENTS:
            raise UserError(f"engine.data_placement must be one of {list(DATA_PLACEMENTS)}, got "
                            f"{self.data_placement!r}")
        parse_bytes(self.device_data_budget)


def has_convolution(model: Model, params, model_state, example_x) -> bool:
    """Whether the model's forward pass contains a convolution (checked on its jaxpr)."""
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


def client_step_flops(problem: Problem, params, batch: dict) -> float:
    """FLOPs of one client's local step (loss + gradient), from XLA's cost analysis of the
    lowered program (nothing is compiled); NaN where the backend gives no estimate."""
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
    convolutions there and are not affected): inside any loop body it runs ~10x slower,
    so such a model gets no loop at all: steps unrolled and one round per call.
    """
    chunk, unroll, per_call = options.clients_per_chunk, options.unroll, options.rounds_per_call
    cpu = backend == "cpu"
    if chunk == "auto":
        chunk = 1 if (cpu and step_flops > CPU_VMAP_MAX_STEP_FLOPS) else None
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


@dataclasses.dataclass
class Result:
    """What a simulation returns.

    params / model_state: the final global model; server_state: the algorithm's full
    server state; history: one dict per round (what metrics.jsonl holds); summary:
    final evaluation, timings and engine choices; client_states: a stateful algorithm's
    per-client states ([C, ...] leaves; None if stateless); client_metrics: the last
    per-client evaluation, {'client_ids': [...], 'test' | 'personal' | 'finetuned':
    {metric: [C] array}} (None without client_eval_data).

    `save(path)` writes it to a directory (orbax arrays + JSON) and `Result.load(path)` reads
    it back; `export_params(path)` writes the final parameters to a plain `.npz` file for use
    outside fedjax_sim (`fedjax_sim.load_params` or `numpy.load` reads it).
    """

    params: PyTree
    model_state: PyTree
    server_state: PyTree
    history: list[dict]
    summary: dict
    client_states: PyTree = None
    client_metrics: dict | None = None

    def save(self, path: str) -> None:
        """Writes the result to directory `path` (which must not exist yet)."""
        import orbax.checkpoint as ocp

        path = os.path.abspath(path)
        if os.path.exists(path):
            raise UserError(f"{path} already exists; Result.save writes a new directory")
        arrays = to_host(self._arrays())
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(os.path.join(path, "arrays"), arrays)
            ckpt.wait_until_finished()
        with open(os.path.join(path, "result.json"), "w") as f:
            json.dump({"format": "fedjax_sim.result", "format_version": 1,
                       "history": self.history, "summary": self.summary}, f)

    @classmethod
    def load(cls, path: str, template: "Result | None" = None) -> "Result":
        """Reads a saved result. Arrays come back as nested dicts and lists of arrays
        (NamedTuples as dicts, PRNG keys as key data), or, given a `template` result of the
        same run (e.g. from `simulate(..., rounds=1)`), with the template's exact types."""
        import orbax.checkpoint as ocp

        path = os.path.abspath(path)
        meta_path = os.path.join(path, "result.json")
        if not os.path.isfile(meta_path):
            raise UserError(f"{path} is not a saved Result (no result.json); save one with "
                            f"Result.save(path)")
        with open(meta_path) as f:
            meta = json.load(f)
        with ocp.StandardCheckpointer() as ckpt:
            if template is None:
                arrays = ckpt.restore(os.path.join(path, "arrays"))
            else:
                target = to_host(template._arrays())
                arrays = ckpt.restore(os.path.join(path, "arrays"), target)
                if tree_spec(arrays) != tree_spec(target):
                    raise UserError(f"the result saved in {path} does not match the template's "
                                    f"arrays; load it without a template")
                arrays = from_host(template._arrays(), arrays)
        return cls(arrays["params"], arrays["model_state"], arrays["server_state"],
                   meta["history"], meta["summary"], arrays.get("client_states"))

    def _arrays(self) -> dict:
        """The arrays `save` writes, as one tree."""
        arrays = {"params": self.params, "model_state": self.model_state,
                  "server_state": self.server_state}
        if self.client_states is not None:
            arrays["client_states"] = self.client_states
        return arrays

    def export_params(self, path: str) -> None:
        """Writes the final global parameters to a `.npz` file (one array per leaf, named
        by its path, e.g. 'dense/kernel')."""
        export_params(self.params, path)


def _check_inputs(model, train_data, rounds, clients_per_round, eval_every, task, input_key):
    if rounds < 1:
        raise UserError(f"rounds must be >= 1, got {rounds}")
    if eval_every < 1:
        raise UserError(f"eval_every must be >= 1, got {eval_every}")
    if clients_per_round < 1:
        raise UserError(f"clients_per_round must be >= 1, got {clients_per_round}")
    if clients_per_round > train_data.num_clients:
        raise UserError(f"clients_per_round={clients_per_round} exceeds the "
                        f"{train_data.num_clients} clients in the training data; lower "
                        f"clients_per_round or partition into more clients")
    empty = train_data.empty_clients()
    if empty:
        raise UserError(f"{len(empty)} training client(s) have no examples (e.g. {empty[0]!r}); "
                        f"drop them with data.drop_empty() or use a partitioner with min_size >= 1")
    for key in (input_key, task.label_key):
        if key not in train_data.features:
            raise UserError(f"training data has no feature {key!r} (it has "
                            f"{list(train_data.features)}); name the features 'x' and 'y' or "
                            f"set input_key / the task's label_key")
    x = train_data.features[input_key]
    if tuple(x.shape[1:]) != tuple(model.input_shape):
        raise UserError(f"model {model.name} expects inputs of shape {list(model.input_shape)} "
                        f"but the data's {input_key!r} examples are {list(x.shape[1:])}; build "
                        f"the model with input_shape={tuple(x.shape[1:])}")


def simulate(
    model: Model,
    algorithm: Algorithm,
    train_data,
    *,
    rounds: int,
    clients_per_round: int,
    task: Task | None = None,
    eval_data: dict | None = None,
    client_eval_data=None,
    heldout_data=None,
    finetune: FineTune | None = None,
    eval_every: int = 10,
    eval_batch_size: int = 256,
    seed: int = 0,
    aggregator: AggregatorPart | None = None,
    privacy=None,
    engine: EngineOptions = EngineOptions(),
    preprocess: Preprocess | str | None = "auto",
    batch_norm: str = "auto",
    feature_cache: bool | str = "auto",
    input_key: str = "x",
    workdir: str | None = None,
    checkpoint: CheckpointOptions = CheckpointOptions(),
    config: dict | None = None,
    allow_config_change: bool = False,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    metadata: dict | None = None,
) -> Result:
    """Runs federated training and returns the final model and its history.

    Args:
      model: a `fedjax_sim.models.Model` (zoo model, or `from_nnx` / `from_linen`).
      algorithm: e.g. `fedjax_sim.algorithms.fedavg(optax.sgd(0.1))`.
      train_data: a `FederatedData`; each round samples `clients_per_round` of its clients
        uniformly without replacement.
      task: loss and metrics (default: classification).
      eval_data: a pooled test set (dict of arrays) for centralized `test_*` metrics.
      client_eval_data: a `FederatedData` with the same clients' held-out examples for
        per-client `client_test_*` metrics (mean, percentiles, min); personalized
        algorithms add `client_personal_*` (each client's own model).
      heldout_data: clients never trained on (their ids must not be training clients): a
        `FederatedData`, evaluated per client with the global model (`heldout_test_*`),
        or a pair (their training split, their test split), which with `finetune` also
        reports `heldout_finetuned_*` (fine-tuned on the first, tested on the second).
      finetune: `FineTune(steps, learning_rate, batch_size)`: per-client evaluation also
        fine-tunes each evaluation client's model on its own training split and reports
        `client_finetuned_*` (needs `client_eval_data`).
      eval_every: evaluate after every this many rounds, and after the last.
      seed: the one root of all randomness (init, sampling, shuffling, dropout).
      aggregator: aggregator part(s) (default: weighted mean).
      privacy: `fedjax_sim.privacy.ClientLevelDP(...)` (DP-FedAvg: clipped and noised
        updates, Poisson client sampling by default) or `ExampleLevelDP(...)` (DP-SGD in
        every client). Each round's `epsilon` is logged; `target_epsilon` stops training
        before it would be exceeded (the summary's `stopped` says so).
      engine: execution strategy (default: chosen by backend and model), including where
        the training data lives (`data_placement`, `device_data_budget`).
      preprocess: on-device conversion and augmentation of each batch's inputs
        (`fedjax_sim.data.Preprocess`: uint8 -> float scaling, normalisation, random
        crop and flip in local training). 'auto': uint8 images are scaled to [0, 1],
        other inputs are fed as stored; None: always as stored.
      batch_norm: what happens to a model's running statistics (BatchNorm's mean and
        variance, the model's `stats`) in federated training. 'frozen': clients normalise
        with the stored (e.g. pretrained) statistics, which never change; 'averaged':
        clients normalise with batch statistics and update the running ones, and the
        server averages them like the weights (with the same client weights); 'local'
        (FedBN): each client keeps its own statistics (algorithms.LocalStatistics), so
        models are evaluated per client with their own; 'auto': 'frozen' for a model
        with frozen parameters (`with_trainable`) or under differential privacy, else
        'averaged'. Ignored for models without statistics (GroupNorm, no norm).
      feature_cache: train a head on backbone features computed once. It applies where
        only the model's head trains (`with_trainable(model, 'head')` on a model with a
        `head_split`: the zoo's ResNets, MLP and CNN), the frozen backbone computes the same
        in training as in inference (no dropout; BatchNorm statistics frozen or absent)
        and no augmentation changes the inputs; then every example's features are computed
        once (train, test and per-client data) and the rounds run the head alone, which
        gives the results of training through the frozen backbone, up to float round-off,
        at a fraction of the cost. 'auto': where it applies; True: required (an error says
        why it cannot apply); False: never. The summary's `feature_cache` records it.
      workdir: if given, `metrics.jsonl`, `summary.json` and the final `params.npz` are
        written there, and checkpoints in `workdir/checkpoints` (see `checkpoint`). If that
        directory already holds checkpoints of this run, the run resumes from the newest
        intact one and ends exactly as an uninterrupted run would.
      checkpoint: when to save (`CheckpointOptions`: every k rounds, every s seconds, at
        the end; how many to keep).
      config: a JSON-like dict describing the run, stored with each checkpoint and compared
        on resume (the CLI passes its config). Default: a description built from the
        arguments (model, algorithm fields, data digest, seed, ...); optimizer
        hyperparameters are not visible in it, so pass them here to have them checked.
      allow_config_change: resume even if `config` differs from the checkpoint's (`rounds`
        and the checkpoint cadence may always change).
      callback: called with each round's metrics dict (after it is logged).
      metadata: extra JSON-serialisable facts about the run, recorded in the summary's
        `data` entry (e.g. how targets were standardised).
    """
    task = task or classification()
    _check_inputs(model, train_data, rounds, clients_per_round, eval_every, task, input_key)
    if isinstance(preprocess, str):
        if preprocess != "auto":
            raise UserError(f"preprocess must be 'auto', None or a fedjax_sim.data.Preprocess, "
                            f"got {preprocess!r}")
        preprocess = default_preprocess(train_data.features[input_key], input_key)
    if isinstance(preprocess, Preprocess):
        preprocess.check(tuple(train_data.features[input_key].shape[1:]))
    batch_norm = _batch_norm_mode(batch_norm, model, privacy)
    _check_feature_cache(feature_cache)
    if batch_norm == "frozen":
        model = model.freeze_stats()
    heldout = _heldout_parts(heldout_data, train_data)
    if finetune is not None and client_eval_data is None and (heldout is None or heldout[0] is None):
        raise UserError("finetune= evaluates each client after fine-tuning on its own data; it "
                        "needs client_eval_data (per-client test splits, e.g. from "
                        "clients.split(0.2, seed=0)) or heldout_data=(train split, test split)")
    plan = None
    if privacy is not None:
        plan = PrivatePlan(privacy, algorithm=algorithm, aggregator=aggregator,
                           num_clients=train_data.num_clients, clients_per_round=clients_per_round,
                           max_client_size=train_data.max_client_size, rounds=rounds)
        aggregator = plan.aggregator
    aggregator = aggregator or weighted_mean()
    schedule = make_schedule(train_data.max_client_size, **{
        "batch_size": getattr(algorithm, "batch_size", None),
        "local_epochs": getattr(algorithm, "local_epochs", None),
        "local_steps": getattr(algorithm, "local_steps", None),
        **(plan.schedule_args if plan else {})})
    if plan:
        plan.set_steps_per_round(schedule.num_steps)
        plan.check_budget(rounds)

    root = jax.random.key(seed)
    params, model_state = model.init(jax.random.fold_in(root, INIT_STREAM))
    stats_mode = batch_norm if batch_norm in ("averaged", "local") else None
    stats = model.stats_of(model_state) if stats_mode is not None else None
    if batch_norm == "local":
        algorithm = LocalStatistics(algorithm, stats)
    if not algorithm.global_model and client_eval_data is None:
        warnings.warn(f"{type(algorithm).__name__} has no global model to test and no "
                      f"client_eval_data was given, so nothing will be evaluated; pass "
                      f"client_eval_data to evaluate each client's personal model", stacklevel=2)
    cache_info = None
    if _use_feature_cache(feature_cache, model, params, preprocess):
        t_cache = time.perf_counter()
        to_features = _feature_extractor(model.head_split, params, model_state, preprocess,
                                         input_key, eval_batch_size)
        train_data = to_features(train_data)
        eval_data = to_features(eval_data)
        client_eval_data = to_features(client_eval_data)
        if heldout is not None:
            heldout = tuple(to_features(part) for part in heldout)
        model = _head_model(model, tuple(train_data.features[input_key].shape[1:]))
        preprocess = None
        cache_info = {"feature_shape": list(train_data.features[input_key].shape[1:]),
                      "examples": to_features.examples,
                      "seconds": round(time.perf_counter() - t_cache, 3)}
    # One batch of real examples serves the shape check, the convolution check and the
    # step cost estimate.
    example_batch = {k: jnp.asarray(train_data.features[k][:schedule.batch_size])
                     for k in (input_key, task.label_key)}
    if preprocess is not None:
        example_batch = preprocess(example_batch, None, train=False)
    example_x = example_batch[input_key]
    try:
        out_shape = jax.eval_shape(lambda p: model.apply(p, model_state, example_x, train=False)[0],
                                   params).shape
    except Exception as e:  # a shape error inside the user's model
        raise UserError(f"model {model.name} fails on the data's inputs of shape "
                        f"{list(example_x.shape[1:])}: {str(e).splitlines()[0]}") from None
    if task.check is not None:
        task.check(tuple(out_shape), np.asarray(train_data.features[task.label_key]))

    backend = jax.default_backend()
    example_noise = plan.example_noise if plan else None
    if example_noise is not None and backend == "cpu":
        # DP-SGD's per-example gradients one example at a time: on XLA:CPU that beats any
        # vmap over examples, by 1.7x (EMNIST CNN) to 15x (MLP, vmapped clients) in
        # benchmarks/README.md.
        example_noise = example_noise._replace(chunk=1)
    problem = Problem(model, task, model_state, input_key, example_noise=example_noise)
    sampling = plan.sampling if plan else None
    slots = sampling.slots if sampling else clients_per_round
    choice = resolve_engine(engine, backend=backend,
                            conv=has_convolution(model, params, model_state, example_x),
                            num_steps=schedule.num_steps, clients_per_round=slots,
                            step_flops=client_step_flops(problem, params, example_batch))
    program = RoundProgram(algorithm, problem, aggregator, schedule,
                           num_clients=train_data.num_clients,
                           max_client_size=train_data.max_client_size,
                           clients_per_round=clients_per_round,
                           clients_per_chunk=choice["clients_per_chunk"], unroll=choice["unroll"],
                           sampling=sampling, preprocess=preprocess, stats_mode=stats_mode)
    budget = parse_bytes(engine.device_data_budget)
    data_placement = resolve_data_placement(
        engine.data_placement, data_bytes(train_data), budget,
        None if backend == "cpu" else device_memory_bytes())
    streamer = HostData(train_data) if data_placement == "host" else None
    data = DeviceData.from_federated(train_data) if streamer is None else None
    central = CentralEvaluator(model, task, eval_data, input_key=input_key,
                               batch_size=eval_batch_size,
                               preprocess=preprocess) if eval_data is not None else None
    personalize = algorithm.personal_params if algorithm.personalized else None
    per_client = ClientEvaluator(
        model, task, client_eval_data, input_key=input_key, batch_size=eval_batch_size,
        global_model=algorithm.global_model, personalize=personalize,
        personal_state=algorithm.personal_model_state if personalize else None, finetune=finetune,
        train_data=train_data, train_arrays=data, train_stream=streamer, root=root,
        preprocess=preprocess) if client_eval_data is not None else None
    heldout_eval = None
    if heldout is not None:
        tune_on, test_on = heldout
        heldout_eval = ClientEvaluator(
            model, task, test_on, input_key=input_key, batch_size=eval_batch_size,
            global_model=algorithm.global_model,
            finetune=finetune if tune_on is not None else None, train_data=tune_on,
            root=jax.random.fold_in(root, HELDOUT_STREAM), preprocess=preprocess)
    if not algorithm.global_model:
        central = None  # e.g. FedPer: the server's head is never trained

    one_client = algorithm.client_state_init(params)
    placement = None if one_client is None else resolve_placement(
        engine.client_states, one_client, train_data.num_clients, backend)
    state = program.init(params, placement or "device", stats=stats)
    if workdir:
        _prepare_workdir(workdir)
    ckpt = None
    if workdir and checkpoint.enabled:
        ckpt = RunCheckpoints(os.path.join(workdir, "checkpoints"), checkpoint)
    run_config = config if config is not None else describe_run(
        model=model, algorithm=algorithm, train_data=train_data, task=task, aggregator=aggregator,
        clients_per_round=clients_per_round, eval_every=eval_every, seed=seed, engine=engine,
        input_key=input_key, eval_data=eval_data, client_eval_data=client_eval_data,
        privacy=privacy, batch_norm=batch_norm)
    history: list[dict] = []
    done = 0
    if ckpt is not None:
        restored = ckpt.restore_latest(_checkpoint_tree(state, model_state))
        if restored is not None:
            tree, meta = restored
            state, model_state = tree["sim"], tree["model_state"]
            done, history = _resume_checks(meta, run_config, rounds, allow_config_change,
                                           root, ckpt.directory)
            if progress:
                print(f"the run in {workdir} is already complete ({done} rounds)" if done == rounds
                      else f"resuming from the checkpoint at round {done} in {ckpt.directory}")
    # Training ends at `end`: `rounds`, or earlier where the privacy budget runs out (known
    # up front at the client level; checked before every call at the example level).
    end = rounds
    if plan:
        plan.recount(program, root, done)
        if plan.level == "client":
            end = done + plan.affordable(done, rounds - done)
    if workdir:
        _write_json(os.path.join(workdir, "config.json"), run_config)

    if done == end and done > 0:  # a finished run: nothing to compute, keep its summary
        ckpt.close()
        summary_path = os.path.join(workdir, "summary.json")
        summary = None
        if os.path.isfile(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
        if not summary or summary.get("rounds") != rounds:
            summary = {"rounds": rounds, "final": _final_metrics(history[-1]),
                       "train_loss": history[-1]["train_loss"], "resumed_from_round": done}
            if plan:
                summary["privacy"] = plan.summary(done)
            if done < rounds:
                summary["stopped"] = plan.stop_message(done)
            _write_json(summary_path, summary)
        if summary.get("stopped") and progress:
            print(summary["stopped"])
        _rewrite_jsonl(os.path.join(workdir, "metrics.jsonl"), history)
        params = algorithm.params(state.server)
        export_params(params, os.path.join(workdir, "params.npz"))
        return Result(params, _current_model_state(model_state, state), state.server, history,
                      summary, state.clients)

    every = checkpoint.every_rounds if ckpt is not None else None
    per_call = min(choice["rounds_per_call"], eval_every, rounds, every or rounds)
    if streamer is not None:
        per_call = _fit_stream_window(streamer, per_call, slots, budget)
        streamer.set_window(per_call * slots)
        data = streamer.template()
    t0 = time.perf_counter()
    if placement != "host":
        run = program.compile(state, data, model_state, root, per_call)
    else:
        host_states = HostClientStates(train_data.num_clients, per_call * slots)
        table, rows = host_states.template(state.clients)
        run = host_states.stream(program.compile(state._replace(clients=table), data, model_state,
                                                 root, per_call, rows), program)
    if streamer is not None:
        run = streamer.stream(run, program, per_call)
    compile_seconds = time.perf_counter() - t0

    writer = None
    if workdir:
        # The log restarts from what the checkpoint recorded (rows logged after it are redone).
        _rewrite_jsonl(os.path.join(workdir, "metrics.jsonl"), history)
        writer = open(os.path.join(workdir, "metrics.jsonl"), "a")
    bar = _progress_bar(rounds, progress, initial=done)
    client_metrics = None
    train_seconds = 0.0
    saved_round, last_save = done, time.perf_counter()
    start_round = done
    target = 1 if choice["adaptive_rounds_per_call"] else per_call  # first call: measure
    stopped = None
    try:
        while done < end:
            count = min(target, end - done, eval_every - done % eval_every)
            if every:
                count = min(count, every - done % every)
            last = done + count == end
            if plan and plan.level == "example":
                allowed = plan.affordable(done, count)
                if allowed == 0:
                    break
                if allowed < count:
                    count, last = allowed, True
            t1 = time.perf_counter()
            state, metrics = run(state, data, model_state, root, done, count)
            metrics = jax.device_get(metrics)
            seconds = time.perf_counter() - t1
            train_seconds += seconds
            if choice["adaptive_rounds_per_call"]:
                per_round = seconds / count
                target = int(min(per_call, max(1, TARGET_SECONDS_PER_CALL // max(per_round, 1e-9))))
            finite = np.asarray(metrics.pop("_params_finite"))
            rows = [{"round": done + i + 1, **{k: _scalar(v[i]) for k, v in metrics.items()}}
                    for i in range(count)]
            if plan:
                for row, eps in zip(rows, plan.epsilon_rows(done + 1, count,
                                                            plan.record(program, root, done, count))):
                    row["epsilon"] = eps
            bad = _first_divergence(rows, finite)
            if bad is not None:
                i, what = bad
                _log(rows[:i + 1], history, writer, callback)
                last_good = f"; the last good checkpoint (round {saved_round}) in {ckpt.directory} is kept" \
                    if ckpt is not None and ckpt.steps() else ""
                raise UserError(f"training diverged at round {rows[i]['round']} ({what}); lower the "
                                f"client or server learning rate{last_good}")
            done += count
            if done % eval_every == 0 or last:
                evaluated, client_metrics = _evaluate(algorithm.params(state.server),
                                                      _current_model_state(model_state, state),
                                                      central, per_client, state.clients,
                                                      heldout_eval)
                rows[-1].update(evaluated)
            _log(rows, history, writer, callback)
            bar.update(count, rows[-1], (done - start_round) / max(train_seconds, 1e-9))
            if ckpt is not None and (last or (every and done % every == 0) or (
                    checkpoint.every_seconds is not None
                    and time.perf_counter() - last_save >= checkpoint.every_seconds)):
                ckpt.save(done, _checkpoint_tree(state, model_state),
                          _checkpoint_meta(root, history, run_config))
                saved_round, last_save = done, time.perf_counter()
    finally:
        bar.close()
        if streamer is not None:
            streamer.close()
        if writer:
            writer.close()
        if ckpt is not None:
            ckpt.wait()  # a save in flight holds a good state: let it land
            ckpt.close()

    if done < rounds:
        stopped = plan.stop_message(done)
        warn_stop(stopped)
    ran = max(done - start_round, 1)
    summary = {
        "rounds": rounds,
        "final": _final_metrics(history[-1]),
        "train_loss": history[-1]["train_loss"],
        "seconds_per_round": train_seconds / ran,
        "compile_seconds": compile_seconds,
        "resumed_from_round": start_round,
        "num_params": model.num_params(params),
        "batch_norm": batch_norm,
        "feature_cache": cache_info or False,
        "engine": {**choice, "backend": backend, "local_steps": schedule.num_steps,
                   "batch_size": schedule.batch_size, "data_placement": data_placement,
                   **({"stream": {"rounds_per_call": per_call, "buffer_rows": streamer.capacity,
                                  "calls": streamer.calls, "prefetched_calls": streamer.prefetched}}
                      if streamer is not None else {})},
        "data": {"num_clients": train_data.num_clients, "num_examples": train_data.num_examples,
                 "max_client_size": train_data.max_client_size, **(metadata or {})},
    }
    if plan:
        summary["privacy"] = plan.summary(done)
    if stopped:
        summary["stopped"] = stopped
    params = algorithm.params(state.server)
    if workdir:
        _write_json(os.path.join(workdir, "summary.json"), summary)
        export_params(params, os.path.join(workdir, "params.npz"))
        if client_metrics is not None:
            _write_json(os.path.join(workdir, "client_metrics.json"), client_metrics)
    return Result(params, _current_model_state(model_state, state), state.server, history,
                  summary, state.clients, client_metrics)


# Fine-tuning randomness of held-out clients: its own stream, apart from the training clients'.
HELDOUT_STREAM = 0x4E1D


BATCH_NORM_MODES = ("auto", "frozen", "averaged", "local")
# The model's initial parameters come from fold_in(root key, INIT_STREAM).
INIT_STREAM = 0x1A17


def _batch_norm_mode(batch_norm: str, model: Model, privacy) -> str | None:
    """The `batch_norm` mode a run uses (see simulate), checked; None for a model without
    running statistics."""
    if batch_norm not in BATCH_NORM_MODES:
        raise UserError(f"batch_norm must be one of {', '.join(map(repr, BATCH_NORM_MODES))}, "
                        f"got {batch_norm!r}")
    if not model.stats:
        return None
    if batch_norm == "auto":
        state = jax.eval_shape(model.init, jax.random.key(0))[1]
        frozen = isinstance(state, dict) and bool(jax.tree_util.tree_leaves(state.get("frozen")))
        batch_norm = "frozen" if frozen or privacy is not None else "averaged"
    if batch_norm == "frozen" and model.freeze_stats is None:
        raise UserError(f"model {model.name} cannot train with frozen BatchNorm statistics (its "
                        f"training flag switches BatchNorm and dropout together); use "
                        f"batch_norm='averaged' or 'local', or build it with from_nnx, or "
                        f"from_linen(..., frozen_norm_kwarg=...)")
    example_level = type(privacy).__name__ == "ExampleLevelDP"
    if privacy is not None and (batch_norm == "averaged" or (batch_norm == "local" and example_level)):
        why = ("BatchNorm's batch statistics mix the examples of a batch, which DP-SGD's "
               "per-example clipping cannot bound" if example_level else
               "clients would send their BatchNorm statistics to the server without clipping "
               "or noise")
        fix = "batch_norm='frozen'" if example_level else "batch_norm='frozen' or 'local'"
        raise UserError(f"batch_norm={batch_norm!r} is not private: {why}; use {fix}, or a "
                        f"model without BatchNorm (e.g. norm='group')")
    return batch_norm


def _feature_cache_blocker(model: Model, params, preprocess) -> str | None:
    """Why the feature cache cannot serve this run, or None if it can."""
    split_ = model.head_split
    if split_ is None:
        return f"model {model.name} has no features/head split (from_nnx(..., head=...))"
    outside = [n for n in path_names(params) if not any(under(n, h) for h in split_.names)]
    if outside:
        return (f"parameters outside the head {list(split_.names)} train (e.g. {outside[0]}); "
                f"freeze them with with_trainable(model, 'head')")
    if not split_.fixed:
        return ("the frozen backbone computes differently in training (dropout, or BatchNorm "
                "statistics updated: use batch_norm='frozen')")
    if isinstance(preprocess, Preprocess) and preprocess.augments:
        return "augmentation (random crop or flip) changes the inputs at every step"
    return None


def _check_feature_cache(feature_cache) -> None:
    if feature_cache not in ("auto", True, False):
        raise UserError(f"feature_cache must be 'auto', True or False, got {feature_cache!r}")


def _use_feature_cache(feature_cache, model: Model, params, preprocess) -> bool:
    if feature_cache is False:
        return False
    reason = _feature_cache_blocker(model, params, preprocess)
    if reason is not None and feature_cache is True:
        raise UserError(f"feature_cache=True cannot apply: {reason}; or set feature_cache='auto'")
    return reason is None


def _feature_extractor(head_split, params, model_state, preprocess, input_key: str,
                       batch_size: int):
    """`convert(data)`: `data` (FederatedData, dict of arrays or None) with its inputs
    replaced by the backbone's features (host numpy arrays, computed in fixed-size
    batches on the device); `convert.examples` counts the examples converted."""
    def features(p, s, x):
        if preprocess is not None:
            x = preprocess({input_key: x}, None, train=False)[input_key]
        return head_split.features(p, s, x)

    run = jax.jit(features)

    def of(x):
        x = np.asarray(x)
        n = x.shape[0]
        b = max(1, min(batch_size, n))
        parts = []
        for lo in range(0, n, b):
            chunk = x[lo:lo + b]
            if chunk.shape[0] < b:  # one shape, one compilation
                chunk = np.concatenate([chunk, np.repeat(chunk[:1], b - chunk.shape[0], axis=0)])
            parts.append(np.asarray(run(params, model_state, chunk))[:min(b, n - lo)])
        convert.examples += n
        return np.concatenate(parts) if parts else np.zeros((0,), np.float32)

    def convert(data):
        if data is None:
            return None
        if hasattr(data, "client_ids"):
            return type(data)({**data.features, input_key: of(data.features[input_key])},
                              data.offsets, data.client_ids)
        return {**data, input_key: of(data[input_key])}

    convert.examples = 0
    return convert


def _head_model(model: Model, feature_shape: tuple[int, ...]) -> Model:
    """The model's head on cached features: same init (params and state), `apply` runs the
    head only."""
    head = model.head_split

    def apply(params, state, f, *, train=False, rng=None):
        return head.apply_head(params, state, f, train=train, rng=rng)

    return Model(init=model.init, apply=apply, input_shape=feature_shape,
                 name=f"{model.name}[cached features]")


def _current_model_state(model_state, state):
    """The global model's state: `model_state` with the running statistics of the run."""
    return model_state if state.stats is None else merge(model_state, state.stats)


def _heldout_parts(heldout_data, train_data):
    """(fine-tuning split or None, test split) of the held-out clients, checked."""
    if heldout_data is None:
        return None
    parts = tuple(heldout_data) if isinstance(heldout_data, (tuple, list)) else (None, heldout_data)
    if len(parts) != 2 or not all(p is None or hasattr(p, "client_ids") for p in parts):
        raise UserError("heldout_data must be a FederatedData of held-out clients or a pair "
                        "(their fine-tuning split, their test split) of FederatedData")
    tune_on, test_on = parts
    training = set(train_data.client_ids)
    for part in parts:
        overlap = [] if part is None else [c for c in part.client_ids if c in training]
        if overlap:
            raise UserError(f"{len(overlap)} held-out client(s) (e.g. {overlap[0]!r}) are also "
                            f"training clients; held-out clients must never be trained on "
                            f"(split them off with FederatedData.holdout)")
    return tune_on, test_on


def _fit_stream_window(streamer, per_call: int, slots: int, budget: int | None) -> int:
    """The most rounds per call (at most `per_call`) whose streamed rows fit `budget`."""
    if budget is None:
        return per_call
    row = streamer.row_bytes()
    for rounds in range(per_call, 0, -1):
        if streamer.capacity_for(rounds * slots) * row <= budget:
            return rounds
    need = streamer.capacity_for(slots) * row
    raise UserError(f"one round's cohort needs {need / 2**20:.1f} MiB of training data on the "
                    f"device, more than engine.device_data_budget ({budget / 2**20:.1f} MiB); "
                    f"raise the budget or lower clients_per_round")


def _checkpoint_tree(state, model_state) -> dict:
    return {"sim": state, "model_state": model_state}


def _checkpoint_meta(root, history, run_config) -> dict:
    # A copy: the save is written in the background while the history grows.
    return {"root_key": np.asarray(jax.random.key_data(root)).tolist(), "history": list(history),
            "config": run_config}


def _resume_checks(meta, run_config, rounds, allow_config_change, root, directory):
    """Round and history to resume from; refuses a changed run unless allowed."""
    done = int(meta["round"])
    if meta.get("root_key") != np.asarray(jax.random.key_data(root)).tolist():
        raise UserError(f"the checkpoint in {directory} was made with another seed; use the "
                        f"same seed to resume, or a fresh --workdir")
    diffs = config_differences(meta.get("config") or {}, run_config,
                               ignore=lambda key: key == "rounds" or key.startswith("checkpoint."))
    if diffs and not allow_config_change:
        raise UserError(f"the run in {directory} was started with a different config "
                        f"({'; '.join(diffs)}); rerun with the same config, pass "
                        f"--allow-config-change (allow_config_change=True) to resume anyway, or "
                        f"use a fresh --workdir")
    if diffs:
        warnings.warn(f"resuming {directory} with a changed config: {'; '.join(diffs)}", stacklevel=3)
    if done > rounds:
        raise UserError(f"the checkpoint in {directory} is at round {done}, past rounds={rounds}; "
                        f"set rounds >= {done} or use a fresh --workdir")
    history = list(meta["history"])
    if len(history) != done:
        raise UserError(f"the checkpoint at round {done} in {directory} holds {len(history)} "
                        f"metrics rows; it is damaged, delete it to use the previous one")
    return done, history


def _first_divergence(rows, params_finite):
    """(index, what) of the first round whose loss or new global parameters are not finite."""
    for i, row in enumerate(rows):
        if not math.isfinite(row["train_loss"]):
            return i, f"train_loss is {row['train_loss']}"
        if not bool(params_finite[i]):
            return i, "the global parameters hold NaN or Inf"
    return None


def _log(rows, history, writer, callback):
    for row in rows:
        history.append(row)
        if writer:
            writer.write(json.dumps(row) + "\n")
        if callback:
            callback(row)
    if writer:
        writer.flush()


def _prepare_workdir(workdir):
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"workdir {workdir} exists and is not a directory; choose another path")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create workdir {workdir} ({e.strerror}); choose a writable path") from None


def _final_metrics(row: dict) -> dict:
    """The evaluation metrics of a (last) metrics row."""
    return {k: v for k, v in row.items() if k.startswith(("test_", "client_", "heldout_"))}


def _atomic_write(path, text: str):
    """Writes `path` whole or not at all (a crash leaves the previous file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_json(path, value):
    _atomic_write(path, json.dumps(value, indent=2, default=str))


def _rewrite_jsonl(path, rows):
    _atomic_write(path, "".join(json.dumps(row) + "\n" for row in rows))


def _describe(value, depth=0):
    """A JSON description of an algorithm/aggregator object: its class and simple fields.
    Functions (e.g. inside optax transformations) are described by type only."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if depth > 4:
        return type(value).__name__
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"class": type(value).__name__,
                **{f.name: _describe(getattr(value, f.name), depth + 1)
                   for f in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return [_describe(v, depth + 1) for v in value]
    return type(value).__name__


def _data_digest(data) -> str | None:
    if data is None:
        return None
    if hasattr(data, "features"):
        return checksum({"features": dict(data.features), "offsets": np.asarray(data.offsets)})
    return checksum(dict(data))


def describe_run(*, model, algorithm, train_data, task, aggregator, clients_per_round,
                 eval_every, seed, engine, input_key, eval_data, client_eval_data,
                 privacy=None, batch_norm=None) -> dict:
    """What identifies a run of `simulate()` when no config is given: checked on resume.

    Optimizer hyperparameters live inside optax closures and cannot be seen here; pass
    `config=` (any JSON-like dict of your hyperparameters) to have them checked too.
    """
    return {
        "clients_per_round": clients_per_round, "eval_every": eval_every, "seed": seed,
        "model": model.name, "task": task.name, "input_key": input_key,
        "algorithm": _describe(algorithm), "aggregator": _describe(aggregator),
        "engine": _describe(engine),
        "data": {"num_clients": train_data.num_clients, "num_examples": train_data.num_examples,
                 "digest": _data_digest(train_data)},
        "eval_data": _data_digest(eval_data), "client_eval_data": _data_digest(client_eval_data),
        "privacy": _describe(privacy),
        **({"batch_norm": batch_norm} if batch_norm is not None else {}),
    }


def _scalar(x):
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x.tolist()


def _evaluate(params, model_state, central, per_client, client_states=None, heldout=None):
    """(metrics row entries, per-client metrics or None)."""
    out, clients = {}, None
    if central is not None:
        out.update({f"test_{k}": float(v) for k, v in jax.device_get(central(params, model_state)).items()})
    if per_client is not None:
        parts = per_client(params, model_state, client_states)
        for name, values in parts.items():
            out.update(summarize_clients(values, prefix=f"client_{name}_"))
        clients = {"client_ids": [str(c) for c in per_client.client_ids],
                   **{name: {k: np.asarray(v).tolist() for k, v in values.items()}
                      for name, values in parts.items()}}
    if heldout is not None:
        for name, values in heldout(params, model_state).items():
            out.update(summarize_clients(values, prefix=f"heldout_{name}_"))
    return out, clients


class _progress_bar:
    """tqdm over rounds showing loss, accuracy and rounds/s; silent when disabled."""

    def __init__(self, total: int, enabled: bool, initial: int = 0):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=initial, unit="round", dynamic_ncols=True)
        self._shown: dict = {}

    def update(self, n: int, row: dict, rounds_per_second: float):
        if self._bar is None:
            return
        self._shown["loss"] = f"{row['train_loss']:.4f}"
        for key, label in (("test_accuracy", "test_acc"), ("test_mse", "test_mse")):
            if key in row:
                self._shown[label] = f"{row[key]:.4f}"
        self._shown["rounds/s"] = f"{rounds_per_second:.1f}"
        self._bar.set_postfix(self._shown, refresh=False)
        self._bar.update(n)

    def close(self):
        if self._bar is not None:
            self._bar.close()
