"""fs.sweep: trials of one program run as one more vmapped axis.

The reference for every trial is the same configuration run alone with fs.simulate.
The sweep's program computes each trial with the same operations, batched over the trial
axis: XLA's batched matrix products may sum in another order than the unbatched ones, so
floats agree to rounding (measured: parameters within 1e-7 relative after 4 rounds), not
bit for bit; accuracies, sampled cohorts and ε are the same.
"""

import csv
import io
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.errors import Interrupted, UserError
from fedjax_sim.privacy import ClientLevelDP, ExampleLevelDP
from fedjax_sim.simulation import sweeps as sweep_module
from fedjax_sim.simulation.sweeps import grid_settings

RTOL = 1e-6
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def digits():
    train, test = fs.data.load_digits()
    clients = fs.data.partition(train, train["y"], "dirichlet", 30, seed=0, alpha=0.5)
    return clients, test


def _experiment(digits, hidden=(16,), rounds=4, privacy=None, weighting="num_examples"):
    clients, test = digits

    def run(lr=0.1, seed=0, z=None, width=None, mu=0.0):
        algorithm = fs.algorithms.fedprox(
            fs.algorithms.tunable(optax.sgd, learning_rate=lr), mu,
            fs.algorithms.tunable(optax.sgd, learning_rate=1.0, momentum=0.5),
            batch_size=10, weighting="uniform" if z is not None else weighting)
        model = fs.models.get_model("mlp", (8, 8, 1), 10, hidden=(width,) if width else hidden)
        return dict(model=model, algorithm=algorithm, train_data=clients, rounds=rounds,
                    clients_per_round=5, eval_data=test, eval_every=2, seed=seed,
                    privacy=None if z is None else ClientLevelDP(
                        noise_multiplier=z, clip_norm=0.5, delta=1e-3))
    return run


def _close(a, b, rtol=RTOL, atol=1e-7):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol)


def _assert_same_run(trial_result, alone):
    assert [h["round"] for h in trial_result.history] == [h["round"] for h in alone.history]
    for got, want in zip(trial_result.history, alone.history):
        assert set(got) == set(want)
        for key, value in want.items():
            if key.endswith("accuracy") or key in ("cohort_examples", "epsilon", "round"):
                assert got[key] == value, (key, got[key], value)
            elif isinstance(value, float):
                _close(got[key], value)
    for x, y in zip(jax.tree_util.tree_leaves(trial_result.params),
                    jax.tree_util.tree_leaves(alone.params)):
        _close(x, y)


def test_grid_settings_product_and_zip():
    assert grid_settings({"a": [1, 2], "b": range(2)}) == [
        {"a": 1, "b": 0}, {"a": 1, "b": 1}, {"a": 2, "b": 0}, {"a": 2, "b": 1}]
    assert grid_settings({"a": [1, 2], "b": [3, 4]}, zip_values=True) == [
        {"a": 1, "b": 3}, {"a": 2, "b": 4}]
    with pytest.raises(UserError, match="one length"):
        grid_settings({"a": [1, 2], "b": [3]}, zip_values=True)
    with pytest.raises(UserError, match="is empty"):
        grid_settings({"a": []})
    with pytest.raises(UserError, match="list of values"):
        grid_settings({"a": 0.1})


def test_learning_rates_and_seeds_run_in_one_program_as_they_run_alone(digits):
    run = _experiment(digits)
    result = fs.sweep(run, {"lr": [0.05, 0.3], "seed": [0, 1], "mu": [0.01, 0.1]},
                      progress=False)
    assert len(result.groups) == 1 and result.groups[0]["trials"] == list(range(8))
    for trial in result.trials:
        _assert_same_run(trial.result, fs.simulate(**run(**trial.settings), progress=False))
    # The table: one row per trial, final and best test metrics; aggregate over seeds.
    table = result.table()
    assert [row["lr"] for row in table] == [0.05] * 4 + [0.3] * 4
    for trial, row in zip(result.trials, table):
        evaluated = [h["test_accuracy"] for h in trial.result.history if "test_accuracy" in h]
        assert row["final_test_accuracy"] == evaluated[-1]
        assert row["best_test_accuracy"] == max(evaluated)
    agg = {(g["lr"], g["mu"]): g for g in result.aggregate()}
    pair = [r["final_test_accuracy"] for r in table if r["lr"] == 0.3 and r["mu"] == 0.1]
    assert agg[(0.3, 0.1)]["n"] == 2
    assert agg[(0.3, 0.1)]["final_test_accuracy_mean"] == pytest.approx(np.mean(pair))
    assert agg[(0.3, 0.1)]["final_test_accuracy_std"] == pytest.approx(np.std(pair, ddof=1))
    best = result.best()
    assert table[best.index]["final_test_accuracy"] == max(r["final_test_accuracy"] for r in table)


