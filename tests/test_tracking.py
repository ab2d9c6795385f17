"""Tracking and plots: TensorBoard event files, the W&B and MLflow callbacks (offline),
the round-0 evaluation, and the figures comparing runs. What each tracker recorded is
read back with its own reader (TensorBoard's EventAccumulator, the W&B offline run file,
MLflow's client) and compared with metrics.jsonl."""

import glob
import json
import os
import struct
import sys
import time

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.cli.main import main
from fedjax_sim.errors import UserError
from fedjax_sim.models import logistic_regression
from fedjax_sim.privacy import ClientLevelDP

from helpers import softmax, toy_clients

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "digits_fedavg.py")
RUN = dict(rounds=8, clients_per_round=3, eval_every=4, seed=0, progress=False)


def _problem():
    x, y, offsets = toy_clients([20] * 10, features=6, classes=3, seed=0)
    data = fs.data.FederatedData({"x": x, "y": y}, offsets, tuple(f"c{i}" for i in range(10)))
    train, client_test = data.split(0.25, seed=0)
    return train, client_test, {"x": x, "y": y}


def _simulate(**kwargs):
    train, client_test, test = _problem()
    return fs.simulate(logistic_regression((6,), 3),
                       fs.algorithms.fedavg(optax.sgd(0.1), batch_size=5, weighting="uniform"),
                       train, eval_data=test, client_eval_data=client_test, **{**RUN, **kwargs})


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run 'a' (TensorBoard, round 0 and two callbacks), 'b': the same run without them,
    and a private run (round 0, TensorBoard in a directory of its own), each in its
    directory."""
    root = tmp_path_factory.mktemp("runs")
    first, second = [], []
    a = _simulate(workdir=str(root / "a"), tensorboard=True, evaluate_initial=True,
                  callback=[first.append, second.append])
    return dict(root=root, a=a, b=_simulate(workdir=str(root / "b")),
                dp=_simulate(workdir=str(root / "dp"), evaluate_initial=True,
                             tensorboard=str(root / "dp_events"),
                             privacy=ClientLevelDP(1.0, 1e-3, clip_norm=0.5)),
                callbacks=(first, second))


# --------------------------------------------------------------------------- round 0


def test_round_zero_changes_no_round_and_is_logged_everywhere(runs):
    a, plain = runs["a"], runs["b"]
    assert a.history[0]["round"] == 0 and a.history[1:] == plain.history
    assert a.summary["final"] == plain.summary["final"]
    assert set(a.history[0]) == {"round", *(k for k in plain.history[-1]
                                            if k.startswith(("test_", "client_")))}
    assert _rows(runs["root"] / "a") == json.loads(json.dumps(a.history))
    assert runs["callbacks"][0] == runs["callbacks"][1] == a.history  # both, every row, in order
    assert runs["dp"].history[0]["epsilon"] == 0.0 and runs["dp"].history[1]["epsilon"] > 0


def test_round_zero_is_the_initial_models_evaluation(runs):
    """Against numpy: the accuracy and loss on the test set of the parameters the model
    starts from (its init with the documented key, fold_in(key(seed), INIT_STREAM))."""
    _, _, test = _problem()
    params, _ = logistic_regression((6,), 3).init(
        jax.random.fold_in(jax.random.key(0), fs.simulation.INIT_STREAM))
    leaves = {np.ndim(v): np.asarray(v, np.float64) for v in jax.tree_util.tree_leaves(params)}
    p = softmax(test["x"].astype(np.float64) @ leaves[2] + leaves[1])
    row = runs["a"].history[0]
    assert row["round"] == 0
    assert row["test_accuracy"] == pytest.approx(np.mean(p.argmax(1) == test["y"]), abs=1e-6)
    assert row["test_loss"] == pytest.approx(-np.mean(np.log(p[np.arange(len(p)), test["y"]])),
                                             rel=1e-5)


def test_config_key_evaluate_initial(tmp_path):
    from fedjax_sim.cli.config import load_config
    from fedjax_sim.cli.validate import validate_config

    config = load_config(CONFIG, {"evaluate_initial": "True"})
    validate_config(config)
    assert config.evaluate_initial is True
    with pytest.raises(UserError, match=r"config.evaluate_initial must be True or False, got 3"):
        validate_config(load_config(CONFIG, {"evaluate_initial": "3"}))
    train, _, _ = _problem()
    with pytest.raises(UserError, match="nothing to evaluate it on; pass eval_data"):
        fs.simulate(logistic_regression((6,), 3), fs.algorithms.fedavg(optax.sgd(0.1)), train,
                    evaluate_initial=True, **RUN)


# --------------------------------------------------------------------------- TensorBoard


def _events(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _assert_scalars_equal_rows(events, rows):
    numeric = {k for r in rows for k, v in r.items() if k != "round" and isinstance(v, (int, float))}
    assert set(events.Tags()["scalars"]) == numeric
    for tag in numeric:
        expected = [(r["round"], r[tag]) for r in rows if r.get(tag) is not None]
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in logged] == [s for s, _ in expected], tag  # each round once
        np.testing.assert_array_equal(np.float32([v for _, v in logged]),
                                      np.float32([v for _, v in expected]), err_msg=tag)


def test_tensorboard_scalars_equal_metrics_jsonl(runs):
    a_dir = runs["root"] / "a"
    events = _events(a_dir / "tensorboard")
    rows = _rows(a_dir)
    assert rows[0]["round"] == 0 and len(rows) == 9
    _assert_scalars_equal_rows(events, rows)
    summary = events.Tensors("summary/text_summary")
    assert [t.step for t in summary] == [8]
    text = summary[0].tensor_proto.string_val[0].decode()
    assert f"| test_accuracy | {runs['a'].summary['final']['test_accuracy']:.6g} |" in text


def test_tensorboard_hparams_hold_the_config_and_final_metrics(runs):
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = _events(runs["root"] / "a" / "tensorboard" / "hparams")
    content = events.PluginTagToContent("hparams")
    start = next(plugin_data_pb2.HParamsPluginData.FromString(c).session_start_info
                 for c in content.values()
                 if plugin_data_pb2.HParamsPluginData.FromString(c).HasField("session_start_info"))
    assert start.hparams["seed"].number_value == 0
    assert start.hparams["clients_per_round"].number_value == 3
    final = {e: events.Scalars(e)[0].value for e in events.Tags()["scalars"]}
    assert final["final/test_accuracy"] == pytest.approx(runs["a"].summary["final"]["test_accuracy"])


def test_a_resumed_run_keeps_round_zero_and_writes_each_round_once_to_tensorboard(runs, tmp_path):
    """Rounds 0-6 are logged, then the run stops; resuming from the checkpoint of round 4
    redoes rounds 5-6: metrics.jsonl and the history are those of run 'a' (which went
    through), and the event files hold each round once, with metrics.jsonl's values."""
    def stop_at_6(row):
        if row["round"] == 6:
            raise KeyboardInterrupt

    every4 = fs.CheckpointOptions(every_rounds=4, every_seconds=None)
    with pytest.raises(KeyboardInterrupt):
        _simulate(workdir=str(tmp_path), tensorboard=True, evaluate_initial=True,
                  callback=stop_at_6, checkpoint=every4)
    assert [e.step for e in _events(tmp_path / "tensorboard").Scalars("train_loss")] == list(range(1, 7))
    resumed = _simulate(workdir=str(tmp_path), tensorboard=True, evaluate_initial=True,
                        checkpoint=every4)
    assert resumed.summary["resumed_from_round"] == 4
    assert resumed.history == runs["a"].history
    assert _rows(tmp_path) == _rows(runs["root"] / "a")
    assert len(glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))) == 3
    _assert_scalars_equal_rows(_events(tmp_path / "tensorboard"), _rows(tmp_path))


