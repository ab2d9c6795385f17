"""A sweep as one program against the same trials run one after another.

    python benchmarks/sweep.py              # the digits grid (32 trials, 200 rounds) and the CNN (4 trials)
    python benchmarks/sweep.py --quick      # 20 rounds, 8 trials: a smoke run

1. digits FedAvg with the MLP 200-200 (configs/digits_fedavg.py): 8 seeds x 4 client
   learning rates = 32 trials, each 200 rounds. Contenders, each timed end to end (wall):
   - `fedjax-sim sweep` (one process, the 32 trials in one program);
   - 32 sequential `fedjax-sim train` processes (what a shell loop does);
   - 32 `simulate()` calls in one process (the config runner; the round program is
     compiled once and reused: seed and learning rate are runtime inputs);
   - `fs.sweep` in one process without a workdir (the same trials, no files).
   Each contender starts from an empty JAX persistent compilation cache of its own (the
   32 `fedjax-sim train` processes share theirs: the first compiles, the rest read it).
2. The EMNIST CNN (the zoo's `cnn`, 28x28x1 inputs, 62 classes) on synthetic data of
   EMNIST's shapes (20 clients of 200 images), 10 clients a round, 4 trials (2 seeds x 2
   learning rates): `fs.sweep` against 4 `simulate()` calls, in one process.

Memory per trial: the compiled group program's arguments (every trial's state and the
shared data) and its temporaries (XLA's memory analysis), divided by the trials.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "digits_fedavg.py")
LRS = [0.03, 0.05, 0.1, 0.2]


def _cli(args: list[str], env) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fedjax_sim", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _fresh(env, work: str, name: str) -> dict:
    """`env` with an empty persistent compilation cache directory of its own."""
    return dict(env, FEDJAX_SIM_COMPILATION_CACHE=os.path.join(work, f"xla_{name}"))


def digits(rounds: int, seeds: int, env, work: str) -> dict:
    lrs = LRS
    grid = ["--sweep", f"algorithm.client_optimizer.learning_rate={lrs}",
            "--sweep", f"seed=range({seeds})", f"--config.rounds={rounds}",
            f"--config.eval_every={min(20, rounds)}"]
    out = {}
    out["sweep_cli"] = _cli(["sweep", "--config", CONFIG, *grid, "--no-progress",
                             "--workdir", os.path.join(work, "sweep")], _fresh(env, work, "sweep"))
    with open(os.path.join(work, "sweep", "sweep.json")) as f:
        sweep_json = json.load(f)
    group = sweep_json["groups"][0]
    out["trials"] = len(sweep_json["trials"])
    out["memory"] = group["memory"]
    out["sweep_compile"] = group["compile_seconds"]
    out["sweep_train"] = group["train_seconds"]
    out["best"] = sweep_json["best"]
    start = time.perf_counter()
    for lr in lrs:
        for seed in range(seeds):
            _cli(["train", "--config", CONFIG, f"--config.rounds={rounds}",
                  f"--config.eval_every={min(20, rounds)}", f"--config.seed={seed}",
                  f"--config.algorithm.client_optimizer.learning_rate={lr}", "--no-progress",
                  "--workdir", os.path.join(work, f"train_{lr}_{seed}")],
                 _fresh(env, work, "train"))
    out["train_cli"] = time.perf_counter() - start
    code = f"""
import time
start = time.perf_counter()
from fedjax_sim.cli.config import load_config
from fedjax_sim.cli.experiment import run
for lr in {lrs}:
    for seed in range({seeds}):
        run(load_config({CONFIG!r}, {{"rounds": "{rounds}", "eval_every": "{min(20, rounds)}",
            "seed": str(seed), "algorithm.client_optimizer.learning_rate": str(lr)}}), None,
            progress=False)
print(time.perf_counter() - start)
"""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=_fresh(env, work, "loop"), check=True,
                   stdout=subprocess.DEVNULL)
    out["simulate_loop"] = time.perf_counter() - start
    code = f"""
import json
import fedjax_sim as fs
from fedjax_sim.cli.config import load_config
from fedjax_sim.cli.experiment import build
loaded = {{}}
def trial(lr, seed):
    config = load_config({CONFIG!r}, {{"rounds": "{rounds}", "eval_every": "{min(20, rounds)}",
        "seed": str(seed), "algorithm.client_optimizer.learning_rate": str(lr)}})
    parts = build(config, data_cache=loaded)
    parts.pop("info"), parts.pop("checkpoint")
    return parts
fs.sweep(trial, {{"lr": {lrs}, "seed": range({seeds})}}, progress=False)
"""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=_fresh(env, work, "python"), check=True,
                   stdout=subprocess.DEVNULL)
    out["sweep_python"] = time.perf_counter() - start
    return out


CNN_CODE = r"""
import json, sys, time
import numpy as np, optax
import fedjax_sim as fs

