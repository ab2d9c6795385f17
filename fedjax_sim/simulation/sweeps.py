"""Sweeps: many runs of one experiment in one compiled program.

`sweep(run, grid)` calls `run(**settings)` for every combination of the grid's values (or,
with `zip=True`, for the values taken side by side); each call returns the keyword
arguments of a `simulate` run. Trials whose round programs are built alike — the same
model, algorithm and aggregator structure, schedule, cohort and data shapes, the same
training data — differ only in the program's runtime inputs: the seed (initial model,
cohort sampling, shuffling, dropout, DP noise), the algorithm's runtime hyperparameters
(optimizers made with `fs.algorithms.tunable` or `optax.inject_hyperparams`; FedProx's μ,
SCAFFOLD's and FedNova's learning rates, Ditto's λ: `Algorithm.hyperparams`) and the
aggregator's state (the DP clip norm and noise multiplier). They run as one more vmapped
axis of one compiled program (`RoundProgram.compile_trials`): trials × clients.
Trials that differ in anything else (a model width, the cohort size, another partition
of the data) form groups, one program each, run one group after another.

Each trial is evaluated, accounted for (ε) and logged as its own run would be; a trial
that diverges (a NaN loss or NaN parameters) is marked and left out from then on while
the others go on.
"""

from __future__ import annotations

import builtins
import csv
import dataclasses
import hashlib
import inspect
import io
import itertools
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim.engine import program_cache
from fedjax_sim.errors import UserError
from fedjax_sim.errors import Interrupted
from fedjax_sim.simulation.calls import _scalar, engine_summary, first_divergence
from fedjax_sim.simulation.checkpoint import CheckpointOptions, RunCheckpoints
from fedjax_sim.simulation.interrupt import deferred_interrupt
from fedjax_sim.simulation.loop import _evaluate as evaluate_run, _initial_row as initial_row
from fedjax_sim.simulation.progress import ProgressBar
from fedjax_sim.simulation.results import Result, run_summary
from fedjax_sim.simulation.rundir import (CLIENT_METRICS, CONFIG, SUMMARY, MetricsLog,
                                          RunDirectory, atomic_write, json_safe)
from fedjax_sim.simulation.setup import RunRequest, plan_run

# The metrics of evaluation rounds that the table reports (final and best values).
EVALUATED = ("test_", "client_", "heldout_")
# simulate() arguments a trial may not set: the sweep owns its files and its output.
_SWEEP_OWNED = ("workdir", "callback", "tensorboard", "progress", "checkpoint",
                "allow_config_change")


@dataclasses.dataclass
class Trial:
    """One run of a sweep: its `settings` (the grid's values), its `Result`, and why it
    stopped early if it diverged (`diverged`: the message `simulate` would raise)."""

    index: int
    settings: dict
    result: Result
    diverged: str | None = None
    group: int = 0


