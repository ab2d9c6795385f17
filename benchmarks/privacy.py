"""What differential privacy costs per round, measured side by side with the same run
without it.

    python benchmarks/privacy.py            # both cases (~5 min on a 2-core CPU)
    python benchmarks/privacy.py --quick    # fewer repetitions
    python benchmarks/privacy.py --cases a  # only case (a); cases: a, b, c

Cases:
  (a) client level, the digits MLP (200-200, 53 k params) of configs/digits_fedavg.py:
      100 clients, 10 per round, 1 local epoch of batch 10. FedAvg (uniform weights) vs
      DP-FedAvg with fixed clipping, with adaptive clipping (both fixed-size sampling, the
      same cohort size), and with Poisson sampling (q = 0.1, padded to its cap); z = 1
      with the noise of a 1,000-client cohort (noise_cohort_size), so the model stays sane
      (the cost does not depend on it).
  (b) example level, the EMNIST CNN (1.2 M params) on 28x28x1 inputs: 10 clients per
      round of 100 examples, 5 local steps. Non-private batches of 20 vs DP-SGD with
      q = 0.2 (expected batch 20, padded to the default cap, 52 here) and per-example
      clipping; and non-private batches of 52, the same padded shape.
  (c) client level, the digits CNN of configs/digits_cnn.py (53 k params on 8x8x1): the
      setting of (a) with more local compute per client.
Each contender is a full `simulate()`; the number is its `seconds_per_round` (training
only: compile excluded, the host's per-round accounting included). Contenders run
round-robin, `--reps` times each, and the medians are compared, so drift in the machine's
speed affects all alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings

import jax
import optax

import fedjax_sim as fs
from fedjax_sim.engine import program_cache
from fedjax_sim.privacy import AdaptiveClipping, ClientLevelDP, ExampleLevelDP

from engine import make_data  # benchmarks/engine.py (this script's directory is on sys.path)


def _run(model, algorithm, data, rounds, m, privacy):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fs.simulate(model, algorithm, data, rounds=rounds, clients_per_round=m,
                             eval_every=rounds, progress=False, privacy=privacy, seed=0)
    return result.summary


def interleaved(contenders: dict, reps: int) -> dict:
    """{name: (median s/round, compile s, summary)}, timing one run of each in turn."""
    times = {name: [] for name in contenders}
    first, last = {}, {}
    for _ in range(reps):
        for name, fn in contenders.items():
            if name not in first:  # a true compile, not a program reused from a contender alike
                program_cache.clear()
            summary = fn()
            times[name].append(summary["seconds_per_round"])
            first.setdefault(name, summary)
            last[name] = summary
    return {name: (statistics.median(t), first[name]["compile_seconds"], last[name])
            for name, t in times.items()}


def case_a(reps, rows):
    train, _ = fs.data.load_digits(seed=0)
    data = fs.data.partition(train, train["y"], "dirichlet", 100, seed=0, alpha=0.5)
    model = fs.models.get_model("mlp", (8, 8, 1), 10, hidden=[200, 200])
    alg = fs.algorithms.fedavg(optax.sgd(0.1), batch_size=10, weighting="uniform")
    rounds, m = 200, 10
    contenders = {
        "FedAvg": lambda: _run(model, alg, data, rounds, m, None),
        "DP-FedAvg, fixed clip": lambda: _run(model, alg, data, rounds, m, ClientLevelDP(
            1.0, 1e-3, clip_norm=0.5, sampling="fixed", noise_cohort_size=1000)),
        "DP-FedAvg, adaptive clip": lambda: _run(model, alg, data, rounds, m, ClientLevelDP(
            1.0, 1e-3, adaptive_clipping=AdaptiveClipping(), sampling="fixed",
            noise_cohort_size=1000)),
        "DP-FedAvg, Poisson q=0.1": lambda: _run(model, alg, data, rounds, m, ClientLevelDP(
            1.0, 1e-3, clip_norm=0.5, noise_cohort_size=1000)),
    }
    _report("(a) client level, digits MLP, 10 clients/round", interleaved(contenders, reps),
            "FedAvg", rows, lambda s: f"slots {s['privacy']['cohort_slots']}"
            if s.get("privacy", {}).get("cohort_slots") else "")


def case_c(reps, rows):
    train, _ = fs.data.load_digits(seed=0)
    data = fs.data.partition(train, train["y"], "dirichlet", 100, seed=0, alpha=0.5)
    model = fs.models.get_model("cnn", (8, 8, 1), 10)
    alg = fs.algorithms.fedavg(optax.sgd(0.05), batch_size=10, weighting="uniform")
    rounds, m = 40, 10
    contenders = {
        "FedAvg": lambda: _run(model, alg, data, rounds, m, None),
        "DP-FedAvg, fixed clip": lambda: _run(model, alg, data, rounds, m, ClientLevelDP(
            1.0, 1e-3, clip_norm=0.5, sampling="fixed", noise_cohort_size=1000)),
        "DP-FedAvg, Poisson q=0.1": lambda: _run(model, alg, data, rounds, m, ClientLevelDP(
            1.0, 1e-3, clip_norm=0.5, noise_cohort_size=1000)),
    }
    _report("(c) client level, digits CNN, 10 clients/round", interleaved(contenders, reps),
            "FedAvg", rows, lambda s: f"slots {s['privacy']['cohort_slots']}"
            if s.get("privacy", {}).get("cohort_slots") else "")


def case_b(reps, rows):
    data = make_data(20, 100, (28, 28, 1))
    model = fs.models.get_model("cnn", (28, 28, 1), 10)
    rounds, m, steps = 3, 10, 5
    plain = fs.algorithms.fedavg(optax.sgd(0.05), local_steps=steps, batch_size=20)
    plain_52 = fs.algorithms.fedavg(optax.sgd(0.05), local_steps=steps, batch_size=52)
    contenders = {
        "SGD, batch 20": lambda: _run(model, plain, data, rounds, m, None),
        "DP-SGD q=0.2, default cap": lambda: _run(model, plain, data, rounds, m, ExampleLevelDP(
            1.0, 1.0, 0.2, 1e-4)),
        "SGD, batch 52": lambda: _run(model, plain_52, data, rounds, m, None),
    }
    _report("(b) example level, EMNIST CNN, 10 clients/round, 5 steps",
            interleaved(contenders, reps), "SGD, batch 20", rows,
            lambda s: f"batch cap {s['privacy']['max_batch_size']}" if s.get("privacy") else "")


def _report(title, results, baseline, rows, note):
    base = results[baseline][0]
    print(f"\n{title}")
    print(f"{'':28s} {'ms/round':>9s} {'× ' + baseline:>18s} {'compile s':>10s}")
    for name, (sec, compile_s, summary) in results.items():
        print(f"{name:28s} {sec * 1e3:9.2f} {sec / base:18.2f} {compile_s:10.1f}  {note(summary)}")
        rows.append((title, name, sec, sec / base))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cases", default="a,b,c")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    reps = args.reps or (2 if args.quick else 5)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}")
    rows = []
    cases = args.cases.split(",")
    if "a" in cases:
        case_a(reps, rows)
    if "b" in cases:
        case_b(max(2, reps // 2), rows)
    if "c" in cases:
        case_c(max(2, reps // 2), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