rounds = int(sys.argv[1])
rng = np.random.default_rng(0)
n = 20 * 200
x = rng.integers(0, 256, size=(n, 28, 28, 1), dtype=np.uint8)
y = rng.integers(0, 62, size=n).astype(np.int32)
clients = fs.data.partition({"x": x, "y": y}, y, "iid", 20, seed=0)
test = {"x": x[:500], "y": y[:500]}
model = fs.models.get_model("cnn", (28, 28, 1), 62)

def run(lr, seed):
    return dict(model=model, algorithm=fs.algorithms.fedavg(
                    fs.algorithms.tunable(optax.sgd, learning_rate=lr), batch_size=20),
                train_data=clients, rounds=rounds, clients_per_round=10, eval_data=test,
                eval_every=rounds, seed=seed)

grid = {"lr": [0.02, 0.05], "seed": [0, 1]}
start = time.perf_counter()
result = fs.sweep(run, grid, progress=False)
swept = time.perf_counter() - start
start = time.perf_counter()
for lr in grid["lr"]:
    for seed in grid["seed"]:
        fs.simulate(**run(lr, seed), progress=False)
loop = time.perf_counter() - start
print(json.dumps({"sweep": swept, "simulate_loop": loop, "trials": 4,
                  "sweep_compile": result.groups[0]["compile_seconds"],
                  "sweep_train": result.groups[0]["train_seconds"],
                  "memory": result.groups[0]["memory"]}))
"""


def cnn(rounds: int, env) -> dict:
    done = subprocess.run([sys.executable, "-c", CNN_CODE, str(rounds)], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(memory: dict | None, trials: int) -> str:
    if not memory:
        return "n/a"
    return (f"{memory['argument_bytes'] / trials / 2**20:.2f} MiB arguments + "
            f"{memory['temp_bytes'] / trials / 2**20:.2f} MiB temporaries")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 rounds, 2 seeds")
    parser.add_argument("--cases", default="digits,cnn",
                        help="which parts to run: digits, cnn or both (default)")
    args = parser.parse_args(argv)
    rounds, seeds, cnn_rounds = (20, 2, 3) if args.quick else (200, 8, 10)
    work = tempfile.mkdtemp(prefix="fedjax_sim_bench_sweep_")
    env = dict(os.environ, FEDJAX_SIM_COMPILATION_CACHE=os.path.join(work, "xla"),
               JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cases = set(args.cases.split(","))
    if "digits" in cases:
        _print_digits(digits(rounds, seeds, env, work), rounds, seeds)
    if "cnn" in cases:
        _print_cnn(cnn(cnn_rounds, _fresh(env, work, "cnn")), cnn_rounds)


def _print_digits(d: dict, rounds: int, seeds: int) -> None:
    t = d["trials"]
    print(f"digits FedAvg MLP 200-200, {t} trials ({seeds} seeds x {len(LRS)} learning rates), "
          f"{rounds} rounds each")
    print("| contender | wall s | per trial s | vs `fedjax-sim sweep` | vs `fs.sweep` |")
    print("|---|---|---|---|---|")
    for name, key in (("`fedjax-sim sweep` (one program, files and checkpoints)", "sweep_cli"),
                      ("`fs.sweep` in one process (one program, no files)", "sweep_python"),
                      (f"{t} sequential `fedjax-sim train`", "train_cli"),
                      (f"{t} `simulate()` calls in one process", "simulate_loop")):
        print(f"| {name} | {d[key]:.1f} | {d[key] / t:.2f} | {d[key] / d['sweep_cli']:.2f}x "
              f"| {d[key] / d['sweep_python']:.2f}x |")
    print(f"sweep: compile {d['sweep_compile']:.1f} s, train {d['sweep_train']:.1f} s; "
          f"memory per trial: {_mib(d['memory'], t)}; best: "
          f"lr={d['best']['algorithm.client_optimizer.learning_rate']} seed={d['best']['seed']} "
          f"test_accuracy={d['best']['final_test_accuracy']:.4f}")


def _print_cnn(c: dict, cnn_rounds: int) -> None:
    print(f"\nEMNIST CNN (synthetic data of EMNIST's shapes), 4 trials, {cnn_rounds} rounds each")
    print("| contender | wall s | sweep speed-up |")
    print("|---|---|---|")
    print(f"| `fs.sweep` (one program) | {c['sweep']:.1f} | 1.0x |")
    print(f"| 4 `simulate()` calls | {c['simulate_loop']:.1f} | "
          f"{c['simulate_loop'] / c['sweep']:.2f}x |")
    print(f"sweep: compile {c['sweep_compile']:.1f} s, train {c['sweep_train']:.1f} s; "
          f"memory per trial: {_mib(c['memory'], 4)}")


if __name__ == "__main__":
    main()
