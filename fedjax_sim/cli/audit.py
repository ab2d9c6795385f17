"""`fedjax-sim audit`: an empirical privacy audit of a private config (simulation.audit)."""

from __future__ import annotations

import argparse
import json


def add_audit_parser(subparsers) -> argparse.ArgumentParser:
    """Registers the `audit` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "audit", help="audit a private config: canary clients in one run, and an empirical "
                      "lower bound on ε to compare with the accountant's",
        epilog="Override any config value with --config.KEY=VALUE.")
    parser.add_argument("--config", required=True, help="a config with a client-level privacy section")
    parser.add_argument("--canaries", type=int, default=1000,
                        help="canary clients drawn (each inserted with probability 1/2)")
    parser.add_argument("--significance", type=float, default=0.05,
                        help="the lower bound holds with probability 1 - this")
    parser.add_argument("--claimed-epsilon", type=float, default=None,
                        help="the ε to test (default: the run's own accountant's)")
    parser.add_argument("--canary-norm", type=float, default=None,
                        help="the norm of the canaries' updates (default: the clip norm; "
                             "larger tests that clipping is in force)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def run_audit(args, overrides) -> int:
    from fedjax_sim.cli.config import load_config
    from fedjax_sim.cli.experiment import build
    from fedjax_sim.simulation.audit import audit

    config = load_config(args.config, overrides)
    parts = build(config)
    kept = {k: parts[k] for k in ("task", "eval_every", "engine", "preprocess", "eval_data",
                                  "aggregator") if k in parts}
    report = audit(parts["model"], parts["algorithm"], parts["train_data"], rounds=parts["rounds"],
                   clients_per_round=parts["clients_per_round"], privacy=parts["privacy"],
                   canaries=args.canaries, seed=parts["seed"], significance=args.significance,
                   claimed_epsilon=args.claimed_epsilon, canary_norm=args.canary_norm,
                   progress=False, **kept)
    s = report.summary()
    claim = "—" if s["epsilon_claimed"] is None else f"{s['epsilon_claimed']:.3g}"
    print(f"audit: ε ≥ {s['epsilon_lower_bound']:.3g} (one run, {s['canaries_in']} of "
          f"{s['canaries_in'] + s['canaries_out']} canaries in, significance "
          f"{s['significance']:g}) vs claimed ε = {claim} at δ = {s['delta']:g}: "
          f"{'VIOLATED' if s['violated'] else 'consistent'}")
    print(json.dumps(s))
    return 1 if s["violated"] else 0
