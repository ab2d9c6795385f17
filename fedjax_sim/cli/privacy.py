"""The `fedjax-sim privacy` command: ε of a DP training run, or the noise for a target ε.

    fedjax-sim privacy --noise-multiplier 1.2 --sampling-rate 0.0355 --rounds 100 --delta 1e-5
    fedjax-sim privacy --epsilon 2.0 --sampling-rate 0.0355 --rounds 100 --delta 1e-5
    fedjax-sim privacy --noise-multiplier 1.2 --clients-per-round 120 --population 3383 ...

`--sampling-rate q` is Poisson sampling (each client joins a round with probability q);
`--clients-per-round m --population N` is fixed-size sampling without replacement. The
numbers come from `fedjax_sim.privacy.accounting` (dp_accounting underneath).
"""

from __future__ import annotations

import argparse
import json
import math

from fedjax_sim.errors import UserError
from fedjax_sim.cli.rules import POSITIVE_INT, Rule, is_number, number_above, number_at_least

_PROBABILITY = Rule(lambda v: is_number(v) and 0 < v <= 1, "a probability in (0, 1]")
# The rule of each numeric flag (None: not given); --delta is checked by the accountant
# ("delta must be in (0, 1), typically ≪ 1/N").
FLAG_RULES = {"noise_multiplier": number_at_least(0), "epsilon": number_above(0),
              "sampling_rate": _PROBABILITY, "clients_per_round": POSITIVE_INT,
              "rounds": POSITIVE_INT, "population": POSITIVE_INT,
              "max_cohort_size": POSITIVE_INT}


def add_privacy_parser(subparsers) -> argparse.ArgumentParser:
    """Registers the `privacy` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "privacy", help="ε of a differentially private training run, or the noise multiplier "
                        "that reaches a target ε",
        description="Privacy accounting for DP-FedAvg-style training: each round samples "
                    "clients and adds Gaussian noise with multiplier z (std / clip norm).")
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--noise-multiplier", type=float, metavar="Z",
                      help="noise std / clip norm; prints ε")
    goal.add_argument("--epsilon", type=float, metavar="EPS",
                      help="target ε; prints the smallest noise multiplier that reaches it")
    sampling = parser.add_mutually_exclusive_group(required=True)
    sampling.add_argument("--sampling-rate", type=float, metavar="Q",
                          help="Poisson sampling: each client joins a round with probability Q")
    sampling.add_argument("--clients-per-round", type=int, metavar="M",
                          help="fixed-size sampling: M of --population clients per round, "
                               "without replacement")
    parser.add_argument("--rounds", type=int, required=True, help="number of rounds")
    parser.add_argument("--delta", type=float, required=True,
                        help="δ of the (ε, δ) guarantee; use δ ≪ 1/population")
    parser.add_argument("--population", type=int, metavar="N",
                        help="number of clients (needed with --clients-per-round and "
                             "--max-cohort-size; checks δ against 1/N)")
    parser.add_argument("--max-cohort-size", type=int, metavar="M",
                        help="Poisson sampling truncated to at most M clients per round; the "
                             "overflow probability is charged to δ")
    parser.add_argument("--accountant", choices=("rdp", "pld"), default="rdp",
                        help="RDP (default; an upper bound) or PLD (tighter, Poisson only)")
    parser.add_argument("--json", action="store_true", help="print a JSON object")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def _fmt_eps(eps: float) -> str:
    if math.isinf(eps):
        return "inf"
    return f"{eps:.3g}" if eps < 1 else f"{eps:.2f}"


def _describe(args, overflow: float | None) -> str:
    if args.clients_per_round is not None:
        what = f"fixed-size sampling of {args.clients_per_round} of {args.population} clients"
    else:
        what = f"Poisson sampling q = {args.sampling_rate:g}"
        if args.max_cohort_size is not None:
            what += (f" capped at {args.max_cohort_size} clients, overflow probability "
                     f"{overflow:.2g} per round")
    return what


def _check_numbers(args) -> None:
    """Each numeric flag given is in its range (`--rounds must be an integer >= 1, got 0`)."""
    for key, rule in FLAG_RULES.items():
        value = getattr(args, key)
        if value is not None and not rule.ok(value):
            raise rule.error(f"--{key.replace('_', '-')}", value)
    if args.clients_per_round is not None and args.population is not None \
            and args.clients_per_round > args.population:
        raise UserError(f"--clients-per-round ({args.clients_per_round}) cannot exceed "
                        f"--population ({args.population}): the cohort is drawn from it")


def run_privacy(args) -> int:
    """Prints ε for --noise-multiplier, or the calibrated noise multiplier for --epsilon."""
    from fedjax_sim.privacy import accounting

    _check_numbers(args)
    fixed = args.clients_per_round is not None
    if fixed and args.population is None:
        raise UserError("--clients-per-round needs --population (the number of clients they "
                        "are drawn from)")
    if args.max_cohort_size is not None:
        if fixed:
            raise UserError("--max-cohort-size applies to Poisson sampling (--sampling-rate); "
                            "--clients-per-round already fixes the cohort size")
        if args.population is None:
            raise UserError("--max-cohort-size needs --population (the overflow probability "
                            "depends on it)")
        if args.epsilon is not None:
            raise UserError("--max-cohort-size works with --noise-multiplier only: calibrate "
                            "without it, then check the capped ε with --noise-multiplier")
    sampling = dict(sampling="fixed" if fixed else "poisson", sampling_rate=args.sampling_rate,
                    sample_size=args.clients_per_round, population=args.population)
    common = dict(rounds=args.rounds, delta=args.delta, accountant=args.accountant, **sampling)

    overflow = None
    if args.max_cohort_size is not None:
        overflow = accounting.SampledGaussian(
            noise_multiplier=args.noise_multiplier, max_sample_size=args.max_cohort_size,
            **sampling).overflow_probability()
    if args.noise_multiplier is not None:
        z = args.noise_multiplier
        eps = accounting.epsilon(z, max_sample_size=args.max_cohort_size, **common)
        shown_z, shown_eps = z, eps
    else:
        z = accounting.calibrate_noise(args.epsilon, **common)
        eps = accounting.epsilon(z, **common)
        # Print z rounded UP to 3 decimals (more noise, so still within the target) and the
        # ε of exactly that value, so the printed pair can be copied into a config.
        shown_z = math.ceil(z * 1000) / 1000
        shown_eps = accounting.epsilon(shown_z, **common)

    if args.json:
        row = dict(epsilon=None if math.isinf(eps) else eps, delta=args.delta,
                   noise_multiplier=z, rounds=args.rounds, sampling=sampling["sampling"],
                   sampling_rate=(args.clients_per_round / args.population if fixed
                                  else args.sampling_rate),
                   sample_size=args.clients_per_round, population=args.population,
                   max_cohort_size=args.max_cohort_size, overflow_probability=overflow,
                   accountant=args.accountant)
        if args.epsilon is not None:
            row["target_epsilon"] = args.epsilon
        print(json.dumps(row))
        return 0
    how = f"{_describe(args, overflow)}, "
    tail = f"{args.accountant.upper()} accountant"
    if args.noise_multiplier is not None:
        print(f"ε = {_fmt_eps(shown_eps)} at δ = {args.delta:g} after {args.rounds} rounds "
              f"({how}z = {shown_z:g}, {tail})")
    else:
        print(f"noise multiplier z = {shown_z:g} gives ε = {_fmt_eps(shown_eps)} at δ = "
              f"{args.delta:g} after {args.rounds} rounds ({how}{tail})")
    return 0
