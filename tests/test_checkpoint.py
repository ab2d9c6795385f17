"""Checkpoints, resume, divergence and saved results: a run that dies loses nothing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest

import fedjax_sim as fs
from fedjax_sim.simulation.checkpoint import CheckpointOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "configs")


def _cli(workdir, *extra):
    return [sys.executable, "-m", "fedjax_sim", "train", "--config",
            f"{CONFIGS}/digits_fedavg.py", "--workdir", str(workdir), "--no-progress",
            "--config.rounds=60", "--config.eval_every=10", "--config.checkpoint.every_rounds=2",
            *extra]


def _steps(workdir):
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(d) for d in os.listdir(path) if d.isdigit())


@pytest.mark.slow  # a minute of separate processes; resuming is checked in the default suite too
def test_sigkill_at_a_random_round_then_resume_equals_uninterrupted_run(tmp_path):
    """The acceptance test: SIGKILL mid-run (possibly mid-save), re-run the same command,
    and the final parameters and metrics.jsonl are bitwise those of an uninterrupted run."""
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    kill_after, delay = int(rng.integers(4, 44)), float(rng.uniform(0, 0.03))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}

    full = tmp_path / "full"
    subprocess.run(_cli(full), check=True, capture_output=True, env=env, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if _steps(killed) and _steps(killed)[-1] >= kill_after:
            break
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    context = f"seed {seed}: killed after checkpoint >= {kill_after} (+{delay * 1e3:.0f} ms)"
    assert proc.returncode == -signal.SIGKILL, context
    assert not (killed / "summary.json").exists(), f"the run finished before the kill; {context}"
    resumed_from = _steps(killed)[-1] if _steps(killed) else 0

    out = subprocess.run(_cli(killed), check=True, capture_output=True, text=True, env=env, timeout=600)
    assert "done: 60 rounds" in out.stdout, (out.stdout, out.stderr)
    assert (full / "metrics.jsonl").read_bytes() == (killed / "metrics.jsonl").read_bytes(), context
    a, b = np.load(full / "params.npz"), np.load(killed / "params.npz")
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name], err_msg=f"{name}; {context}")
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from_round"] >= resumed_from - 2, context  # a save may have been cut
    assert len(_steps(killed)) <= 3  # max_to_keep


def _problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
    data = fs.data.FederatedData({"x": x, "y": y}, np.arange(0, 201, 20), tuple("abcdefghij"))
    return data, {"x": x, "y": y}


def _simulate(workdir, rounds=24, callback=None, lr=0.1, **kwargs):
    data, test = _problem()
    options = dict(every_rounds=4, every_seconds=None, max_to_keep=3)
    options.update(kwargs.pop("checkpoint", {}))
    return fs.simulate(fs.models.mlp((6,), 3, hidden=(8,)),
                       fs.algorithms.fedavg(optax.sgd(lr), batch_size=4), data,
                       rounds=rounds, clients_per_round=3, eval_every=5, seed=0,
                       eval_data=test, workdir=str(workdir), progress=False,
                       checkpoint=CheckpointOptions(**options), callback=callback, **kwargs)


def _interrupt_at(round_):
    def callback(row):
        if row["round"] == round_:
            raise KeyboardInterrupt
    return callback


def _assert_same_params(a, b):
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_python_api_resumes_bitwise_and_a_finished_run_is_not_redone(tmp_path):
    full = _simulate(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        _simulate(tmp_path / "cut", callback=_interrupt_at(15))
    assert _steps(tmp_path / "cut") == [4, 8, 12]
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 15
    resumed = _simulate(tmp_path / "cut")
    assert resumed.summary["resumed_from_round"] == 12
    assert [r["round"] for r in resumed.history] == list(range(1, 25))
    assert resumed.history == full.history
    assert (tmp_path / "full" / "metrics.jsonl").read_bytes() == (tmp_path / "cut" / "metrics.jsonl").read_bytes()
    _assert_same_params(full.server_state, resumed.server_state)
    again = _simulate(tmp_path / "cut")  # already complete: nothing is recomputed
    assert again.summary == json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert again.summary["seconds_per_round"] == resumed.summary["seconds_per_round"]  # kept
    assert again.history == full.history
    _assert_same_params(full.params, again.params)
    # extending a finished run (rounds may change) equals running the longer run at once
    longer = _simulate(tmp_path / "cut", rounds=30)
    straight = _simulate(tmp_path / "longer", rounds=30)
    _assert_same_params(longer.params, straight.params)
    # the log holds the evaluation that ended the shorter run (round 24) as well
    assert [r["round"] for r in longer.history] == list(range(1, 31))


def test_changed_config_is_refused_naming_the_keys_unless_allowed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _simulate(tmp_path, callback=_interrupt_at(10), config={"lr": 0.1, "mu": 0})
    with pytest.raises(fs.UserError, match=r"different config \(lr: 0\.1 -> 0\.2\).*--allow-config-change"):
        _simulate(tmp_path, config={"lr": 0.2, "mu": 0})
    # without config=, the run is described from the arguments (here the algorithm's fields)
    with pytest.raises(KeyboardInterrupt):
        _simulate(tmp_path / "b", callback=_interrupt_at(10))
    with pytest.raises(fs.UserError, match=r"algorithm\.batch_size: 4 -> 5"):
        data, test = _problem()
        fs.simulate(fs.models.mlp((6,), 3, hidden=(8,)), fs.algorithms.fedavg(optax.sgd(0.1), batch_size=5),
                    data, rounds=24, clients_per_round=3, eval_every=5, seed=0, eval_data=test,
                    workdir=str(tmp_path / "b"), progress=False)
    with pytest.warns(UserWarning, match="changed config"):
        result = _simulate(tmp_path, config={"lr": 0.2, "mu": 0}, lr=0.2, allow_config_change=True)
    assert result.summary["resumed_from_round"] == 8
    with pytest.raises(fs.UserError, match="past rounds=5"):
        _simulate(tmp_path, rounds=5, config={"lr": 0.2, "mu": 0})


def test_incompatible_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _simulate(tmp_path, callback=_interrupt_at(6), config={"x": 1})
    data, test = _problem()
    with pytest.raises(fs.UserError, match=r"different model or algorithm state \(sim/server/params/hidden/0/bias is \[8\] float32 there and \[16\] float32 here\)"):
        fs.simulate(fs.models.mlp((6,), 3, hidden=(16,)), fs.algorithms.fedavg(optax.sgd(0.1), batch_size=4),
                    data, rounds=24, clients_per_round=3, eval_every=5, seed=0, workdir=str(tmp_path),
                    progress=False, config={"x": 1})
    with pytest.raises(fs.UserError, match="another seed"):
        fs.simulate(fs.models.mlp((6,), 3, hidden=(8,)), fs.algorithms.fedavg(optax.sgd(0.1), batch_size=4),
                    data, rounds=24, clients_per_round=3, eval_every=5, seed=1, workdir=str(tmp_path),
                    progress=False, config={"x": 1}, checkpoint=CheckpointOptions(every_rounds=4))


def _damage(workdir, step, how):
    root = os.path.join(workdir, "checkpoints", str(step))
    # the array data: the largest file of the state's data directory
    data_dir = os.path.join(root, "state", "d")
    target = max((os.path.join(data_dir, f) for f in os.listdir(data_dir)), key=os.path.getsize)
    data = bytearray(open(target, "rb").read())
    if how == "truncate":
        data = data[:len(data) // 2]
    else:  # flip bits in the middle of the file
        for i in range(len(data) // 2, len(data) // 2 + 8):
            data[i] ^= 0xFF
    open(target, "wb").write(bytes(data))


# The default suite damages a checkpoint by truncation; `pytest -m slow` also by flipped
# bits (kept out of the default suite for its time budget).
@pytest.mark.parametrize("how", ["truncate", pytest.param("corrupt", marks=pytest.mark.slow)])
def test_damaged_checkpoint_is_detected_and_the_previous_one_used(tmp_path, how):
    full = _simulate(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        _simulate(tmp_path / "cut", callback=_interrupt_at(14))
    assert _steps(tmp_path / "cut") == [4, 8, 12]
    _damage(tmp_path / "cut", 12, how)
    with pytest.warns(UserWarning, match=r"skipped damaged checkpoint .*round 12"):
        resumed = _simulate(tmp_path / "cut")
    assert resumed.summary["resumed_from_round"] == 8
    assert resumed.history == full.history
    _assert_same_params(full.params, resumed.params)


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _simulate(tmp_path, callback=_interrupt_at(6))
    assert _steps(tmp_path) == [4]
    shutil.rmtree(tmp_path / "checkpoints" / "4" / "meta")
    with pytest.raises(fs.UserError, match=r"no usable checkpoint .*round 4: metadata unreadable.*delete"):
        _simulate(tmp_path)


def test_divergence_stops_naming_the_round_and_keeps_the_last_good_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    data = fs.data.FederatedData({"x": 100 * rng.normal(size=(40, 4)).astype(np.float32),
                                  "y": rng.normal(size=(40, 1)).astype(np.float32)},
                                 np.array([0, 20, 40]), ("a", "b"))
    run = lambda lr, rounds=40: fs.simulate(
        fs.models.mlp((4,), 1, hidden=(8,)), fs.algorithms.fedavg(optax.sgd(lr)), data,
        task=fs.models.regression(), rounds=rounds, clients_per_round=2, progress=False,
        workdir=str(tmp_path), checkpoint=CheckpointOptions(every_rounds=1, every_seconds=None),
        config={"lr": lr})
    # A small learning rate first, so there are good checkpoints; then a diverging one.
    run(1e-6, rounds=3)
    with pytest.raises(fs.UserError, match=r"training diverged at round (\d+) \(.*\); lower the "
                                           r"client or server learning rate; the last good "
                                           r"checkpoint \(round (\d+)\)") as info:
        fs.simulate(fs.models.mlp((4,), 1, hidden=(8,)), fs.algorithms.fedavg(optax.sgd(10.0)), data,
                    task=fs.models.regression(), rounds=40, clients_per_round=2, progress=False,
                    workdir=str(tmp_path), checkpoint=CheckpointOptions(every_rounds=1, every_seconds=None),
                    config={"lr": 10.0}, allow_config_change=True)
    bad_round = int(str(info.value).split("round ")[1].split(" ")[0])
    steps = _steps(tmp_path)
    assert steps[-1] == bad_round - 1  # every round before the bad one was checkpointed
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == bad_round  # the diverged round is logged, nothing after it
    # the kept checkpoint is intact: resuming from it with the same rate diverges at the same
    # round again (the run is deterministic), and nothing was saved past it
    with pytest.raises(fs.UserError, match=rf"diverged at round {bad_round} "):
        fs.simulate(fs.models.mlp((4,), 1, hidden=(8,)), fs.algorithms.fedavg(optax.sgd(10.0)), data,
                    task=fs.models.regression(), rounds=40, clients_per_round=2, progress=False,
                    workdir=str(tmp_path), checkpoint=CheckpointOptions(every_rounds=1, every_seconds=None),
                    config={"lr": 10.0})
    assert _steps(tmp_path)[-1] == bad_round - 1


def test_parameters_that_overflow_while_the_loss_is_finite_are_caught(tmp_path):
    """The guard also checks the global parameters (a server step can overflow them after
    a finite loss was measured)."""
    data, test = _problem()
    with pytest.raises(fs.UserError, match=r"diverged at round 1 \(the global parameters hold NaN or Inf\)"):
        fs.simulate(fs.models.mlp((6,), 3, hidden=(8,)),
                    fs.algorithms.fedavg(optax.sgd(0.1), optax.sgd(float("inf")), batch_size=4), data,
                    rounds=5, clients_per_round=3, progress=False)


def test_result_save_load_and_params_export(tmp_path):
    result = _simulate(tmp_path / "run", rounds=6)
    result.save(str(tmp_path / "saved"))
    loaded = fs.Result.load(str(tmp_path / "saved"))
    assert loaded.history == result.history and loaded.summary == result.summary
    _assert_same_params(result.params, loaded.params)
    assert set(loaded.params) == set(result.params)
    typed = fs.Result.load(str(tmp_path / "saved"), template=result)
    assert jax.tree_util.tree_structure(typed.server_state) == jax.tree_util.tree_structure(result.server_state)
    _assert_same_params(result.server_state, typed.server_state)
    with pytest.raises(fs.UserError, match="already exists"):
        result.save(str(tmp_path / "saved"))
    with pytest.raises(fs.UserError, match="not a saved Result"):
        fs.Result.load(str(tmp_path / "run"))
    # exported parameters: plain numpy, named by path, equal to the result's
    result.export_params(str(tmp_path / "p.npz"))
    with np.load(tmp_path / "p.npz") as npz:
        assert len(npz.files) == 4 and "out/kernel" in npz.files
        np.testing.assert_array_equal(npz["out/kernel"], np.asarray(result.params["out"]["kernel"]))
    back = fs.load_params(str(tmp_path / "p.npz"))
    _assert_same_params(result.params, back)
    # simulate(workdir=...) wrote the same file at the end
    with np.load(tmp_path / "run" / "params.npz") as npz:
        np.testing.assert_array_equal(npz["out/kernel"], np.asarray(result.params["out"]["kernel"]))


@pytest.mark.slow  # the Python API's refusal is in the default suite (test above); this is its CLI face
def test_cli_resume_refuses_a_changed_config_by_key_unless_allowed(tmp_path, capsys):
    from fedjax_sim.cli.main import main

    args = ["train", "--config", f"{CONFIGS}/digits_fedavg.py", "--workdir", str(tmp_path),
            "--no-progress", "--config.eval_every=2", "--config.checkpoint.every_rounds=2"]
    assert main(args + ["--config.rounds=4"]) == 0
    capsys.readouterr()
    assert main(args + ["--config.rounds=6", "--config.algorithm.client_optimizer.learning_rate=0.05"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the run in ")
    assert "different config (algorithm.client_optimizer.learning_rate: 0.1 -> 0.05)" in err[0]
    assert "--allow-config-change" in err[0]
    assert json.loads((tmp_path / "config.json").read_text())["algorithm"]["client_optimizer"]["learning_rate"] == 0.1
    # a changed cadence or more rounds is not a changed run
    assert main(args[:-1] + ["--config.checkpoint.every_rounds=1", "--config.rounds=6"]) == 0
    assert "resuming from the checkpoint at round 4" not in capsys.readouterr().out  # --no-progress is quiet
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert main(args + ["--config.rounds=8", "--config.algorithm.client_optimizer.learning_rate=0.05",
                        "--allow-config-change"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["resumed_from_round"] == 6 and summary["rounds"] == 8
    assert json.loads((tmp_path / "config.json").read_text())["algorithm"]["client_optimizer"]["learning_rate"] == 0.05


def test_workdir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    from fedjax_sim.cli.main import main

    path = tmp_path / "not_a_dir"
    path.write_text("x")
    code = main(["train", "--config", f"{CONFIGS}/digits_fedavg.py", "--workdir", str(path),
                 "--no-progress", "--config.rounds=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == f"error: workdir {path} exists and is not a directory; choose another path"
