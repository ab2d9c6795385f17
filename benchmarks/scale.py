"""Populations of up to a million clients: start-up, host memory and seconds per round.

    python benchmarks/scale.py          # N = 10^3 .. 10^6, cohorts 100 / 1,000 / 10,000 (6-11 min)
    python benchmarks/scale.py --quick  # N = 10^3, 10^4; cohort 100 (~2 min)

Synthetic clients of EXAMPLES examples with FEATURES features and CLASSES classes, made with
numpy over all rows at once (features uniform with unit variance; labels from one linear
rule for all clients plus a per-client bias, so clients differ), stored as a FederatedData
built from the flat arrays and offsets [0, 20, 40, ...] (no per-client Python objects but
the ids). FedAvg on logistic regression (or `--model mlp`: a 32-unit MLP), 1 local epoch
of batch 10 (2 steps). Evaluation: a pooled sample of EVAL_EXAMPLES examples, once, after
the last round. Numbers: benchmarks/README.md, "A million clients".

Each configuration (population N, cohort m) runs `fs.simulate` in a fresh subprocess, so
peak memory (VmHWM) is that configuration's alone. It reports
  load       seconds to load the arrays (numpy makes them once per population, before)
  start-up   seconds from the FederatedData constructor to the first round: data build,
             plan (checks, engine choice) and compile (simulate's time to its first call,
             less one steady call)
  compile    the summary's compile seconds (part of start-up)
  peak RSS   the process's peak resident memory (VmHWM: jax, the data, everything)
  s/round    median over calls of a fixed rounds_per_call, the first call left out
Then, for each cohort, the smallest N that holds it and N = 10^6 run side by side in ONE
process (both planned as simulate plans them, `simulation.calls.RoundCalls` called in turn,
medians): their ratio is the growth of a round's cost with N, free of the machine's drift.
SCAFFOLD keeps 10^6 client control variates on the host (`client_states='host'`), against
the same kept on device, and against N = 10^3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# This checkout's fedjax_sim, whichever one is installed (the measurements run in child
# processes of this same script).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EXAMPLES, FEATURES, CLASSES, BATCH = 20, 8, 4, 10
EVAL_EXAMPLES = 10_000
# Rounds per compiled call, by cohort size: calls of ~0.1-1 s on a 2-core CPU.
PER_CALL = {100: 50, 1000: 10, 10_000: 2}


def rss_peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_arrays(num_clients: int, seed: int = 0):
    """(features, offsets) of num_clients * EXAMPLES rows, vectorised, a block of rows at a
    time to bound temporaries: x uniform with unit variance, y = argmax_k of x_k +
    x_{k+CLASSES} / 2 + b_client,k (a linear rule shared by all clients, a bias per client)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = num_clients * EXAMPLES
    bias = rng.standard_normal((num_clients, CLASSES), dtype=np.float32)
    x = np.empty((n, FEATURES), np.float32)
    y = np.empty(n, np.int32)
    block = 1 << 20
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        xb = x[lo:hi]
        rng.random(out=xb, dtype=np.float32)
        xb -= 0.5
        xb *= 12 ** 0.5
        logits = xb[:, :CLASSES] + 0.5 * xb[:, CLASSES:2 * CLASSES]
        logits += bias[np.arange(lo, hi) // EXAMPLES]
        y[lo:hi] = np.argmax(logits, axis=1)
    offsets = np.arange(num_clients + 1, dtype=np.int64) * EXAMPLES
    return {"x": x, "y": y}, offsets


def save_arrays(num_clients: int, path: str) -> float:
    """Generates a population's arrays once and saves them (.npz, uncompressed) for the
    measurements to load; returns the seconds numpy took to generate them."""
    import numpy as np

    t0 = time.perf_counter()
    features, offsets = make_arrays(num_clients)
    seconds = time.perf_counter() - t0
    np.savez(path, offsets=offsets, **features)
    return seconds


def make_data(num_clients: int, path: str | None):
    """(FederatedData, seconds to load (or make) the arrays, seconds to build it)."""
    import numpy as np

    import fedjax_sim as fs

    t0 = time.perf_counter()
    if path:
        with np.load(path) as saved:
            features, offsets = {"x": saved["x"], "y": saved["y"]}, saved["offsets"]
    else:
        features, offsets = make_arrays(num_clients)
    t1 = time.perf_counter()
    data = fs.data.FederatedData(features, offsets, tuple(map(str, range(num_clients))))
    return data, t1 - t0, time.perf_counter() - t1


def eval_sample(seed: int = 1) -> dict:
    features, _ = make_arrays(EVAL_EXAMPLES // EXAMPLES, seed)
    return features


def make_model(name: str):
    import fedjax_sim as fs

    if name == "mlp":
        return fs.models.get_model("mlp", (FEATURES,), CLASSES, hidden=(32,))
    return fs.models.get_model("logistic_regression", (FEATURES,), CLASSES)


def make_algorithm(name: str):
    import optax

    import fedjax_sim as fs

    if name == "scaffold":
        return fs.algorithms.scaffold(0.1, local_epochs=1, batch_size=BATCH)
    return fs.algorithms.fedavg(optax.sgd(0.1), optax.sgd(1.0), local_epochs=1, batch_size=BATCH)


# ------------------------------------------------------------------ one configuration

def run_one(cfg: dict) -> dict:
    """One configuration through fs.simulate, in this (fresh) process."""
    import fedjax_sim as fs

    n, m, calls = cfg["n"], cfg["m"], cfg["calls"]
    per_call = PER_CALL[m]
    data, load_s, build_s = make_data(n, cfg.get("path"))
    rss_data = rss_peak_mib()
    stamps = {}

    def stamp(row):
        stamps[row["round"]] = time.perf_counter()

    rounds = per_call * calls
    t0 = time.perf_counter()
    result = fs.simulate(
        make_model(cfg["model"]), make_algorithm(cfg["algorithm"]), data, rounds=rounds,
        clients_per_round=m, eval_data=eval_sample(), eval_every=rounds, seed=0,
        progress=False, callback=stamp,
        engine=fs.EngineOptions(rounds_per_call=per_call, client_states=cfg["states"]))
    ends = [t0] + [stamps[per_call * (i + 1)] for i in range(calls)]
    call_s = [b - a for a, b in zip(ends, ends[1:])]
    # The last call also evaluates: steady calls are the 2nd .. the one before the last.
    steady = statistics.median(call_s[1:-1] if calls > 2 else call_s[-1:])
    return {**cfg, "load_s": load_s, "startup_s": build_s + call_s[0] - steady,
            "compile_s": result.summary["compile_seconds"],
            "s_per_round": steady / per_call, "rss_data_mib": rss_data,
            "rss_peak_mib": rss_peak_mib(), "test_accuracy": result.history[-1]["test_accuracy"]}


# ------------------------------------------------------------------ side by side

def run_pair(cfg: dict) -> dict:
    """s/round of several populations at one cohort size, timed round-robin in this
    process: each is planned and compiled as simulate() does, then its compiled calls
    (`RoundCalls.run`, what simulate's loop calls) alternate."""
    from fedjax_sim.simulation.calls import RoundCalls
    from fedjax_sim.simulation.setup import RunRequest, plan_run

    import fedjax_sim as fs

    m, per_call, reps = cfg["m"], PER_CALL[cfg["m"]], cfg["reps"]
    rounds = per_call * (reps + 1)
    runners = {}
    for n, path in zip(cfg["ns"], cfg["paths"]):
        data, _, _ = make_data(n, path)
        plan = plan_run(RunRequest(
            make_model(cfg["model"]), make_algorithm(cfg["algorithm"]), data, rounds=rounds,
            clients_per_round=m, eval_every=rounds, progress=False,
            engine=fs.EngineOptions(rounds_per_call=per_call, client_states=cfg["states"])))
        state = plan.initial_state()
        runners[n] = {"calls": RoundCalls(plan, state, None), "state": state,
                      "model_state": plan.model_state, "done": 0}
    times = {n: [] for n in runners}
    for rep in range(reps + 1):
        for n, r in runners.items():
            t = time.perf_counter()
            r["state"], _, _ = r["calls"].run(r["state"], r["model_state"], r["done"], per_call)
            r["done"] += per_call
            if rep:  # each one's first call warms up
                times[n].append(time.perf_counter() - t)
    for r in runners.values():
        r["calls"].close()
    return {**cfg, "s_per_round": [statistics.median(times[n]) / per_call for n in cfg["ns"]]}


# ------------------------------------------------------------------ driver

def child(kind: str, cfg) -> dict:
    """Runs one measurement in a fresh interpreter; returns its JSON result."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--{kind}", json.dumps(cfg)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {cfg} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plan_measurements(quick: bool):
    """(populations, per-configuration runs, side-by-side pairs)."""
    ns = (10**3, 10**4) if quick else (10**3, 10**4, 10**5, 10**6)
    cohorts = (100,) if quick else (100, 1000, 10_000)
    big, small = ns[-1], ns[0]
    one = dict(model="logreg", algorithm="fedavg", states="auto", calls=5 if quick else 6)
    runs = [dict(one, n=n, m=m) for m in cohorts for n in ns if m <= n]
    scaffold = dict(one, algorithm="scaffold", states="host")
    runs += [dict(scaffold, n=small, m=100)] if not quick else []
    runs += [dict(scaffold, n=big, m=m, states=states) for m in cohorts[:2]
             for states in ("host", "device")]
    runs += [dict(scaffold, n=big, m=cohorts[-1])] if not quick else []
    pairs = [dict(one, m=m, ns=[min(n for n in ns if n >= m), big],
                  reps=5 if quick or m >= 10_000 else 11) for m in cohorts]
    pairs += [dict(scaffold, m=100, ns=[small, big], reps=5 if quick else 11)]
    return ns, runs, pairs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke version")
    parser.add_argument("--model", choices=("logreg", "mlp"), default="logreg")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--pair", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one or args.pair or args.save:
        if args.save:
            n, path = json.loads(args.save)
            result = save_arrays(n, path)
        else:
            result = run_one(json.loads(args.one)) if args.one else run_pair(json.loads(args.pair))
        print(json.dumps(result))
        return

    import jax

    ns, runs, pairs = plan_measurements(args.quick)
    print(f"# fedjax_sim at scale: {os.cpu_count()} CPU cores, jax {jax.__version__} "
          f"({jax.default_backend()}); clients of {EXAMPLES} examples x {FEATURES} features, "
          f"{CLASSES} classes; {args.model}; 1 local epoch of batch {BATCH}\n")
    with tempfile.TemporaryDirectory(prefix="fedjax_scale_") as tmp:
        paths = {n: os.path.join(tmp, f"clients_{n}.npz") for n in ns}
        generated = {n: child("save", [n, paths[n]]) for n in ns}
        print("numpy generates the arrays once per population: " + ", ".join(
            f"N = {n:,}: {s:.1f} s" for n, s in generated.items()) + "\n")
        print("| algorithm | N clients | cohort | load s | start-up s | compile s | "
              "RSS with data MiB | peak RSS MiB | s/round | test acc |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for cfg in runs:
            r = child("one", dict(cfg, model=args.model, path=paths[cfg["n"]]))
            name = r["algorithm"] + (f" ({r['states']} states)"
                                     if r["algorithm"] == "scaffold" else "")
            print(f"| {name} | {r['n']:,} | {r['m']:,} | {r['load_s']:.1f} | "
                  f"{r['startup_s']:.1f} | {r['compile_s']:.1f} | {r['rss_data_mib']:.0f} | "
                  f"{r['rss_peak_mib']:.0f} | {r['s_per_round']:.4f} | {r['test_accuracy']:.3f} |",
                  flush=True)

        print(f"\nSide by side in one process (round-robin, medians): s/round at N = {ns[-1]:,} "
              f"against the smallest N that holds the cohort\n")
        print("| algorithm | cohort | N small | s/round, N small | s/round, N large | ratio |")
        print("|---|---|---|---|---|---|")
        for cfg in pairs:
            r = child("pair", dict(cfg, model=args.model, paths=[paths[n] for n in cfg["ns"]]))
            small, large = r["s_per_round"]
            name = r["algorithm"] + (" (host states)" if r["algorithm"] == "scaffold" else "")
            print(f"| {name} | {r['m']:,} | {cfg['ns'][0]:,} | {small:.4f} | {large:.4f} | "
                  f"{large / small:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
