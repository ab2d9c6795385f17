"""A run's metrics in experiment trackers: TensorBoard event files (written with
tensorboardX, without TensorFlow) and callbacks for Weights & Biases and MLflow.

Each receives the rows `simulate()` logs, one dict per round as in `metrics.jsonl`
(`round`, `train_*`, on evaluation rounds `test_*`, `client_*`, ...), and records every
numeric entry under its own name with the round as the step. Entries that are not
numbers (a list-valued metric) are left out; a metric that is NaN or infinite is sent as
it is (metrics.jsonl writes it as null). In a multi-process run only process 0 records.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from typing import Callable

from fedjax_sim.errors import UserError
from fedjax_sim.simulation import processes
from fedjax_sim.simulation.rundir import make_directory

TENSORBOARD_DIR = "tensorboard"  # under the workdir, for simulate(..., tensorboard=True)
HPARAMS_RUN = "hparams"  # the sub-run of the TensorBoard directory holding the hparams


def scalars(row: dict, prefix: str = "") -> dict[str, float]:
    """The numeric entries of a metrics row but `round`, as floats, each name prefixed."""
    return {f"{prefix}{k}": float(v) for k, v in row.items()
            if k != "round" and isinstance(v, numbers.Real)}


def _missing(what: str, package: str, extra: str) -> UserError:
    return UserError(f"{what} needs {package}, which is not installed; install it with "
                     f"pip install 'fedjax_sim[{extra}]'")


# --------------------------------------------------------------------------- TensorBoard


def tensorboard_dir(tensorboard, workdir: str | None) -> str | None:
    """Where `simulate(..., tensorboard=...)` writes event files: None for False/None,
    <workdir>/tensorboard for True, the given path for a path; checks that tensorboardX is
    installed (before anything is compiled)."""
    if tensorboard is None or tensorboard is False:
        return None
    if tensorboard is True:
        if workdir is None:
            raise UserError("tensorboard=True writes into the run's workdir, and no workdir was "
                            "given; pass workdir=DIR (or --workdir), or tensorboard='some/dir'")
        path = os.path.join(workdir, TENSORBOARD_DIR)
    elif isinstance(tensorboard, (str, os.PathLike)) and str(tensorboard):
        path = os.fspath(tensorboard)
    else:
        raise UserError(f"tensorboard must be True, False or a directory path, got "
                        f"{tensorboard!r}")
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise _missing("tensorboard logging", "tensorboardX", "tracking") from None
    return path


class TensorBoardLog:
    """Writes every metrics row to TensorBoard event files in `logdir`: each numeric metric
    a scalar with step = round; `finish` (after `close`, once the run is done) adds the
    summary as text and the run's hyperparameters with its final metrics (TensorBoard's
    HParams tab, in the sub-run `hparams`).

    A resumed run (from a checkpoint at round `start_round`) writes a new event file whose
    first event tells TensorBoard to drop the steps after `start_round` of the earlier
    files (tensorboardX's `purge_step`; a fresh run purges from step 0): the rounds a
    resumed run redoes appear once, with the values of the resumed run."""

    def __init__(self, logdir: str, start_round: int = 0):
        from tensorboardX import SummaryWriter

        purge = start_round + 1 if start_round > 0 else 0
        make_directory(logdir, "the TensorBoard directory")
        self.logdir = logdir
        # The event file's name holds the second it was created: the suffix keeps a resumed
        # run's file apart from (and sorted after) one created in the same second.
        self._writer = SummaryWriter(logdir, purge_step=purge, flush_secs=10,
                                     filename_suffix=f".from{start_round:09d}")

    def __call__(self, row: dict) -> None:
        step = int(row["round"])
        for name, value in scalars(row).items():
            self._writer.add_scalar(name, value, step, walltime=time.time())

    def close(self) -> None:
        self._writer.close()

    def finish(self, summary: dict, config: dict | None, step: int) -> None:
        """After `close`: the run's summary as text (tag `summary`, at the last round's step)
        and, where there is a config, its scalar values as hyperparameters beside the final
        metrics (`final/<metric>`), in an event file of their own."""
        from tensorboardX import SummaryWriter

        with SummaryWriter(self.logdir, filename_suffix=f".summary{step:09d}") as writer:
            writer.add_text("summary", summary_markdown(summary), step)
            if not config:
                return
            writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str)
                            + "\n```", step)
            final = {f"final/{k}": float(v) for k, v in summary.get("final", {}).items()
                     if isinstance(v, numbers.Real) and math.isfinite(v)}
            epsilon = (summary.get("privacy") or {}).get("epsilon")
            if epsilon is not None:
                final["final/epsilon"] = float(epsilon)
            if final:
                writer.add_hparams(flat_hparams(config), final, name=HPARAMS_RUN,
                                   global_step=step)


def open_tensorboard(logdir: str | None, start_round: int) -> TensorBoardLog | None:
    """The run's TensorBoard log, or None (none asked for, or not process 0)."""
    if logdir is None or not processes.is_primary():
        return None
    return TensorBoardLog(logdir, start_round)


