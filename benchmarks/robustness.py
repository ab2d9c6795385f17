"""Accuracy under attack: every attack against every aggregation rule on digits
(configs/digits_robust.py: 100 clients, Dirichlet(0.5) label skew, 20 per round, uniform
weights, 100 rounds; a fixed 20% of the clients are malicious).

    python benchmarks/robustness.py              # 3 seeds per cell (~20 min on a 2-core CPU)
    python benchmarks/robustness.py --seeds 1 --attacks none sign_flip --rules fedavg multi_krum
    python benchmarks/robustness.py --update     # also rewrite the tables in README.md and
                                                 # docs/robustness.md

Prints two markdown tables: final test accuracy (mean ± std over seeds; the data split and
the malicious clients are the same, the training seed varies) for each attack (rows) and
rule (columns), and for the backdoor the attack success rate (the share of triggered test
images of other classes classified as the target). A run whose loss turns NaN stops there
and is counted as diverged. `--json PATH` also writes every
number (benchmarks/robustness_results.json holds the documented run; `--from` that file
prints its tables again without running); `--update` writes the tables between the `<!-- robustness table -->` markers of
README.md and docs/robustness.md. DP-FedAvg is client-level DP with Poisson sampling (clip 0.3, z = 1, δ = 1e-3);
its ε is printed under the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

from fedjax_sim.cli.config import load_config
from fedjax_sim.cli.experiment import run
from fedjax_sim.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "digits_robust.py")
README, DOC = os.path.join(ROOT, "README.md"), os.path.join(ROOT, "docs", "robustness.md")
MARKER, END_MARKER = "<!-- robustness table -->", "<!-- /robustness table -->"

# The malicious clients' behaviour: config.attack overrides (None: no attack).
ATTACKS = {
    "none": None,
    "label_flip": {"data": "dict(name='label_flip')", "update": "None"},
    "sign_flip": {"update": "dict(name='sign_flip', scale=4.0)"},
    "gaussian_noise": {"update": "dict(name='gaussian_noise', std=1.0)"},
    "little_is_enough": {"update": "dict(name='little_is_enough')"},
    "inner_product": {"update": "dict(name='inner_product', epsilon=0.5)"},
    "backdoor": {"data": "dict(name='backdoor', target=0, poison_fraction=0.5)",
                 "update": "dict(name='model_replacement')"},
}
# The aggregation: config overrides of the aggregator (and privacy for DP-FedAvg).
RULES = {
    "fedavg": {"aggregator": "None"},
    "dp_fedavg": {"aggregator": "None", "privacy.level": "client", "privacy.clip_norm": "0.3",
                  "privacy.noise_multiplier": "1.0", "privacy.delta": "1e-3"},
    "median": {"aggregator.robust": "dict(name='coordinate_median')"},
    "trimmed_mean": {"aggregator.robust": "dict(name='trimmed_mean', beta=0.2)"},
    "multi_krum": {"aggregator.robust": "dict(name='krum', num_byzantine=4, num_selected=10)"},
    "geometric_median": {"aggregator.robust": "dict(name='geometric_median', iterations=3)"},
    "norm_bounding": {"aggregator.robust": "dict(name='norm_bounding', max_norm=0.3)"},
    "centered_clipping": {"aggregator.robust": "dict(name='centered_clipping', tau=0.3)"},
}


def _overrides(attack: str, rule: str, seed: int) -> dict:
    out = {"seed": str(seed)}
    spec = ATTACKS[attack]
    if spec is None:
        out["attack"] = "None"
    else:
        out.update({f"attack.{k}": v for k, v in spec.items()})
    out.update(RULES[rule])
    return out


def _one(attack: str, rule: str, seed: int, rounds: int) -> dict:
    config = load_config(CONFIG, {**_overrides(attack, rule, seed), "rounds": str(rounds),
                                  "eval_every": str(rounds)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result = run(config, None, progress=False)
        except UserError as e:
            if "diverged" not in str(e):
                raise
            return {"test_accuracy": None, "backdoor_success": None, "epsilon": None,
                    "diverged": str(e)}
    final = result.summary["final"]
    return {"test_accuracy": final["test_accuracy"],
            "backdoor_success": final.get("backdoor_success"),
            "epsilon": (result.summary.get("privacy") or {}).get("epsilon")}


def _cell(values: list[float | None]) -> str:
    """mean ± std of the runs that finished; a run that diverged (NaN loss) is counted."""
    done = [v for v in values if v is not None]
    diverged = len(values) - len(done)
    if not done:
        return "diverged" if diverged else "—"
    spread = f" ± {statistics.stdev(done):.3f}" if len(done) > 1 else ""
    return f"{statistics.mean(done):.3f}{spread}" + (f" ({diverged} diverged)" if diverged else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--json", default=None, help="also write every number to this file")
    parser.add_argument("--update", action="store_true",
                        help="rewrite the tables in README.md and docs/robustness.md")
    parser.add_argument("--from", dest="source", default=None,
                        help="take the numbers from a --json file instead of running")
    args = parser.parse_args()
    start = time.perf_counter()
    if args.source:
        with open(args.source) as f:
            results = {tuple(k.split("/")): v for k, v in json.load(f).items()}
        args.seeds = len(next(iter(results.values())))
    else:
        results = {}
        for attack in args.attacks:
            for rule in args.rules:
                results[attack, rule] = [_one(attack, rule, s, args.rounds)
                                         for s in range(args.seeds)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{a}/{r}": v for (a, r), v in results.items()}, f, indent=1)
    table = _tables(results, args)
    print(table)
    if not args.source:
        print(f"\n{len(results) * args.seeds} runs in {time.perf_counter() - start:.0f} s")
    if args.update:
        for path in (README, DOC):
            _write_between_markers(path, table)
            print(f"updated {os.path.relpath(path, ROOT)}")


def _write_between_markers(path: str, table: str) -> None:
    with open(path) as f:
        text = f.read()
    start, end = text.index(MARKER) + len(MARKER), text.index(END_MARKER)
    with open(path, "w") as f:
        f.write(text[:start] + "\n" + table + "\n" + text[end:])


def _tables(results: dict, args) -> str:
    lines = []
    add = lines.append
    add(f"Test accuracy after {args.rounds} rounds with 20% malicious clients (mean ± std "
        f"over {args.seeds} seeds):\n")
    add("| attack | " + " | ".join(args.rules) + " |")
    add("|---|" + "---|" * len(args.rules))
    for attack in args.attacks:
        add(f"| {attack} | " + " | ".join(
            _cell([r["test_accuracy"] for r in results[attack, rule]]) for rule in args.rules) + " |")
    if "backdoor" in args.attacks:
        add("\nBackdoor success rate (triggered test images of other classes classified as "
            "the target):\n")
        add("| attack | " + " | ".join(args.rules) + " |")
        add("|---|" + "---|" * len(args.rules))
        add("| backdoor | " + " | ".join(
            _cell([r["backdoor_success"] for r in results["backdoor", rule]])
            for rule in args.rules) + " |")
    if "dp_fedavg" in args.rules:
        eps = results[args.attacks[0], "dp_fedavg"][0]["epsilon"]
        if eps is not None:
            add(f"\nDP-FedAvg: ε = {eps:.2f} at δ = 1e-3 after {args.rounds} rounds")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
