"""The command line and the config files, as a user runs them, and its error messages."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import optax
import pytest

from helpers import EXTERNAL_DATA_CONFIGS

import fedjax_sim as fs
from fedjax_sim.cli.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def _run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_writes_config_metrics_and_summary(tmp_path, capsys):
    workdir = tmp_path / "run"
    code, out, err = _run(capsys, "train", "--config", f"{CONFIGS}/digits_fedavg.py",
                          "--config.rounds=6", "--config.eval_every=3", "--workdir", str(workdir),
                          "--no-progress", "--tensorboard")
    assert code == 0, err
    assert "done: 6 rounds" in out and "tensorboard/" in out
    config = json.loads((workdir / "config.json").read_text())
    assert config["rounds"] == 6 and config["algorithm"]["batch_size"] == 10
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["train_loss"]) for r in rows)
    evals = [r for r in rows if "test_accuracy" in r]
    assert [r["round"] for r in evals] == [3, 6]
    for r in evals:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and "test_loss" in r
        assert r["client_test_accuracy_p10"] <= r["client_test_accuracy_p50"] <= r["client_test_accuracy_p90"]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["final"]["test_accuracy"] == evals[-1]["test_accuracy"]
    assert summary["data"]["num_clients"] == 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("test_accuracy")]
    assert logged == [(r["round"], pytest.approx(r["test_accuracy"], rel=1e-7)) for r in evals]


def test_train_tensorboard_needs_a_workdir_or_a_directory(capsys):
    code, _, err = _run(capsys, "train", "--config", f"{CONFIGS}/digits_fedavg.py",
                        "--tensorboard", "--no-progress")
    assert code == 2
    assert err.startswith("error: tensorboard=True writes into the run's workdir, and no workdir")


# Long end-to-end runs (200 and 150 rounds): the slow tier, which also checks these configs'
# documented results (test_configs_slow: 0.950 test accuracy, 0.545 test MSE).
@pytest.mark.slow
def test_digits_fedavg_config_reaches_90_percent():
    """The acceptance bar of the default config: >= 0.90 test accuracy within 200 rounds."""
    from fedjax_sim.cli.config import load_config
    from fedjax_sim.cli.experiment import run

    result = run(load_config(f"{CONFIGS}/digits_fedavg.py"), None, progress=False)
    accuracies = [r["test_accuracy"] for r in result.history if "test_accuracy" in r]
    assert len(result.history) == 200
    assert max(accuracies) >= 0.90 and accuracies[-1] >= 0.90


@pytest.mark.slow
def test_diabetes_regression_config_beats_constant_predictor():
    from fedjax_sim.cli.config import load_config
    from fedjax_sim.cli.experiment import run

    result = run(load_config(f"{CONFIGS}/diabetes_fedsgd.py", {"rounds": "150"}), None, progress=False)
    # Targets are standardised on the training split, so predicting the mean gives test
    # MSE close to the test targets' variance (~1); a fitted model must do clearly better.
    assert result.summary["final"]["test_mse"] < 0.7
    assert result.summary["final"]["test_mse"] == pytest.approx(result.summary["final"]["test_loss"])


# The default suite runs one config per data source, model family and privacy level; the
# others differ from these only in values that test_config_validation checks up front
# (the server optimizer, a model of the same family, a privacy option), and run here and
# in full (test_configs_slow) under `pytest -m slow`.
QUICK_CONFIGS = {"digits_fedavg.py", "diabetes_fedsgd.py", "synthetic_fedavg.py", "digits_dp_sgd.py"}


@pytest.mark.parametrize("config", [
    c if c in QUICK_CONFIGS else pytest.param(c, marks=pytest.mark.slow)
    for c in sorted(f for f in os.listdir(CONFIGS)
                    if f.endswith(".py") and f not in EXTERNAL_DATA_CONFIGS)])
def test_every_shipped_config_builds_and_runs_two_rounds(config, capsys):
    code, out, err = _run(capsys, "train", "--config", f"{CONFIGS}/{config}", "--config.rounds=2",
                          "--config.eval_every=2", "--no-progress")
    assert code == 0, err
    assert "done: 2 rounds" in out
    if "dp_" in config:  # the privacy spent is part of the result
        assert re.search(r"ε=[0-9.]+ \(δ=", out), out
    if config in ("digits_fedper.py", "digits_ditto.py", "synthetic_fedper.py", "synthetic_ditto.py"):
        assert re.search(r"client_personal_accuracy_mean=[0-9.]+, client_finetuned_accuracy_mean=", out), out


def _error_line(capsys, *overrides, config="digits_fedavg.py"):
    code, out, err = _run(capsys, "train", "--config", f"{CONFIGS}/{config}", "--no-progress",
                          *overrides)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_config_values_give_one_line_errors(capsys):
    assert "unknown config key 'algorithm.batchsize'; did you mean 'algorithm.batch_size'" in \
        _error_line(capsys, "--config.algorithm.batchsize=3")
    assert "clients_per_round=500 exceeds the 100 clients" in \
        _error_line(capsys, "--config.clients_per_round=500")
    assert "algorithm.batch_size must be an integer >= 1, got 0" in \
        _error_line(capsys, "--config.algorithm.batch_size=0")
    assert "algorithm.batch_size must be an integer >= 1, got -4" in \
        _error_line(capsys, "--config.algorithm.batch_size=-4")
    assert "is not a known dataset" in _error_line(capsys, "--config.data.source=imagenet")
    assert "is not an optax optimizer" in \
        _error_line(capsys, "--config.algorithm.client_optimizer.name=sgdd")
    assert "learning_rate must be a number > 0" in \
        _error_line(capsys, "--config.algorithm.client_optimizer.learning_rate=-1")
    assert "the model outputs 5 classes but labels range over [0, 9]" in \
        _error_line(capsys, "--config.model.num_outputs=5")
    assert "unknown partitioner" in _error_line(capsys, "--config.data.partition=zipf").lower() or \
        "partition" in _error_line(capsys, "--config.data.partition=zipf")
    assert "engine.unroll" in _error_line(capsys, "--config.engine.unroll=-2")
    assert "config file" in _error_line(capsys, config="missing.py")


def test_debug_flag_shows_traceback(capsys):
    with pytest.raises(fs.UserError):
        main(["train", "--config", f"{CONFIGS}/digits_fedavg.py", "--config.rounds=0", "--debug"])


def test_python_api_bad_inputs_are_user_errors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    y = rng.integers(0, 3, 30).astype(np.int32)
    data = fs.data.FederatedData({"x": x, "y": y}, np.array([0, 10, 10, 30]), ("a", "b", "c"))
    model = fs.models.logistic_regression((4,), 3)
    alg = fs.algorithms.fedavg(optax.sgd(0.1))
    with pytest.raises(fs.UserError, match=r"1 training client\(s\) have no examples \(e.g. 'b'\)"):
        fs.simulate(model, alg, data, rounds=1, clients_per_round=2, progress=False)
    data = data.drop_empty()
    with pytest.raises(fs.UserError, match="clients_per_round=3 exceeds the 2 clients"):
        fs.simulate(model, alg, data, rounds=1, clients_per_round=3, progress=False)
    with pytest.raises(fs.UserError, match="batch_size must be a positive integer"):
        fs.simulate(model, fs.algorithms.fedavg(optax.sgd(0.1), batch_size=0), data, rounds=1,
                    clients_per_round=1, progress=False)
    with pytest.raises(fs.UserError, match="the model outputs 2 classes but labels range over"):
        fs.simulate(fs.models.logistic_regression((4,), 2), alg, data, rounds=1,
                    clients_per_round=1, progress=False)
    with pytest.raises(fs.UserError, match=r"expects inputs of shape \[5\]"):
        fs.simulate(fs.models.logistic_regression((5,), 3), alg, data, rounds=1,
                    clients_per_round=1, progress=False)
    with pytest.raises(fs.UserError, match="regression model outputs"):
        fs.simulate(model, alg, fs.data.FederatedData({"x": x, "y": x[:, :2]}, np.array([0, 30]), ("a",)),
                    task=fs.models.regression(), rounds=1, clients_per_round=1, progress=False)


def test_diverged_run_names_round_and_learning_rate():
    rng = np.random.default_rng(0)
    data = fs.data.FederatedData({"x": 100 * rng.normal(size=(40, 4)).astype(np.float32),
                                  "y": rng.normal(size=(40, 1)).astype(np.float32)},
                                 np.array([0, 20, 40]), ("a", "b"))
    with pytest.raises(fs.UserError, match=r"training diverged at round \d+ .*learning rate"):
        fs.simulate(fs.models.mlp((4,), 1, hidden=(8,)), fs.algorithms.fedavg(optax.sgd(10.0)),
                    data, task=fs.models.regression(), rounds=30, clients_per_round=2,
                    progress=False)


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "fedjax_sim.cli.main", "train", "--help"],
                         capture_output=True, text=True, check=True)
    assert "--config" in out.stdout and "--workdir" in out.stdout


def test_dp_fedavg_config_reports_epsilon_and_stops_at_the_target(tmp_path, capsys):
    workdir = tmp_path / "dp"
    code, out, err = _run(capsys, "train", "--config", f"{CONFIGS}/digits_dp_fedavg.py",
                          "--config.rounds=20", "--config.eval_every=5",
                          "--config.privacy.target_epsilon=3", "--workdir", str(workdir),
                          "--no-progress")
    assert code == 0, err
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    stopped = len(rows)
    assert 1 < stopped < 20 and f"done: {stopped} of 20 rounds" in out
    assert "another round would take ε past privacy.target_epsilon=3" in err
    eps = [r["epsilon"] for r in rows]
    assert all(b > a for a, b in zip(eps, eps[1:])) and eps[-1] <= 3
    # The independent check: dp_accounting, Poisson rate 20/100, z = 1, for that many rounds
    # (ε of the run also pays for the cohort cap's overflow, a δ slack of ~1e-12).
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(
        0.2, dp_accounting.GaussianDpEvent(1.0)), stopped)
    assert eps[-1] == pytest.approx(accountant.get_epsilon(1e-3), rel=1e-3)
    for r in rows:
        assert r["dp_clip_norm"] == 0.5 and 0 <= r["dp_clipped_fraction"] <= 1
        assert r["dp_noise_std"] == pytest.approx(1.0 * 0.5 / 20)
    assert rows[-1]["test_accuracy"] >= 0  # the last round is evaluated
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["privacy"]["epsilon"] == eps[-1] and summary["privacy"]["delta"] == 1e-3
    assert "target_epsilon" in summary["stopped"]
    config = json.loads((workdir / "config.json").read_text())
    assert config["privacy"]["level"] == "client"


def test_privacy_errors_and_warnings_on_the_command_line(capsys):
    line = _error_line(capsys, "--config.privacy.target_epsilon=0.01", config="digits_dp_fedavg.py")
    assert "privacy.target_epsilon=0.01 is already exceeded by one round" in line
    assert "config.privacy.clip_norm must be a number > 0, got 0" in \
        _error_line(capsys, "--config.privacy.clip_norm=0", config="digits_dp_fedavg.py")
    assert "config.privacy.level='client' needs config.algorithm.weighting='uniform'" in \
        _error_line(capsys, "--config.algorithm.weighting=num_examples", config="digits_dp_fedavg.py")
    # δ >= 1/N warns (then, here, the target fails before anything is compiled).
    code, out, err = _run(capsys, "train", "--config", f"{CONFIGS}/digits_dp_fedavg.py",
                          "--config.privacy.delta=0.05", "--config.privacy.target_epsilon=0.01",
                          "--no-progress")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("warning: delta = 0.05 >= 1/N = 1/100: this δ permits releasing")
    assert lines[-1].startswith("error: privacy.target_epsilon=0.01 is already exceeded")


# -- config files that do not run ------------------------------------------------------------
def _config_file(tmp_path, body: str) -> str:
    path = tmp_path / "broken.py"
    path.write_text(body)
    return str(path)


@pytest.mark.parametrize("body,expected", [
    ("import ml_collections\n\ndef get_config(:\n    pass\n",
     "has a syntax error at line 3: invalid syntax; fix that line"),
    ("import no_such_module_here\n",
     "failed to run (line 1): ModuleNotFoundError: No module named 'no_such_module_here'; fix the "
     "file (--debug shows the traceback)"),
    ("X = 1\n", "has no get_config() function; define one that returns an ml_collections.ConfigDict"),
    ("def get_config():\n    return {'rounds': 1}\n",
     ": get_config() returned a dict, not an ml_collections.ConfigDict; build the config as "
     "c = ml_collections.ConfigDict() and return c"),
    ("def get_config():\n    c = {}\n    raise ValueError('no\\ndata')\n",
     ": get_config() raised ValueError: no data (line 3); fix get_config() in that file "
     "(--debug shows the traceback)"),
])
def test_config_file_that_does_not_run_is_one_line(tmp_path, capsys, body, expected):
    path = _config_file(tmp_path, body)
    for command in (["train", "--config", path], ["data", "describe", "--config", path]):
        code, out, err = _run(capsys, *command)
        assert code == 2 and out == "", err
        assert err == f"error: config file {path!r}{'' if expected.startswith(':') else ' '}" \
                      f"{expected}\n", err
    with pytest.raises(fs.UserError):  # --debug: the traceback, with the cause chained
        main(["train", "--config", path, "--debug"])


# -- overrides of documented keys the file leaves out ----------------------------------------
def _validated(*overrides, config="digits_fedavg.py"):
    from fedjax_sim.cli.config import load_config
    from fedjax_sim.cli.validate import validate_config

    config = load_config(f"{CONFIGS}/{config}",
                         dict(o[len("--config."):].split("=", 1) for o in overrides))
    validate_config(config)
    return config


def test_overrides_create_documented_keys_the_file_leaves_out():
    config = _validated("--config.batch_norm=local", "--config.model.trainable=head",
                        "--config.engine.client_states=host", "--config.finetune.steps=5",
                        "--config.preprocess.resize=(16,16)", "--config.checkpoint.every_rounds=5",
                        "--config.data.heldout_clients=0.1", "--config.model.args.dropout=0.5")
    assert config.batch_norm == "local" and config.model.trainable == "head"
    assert config.engine.client_states == "host"
    assert config.finetune.to_dict() == {"steps": 5} and config.preprocess.resize == (16, 16)
    assert config.checkpoint.every_rounds == 5 and config.data.heldout_clients == 0.1
    assert config.model.args.dropout == 0.5
    # A section the file set to None (or leaves out) is created empty, then set.
    assert _validated("--config.checkpoint=None", "--config.checkpoint.max_to_keep=1",
                      "--config.engine=None", "--config.engine.unroll=2").engine.to_dict() == \
        {"unroll": 2}
    # A whole section from one override; an algorithm's parameter before or after its name.
    config = _validated("--config.algorithm.mu=0.1", "--config.algorithm.name=fedprox",
                        "--config.privacy={'level': 'client', 'noise_multiplier': 1.0, "
                        "'clip_norm': 1.0, 'delta': 1e-3}", "--config.algorithm.weighting=uniform")
    assert config.algorithm.mu == 0.1 and config.privacy.level == "client"
    assert config.privacy.noise_multiplier == 1.0
    # A weights path, then an option of it: the shorthand becomes a section.
    from fedjax_sim.cli.config import load_config
    config = load_config(f"{CONFIGS}/digits_fedavg.py", {"model.pretrained": "w.npz",
                                                         "model.pretrained.strict": "True"})
    assert config.model.pretrained.to_dict() == {"path": "w.npz", "strict": True}


def test_override_of_an_absent_section_says_what_else_it_needs(capsys):
    line = _error_line(capsys, "--config.privacy.noise_multiplier=1")
    assert line == (
        "error: config.privacy.level is missing; set it to 'client' (DP-FedAvg; it also needs "
        "noise_multiplier, delta), 'example' (DP-SGD in every client; it also needs clip_norm, "
        "noise_multiplier, sampling_rate, delta) or 'dp_ftrl' (DP-FTRL, matrix factorization "
        "(BandMF or tree); it also needs noise_multiplier, clip_norm, delta), e.g. "
        "--config.privacy.level=client "
        "--config.privacy.noise_multiplier=1.0 --config.privacy.clip_norm=1.0 "
        "--config.privacy.delta=1e-5")
    line = _error_line(capsys, "--config.privacy.level=example", "--config.privacy.clip_norm=1")
    assert line.startswith("error: config.privacy.noise_multiplier is missing; level='example' "
                           "needs it"), line
    line = _error_line(capsys, "--config.model.pretrained.strict=True")
    assert line.startswith("error: config.model.pretrained.path must be the path of a weights "
                           "file (.safetensors, .npz) or a saved result's directory, got None")
    assert _error_line(capsys, "--config.algorithm.mu=1") == (
        "error: unknown config key 'algorithm.mu' for algorithm 'fedavg': it is a parameter of "
        "fedprox; set config.algorithm.name to one of them or drop it; known keys in "
        "config.algorithm: batch_size, client_optimizer, local_epochs, local_steps, name, "
        "server_optimizer, weighting")


def test_undocumented_override_suggests_the_documented_key(capsys):
    line = _error_line(capsys, "--config.privcy.level=client")
    assert line.startswith("error: unknown config key 'privcy.level'; did you mean "
                           "'privacy.level'? known keys at the top level: aggregator, algorithm, ")
    line = _error_line(capsys, "--config.privacy.noise_multiplir=1")
    assert line.startswith("error: unknown config key 'privacy.noise_multiplir'; did you mean "
                           "'privacy.noise_multiplier'? known keys in config.privacy: "), line
    line = _error_line(capsys, "--config.engine.client_state=host")
    assert line.startswith("error: unknown config key 'engine.client_state'; did you mean "
                           "'engine.client_states'? known keys in config.engine: "), line
    assert _error_line(capsys, "--config.rounds.x=1") == (
        "error: cannot set a key under config.rounds: it is 200, not a section; set "
        "--config.rounds=... to a whole value instead")


# -- fedjax-sim privacy: numbers out of range ------------------------------------------------
PRIVACY_OK = {"--noise-multiplier": "1.0", "--sampling-rate": "0.1", "--rounds": "10",
              "--delta": "1e-5"}


@pytest.mark.parametrize("flag,value,expected", [
    ("--rounds", "0", "--rounds must be an integer >= 1, got 0"),
    ("--rounds", "-3", "--rounds must be an integer >= 1, got -3"),
    ("--noise-multiplier", "-1", "--noise-multiplier must be a number >= 0, got -1.0"),
    ("--noise-multiplier", "nan", "--noise-multiplier must be a number >= 0, got nan"),
    ("--sampling-rate", "0", "--sampling-rate must be a probability in (0, 1], got 0.0"),
    ("--sampling-rate", "1.5", "--sampling-rate must be a probability in (0, 1], got 1.5"),
    ("--delta", "1", "delta must be in (0, 1), typically ≪ 1/N, got 1.0"),
    ("--population", "0", "--population must be an integer >= 1, got 0"),
    ("--max-cohort-size", "-2", "--max-cohort-size must be an integer >= 1, got -2"),
])
def test_privacy_command_refuses_numbers_out_of_range(capsys, flag, value, expected):
    args = {**PRIVACY_OK, flag: value}
    code, out, err = _run(capsys, "privacy", *[a for kv in args.items() for a in kv])
    assert (code, out, err) == (2, "", f"error: {expected}\n")


def test_privacy_command_refuses_a_cohort_larger_than_the_population(capsys):
    code, out, err = _run(capsys, "privacy", "--epsilon", "0", "--clients-per-round", "5",
                          "--population", "10", "--rounds", "10", "--delta", "1e-5")
    assert (code, err) == (2, "error: --epsilon must be a number > 0, got 0.0\n")
    code, out, err = _run(capsys, "privacy", "--noise-multiplier", "1", "--clients-per-round",
                          "20", "--population", "10", "--rounds", "10", "--delta", "1e-5")
    assert (code, err) == (2, "error: --clients-per-round (20) cannot exceed --population (10): "
                              "the cohort is drawn from it\n")