@pytest.mark.slow  # several sweeps and their runs alone: over the default suite's budget
def test_dp_noise_multiplier_is_swept_in_one_program_with_each_trials_epsilon(digits):
    run = _experiment(digits, rounds=3)
    result = fs.sweep(lambda z: run(z=z), {"z": [1.0, 2.0]}, progress=False)
    assert len(result.groups) == 1
    for trial in result.trials:
        alone = fs.simulate(**run(z=trial.settings["z"]), progress=False)
        _assert_same_run(trial.result, alone)
        assert trial.result.summary["privacy"] == alone.summary["privacy"]


@pytest.mark.slow  # several sweeps and their runs alone: over the default suite's budget
def test_settings_that_change_shapes_form_groups(digits):
    run = _experiment(digits, rounds=2)
    result = fs.sweep(lambda width, seed: run(width=width, seed=seed),
                      {"width": [8, 16], "seed": [0, 1]}, progress=False)
    assert [g["trials"] for g in result.groups] == [[0, 1], [2, 3]]
    for trial in result.trials:
        alone = fs.simulate(**run(width=trial.settings["width"], seed=trial.settings["seed"]),
                            progress=False)
        _assert_same_run(trial.result, alone)
    # at most one trial per program: four groups, the same results
    chunked = fs.sweep(lambda width, seed: run(width=width, seed=seed),
                       {"width": [8, 16], "seed": [0, 1]}, max_trials_per_program=1,
                       progress=False)
    assert len(chunked.groups) == 4
    for a, b in zip(result.trials, chunked.trials):
        _assert_same_run(a.result, b.result)


def test_a_diverging_trial_is_marked_and_the_others_go_on(digits):
    run = _experiment(digits, rounds=4)
    result = fs.sweep(run, {"lr": [0.1, 1e30]}, progress=False)
    good, bad = result.trials
    assert good.diverged is None and good.result.history[-1]["round"] == 4
    assert bad.diverged.startswith("training diverged at round")
    assert "lower the client or server learning rate" in bad.diverged
    assert not math.isfinite(bad.result.history[-1]["train_loss"]) or \
        bad.result.summary["diverged"]
    assert result.best().index == 0
    _assert_same_run(good.result, fs.simulate(**run(lr=0.1), progress=False))