def flat_hparams(config: dict, prefix: str = "") -> dict:
    """A JSON-like config's numbers, strings and booleans under dotted names (None as the
    string 'None'; lists and other values left out), for TensorBoard's HParams."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, name + "."))
        elif value is None:
            out[name] = "None"
        elif isinstance(value, (bool, str)) or (isinstance(value, numbers.Real)
                                                and math.isfinite(value)):
            out[name] = value
    return out


def summary_markdown(summary: dict) -> str:
    """summary.json's headline numbers as a Markdown table."""
    rows = [(k, v) for k, v in summary.get("final", {}).items()]
    for key in ("rounds", "train_loss", "seconds_per_round", "compile_seconds",
                "uplink_bytes_total", "downlink_bytes_total", "resumed_from_round", "stopped"):
        if key in summary:
            rows.append((key, summary[key]))
    privacy = summary.get("privacy") or {}
    for key in ("epsilon", "delta"):
        if key in privacy:
            rows.append((key, privacy[key]))
    shown = lambda v: f"{v:.6g}" if isinstance(v, float) else str(v)
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {shown(v)} |" for k, v in rows)


# --------------------------------------------------------------------------- W&B, MLflow


def wandb_callback(run=None, *, prefix: str = "") -> Callable[[dict], None]:
    """A `simulate(callback=...)` that logs each round's numeric metrics to a Weights &
    Biases run (`run.log(metrics, step=round)`); `run` defaults to the current one
    (`wandb.init()` first). Names get `prefix` (e.g. 'fedavg/'). W&B ignores a step below
    one it already has, so the rounds a resumed run redoes are kept as first logged unless
    the resumed run logs to a new W&B run. Logs only on process 0."""
    try:
        import wandb
    except ImportError:
        raise _missing("wandb_callback", "wandb", "wandb") from None
    run = run if run is not None else wandb.run
    if run is None:
        raise UserError("wandb_callback: there is no W&B run; call wandb.init(...) first or "
                        "pass the run, e.g. wandb_callback(wandb.init(project='fl'))")

    def log(row: dict) -> None:
        if processes.is_primary():
            run.log(scalars(row, prefix), step=int(row["round"]))

    return log


def mlflow_callback(run_id: str | None = None, *, tracking_uri: str | None = None,
                    prefix: str = "") -> Callable[[dict], None]:
    """A `simulate(callback=...)` that logs each round's numeric metrics to an MLflow run
    (one `MlflowClient.log_batch` per round, step = round): the run `run_id`, or the one
    active when this is called (`with mlflow.start_run(): ...`). `tracking_uri`: the
    tracking server or store (default: MLflow's current one). Names get `prefix`. Logs only
    on process 0."""
    try:
        import mlflow
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise _missing("mlflow_callback", "MLflow", "mlflow") from None
    if run_id is None:
        active = mlflow.active_run()
        if active is None:
            raise UserError("mlflow_callback: no MLflow run is active; call it inside "
                            "`with mlflow.start_run():` or pass run_id=...")
        run_id = active.info.run_id
    client = MlflowClient(tracking_uri)

    def log(row: dict) -> None:
        if not processes.is_primary():
            return
        now, step = int(time.time() * 1000), int(row["round"])
        metrics = [Metric(k, v, now, step) for k, v in scalars(row, prefix).items()]
        if metrics:
            client.log_batch(run_id, metrics=metrics)

    return log
