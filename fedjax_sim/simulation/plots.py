"""Plots that compare runs: a metric's curves by round, training time or uplink traffic
(ε by round for private runs is the metric `epsilon`), and the distribution of a
per-client metric over the clients (an ECDF per run).

A run is a `Result` of `simulate()` or a run directory (`metrics.jsonl`, with
`summary.json` and `client_metrics.json` where the run wrote them). Figures are drawn
with matplotlib's Agg renderer directly (no pyplot: the global backend is left alone) and
returned; `out=` also writes them to a file (PNG, PDF, SVG by its extension).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os

import numpy as np

from fedjax_sim.errors import UserError
from fedjax_sim.simulation.results import Result
from fedjax_sim.simulation.rundir import CLIENT_METRICS, METRICS, SUMMARY

X_AXES = ("round", "seconds", "uplink_bytes")
# Each x axis: its label (with the unit; {unit} filled in) and how a title names it.
X_LABELS = {"round": "round", "seconds": "training time (s; compilation and evaluation excluded)",
            "uplink_bytes": "uplink traffic, cumulative ({unit})"}
X_TITLES = {"round": "round", "seconds": "training time", "uplink_bytes": "uplink traffic"}
PLOT_EXTRA = "pip install 'fedjax_sim[plot]'"


@dataclasses.dataclass
class Run:
    """What a plot reads of one run."""

    label: str
    history: list[dict]
    summary: dict
    client_metrics: dict | None


def read_run(path: str, label: str | None = None) -> Run:
    """The run written to directory `path` (by `fedjax-sim train --workdir` or
    `simulate(workdir=...)`); metrics.jsonl's nulls (non-finite values) come back as NaN."""
    metrics = os.path.join(path, METRICS)
    if not os.path.isfile(metrics):
        raise UserError(f"{path} is not a run directory (it has no {METRICS}); pass directories "
                        f"written by fedjax-sim train --workdir or simulate(workdir=...)")
    with open(metrics) as f:
        history = [{k: math.nan if v is None else v for k, v in json.loads(line).items()}
                   for line in f if line.strip()]
    extra = {}
    for name in (SUMMARY, CLIENT_METRICS):
        file = os.path.join(path, name)
        if os.path.isfile(file):
            with open(file) as f:
                extra[name] = json.load(f)
    return Run(label or os.path.basename(os.path.normpath(path)), history,
               extra.get(SUMMARY, {}), extra.get(CLIENT_METRICS))


def gather_runs(runs, labels=None) -> list[Run]:
    """`runs` (a Result, a run directory, a list of them, or a dict {label: run}) as Runs,
    labelled by `labels`, the dict's keys, the directories' names or 'run 1', 'run 2', ..."""
    if isinstance(runs, dict):
        labels, runs = list(runs) if labels is None else labels, list(runs.values())
    elif isinstance(runs, (Result, str, os.PathLike)):
        runs = [runs]
    runs = list(runs)
    if not runs:
        raise UserError("nothing to plot: pass at least one Result or run directory")
    if labels is not None and len(labels) != len(runs):
        raise UserError(f"{len(labels)} labels for {len(runs)} runs; give one label per run")
    out = []
    for i, run in enumerate(runs):
        label = str(labels[i]) if labels is not None else None
        if isinstance(run, Result):
            out.append(Run(label or f"run {i + 1}", run.history, run.summary or {},
                           run.client_metrics))
        elif isinstance(run, (str, os.PathLike)):
            out.append(read_run(os.fspath(run), label))
        else:
            raise UserError(f"cannot plot a {type(run).__name__}: pass Results of simulate() or "
                            f"run directories")
    names = [r.label for r in out]
    for run, given in zip(out, runs):  # two directories of the same name: their paths
        if names.count(run.label) > 1 and labels is None and not isinstance(given, Result):
            run.label = os.fspath(given)
    return out


def curve(run: Run, metric: str, x: str = "round") -> tuple[np.ndarray, np.ndarray]:
    """(x values, metric values) of the rows that hold `metric`, with x the round, the
    training seconds (round × the summary's seconds_per_round: the compiled round takes
    the same time every round; compilation and evaluation are left out) or the uplink
    bytes sent up to and including that round."""
    if x not in X_AXES:
        raise UserError(f"x must be one of {', '.join(X_AXES)}, got {x!r}")
    rows = [r for r in run.history if metric in r and r[metric] is not None]
    if not rows and metric == "epsilon":
        raise UserError(f"run {run.label!r} logged no epsilon: it is not a private run; plot ε "
                        f"of private runs only")
    if not rows:
        known = sorted({k for r in run.history for k in r if k != "round"})
        raise UserError(f"run {run.label!r} logged no {metric}; it logged: {', '.join(known)}")
    if x == "round":
        xs = [r["round"] for r in rows]
    elif x == "seconds":
        per_round = run.summary.get("seconds_per_round")
        if per_round is None:
            raise UserError(f"run {run.label!r} has no seconds_per_round in its summary (is it "
                            f"still training?); plot it with x='round'")
        xs = [r["round"] * per_round for r in rows]
    else:
        sent = np.cumsum([float(r.get("uplink_bytes", 0) or 0) for r in run.history])
        where = {id(r): i for i, r in enumerate(run.history)}
        xs = [sent[where[id(r)]] for r in rows]
    return np.asarray(xs, np.float64), np.asarray([float(r[metric]) for r in rows], np.float64)