@pytest.mark.slow  # several sweeps: over the default suite's budget
def test_workdir_files_and_a_stopped_sweep_resumes(digits, tmp_path, monkeypatch):
    run = _experiment(digits, rounds=6)
    grid = {"lr": [0.05, 0.2], "seed": [0, 1]}
    reference = fs.sweep(run, grid, progress=False)

    # Ctrl-C after the first call of rounds: the sweep saves and stops.
    calls = {"n": 0}
    original = sweep_module.ProgressBar.update

    def update(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            signal.raise_signal(signal.SIGINT)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sweep_module.ProgressBar, "update", update)
    workdir = str(tmp_path / "sweep")
    with pytest.raises(Interrupted, match="run the same sweep"):
        fs.sweep(run, grid, workdir=workdir, progress=False,
                 checkpoint=fs.CheckpointOptions(every_seconds=None))
    stopped_at = [json.loads(line)["round"]
                  for line in open(os.path.join(workdir, "trials", "0", "metrics.jsonl"))]
    assert stopped_at == [1, 2]
    monkeypatch.setattr(sweep_module.ProgressBar, "update", original)

    resumed = fs.sweep(run, grid, workdir=workdir, progress=False)
    assert resumed.groups[0]["program_cache"] in ("hit", "compiled")
    for a, b in zip(resumed.trials, reference.trials):
        assert a.result.history == b.result.history
        for x, y in zip(jax.tree_util.tree_leaves(a.result.params),
                        jax.tree_util.tree_leaves(b.result.params)):
            np.testing.assert_array_equal(x, y)
    # Each trial is a run directory; the tables hold every trial.
    for k, trial in enumerate(resumed.trials):
        d = os.path.join(workdir, "trials", str(k))
        rows = [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
        assert rows == json.loads(json.dumps(trial.result.history))
        for name in ("config.json", "summary.json", "params.npz"):
            assert os.path.isfile(os.path.join(d, name))
    table = list(csv.DictReader(io.StringIO(open(os.path.join(workdir, "sweep.csv")).read())))
    assert [(float(r["lr"]), int(r["seed"])) for r in table] == [
        (0.05, 0), (0.05, 1), (0.2, 0), (0.2, 1)]
    summary = json.load(open(os.path.join(workdir, "sweep.json")))
    assert summary["best"]["trial"] == resumed.best().index
    assert len(summary["aggregate"]) == 2 and summary["aggregate"][0]["n"] == 2
    # A finished sweep run again is read back, not recomputed.
    again = fs.sweep(run, grid, workdir=workdir, progress=False)
    assert again.groups[0]["program_cache"] == "restored"
    assert [t.result.history for t in again.trials] == [t.result.history for t in resumed.trials]
    # Another grid in the same workdir is refused.
    with pytest.raises(UserError, match="another sweep"):
        fs.sweep(run, {"lr": [0.1]}, workdir=workdir, progress=False)
    # The plots read the trials as runs.
    pytest.importorskip("matplotlib")
    fig = fs.plot([os.path.join(workdir, "trials", str(k)) for k in range(4)])
    assert len(fig.axes[0].get_lines()) == 4


def test_bad_sweeps_get_one_line_errors(digits):
    run = _experiment(digits)
    with pytest.raises(UserError, match="may not set workdir"):
        fs.sweep(lambda lr: {**run(lr=lr), "workdir": "x"}, {"lr": [0.1]})
    with pytest.raises(UserError, match="accept every grid name"):
        fs.sweep(run, {"learning_rate": [0.1]})
    with pytest.raises(UserError, match="does not take"):
        fs.sweep(lambda lr: {**run(lr=lr), "rounds_total": 3}, {"lr": [0.1]})
    clients, test = digits
    with pytest.raises(UserError, match="example-level DP"):
        fs.sweep(lambda z: {**run(), "privacy": ExampleLevelDP(
            clip_norm=1.0, noise_multiplier=z, sampling_rate=0.1, delta=1e-4)}, {"z": [1.0]})


MESH_SCRIPT = r"""
import json, sys
import jax, numpy as np, optax
import fedjax_sim as fs

train, test = fs.data.load_digits()
clients = fs.data.partition(train, train["y"], "dirichlet", 30, seed=0, alpha=0.5)
model = fs.models.get_model("mlp", (8, 8, 1), 10, hidden=(16,))

def run(lr, seed, mesh):
    return dict(model=model, algorithm=fs.algorithms.fedavg(
                    fs.algorithms.tunable(optax.sgd, learning_rate=lr), batch_size=10),
                train_data=clients, rounds=3, clients_per_round=5, eval_data=test,
                eval_every=3, seed=seed, engine=fs.EngineOptions(mesh=mesh))

out = {}
grid = {"lr": [0.05, 0.2], "seed": [0, 1, 2]}          # 6 trials: none padded on 2 devices
odd = {"lr": [0.1], "seed": [0, 1, 2]}                 # 3 trials: one padding trial
for name, g in (("grid", grid), ("odd", odd)):
    for axis in ("vmap", "map"):
        for mesh in ("auto", 1):
            r = fs.sweep(lambda lr, seed: run(lr, seed, mesh), g, trial_axis=axis,
                         progress=False)
            out[f"{name}/{axis}/{mesh}"] = {
                "groups": [{k: v[k] for k in ("devices", "padding_trials", "trials")}
                           for v in r.groups],
                "histories": [t.result.history for t in r.trials],
                "params": [np.concatenate([np.ravel(x) for x in
                           jax.tree_util.tree_leaves(t.result.params)]).tolist()
                           for t in r.trials]}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow  # several sweeps and their runs alone: over the default suite's budget
def test_trials_split_over_a_mesh_of_devices_as_on_one():
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""),
                                              "--xla_force_host_platform_device_count=2"]))
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][6:])
    for name, trials, pad in (("grid", 6, 0), ("odd", 3, 1)):
        for axis in ("vmap", "map"):
            on_mesh, alone = out[f"{name}/{axis}/auto"], out[f"{name}/{axis}/1"]
            assert on_mesh["groups"] == [{"devices": 2, "padding_trials": pad,
                                          "trials": list(range(trials))}]
            assert alone["groups"][0]["devices"] == 1
            for h_mesh, h_alone in zip(on_mesh["histories"], alone["histories"]):
                assert [r["round"] for r in h_mesh] == [r["round"] for r in h_alone]
                for a, b in zip(h_mesh, h_alone):
                    for key, value in b.items():
                        if isinstance(value, float):
                            _close(a[key], value)
            for p_mesh, p_alone in zip(on_mesh["params"], alone["params"]):
                _close(p_mesh, p_alone)


def test_parse_sweep_values():
    from fedjax_sim.cli.sweep import parse_sweep

    assert parse_sweep("seed=range(3)") == ("seed", [0, 1, 2])
    assert parse_sweep("seed=range(2, 8, 3)") == ("seed", [2, 5])
    assert parse_sweep("a.b=[0.01, 0.1]") == ("a.b", [0.01, 0.1])
    assert parse_sweep("a=0.5,1") == ("a", [0.5, 1])
    assert parse_sweep("name=['sgd','adam']") == ("name", ["sgd", "adam"])
    with pytest.raises(UserError, match="KEY=VALUES"):
        parse_sweep("seed")
    with pytest.raises(UserError, match="cannot read"):
        parse_sweep("a=[1,")


def test_cli_sweep_writes_trials_and_tables(tmp_path, capsys):
    from fedjax_sim.cli.main import main

    workdir = str(tmp_path / "sweep")
    config = os.path.join(REPO, "configs", "digits_fedavg.py")
    rc = main(["sweep", "--config", config, "--workdir", workdir, "--no-progress",
               "--sweep", "algorithm.client_optimizer.learning_rate=[0.05,0.1]",
               "--sweep", "seed=range(2)", "--config.rounds=2", "--config.eval_every=2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "sweep done: 4 trials in 1 program(s); best test_accuracy = " in printed
    rows = list(csv.DictReader(open(os.path.join(workdir, "sweep.csv"))))
    assert [(r["algorithm.client_optimizer.learning_rate"], r["seed"]) for r in rows] == [
        ("0.05", "0"), ("0.05", "1"), ("0.1", "0"), ("0.1", "1")]
    for k in range(4):
        config_json = json.load(open(os.path.join(workdir, "trials", str(k), "config.json")))
        assert config_json["seed"] == int(rows[k]["seed"])
        assert config_json["algorithm"]["client_optimizer"]["learning_rate"] == float(
            rows[k]["algorithm.client_optimizer.learning_rate"])
    # a bad sweep is a one-line error
    assert main(["sweep", "--config", config, "--sweep", "seed"]) == 2
    assert "must be KEY=VALUES" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_sweeps_run(tmp_path, monkeypatch):
    """The README's sweep command and Python sweep, with 4 rounds instead of 200."""
    from fedjax_sim.cli.main import main

    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme[readme.index("## Sweeps"):readme.index("## Notebooks")]
    command = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    args = shlex.split(command)
    assert args[0] == "fedjax-sim"
    args = [a.replace("runs/", str(tmp_path) + "/") for a in args[1:]]
    monkeypatch.chdir(REPO)
    assert main(args + ["--config.rounds=4", "--config.eval_every=2", "--no-progress"]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "lr_sweep" / "sweep.csv")))) == 32
    api = re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec((api + code).replace("rounds=200", "rounds=4").replace(
        '"runs/', f'"{tmp_path}/py_'), namespace)
    best, aggregate = namespace["sweep"].best(), namespace["sweep"].aggregate()
    assert set(best.settings) == {"lr", "seed"} and len(aggregate) == 4


@pytest.mark.slow  # several sweeps: over the default suite's budget
def test_auto_chunks_halve_a_group_until_its_program_fits(digits, monkeypatch):
    """On an accelerator 'auto' halves a group until XLA's memory analysis of its program
    fits the budget; here the budget is set to what a program of 2 trials needs."""
    run = _experiment(digits, rounds=2)
    grid = {"lr": [0.05, 0.1], "seed": [0, 1]}
    plans = [sweep_module._plan(run, s) for s in grid_settings(grid)]
    two = sweep_module._program_bytes(plans[:2], "vmap")
    four = sweep_module._program_bytes(plans, "vmap")
    assert two < four
    monkeypatch.setattr(sweep_module, "_memory_budget", lambda plan: two)
    result = fs.sweep(run, grid, trial_axis="vmap", progress=False)
    assert [g["trials"] for g in result.groups] == [[0, 1], [2, 3]]
    whole = fs.sweep(run, grid, trial_axis="vmap", max_trials_per_program=None, progress=False)
    for a, b in zip(result.trials, whole.trials):
        _assert_same_run(a.result, b.result)
