"""What a user sees of a run: Ctrl-C (Python API and CLI), metrics.jsonl after divergence,
the input checks, resuming with a changed optimizer, full-batch local steps,
initial_params, the key types of a loaded Result, and the console's resume note."""

import functools
import json
import os
import re
import shutil
import signal
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.engine.batching import bits_needed, client_batches, make_schedule
from fedjax_sim.errors import Interrupted
from fedjax_sim.simulation import rundir
from fedjax_sim.simulation.setup import INIT_STREAM

from helpers import toy_clients

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "digits_fedavg.py")
SIZES = (12, 20, 9, 15, 11, 17)
IDS = tuple("abcdef")
# One compiled call per round, so a SIGINT sent at round k is seen right after round k;
# a rolled local loop compiles faster.
ENGINE = fs.EngineOptions(rounds_per_call=1, unroll=1)


@pytest.fixture(scope="module")
def toy():
    """(6 training clients, a pooled test set) of a 3-class problem on 6 features."""
    x, y, offsets = toy_clients(SIZES, features=6, classes=3)
    return fs.data.FederatedData({"x": x, "y": y}, offsets, IDS), {"x": x[:30], "y": y[:30]}


@functools.cache
def _model():
    """One model object for every run, so its compiled init is reused."""
    return fs.models.mlp((6,), 3, hidden=(8,))


def _run(toy, *, lr=0.1, rounds=6, progress=False, **kwargs):
    clients, test = toy
    return fs.simulate(_model(), fs.algorithms.fedavg(optax.sgd(lr), batch_size=4), clients,
                       rounds=rounds, clients_per_round=3, eval_every=3, seed=0, engine=ENGINE,
                       progress=progress, **{"eval_data": test, **kwargs})


@pytest.fixture(scope="module")
def baseline(toy):
    """The uninterrupted 6-round run."""
    return _run(toy)


