"""Test accuracy against uplink bytes on digits, and what secure and encrypted aggregation
cost per round (configs/digits_fedavg.py: 100 clients, 10 per round, MLP 200-200,
55,210 parameters).

    python benchmarks/communication.py            # 200 rounds per run (~6 min, 2-core CPU)
    python benchmarks/communication.py --quick    # 20 rounds, fewer runs (a smoke run)
    python benchmarks/communication.py --parts 3  # only the secure sum by cohort and size

Part 1 trains the shipped FedAvg config with each compression of the client's update
(`config.aggregator.compression`): none, stochastic 8/4/2/1-bit quantization with and
without a randomized Hadamard rotation, top-1% and top-10% sparsification with error
feedback, and the shipped configs/digits_compressed.py (top-10% then 8 bits). It prints a
markdown table: uplink bytes per client per round (what the metrics' `uplink_bytes_per_client`
counts: values x bits, indices, scales), the ratio to float32, and the final test
accuracy.

Part 2 times one round of plain, secure (Bonawitz et al., 10% dropouts) and CKKS-encrypted
aggregation on the same run, each run for `--cost-rounds` rounds one round per call,
timed round-robin between the three over `--repeats` passes; it prints the median seconds
per round and the ratio to plain aggregation. Encrypted aggregation runs on the host
(TenSEAL), one client after another.

Part 3 times the secure sum alone for cohorts of 10 to 100 clients and updates of 650
and 53,000 entries: its cost grows as m²·d (every pair of clients masks every entry).

Part 4 compresses the broadcast instead (`config.broadcast`: 8/4/2 bits, with and without
the rotation) and prints the downlink bytes and the test accuracy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

from fedjax_sim.cli.config import load_config
from fedjax_sim.cli.experiment import run
from fedjax_sim.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEDAVG = os.path.join(ROOT, "configs", "digits_fedavg.py")
FLOAT_BYTES = 4
DIGITS_MLP_PARAMS = 64 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10  # digits_fedavg.py's MLP


def compressions(quick: bool) -> list[tuple[str, list]]:
    rows = [("none (float32)", [])]
    for bits in ((8, 2) if quick else (8, 4, 2, 1)):
        rows.append((f"{bits}-bit", [dict(name="quantize", bits=bits)]))
        rows.append((f"{bits}-bit, rotated", [dict(name="quantize", bits=bits, rotation="hadamard")]))
    for fraction in (0.01, 0.1):
        rows.append((f"top {fraction:.0%}, error feedback",
                     [dict(name="top_k", fraction=fraction, error_feedback=True)]))
    rows.append(("top 10% + 8-bit, error feedback (digits_compressed.py)",
                 [dict(name="top_k", fraction=0.1, error_feedback=True),
                  dict(name="quantize", bits=8)]))
    return rows


def _config(rounds: int, aggregator: str | None, **more):
    overrides = {"rounds": str(rounds), "eval_every": str(rounds), "aggregator": aggregator or "None"}
    overrides.update({k: str(v) for k, v in more.items()})
    return load_config(FEDAVG, overrides)


def tradeoff(rounds: int, quick: bool) -> None:
    print(f"| compression | uplink bytes / client / round | vs float32 | test accuracy "
          f"({rounds} rounds) |")
    print("|---|---|---|---|")
    for name, parts in compressions(quick):
        aggregator = repr(dict(compression=parts)) if parts else None
        rows = []  # the metrics so far, also of a run that diverges
        try:
            result = run(_config(rounds, aggregator), None, progress=False,
                         callback=rows.append)
            accuracy = f"{result.summary['final']['test_accuracy']:.3f}"
        except UserError as e:  # e.g. 1-bit quantization's variance can make it diverge
            if "diverged" not in str(e):
                raise
            accuracy = f"diverged at round {len(rows) + 1}"
        sent = rows[-1]["uplink_bytes_per_client"]
        dense = DIGITS_MLP_PARAMS * FLOAT_BYTES
        print(f"| {name} | {sent:,.0f} | {dense / sent:.1f}x less | {accuracy} |", flush=True)


def costs(rounds: int, repeats: int) -> None:
    contenders = {
        "plain (weighted mean)": None,
        "secure aggregation, 10% dropouts": repr(dict(secure=dict(
            clip_norm=5.0, modulus_bits=32, dropout_rate=0.1, max_weight=64))),
        "CKKS encrypted sum": repr(dict(encrypted=dict(scheme="ckks"))),
    }
    seconds = {name: [] for name in contenders}
    for _ in range(repeats):  # round-robin: every contender once per pass
        for name, aggregator in contenders.items():
            config = _config(rounds, aggregator, **{"engine.rounds_per_call": 1})
            result = run(config, None, progress=False)
            seconds[name].append(result.summary["seconds_per_round"])
    plain = statistics.median(seconds["plain (weighted mean)"])
    print(f"\n| aggregation | seconds / round (median of {repeats}, {rounds} rounds each) "
          f"| vs plain |")
    print("|---|---|---|")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.4f} | {median / plain:.1f}x |")


def broadcast_tradeoff(rounds: int, quick: bool) -> None:
    """Part 4: the broadcast compressed (config.broadcast), uplink uncompressed."""
    print(f"\n| broadcast | downlink bytes / client / round | test accuracy ({rounds} rounds) |")
    print("|---|---|---|")
    rows = [("float32", {})]
    for bits in ((8, 2) if quick else (8, 4, 2)):
        rows.append((f"{bits}-bit", {"broadcast.bits": bits}))
        rows.append((f"{bits}-bit, rotated", {"broadcast.bits": bits,
                                             "broadcast.rotation": "'hadamard'"}))
    for name, more in rows:
        result = run(_config(rounds, None, **more), None, progress=False)
        print(f"| {name} | {result.history[-1]['downlink_bytes_per_client']:,.0f} | "
              f"{result.summary['final']['test_accuracy']:.3f} |", flush=True)


def secure_sum_scaling(sizes: list[tuple[int, int]], repeats: int) -> None:
    """The secure sum alone (the reducing part, 10% dropouts, b = 32) on random integer
    updates of m clients x d entries, against the plain sum: median seconds of `repeats`
    calls after the first (which compiles)."""
    import jax
    import jax.numpy as jnp

    from fedjax_sim.aggregators import Cohort, secure_sum

    part = secure_sum(32, dropout_rate=0.1)
    print("\n| clients m | entries d | secure sum ms / round | plain sum ms | first call s |")
    print("|---|---|---|---|---|")
    for m, d in sizes:
        updates = {"w": jax.random.randint(jax.random.key(0), (m, d), -1000, 1000, jnp.int32)}
        cohort = Cohort(updates, jnp.ones(m), jnp.ones(m, bool))
        secure = jax.jit(lambda c, k: part.reduce(c, (), k)[0])
        plain = jax.jit(lambda c: jnp.sum(c.updates["w"], axis=0))
        start = time.perf_counter()
        jax.block_until_ready(secure(cohort, jax.random.key(1)))
        first = time.perf_counter() - start
        jax.block_until_ready(plain(cohort))
        timed = {"secure": [], "plain": []}
        for r in range(repeats):  # round-robin
            for name, call in (("secure", lambda: secure(cohort, jax.random.key(2 + r))),
                               ("plain", lambda: plain(cohort))):
                start = time.perf_counter()
                jax.block_until_ready(call())
                timed[name].append(time.perf_counter() - start)
        ms = {k: 1000 * statistics.median(v) for k, v in timed.items()}
        print(f"| {m} | {d:,} | {ms['secure']:.1f} | {ms['plain']:.2f} | {first:.1f} |",
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 rounds, fewer runs")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--cost-rounds", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--parts", default="1,2,3,4", help="which parts to run, e.g. 3")
    args = parser.parse_args()
    parts = {int(p) for p in args.parts.split(",")}
    rounds = args.rounds or (20 if args.quick else 200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # failed secure rounds warn
        if 1 in parts:
            tradeoff(rounds, args.quick)
        if 2 in parts:
            costs(args.cost_rounds or (3 if args.quick else 10),
                  args.repeats or (1 if args.quick else 3))
    sizes = [(10, 650), (10, 53_000)] + ([] if args.quick else [(50, 650), (50, 53_000),
                                                               (100, 53_000)])
    if 3 in parts:
        secure_sum_scaling(sizes, args.repeats or (1 if args.quick else 3))
    if 4 in parts:
        broadcast_tradeoff(rounds, args.quick)


if __name__ == "__main__":
    main()
