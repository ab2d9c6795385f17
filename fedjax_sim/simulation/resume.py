"""Checkpointing a run while it trains, and resuming it: what a checkpoint holds, when one
is due, the checks that a checkpoint belongs to this run, and the result of a run that
was already complete. The orbax side (writing, reading, damage) is simulation.checkpoint.
"""

from __future__ import annotations

import time
import warnings

import jax
import numpy as np

from fedjax_sim.errors import UserError
from fedjax_sim.simulation import processes
from fedjax_sim.simulation.checkpoint import CheckpointOptions, RunCheckpoints, config_differences
from fedjax_sim.simulation.results import Result, run_summary
from fedjax_sim.simulation.rundir import SUMMARY, RunDirectory


def _root_data(root) -> list:
    return np.asarray(jax.random.key_data(root)).tolist()


class Saver:
    """The run's checkpoints: resuming from them, and saving when one is due (every k
    rounds, every s seconds of training, at the end, and on Ctrl-C)."""

    def __init__(self, files: RunDirectory, options: CheckpointOptions, root, run_config):
        self.checkpoints = RunCheckpoints(files.checkpoints, options, writer=files.writer)
        self.options, self._root, self._config = options, root, run_config
        self.saved_round, self._last_save = 0, time.perf_counter()

    @property
    def directory(self) -> str:
        return self.checkpoints.directory

    @property
    def every(self) -> int | None:
        return self.options.every_rounds

    def restore(self, state, model_state, rounds: int, allow_config_change: bool):
        """(state, model_state, rounds done, history) from the newest intact checkpoint, or
        the given state at round 0 where there is none."""
        restored = self.checkpoints.restore_latest(
            processes.local({"sim": state, "model_state": model_state}))
        if restored is None:
            return state, model_state, 0, []
        tree, meta = restored
        done, history = self._check(meta, rounds, allow_config_change)
        self.saved_round = done
        return tree["sim"], tree["model_state"], done, history

    def due(self, done: int, last: bool) -> bool:
        every, seconds = self.options.every_rounds, self.options.every_seconds
        # Saving gathers state split across processes: all decide as process 0 does.
        return processes.agree(last or bool(every and done % every == 0) or (
            seconds is not None and time.perf_counter() - self._last_save >= seconds))

    def save(self, done: int, state, model_state, history: list[dict]) -> None:
        # A copy of the history: the save is written in the background while it grows.
        meta = {"root_key": _root_data(self._root), "history": list(history),
                "config": self._config}
        tree = processes.local({"sim": state, "model_state": model_state})
        if self.checkpoints.writer:
            self.checkpoints.save(done, tree, meta)
        self.saved_round, self._last_save = done, time.perf_counter()

    def last_good(self) -> str:
        """Where the last good checkpoint is, for an error message ('' if none)."""
        if not self.checkpoints.steps():
            return ""
        return f"; the last good checkpoint (round {self.saved_round}) in {self.directory} is kept"

    def close(self) -> None:
        self.checkpoints.wait()  # a save in flight holds a good state: let it land
        self.checkpoints.close()

    def _check(self, meta, rounds, allow_config_change):
        """Round and history to resume from; refuses a changed run unless allowed."""
        done, directory = int(meta["round"]), self.directory
        if meta.get("root_key") != _root_data(self._root):
            raise UserError(f"the checkpoint in {directory} was made with another seed; use the "
                            f"same seed to resume, or a fresh --workdir")
        diffs = config_differences(meta.get("config") or {}, self._config,
                                   ignore=_may_change_on_resume)
        if diffs and not allow_config_change:
            raise UserError(f"the run in {directory} was started with a different config "
                            f"({'; '.join(diffs)}); rerun with the same config, pass "
                            f"--allow-config-change (allow_config_change=True) to resume anyway, "
                            f"or use a fresh --workdir")
        if diffs:
            warnings.warn(f"resuming {directory} with a changed config: {'; '.join(diffs)}",
                          stacklevel=4)
        if done > rounds:
            raise UserError(f"the checkpoint in {directory} is at round {done}, past rounds={rounds}; "
                            f"set rounds >= {done} or use a fresh --workdir")
        history = list(meta["history"])
        trained = sum(1 for row in history if row["round"] > 0)  # round 0: evaluate_initial
        if trained != done:
            raise UserError(f"the checkpoint at round {done} in {directory} holds {trained} "
                            f"metrics rows; it is damaged, delete it to use the previous one")
        return done, history


def finished_result(plan, files: RunDirectory, state, model_state, history, done: int,
                    progress: bool) -> Result:
    """The result of a run whose checkpoint is already at its last round: nothing is
    computed; its summary is kept (or rebuilt where it is missing or for other rounds)."""
    rounds = plan.request.rounds
    summary = files.read_json(SUMMARY)
    if not summary or summary.get("rounds") != rounds:
        stopped = plan.private.stop_message(done) if done < rounds else None
        summary = run_summary(plan, None, history, done, done, stopped)
        files.write_json(SUMMARY, summary)
    if summary.get("stopped") and progress:
        print(summary["stopped"])
    files.rewrite_metrics(history)
    params = plan.algorithm.params(state.server)
    files.export_params(params)
    return Result(params, plan.current_model_state(model_state, state), state.server, history,
                  summary, plan.program.algorithm_states(state.clients))


# Settings a run may resume with changed: where and on how many devices or processes it
# runs, how many rounds one call fuses, where states and data live, whether the initial
# model was evaluated (round 0 is evaluated only by a run that starts at round 0). The numbers do not
# depend on them (up to the order of float additions across devices).
PLACEMENT_KEYS = ("engine.mesh", "engine.rounds_per_call", "engine.client_states",
                  "engine.data_placement", "engine.device_data_budget")


def _may_change_on_resume(key: str) -> bool:
    return (key in ("rounds", "evaluate_initial")
            or key.startswith(("checkpoint.", "distributed."))
            or key in PLACEMENT_KEYS)
