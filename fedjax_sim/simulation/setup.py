"""Planning a run: from what `simulate()` was asked (`RunRequest`) to what it will execute
(`RunPlan`): checked inputs, the BatchNorm mode, the privacy plan, the local schedule,
the initial model, the feature cache, the engine's choices, the compiled round's
definition, where the data lives, and the evaluators.

Nothing here runs a round; `simulation.loop` does.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.aggregators import AggregatorPart, weighted_mean
from fedjax_sim.algorithms import Algorithm, LocalStatistics
from fedjax_sim.data.augment import Preprocess, default_preprocess
from fedjax_sim.engine import program_cache
from fedjax_sim.engine.batching import Schedule, make_schedule
from fedjax_sim.engine.client_states import device_memory_bytes, resolve_placement
from fedjax_sim.engine.contracts import Problem
from fedjax_sim.engine.options import (EngineOptions, client_step_flops, has_convolution,
                                       resolve_engine)
from fedjax_sim.engine.mesh import describe as describe_mesh, put as put_on_mesh, replicated, resolve_mesh
from fedjax_sim.engine.round import DeviceData, RoundProgram
from fedjax_sim.engine.streaming import (HostData, MeshHostData, data_bytes, parse_bytes,
                                         resolve_data_placement)
from fedjax_sim.errors import UserError
from fedjax_sim.models.adapter import Model
from fedjax_sim.models.tasks import Task, classification
from fedjax_sim.simulation import inputs
from fedjax_sim.simulation.checkpoint import CheckpointOptions
from fedjax_sim.simulation.evaluation import (CentralEvaluator, ClientEvaluator, Evaluators,
                                              FineTune)
from fedjax_sim.simulation.feature_cache import (cache_features, check_feature_cache,
                                                 use_feature_cache)
from fedjax_sim.simulation.private import PrivatePlan
from fedjax_sim.simulation.rundir import describe_run
from fedjax_sim.trees import merge, path_names

PyTree = Any
# The model's initial parameters come from fold_in(root key, INIT_STREAM).
INIT_STREAM = 0x1A17
# Fine-tuning randomness of held-out clients: its own stream, apart from the training clients'.
HELDOUT_STREAM = 0x4E1D
BATCH_NORM_MODES = ("auto", "frozen", "averaged", "local")


@dataclasses.dataclass(frozen=True)
class RunRequest:
    """Everything `simulate()` is asked to do, as given.

    model: a `fedjax_sim.models.Model` (zoo model, or `from_nnx` / `from_linen`).
    algorithm: e.g. `fedjax_sim.algorithms.fedavg(optax.sgd(0.1))`.
    train_data: a `FederatedData`; each round samples `clients_per_round` of its clients
      uniformly without replacement.
    rounds: how many rounds to train.
    task: loss and metrics (default: classification).
    eval_data: a pooled test set (dict of arrays) for centralized `test_*` metrics.
    client_eval_data: a `FederatedData` with the same clients' held-out examples for
      per-client `client_test_*` metrics (mean, percentiles, min); personalized
      algorithms add `client_personal_*` (each client's own model).
    heldout_data: clients never trained on (their ids must not be training clients): a
      `FederatedData`, evaluated per client with the global model (`heldout_test_*`), or a
      pair (their training split, their test split), which with `finetune` also reports
      `heldout_finetuned_*` (fine-tuned on the first, tested on the second).
    finetune: `FineTune(steps, learning_rate, batch_size)`: per-client evaluation also
      fine-tunes each evaluation client's model on its own training split and reports
      `client_finetuned_*` (needs `client_eval_data`).
    eval_every: evaluate after every this many rounds, and after the last.
    eval_batch_size: examples per evaluation batch.
    seed: the one root of all randomness (init, sampling, shuffling, dropout).
    aggregator: aggregator part(s) (default: weighted mean).
    privacy: `fedjax_sim.privacy.ClientLevelDP(...)` (DP-FedAvg: clipped and noised
      updates, Poisson client sampling by default) or `ExampleLevelDP(...)` (DP-SGD in every
      client). Each round's `epsilon` is logged; `target_epsilon` stops training before it
      would be exceeded (the summary's `stopped` says so).
    engine: execution strategy (default: chosen by backend and model), including where the
      training data lives (`data_placement`, `device_data_budget`).
    preprocess: on-device conversion and augmentation of each batch's inputs
      (`fedjax_sim.data.Preprocess`: uint8 -> float scaling, normalisation, random crop and
      flip in local training). 'auto': uint8 images are scaled to [0, 1], other inputs are
      fed as stored; None: always as stored.
    batch_norm: what happens to a model's running statistics (BatchNorm's mean and
      variance, the model's `stats`). 'frozen': clients normalise with the stored (e.g.
      pretrained) statistics, which never change; 'averaged': clients normalise with batch
      statistics and update the running ones, and the server averages them like the
      weights (with the same client weights); 'local' (FedBN): each client keeps its own
      statistics (algorithms.LocalStatistics), so models are evaluated per client with
      their own; 'auto': 'frozen' for a model with frozen parameters (`with_trainable`) or
      under differential privacy, else 'averaged'. Ignored for models without statistics.
    feature_cache: train a head on backbone features computed once (see
      `simulation.feature_cache`): 'auto' where it applies; True: required (an error says
      why it cannot apply); False: never. The summary's `feature_cache` records it.
    input_key: the feature the model reads.
    initial_params: start from these global parameters (a tree shaped like the model's
      parameters, e.g. `result.params` of an earlier run) instead of the model's init.
    workdir: if given, `metrics.jsonl`, `summary.json` and the final `params.npz` are written
      there, and checkpoints in `workdir/checkpoints` (see `checkpoint`). If that directory
      already holds checkpoints of this run, the run resumes from the newest intact one and
      ends exactly as an uninterrupted run would; a run that differs (another seed, model,
      data, algorithm or optimizer hyperparameters) is refused unless
      `allow_config_change`.
    checkpoint: when to save (`CheckpointOptions`: every k rounds, every s seconds, at the
      end; how many to keep).
    config: a JSON-like dict describing the run, stored with each checkpoint and compared on
      resume (the CLI passes its config). Default: a description built from the arguments
      (model, algorithm fields, what each optax optimizer does on a probe, data digest,
      seed, ...).
    allow_config_change: resume even if `config` differs from the checkpoint's (`rounds` and
      the checkpoint cadence may always change).
    progress: show a progress bar and resume messages.
    callback: called with each round's metrics dict (after it is logged), or a list of such
      functions, called in order (e.g. `fedjax_sim.tracking.wandb_callback(run)`,
      `mlflow_callback()`).
    metadata: extra JSON-serialisable facts about the run, recorded in the summary's `data`
      entry (e.g. how targets were standardised).
    evaluate_initial: also evaluate the initial model before the first round and log it as
      a row with `round` 0 (its evaluation metrics only; ε = 0 under differential
      privacy) in the history, metrics.jsonl, callbacks and TensorBoard. Nothing else
      changes: every round's numbers are those of a run without it. A run resumed from a
      checkpoint keeps the rows the checkpoint holds (with or without round 0).
    attack: malicious clients (`fedjax_sim.attacks.Attack`): which clients, and what they
      do to their data and to the updates they send. Every round logs
      `malicious_clients` (how many of its cohort are malicious); a backdoor also logs
      `backdoor_success` (on `eval_data`, triggered) at every evaluation.
    tensorboard: write every round's metrics as TensorBoard scalars (step = round), and
      the summary and hyperparameters at the end (`fedjax_sim.simulation.tracking`): True
      for `<workdir>/tensorboard`, or a directory path. Needs tensorboardX (the `tracking`
      extra); only process 0 of a multi-process run writes.
    """

    model: Model
    algorithm: Algorithm
    train_data: Any
    rounds: int
    clients_per_round: int
    task: Task | None = None
    eval_data: dict | None = None
    client_eval_data: Any = None
    heldout_data: Any = None
    finetune: FineTune | None = None
    eval_every: int = 10
    eval_batch_size: int = 256
    seed: int = 0
    aggregator: AggregatorPart | None = None
    privacy: Any = None
    engine: EngineOptions = EngineOptions()
    preprocess: Preprocess | str | None = "auto"
    batch_norm: str = "auto"
    feature_cache: bool | str = "auto"
    input_key: str = "x"
    initial_params: PyTree = None
    workdir: str | None = None
    checkpoint: CheckpointOptions = CheckpointOptions()
    config: dict | None = None
    allow_config_change: bool = False
    progress: bool = True
    callback: Any = None
    metadata: dict | None = None
    evaluate_initial: bool = False
    tensorboard: bool | str = False
    attack: Any = None


@dataclasses.dataclass
class RunPlan:
    """What a run executes, decided before anything is compiled."""

    request: RunRequest
    model: Model  # as trained: with frozen statistics, or the head on cached features
    algorithm: Algorithm  # as run: FedBN wraps it in LocalStatistics
    train_data: Any  # as trained: backbone features under the feature cache
    task: Task
    aggregator: AggregatorPart
    private: PrivatePlan | None
    schedule: Schedule
    batch_norm: str | None
    root: jax.Array
    params: PyTree
    model_state: PyTree
    stats: PyTree  # the running statistics clients update, or None
    program: RoundProgram
    engine: dict  # resolve_engine's choices
    backend: str
    client_states: str | None  # where a stateful algorithm's client states live
    data_placement: str
    streamer: HostData | None
    data: DeviceData | None
    evaluators: Evaluators
    describe: Callable[[], dict]  # builds run_config, when it is first needed
    cache_info: dict | None

    @property
    def slots(self) -> int:
        return self.program.clients_per_round

    @property
    def run_config(self) -> dict:
        """What identifies the run (the request's `config`, else `describe_run`), built the
        first time a run directory asks: describing the data hashes every example, seconds
        for a million clients, which a run without a workdir never needs."""
        if not hasattr(self, "_run_config"):
            config = self.describe()
            mechanism = self.private.mechanism if self.private else None
            if hasattr(mechanism, "describe"):
                # DP-FTRL's strategy (BandMF's is built for the run's rounds): a run resumed
                # with another would continue another mechanism's noise, so that is a change.
                config = {**config, "privacy_strategy": mechanism.describe()}
            self._run_config = config
        return self._run_config

    def initial_state(self):
        return self.program.init(self.params, self.client_states or "device", stats=self.stats)

    def current_model_state(self, model_state, state):
        """The global model's state: `model_state` with the run's running statistics."""
        return model_state if state.stats is None else merge(model_state, state.stats)

    def last_round(self, done: int) -> int:
        """Training ends here: `rounds`, or earlier where a client-level privacy budget runs
        out (known up front; the example level is checked before every call)."""
        rounds = self.request.rounds
        if self.private and self.private.level == "client":
            return done + self.private.affordable(done, rounds - done)
        return rounds


def plan_run(request: RunRequest) -> RunPlan:
    r = request
    task = r.task or classification()
    inputs.check_counts(r.rounds, r.clients_per_round, r.eval_every)
    inputs.check_train_data(r.model, r.train_data, r.clients_per_round, task, r.input_key)
    inputs.check_eval_data(r.eval_data, r.client_eval_data, task, r.input_key)
    preprocess = _preprocess(r.preprocess, r.train_data, r.input_key)
    batch_norm = batch_norm_mode(r.batch_norm, r.model, r.privacy)
    check_feature_cache(r.feature_cache)
    model = r.model.freeze_stats() if batch_norm == "frozen" else r.model
    heldout = heldout_parts(r.heldout_data, r.train_data)
    if r.finetune is not None and r.client_eval_data is None and (heldout is None or heldout[0] is None):
        raise UserError("finetune= evaluates each client after fine-tuning on its own data; it "
                        "needs client_eval_data (per-client test splits, e.g. from "
                        "clients.split(0.2, seed=0)) or heldout_data=(train split, test split)")
    private, aggregator, schedule = _privacy_and_schedule(r)
    attack, malicious, poisoned = _attack(r.attack, r.train_data)

    root = jax.random.key(r.seed)
    params, model_state = _initial_model(model, root, r.initial_params)
    stats_mode = batch_norm if batch_norm in ("averaged", "local") else None
    stats = model.stats_of(model_state) if stats_mode is not None else None
    algorithm = LocalStatistics.wrap(r.algorithm, stats) if batch_norm == "local" else r.algorithm
    if not algorithm.global_model and r.client_eval_data is None:
        warnings.warn(f"{type(algorithm).__name__} has no global model to test and no "
                      f"client_eval_data was given, so nothing will be evaluated; pass "
                      f"client_eval_data to evaluate each client's personal model", stacklevel=3)
    datasets = {"train": poisoned, "eval": r.eval_data, "client_eval": r.client_eval_data,
                "heldout": heldout, "triggered": _triggered(attack, r.eval_data)}
    cache_info = None
    if use_feature_cache(r.feature_cache, model, params, preprocess):
        model, datasets, cache_info = cache_features(model, params, model_state, preprocess,
                                                     r.input_key, r.eval_batch_size, datasets)
        preprocess = None
    train_data = datasets["train"]

    example_batch = _example_batch(model, params, model_state, train_data, schedule, preprocess,
                                   r.input_key, task)
    out_shape = _output_shape(model, params, model_state, example_batch[r.input_key])
    inputs.check_labels(task, out_shape, datasets["eval"], datasets["client_eval"],
                        train_data.features[task.label_key])

    backend = jax.default_backend()
    problem = Problem(model, task, model_state, r.input_key,
                      example_gradient=private.example_gradient(backend) if private else None)
    sampling = private.sampling if private else None
    choice = resolve_engine(r.engine, backend=backend,
                            conv=has_convolution(model, params, model_state, example_batch[r.input_key]),
                            num_steps=schedule.num_steps,
                            clients_per_round=sampling.slots if sampling else r.clients_per_round,
                            step_flops=client_step_flops(problem, params, example_batch))
    mesh = resolve_mesh(r.engine.mesh)
    choice["mesh"] = describe_mesh(mesh)
    program = RoundProgram(algorithm, problem, aggregator, schedule,
                           num_clients=train_data.num_clients,
                           max_client_size=train_data.max_client_size,
                           clients_per_round=r.clients_per_round,
                           clients_per_chunk=choice["clients_per_chunk"], unroll=choice["unroll"],
                           sampling=sampling, preprocess=preprocess, stats_mode=stats_mode,
                           mesh=mesh, attack=attack.update if attack else None,
                           malicious=malicious)
    check_stacked_cohort(program.stacked_cohort_bytes(params), program.clients_per_round,
                         backend)
    data_placement = resolve_data_placement(
        r.engine.data_placement, data_bytes(train_data), parse_bytes(r.engine.device_data_budget),
        None if backend == "cpu" else device_memory_bytes())
    streamer = None
    if data_placement == "host":  # on a mesh, each device receives its own clients' rows
        streamer = (HostData(train_data) if mesh is None
                    else MeshHostData(train_data, mesh, program.clients_per_round))
    data = DeviceData.from_federated(train_data) if streamer is None else None
    if data is not None and mesh is not None:
        data = put_on_mesh(data, jax.tree_util.tree_map(lambda _: replicated(mesh), data))
    evaluators = _evaluators(r, model, task, algorithm, datasets, preprocess, root, data, streamer)
    _check_evaluate_initial(r.evaluate_initial, evaluators)
    one_client = program.one_client_state(params)
    client_states = None if one_client is None else resolve_placement(
        r.engine.client_states, one_client, train_data.num_clients, backend)
    describe = (lambda: r.config) if r.config is not None else lambda: describe_run(
        model=model, algorithm=algorithm, train_data=train_data, task=task, aggregator=aggregator,
        clients_per_round=r.clients_per_round, eval_every=r.eval_every, seed=r.seed,
        engine=r.engine, input_key=r.input_key, eval_data=datasets["eval"],
        client_eval_data=datasets["client_eval"], privacy=r.privacy, batch_norm=batch_norm,
        initial_params=r.initial_params, attack=attack)
    return RunPlan(r, model, algorithm, train_data, task, aggregator, private, schedule,
                   batch_norm, root, params, model_state, stats, program, choice, backend,
                   client_states, data_placement, streamer, data, evaluators, describe,
                   cache_info)


# A stacked cohort may take at most this share of the device's memory (of the host's on CPU).
STACKED_COHORT_FRACTION = 0.5


def check_stacked_cohort(need: int, slots: int, backend: str, limit: int | None = None) -> None:
    """Refuses, before compiling, a round whose stacked cohort (a robust rule, a secure sum,
    an attack that forges from the whole cohort: every client's update at once) would
    take more than STACKED_COHORT_FRACTION of the memory; `limit`: that memory in bytes
    (default: the device's, or the host's on CPU)."""
    if not need:
        return
    if limit is None:
        limit = (device_memory_bytes() if backend != "cpu" else
                 os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if limit is None or need <= STACKED_COHORT_FRACTION * limit:
        return
    gib = lambda b: f"{b / 2**30:.1f} GiB"
    raise UserError(f"the aggregation holds every client's update at once: {slots} cohort slots x "
                    f"{gib(need / slots)} = {gib(need)}, more than half of the {gib(limit)} this "
                    f"{'host' if backend == 'cpu' else 'device'} has; lower clients_per_round (or "
                    f"the Poisson cap, privacy.max_cohort_size), or use an aggregation that streams "
                    f"the weighted sum (no robust rule, secure sum or whole-cohort attack)")


def _attack(attack, train_data):
    """(the attack, its [C] malicious mask, the training data as the malicious clients
    poisoned it); (None, None, the data) without an attack."""
    if attack is None:
        return None, None, train_data
    from fedjax_sim.attacks import Attack

    if not isinstance(attack, Attack):
        raise UserError(f"attack must be a fedjax_sim.attacks.Attack, e.g. "
                        f"Attack(fraction=0.2, update=fs.attacks.sign_flip()), got {attack!r}")
    malicious = attack.malicious(train_data.client_ids)
    return attack, malicious, attack.poison(train_data, malicious)


def _triggered(attack, eval_data):
    """The test examples a backdoor's success is measured on (None without one)."""
    if attack is None or attack.data is None or attack.data.triggered is None or eval_data is None:
        return None
    return attack.data.triggered(eval_data)


def _preprocess(preprocess, train_data, input_key):
    if isinstance(preprocess, str):
        if preprocess != "auto":
            raise UserError(f"preprocess must be 'auto', None or a fedjax_sim.data.Preprocess, "
                            f"got {preprocess!r}")
        preprocess = default_preprocess(train_data.features[input_key], input_key)
    if isinstance(preprocess, Preprocess):
        preprocess.check(tuple(train_data.features[input_key].shape[1:]))
    return preprocess


def _privacy_and_schedule(r: RunRequest):
    """(the privacy plan or None, the aggregator, the local schedule)."""
    private = None
    aggregator = r.aggregator
    if r.privacy is not None:
        private = PrivatePlan(r.privacy, algorithm=r.algorithm, aggregator=r.aggregator,
                              num_clients=r.train_data.num_clients,
                              clients_per_round=r.clients_per_round,
                              max_client_size=r.train_data.max_client_size, rounds=r.rounds,
                              update_entries=_entries(r.model))
        aggregator = private.aggregator
    local = r.algorithm.local_schedule
    schedule = make_schedule(r.train_data.max_client_size, **{
        "batch_size": local.batch_size, "local_epochs": local.local_epochs,
        "local_steps": local.local_steps, **(private.schedule_args if private else {})})
    if private:
        private.set_steps_per_round(schedule.num_steps)
        private.check_budget(r.rounds)
    return private, aggregator or weighted_mean(), schedule


def _entries(model: Model) -> int:
    """How many values the model's trainable parameters (a client's update) hold."""
    return model.num_params(program_cache.jit(model.init).eval_shape(jax.random.key(0))[0])


def _initial_model(model: Model, root, initial_params):
    params, model_state = program_cache.jit(model.init)(jax.random.fold_in(root, INIT_STREAM))
    if initial_params is None:
        return params, model_state
    given = path_names(initial_params)
    expected = path_names(params)
    if given != expected:
        first = next((f"{a!r} where the model has {b!r}" for a, b in zip(given, expected) if a != b),
                     f"{len(given)} leaves where the model has {len(expected)}")
        raise UserError(f"initial_params do not match model {model.name}'s parameter tree "
                        f"({first}); pass parameters of the same model, e.g. an earlier "
                        f"result.params")
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    for (path, mine), theirs in zip(flat, jax.tree_util.tree_leaves(initial_params)):
        if tuple(np.shape(theirs)) != tuple(mine.shape):
            raise UserError(f"initial_params{jax.tree_util.keystr(path)} has shape "
                            f"{list(np.shape(theirs))} but model {model.name} needs "
                            f"{list(mine.shape)}; pass parameters of the same model")
    # A copy: the engine donates its state, which must never delete the caller's arrays.
    params = jax.tree_util.tree_map(lambda mine, x: jnp.array(x, dtype=mine.dtype), params,
                                    initial_params)
    return params, model_state


def _example_batch(model, params, model_state, train_data, schedule, preprocess, input_key, task):
    """One batch of real examples: it serves the shape check, the convolution check and the
    step cost estimate."""
    batch = {k: jnp.asarray(train_data.features[k][:schedule.batch_size])
             for k in (input_key, task.label_key)}
    return preprocess(batch, None, train=False) if preprocess is not None else batch


def _output_shape(model, params, model_state, example_x):
    return program_cache.memoized(lambda: _traced_output_shape(model, params, model_state, example_x),
                                  "output_shape", model,
                                  program_cache.signature((params, model_state, example_x)))


def _traced_output_shape(model, params, model_state, example_x):
    try:
        return jax.eval_shape(lambda p: model.apply(p, model_state, example_x, train=False)[0],
                              params).shape
    except Exception as e:  # a shape error inside the user's model
        raise UserError(f"model {model.name} fails on the data's inputs of shape "
                        f"{list(example_x.shape[1:])}: {str(e).splitlines()[0]}") from None


def _evaluators(r: RunRequest, model, task, algorithm, datasets, preprocess, root, data,
                streamer) -> Evaluators:
    common = dict(input_key=r.input_key, batch_size=r.eval_batch_size, preprocess=preprocess)
    central = None
    if datasets["eval"] is not None and algorithm.global_model:  # FedPer's head never trains
        central = CentralEvaluator(model, task, datasets["eval"], **common)
    backdoor = None
    if datasets.get("triggered") is not None and algorithm.global_model:
        backdoor = CentralEvaluator(model, task, datasets["triggered"], **common)
    per_client = None
    if datasets["client_eval"] is not None:
        personalize = algorithm.personal_params if algorithm.personalized else None
        per_client = ClientEvaluator(
            model, task, datasets["client_eval"], global_model=algorithm.global_model,
            personalize=personalize,
            personal_state=algorithm.personal_model_state if personalize else None,
            finetune=r.finetune, train_data=datasets["train"], train_arrays=data,
            train_stream=streamer, root=root, **common)
    heldout = None
    if datasets["heldout"] is not None:
        tune_on, test_on = datasets["heldout"]
        heldout = ClientEvaluator(
            model, task, test_on, global_model=algorithm.global_model,
            finetune=r.finetune if tune_on is not None else None, train_data=tune_on,
            root=jax.random.fold_in(root, HELDOUT_STREAM), **common)
    return Evaluators(central, per_client, heldout, backdoor)


def _check_evaluate_initial(evaluate_initial, evaluators: Evaluators) -> None:
    if not isinstance(evaluate_initial, bool):
        raise UserError(f"evaluate_initial must be True or False, got {evaluate_initial!r}")
    if evaluate_initial and all(e is None for e in evaluators):
        raise UserError("evaluate_initial=True evaluates the initial model, but this run has "
                        "nothing to evaluate it on; pass eval_data, client_eval_data or "
                        "heldout_data")


def batch_norm_mode(batch_norm: str, model: Model, privacy) -> str | None:
    """The `batch_norm` mode a run uses (see RunRequest), checked; None for a model without
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


def heldout_parts(heldout_data, train_data):
    """(fine-tuning split or None, test split) of the held-out clients, checked."""
    if heldout_data is None:
        return None
    parts = tuple(heldout_data) if isinstance(heldout_data, (tuple, list)) else (None, heldout_data)
    if len(parts) != 2 or not all(p is None or inputs.is_federated(p) for p in parts):
        raise UserError("heldout_data must be a FederatedData of held-out clients or a pair "
                        "(their fine-tuning split, their test split) of FederatedData")
    training = set(train_data.client_ids)
    for part in parts:
        overlap = [] if part is None else [c for c in part.client_ids if c in training]
        if overlap:
            raise UserError(f"{len(overlap)} held-out client(s) (e.g. {overlap[0]!r}) are also "
                            f"training clients; held-out clients must never be trained on "
                            f"(split them off with FederatedData.holdout)")
    return parts
