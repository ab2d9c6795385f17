"""The accuracy / ε trade-off of DP-FedAvg on digits (configs/digits_dp_fedavg.py).

    python benchmarks/dp_tradeoff.py             # 3 seeds per row (~4 min on a 2-core CPU)
    python benchmarks/dp_tradeoff.py --seeds 1   # one seed per row

Runs the shipped config (100 clients, Poisson sampling with q = 20/100, clip norm 0.5,
50 rounds, δ = 1e-3) for several noise multipliers z, plus the same training without DP
(uniform weights, fixed cohorts of 20, no clipping) and with clipping only (z = 0), and
prints a markdown table: final test accuracy (mean ± std over seeds; the data split is the
same, the training seed varies) and ε after the 50 rounds. A second block adds the noise of
a 1,000-client cohort (`noise_cohort_size=1000`): the std on the mean update falls from
z·C/20 to z·C/1000, as for a population 50× larger sampled at the same rate (ε is then
that population's). A third block runs DP-FTRL (configs/digits_dp_ftrl.py: no sampling,
each client every 5 rounds, 5-band BandMF noise, then tree-aggregation noise, then
amplified BandMF: 2 groups of 50 clients, each member of a round's group joining with
probability 0.4, 2 bands) at the ε of the z = 1 and z = 2 rows, its noise multiplier
calibrated to that ε (`--ftrl-only` runs only this block).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import warnings

from fedjax_sim.cli.config import load_config
from fedjax_sim.cli.experiment import run

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIG = os.path.join(CONFIGS, "digits_dp_fedavg.py")
FTRL_CONFIG = os.path.join(CONFIGS, "digits_dp_ftrl.py")


def _one(overrides: dict, seed: int, path: str = CONFIG) -> tuple[float, float | None]:
    config = load_config(path, {**{k: str(v) for k, v in overrides.items()}, "seed": str(seed)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # z = 0 has ε = inf, which warns
        result = run(config, None, progress=False)
    privacy = result.summary.get("privacy") or {}
    return result.summary["final"]["test_accuracy"], privacy.get("epsilon")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--ftrl-only", action="store_true", help="only the DP-FTRL rows")
    args = parser.parse_args()
    rows = [("no DP (no clipping, fixed cohorts)", {"privacy": "None"})]
    rows += [(f"z = {z:g}" + (" (clipping only)" if z == 0 else ""),
              {"privacy.noise_multiplier": z}) for z in (0.0, 0.3, 0.5, 1.0, 2.0, 4.0)]
    rows += [(f"z = {z:g}, noise of a 1,000-client cohort",
              {"privacy.noise_multiplier": z, "privacy.noise_cohort_size": 1000})
             for z in (1.0, 2.0)]
    from fedjax_sim.privacy.matrix_factorization import calibrate_noise_multiplier

    for strategy, name in (("bandmf", "BandMF"), ("tree", "tree aggregation")):
        for target in (8.31, 2.74):  # the ε of the z = 1 and z = 2 rows
            z = calibrate_noise_multiplier(target, rounds=50, min_separation=5, delta=1e-3,
                                           strategy=strategy)
            rows.append((f"DP-FTRL, {name} (z = {z:.3f}: ε of DP-FedAvg's z = "
                         f"{1 if target > 5 else 2})", {
                             "privacy.noise_multiplier": round(z, 4),
                             "privacy.strategy": strategy, "_config": FTRL_CONFIG}))
    for target in (8.31, 2.74):  # amplified BandMF: 2 groups of 50, each joins w.p. 0.4
        z = calibrate_noise_multiplier(target, rounds=50, min_separation=2, delta=1e-3,
                                       sampling_rate=0.4)
        rows.append((f"DP-FTRL, amplified BandMF (cyclic Poisson, b = 2, q = 0.4; z = {z:.3f}: "
                     f"ε of DP-FedAvg's z = {1 if target > 5 else 2})", {
                         "privacy.noise_multiplier": round(z, 4), "privacy.min_separation": 2,
                         "privacy.participation": "cyclic_poisson", "_config": FTRL_CONFIG}))
    if args.ftrl_only:
        rows = rows[-6:]
    print("| run | test accuracy | ε (δ = 1e-3, 50 rounds) |")
    print("|---|---|---|")
    for name, overrides in rows:
        overrides = dict(overrides)
        path = overrides.pop("_config", CONFIG)
        results = [_one(overrides, seed, path) for seed in range(args.seeds)]
        acc = [a for a, _ in results]
        eps = results[0][1]
        spread = f" ± {statistics.stdev(acc):.3f}" if len(acc) > 1 else ""
        if overrides.get("privacy") == "None":
            shown = "— (not private)"
        elif eps is None or not math.isfinite(eps):
            shown = "∞"
        else:
            shown = f"{eps:.2f}"
        print(f"| {name} | {statistics.mean(acc):.3f}{spread} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
