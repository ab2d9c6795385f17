"""The host loop: plan the run, compile the round program once, then call it a few rounds
at a time, logging, evaluating, checkpointing and accounting for privacy between calls.

Each concern lives in a module of its own: setup (plan), calls (compile and run rounds),
evaluation, resume (checkpoints), rundir (files), progress, feature_cache, private (DP).
"""

from __future__ import annotations

from typing import Callable, Sequence

from fedjax_sim.aggregators import AggregatorPart
from fedjax_sim.algorithms import Algorithm
from fedjax_sim.data.augment import Preprocess
from fedjax_sim.engine.options import EngineOptions
from fedjax_sim.errors import Interrupted, UserError
from fedjax_sim.models.adapter import Model
from fedjax_sim.models.tasks import Task
from fedjax_sim.simulation import processes
from fedjax_sim.simulation.calls import RoundCalls, first_divergence
from fedjax_sim.simulation.checkpoint import CheckpointOptions
from fedjax_sim.simulation.evaluation import FineTune
from fedjax_sim.simulation.interrupt import deferred_interrupt
from fedjax_sim.simulation.private import warn_failed_rounds, warn_stop
from fedjax_sim.simulation.progress import ProgressBar
from fedjax_sim.simulation.results import Result, run_summary
from fedjax_sim.simulation.resume import Saver, finished_result
from fedjax_sim.simulation.rundir import CLIENT_METRICS, CONFIG, SUMMARY, MetricsLog, RunDirectory
from fedjax_sim.simulation.setup import RunRequest, plan_run
from fedjax_sim.simulation.tracking import open_tensorboard, tensorboard_dir