def test_tensorboard_to_a_directory_and_its_errors(runs, tmp_path, monkeypatch):
    _assert_scalars_equal_rows(_events(runs["root"] / "dp_events"), _rows(runs["root"] / "dp"))
    with pytest.raises(UserError, match="no workdir was given; pass workdir=DIR"):
        _simulate(tensorboard=True)
    with pytest.raises(UserError, match="tensorboard must be True, False or a directory path"):
        _simulate(tensorboard=3)
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed
    with pytest.raises(UserError, match=r"needs tensorboardX.*pip install 'fedjax_sim\[tracking\]'"):
        _simulate(workdir=str(tmp_path / "w"), tensorboard=True)


# --------------------------------------------------------------------------- W&B, MLflow


def _wandb_records(path):
    """The records of a W&B offline run file: LevelDB's log format (32 KiB blocks of
    chunks, each with a 7-byte header: CRC, length, type) after a 7-byte W&B header."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, records, pending = open(path, "rb").read(), 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # the end, or a chunk still being written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def test_wandb_callback_logs_every_row_offline(runs, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = wandb.init(project="fedjax-sim-test", dir=str(tmp_path), mode="offline")
    log = fs.tracking.wandb_callback(run, prefix="a/")
    for row in runs["a"].history:
        log(row)
    run.finish()
    expected = {r["round"]: {f"a/{k}": v for k, v in r.items() if k != "round"}
                for r in runs["a"].history}
    # W&B's service process writes the file; on a loaded machine it may still be writing
    # when finish() returns, so read until every row is there (or a minute has passed).
    deadline = time.monotonic() + 60
    while True:
        logged = {}
        for path in glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb")):
            for record in _wandb_records(path):
                if record.WhichOneof("record_type") == "history":
                    items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                             for i in record.history.item}
                    logged[record.history.step.num] = {k: v for k, v in items.items()
                                                       if not k.startswith("_")}
        if len(logged) >= len(expected) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert sorted(logged) == sorted(expected) == list(range(9))
    for step, values in expected.items():
        assert set(logged[step]) == set(values)
        for key, value in values.items():
            assert np.float32(logged[step][key]) == np.float32(value), (step, key)


def test_mlflow_callback_logs_every_row_to_a_local_store(runs, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    with pytest.raises(UserError, match="no MLflow run is active"):
        fs.tracking.mlflow_callback()
    with mlflow.start_run() as active:
        log = fs.tracking.mlflow_callback()
        for row in runs["dp"].history:
            log(row)
    client = mlflow.tracking.MlflowClient()
    logged = client.get_run(active.info.run_id).data.metrics
    rows = runs["dp"].history
    assert set(logged) == {k for r in rows for k in r if k != "round"}
    for key in logged:
        history = sorted((m.step, m.value) for m in client.get_metric_history(active.info.run_id, key))
        expected = [(r["round"], float(r[key])) for r in rows if key in r]
        assert [s for s, _ in history] == [s for s, _ in expected], key
        np.testing.assert_allclose([v for _, v in history], [v for _, v in expected], rtol=0, atol=0)


def test_missing_tracker_packages_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(UserError, match=r"needs wandb.*pip install 'fedjax_sim\[wandb\]'"):
        fs.tracking.wandb_callback()
    with pytest.raises(UserError, match=r"needs MLflow.*pip install 'fedjax_sim\[mlflow\]'"):
        fs.tracking.mlflow_callback("some-run")


# --------------------------------------------------------------------------- plots


def _lines(fig):
    ax = fig.axes[0]
    return ax, [(line.get_label(), line.get_xdata(), line.get_ydata()) for line in ax.get_lines()]


def test_plot_draws_each_runs_metric_by_round(runs):
    root = runs["root"]
    fig = fs.plot([root / "a", root / "b"], metric="test_accuracy")
    ax, lines = _lines(fig)
    assert ax.get_xlabel() == "round" and ax.get_ylabel() == "test accuracy (fraction)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b"]
    for (label, xs, ys), name in zip(lines, ["a", "b"]):
        rows = [r for r in _rows(root / name) if "test_accuracy" in r]
        assert label == name
        np.testing.assert_array_equal(xs, [r["round"] for r in rows])
        np.testing.assert_array_equal(ys, [r["test_accuracy"] for r in rows])
    assert list(lines[0][1]) == [0, 4, 8] and list(lines[1][1]) == [4, 8]


def test_plot_figure_shows_in_a_notebook(runs):
    """A cell ending with fs.plot(...) shows the figure: IPython's formatter finds a PNG
    (the Figure is not registered with pyplot, so it needs its own _repr_png_)."""
    formatters = pytest.importorskip("IPython.core.formatters")
    fig = fs.plot(runs["root"] / "a", metric="test_accuracy")
    data, _ = formatters.DisplayFormatter().format(fig)
    png = data["image/png"]
    png = png if isinstance(png, bytes) else __import__("base64").b64decode(png)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_plot_by_uplink_bytes_and_training_time(runs):
    root = runs["root"]
    fig = fs.plot({"A": runs["a"], "B": root / "b"}, metric="train_loss", x="uplink_bytes")
    ax, lines = _lines(fig)
    assert ax.get_xlabel() == "uplink traffic, cumulative (kB)" and ax.get_ylabel() == "train loss"
    sent = np.cumsum([r.get("uplink_bytes", 0) for r in _rows(root / "b")]) / 1e3
    np.testing.assert_allclose(lines[1][1], sent, rtol=1e-12)
    assert lines[0][0] == "A" and lines[0][1][0] == lines[0][1][1] / 2  # equal rounds
    fig = fs.plot([runs["a"], runs["b"]], x="seconds")
    ax, lines = _lines(fig)
    assert ax.get_xlabel().startswith("training time (s")
    assert [label for label, _, _ in lines] == ["run 1", "run 2"]
    per_round = json.loads((root / "b" / "summary.json").read_text())["seconds_per_round"]
    np.testing.assert_allclose(lines[1][1], [4 * per_round, 8 * per_round])


def test_plot_epsilon_of_a_private_run(runs):
    ax, [(label, xs, ys)] = _lines(fs.plot(runs["root"] / "dp", metric="epsilon"))
    rows = _rows(runs["root"] / "dp")
    assert ax.get_ylabel() == "privacy loss ε (δ = 0.001)"
    np.testing.assert_array_equal(xs, range(9))
    np.testing.assert_array_equal(ys, [r["epsilon"] for r in rows])
    assert all(np.diff(ys) > 0)
    with pytest.raises(UserError, match="run 'b' logged no epsilon: it is not a private run"):
        fs.plot([runs["root"] / "dp", runs["root"] / "b"], metric="epsilon")


def test_plot_clients_draws_an_ecdf_per_run(runs):
    root = runs["root"]
    fig = fs.plot([root / "a", runs["b"]], metric="client_test_accuracy", labels=["a", "b"])
    ax, lines = _lines(fig)
    assert ax.get_xlabel() == "test accuracy (fraction), per client"
    assert ax.get_ylabel() == "fraction of clients ≤ x"
    clients = json.loads((root / "a" / "client_metrics.json").read_text())["test"]
    values = np.sort(np.asarray(clients["accuracy"])[np.asarray(clients["count"]) > 0])
    label, xs, ys = lines[0]
    np.testing.assert_allclose(xs[1:], values)
    np.testing.assert_allclose(ys[1:], np.arange(1, len(values) + 1) / len(values))
    assert label.startswith(f"a (mean {values.mean():.3g}, p10 {np.percentile(values, 10):.3g}, "
                            f"{len(values)} clients")
    with pytest.raises(UserError, match="not by seconds"):
        fs.plot(root / "a", metric="client_test_accuracy", x="seconds")


def test_plot_errors(runs, tmp_path):
    with pytest.raises(UserError, match="is not a run directory"):
        fs.plot(tmp_path)
    with pytest.raises(UserError, match="logged no test_f1; it logged: .*test_accuracy"):
        fs.plot(runs["a"], metric="test_f1")
    with pytest.raises(UserError, match="x must be one of round, seconds, uplink_bytes"):
        fs.plot(runs["a"], x="minutes")
    with pytest.raises(UserError, match="directory .* does not exist"):
        fs.plot(runs["a"], out=str(tmp_path / "no" / "fig.png"))


def test_plot_without_matplotlib_names_the_extra(runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UserError, match=r"needs matplotlib.*pip install 'fedjax_sim\[plot\]'"):
        fs.plot(runs["a"])


def test_cli_plot_writes_a_png(runs, tmp_path, capsys):
    from PIL import Image

    root, out = runs["root"], tmp_path / "fig.png"
    assert main(["plot", str(root / "a"), str(root / "b"), "--metric", "test_loss",
                 "--x", "uplink_bytes", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 400
    assert main(["plot", str(root / "a"), "--metric", "epsilon", "--out", str(out)]) == 2
    assert "error: run 'a' logged no epsilon" in capsys.readouterr().err