@dataclasses.dataclass
class SweepResult:
    """The trials of a sweep in grid order, and the table of their results.

    `metric` / `mode`: what "best" means ('max' for accuracies, 'min' for losses)."""

    trials: list[Trial]
    metric: str
    mode: str
    groups: list[dict]

    def table(self) -> list[dict]:
        """One row per trial: its settings, then `final_<metric>` and `best_<metric>` for
        every metric of its evaluation rows (the last value and the best over the
        evaluations), `rounds` run, and `diverged` (the message, or None)."""
        return [_trial_row(t, self.mode) for t in self.trials]

    def best(self) -> Trial:
        """The trial with the best final `metric` (diverged trials left out)."""
        key = f"final_{self.metric}"
        rows = [(row, trial) for row, trial in zip(self.table(), self.trials)
                if trial.diverged is None and _finite(row.get(key))]
        if not rows:
            raise UserError(f"no trial has a finite final {self.metric}; every trial diverged "
                            f"or {self.metric} is not one of the evaluated metrics")
        pick = max if self.mode == "max" else min
        return pick(rows, key=lambda rt: rt[0][key])[1]

    def aggregate(self, over: str = "seed") -> list[dict]:
        """The trials grouped by every setting except `over` (default: the seed), with the
        mean, standard deviation (ddof=1; 0 for one trial) and count of each numeric
        final and best metric over the group: `<metric>_mean`, `<metric>_std`, `n`."""
        names = [n for n in self.trials[0].settings if n != over] if self.trials else []
        groups: dict[tuple, list[dict]] = {}
        for row, trial in zip(self.table(), self.trials):
            key = tuple(_hashable(trial.settings[n]) for n in names)
            groups.setdefault(key, []).append(row)
        out = []
        for key, rows in groups.items():
            agg = dict(zip(names, (rows[0][n] for n in names)))
            agg["n"] = len(rows)
            metrics = [k for k in rows[0] if k.startswith(("final_", "best_"))]
            for m in metrics:
                values = np.array([r[m] for r in rows if _finite(r.get(m))], dtype=np.float64)
                agg[f"{m}_mean"] = float(values.mean()) if values.size else None
                agg[f"{m}_std"] = float(values.std(ddof=1)) if values.size > 1 else (
                    0.0 if values.size else None)
            out.append(agg)
        return out

    def summary_line(self) -> str:
        """'sweep done: N trials in G program(s); best <metric> = v with {settings}'."""
        failed = sum(t.diverged is not None for t in self.trials)
        head = (f"sweep done: {len(self.trials)} trials in {len(self.groups)} program(s)"
                f"{f', {failed} diverged' if failed else ''}")
        try:
            best = self.best()
        except UserError as e:
            return f"{head}; {e}"
        value = self.table()[best.index][f"final_{self.metric}"]
        return f"{head}; best {self.metric} = {value:.4f} with {best.settings}"

    def to_csv(self) -> str:
        """`table()` as CSV text (a header row, then a row per trial)."""
        rows = self.table()
        columns = list(dict.fromkeys(k for row in rows for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
        return buffer.getvalue()


def grid_settings(grid: Mapping[str, Sequence], zip_values: bool = False) -> list[dict]:
    """The settings of every trial: the product of the grid's value lists, in order (the
    first name varies slowest), or with `zip_values` the lists taken side by side."""
    if not isinstance(grid, Mapping) or not grid:
        raise UserError("grid must be a non-empty dict of setting name -> list of values, "
                        "e.g. {'learning_rate': [0.01, 0.1], 'seed': range(4)}")
    names = list(grid)
    values = []
    for name in names:
        v = grid[name]
        if isinstance(v, (str, bytes)) or not isinstance(v, (Sequence, range, np.ndarray)):
            raise UserError(f"grid[{name!r}] must be a list of values, got {v!r}")
        v = list(v)
        if not v:
            raise UserError(f"grid[{name!r}] is empty; give at least one value")
        values.append(v)
    if zip_values:
        lengths = {len(v) for v in values}
        if len(lengths) != 1:
            raise UserError(f"zip=True needs lists of one length, got "
                            f"{dict(zip(names, map(len, values)))}; drop zip for a grid")
        combos = list(zip(*values))
    else:
        combos = list(itertools.product(*values))
    return [dict(zip(names, combo)) for combo in combos]


def sweep(run: Callable[..., dict], grid: Mapping[str, Sequence], *, zip: bool = False,
          workdir: str | None = None, metric: str = "test_accuracy", mode: str | None = None,
          max_trials_per_program: int | str | None = "auto", trial_axis: str = "auto",
          checkpoint: CheckpointOptions = CheckpointOptions(),
          progress: bool = True) -> SweepResult:
    """Runs `run(**settings)`'s simulation for every setting of `grid`, trials of a kind
    at the same time (see the module doc).

    Args:
      run: a function of the grid's names returning `simulate`'s keyword arguments
        (model, algorithm, train_data, rounds, clients_per_round, eval_data, seed, ...),
        e.g. `lambda lr, seed: dict(model=m, algorithm=fedavg(tunable(optax.sgd,
        learning_rate=lr)), train_data=clients, rounds=100, clients_per_round=10,
        eval_data=test, seed=seed)`. workdir, callback, tensorboard, progress and
        checkpoint belong to the sweep, not to a trial.
      grid: setting name -> list of values; every combination is a trial.
      zip: take the lists side by side instead of their product.
      workdir: where to write `trials/<k>/` (each trial's config.json, metrics.jsonl,
        summary.json, params.npz, as a run directory), `sweep.json` and `sweep.csv` (the
        table, the aggregate over seeds, the best trial), and `checkpoints/group_<g>/`;
        a sweep run again on the same workdir resumes where it stopped.
      metric / mode: what `best()` ranks by; mode 'max' or 'min' (default: 'min' for a
        metric with 'loss' or 'error' in its name, else 'max').
      max_trials_per_program: run at most this many trials in one program (memory: a
        program holds every trial's state and one cohort per trial). 'auto' (default): all
        of a group on CPU; on an accelerator, halved until the program (XLA's memory
        analysis) fits 80% of the device's memory. None: all.
      trial_axis: how a program runs its trials: 'vmap' (side by side, batched),
        'map' (one after another inside the program: no batching, one compilation) or
        'auto' ('map' on CPU where the engine runs a round's clients one after another
        because their steps are heavy, else 'vmap'; see `trial_strategy`).
      checkpoint: when to save the sweep's checkpoints (with a workdir).
      progress: a progress bar over each group's rounds, and the best trial at the end.
    Ctrl-C stops between two calls, saves a checkpoint (with a workdir) and raises
    `fedjax_sim.errors.Interrupted`.
    """
    mode = mode or ("min" if any(w in metric for w in ("loss", "error")) else "max")
    if mode not in ("max", "min"):
        raise UserError(f"mode must be 'max' or 'min', got {mode!r}")
    if max_trials_per_program not in (None, "auto") and (
            isinstance(max_trials_per_program, bool)
            or not isinstance(max_trials_per_program, int) or max_trials_per_program < 1):
        raise UserError(f"max_trials_per_program must be 'auto', None or a positive integer, "
                        f"got {max_trials_per_program!r}")
    if not callable(run):
        raise UserError("run must be a function of the grid's settings returning simulate()'s "
                        "keyword arguments")
    if trial_axis not in ("auto", "vmap", "map"):
        raise UserError(f"trial_axis must be 'auto', 'vmap' or 'map', got {trial_axis!r}")
    settings = grid_settings(grid, zip)
    plans, placed = [], {}
    for s in settings:
        plan = _plan(run, s)
        # Trials on the same training data share one device copy of it (the copy each
        # plan made is freed before the next trial is planned).
        plan.data_fingerprint = _fingerprint(plan.data)
        plan.data = placed.setdefault(plan.data_fingerprint, plan.data)
        plans.append(plan)
    groups: dict[Any, list[int]] = {}
    for i, plan in enumerate(plans):
        groups.setdefault(_group_key(plan), []).append(i)
    chunks = []
    for members in groups.values():
        if max_trials_per_program == "auto":
            first = plans[members[0]]
            chunks += _fitting_chunks(members, plans, trial_strategy(first, trial_axis),
                                      _memory_budget(first))
        else:
            step = max_trials_per_program or len(members)
            chunks += [members[i:i + step] for i in range(0, len(members), step)]
    if workdir is not None:
        RunDirectory(workdir)  # created, or a one-line error
        _check_sweep_dir(workdir, settings)
    trials: list[Trial | None] = [None] * len(plans)
    described = []
    with deferred_interrupt() as interrupt:
        for g, members in enumerate(chunks):
            group_plans = [plans[i] for i in members]
            results, diverged, info, complete = _run_group(
                group_plans, members, progress, g, len(chunks), workdir, checkpoint, interrupt,
                trial_strategy(group_plans[0], trial_axis))
            described.append(info)
            for i, result, bad in builtins.zip(members, results, diverged):
                trials[i] = Trial(i, settings[i], result, bad, g)
            if not complete:
                where = (f"; checkpoint saved in {workdir}: run the same sweep (same workdir) "
                         f"to resume" if workdir is not None and checkpoint.enabled
                         else "; nothing was saved (no workdir)")
                raise Interrupted(f"sweep stopped in group {g + 1} of {len(chunks)} after "
                                  f"round {info['rounds']}{where}")
    result = SweepResult(trials, metric, mode, described)
    if workdir is not None:
        _write_tables(workdir, result, grid, zip)
    if progress:
        _print_best(result)
    return result


def _check_sweep_dir(workdir: str, settings: list[dict]) -> None:
    """A workdir that holds another sweep (other settings) is refused."""
    path = os.path.join(workdir, "sweep_settings.json")
    text = json.dumps(json_safe(settings), default=str)
    if os.path.isfile(path):
        with open(path) as f:
            if f.read() != text:
                raise UserError(f"{workdir} holds another sweep (other grid settings); use a "
                                f"fresh workdir, or rerun that sweep's grid to resume it")
        return
    atomic_write(path, text)


def _write_tables(workdir: str, result: SweepResult, grid, zip_values: bool) -> None:
    try:
        best = result.best()
        best_row = {"trial": best.index, **result.table()[best.index]}
    except UserError:
        best_row = None
    sweep_json = {"grid": {k: list(v) for k, v in grid.items()}, "zip": zip_values,
                  "metric": result.metric, "mode": result.mode, "best": best_row,
                  "trials": [{"trial": t.index, **row}
                             for t, row in builtins.zip(result.trials, result.table())],
                  "aggregate": result.aggregate() if "seed" in grid else None,
                  "groups": result.groups}
    atomic_write(os.path.join(workdir, "sweep.json"),
                 json.dumps(json_safe(sweep_json), indent=2, default=str))
    atomic_write(os.path.join(workdir, "sweep.csv"), result.to_csv())


def _print_best(result: SweepResult) -> None:
    print(result.summary_line())


# ----------------------------------------------------------------------------- planning

def _plan(run, settings: dict):
    try:
        kwargs = run(**settings)
    except TypeError as e:
        if "argument" in str(e):
            raise UserError(f"run(**{settings}) failed: {e}; run must accept every grid name "
                            f"as a keyword argument") from None
        raise
    if not isinstance(kwargs, Mapping):
        raise UserError(f"run(**{settings}) must return a dict of simulate() arguments, got "
                        f"{type(kwargs).__name__}")
    owned = [k for k in _SWEEP_OWNED if k in kwargs]
    if owned:
        raise UserError(f"a trial may not set {', '.join(owned)}: the sweep owns them "
                        f"(pass them to fs.sweep where it takes them)")
    from fedjax_sim.simulation.loop import simulate

    try:
        bound = inspect.signature(simulate).bind(**kwargs)
    except TypeError as e:
        raise UserError(f"run(**{settings}) returned arguments simulate() does not take: "
                        f"{e}") from None
    bound.apply_defaults()
    arguments = dict(bound.arguments, progress=False)
    request = RunRequest(**arguments)
    plan = plan_run(request)
    if plan.streamer is not None or plan.client_states == "host":
        raise UserError("a sweep keeps the training data and client states on the device; "
                        "set engine.data_placement='device' and engine.client_states='device', "
                        "or run this setting with simulate()")
    if plan.private and plan.private.level == "example":
        raise UserError("example-level DP (DP-SGD) runs its own budget checks between calls; "
                        "sweep its settings with simulate() runs")
    return plan


def _fingerprint(tree) -> str:
    """A digest of every array's bytes, shapes and dtypes (the data a group shares)."""
    h = hashlib.blake2b(digest_size=16)
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        a = np.asarray(jax.device_get(leaf))
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(np.ascontiguousarray(a).tobytes() if a.dtype != object else repr(a).encode())
    return h.hexdigest()


def _group_key(plan):
    """Trials with equal keys run in one program: the same round program (everything but
    its runtime inputs), the same training data and model state, the same rounds."""
    r = plan.request
    state = plan.initial_state()
    args = (state, plan.data, plan.model_state, plan.root, jnp.int32(0), jnp.int32(1),
            plan.program.algorithm.hyperparams())
    per_call = _per_call(plan)
    return (plan.program.program_key(args, per_call), plan.data_fingerprint,
            program_cache.signature(plan.model_state), r.rounds, r.eval_every, plan.last_round(0),
            r.evaluate_initial, _fingerprint(_eval_data(r)), repr(r.finetune),
            r.eval_batch_size)


def _eval_data(r: RunRequest):
    """The arrays a trial is evaluated on (federated datasets as features and offsets)."""
    def arrays(data):
        if data is None:
            return None
        if isinstance(data, (tuple, list)):
            return [arrays(d) for d in data]
        if hasattr(data, "features") and hasattr(data, "offsets"):
            return (data.features, data.offsets, np.asarray(data.client_ids, dtype=object)
                    if data.client_ids is not None else None)
        return data
    return [arrays(r.eval_data), arrays(r.client_eval_data), arrays(r.heldout_data)]


def _per_call(plan) -> int:
    r = plan.request
    return min(plan.engine["rounds_per_call"], r.eval_every, r.rounds)


# ----------------------------------------------------------------------------- running

class _GroupCalls:
    """What run_summary reads of a run's calls, shared by a group's trials."""

    def __init__(self, plan, compile_seconds: float, trials: int):
        self.plan, self.compile_seconds, self.train_seconds = plan, compile_seconds, 0.0
        self.trials = trials

    def engine_summary(self) -> dict:
        return {**engine_summary(self.plan), "sweep_trials_per_program": self.trials}


def _stack(trees):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


@jax.jit
def _take_one(tree, k):
    return jax.tree_util.tree_map(lambda x: x[k], tree)


def _take(tree, k: int):
    """Trial k's slice of a stacked tree (one dispatch, not one per leaf)."""
    return _take_one(tree, jnp.int32(k))


def _group_inputs(plans):
    """(the plans padded to a multiple of the mesh's devices with copies of the last, and
    their stacked initial states, roots, runtime hyperparameters, the model state and
    whether it is stacked). The model state is shared where every trial has the same (a
    frozen backbone is not copied per trial), else stacked (e.g. each seed's dropout key)."""
    mesh = plans[0].program.mesh
    devices = 1 if mesh is None else mesh.size
    padded = plans + [plans[-1]] * ((-len(plans)) % devices)
    states = _stack([p.initial_state() for p in padded])
    roots = jnp.stack([p.root for p in padded])
    hypers = _stack([p.program.algorithm.hyperparams() for p in padded])
    stacked = len({_fingerprint(p.model_state) for p in plans}) > 1
    model_state = _stack([p.model_state for p in padded]) if stacked else plans[0].model_state
    return padded, states, roots, hypers, model_state, stacked


def _program_bytes(plans, strategy: str) -> int | None:
    """Device memory of the group program for `plans` (arguments, outputs and
    temporaries, XLA's analysis), compiling it (the run reuses the compiled program)."""
    _, states, roots, hypers, model_state, stacked = _group_inputs(plans)
    run = plans[0].program.compile_trials(states, plans[0].data, model_state, roots, hypers,
                                          _per_call(plans[0]), stacked_model_state=stacked,
                                          vmapped=strategy == "vmap")
    memory = _memory(run)
    if memory is None:
        return None
    return memory["argument_bytes"] + memory["output_bytes"] + memory["temp_bytes"]


def _fitting_chunks(members: list[int], plans, strategy: str, budget: int | None):
    """`members` in chunks of equal size whose program fits `budget` bytes: halved until
    it fits (None: one chunk)."""
    size = len(members)
    while budget is not None and size > 1:
        used = _program_bytes([plans[i] for i in members[:size]], strategy)
        if used is None or used <= budget:
            break
        size = (size + 1) // 2
    return [members[i:i + size] for i in range(0, len(members), size)]


def _memory_budget(plan) -> int | None:
    """The device memory a group program may use: 80% of the accelerator's (the rest
    for the evaluation and XLA's own); None on CPU, which reports no limit."""
    from fedjax_sim.engine.client_states import device_memory_bytes

    if plan.backend == "cpu":
        return None
    limit = device_memory_bytes()
    return None if limit is None else int(0.8 * limit)


def trial_strategy(plan, trial_axis: str = "auto") -> str:
    """'vmap' or 'map' for a group whose first trial is `plan`. On CPU the engine runs a
    round's clients one after another when their steps are heavy (`clients_per_chunk`
    1, engine.options): batching such steps over trials only multiplies memory traffic,
    so their trials run one after another too, inside one program. Elsewhere the trials
    are vmapped, as the cohort is."""
    if trial_axis != "auto":
        return trial_axis
    heavy = plan.backend == "cpu" and plan.engine["clients_per_chunk"] == 1
    return "map" if heavy else "vmap"


def _run_group(plans, members, progress: bool, g: int, num_groups: int, sweep_dir,
               checkpoint: CheckpointOptions, interrupt, strategy: str):
    first = plans[0]
    r = first.request
    program = first.program
    # On a mesh the trials are split over its devices: pad them to a multiple of the
    # device count with copies of the last trial (computed, never reported).
    devices = 1 if program.mesh is None else program.mesh.size
    padded, states, roots, hypers, model_state, stacked = _group_inputs(plans)
    per_call = _per_call(first)
    histories: list[list[dict]] = [[] for _ in plans]
    diverged: list[str | None] = [None] * len(plans)
    client_metrics: list[dict | None] = [None] * len(plans)
    end, done = first.last_round(0), 0
    saver = None
    if sweep_dir is not None and checkpoint.enabled:
        saver = _GroupSaver(os.path.join(sweep_dir, "checkpoints", f"group_{g}"), checkpoint,
                            [_trial_digest(p, members[k]) for k, p in enumerate(plans)])
        restored = saver.restore({"states": states, "model_state": model_state})
        if restored is not None:
            tree, done, histories, diverged, client_metrics = restored
            states, model_state = tree["states"], tree["model_state"]
            if progress:
                print(f"group {g + 1}: resuming {len(plans)} trials from round {done}"
                      if done < end else f"group {g + 1}: already complete ({done} rounds)")
    logs = [MetricsLog(histories[k], RunDirectory(_trial_dir(sweep_dir, members[k])))
            if sweep_dir is not None else MetricsLog(histories[k], None)
            for k in range(len(plans))]
    if sweep_dir is not None:
        for k, p in enumerate(plans):
            RunDirectory(_trial_dir(sweep_dir, members[k])).write_json(CONFIG, p.run_config)
    compile_seconds = 0.0
    run = None
    if done < end:
        start = time.perf_counter()
        run = program.compile_trials(states, first.data, model_state, roots, hypers, per_call,
                                     stacked_model_state=stacked, vmapped=strategy == "vmap")
        compile_seconds = time.perf_counter() - start
    calls = _GroupCalls(first, compile_seconds, len(plans))
    if run is not None:
        for p in plans:
            p.program.cache_hit = program.cache_hit
    if r.evaluate_initial and done == 0:
        for k, p in enumerate(plans):
            ms = _take(model_state, k) if stacked else model_state
            logs[k].log([initial_row(p, _take(states, k), ms)])
    if progress and num_groups > 1 and done < end:
        print(f"group {g + 1} of {num_groups}: {len(plans)} trials in one program")
    bar = ProgressBar(r.rounds, progress and done < end, initial=done)
    start_round = done
    try:
        for p in plans:
            if p.private:
                p.private.recount(p.program, p.root, done)
        while done < end and not interrupt.requested:
            count = min(per_call, r.eval_every - done % r.eval_every, end - done)
            t0 = time.perf_counter()
            states, metrics = run(states, first.data, model_state, roots, done, count)
            metrics = jax.device_get(metrics)
            calls.train_seconds += time.perf_counter() - t0
            finite = np.asarray(metrics.pop("_params_finite"))
            evaluate = (done + count) % r.eval_every == 0 or done + count == end
            for k, p in enumerate(plans):
                if diverged[k] is not None:
                    continue
                rows, diverged[k] = _trial_rows(p, metrics, finite[k], k, done, count)
                if evaluate and diverged[k] is None:
                    ms = _take(model_state, k) if stacked else model_state
                    evaluated, client_metrics[k] = evaluate_run(p, _take(states, k), ms)
                    rows[-1].update(evaluated)
                logs[k].log(rows)
            done += count
            live = [h[-1] for h, d in zip(histories, diverged) if d is None and h]
            bar.update(count, live[0] if live else {},
                       (done - start_round) / max(calls.train_seconds, 1e-9))
            if saver is not None and (saver.due(done == end) or interrupt.requested):
                saver.save(done, {"states": states, "model_state": model_state}, histories,
                           diverged, client_metrics)
    finally:
        bar.close()
        for log in logs:
            log.close()
        if saver is not None:
            saver.close()
    results = []
    for k, p in enumerate(plans):
        state = _take(states, k)
        ms = _take(model_state, k) if stacked else model_state
        summary = {}
        if histories[k]:
            summary = run_summary(p, calls if run is not None else None, histories[k],
                                  start_round, done, None)
            summary["sweep"] = {"trial": members[k], "group": g, "trials_in_program": len(plans)}
        if diverged[k]:
            summary["diverged"] = diverged[k]
        result = Result(p.algorithm.params(state.server), p.current_model_state(ms, state),
                        state.server, histories[k], summary,
                        p.program.algorithm_states(state.clients), client_metrics[k])
        results.append(result)
        if sweep_dir is not None and done == end:
            files = RunDirectory(_trial_dir(sweep_dir, members[k]))
            files.write_json(SUMMARY, summary)
            files.export_params(result.params)
            if client_metrics[k] is not None:
                files.write_json(CLIENT_METRICS, client_metrics[k])
    info = {"trials": list(members), "rounds": done, "memory": _memory(run),
            "compile_seconds": compile_seconds, "train_seconds": calls.train_seconds,
            "program_cache": ("hit" if program.cache_hit else "compiled") if run else "restored",
            "stacked_model_state": stacked, "trial_axis": strategy, "devices": devices,
            "padding_trials": len(padded) - len(plans)}
    return results, diverged, info, done == end


def _memory(run) -> dict | None:
    """The compiled group program's device memory (XLA's analysis), where it reports one."""
    try:
        m = run.compiled.memory_analysis()
        return {"argument_bytes": int(m.argument_size_in_bytes),
                "output_bytes": int(m.output_size_in_bytes),
                "temp_bytes": int(m.temp_size_in_bytes)}
    except Exception:  # not compiled here (restored), or a backend without the analysis
        return None


def _trial_dir(sweep_dir: str, index: int) -> str:
    return os.path.join(sweep_dir, "trials", str(index))


def _trial_digest(plan, index: int) -> str:
    """What identifies trial `index` on resume: its run description and seed."""
    text = json.dumps({"index": index, "run": plan.run_config, "seed": plan.request.seed},
                      sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


class _GroupSaver:
    """Checkpoints of one group: the stacked states, and each trial's history, divergence
    and last per-client metrics; a resumed group must hold the same trials."""

    def __init__(self, directory: str, options: CheckpointOptions, digests: list[str]):
        self.checkpoints = RunCheckpoints(directory, options)
        self.options, self.digests = options, digests
        self._last = time.perf_counter()

    def restore(self, template):
        restored = self.checkpoints.restore_latest(template)
        if restored is None:
            return None
        tree, meta = restored
        if meta.get("trials") != self.digests:
            raise UserError(f"the checkpoints in {self.checkpoints.directory} belong to another "
                            f"sweep (other trials or settings); rerun the same sweep to resume, "
                            f"or use a fresh workdir")
        return (tree, int(meta["round"]), [list(h) for h in meta["histories"]],
                list(meta["diverged"]), list(meta["client_metrics"]))

    def due(self, last: bool) -> bool:
        every = self.options.every_seconds
        return last or (every is not None and time.perf_counter() - self._last >= every)

    def save(self, done, tree, histories, diverged, client_metrics) -> None:
        self.checkpoints.save(done, tree, {"trials": self.digests,
                                           "histories": [list(h) for h in histories],
                                           "diverged": list(diverged),
                                           "client_metrics": json_safe(client_metrics)})
        self._last = time.perf_counter()

    def close(self) -> None:
        self.checkpoints.wait()
        self.checkpoints.close()


def _trial_rows(plan, metrics: dict, finite, k: int, done: int, count: int):
    """Trial k's metrics rows of rounds done+1 .. done+count (with ε for a private run),
    cut after the first diverged round, and the divergence message or None."""
    rows = [{"round": done + i + 1, **{n: _scalar(v[k][i]) for n, v in metrics.items()}}
            for i in range(count)]
    if plan.private:
        peaks = plan.private.record(plan.program, plan.root, done, count)
        for row, eps in zip(rows, plan.private.epsilon_rows(done + 1, count, peaks)):
            row["epsilon"] = eps
    bad = first_divergence(rows, finite)
    if bad is None:
        return rows, None
    i, what = bad
    return rows[:i + 1], (f"training diverged at round {rows[i]['round']} ({what}); "
                          f"lower the client or server learning rate")


# ----------------------------------------------------------------------------- tables

def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _hashable(v):
    try:
        hash(v)
        return v
    except TypeError:
        return json.dumps(v, sort_keys=True, default=str)


def _tabled(metric: str) -> bool:
    """The evaluation metrics of the table: centralized and held-out ones, and of the
    per-client distributions their mean and 10th percentile."""
    if metric.startswith("client_"):
        return metric.endswith(("_mean", "_p10"))
    return metric.startswith(EVALUATED)


def _trial_row(trial: Trial, mode: str) -> dict:
    row = {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
           for k, v in trial.settings.items()}
    history = trial.result.history
    evaluated = [h for h in history if any(k.startswith(EVALUATED) for k in h)]
    metrics = list(dict.fromkeys(k for h in evaluated for k in h if _tabled(k)))
    for m in metrics:
        values = [h[m] for h in evaluated if _finite(h.get(m))]
        if not values:
            continue
        row[f"final_{m}"] = evaluated[-1].get(m)
        lower = any(w in m for w in ("loss", "error", "epsilon"))
        row[f"best_{m}"] = (min(values) if lower else max(values))
    if history:
        row["final_train_loss"] = history[-1].get("train_loss")
        if "epsilon" in history[-1]:
            row["final_epsilon"] = history[-1]["epsilon"]
    row["rounds"] = history[-1]["round"] if history else 0
    row["diverged"] = trial.diverged
    return row