@pytest.fixture(scope="module")
def interrupted(toy, tmp_path_factory):
    """The baseline's run with a workdir, stopped by a SIGINT sent at round 3: (workdir, the
    error it raised, the SIGINT handler before it, the handler after it). Tests copy the
    workdir before resuming it."""
    workdir = tmp_path_factory.mktemp("interrupted")

    def sigint_at_round_3(row):
        if row["round"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as info:
        _run(toy, workdir=str(workdir), callback=sigint_at_round_3)
    return workdir, info.value, before, signal.getsignal(signal.SIGINT)


def _copy(workdir, to):
    shutil.copytree(workdir, to)
    return to


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _assert_identical(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def _user_warnings(caught):
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _strict_json(line):
    def refuse(name):
        raise AssertionError(f"{name} in metrics.jsonl: {line!r}")
    return json.loads(line, parse_constant=refuse)


# --- Ctrl-C ---------------------------------------------------------------------------

def test_ctrl_c_checkpoints_says_how_to_resume_and_the_rerun_ends_bitwise_as_uninterrupted(
        toy, baseline, interrupted, tmp_path, capsys):
    stopped, error, handler_before, handler_after = interrupted
    assert isinstance(error, Interrupted) and isinstance(error, KeyboardInterrupt)
    assert str(error) == (
        f"stopped after round 3; checkpoint saved in {stopped}/checkpoints; run the same "
        f"command (same workdir {stopped}) to resume from round 3")
    assert _steps(stopped) == [3]
    rows = [_strict_json(line) for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert rows == baseline.history[:3]
    assert not (stopped / "summary.json").exists()
    assert handler_after is handler_before  # Ctrl-C is deferred only while the run trains

    workdir = _copy(stopped, tmp_path / "run")
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _run(toy, workdir=str(workdir), progress=True)
    assert _user_warnings(caught) == []  # the same run: no config change to report
    assert f"resuming from round 3 (checkpoint in {workdir}/checkpoints)" in capsys.readouterr().out
    assert resumed.summary["resumed_from_round"] == 3
    assert resumed.history == baseline.history
    _assert_identical(resumed.params, baseline.params)
    _assert_identical(resumed.server_state, baseline.server_state)


def test_cli_ctrl_c_exits_130_with_one_line_and_the_rerun_says_where_it_resumed(
        tmp_path, capsys, monkeypatch):
    from fedjax_sim.cli.main import main

    args = ["train", "--config", CONFIG, "--workdir", str(tmp_path), "--no-progress",
            "--config.rounds=6", "--config.engine.rounds_per_call=1", "--config.engine.unroll=1",
            "--config.data.num_clients=20", "--config.clients_per_round=4",
            "--config.data.client_test_fraction=0.0", "--config.model.args.hidden=[16]"]
    log = rundir.MetricsLog.log

    def log_then_sigint(self, rows):
        log(self, rows)
        if any(row["round"] == 3 for row in rows):
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(rundir.MetricsLog, "log", log_then_sigint)
    assert main(args) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    err = captured.err.strip().splitlines()
    assert err == [f"interrupted: stopped after round 3; checkpoint saved in {tmp_path}/checkpoints; "
                   f"run the same command (same workdir {tmp_path}) to resume from round 3"]
    assert _steps(tmp_path) == [3]

    monkeypatch.setattr(rundir.MetricsLog, "log", log)
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    done = [line for line in out if line.startswith("done: ")]
    assert len(done) == 1 and done[0].startswith("done: 6 rounds (resumed from round 3), "), out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from_round"] == 3 and summary["rounds"] == 6


# --- metrics.jsonl after divergence ---------------------------------------------------

def test_a_diverged_run_leaves_strict_json_with_null_for_the_non_finite_loss(tmp_path):
    x, _, offsets = toy_clients(SIZES, features=6)
    # regression on large inputs with a large rate: the loss grows to inf within a few rounds
    data = fs.data.FederatedData({"x": 100 * x, "y": 3 * x[:, :1]}, offsets, IDS)
    with pytest.raises(fs.UserError) as info:
        fs.simulate(fs.models.logistic_regression((6,), 1),
                    fs.algorithms.fedavg(optax.sgd(0.02), batch_size=4), data,
                    task=fs.models.regression(), rounds=30, clients_per_round=3, engine=ENGINE,
                    workdir=str(tmp_path), progress=False)
    message = str(info.value)
    found = re.fullmatch(r"training diverged at round (\d+) \(train_loss is (inf|nan)\); lower "
                         r"the client or server learning rate(; the last good checkpoint .*)?",
                         message)
    assert found, message
    bad_round = int(found.group(1))
    assert bad_round >= 2  # finite rows come first
    rows = [_strict_json(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == list(range(1, bad_round + 1))
    assert rows[-1]["train_loss"] is None and rows[-1]["train_mse"] is None
    assert all(isinstance(row["train_loss"], float) for row in rows[:-1])


# --- input checks ---------------------------------------------------------------------

_FEDERATED = ("a FederatedData (e.g. fs.data.partition(arrays, labels, 'iid', num_clients, "
              "seed=0) or FederatedData.from_client_column(...))")


def _bad_inputs(case, clients, test):
    """simulate() keyword arguments with one mistake."""
    x, y = np.array(clients.features["x"]), np.array(clients.features["y"])
    if case == "nan_training_features":
        x[13, 2] = np.nan  # the second example of client 'b'
        return {"train_data": fs.data.FederatedData({"x": x, "y": y}, clients.offsets, IDS)}
    if case == "nan_eval_data":
        tx = np.array(test["x"])
        tx[4, 0] = np.inf
        return {"eval_data": {"x": tx, "y": test["y"]}}
    if case == "eval_labels_out_of_range":
        return {"eval_data": {"x": test["x"], "y": test["y"] + 3}}
    if case == "eval_data_without_labels":
        return {"eval_data": {"x": test["x"]}}
    if case == "dict_as_training_data":
        return {"train_data": {"x": x, "y": y}}
    if case == "negative_training_labels":
        return {"train_data": fs.data.FederatedData({"x": x, "y": y - 1}, clients.offsets, IDS)}
    if case == "client_eval_data_not_federated":
        return {"client_eval_data": dict(test)}
    raise ValueError(case)


# What each mistake of `_bad_inputs` is told ({count}: the number of negative labels).
EXPECTED = {
    "nan_training_features":
        "training data's 'x' holds NaN or Inf in 1 example(s), first at example 13 (client "
        "'b'); clean or drop those examples before training",
    "nan_eval_data":
        "eval_data's 'x' holds NaN or Inf in 1 example(s), first at example 4; clean or drop "
        "those examples before training",
    "eval_labels_out_of_range":
        "eval_data: the model outputs 3 classes but labels range over [3, 5]; build the model "
        "with at least 6 outputs (config: model.num_outputs)",
    "eval_data_without_labels":
        "eval_data has no feature 'y' (it has ['x']); name the features 'x' and 'y' or set "
        "input_key / the task's label_key",
    "dict_as_training_data": f"train_data must be {_FEDERATED}, got dict",
    "negative_training_labels":
        "labels must be class indices 0..num_classes-1, but {count} label(s) are negative (the "
        "smallest is -1); map the labels to 0..K-1 first (e.g. numpy.unique(y, "
        "return_inverse=True)[1])",
    "client_eval_data_not_federated":
        f"client_eval_data must be {_FEDERATED} of the clients' test splits (e.g. from "
        f"clients.split(0.2, seed=0)), got dict",
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_a_bad_input_is_one_line_naming_the_fix_before_anything_runs(toy, case):
    clients, test = toy
    arguments = {"train_data": clients, "eval_data": test, **_bad_inputs(case, clients, test)}
    expected = EXPECTED[case].format(count=int((np.asarray(clients.features["y"]) == 0).sum()))
    with pytest.raises(fs.UserError) as info:
        fs.simulate(_model(), fs.algorithms.fedavg(optax.sgd(0.1), batch_size=4),
                    arguments.pop("train_data"), rounds=2, clients_per_round=3, engine=ENGINE,
                    progress=False, **arguments)
    assert str(info.value) == expected
    assert "\n" not in str(info.value)
    assert "learning rate" not in str(info.value)  # bad data is not a divergence
    assert "build the model" not in str(info.value) or case == "eval_labels_out_of_range"


# --- resuming with a changed optimizer ------------------------------------------------

def test_resume_refuses_a_changed_optimizer_unless_allowed(toy, baseline, interrupted, tmp_path):
    first = _copy(interrupted[0], tmp_path / "a")
    second = _copy(interrupted[0], tmp_path / "b")
    with pytest.raises(fs.UserError) as info:
        _run(toy, lr=0.05, workdir=str(first))
    message = str(info.value)
    assert "\n" not in message
    # sgd(0.1) -> sgd(0.05): the first update of the probe gradient [0.5, -0.25, 1, 2]
    assert message.startswith(f"the run in {first}/checkpoints was started with a different "
                              f"config (algorithm.client_optimizer.first_update: "
                              f"[-0.05, 0.025, -0.1, -0.2] -> [-0.025, 0.0125, -0.05, -0.1]")
    assert message.endswith("); rerun with the same config, pass --allow-config-change "
                            "(allow_config_change=True) to resume anyway, or use a fresh --workdir")
    assert "server_optimizer" not in message  # only what changed is named
    assert _steps(first) == [3]  # nothing was run or saved

    # the same optimizer (a new optax.sgd(0.1) object) passes the same check without a word
    # (with rounds=3 the run is complete; the Ctrl-C test resumes one that trains on)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        same = _run(toy, rounds=3, workdir=str(first))
    assert _user_warnings(caught) == [] and same.history == baseline.history[:3]

    with pytest.warns(UserWarning, match=rf"^resuming {re.escape(str(second))}/checkpoints with "
                                         rf"a changed config: algorithm\.client_optimizer\.first_update: "):
        changed = _run(toy, lr=0.05, rounds=4, workdir=str(second), allow_config_change=True)
    assert changed.summary["resumed_from_round"] == 3
    assert [row["round"] for row in changed.history] == [1, 2, 3, 4]
    # rounds 1-3 are the checkpoint's (lr 0.1); round 4 trained at the new rate
    assert changed.history[:3] == baseline.history[:3]
    assert changed.history[3]["train_loss"] != baseline.history[3]["train_loss"]


# --- full-batch local steps -----------------------------------------------------------

def test_local_steps_with_full_batches_take_each_clients_own_examples_every_step():
    largest = 10
    schedule = make_schedule(largest, batch_size=None, local_epochs=None, local_steps=3)
    assert schedule.full_batch and schedule.batch_size == largest and schedule.num_steps == 3
    size = bits_needed(schedule, largest)
    draws = [jnp.zeros(size, jnp.uint32), jnp.full(size, 0xFFFFFFFF, jnp.uint32),
             *(jax.random.bits(jax.random.key(seed), (size,), jnp.uint32) for seed in range(3))]
    for n in (1, 4, 9, largest):
        real = np.arange(largest) < n
        for bits in draws:
            idx, mask = map(np.asarray, client_batches(schedule, bits, jnp.int32(n), largest))
            assert idx.shape == mask.shape == (3, largest)
            np.testing.assert_array_equal(mask, np.broadcast_to(real, (3, largest)))
            np.testing.assert_array_equal(idx[:, :n], np.broadcast_to(np.arange(n), (3, n)))
            assert ((idx >= 0) & (idx < n)).all()  # padding slots gather a real row, masked


# --- initial_params -------------------------------------------------------------------

def test_initial_params_are_where_the_run_starts_and_a_mismatch_is_one_line(toy):
    clients, _ = toy
    model = _model()
    given = model.init(jax.random.key(7))[0]
    own = model.init(jax.random.fold_in(jax.random.key(0), INIT_STREAM))[0]
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree_util.tree_leaves(given), jax.tree_util.tree_leaves(own)))
    before = jax.tree_util.tree_map(np.array, given)
    result = fs.simulate(model, fs.algorithms.fedavg(optax.sgd(0.0), batch_size=4), clients,
                         rounds=2, clients_per_round=3, engine=ENGINE, progress=False,
                         initial_params=given)
    _assert_identical(result.params, before)  # client rate 0: nothing moved
    _assert_identical(given, before)  # the caller's arrays are intact (not donated)

    def start(initial_params):
        with pytest.raises(fs.UserError) as info:
            fs.simulate(model, fs.algorithms.fedavg(optax.sgd(0.1), batch_size=4), clients,
                        rounds=2, clients_per_round=3, engine=ENGINE, progress=False,
                        initial_params=initial_params)
        assert "\n" not in str(info.value)
        return str(info.value)

    deeper = {**given, "hidden": {0: given["hidden"][0], 1: given["hidden"][0]}}
    assert start(deeper) == (
        f"initial_params do not match model {model.name}'s parameter tree ('hidden/1/bias' "
        f"where the model has 'out/bias'); pass parameters of the same model, e.g. an earlier "
        f"result.params")
    narrower = jax.tree_util.tree_map(lambda x: x[..., :5], given)  # the hidden layer cut to 5 units
    assert start(narrower) == (
        f"initial_params['hidden'][0]['bias'] has shape [5] but model {model.name} needs [8]; "
        f"pass parameters of the same model")


# --- Result.load ----------------------------------------------------------------------

def test_a_loaded_result_has_the_saved_trees_key_types(baseline, tmp_path):
    baseline.save(str(tmp_path / "mlp"))
    loaded = fs.Result.load(str(tmp_path / "mlp"))
    assert 0 in loaded.params["hidden"]  # a layer list's int keys stay ints
    _assert_identical(loaded.params, baseline.params)
    _assert_identical(loaded.model_state, jax.tree_util.tree_map(
        lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
        baseline.model_state))

    # a with_trainable model: its frozen layers sit in the model state, under int keys too
    model = fs.models.mlp((6,), 3, hidden=(8, 8))
    params, state = model.init(jax.random.key(1))
    frozen = fs.models.with_trainable(model, "head", params=params, state=state)
    head, frozen_state = frozen.init(jax.random.key(2))
    fs.Result(head, frozen_state, {"params": head}, [{"round": 1}], {"rounds": 1}).save(
        str(tmp_path / "head"))
    loaded = fs.Result.load(str(tmp_path / "head"))
    assert jax.tree_util.tree_structure(loaded.params) == jax.tree_util.tree_structure(head)
    assert (jax.tree_util.tree_structure(loaded.model_state)
            == jax.tree_util.tree_structure(frozen_state))
    _assert_identical(loaded.model_state["frozen"], frozen_state["frozen"])
    # load_pretrained still reads the directory: frozen layers back as the model's parameters
    restored, _, report = fs.models.load_pretrained(*model.init(jax.random.key(3)),
                                                    str(tmp_path / "head"), strict=True)
    assert report.format == "orbax"
    _assert_identical(restored, params)

    # a result saved before key types were recorded loads as it always did (string keys)
    meta_path = tmp_path / "mlp" / "result.json"
    meta = json.loads(meta_path.read_text())
    del meta["structure"]
    meta_path.write_text(json.dumps(meta))
    old = fs.Result.load(str(tmp_path / "mlp"))
    assert set(old.params["hidden"]) == {"0"}
    for u, v in zip(jax.tree_util.tree_leaves(old.params),
                    jax.tree_util.tree_leaves(baseline.params)):
        np.testing.assert_array_equal(u, np.asarray(v))
