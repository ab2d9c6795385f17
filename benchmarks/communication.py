"""Test accuracy against uplink bytes on digits, and what secure and encrypted aggregation
cost per round (configs/digits_fedavg.py: 100 clients, 10 per round, MLP 200-200,
55,210 parameters).

    python benchmarks/communication.py            # 200 rounds per run (~6 min, 2-core CPU)
    python benchmarks/communication.py --quick    # 20 rounds, fewer runs (a smoke run)

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
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 rounds, fewer runs")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--cost-rounds", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (20 if args.quick else 200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # failed secure rounds warn
        tradeoff(rounds, args.quick)
        costs(args.cost_rounds or (3 if args.quick else 10), args.repeats or (1 if args.quick else 3))


if __name__ == "__main__":
    main()
