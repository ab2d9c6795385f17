"""What checkpointing costs: a config run with checkpoints at several cadences vs none.

    python benchmarks/checkpoint.py                       # configs/digits_cnn.py, ~5 min
    python benchmarks/checkpoint.py --config configs/digits_fedavg.py --reps 3

Each variant runs the whole config through `simulate(..., workdir=...)` (training,
evaluation, metrics.jsonl, checkpoints, final params), and is timed from the call to its
return minus the compile time (the same executable either way). Variants are run
round-robin, `--reps` times each, and the medians compared, so drift in the machine's
speed affects them alike. Overhead = time with checkpoints / time without - 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time

from fedjax_sim.cli.config import load_config
from fedjax_sim.cli.experiment import build
from fedjax_sim.simulation import CheckpointOptions, simulate


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs",
                                                         "digits_cnn.py"))
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.config)
    parts = build(config)
    parts.pop("info")
    default = parts.pop("checkpoint")
    rounds, eval_every = parts["rounds"], parts["eval_every"]
    variants = {
        "none": dataclasses.replace(default, enabled=False),
        f"default (every {default.every_seconds:g} s, and at the end)": default,
        f"every {eval_every} rounds (each evaluation)": dataclasses.replace(default, every_rounds=eval_every),
        "every 5 rounds": dataclasses.replace(default, every_rounds=5),
    }
    times = {name: [] for name in variants}
    saves = {}
    root = tempfile.mkdtemp(prefix="ckpt_bench_")
    try:
        for rep in range(args.reps):
            for name, options in variants.items():
                workdir = os.path.join(root, f"{rep}_{len(times[name])}_{abs(hash(name))}")
                t0 = time.perf_counter()
                result = simulate(**parts, workdir=workdir, checkpoint=options, progress=False)
                seconds = time.perf_counter() - t0 - result.summary["compile_seconds"]
                times[name].append(seconds)
                # every round that was saved (max_to_keep prunes the directory as it goes)
                saves[name] = _count_saves(options, rounds, result)
                shutil.rmtree(workdir)
                print(f"rep {rep} {name:45s} {seconds:7.2f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base = statistics.median(times["none"])
    print(f"\n{os.path.basename(args.config)}: {rounds} rounds, {parts['clients_per_round']} "
          f"clients/round, {result.summary['num_params']} parameters; "
          f"{base / rounds * 1e3:.1f} ms/round without checkpoints\n")
    print("| checkpoints | saves per run | s per run (median) | overhead |")
    print("|---|---|---|---|")
    for name in variants:
        t = statistics.median(times[name])
        print(f"| {name} | {saves[name]} | {t:.2f} | {100 * (t / base - 1):+.1f}% |")


def _count_saves(options: CheckpointOptions, rounds: int, result) -> str:
    if not options.enabled:
        return "0"
    if options.every_rounds:
        return str(rounds // options.every_rounds + (rounds % options.every_rounds != 0))
    seconds = result.summary["seconds_per_round"] * rounds
    return f"{1 + int(seconds // options.every_seconds)}"


if __name__ == "__main__":
    sys.exit(main())