def _figure():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(f"plotting needs matplotlib, which is not installed; install it with "
                        f"{PLOT_EXTRA}") from None

    class NotebookFigure(Figure):
        """A Figure that a notebook (Jupyter, Colab) shows when a cell returns it, without
        pyplot's global state."""

        def _repr_png_(self) -> bytes:
            buffer = io.BytesIO()
            self.savefig(buffer, format="png")
            return buffer.getvalue()

    fig = NotebookFigure(figsize=(7.5, 4.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _bytes_unit(largest: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if largest >= scale:
            return scale, unit
    return 1.0, "bytes"


def metric_label(metric: str, runs: list[Run] = ()) -> str:
    """The y-axis label of a metric, with its unit."""
    if metric == "epsilon":
        deltas = {(r.summary.get("privacy") or {}).get("delta") for r in runs}
        delta = deltas.pop() if len(deltas) == 1 else None
        return "privacy loss ε" + (f" (δ = {delta:g})" if delta is not None else "")
    if metric.endswith("_bytes") or metric.endswith("_bytes_per_client"):
        return metric.replace("_", " ").replace("bytes", "(bytes)")
    text = metric.replace("_", " ")
    return f"{text} (fraction)" if metric.endswith("accuracy") or "_accuracy_" in metric else text


def plot(runs, metric: str = "test_accuracy", x: str = "round", out: str | None = None,
         labels=None, title: str | None = None):
    """One curve of `metric` per run, against `x`: 'round', 'seconds' (training time,
    round × seconds_per_round) or 'uplink_bytes' (the client → server traffic so far).
    `metric` is any key of the metrics rows ('test_accuracy', 'train_loss', 'epsilon',
    'client_test_accuracy_p10', ...), or a per-client metric without a statistic
    ('client_test_accuracy', 'client_finetuned_loss', ...) for the distribution over the
    clients of the last evaluation (`plot_clients`).

    runs: a Result, a run directory, a list of them or a dict {label: run}; or a sweep
    (`fs.sweep`'s SweepResult or its workdir): one curve per setting, the mean over the
    seeds with a band of ± one standard deviation when seeds were swept. Returns the
    matplotlib Figure; `out` also writes it (PNG, PDF, SVG by the extension)."""
    if client_metric_split(metric) is not None:
        if x != "round":
            raise UserError(f"{metric} is drawn as a distribution over clients, not by {x}; "
                            f"leave x out, or plot a statistic such as {metric}_mean by {x}")
        return plot_clients(runs, metric, out=out, labels=labels, title=title)
    sweep = sweep_trials(runs)
    if sweep is not None:
        return plot_sweep(sweep, metric, x, out=out, title=title)
    runs = gather_runs(runs, labels)
    curves = [curve(run, metric, x) for run in runs]
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    scale, unit = 1.0, ""
    if x == "uplink_bytes":
        scale, unit = _bytes_unit(max(float(c[0].max()) for c in curves))
    for run, (xs, ys) in zip(runs, curves):
        ax.plot(xs / scale, ys, marker="o" if len(xs) <= 40 else None, markersize=3,
                linewidth=1.5, label=run.label)
    ax.set_xlabel(X_LABELS[x].format(unit=unit))
    ax.set_ylabel(metric_label(metric, runs))
    ax.set_title(title or f"{'ε' if metric == 'epsilon' else metric} by {X_TITLES[x]}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, out)


def sweep_trials(runs) -> list[tuple[dict, Run]] | None:
    """(settings, Run) of every trial of a sweep — a SweepResult or a directory holding
    sweep.json and trials/<k>/, alone or as a list of one — or None for anything else."""
    if isinstance(runs, (list, tuple)) and len(runs) == 1:
        runs = runs[0]
    if hasattr(runs, "trials") and hasattr(runs, "table"):  # a SweepResult
        return [(dict(t.settings), Run(_setting_label(t.settings), t.result.history,
                                       t.result.summary or {}, t.result.client_metrics))
                for t in runs.trials]
    if isinstance(runs, (str, os.PathLike)) and os.path.isfile(
            os.path.join(os.fspath(runs), "sweep.json")):
        with open(os.path.join(os.fspath(runs), "sweep.json")) as f:
            table = json.load(f)
        grid = list(table["grid"])
        return [({k: row[k] for k in grid},
                 read_run(os.path.join(os.fspath(runs), "trials", str(row["trial"])),
                          _setting_label({k: row[k] for k in grid})))
                for row in table["trials"]]
    return None


def _setting_label(settings: dict, leave_out: str | None = None) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in settings.items() if k != leave_out)


def plot_sweep(trials: list[tuple[dict, Run]], metric: str = "test_accuracy",
               x: str = "round", out: str | None = None, title: str | None = None):
    """A sweep's curves grouped by setting: with more than one seed, each setting's mean
    over its seeds and a band of ± one standard deviation; else a curve per trial.
    Diverged trials (their metric turns non-finite) are left out of the mean."""
    seeds = {json.dumps(s.get("seed")) for s, _ in trials}
    by_seed = "seed" in trials[0][0] and len(seeds) > 1
    groups: dict[str, list[Run]] = {}
    for settings, run in trials:
        key = _setting_label(settings, "seed" if by_seed else None) or "all trials"
        groups.setdefault(key, []).append(run)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    curves = {key: [curve(run, metric, x) for run in group] for key, group in groups.items()}
    scale, unit = 1.0, ""
    if x == "uplink_bytes":
        scale, unit = _bytes_unit(max(float(c[0].max()) for cs in curves.values() for c in cs))
    for key, cs in curves.items():
        n = min(len(c[0]) for c in cs)
        xs = cs[0][0][:n] / scale
        ys = np.array([c[1][:n] for c in cs])
        finite = np.isfinite(ys).all(axis=1)
        if not finite.any():
            continue
        ys = ys[finite]
        mean = ys.mean(axis=0)
        label = key if not by_seed else f"{key} (mean of {len(ys)} seeds ± std)"
        line, = ax.plot(xs, mean, marker="o" if n <= 40 else None, markersize=3,
                        linewidth=1.5, label=label)
        if len(ys) > 1:
            std = ys.std(axis=0, ddof=1)
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(X_LABELS[x].format(unit=unit))
    ax.set_ylabel(metric_label(metric, [run for _, run in trials]))
    ax.set_title(title or f"{'ε' if metric == 'epsilon' else metric} by {X_TITLES[x]}, "
                          f"{len(trials)} trials")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, out)


def client_metric_split(metric: str) -> str | None:
    """'test' for 'client_test_accuracy' (a per-client metric without a statistic)."""
    for split in ("test", "personal", "finetuned"):
        head = f"client_{split}_"
        if metric.startswith(head) and len(metric) > len(head) and not metric.endswith(
                ("_mean", "_p10", "_p50", "_p90", "_min", "_count")):
            return split
    return None


def plot_clients(runs, metric: str = "client_test_accuracy", out: str | None = None,
                 labels=None, title: str | None = None):
    """The distribution of a per-client metric of the last evaluation (client_metrics.json,
    `Result.client_metrics`): one empirical CDF per run (the fraction of clients whose value
    is at most x), its mean and 10th percentile in the legend. Clients without evaluation
    examples are left out. `metric`: 'client_<split>_<name>', e.g. 'client_test_accuracy',
    'client_personal_accuracy', 'client_finetuned_loss'."""
    split = client_metric_split(metric)
    if split is None:
        raise UserError(f"{metric!r} is not a per-client metric; use client_<split>_<name> with "
                        f"split test, personal or finetuned, e.g. client_test_accuracy")
    name = metric[len(f"client_{split}_"):]
    runs = gather_runs(runs, labels)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for run in runs:
        values = _client_values(run, split, name)
        ys = np.arange(1, len(values) + 1) / len(values)
        ax.step(np.concatenate([[values[0]], values]), np.concatenate([[0.0], ys]), where="post",
                linewidth=1.5, label=f"{run.label} (mean {values.mean():.3g}, "
                                     f"p10 {np.percentile(values, 10):.3g}, {len(values)} clients)")
    what = f"{split} {name}" + (" (fraction)" if name == "accuracy" else "")
    ax.set_xlabel(f"{what}, per client")
    ax.set_ylabel("fraction of clients ≤ x")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or f"{metric}: distribution over clients (last evaluation)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    return _save(fig, out)


def _client_values(run: Run, split: str, name: str) -> np.ndarray:
    """The sorted values of one per-client metric of a run, clients with examples only."""
    clients = run.client_metrics
    if not clients:
        raise UserError(f"run {run.label!r} has no per-client metrics ({CLIENT_METRICS}); they "
                        f"come from runs given client_eval_data (a config's "
                        f"data.client_test_fraction)")
    if split not in clients or name not in clients[split]:
        known = [f"client_{s}_{k}" for s, v in clients.items() if isinstance(v, dict)
                 for k in v if k != "count"]
        raise UserError(f"run {run.label!r} has no client_{split}_{name}; it has: "
                        f"{', '.join(known)}")
    values = np.asarray(clients[split][name], np.float64)
    count = np.asarray(clients[split].get("count", np.ones_like(values)))
    values = np.sort(values[(count > 0) & np.isfinite(values)])
    if not len(values):
        raise UserError(f"run {run.label!r}: no client has a finite {split} {name}")
    return values


def _save(fig, out: str | None):
    if out is None:
        return fig
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise UserError(f"cannot write {out!r}: directory {directory!r} does not exist; create "
                        f"it first")
    try:
        fig.savefig(out)
    except ValueError as e:  # an extension matplotlib does not write
        raise UserError(f"cannot write {out!r}: {str(e).splitlines()[0]}; use .png, .pdf or "
                        f".svg") from None
    return fig