def simulate(
    model: Model, algorithm: Algorithm, train_data, *, rounds: int, clients_per_round: int,
    task: Task | None = None, eval_data: dict | None = None, client_eval_data=None,
    heldout_data=None, finetune: FineTune | None = None, eval_every: int = 10,
    eval_batch_size: int = 256, seed: int = 0, aggregator: AggregatorPart | None = None,
    privacy=None, engine: EngineOptions = EngineOptions(),
    preprocess: Preprocess | str | None = "auto", batch_norm: str = "auto",
    feature_cache: bool | str = "auto", input_key: str = "x", initial_params=None,
    workdir: str | None = None, checkpoint: CheckpointOptions = CheckpointOptions(),
    config: dict | None = None, allow_config_change: bool = False, progress: bool = True,
    callback: Callable[[dict], None] | Sequence[Callable[[dict], None]] | None = None,
    metadata: dict | None = None, evaluate_initial: bool = False, tensorboard: bool | str = False,
    attack=None,
) -> Result:
    """Trains `model` with `algorithm` over `train_data`'s clients for `rounds` rounds of
    `clients_per_round` clients; returns the final model and its history (`Result`).

    Every argument is described in `fedjax_sim.simulation.setup.RunRequest`: what to
    evaluate (`eval_data`, `client_eval_data`, `heldout_data`, `finetune`, `eval_every`),
    how to aggregate (`aggregator`, `privacy`), how to execute (`engine`, `preprocess`,
    `batch_norm`, `feature_cache`), where to start (`seed`, `initial_params`) and where to
    write and resume (`workdir`, `checkpoint`, `config`, `allow_config_change`), what to
    report (`callback`, `evaluate_initial`, `tensorboard`), and which clients are malicious
    (`attack`).
    Ctrl-C stops between two calls, saves a checkpoint (with a `workdir`) and raises
    `fedjax_sim.errors.Interrupted`, whose message says how to resume.
    """
    request = RunRequest(**locals())
    callbacks, logdir = _callbacks(callback), tensorboard_dir(tensorboard, workdir)
    plan = plan_run(request)
    files = RunDirectory(workdir, writer=processes.is_primary()) if workdir else None
    saver = Saver(files, checkpoint, plan.root, plan.run_config) \
        if files and checkpoint.enabled else None
    state, model_state = plan.initial_state(), plan.model_state
    done, history = 0, []
    if saver is not None:
        state, model_state, done, history = saver.restore(state, model_state, rounds,
                                                          allow_config_change)
        if done and progress:
            print(f"the run in {workdir} is already complete ({done} rounds)" if done == rounds
                  else f"resuming from round {done} (checkpoint in {saver.directory})")
    if plan.private:
        plan.private.recount(plan.program, plan.root, done)
    end = plan.last_round(done)
    if files:
        files.write_json(CONFIG, plan.run_config)
    if done == end and done > 0:
        saver.close()
        return finished_result(plan, files, state, model_state, history, done, progress)

    calls = RoundCalls(plan, state, saver.every if saver else None)
    board = open_tensorboard(logdir, done)
    log = MetricsLog(history, files, [c for c in (board, *callbacks) if c is not None])
    bar = ProgressBar(rounds, progress, initial=done)
    start_round, client_metrics = done, None
    try:
        with deferred_interrupt() as interrupt:
            if evaluate_initial and done == 0:  # round 0: the initial model
                log.log([_initial_row(plan, state, model_state)])
            while done < end and not interrupt.requested:
                count, last = calls.next_count(done, end)
                if count == 0:  # the example-level privacy budget allows no more rounds
                    break
                state, rows, finite = calls.run(state, model_state, done, count)
                bad = first_divergence(rows, finite)
                if bad is not None:
                    i, what = bad
                    log.log(rows[:i + 1])
                    raise UserError(f"training diverged at round {rows[i]['round']} ({what}); "
                                    f"lower the client or server learning rate"
                                    f"{saver.last_good() if saver else ''}")
                done += count
                if done % eval_every == 0 or last:
                    evaluated, client_metrics = _evaluate(plan, state, model_state)
                    rows[-1].update(evaluated)
                log.log(rows)
                warn_failed_rounds(rows)
                bar.update(count, rows[-1], (done - start_round) / max(calls.train_seconds, 1e-9))
                if saver is not None and (saver.due(done, last) or (interrupt.requested and done > saver.saved_round)):
                    saver.save(done, state, model_state, history)
            if interrupt.requested and done < end:
                raise Interrupted(_interrupted(done, saver, workdir))
    finally:
        bar.close()
        calls.close()
        log.close()
        if board is not None:
            board.close()
        if saver is not None:
            saver.close()

    stopped = plan.private.stop_message(done) if done < rounds else None
    if stopped:
        warn_stop(stopped)
    summary = run_summary(plan, calls, history, start_round, done, stopped)
    state = processes.local(state)
    params = plan.algorithm.params(state.server)
    if files:
        files.write_json(SUMMARY, summary)
        files.export_params(params)
        if client_metrics is not None:
            files.write_json(CLIENT_METRICS, client_metrics)
    if board is not None:
        board.finish(summary, plan.run_config, done)
    return Result(params, plan.current_model_state(model_state, state), state.server, history,
                  summary, plan.program.algorithm_states(state.clients), client_metrics)


def _callbacks(callback) -> list:
    """`simulate`'s `callback` as a list of callables."""
    if callback is None:
        return []
    callbacks = list(callback) if isinstance(callback, (list, tuple)) else [callback]
    for c in callbacks:
        if not callable(c):
            raise UserError(f"callback must be a function of a metrics row (or a list of them), "
                            f"got {c!r}")
    return callbacks


def _evaluate(plan, state, model_state):
    """(metrics of the current global model, per-client metrics or None)."""
    return plan.evaluators(*processes.local((
        plan.algorithm.params(state.server), plan.current_model_state(model_state, state),
        plan.program.algorithm_states(state.clients))))


def _initial_row(plan, state, model_state) -> dict:
    """Round 0 of `evaluate_initial`: the initial model's evaluation (and ε = 0 under
    differential privacy: nothing was released yet)."""
    row = {"round": 0, **_evaluate(plan, state, model_state)[0]}
    if plan.private:
        row["epsilon"] = 0.0
    return row


def _interrupted(done: int, saver: Saver | None, workdir: str | None) -> str:
    if saver is None:
        return (f"stopped after round {done}; nothing was saved (no workdir): pass a workdir "
                f"to make runs resumable")
    return (f"stopped after round {done}; checkpoint saved in {saver.directory}; run the same "
            f"command (same workdir {workdir}) to resume from round {done}")
