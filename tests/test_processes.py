"""One run over two processes (jax.distributed on localhost, one CPU device each) writes
the metrics.jsonl (and TensorBoard events) a single process writes with the same two
devices, once, and resumes across processes from the checkpoint process 0 saved."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from fedjax_sim.cli.options import distributed_options
from fedjax_sim.errors import UserError
from fedjax_sim.simulation import DistributedOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "digits_scaffold.py")
# SCAFFOLD keeps a control variate per client (100 rows, split across the processes).
OVERRIDES = ["--config.eval_every=2", "--config.model.args.hidden=[32]", "--no-progress",
             "--config.checkpoint.every_rounds=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def env_with_devices(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""),
                                              f"--xla_force_host_platform_device_count={devices}"]))
    return env


def train(workdir, rounds, extra=()):
    return [sys.executable, "-m", "fedjax_sim.cli.main", "train", "--config", CONFIG,
            "--workdir", str(workdir), f"--config.rounds={rounds}", *OVERRIDES, *extra]


def run_processes(workdir, rounds: int, extra=()):
    port = free_port()
    procs = [subprocess.Popen(
        train(workdir, rounds, ["--coordinator", f"localhost:{port}", "--num-processes", "2",
                                "--process-id", str(i), *extra]),
        env=env_with_devices(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(tmp_path):
    one = tmp_path / "one"
    proc = subprocess.run(train(one, 4, ["--config.engine.mesh=2"]), env=env_with_devices(2),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two"
    run_processes(two, 2, ["--tensorboard"])         # rounds 1-2, checkpoint at round 2
    outs = run_processes(two, 4, ["--tensorboard"])  # resumes at round 2 in both processes
    assert "resum" in outs[0][0] + outs[0][1]
    expected, got = rows(one), rows(two)
    assert [r["round"] for r in got] == [1, 2, 3, 4]  # written once, by process 0
    for a, b in zip(expected, got):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-6, err_msg=key)
    summary = json.load(open(two / "summary.json"))
    assert summary["engine"]["mesh"] == {"devices": 2, "processes": 2, "platform": "cpu"}
    # TensorBoard: written by process 0 alone (one event file per start, one per summary),
    # each round once.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len([f for f in os.listdir(two / "tensorboard") if f.startswith("events")]) == 4
    events = EventAccumulator(str(two / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [
        (r["round"], pytest.approx(r["train_loss"], rel=1e-7)) for r in got]


def test_distributed_options_need_all_three_or_none():
    assert DistributedOptions() == DistributedOptions(None, None, None)
    with pytest.raises(UserError, match="together"):
        DistributedOptions(coordinator_address="host:1234")
    with pytest.raises(UserError, match="process_id must be in"):
        DistributedOptions("host:1234", 2, 2)
    import ml_collections
    config = ml_collections.ConfigDict({"distributed": {"coordinator_address": "h:1",
                                                        "num_processes": 4, "process_id": 3,
                                                        "local_device_ids": [0, 1]}})
    assert distributed_options(config) == DistributedOptions("h:1", 4, 3, (0, 1))
